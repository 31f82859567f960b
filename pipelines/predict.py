"""Batch inference with Ray Data: classify every image of a shard split, an image folder or
a manifest, and write one Parquet row per image.

    python pipelines/predict.py --model models:/vit-digits@champion --data data/digits/v1 \\
        --split val --out predictions/digits-val
    ray job submit --working-dir . -- python pipelines/predict.py \\
        --model models:/vit-digits@champion --data s3://vit/incoming/photos --out s3://vit/predictions/x

--data: a shard set (with --split), an image folder (any depth), or a .csv/.jsonl manifest
with a path column. Columns: key (the sample key, or the file's path), label (shard sets),
class_index, class_name, probability, top_k_classes, top_k_probabilities, error (set when
the image could not be used: such a row is written and counted, the job goes on). --out
must be new or empty.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import mlflow

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `python pipelines/x.py` puts only pipelines/ on the path

from vit_core.cli import report_user_errors  # noqa: E402
from vit_core.eval.batch import TOP_K, Compute, predict  # noqa: E402
from vit_core.track.runs import tracking_uri  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", required=True, help="models:/NAME@ALIAS, models:/NAME/N or a folder"
    )
    parser.add_argument("--data", required=True, help="shard set, image folder or manifest")
    parser.add_argument("--split", default=None, help="the split, when --data is a shard set")
    parser.add_argument("--out", required=True, help="output folder (local or s3://)")
    parser.add_argument("--top-k", type=int, default=TOP_K)
    Compute.add_arguments(parser)
    args = parser.parse_args(argv)
    summary = None
    with report_user_errors():
        mlflow.set_tracking_uri(tracking_uri())  # no store is opened until one is needed
        summary = predict(args.model, args.data, args.out, split=args.split,
                          compute=Compute.from_args(args), top_k=args.top_k)  # fmt: skip
    if summary is None:
        return 2
    print(f"wrote {summary.rows} predictions ({summary.errors} errors) of {summary.model_uri} "
          f"to {summary.out}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
