"""The shard format: WebDataset tar files, written deterministically and read tolerantly.

A sample is a run of consecutive tar members sharing a key (the name up to the first dot):
`<key>.jpg|png|webp` holds the encoded image, `<key>.cls` its class index in ASCII, and an
optional `<key>.json` where the sample came from. Shards are named `<split>-000000.tar`.
Shards written by other tools (the `webdataset` library, img2dataset) are read through a
Layout: which image extensions to prefer, which member holds the label (its text, or a
field of a JSON member), and whether labels are class indices or class names; members it
does not name are ignored.

Reading does not trust the bytes: a truncated or damaged tar ends in ShardCorruptError after
every complete sample before the damage has been yielded, and a sample with a missing or
unparsable member is yielded with its `error` set, so the reader can skip and count it.
"""

from __future__ import annotations

import functools
import io
import json
import re
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
LABEL_EXTENSION = "cls"
SHARD_PATTERN = re.compile(r"^(?P<split>[A-Za-z0-9_]+)-(?P<number>\d{6})\.tar$")
_BLOCK = 512
_EMPTY_BLOCK = bytes(_BLOCK)
_INTEGER = re.compile(r"[+-]?\d+")


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:06d}.tar"


class ShardCorruptError(Exception):
    """The tar stream cannot be read further (truncated, or a damaged header)."""


@dataclass
class RawSample:
    """One sample as stored: encoded image bytes and class index, or the reason it is
    unusable; label_value is the label as stored (an integer, or a name)."""

    key: str
    image: bytes | None
    ext: str | None
    label: int | None
    error: str | None = None
    label_value: int | str | None = None


@dataclass(frozen=True)
class Layout:
    """Which members of a sample hold its image and its label.

    image_extensions: the image is the first of these members the sample has (so
    ("jpg", "png") takes the JPEG of a sample that holds both). label_member: the extension
    of the member holding the label: its text, or with label_field that field of the JSON
    object it holds. class_names: labels are class names, mapped to their position in it;
    None: labels are class indices (integers).
    """

    image_extensions: tuple[str, ...] = IMAGE_EXTENSIONS
    label_member: str = LABEL_EXTENSION
    label_field: str | None = None
    class_names: tuple[str, ...] | None = None

    @property
    def is_default(self) -> bool:
        """The layout make_shards writes (and every index without a layout has)."""
        return self == DEFAULT_LAYOUT

    @property
    def label_spec(self) -> str:
        """The label source as the CLI takes it: `cls`, or `json:FIELD`."""
        return f"{self.label_member}:{self.label_field}" if self.label_field else self.label_member

    @functools.cached_property
    def _positions(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.class_names or ())}

    def to_json(self) -> dict[str, Any]:
        return {
            "image_extensions": list(self.image_extensions),
            "label": self.label_spec,
            "labels_are": "names" if self.class_names is not None else "indices",
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], class_names: list[str]) -> Layout:
        """Raises KeyError/TypeError/ValueError on a malformed entry (the index names it)."""
        names = data["labels_are"]
        if names not in ("names", "indices"):
            raise ValueError(f"labels_are is {names!r}, not 'names' or 'indices'")
        return parse_layout(
            data["label"],
            [str(e) for e in data["image_extensions"]],
            tuple(class_names) if names == "names" else None,
        )

    def class_index(self, value: int | str) -> tuple[int | None, str | None]:
        """(class index, None), or (None, why the stored label is unusable)."""
        if self.class_names is not None:
            position = self._positions.get(str(value))
            if position is None:
                return None, f"label {str(value)[:40]!r} is not one of the indexed classes"
            return position, None
        if isinstance(value, int):
            return value, None
        return None, f"label is not an integer ({value[:20]!r})"


DEFAULT_LAYOUT = Layout()


def parse_layout(
    label: str, image_extensions: list[str] | tuple[str, ...], class_names=None
) -> Layout:
    """A Layout from the CLI's words: label `cls` (a member's text) or `json:FIELD`.
    Raises ValueError naming what is wrong."""
    member, _, label_field = label.partition(":")
    member = member.strip().lower().lstrip(".")
    extensions = tuple(e.strip().lower().lstrip(".") for e in image_extensions if e.strip())
    if not member or (":" in label and not label_field.strip()):
        raise ValueError(f"label key {label!r}: expected a member extension (cls) or json:FIELD")
    if not extensions:
        raise ValueError("no image extensions given")
    if member in extensions:
        raise ValueError(f"label member .{member} is also an image extension")
    return Layout(extensions, member, label_field.strip() or None, class_names)


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


