"""Evaluate a model on one split of a shard set with Ray Data, and log the result to MLflow.

    python pipelines/evaluate.py --model models:/vit-digits@candidate --data data/digits/v1
    ray job submit --working-dir . -- python pipelines/evaluate.py \\
        --model models:/vit-digits@candidate --data s3://vit/datasets/digits/v1 --split val

--model: models:/NAME@ALIAS (read once: the job scores the version it names at the start),
models:/NAME/VERSION, or a model folder or training checkpoint, local or s3://. The run
goes to a new MLflow run in --experiment (tags: model and dataset, with versions; metrics
top1, top5, loss, ece, count, bad_samples; per-class accuracy; confusion matrix and
reliability diagram), and a registered version gets tags eval.<dataset_version>.<split>.top1
and .run_id. Services are found as in pretrain.py (RAY_ADDRESS, MLFLOW_TRACKING_URI, AWS_*);
with none set, Ray starts here and MLflow writes to ./mlflow.db.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import mlflow

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `python pipelines/x.py` puts only pipelines/ on the path

from vit_core.cli import EMBEDDED_DIGITS, report_result, report_user_errors  # noqa: E402
from vit_core.eval.batch import Compute, plan_evaluation, run_evaluation  # noqa: E402
from vit_core.track.runs import tracking_uri  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", required=True, help="models:/NAME@ALIAS, models:/NAME/N or a folder"
    )
    parser.add_argument("--data", default=EMBEDDED_DIGITS, help="shard set (local or s3://)")
    parser.add_argument("--split", default="val")
    parser.add_argument("--experiment", default="vit-evaluate", help="MLflow experiment")
    Compute.add_arguments(parser)
    args = parser.parse_args(argv)
    report = None
    with report_user_errors():
        mlflow.set_tracking_uri(tracking_uri())  # no store is opened until one is needed
        plan = plan_evaluation(args.model, args.data, args.split)
        report = run_evaluation(plan, Compute.from_args(args))
    if report is None:
        return 2
    from vit_core.eval.tracking import log_evaluation

    s = report.scalars()
    who = (
        f"{report.model_name} version {report.model_version}"
        if report.model_name
        else report.model_uri
    )
    print(f"{who} on {args.data} ({args.split}): top1 {s.get('top1', float('nan')):.4f}, "
          f"top5 {s.get('top5', float('nan')):.4f}, loss {s.get('loss', float('nan')):.4f}, "
          f"ece {s.get('ece', float('nan')):.4f}, {int(s.get('count', 0))} images, "
          f"{report.bad_samples} bad samples")  # fmt: skip
    run_id = log_evaluation(mlflow.MlflowClient(tracking_uri()), report, args.experiment)
    print(f"logged to MLflow run {run_id} in experiment {args.experiment}")
    report_result({"mlflow_run_id": run_id, "model_uri": report.model_uri,
                   "model_name": report.model_name, "model_version": report.model_version,
                   "metrics": {k: float(v) for k, v in s.items()},
                   "bad_samples": int(report.bad_samples)})  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
