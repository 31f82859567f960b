"""The shard format: WebDataset tar files, written deterministically and read tolerantly.

A sample is a run of consecutive tar members sharing a key (the name up to the first dot):
`<key>.jpg|png|webp` holds the encoded image, `<key>.cls` its class index in ASCII, and an
optional `<key>.json` where the sample came from. Shards are named `<split>-000000.tar`.

Reading does not trust the bytes: a truncated or damaged tar ends in ShardCorruptError after
every complete sample before the damage has been yielded, and a sample with a missing or
unparsable member is yielded with its `error` set, so the reader can skip and count it.
"""

from __future__ import annotations

import io
import re
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
LABEL_EXTENSION = "cls"
SHARD_PATTERN = re.compile(r"^(?P<split>[A-Za-z0-9_]+)-(?P<number>\d{6})\.tar$")
_BLOCK = 512


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:06d}.tar"


class ShardCorruptError(Exception):
    """The tar stream cannot be read further (truncated, or a damaged header)."""


@dataclass
class RawSample:
    """One sample as stored: encoded image bytes and label, or the reason it is unusable."""

    key: str
    image: bytes | None
    ext: str | None
    label: int | None
    error: str | None = None


class ShardWriter:
    """Writes samples into a local tar file with fixed metadata, so the same input gives
    byte-identical shards (and so the same checksums)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._tar = tarfile.open(self.path, "w", format=tarfile.USTAR_FORMAT)
        self.num_samples = 0

    def add(self, key: str, members: dict[str, bytes]) -> None:
        if "." in key or not key:
            raise ValueError(f"sample key {key!r} must be non-empty and contain no dot")
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o444
            self._tar.addfile(info, io.BytesIO(data))
        self.num_samples += 1

    def close(self) -> None:
        self._tar.close()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _read_exact(read: Callable[[int], bytes], size: int) -> bytes:
    chunks = []
    remaining = size
    while remaining > 0:
        chunk = read(remaining)
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def iter_members(read: Callable[[int], bytes]) -> Iterator[tuple[str, bytes]]:
    """(name, content) of each regular file in a tar stream, given its `read(n)`.

    A small parser rather than tarfile's stream mode: it reads each member with one call
    (fast on object-store streams) and says exactly where a damaged stream ends.
    """
    long_name: str | None = None
    while True:
        header = _read_exact(read, _BLOCK)
        if not header or header == b"\0" * _BLOCK:
            return  # end of archive (a stream cut at a member boundary also ends here)
        if len(header) < _BLOCK:
            raise ShardCorruptError("truncated tar header")
        try:
            info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
        except tarfile.HeaderError as err:
            raise ShardCorruptError(f"damaged tar header ({err})") from None
        padded = (info.size + _BLOCK - 1) // _BLOCK * _BLOCK
        data = _read_exact(read, padded)
        if len(data) < padded:
            raise ShardCorruptError(f"truncated in member {info.name}")
        content = data[: info.size] if padded != info.size else data
        if info.type == tarfile.GNUTYPE_LONGNAME:
            long_name = content.rstrip(b"\0").decode("utf-8", "surrogateescape")
            continue
        if info.type == tarfile.XHDTYPE:
            long_name = _pax_path(content) or long_name
            continue
        name = long_name or info.name
        long_name = None
        if info.type in (tarfile.REGTYPE, tarfile.AREGTYPE):
            yield name, content


def _pax_path(content: bytes) -> str | None:
    for record in content.split(b"\n"):
        _, _, field = record.partition(b" ")
        key, _, value = field.partition(b"=")
        if key == b"path":
            return value.decode("utf-8", "surrogateescape")
    return None


def split_name(name: str) -> tuple[str, str]:
    """(key, extension) of a member name: the key runs up to the first dot of the base name."""
    directory, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    key = f"{directory}/{stem}" if directory else stem
    return key, ext.lower()


def _to_sample(key: str, parts: dict[str, bytes]) -> RawSample:
    ext = next((e for e in IMAGE_EXTENSIONS if e in parts), None)
    image = parts.get(ext) if ext else None
    label = None
    error = None
    raw_label = parts.get(LABEL_EXTENSION)
    if raw_label is not None:
        try:
            label = int(raw_label.strip())
        except ValueError:
            error = f"label is not an integer ({raw_label[:20]!r})"
    if image is None:
        error = "no image member (.jpg, .png or .webp)"
    elif raw_label is None:
        error = "no label member (.cls)"
    return RawSample(key, image, ext, label, error)


def iter_samples(read: Callable[[int], bytes]) -> Iterator[RawSample]:
    """Samples of a shard stream in stored order; raises ShardCorruptError where it breaks
    (after the sample being assembled there, if it is already whole)."""
    key: str | None = None
    parts: dict[str, bytes] = {}
    try:
        for name, content in iter_members(read):
            member_key, ext = split_name(name)
            if member_key != key:
                if key is not None:
                    yield _to_sample(key, parts)
                key, parts = member_key, {}
            parts[ext] = content
    except ShardCorruptError:
        # The sample in progress is kept if it already has its image and label.
        if key is not None and _to_sample(key, parts).error is None:
            yield _to_sample(key, parts)
        raise
    if key is not None:
        yield _to_sample(key, parts)


def count_samples(read: Callable[[int], bytes]) -> int:
    return sum(1 for _ in iter_samples(read))
