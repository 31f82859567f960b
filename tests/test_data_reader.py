"""Reading shards back: decoding and transforms, bad data skipped and counted, index
checks before training, and Ray Data / Ray Train delivering every sample exactly once."""

from __future__ import annotations

import dataclasses
import io
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from test_data_helpers import image_bytes, make_image_folder, tar_bytes

from vit_core import storage
from vit_core.data import (
    BadSampleCounter,
    DataConfig,
    DatasetError,
    DatasetIndex,
    ShardInfo,
    build_dataset,
    clean_batch,
    iter_train_batches,
    make_digits_shards,
    make_shards,
    mixup_fn,
    open_dataset,
    open_source,
)
from vit_core.data.index import write_index
from vit_core.data.loader import FloatBufferPool, _fill_bad_rows
from vit_core.data.reader import read_shard
from vit_core.data.transforms import TransformSpec, decode_batch, decode_crop
from vit_core.train.job import ingest_config


def png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


def eval_spec(size: int = 32, **kw) -> TransformSpec:
    return TransformSpec(image_size=size, train=False, num_classes=3, **kw)


# ---- decoding and transforms, in-process ------------------------------------------------


@pytest.mark.parametrize("fmt", ["jpg", "png", "webp"])
def test_decodes_jpeg_png_webp(fmt):
    data = image_bytes(3, (48, 40), fmt)
    out = decode_crop(data, eval_spec(32), np.random.default_rng(0))
    assert out.shape == (3, 32, 32)
    out = out.transpose(1, 2, 0)  # as PIL lays it out
    reference = Image.open(io.BytesIO(data)).convert("RGB")
    reference = np.asarray(reference.resize((32, 32), Image.BILINEAR, box=(4, 0, 44, 40)))
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert np.array_equal(out, reference)


def test_eval_resizes_and_centre_crops():
    stripes = np.zeros((100, 200, 3), np.uint8)
    stripes[:, :66, 0] = 255  # red | green | blue thirds
    stripes[:, 66:133, 1] = 255
    stripes[:, 133:, 2] = 255
    out = decode_crop(png(stripes), eval_spec(20, eval_crop_pct=1.0), np.random.default_rng(0))
    out = out.transpose(1, 2, 0)
    # The centre square (x 50..150) shows a little red, mostly green, a little blue.
    assert out[10, 0].argmax() == 0 and out[10, 10].argmax() == 1 and out[10, 19].argmax() == 2
    tight = decode_crop(png(stripes), eval_spec(20, eval_crop_pct=0.6), np.random.default_rng(0))
    tight = tight.transpose(1, 2, 0)
    assert np.all(tight[:, :, 1] == 255)  # 60% of the centre: green only


