"""Index WebDataset shards that other tools wrote, in place, so they train like ours.

Teams arrive with shards from the `webdataset` library's ShardWriter/TarWriter,
img2dataset or public exports: `<key>.jpg` (or .png, .webp, several at once), a label in
`<key>.cls` or in a field of `<key>.json`, and members we do not need (.txt, .json). This
module never rewrites them: it reads each shard once (one Ray task per shard on a cluster,
a few threads in this process for a handful), counts its samples, collects its labels,
checksums it, and writes `index.json` beside the shards, last. The index records the
Layout (image extensions in order of preference, label member, and whether labels are
class indices or names), so the reader needs no further settings.

Labels: integers (a .cls text, or a JSON number) are class indices, named "0".."N-1"
where N is one more than the largest, unless class_names are given; any label that is not
an integer makes every label a class name, and the classes are the sorted names found,
unless class_names are given (then each name must be one of them, in that order).
"""

from __future__ import annotations

import fnmatch
import hashlib
import sys
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Literal

from vit_core import storage
from vit_core.data.errors import DatasetError
from vit_core.data.index import (
    INDEX_NAME,
    DatasetIndex,
    ShardInfo,
    index_location,
    normalize_location,
    open_stream,
    write_index,
)
from vit_core.data.progress import Progress
from vit_core.data.shards import (
    IMAGE_EXTENSIONS,
    Layout,
    ShardCorruptError,
    iter_samples,
    parse_layout,
)

DEFAULT_SPLITS = {"train": "*.tar"}
# Below this many shards a scan is quicker with threads here than starting Ray workers.
RAY_MIN_SHARDS = 8

Executor = Literal["auto", "ray", "local"]


@dataclass
class ShardScan:
    """What one read of a shard found: its index entry, and its labels as stored."""

    info: ShardInfo
    labels: Counter = field(default_factory=Counter)  # {stored label: samples}
    unusable: int = 0  # samples without an image or a readable label
    example: str = ""  # the first of them: "<key>: <reason>"


def scan_shard(location: str, name: str, layout: Layout) -> ShardScan:
    """Read the shard at `location` once: sample count, sha256, size, stored labels.
    Raises DatasetError naming the shard when it is not a readable tar."""
    digest = hashlib.sha256()
    size = 0
    scan = ShardScan(ShardInfo(name, 0, "", 0))
    count = 0
    with open_stream(location) as stream:

        def read(n: int) -> bytes:
            nonlocal size
            data = stream.read(n)
            digest.update(data)
            size += len(data)
            return data

        try:
            for sample in iter_samples(read, layout):
                count += 1
                if sample.image is None or sample.label_value is None:
                    scan.unusable += 1
                    scan.example = scan.example or f"{sample.key}: {sample.error}"
                else:
                    scan.labels[sample.label_value] += 1
        except ShardCorruptError as err:
            raise DatasetError(
                f"shard {location} is not a readable tar ({err}); leave it out with the "
                "split patterns, or replace it"
            ) from None
        while read(1 << 20):
            pass  # the end-of-archive padding is part of the checksum and the size
    scan.info = ShardInfo(name, count, digest.hexdigest(), size)
    return scan


def match_splits(location: str, splits: dict[str, str]) -> dict[str, list[str]]:
    """{split: shard names (relative to location, sorted)} from {split: glob}. Raises
    DatasetError for a location without files, a split that matches nothing, or a shard
    that two splits match."""
    prefix = location.rstrip("/") + "/"
    try:
        names = [f[len(prefix) :] for f in storage.list_files(location)]
        names = [n for n in names if n != INDEX_NAME]
    except storage.StorageError as err:
        raise DatasetError(f"cannot list the shards at {location}: {err}") from None
    if not names:
        raise DatasetError(f"no shards at {location}: the location does not exist or is empty")
    found: dict[str, list[str]] = {}
    owner: dict[str, str] = {}
    for split, pattern in splits.items():
        matched = sorted(n for n in names if fnmatch.fnmatchcase(n, pattern))
        if not matched:
            raise DatasetError(f"split {split!r}: no file under {location} matches {pattern!r}")
        for name in matched:
            if name in owner:
                raise DatasetError(
                    f"shard {name} at {location} matches the patterns of splits "
                    f"{owner[name]!r} and {split!r}"
                )
            owner[name] = split
        found[split] = matched
    return found


def resolve_classes(
    labels: Counter, class_names: Sequence[str] | None, location: str
) -> tuple[list[str], bool]:
    """(class names, labels are names) from the labels found; see the module docstring.
    Raises DatasetError naming a label that fits no class."""
    if not labels:
        raise DatasetError(f"no sample under {location} has a readable label")
    as_names = any(not isinstance(v, int) for v in labels)
    if as_names:
        found = sorted({str(v) for v in labels})
        if class_names is None:
            return found, True
        given = set(class_names)
        unknown = [v for v in found if v not in given]
        if unknown:
            raise DatasetError(
                f"labels under {location} not among the given class names: {unknown[:5]}"
            )
        return list(class_names), True
    low, high = min(labels), max(labels)
    if low < 0:
        raise DatasetError(f"label {low} under {location}: class indices start at 0")
    if class_names is None:
        return [str(i) for i in range(high + 1)], False
    if high >= len(class_names):
        raise DatasetError(
            f"label {high} under {location}: only {len(class_names)} class names given"
        )
    return list(class_names), False


