"""Evaluation and batch inference with Ray Data: the model is loaded once per actor, images
are decoded by Ray Data tasks, and a pool of actors runs the model over batches.

    report = evaluate_model("models:/vit-digits@candidate", "s3://vit/datasets/digits/v1", "val")
    report.metrics.compute()      # {"top1", "top5", "loss", "ece", "count"} (ClassificationMetrics)
    report.outcomes               # one row per image: key, label, predicted, correct, probability

    summary = predict("runs/x/best_model", "path/to/images", "s3://vit/predictions/x")

The model is named by `models:/NAME@ALIAS` or `models:/NAME/VERSION` (the registry; the
weights' SHA-256 is checked against the one recorded at registration), or by a model
folder or training checkpoint, local or s3://. An alias is read once, on the driver, and
the actors load the version it named then, so one job sees one version.

Images are prepared by the model's preprocessing contract (preprocessing.json): a shard
split goes through `vit_core.data.build_dataset` with a DataConfig made from it, the same
read, decode and centre crop as validation during training; images from a folder or a
manifest are decoded with the same evaluation TransformSpec. A bad image never stops the
job: evaluation leaves it out and counts it, prediction writes a row with `error` set.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from vit_core import storage
from vit_core.config import ConfigError
from vit_core.data import DataConfig, DatasetError, DatasetIndex, build_dataset, open_dataset
from vit_core.data.preprocessing import PREPROCESSING_FILE, Preprocessing
from vit_core.data.sources import IMAGE_SUFFIXES, MANIFEST_SUFFIXES, PATH_COLUMNS
from vit_core.eval.metrics import ClassificationMetrics
from vit_core.model import CheckpointError

if TYPE_CHECKING:
    import pandas as pd

TOP_K = 5
IMAGES_PER_BLOCK = 256  # rows per decode task for folder and manifest inputs


@dataclass(frozen=True)
class ModelRef:
    """A model pinned on the driver: `uri` is what every actor loads (an alias replaced by
    the version it names now; a local folder made absolute)."""

    uri: str
    name: str | None = None  # registered model name, for models:/ URIs
    version: str | None = None
    requested: str = ""  # what the user gave


def pin_model(model: str) -> ModelRef:
    """models:/NAME@ALIAS -> models:/NAME/VERSION through the registry (MLflow's current
    tracking URI); a local path made absolute; an s3:// URI as it is. Raises
    RegistryError for a models:/ URI that names nothing."""
    if model.startswith("models:/"):
        from vit_core.track.registry import pin

        pinned, mv = pin(model)
        return ModelRef(pinned, mv.name, str(mv.version), model)
    if storage.is_remote(model):
        return ModelRef(model, requested=model)
    return ModelRef(str(Path(model).absolute()), requested=model)


def model_folder(ref: ModelRef) -> Path:
    """The local model folder (model.safetensors, config.json, preprocessing.json) of a
    pinned model: downloaded from the registry (SHA-256 checked) or object store, or the
    model/ folder of a training checkpoint. Raises RegistryError, StorageError,
    CheckpointError."""
    from vit_core.train.model_setup import fetch_weights

    folder = fetch_weights(ref.uri)
    if not (folder / PREPROCESSING_FILE).is_file():
        raise CheckpointError(
            f"model {ref.requested}: no {PREPROCESSING_FILE} in {folder} (a model folder "
            "needs its preprocessing contract: input size, crop, mean, std, class names)"
        )
    return folder


def load_model(model: str):
    """(VisionTransformer in eval mode on the CPU, its Preprocessing, a description dict
    with model_uri, model_name, model_version, requested) for a models:/ URI, a model
    folder or a training checkpoint, local or s3://. Raises RegistryError, StorageError,
    CheckpointError."""
    from vit_core.model import create_model

    ref = pin_model(model)
    folder = model_folder(ref)
    try:
        network = create_model(checkpoint=folder).eval()
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"model {model}: {err}") from None
    description = {
        "model_uri": ref.uri,
        "model_name": ref.name,
        "model_version": ref.version,
        "requested": ref.requested,
    }
    return network, Preprocessing.load(folder), description


def data_config(pre: Preprocessing, location: str) -> DataConfig:
    """The DataConfig whose evaluation transform is the model's preprocessing contract."""
    return DataConfig(
        location=location,
        image_size=pre.input_size,
        mean=list(pre.mean),
        std=list(pre.std),
        eval_crop_pct=pre.crop_pct,
        interpolation=pre.interpolation,
        normalize_on="loader",
    )


