"""Reading and writing ViT weights in the formats people actually have.

Every format is converted to one canonical layout, the names of ``VisionTransformer``'s own
state dict (timm's names, plus ``pre_logits.fc`` for the paper's pretraining head), and then
loaded by one function that resamples position embeddings, decides about the head and checks
shapes. Supported sources, auto-detected:

* this project's format: a folder with ``model.safetensors`` + ``config.json`` (``save_model``)
* timm state dicts (``.pth``/``.bin``/``.safetensors``; DDP, torch.compile, EMA wrappers),
  and timm's training checkpoints (``model_best.pth.tar``: ``state_dict``, ``state_dict_ema``,
  optimizer state, ``args`` as an ``argparse.Namespace``); ``use_ema`` picks the EMA weights
* Hugging Face transformers ViT (``ViTModel`` / ``ViTForImageClassification``): a
  ``save_pretrained`` folder, a weights file or an in-memory state dict, in both the classic
  key layout (``encoder.layer.N.attention.attention.query``) and the 5.x one (``layers.N``)
* the original JAX ``.npz`` of the ViT authors (and big_vision's variant of it)

Nothing here unpickles code: safetensors, ``np.load(allow_pickle=False)`` and
``torch.load(weights_only=True)`` only, with the few plain-data types trainers store
allowed by name (``_TRAINER_GLOBALS``). Hybrid checkpoints (a ResNet stem under the ViT,
paper section 3.1) are refused: this platform does not build that model.
"""

from __future__ import annotations

import argparse
import json
import math
import pickle
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file as load_safetensors
from safetensors.torch import save_file as save_safetensors

from .vit import PreLogits, VisionTransformer, resample_pos_embed

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "convert_state_dict",
    "export_npz",
    "load_checkpoint",
    "read_checkpoint",
    "save_model",
]

FORMAT_NAME = "vit_core"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"

# Plain-data types that training checkpoints store beside the weights, allowed by name for
# torch.load(weights_only=True): timm's train.py saves its argparse.Namespace as 'args' (timm's
# own loader allows it the same way), and trainers often record metrics as numpy scalars.
_NP_SCALAR = (np._core if hasattr(np, "_core") else np.core).multiarray.scalar  # numpy 2 | 1
_TRAINER_GLOBALS: list[Any] = [
    argparse.Namespace,
    _NP_SCALAR,
    (_NP_SCALAR, "numpy.core.multiarray.scalar"),  # its name in files written by numpy 1.x
    np.dtype,
    *(type(np.dtype(t)) for t in ("float64", "float32", "int64")),
]

# keys under which training checkpoints keep the weights: the trained ones, and the EMA ones
_TRAINED_KEYS = ("state_dict", "model", "module")
_EMA_KEYS = ("state_dict_ema", "model_ema")

