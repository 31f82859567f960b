"""WebDataset shards written by the `webdataset` library, indexed in place and trained on."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image
from test_data_helpers import image_bytes

from vit_core import storage
from vit_core.data import (
    BadSampleCounter,
    DataConfig,
    DatasetError,
    build_dataset,
    index_existing_shards,
    iter_train_batches,
    open_dataset,
    read_index,
)

ROOT = Path(__file__).resolve().parents[1]
ANIMALS = ["dog", "cat", "bird"]


def solid_png(red: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.full((20, 24, 3), (red, 0, 0), np.uint8)).save(out, "PNG")
    return out.getvalue()


def black_jpg() -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(out, "JPEG")
    return out.getvalue()


def red_of(name: str) -> int:
    """The PNG of a sample labelled `name` is this red, so the row tells which member the
    reader took and which label went with it."""
    return 40 + 60 * sorted(ANIMALS).index(name)


def write_captioned_shards(root: Path) -> dict[str, dict[str, str]]:
    """img2dataset-like shards through webdataset's ShardWriter: every sample has a black
    .jpg and a coloured .png, a .txt caption, and its label in the `label` field of its
    .json; sample 00007 has no label. Returns {split: {key: label}}."""
    labels: dict[str, dict[str, str]] = {"train": {}, "val": {}}
    (root / "validation").mkdir(parents=True)
    writers = {
        "train": wds.ShardWriter(str(root / "part-%05d.tar"), maxcount=5, verbose=0),
        "val": wds.ShardWriter(str(root / "validation" / "part-%05d.tar"), maxcount=5, verbose=0),
    }
    for i in range(17):
        split = "val" if i % 4 == 3 else "train"
        key = f"{i:05d}"
        name = ANIMALS[i % 3]
        meta = {"caption": f"a {name}", "width": 24} | ({} if i == 7 else {"label": name})
        writers[split].write(
            {"__key__": key, "jpg": black_jpg(), "png": solid_png(red_of(name)),
             "txt": f"a photo of a {name}", "json": meta}
        )  # fmt: skip
        if i != 7:
            labels[split][key] = name
    for writer in writers.values():
        writer.close()
    return labels


def test_json_labels_several_images_and_extra_members_train_in_place(ray_client, tmp_path):
    root = tmp_path / "captioned"
    expected = write_captioned_shards(root)
    before = {p: p.read_bytes() for p in root.rglob("*.tar")}

    index = index_existing_shards(
        str(root), splits={"train": "part-*.tar", "val": "validation/*.tar"},
        label="json:label", image_extensions=["png", "jpg"], executor="ray", progress=False,
    )  # fmt: skip

    assert {p: p.read_bytes() for p in root.rglob("*.tar")} == before  # never rewritten
    stored = json.loads((root / "index.json").read_text())
    assert stored["format_version"] == 2
    assert stored["layout"] == {
        "image_extensions": ["png", "jpg"], "label": "json:label", "labels_are": "names"
    }  # fmt: skip
    assert stored["class_names"] == ["bird", "cat", "dog"]
    assert [s["name"] for s in stored["splits"]["train"]["shards"]] == [
        "part-00000.tar", "part-00001.tar", "part-00002.tar"
    ]  # fmt: skip
    assert [s["name"] for s in stored["splits"]["val"]["shards"]] == ["validation/part-00000.tar"]
    for shard in index.shards("train") + index.shards("val"):
        data = (root / shard.name).read_bytes()
        assert shard.sha256 == hashlib.sha256(data).hexdigest()
        assert shard.size_bytes == len(data)
    assert index.num_samples("train") == 13 and index.num_samples("val") == 4  # 00007 too
    assert stored["settings"]["samples_without_image_or_label"] == 1
    assert open_dataset(str(root), verify_level="full").version == index.version

    for split in ("train", "val"):
        cfg = DataConfig(location=str(root), image_size=8)
        ds = build_dataset(cfg, split, train=False, with_keys=True)
        counter = BadSampleCounter()
        seen = {}
        batches = iter_train_batches(ds, 4, "cpu", train=False, counter=counter, normalize=False)
        for images, labels, valid in batches:
            for image, label in zip(images[valid], labels[valid], strict=True):
                name = index.class_names[int(label)]
                assert int(image[0].float().mean().round()) == red_of(name)  # the PNG
                seen[name] = seen.get(name, 0) + 1
        assert counter.seen == index.num_samples(split)
        assert counter.bad == (1 if split == "val" else 0)  # 00007: no label
        wanted = {}
        for name in expected[split].values():
            wanted[name] = wanted.get(name, 0) + 1
        assert seen == wanted


def test_cls_labels_in_s3_with_keys_read_back(ray_client, s3_prefix, tmp_path):
    local = tmp_path / "shards"
    local.mkdir()
    labels = {}
    with wds.ShardWriter(str(local / "shard-%06d.tar"), maxcount=4, verbose=0) as writer:
        for i in range(10):
            labels[f"img{i:03d}"] = i % 4
            writer.write({"__key__": f"img{i:03d}", "webp": image_bytes(i, (20, 20), "webp"),
                          "cls": i % 4})  # fmt: skip
    for path in sorted(local.glob("*.tar")):
        storage.upload_file(path, f"{s3_prefix}/wds/{path.name}")

    index = index_existing_shards(f"{s3_prefix}/wds", progress=False)  # Ray is up: Ray tasks

    assert index.class_names == ["0", "1", "2", "3"] and index.num_samples("train") == 10
    assert read_index(f"{s3_prefix}/wds").to_json()["format_version"] == 1  # our own layout
    ds = build_dataset(
        DataConfig(location=f"{s3_prefix}/wds", image_size=16), "train", train=False,
        with_keys=True,
    )  # fmt: skip
    rows = {}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for key, label, valid in zip(batch["key"], batch["label"], batch["valid"], strict=True):
            assert valid
            rows[key] = int(label)
    assert rows == labels


def tar_of(samples: dict[str, dict[str, bytes]]) -> bytes:
    out = io.BytesIO()
    writer = wds.TarWriter(out)
    for key, members in samples.items():
        writer.write({"__key__": key, **members})
    writer.close()
    return out.getvalue()


def test_given_class_names_and_string_cls_labels_without_ray(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    png = image_bytes(1, (16, 16))
    (root / "a.tar").write_bytes(
        tar_of({f"k{i}": {"png": png, "cls": ["zebra", "ant"][i % 2]} for i in range(6)})
    )
    index = index_existing_shards(
        str(root), class_names=["zebra", "yak", "ant"], executor="local", progress=False
    )
    assert index.class_names == ["zebra", "yak", "ant"]
    assert index.layout.class_names == ("zebra", "yak", "ant")
    derived = index_existing_shards(str(root), overwrite=True, executor="local", progress=False)
    assert derived.class_names == ["ant", "zebra"]  # sorted names
    assert derived.version != index.version


def test_bad_input_is_one_clear_error_and_writes_no_index(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    png = image_bytes(1, (16, 16))
    (root / "train-0.tar").write_bytes(tar_of({"a": {"png": png, "cls": 0}}))
    (root / "val-0.tar").write_bytes(tar_of({"b": {"png": png, "cls": 5}}))

    def fails(match: str, location=root, **kw) -> None:
        with pytest.raises(DatasetError, match=match):
            index_existing_shards(str(location), executor="local", progress=False, **kw)
        assert not (root / "index.json").exists()

    fails(f"no shards at {tmp_path}/nowhere", location=tmp_path / "nowhere")
    fails("split 'val': no file under .* matches 'valid-\\*.tar'", splits={"val": "valid-*.tar"})
    fails("shard val-0.tar .* matches the patterns of splits 'train' and 'val'",
          splits={"train": "*.tar", "val": "val-*"})  # fmt: skip
    fails("label 5 under .*: only 2 class names given", class_names=["x", "y"])
    fails("label key 'json:': expected", label="json:")
    fails("no sample under .* has a readable label", label="json:label")
    cut = (root / "train-0.tar").read_bytes()
    (root / "train-0.tar").write_bytes(cut[:700])
    fails(r"shard .*train-0.tar is not a readable tar \(truncated")
    (root / "train-0.tar").write_bytes(cut)
    index_existing_shards(str(root), executor="local", progress=False)
    with pytest.raises(DatasetError, match="index.json already exists at .*--overwrite"):
        index_existing_shards(str(root), executor="local", progress=False)


def test_cli_indexes_in_place_and_gives_one_line_errors(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    png = image_bytes(2, (16, 16))
    for name in ("train-0.tar", "train-1.tar", "val-0.tar"):
        (root / name).write_bytes(
            tar_of({f"{name[:-4]}-{i}": {"png": png, "json": {"y": i % 3}} for i in range(3)})
        )
    script = str(ROOT / "pipelines" / "make_shards.py")

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, script, "--index-existing", str(root), *args],
            capture_output=True, text=True, cwd=ROOT, timeout=120,
        )  # fmt: skip

    ok = cli("--split", "train=train-*.tar", "--split", "val=val-*.tar", "--label-key", "json:y",
             "--class-names", "a,b,c", "--quiet")  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert "indexed" in ok.stdout and "train 6, val 3 samples, 3 classes, 3 shards" in ok.stdout
    assert read_index(str(root)).class_names == ["a", "b", "c"]
    again = cli("--label-key", "json:y")
    assert again.returncode == 2 and again.stderr.startswith("error: ")
    assert "already exists" in again.stderr and "Traceback" not in again.stderr
    with tarfile.open(root / "val-0.tar") as tar:  # untouched by the indexing
        assert [m.name for m in tar] == [
            f"val-0-{i}.{e}" for i in range(3) for e in ("json", "png")
        ]
