"""The ViT architecture: structure, sizes against timm, training features, compile, autocast."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn

from vit_core.model import (
    Block,
    VisionTransformer,
    ViTConfig,
    create_model,
    list_models,
    load_checkpoint,
    resample_pos_embed,
)
from vit_core.model.vit import DropPath, PreLogits


def tiny(**kw) -> VisionTransformer:
    cfg = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=5)
    cfg.update(kw)
    torch.manual_seed(0)
    return VisionTransformer(ViTConfig(**cfg))


# ---- sizes ---------------------------------------------------------------------------

TIMM_NAMES = {
    "vit_ti16": "vit_tiny_patch16_224",
    "vit_s16": "vit_small_patch16_224",
    "vit_s32": "vit_small_patch32_224",
    "vit_b16": "vit_base_patch16_224",
    "vit_b32": "vit_base_patch32_224",
    "vit_l16": "vit_large_patch16_224",
    "vit_l32": "vit_large_patch32_224",
    "vit_h14": "vit_huge_patch14_224",
}


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("name", sorted(TIMM_NAMES))
def test_param_count_matches_timm(name):
    # meta device: shapes only, so L/16 and H/14 cost no memory or init time
    with torch.device("meta"):
        ours = create_model(name)
        ref = timm.create_model(TIMM_NAMES[name], pretrained=False, num_classes=1000)
    assert n_params(ours) == n_params(ref)
    # and the names are timm's, so state dicts line up one to one
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in ref.state_dict().items()
    }


def test_paper_sizes():
    with torch.device("meta"):
        sizes = {n: n_params(create_model(n)) / 1e6 for n in ("vit_b16", "vit_l16", "vit_h14")}
    assert sizes["vit_b16"] == pytest.approx(86.6, abs=0.1)
    assert sizes["vit_l16"] == pytest.approx(304.3, abs=0.1)
    assert sizes["vit_h14"] == pytest.approx(632.0, abs=0.1)


def test_list_models_and_overrides():
    assert {"vit_ti16", "vit_s16", "vit_b16", "vit_b32", "vit_l16", "vit_l32", "vit_h14"} <= set(
        list_models()
    )
    with torch.device("meta"):
        m = create_model("vit_b16", img_size=384, num_classes=10, pool="avg", head="pretrain")
    assert m.pos_embed.shape == (1, 24 * 24 + 1, 768)
    assert m.head.out_features == 10
    assert isinstance(m.pre_logits, PreLogits)
    assert m.config.pool == "avg"
    with pytest.raises(ValueError, match="unknown model 'vit_q16'"):
        create_model("vit_q16")
    with pytest.raises(TypeError, match="unknown option"):
        create_model("vit_ti16", num_clases=3)
    with pytest.raises(ValueError, match="class_token"):
        create_model("vit_ti16", class_token=False)  # token pooling needs the token


# ---- structure -----------------------------------------------------------------------


def test_block_is_prenorm_residual():
    blk = tiny().blocks[0].eval()
    x = torch.randn(2, 17, 64)
    y = x + blk.attn(blk.norm1(x))
    y = y + blk.mlp(blk.norm2(y))
    torch.testing.assert_close(blk(x), y)
    assert isinstance(blk.mlp.act, nn.GELU)


def test_attention_matches_explicit_softmax():
    attn = tiny().blocks[0].attn.eval()
    x = torch.randn(2, 17, 64)
    out, weights = attn.attention_weights(x)
    torch.testing.assert_close(attn(x), out, atol=1e-5, rtol=1e-5)
    assert weights.shape == (2, 4, 17, 17)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 17))


def test_forward_shapes_and_token_pooling():
    m = tiny().eval()
    x = torch.randn(3, 3, 32, 32)
    feats = m.forward_features(x)
    assert feats.shape == (3, 1 + 16, 64)
    torch.testing.assert_close(m.forward_head(feats, pre_logits=True), feats[:, 0])
    assert m(x).shape == (3, 5)


def test_avg_pooling_without_class_token():
    m = tiny(class_token=False, pool="avg").eval()
    assert m.cls_token is None and m.pos_embed.shape[1] == 16
    x = torch.randn(2, 3, 32, 32)
    feats = m.forward_features(x)
    assert feats.shape == (2, 16, 64)
    torch.testing.assert_close(m.forward_head(feats, pre_logits=True), feats.mean(1))
    # with a class token, avg pooling leaves the token out
    m2 = tiny(pool="avg").eval()
    f2 = m2.forward_features(x)
    torch.testing.assert_close(m2.forward_head(f2, pre_logits=True), f2[:, 1:].mean(1))


def test_pretrain_head_and_zero_init_finetune_head():
    m = tiny(head="pretrain", representation_size=48).eval()
    assert isinstance(m.pre_logits.fc, nn.Linear) and isinstance(m.pre_logits.act, nn.Tanh)
    assert m.pre_logits.fc.out_features == 48 and m.head.in_features == 48
    x = torch.randn(2, 3, 32, 32)
    rep = m.forward_head(m.forward_features(x), pre_logits=True)
    assert rep.abs().max() <= 1.0  # tanh
    # the classifier starts at zero: the paper's fine-tuning head
    assert torch.count_nonzero(m.head.weight) == 0
    with torch.no_grad():
        m.head.weight.normal_()
    m.reset_head(7)
    assert isinstance(m.pre_logits, nn.Identity)  # replaces the whole pretraining head
    assert m.head.in_features == 64 and m.head.out_features == 7
    assert torch.count_nonzero(m.head.weight) == 0 and torch.count_nonzero(m.head.bias) == 0
    assert m.config.num_classes == 7 and m.config.head == "linear"
    assert torch.count_nonzero(m(x)) == 0
    m.reset_head(0)
    assert m(x).shape == (2, 64)  # num_classes=0: a feature extractor


def test_dropout_droppath_options():
    m = tiny(drop_rate=0.1, attn_drop_rate=0.1, drop_path_rate=0.2, depth=3)
    rates = [blk.drop_path.p if isinstance(blk.drop_path, DropPath) else 0.0 for blk in m.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2])  # linear in depth
    assert m.blocks[0].attn.attn_drop == 0.1 and m.blocks[0].mlp.drop1.p == 0.1
    x = torch.randn(2, 3, 32, 32)
    m.train()  # (features: the fresh head is all zeros)
    assert not torch.equal(m.forward_features(x), m.forward_features(x))
    m.eval()
    torch.testing.assert_close(m.forward_features(x), m.forward_features(x))


def test_droppath_per_sample():
    dp = DropPath(0.5).train()
    torch.manual_seed(0)
    y = dp(torch.ones(64, 3, 4))
    per_sample = y.flatten(1)
    # each sample is either dropped entirely or scaled by 1/keep
    assert set(per_sample.unique().tolist()) <= {0.0, 2.0}
    assert ((per_sample == 0).all(1) | (per_sample == 2).all(1)).all()


def test_attention_maps_follow_the_forward():
    m = tiny().eval()
    x = torch.randn(2, 3, 32, 32)
    maps = m.get_attention_maps(x)
    assert len(maps) == 2 and all(a.shape == (2, 4, 17, 17) for a in maps)
    assert all(not a.requires_grad for a in maps)
    for a in maps:
        torch.testing.assert_close(a.sum(-1), torch.ones(2, 4, 17))
    # replaying the explicit path reproduces the SDPA forward
    h = m._embed(x)
    for blk in m.blocks:
        h, _ = blk.forward_with_attention(h)
    torch.testing.assert_close(m.norm(h), m.forward_features(x), atol=1e-5, rtol=1e-5)


# ---- resolution ----------------------------------------------------------------------


def test_resample_pos_embed_keeps_class_token_and_matches_timm():
    from timm.layers import resample_abs_pos_embed

    pe = torch.randn(1, 1 + 4 * 4, 8)
    out = resample_pos_embed(pe, (6, 6))
    assert out.shape == (1, 1 + 36, 8)
    torch.testing.assert_close(out[:, :1], pe[:, :1])
    torch.testing.assert_close(out, resample_abs_pos_embed(pe, (6, 6), num_prefix_tokens=1))
    assert resample_pos_embed(pe, (4, 4)) is pe
    # non-square target
    assert resample_pos_embed(pe, (3, 5)).shape == (1, 16, 8)


def test_dynamic_image_size_matches_resampled_model():
    m = tiny().eval()
    x = torch.randn(2, 3, 48, 64)  # grid 6x8 instead of 4x4
    out = m(x)
    assert out.shape == (2, 5)
    with torch.no_grad():
        m.head.weight.normal_()
    big = tiny(img_size=(48, 64)).eval()
    load_checkpoint(big, m.state_dict())  # resampled on load
    torch.testing.assert_close(big(x), m(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="not divisible"):
        m(torch.randn(1, 3, 30, 32))


# ---- training features ---------------------------------------------------------------


def test_grad_checkpointing_same_grads_and_recomputes():
    m = tiny().train()
    x = torch.randn(2, 3, 32, 32)
    calls = []
    mlp = m.blocks[0].mlp
    inner = mlp.forward

    def counting_forward(h):
        calls.append(1)
        return inner(h)

    mlp.forward = counting_forward  # module hooks do not fire on recomputation; this does

    m(x).square().sum().backward()
    ref = {n: p.grad.clone() for n, p in m.named_parameters()}
    assert len(calls) == 1
    m.zero_grad()
    calls.clear()

    m.set_grad_checkpointing(True)
    m(x).square().sum().backward()
    assert len(calls) == 2  # recomputed in backward: checkpointing is really on
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], msg=n)
    # the switch is part of the config too
    assert tiny(grad_checkpointing=True).grad_checkpointing


def test_no_parameters_created_in_forward():
    m = tiny(head="pretrain")
    before = [(n, id(p)) for n, p in m.named_parameters()]
    m(torch.randn(2, 3, 48, 48)).sum().backward()  # dynamic size path included
    assert [(n, id(p)) for n, p in m.named_parameters()] == before
    # every parameter takes part (DDP without find_unused_parameters)
    assert all(p.grad is not None for p in m.parameters())
    assert m.block_class is Block and all(isinstance(b, Block) for b in m.blocks)


def test_bf16_autocast_cpu():
    m = tiny().eval()
    with torch.no_grad():
        m.head.weight.normal_(std=0.5)
    x = torch.randn(2, 3, 32, 32)
    ref = m(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x)
        maps = m.get_attention_maps(x)
    assert out.dtype == torch.bfloat16
    assert torch.isfinite(maps[0]).all()
    torch.testing.assert_close(out.float(), ref, atol=0.1, rtol=0.05)
    # and a model cast to bf16 runs too
    m16 = copy.deepcopy(m).to(torch.bfloat16)
    assert m16(x.bfloat16()).dtype == torch.bfloat16


def test_block_compiles_without_graph_breaks():
    import torch._dynamo

    torch._dynamo.reset()
    blk = tiny().blocks[0].eval()
    x = torch.randn(2, 17, 64)
    explanation = torch._dynamo.explain(blk)(x)
    assert explanation.graph_break_count == 0
    assert explanation.graph_count == 1
    compiled = torch.compile(blk, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), blk(x))


def test_whole_model_compiles_fullgraph_train_step():
    import torch._dynamo

    torch._dynamo.reset()
    m = tiny(drop_path_rate=0.1).train()
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 32, 32)
    compiled(x).sum().backward()
    assert m.patch_embed.proj.weight.grad is not None


@pytest.mark.slow
def test_inductor_compile_matches_eager():
    import torch._dynamo

    torch._dynamo.reset()
    m = tiny().eval()
    with torch.no_grad():
        m.head.weight.normal_()
    x = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(m, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), m(x), atol=1e-4, rtol=1e-4)


def _init_single_process_group(tmp_path):
    import torch.distributed as dist

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    return dist


def test_ddp_single_process_cpu(tmp_path):
    dist = _init_single_process_group(tmp_path)
    try:
        m = tiny(head="pretrain")
        ddp = nn.parallel.DistributedDataParallel(m)  # errors later if a param went unused
        for _ in range(2):
            ddp(torch.randn(2, 3, 32, 32)).sum().backward()
        assert all(p.grad is not None for p in m.parameters())
    finally:
        dist.destroy_process_group()


def test_fsdp2_wraps_per_block_cpu(tmp_path):
    from torch.distributed.fsdp import fully_shard

    dist = _init_single_process_group(tmp_path)
    try:
        m = tiny()
        ref = copy.deepcopy(m)
        x = torch.randn(2, 3, 32, 32)
        for blk in m.modules():
            if isinstance(blk, m.block_class):
                fully_shard(blk)
        fully_shard(m)
        m(x).square().sum().backward()
        ref(x).square().sum().backward()
        torch.testing.assert_close(
            m.blocks[0].attn.qkv.weight.grad.full_tensor(),
            ref.blocks[0].attn.qkv.weight.grad,
            atol=1e-5,
            rtol=1e-5,
        )
    finally:
        dist.destroy_process_group()


def test_model_package_imports_only_torch_numpy_safetensors():
    import ast
    import pathlib
    import sys

    import vit_core.model

    allowed = {"torch", "numpy", "safetensors", "__future__"} | set(sys.stdlib_module_names)
    for path in pathlib.Path(vit_core.model.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                roots = {node.module.split(".")[0]}
            else:
                continue
            assert roots <= allowed, f"{path.name} imports {roots - allowed}"
