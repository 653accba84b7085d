"""Swin Transformer (Liu et al. 2021) in Flax NNX with timm's current parameter names.

Reproduces timm's ``SwinTransformer`` as configured for ``swin_tiny_patch4_window7_224`` (the
paper's Swin-T teacher). Everything runs on NHWC maps, as in timm:

* ``patch_embed``: 4x4 stride-4 conv -> LayerNorm. All LayerNorms use eps 1e-5.
* ``layers[i]``: for i >= 1 a leading ``PatchMerging`` (``downsample``: the 2x2 neighbours
  concatenated as (even row, even col), (odd row, even col), (even row, odd col), (odd row,
  odd col), LayerNorm over 4C, bias-free Linear 4C -> 2C), then ``blocks``.
* A block: ``x + attn(norm1(x))`` on 7x7 windows, then ``x + fc2(gelu(fc1(norm2(x))))``.
  Odd blocks roll the map by -3 before partitioning and by +3 after; their attention adds
  -100 between tokens from different regions of the rolled map. A stage whose map is no
  larger than the window uses one window of the map's size and never shifts.
* Window attention adds the relative position bias ``table[(h1-h2+6)*13 + (w1-w2+6)]`` per head.
* ``norm`` on the final map, global average pool, ``head.fc``.

Original Microsoft checkpoints (and timm < 0.9) place PatchMerging at the end of stages 0-2 and
call the classifier ``head``; :func:`remap_keys` renames them and drops the buffers
``relative_position_index`` / ``attn_mask``, which this port recomputes.
"""
from __future__ import annotations

import functools
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
from l2s_jax.models.vit import Mlp, split_heads

MASK_VALUE = -100.0  # what the reference adds between tokens of different shifted regions


@functools.lru_cache(maxsize=None)
def relative_position_index(window: tuple[int, int]) -> np.ndarray:
    """``(T, T)`` row of the bias table for each token pair of a row-major ``wh x ww`` window."""
    wh, ww = window
    hh, wc = np.meshgrid(np.arange(wh), np.arange(ww), indexing="ij")
    h, w = hh.reshape(-1), wc.reshape(-1)
    index = (h[:, None] - h[None, :] + wh - 1) * (2 * ww - 1) + (w[:, None] - w[None, :] + ww - 1)
    index.setflags(write=False)
    return index