def _choose_executor(executor: Executor, num_shards: int) -> str:
    if executor not in ("auto", "ray", "local"):
        raise DatasetError(f"executor must be auto, ray or local, not {executor!r}")
    if executor != "auto":
        return executor
    ray_running = "ray" in sys.modules and sys.modules["ray"].is_initialized()
    return "ray" if ray_running or num_shards >= RAY_MIN_SHARDS else "local"


def _scan_local(jobs: list[tuple[str, str]], layout: Layout, progress: Progress):
    scans = []
    with ThreadPoolExecutor(max_workers=min(8, len(jobs))) as pool:
        for scan in pool.map(lambda job: scan_shard(job[0], job[1], layout), jobs):
            scans.append(scan)
            progress.update(1)
    return scans


def _scan_ray(jobs: list[tuple[str, str]], layout: Layout, progress: Progress):
    import ray
    from ray.exceptions import RayTaskError

    from vit_core import cluster

    cluster.connect()  # RAY_ADDRESS's cluster, or a local one
    task = ray.remote(num_cpus=1, max_retries=2)(scan_shard)
    refs = [task.remote(uri, name, layout) for uri, name in jobs]
    pending = set(refs)
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1, timeout=progress.interval)
        pending -= set(done)
        progress.update(len(done))
    try:
        return ray.get(refs)
    except RayTaskError as err:
        cause = err.cause
        if isinstance(cause, DatasetError | storage.StorageError):
            raise cause from None
        raise DatasetError(f"scanning the shards failed: {type(cause).__name__}: {cause}") from None


def index_existing_shards(
    location: str,
    *,
    splits: dict[str, str] | None = None,
    label: str = "cls",
    image_extensions: Sequence[str] = IMAGE_EXTENSIONS,
    class_names: Sequence[str] | None = None,
    overwrite: bool = False,
    executor: Executor = "auto",
    progress: bool = True,
) -> DatasetIndex:
    """Write `<location>/index.json` for the WebDataset shards already there; return it.

    splits: {split: glob over paths relative to location} (default {"train": "*.tar"});
    label: `cls` (a member whose text is the label; any extension) or `json:FIELD` (a field
    of the JSON member); image_extensions: the image is the first of these a sample has;
    class_names: the classes, in order (default: from the labels, see the module
    docstring). Shards are read, never written. An existing index is replaced only with
    overwrite=True. Samples without an image or a label are counted in the index and come
    through training as bad samples. Raises DatasetError (no shards, a split matching
    nothing, an unreadable tar, a label that fits no class) before any index is written.
    """
    location = normalize_location(location)
    splits = dict(splits or DEFAULT_SPLITS)
    try:
        layout = parse_layout(label, list(image_extensions))
    except ValueError as err:
        raise DatasetError(f"indexing {location}: {err}") from None
    if storage.exists(index_location(location)) and not overwrite:
        raise DatasetError(
            f"{INDEX_NAME} already exists at {location}; pass --overwrite to index it again"
        )
    names = match_splits(location, splits)
    jobs = [(storage.join(location, n), n) for split in names for n in names[split]]
    how = _choose_executor(executor, len(jobs))
    meter = Progress(f"index {location}", len(jobs), unit="shards", enabled=progress)
    scans = (_scan_ray if how == "ray" else _scan_local)(jobs, layout, meter)
    by_name = {scan.info.name: scan for scan in scans}

    labels: Counter = Counter()
    for scan in scans:
        labels.update(scan.labels)
    classes, as_names = resolve_classes(labels, class_names, location)
    unusable = [s for s in scans if s.unusable]
    index = DatasetIndex(
        location=location,
        class_names=classes,
        splits={
            split: [by_name[n].info for n in shard_names] for split, shard_names in names.items()
        },
        source=f"existing WebDataset shards at {location}",
        settings={
            "indexed_in_place": True,
            "splits": splits,
            "samples_without_image_or_label": sum(s.unusable for s in scans),
        },
        layout=replace(layout, class_names=tuple(classes) if as_names else None),
    )
    write_index(index)  # last: only now is the dataset there
    note = f"{len(classes)} classes"
    if unusable:
        note += (
            f", {sum(s.unusable for s in scans)} samples without an image or a label "
            f"(they will count as bad samples), e.g. {unusable[0].info.name} {unusable[0].example}"
        )
    meter.finish(note)
    return index