class Predictor:
    """Ray Data callable class: the model is loaded once per actor, in __init__.

    In (numpy batch): image uint8 [B, 3, S, S], valid bool [B], and any other columns
    (key, label, path, error, ...), passed through. Out, besides those: predicted int64
    [B] (-1 for invalid rows), probability float32 [B] (of the predicted class; NaN for
    invalid rows), correct bool [B] (valid and predicted == label, when a label column
    is present), logits float32 [B, C] (NaN rows for invalid ones), top_k_index int64
    [B, k] and top_k_probability float32 [B, k] (k = min(top_k, C)).
    """

    def __init__(self, model_uri: str, tracking_uri: str | None = None, top_k: int = TOP_K):
        import torch

        from vit_core.track.runs import set_tracking

        if tracking_uri:
            set_tracking(tracking_uri)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model, self.pre, _ = load_model(model_uri)
        self.model = model.to(self.device)
        self.num_classes = len(self.pre.class_names)
        self.k = min(top_k, self.num_classes)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from vit_core.train.model_setup import autocast

        valid = np.asarray(batch["valid"], dtype=bool)
        count = len(valid)
        logits = np.full((count, self.num_classes), np.nan, dtype=np.float32)
        if valid.any():
            x = torch.from_numpy(self.pre.normalize(batch["image"][valid])).to(self.device)
            with torch.inference_mode(), autocast(self.device, "auto"):
                logits[valid] = self.model(x).float().cpu().numpy()
        probs = torch.from_numpy(logits).softmax(-1)
        top_p, top_i = probs.nan_to_num(-1.0).topk(self.k, dim=-1)
        predicted = np.where(valid, top_i[:, 0].numpy(), -1)
        out = {k: v for k, v in batch.items() if k != "image"}
        out.update(
            predicted=predicted.astype(np.int64),
            probability=np.where(valid, top_p[:, 0].numpy(), np.nan).astype(np.float32),
            logits=logits,
            top_k_index=top_i.numpy().astype(np.int64),
            top_k_probability=top_p.numpy().astype(np.float32),
        )
        if "label" in batch:
            out["correct"] = valid & (predicted == np.asarray(batch["label"]))
        return out


@dataclass
class Compute:
    """How the model runs: `actors` model replicas, each with `cpus_per_actor` CPUs and
    `gpus_per_actor` GPUs, fed batches of `batch_size` images. With CPU-only actors, Ray
    Data fuses the image decode into the actors (same resources: each actor decodes its
    own blocks, and no decoded image crosses the object store); with GPUs the decode runs
    in CPU tasks of its own, feeding the GPU actors."""

    batch_size: int = 256
    actors: int = 1
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0

    @staticmethod
    def add_arguments(parser) -> None:
        """--batch-size, --actors, --cpus-per-actor, --gpus-per-actor on an argparse parser."""
        parser.add_argument("--batch-size", type=int, default=256, help="images per model call")
        parser.add_argument("--actors", type=int, default=1, help="model replicas (Ray actors)")
        parser.add_argument("--cpus-per-actor", type=float, default=1.0)
        parser.add_argument("--gpus-per-actor", type=float, default=0.0)

    @classmethod
    def from_args(cls, args) -> Compute:
        return cls(args.batch_size, args.actors, args.cpus_per_actor, args.gpus_per_actor)

    def map_args(self) -> dict:
        """map_batches arguments for the Predictor. Raises ConfigError."""
        import ray.data

        if self.batch_size < 1 or self.actors < 1:
            raise ConfigError(
                f"batch size {self.batch_size} and actors {self.actors} must be at least 1"
            )
        return {
            "batch_size": self.batch_size,
            "batch_format": "numpy",
            # A fixed pool: each actor loads the model once and keeps it.
            "compute": ray.data.ActorPoolStrategy(size=self.actors),
            "num_cpus": self.cpus_per_actor,
            "num_gpus": self.gpus_per_actor,
        }


