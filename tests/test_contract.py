"""The preprocessing contract: the same encoded image through validation (the training
loop's Ray Data path) and through the served model (the registered MLflow pyfunc) gives
the same probabilities, because both build their transform from the model's
preprocessing.json."""

from __future__ import annotations

import io

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from vit_core.data import DataConfig, build_dataset, make_shards
from vit_core.data.preprocessing import Preprocessing
from vit_core.model import create_model, save_model
from vit_core.track.registry import register_model
from vit_core.train.evaluator import validate


def photo(seed: int) -> bytes:
    """A 57x41 RGB JPEG: neither square nor the model's size, so crop and resize matter."""
    rng = np.random.default_rng(seed)
    pixels = (rng.random((41, 57, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def test_validation_and_served_model_give_the_same_probabilities(
    tmp_path, mlflow_server, ray_client
):
    source = tmp_path / "src"
    for seed, label in enumerate(("cat", "dog")):
        (source / label).mkdir(parents=True)
        for name in ("a", "b"):  # one of each class goes to val: both are the same photo
            (source / label / f"{name}.jpg").write_bytes(photo(seed))
    index = make_shards(str(source), str(tmp_path / "shards"), val_fraction=0.5, seed=1,
                        progress=False, executor="local")  # fmt: skip
    assert index.num_samples("val") == 2

    torch.manual_seed(0)
    model = create_model("vit_ti16", img_size=48, patch_size=8, embed_dim=48, depth=2,
                         num_heads=3, num_classes=2).eval()  # fmt: skip
    torch.nn.init.normal_(model.head.weight, std=0.5)  # a zero head would hide differences
    pre = Preprocessing(input_size=48, crop_pct=0.875, interpolation="bicubic",
                        mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225],
                        class_names=index.class_names)  # fmt: skip
    model_dir = tmp_path / "model"
    save_model(model, model_dir)
    pre.save(model_dir)

    # Validation: the dataset the training driver builds from the model's contract.
    cfg = DataConfig(location=str(tmp_path / "shards"), image_size=48, mean=pre.mean,
                     std=pre.std, eval_crop_pct=0.875, interpolation="bicubic")  # fmt: skip
    metrics = validate(model, build_dataset(cfg, "val", train=False, index=index), 2, 8,
                       torch.device("cpu"), keep=1)  # fmt: skip
    (image, label, _), = metrics.samples
    with torch.no_grad():
        validation = model(image[None]).softmax(-1)[0]

    # Serving: the registered pyfunc, fed the same file's bytes.
    client = MlflowClient(mlflow_server.uri)
    run = client.create_run(client.create_experiment(f"contract-{tmp_path.name}"))
    version = register_model(client, run.info.run_id, model_dir, f"contract-{tmp_path.name}", {})
    served = mlflow.pyfunc.load_model(f"models:/contract-{tmp_path.name}/{version}")
    stored = (source / index.class_names[label] / "a.jpg").read_bytes()
    out = served.predict(pd.DataFrame({"image": [stored]}))
    assert out["class_index"][0] == int(validation.argmax())
    assert out["probability"][0] == pytest.approx(float(validation.max()), abs=1e-6)
    # A different crop (the old squash to 48x48) would change them: the check can fail.
    squashed = np.asarray(Image.open(io.BytesIO(stored)).convert("RGB").resize((48, 48)))
    other = served.predict(pd.DataFrame({"image": [squashed]}))
    assert abs(other["probability"][0] - float(validation.max())) > 1e-4
