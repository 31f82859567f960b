"""The Vision Transformer of "An Image is Worth 16x16 Words" (Dosovitskiy et al., 2020).

One file, top to bottom: config, the building blocks, the model.

Parameter names follow timm's ``VisionTransformer`` (``patch_embed.proj``, ``cls_token``,
``pos_embed``, ``blocks.N.attn.qkv`` ...), so timm checkpoints load without renaming and
the parameter counts match timm's models exactly. The paper's pretraining head adds
``pre_logits.fc`` (Linear + tanh) in front of ``head``, the layout of the released JAX
checkpoints.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = [
    "Attention",
    "Block",
    "DropPath",
    "Mlp",
    "PatchEmbed",
    "ViTConfig",
    "VisionTransformer",
    "resample_pos_embed",
]


@dataclass
class ViTConfig:
    """Everything needed to rebuild a model; saved as JSON next to the weights."""

    img_size: int | tuple[int, int] = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    class_token: bool = True
    pool: Literal["token", "avg"] = "token"
    # 'linear': one zero-initialised Linear (fine-tuning head, and what timm/HF checkpoints
    # carry). 'pretrain': the paper's pretraining MLP, Linear + tanh then Linear.
    head: Literal["pretrain", "linear"] = "linear"
    representation_size: int | None = None  # hidden size of the pretrain head; None = embed_dim
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    grad_checkpointing: bool = False
    norm_eps: float = 1e-6  # the JAX and timm models use 1e-6; HF's ViT defaults to 1e-12

    def __post_init__(self) -> None:
        if isinstance(self.img_size, list):  # JSON round trip turns tuples into lists
            self.img_size = tuple(self.img_size)
        if self.pool not in ("token", "avg"):
            raise ValueError(f"ViTConfig.pool must be 'token' or 'avg', got {self.pool!r}")
        if self.head not in ("pretrain", "linear"):
            raise ValueError(f"ViTConfig.head must be 'pretrain' or 'linear', got {self.head!r}")
        if self.pool == "token" and not self.class_token:
            raise ValueError("ViTConfig.pool='token' needs class_token=True (or use pool='avg')")
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"ViTConfig.embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}"
            )
        h, w = self.img_hw
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(
                f"ViTConfig.img_size={self.img_size} is not divisible by patch_size={self.patch_size}"
            )

    @property
    def img_hw(self) -> tuple[int, int]:
        s = self.img_size
        return (s, s) if isinstance(s, int) else (int(s[0]), int(s[1]))

    @property
    def grid_size(self) -> tuple[int, int]:
        h, w = self.img_hw
        return h // self.patch_size, w // self.patch_size

    @property
    def hidden_size(self) -> int:
        """Width of the pretrain head's hidden layer."""
        return self.representation_size or self.embed_dim

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if isinstance(d["img_size"], tuple):
            d["img_size"] = list(d["img_size"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ViTConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ViTConfig field(s): {', '.join(unknown)}")
        return cls(**d)


def resample_pos_embed(
    pos_embed: torch.Tensor,
    new_grid: tuple[int, int],
    old_grid: tuple[int, int] | None = None,
    num_prefix_tokens: int = 1,
    interpolation: str = "bicubic",
    antialias: bool = True,
) -> torch.Tensor:
    """2D-interpolate position embeddings [1, prefix + H*W, D] to a new patch grid.

    The class token's embedding has no place on the grid, so it is kept as is (paper,
    section 3.2). The same call as timm's ``resample_abs_pos_embed`` so results agree.
    """
    num_pos = pos_embed.shape[1] - num_prefix_tokens
    if old_grid is None:
        side = math.isqrt(num_pos)
        if side * side != num_pos:
            raise ValueError(f"cannot infer a square grid from {num_pos} position embeddings")
        old_grid = (side, side)
    new_grid = (int(new_grid[0]), int(new_grid[1]))
    if tuple(old_grid) == new_grid:
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    dim = pos_embed.shape[-1]
    # interpolate in fp32: bicubic is not implemented for every low-precision dtype
    grid = grid.float().reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=new_grid, mode=interpolation, antialias=antialias)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim)
    return torch.cat([prefix, grid.to(pos_embed.dtype)], dim=1)


