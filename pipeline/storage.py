"""Where things live: the one owner of locations and of what each client needs to reach
them.

A location is a URI until this module says it is local. ``s3://`` and ``s3n://`` are
spelled ``s3a://`` (the Hadoop connector's scheme; delta-rs and pyarrow read it too),
``file://`` and relative paths become absolute local paths, ``abfss://`` / ``gs://`` /
``hdfs://`` stay as they are. Joining, parents and names are string arithmetic on that
one spelling, so ``s3a://bucket/a`` keeps its ``//`` and a local path its root.

Each client gets its settings from one :class:`StorageSettings`, made from the
environment (the standard AWS chain: AWS_ENDPOINT_URL[_S3], AWS_REGION /
AWS_DEFAULT_REGION; credentials stay with each client's own chain) and the config's
optional ``storage:`` section (endpoint, region, path style; never a secret):

- Spark: Hadoop keys (``fs.s3a.*``), :meth:`StorageSettings.hadoop_conf`;
- delta-rs: ``storage_options``, :meth:`StorageSettings.delta_options`;
- pyarrow: a filesystem and the path inside it, :meth:`StorageSettings.filesystem`.

Secrets never pass through here: access keys, session tokens and profiles are read by
each client from the environment, the profile files or the instance's role, and the
values of config keys that name one are redacted wherever a config is stored or
printed (:func:`redacted`).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import ConfigError

if TYPE_CHECKING:
    import pyarrow.fs as pafs

# Scheme -> the one spelling kept (s3 and s3n are the same store as s3a).
_SPELLING = {"s3": "s3a", "s3n": "s3a", "s3a": "s3a", "abfss": "abfss", "abfs": "abfs",
             "gs": "gs", "hdfs": "hdfs", "wasbs": "wasbs"}
# Scheme -> the storage kind whose connector (jars) and settings it needs.
KINDS = {"s3a": "s3", "abfss": "azure", "abfs": "azure", "wasbs": "azure", "gs": "gcs",
         "hdfs": "hdfs"}
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# Config keys whose values are secrets (spark.conf, source.options): redacted when stored
# or printed. Spark's own spark.redaction.regex covers less (no "credential").
SECRET_KEY = re.compile(r"(?i)secret|password|passwd|token|credential|key")
REDACTED = "*********(redacted)"


# --------------------------------------------------------------------------- locations


def scheme(location: str) -> str:
    """``file`` for a local path, else the URI's scheme in its one spelling."""
    found = _SCHEME.match(location)
    if not found or found.group(1).lower() == "file":
        return "file"
    name = found.group(1).lower()
    return _SPELLING.get(name, name)


def is_local(location: str) -> bool:
    return scheme(location) == "file"


def kind(location: str) -> str | None:
    """The storage kind a location needs a connector for (s3, azure, gcs), or None."""
    return KINDS.get(scheme(location))


def kinds(locations: Iterable[str]) -> set[str]:
    """The storage kinds (s3, azure, gcs) among ``locations``: the connectors they need."""
    return {k for k in (kind(location) for location in locations) if k is not None}


def normalize(location: str, base: Path | None = None) -> str:
    """The location in its one spelling: local paths absolute (relative ones against
    ``base``, else the working directory), ``file://`` dropped, ``s3://`` -> ``s3a://``;
    no trailing slash."""
    found = _SCHEME.match(location)
    if found is None or found.group(1).lower() == "file":
        path = location[len(found.group(0)):] if found else location
        if found is None and path.startswith("file:/"):  # Hadoop's file:/abs/path
            path = path[len("file:"):]
        local = Path(path).expanduser()
        if not local.is_absolute():
            local = (base or Path.cwd()) / local
        return str(local.resolve())
    rest = location[len(found.group(0)):].rstrip("/")
    return f"{scheme(location)}://{rest}"


def local_path(location: str) -> Path:
    """The local path of a local location (a remote one is a bug: ask :func:`is_local`)."""
    if not is_local(location):
        raise ValueError(f"{location} is not a local path")
    return Path(normalize(location))


def join(location: str, *parts: str) -> str:
    out = location.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def parent(location: str) -> str:
    """The folder holding ``location`` (``s3a://bucket/x`` -> ``s3a://bucket``)."""
    head, _, _ = location.rstrip("/").rpartition("/")
    if head.endswith(":/"):  # s3a://bucket: a bucket is its own top
        return location.rstrip("/")
    return head or "/"


def name(location: str) -> str:
    return location.rstrip("/").rpartition("/")[2]


def bucket_and_key(location: str) -> tuple[str, str]:
    """(authority, path inside it) of a remote location: ``s3a://b/k/x`` -> (b, k/x)."""
    rest = location[len(_SCHEME.match(location).group(0)):]  # type: ignore[union-attr]
    authority, _, key = rest.partition("/")
    return authority, key


def display(location: str) -> str:
    """How docs and OpenLineage name a location: S3 as ``s3://`` (the store's own name)."""
    return "s3://" + location[len("s3a://"):] if scheme(location) == "s3a" else location