def _parse_header(header: bytes) -> tuple[str, int, bytes]:
    """(name, size, type flag) of a tar header block, checksum verified.

    The fields this reader needs, parsed directly: tarfile.TarInfo.frombuf decodes every
    field and costs ten times as much, two headers per sample."""
    try:
        stored = int(header[148:156].replace(b"\0", b" ").strip() or b"0", 8)
        if header[124] & 0x80:  # base-256 size (GNU, members over 8 GB)
            size = tarfile.nti(header[124:136])
        else:
            size = int(header[124:136].replace(b"\0", b" ").strip() or b"0", 8)
    except (ValueError, tarfile.InvalidHeaderError) as err:
        raise ShardCorruptError(f"damaged tar header ({err})") from None
    unsigned = sum(header) - sum(header[148:156]) + 256  # the field itself counts as spaces
    if stored != unsigned and stored not in tarfile.calc_chksums(header):  # old tars: signed
        raise ShardCorruptError("damaged tar header (bad checksum)")
    kind = header[156:157]
    name = header[:100].split(b"\0", 1)[0]
    if header[257:265] == b"ustar\x0000" and header[345] and kind not in tarfile.GNU_TYPES:
        name = header[345:500].split(b"\0", 1)[0] + b"/" + name
    return name.decode("utf-8", "surrogateescape"), size, kind


def iter_members(read: Callable[[int], bytes]) -> Iterator[tuple[str, bytes]]:
    """(name, content) of each regular file in a tar stream, given its `read(n)`.

    A small parser rather than tarfile's stream mode: it reads each member with one call
    and says exactly where a damaged stream ends. Give it a buffered stream: it reads
    512-byte headers one at a time.
    """
    long_name: str | None = None
    while True:
        header = _read_exact(read, _BLOCK)
        if not header or header == _EMPTY_BLOCK:
            return  # end of archive (a stream cut at a member boundary also ends here)
        if len(header) < _BLOCK:
            raise ShardCorruptError("truncated tar header")
        member, size, kind = _parse_header(header)
        padded = (size + _BLOCK - 1) // _BLOCK * _BLOCK
        data = _read_exact(read, padded)
        if len(data) < padded:
            raise ShardCorruptError(f"truncated in member {member}")
        content = data[:size] if padded != size else data
        if kind == tarfile.GNUTYPE_LONGNAME:
            long_name = content.rstrip(b"\0").decode("utf-8", "surrogateescape")
            continue
        if kind == tarfile.XHDTYPE:
            long_name = _pax_path(content) or long_name
            continue
        name = long_name or member
        long_name = None
        if kind in (tarfile.REGTYPE, tarfile.AREGTYPE) and not name.endswith("/"):
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


def _label_value(raw: bytes, field: str | None) -> int | str:
    """The stored label: an integer where the text (or the JSON value) is one, else the
    text. Raises ValueError (UnicodeDecodeError and JSONDecodeError are ValueErrors)."""
    if field is None:
        text = raw.decode("utf-8").strip()
        return int(text) if _INTEGER.fullmatch(text) else text
    obj = json.loads(raw)
    if not isinstance(obj, dict) or field not in obj:
        raise ValueError(f"no field {field!r} in the JSON member")
    value = obj[field]
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"field {field!r} holds {str(value)[:20]!r}, not an integer or a name")
    return value


def _to_sample(key: str, parts: dict[str, bytes], layout: Layout) -> RawSample:
    ext = next((e for e in layout.image_extensions if e in parts), None)
    image = parts.get(ext) if ext else None
    label = value = error = None
    raw_label = parts.get(layout.label_member)
    if raw_label is not None:
        try:
            value = _label_value(raw_label, layout.label_field)
        except ValueError as err:
            error = f"unreadable label in .{layout.label_member} ({err})"
        else:
            label, error = layout.class_index(value)
    if image is None:
        error = f"no image member ({', '.join('.' + e for e in layout.image_extensions)})"
    elif raw_label is None:
        error = f"no label member (.{layout.label_member})"
    return RawSample(key, image, ext, label, error, value)


def iter_samples(
    read: Callable[[int], bytes], layout: Layout = DEFAULT_LAYOUT
) -> Iterator[RawSample]:
    """Samples of a shard stream in stored order, read through `layout` (default: the one
    make_shards writes); raises ShardCorruptError where it breaks (after the sample being
    assembled there, if it is already whole)."""
    key: str | None = None
    parts: dict[str, bytes] = {}
    try:
        for name, content in iter_members(read):
            member_key, ext = split_name(name)
            if member_key != key:
                if key is not None:
                    yield _to_sample(key, parts, layout)
                key, parts = member_key, {}
            parts[ext] = content
    except ShardCorruptError:
        # The sample in progress is kept if it already has its image and label.
        if key is not None and _to_sample(key, parts, layout).error is None:
            yield _to_sample(key, parts, layout)
        raise
    if key is not None:
        yield _to_sample(key, parts, layout)


def count_samples(read: Callable[[int], bytes], layout: Layout = DEFAULT_LAYOUT) -> int:
    return sum(1 for _ in iter_samples(read, layout))
