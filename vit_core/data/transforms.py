"""Image decoding and augmentation on CPU, per Ray Data batch, in uint8 until the end.

Train: random resized crop (torchvision's sampling of area and aspect ratio), optional
RandAugment (timm's, on the PIL crop), horizontal flip; eval: resize the shorter side to
image_size / eval_crop_pct and centre crop. Both are one PIL `resize(box=...)` call on the
decoded image (decoded by vit_core.data.images as a viewer shows it: upright, 8-bit,
transparency over white): the crop and the resize happen together, in C. JPEGs are first
decoded at 1/2, 1/4 or 1/8 scale (`draft`) whenever the crop still covers image_size
pixels there, which is most of the saving on large photos. Rows leave as uint8 [3, S, S]:
a quarter of the bytes of float32 through the object store and the batching; the loader
normalises whole batches on the train worker's device (or, with normalize_on="dataset",
here).

A row that cannot be used (undecodable payload, missing or out-of-range label, or an error
the reader recorded) comes out with valid=False, a zero image and label 0, and a warning
names its key and shard; see vit_core.data.loader for how the train loop counts them.
"""

from __future__ import annotations

import functools
import io
import math
import random
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

from vit_core.data.images import draft_upright, to_rgb, upright_size, viewable
from vit_core.data.quality import report_bad_sample

RATIO = (3.0 / 4.0, 4.0 / 3.0)


@dataclass(frozen=True)
class TransformSpec:
    image_size: int
    train: bool
    num_classes: int
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = RATIO
    hflip: float = 0.0
    eval_crop_pct: float = 1.0
    interpolation: str = "bilinear"  # PIL resampling filter of the crop's resize
    randaugment: str | None = None
    seed: int = 0
    normalize: bool = False  # float32 normalised rows instead of uint8 (see DataConfig)
    with_keys: bool = False  # keep the key and shard columns (tests, debugging)

    @classmethod
    def from_config(cls, cfg, *, train: bool, num_classes: int, with_keys: bool = False):
        return cls(
            image_size=cfg.image_size,
            train=train,
            num_classes=num_classes,
            mean=tuple(float(m) for m in cfg.mean),
            std=tuple(float(s) for s in cfg.std),
            scale=(cfg.scale_min, 1.0),
            hflip=cfg.hflip,
            eval_crop_pct=cfg.eval_crop_pct,
            interpolation=cfg.interpolation,
            randaugment=cfg.randaugment,
            seed=cfg.seed,
            normalize=cfg.normalize_on == "dataset",
            with_keys=with_keys,
        )


Box = tuple[float, float, float, float]


def random_resized_crop_box(
    width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float], rng
) -> Box:
    """torchvision's RandomResizedCrop.get_params, drawn from a numpy Generator."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return (left, top, left + w, top + h)
    # Fallback: the whole image's centre at the nearest allowed aspect ratio.
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return (left, top, left + w, top + h)


def center_crop_box(width: int, height: int, crop_pct: float) -> Box:
    """Resize shorter side to S / crop_pct, centre crop S: the same region, in source pixels."""
    side = min(width, height) * crop_pct
    left = (width - side) / 2
    top = (height - side) / 2
    return (left, top, left + side, top + side)


@functools.lru_cache(maxsize=8)
def _randaugment(config: str, mean: tuple[float, ...], image_size: int):
    from timm.data.auto_augment import rand_augment_transform

    hparams = {
        "translate_const": int(image_size * 0.45),
        "img_mean": tuple(int(round(255 * m)) for m in mean),
    }
    return rand_augment_transform(config, hparams)


def decode_crop(
    data: bytes | Image.Image | np.ndarray,
    spec: TransformSpec,
    rng,
    flip: bool = False,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Decode one image (encoded bytes, a PIL image, or uint8 pixels [H, W, 3] / [H, W])
    as vit_core.data.images shows it (upright, 8-bit, alpha over its background) and
    return its crop as uint8 [3, S, S] (written into `out` when given): a random resized
    crop when spec.train (drawn from the numpy Generator `rng`), else the centre crop of
    spec.eval_crop_pct. Raises PIL's errors (or ValueError) for what cannot be decoded."""
    size = spec.image_size
    if isinstance(data, Image.Image):
        img = data
    elif isinstance(data, np.ndarray):
        img = Image.fromarray(data)
    else:
        img = Image.open(io.BytesIO(data))
    width, height = upright_size(img)  # the crop is drawn on the image as a viewer shows it
    if spec.train:
        box = random_resized_crop_box(width, height, spec.scale, spec.ratio, rng)
    else:
        box = center_crop_box(width, height, spec.eval_crop_pct)
    crop_w, crop_h = box[2] - box[0], box[3] - box[1]
    # Ask for the smallest decode in which the crop still spans `size` pixels.
    wanted = (
        max(1, math.ceil(width * size / max(crop_w, 1e-6))),
        max(1, math.ceil(height * size / max(crop_h, 1e-6))),
    )
    draft_upright(img, wanted)
    img = viewable(img)
    if img.size != (width, height):
        fx, fy = img.size[0] / width, img.size[1] / height
        box = (box[0] * fx, box[1] * fy, box[2] * fx, box[3] * fy)
    # Grey images are resized in one band and widened afterwards: the same pixels, a third
    # of the work.
    resample = Image.Resampling[spec.interpolation.upper()]
    crop = to_rgb(img.resize((size, size), resample, box=box))
    if spec.train and spec.randaugment:
        crop = _randaugment(spec.randaugment, spec.mean, size)(crop)
    if crop.size != (size, size) or crop.mode != "RGB":
        raise ValueError(f"decoded to {crop.mode} {crop.size}")
    if out is None:
        out = np.empty((3, size, size), dtype=np.uint8)
    # Channels first, one band at a time: half the cost of transposing an [S, S, 3] copy.
    # The flip rides on the same copy (reversed columns) instead of a flipped PIL image.
    for channel, band in enumerate(crop.split()):
        pixels = np.asarray(band)
        out[channel] = pixels[:, ::-1] if flip else pixels
    return out


