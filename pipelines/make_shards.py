"""Turn images into WebDataset shards plus an index, locally or on a Ray cluster.

    python pipelines/make_shards.py --source digits --out s3://vit/datasets/digits/v1
    python pipelines/make_shards.py --source photos/ --out s3://vit/datasets/photos/v1 \\
        --shard-size 256MB --val-fraction 0.05 --max-side 512 --jpeg-quality 90
    python pipelines/make_shards.py --source labels.csv --out data/mine/v1 --shard-samples 1000
    ray job submit --working-dir . -- python pipelines/make_shards.py --source ... --out s3://...

--source: `digits` (scikit-learn's bundled digits), an image folder with one sub-folder per
class, a .csv (header with path and label columns) or .jsonl manifest, or the CIFAR-10
python archive (cifar-10-python.tar.gz, never downloaded). Output: <out>/train-000000.tar,
..., <out>/val-000000.tar, ... and <out>/index.json, written last. Large sources are
converted by one Ray task per shard (RAY_ADDRESS picks the cluster; a local --out then
needs a filesystem every node shares). The object store is found through AWS_* variables.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `python pipelines/x.py` puts only pipelines/ on the path

from vit_core.data import DatasetError, make_shards  # noqa: E402
from vit_core.storage import StorageError  # noqa: E402

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
}


def byte_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 256MB, 1GiB, 100000000)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--source",
        required=True,
        help="digits, a folder, a .csv/.jsonl manifest, or a CIFAR-10 .tar.gz",
    )
    parser.add_argument(
        "--out", required=True, help="s3://bucket/datasets/NAME/VERSION or a local directory"
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--shard-size",
        type=byte_size,
        help="target shard size in bytes, e.g. 256MB (default 256MiB)",
    )
    size.add_argument("--shard-samples", type=int, help="samples per shard instead of a byte size")
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=None,
        help="fraction of each class for validation (default: the source's own split, else 0.1; digits 0.2)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and the shuffle")
    parser.add_argument(
        "--no-shuffle", action="store_true", help="keep source order within each split"
    )
    parser.add_argument(
        "--max-side", type=int, help="re-encode: shrink so the longer side is at most this"
    )
    parser.add_argument(
        "--jpeg-quality",
        type=int,
        help="re-encode as JPEG at this quality (default 90 with --max-side)",
    )
    parser.add_argument(
        "--image-size", type=int, default=32, help="digits only: upscale the 8x8 images to this"
    )
    parser.add_argument(
        "--executor",
        choices=("auto", "ray", "local"),
        default="auto",
        help="auto: Ray for large sources or when Ray is running, else this process",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a finished dataset at --out"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    return parser.parse_args(argv)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        index = make_shards(
            args.source,
            args.out,
            shard_samples=args.shard_samples,
            shard_bytes=args.shard_size,
            val_fraction=args.val_fraction,
            seed=args.seed,
            shuffle=not args.no_shuffle,
            max_side=args.max_side,
            jpeg_quality=args.jpeg_quality,
            overwrite=args.overwrite,
            executor=args.executor,
            digits_size=args.image_size,
            progress=not args.quiet,
        )
    except (DatasetError, StorageError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: no index written, the dataset is not finished", file=sys.stderr)
        return 130
    counts = ", ".join(f"{split} {index.num_samples(split)}" for split in index.splits)
    print(
        f"wrote {index.location}: {counts} samples, {index.num_classes} classes, "
        f"{sum(len(s) for s in index.splits.values())} shards, version {index.version}"
        + (f", {index.skipped} unreadable images skipped" if index.skipped else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
