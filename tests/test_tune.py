"""Hyperparameter search on Ray Tune (pipelines/tune.py), on the real services: a grid of
four learning rates where one learns and the others do not, each trial a Ray Train run
on the two-node cluster, ASHA stopping the weak ones; the search is stopped mid-way and
submitted again under its name. Also the search config's checks, which need no services."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest
from jobs import ROOT, SubmittedJob, sets

from vit_core.config import ConfigError, load_config
from vit_core.tune.config import SearchConfig, dimensions, param_space

CONFIGS = ROOT / "pipelines" / "configs"
GOOD_LR = 0.003
GRID = [GOOD_LR, 1e-7, 3.0, 1e-6]  # AdamW: only 3e-3 learns in 60 steps
# One trial at a time: ASHA's rungs are asynchronous, so with two at once a weak trial that
# reaches a rung before the good one passes it, and the steps spent depend on timing.


def search_config(*overrides: str) -> SearchConfig:
    return load_config(SearchConfig, [CONFIGS / "digits_tiny.yaml", CONFIGS / "digits_tune.yaml"],
                       list(overrides))  # fmt: skip


def test_default_space_is_the_papers_learning_rate_grid():
    dims = dimensions(search_config(), num_classes=10)
    assert [(d.key, d.kind, d.values) for d in dims] == [
        ("optim.lr", "grid", [0.001, 0.003, 0.01, 0.03])
    ]
    assert dimensions(search_config(), num_classes=1000)[0].values == [0.003, 0.01, 0.03, 0.06]


def test_space_domains_become_ray_tune_domains():
    from ray.tune.search.sample import Categorical, Float, Integer

    cfg = search_config(
        "tune.search=random",
        "tune.space={optim.lr: {loguniform: [1.0e-4, 0.1]}, optim.warmup_steps: {int: [0, 9]},"
        " optim.name: {choice: [sgd, adamw]}, data.scale_min: {uniform: [0.5, 1.0]}}",
    )
    space = param_space(dimensions(cfg, 10))
    assert isinstance(space["optim.lr"], Float) and space["optim.lr"].lower == 1e-4
    assert isinstance(space["optim.warmup_steps"], Integer)
    assert space["optim.warmup_steps"].upper == 10  # both ends included
    assert isinstance(space["optim.name"], Categorical)
    assert isinstance(space["data.scale_min"], Float)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["tune.space={optim.lrr: {grid: [0.1]}}"], "tune.space.optim.lrr: unknown config key"),
        (["tune.space={optim.name: {grid: [sgd, lion]}}"], "'lion' is not one of"),
        (["tune.space={optim.lr: {uniform: [0.1, 0.01]}}", "tune.search=random"],
         "low 0.1 must be below high 0.01"),
        (["tune.space={optim.lr: {loguniform: [0.0, 0.1]}}", "tune.search=tpe"],
         "low must be above 0"),
        (["tune.space={optim.lr: {loguniform: [0.001, 0.1]}}"], "a grid search takes listed"),
        (["tune.space={optim.lr: {grid: [0.1, 0.2]}}", "tune.search=tpe"], "give choice"),
        (["tune.space={scaling.num_workers: {grid: [1, 2]}}"], "the search's own"),
        (["tune.space={optim.lr: [0.1, 0.2]}"], "give one of grid, choice"),
        (["train.eval_every_steps=0"], "set train.eval_every_steps"),
        (["tune.grace_period=5"], "must be at least train.eval_every_steps"),
        (["tune.tpe_startup_trials=-1", "tune.search=tpe",
          "tune.space={optim.lr: {loguniform: [0.001, 0.1]}}"], "tune.tpe_startup_trials: expected 0"),
    ],
)  # fmt: skip
def test_a_bad_space_is_one_line_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        dimensions(search_config(*overrides), num_classes=10)


def test_tpe_startup_trials_are_part_of_the_search():
    """A TPE search's random start is described and in the digest a resubmitted search is
    checked against; other searches ignore it."""
    from vit_core.tune.search import describe, space_digest

    tpe = ["tune.search=tpe", "tune.space={optim.lr: {loguniform: [1.0e-3, 0.1]}}"]
    five, ten = (search_config(*tpe, f"tune.tpe_startup_trials={n}") for n in (5, 10))
    assert "5 random trials first" in describe(five, dimensions(five, 10))
    assert space_digest(five, dimensions(five, 10)) != space_digest(ten, dimensions(ten, 10))
    grid = search_config("tune.tpe_startup_trials=5")
    assert space_digest(grid, dimensions(grid, 10)) == space_digest(
        search_config(), dimensions(search_config(), 10))


@pytest.fixture(scope="module")
def search(ray_cluster, mlflow_server, digits_s3):
    """A 4-trial grid search with ASHA, stopped once a trial has finished and submitted
    again under the same name; returns what the test needs to look at."""
    from mlflow.tracking import MlflowClient

    tag = uuid.uuid4().hex[:6]
    name, experiment, model = f"tune-{tag}", f"tune-{tag}", f"tuned-{tag}"
    args = ["--config", "digits_tiny", "--config", "digits_tune", *sets(
        f"run_name={name}", f"storage=s3://vit/runs-{tag}", f"data.location={digits_s3}",
        "model.embed_dim=48", "model.depth=2", "model.num_heads=3", "train.steps=60",
        "train.eval_every_steps=10", "train.log_every_steps=10", "checkpoint.every_steps=10",
        "optim.warmup_steps=5", "scaling.max_failures=0", "tune.grace_period=20",
        "tune.reduction_factor=3", "tune.max_concurrent_trials=1",
        f"tune.space={{optim.lr: {{grid: {GRID}}}}}", f"tracking.experiment={experiment}",
        f"tracking.registered_model={model}", "tracking.alias=candidate",
    )]  # fmt: skip
    client = MlflowClient()
    first = SubmittedJob(ray_cluster, "tune.py", args)
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline:  # stop it once a trial has ended
        exp = client.get_experiment_by_name(experiment)
        ended = exp and client.search_runs(
            [exp.experiment_id], "tags.`vit.tune.state` != ''", max_results=1
        )  # fmt: skip
        if ended:
            break
        assert first.status() in ("PENDING", "RUNNING"), first.logs()[-5000:]
        time.sleep(2)
    stopped_while_running = first.status() == "RUNNING"
    # What MLflow holds at the stop: the ended trials' steps, and the running trials
    # that had a checkpoint (their `epoch` metric leaves with each checkpoint).
    exp = client.get_experiment_by_name(experiment)
    at_stop = client.search_runs([exp.experiment_id], "tags.`mlflow.parentRunId` != ''")
    ended = {r.info.run_id: steps_logged(client, r.info.run_id)
             for r in at_stop if r.data.tags.get("vit.tune.state")}  # fmt: skip
    checkpointed = {r.info.run_id for r in at_stop
                    if not r.data.tags.get("vit.tune.state") and "epoch" in r.data.metrics}  # fmt: skip
    first.stop()
    assert first.wait(120) in ("STOPPED", "SUCCEEDED"), first.logs()[-3000:]
    second = SubmittedJob(ray_cluster, "tune.py", args)
    status = second.wait(600)
    logs = second.logs()
    assert status == "SUCCEEDED", logs[-5000:]
    return {"client": client, "experiment": experiment, "model": model, "name": name,
            "logs": logs, "stopped_while_running": stopped_while_running, "ended": ended,
            "checkpointed": checkpointed}  # fmt: skip


def steps_logged(client, run_id: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, "train/loss"))


def trial_runs(search):
    client = search["client"]
    exp = client.get_experiment_by_name(search["experiment"])
    parent = client.search_runs([exp.experiment_id], f"tags.`vit.run_name` = '{search['name']}'")
    assert len(parent) == 1, "one MLflow run for the search"
    runs = client.search_runs(
        [exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent[0].info.run_id}'"
    )
    return parent[0], runs


def test_search_picks_the_learning_rate_that_learns(search):
    assert search["stopped_while_running"], "the search had finished before it was stopped"
    parent, runs = trial_runs(search)
    assert len(runs) == len(GRID), "one nested run per trial, none twice after the resume"
    finished = [r for r in runs if r.data.tags["vit.tune.state"] != "failed"]
    best = max(finished, key=lambda r: r.data.metrics["val/top1"])
    assert float(best.data.params["optim.lr"]) == GOOD_LR
    others = [r.data.metrics.get("val/top1", 0.0) for r in runs if r is not best]
    assert best.data.metrics["val/top1"] > max(others) + 0.15, "the right rate clearly wins"

    # The version registered from the best trial, with lineage back to the search.
    client = search["client"]
    version = client.get_model_version_by_alias(search["model"], "candidate")
    assert version.tags["tune_run_id"] == parent.info.run_id
    assert version.tags["mlflow_run_id"] == best.info.run_id
    assert len(client.search_model_versions(f"name='{search['model']}'")) == 1


def test_asha_spends_fewer_steps_than_the_grid_and_records_each_trial(search):
    parent, runs = trial_runs(search)
    states = {r.data.tags["vit.tune.state"] for r in runs}
    assert states <= {"completed", "stopped early", "failed"}
    status = {"completed": "FINISHED", "stopped early": "KILLED", "failed": "FAILED"}
    for run in runs:
        assert run.info.status == status[run.data.tags["vit.tune.state"]], run.data.tags
        steps = [m.step for m in search["client"].get_metric_history(run.info.run_id, "train/loss")]
        assert len(steps) == len(set(steps)), "a step logged twice"
    total = parent.data.metrics["tune/total_trial_steps"]
    assert total == sum(int(r.data.tags["vit.tune.steps"]) for r in runs)
    assert total <= 0.75 * len(GRID) * 60, f"ASHA ran {total} of the grid's {len(GRID) * 60} steps"
    assert "stopped early" in states
    artifacts = {a.path for a in search["client"].list_artifacts(parent.info.run_id, "plots")}
    assert {"plots/search.png", "plots/trial_curves.png"} <= artifacts


def test_resumed_search_keeps_finished_trials(search):
    """Stopped mid-way and submitted again: the trials that had ended are not trained
    again, the running ones go on from their checkpoints under the same MLflow runs."""
    assert "restoring its trials" in search["logs"]
    assert search["ended"], "no trial had ended when the search was stopped"
    client = search["client"]
    for run_id, steps in search["ended"].items():
        assert steps_logged(client, run_id) == steps, "a finished trial trained again"
        assert not client.get_metric_history(run_id, "resumed_from_step")
    for run_id in search["checkpointed"]:
        resumed = client.get_metric_history(run_id, "resumed_from_step")
        assert resumed and resumed[-1].value >= 10, "a trial started over instead of resuming"


def test_tune_help_names_the_search_options():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, str(ROOT / "pipelines" / "tune.py"), "--help"],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert "tune.space" in out and "--config" in out
    assert Path(ROOT / "pipelines" / "configs" / "digits_tune.yaml").is_file()