def test_jpeg_draft_decode_matches_a_full_decode():
    y, x = np.mgrid[0:1200, 0:1600]
    smooth = np.stack([x * 255 // 1600, y * 255 // 1200, (x + y) * 255 // 2800], -1).astype(
        np.uint8
    )
    out = io.BytesIO()
    Image.fromarray(smooth).save(out, "JPEG", quality=92)
    data = out.getvalue()
    fast = decode_crop(data, eval_spec(224, eval_crop_pct=0.875), np.random.default_rng(0))
    fast = fast.transpose(1, 2, 0)
    full = Image.open(io.BytesIO(data)).convert("RGB")
    side = 1200 * 0.875
    box = ((1600 - side) / 2, (1200 - side) / 2, (1600 + side) / 2, (1200 + side) / 2)
    reference = np.asarray(full.resize((224, 224), Image.BILINEAR, box=box), dtype=np.int16)
    assert np.abs(fast.astype(np.int16) - reference).mean() < 2.0
    img = Image.open(io.BytesIO(data))
    img.draft("RGB", (1600 * 224 // 1050 + 1, 1200 * 224 // 1050 + 1))
    assert img.size == (400, 300)  # decoded at 1/4 scale


def test_train_transform_crops_flips_normalises():
    half = np.zeros((64, 64, 3), np.uint8)
    half[:, 32:] = 255  # black | white
    spec = TransformSpec(
        image_size=16, train=True, num_classes=3, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=1.0,
        normalize=True,
    )  # fmt: skip
    batch = {
        "key": np.array(["a"], object), "shard": np.array(["s.tar"], object),
        "data": np.array([png(half)], object), "label": np.array([2]),
        "error": np.array([""], object), "epoch": np.array([0]),
    }  # fmt: skip
    out = decode_batch(batch, spec)
    image = out["image"][0]
    assert image.shape == (3, 16, 16) and image.dtype == np.float32
    assert np.allclose(image[:, :, :6], 1.0) and np.allclose(image[:, :, 10:], -1.0)  # flipped
    assert out["valid"].tolist() == [True] and out["label"].tolist() == [2]
    raw = decode_batch(batch, dataclasses.replace(spec, normalize=False))["image"][0]
    assert raw.dtype == np.uint8 and np.all(raw[:, :, :6] == 255) and np.all(raw[:, :, 10:] == 0)
    # Random resized crops differ with the epoch and repeat with it.
    spec = TransformSpec(image_size=16, train=True, num_classes=3, scale=(0.1, 0.5))
    grad = np.tile(np.arange(64, dtype=np.uint8)[None, :, None] * 4, (64, 1, 3))
    batch["data"] = np.array([png(grad)], object)
    first = decode_batch(batch, spec)["image"]
    assert np.array_equal(first, decode_batch(batch, spec)["image"])
    batch["epoch"] = np.array([1])
    assert not np.array_equal(first, decode_batch(batch, spec)["image"])


def test_randaugment_option_from_timm():
    data = image_bytes(1, (64, 64), "png")
    spec = TransformSpec(image_size=32, train=True, num_classes=3, randaugment="rand-m9-n3-mstd0.5")
    plain = TransformSpec(image_size=32, train=True, num_classes=3)
    batch = {
        "key": np.array(["k"], object), "shard": np.array(["s"], object),
        "data": np.array([data], object), "label": np.array([0]),
        "error": np.array([""], object), "epoch": np.array([0]),
    }  # fmt: skip
    augmented, base = decode_batch(batch, spec)["image"], decode_batch(batch, plain)["image"]
    assert augmented.shape == base.shape == (1, 3, 32, 32)
    assert not np.array_equal(augmented, base)


def test_bad_rows_are_marked_and_logged_with_key_and_shard(caplog):
    good = png(np.full((20, 20, 3), 200, np.uint8))
    batch = {
        "key": np.array(["00000001", "00000002", "00000003", "00000004"], object),
        "shard": np.array(["s3://b/d/train-000007.tar"] * 4, object),
        "data": np.array([good, b"<html>not an image</html>", good, b""], object),
        "label": np.array([1, 0, 7, -1]),
        "error": np.array(["", "", "", "no label member (.cls)"], object),
        "epoch": np.array([0, 0, 0, 0]),
    }
    with caplog.at_level(logging.WARNING, logger="vit_core.data"):
        out = decode_batch(batch, eval_spec(8))
    assert out["valid"].tolist() == [True, False, False, False]
    assert out["label"].tolist() == [1, 0, 0, 0]
    assert np.all(out["image"][1:] == 0) and not np.all(out["image"][0] == 0)
    lines = [r.getMessage() for r in caplog.records]
    assert any(
        "00000002 in shard s3://b/d/train-000007.tar: not a decodable image" in m for m in lines
    )
    assert any(
        "00000003 in shard s3://b/d/train-000007.tar: label 7 outside 0..2" in m for m in lines
    )
    assert not any("00000004" in m for m in lines)  # the reader logged that one already


def good_sample(i: int, label: int = 0) -> tuple[str, dict[str, bytes]]:
    return f"{i:08d}", {"png": image_bytes(i, (24, 24)), "cls": str(label).encode()}


def test_truncated_shard_yields_what_is_whole_and_counts_the_rest(tmp_path, caplog):
    data, offsets = tar_bytes([good_sample(i) for i in range(6)])
    cut = tmp_path / "train-000000.tar"
    cut.write_bytes(data[: offsets[3] + 700])  # inside the 4th sample's image
    shard = ShardInfo(cut.name, 6, "unused", len(data))
    with caplog.at_level(logging.WARNING, logger="vit_core.data"):
        rows = [r for t in read_shard(str(cut), shard, 0, 4) for r in t.to_pylist()]
    assert [r["key"] for r in rows[:3]] == ["00000000", "00000001", "00000002"]
    assert all(r["error"] == "" for r in rows[:3])
    assert len(rows) == 6 and all(r["error"].startswith("lost: truncated") for r in rows[3:])
    message = " ".join(r.getMessage() for r in caplog.records)
    assert str(cut) in message and "read 3 of the 6 indexed samples, 3 lost" in message

    at_boundary = tmp_path / "train-000001.tar"
    at_boundary.write_bytes(data[: offsets[4]])  # a clean cut between samples
    rows = [r for t in read_shard(str(at_boundary), shard, 0, 100) for r in t.to_pylist()]
    assert sum(r["error"] == "" for r in rows) == 4 and len(rows) == 6


def test_mixup_fn_from_config():
    assert mixup_fn(DataConfig(), 10) is None
    images, labels = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 3, 4, 5])
    smooth = mixup_fn(DataConfig(label_smoothing=0.1), 10)
    same, targets = smooth(images.clone(), labels)
    assert torch.equal(same, images) and targets.shape == (6, 10)
    assert torch.allclose(targets.sum(1), torch.ones(6)) and targets[0, 0] == pytest.approx(0.91)
    mix = mixup_fn(DataConfig(mixup=0.8, cutmix=1.0, label_smoothing=0.1), 10)
    for n in (6, 5, 1):  # odd batches (bad rows dropped) still work
        mixed, soft = mix(images[:n].clone(), labels[:n])
        assert mixed.shape == (n, 3, 8, 8) and soft.shape == (n, 10)
        assert torch.allclose(soft.sum(1), torch.ones(n))


def test_bad_rows_carry_a_good_rows_content_and_are_counted():
    batch = {
        "image": np.stack([np.full((3, 2, 2), v, np.float32) for v in (1, 0, 3, 0)]),
        "label": np.array([5, 0, 7, 0]),
        "valid": np.array([True, False, True, False]),
    }
    for a in batch.values():
        a.setflags(write=False)  # as Arrow-backed batches come
    out = _fill_bad_rows(batch)
    assert out["label"].tolist() == [5, 5, 7, 7]
    assert out["image"][1].eq(1).all() and out["image"][3].eq(3).all()
    counter = BadSampleCounter()
    counter.add(out["valid"])
    counter.add(torch.tensor([True, True]))
    assert (counter.bad, counter.seen) == (2, 6)
    assert counter.metrics() == {"data/bad_samples": 2, "data/bad_fraction": 2 / 6}
    images, labels, dropped = clean_batch(out)
    assert dropped == 2 and labels.tolist() == [5, 7] and images.shape[0] == 2


def test_normalised_batches_reuse_buffers_only_when_nothing_holds_them():
    images = np.random.default_rng(0).integers(0, 256, (4, 3, 2, 2), dtype=np.uint8)
    batch = {"image": images, "label": np.arange(4), "valid": np.ones(4, bool)}
    mean, std = np.array([0.4, 0.5, 0.6]), np.array([0.2, 0.25, 0.3])
    mean_std = (mean.tolist(), std.tolist())
    pool = FloatBufferPool(size=2)
    expected = (images / 255.0 - mean.reshape(1, 3, 1, 1)) / std.reshape(1, 3, 1, 1)
    kept = _fill_bad_rows(batch, mean_std, pool)["image"]  # a loop that keeps its batch
    assert np.allclose(kept.numpy(), expected, atol=1e-6)
    view = _fill_bad_rows(batch, mean_std, pool)["image"][1:]  # a view keeps its buffer too
    for _ in range(3):
        batch["image"] = images[::-1].copy()
        dropped = _fill_bad_rows(batch, mean_std, pool)["image"]
        address = dropped.data_ptr()
        del dropped
        assert _fill_bad_rows(batch, mean_std, pool)["image"].data_ptr() == address  # reused
    assert np.allclose(kept.numpy(), expected, atol=1e-6)  # never overwritten
    assert np.allclose(view.numpy(), expected[1:], atol=1e-6)


# ---- index checks before training --------------------------------------------------------


def test_missing_location_is_a_clear_error(s3_prefix, tmp_path):
    for location in (f"{s3_prefix}/nothing/v1", str(tmp_path / "nothing")):
        with pytest.raises(DatasetError, match=f"no dataset at {location}"):
            open_dataset(location)
    with pytest.raises(DatasetError, match="no-such-bucket-x.*bucket does not exist"):
        open_dataset("s3://no-such-bucket-x/d/v1")
    with pytest.raises(DatasetError, match=f"no dataset at {s3_prefix}/nothing/v1"):
        build_dataset(DataConfig(location=f"{s3_prefix}/nothing/v1"), "train", train=True)


def test_index_that_does_not_match_the_shards(s3_prefix):
    out = f"{s3_prefix}/digits/v1"
    index = make_digits_shards(out, shard_samples=400, progress=False)
    open_dataset(out, verify_level="full")

    def tampered(change) -> None:
        data = index.to_json()
        change(data["splits"])
        storage.write_bytes(f"{out}/index.json", json.dumps(data).encode())

    tampered(lambda s: s["train"]["shards"][1].__setitem__("sha256", "0" * 64))
    open_dataset(out)  # sizes still match
    with pytest.raises(
        DatasetError, match=rf"does not match the shards at {out}: train-000001.tar: sha256"
    ):
        open_dataset(out, verify_level="full")

    tampered(lambda s: s["val"]["shards"][0].__setitem__("num_samples", 5))
    with pytest.raises(DatasetError, match="val-000000.tar: holds 359 samples, the index says 5"):
        open_dataset(out, verify_level="full")

    storage.delete(f"{out}/train-000002.tar")
    tampered(lambda s: None)
    with pytest.raises(DatasetError, match=rf"at {out}: train-000002.tar: missing"):
        open_dataset(out)
    with pytest.raises(DatasetError, match="train-000002.tar: missing"):
        build_dataset(DataConfig(location=out), "train", train=True)

    storage.write_bytes(
        f"{out}/train-000002.tar", index.shards("train")[2].size_bytes * b"x" + b"!"
    )
    with pytest.raises(DatasetError, match=r"train-000002.tar: \d+ bytes stored, the index says"):
        open_dataset(out)  # larger than indexed: another file, not a damaged copy
    for shard in index.shards("val"):
        storage.write_bytes(f"{out}/{shard.name}", b"short")
    with pytest.raises(DatasetError, match="every shard of split 'val' is short"):
        open_dataset(out)
    with pytest.raises(DatasetError, match="has no split 'test'"):
        index.num_samples("test")


# ---- Ray Data and Ray Train --------------------------------------------------------------


def keys_of(ds) -> list[tuple[str, int, bool]]:
    rows = []
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        rows += zip(batch["key"], batch["label"].tolist(), batch["valid"].tolist(), strict=True)
    return rows


def test_bad_samples_are_skipped_and_counted_end_to_end(ray_client, s3_prefix):
    location = f"{s3_prefix}/bad/v1"
    odd, _ = tar_bytes(
        [
            good_sample(0, 0), good_sample(1, 1),
            ("00000002", {"jpg": b"not an image at all", "cls": b"0"}),
            good_sample(3, 2),
            ("00000004", {"png": image_bytes(4), "cls": b"99"}),  # out of range
            ("00000005", {"png": image_bytes(5)}),  # no label
            ("00000006", {"png": image_bytes(6), "cls": b"abc"}),
            good_sample(7, 1), good_sample(8, 2),
        ]
    )  # fmt: skip
    whole, offsets = tar_bytes([good_sample(10 + i, i % 3) for i in range(6)])
    cut = whole[: offsets[3] + 700]  # truncated: 3 whole samples, 3 lost
    shards = []
    for name, blob, count in (("train-000000.tar", odd, 9), ("train-000001.tar", cut, 6)):
        storage.write_bytes(f"{location}/{name}", blob)
        import hashlib

        shards.append(ShardInfo(name, count, hashlib.sha256(blob).hexdigest(), len(blob)))
    write_index(DatasetIndex(location, ["a", "b", "c"], {"train": shards}))

    cfg = DataConfig(location=location, image_size=16)
    ds = build_dataset(cfg, "train", train=True, with_keys=True)
    rows = keys_of(ds)
    assert len(rows) == 15  # every indexed sample has a row, good or bad
    good = {k for k, _, v in rows if v}
    assert good == {
        "00000000",
        "00000001",
        "00000003",
        "00000007",
        "00000008",
        "00000010",
        "00000011",
        "00000012",
    }
    assert sum(not v for _, _, v in rows) == 7

    counter = BadSampleCounter()
    seen_labels = []
    for images, labels, valid in iter_train_batches(ds, 4, "cpu", train=False, counter=counter):
        assert images.shape[1:] == (3, 16, 16) and images.dtype == torch.float32
        assert labels.dtype == torch.int64 and valid.dtype == torch.bool
        assert labels.min() >= 0 and labels.max() < 3  # safe for a loss even on bad rows
        seen_labels += labels[valid].tolist()
    assert (counter.bad, counter.seen) == (7, 15)
    assert sorted(seen_labels) == sorted([0, 1, 2, 1, 2, 0, 1, 2])


def whole_samples_before(path, cut: int) -> int:
    """Samples of a make_shards tar whose image and label lie wholly in its first `cut`
    bytes, found with tarfile (not the project's reader)."""
    import tarfile

    ends: dict[str, dict[str, int]] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            key, _, ext = member.name.partition(".")
            ends.setdefault(key, {})[ext] = member.offset_data + member.size
    return sum(1 for parts in ends.values() if max(parts["png"], parts["cls"]) <= cut)


def test_shard_short_on_storage_warns_and_its_lost_samples_count_as_bad(
    ray_client, tmp_path, caplog
):
    out = tmp_path / "digits"
    index = make_digits_shards(str(out), shard_samples=150, progress=False)
    short = out / "train-000004.tar"
    size = short.stat().st_size
    cut = size * 2 // 3
    good_left = whole_samples_before(short, cut)
    short.write_bytes(short.read_bytes()[:cut])
    assert 0 < good_left < 150

    with caplog.at_level(logging.WARNING, logger="vit_core.data"):
        opened = open_dataset(str(out))
    warnings = [r.getMessage() for r in caplog.records if "is short" in r.getMessage()]
    assert warnings == [
        f"shard {short} is short: {cut} bytes stored, the index says {size}; its readable "
        "samples are used, the rest count as bad samples"
    ]
    assert opened.version == index.version

    ds = build_dataset(DataConfig(location=str(out)), "train", train=False, with_keys=True)
    counter = BadSampleCounter()
    rows = sum(
        len(labels)
        for _, labels, _ in iter_train_batches(ds, 64, "cpu", train=False, counter=counter)
    )
    assert rows == counter.seen == index.num_samples("train") == 1438
    assert counter.bad == 150 - good_left


def test_local_path_mode_gives_back_exactly_what_was_written(ray_client, tmp_path):
    from sklearn.datasets import load_digits

    out = tmp_path / "digits"
    index = make_digits_shards(str(out), shard_samples=150, progress=False)
    cfg = DataConfig(location=str(out), image_size=32, eval_crop_pct=1.0)
    ds = build_dataset(cfg, "val", train=False, with_keys=True)
    ds.context.execution_options.preserve_order = True
    images, keys, labels = [], [], []
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        images.append(batch["image"])
        keys += list(batch["key"])
        labels += batch["label"].tolist()
    assert len(keys) == len(set(keys)) == index.num_samples("val") == 359
    target = load_digits().target
    assert labels == [int(target[int(k)]) for k in keys]
    # The eval transform at the stored size is the identity: pixels come back exactly.
    source = {s.key: s for s in open_source("digits").samples}
    pixels = np.concatenate(images)
    assert pixels.dtype == np.uint8 and pixels.shape == (359, 3, 32, 32)
    assert np.array_equal(pixels[:, 0], np.stack([source[k].pixels for k in keys]))
    # The loader normalises uint8 rows with the dataset's mean/std, as rows normalised in
    # the dataset would be.
    loaded = torch.cat([im for im, _, _ in iter_train_batches(ds, 100, "cpu", train=False)])
    assert loaded.dtype == torch.float32
    assert torch.allclose(loaded, (torch.from_numpy(pixels).float() / 255 - 0.5) / 0.5, atol=1e-6)
    raw = torch.cat(
        [im for im, _, _ in iter_train_batches(ds, 100, "cpu", train=False, normalize=False)]
    )
    assert raw.dtype == torch.uint8 and torch.equal(raw, torch.from_numpy(pixels))
    as_float = dataclasses.replace(
        cfg, normalize_on="dataset", mean=[0.2, 0.3, 0.4], std=[0.5, 0.6, 0.7]
    )
    float_ds = build_dataset(as_float, "val", train=False)
    float_ds.context.execution_options.preserve_order = True
    rows = np.concatenate([b["image"] for b in float_ds.iter_batches(batch_size=None)])
    assert rows.dtype == np.float32
    mean, std = (
        np.array([0.2, 0.3, 0.4]).reshape(1, 3, 1, 1),
        np.array([0.5, 0.6, 0.7]).reshape(1, 3, 1, 1),
    )
    assert np.allclose(rows, (pixels / 255 - mean) / std, atol=1e-5)
    again = torch.cat([im for im, _, _ in iter_train_batches(float_ds, 100, "cpu", train=False)])
    assert torch.allclose(again, torch.from_numpy(rows))


def test_shard_order_is_reshuffled_every_epoch(ray_client, tmp_path):
    out = tmp_path / "digits"
    make_digits_shards(str(out), shard_samples=100, progress=False)
    ds = build_dataset(DataConfig(location=str(out), seed=5), "train", train=True, with_keys=True)
    ds.context.execution_options.preserve_order = True

    def shard_sequence() -> list[str]:
        order = []
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for shard in batch["shard"]:
                if not order or order[-1] != shard:
                    order.append(shard)
        return order

    first, second = shard_sequence(), shard_sequence()
    assert sorted(first) == sorted(second) and len(first) == 15
    assert first != second
    eval_ds = build_dataset(DataConfig(location=str(out)), "train", train=False, with_keys=True)
    eval_ds.context.execution_options.preserve_order = True
    keys = [k for k, _, _ in keys_of(eval_ds)]
    assert keys == [k for k, _, _ in keys_of(eval_ds)]  # eval: same order every time
    # Training batches through the local shuffle buffer: all full, the short one dropped.
    shuffled = build_dataset(DataConfig(location=str(out), shuffle_buffer=256), "train", train=True)
    sizes = [len(labels) for _, labels, _ in iter_train_batches(shuffled, 64, "cpu", epoch=0)]
    assert sizes == [64] * (1438 // 64)


@pytest.mark.slow
def test_two_train_workers_get_every_sample_once(ray_client, tmp_path, s3_prefix):
    """Folder and digits shards on SeaweedFS, written by Ray tasks, read by 2 Ray Train workers."""
    import ray.train
    from ray.train.torch import TorchTrainer

    folder = make_image_folder(tmp_path / "photos", per_class=8)
    photos = make_shards(
        str(folder), f"{s3_prefix}/photos/v1", shard_samples=4, val_fraction=0.25,
        executor="ray", progress=False,
    )  # fmt: skip
    digits = make_digits_shards(f"{s3_prefix}/digits/v1", shard_samples=200, progress=False)
    # Ray Train splits with equal=True, which drops the rows that do not divide evenly;
    # both train splits hold an even number of samples, so nothing may go missing here.
    assert photos.num_samples("train") == 18 and digits.num_samples("train") == 1438
    datasets = {
        "photos": build_dataset(
            DataConfig(location=photos.location), "train", train=True, with_keys=True
        ),
        "digits": build_dataset(
            DataConfig(location=digits.location), "train", train=True, with_keys=True
        ),
    }
    results = tmp_path / "seen"
    results.mkdir()

    def per_worker(config):
        import json as json_
        import pathlib

        import ray.train as train

        rank = train.get_context().get_world_rank()
        seen = {}
        for name in ("photos", "digits"):
            rows = []
            for batch in train.get_dataset_shard(name).iter_batches(batch_size=64):
                assert batch["image"].shape[1:] == (3, 32, 32)
                columns = zip(batch["key"], batch["label"], batch["valid"], strict=True)
                rows += [[key, int(label), bool(valid)] for key, label, valid in columns]
            seen[name] = rows
        pathlib.Path(config["out"], f"rank{rank}.json").write_text(json_.dumps(seen))
        train.report({"rows": sum(len(r) for r in seen.values())})

    def read_on_two_workers(run: str) -> list[dict]:
        trainer = TorchTrainer(
            per_worker,
            train_loop_config={"out": str(results)},
            scaling_config=ray.train.ScalingConfig(num_workers=2, use_gpu=False),
            run_config=ray.train.RunConfig(name=run, storage_path=str(tmp_path / "runs")),
            datasets=datasets,
            dataset_config=ingest_config(DataConfig(preserve_order=True)),
        )
        trainer.fit()
        return [json.loads((results / f"rank{r}.json").read_text()) for r in (0, 1)]

    per_rank = read_on_two_workers("data-roundtrip")
    # data.preserve_order: a second run hands each worker the same rows in the same order.
    assert read_on_two_workers("data-roundtrip-again") == per_rank
    for name, index, source in (
        ("photos", photos, open_source(str(folder))),
        ("digits", digits, open_source("digits")),
    ):
        rows = [row for seen in per_rank for row in seen[name]]
        keys = [k for k, _, _ in rows]
        assert all(seen[name] for seen in per_rank)  # both workers got a share
        assert len(keys) == len(set(keys)) == index.num_samples("train")  # none twice, none lost
        written = set()
        for shard in index.shards("train"):
            from vit_core.data.index import open_stream
            from vit_core.data.shards import iter_samples

            with open_stream(index.shard_location(shard)) as stream:
                written |= {s.key for s in iter_samples(stream.read)}
        assert set(keys) == written
        labels = {s.key: s.label for s in source.samples}
        assert all(valid and label == labels[k] for k, label, valid in rows)
