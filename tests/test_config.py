"""Typed configs: presets, dotted overrides, and errors that name the key."""

import subprocess
import sys
from pathlib import Path

import pytest

from vit_core.config import ConfigError, flatten, load_config
from vit_core.train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ROOT / "pipelines" / "configs"


@pytest.mark.parametrize("preset", sorted(p.name for p in PRESETS.glob("*.yaml")))
def test_every_preset_loads(preset):
    import yaml

    from vit_core.tune.config import SearchConfig

    # A search preset (a `tune` section) is for pipelines/tune.py, the others for training.
    search = "tune" in (yaml.safe_load((PRESETS / preset).read_text()) or {})
    cfg = load_config(SearchConfig if search else TrainConfig, PRESETS / preset)
    assert cfg.train.global_batch_size > 0


def test_paper_recipe_presets_hold_the_paper_values():
    i21k = load_config(TrainConfig, PRESETS / "vit_b16_i21k.yaml")
    assert (i21k.optim.name, i21k.optim.lr, i21k.optim.weight_decay) == ("adam", 1e-3, 0.03)
    assert (i21k.optim.warmup_steps, i21k.optim.schedule) == (10000, "linear")
    assert (i21k.train.global_batch_size, i21k.model.drop_rate, i21k.model.img_size) == (4096, 0.1, 224)
    i1k = load_config(TrainConfig, PRESETS / "vit_b16_i1k.yaml")
    assert (i1k.optim.lr, i1k.optim.schedule, i1k.optim.weight_decay) == (3e-3, "cosine", 0.3)
    # Fine-tuning (section 3.2, Table 4): SGD 0.9, no decay, batch 512, a step budget, 384 px.
    for name, steps in (("vit_b16_cifar10_384.yaml", 10_000), ("vit_b16_i1k_384.yaml", 20_000)):
        ft = load_config(TrainConfig, PRESETS / name)
        assert (ft.optim.name, ft.optim.momentum, ft.optim.weight_decay) == ("sgd", 0.9, 0.0)
        assert (ft.train.global_batch_size, ft.train.steps, ft.optim.clip_grad_norm) == (512, steps, 1.0)
        assert (ft.model.img_size, ft.model.replace_head, ft.model.head) == (384, True, "linear")


def test_dotted_overrides_are_typed():
    cfg = load_config(
        TrainConfig,
        PRESETS / "digits_tiny.yaml",
        ["optim.lr=3e-4", "train.epochs=2", "scaling.use_gpu=true", "optim.betas=[0.9, 0.95]"],
    )
    assert cfg.optim.lr == 3e-4
    assert cfg.train.epochs == 2
    assert cfg.scaling.use_gpu is True
    assert cfg.optim.betas == [0.9, 0.95]
    assert flatten(cfg)["optim.lr"] == 3e-4


def test_int_is_accepted_where_a_float_is_expected():
    assert load_config(TrainConfig, None, ["optim.lr=1"]).optim.lr == 1.0


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lrr=0.1", "unknown config key optim.lrr"),
        ("nosuch.key=1", "unknown config key nosuch"),
        ("train.epochs=ten", "train.epochs: expected an integer, got 'ten'"),
        ("optim.schedule=step", "optim.schedule: 'step' is not one of"),
        ("scaling.use_gpu=maybe", "scaling.use_gpu: expected true or false"),
        ("optim.lr.x=1", "optim.lr.x: lr is a value, not a section"),
        ("optim.lr", "must look like key.path=value"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("'", "'")):
        load_config(TrainConfig, None, [override])


def test_unknown_key_in_a_preset_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochz: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown config key train\.epochz"):
        load_config(TrainConfig, bad)


def test_cli_prints_the_resolved_config_and_fails_cleanly():
    script = str(ROOT / "pipelines" / "pretrain.py")
    ok = subprocess.run(
        [sys.executable, script, "--print-config", "--set", "optim.lr=0.005"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert "lr: 0.005" in ok.stdout
    bad = subprocess.run(
        [sys.executable, script, "--print-config", "--set", "optim.lrr=1"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: unknown config key optim.lrr")
    assert len(bad.stderr.strip().splitlines()) == 1
    assert "Traceback" not in bad.stderr
