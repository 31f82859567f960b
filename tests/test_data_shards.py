"""make_shards: sources to WebDataset shards + index.json, locally and on SeaweedFS."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_data_helpers import fake_cifar_archive, image_bytes, make_image_folder

from vit_core import storage
from vit_core.data import (
    DatasetError,
    make_digits_shards,
    make_shards,
    open_dataset,
    open_source,
    read_index,
)
from vit_core.data.index import open_stream
from vit_core.data.shards import ShardCorruptError, iter_members, iter_samples
from vit_core.data.sources import Source, SourceSample

ROOT = Path(__file__).resolve().parents[1]


def stored_samples(index, split: str) -> dict[str, tuple[int, str, bytes]]:
    """{key: (label, extension, image bytes)} read straight from the stored tars."""
    out = {}
    for shard in index.shards(split):
        with open_stream(index.shard_location(shard)) as stream:
            for sample in iter_samples(stream.read):
                assert sample.error is None, sample
                assert sample.key not in out, f"{sample.key} twice"
                out[sample.key] = (sample.label, sample.ext, sample.image)
    return out


def test_digits_round_trip_local(tmp_path):
    from sklearn.datasets import load_digits

    index = make_digits_shards(str(tmp_path / "digits"), image_size=32, progress=False)
    digits = load_digits()
    assert index.num_classes == 10 and index.class_names == [str(i) for i in range(10)]
    assert index.num_samples("train") + index.num_samples("val") == len(digits.target)
    # Stratified 80/20: every class has its share in val.
    train, val = stored_samples(index, "train"), stored_samples(index, "val")
    assert not set(train) & set(val)
    val_labels = np.bincount([label for label, _, _ in val.values()], minlength=10)
    assert np.all(np.abs(val_labels - 0.2 * np.bincount(digits.target)) <= 1)
    for key, (label, ext, _) in {**train, **val}.items():
        assert label == digits.target[int(key)]
        assert ext == "png"
    # The PNG holds the 8x8 digit scaled to 0..255 and upscaled: its block means match.
    label, _, data = train[next(iter(train))]
    big = np.asarray(Image.open(io.BytesIO(data)), dtype=np.float32)
    assert big.shape == (32, 32)
    source = digits.images[int(next(iter(train)))] * 255 / 16
    assert np.abs(big.reshape(8, 4, 8, 4).mean(axis=(1, 3)) - source).mean() < 25
    # The written index is the one open_dataset reads back, checksums and counts included.
    opened = open_dataset(str(tmp_path / "digits"), verify_level="full")
    assert opened.version == index.version
    assert opened.to_json()["splits"] == index.to_json()["splits"]


def test_same_seed_same_bytes_other_seed_other_split(tmp_path):
    a = make_digits_shards(str(tmp_path / "a"), seed=3, progress=False)
    b = make_digits_shards(str(tmp_path / "b"), seed=3, progress=False)
    c = make_digits_shards(str(tmp_path / "c"), seed=4, progress=False)
    assert a.version == b.version  # byte-identical shards
    assert a.version != c.version
    assert set(stored_samples(a, "val")) != set(stored_samples(c, "val"))


def test_image_folder_to_s3_skips_unreadable_images(tmp_path, s3_prefix):
    root = make_image_folder(tmp_path / "photos", per_class=8)
    (root / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff this is no jpeg")
    (root / "dog" / "notes.txt").write_text("not an image file, not listed")
    (root / "README.md").write_text("beside the class folders: ignored")
    out = f"{s3_prefix}/photos/v1"

    index = make_shards(str(root), out, shard_samples=4, val_fraction=0.25, progress=False)

    assert index.class_names == ["cat", "dog", "eel"]
    assert index.skipped == 1
    assert index.skipped_examples[0]["source"].endswith("dog/broken.jpg")
    assert "not a readable image" in index.skipped_examples[0]["reason"]
    assert index.num_samples("train") == 18 and index.num_samples("val") == 6
    assert [s.name for s in index.shards("train")] == [f"train-00000{i}.tar" for i in range(5)]
    names = sorted(u.rsplit("/", 1)[-1] for u in storage.list_files(out))
    assert names == sorted(
        ["index.json"] + [s.name for s in index.shards("train") + index.shards("val")]
    )
    # Original bytes are kept when no re-encoding is asked for, with their format.
    source = {s.key: s for s in open_source(str(root)).samples}
    stored = {**stored_samples(index, "train"), **stored_samples(index, "val")}
    assert len(stored) == 24
    for key, (label, ext, data) in stored.items():
        assert label == source[key].label
        assert data == Path(source[key].path).read_bytes()
        assert Path(source[key].path).suffix == f".{ext}"
    # Each shard holds a mix: the split was shuffled before cutting it.
    first = stored_samples(index, "train")
    assert len({first[k][0] for k in list(first)[:4]}) > 1
    open_dataset(out, verify_level="full")


def test_reencode_with_max_side_and_quality(tmp_path):
    root = tmp_path / "big" / "only"
    root.mkdir(parents=True)
    for i in range(3):
        (root / f"{i}.png").write_bytes(image_bytes(i, (300, 120), "png"))
    index = make_shards(
        str(tmp_path / "big"), str(tmp_path / "out"), max_side=64, jpeg_quality=80,
        val_fraction=0.0, progress=False,
    )  # fmt: skip
    assert list(index.splits) == ["train"]
    for _, ext, data in stored_samples(index, "train").values():
        img = Image.open(io.BytesIO(data))
        assert ext == "jpg" and img.format == "JPEG"
        assert img.size == (64, 26)


def test_shard_size_in_bytes(tmp_path):
    index = make_shards("digits", str(tmp_path / "d"), shard_bytes=256 << 20, progress=False)
    one = index.shards("train")[0]  # 256 MiB holds all 1438
    assert len(index.shards("train")) == 1
    target = one.size_bytes // 5
    index = make_shards("digits", str(tmp_path / "e"), shard_bytes=target, progress=False)
    sizes = [s.size_bytes for s in index.shards("train")]
    assert 4 <= len(sizes) <= 7
    assert all(size <= target * 1.3 for size in sizes)


def test_csv_manifest_with_relative_paths_and_names(tmp_path):
    make_image_folder(tmp_path / "imgs", per_class=3, classes=("a", "b"))
    lines = ["path,label"]
    for p in sorted((tmp_path / "imgs").rglob("*.*")):
        lines.append(f"{p.relative_to(tmp_path)},{p.parent.name}")
    lines.append("imgs/a/missing.png,a")  # a listed image that is not there: skipped
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")

    index = make_shards(
        str(tmp_path / "labels.csv"), str(tmp_path / "out"), val_fraction=0.0, progress=False
    )

    assert index.class_names == ["a", "b"]
    assert index.num_samples("train") == 6 and index.skipped == 1
    labels = sorted(label for label, _, _ in stored_samples(index, "train").values())
    assert labels == [0, 0, 0, 1, 1, 1]


def test_jsonl_manifest_with_integer_labels_and_s3_uris(tmp_path, s3_prefix):
    uris = []
    for i in range(4):
        uri = f"{s3_prefix}/raw/{i}.png"
        storage.write_bytes(uri, image_bytes(i))
        uris.append(uri)
    manifest = f"{s3_prefix}/manifest.jsonl"
    storage.write_bytes(
        manifest,
        "".join(json.dumps({"uri": u, "label": i % 3}) + "\n" for i, u in enumerate(uris)).encode(),
    )
    index = make_shards(manifest, f"{s3_prefix}/out", val_fraction=0.0, progress=False)
    assert index.class_names == ["0", "1", "2"]
    stored = stored_samples(index, "train")
    assert {k: v[0] for k, v in stored.items()} == {f"{i:08d}": i % 3 for i in range(4)}


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("m.csv", "file,label\na.png,x\nb.png\n", "m.csv line 3: 1 fields, the header has 2"),
        ("m.csv", "name,kind\na.png,x\n", "m.csv line 1: the header needs a path column"),
        ("m.csv", "path,label\n,x\n", "m.csv line 2: empty path"),
        (
            "m.jsonl",
            '{"path": "a.png", "label": 1}\n{"path": "b.png"\n',
            "m.jsonl line 2: not valid JSON",
        ),
        (
            "m.jsonl",
            '{"path": "a.png", "label": 1}\n\n["b.png", 2]\n',
            "m.jsonl line 3: expected a JSON object",
        ),
        ("m.jsonl", '{"image": "a.png", "label": [1]}\n', "m.jsonl line 1: invalid label"),
        ("m.jsonl", "", "m.jsonl: the manifest lists no images"),
    ],
)
def test_bad_manifest_lines_name_the_file_and_line(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(DatasetError, match=message):
        make_shards(str(tmp_path / name), str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists()  # nothing written for bad input


def test_missing_inputs_are_named(tmp_path):
    with pytest.raises(DatasetError, match=f"image folder not found: {tmp_path}/nope"):
        make_shards(str(tmp_path / "nope"), str(tmp_path / "out"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no images found in .*empty"):
        make_shards(str(tmp_path / "empty"), str(tmp_path / "out"))
    with pytest.raises(DatasetError, match="cannot read the manifest: .*gone.csv"):
        make_shards(str(tmp_path / "gone.csv"), str(tmp_path / "out"))
    with pytest.raises(DatasetError, match="CIFAR-10 archive not found"):
        make_shards(str(tmp_path / "cifar-10-python.tar.gz"), str(tmp_path / "out"))


def test_fake_cifar_archive_keeps_its_split(tmp_path):
    archive = tmp_path / "cifar-10-python.tar.gz"
    fake = fake_cifar_archive(archive, per_batch=6, batches=2, test=5)
    index = make_shards(str(archive), str(tmp_path / "cifar"), shard_samples=5, progress=False)
    assert index.class_names == fake["names"]
    assert index.num_samples("train") == 12 and index.num_samples("val") == 5
    train, val = stored_samples(index, "train"), stored_samples(index, "val")
    # Keys count through data_batch_1, data_batch_2, then test_batch; pixels are exact (PNG).
    expected = []
    for name in ("data_batch_1", "data_batch_2", "test_batch"):
        data, labels = fake["batches"][name]
        expected += list(
            zip(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels, strict=True)
        )
    for key, (label, ext, blob) in {**train, **val}.items():
        pixels, true_label = expected[int(key)]
        assert label == true_label and ext == "png"
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(blob))), pixels)
    assert {int(k) for k in val} == set(range(12, 17))
    # An explicit fraction replaces the archive's split with a seeded one.
    again = make_shards(str(archive), str(tmp_path / "c2"), val_fraction=0.5, progress=False)
    assert again.num_samples("val") != 5 or set(stored_samples(again, "val")) != set(val)


def test_not_a_cifar_archive(tmp_path):
    bad = tmp_path / "cifar-10-python.tar.gz"
    bad.write_bytes(b"certainly not gzip")
    with pytest.raises(DatasetError, match="not a readable tar archive"):
        make_shards(str(bad), str(tmp_path / "out"))
    import tarfile

    with tarfile.open(bad, "w:gz") as tar:
        data = b"x"
        info = tarfile.TarInfo("cifar-10-batches-py/readme.html")
        info.size = 1
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(DatasetError, match="not a CIFAR-10 python archive"):
        make_shards(str(bad), str(tmp_path / "out"))


def test_existing_dataset_is_not_overwritten_unless_asked(tmp_path):
    out = str(tmp_path / "d")
    first = make_digits_shards(out, shard_samples=500, progress=False)
    with pytest.raises(DatasetError, match="a dataset already exists at .*--overwrite"):
        make_digits_shards(out, progress=False)
    assert read_index(out).version == first.version  # untouched
    second = make_digits_shards(out, overwrite=True, shard_samples=2000, progress=False)
    left = sorted(p.name for p in Path(out).iterdir())
    assert left == ["index.json", "train-000000.tar", "val-000000.tar"]  # stale shards gone
    assert second.version != first.version


def test_index_is_written_last(tmp_path):
    out = str(tmp_path / "d")
    make_digits_shards(out, progress=False)
    good = SourceSample(0, 0, pixels=np.zeros((8, 8), np.uint8))
    broken = SourceSample(1, 0, pixels=np.zeros((8, 8, 7), np.uint8))  # no such image mode
    source = Source("broken on purpose", ["x"], [good, broken])
    with pytest.raises(TypeError):
        make_shards(
            source, out, overwrite=True, val_fraction=0.0, shard_samples=1, executor="local",
            progress=False,
        )  # fmt: skip
    # The old index went first, the new one never came: not taken for a finished dataset.
    assert not (Path(out) / "index.json").exists()
    with pytest.raises(DatasetError, match="no index.json at .*not a finished dataset"):
        open_dataset(out)


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "pipelines" / "make_shards.py"), *args],
        capture_output=True, text=True, cwd=ROOT, env=env or os.environ.copy(), timeout=300,
    )  # fmt: skip


def test_cli_writes_digits_and_gives_one_line_errors(tmp_path):
    ok = run_cli("--source", "digits", "--out", str(tmp_path / "digits"))
    assert ok.returncode == 0, ok.stderr
    assert "wrote" in ok.stdout and "train 1438" in ok.stdout
    # The same dataset as the embedded demo's, byte for byte.
    assert make_digits_shards(str(tmp_path / "demo"), progress=False).version in ok.stdout
    assert "samples/s" in ok.stderr  # progress with a rate
    assert (
        json.loads((tmp_path / "digits" / "index.json").read_text())["totals"]["num_samples"]
        == 1797
    )

    again = run_cli("--source", "digits", "--out", str(tmp_path / "digits"))
    missing = run_cli("--source", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x"))
    for result, text in ((again, "already exists"), (missing, "image folder not found")):
        assert result.returncode == 2
        assert result.stderr.startswith("error: ") and text in result.stderr
        assert "Traceback" not in result.stderr


def test_cli_error_for_a_missing_bucket_has_no_secret(s3, tmp_path):
    result = run_cli("--source", "digits", "--out", "s3://no-such-bucket-here/d/v1")
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "no-such-bucket-here" in result.stderr
    assert "Traceback" not in result.stderr
    assert s3.secret_key not in result.stderr + result.stdout


# ---- the tar reader ------------------------------------------------------------------------


def tar_with(names: list[str], fmt: int) -> bytes:
    """A tar of files named `names` (content: the name), a directory and a symlink, in
    one of tarfile's formats."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tar:
        directory = tarfile.TarInfo("a-directory")
        directory.type = tarfile.DIRTYPE
        tar.addfile(directory)
        for name in names:
            info = tarfile.TarInfo(name)
            info.size = len(name.encode())
            tar.addfile(info, io.BytesIO(name.encode()))
        link = tarfile.TarInfo("a-link")
        link.type, link.linkname = tarfile.SYMTYPE, names[0]
        tar.addfile(link)
    return out.getvalue()


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_reader_reads_regular_files_as_tarfile_does(fmt):
    names = ["0001.jpg", "0001.cls", f"{'d' * 120}/0002.png", "0002.cls"]
    if fmt != tarfile.USTAR_FORMAT:
        names.append(f"{'x' * 130}.webp")  # longer than a USTAR name: GNU or pax records
    data = tar_with(names, fmt)
    members = list(iter_members(io.BytesIO(data).read))
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        expected = [(m.name, tar.extractfile(m).read()) for m in tar if m.isreg()]
    assert members == expected == [(n, n.encode()) for n in names]


def test_tar_reader_stops_at_a_damaged_or_cut_header():
    data = tar_with(["0001.jpg", "0001.cls", "0002.jpg"], tarfile.USTAR_FORMAT)
    second = 512 * 3  # after the directory's header and 0001.jpg's header and content

    def names_until_error(raw: bytes) -> tuple[list[str], str]:
        names = []
        try:
            for name, _ in iter_members(io.BytesIO(raw).read):
                names.append(name)
        except ShardCorruptError as err:
            return names, str(err)
        return names, ""

    assert names_until_error(data) == (["0001.jpg", "0001.cls", "0002.jpg"], "")
    damaged = bytearray(data)
    damaged[second + 3] ^= 0x20  # one flipped bit in the name: the checksum no longer holds
    names, error = names_until_error(bytes(damaged))
    assert names == ["0001.jpg"] and "damaged tar header" in error
    names, error = names_until_error(data[: second + 100])
    assert names == ["0001.jpg"] and error == "truncated tar header"
