"""Object-store access in one place: `s3://bucket/key` URIs and local paths alike.

The endpoint and credentials come only from the standard AWS variables
(AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_REGION), so the same code talks to AWS S3, SeaweedFS, MinIO or R2. Secrets are
never put into an error message, a log line or a returned value.

A store that blinks costs time, not a failure: every call here is idempotent (a GET, a
whole-object PUT or upload, a LIST, a HEAD, a DELETE) and is retried while the store is
unreachable or answers 5xx, for up to VIT_STORAGE_RETRY_SECONDS (default 120 s), with one
log line per outage. A stream cut mid-object resumes with a ranged GET from the byte it
reached. Beneath that loop, botocore's "standard" retry mode and pyarrow's
AwsStandardS3RetryStrategy absorb short hiccups.
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import os
import random
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import boto3
import boto3.exceptions
import botocore.config
import botocore.exceptions

S3_SCHEME = "s3://"
RETRY_SECONDS_VAR = "VIT_STORAGE_RETRY_SECONDS"
DEFAULT_RETRY_SECONDS = 120.0
# botocore's own attempts per request (standard mode: exponential backoff with jitter,
# capped at 20 s); the deadline loop in _call repeats a request that used them all up.
BOTO_MAX_ATTEMPTS = 5
CONNECT_TIMEOUT_S = 10
READ_TIMEOUT_S = 60
# Error codes that mean "try again later", besides any 5xx status.
_THROTTLED = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout"}

logger = logging.getLogger("vit_core.storage")


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


def retry_seconds() -> float:
    """How long (s) a call keeps retrying an unreachable store: VIT_STORAGE_RETRY_SECONDS,
    default 120; 0 turns the deadline loop off. Raises StorageError if it is not a number
    of seconds >= 0."""
    raw = os.environ.get(RETRY_SECONDS_VAR, "").strip()
    if not raw:
        return DEFAULT_RETRY_SECONDS
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:  # also rejects nan
        raise StorageError(f"{RETRY_SECONDS_VAR} must be a number of seconds >= 0, got {raw!r}")
    return seconds


@functools.cache
def _client_for(endpoint: str | None, region_name: str, key_id: str | None):
    # Custom endpoints (SeaweedFS, MinIO) want path-style addressing; AWS accepts it too.
    config = botocore.config.Config(
        s3={"addressing_style": "path" if endpoint else "auto"},
        retries={"max_attempts": BOTO_MAX_ATTEMPTS, "mode": "standard"},
        connect_timeout=CONNECT_TIMEOUT_S,
        read_timeout=READ_TIMEOUT_S,
    )
    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint, region_name=region_name, config=config
    )


def s3_client():
    """A boto3 S3 client configured from the standard variables (cached per setting)."""
    return _client_for(endpoint_url(), region(), os.environ.get("AWS_ACCESS_KEY_ID"))


def arrow_max_attempts(seconds: float) -> int:
    """Attempts that let the AWS SDK's standard retry strategy (used by pyarrow) span about
    `seconds`: before retry n it waits a uniform random share of 2**n s, capped at 20 s
    (aws-sdk-cpp StandardRetryStrategy::CalculateDelayBeforeNextRetry)."""
    attempts, waited = 1, 0.0
    while waited < seconds:
        cap = 2.0 ** (attempts - 1)
        waited += cap / 2 if cap <= 20 else 20 - 200 / cap  # E[min(U * cap, 20)]
        attempts += 1
    return attempts


def pyarrow_filesystem(location: str):
    """(pyarrow filesystem, path) for a location, as Ray Data's readers and Ray Train's
    checkpoint uploads expect. Its requests retry for about VIT_STORAGE_RETRY_SECONDS,
    in this process and in every Ray process it is pickled to."""
    import pyarrow.fs as pafs

    if not is_remote(location):
        return pafs.LocalFileSystem(), str(Path(location).absolute())
    endpoint = endpoint_url()
    kwargs = {
        "region": region(),
        "connect_timeout": CONNECT_TIMEOUT_S,
        "max_attempts": arrow_max_attempts(retry_seconds()),
    }
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        kwargs["access_key"] = os.environ["AWS_ACCESS_KEY_ID"]
        kwargs["secret_key"] = os.environ.get("AWS_SECRET_ACCESS_KEY", "")
    loc = S3Location.parse(location)
    return _retrying_s3_filesystem(kwargs), f"{loc.bucket}/{loc.key}".rstrip("/")


def _retrying_s3_filesystem(kwargs: dict):
    """pyarrow's S3FileSystem with a standard retry strategy of kwargs["max_attempts"].
    pyarrow pickles an S3FileSystem without its retry strategy (25.0), so the copies Ray
    Train sends to its controller and workers, which upload the checkpoints, would
    retry three times only; this subclass carries its settings through pickling."""
    import pyarrow.fs as pafs

    class RetryingS3FileSystem(pafs.S3FileSystem):
        def __reduce__(self):
            return _retrying_s3_filesystem, (kwargs,)

    options = {k: v for k, v in kwargs.items() if k != "max_attempts"}
    strategy = pafs.AwsStandardS3RetryStrategy(max_attempts=kwargs["max_attempts"])
    return RetryingS3FileSystem(retry_strategy=strategy, **options)


def _cause(err: Exception) -> Exception:
    """The botocore error inside boto3's transfer wrappers (upload_file, download_file)."""
    if isinstance(err, boto3.exceptions.RetriesExceededError):
        return err.last_exception
    if isinstance(err, boto3.exceptions.S3UploadFailedError) and err.__context__ is not None:
        return err.__context__
    return err


