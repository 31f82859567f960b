"""Turn images into WebDataset shards plus an index, locally or on a Ray cluster.

    python pipelines/make_shards.py --source digits --out s3://vit/datasets/digits/v1
    python pipelines/make_shards.py --source photos/ --out s3://vit/datasets/photos/v1 \\
        --shard-size 256MB --val-fraction 0.05 --max-side 512 --jpeg-quality 90
    python pipelines/make_shards.py --source labels.csv --out data/mine/v1 --shard-samples 1000
    ray job submit --working-dir . -- python pipelines/make_shards.py --source ... --out s3://...
    python pipelines/make_shards.py --index-existing s3://bucket/some/shards \
        --split 'train=train-*.tar' --split 'val=val-*.tar' --label-key json:label \
        --image-keys jpg,png

--source: `digits` (scikit-learn's bundled digits), an image folder with one sub-folder per
class, a .csv (header with path and label columns) or .jsonl manifest, or the CIFAR-10
python archive (cifar-10-python.tar.gz, never downloaded). Output: <out>/train-000000.tar,
..., <out>/val-000000.tar, ... and <out>/index.json, written last. Large sources are
converted by one Ray task per shard (RAY_ADDRESS picks the cluster; a local --out then
needs a filesystem every node shares). The object store is found through AWS_* variables.

--index-existing: WebDataset shards that another tool wrote (the webdataset library,
img2dataset) are indexed where they are, never rewritten: each shard is read once (one Ray
task per shard from 8 shards, or when Ray runs), and <location>/index.json is written
last, recording which members hold the image and the label.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `python pipelines/x.py` puts only pipelines/ on the path

from vit_core.cli import report_result  # noqa: E402
from vit_core.data import DatasetError, index_existing_shards, make_shards  # noqa: E402
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


def split_glob(text: str) -> tuple[str, str]:
    name, sep, pattern = text.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z0-9_]+", name) or not pattern:
        raise argparse.ArgumentTypeError(f"not NAME=GLOB: {text!r} (e.g. 'val=val-*.tar')")
    return name, pattern


def class_names(text: str) -> list[str]:
    """`a,b,c`, or `@file` with one name a line."""
    if text.startswith("@"):
        try:
            lines = Path(text[1:]).read_text().splitlines()
        except OSError as err:
            raise argparse.ArgumentTypeError(f"cannot read {text[1:]}: {err.strerror}") from None
        names = [line.strip() for line in lines if line.strip()]
    else:
        names = [n.strip() for n in text.split(",") if n.strip()]
    if not names or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"class names must be distinct and not empty: {text!r}")
    return names


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--source",
        help="digits, a folder, a .csv/.jsonl manifest, or a CIFAR-10 .tar.gz",
    )
    parser.add_argument("--out", help="s3://bucket/datasets/NAME/VERSION or a local directory")
    existing = parser.add_argument_group("indexing existing WebDataset shards in place")
    existing.add_argument(
        "--index-existing",
        metavar="LOCATION",
        help="s3://... or a directory of WebDataset shards: write its index.json, no shards",
    )
    existing.add_argument(
        "--split",
        type=split_glob,
        action="append",
        metavar="NAME=GLOB",
        help="shards of a split, by a glob over paths under LOCATION (repeat it; "
        "default train=*.tar)",
    )
    existing.add_argument(
        "--label-key",
        default="cls",
        help="EXT: the label is the text of the <key>.EXT member (e.g. cls); json:FIELD: a "
        "field of the <key>.json member (default cls)",
    )
    existing.add_argument(
        "--image-keys",
        default="jpg,jpeg,png,webp",
        help="image member extensions; a sample's first one present is its image "
        "(default jpg,jpeg,png,webp)",
    )
    existing.add_argument(
        "--class-names",
        type=class_names,
        help="a,b,c or @file (one a line): the classes in order (default: integer labels "
        "name classes 0..N-1, other labels are names, sorted)",
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
    args = parser.parse_args(argv)
    if bool(args.index_existing) == bool(args.source or args.out):
        parser.error("give --source and --out, or --index-existing")
    if not args.index_existing and not (args.source and args.out):
        parser.error("--source and --out go together")
    names = [name for name, _ in args.split or []]
    if len(set(names)) != len(names):
        parser.error(f"--split names a split twice: {', '.join(names)}")
    return args


def index_existing(args: argparse.Namespace) -> int:
    index = index_existing_shards(
        args.index_existing,
        splits=dict(args.split) if args.split else None,
        label=args.label_key,
        image_extensions=args.image_keys.split(","),
        class_names=args.class_names,
        overwrite=args.overwrite,
        executor=args.executor,
        progress=not args.quiet,
    )
    counts = ", ".join(f"{split} {index.num_samples(split)}" for split in index.splits)
    print(
        f"indexed {index.location}: {counts} samples, {index.num_classes} classes, "
        f"{sum(len(s) for s in index.splits.values())} shards, version {index.version}"
    )
    report_result({"location": index.location, "version": index.version,
                   "counts": {split: index.num_samples(split) for split in index.splits},
                   "num_classes": index.num_classes})  # fmt: skip
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.index_existing:
            return index_existing(args)
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
    report_result({"location": index.location, "version": index.version,
                   "counts": {split: index.num_samples(split) for split in index.splits},
                   "num_classes": index.num_classes})  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
