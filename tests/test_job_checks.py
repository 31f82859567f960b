"""Inputs that no training can cure are refused on the driver, before Ray starts, in one
line naming what the user typed (and nothing is written)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SERVICE_VARIABLES = ("AWS_", "MLFLOW_", "RAY_ADDRESS", "RAY_API_SERVER", "RAY_AUTH")


class Payload:
    """A pickle that would run code when unpickled."""

    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def run_pretrain(cwd: Path, *overrides: str, env_extra: dict | None = None):
    env = {k: v for k, v in os.environ.items() if not k.startswith(SERVICE_VARIABLES)}
    env.update(env_extra or {})
    command = [sys.executable, str(ROOT / "pipelines" / "pretrain.py")]
    for override in overrides:
        command += ["--set", override]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A directory with the embedded digits made once."""
    from vit_core.data import make_digits_shards

    cwd = tmp_path_factory.mktemp("checks")
    make_digits_shards(str(cwd / "data" / "digits" / "v1"), progress=False)
    return cwd


def assert_one_line_error(proc, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]


@pytest.mark.parametrize(
    ("overrides", "fragments"),
    [
        (["model.img_size=33", "data.image_size=33"], ["model:", "img_size=33", "patch_size=8"]),
        (["data.image_size=48"], ["data.image_size 48", "model.img_size 32"]),
        (["run_name=../escape"], ["run_name '../escape'"]),
        (["tracking.registered_model=team/vit"], ["'team/vit'", "'/'"]),
        (["data.val_split=test"], ["data.val_split", "'test'"]),
        (["scaling.wait_for_workers_s=0"], ["scaling.wait_for_workers_s: 0"]),
        (["scaling.num_workers=2..1"], ["scaling.num_workers: '2..1'", "MIN <= MAX"]),
    ],
)
def test_bad_job_inputs_fail_on_the_driver(workdir, overrides, fragments):
    proc = run_pretrain(workdir, *overrides)
    assert_one_line_error(proc, *fragments)
    assert "local Ray" not in proc.stdout  # refused before any cluster started
    assert not (workdir / "runs").exists()


def test_pickled_starting_weights_are_refused_before_training(workdir):
    torch.save({"state_dict": Payload()}, workdir / "evil.pth")  # as a trainer saves
    proc = run_pretrain(workdir, f"model.init_from={workdir / 'evil.pth'}")
    assert_one_line_error(proc, "model.init_from", "evil.pth", "posix.system")
    assert not (workdir / "PWNED").exists()


def test_refused_s3_checkpoint_is_named_by_its_uri(workdir, s3):
    from vit_core import storage

    uri = "s3://vit/tests/checks/evil.pth"
    buf = io.BytesIO()
    torch.save({"state_dict": Payload()}, buf)
    storage.write_bytes(uri, buf.getvalue())
    proc = run_pretrain(workdir, f"model.init_from={uri}", env_extra=s3.env())
    assert_one_line_error(proc, uri)
    assert "cache" not in proc.stderr.splitlines()[-1]
