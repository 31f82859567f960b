"""The registered model as an MLflow pyfunc, logged as code (no pickle).

MLflow loads this file by path and calls `load_context`, which checks the weights'
SHA-256 against the one recorded at registration and reads them from safetensors (no
unpickling), with the model's preprocessing contract (preprocessing.json).

Input, one image per row: a DataFrame with an `image` column of encoded bytes (PNG,
JPEG, WebP, TIFF, ...), base64 strings of them (as MLflow's REST protocol sends binary
data), or uint8 arrays [H, W, 3] / [H, W]; or a uint8 array [N, H, W, 3] / [N, H, W].
Each is decoded as a viewer shows it, then resized and centre-cropped exactly as
validation does. Output, per row: class_index, class_name, probability (of that class),
and top_k: a JSON list of {"class_name", "probability"} for the k most probable classes
(params={"top_k": k}, default 5).
"""

from __future__ import annotations

import base64
import binascii
import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch


class WeightsChangedError(RuntimeError):
    """The weight file differs from the one registered."""


def _as_image(value):
    """bytes stay bytes; a str is base64 of the bytes; arrays are pixels."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("an image string must be base64 of the encoded image") from None
    array = np.asarray(value)
    if array.dtype != np.uint8 or array.ndim not in (2, 3):
        raise ValueError(f"an image array must be uint8 [H, W, 3] or [H, W], got {array.dtype} "
                         f"{list(array.shape)}")  # fmt: skip
    return array


def _images(model_input) -> list:
    if isinstance(model_input, pd.DataFrame):
        if "image" not in model_input.columns:
            raise ValueError(f"expected an 'image' column, got {list(model_input.columns)}")
        return [_as_image(v) for v in model_input["image"]]
    if isinstance(model_input, dict) and "image" in model_input:
        return [_as_image(v) for v in model_input["image"]]
    array = np.asarray(model_input)
    if array.dtype == np.uint8 and array.ndim in (3, 4):
        return [_as_image(a) for a in array]
    raise ValueError("expected a DataFrame with an 'image' column or a uint8 array [N, H, W, 3]")


class ViTClassifier(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from vit_core.data.preprocessing import Preprocessing
        from vit_core.model import create_model
        from vit_core.track.registry import REGISTRATION_FILE, SHA_TAG, WEIGHTS_FILE, weights_digest

        model_dir = Path(context.artifacts["model"])
        expected = (context.model_config or {}).get(SHA_TAG)
        found = weights_digest(model_dir)
        if expected and found != expected:
            # Written beside the model's files once the version number was known.
            record = model_dir.parents[1] / REGISTRATION_FILE
            who = "this model"
            if record.is_file():
                info = json.loads(record.read_text())
                who = f"registered model {info['name']} version {info['version']}"
            raise WeightsChangedError(
                f"{who}: weights file {WEIGHTS_FILE} changed after registration (SHA-256 "
                f"{found[:12]}..., registered {expected[:12]}...); refusing to load"
            )
        self.model = create_model(checkpoint=model_dir).eval()
        self.pre = Preprocessing.load(model_dir)

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        k = int((params or {}).get("top_k", 5))
        pixels = np.stack([self.pre.transform(image) for image in _images(model_input)])
        x = torch.from_numpy(self.pre.normalize(pixels))
        with torch.inference_mode():
            probs = self.model(x).float().softmax(-1)
        top_p, top_i = probs.topk(min(k, probs.shape[-1]), dim=-1)
        names = self.pre.class_names
        return pd.DataFrame(
            {
                "class_index": top_i[:, 0].numpy().astype(np.int64),
                "class_name": [names[i] for i in top_i[:, 0].tolist()],
                "probability": top_p[:, 0].double().numpy(),
                "top_k": [
                    json.dumps([{"class_name": names[i], "probability": round(p, 6)}
                                for i, p in zip(idx, ps, strict=True)])
                    for idx, ps in zip(top_i.tolist(), top_p.tolist(), strict=True)
                ],  # fmt: skip
            }
        )


mlflow.models.set_model(ViTClassifier())
