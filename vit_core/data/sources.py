"""Where samples come from: an image folder, a CSV/JSONL manifest, the CIFAR-10 python
archive, or scikit-learn's bundled digits. Each becomes a Source: class names plus a list
of samples that point at an encoded image (a path or URI) or hold pixels.

Errors in the source itself (a missing folder, a manifest line that cannot be read) raise
DatasetError naming the file and line. An image that cannot be decoded is not an error
here: make_shards skips and counts it.
"""

from __future__ import annotations

import csv
import io
import json
import pickle
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vit_core import storage
from vit_core.data.errors import DatasetError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm"}
MANIFEST_SUFFIXES = {".csv", ".jsonl", ".ndjson"}
PATH_COLUMNS = ("path", "uri", "image", "file")
LABEL_COLUMNS = ("label", "class")


@dataclass(frozen=True)
class SourceSample:
    index: int  # position in the source; the sample's key in the shards
    label: int
    path: str | None = None  # an encoded image file or s3:// URI
    pixels: np.ndarray | None = None  # or the pixels themselves, HxW or HxWx3 uint8
    split: str | None = None  # the source's own split, where it has one (CIFAR)

    @property
    def key(self) -> str:
        return f"{self.index:08d}"

    @property
    def origin(self) -> str:
        return self.path or f"#{self.index}"


@dataclass
class Source:
    description: str  # recorded in the index
    class_names: list[str]
    samples: list[SourceSample]
    default_val_fraction: float = 0.1  # when neither the caller nor the source splits
    default_shard_samples: int | None = None  # when no shard size is given (else by bytes)

    @property
    def has_own_split(self) -> bool:
        return any(s.split for s in self.samples)


def open_source(spec: str, *, digits_size: int = 32) -> Source:
    """`digits`, an image folder, a .csv/.jsonl manifest, or a CIFAR-10 .tar.gz archive."""
    if spec == "digits":
        return digits_source(digits_size)
    lowered = spec.lower()
    if any(lowered.endswith(s) for s in MANIFEST_SUFFIXES):
        return manifest_source(spec)
    if lowered.endswith((".tar.gz", ".tgz", ".tar")):
        return cifar10_source(spec)
    return image_folder_source(spec)


