"""CSWin Transformer (Dong et al. 2022) in Flax NNX with the official ``cswin.py`` parameter names.

The paper's CSWin-T teacher (``CSWin_64_12211_tiny_224``: embed 64, depths [1, 2, 21, 1],
split sizes [1, 2, 7, 7], heads [2, 4, 8, 16]). Maps stay NHWC throughout (the official code
keeps row-major tokens ``(N, H*W, C)``, which is the same memory order):

* ``stage1_conv_embed``: 7x7 stride-4 conv (padding 2, bias) -> (token layout) -> LayerNorm.
  All LayerNorms use eps 1e-5.
* ``stage{s}`` blocks: ``x + proj(cross_shaped_attention(norm1(x)))`` then
  ``x + fc2(gelu(fc1(norm2(x))))``. ``qkv`` is one Linear C -> 3C ordered [q | k | v].
  Stages whose map is larger than the split size have two branches: channels [0, C/2) attend
  within vertical stripes (full height x split width, ``attns.0``) and channels [C/2, C)
  within horizontal stripes (``attns.1``), each with half the heads. The last stage (and any
  stage whose map equals the split size) has one branch with all heads over the whole map.
* LePE: each branch adds ``get_v(v)``, a 3x3 depthwise conv with bias applied to every stripe
  of ``v`` as its own zero-padded image, to the attention output.
* ``merge{1,2,3}``: 3x3 stride-2 conv (padding 1, bias) -> LayerNorm.
* ``norm`` on the final tokens, mean over tokens, ``head``.
"""
from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from l2s_jax import layers
from l2s_jax.models import attention as attn_lib
from l2s_jax.models.attention import window_partition, window_reverse
from l2s_jax.models.base import Backbone
from l2s_jax.models.registry import Default, Family, StateDict
from l2s_jax.models.vit import Mlp

NUM_STAGES = 4
# Published head counts per embed width (CSWin-T/S: 64, B: 96, L: 144).
# Published CSWin widths (T/S share 64 channels) and their heads per stage.
PUBLISHED_HEADS = {64: (2, 4, 8, 16), 96: (4, 8, 16, 32), 144: (6, 12, 24, 24)}
PUBLISHED_NAMES = {(64, (1, 2, 21, 1)): "CSWin-T", (64, (2, 4, 32, 2)): "CSWin-S", (96, (2, 4, 32, 2)): "CSWin-B",
                   (144, (2, 4, 32, 2)): "CSWin-L"}


class LePEAttention(attn_lib.AttentionLayer):
    """Attention within stripes plus the locally-enhanced positional encoding ``get_v``.

    ``orientation`` is ``"vertical"`` (stripes of full height and ``split_size`` width),
    ``"horizontal"`` (``split_size`` height, full width) or ``"full"`` (the whole map).
    """

    def __init__(self, dim: int, num_heads: int, *, orientation: str, split_size: int,
                 attention_impl: str | None = None, dtype=None, rngs: nnx.Rngs):
        if orientation not in ("vertical", "horizontal", "full"):
            raise ValueError(f"unknown stripe orientation {orientation!r}")
        if dim % num_heads:
            raise ValueError(f"branch width {dim} is not divisible by its {num_heads} heads")
        self.num_heads = num_heads
        self.orientation = orientation
        self.split_size = split_size
        self.attention_impl = attn_lib.check_implementation(attention_impl)
        self.get_v = layers.DepthwiseConv2d(dim, 3, padding=1, bias=True, dtype=dtype, rngs=rngs)

    def stripe(self, height: int, width: int) -> tuple[int, int]:
        """Stripe size ``(H_sp, W_sp)`` on a ``height x width`` map."""
        if self.orientation == "full":
            return height, width
        if self.orientation == "vertical":
            stripe = (height, self.split_size)
        else:
            stripe = (self.split_size, width)
        if height % stripe[0] or width % stripe[1]:
            raise ValueError(
                f"a {height}x{width} CSWin map does not split into {stripe[0]}x{stripe[1]} stripes; use an input "
                f"size whose stage maps are multiples of the split size {self.split_size} (e.g. 224)"
            )
        return stripe

    def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        """``q, k, v``: ``(B, H, W, C_branch)`` -> attention output in the same layout."""
        b, h, w, c = q.shape
        hs, ws = self.stripe(h, w)
        heads, hd = self.num_heads, c // self.num_heads

        def windows(x: jax.Array) -> jax.Array:
            return window_partition(x, (hs, ws))

        qw, kw, vw = windows(q), windows(k), windows(v)  # (B, nS, T, C)
        ns, t = qw.shape[1], qw.shape[2]
        out = attn_lib.windowed_attention(
            qw.reshape(b, ns, t, heads, hd), kw.reshape(b, ns, t, heads, hd), vw.reshape(b, ns, t, heads, hd),
            implementation=self.attention_impl,
        ).reshape(b, ns, t, c)
        # Every stripe of v is its own zero-padded image for the 3x3 LePE conv.
        lepe = self.get_v(vw.reshape(b * ns, hs, ws, c)).reshape(b, ns, t, c)
        return window_reverse(out + lepe, (hs, ws), h, w)


