"""The data section of a job config: where the shards are and how images are prepared.

The defaults suit the embedded digits demo (32 px greyscale digits): no flips (a mirrored
2 is not a 2), mild crops, the whole image at evaluation. ImageNet-style presets set
image_size 224, ImageNet mean/std, hflip 0.5, scale_min 0.08 and eval_crop_pct 0.875.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


@dataclass
class DataConfig:
    # Shard root written by make_shards: s3://bucket/datasets/NAME/VERSION or a directory
    # (the default is where the embedded demo makes its digits dataset).
    location: str = "data/digits/v1"
    image_size: int = 32
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    batch_size: int = 64
    # Rows each Train worker keeps in its local shuffle buffer (0 turns it off). Rows are
    # float32 images, so 1024 rows of 224 px hold about 600 MB.
    shuffle_buffer: int = 1024
    seed: int = 0
    # Ray Data hands out blocks in read order (its ExecutionOptions.preserve_order): a run
    # with the same seeds sees the same batches, so runs repeat and trials compare fairly,
    # at some cost in throughput (a slow read task holds up the ones after it).
    preserve_order: bool = False
    # Random resized crop: area fraction range [scale_min, 1], aspect ratio [3/4, 4/3].
    scale_min: float = 0.35
    hflip: float = 0.0  # probability of a horizontal flip
    # Evaluation: resize the shorter side to image_size / eval_crop_pct, centre crop.
    eval_crop_pct: float = 1.0
    # Resampling filter of the crop's resize, train and eval alike (PIL's names).
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"
    randaugment: str | None = None  # timm config string, e.g. "rand-m9-mstd0.5"
    mixup: float = 0.0  # Mixup alpha (0: off); applied on the batch by mixup_fn
    cutmix: float = 0.0  # CutMix alpha (0: off)
    label_smoothing: float = 0.0
    # Where images become float32 normalised: "loader" (iter_train_batches, on the train
    # worker's device, from uint8 rows: 4x less data through Ray) or "dataset" (rows are
    # already float32, for code that calls iter_torch_batches itself).
    normalize_on: Literal["loader", "dataset"] = "loader"
    train_split: str = "train"
    val_split: str = "val"
    # What open_dataset checks before training: "size" (every shard present with the
    # indexed size) or "full" (also sha256 and sample counts: reads every shard once).
    verify: Literal["size", "full"] = "size"
