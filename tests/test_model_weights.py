"""Checkpoints: timm, Hugging Face, JAX .npz and our own format load to the same logits."""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import pickle
import shlex
from types import SimpleNamespace

import numpy as np
import pytest
import timm
import torch
import transformers
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer as TimmViT
from timm.models.vision_transformer import checkpoint_filter_fn
from timm.utils import CheckpointSaver, ModelEmaV3

from vit_core.model import (
    CheckpointError,
    VisionTransformer,
    ViTConfig,
    create_model,
    export_npz,
    load_checkpoint,
    read_checkpoint,
    save_model,
)

ATOL = 1e-4
NUM_CLASSES = 10

# ours, timm's name, HF config for the same architecture
SIZES = {
    "s16": ("vit_s16", "vit_small_patch16_224", dict(hidden_size=384, num_attention_heads=6)),
    "b16": ("vit_b16", "vit_base_patch16_224", dict(hidden_size=768, num_attention_heads=12)),
}
SIZE_PARAMS = [pytest.param("s16"), pytest.param("b16", marks=pytest.mark.slow)]


def perturb_(model: torch.nn.Module, seed: int) -> None:
    """Random weights everywhere, LayerNorms and the head included, so nothing is trivially 0/1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)


def assert_logits_close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    assert b.abs().max() > 1e-3  # a non-trivial comparison
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(1)
    return SimpleNamespace(
        x224=torch.randn(2, 3, 224, 224, generator=g), x384=torch.randn(2, 3, 384, 384, generator=g)
    )


@pytest.fixture(scope="module", params=SIZE_PARAMS)
def timm_src(request, images, tmp_path_factory):
    ours, timm_name, _ = SIZES[request.param]
    torch.manual_seed(0)
    model = timm.create_model(timm_name, pretrained=False, num_classes=NUM_CLASSES).eval()
    perturb_(model, 0)
    sd = model.state_dict()
    d = tmp_path_factory.mktemp(f"timm_{request.param}")
    torch.save(sd, d / "model.pth")
    with torch.no_grad():
        logits = model(images.x224)
    return SimpleNamespace(name=ours, timm_name=timm_name, sd=sd, dir=d, logits=logits)


@pytest.fixture(scope="module")
def timm_logits_384(timm_src, images):
    """timm's own model at 384, its position embeddings resampled by timm."""
    model = timm.create_model(
        timm_src.timm_name, pretrained=False, num_classes=NUM_CLASSES, img_size=384
    ).eval()
    model.load_state_dict(checkpoint_filter_fn(timm_src.sd, model))
    with torch.no_grad():
        return model(images.x384)