def write_bytes(location: str, data: bytes) -> None:
    """Write a whole file: locally by a temp file renamed into place (folders made), to
    an object store by one PUT (an object appears whole or not at all)."""
    location = normalize(location)
    if is_local(location):
        path = local_path(location)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        return
    fs, inner = settings().filesystem(location)
    with fs.open_output_stream(inner) as out:
        out.write(data)


def exists(location: str) -> bool:
    """A file or folder (an object or a prefix with objects under it) is there."""
    import pyarrow.fs as pafs

    fs, inner = settings().filesystem(normalize(location))
    return fs.get_file_info(inner).type != pafs.FileType.NotFound


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock (fcntl) on ``path``: other processes of this node wait here."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def node_cache(kind: str) -> Path:
    """This node's cache folder for ``kind`` (models, onnx): ``$EMBED_CACHE/<kind>``,
    else ``~/.cache/embed-pipeline/<kind>``."""
    root = os.environ.get("EMBED_CACHE") or Path.home() / ".cache" / "embed-pipeline"
    return Path(root).expanduser() / kind


_COPIED = ".embed-copy.json"  # written last: a folder with it is a whole copy


def local_copy(location: str, cache: Path | None = None) -> Path:
    """A folder of an object store (a model directory) as a local folder: copied once per
    node into ``cache`` (default :func:`node_cache` ``("models")``) under a key of its
    location and listing (every file's path, size and modification time), so a folder
    rewritten in place is copied anew. The copy is made in a temp folder and renamed
    into place under a file lock: concurrent workers on a node wait for the first one's
    copy and never see half of it. FileNotFoundError where the folder has no files."""
    import hashlib
    import json
    import shutil

    import pyarrow.fs as pafs

    location = normalize(location)
    fs, inner = settings().filesystem(location)
    found = fs.get_file_info(pafs.FileSelector(inner, recursive=True, allow_not_found=True))
    files = sorted((i.path[len(inner):].lstrip("/"), i.size, i.mtime_ns)
                   for i in found if i.type == pafs.FileType.File)
    if not files:
        raise FileNotFoundError(f"no files under {location}")
    key = hashlib.sha256(json.dumps([location, files]).encode()).hexdigest()[:24]
    root = cache or node_cache("models")
    target = root / f"{name(location)}-{key}"
    if (target / _COPIED).is_file():
        return target
    with locked(root / f".{target.name}.lock"):
        if (target / _COPIED).is_file():  # another worker copied it meanwhile
            return target
        tmp = root / f".{target.name}.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(target, ignore_errors=True)  # a copy a killed process left half done
        pafs.copy_files(inner, str(tmp), source_filesystem=fs,
                        destination_filesystem=pafs.LocalFileSystem())
        (tmp / _COPIED).write_text(json.dumps({"location": location, "files": files}))
        os.replace(tmp, target)
    return target


# --------------------------------------------------------------------------- secrets


def is_secret_key(key: str) -> bool:
    return bool(SECRET_KEY.search(key))


