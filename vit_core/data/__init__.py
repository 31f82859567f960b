"""Shards: writing them, checking them, streaming them into Ray Train as torch batches.

Writing (pipelines/make_shards.py is a thin CLI over this):

    index = make_shards("path/to/folder" | "manifest.csv" | "manifest.jsonl"
                        | "cifar-10-python.tar.gz" | "digits",
                        "s3://vit/datasets/NAME/v1",       # or a local directory
                        shard_bytes=256 << 20,             # or shard_samples=1000
                        val_fraction=0.1, seed=0, max_side=512, jpeg_quality=90)
    make_digits_shards("data/digits/v1", image_size=32)    # the embedded demo's dataset

  Output: <out>/{train,val}-000000.tar (WebDataset: <key>.jpg|png|webp + <key>.cls) and
  <out>/index.json, written last. A finished dataset is not overwritten unless
  overwrite=True. Bad input raises DatasetError (missing folder, bad manifest line: named);
  an unreadable image is skipped and counted in the index.

Indexing WebDataset shards written by other tools, in place (see vit_core.data.existing):

    index = index_existing_shards("s3://bucket/laion-subset",
                                  splits={"train": "train-*.tar", "val": "val-*.tar"},
                                  label="json:label",            # or "cls" (a member's text)
                                  image_extensions=("jpg", "png"),   # first one present wins
                                  class_names=None)              # from the labels found

Training (driver, before any worker starts):

    index = open_dataset(cfg.location)          # DatasetError if missing or not matching;
                                                # a shard stored short: one warning, read on
    datasets = {"train": build_dataset(cfg, "train", train=True),
                "val": build_dataset(cfg, "val", train=False)}
    TorchTrainer(loop, datasets=datasets, ...)

Training (each worker, every epoch):

    counter = BadSampleCounter()                # optional
    mix = mixup_fn(cfg, index.num_classes)      # None when mixup/cutmix/smoothing are off
    shard = ray.train.get_dataset_shard("train")
    for images, labels, valid in iter_train_batches(shard, batch_size, device,
                                                    train=True, epoch=epoch, counter=counter):
        targets = labels
        if mix is not None:
            images, targets = mix(images, labels)    # soft targets [B, num_classes]
        loss = (per_row_loss * valid).sum() / valid.sum().clamp(min=1)

  images: float32 [B,3,S,S] normalised with cfg.mean/std, on `device`; labels int64 [B];
  valid bool [B]. train=True shuffles through a local buffer of cfg.shuffle_buffer rows
  (seeded by cfg.seed and epoch) and drops a short last batch; train=False keeps order and
  every row. The shuffle buffer and mean/std travel with the dataset, so the loop needs no
  config of its own.

Bad samples: a payload that is not an image, a missing or out-of-range label, a damaged
or truncated shard: each such row still comes through, with valid=False (its image and label
copied from a good row of the batch, so mixing stays clean), and a warning naming the key
and the shard is logged where it was decoded. Batches keep their size, so DDP workers stay
in step. Count them with `int((~valid).sum())` per batch, or pass a BadSampleCounter
(`counter.bad`, `counter.metrics()`), and sum over workers for the run's metric. Each
epoch has exactly index.num_samples(split) rows; samples lost to a truncated shard are
among the invalid ones. `clean_batch(batch)` drops bad rows from a raw
`iter_torch_batches` batch and returns (images, labels, n_bad).

Rows of build_dataset: image uint8 [3,S,S] (iter_train_batches normalises whole batches:
in numpy for a CPU target, on the GPU after the transfer otherwise, so Ray moves a quarter
of the bytes of float32), label int64, valid bool (key and shard too with with_keys=True).
With cfg.normalize_on="dataset" the rows hold float32 [3,S,S] normalised with cfg.mean/std
instead, for code that calls `iter_torch_batches` itself. Shards are reordered every epoch
from cfg.seed (Ray Data re-plans the read on every pass); build_dataset(...,
epoch_seed=N) fixes the order for a loop that builds a dataset per epoch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vit_core.data.config import IMAGENET_MEAN, IMAGENET_STD, DataConfig
from vit_core.data.errors import DatasetError
from vit_core.data.existing import index_existing_shards
from vit_core.data.index import DatasetIndex, ShardInfo, open_dataset, read_index, verify
from vit_core.data.make import make_digits_shards, make_shards, write_shard
from vit_core.data.quality import report_bad_sample
from vit_core.data.reader import build_dataset
from vit_core.data.sources import Source, SourceSample, open_source

if TYPE_CHECKING:
    from vit_core.data.loader import BadSampleCounter, clean_batch, iter_train_batches
    from vit_core.data.mixing import mixup_fn

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "BadSampleCounter",
    "DataConfig",
    "DatasetError",
    "DatasetIndex",
    "ShardInfo",
    "Source",
    "SourceSample",
    "build_dataset",
    "clean_batch",
    "report_bad_sample",
    "index_existing_shards",
    "iter_train_batches",
    "make_digits_shards",
    "make_shards",
    "mixup_fn",
    "open_dataset",
    "open_source",
    "read_index",
    "verify",
    "write_shard",
]

# torch is imported only by the train-loop helpers, so make_shards starts quickly.
_LAZY = {
    "BadSampleCounter": "vit_core.data.loader",
    "clean_batch": "vit_core.data.loader",
    "iter_train_batches": "vit_core.data.loader",
    "mixup_fn": "vit_core.data.mixing",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vit_core.data' has no attribute {name!r}")