def normalize(images: np.ndarray, mean, std, out: np.ndarray | None = None) -> np.ndarray:
    """uint8 [B, 3, H, W] -> float32 [B, 3, H, W], (x / 255 - mean) / std, written into
    `out` when given. Computed as x * (1 / (255 std)) - mean / std: two passes over the
    float array."""
    mean = np.asarray(mean, dtype=np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(std, dtype=np.float32).reshape(1, 3, 1, 1)
    out = np.multiply(images, 1.0 / (std * 255), out=out, dtype=np.float32)
    out -= mean / std
    return out


def _batch_rng(spec: TransformSpec, keys: np.ndarray, epoch: int):
    # Augmentation depends on the seed, the epoch and the batch's first key: reproducible,
    # different every epoch, independent of which worker decodes the batch.
    first = str(keys[0]) if len(keys) else ""
    entropy = [spec.seed, epoch, zlib.crc32(first.encode()), len(keys)]
    if spec.randaugment:
        random.seed(hash(tuple(entropy)))  # timm's RandAugment draws from `random`
    return np.random.default_rng(entropy)


def decode_batch(batch: dict[str, np.ndarray], spec: TransformSpec) -> dict[str, np.ndarray]:
    """Ray Data map_batches function: raw shard rows in, model-ready rows out.

    In: key, shard (str), data (bytes), label (int64, -1 if none), error (str, "" if none),
    epoch (int64). Out: image uint8 [B,3,S,S] (float32 normalised with spec.normalize),
    label int64, valid bool (and key, shard when spec.with_keys)."""
    keys = batch["key"]
    count = len(keys)
    size = spec.image_size
    epoch = int(batch["epoch"][0]) if count else 0
    rng = _batch_rng(spec, keys, epoch)
    flips = rng.random(count) < spec.hflip if spec.train else np.zeros(count, dtype=bool)
    images = np.empty((count, 3, size, size), dtype=np.uint8)
    labels = np.asarray(batch["label"], dtype=np.int64).copy()
    valid = np.ones(count, dtype=bool)
    errors = batch["error"]
    for i in range(count):
        reason = None
        if errors[i]:
            valid[i] = False  # the reader has logged it
        elif not 0 <= labels[i] < spec.num_classes:
            reason = f"label {labels[i]} outside 0..{spec.num_classes - 1}"
        else:
            try:
                decode_crop(batch["data"][i], spec, rng, flips[i], out=images[i])
            except Exception as err:  # any undecodable payload is skipped, not fatal
                reason = f"not a decodable image ({type(err).__name__}: {err})"
        if reason:
            valid[i] = False
            report_bad_sample(keys[i], batch["shard"][i], reason)
        if not valid[i]:
            images[i] = 0
    labels[~valid] = 0
    if spec.normalize:
        images = normalize(images, spec.mean, spec.std)
        images[~valid] = 0.0
    out = {"image": images, "label": labels, "valid": valid}
    if spec.with_keys:
        out["key"] = keys
        out["shard"] = batch["shard"]
    return out
