"""An evaluation as an MLflow run, and its result on the registered model version.

The run (a new one per evaluation) is tagged model_name, model_version, model_uri,
dataset, dataset_version and split, and holds: metrics top1, top5, loss, ece, count,
bad_samples (and accuracy/<class> for up to 20 classes); per_class_accuracy.json; the
per-image outcomes as outcomes.parquet (what promotion pairs by key); the confusion
matrix and the reliability diagram (Guo et al. 2017, fig. 1) under plots/. A registered
version gets tags eval.<dataset_version>.<split>.top1 and .run_id.
"""

from __future__ import annotations

import re
import tempfile
import time
from pathlib import Path

import numpy as np
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from vit_core.eval.batch import EvalReport
from vit_core.track.plots import confusion_matrix_png, reliability_png
from vit_core.track.runs import log_png

MAX_CLASS_METRICS = 20  # beyond this, per-class accuracy is only in the JSON artifact


def log_evaluation(client: MlflowClient, report: EvalReport, experiment: str) -> str:
    """Log `report` as a new run of `experiment` (created if missing), tag the model
    version when the model came from the registry, and return the run id. The run is
    marked FAILED if logging breaks off."""
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
    who = f"{report.model_name} v{report.model_version}" if report.model_name else report.model_uri
    run_id = client.create_run(exp_id, run_name=f"eval {who} {report.split}",
                               tags=run_tags(report)).info.run_id  # fmt: skip
    try:
        log_results(client, run_id, report)
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id)
    if report.model_name and report.model_version:
        prefix = f"eval.{report.dataset_version}.{report.split}"
        top1 = report.metrics.compute().get("top1", float("nan"))
        client.set_model_version_tag(report.model_name, report.model_version, f"{prefix}.top1",
                                     f"{top1:.6g}")  # fmt: skip
        client.set_model_version_tag(report.model_name, report.model_version, f"{prefix}.run_id",
                                     run_id)  # fmt: skip
    return run_id


def run_tags(report: EvalReport) -> dict[str, str]:
    return {
        "model_name": report.model_name or "",
        "model_version": report.model_version or "",
        "model_uri": report.model_uri,
        "dataset": report.dataset,
        "dataset_version": report.dataset_version,
        "split": report.split,
    }


def metric_name(class_name: str) -> str:
    """accuracy/<class>, with characters MLflow refuses in metric names replaced by _."""
    return "accuracy/" + re.sub(r"[^\w\-. /]", "_", class_name)


def log_results(client: MlflowClient, run_id: str, report: EvalReport) -> None:
    m = report.metrics
    now = int(time.time() * 1000)
    values = report.scalars()
    per_class = m.per_class_accuracy()
    if len(report.class_names) <= MAX_CLASS_METRICS:
        values.update({metric_name(n): float(a) for n, a in zip(report.class_names, per_class,
                                                                strict=True) if not np.isnan(a)})  # fmt: skip
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in values.items()])
    counts = m.confusion.sum(axis=1)
    client.log_dict(run_id, {
        name: {"accuracy": None if np.isnan(acc) else float(acc), "count": int(n)}
        for name, acc, n in zip(report.class_names, per_class, counts, strict=True)
    }, "per_class_accuracy.json")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "outcomes.parquet"
        report.outcomes.to_parquet(path, index=False)
        client.log_artifact(run_id, str(path))
    title = f"{report.model_name or report.model_uri} on {report.split}"
    log_png(client, run_id, confusion_matrix_png(m.confusion, report.class_names, title),
            "confusion_matrix.png")  # fmt: skip
    log_png(client, run_id, reliability_png(*m.reliability(), title), "reliability.png")
