"""MLflow runs: one per training run, found again by name when the run resumes."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

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


def start_or_resume_run(
    client: MlflowClient, experiment: str, run_name: str, parent_run_id: str | None = None
) -> tuple[str, bool]:
    """The id of this training run's MLflow run, and whether it already existed.

    A job submitted again under the same name continues its MLflow run rather than
    opening a second one. With `parent_run_id` a new run is nested under that run (a
    search's trial under its search).
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
    tags = {RUN_NAME_TAG: run_name}
    if parent_run_id:
        tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
    run = client.create_run(exp_id, run_name=run_name, tags=tags)
    return run.info.run_id, False


def log_config(client: MlflowClient, run_id: str, cfg: Any, extra: dict[str, Any]) -> None:
    """Params: the flattened resolved config plus `extra`; the config itself as YAML."""
    existing = client.get_run(run_id).data.params
    params = {k: v for k, v in {**flatten(cfg), **extra}.items() if k not in existing}
    items = [Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in params.items()]
    for start in range(0, len(items), 100):
        client.log_batch(run_id, params=items[start : start + 100])
    client.log_text(run_id, dump_yaml(cfg), "config/resolved.yaml")


class MetricWriter:
    """Sends metrics to an MLflow run from a background thread, off the training loop.

    `stage` holds metrics until `commit` releases them: a trainer commits once the
    checkpoint that covers those steps is safe, so a run resumed from that checkpoint
    never logs a step twice. Released metrics go out in step order, in batches; while
    the tracking server is unreachable they wait (one line says so) and are retried, so
    a slow or absent server never stalls a step. If more than `max_pending` wait, the
    oldest are dropped and counted (`dropped`), and `close` reports what never left.

    Before each batch it asks whether a tracking server answers at all (`reachable`): a
    call to a server that is down sits in MLflow's client's own backoff (7 retries, some
    4 minutes) and would see the server back only at its next try, minutes late, after
    `close` may have given up; the writer's own 2 s retries see it at once.
    """

    def __init__(self, uri: str, run_id: str, max_pending: int = 200_000) -> None:
        import collections
        import threading

        self.client = MlflowClient(uri)
        self.run_id = run_id
        self.max_pending = max_pending
        self.dropped = 0
        self._staged: list[Metric] = []
        self._queue: collections.deque[Metric] = collections.deque()
        self._wake = threading.Condition()
        self._closing = False
        self._busy = False
        self._thread = threading.Thread(target=self._send_loop, name="mlflow-metrics", daemon=True)
        self._thread.start()

    def stage(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self._staged.extend(Metric(k, float(v), now, step) for k, v in metrics.items())

    def commit(self) -> None:
        with self._wake:
            self._queue.extend(self._staged)
            overflow = len(self._queue) - self.max_pending
            for _ in range(max(0, overflow)):
                self._queue.popleft()
            self.dropped += max(0, overflow)
            self._wake.notify()
        self._staged = []

    def staged(self) -> list[list]:
        """The staged metrics as [key, value, timestamp_ms, step] rows (plain data, for a
        checkpoint to carry)."""
        return [[m.key, m.value, m.timestamp, m.step] for m in self._staged]

    def replay(self, rows: list[list]) -> int:
        """Send the rows (from `staged`) that the run does not hold yet, e.g. the metrics of
        the segment a resumed checkpoint covers, which a killed process may have committed
        but never sent. Returns how many were missing."""
        missing = []
        for key in sorted({row[0] for row in rows}):
            logged = {m.step for m in self.client.get_metric_history(self.run_id, key)}
            missing += [Metric(*row) for row in rows if row[0] == key and row[3] not in logged]
        missing.sort(key=lambda m: m.step)
        with self._wake:
            self._queue.extend(missing)
            self._wake.notify()
        return len(missing)

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Stage and commit at once (metrics that no checkpoint has to cover)."""
        self.stage(metrics, step)
        self.commit()

    def _send_loop(self) -> None:
        outage_since = None
        while True:
            with self._wake:
                while not self._queue and not self._closing:
                    self._wake.wait()
                if not self._queue:
                    return
                batch = [self._queue[i] for i in range(min(500, len(self._queue)))]
                self._busy = True
            try:
                if not reachable(self.client.tracking_uri):
                    raise ConnectionError("no answer")
                self.client.log_batch(self.run_id, metrics=batch)
            except Exception as err:  # any failure: the server is down, slow or refusing
                if outage_since is None:
                    outage_since = time.monotonic()
                    print(f"MLflow unreachable, metrics wait and are retried ({type(err).__name__})",
                          flush=True)  # fmt: skip
                time.sleep(2.0)
                continue
            finally:
                with self._wake:
                    self._busy = False
            if outage_since is not None:
                print(f"MLflow reachable again after {time.monotonic() - outage_since:.0f} s",
                      flush=True)  # fmt: skip
                outage_since = None
            with self._wake:
                for _ in batch:
                    self._queue.popleft()
                self._wake.notify_all()

    def flush(self, timeout: float = 60.0) -> bool:
        """Commit and wait until every released metric has left; False on timeout."""
        self.commit()
        deadline = time.monotonic() + timeout
        with self._wake:
            while self._queue or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._wake.wait(min(left, 1.0))
        return True

    def close(self, timeout: float = 120.0) -> int:
        """Flush, stop the sender, and return how many metrics never reached MLflow."""
        self.flush(timeout)
        with self._wake:
            self._closing = True
            unsent = len(self._queue) + self.dropped
            self._queue.clear()
            self._wake.notify_all()
        self._thread.join(timeout=30)
        if unsent:
            print(f"warning: {unsent} metrics never reached MLflow run {self.run_id}", flush=True)
        return unsent


def reachable(uri: str, timeout: float = 5.0) -> bool:
    """Whether the tracking server at `uri` answers at all (any HTTP status, at its
    `/health` endpoint), in one request of at most `timeout` seconds without retries.
    True for a tracking URI that is not an HTTP server (a file or database)."""
    import urllib.error
    import urllib.request

    if not uri.startswith(("http://", "https://")):
        return True
    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout).close()
    except urllib.error.HTTPError:  # it answered, if not with 200
        return True
    except OSError:  # refused, reset or timed out
        return False
    return True


def metric_history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def set_tracking(uri: str) -> MlflowClient:
    mlflow.set_tracking_uri(uri)
    return MlflowClient(uri)


def log_png(client: MlflowClient, run_id: str, png: bytes, name: str) -> None:
    """Log PNG bytes as plots/<name> (through a file with an absolute path: a job's
    working directory may already be cleaned up when the job ends)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(png)
        client.log_artifact(run_id, str(path), "plots")