def digits_source(size: int = 32) -> Source:
    """scikit-learn's 1797 bundled 8x8 digits, scaled to 0-255 and upscaled to size x size."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.clip(np.rint(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    samples = []
    for i, (image, label) in enumerate(zip(pixels, digits.target, strict=True)):
        big = np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))
        samples.append(SourceSample(i, int(label), pixels=big))
    # 20% for validation; shards of 400, so a small demo still reads on several CPUs and
    # reorders shards every epoch.
    return Source(
        f"sklearn digits (8x8 upscaled to {size}x{size})",
        [str(d) for d in range(10)],
        samples,
        default_val_fraction=0.2,
        default_shard_samples=400,
    )


def image_folder_source(root: str) -> Source:
    """One sub-folder per class (sorted names are the classes); images below it, any depth."""
    remote = storage.is_remote(root)
    if not remote and not Path(root).is_dir():
        what = "is not a folder" if Path(root).exists() else "not found"
        raise DatasetError(f"image folder {what}: {root}")
    try:
        files = storage.list_files(root)
    except storage.StorageError as err:
        raise DatasetError(f"cannot list the image folder {root}: {err}") from None
    prefix = root.rstrip("/") + "/"
    by_class: dict[str, list[str]] = {}
    for location in files:
        relative = location[len(prefix) :] if location.startswith(prefix) else location
        parts = relative.split("/")
        if len(parts) < 2 or any(p.startswith(".") for p in parts):
            continue  # files beside the class folders, hidden files
        if Path(parts[-1]).suffix.lower() not in IMAGE_SUFFIXES:
            continue
        by_class.setdefault(parts[0], []).append(location)
    if not by_class:
        raise DatasetError(f"no images found in {root} (expected one sub-folder per class)")
    class_names = sorted(by_class)
    samples = []
    for label, name in enumerate(class_names):
        for location in sorted(by_class[name]):
            samples.append(SourceSample(len(samples), label, path=location))
    return Source(f"image folder {root}", class_names, samples)


def _resolve(path: str, manifest: str) -> str:
    if storage.is_remote(path) or Path(path).is_absolute():
        return path
    if storage.is_remote(manifest):
        return storage.join(manifest.rsplit("/", 1)[0], path)
    return str(Path(manifest).absolute().parent / path)


def _manifest_rows(manifest: str, text: str) -> list[tuple[int, str, object]]:
    """(line number, path, raw label) for every entry; DatasetError names the bad line."""
    rows: list[tuple[int, str, object]] = []
    if manifest.lower().endswith(".csv"):
        reader = csv.reader(io.StringIO(text))
        try:
            header = [h.strip().lower() for h in next(reader)]
        except StopIteration:
            raise DatasetError(f"{manifest}: the manifest is empty") from None
        path_col = next((header.index(c) for c in PATH_COLUMNS if c in header), None)
        label_col = next((header.index(c) for c in LABEL_COLUMNS if c in header), None)
        if path_col is None or label_col is None:
            raise DatasetError(
                f"{manifest} line 1: the header needs a path column ({'/'.join(PATH_COLUMNS)}) "
                f"and a label column ({'/'.join(LABEL_COLUMNS)}), found {header}"
            )
        for record in reader:
            line = reader.line_num
            if not record or all(not f.strip() for f in record):
                continue
            if len(record) != len(header):
                raise DatasetError(
                    f"{manifest} line {line}: {len(record)} fields, the header has {len(header)}"
                )
            rows.append((line, record[path_col].strip(), record[label_col].strip()))
        return rows
    for line, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            entry = json.loads(raw)
        except ValueError as err:
            raise DatasetError(f"{manifest} line {line}: not valid JSON ({err.args[0]})") from None
        if not isinstance(entry, dict):
            raise DatasetError(f"{manifest} line {line}: expected a JSON object")
        path = next((entry[c] for c in PATH_COLUMNS if c in entry), None)
        label = next((entry[c] for c in LABEL_COLUMNS if c in entry), None)
        if not isinstance(path, str) or label is None:
            raise DatasetError(
                f"{manifest} line {line}: needs a path ({'/'.join(PATH_COLUMNS)}) and a label "
                f"({'/'.join(LABEL_COLUMNS)})"
            )
        rows.append((line, path.strip(), label))
    return rows


def manifest_source(manifest: str) -> Source:
    """A CSV (header with path and label columns) or JSONL manifest. Labels are class names,
    or integers 0..N-1 (then the class names are the numbers). Relative paths are resolved
    against the manifest's own folder."""
    try:
        raw = storage.read_bytes(manifest)
    except storage.StorageError as err:
        raise DatasetError(f"cannot read the manifest: {err}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DatasetError(f"{manifest}: not UTF-8 text (byte {err.start})") from None
    rows = _manifest_rows(manifest, text)
    if not rows:
        raise DatasetError(f"{manifest}: the manifest lists no images")
    for line, path, label in rows:
        if not path:
            raise DatasetError(f"{manifest} line {line}: empty path")
        if isinstance(label, bool) or not isinstance(label, int | str) or label == "":
            raise DatasetError(f"{manifest} line {line}: invalid label {label!r}")
    integer = all(isinstance(label, int) or re.fullmatch(r"\d+", label) for _, _, label in rows)
    if integer:
        labels = [int(label) for _, _, label in rows]
        class_names = [str(i) for i in range(max(labels) + 1)]
    else:
        names = sorted({str(label) for _, _, label in rows})
        lookup = {name: i for i, name in enumerate(names)}
        labels = [lookup[str(label)] for _, _, label in rows]
        class_names = names
    samples = [
        SourceSample(i, label, path=_resolve(path, manifest))
        for i, ((_, path, _), label) in enumerate(zip(rows, labels, strict=True))
    ]
    return Source(f"manifest {manifest}", class_names, samples)


class _ArraysOnly(pickle.Unpickler):
    """CIFAR's batches are pickles; load numpy arrays and plain containers, nothing else."""

    ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
        ("builtins", "bytearray"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _unpickle(data: bytes) -> dict:
    loaded = _ArraysOnly(io.BytesIO(data), encoding="latin1").load()
    if not isinstance(loaded, dict):
        raise pickle.UnpicklingError("not a dict")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in loaded.items()}


def cifar10_source(archive: str) -> Source:
    """cifar-10-python.tar.gz (never downloaded): data_batch_1..5 become the train split and
    test_batch the val split, unless make_shards is given its own val_fraction."""
    if not storage.is_remote(archive) and not Path(archive).is_file():
        raise DatasetError(f"CIFAR-10 archive not found: {archive}")
    try:
        local = storage.materialize(archive)
    except storage.StorageError as err:
        raise DatasetError(f"cannot read the CIFAR-10 archive: {err}") from None
    batches: dict[str, dict] = {}
    meta: dict | None = None
    try:
        with tarfile.open(local, "r:*") as tar:
            for member in tar:
                base = member.name.rsplit("/", 1)[-1]
                if not member.isfile():
                    continue
                if base == "batches.meta" or re.fullmatch(r"data_batch_\d+|test_batch", base):
                    data = tar.extractfile(member).read()
                    try:
                        loaded = _unpickle(data)
                    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as err:
                        raise DatasetError(
                            f"{archive}: cannot read {member.name} ({err})"
                        ) from None
                    if base == "batches.meta":
                        meta = loaded
                    else:
                        batches[base] = loaded
    except (tarfile.TarError, OSError, EOFError) as err:
        raise DatasetError(f"{archive}: not a readable tar archive ({err})") from None
    if (
        meta is None
        or "test_batch" not in batches
        or not any(b.startswith("data_batch") for b in batches)
    ):
        raise DatasetError(
            f"{archive}: not a CIFAR-10 python archive (needs batches.meta, data_batch_N, test_batch)"
        )
    class_names = [
        n.decode() if isinstance(n, bytes) else str(n) for n in meta.get("label_names", [])
    ]
    if not class_names:
        raise DatasetError(f"{archive}: batches.meta has no label_names")
    samples: list[SourceSample] = []
    order = sorted(
        (b for b in batches if b != "test_batch"), key=lambda b: int(b.rsplit("_", 1)[1])
    )
    for name in [*order, "test_batch"]:
        batch = batches[name]
        try:
            data = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            labels = [int(x) for x in batch["labels"]]
        except (KeyError, ValueError, TypeError) as err:
            raise DatasetError(f"{archive}: {name} is malformed ({err})") from None
        if len(labels) != len(data):
            raise DatasetError(f"{archive}: {name} has {len(data)} images and {len(labels)} labels")
        images = data.transpose(0, 2, 3, 1)
        split = "val" if name == "test_batch" else "train"
        for image, label in zip(images, labels, strict=True):
            if not 0 <= label < len(class_names):
                raise DatasetError(
                    f"{archive}: {name} has label {label} outside 0..{len(class_names) - 1}"
                )
            samples.append(SourceSample(len(samples), label, pixels=image, split=split))
    return Source(f"CIFAR-10 archive {archive}", class_names, samples)