def _code(err: botocore.exceptions.ClientError) -> str:
    return err.response.get("Error", {}).get("Code", "")


def _transient(err: Exception) -> bool:
    """Whether a failure may pass by itself: no connection, a connection cut or timed
    out, a 5xx answer or throttling. Bad TLS, credentials or keys are not retried."""
    err = _cause(err)
    if isinstance(err, botocore.exceptions.SSLError):
        return False
    if isinstance(
        err,
        botocore.exceptions.ConnectionError
        | botocore.exceptions.HTTPClientError
        | botocore.exceptions.IncompleteReadError,
    ):
        return True
    if isinstance(err, botocore.exceptions.ClientError):
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return status >= 500 or _code(err) in _THROTTLED
    return False


def _endpoint_name() -> str:
    """The endpoint for a log line or a message: scheme, host and port only, so that
    credentials written into the URL never get out."""
    endpoint = endpoint_url()
    if not endpoint:
        return f"AWS S3 ({region()})"
    parsed = urlparse(endpoint)
    return f"{parsed.scheme}://{parsed.hostname}" + (f":{parsed.port}" if parsed.port else "")


def _explain(err: Exception, location: str, waited: float = 0.0) -> StorageError:
    """Turn a botocore error into one message that says what went wrong where."""
    err = _cause(err)
    retried = f" (retried for {waited:.0f} s)" if waited else ""
    if isinstance(err, botocore.exceptions.NoCredentialsError):
        return StorageError(
            f"no S3 credentials for {location}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
        )
    if isinstance(err, botocore.exceptions.EndpointConnectionError):
        return StorageError(
            f"cannot reach the S3 endpoint {_endpoint_name()} for {location}{retried}"
        )
    if isinstance(err, botocore.exceptions.ClientError):
        code = _code(err)
        if code == "NoSuchBucket":
            return StorageError(f"bucket does not exist: {location}")
        if code in ("NoSuchKey", "404", "NotFound"):
            return StorageError(f"not found: {location}")
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403"):
            return StorageError(f"access denied to {location} ({code}); check the S3 credentials")
        if code in ("PreconditionFailed", "412"):
            return StorageError(f"{location} changed while it was being read")
        return StorageError(f"S3 error {code or 'unknown'} at {location}{retried}")
    return StorageError(f"cannot access {location}: {type(err).__name__}{retried}")


_AWS_ERRORS = (
    botocore.exceptions.BotoCoreError,
    botocore.exceptions.ClientError,
    boto3.exceptions.Boto3Error,
)
# Endpoints with an outage already logged, so that an outage is one log line however many
# calls (and threads) wait through it.
_outages: set[str] = set()
_outages_lock = threading.Lock()


def _note_outage(endpoint: str, seconds: float) -> None:
    with _outages_lock:
        if endpoint in _outages:
            return
        _outages.add(endpoint)
    logger.warning("storage unreachable, retrying for up to %.0f s: %s", seconds, endpoint)


def _call(location: str, fn, *args, **kwargs):
    """fn(*args, **kwargs), which must be idempotent, retried with capped exponential
    backoff and jitter while the store fails transiently (see _transient), for up to
    retry_seconds(). Raises StorageError naming `location` on any other failure, or on a
    transient one once that deadline has passed."""
    started, deadline = time.monotonic(), None
    delay = 0.5
    while True:
        try:
            result = fn(*args, **kwargs)
        except _AWS_ERRORS as err:
            now = time.monotonic()
            if deadline is None:
                deadline = started + retry_seconds()
            if not _transient(err):
                raise _explain(err, location) from None
            if now >= deadline:
                raise _explain(err, location, now - started) from None
            _note_outage(_endpoint_name(), deadline - started)
            time.sleep(min(delay * random.uniform(0.5, 1.0), deadline - now))
            delay = min(delay * 2, 8.0)
            continue
        if _outages:
            with _outages_lock:
                _outages.discard(_endpoint_name())
        return result