def run_model(ds, ref: ModelRef, compute: Compute, top_k: int = TOP_K):
    """`ds` (rows with image uint8 [3, S, S] and valid) mapped by a pool of Predictor
    actors, each loading the pinned model `ref` once."""
    from vit_core.track.runs import tracking_uri

    return ds.map_batches(
        Predictor,
        fn_constructor_kwargs={
            "model_uri": ref.uri,
            "tracking_uri": tracking_uri() if ref.name else None,
            "top_k": top_k,
        },
        **compute.map_args(),
    )


@dataclass
class EvalReport:
    """One model scored on one split of a shard set.

    metrics: sums over every good image (ClassificationMetrics: top-1/top-5, loss, ECE,
    confusion matrix); outcomes: one row per good image, columns key (str, the sample's
    key in the shards, unique in the split), label (int), predicted (int), correct (bool),
    probability (float, of the predicted class): two reports on the same split pair up by
    key. Bad images (undecodable, bad label, lost to a damaged shard) are left out of both
    and counted in bad_samples. model_version is None for a model not from the registry.
    """

    metrics: ClassificationMetrics
    outcomes: pd.DataFrame
    model_name: str | None
    model_version: str | None
    model_uri: str
    dataset: str = ""
    dataset_version: str = ""
    split: str = ""
    class_names: list[str] = field(default_factory=list)
    bad_samples: int = 0

    def scalars(self) -> dict[str, float]:
        """top1, top5, ece (fractions), loss (mean cross-entropy, nats), count, bad_samples."""
        return {**self.metrics.compute(), "bad_samples": float(self.bad_samples)}


@dataclass
class EvalPlan:
    """What the driver checked before any work: the pinned model, its preprocessing, the
    dataset's index."""

    ref: ModelRef
    pre: Preprocessing
    index: DatasetIndex
    split: str


def plan_evaluation(model: str, location: str, split: str) -> EvalPlan:
    """Pin the model, read its preprocessing contract, open the dataset and check that
    the split exists and that the model's classes are the dataset's, in order. Raises
    RegistryError, StorageError, CheckpointError, DatasetError, before any Ray work."""
    ref = pin_model(model)
    pre = Preprocessing.load(model_folder(ref))
    return EvalPlan(ref, pre, open_split(pre, model, location, split), split)


def open_split(pre: Preprocessing, model: str, location: str, split: str) -> DatasetIndex:
    """The DatasetIndex at `location`, checked to have shards for `split` and the model's
    class names in the model's order. Raises DatasetError."""
    index = open_dataset(location)
    if not index.shards(split):
        raise DatasetError(f"dataset {location} has no shards for split {split!r}")
    class_names = index.class_names
    if list(pre.class_names) != list(class_names):
        raise DatasetError(
            f"model {model} predicts classes {_short(pre.class_names)} but dataset {location} "
            f"has {_short(class_names)}: a model is scored only on the classes it was trained on"
        )
    return index


def _short(names: list[str], shown: int = 6) -> str:
    head = ", ".join(names[:shown])
    return f"[{head}{', ...' if len(names) > shown else ''}] ({len(names)})"


def evaluate_model(
    model: str, location: str, split: str = "val", compute: Compute | None = None
) -> EvalReport:
    """Score `model` on one split of the shard set at `location`: every image once, in
    Ray Data (decode tasks, then a pool of model actors), metrics summed on the driver.
    Joins the Ray cluster (vit_core.cluster.connect) only after plan_evaluation's checks.
    Raises RegistryError, StorageError, CheckpointError, DatasetError, ConfigError."""
    plan = plan_evaluation(model, location, split)
    return run_evaluation(plan, compute or Compute())


