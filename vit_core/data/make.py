"""make_shards: a source becomes `<out>/{train,val}-NNNNNN.tar` plus `<out>/index.json`.

Steps: open the source; split it into train/val (the source's own split, or a seeded
split stratified by class); shuffle each split with the seed (so shards mix classes);
cut it into shards of a target sample count (or of a target byte size, estimated by
encoding a few samples); write the shards, one Ray task per shard when the source is
large or Ray is already running, in this process otherwise; write index.json last.

Writing over a finished dataset (index.json present) is refused unless overwrite=True;
then the old index goes first, so a half-replaced dataset is never taken for finished.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from vit_core import storage
from vit_core.data.encode import EncodeOptions, UnreadableImage, encode_sample
from vit_core.data.errors import DatasetError
from vit_core.data.index import (
    INDEX_NAME,
    DatasetIndex,
    ShardInfo,
    index_location,
    normalize_location,
    write_index,
)
from vit_core.data.progress import Progress
from vit_core.data.shards import SHARD_PATTERN, ShardWriter, shard_name
from vit_core.data.sources import Source, SourceSample, open_source

DEFAULT_SHARD_BYTES = 256 << 20
# Below this many samples a conversion is quicker in-process than starting Ray workers.
RAY_MIN_SAMPLES = 5000
_TAR_OVERHEAD = 3 * 512 + 768  # per sample: three member headers and their padding
SPLIT_ORDER = ("train", "val")

Executor = Literal["auto", "ray", "local"]


@dataclass(frozen=True)
class ShardSpec:
    split: str
    number: int
    samples: list[SourceSample]

    @property
    def name(self) -> str:
        return shard_name(self.split, self.number)


@dataclass
class ShardResult:
    split: str
    info: ShardInfo
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (source, reason)


def _members(sample: SourceSample, options: EncodeOptions) -> dict[str, bytes]:
    data, ext = encode_sample(sample, options)
    members = {ext: data, "cls": str(sample.label).encode()}
    if sample.path:
        members["json"] = json.dumps({"src": sample.path}).encode()
    return members


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_shard(
    spec: ShardSpec,
    out: str,
    options: EncodeOptions,
    on_sample: Callable[[], None] | None = None,
) -> ShardResult:
    """Encode one shard's samples into a tar, put it at `out/<name>`, return its index entry.
    Unreadable images are left out and listed in the result."""
    final = storage.join(out, spec.name)
    if storage.is_remote(out):
        fd, tmp_name = tempfile.mkstemp(prefix="vit-shard-", suffix=".tar")
        os.close(fd)
        tmp = Path(tmp_name)
    else:
        Path(out).mkdir(parents=True, exist_ok=True)
        tmp = Path(out) / f".{spec.name}.partial-{os.getpid()}"
    skipped: list[tuple[str, str]] = []
    try:
        with ShardWriter(tmp) as writer:
            for sample in spec.samples:
                try:
                    writer.add(sample.key, _members(sample, options))
                except UnreadableImage as err:
                    skipped.append((sample.origin, str(err)))
                if on_sample:
                    on_sample()
        info = ShardInfo(spec.name, writer.num_samples, _sha256(tmp), tmp.stat().st_size)
        if storage.is_remote(out):
            storage.upload_file(tmp, final)
        else:
            tmp.replace(final)
    finally:
        tmp.unlink(missing_ok=True)
    return ShardResult(spec.split, info, skipped)


def split_samples(
    source: Source, val_fraction: float | None, seed: int
) -> dict[str, list[SourceSample]]:
    """{"train": [...], "val": [...]}: the source's own split when it has one and no fraction
    is given; otherwise each class split with the seed, so val has every class's share."""
    if val_fraction is None and source.has_own_split:
        splits: dict[str, list[SourceSample]] = {}
        for sample in source.samples:
            splits.setdefault(sample.split or "train", []).append(sample)
        return {name: splits[name] for name in sorted(splits, key=_split_rank)}
    fraction = source.default_val_fraction if val_fraction is None else val_fraction
    if not 0.0 <= fraction < 1.0:
        raise DatasetError(f"val_fraction must be in [0, 1), got {fraction}")
    rng = np.random.default_rng([seed, 1])
    by_class: dict[int, list[SourceSample]] = {}
    for sample in source.samples:
        by_class.setdefault(sample.label, []).append(sample)
    train: list[SourceSample] = []
    val: list[SourceSample] = []
    for label in sorted(by_class):
        members = by_class[label]
        order = rng.permutation(len(members))
        n_val = int(round(fraction * len(members)))
        val.extend(members[i] for i in order[:n_val])
        train.extend(members[i] for i in order[n_val:])
    splits = {"train": sorted(train, key=lambda s: s.index)}
    if val:
        splits["val"] = sorted(val, key=lambda s: s.index)
    return splits


