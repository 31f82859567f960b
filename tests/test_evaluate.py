"""Evaluation and batch inference on Ray Data against a small model trained here in plain
torch: metrics equal those of a loop over the same images read straight from the tar
files; evaluate.py logs its run and tags the registered version; predict.py writes one
Parquet row per input, bad files included; bad input stops before any work."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from vit_core import create_model, storage
from vit_core.data import make_digits_shards, open_dataset
from vit_core.data.preprocessing import Preprocessing
from vit_core.eval.batch import evaluate_model, predict
from vit_core.eval.metrics import ClassificationMetrics
from vit_core.model import save_model

ROOT = Path(__file__).resolve().parents[1]
SERVICE_VARIABLES = ("AWS_", "MLFLOW_", "RAY_ADDRESS", "RAY_API_SERVER", "RAY_AUTH")
PRE = Preprocessing(input_size=32, class_names=[str(d) for d in range(10)])


def read_split(location: str, split: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(keys, uint8 images [N, 3, 32, 32], labels [N]) of a local split, read with tarfile
    and PIL: no project code between the files and the pixels. The digits are stored at
    32 px, so the evaluation transform (crop_pct 1) leaves them as they are."""
    keys, images, labels = [], [], []
    for shard in sorted(Path(location).glob(f"{split}-*.tar")):
        members: dict[str, dict[str, bytes]] = {}
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                members.setdefault(key, {})[ext] = tar.extractfile(m).read()
        for key, parts in members.items():
            keys.append(key)
            pixels = np.asarray(Image.open(io.BytesIO(parts["png"])).convert("RGB"))
            images.append(pixels.transpose(2, 0, 1))
            labels.append(int(parts["cls"]))
    return keys, np.stack(images), np.asarray(labels)


def logits_of(model, images: np.ndarray) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.from_numpy(PRE.normalize(images)))


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> str:
    location = str(tmp_path_factory.mktemp("data") / "digits" / "v1")
    make_digits_shards(location, image_size=32, progress=False)
    return location


@pytest.fixture(scope="module")
def model_dir(digits, tmp_path_factory) -> Path:
    """A one-block ViT with random features whose linear head is trained for a few
    seconds on the training split (about 75% validation top-1; chance is 10%), saved in
    the project's model format with its preprocessing contract."""
    torch.manual_seed(0)
    _, images, labels = read_split(digits, "train")
    model = create_model("vit_ti16", num_classes=10, img_size=32, patch_size=8, embed_dim=64,
                         depth=1, num_heads=2, pool="avg").eval()  # fmt: skip
    with torch.no_grad():
        tokens = model.forward_features(torch.from_numpy(PRE.normalize(images)))
        features = model.forward_head(tokens, pre_logits=True)
    optimizer = torch.optim.Adam(model.head.parameters(), lr=0.05)
    for _ in range(200):
        loss = torch.nn.functional.cross_entropy(model.head(features), torch.from_numpy(labels))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    # Named "model": registry.download_weights looks for artifacts/model, and MLflow
    # stores a logged folder under its own name.
    folder = tmp_path_factory.mktemp("digits-vit") / "model"
    save_model(model, folder)
    PRE.save(folder)
    return folder


@pytest.fixture(scope="module")
def reference(digits, model_dir) -> dict:
    """Metrics and per-image predictions of the model over the validation split, in a
    plain loop in this process."""
    keys, images, labels = read_split(digits, "val")
    model = create_model(checkpoint=model_dir).eval()
    logits = logits_of(model, images)
    metrics = ClassificationMetrics(10)
    metrics.update(logits, torch.from_numpy(labels))
    predicted = logits.argmax(-1).numpy()
    return {"metrics": metrics, "predicted": dict(zip(keys, predicted.tolist(), strict=True)),
            "labels": dict(zip(keys, labels.tolist(), strict=True))}  # fmt: skip