def logits(model: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


# ---- timm ----------------------------------------------------------------------------


def test_timm_pth(timm_src, images):
    model = create_model(timm_src.name, checkpoint=timm_src.dir / "model.pth")
    assert model.config.num_classes == NUM_CLASSES  # head taken from the checkpoint
    assert_logits_close(logits(model, images.x224), timm_src.logits)


def test_timm_safetensors_and_in_memory(timm_src, images, tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file(timm_src.sd, str(path))
    assert_logits_close(logits(create_model(timm_src.name, path), images.x224), timm_src.logits)
    # a training checkpoint wrapped by DDP and torch.compile, in memory, no name
    wrapped = {"state_dict": {f"module._orig_mod.{k}": v for k, v in timm_src.sd.items()}}
    model = create_model(checkpoint=wrapped)
    assert_logits_close(logits(model, images.x224), timm_src.logits)


def test_timm_checkpoint_at_384(timm_src, timm_logits_384, images):
    model = create_model(timm_src.name, checkpoint=timm_src.dir / "model.pth", img_size=384)
    assert model.pos_embed.shape[1] == 1 + 24 * 24
    # the class token's embedding is kept as is
    torch.testing.assert_close(model.pos_embed[:, 0], timm_src.sd["pos_embed"][:, 0])
    assert_logits_close(logits(model, images.x384), timm_logits_384)


def test_dynamic_size_equals_resampled_load(timm_src, timm_logits_384, images):
    # a 224 model fed 384 images interpolates on the fly, the same as loading at 384
    model = create_model(timm_src.name, checkpoint=timm_src.sd)
    assert_logits_close(logits(model, images.x384), timm_logits_384)


# ---- JAX .npz ------------------------------------------------------------------------


def test_npz_layout_and_logits(timm_src, timm_logits_384, images, tmp_path):
    ref = create_model(timm_src.name, checkpoint=timm_src.sd)
    heads, dim = ref.config.num_heads, ref.config.embed_dim
    path = export_npz(ref, tmp_path / "vit.npz")
    with np.load(path, allow_pickle=False) as npz:
        keys = set(npz.files)
        assert npz["embedding/kernel"].shape == (16, 16, 3, dim)  # HWIO
        q = npz["Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel"]
        assert q.shape == (dim, heads, dim // heads)
        out = npz["Transformer/encoderblock_11/MultiHeadDotProductAttention_1/out/kernel"]
        assert out.shape == (heads, dim // heads, dim)
        assert npz["head/kernel"].shape == (dim, NUM_CLASSES)
    assert {
        "cls",
        "Transformer/posembed_input/pos_embedding",
        "Transformer/encoder_norm/scale",
    } <= keys
    assert "Transformer/encoderblock_0/MlpBlock_3/Dense_1/bias" in keys

    # ours, no name needed: heads are in the kernel shapes
    model = create_model(checkpoint=path)
    assert model.config.num_heads == heads
    assert_logits_close(logits(model, images.x224), timm_src.logits)
    # timm's reader of the authors' checkpoints agrees: the layout is the real one
    tmodel = timm.create_model(timm_src.timm_name, pretrained=False, num_classes=NUM_CLASSES)
    tmodel.load_pretrained(str(path))
    assert_logits_close(logits(tmodel, images.x224), timm_src.logits)
    # and at 384 from the 224 npz
    model384 = create_model(timm_src.name, checkpoint=path, img_size=384)
    assert_logits_close(logits(model384, images.x384), timm_logits_384)


def test_npz_pretrain_head_and_big_vision_names(tmp_path):
    src = tiny_model(head="pretrain", representation_size=40)
    x = torch.randn(2, 3, 32, 32)
    path = export_npz(src, tmp_path / "p.npz")
    with np.load(path) as npz:
        assert npz["pre_logits/kernel"].shape == (64, 40)
        w = dict(npz)
    model = create_model(checkpoint=path)
    assert model.config.head == "pretrain" and model.config.representation_size == 40
    torch.testing.assert_close(logits(model, x), logits(src, x))
    # big_vision renames blocks' sub-layers and the position embedding
    ren = {}
    for k, v in w.items():
        k = k.replace("MultiHeadDotProductAttention_1", "MultiHeadDotProductAttention_0")
        k = k.replace("MlpBlock_3", "MlpBlock_0").replace("LayerNorm_2", "LayerNorm_1")
        k = k.replace("Transformer/posembed_input/pos_embedding", "pos_embedding")
        ren["params/" + k] = v
    model = create_model(checkpoint=ren)
    torch.testing.assert_close(logits(model, x), logits(src, x))


# ---- Hugging Face --------------------------------------------------------------------


@pytest.fixture(scope="module", params=SIZE_PARAMS)
def hf_src(request, images, tmp_path_factory):
    ours, _, dims = SIZES[request.param]
    cfg = transformers.ViTConfig(
        **dims,
        intermediate_size=4 * dims["hidden_size"],
        num_hidden_layers=12,
        image_size=224,
        patch_size=16,
        num_labels=NUM_CLASSES,
    )
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(cfg).eval()
    perturb_(model, 1)
    d = tmp_path_factory.mktemp(f"hf_{request.param}")
    model.save_pretrained(d)
    with torch.no_grad():
        out = model(pixel_values=images.x224).logits
    return SimpleNamespace(name=ours, model=model, dir=d, logits=out)


def test_hf_save_pretrained_folder(hf_src, images):
    model = create_model(checkpoint=hf_src.dir)  # architecture from HF's config.json
    assert model.config.norm_eps == 1e-12 and model.config.num_classes == NUM_CLASSES
    assert_logits_close(logits(model, images.x224), hf_src.logits)


def test_hf_bin_and_in_memory(hf_src, images, tmp_path):
    # the classic pytorch_model.bin next to config.json
    from safetensors.torch import load_file

    sd = load_file(str(hf_src.dir / "model.safetensors"))
    (tmp_path / "config.json").write_text((hf_src.dir / "config.json").read_text())
    torch.save(sd, tmp_path / "pytorch_model.bin")
    model = create_model(hf_src.name, checkpoint=tmp_path)
    assert_logits_close(logits(model, images.x224), hf_src.logits)
    # the in-memory state dict of transformers 5 uses other names (layers.N.attention.q_proj)
    live = hf_src.model.state_dict()
    assert any(".q_proj." in k for k in live)
    model = create_model(hf_src.name, checkpoint=live, norm_eps=1e-12)
    assert_logits_close(logits(model, images.x224), hf_src.logits)


def test_hf_vitmodel_pooler_becomes_pre_logits(tmp_path):
    cfg = transformers.ViTConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        image_size=32,
        patch_size=8,
    )
    torch.manual_seed(0)
    hf = transformers.ViTModel(cfg, add_pooling_layer=True).eval()
    perturb_(hf, 2)
    hf.save_pretrained(tmp_path)
    model = create_model(checkpoint=tmp_path, head="pretrain", num_classes=3).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = hf(pixel_values=x)
        ours = model.forward_head(model.forward_features(x), pre_logits=True)
        torch.testing.assert_close(
            model.forward_features(x), ref.last_hidden_state, atol=ATOL, rtol=0
        )
    torch.testing.assert_close(ours, ref.pooler_output, atol=ATOL, rtol=0)
    assert torch.count_nonzero(model.head.weight) == 0  # new classifier, zero-initialised


# ---- our own format and head handling --------------------------------------------------


def tiny_model(**kw) -> VisionTransformer:
    cfg = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=5)
    cfg.update(kw)
    torch.manual_seed(0)
    model = VisionTransformer(ViTConfig(**cfg)).eval()
    perturb_(model, 3)
    return model


def test_own_format_round_trip(tmp_path):
    src = tiny_model(head="pretrain", pool="avg", img_size=(32, 48), norm_eps=1e-5)
    save_model(src, tmp_path / "m")
    assert {p.name for p in (tmp_path / "m").iterdir()} == {"model.safetensors", "config.json"}
    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    assert meta["format"] == "vit_core" and meta["config"]["embed_dim"] == 64
    model = create_model(checkpoint=tmp_path / "m")  # no name needed
    assert model.config == src.config
    x = torch.randn(2, 3, 32, 48)
    torch.testing.assert_close(logits(model, x), logits(src, x))
    # the weights file alone still finds its config beside it
    model = create_model(checkpoint=tmp_path / "m" / "model.safetensors")
    torch.testing.assert_close(logits(model, x), logits(src, x))
    # non-square grid resampled from the recorded size
    model = create_model(checkpoint=tmp_path / "m", img_size=(64, 64))
    assert model.pos_embed.shape[1] == 1 + 8 * 8


def test_head_kept_or_replaced(tmp_path):
    src = tiny_model()
    save_model(src, tmp_path)
    x = torch.randn(2, 3, 32, 32)
    feats = src.forward_features(x)

    kept = create_model(checkpoint=tmp_path)
    torch.testing.assert_close(kept.head.weight, src.head.weight)

    other = create_model(checkpoint=tmp_path, num_classes=7)  # class count differs
    assert other.head.out_features == 7 and torch.count_nonzero(other.head.weight) == 0
    torch.testing.assert_close(other.forward_features(x), feats)

    forced = create_model(checkpoint=tmp_path, replace_head=True)  # same count, forced
    assert forced.head.out_features == 5 and torch.count_nonzero(forced.head.weight) == 0
    torch.testing.assert_close(forced.forward_features(x), feats)

    # a pretraining head is dropped as a whole when fine-tuning with a linear head
    pre = tiny_model(head="pretrain")
    save_model(pre, tmp_path / "pre")
    ft = create_model(checkpoint=tmp_path / "pre", head="linear")
    assert isinstance(ft.pre_logits, torch.nn.Identity)
    assert torch.count_nonzero(ft.head.weight) == 0
    left = load_checkpoint(tiny_model(num_classes=0), tmp_path / "pre")
    assert left == []  # headless model: the checkpoint's head is ignored, all else loaded


def test_timm_state_dict_without_name_needs_heads():
    import timm.models.vision_transformer as tv

    src = tv.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=5
    )
    with pytest.raises(CheckpointError, match="attention heads"):
        create_model(checkpoint=src.state_dict())
    model = create_model(checkpoint=src.state_dict(), num_heads=4)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), src.eval()(x), atol=ATOL, rtol=0)


