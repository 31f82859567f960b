"""Object-store access in one place: `s3://bucket/key` URIs and local paths alike.

The endpoint and credentials come only from the standard AWS variables
(AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_REGION), so the same code talks to AWS S3, SeaweedFS, MinIO or R2. Secrets are
never put into an error message, a log line or a returned value.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import boto3
import botocore.config
import botocore.exceptions

S3_SCHEME = "s3://"


class StorageError(RuntimeError):
    """A location that cannot be read or written; the message names it."""


def is_remote(location: str | os.PathLike) -> bool:
    return str(location).startswith(S3_SCHEME)


def join(location: str, *parts: str) -> str:
    """Join path parts onto a URI or a local path."""
    base = str(location).rstrip("/")
    for part in parts:
        base = f"{base}/{str(part).strip('/')}"
    return base


@dataclass(frozen=True)
class S3Location:
    bucket: str
    key: str

    @classmethod
    def parse(cls, uri: str) -> S3Location:
        parsed = urlparse(uri)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise StorageError(f"not an s3:// URI: {uri!r}")
        return cls(parsed.netloc, parsed.path.lstrip("/"))


def endpoint_url() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def region() -> str:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


@functools.cache
def _client_for(endpoint: str | None, region_name: str, key_id: str | None):
    # Custom endpoints (SeaweedFS, MinIO) want path-style addressing; AWS accepts it too.
    config = botocore.config.Config(
        s3={"addressing_style": "path" if endpoint else "auto"},
        retries={"max_attempts": 5, "mode": "standard"},
        connect_timeout=10,
        read_timeout=120,
    )
    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint, region_name=region_name, config=config
    )


def s3_client():
    """A boto3 S3 client configured from the standard variables (cached per setting)."""
    return _client_for(endpoint_url(), region(), os.environ.get("AWS_ACCESS_KEY_ID"))


def pyarrow_filesystem(location: str):
    """(pyarrow filesystem, path) for a location, as Ray Data's readers expect."""
    import pyarrow.fs as pafs

    if not is_remote(location):
        return pafs.LocalFileSystem(), str(Path(location).absolute())
    endpoint = endpoint_url()
    kwargs = {"region": region()}
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        kwargs["access_key"] = os.environ["AWS_ACCESS_KEY_ID"]
        kwargs["secret_key"] = os.environ.get("AWS_SECRET_ACCESS_KEY", "")
    loc = S3Location.parse(location)
    return pafs.S3FileSystem(**kwargs), f"{loc.bucket}/{loc.key}".rstrip("/")


def _explain(err: Exception, location: str) -> StorageError:
    """Turn a botocore error into one message that says what went wrong where."""
    if isinstance(err, botocore.exceptions.NoCredentialsError):
        return StorageError(
            f"no S3 credentials for {location}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
        )
    if isinstance(err, botocore.exceptions.EndpointConnectionError):
        return StorageError(
            f"cannot reach the S3 endpoint {endpoint_url() or 'AWS'} for {location}"
        )
    if isinstance(err, botocore.exceptions.ClientError):
        code = err.response.get("Error", {}).get("Code", "")
        if code == "NoSuchBucket":
            return StorageError(f"bucket does not exist: {location}")
        if code in ("NoSuchKey", "404", "NotFound"):
            return StorageError(f"not found: {location}")
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403"):
            return StorageError(f"access denied to {location} ({code}); check the S3 credentials")
        return StorageError(f"S3 error {code or 'unknown'} at {location}")
    return StorageError(f"cannot access {location}: {type(err).__name__}")