# embed_dim -> heads of the standard variants; timm/HF state dicts do not record heads
_STANDARD_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16, 1664: 16}


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit the model; the message says why."""


@dataclass
class Checkpoint:
    """A checkpoint converted to the canonical layout."""

    state_dict: dict[str, torch.Tensor]
    source: str  # file, folder or '<state dict>', for messages
    format: str  # 'vit_core' | 'timm' | 'hf' | 'jax'
    config: dict[str, Any] = field(default_factory=dict)  # architecture, where known

    @property
    def head_type(self) -> str | None:
        """'pretrain', 'linear' or None (no classifier in the checkpoint)."""
        if "head.weight" not in self.state_dict:
            return None
        return "pretrain" if "pre_logits.fc.weight" in self.state_dict else "linear"

    @property
    def num_classes(self) -> int | None:
        w = self.state_dict.get("head.weight")
        return None if w is None else int(w.shape[0])

    def infer_config(self, num_heads: int | None = None) -> dict[str, Any]:
        """Architecture from the recorded config, else from tensor shapes.

        ``num_heads`` fills in what timm and HF state dicts do not record.
        """
        sd = self.state_dict
        cfg: dict[str, Any] = {}
        try:
            w = sd["patch_embed.proj.weight"]
            cfg["embed_dim"], cfg["in_chans"], cfg["patch_size"] = (
                int(w.shape[0]),
                int(w.shape[1]),
                int(w.shape[-1]),
            )
            cfg["depth"] = 1 + max(
                int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))
            )
            cfg["mlp_ratio"] = sd["blocks.0.mlp.fc1.weight"].shape[0] / cfg["embed_dim"]
        except (KeyError, ValueError) as e:
            raise CheckpointError(
                f"cannot load checkpoint {self.source}: not a ViT state dict (missing {e})"
            ) from None
        cfg["qkv_bias"] = "blocks.0.attn.qkv.bias" in sd
        cfg["class_token"] = "cls_token" in sd
        cfg["pool"] = "token" if cfg["class_token"] else "avg"
        side = math.isqrt(sd["pos_embed"].shape[1] - int(cfg["class_token"]))
        cfg["img_size"] = side * cfg["patch_size"]
        if self.head_type is not None:
            cfg["num_classes"] = self.num_classes
            cfg["head"] = self.head_type
        if "pre_logits.fc.weight" in sd:
            cfg["representation_size"] = int(sd["pre_logits.fc.weight"].shape[0])
        cfg.update(self.config)  # recorded values win over guesses
        if num_heads is not None:
            cfg["num_heads"] = num_heads
        if "num_heads" not in cfg:
            if cfg["embed_dim"] not in _STANDARD_HEADS:
                raise CheckpointError(
                    f"cannot load checkpoint {self.source}: the number of attention heads is "
                    f"not recorded for embed_dim={cfg['embed_dim']}; pass a model name or num_heads"
                )
            cfg["num_heads"] = _STANDARD_HEADS[cfg["embed_dim"]]
        return cfg


# ---- reading files -------------------------------------------------------------------


def _fail(source: str, detail: str) -> CheckpointError:
    return CheckpointError(f"cannot load checkpoint {source}: {detail}")


def _load_weights_file(path: Path) -> dict[str, Any]:
    """One weights file -> flat dict of tensors or arrays, never unpickling code."""
    kind = _sniff(path)
    try:
        if kind == "safetensors":
            return load_safetensors(str(path))
        if kind == "npz":
            with np.load(path, allow_pickle=False) as npz:
                return {k: npz[k] for k in npz.files}
        with torch.serialization.safe_globals(_TRAINER_GLOBALS):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except pickle.UnpicklingError as e:
        raise _fail(str(path), _unpickling_refusal(e)) from None
    except Exception as e:  # the libraries raise many types; the user needs one message
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise _fail(str(path), f"unreadable {kind} file ({msg})") from None
    if not isinstance(obj, Mapping):
        raise _fail(str(path), f"expected a state dict, found {type(obj).__name__}")
    return dict(obj)


def _unpickling_refusal(err: pickle.UnpicklingError) -> str:
    """torch's weights-only refusal -> one line naming what blocked it and what to do.

    torch's text spans many lines, with terminal escape codes and advice to disable the check;
    only the name of the refused global or class (or the pickle opcode) is kept from it.
    """
    text = str(err)
    if m := re.search(r"GLOBAL ([\w.]+)|but got <class '([\w.]+)'>", text):
        what = f"unpickling it needs {m.group(1) or m.group(2)}, which is not plain data"
    elif m := re.search(r"Unsupported operand (\d+)", text):
        what = (
            f"it is a plain pickle stream (opcode {m.group(1)}), not a torch.save file, "
            "and may hold code"
        )
    else:
        what = "it holds pickled objects other than tensors"
    return (
        f"{what}; pickled code is never executed here. Re-save the weights with "
        "torch.save(model.state_dict()) or as safetensors"
    )


def _sniff(path: Path) -> str:
    """'safetensors' | 'npz' | 'torch' from the first bytes (extensions lie)."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        raise _fail(str(path), e.strerror or str(e)) from None
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"  # 8-byte header length, then a JSON header
    if head[:2] == b"PK":
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except zipfile.BadZipFile:
            raise _fail(str(path), "corrupt zip archive") from None
        if names and all(n.endswith(".npy") for n in names):
            return "npz"
        return "torch"  # torch.save's zip format
    if head[:1] == b"\x80":
        return "torch"  # legacy pickle protocol; weights_only still applies
    raise _fail(str(path), "unknown format (not safetensors, npz or a torch state dict)")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise _fail(str(path), f"unreadable JSON ({e})") from None
    if not isinstance(data, dict):
        raise _fail(str(path), "config.json is not a JSON object")
    return data