# ---- errors --------------------------------------------------------------------------


def one_clear_error(exc_info) -> str:
    err = exc_info.value
    assert isinstance(err, CheckpointError)
    # no chained library traceback
    assert err.__cause__ is None and (err.__context__ is None or err.__suppress_context__)
    return str(err)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError) as e:
        create_model("vit_ti16", checkpoint=tmp_path / "nope.pth")
    msg = one_clear_error(e)
    assert "nope.pth" in msg and "no such file" in msg


def test_unknown_format(tmp_path):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"this is not a checkpoint at all")
    with pytest.raises(CheckpointError) as e:
        create_model("vit_ti16", checkpoint=junk)
    assert "junk.bin" in one_clear_error(e) and "unknown format" in str(e.value)
    with pytest.raises(CheckpointError, match="unknown format"):
        create_model("vit_ti16", checkpoint={"foo.weight": torch.zeros(2)})
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="not exactly one weights file"):
        read_checkpoint(empty)
    with pytest.raises(CheckpointError, match="remote"):
        read_checkpoint("s3://bucket/model")


def test_shape_mismatch_names_file_and_key(tmp_path):
    save_model(tiny_model(), tmp_path)
    with pytest.raises(CheckpointError) as e:
        create_model("vit_ti16", checkpoint=tmp_path)
    msg = one_clear_error(e)
    assert str(tmp_path) in msg and "shape mismatch for key '" in msg
    # wrong mlp width: a key other than the embeddings
    with pytest.raises(CheckpointError, match=r"'blocks\.0\.mlp\.fc1\.weight'"):
        load_checkpoint(tiny_model(mlp_ratio=2.0), tmp_path)