def run_evaluation(plan: EvalPlan, compute: Compute) -> EvalReport:
    """The Ray Data part of evaluate_model, for a checked plan."""
    import pandas as pd
    import torch

    from vit_core import cluster

    compute.map_args()  # a bad setting fails before Ray starts
    cluster.connect()
    cfg = data_config(plan.pre, plan.index.location)
    ds = build_dataset(cfg, plan.split, train=False, with_keys=True, index=plan.index)
    ds = run_model(ds, plan.ref, compute)
    metrics = ClassificationMetrics(len(plan.pre.class_names))
    parts, bad = [], 0
    columns = ["key", "label", "predicted", "correct", "probability"]
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        good = batch["valid"]
        bad += int((~good).sum())
        metrics.update(
            torch.from_numpy(batch["logits"][good]), torch.from_numpy(batch["label"][good])
        )
        parts.append(pd.DataFrame({c: batch[c][good] for c in columns}))
    outcomes = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=columns)
    outcomes["key"] = outcomes["key"].astype(str)
    return EvalReport(
        metrics=metrics,
        outcomes=outcomes,
        model_name=plan.ref.name,
        model_version=plan.ref.version,
        model_uri=plan.ref.uri,
        dataset=plan.index.location,
        dataset_version=plan.index.version,
        split=plan.split,
        class_names=list(plan.pre.class_names),
        bad_samples=bad,
    )


def image_inputs(spec: str) -> list[str]:
    """The images a folder (any depth; hidden files skipped) or a manifest (.csv with a
    path column, or .jsonl objects with one: path, uri, image or file; relative paths
    are read from the manifest's folder) names, local or s3://. Raises DatasetError."""
    if any(spec.lower().endswith(s) for s in MANIFEST_SUFFIXES):
        return _manifest_paths(spec)
    if not storage.is_remote(spec) and not Path(spec).is_dir():
        raise DatasetError(f"image folder not found: {spec}")
    prefix = spec.rstrip("/") + "/"
    found = [
        f for f in storage.list_files(spec)
        if Path(f).suffix.lower() in IMAGE_SUFFIXES
        and not any(p.startswith(".") for p in f[len(prefix):].split("/"))
    ]  # fmt: skip
    if not found:
        raise DatasetError(f"no images found in {spec}")
    return sorted(found)


def _manifest_paths(manifest: str) -> list[str]:
    try:
        text = storage.read_bytes(manifest).decode("utf-8-sig")
    except storage.StorageError as err:
        raise DatasetError(f"cannot read the manifest: {err}") from None
    except UnicodeDecodeError as err:
        raise DatasetError(f"{manifest}: not UTF-8 text (byte {err.start})") from None
    if manifest.lower().endswith(".csv"):
        records = [(n + 2, row) for n, row in enumerate(csv.DictReader(io.StringIO(text)))]
    else:
        records = []
        for n, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    records.append((n, json.loads(line)))
                except ValueError as err:
                    raise DatasetError(f"{manifest} line {n}: not valid JSON ({err})") from None
    paths = []
    for line, record in records:
        path = next(
            (record[c] for c in PATH_COLUMNS if isinstance(record, dict) and record.get(c)), None
        )
        if not isinstance(path, str):
            raise DatasetError(f"{manifest} line {line}: needs a path ({'/'.join(PATH_COLUMNS)})")
        paths.append(_beside(path.strip(), manifest))
    if not paths:
        raise DatasetError(f"{manifest}: the manifest lists no images")
    return paths


def _beside(path: str, manifest: str) -> str:
    """A manifest's relative path, read from the manifest's own folder."""
    if storage.is_remote(path) or Path(path).is_absolute():
        return path
    if storage.is_remote(manifest):
        return storage.join(manifest.rsplit("/", 1)[0], path)
    return str(Path(manifest).absolute().parent / path)


def decode_files(batch: dict[str, np.ndarray], spec) -> dict[str, np.ndarray]:
    """Ray Data function: rows with `path` in, rows with image uint8 [B, 3, S, S] (the
    evaluation crop of TransformSpec `spec`), valid bool, key (the path) and error (""
    or why the file was left out) out. Never raises for a file that cannot be read."""
    from vit_core.data.transforms import decode_crop

    paths = [str(p) for p in batch["path"]]
    images = np.zeros((len(paths), 3, spec.image_size, spec.image_size), dtype=np.uint8)
    errors = [""] * len(paths)
    for i, path in enumerate(paths):
        try:
            decode_crop(storage.read_bytes(path), spec, rng=None, out=images[i])
        except Exception as err:  # any unreadable file becomes an error row, never a crash
            errors[i] = f"{type(err).__name__}: {err}"
    return {
        "key": np.asarray(paths, dtype=object),
        "image": images,
        "valid": np.asarray([not e for e in errors]),
        "error": np.asarray(errors, dtype=object),
    }