class CSWinBlock(nnx.Module):
    """Cross-shaped window attention block (pre-norm), on NHWC maps."""

    def __init__(self, dim: int, num_heads: int, *, resolution: int, split_size: int, last_stage: bool,
                 mlp_ratio: float, qkv_bias: bool, drop_path: float, attention_impl: str | None, dtype=None,
                 rngs: nnx.Rngs):
        self.qkv = layers.Linear(dim, 3 * dim, bias=qkv_bias, dtype=dtype, rngs=rngs)
        self.norm1 = layers.LayerNorm(dim, eps=1e-5)
        self.proj = layers.Linear(dim, dim, dtype=dtype, rngs=rngs)
        common = dict(split_size=split_size, attention_impl=attention_impl, dtype=dtype, rngs=rngs)
        if last_stage or resolution == split_size:
            branches = [LePEAttention(dim, num_heads, orientation="full", **common)]
        else:
            branches = [LePEAttention(dim // 2, num_heads // 2, orientation=o, **common)
                        for o in ("vertical", "horizontal")]
        self.attns = nnx.List(branches)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dtype=dtype, rngs=rngs)
        self.norm2 = layers.LayerNorm(dim, eps=1e-5)
        self.drop_path = layers.DropPath(drop_path, rngs=rngs)

    def cross_shaped_attention(self, x: jax.Array) -> jax.Array:
        """Split q, k, v channels over the branches, attend, concatenate [branch 0 | branch 1]."""
        c = x.shape[-1]
        qkv = self.qkv(x)
        q, k, v = qkv[..., :c], qkv[..., c:2 * c], qkv[..., 2 * c:]
        if len(self.attns) == 1:
            return self.attns[0](q, k, v)
        half = c // 2
        return jnp.concatenate([
            self.attns[0](q[..., :half], k[..., :half], v[..., :half]),
            self.attns[1](q[..., half:], k[..., half:], v[..., half:]),
        ], axis=-1)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.drop_path(self.proj(self.cross_shaped_attention(self.norm1(x))))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class MergeBlock(nnx.Module):
    """Official ``Merge_Block``: 3x3 stride-2 conv (padding 1, bias) -> LayerNorm."""

    def __init__(self, dim: int, out_dim: int, *, dtype=None, rngs: nnx.Rngs):
        self.conv = layers.Conv2d(dim, out_dim, 3, stride=2, padding=1, kernel_init=layers.TRUNC_NORMAL_02,
                                  dtype=dtype, rngs=rngs)
        self.norm = layers.LayerNorm(out_dim, eps=1e-5)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.norm(self.conv(x))


class TokenLayout(nnx.Module):
    """The stem's ``Rearrange('b c h w -> b (h w) c')``: NHWC maps already are row-major tokens.

    Parameter-free; it holds index 1 of ``stage1_conv_embed`` so the LayerNorm keeps the
    checkpoint's key ``stage1_conv_embed.2``.
    """

    def __call__(self, x: jax.Array) -> jax.Array:
        return x