def test_evaluate_model_matches_a_plain_loop(digits, model_dir, reference, ray_client):
    report = evaluate_model(str(model_dir), digits, "val")
    expected = reference["metrics"].compute()
    found = report.metrics.compute()
    # Non-trivial: chance is 0.1, so a broken data path or model cannot pass by luck.
    assert expected["top1"] > 0.3, expected
    assert found["count"] == expected["count"] == 359
    assert found["top1"] == expected["top1"]
    np.testing.assert_array_equal(report.metrics.confusion, reference["metrics"].confusion)
    assert found["loss"] == pytest.approx(expected["loss"], rel=1e-4)
    assert found["ece"] == pytest.approx(expected["ece"], abs=1e-4)
    assert report.bad_samples == 0
    assert report.model_version is None and report.model_uri == str(model_dir)
    assert report.dataset_version == open_dataset(digits).version
    outcomes = report.outcomes.set_index("key")
    assert list(report.outcomes.columns) == ["key", "label", "predicted", "correct", "probability"]
    assert outcomes["predicted"].to_dict() == reference["predicted"]
    assert (outcomes["correct"] == (outcomes["predicted"] == outcomes["label"])).all()


def test_predict_folder_writes_a_row_per_file_with_errors_marked(
    digits, model_dir, reference, ray_client, tmp_path
):
    keys, images, labels = read_split(digits, "val")
    folder = tmp_path / "images"
    for i in range(5):
        target = folder / ("nested" if i % 2 else "") / f"{keys[i]}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i].transpose(1, 2, 0)).save(target)
    (folder / "broken.png").write_bytes(b"this is not an image")
    (folder / "notes.txt").write_text("not an image file name: not listed")

    summary = predict(str(model_dir), str(folder), str(tmp_path / "out"))
    rows = pq.read_table(tmp_path / "out").to_pandas()
    assert summary.rows == len(rows) == 6 and summary.errors == 1
    broken = rows[rows["key"].str.endswith("broken.png")].iloc[0]
    assert broken["error"] and broken["class_index"] == -1 and pd.isna(broken["class_name"])
    good = rows[rows["error"].isna()]
    predicted = {
        Path(k).stem: int(c) for k, c in zip(good["key"], good["class_index"], strict=True)
    }
    assert predicted == {k: reference["predicted"][k] for k in keys[:5]}
    assert all(len(top) == 5 and top[0] == name
               for top, name in zip(good["top_k_classes"], good["class_name"], strict=True))  # fmt: skip
    assert np.allclose([p[0] for p in good["top_k_probabilities"]], good["probability"])

    manifest = tmp_path / "list.csv"
    manifest.write_text("path\n" + "\n".join(f"images/{keys[0]}.png" for _ in range(2)) + "\n")
    summary = predict(str(model_dir), str(manifest), str(tmp_path / "out2"))
    assert (summary.rows, summary.errors) == (2, 0)