def test_unexpected_and_missing_keys(tmp_path):
    sd = tiny_model().state_dict()
    sd["blocks.0.ls1.gamma"] = torch.ones(64)
    with pytest.raises(CheckpointError, match=r"'blocks\.0\.ls1\.gamma'"):
        load_checkpoint(tiny_model(), sd)
    del sd["blocks.0.ls1.gamma"], sd["norm.bias"]
    with pytest.raises(CheckpointError, match=r"missing key\(s\) 'norm\.bias'"):
        load_checkpoint(tiny_model(), sd)
    assert load_checkpoint(tiny_model(), sd, strict=False) == ["norm.bias"]


class _Evil:
    """Unpickling this would create a file: weights-only loading must refuse."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_pickled_code_is_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"patch_embed.proj.weight": torch.zeros(1), "x": _Evil(marker)}, path)
    with pytest.raises(CheckpointError) as e:
        create_model("vit_ti16", checkpoint=path)
    msg = one_clear_error(e)
    assert "evil.pth" in msg and "never executed" in msg
    assert not marker.exists()


# ---- timm training checkpoints ---------------------------------------------------------

TINY_TIMM = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=5)


@pytest.fixture(scope="module")
def timm_train(tmp_path_factory):
    """model_best.pth.tar as timm's train.py leaves it, written by timm's own CheckpointSaver.

    The model is saved as wrapped for data parallelism (keys 'module.*', as older timm and
    other trainers store it), the EMA is a step behind the trained weights and the args are
    an argparse.Namespace.
    """
    torch.manual_seed(0)
    model = TimmViT(**TINY_TIMM)
    perturb_(model, 4)
    ema = ModelEmaV3(model, decay=0.5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randn(2, 3, 32, 32)
    model(x).sum().backward()
    opt.step()
    ema.update(model)  # halfway between the old and the new weights
    args = argparse.Namespace(model="vit_tiny_custom", lr=1e-2, epochs=3, input_size=(3, 32, 32))
    d = tmp_path_factory.mktemp("timm_train")
    saver = CheckpointSaver(
        torch.nn.DataParallel(model),
        opt,
        args=args,
        model_ema=ema,
        checkpoint_dir=str(d),
        unwrap_fn=lambda m: m,
        max_history=1,
    )
    saver.save_checkpoint(epoch=2, metric=71.5)
    # DeiT's layout of the same: 'model', 'model_ema', and numpy scalars among the metadata
    deit = {
        "model": model.state_dict(),
        "model_ema": ema.module.state_dict(),
        "optimizer": opt.state_dict(),
        "epoch": np.int64(2),
        "max_accuracy": np.float32(71.5),
        "best_loss": np.float64(0.9),
        "args": args,
    }
    torch.save(deit, d / "deit.pth")
    with torch.no_grad():
        trained, averaged = model.eval()(x), ema.module.eval()(x)
    return SimpleNamespace(
        path=d / "model_best.pth.tar", deit=d / "deit.pth", x=x, trained=trained, ema=averaged
    )


def test_timm_training_checkpoint_trained_or_ema(timm_train):
    # the file is the case that failed: plain weights-only loading refuses its Namespace
    with pytest.raises(pickle.UnpicklingError, match="argparse.Namespace"):
        torch.load(timm_train.path, weights_only=True)
    assert (timm_train.trained - timm_train.ema).abs().max() > 1e-3  # two different models

    model = create_model(checkpoint=timm_train.path, num_heads=4)
    assert_logits_close(logits(model, timm_train.x), timm_train.trained)
    ema = create_model(checkpoint=timm_train.path, num_heads=4, use_ema=True)
    assert_logits_close(logits(ema, timm_train.x), timm_train.ema)
    # into an existing model, and timm's own loader picks the same EMA weights
    target = VisionTransformer(ViTConfig(**TINY_TIMM))
    assert load_checkpoint(target, timm_train.path, use_ema=True) == []
    assert_logits_close(logits(target, timm_train.x), timm_train.ema)
    reference = TimmViT(**TINY_TIMM)
    timm.models.load_checkpoint(reference, str(timm_train.path), use_ema=True)
    assert_logits_close(logits(target, timm_train.x), logits(reference, timm_train.x))


def test_deit_style_checkpoint_with_numpy_scalars(timm_train):
    model = create_model(checkpoint=timm_train.deit, num_heads=4)
    assert_logits_close(logits(model, timm_train.x), timm_train.trained)
    ema = create_model(checkpoint=timm_train.deit, num_heads=4, use_ema=True)
    assert_logits_close(logits(ema, timm_train.x), timm_train.ema)


def test_use_ema_without_ema_weights(timm_src):
    with pytest.raises(CheckpointError) as e:
        create_model(timm_src.name, checkpoint=timm_src.dir / "model.pth", use_ema=True)
    msg = one_clear_error(e)
    assert "model.pth" in msg and "no EMA weights" in msg


class _SystemCall:
    """os.system on unpickling: a payload that must never run."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