class CSWinTransformer(Backbone):
    """Official ``CSWinTransformer`` on NHWC images (branch layout fixed for ``img_size``)."""

    def __init__(
        self,
        *,
        img_size: int = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 64,
        depth: Sequence[int] = (1, 2, 21, 1),
        split_size: Sequence[int] = (1, 2, 7, 7),
        num_heads: Sequence[int] = (2, 4, 8, 16),
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        attention_impl: str | None = None,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        for name, seq in (("depth", depth), ("split_size", split_size), ("num_heads", num_heads)):
            if len(seq) != NUM_STAGES:
                raise ValueError(f"{name} needs {NUM_STAGES} entries (one per stage), got {tuple(seq)}")
        self.dtype = dtype
        dims = [embed_dim * 2 ** i for i in range(NUM_STAGES)]
        self.stage1_conv_embed = nnx.List([
            layers.Conv2d(in_chans, embed_dim, 7, stride=4, padding=2, kernel_init=layers.TRUNC_NORMAL_02,
                          dtype=dtype, rngs=rngs),
            TokenLayout(),
            layers.LayerNorm(embed_dim, eps=1e-5),
        ])
        rates = [float(r) for r in np.linspace(0.0, drop_path_rate, sum(depth))]
        k = 0
        for s in range(NUM_STAGES):
            if s > 0:
                setattr(self, f"merge{s}", MergeBlock(dims[s - 1], dims[s], dtype=dtype, rngs=rngs))
            blocks = [
                CSWinBlock(dims[s], num_heads[s], resolution=img_size // 2 ** (s + 2), split_size=split_size[s],
                           last_stage=s == NUM_STAGES - 1, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                           drop_path=rates[k + j], attention_impl=attention_impl, dtype=dtype, rngs=rngs)
                for j in range(depth[s])
            ]
            setattr(self, f"stage{s + 1}", nnx.List(blocks))
            k += depth[s]
        self.stage_channels = tuple(dims)
        self.norm = layers.LayerNorm(dims[-1], eps=1e-5)
        self.head = layers.Linear(dims[-1], num_classes, dtype=dtype, rngs=rngs) if num_classes > 0 else None

    def stem(self, images: jax.Array) -> jax.Array:
        x = images if self.dtype is None else images.astype(self.dtype)
        for layer in self.stage1_conv_embed:
            x = layer(x)
        return x

    def stage(self, index: int, x: jax.Array) -> jax.Array:
        """Stage ``index`` (0-based): its merge block (if any), then its CSWin blocks."""
        if index > 0:
            x = getattr(self, f"merge{index}")(x)
        for block in getattr(self, f"stage{index + 1}"):
            x = block(x)
        return x

    def forward_stages(self, images: jax.Array) -> list[jax.Array]:
        """Raw NHWC outputs of the four stages (56/28/14/7 at 224)."""
        x = self.stem(images)
        outs = []
        for s in range(NUM_STAGES):
            x = self.stage(s, x)
            outs.append(x)
        return outs

    def final_norm(self, last: jax.Array) -> jax.Array:
        return self.norm(last)

    def forward_head(self, features: jax.Array, pre_logits: bool = False) -> jax.Array:
        """Global average pool of the normed final map -> classifier; float32 logits (pooled if ``pre_logits``)."""
        pooled = layers.global_avg_pool(features)
        return (pooled if (pre_logits or self.head is None) else self.head(pooled)).astype(jnp.float32)


# --- converter hooks -------------------------------------------------------------------------

def default_num_heads(embed_dim: int, depth: Sequence[int]) -> Default:
    """The published heads for a CSWin width (named by width and depths); ``Default(None, ...)``
    for other widths (must be given)."""
    if embed_dim in PUBLISHED_HEADS:
        name = PUBLISHED_NAMES.get((embed_dim, tuple(depth)))
        why = (f"{name}, embed_dim {embed_dim}" if name else
               f"the published heads of embed_dim {embed_dim}; depth {list(depth)} is not a published one")
        return Default(list(PUBLISHED_HEADS[embed_dim]), why)
    widths = ", ".join(map(str, PUBLISHED_HEADS))
    return Default(None, f"embed_dim {embed_dim} is not a published CSWin width ({widths})", example="[2,4,8,16]")


def infer_config(sd: StateDict) -> dict[str, Any]:
    """CSWin hyperparameters from tensor shapes; split sizes, heads and ``img_size`` from defaults.

    Head counts and stripe widths leave no trace in the weights (LePE is depthwise), so they
    come from the published configuration for the width (pass ``overrides`` otherwise).
    """
    stem = sd["stage1_conv_embed.0.weight"]
    depth = [0] * NUM_STAGES
    for k in sd:
        m = re.match(r"^stage(\d)\.(\d+)\.", k)
        if m:
            s, j = int(m.group(1)) - 1, int(m.group(2))
            depth[s] = max(depth[s], j + 1)
    embed_dim = int(stem.shape[0])
    return {
        "img_size": Default(224, "the published CSWin input size"),
        "in_chans": int(stem.shape[1]),
        "num_classes": int(sd["head.weight"].shape[0]) if "head.weight" in sd else 0,
        "embed_dim": embed_dim,
        "depth": depth,
        "split_size": Default([1, 2, 7, 7], "the published 224-pixel CSWin models"),
        "num_heads": default_num_heads(embed_dim, depth),
        "mlp_ratio": int(sd["stage1.0.mlp.fc1.weight"].shape[0]) / embed_dim,
        "qkv_bias": "stage1.0.qkv.bias" in sd,
    }


def looks_like(sd: StateDict) -> bool:
    return "stage1_conv_embed.0.weight" in sd and any(".attns.0.get_v." in k for k in sd)


FAMILY = Family(
    name="cswin",
    build=CSWinTransformer,
    infer_config=infer_config,
    looks_like=looks_like,
    # The release files hold the EMA weights under 'state_dict_ema'; SLaK's main_KD.py loads those.
    default_keys=("state_dict_ema", "state_dict", "model"),
    models={
        "cswin_tiny_224": dict(img_size=224, embed_dim=64, depth=(1, 2, 21, 1), split_size=(1, 2, 7, 7),
                               num_heads=(2, 4, 8, 16)),
        "cswin_mini": dict(img_size=224, embed_dim=12, depth=(1, 1, 2, 1), split_size=(1, 2, 7, 7),
                           num_heads=(2, 2, 4, 6), num_classes=10),
    },
)
