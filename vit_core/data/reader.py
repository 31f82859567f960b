"""Shards to a Ray Dataset: a streaming read, one read task per shard, fused with the
batch decode (vit_core.data.transforms) into a single Ray task per shard.

Our own datasource rather than `ray.data.read_webdataset`, because it must skip what is
damaged instead of failing the run: a truncated shard yields every complete sample before
the damage, then one invalid placeholder row per sample the index promised but that could
not be read, so every epoch has exactly index.num_samples(split) rows and the loss of
data shows up in the bad-sample count. It also builds columnar blocks directly (no pandas)
and reorders the shards every epoch: Ray Data re-plans the read for each pass over the
dataset, and the order is drawn from (seed, pass number).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator

import numpy as np

from vit_core.data.config import DataConfig
from vit_core.data.errors import DatasetError
from vit_core.data.index import DatasetIndex, ShardInfo, open_stream, read_index, verify
from vit_core.data.quality import report_bad_sample
from vit_core.data.shards import DEFAULT_LAYOUT, Layout, ShardCorruptError, iter_samples
from vit_core.data.transforms import TransformSpec, decode_batch
from vit_core.storage import StorageError

logger = logging.getLogger("vit_core.data")

# Read by vit_core.data.loader on the Train worker: the loader settings travel with the
# dataset (in its DataContext), so iter_train_batches needs no config argument.
LOADER_CONFIG_KEY = "vit_core.data.loader"
_BLOCK_BYTES = 32 << 20  # decoded images per block


def _schema():
    import pyarrow as pa

    return pa.schema(
        [
            ("key", pa.string()),
            ("shard", pa.string()),
            ("data", pa.binary()),
            ("label", pa.int64()),
            ("error", pa.string()),
            ("epoch", pa.int64()),
        ]
    )


def _table(rows: list[tuple], shard: str, epoch: int):
    import pyarrow as pa

    keys, data, labels, errors = zip(*rows, strict=True) if rows else ((), (), (), ())
    n = len(keys)
    return pa.table(
        {
            "key": pa.array(keys, pa.string()),
            "shard": pa.array([shard] * n, pa.string()),
            "data": pa.array(data, pa.binary()),
            "label": pa.array(labels, pa.int64()),
            "error": pa.array(errors, pa.string()),
            "epoch": pa.array([epoch] * n, pa.int64()),
        },
        schema=_schema(),
    )


def read_shard(
    location: str,
    shard: ShardInfo,
    epoch: int,
    rows_per_block: int,
    layout: Layout = DEFAULT_LAYOUT,
) -> Iterator:
    """Blocks (pyarrow tables) of raw rows from one shard, its samples read through
    `layout` (the index's); never raises for bad content."""
    rows: list[tuple] = []
    read = 0
    damage = None
    try:
        with open_stream(location) as stream:
            for sample in iter_samples(stream.read, layout):
                read += 1
                if sample.error:
                    report_bad_sample(sample.key, location, sample.error)
                label = -1 if sample.label is None else sample.label
                rows.append((sample.key, sample.image or b"", label, sample.error or ""))
                if len(rows) >= rows_per_block:
                    yield _table(rows, location, epoch)
                    rows = []
    except ShardCorruptError as err:
        damage = str(err)
    except (OSError, DatasetError, StorageError) as err:  # gone, or the store failed mid-read
        damage = f"read failed ({type(err).__name__}: {err})"
    missing = shard.num_samples - read
    if damage or missing > 0:
        logger.warning(
            "shard %s: %s; read %d of the %d indexed samples, %d lost",
            location,
            damage or "ends early",
            read,
            shard.num_samples,
            max(missing, 0),
        )
    for i in range(max(missing, 0)):
        rows.append((f"{shard.name}#lost-{i}", b"", -1, f"lost: {damage or 'shard ends early'}"))
        if len(rows) >= rows_per_block:
            yield _table(rows, location, epoch)
            rows = []
    if rows:
        yield _table(rows, location, epoch)


def shard_order(num_shards: int, seed: int | None, epoch: int) -> list[int]:
    if seed is None:
        return list(range(num_shards))
    return [int(i) for i in np.random.default_rng([seed, epoch]).permutation(num_shards)]


def _datasource_class():
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class ShardDatasource(Datasource):
        """One read task per shard, in an order drawn anew for every execution."""

        def __init__(
            self,
            index: DatasetIndex,
            split: str,
            *,
            shuffle_seed: int | None,
            fixed_epoch: int | None,
            rows_per_block: int,
        ) -> None:
            super().__init__()
            self._location = index.location
            self._shards = index.shards(split)
            self._uris = [index.shard_location(s) for s in self._shards]
            self._shuffle_seed = shuffle_seed
            self._fixed_epoch = fixed_epoch
            self._rows_per_block = rows_per_block
            self._layout = index.layout

        def get_name(self) -> str:
            return "ViTShards"

        def estimate_inmemory_data_size(self) -> int:
            return sum(s.size_bytes for s in self._shards)

        def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
            if self._fixed_epoch is not None:
                epoch = self._fixed_epoch
            else:
                epoch = getattr(data_context, "_execution_idx", 0) if data_context else 0
            tasks = []
            for i in shard_order(len(self._shards), self._shuffle_seed, epoch):
                shard, uri = self._shards[i], self._uris[i]
                meta = BlockMetadata(
                    num_rows=shard.num_samples,
                    size_bytes=int(shard.size_bytes),
                    input_files=[uri],
                    exec_stats=None,
                )
                read = functools.partial(
                    read_shard, uri, shard, epoch, self._rows_per_block, self._layout
                )
                tasks.append(
                    ReadTask(read, meta, schema=_schema(), per_task_row_limit=per_task_row_limit)
                )
            return tasks

    return ShardDatasource


_verified: set[tuple[str, str, str]] = set()


def _checked_index(cfg: DataConfig) -> DatasetIndex:
    """open_dataset at cfg.verify. A "full" check (reading every shard) is done once per
    process and dataset version: a job builds a train and a val dataset from one index."""
    index = read_index(cfg.location)
    key = (index.location, index.version, cfg.verify)
    if key not in _verified:
        verify(index, cfg.verify)
        if cfg.verify == "full":
            _verified.add(key)
    return index


def rows_per_block(image_size: int, bytes_per_value: int) -> int:
    """Rows per block: about 32 MB of decoded images. Blocks much smaller than a batch
    would make nearly every batch a concatenation of two blocks on the train worker."""
    return int(np.clip(_BLOCK_BYTES // (image_size * image_size * 3 * bytes_per_value), 16, 512))


def build_dataset(
    cfg: DataConfig,
    split: str,
    *,
    train: bool,
    epoch_seed: int | None = None,
    with_keys: bool = False,
    index: DatasetIndex | None = None,
):
    """A Ray Dataset of model-ready rows for one split of the dataset at cfg.location.

    Rows: image uint8 [3, S, S] (iter_train_batches normalises it with cfg.mean/std on the
    worker's device), or float32 [3, S, S] already normalised when cfg.normalize_on is
    "dataset"; label int64; valid bool (False: a bad sample, to be dropped or masked; see
    vit_core.data.loader); plus key and shard when with_keys. train=True: random resized crop, flip, RandAugment, and a shard
    order drawn from (cfg.seed, epoch) where epoch counts the passes over this dataset, or
    is epoch_seed when given (for a loop that builds a new dataset each epoch).
    Raises DatasetError (missing location, index that does not match) before reading.
    """
    index = index or _checked_index(cfg)
    if not index.shards(split):
        raise DatasetError(f"dataset {index.location} has no shards for split {split!r}")
    import ray.data  # only now: a bad dataset fails without touching Ray

    spec = TransformSpec.from_config(
        cfg, train=train, num_classes=index.num_classes, with_keys=with_keys
    )
    source = _datasource_class()(
        index,
        split,
        shuffle_seed=cfg.seed if train else None,
        fixed_epoch=epoch_seed,
        rows_per_block=rows_per_block(cfg.image_size, 4 if spec.normalize else 1),
    )
    # One block stream per shard, never split: splitting the read output (Ray aims at 200
    # blocks by default) would stop the decode from fusing into the read task and turn
    # every few rows into a task of their own.
    ds = ray.data.read_datasource(source, override_num_blocks=len(index.shards(split)))
    ds = ds.map_batches(
        decode_batch,
        fn_kwargs={"spec": spec},
        batch_format="numpy",
        batch_size=None,  # a whole block (one shard's slice) per call
        zero_copy_batch=True,
    )
    # The pipeline is one fused operator (read + decode), so Ray Data's per-operator
    # resource reservation has nothing to balance; left on, it kept a share of the CPU
    # slots idle (about 30% fewer images/s on 2 CPUs, benchmarks/data_bench.py).
    ds.context.op_resource_reservation_enabled = False
    ds.context.set_config(
        LOADER_CONFIG_KEY,
        {
            "shuffle_buffer": cfg.shuffle_buffer if train else 0,
            "seed": cfg.seed,
            "train": train,
            "mean": [float(m) for m in cfg.mean],
            "std": [float(s) for s in cfg.std],
        },
    )
    return ds
