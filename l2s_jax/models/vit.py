"""Vision Transformer (Dosovitskiy et al. 2021) in Flax NNX with timm's parameter names.

Reproduces timm's ``VisionTransformer`` as configured for ``vit_small_patch16_224`` (the
paper's ViT-S/16 teacher): a 16x16 stride-16 patch embedding, a class token prepended, one
learned position embedding over all 197 tokens (class token included), pre-norm blocks
``x + proj(attn(norm1(x)))`` then ``x + fc2(gelu(fc1(norm2(x))))`` with LayerNorm eps 1e-6,
a final LayerNorm and a linear head on the class token. No layer scale, no register tokens.

Images are NHWC; patch tokens are row-major over the patch grid, so the token sequence
without the class token reshapes directly to an NHWC feature map.
"""
from __future__ import annotations

import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from l2s_jax import layers
from l2s_jax.models import attention as attn_lib
from l2s_jax.models.base import Backbone
from l2s_jax.models.registry import Default, Family, StateDict

LECUN_NORMAL = nnx.initializers.lecun_normal()


class Mlp(nnx.Module):
    """timm's ``Mlp``: Linear ``fc1`` -> exact GELU -> Linear ``fc2`` over the last axis."""

    def __init__(self, dim: int, hidden: int, *, dtype=None, rngs: nnx.Rngs):
        self.fc1 = layers.Linear(dim, hidden, dtype=dtype, rngs=rngs)
        self.fc2 = layers.Linear(hidden, dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(layers.gelu(self.fc1(x)))


def split_heads(qkv: jax.Array, num_heads: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Split a fused ``(..., 3*D)`` projection ordered [q | k | v] x heads into three ``(..., heads, D/heads)``."""
    *lead, three_d = qkv.shape
    parts = qkv.reshape(*lead, 3, num_heads, three_d // (3 * num_heads))
    return parts[..., 0, :, :], parts[..., 1, :, :], parts[..., 2, :, :]


class PatchEmbed(nnx.Module):
    """Non-overlapping ``patch x patch`` conv (stride = patch, no padding) -> row-major tokens."""

    def __init__(self, in_chans: int, dim: int, patch_size: int, *, dtype=None, rngs: nnx.Rngs):
        self.patch_size = patch_size
        self.proj = layers.Conv2d(in_chans, dim, patch_size, stride=patch_size, kernel_init=LECUN_NORMAL,
                                  dtype=dtype, rngs=rngs)

    def __call__(self, images: jax.Array) -> jax.Array:
        x = self.proj(images)
        b, h, w, c = x.shape
        return x.reshape(b, h * w, c)


class Attention(attn_lib.AttentionLayer):
    """Global multi-head self-attention: fused ``qkv`` Linear, softmax(q k^T / sqrt(d)) v, ``proj``."""

    def __init__(self, dim: int, num_heads: int, *, qkv_bias: bool = True, attention_impl: str | None = None,
                 dtype=None, rngs: nnx.Rngs):
        if dim % num_heads:
            raise ValueError(f"embed dim {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.attention_impl = attn_lib.check_implementation(attention_impl)
        self.qkv = layers.Linear(dim, 3 * dim, bias=qkv_bias, dtype=dtype, rngs=rngs)
        self.proj = layers.Linear(dim, dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, d = x.shape
        q, k, v = split_heads(self.qkv(x), self.num_heads)
        out = attn_lib.attention(q, k, v, implementation=self.attention_impl)
        return self.proj(out.reshape(b, t, d))


class Block(nnx.Module):
    """Pre-norm transformer block (LayerNorm eps 1e-6), stochastic depth on both residuals."""

    def __init__(self, dim: int, num_heads: int, *, mlp_ratio: float, qkv_bias: bool, drop_path: float,
                 attention_impl: str | None, dtype=None, rngs: nnx.Rngs):
        self.norm1 = layers.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attention_impl=attention_impl, dtype=dtype,
                              rngs=rngs)
        self.norm2 = layers.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dtype=dtype, rngs=rngs)
        self.drop_path = layers.DropPath(drop_path, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class VisionTransformer(Backbone):
    """timm ``VisionTransformer`` with ``global_pool='token'`` on NHWC images."""

    torch_params = {"cls_token": ("cls_token", None), "pos_embed": ("pos_embed", None)}

    def __init__(
        self,
        *,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        attention_impl: str | None = None,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.dtype = dtype
        self.grid = img_size // patch_size
        self.patch_size = patch_size
        self.patch_embed = PatchEmbed(in_chans, embed_dim, patch_size, dtype=dtype, rngs=rngs)
        self.cls_token = nnx.Param(1e-6 * jax.random.normal(rngs.params(), (1, 1, embed_dim)))
        self.pos_embed = nnx.Param(layers.TRUNC_NORMAL_02(rngs.params(), (1, 1 + self.grid ** 2, embed_dim)))
        rates = np.linspace(0.0, drop_path_rate, depth)
        self.blocks = nnx.List([
            Block(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop_path=float(rates[i]),
                  attention_impl=attention_impl, dtype=dtype, rngs=rngs)
            for i in range(depth)
        ])
        self.stage_channels = (embed_dim,) * depth
        self.norm = layers.LayerNorm(embed_dim, eps=1e-6)
        self.head = layers.Linear(embed_dim, num_classes, dtype=dtype, rngs=rngs) if num_classes > 0 else None

    def embed(self, images: jax.Array) -> jax.Array:
        """Patch tokens, class token prepended, position embedding added: ``(N, 1 + HW, D)``."""
        n, h, w, _ = images.shape
        if h != w or h != self.grid * self.patch_size:
            size = self.grid * self.patch_size
            raise ValueError(
                f"this ViT was built for {size}x{size} images (a {self.grid}x{self.grid} position embedding) "
                f"but got {h}x{w}; resize the images or build the model with img_size={h}"
            )
        x = self.patch_embed(images if self.dtype is None else images.astype(self.dtype))
        cls = jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (n, 1, x.shape[-1]))
        return jnp.concatenate([cls, x], axis=1) + self.pos_embed[...].astype(x.dtype)

    def forward_stages(self, images: jax.Array) -> list[jax.Array]:
        """The token sequence after each block (one stage per block), ``(N, 1 + HW, D)``, before the final norm."""
        x = self.embed(images)
        outs = []
        for block in self.blocks:
            x = block(x)
            outs.append(x)
        return outs

    def final_norm(self, last: jax.Array) -> jax.Array:
        return self.norm(last)

    def to_map(self, tokens: jax.Array) -> jax.Array:
        """Drop the class token and reshape the row-major patch tokens to an NHWC map."""
        n, t, d = tokens.shape
        return tokens[:, 1:].reshape(n, self.grid, self.grid, d)

    def forward_head(self, features: jax.Array, pre_logits: bool = False) -> jax.Array:
        """Linear head on the class token of the normed tokens; float32 logits (the class token if ``pre_logits``)."""
        cls = features[:, 0]
        out = cls if (pre_logits or self.head is None) else self.head(cls)
        return out.astype(jnp.float32)


# --- converter hooks -------------------------------------------------------------------------

def _depth(sd: StateDict) -> int:
    idx = [int(m.group(1)) for k in sd if (m := re.match(r"^blocks\.(\d+)\.", k))]
    return max(idx) + 1 if idx else 0


# Published ViT widths and their head counts (timm vit_{tiny,small,base,large,huge}_*, DeiT-Ti/S/B).
PUBLISHED_HEADS = {192: ("ViT-Ti", 3), 384: ("ViT-S", 6), 768: ("ViT-B", 12), 1024: ("ViT-L", 16), 1280: ("ViT-H", 16)}


def default_num_heads(embed_dim: int) -> Default:
    """The published head count for a ViT width; ``Default(None, ...)`` for other widths (must be given)."""
    if embed_dim in PUBLISHED_HEADS:
        name, heads = PUBLISHED_HEADS[embed_dim]
        return Default(heads, f"{name}, width {embed_dim}")
    return Default(None, f"width {embed_dim} is not a published ViT width ({', '.join(map(str, PUBLISHED_HEADS))})")


def infer_config(sd: StateDict) -> dict[str, Any]:
    """ViT hyperparameters from tensor shapes; ``num_heads`` from the published width table."""
    unsupported = [k for k in ("fc_norm.weight", "reg_token", "blocks.0.ls1.gamma", "blocks.0.attn.q_norm.weight")
                   if k in sd]
    if unsupported:
        raise ValueError(f"unsupported ViT variant (keys {unsupported}); only timm's class-token ViT "
                         "without layer scale, registers or qk-norm is implemented")
    proj = sd["patch_embed.proj.weight"]
    embed_dim, in_chans, patch_size = int(proj.shape[0]), int(proj.shape[1]), int(proj.shape[2])
    num_patches = int(sd["pos_embed"].shape[1]) - 1
    grid = math.isqrt(num_patches)
    if grid * grid != num_patches:
        raise ValueError(f"pos_embed holds {num_patches} patch positions, not a square grid")
    return {
        "img_size": grid * patch_size,
        "patch_size": patch_size,
        "in_chans": in_chans,
        "num_classes": int(sd["head.weight"].shape[0]) if "head.weight" in sd else 0,
        "embed_dim": embed_dim,
        "depth": _depth(sd),
        "num_heads": default_num_heads(embed_dim),
        "mlp_ratio": int(sd["blocks.0.mlp.fc1.weight"].shape[0]) / embed_dim,
        "qkv_bias": "blocks.0.attn.qkv.bias" in sd,
    }


def looks_like(sd: StateDict) -> bool:
    return "cls_token" in sd and "patch_embed.proj.weight" in sd and "blocks.0.attn.qkv.weight" in sd


FAMILY = Family(
    name="vit",
    build=VisionTransformer,
    infer_config=infer_config,
    looks_like=looks_like,
    default_keys=("model", "state_dict", "model_ema", "state_dict_ema"),
    models={
        "vit_small_patch16_224": dict(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6),
        "vit_mini": dict(img_size=224, patch_size=16, embed_dim=96, depth=2, num_heads=3, num_classes=10),
    },
)
