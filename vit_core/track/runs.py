"""MLflow runs: one per training run, found again by name when the run resumes."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from vit_core.config import dump_yaml, flatten

RUN_NAME_TAG = "vit.run_name"
# MLflow refuses params longer than this; longer values go into the config artifact only.
MAX_PARAM_LENGTH = 6000


def tracking_uri(default_dir: str | Path = ".") -> str:
    """MLFLOW_TRACKING_URI, or a SQLite file beside the job for the embedded default."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{(Path(default_dir) / 'mlflow.db').absolute()}"


def start_or_resume_run(client: MlflowClient, experiment: str, run_name: str) -> tuple[str, bool]:
    """The id of this training run's MLflow run, and whether it already existed.

    A job submitted again under the same name continues its MLflow run rather than
    opening a second one.
    """
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
    found = client.search_runs(
        [exp_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'", max_results=1
    )
    if found:
        run_id = found[0].info.run_id
        if found[0].info.status != "RUNNING":
            client.update_run(run_id, status="RUNNING")
        return run_id, True
    run = client.create_run(exp_id, run_name=run_name, tags={RUN_NAME_TAG: run_name})
    return run.info.run_id, False


def log_config(client: MlflowClient, run_id: str, cfg: Any, extra: dict[str, Any]) -> None:
    """Params: the flattened resolved config plus `extra`; the config itself as YAML."""
    existing = client.get_run(run_id).data.params
    params = {k: v for k, v in {**flatten(cfg), **extra}.items() if k not in existing}
    items = [Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in params.items()]
    for start in range(0, len(items), 100):
        client.log_batch(run_id, params=items[start : start + 100])
    client.log_text(run_id, dump_yaml(cfg), "config/resolved.yaml")


class MetricLogger:
    """Buffers metrics and sends them in batches, so logging costs the loop little."""

    def __init__(self, uri: str, run_id: str, flush_every: int = 50) -> None:
        self.client = MlflowClient(uri)
        self.run_id = run_id
        self.flush_every = flush_every
        self.pending: list[Metric] = []

    def log(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self.pending.extend(Metric(k, float(v), now, step) for k, v in metrics.items())
        if len(self.pending) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        for start in range(0, len(self.pending), 500):
            self.client.log_batch(self.run_id, metrics=self.pending[start : start + 500])
        self.pending.clear()


def metric_history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def set_tracking(uri: str) -> MlflowClient:
    mlflow.set_tracking_uri(uri)
    return MlflowClient(uri)