class _TrainerState:
    """A harmless custom class: still not plain data, so still refused."""

    step = 3


def test_unsafe_training_checkpoints_are_refused_in_one_line(tmp_path):
    marker = tmp_path / "pwned"
    weights = tiny_model().state_dict()
    torch.save({"state_dict": weights, "args": _SystemCall(marker)}, tmp_path / "system.pth.tar")
    torch.save({"state_dict": weights, "trainer": _TrainerState()}, tmp_path / "custom.pth.tar")
    with open(tmp_path / "plain.pkl", "wb") as f:  # pickle.dump, not torch.save
        pickle.dump({"state_dict": weights, "args": _SystemCall(marker)}, f, protocol=4)
    cases = {"system.pth.tar": "system", "custom.pth.tar": "_TrainerState", "plain.pkl": "pickle"}
    for name, blocked in cases.items():
        with pytest.raises(CheckpointError) as e:
            create_model("vit_ti16", checkpoint=tmp_path / name)
        msg = one_clear_error(e)
        assert "\n" not in msg and "\x1b" not in msg and "two options" not in msg
        assert name in msg and blocked in msg, msg
        assert "never executed" in msg and "torch.save(model.state_dict())" in msg
    assert not marker.exists()


# ---- hybrid (ResNet + ViT) and other input channels --------------------------------------