def _split_rank(name: str) -> tuple[int, str]:
    return (SPLIT_ORDER.index(name) if name in SPLIT_ORDER else len(SPLIT_ORDER), name)


def _estimate_sample_bytes(samples: list[SourceSample], options: EncodeOptions) -> float:
    step = max(1, len(samples) // 16)
    sizes = []
    for sample in samples[::step][:16]:
        try:
            sizes.append(sum(len(v) for v in _members(sample, options).values()))
        except UnreadableImage:
            continue
    return (float(np.mean(sizes)) if sizes else 100_000.0) + _TAR_OVERHEAD


def plan_shards(
    splits: dict[str, list[SourceSample]],
    *,
    shard_samples: int | None,
    shard_bytes: int | None,
    options: EncodeOptions,
    shuffle: bool,
    seed: int,
    default_samples: int | None = None,
) -> tuple[list[ShardSpec], int]:
    if shard_samples is not None and shard_samples < 1:
        raise DatasetError(f"shard_samples must be at least 1, got {shard_samples}")
    if shard_bytes is not None and shard_bytes < 1:
        raise DatasetError(f"shard_bytes must be positive, got {shard_bytes}")
    per_shard = shard_samples
    if per_shard is None and shard_bytes is None:
        per_shard = default_samples
    if per_shard is None:
        everything = [s for samples in splits.values() for s in samples]
        average = _estimate_sample_bytes(everything, options)
        per_shard = max(1, int((shard_bytes or DEFAULT_SHARD_BYTES) // average))
    specs = []
    for i, (split, samples) in enumerate(splits.items()):
        if shuffle:
            order = np.random.default_rng([seed, 2, i]).permutation(len(samples))
            samples = [samples[j] for j in order]
        for number, start in enumerate(range(0, len(samples), per_shard)):
            specs.append(ShardSpec(split, number, samples[start : start + per_shard]))
    return specs, per_shard


def prepare_output(out: str, overwrite: bool) -> None:
    """Refuse to replace a finished dataset unless asked; clear what a replaced or an
    interrupted run left (its index first, then shards), never other files."""
    if storage.exists(index_location(out)):
        if not overwrite:
            raise DatasetError(
                f"a dataset already exists at {out} ({INDEX_NAME} present); "
                "pass --overwrite to replace it, or write a new version"
            )
        storage.delete(index_location(out))
    if not storage.is_remote(out):
        Path(out).mkdir(parents=True, exist_ok=True)
    prefix = out.rstrip("/") + "/"
    for location in storage.list_files(out):
        name = location[len(prefix) :]
        if SHARD_PATTERN.match(name):
            storage.delete(location)


def _choose_executor(executor: Executor, num_samples: int, num_shards: int) -> str:
    if executor not in ("auto", "ray", "local"):
        raise DatasetError(f"executor must be auto, ray or local, not {executor!r}")
    if executor != "auto":
        return executor
    if num_shards < 2:
        return "local"
    ray_running = "ray" in sys.modules and sys.modules["ray"].is_initialized()
    return "ray" if ray_running or num_samples >= RAY_MIN_SAMPLES else "local"


def _run_local(specs: list[ShardSpec], out: str, options: EncodeOptions, progress: Progress):
    return [write_shard(spec, out, options, on_sample=lambda: progress.update(1)) for spec in specs]


def _run_ray(specs: list[ShardSpec], out: str, options: EncodeOptions, progress: Progress):
    import ray
    from ray.exceptions import RayTaskError

    if not ray.is_initialized():
        # RAY_ADDRESS (set by `ray job submit` or the user) picks a cluster; else a local one.
        ray.init(logging_level="WARNING")
    task = ray.remote(num_cpus=1, max_retries=2)(write_shard)
    pending = {task.remote(spec, out, options): spec for spec in specs}
    results: list[ShardResult] = []
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1, timeout=progress.interval)
        for ref in done:
            spec = pending.pop(ref)
            try:
                results.append(ray.get(ref))
            except RayTaskError as err:
                for other in pending:
                    ray.cancel(other)
                cause = err.cause
                if isinstance(cause, DatasetError | storage.StorageError):
                    raise cause from None
                raise DatasetError(
                    f"writing {spec.name} failed: {type(cause).__name__}: {cause}"
                ) from None
            progress.update(len(spec.samples))
        if not done:
            progress.update(0)
    return results


def make_shards(
    source: str | Source,
    out: str,
    *,
    shard_samples: int | None = None,
    shard_bytes: int | None = None,
    val_fraction: float | None = None,
    seed: int = 0,
    shuffle: bool = True,
    max_side: int | None = None,
    jpeg_quality: int | None = None,
    overwrite: bool = False,
    executor: Executor = "auto",
    digits_size: int = 32,
    progress: bool = True,
) -> DatasetIndex:
    """Convert a source (see sources.open_source, or a Source) into shards at `out`.

    shard_samples or shard_bytes (default: the source's own, else 256 MiB, estimated from a
    few encoded samples) set the shard size;
    val_fraction None keeps the source's own split (CIFAR) or takes 10% (digits: 20%); max_side and
    jpeg_quality re-encode every image as JPEG. Raises DatasetError/StorageError for bad
    input; unreadable images are skipped, counted in the index and reported.
    """
    if shard_samples is not None and shard_bytes is not None:
        raise DatasetError("give shard_samples or shard_bytes, not both")
    if jpeg_quality is not None and not 1 <= jpeg_quality <= 100:
        raise DatasetError(f"jpeg_quality must be in 1..100, got {jpeg_quality}")
    if max_side is not None and max_side < 1:
        raise DatasetError(f"max_side must be positive, got {max_side}")
    out = normalize_location(out)
    options = EncodeOptions(max_side, jpeg_quality)
    src = source if isinstance(source, Source) else open_source(source, digits_size=digits_size)
    splits = split_samples(src, val_fraction, seed)
    specs, per_shard = plan_shards(
        splits,
        shard_samples=shard_samples,
        shard_bytes=shard_bytes,
        options=options,
        shuffle=shuffle,
        seed=seed,
        default_samples=src.default_shard_samples,
    )
    total = sum(len(s.samples) for s in specs)
    how = _choose_executor(executor, total, len(specs))
    prepare_output(out, overwrite)  # only once the input has been found sound
    meter = Progress(f"make_shards {out}", total, enabled=progress)
    if progress:
        counts = ", ".join(f"{name} {len(samples)}" for name, samples in splits.items())
        print(
            f"make_shards: {src.description}: {total} samples ({counts}), "
            f"{len(specs)} shards of up to {per_shard}, {how} executor",
            file=sys.stderr,
            flush=True,
        )
    run = _run_ray if how == "ray" else _run_local
    results = run(specs, out, options, meter)
    results.sort(key=lambda r: (_split_rank(r.split), r.info.name))
    skipped = [item for r in results for item in r.skipped]
    index = DatasetIndex(
        location=out,
        class_names=src.class_names,
        splits={},
        source=src.description,
        settings={
            "shard_samples": per_shard,
            "val_fraction": val_fraction,
            "seed": seed,
            "shuffle": shuffle,
            "max_side": max_side,
            "jpeg_quality": jpeg_quality,
        },
        skipped=len(skipped),
        skipped_examples=[{"source": s, "reason": r} for s, r in skipped[:20]],
    )
    for result in results:
        index.splits.setdefault(result.split, []).append(result.info)
    write_index(index)  # last: only now is the dataset there
    note = f"{len(skipped)} unreadable images skipped" if skipped else "none skipped"
    meter.finish(note)
    for origin, reason in skipped[:5]:
        print(f"  skipped {origin}: {reason}", file=sys.stderr, flush=True)
    return index


def make_digits_shards(
    out_location: str,
    *,
    image_size: int = 32,
    val_fraction: float = 0.2,
    seed: int = 0,
    overwrite: bool = False,
    shard_samples: int | None = None,
    progress: bool = True,
) -> DatasetIndex:
    """The embedded demo's dataset: scikit-learn's digits upscaled to image_size, as PNG,
    split 80/20 by class, in shards of 400 samples unless shard_samples says otherwise
    (the same dataset `make_shards.py --source digits` writes)."""
    return make_shards(
        "digits",
        out_location,
        digits_size=image_size,
        val_fraction=val_fraction,
        seed=seed,
        overwrite=overwrite,
        shard_samples=shard_samples,
        progress=progress,
    )
