"""The registered model as an MLflow pyfunc, logged as code (no pickle).

MLflow loads this file by path and calls `load_context`, which reads the weights from
safetensors. Input: a DataFrame with an `image` column of encoded image bytes (PNG,
JPEG, WebP), or a uint8 array [N, H, W, 3]. Output: the class index, its name and its
probability for each image.
"""

from __future__ import annotations

import io
import json

import mlflow
import numpy as np
import pandas as pd
import torch
from PIL import Image


class ViTClassifier(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from vit_core.model import create_model

        model_dir = context.artifacts["model"]
        self.model = create_model(checkpoint=model_dir).eval()
        with open(context.artifacts["preprocessing"]) as f:
            pre = json.load(f)
        self.class_names = pre["class_names"]
        self.size = int(pre["image_size"])
        self.mean = torch.tensor(pre["mean"]).view(1, 3, 1, 1)
        self.std = torch.tensor(pre["std"]).view(1, 3, 1, 1)

    def _to_tensor(self, model_input) -> torch.Tensor:
        if isinstance(model_input, pd.DataFrame):
            images = [Image.open(io.BytesIO(b)).convert("RGB") for b in model_input["image"]]
            arrays = [np.asarray(im.resize((self.size, self.size), Image.BICUBIC)) for im in images]
            batch = np.stack(arrays)
        else:
            batch = np.asarray(model_input, dtype=np.uint8)
        x = torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255.0
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = torch.nn.functional.interpolate(x, size=(self.size, self.size), mode="bicubic")
        return (x - self.mean) / self.std

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        with torch.inference_mode():
            probs = self.model(self._to_tensor(model_input)).softmax(-1)
        p, idx = probs.max(-1)
        return pd.DataFrame(
            {
                "class_index": idx.numpy(),
                "class_name": [self.class_names[i] for i in idx.tolist()],
                "probability": p.numpy(),
            }
        )


mlflow.models.set_model(ViTClassifier())