def write_npz(path: pathlib.Path, arrays: dict[str, np.ndarray]) -> pathlib.Path:
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return path


@pytest.fixture
def plain_npz(tmp_path) -> dict[str, np.ndarray]:
    with np.load(export_npz(tiny_model(), tmp_path / "plain.npz")) as npz:
        return dict(npz)


def test_hybrid_checkpoints_are_refused(plain_npz, tmp_path):
    # the authors' R50+ViT layout at toy sizes: ResNet root and units, then a 1x1 patch
    # embedding over the ResNet's 32 feature channels
    rng = np.random.default_rng(0)
    stem = {
        "conv_root/kernel": (7, 7, 3, 8),
        "gn_root/scale": (8,),
        "gn_root/bias": (8,),
        "block1/unit1/conv1/kernel": (1, 1, 8, 4),
        "block1/unit1/gn1/scale": (4,),
        "block1/unit1/conv_proj/kernel": (1, 1, 8, 32),
        "embedding/kernel": (1, 1, 32, 64),
    }
    arrays = {**plain_npz, **{k: rng.standard_normal(v, dtype=np.float32) for k, v in stem.items()}}
    path = write_npz(tmp_path / "R50+ViT-B_16.npz", arrays)
    for name in (None, "vit_b16"):  # with a name, the name is not blamed
        with pytest.raises(CheckpointError) as e:
            create_model(name, checkpoint=path)
        msg = one_clear_error(e)
        assert "R50+ViT-B_16.npz" in msg and "hybrid (ResNet + ViT, paper section 3.1)" in msg
        assert "model name" not in msg
    # timm's hybrid, in memory
    hybrid = timm.create_model("vit_tiny_r_s16_p8_224", pretrained=False)
    with pytest.raises(CheckpointError, match=r"hybrid .*'patch_embed\.backbone\."):
        create_model(checkpoint=hybrid.state_dict())


def test_other_input_channels_refused_unless_recorded_or_asked(plain_npz, tmp_path):
    # a 1x1 patch embedding over 32 channels with no ResNet keys: refused by its channels
    arrays = dict(plain_npz)
    arrays["embedding/kernel"] = np.zeros((1, 1, 32, 64), np.float32)
    with pytest.raises(CheckpointError) as e:
        create_model(checkpoint=write_npz(tmp_path / "odd.npz", arrays))
    msg = one_clear_error(e)
    assert "odd.npz" in msg and "takes 32 input channels, not 3" in msg

    torch.manual_seed(0)
    gray = TimmViT(**TINY_TIMM, in_chans=1).eval()
    with pytest.raises(CheckpointError, match="pass in_chans=1"):
        create_model(checkpoint=gray.state_dict(), num_heads=4)
    x = torch.randn(2, 1, 32, 32)
    model = create_model(checkpoint=gray.state_dict(), num_heads=4, in_chans=1)
    torch.testing.assert_close(logits(model, x), logits(gray, x), atol=ATOL, rtol=0)
    # this project's format records its channels: no option needed
    save_model(model, tmp_path / "gray")
    assert create_model(checkpoint=tmp_path / "gray").config.in_chans == 1
