"""Inputs for the data tests (no tests here), generated on the spot: image folders, a fake
CIFAR-10 archive with the real pickle layout, hand-made shards with bad samples."""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}


def image_bytes(seed: int, size: tuple[int, int] = (48, 40), fmt: str = "png") -> bytes:
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    base = rng.integers(0, 255, 3)
    pixels = (base + 40 * np.sin(x[..., None] / (3 + seed % 5)) + y[..., None]) % 256
    out = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(out, FORMATS[fmt])
    return out.getvalue()


def make_image_folder(root: Path, per_class: int = 8, classes=("cat", "dog", "eel")) -> Path:
    """per_class images per class, cycling through JPEG, PNG and WebP and a few sizes."""
    exts = list(FORMATS)
    n = 0
    for c in classes:
        folder = root / c
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            ext = exts[n % len(exts)]
            size = (40 + 7 * (n % 4), 36 + 5 * (n % 3))
            (folder / f"img_{i:03d}.{ext}").write_bytes(image_bytes(n, size, ext))
            n += 1
    return root


def fake_cifar_archive(path: Path, per_batch: int = 6, batches: int = 2, test: int = 5) -> dict:
    """A cifar-10-python.tar.gz with the real layout: cifar-10-batches-py/ with batches.meta
    and data_batch_N / test_batch pickles ({b'data': uint8 [N, 3072], b'labels': [...]})."""
    rng = np.random.default_rng(0)
    names = [
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ]
    content = {}

    def add(tar: tarfile.TarFile, name: str, obj) -> None:
        data = pickle.dumps(obj, protocol=2)
        info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    with tarfile.open(path, "w:gz") as tar:
        add(
            tar,
            "batches.meta",
            {"label_names": names, "num_cases_per_batch": per_batch, "num_vis": 3072},
        )
        for name, n in [
            *[(f"data_batch_{b + 1}", per_batch) for b in range(batches)],
            ("test_batch", test),
        ]:
            data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
            labels = [int(x) for x in rng.integers(0, 10, n)]
            content[name] = (data, labels)
            add(
                tar,
                name,
                {b"batch_label": name.encode(), b"labels": labels, b"data": data,
                 b"filenames": [f"{name}_{i}.png".encode() for i in range(n)]},
            )  # fmt: skip
    return {"names": names, "batches": content}


def tar_bytes(samples: list[tuple[str, dict[str, bytes]]]) -> tuple[bytes, list[int]]:
    """A WebDataset tar of (key, {ext: bytes}) samples, and the byte offset where each
    sample starts (to cut the tar inside a chosen sample)."""
    out = io.BytesIO()
    offsets = []
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            offsets.append(tar.offset)
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return out.getvalue(), offsets
