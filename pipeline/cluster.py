"""A real standalone Spark cluster on 127.0.0.1: one master, N workers; and a Spark
Connect server.

Started from the installed pyspark (``spark-class ...deploy.master.Master`` and
``...deploy.worker.Worker``), each process in its own session with its pid in a
state folder, and stopped by those pids (TERM, then KILL). For tests and for
trying a cluster on one machine; executors use this environment's Python (via
spark-defaults.conf) and the editable install of ``pipeline``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipeline.spark import (
    LONG_LIVED_JAVA_OPTIONS,
    base_conf,
    derby_log_option,
    local_metastore_conf,
    spark_home,
)

HOST = "127.0.0.1"


@dataclass(frozen=True)
class Cluster:
    state_dir: Path
    port: int = 7077
    webui_port: int = 8080

    @property
    def master_url(self) -> str:
        return f"spark://{HOST}:{self.port}"

    def _pidfile(self, name: str) -> Path:
        return self.state_dir / f"{name}.pid"

    def _spawn(self, name: str, *args: str, opts: str = "", isolated: bool = False) -> int:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, SPARK_LOCAL_IP=HOST, SPARK_HOME=str(spark_home()),
                   SPARK_WORKER_DIR=str(self.state_dir / f"{name}-work"))
        if isolated:  # a node of its own: its HOME (caches), temp and scratch folders
            node = self.state_dir / name
            for key, sub in (("HOME", "home"), ("TMPDIR", "tmp"), ("SPARK_LOCAL_DIRS", "local")):
                (node / sub).mkdir(parents=True, exist_ok=True)
                env[key] = str(node / sub)
            env.pop("EMBED_CACHE", None)
        if opts:
            env["SPARK_WORKER_OPTS"] = f"{env.get('SPARK_WORKER_OPTS', '')} {opts}".strip()
        log = open(self.state_dir / f"{name}.log", "w")
        proc = subprocess.Popen([str(spark_home() / "bin" / "spark-class"), *args],
                                stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        self._pidfile(name).write_text(str(proc.pid))
        return proc.pid

    def start(self, workers: int = 2, cores: int = 1, memory: str = "2g",
              timeout: float = 90, gpus: int = 0, isolated: bool = False) -> Cluster:
        """``gpus``: each worker advertises that many GPUs ("0", "1", ...) through a
        discovery script, whether or not the machine has them: Spark's GPU scheduling
        (stage-level profiles, task addresses) runs for real on a CPU machine.
        ``isolated``: each worker (and its executors) gets a HOME, temp and scratch folder
        of its own under the state folder, as nodes that share no disk: a model from an
        object store is copied once per worker."""
        if self.alive_workers() is not None:
            raise RuntimeError(f"a master already answers on {HOST}:{self.webui_port}; "
                               "stop it first (embed cluster stop)")
        self._spawn("master", "org.apache.spark.deploy.master.Master", "--host", HOST,
                    "--port", str(self.port), "--webui-port", str(self.webui_port))
        _wait(lambda: _port_open(self.port), timeout, "the master")
        opts = self._gpu_opts(gpus) if gpus else ""
        for i in range(workers):
            self._spawn(f"worker-{i}", "org.apache.spark.deploy.worker.Worker",
                        self.master_url, "--host", HOST, "--cores", str(cores),
                        "--memory", memory, "--webui-port", "0", opts=opts,
                        isolated=isolated)
        _wait(lambda: (self.alive_workers() or 0) >= workers, timeout,
              f"{workers} workers to register")
        return self

    def _gpu_opts(self, gpus: int) -> str:
        script = self.state_dir / "advertise_gpus.sh"
        found = json.dumps({"name": "gpu", "addresses": [str(i) for i in range(gpus)]})
        script.write_text(f"#!/bin/sh\necho '{found}'\n")
        script.chmod(0o755)
        return (f"-Dspark.worker.resource.gpu.amount={gpus} "
                f"-Dspark.worker.resource.gpu.discoveryScript={script}")

    def alive_workers(self) -> int | None:
        """Workers the master reports ALIVE; None when no master answers."""
        try:
            with urllib.request.urlopen(f"http://{HOST}:{self.webui_port}/json/",
                                        timeout=2) as resp:
                return int(json.load(resp).get("aliveworkers", 0))
        except (OSError, ValueError):
            return None

    def stop(self, grace: float = 10) -> list[int]:
        """Stop every process this cluster started, by its pid (workers first)."""
        pids = []
        files = sorted(self.state_dir.glob("worker-*.pid")) + [self._pidfile("master")]
        for pidfile in files:
            if not pidfile.is_file():
                continue
            pid = int(pidfile.read_text())
            _signal_group(pid, signal.SIGTERM)
            pids.append(pid)
        deadline = time.time() + grace
        for pid in pids:
            while _alive(pid) and time.time() < deadline:
                time.sleep(0.2)
            if _alive(pid):
                _signal_group(pid, signal.SIGKILL)
        for pidfile in files:
            pidfile.unlink(missing_ok=True)
        return pids


CONNECT_SERVER_CLASS = "org.apache.spark.sql.connect.service.SparkConnectServer"


@dataclass(frozen=True)
class ConnectServer:
    """Spark Connect's own server, started from the installed pyspark (``spark-submit
    --class ...SparkConnectServer spark-internal``) on 127.0.0.1: Delta's jars, extension
    and catalog, this environment's Python on its workers, and Hive support over an
    embedded Derby metastore with its warehouse, both under ``state_dir``. Catalog
    tables (``schema.table``) live there."""

    state_dir: Path
    port: int = 15002
    master: str = "local[*]"

    @property
    def url(self) -> str:
        return f"sc://{HOST}:{self.port}"

    def conf(self) -> dict[str, str]:
        state = self.state_dir
        return {**base_conf(), **local_metastore_conf(state),
                "spark.driver.extraJavaOptions": (f"{LONG_LIVED_JAVA_OPTIONS} "
                                                  f"{derby_log_option(state)}"),
                "spark.connect.grpc.binding.address": HOST,
                "spark.connect.grpc.binding.port": str(self.port),
                "spark.ui.enabled": "false"}

    def start(self, timeout: float = 120) -> ConnectServer:
        if _port_open(self.port):
            raise RuntimeError(f"something already listens on {HOST}:{self.port}; stop it "
                               "first (embed connect-server stop)")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        args = [str(spark_home() / "bin" / "spark-submit"), "--master", self.master]
        for key, value in self.conf().items():
            args += ["--conf", f"{key}={value}"]
        args += ["--class", CONNECT_SERVER_CLASS, "spark-internal"]
        python = self.conf()["spark.pyspark.python"]
        env = dict(os.environ, SPARK_LOCAL_IP=HOST, SPARK_HOME=str(spark_home()),
                   PYSPARK_PYTHON=python, PYSPARK_DRIVER_PYTHON=python)
        env.pop("SPARK_REMOTE", None)
        with open(self.state_dir / "connect-server.log", "w") as log:
            proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env,
                                    cwd=self.state_dir, start_new_session=True)
        (self.state_dir / "connect-server.pid").write_text(str(proc.pid))
        _wait(lambda: _port_open(self.port) or proc.poll() is not None, timeout,
              "the Spark Connect server")
        if proc.poll() is not None:
            tail = (self.state_dir / "connect-server.log").read_text()[-2000:]
            raise RuntimeError(f"the Spark Connect server exited:\n{tail}")
        return self

    def stop(self, grace: float = 10) -> list[int]:
        pidfile = self.state_dir / "connect-server.pid"
        if not pidfile.is_file():
            return []
        pid = int(pidfile.read_text())
        _signal_group(pid, signal.SIGTERM)
        deadline = time.time() + grace
        while _alive(pid) and time.time() < deadline:
            time.sleep(0.2)
        if _alive(pid):
            _signal_group(pid, signal.SIGKILL)
        pidfile.unlink(missing_ok=True)
        return [pid]


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # the process and the JVM children it started
    except ProcessLookupError:
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie child of ours counts as gone
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return True


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((HOST, port)) == 0


def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
