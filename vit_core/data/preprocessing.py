"""The preprocessing contract: how a model's inputs are made, saved with its weights.

As timm's pretrained configs do, a model folder carries `preprocessing.json`: the input
size, the centre-crop fraction, the interpolation, the mean and std, and the class names.
Validation during training, evaluate.py, batch inference (predict.py) and the served
model all build their transform from this one record, so an image is resized and
cropped the same way everywhere:

    pre = Preprocessing.load(model_dir)
    pixels = pre.transform(image)             # encoded bytes, PIL image or uint8 [H, W, 3]
    batch = pre.normalize(np.stack(pixels))   # float32 [B, 3, S, S]
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

PREPROCESSING_FILE = "preprocessing.json"


@dataclass(frozen=True)
class Preprocessing:
    input_size: int  # S: the model's input is S x S
    crop_pct: float = 1.0  # resize the shorter side to S / crop_pct, then centre-crop S
    interpolation: str = "bilinear"  # PIL resampling filter name (bilinear, bicubic)
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    class_names: list[str] = field(default_factory=list)

    @classmethod
    def from_data_config(cls, cfg, class_names: list[str]) -> Preprocessing:
        """The contract of a model trained on DataConfig `cfg`'s evaluation transform."""
        return cls(
            input_size=cfg.image_size,
            crop_pct=cfg.eval_crop_pct,
            interpolation=cfg.interpolation,
            mean=[float(m) for m in cfg.mean],
            std=[float(s) for s in cfg.std],
            class_names=list(class_names),
        )

    def save(self, model_dir: str | Path) -> Path:
        path = Path(model_dir) / PREPROCESSING_FILE
        path.write_text(json.dumps(asdict(self), indent=2))
        return path

    @classmethod
    def load(cls, model_dir: str | Path) -> Preprocessing:
        """Raises FileNotFoundError when the folder has no preprocessing.json."""
        return cls(**json.loads((Path(model_dir) / PREPROCESSING_FILE).read_text()))

    def transform_spec(self):
        """The evaluation TransformSpec of vit_core.data.transforms for this contract."""
        from vit_core.data.transforms import TransformSpec

        return TransformSpec(
            image_size=self.input_size,
            train=False,
            num_classes=max(1, len(self.class_names)),
            mean=tuple(self.mean),
            std=tuple(self.std),
            eval_crop_pct=self.crop_pct,
            interpolation=self.interpolation,
        )

    def transform(self, image) -> np.ndarray:
        """One image (encoded bytes, a PIL image, or a uint8 array [H, W, 3] / [H, W])
        as uint8 [3, S, S]: decoded as a viewer shows it, resized and centre-cropped
        exactly as validation does. Raises ValueError for what cannot be decoded."""
        from vit_core.data.transforms import decode_crop

        return decode_crop(image, self.transform_spec(), rng=None)

    def normalize(self, batch: np.ndarray) -> np.ndarray:
        """uint8 [B, 3, S, S] -> float32 [B, 3, S, S], (x / 255 - mean) / std."""
        from vit_core.data.transforms import normalize

        return normalize(batch, self.mean, self.std)