def redacted(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with the value of every key that names a secret replaced."""
    return {k: REDACTED if is_secret_key(k) and v not in (None, "") else v
            for k, v in values.items()}


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True, kw_only=True)
class StorageConfig:
    """How to reach an S3-compatible object store: settings that are not secret. Unset,
    each comes from the environment (AWS_ENDPOINT_URL[_S3], AWS_REGION /
    AWS_DEFAULT_REGION); credentials always do (the standard AWS chain), see
    docs/storage.md."""

    endpoint: str | None = None  # e.g. http://127.0.0.1:9000 (http: path style, no TLS)
    region: str | None = None
    path_style: bool | None = None  # null: path style for an http endpoint, else the client's


@dataclass(frozen=True)
class StorageSettings:
    """What every client needs to reach the object stores of one run: no secrets.

    ``endpoint``: an S3-compatible endpoint URL (``http://`` implies path-style access
    without TLS); ``region``; ``path_style``: None leaves it to the client (virtual-hosted
    on AWS)."""

    endpoint: str | None = None
    region: str | None = None
    path_style: bool | None = None

    @classmethod
    def of(cls, section: StorageConfig | None = None,
           env: dict[str, str] | None = None) -> StorageSettings:
        """The config's ``storage:`` section where it sets a value, else the environment."""
        env = dict(os.environ) if env is None else env
        endpoint = (section.endpoint if section and section.endpoint else
                    env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None)
        region = (section.region if section and section.region else
                  env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None)
        path_style = section.path_style if section else None
        if path_style is None and endpoint and endpoint.startswith("http://"):
            path_style = True
        return cls(endpoint=endpoint.rstrip("/") if endpoint else None, region=region,
                   path_style=path_style)

    @property
    def plain_http(self) -> bool:
        return bool(self.endpoint and self.endpoint.startswith("http://"))

    def hadoop_conf(self) -> dict[str, str]:
        """Hadoop keys (without ``spark.hadoop.``) for Spark's S3A connector. Credentials
        come from S3A's chain and then the AWS SDK's default one (environment, profile,
        web identity, container and instance roles): the same sources delta-rs and
        pyarrow read."""
        conf = {
            "fs.s3a.aws.credentials.provider": ",".join((
                "org.apache.hadoop.fs.s3a.TemporaryAWSCredentialsProvider",
                "org.apache.hadoop.fs.s3a.SimpleAWSCredentialsProvider",
                "software.amazon.awssdk.auth.credentials.DefaultCredentialsProvider")),
            # commits of the Delta log are create-if-absent PUTs (If-None-Match: *):
            # what keeps two drivers from overwriting one version (docs/storage.md)
            "fs.s3a.create.conditional.enabled": "true",
        }
        if self.endpoint:
            conf["fs.s3a.endpoint"] = self.endpoint
        if self.region:
            conf["fs.s3a.endpoint.region"] = self.region
        if self.path_style is not None:
            conf["fs.s3a.path.style.access"] = str(self.path_style).lower()
        if self.plain_http:
            conf["fs.s3a.connection.ssl.enabled"] = "false"
        return conf

    def delta_options(self, location: str) -> dict[str, str]:
        """delta-rs ``storage_options`` for ``location`` (credentials: delta-rs' own chain
        from the environment). S3 commits are conditional puts (put-if-absent)."""
        if scheme(location) != "s3a":
            return {}
        options = {"AWS_CONDITIONAL_PUT": "etag"}
        if self.endpoint:
            options["AWS_ENDPOINT_URL"] = self.endpoint
        if self.region:
            options["AWS_REGION"] = self.region
        if self.plain_http:
            options["AWS_ALLOW_HTTP"] = "true"
        if self.path_style is not None:
            options["AWS_VIRTUAL_HOSTED_STYLE_REQUEST"] = str(not self.path_style).lower()
        return options

    def filesystem(self, location: str) -> tuple[pafs.FileSystem, str]:
        """A pyarrow filesystem for ``location`` and the path inside it."""
        import pyarrow.fs as pafs

        where = scheme(location)
        if where == "file":
            return pafs.LocalFileSystem(), str(local_path(location))
        if where == "s3a":
            bucket, key = bucket_and_key(location)
            return self._s3(), f"{bucket}/{key}".rstrip("/")
        fs, path = pafs.FileSystem.from_uri(display(location))
        return fs, path

    def _s3(self) -> pafs.FileSystem:
        import pyarrow.fs as pafs

        kwargs: dict[str, Any] = {"region": self.region} if self.region else {}
        if self.endpoint:
            where = _SCHEME.match(self.endpoint)
            kwargs["endpoint_override"] = self.endpoint[len(where.group(0)):] if where \
                else self.endpoint
            kwargs["scheme"] = "http" if self.plain_http else "https"
        if self.path_style is False:
            kwargs["force_virtual_addressing"] = True
        return pafs.S3FileSystem(**kwargs)


_active: StorageSettings | None = None


def settings() -> StorageSettings:
    """The settings of this process's run (:func:`activate`), else the environment's."""
    return _active or StorageSettings.of()


def activate(section: StorageConfig | None) -> StorageSettings:
    """Use the config's ``storage:`` section (over the environment) for this process's
    clients; returns the settings now in use."""
    return use(StorageSettings.of(section))


def use(chosen: StorageSettings) -> StorageSettings:
    """Use ``chosen`` for this process's clients (a worker: the driver's settings)."""
    global _active
    _active = chosen
    return chosen


def check_section(raw: dict[str, Any]) -> None:
    """A ``storage:`` key that names a secret is refused: credentials are read from the
    environment's standard chain, never from a config file."""
    for key in raw:
        if is_secret_key(str(key)):
            raise ConfigError(f"storage.{key}", "credentials are not read from the config: "
                              "set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (and "
                              "AWS_SESSION_TOKEN) or AWS_PROFILE in the environment, or use "
                              "the instance's role")


_NAME_PART = r"(?:[A-Za-z_][A-Za-z0-9_]*|`[^`]+`)"
_TABLE_NAME = re.compile(rf"{_NAME_PART}(?:\.{_NAME_PART}){{1,2}}")
_SCHEMA_NAME = re.compile(rf"{_NAME_PART}(?:\.{_NAME_PART})?")


def _is_name(pattern: re.Pattern[str], text: str) -> bool:
    """``text`` is a name of that shape and no location (no ``/``, no scheme)."""
    return bool(pattern.fullmatch(text)) and "/" not in text and ":" not in text


def is_table_name(text: str) -> bool:
    """``schema.table`` or ``catalog.schema.table``: a table named through a catalog, not
    a location; pipeline.catalog resolves it."""
    return _is_name(_TABLE_NAME, text)


def is_schema_name(text: str) -> bool:
    """``schema`` or ``catalog.schema``, as :func:`is_table_name` reads a table's."""
    return _is_name(_SCHEMA_NAME, text)
