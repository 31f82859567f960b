"""The whole pipeline on the embedded default, through Dagster, with no servers to run:
the full pipeline (pipelines/workflows) executes in this process, recorded in the Dagster
instance at DAGSTER_HOME (default ./.dagster, SQLite), each step's job a local process
(`python pipelines/<job>.py ...`, starting its own local Ray; see pipelines/workflows/launch.py):

1. make_shards: scikit-learn's digits as PNG shards in data/digits/v1 (kept if there),
2. pretrain a small ViT with Ray Train; registered as vit-digits-pretrain@backbone,
3. fine-tune that exact version with the paper's SGD recipe; registered as
   vit-digits@candidate,
4. evaluate it on the held-out split with Ray Data batch inference (logged to MLflow),
5. promote: candidate against champion on the held-out split (McNemar's test); `champion`
   moves if the candidate is better,
then, in this process: load models:/vit-digits@champion as MLflow loads it for serving,
classify the held-out digits sent as PNG bytes, and print a summary: accuracies, versions
and aliases, the Dagster run and how to open the UIs over what it recorded.

The training runs keep their presets' names (digits-tiny, digits-finetune), so a second
demo finds them finished and trains nothing.

    python pipelines/demo.py          # what `make demo` runs
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python pipelines/x.py` puts only pipelines/ on the path
    sys.path.insert(0, str(ROOT))

DATA, SPLIT = "data/digits/v1", "val"
BACKBONE, CLASSIFIER = "vit-digits-pretrain", "vit-digits"


def held_out_pngs(location: str, split: str) -> tuple[list[bytes], list[str]]:
    """The split's images exactly as stored (PNG bytes) and their class names."""
    from vit_core.data import read_index
    from vit_core.data.index import open_stream
    from vit_core.data.shards import iter_samples

    index = read_index(location)
    images, labels = [], []
    for shard in index.shards(split):
        with open_stream(index.shard_location(shard)) as stream:
            for sample in iter_samples(stream.read):
                if sample.error is None:
                    images.append(sample.image)
                    labels.append(index.class_names[sample.label])
    return images, labels


def classify_with_champion(name: str) -> float:
    """Top-1 of models:/NAME@champion on the held-out digits sent as PNG bytes."""
    import mlflow
    import pandas as pd

    from vit_core.track.runs import tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    images, labels = held_out_pngs(DATA, SPLIT)
    predictions = model.predict(pd.DataFrame({"image": images}))
    return float((predictions["class_name"] == pd.Series(labels)).mean())


def aliases(name: str) -> str:
    from mlflow.tracking import MlflowClient

    from vit_core.track.runs import tracking_uri

    model = MlflowClient(tracking_uri()).get_registered_model(name)
    return ", ".join(f"{alias}=v{version}" for alias, version in sorted(model.aliases.items()))


def run_config() -> dict:
    """The full pipeline's run config for the embedded default: the jobs' default presets
    under their own run names (so a finished run is found again, not retrained); Dagster's
    console shows its INFO lines, not every event (the UI keeps them all)."""
    from pipelines.workflows.steps import TrainStep, resolve_train_config

    def keep_name(job: str) -> dict:
        return {"config": {"overrides": [f"run_name={resolve_train_config(TrainStep(), job).run_name}"]}}

    return {"loggers": {"console": {"config": {"log_level": "INFO"}}}, "ops": {
        "make_shards": {"config": {"source": "digits", "out": DATA}},
        "pretrain": keep_name("pretrain"),
        "finetune": keep_name("finetune"),
        "evaluate": {"config": {"split": SPLIT}},
        "promote": {"config": {"split": SPLIT}},
    }}  # fmt: skip


@contextlib.contextmanager
def local_ray():
    """One local Ray for the run's jobs to join (launch.LOCAL_RAY), as when the demo ran
    them in one process; nothing when a cluster is named (RAY_ADDRESS: steps are Ray jobs)."""
    import os

    import ray

    from pipelines.workflows import launch

    if launch.on_ray_cluster():
        yield
        return
    cpus = 2 * (os.cpu_count() or 1)  # as vit_core.cluster starts a local Ray
    # With its dashboard: Ray Train's placement-group cleaner asks the state API, which
    # it serves, whether a run's controller is alive (without it, a warning a second).
    ray.init(address="local", num_cpus=cpus, log_to_driver=False, logging_level="WARNING")
    os.environ[launch.LOCAL_RAY] = ray.get_runtime_context().gcs_address
    print(f"started a local Ray with {cpus} logical CPUs for the pipeline's jobs", flush=True)
    try:
        yield
    finally:
        del os.environ[launch.LOCAL_RAY]
        ray.shutdown()


def run_pipeline() -> tuple[str, bool, dict]:
    """Execute full_pipeline here; (Dagster run id, success, each step's output metadata)."""
    from dagster import execute_job

    from pipelines.workflows.cli import _job, instance

    with instance() as inst, local_ray():
        result = execute_job(_job("full_pipeline"), instance=inst, run_config=run_config(),
                             tags={"vit/started_by": "demo"})  # fmt: skip
        outputs = {}
        for event in result.all_events:
            if event.event_type_value == "STEP_OUTPUT":
                outputs[event.step_key] = {k: v.value for k, v in
                                           event.step_output_data.metadata.items()}  # fmt: skip
        return result.run_id, result.success, outputs


def main() -> int:
    import os

    start = time.monotonic()
    run_id, ok, outputs = run_pipeline()
    home = os.environ["DAGSTER_HOME"]
    where = (f"Dagster run {run_id} in {home}: `python pipelines/workflows/cli.py status {run_id}`; "
             f"UI: `make pipelines-up`, then http://127.0.0.1:3000/runs/{run_id}")  # fmt: skip
    if not ok:
        print(f"\nthe pipeline failed. {where}", file=sys.stderr)
        return 1
    accuracy = classify_with_champion(CLASSIFIER)
    promoted = outputs.get("promote", {})
    print(
        "\n== demo summary ==\n"
        f"{CLASSIFIER}@champion on {SPLIT} (held-out) digits sent as PNG: {accuracy:.1%} top-1\n"
        f"evaluate step ({outputs.get('finetune', {}).get('model_uri')}): "
        f"{outputs.get('evaluate', {}).get('eval_top1', float('nan')):.1%} top-1; promotion: "
        f"{'promoted' if promoted.get('promoted') else 'kept the champion'} ({promoted.get('reason')})\n"
        f"{BACKBONE}: {aliases(BACKBONE)}\n"
        f"{CLASSIFIER}: {aliases(CLASSIFIER)}\n"
        f"took {time.monotonic() - start:.0f} s\n"
        f"{where}\n"
        "MLflow (runs, metrics, pictures, the registry): mlflow ui --backend-store-uri sqlite:///mlflow.db\n"
        f"the model: models:/{CLASSIFIER}@champion (python pipelines/predict.py --help)"
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
