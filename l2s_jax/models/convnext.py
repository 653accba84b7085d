"""ConvNeXt (Liu et al. 2022) in Flax NNX, with the official repository's parameter names.

The macro design (4x4 stem + LayerNorm, three LayerNorm + 2x2 downsamplers, four stages of
blocks, pooled LayerNorm + linear head) is shared with SLaK, which subclasses :class:`ConvNeXt`
and only swaps the block's token mixer. timm's naming (``stem``, ``stages.i.blocks.j.conv_dw``,
``mlp.fc1``, ``head.fc``) is renamed to the official one on conversion.
"""
from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from l2s_jax import layers
from l2s_jax.models.base import Backbone
from l2s_jax.models.registry import Family, StateDict


class Block(nnx.Module):
    """ConvNeXt block: 7x7 depthwise conv -> LN -> Linear 4x -> GELU -> Linear -> layer scale -> drop path."""

    torch_params = {"gamma": ("gamma", None)}

    def __init__(self, dim: int, *, drop_path: float, layer_scale_init_value: float, dw_impl: str = "auto",
                 dtype=None, rngs: nnx.Rngs):
        self.dwconv = layers.DepthwiseConv2d(dim, 7, bias=True, impl=dw_impl, kernel_init=layers.TRUNC_NORMAL_02,
                                             dtype=dtype, rngs=rngs)
        self._init_mlp(dim, drop_path, layer_scale_init_value, dtype, rngs)

    def _init_mlp(self, dim: int, drop_path: float, layer_scale_init_value: float, dtype, rngs: nnx.Rngs) -> None:
        self.norm = layers.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = layers.Linear(dim, 4 * dim, dtype=dtype, rngs=rngs)
        self.pwconv2 = layers.Linear(4 * dim, dim, dtype=dtype, rngs=rngs)
        self.gamma = (nnx.Param(jnp.full((dim,), layer_scale_init_value)) if layer_scale_init_value > 0
                      else nnx.data(None))
        self.drop_path = layers.DropPath(drop_path, rngs=rngs)

    def token_mixer(self, x: jax.Array) -> jax.Array:
        return self.dwconv(x)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.pwconv2(layers.gelu(self.pwconv1(self.norm(self.token_mixer(x)))))
        if self.gamma is not None:
            y = y * self.gamma[...].astype(y.dtype)
        return x + self.drop_path(y)


class ConvNeXt(Backbone):
    """ConvNeXt / SLaK macro architecture on NHWC images; ``dims`` are the actual stage widths."""

    def __init__(
        self,
        *,
        in_chans: int = 3,
        num_classes: int = 1000,
        depths: Sequence[int] = (3, 3, 9, 3),
        dims: Sequence[int] = (96, 192, 384, 768),
        drop_path_rate: float = 0.0,
        layer_scale_init_value: float = 1e-6,
        head_init_scale: float = 1.0,
        dw_impl: str = "auto",
        dtype=None,
        rngs: nnx.Rngs,
        **block_kwargs: Any,
    ):
        dims = [int(d) for d in dims]
        dtype = None if dtype is None else jnp.dtype(dtype)  # accepts "bfloat16" from JSON specs
        self.dtype = dtype
        conv = dict(kernel_init=layers.TRUNC_NORMAL_02, dtype=dtype, rngs=rngs)
        stem = nnx.List([layers.Conv2d(in_chans, dims[0], 4, stride=4, **conv), layers.LayerNorm(dims[0], eps=1e-6)])
        downsamples = [
            nnx.List([layers.LayerNorm(dims[i - 1], eps=1e-6), layers.Conv2d(dims[i - 1], dims[i], 2, stride=2, **conv)])
            for i in range(1, 4)
        ]
        self.downsample_layers = nnx.List([stem, *downsamples])
        rates = [float(r) for r in np.linspace(0.0, drop_path_rate, sum(depths))]
        stages, k = [], 0
        for i in range(4):
            stage = [
                self.make_block(i, dims[i], drop_path=rates[k + j], layer_scale_init_value=layer_scale_init_value,
                                dw_impl=dw_impl, dtype=dtype, rngs=rngs, **block_kwargs)
                for j in range(depths[i])
            ]
            stages.append(nnx.List(stage))
            k += depths[i]
        self.stages = nnx.List(stages)
        self.stage_channels = tuple(dims)
        self.norm = layers.LayerNorm(dims[-1], eps=1e-6)
        self.head = layers.Linear(dims[-1], num_classes, dtype=dtype, rngs=rngs)
        self.head.kernel[...] = self.head.kernel[...] * head_init_scale

    def make_block(self, stage: int, dim: int, **kwargs: Any) -> nnx.Module:
        return Block(dim, **kwargs)

    def forward_stages(self, images: jax.Array) -> list[jax.Array]:
        """Outputs of ``stages[i]`` (each after its downsampler), NHWC, in stage order."""
        x = images if self.dtype is None else images.astype(self.dtype)
        feats = []
        for down, stage in zip(self.downsample_layers, self.stages):
            for layer in down:
                x = layer(x)
            for block in stage:
                x = block(x)
            feats.append(x)
        return feats

    def forward_head(self, features: jax.Array, pre_logits: bool = False) -> jax.Array:
        """Global average pool -> LayerNorm -> linear head; float32 logits (normed pooled vector if ``pre_logits``)."""
        x = self.norm(layers.global_avg_pool(features))
        return (x if pre_logits else self.head(x)).astype(jnp.float32)