def cli(script: str, *args: str, cwd: Path, services: str) -> subprocess.CompletedProcess:
    """A pipeline script as a user runs it: with the session's MLflow, S3 and Ray settings
    (services "all": it joins the session's cluster, as after `source .stack/env`), with
    MLflow and S3 only ("storage": it would start its own local Ray), or with none."""
    drop = {"all": (), "storage": ("RAY_ADDRESS",), "none": SERVICE_VARIABLES}[services]
    env = {k: v for k, v in os.environ.items() if not (drop and k.startswith(drop))}
    return subprocess.run(
        [sys.executable, str(ROOT / "pipelines" / script), *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


@pytest.fixture(scope="module")
def registered(mlflow_server, model_dir) -> str:
    """The model registered on the session's MLflow server with the alias `candidate`."""
    from mlflow.tracking import MlflowClient

    from vit_core.track.registry import register_model
    from vit_core.track.runs import set_tracking

    client = set_tracking(mlflow_server.uri)
    experiment = client.create_experiment(f"eval-train-{uuid.uuid4().hex[:8]}")
    run_id = client.create_run(experiment).info.run_id
    name = f"eval-digits-{uuid.uuid4().hex[:8]}"
    register_model(MlflowClient(mlflow_server.uri), run_id, model_dir, name, {}, alias="candidate")
    return name


def test_evaluate_cli_logs_a_run_and_tags_the_version(
    registered, mlflow_server, ray_cluster, digits, reference, tmp_path
):
    from mlflow.tracking import MlflowClient

    data = f"s3://vit/datasets/eval-{uuid.uuid4().hex[:8]}/v1"
    storage.upload_dir(digits, data)
    proc = cli("evaluate.py", "--model", f"models:/{registered}@candidate", "--data", data,
               "--split", "val", cwd=tmp_path, services="all")  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "local Ray" not in proc.stdout  # it ran on the session's cluster
    expected = reference["metrics"].compute()
    assert f"top1 {expected['top1']:.4f}" in proc.stdout, proc.stdout

    client = MlflowClient(mlflow_server.uri)
    experiment = client.get_experiment_by_name("vit-evaluate")
    (run,) = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.model_name = '{registered}'"
    )
    tags, metrics = run.data.tags, run.data.metrics
    version = open_dataset(data).version
    assert tags["model_version"] == "1" and tags["model_uri"] == f"models:/{registered}/1"
    assert (tags["dataset"], tags["dataset_version"], tags["split"]) == (data, version, "val")
    assert metrics["top1"] == pytest.approx(expected["top1"])
    assert metrics["count"] == 359 and metrics["bad_samples"] == 0
    assert {"top5", "loss", "ece", "accuracy/0", "accuracy/9"} <= set(metrics)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert artifacts == {"plots/confusion_matrix.png", "plots/reliability.png"}
    per_class = json.loads(
        Path(
            client.download_artifacts(run.info.run_id, "per_class_accuracy.json", str(tmp_path))
        ).read_text()
    )
    assert set(per_class) == {str(d) for d in range(10)}
    outcomes = pd.read_parquet(client.download_artifacts(run.info.run_id, "outcomes.parquet",
                                                         str(tmp_path)))  # fmt: skip
    assert len(outcomes) == 359
    mv = client.get_model_version(registered, "1")
    assert mv.tags[f"eval.{version}.val.top1"] == f"{expected['top1']:.6g}"
    assert mv.tags[f"eval.{version}.val.run_id"] == run.info.run_id


def test_predict_cli_on_a_shard_split_to_s3(
    digits, model_dir, reference, ray_cluster, s3_prefix, tmp_path
):
    out = f"{s3_prefix}/predictions"
    proc = cli("predict.py", "--model", str(model_dir), "--data", digits, "--split", "val",
               "--out", out, cwd=tmp_path, services="all")  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "local Ray" not in proc.stdout  # it ran on the session's cluster
    assert "359 predictions (0 errors)" in proc.stdout
    fs, path = storage.pyarrow_filesystem(out)
    rows = pq.read_table(path, filesystem=fs).to_pandas()
    assert len(rows) == 359 and rows["key"].is_unique and rows["error"].isna().all()
    assert dict(zip(rows["key"], rows["class_index"], strict=True)) == reference["predicted"]
    assert dict(zip(rows["key"], rows["label"], strict=True)) == reference["labels"]
    again = cli("predict.py", "--model", str(model_dir), "--data", digits, "--split", "val",
                "--out", out, cwd=tmp_path, services="all")  # fmt: skip
    assert again.returncode == 2 and "already holds files" in again.stderr


@pytest.mark.parametrize(
    "script, args, names, services",
    [
        ("evaluate.py", ["--data", "{tmp}/nowhere"], "nowhere", False),
        ("evaluate.py", ["--model", "{tmp}/no-model"], "no-model", False),
        ("evaluate.py", ["--model", "{other}"], "predicts classes", False),
        ("predict.py", ["--data", "{tmp}/nowhere", "--out", "{tmp}/o"], "nowhere", False),
        ("predict.py", ["--model", "models:/no-such-model@candidate", "--out", "{tmp}/o"],
         "no-such-model", True),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_and_exit_2(
    script, args, names, services, digits, model_dir, tmp_path, request
):
    if services:
        request.getfixturevalue("mlflow_server")
    other = tmp_path / "letters-model"
    shutil.copytree(model_dir, other)
    Preprocessing(input_size=32, class_names=list("abcdefghij")).save(other)
    given = {"--model": str(model_dir), "--data": digits}
    for flag, value in zip(args[::2], args[1::2], strict=True):
        given[flag] = value.format(tmp=tmp_path, other=other)
    argv = [part for item in given.items() for part in item]
    proc = cli(script, *argv, cwd=tmp_path, services="storage" if services else "none")
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert names in proc.stderr
    assert "local Ray" not in proc.stdout  # stopped before any work
    assert not (tmp_path / "o").exists()
