"""index.json: what a finished dataset holds, and the check that the shards match it.

make_shards writes the index after every shard is in place, so a location without one is
never taken for a dataset. Layout (format_version 1):

    {"format": "vit-webdataset", "format_version": 1, "created": "...", "source": "...",
     "class_names": [...], "num_classes": 10,
     "splits": {"train": {"num_samples": 1437, "shards": [
         {"name": "train-000000.tar", "num_samples": 1437, "sha256": "...", "size_bytes": 1}]},
        "val": {...}},
     "totals": {"num_samples": 1797, "num_shards": 2, "size_bytes": 2, "skipped": 0},
     "settings": {...}, "skipped_examples": [{"source": "...", "reason": "..."}]}

Format version 2 (an index of existing shards, see vit_core.data.existing) adds how to
read their samples, and shard names may hold sub-folders ("train/part-00001.tar"):

     "layout": {"image_extensions": ["jpg", "png"], "label": "json:label",
                "labels_are": "names"}        # or "indices"; label "cls": the member's text

An index whose layout is make_shards' own (.jpg/.jpeg/.png/.webp image, class index in
.cls) is written as version 1, so older readers still take it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from vit_core import storage
from vit_core.data.errors import DatasetError
from vit_core.data.shards import DEFAULT_LAYOUT, Layout, ShardCorruptError, count_samples

INDEX_NAME = "index.json"
FORMAT = "vit-webdataset"
FORMAT_VERSION = 1
LAYOUT_FORMAT_VERSION = 2  # an index with a "layout"
_READ_CHUNK = 1 << 20

logger = logging.getLogger("vit_core.data")


@dataclass(frozen=True)
class ShardInfo:
    name: str
    num_samples: int
    sha256: str
    size_bytes: int


@dataclass
class DatasetIndex:
    location: str
    class_names: list[str]
    splits: dict[str, list[ShardInfo]]
    source: str = ""
    created: str = ""
    settings: dict[str, Any] = field(default_factory=dict)
    skipped: int = 0
    skipped_examples: list[dict[str, str]] = field(default_factory=list)
    layout: Layout = DEFAULT_LAYOUT

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def version(self) -> str:
        """A fingerprint of the content (every shard's checksum and the class names): two
        datasets with the same version hold the same bytes."""
        digest = hashlib.sha256(json.dumps(self.class_names).encode())
        if not self.layout.is_default:  # same bytes, read another way: another dataset
            digest.update(json.dumps(self.layout.to_json(), sort_keys=True).encode())
        for split in sorted(self.splits):
            for shard in self.splits[split]:
                digest.update(f"{split}/{shard.name}:{shard.sha256}".encode())
        return digest.hexdigest()[:16]

    def _split(self, split: str) -> list[ShardInfo]:
        if split not in self.splits:
            known = ", ".join(sorted(self.splits)) or "none"
            raise DatasetError(f"dataset {self.location} has no split {split!r} (splits: {known})")
        return self.splits[split]

    def shards(self, split: str) -> list[ShardInfo]:
        return list(self._split(split))

    def num_samples(self, split: str) -> int:
        return sum(s.num_samples for s in self._split(split))

    def shard_location(self, shard: ShardInfo) -> str:
        return storage.join(self.location, shard.name)

    def to_json(self) -> dict[str, Any]:
        splits = {
            name: {
                "num_samples": sum(s.num_samples for s in shards),
                "shards": [vars(s).copy() for s in shards],
            }
            for name, shards in self.splits.items()
        }
        all_shards = [s for shards in self.splits.values() for s in shards]
        layout = {} if self.layout.is_default else {"layout": self.layout.to_json()}
        return {
            "format": FORMAT,
            "format_version": LAYOUT_FORMAT_VERSION if layout else FORMAT_VERSION,
            "created": self.created or datetime.now(UTC).isoformat(timespec="seconds"),
            "source": self.source,
            "class_names": self.class_names,
            "num_classes": self.num_classes,
            "splits": splits,
            "totals": {
                "num_samples": sum(s.num_samples for s in all_shards),
                "num_shards": len(all_shards),
                "size_bytes": sum(s.size_bytes for s in all_shards),
                "skipped": self.skipped,
            },
            "settings": self.settings,
            "skipped_examples": self.skipped_examples,
            **layout,
        }

    @classmethod
    def from_json(cls, data: Any, location: str) -> DatasetIndex:
        where = storage.join(location, INDEX_NAME)
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise DatasetError(f"{where} is not a {FORMAT} index")
        version = data.get("format_version")
        if version not in (FORMAT_VERSION, LAYOUT_FORMAT_VERSION):
            raise DatasetError(
                f"{where} has format_version {version!r}; this code reads "
                f"{FORMAT_VERSION} and {LAYOUT_FORMAT_VERSION}"
            )
        try:
            splits = {
                name: [
                    ShardInfo(
                        str(s["name"]),
                        int(s["num_samples"]),
                        str(s["sha256"]),
                        int(s["size_bytes"]),
                    )
                    for s in entry["shards"]
                ]
                for name, entry in data["splits"].items()
            }
            class_names = [str(c) for c in data["class_names"]]
            layout = (
                Layout.from_json(data["layout"], class_names)
                if version == LAYOUT_FORMAT_VERSION
                else DEFAULT_LAYOUT
            )
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise DatasetError(f"{where} is malformed ({type(err).__name__}: {err})") from None
        return cls(
            location=location,
            class_names=class_names,
            splits=splits,
            source=str(data.get("source", "")),
            created=str(data.get("created", "")),
            settings=dict(data.get("settings") or {}),
            skipped=int(data.get("totals", {}).get("skipped", 0)),
            skipped_examples=list(data.get("skipped_examples") or []),
            layout=layout,
        )


def index_location(location: str) -> str:
    return storage.join(location, INDEX_NAME)


def write_index(index: DatasetIndex) -> None:
    """Write index.json; call it only once every shard it names is in place."""
    data = json.dumps(index.to_json(), indent=1).encode()
    storage.write_bytes(index_location(index.location), data)


def read_index(location: str) -> DatasetIndex:
    """The index as stored, without looking at the shards."""
    location = normalize_location(location)
    where = index_location(location)
    try:
        present = storage.exists(where)
    except storage.StorageError as err:
        raise DatasetError(f"cannot open the dataset at {location}: {err}") from None
    if not present:
        try:
            anything = bool(storage.list_files(location))
        except storage.StorageError as err:
            raise DatasetError(f"cannot open the dataset at {location}: {err}") from None
        if not anything:
            raise DatasetError(f"no dataset at {location}: the location does not exist or is empty")
        raise DatasetError(
            f"no {INDEX_NAME} at {location}: not a finished dataset "
            "(make_shards writes the index last; run it again)"
        )
    try:
        raw = storage.read_bytes(where)
    except storage.StorageError as err:
        raise DatasetError(f"cannot read {where}: {err}") from None
    try:
        data = json.loads(raw)
    except ValueError as err:
        raise DatasetError(f"{where} is not valid JSON ({err})") from None
    return DatasetIndex.from_json(data, location)


def normalize_location(location: str) -> str:
    """s3:// URIs as they are; local paths made absolute, so Ray workers find them too."""
    from pathlib import Path

    location = str(location).rstrip("/") or "/"
    return location if storage.is_remote(location) else str(Path(location).absolute())


def _stored_sizes(index: DatasetIndex) -> dict[str, int]:
    """{shard name: size} for the files under the dataset's location, in one listing
    (recursive only when shard names hold sub-folders, as indexed existing shards may)."""
    import pyarrow.fs as pafs

    location = index.location
    nested = any("/" in s.name for shards in index.splits.values() for s in shards)
    fs, path = storage.pyarrow_filesystem(location)
    selector = pafs.FileSelector(path, allow_not_found=True, recursive=nested)
    try:
        infos = fs.get_file_info(selector)
    except OSError as err:
        raise DatasetError(f"cannot list the shards at {location}: {err}") from None
    root = path.rstrip("/") + "/"
    return {
        info.path[len(root) :]: info.size
        for info in infos
        if info.type == pafs.FileType.File and info.path.startswith(root)
    }


def open_stream(location: str):
    """A readable stream for one shard, buffered (see storage.open_read)."""
    try:
        return storage.open_read(location)
    except storage.StorageError as err:
        raise DatasetError(str(err)) from None


def _check_content(index: DatasetIndex, split: str, shard: ShardInfo) -> str | None:
    """Checksum and sample count of one stored shard against the index; None when they match."""
    where = index.shard_location(shard)
    digest = hashlib.sha256()
    with open_stream(where) as stream:

        def read(n: int) -> bytes:
            data = stream.read(n)
            digest.update(data)
            return data

        try:
            count = count_samples(read, index.layout)
        except ShardCorruptError as err:
            return f"{shard.name}: not a readable tar ({err})"
        while read(_READ_CHUNK):
            pass  # the end-of-archive padding is part of the checksum
    if digest.hexdigest() != shard.sha256:
        return f"{shard.name}: sha256 {digest.hexdigest()[:12]}... differs from the indexed {shard.sha256[:12]}..."
    if count != shard.num_samples:
        return f"{shard.name}: holds {count} samples, the index says {shard.num_samples}"
    return None


def _short_shard_line(index: DatasetIndex, shard: ShardInfo, size: int) -> str:
    return (
        f"shard {index.shard_location(shard)} is short: {size} bytes stored, the index says "
        f"{shard.size_bytes}; its readable samples are used, the rest count as bad samples"
    )


_reported_short: set[tuple[str, int]] = set()


def _report_short(found: list[tuple[tuple[str, int], str]]) -> None:
    """One warning per short shard and stored size per process: a job checks its dataset
    in open_dataset and again in each build_dataset."""
    for shard_and_size, line in found:
        if shard_and_size not in _reported_short:
            _reported_short.add(shard_and_size)
            logger.warning("%s", line)


def verify(index: DatasetIndex, level: Literal["size", "full"] = "size") -> list[str]:
    """Check the stored shards against the index; return one line per short shard.

    A short shard (fewer bytes stored than indexed: an upload cut off, a damaged copy) is
    logged as a warning and let through: the reader yields its readable samples and one
    invalid row per sample it lost, so the epoch keeps index.num_samples rows. Raises
    DatasetError listing every other difference: a shard missing or larger than indexed,
    with level="full" a checksum or sample count that differs; and when every shard of a
    split is short.
    """
    sizes = _stored_sizes(index)
    problems = []
    short: list[tuple[tuple[str, int], str]] = []
    present = []
    for split, shards in sorted(index.splits.items()):
        short_in_split = []
        for shard in shards:
            size = sizes.get(shard.name)
            if size is None:
                problems.append(f"{shard.name}: missing")
            elif size < shard.size_bytes:
                short_in_split.append(
                    f"{shard.name}: {size} bytes stored, the index says {shard.size_bytes}"
                )
                short.append(
                    ((index.shard_location(shard), size), _short_shard_line(index, shard, size))
                )
            elif size > shard.size_bytes:
                problems.append(
                    f"{shard.name}: {size} bytes stored, the index says {shard.size_bytes}"
                )
            else:
                present.append((split, shard))
        if shards and len(short_in_split) == len(shards):
            problems.append(f"every shard of split {split!r} is short ({short_in_split[0]}, ...)")
    if level == "full" and present:
        with ThreadPoolExecutor(max_workers=min(8, len(present))) as pool:
            results = pool.map(lambda item: _check_content(index, *item), present)
            problems.extend(p for p in results if p)
    if problems:
        shown = "; ".join(problems[:5])
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise DatasetError(
            f"the index does not match the shards at {index.location}: {shown}{more}"
        )
    _report_short(short)
    return [line for _, line in short]


def open_dataset(location: str, *, verify_level: Literal["size", "full"] = "size") -> DatasetIndex:
    """The dataset's index, after checking that every shard it names is there (and with
    verify_level="full", that checksums and sample counts match). A shard stored short of
    its indexed size is logged (one warning naming it, the bytes indexed and stored) and
    read as far as it goes (see verify). Raises DatasetError naming the location; call it
    before starting workers."""
    if verify_level not in ("size", "full"):
        raise DatasetError(f"verify level must be 'size' or 'full', not {verify_level!r}")
    index = read_index(location)
    verify(index, verify_level)
    return index
