"""A real S3 API server for the tests: moto's server, as a subprocess on 127.0.0.1.

Never in-process: delta-rs hangs against an in-process moto (delta-io/delta-rs#3942).
Spark's S3A connector, delta-rs and pyarrow all talk HTTP to it; nothing mocks an S3
client. The credentials and endpoint reach every client the standard way, through the
environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REGION = "us-east-1"
ACCESS_KEY = "embed-tests-access-key"
SECRET_KEY = "embed-tests-secret-key"  # noqa: S105 - moto checks no signature


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def environment(endpoint: str, secret: str = SECRET_KEY) -> dict[str, str]:
    """What a shell that reaches the server has: the AWS chain's variables."""
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": secret, "AWS_REGION": REGION}


class S3Server:
    """moto's S3 server on ``port``; ``start`` waits until it answers."""

    def __init__(self, port: int, log_dir: Path):
        self.port = port
        self.endpoint = f"http://127.0.0.1:{port}"
        self.log = log_dir / "moto.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> S3Server:
        moto = Path(sys.executable).parent / "moto_server"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen([str(moto), "-H", "127.0.0.1", "-p", str(self.port)],
                                         stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=2).close()
                return self
            except OSError:
                if self.proc.poll() is not None:
                    tail = self.log.read_text()[-2000:]
                    raise RuntimeError(f"moto_server exited: {tail}") from None
                time.sleep(0.2)
        raise RuntimeError(f"moto_server did not answer on {self.endpoint}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)

    def client(self):  # noqa: ANN201 - boto3 is a test-only dependency
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION,
                            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY)

    def bucket(self, name: str) -> str:
        """A new bucket; returns its URI (``s3://name``)."""
        self.client().create_bucket(Bucket=name)
        return f"s3://{name}"

    def objects(self, bucket: str) -> dict[str, bytes]:
        """Every object in the bucket: key -> bytes (what a leak scan reads)."""
        client = self.client()
        out = {}
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for item in page.get("Contents", []):
                out[item["Key"]] = client.get_object(Bucket=bucket, Key=item["Key"])[
                    "Body"].read()
        return out

    def upload_folder(self, folder: Path, uri: str) -> str:
        """Copy a local folder's files under ``uri`` (``s3://bucket/prefix``)."""
        bucket, _, prefix = uri.removeprefix("s3://").partition("/")
        client = self.client()
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                key = f"{prefix}/{path.relative_to(folder)}".lstrip("/")
                client.upload_file(str(path), bucket, key)
        return uri


def set_environment(port: int) -> None:
    """The test process's environment names the server (before any Spark JVM starts, so
    its Python workers inherit it as a node's environment would)."""
    os.environ.update(environment(f"http://127.0.0.1:{port}"))