@functools.lru_cache(maxsize=None)
def shifted_window_mask(height: int, width: int, window: tuple[int, int], shift: tuple[int, int]) -> np.ndarray:
    """``(nW, T, T)`` additive mask of a map (padded to whole windows) rolled by ``-shift``.

    Each axis is split into the regions ``[0, S-w)``, ``[S-w, S-s)``, ``[S-s, S)``; tokens of
    the same window but different regions get -100, others 0.
    """
    region = np.zeros((height, width), np.int32)
    bounds = [((0, n - w), (n - w, n - s), (n - s, n)) for n, w, s in zip((height, width), window, shift)]
    label = 0
    for h0, h1 in bounds[0]:
        for w0, w1 in bounds[1]:
            region[h0:h1, w0:w1] = label
            label += 1
    wh, ww = window
    ids = region.reshape(height // wh, wh, width // ww, ww).transpose(0, 2, 1, 3).reshape(-1, wh * ww)
    mask = np.where(ids[:, None, :] != ids[:, :, None], MASK_VALUE, 0.0).astype(np.float32)
    mask.setflags(write=False)
    return mask


class WindowAttention(attn_lib.AttentionLayer):
    """Multi-head attention inside windows, with a learned relative position bias per head."""

    torch_params = {"relative_position_bias_table": ("relative_position_bias_table", None)}
    torch_ignored = ("relative_position_index",)

    def __init__(self, dim: int, num_heads: int, window: tuple[int, int], *, qkv_bias: bool = True,
                 attention_impl: str | None = None, dtype=None, rngs: nnx.Rngs):
        if dim % num_heads:
            raise ValueError(f"stage width {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.window = tuple(window)
        self.attention_impl = attn_lib.check_implementation(attention_impl)
        rows = (2 * window[0] - 1) * (2 * window[1] - 1)
        self.relative_position_bias_table = nnx.Param(layers.TRUNC_NORMAL_02(rngs.params(), (rows, num_heads)))
        self.qkv = layers.Linear(dim, 3 * dim, bias=qkv_bias, dtype=dtype, rngs=rngs)
        self.proj = layers.Linear(dim, dim, dtype=dtype, rngs=rngs)

    def relative_position_bias(self) -> jax.Array:
        """``(heads, T, T)`` bias gathered from the table."""
        index = relative_position_index(self.window)
        bias = jnp.take(self.relative_position_bias_table[...], index.reshape(-1), axis=0)
        return bias.reshape(*index.shape, self.num_heads).transpose(2, 0, 1)

    def __call__(self, windows: jax.Array, mask: np.ndarray | None = None) -> jax.Array:
        """``windows``: ``(B, nW, T, C)``; ``mask``: ``(nW, T, T)`` or None."""
        b, nw, t, c = windows.shape
        q, k, v = split_heads(self.qkv(windows), self.num_heads)
        bias = self.relative_position_bias()[None]
        if mask is not None:
            bias = bias + jnp.asarray(mask)[:, None]
        out = attn_lib.windowed_attention(q, k, v, bias, implementation=self.attention_impl)
        return self.proj(out.reshape(b, nw, t, c))


class SwinTransformerBlock(nnx.Module):
    """(Shifted-)window attention block on NHWC maps; pads to whole windows like timm."""

    torch_ignored = ("attn_mask",)

    def __init__(self, dim: int, num_heads: int, *, resolution: tuple[int, int], window_size: int, shifted: bool,
                 mlp_ratio: float, qkv_bias: bool, drop_path: float, attention_impl: str | None, dtype=None,
                 rngs: nnx.Rngs):
        # timm: an axis no longer than the window gets one window of its size and no shift.
        self.window = tuple(r if r <= window_size else window_size for r in resolution)
        self.shift = tuple(0 if (r <= window_size or not shifted) else window_size // 2 for r in resolution)
        self.norm1 = layers.LayerNorm(dim, eps=1e-5)
        self.attn = WindowAttention(dim, num_heads, self.window, qkv_bias=qkv_bias, attention_impl=attention_impl,
                                    dtype=dtype, rngs=rngs)
        self.norm2 = layers.LayerNorm(dim, eps=1e-5)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dtype=dtype, rngs=rngs)
        self.drop_path = layers.DropPath(drop_path, rngs=rngs)

    def window_attention(self, x: jax.Array) -> jax.Array:
        """Roll, pad to whole windows, attend, and undo both, on a normalised ``(B, H, W, C)`` map."""
        b, h, w, c = x.shape
        (wh, ww), (sh, sw) = self.window, self.shift
        shifted = sh > 0 or sw > 0
        if shifted:
            x = jnp.roll(x, (-sh, -sw), axis=(1, 2))
        ph, pw = (-h) % wh, (-w) % ww
        if ph or pw:
            x = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)))
        mask = shifted_window_mask(h + ph, w + pw, self.window, self.shift) if shifted else None
        out = self.attn(window_partition(x, self.window), mask)
        x = window_reverse(out, self.window, h + ph, w + pw)[:, :h, :w]
        return jnp.roll(x, (sh, sw), axis=(1, 2)) if shifted else x

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.drop_path(self.window_attention(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nnx.Module):
    """2x2 neighbours -> channels (x0, x1, x2, x3 order) -> LayerNorm(4C) -> Linear 4C -> 2C."""

    def __init__(self, dim: int, out_dim: int, *, dtype=None, rngs: nnx.Rngs):
        self.norm = layers.LayerNorm(4 * dim, eps=1e-5)
        self.reduction = layers.Linear(4 * dim, out_dim, bias=False, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        if h % 2 or w % 2:
            x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
            h, w = h + h % 2, w + w % 2
        x = x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 4, 2, 5).reshape(b, h // 2, w // 2, 4 * c)
        return self.reduction(self.norm(x))


class SwinTransformerStage(nnx.Module):
    """Optional leading PatchMerging (``downsample``) followed by the stage's blocks."""

    def __init__(self, dim: int, out_dim: int, *, downsample: bool, resolution: tuple[int, int], depth: int,
                 num_heads: int, window_size: int, mlp_ratio: float, qkv_bias: bool, drop_path: Sequence[float],
                 attention_impl: str | None, dtype=None, rngs: nnx.Rngs):
        self.downsample = PatchMerging(dim, out_dim, dtype=dtype, rngs=rngs) if downsample else None
        self.blocks = nnx.List([
            SwinTransformerBlock(out_dim, num_heads, resolution=resolution, window_size=window_size,
                                 shifted=j % 2 == 1, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                                 drop_path=drop_path[j], attention_impl=attention_impl, dtype=dtype, rngs=rngs)
            for j in range(depth)
        ])

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.downsample is not None:
            x = self.downsample(x)
        for block in self.blocks:
            x = block(x)
        return x


class PatchEmbed(nnx.Module):
    """``patch x patch`` stride-``patch`` conv with bias -> LayerNorm, NHWC out."""

    def __init__(self, in_chans: int, dim: int, patch_size: int, *, dtype=None, rngs: nnx.Rngs):
        self.proj = layers.Conv2d(in_chans, dim, patch_size, stride=patch_size, kernel_init=layers.TRUNC_NORMAL_02,
                                  dtype=dtype, rngs=rngs)
        self.norm = layers.LayerNorm(dim, eps=1e-5)

    def __call__(self, images: jax.Array) -> jax.Array:
        return self.norm(self.proj(images))


class ClassifierHead(nnx.Module):
    """timm's ``ClassifierHead`` after pooling: just the Linear ``fc``."""

    def __init__(self, dim: int, num_classes: int, *, dtype=None, rngs: nnx.Rngs):
        self.fc = layers.Linear(dim, num_classes, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc(x)


class SwinTransformer(Backbone):
    """timm ``SwinTransformer`` on NHWC images (window layout fixed for ``img_size``)."""

    def __init__(
        self,
        *,
        img_size: int = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.1,
        attention_impl: str | None = None,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        if len(depths) != len(num_heads):
            raise ValueError(f"depths {tuple(depths)} and num_heads {tuple(num_heads)} differ in length")
        self.dtype = dtype
        dims = [embed_dim * 2 ** i for i in range(len(depths))]
        self.patch_embed = PatchEmbed(in_chans, dims[0], patch_size, dtype=dtype, rngs=rngs)
        rates = [float(r) for r in np.linspace(0.0, drop_path_rate, sum(depths))]
        grid = img_size // patch_size
        stages, k = [], 0
        for i, depth in enumerate(depths):
            res = grid // 2 ** i
            stages.append(SwinTransformerStage(
                dims[max(i - 1, 0)], dims[i], downsample=i > 0, resolution=(res, res), depth=depth,
                num_heads=num_heads[i], window_size=window_size, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                drop_path=rates[k:k + depth], attention_impl=attention_impl, dtype=dtype, rngs=rngs,
            ))
            k += depth
        self.layers = nnx.List(stages)
        self.stage_channels = tuple(dims)
        self.norm = layers.LayerNorm(dims[-1], eps=1e-5)
        self.head = ClassifierHead(dims[-1], num_classes, dtype=dtype, rngs=rngs) if num_classes > 0 else None

    def forward_stages(self, images: jax.Array) -> list[jax.Array]:
        """Raw NHWC outputs of ``layers[0..3]`` (stage i >= 1 includes its PatchMerging)."""
        x = self.patch_embed(images if self.dtype is None else images.astype(self.dtype))
        outs = []
        for stage in self.layers:
            x = stage(x)
            outs.append(x)
        return outs

    def final_norm(self, last: jax.Array) -> jax.Array:
        return self.norm(last)

    def forward_head(self, features: jax.Array, pre_logits: bool = False) -> jax.Array:
        """Global average pool of the normed final map -> classifier; float32 logits (pooled if ``pre_logits``)."""
        pooled = layers.global_avg_pool(features)
        return (pooled if (pre_logits or self.head is None) else self.head(pooled)).astype(jnp.float32)


# --- converter hooks -------------------------------------------------------------------------

def is_original_layout(sd: StateDict) -> bool:
    """Microsoft / timm < 0.9 layout: PatchMerging at the end of a stage, classifier ``head``."""
    return "head.weight" in sd or any(k.startswith("layers.0.downsample.") for k in sd)


def remap_keys(sd: StateDict) -> StateDict:
    """Original Swin naming -> timm naming; drops the recomputed index and mask buffers.

    ``layers.{i}.downsample.*`` (end of stage i) becomes ``layers.{i+1}.downsample.*`` (start
    of stage i+1) and ``head.*`` becomes ``head.fc.*``. A timm-layout state_dict is returned
    unchanged apart from dropping the buffers.
    """
    original = is_original_layout(sd)
    out = {}
    for key, value in sd.items():
        if key.endswith("relative_position_index") or key.endswith("attn_mask"):
            continue
        if original:
            m = re.match(r"^layers\.(\d+)\.downsample\.(.*)$", key)
            if m:
                key = f"layers.{int(m.group(1)) + 1}.downsample.{m.group(2)}"
            elif key.startswith("head."):
                key = "head.fc." + key[len("head."):]
        out[key] = value
    return out


def source_key(sd: StateDict, key: str) -> str:
    """A timm-naming key as the file ``sd`` names it (the original naming if the file uses it)."""
    if not is_original_layout(sd):
        return key
    m = re.match(r"^layers\.(\d+)\.downsample\.(.*)$", key)
    if m:
        return f"layers.{int(m.group(1)) - 1}.downsample.{m.group(2)}"
    return "head." + key[len("head.fc."):] if key.startswith("head.fc.") else key


def infer_config(sd: StateDict) -> dict[str, Any]:
    """Swin hyperparameters from (timm-named) tensor shapes; ``img_size`` defaults to 224."""
    proj = sd["patch_embed.proj.weight"]
    depths: dict[int, int] = {}
    for k in sd:
        m = re.match(r"^layers\.(\d+)\.blocks\.(\d+)\.", k)
        if m:
            i, j = int(m.group(1)), int(m.group(2))
            depths[i] = max(depths.get(i, 0), j + 1)
    stages = range(len(depths))
    heads = [int(sd[f"layers.{i}.blocks.0.attn.relative_position_bias_table"].shape[1]) for i in stages]
    rows = int(sd["layers.0.blocks.0.attn.relative_position_bias_table"].shape[0])
    side = int(round(rows ** 0.5))
    if side * side != rows or side % 2 == 0:
        raise ValueError(f"relative_position_bias_table has {rows} rows; expected (2*window-1)^2 for a square window")
    embed_dim = int(proj.shape[0])
    return {
        "img_size": Default(224, "the published Swin input size"),
        "patch_size": int(proj.shape[2]),
        "in_chans": int(proj.shape[1]),
        "num_classes": int(sd["head.fc.weight"].shape[0]) if "head.fc.weight" in sd else 0,
        "embed_dim": embed_dim,
        "depths": [depths[i] for i in stages],
        "num_heads": heads,
        "window_size": (side + 1) // 2,
        "mlp_ratio": int(sd["layers.0.blocks.0.mlp.fc1.weight"].shape[0]) / embed_dim,
        "qkv_bias": "layers.0.blocks.0.attn.qkv.bias" in sd,
    }


def looks_like(sd: StateDict) -> bool:
    return "patch_embed.proj.weight" in sd and any(
        re.match(r"^layers\.\d+\.blocks\.\d+\.attn\.relative_position_bias_table$", k) for k in sd
    )


def build(**config: Any) -> SwinTransformer:
    return SwinTransformer(**config)


FAMILY = Family(
    name="swin",
    build=build,
    infer_config=infer_config,
    looks_like=looks_like,
    remap_keys=remap_keys,
    source_key=source_key,
    default_keys=("model", "state_dict", "model_ema", "state_dict_ema"),
    models={
        "swin_tiny_patch4_window7_224": dict(img_size=224, patch_size=4, embed_dim=96, depths=(2, 2, 6, 2),
                                             num_heads=(3, 6, 12, 24), window_size=7, drop_path_rate=0.1),
        "swin_mini": dict(img_size=224, patch_size=4, embed_dim=12, depths=(2, 2, 2, 1), num_heads=(1, 2, 3, 6),
                          window_size=7, num_classes=10),
    },
)