def _dropout(p: float) -> nn.Module:
    # no module call at all when off (the paper's fine-tuning and JFT settings)
    return nn.Dropout(p) if p > 0 else nn.Identity()


class PatchEmbed(nn.Module):
    """Cut the image into PxP patches and project each to D dims (a Conv2d, kernel = stride = P)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """[B, C, H, W] -> ([B, N, D], patch grid (H/P, W/P))."""
        x = self.proj(x)
        grid = (x.shape[2], x.shape[3])
        # a view, no copy: the concatenation with the class token makes the one copy needed
        return x.flatten(2).transpose(1, 2), grid


class DropPath(nn.Module):
    """Stochastic depth: drop a whole residual branch per sample during training."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Attention(nn.Module):
    """Multi-head self-attention: one fused qkv Linear, then SDPA (flash/mem-efficient kernels)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = _dropout(proj_drop)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, N, C = x.shape
        # [B, N, 3, H, hd] -> [3, B, H, N, hd]: views only, SDPA takes the strides as they are
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        return q, k, v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self._qkv(x)
        x = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.attn_drop if self.training else 0.0
        )
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))

    def attention_weights(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The same computation spelled out, returning (output, softmax weights [B, H, N, N]).

        SDPA never materialises the weights, so attention maps need this slower path.
        """
        B, N, C = x.shape
        q, k, v = self._qkv(x)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        attn = attn.float().softmax(dim=-1).to(q.dtype)
        out = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(out)), attn


class Mlp(nn.Module):
    """Two Linear layers with GELU between (exact erf GELU, as the JAX and HF models use)."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.drop1 = _dropout(drop)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = _dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm encoder block: x + MSA(LN(x)), then x + MLP(LN(x)).

    The unit to wrap for FSDP and activation checkpointing; it creates nothing in forward.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias, attn_drop=attn_drop, proj_drop=drop)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x

    def forward_with_attention(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y, attn = self.attn.attention_weights(self.norm1(x))
        x = x + self.drop_path(y)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x, attn


class PreLogits(nn.Module):
    """Hidden layer of the paper's pretraining head: Linear + tanh."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, hidden)
        self.act = nn.Tanh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc(x))