def _call(location: str, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as err:
        raise _explain(err, location) from None


def exists(location: str) -> bool:
    if not is_remote(location):
        return Path(location).exists()
    loc = S3Location.parse(location)
    try:
        s3_client().head_object(Bucket=loc.bucket, Key=loc.key)
        return True
    except botocore.exceptions.ClientError as err:
        if err.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return False
        raise _explain(err, location) from None
    except botocore.exceptions.BotoCoreError as err:
        raise _explain(err, location) from None


def read_bytes(location: str) -> bytes:
    if not is_remote(location):
        try:
            return Path(location).read_bytes()
        except OSError as err:
            raise StorageError(f"cannot read {location}: {err.strerror}") from None
    loc = S3Location.parse(location)
    body = _call(location, s3_client().get_object, Bucket=loc.bucket, Key=loc.key)["Body"]
    return _call(location, body.read)


_READ_BUFFER = 1 << 20


class _ObjectBody(io.RawIOBase):
    """An S3 response body as a raw stream, its failures StorageErrors naming the object."""

    def __init__(self, body, location: str) -> None:
        self._body = body
        self._location = location

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = _call(self._location, self._body.read, len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._body.close()
        super().close()


def open_read(location: str) -> io.BufferedReader:
    """A file or object, read front to back in 1 MB requests to the store or the disk,
    whatever sizes the caller reads (a tar reader asks for 512 bytes at a time)."""
    if not is_remote(location):
        try:
            return open(location, "rb", buffering=_READ_BUFFER)  # noqa: SIM115
        except OSError as err:
            raise StorageError(f"cannot read {location}: {err.strerror}") from None
    loc = S3Location.parse(location)
    body = _call(location, s3_client().get_object, Bucket=loc.bucket, Key=loc.key)["Body"]
    return io.BufferedReader(_ObjectBody(body, location), buffer_size=_READ_BUFFER)


def write_bytes(location: str, data: bytes) -> None:
    if not is_remote(location):
        path = Path(location)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write then rename, so a reader never sees half a file.
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_bytes(data)
        tmp.replace(path)
        return
    loc = S3Location.parse(location)
    _call(location, s3_client().put_object, Bucket=loc.bucket, Key=loc.key, Body=data)


def upload_file(local_path: str | os.PathLike, location: str) -> None:
    if not is_remote(location):
        Path(location).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(local_path, location)
        return
    loc = S3Location.parse(location)
    _call(location, s3_client().upload_file, str(local_path), loc.bucket, loc.key)


def upload_dir(local_dir: str | os.PathLike, location: str) -> None:
    """Copy every file under a local directory to a location, keeping relative paths."""
    root = Path(local_dir)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        upload_file(path, join(location, path.relative_to(root).as_posix()))


def download_file(location: str, local_path: str | os.PathLike) -> Path:
    local_path = Path(local_path)
    local_path.parent.mkdir(parents=True, exist_ok=True)
    if not is_remote(location):
        if not Path(location).exists():
            raise StorageError(f"not found: {location}")
        shutil.copyfile(location, local_path)
        return local_path
    loc = S3Location.parse(location)
    _call(location, s3_client().download_file, loc.bucket, loc.key, str(local_path))
    return local_path


def list_files(location: str) -> list[str]:
    """Every file under a location (a prefix or a directory), as full locations, sorted."""
    if not is_remote(location):
        root = Path(location)
        if root.is_file():
            return [str(root)]
        if not root.is_dir():
            return []
        return sorted(str(p) for p in root.rglob("*") if p.is_file())
    loc = S3Location.parse(location)
    prefix = loc.key.rstrip("/") + "/" if loc.key else ""
    found = []
    paginator = s3_client().get_paginator("list_objects_v2")
    pages = paginator.paginate(Bucket=loc.bucket, Prefix=prefix)
    for page in _call(location, list, pages):
        for obj in page.get("Contents", []):
            if obj["Key"].endswith("/"):
                continue  # a directory marker (pyarrow writes them), not a file
            found.append(f"{S3_SCHEME}{loc.bucket}/{obj['Key']}")
    return sorted(found)


def delete(location: str) -> None:
    """Delete a file or everything under a prefix."""
    if not is_remote(location):
        path = Path(location)
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        return
    loc = S3Location.parse(location)
    keys = [S3Location.parse(uri).key for uri in list_files(location)]
    if exists(location):
        keys.append(loc.key)
    for start in range(0, len(keys), 1000):
        chunk = [{"Key": k} for k in keys[start : start + 1000]]
        _call(
            location,
            s3_client().delete_objects,
            Bucket=loc.bucket,
            Delete={"Objects": chunk, "Quiet": True},
        )


def ensure_bucket(location: str) -> None:
    """Create the bucket of an s3:// location if it is missing (local paths: the directory)."""
    if not is_remote(location):
        Path(location).mkdir(parents=True, exist_ok=True)
        return
    bucket = S3Location.parse(location).bucket
    client = s3_client()
    try:
        client.head_bucket(Bucket=bucket)
    except botocore.exceptions.ClientError:
        _call(location, client.create_bucket, Bucket=bucket)
    except botocore.exceptions.BotoCoreError as err:
        raise _explain(err, location) from None


def cache_dir() -> Path:
    root = os.environ.get("VIT_CACHE_DIR") or os.path.join(tempfile.gettempdir(), "vit-cache")
    return Path(root)


def materialize(location: str) -> Path:
    """A local path holding the location's content: a file, or a directory for a prefix.

    Local paths are returned as they are; s3:// content is downloaded into a cache
    directory keyed by the URI, so libraries that want files (torch, safetensors) can
    read it.
    """
    if not is_remote(location):
        path = Path(location)
        if not path.exists():
            raise StorageError(f"not found: {location}")
        return path
    target = cache_dir() / hashlib.sha256(location.encode()).hexdigest()[:16]
    name = S3Location.parse(location).key.rstrip("/").rsplit("/", 1)[-1] or "object"
    # A prefix is asked about first: some stores (SeaweedFS) answer HEAD on a "directory"
    # key as if it were an empty object.
    prefix = location.rstrip("/") + "/"
    files = list_files(location)
    if files:
        for uri in files:
            download_file(uri, target / name / uri[len(prefix) :])
        return target / name
    if exists(location):
        return download_file(location, target / name)
    raise StorageError(f"not found: {location}")