def prediction_rows(batch: dict[str, np.ndarray], class_names: list[str]):
    """Predictor output -> the rows predict() writes (a pandas DataFrame): key, label
    (shard sets only), class_index (-1 on error), class_name, probability, top_k_classes
    and top_k_probabilities (lists, most probable first), error (None when predicted)."""
    import pandas as pd

    valid = batch["valid"]
    errors = batch.get("error", np.where(valid, "", "bad sample: unreadable image or label"))
    rows = {"key": [str(k) for k in batch["key"]]}
    if "label" in batch:
        rows["label"] = np.where(valid, batch["label"], -1)
    rows.update(
        class_index=batch["predicted"],
        class_name=[class_names[i] if ok else None for i, ok in zip(batch["predicted"], valid, strict=True)],
        probability=batch["probability"].astype(np.float64),
        top_k_classes=[[class_names[i] for i in idx] if ok else []
                       for idx, ok in zip(batch["top_k_index"], valid, strict=True)],
        top_k_probabilities=[[float(p) for p in ps] if ok else []
                             for ps, ok in zip(batch["top_k_probability"], valid, strict=True)],
        error=[None if ok else str(e) for e, ok in zip(errors, valid, strict=True)],
    )  # fmt: skip
    return pd.DataFrame(rows)


@dataclass
class PredictionSummary:
    out: str  # where the Parquet files are
    rows: int  # one per input image
    errors: int  # rows whose image could not be used (error column set)
    model_uri: str


def check_output(out: str) -> None:
    """The output folder must be new or empty, so a run never mixes its rows with an
    earlier one's. Raises ConfigError."""
    if storage.is_remote(out):
        taken = bool(storage.list_files(out))
    else:
        taken = Path(out).exists() and any(Path(out).iterdir())
    if taken:
        raise ConfigError(f"output {out} already holds files: choose a new folder")


def predict(
    model: str, inputs: str, out: str, *, split: str | None = None,
    compute: Compute | None = None, top_k: int = TOP_K,
) -> PredictionSummary:  # fmt: skip
    """Classify every image of `inputs` and write one Parquet row per image to `out` (a
    local folder or s3:// prefix; see prediction_rows for the columns). `inputs` is a
    shard set when `split` is given (its keys become `key`, its labels `label`), else an
    image folder or a .csv/.jsonl manifest (the file's path is `key`). Inputs, model and
    output are checked before any Ray work. Raises RegistryError, StorageError,
    CheckpointError, DatasetError, ConfigError."""
    import pyarrow.parquet as pq

    from vit_core import cluster

    compute = compute or Compute()
    ref = pin_model(model)
    pre = Preprocessing.load(model_folder(ref))
    check_output(out)
    compute.map_args()
    if split is not None:
        index = open_split(pre, model, inputs, split)
        make = functools.partial(build_dataset, data_config(pre, inputs), split, train=False,
                                 with_keys=True, index=index)  # fmt: skip
    else:
        make = functools.partial(file_dataset, image_inputs(inputs), pre)
    cluster.connect()
    ds = run_model(make(), ref, compute, top_k)
    ds = ds.map_batches(prediction_rows, fn_kwargs={"class_names": list(pre.class_names)},
                        batch_format="numpy", batch_size=None)  # fmt: skip
    fs, path = storage.pyarrow_filesystem(out)
    ds.write_parquet(path, filesystem=fs)
    errors = pq.read_table(path, filesystem=fs, columns=["error"]).column("error")
    return PredictionSummary(out, len(errors), len(errors) - errors.null_count, ref.uri)


def file_dataset(paths: list[str], pre: Preprocessing):
    """A Ray Dataset of the images at `paths`, decoded by Ray tasks with the model's
    evaluation transform (see decode_files)."""
    import ray.data

    spec = pre.transform_spec()
    blocks = max(1, math.ceil(len(paths) / IMAGES_PER_BLOCK))
    ds = ray.data.from_items([{"path": p} for p in paths], override_num_blocks=blocks)
    return ds.map_batches(decode_files, fn_kwargs={"spec": spec}, batch_format="numpy",
                          batch_size=None)  # fmt: skip