def _hf_weights(folder: Path) -> dict[str, Any]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
        sd: dict[str, Any] = {}
        for shard in shards:
            sd.update(_load_weights_file(folder / shard))
        return sd
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return _load_weights_file(folder / name)
    raise _fail(str(folder), "no model.safetensors or pytorch_model.bin in the folder")


def _hf_config(cfg: dict[str, Any], source: str) -> dict[str, Any]:
    """transformers' ViTConfig -> ours (architecture only; the head comes from the weights)."""
    if cfg.get("hidden_act", "gelu") != "gelu":
        raise _fail(source, f"hidden_act={cfg['hidden_act']!r} is not supported (only 'gelu')")
    try:
        d = int(cfg["hidden_size"])
        return {
            "img_size": cfg.get("image_size", 224),
            "patch_size": cfg.get("patch_size", 16),
            "in_chans": cfg.get("num_channels", 3),
            "embed_dim": d,
            "depth": int(cfg["num_hidden_layers"]),
            "num_heads": int(cfg["num_attention_heads"]),
            "mlp_ratio": int(cfg.get("intermediate_size", 4 * d)) / d,
            "qkv_bias": bool(cfg.get("qkv_bias", True)),
            "norm_eps": float(cfg.get("layer_norm_eps", 1e-12)),
        }
    except (KeyError, TypeError, ValueError) as e:
        raise _fail(source, f"config.json is not a ViT config (bad or missing {e})") from None


def _read_path(path: Path) -> tuple[dict[str, Any], dict[str, Any], str | None]:
    """-> (raw state dict, our config fields if recorded, known format or None)."""
    if not path.exists():
        raise _fail(str(path), "no such file or directory")
    folder = path if path.is_dir() else path.parent
    cfg_file = folder / CONFIG_FILE
    meta = _read_json(cfg_file) if cfg_file.is_file() else {}
    if meta.get("format") == FORMAT_NAME:
        weights = path if path.is_file() else folder / WEIGHTS_FILE
        if not weights.is_file():
            raise _fail(str(path), f"{WEIGHTS_FILE} is missing next to {CONFIG_FILE}")
        config = meta.get("config")
        if not isinstance(config, dict):
            raise _fail(str(cfg_file), "no 'config' object in config.json")
        return _load_weights_file(weights), dict(config), FORMAT_NAME
    if meta.get("model_type") == "vit" or "num_hidden_layers" in meta:
        raw = _load_weights_file(path) if path.is_file() else _hf_weights(folder)
        return raw, _hf_config(meta, str(cfg_file)), "hf"
    if path.is_dir():
        candidates = sorted(
            p
            for p in path.iterdir()
            if p.suffix in (".safetensors", ".npz", ".pth", ".pt", ".bin", ".ckpt")
        )
        if len(candidates) != 1:
            raise _fail(
                str(path),
                "folder has no config.json and not exactly one weights file "
                f"(found: {', '.join(p.name for p in candidates) or 'none'})",
            )
        path = candidates[0]
    return _load_weights_file(path), {}, None


# ---- converting to the canonical layout ----------------------------------------------


def _unwrap(sd: Mapping[str, Any], source: str, use_ema: bool = False) -> dict[str, Any]:
    """Strip training-checkpoint wrappers: {'state_dict': ...}, 'module.', '_orig_mod.' prefixes.

    The trained weights are taken unless ``use_ema``; then the EMA weights (timm's
    ``state_dict_ema``, DeiT's and timm's ``model_ema``) are, and their absence is an error.
    timm's ``load_checkpoint`` defaults to ``use_ema=True``; here the EMA is taken only when
    asked, or when a checkpoint holds nothing else.
    """
    sd = dict(sd)
    if not _has_arrays(sd):
        nested = [k for k in (*_TRAINED_KEYS, *_EMA_KEYS) if isinstance(sd.get(k), Mapping)]
        if use_ema:
            ema = [k for k in nested if k in _EMA_KEYS]
            if ema:
                return _unwrap(sd[ema[0]], source)
        if nested:
            return _unwrap(sd[nested[0]], source, use_ema)
    if use_ema:
        raise _fail(
            source,
            "use_ema=True but it holds no EMA weights ('state_dict_ema' or 'model_ema'); "
            "load it without use_ema",
        )
    changed = True
    while changed and sd:
        changed = False
        for prefix in ("module.", "_orig_mod.", "model."):
            if all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix) :]: v for k, v in sd.items()}
                changed = True
    return sd