def exists(location: str) -> bool:
    if not is_remote(location):
        return Path(location).exists()
    loc = S3Location.parse(location)
    return _call(location, _head_exists, s3_client(), loc)


def _head_exists(client, loc: S3Location) -> bool:
    try:
        client.head_object(Bucket=loc.bucket, Key=loc.key)
    except botocore.exceptions.ClientError as err:
        if _code(err) in ("404", "NoSuchKey", "NotFound"):
            return False
        raise
    return True


def read_bytes(location: str) -> bytes:
    if not is_remote(location):
        try:
            return Path(location).read_bytes()
        except OSError as err:
            raise StorageError(f"cannot read {location}: {err.strerror}") from None
    loc = S3Location.parse(location)
    # GET and read as one step: a body cut short is fetched again whole.
    return _call(location, lambda: _get(loc)["Body"].read())


def _get(loc: S3Location, **extra) -> dict:
    return s3_client().get_object(Bucket=loc.bucket, Key=loc.key, **extra)


_READ_BUFFER = 1 << 20


class _ObjectBody(io.RawIOBase):
    """An S3 object as a raw stream. A body cut mid-way (the store restarted, the
    connection reset) is resumed with a ranged GET from the byte reached, pinned to the
    object's ETag so that a replaced object is an error rather than a splice. Failures
    are StorageErrors naming the object."""

    def __init__(self, location: str) -> None:
        self._location = location
        self._loc = S3Location.parse(location)
        response = _call(location, _get, self._loc)
        self._body = response["Body"]
        self._etag = response["ETag"]
        self._size = response["ContentLength"]
        self._offset = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self._offset >= self._size:
            return 0
        data = _call(self._location, self._read, len(buffer))
        buffer[: len(data)] = data
        self._offset += len(data)
        return len(data)

    def _read(self, size: int) -> bytes:
        if self._body is None:
            response = _get(self._loc, Range=f"bytes={self._offset}-", IfMatch=self._etag)
            self._body = response["Body"]
        try:
            return self._body.read(size)
        except BaseException:
            self._drop_body()
            raise

    def _drop_body(self) -> None:
        if self._body is not None:
            self._body.close()
            self._body = None

    def close(self) -> None:
        self._drop_body()
        super().close()


def open_read(location: str) -> io.BufferedReader:
    """A file or object, read front to back in 1 MB requests to the store or the disk,
    whatever sizes the caller reads (a tar reader asks for 512 bytes at a time). An
    object's stream survives a store outage shorter than retry_seconds()."""
    if not is_remote(location):
        try:
            return open(location, "rb", buffering=_READ_BUFFER)  # noqa: SIM115
        except OSError as err:
            raise StorageError(f"cannot read {location}: {err.strerror}") from None
    return io.BufferedReader(_ObjectBody(location), buffer_size=_READ_BUFFER)


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
        # os.walk skips a folder deleted while it walks (Ray Train removing an old
        # checkpoint), as an S3 listing is a snapshot; rglob would raise.
        return sorted(str(Path(d, f)) for d, _, names in os.walk(root) for f in names)
    loc = S3Location.parse(location)
    prefix = loc.key.rstrip("/") + "/" if loc.key else ""
    keys = _call(location, _list_keys, loc.bucket, prefix)
    # A key ending in "/" is a directory marker (pyarrow writes them), not a file.
    return sorted(f"{S3_SCHEME}{loc.bucket}/{key}" for key in keys if not key.endswith("/"))


def _list_keys(bucket: str, prefix: str) -> list[str]:
    pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [obj["Key"] for page in pages for obj in page.get("Contents", [])]


def delete(location: str) -> None:
    """Delete a file or everything under a prefix."""
    if not is_remote(location):
        path = Path(location)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)  # what is already gone is deleted
        else:
            path.unlink(missing_ok=True)
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
    _call(location, _ensure_bucket, s3_client(), S3Location.parse(location).bucket)


def _ensure_bucket(client, bucket: str) -> None:
    try:
        client.head_bucket(Bucket=bucket)
    except botocore.exceptions.ClientError as err:
        if _transient(err):
            raise
        try:
            client.create_bucket(Bucket=bucket)
        except botocore.exceptions.ClientError as create_err:
            # A retried create whose first try got through before the store went away.
            if _code(create_err) != "BucketAlreadyOwnedByYou":
                raise


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
