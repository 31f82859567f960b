"""vit_core.storage against a real SeaweedFS, and the same calls on local paths."""

import os

import pyarrow.fs as pafs
import pytest

from vit_core import storage


def test_put_get_list_delete_through_s3(s3_prefix):
    storage.write_bytes(f"{s3_prefix}/a/one.bin", b"first")
    storage.write_bytes(f"{s3_prefix}/a/two.bin", b"second")
    storage.write_bytes(f"{s3_prefix}/b.txt", b"third")

    assert storage.read_bytes(f"{s3_prefix}/a/two.bin") == b"second"
    assert storage.exists(f"{s3_prefix}/b.txt")
    assert not storage.exists(f"{s3_prefix}/missing.txt")
    assert storage.list_files(s3_prefix) == [
        f"{s3_prefix}/a/one.bin",
        f"{s3_prefix}/a/two.bin",
        f"{s3_prefix}/b.txt",
    ]
    storage.delete(f"{s3_prefix}/a")
    assert storage.list_files(s3_prefix) == [f"{s3_prefix}/b.txt"]


def test_local_paths_take_the_same_calls(tmp_path):
    root = str(tmp_path / "store")
    storage.write_bytes(storage.join(root, "x", "y.bin"), b"local")
    assert storage.read_bytes(f"{root}/x/y.bin") == b"local"
    assert storage.list_files(root) == [f"{root}/x/y.bin"]
    assert storage.materialize(f"{root}/x") == tmp_path / "store" / "x"


def test_materialize_downloads_a_prefix(s3_prefix, tmp_path, monkeypatch):
    monkeypatch.setenv("VIT_CACHE_DIR", str(tmp_path / "cache"))
    storage.write_bytes(f"{s3_prefix}/model/config.json", b"{}")
    storage.write_bytes(f"{s3_prefix}/model/weights/w.bin", b"123")
    # Directory markers, as pyarrow (and so Ray Train's checkpoint upload) leaves them.
    marker = storage.S3Location.parse(f"{s3_prefix}/model/")
    storage.s3_client().put_object(Bucket=marker.bucket, Key=marker.key, Body=b"")
    assert storage.list_files(f"{s3_prefix}/model") == [
        f"{s3_prefix}/model/config.json", f"{s3_prefix}/model/weights/w.bin"
    ]  # fmt: skip
    local = storage.materialize(f"{s3_prefix}/model")
    assert (local / "config.json").read_bytes() == b"{}"
    assert (local / "weights" / "w.bin").read_bytes() == b"123"


def test_open_read_streams_in_any_read_sizes(s3_prefix, tmp_path):
    payload = os.urandom(3 << 20)  # three of open_read's 1 MB requests
    storage.write_bytes(f"{s3_prefix}/big.bin", payload)
    (tmp_path / "big.bin").write_bytes(payload)
    for location in (f"{s3_prefix}/big.bin", str(tmp_path / "big.bin")):
        with storage.open_read(location) as stream:
            parts = [stream.read(512), stream.read(700_000), stream.read(2 << 20), stream.read()]
        assert [len(p) for p in parts[:2]] == [512, 700_000] and b"".join(parts) == payload
    for missing in (f"{s3_prefix}/nope.bin", str(tmp_path / "nope.bin")):
        with pytest.raises(storage.StorageError, match=f"{missing}"):
            storage.open_read(missing)


def test_pyarrow_filesystem_reads_what_boto3_wrote(s3_prefix):
    storage.write_bytes(f"{s3_prefix}/arrow.txt", b"via arrow")
    fs, path = storage.pyarrow_filesystem(f"{s3_prefix}/arrow.txt")
    assert isinstance(fs, pafs.S3FileSystem)
    with fs.open_input_stream(path) as f:
        assert f.read() == b"via arrow"


def test_missing_bucket_is_one_clear_error(s3):
    with pytest.raises(storage.StorageError, match="bucket does not exist: s3://no-such-bucket/x"):
        storage.read_bytes("s3://no-such-bucket/x")


def test_missing_key_is_one_clear_error(s3_prefix):
    with pytest.raises(storage.StorageError, match=r"not found: s3://vit/tests/\w+/nope"):
        storage.read_bytes(f"{s3_prefix}/nope")


def test_wrong_credentials_are_named_without_leaking_the_secret(s3, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "wrongkey")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-value")
    with pytest.raises(storage.StorageError) as err:
        storage.read_bytes("s3://vit/anything")
    assert "access denied" in str(err.value)
    assert "wrong-secret-value" not in str(err.value)
    assert s3.secret_key not in str(err.value)


def test_endpoint_comes_from_the_standard_variables(s3, monkeypatch):
    assert storage.endpoint_url() == s3.endpoint
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    assert storage.endpoint_url() == os.environ["AWS_ENDPOINT_URL"]
    storage.write_bytes("s3://vit/tests/generic-endpoint.txt", b"ok")
    assert storage.read_bytes("s3://vit/tests/generic-endpoint.txt") == b"ok"