class VisionTransformer(nn.Module):
    """ViT: patch embedding, class token, 1D position embeddings, L blocks, LayerNorm, head."""

    block_class = Block  # what FSDP's transformer_auto_wrap_policy should wrap

    def __init__(self, config: ViTConfig | None = None, **kwargs: Any) -> None:
        super().__init__()
        if config is None:
            config = ViTConfig(**kwargs)
        elif kwargs:
            raise TypeError("pass either a ViTConfig or keyword arguments, not both")
        # a private copy: reset_head and set_grad_checkpointing update it
        self.config = c = replace(config)
        self.num_prefix_tokens = 1 if c.class_token else 0
        self.grid_size = c.grid_size  # the grid pos_embed was built for
        self.grad_checkpointing = c.grad_checkpointing

        self.patch_embed = PatchEmbed(c.patch_size, c.in_chans, c.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.embed_dim)) if c.class_token else None
        num_pos = c.grid_size[0] * c.grid_size[1] + self.num_prefix_tokens
        self.pos_embed = nn.Parameter(torch.zeros(1, num_pos, c.embed_dim))
        self.pos_drop = _dropout(c.drop_rate)
        # stochastic depth rate grows linearly with depth (Huang et al.; timm, DeiT)
        dpr = [c.drop_path_rate * i / max(c.depth - 1, 1) for i in range(c.depth)]
        self.blocks = nn.ModuleList(
            Block(
                c.embed_dim,
                c.num_heads,
                c.mlp_ratio,
                c.qkv_bias,
                drop=c.drop_rate,
                attn_drop=c.attn_drop_rate,
                drop_path=dpr[i],
                norm_eps=c.norm_eps,
            )
            for i in range(c.depth)
        )
        self.norm = nn.LayerNorm(c.embed_dim, eps=c.norm_eps)
        self.pre_logits: nn.Module = nn.Identity()
        self.head: nn.Module = nn.Identity()
        self._build_head(c.num_classes, c.head)
        self.init_weights()

    # ---- construction ------------------------------------------------------------------

    def _build_head(self, num_classes: int, head: str) -> None:
        c = self.config
        if head == "pretrain" and num_classes > 0:
            self.pre_logits = PreLogits(c.embed_dim, c.hidden_size)
            in_dim = c.hidden_size
        else:
            self.pre_logits = nn.Identity()
            in_dim = c.embed_dim
        if num_classes > 0:
            self.head = nn.Linear(in_dim, num_classes)
            # zero head: the fine-tuning head of the paper, and the JAX code's init for every head
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)
        else:
            self.head = nn.Identity()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialisation after the JAX reference: xavier Linears, lecun patch embedding."""
        nn.init.normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.zeros_(self.cls_token)
        w = self.patch_embed.proj.weight
        fan_in = w.shape[1] * w.shape[2] * w.shape[3]
        nn.init.trunc_normal_(w, std=math.sqrt(1.0 / fan_in) / 0.87962566103423978)
        nn.init.zeros_(self.patch_embed.proj.bias)
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear) and m is not self.head:
                nn.init.xavier_uniform_(m.weight)
                if name.endswith("mlp.fc1") or name.endswith("mlp.fc2"):
                    nn.init.normal_(m.bias, std=1e-6)
                else:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def reset_head(self, num_classes: int, head: Literal["pretrain", "linear"] = "linear") -> None:
        """Install a new head (default: the zero-initialised linear fine-tuning head).

        Replaces the whole pretraining head, pre_logits included, as in the paper.
        """
        if head not in ("pretrain", "linear"):
            raise ValueError(f"head must be 'pretrain' or 'linear', got {head!r}")
        device = self.pos_embed.device
        dtype = self.pos_embed.dtype
        self.config.num_classes = num_classes
        self.config.head = head
        self._build_head(num_classes, head)
        if isinstance(self.pre_logits, PreLogits):
            nn.init.xavier_uniform_(self.pre_logits.fc.weight)
            nn.init.zeros_(self.pre_logits.fc.bias)
        self.pre_logits.to(device=device, dtype=dtype)
        self.head.to(device=device, dtype=dtype)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        self.config.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        """Parameters that optimisers conventionally exempt from weight decay."""
        return {"pos_embed", "cls_token"}

    # ---- forward -----------------------------------------------------------------------

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        p = self.config.patch_size
        if H % p or W % p:
            raise ValueError(f"input size {H}x{W} is not divisible by the patch size {p}")
        x, grid = self.patch_embed(x)
        pos_embed = self.pos_embed
        if grid != self.grid_size:
            # another input size: interpolate on the fly, like loading at a new resolution
            pos_embed = resample_pos_embed(pos_embed, grid, self.grid_size, self.num_prefix_tokens)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)
        return self.pos_drop(x + pos_embed)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, C, H, W] -> tokens [B, prefix + N, D] after the final LayerNorm."""
        x = self._embed(x)
        use_ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for blk in self.blocks:
            if use_ckpt:
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return self.norm(x)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.pool == "avg":
            return x[:, self.num_prefix_tokens :].mean(dim=1)
        return x[:, 0]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens -> logits; with pre_logits=True, the representation fed to the last Linear."""
        x = self.pre_logits(self.pool(x))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    @torch.no_grad()
    def get_attention_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Softmax attention weights of every block, a list of L tensors [B, heads, N, N].

        Computed explicitly (not via SDPA) and without gradients; token 0 is the class token.
        """
        x = self._embed(x)
        maps = []
        for blk in self.blocks:
            x, attn = blk.forward_with_attention(x)
            maps.append(attn)
        return maps

    def extra_repr(self) -> str:
        c = self.config
        return f"img_size={c.img_size}, patch_size={c.patch_size}, pool={c.pool}, head={c.head}"