def _has_arrays(sd: Mapping[str, Any]) -> bool:
    return any(isinstance(v, torch.Tensor | np.ndarray) for v in sd.values())


def _tensor(v: Any) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        return v
    return torch.from_numpy(np.ascontiguousarray(v))


def detect_format(sd: Mapping[str, Any]) -> str:
    """'timm' (also our own layout), 'hf', 'jax' or 'unknown'."""
    keys = list(sd)
    if any(k.endswith("embedding/kernel") for k in keys):
        return "jax"
    if any("embeddings.patch_embeddings.projection.weight" in k for k in keys):
        return "hf"
    if "patch_embed.proj.weight" in sd:
        return "timm"
    return "unknown"


def _from_hf(sd: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    sd = {(k[4:] if k.startswith("vit.") else k): _tensor(v) for k, v in sd.items()}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[int, dict[str, torch.Tensor]] = {}
    simple = {
        "embeddings.cls_token": "cls_token",
        "embeddings.position_embeddings": "pos_embed",
        "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
        "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
        "layernorm.weight": "norm.weight",
        "layernorm.bias": "norm.bias",
        "pooler.dense.weight": "pre_logits.fc.weight",
        "pooler.dense.bias": "pre_logits.fc.bias",
        "classifier.weight": "head.weight",
        "classifier.bias": "head.bias",
    }
    # per-layer names, classic layout first, then transformers 5.x
    layer = {
        "attention.attention.query": "q",
        "attention.attention.key": "k",
        "attention.attention.value": "v",
        "attention.q_proj": "q",
        "attention.k_proj": "k",
        "attention.v_proj": "v",
        "attention.output.dense": "attn.proj",
        "attention.o_proj": "attn.proj",
        "layernorm_before": "norm1",
        "layernorm_after": "norm2",
        "intermediate.dense": "mlp.fc1",
        "output.dense": "mlp.fc2",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
    }
    for k, v in sd.items():
        if k in simple:
            out[simple[k]] = v
            continue
        if k == "embeddings.mask_token":
            continue  # only used by masked-image pretraining
        m = re.fullmatch(r"(?:encoder\.layer|layers)\.(\d+)\.(.+)\.(weight|bias)", k)
        if not m or m.group(2) not in layer:
            out[k] = v  # left for the strict check to name
            continue
        i, name, kind = int(m.group(1)), layer[m.group(2)], m.group(3)
        if name in ("q", "k", "v"):
            qkv.setdefault(i, {})[f"{name}.{kind}"] = v
        else:
            out[f"blocks.{i}.{name}.{kind}"] = v
    for i, parts in qkv.items():
        for kind in ("weight", "bias"):
            if all(f"{n}.{kind}" in parts for n in "qkv"):
                out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat(
                    [parts[f"{n}.{kind}"] for n in "qkv"]
                )
    return out


def _jax_prefix(sd: Mapping[str, Any]) -> str:
    for prefix in ("", "opt/target/", "params/", "params/img/"):
        if f"{prefix}embedding/kernel" in sd:
            return prefix
    return ""


def _from_jax(sd: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The ViT authors' .npz (also big_vision's names) -> canonical; also returns num_heads."""
    p = _jax_prefix(sd)
    w = {k[len(p) :]: np.asarray(v) for k, v in sd.items() if k.startswith(p)}
    big_vision = "pos_embedding" in w or "Transformer/encoderblock/LayerNorm_0/scale" in w
    mha, mlp, ln2 = (
        ("MultiHeadDotProductAttention_0", "MlpBlock_0", "LayerNorm_1")
        if big_vision
        else ("MultiHeadDotProductAttention_1", "MlpBlock_3", "LayerNorm_2")
    )

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a))

    out: dict[str, torch.Tensor] = {
        # HWIO -> OIHW
        "patch_embed.proj.weight": t(w["embedding/kernel"].transpose(3, 2, 0, 1)),
        "patch_embed.proj.bias": t(w["embedding/bias"]),
        "norm.weight": t(w["Transformer/encoder_norm/scale"]),
        "norm.bias": t(w["Transformer/encoder_norm/bias"]),
    }
    if "cls" in w:
        out["cls_token"] = t(w["cls"])
    pos = w.get("pos_embedding", w.get("Transformer/posembed_input/pos_embedding"))
    if pos is not None:
        out["pos_embed"] = t(pos.reshape(1, -1, pos.shape[-1]))
    for name in ("pre_logits", "head"):
        if f"{name}/kernel" in w:
            key = "pre_logits.fc" if name == "pre_logits" else "head"
            out[f"{key}.weight"] = t(w[f"{name}/kernel"].T)
            out[f"{key}.bias"] = t(w[f"{name}/bias"])

    scanned = "Transformer/encoderblock/LayerNorm_0/scale" in w
    if scanned:  # big_vision stacks the blocks along a leading axis
        depth = w["Transformer/encoderblock/LayerNorm_0/scale"].shape[0]
    else:
        depth = len(
            {m.group(1) for k in w if (m := re.match(r"Transformer/encoderblock_(\d+)/", k))}
        )
    num_heads = None
    for i in range(depth):
        bp = "Transformer/encoderblock/" if scanned else f"Transformer/encoderblock_{i}/"

        def g(name: str, _bp: str = bp, _i: int = i) -> np.ndarray:
            a = w[_bp + name]
            return a[_i] if scanned else a

        b = f"blocks.{i}."
        out[b + "norm1.weight"] = t(g("LayerNorm_0/scale"))
        out[b + "norm1.bias"] = t(g("LayerNorm_0/bias"))
        out[b + "norm2.weight"] = t(g(f"{ln2}/scale"))
        out[b + "norm2.bias"] = t(g(f"{ln2}/bias"))
        # query/key/value kernels are [D, heads, head_dim]; torch wants [out, in]
        q, k, v = (g(f"{mha}/{n}/kernel") for n in ("query", "key", "value"))
        num_heads = q.shape[1]
        out[b + "attn.qkv.weight"] = t(
            np.concatenate([a.reshape(a.shape[0], -1).T for a in (q, k, v)])
        )
        if f"{bp}{mha}/query/bias" in w:
            out[b + "attn.qkv.bias"] = t(
                np.concatenate(
                    [g(f"{mha}/{n}/bias").reshape(-1) for n in ("query", "key", "value")]
                )
            )
        o = g(f"{mha}/out/kernel")  # [heads, head_dim, D]
        out[b + "attn.proj.weight"] = t(o.reshape(-1, o.shape[-1]).T)
        out[b + "attn.proj.bias"] = t(g(f"{mha}/out/bias"))
        for r in range(2):
            out[b + f"mlp.fc{r + 1}.weight"] = t(g(f"{mlp}/Dense_{r}/kernel").T)
            out[b + f"mlp.fc{r + 1}.bias"] = t(g(f"{mlp}/Dense_{r}/bias"))
    return out, ({"num_heads": int(num_heads)} if num_heads else {})


def convert_state_dict(
    sd: Mapping[str, Any], source: str = "<state dict>", *, use_ema: bool = False
) -> tuple[dict[str, torch.Tensor], str, dict[str, Any]]:
    """Any supported state dict -> (canonical state dict, format name, architecture hints).

    ``use_ema`` takes a training checkpoint's EMA weights instead of the trained ones.
    Raises ``CheckpointError`` for an unknown layout or a hybrid (ResNet + ViT) checkpoint.
    """
    sd = _unwrap(sd, source, use_ema)
    _refuse_hybrid(sd, source)
    fmt = detect_format(sd)
    try:
        if fmt == "jax":
            out, hints = _from_jax(sd)
            return out, fmt, hints
        if fmt == "hf":
            return _from_hf(sd), fmt, {}
    except KeyError as e:
        raise _fail(source, f"{fmt} checkpoint lacks the key {e}") from None
    if fmt == "timm":
        return {k: _tensor(v) for k, v in sd.items()}, fmt, {}
    sample = ", ".join(list(sd)[:5]) or "no keys"
    raise _fail(
        source,
        f"unknown format: neither this project's, timm's, Hugging Face's nor JAX's ViT layout "
        f"(first keys: {sample})",
    )


# The ResNet stem of the paper's hybrid model (section 3.1) in the authors' .npz
# (conv_root, gn_root, blockN/unitM), timm (patch_embed.backbone) and transformers (ViTHybrid)
_HYBRID_KEY = re.compile(
    r"(?:^|/)(?:conv_root|gn_root)/|(?:^|/)block\d+/unit\d+/|patch_embed(?:dings)?\.backbone\."
)


def _refuse_hybrid(sd: Mapping[str, Any], source: str) -> None:
    key = next((k for k in sd if _HYBRID_KEY.search(k)), None)
    if key is not None:
        raise _fail(
            source,
            f"a hybrid (ResNet + ViT, paper section 3.1) checkpoint (key {key!r}): its patch "
            "embedding runs on ResNet feature maps, a model this platform does not build yet; "
            "use a plain ViT checkpoint",
        )


def _check_in_chans(ckpt: Checkpoint, expected: int) -> None:
    """Refuse a patch embedding over other than the recorded (else the expected) channels.

    Without this, a checkpoint of another model family whose first layer happens to be named
    like ours would build a model over, say, 1024 channels and fail only at the first forward.
    """
    w = ckpt.state_dict.get("patch_embed.proj.weight")
    if w is None or w.ndim != 4:
        return  # infer_config and the strict load name the missing key
    got = int(w.shape[1])
    recorded = ckpt.config.get("in_chans")
    if recorded is not None and got != int(recorded):
        raise _fail(
            ckpt.source,
            f"its config records in_chans={recorded} but the patch embedding "
            f"{tuple(w.shape)} takes {got} input channels",
        )
    if recorded is None and got != expected:
        raise _fail(
            ckpt.source,
            f"its patch embedding {tuple(w.shape)} takes {got} input channels, not {expected}: "
            f"not a plain ViT over {expected}-channel images; if {got} channels is meant, "
            f"pass in_chans={got}",
        )


def read_checkpoint(
    checkpoint: str | Path | Mapping[str, Any] | Checkpoint,
    *,
    use_ema: bool = False,
    in_chans: int = 3,
) -> Checkpoint:
    """A path (file or folder) or an in-memory state dict -> Checkpoint in canonical layout.

    ``use_ema`` takes the EMA weights of a training checkpoint (timm's ``state_dict_ema``,
    ``model_ema``); without it the trained weights are taken. ``in_chans`` is the number of
    image channels the caller builds for: a checkpoint whose patch embedding takes another
    number and that does not record its own (this project's and transformers' config.json
    do) is refused. A ``Checkpoint`` is returned as it is (already read and checked).

    Raises ``CheckpointError`` (one line naming the file) for a missing or unreadable file,
    pickled objects other than plain data (never executed), an unknown layout, a hybrid
    ResNet + ViT checkpoint, or a patch embedding over other channels.
    """
    if isinstance(checkpoint, Checkpoint):
        return checkpoint
    if isinstance(checkpoint, Mapping):
        sd, fmt, hints = convert_state_dict(checkpoint, use_ema=use_ema)
        ckpt = Checkpoint(sd, "<state dict>", fmt, hints)
    elif isinstance(checkpoint, str | Path):
        if str(checkpoint).startswith(("s3://", "gs://", "http://", "https://")):
            raise _fail(
                str(checkpoint), "remote URIs are resolved by vit_core.create_model, not here"
            )
        path = Path(checkpoint).expanduser()
        raw, config, known = _read_path(path)
        sd, fmt, hints = convert_state_dict(raw, str(path), use_ema=use_ema)
        ckpt = Checkpoint(sd, str(path), known or fmt, {**hints, **config})
    else:
        raise CheckpointError(
            f"cannot load checkpoint of type {type(checkpoint).__name__}: "
            "pass a local path or a state dict"
        )
    _check_in_chans(ckpt, in_chans)
    return ckpt


# ---- loading into a model ------------------------------------------------------------


def load_checkpoint(
    model: VisionTransformer,
    checkpoint: str | Path | Mapping[str, Any] | Checkpoint,
    *,
    replace_head: bool = False,
    strict: bool = True,
    use_ema: bool = False,
) -> list[str]:
    """Load weights into ``model`` in place; returns the keys left at their fresh init.

    ``use_ema`` loads a training checkpoint's EMA weights (as timm's ``load_checkpoint``;
    timm takes them by default, this function only when asked).

    Position embeddings are resampled to the model's grid when the checkpoint was trained at
    another resolution. The classifier is loaded only when it fits (same kind of head, same
    class count) and ``replace_head`` is False; otherwise the model keeps its zero-initialised
    head. Anything else that does not fit raises ``CheckpointError`` naming the key.
    """
    ckpt = read_checkpoint(checkpoint, use_ema=use_ema, in_chans=model.config.in_chans)
    sd = dict(ckpt.state_dict)
    src = ckpt.source
    own = model.state_dict()

    head_keys = [k for k in own if k.startswith(("head.", "pre_logits."))]
    ckpt_head_keys = [k for k in sd if k.startswith(("head.", "pre_logits."))]
    model_head = "pretrain" if isinstance(model.pre_logits, PreLogits) else "linear"
    keep_head = (
        not replace_head
        and "head.weight" in own
        and ckpt.head_type == model_head
        and all(k in sd and sd[k].shape == own[k].shape for k in head_keys)
    )
    # an HF ViTModel carries only the pooler: keep it under a pretrain head with a new classifier
    keep_pre_logits = (
        not replace_head
        and model_head == "pretrain"
        and ckpt.head_type in ("pretrain", None)
        and all(k in sd and sd[k].shape == own[k].shape for k in head_keys if "pre_logits" in k)
    )
    for k in ckpt_head_keys:
        if not (keep_head or (keep_pre_logits and k.startswith("pre_logits."))):
            sd.pop(k)

    if "pos_embed" in sd and sd["pos_embed"].shape != own["pos_embed"].shape:
        old_grid = None
        if "img_size" in ckpt.config and "patch_size" in ckpt.config:
            # recorded size: the only way to know a non-square grid
            img, p = ckpt.config["img_size"], int(ckpt.config["patch_size"])
            h, w = (img, img) if isinstance(img, int) else (int(img[0]), int(img[1]))
            old_grid = (h // p, w // p)
        if sd["pos_embed"].shape[-1] != own["pos_embed"].shape[-1]:
            raise _fail(src, _shape_msg("pos_embed", sd["pos_embed"], own["pos_embed"]))
        try:
            sd["pos_embed"] = resample_pos_embed(
                sd["pos_embed"], model.grid_size, old_grid, model.num_prefix_tokens
            )
        except (ValueError, RuntimeError) as e:
            raise _fail(src, f"key 'pos_embed' {tuple(sd['pos_embed'].shape)}: {e}") from None

    missing = [k for k in own if k not in sd and k not in head_keys]
    unexpected = [k for k in sd if k not in own]
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"missing key(s) {', '.join(repr(k) for k in missing[:5])}")
        if unexpected:
            parts.append(
                f"key(s) not in this architecture {', '.join(repr(k) for k in unexpected[:5])}"
            )
        raise _fail(src, "; ".join(parts))
    for k, want in own.items():  # model order: the first mismatch is the most telling
        if k in sd and sd[k].shape != want.shape:
            raise _fail(src, _shape_msg(k, sd[k], want))

    with torch.no_grad():
        for k, v in sd.items():
            if k in own:
                own[k].copy_(v)  # copy_ casts dtype and device
    return [k for k in own if k not in sd]


def _shape_msg(key: str, got: torch.Tensor, want: torch.Tensor) -> str:
    return (
        f"shape mismatch for key '{key}': checkpoint {tuple(got.shape)}, "
        f"model {tuple(want.shape)} (wrong model name or size overrides?)"
    )


# ---- writing -------------------------------------------------------------------------


def save_model(model: VisionTransformer, directory: str | Path) -> Path:
    """Write ``model.safetensors`` + ``config.json``; ``create_model(checkpoint=dir)`` reads it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # contiguous CPU copies: safetensors refuses views; the cast keeps bf16/fp16 as is
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_safetensors(sd, str(directory / WEIGHTS_FILE), metadata={"format": FORMAT_NAME})
    meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "config": model.config.to_dict()}
    (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return directory


def export_npz(
    model_or_state_dict: VisionTransformer | Mapping[str, torch.Tensor],
    path: str | Path,
    num_heads: int | None = None,
) -> Path:
    """Write weights in the ViT authors' JAX ``.npz`` layout (what timm's ``_load_weights`` reads).

    ``num_heads`` is needed only for a bare state dict (a model knows its own).
    """
    if isinstance(model_or_state_dict, VisionTransformer):
        sd = model_or_state_dict.state_dict()
        num_heads = model_or_state_dict.config.num_heads
    else:
        sd = read_checkpoint(model_or_state_dict).state_dict
        if num_heads is None:
            raise ValueError("export_npz of a state dict needs num_heads")

    def a(key: str) -> np.ndarray:
        return sd[key].detach().float().cpu().numpy()

    out: dict[str, np.ndarray] = {
        "embedding/kernel": a("patch_embed.proj.weight").transpose(2, 3, 1, 0),  # OIHW -> HWIO
        "embedding/bias": a("patch_embed.proj.bias"),
        "Transformer/posembed_input/pos_embedding": a("pos_embed"),
        "Transformer/encoder_norm/scale": a("norm.weight"),
        "Transformer/encoder_norm/bias": a("norm.bias"),
    }
    if "cls_token" in sd:
        out["cls"] = a("cls_token")
    if "pre_logits.fc.weight" in sd:
        out["pre_logits/kernel"] = a("pre_logits.fc.weight").T
        out["pre_logits/bias"] = a("pre_logits.fc.bias")
    if "head.weight" in sd:
        out["head/kernel"] = a("head.weight").T
        out["head/bias"] = a("head.bias")
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    for i in range(depth):
        b, bp = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        mha = bp + "MultiHeadDotProductAttention_1/"
        out[bp + "LayerNorm_0/scale"] = a(b + "norm1.weight")
        out[bp + "LayerNorm_0/bias"] = a(b + "norm1.bias")
        out[bp + "LayerNorm_2/scale"] = a(b + "norm2.weight")
        out[bp + "LayerNorm_2/bias"] = a(b + "norm2.bias")
        qkv = a(b + "attn.qkv.weight")  # [3D, D]
        dim = qkv.shape[1]
        head_dim = dim // num_heads
        for j, n in enumerate(("query", "key", "value")):
            out[mha + f"{n}/kernel"] = qkv[j * dim : (j + 1) * dim].T.reshape(
                dim, num_heads, head_dim
            )
            if b + "attn.qkv.bias" in sd:
                bias = a(b + "attn.qkv.bias")[j * dim : (j + 1) * dim]
                out[mha + f"{n}/bias"] = bias.reshape(num_heads, head_dim)
        out[mha + "out/kernel"] = a(b + "attn.proj.weight").T.reshape(num_heads, head_dim, dim)
        out[mha + "out/bias"] = a(b + "attn.proj.bias")
        for r in range(2):
            out[bp + f"MlpBlock_3/Dense_{r}/kernel"] = a(b + f"mlp.fc{r + 1}.weight").T
            out[bp + f"MlpBlock_3/Dense_{r}/bias"] = a(b + f"mlp.fc{r + 1}.bias")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:  # np.savez on a path would append '.npz' to other suffixes
        np.savez(f, **{k: np.ascontiguousarray(v) for k, v in out.items()})
    return path