# --- converter hooks -------------------------------------------------------------------------

# timm name prefix -> official name prefix, most specific first; {i}, {j}, {k} stand for integers.
# Read left to right it converts timm files; right to left it names keys as a timm file does.
_TIMM_NAMES: list[tuple[str, str]] = [
    ("stem.{k}.", "downsample_layers.0.{k}."),
    ("stages.{i}.downsample.{k}.", "downsample_layers.{i}.{k}."),
    ("stages.{i}.blocks.{j}.conv_dw.", "stages.{i}.{j}.dwconv."),
    ("stages.{i}.blocks.{j}.mlp.fc1.", "stages.{i}.{j}.pwconv1."),
    ("stages.{i}.blocks.{j}.mlp.fc2.", "stages.{i}.{j}.pwconv2."),
    ("stages.{i}.blocks.{j}.", "stages.{i}.{j}."),
    ("head.norm.", "norm."),
    ("head.fc.", "head."),
]


def _prefix_rules(pairs: list[tuple[str, str]]) -> list[tuple[re.Pattern, str]]:
    """(source template, target template) -> (anchored regex, replacement) pairs."""
    def pattern(template: str) -> re.Pattern:
        parts = re.split(r"\{(\w)\}", template)  # literal, placeholder, literal, ...
        return re.compile("^" + "".join(f"(?P<{p}>\\d+)" if n % 2 else re.escape(p) for n, p in enumerate(parts)))

    return [(pattern(src), re.sub(r"\{(\w)\}", r"\\g<\1>", dst)) for src, dst in pairs]


_FROM_TIMM = _prefix_rules(_TIMM_NAMES)
_TO_TIMM = _prefix_rules([(official, timm) for timm, official in _TIMM_NAMES])


def _is_timm(sd: StateDict) -> bool:
    return any(k.startswith("stem.") or ".blocks." in k for k in sd)


def _rename(key: str, rules: list[tuple[re.Pattern, str]]) -> str:
    for pattern, repl in rules:
        if pattern.match(key):
            return pattern.sub(repl, key, count=1)
    return key


def remap_timm_keys(sd: StateDict) -> StateDict:
    """timm ConvNeXt names -> official ConvNeXt names (identity on official checkpoints)."""
    if not _is_timm(sd):
        return sd
    return {_rename(key, _FROM_TIMM): value for key, value in sd.items()}


def source_key(sd: StateDict, key: str) -> str:
    """An official-naming key as the file ``sd`` names it (timm naming if the file uses it)."""
    return _rename(key, _TO_TIMM) if _is_timm(sd) else key


def stage_depths(sd: StateDict) -> list[int]:
    """Number of blocks per stage from ``stages.i.j.`` keys (official naming)."""
    depths = [0, 0, 0, 0]
    for k in sd:
        m = re.match(r"^stages\.(\d)\.(\d+)\.", k)
        if m:
            i, j = int(m.group(1)), int(m.group(2))
            depths[i] = max(depths[i], j + 1)
    return depths


def macro_config(sd: StateDict) -> dict[str, Any]:
    """Hyperparameters shared by ConvNeXt and SLaK: depths, stage widths, classes, layer scale."""
    dims = [int(sd["downsample_layers.0.0.weight"].shape[0])] + [
        int(sd[f"downsample_layers.{i}.1.weight"].shape[0]) for i in range(1, 4)
    ]
    return {
        "in_chans": int(sd["downsample_layers.0.0.weight"].shape[1]),
        "num_classes": int(sd["head.weight"].shape[0]),
        "depths": stage_depths(sd),
        "dims": dims,
        "layer_scale_init_value": 1e-6 if "stages.0.0.gamma" in sd else 0.0,
    }


def _looks_like_convnext(sd: StateDict) -> bool:
    official = "downsample_layers.0.0.weight" in sd and any(k.endswith(".dwconv.weight") for k in sd)
    timm = "stem.0.weight" in sd and any(".conv_dw." in k for k in sd) and "head.fc.weight" in sd
    student = "downsample_layers.0.0.weight" in sd and any(".large_kernel.lkb_origin." in k for k in sd)
    return official or timm or student


def _redirect(sd: StateDict) -> str | None:
    """ConvNeXt+BN student checkpoints use the SLaK class's keys: convert them as SLaK."""
    return "slak" if any(".large_kernel." in k for k in sd) else None


def build(**config: Any) -> ConvNeXt:
    return ConvNeXt(**config)


FAMILY = Family(
    name="convnext",
    build=build,
    infer_config=macro_config,
    looks_like=_looks_like_convnext,
    remap_keys=remap_timm_keys,
    source_key=source_key,
    redirect=_redirect,
    default_keys=("model", "state_dict", "model_ema", "state_dict_ema"),
    models={
        "convnext_tiny": dict(depths=(3, 3, 9, 3), dims=(96, 192, 384, 768), drop_path_rate=0.1),
        "convnext_small": dict(depths=(3, 3, 27, 3), dims=(96, 192, 384, 768), drop_path_rate=0.4),
        "convnext_base": dict(depths=(3, 3, 27, 3), dims=(128, 256, 512, 1024), drop_path_rate=0.5),
    },
)

