"""vit_core.storage against a real SeaweedFS, and the same calls on local paths."""

import os
import pickle
import re
import threading
import time

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


def _after(seconds: float, fn) -> threading.Thread:
    """Run fn in a thread after `seconds`, as an operator restarting a service would."""
    thread = threading.Thread(target=lambda: (time.sleep(seconds), fn()))
    thread.start()
    return thread


def test_calls_wait_through_a_storage_outage(private_s3, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("VIT_STORAGE_RETRY_SECONDS", "60")
    storage.write_bytes("s3://vit/outage/before.bin", b"written before")
    (tmp_path / "ckpt.bin").write_bytes(os.urandom(9 << 20))  # a multipart upload
    calls = {
        "read": lambda: storage.read_bytes("s3://vit/outage/before.bin"),
        "write": lambda: storage.write_bytes("s3://vit/outage/during.bin", b"written during"),
        "upload": lambda: storage.upload_file(tmp_path / "ckpt.bin", "s3://vit/outage/ckpt.bin"),
        "list": lambda: storage.list_files("s3://vit/outage"),
    }
    results, took = {}, {}

    def timed(name):
        t0 = time.monotonic()
        results[name] = calls[name]()
        took[name] = time.monotonic() - t0

    private_s3.stop()
    outage = 12
    t_down = time.monotonic()
    threads = [threading.Thread(target=timed, args=(name,)) for name in calls]
    for thread in threads:
        thread.start()
    _after(outage, private_s3.start).join()
    for thread in threads:
        thread.join(timeout=120)
    assert time.monotonic() - t_down >= outage
    assert sorted(results) == sorted(calls), "every call should have returned"
    assert min(took.values()) >= outage - 1  # each really waited for the store
    assert results["read"] == b"written before"
    assert storage.read_bytes("s3://vit/outage/during.bin") == b"written during"
    assert storage.read_bytes("s3://vit/outage/ckpt.bin") == (tmp_path / "ckpt.bin").read_bytes()
    lines = [r.getMessage() for r in caplog.records if r.name == "vit_core.storage"]
    assert lines == [f"storage unreachable, retrying for up to 60 s: {private_s3.endpoint}"]
    assert private_s3.secret_key not in caplog.text


def test_an_outage_past_the_deadline_is_one_clear_error(private_s3, monkeypatch):
    monkeypatch.setenv("VIT_STORAGE_RETRY_SECONDS", "3")
    private_s3.stop()
    t0 = time.monotonic()
    with pytest.raises(storage.StorageError) as err:
        storage.read_bytes("s3://vit/anything")
    assert time.monotonic() - t0 >= 3
    assert re.fullmatch(
        rf"cannot reach the S3 endpoint {private_s3.endpoint} for s3://vit/anything "
        r"\(retried for \d+ s\)",
        str(err.value),
    )
    monkeypatch.setenv("VIT_STORAGE_RETRY_SECONDS", "soon")
    with pytest.raises(storage.StorageError, match="VIT_STORAGE_RETRY_SECONDS must be a number"):
        storage.read_bytes("s3://vit/anything")


def test_a_stream_cut_midway_resumes_from_the_byte_reached(private_s3, monkeypatch):
    monkeypatch.setenv("VIT_STORAGE_RETRY_SECONDS", "60")
    payload = os.urandom(24 << 20)  # more than the sockets between client and store buffer
    storage.write_bytes("s3://vit/stream/shard.tar", payload)
    ranges = []
    storage.s3_client().meta.events.register(
        "before-parameter-build.s3.GetObject",
        lambda params, **_: ranges.append(params.get("Range")),
    )
    with storage.open_read("s3://vit/stream/shard.tar") as stream:
        head = stream.read(1 << 20)
        private_s3.stop()  # cuts the connection the rest of the object was coming through
        restart = _after(5, private_s3.start)
        rest = stream.read()
    restart.join()
    assert head + rest == payload
    resumed = [r for r in ranges if r]
    assert resumed and all(r.startswith("bytes=") and int(r[6:-1]) >= 1 << 20 for r in resumed)


def test_a_stream_of_a_replaced_object_fails_rather_than_splices(private_s3):
    storage.write_bytes("s3://vit/stream/a.bin", os.urandom(24 << 20))
    with storage.open_read("s3://vit/stream/a.bin") as stream:
        stream.read(1 << 20)
        storage.write_bytes("s3://vit/stream/a.bin", b"a new version")
        private_s3.restart()  # the old connection is cut; the resume finds another object
        with pytest.raises(storage.StorageError, match="a.bin changed while it was being read"):
            stream.read()


def test_pyarrow_filesystem_waits_through_an_outage(private_s3, tmp_path, monkeypatch):
    monkeypatch.setenv("VIT_STORAGE_RETRY_SECONDS", "60")
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "model.pt").write_bytes(os.urandom(1 << 20))
    fs, path = storage.pyarrow_filesystem("s3://vit/arrow-outage")
    # A copy, as Ray Train pickles it to its controller and workers (pyarrow's own
    # pickling of an S3FileSystem drops the retry strategy).
    fs = pickle.loads(pickle.dumps(fs))
    private_s3.stop()
    restart = _after(10, private_s3.start)
    t0 = time.monotonic()
    # What Ray Train does with a checkpoint directory.
    pafs.copy_files(str(tmp_path / "ckpt"), path, destination_filesystem=fs)
    assert time.monotonic() - t0 >= 9
    restart.join()
    got = storage.read_bytes("s3://vit/arrow-outage/model.pt")
    assert got == (tmp_path / "ckpt" / "model.pt").read_bytes()


def test_arrow_attempts_cover_the_deadline():
    assert storage.arrow_max_attempts(0) == 1
    # 0.5 + 1 + 2 + 4 + 8 s expected before the sixth try, then 14 to 20 s a try (20 s cap).
    assert storage.arrow_max_attempts(15) == 6
    assert storage.arrow_max_attempts(120) == 12
