"""MobileNetV3-Large (Howard et al. 2019) as in timm, in Flax NNX with timm's parameter names.

The network is timm's ``mobilenetv3_large_100`` definition: a 3x3/2 stem (BN + hard-swish),
seven stages of blocks and a head of global average pool -> 1x1 ``conv_head`` (with bias) ->
hard-swish -> ``classifier``. Stage 0 is a depthwise-separable block, stages 1-5 are inverted
residuals (expand 1x1 -> depthwise kxk -> optional squeeze-excite -> project 1x1), stage 6 is a
1x1 conv-BN-act. ReLU in stages 0-2, hard-swish elsewhere. Padding is PyTorch's symmetric ``k//2``
and every BatchNorm has eps 1e-5 (not the TF-ported ``tf_mobilenetv3_*`` variants).

Widths come from a channel multiplier exactly as timm rounds them (:func:`make_divisible`), or
from an explicit per-block list (what the converter infers from a checkpoint's shapes). Every
depthwise conv goes through :class:`l2s_jax.layers.DepthwiseConv2d`.

``model.features`` returns the outputs of ``blocks[1]``, ``blocks[2]``, ``blocks[4]`` and
``blocks[6]``: the last map at each of the strides 4, 8, 16 and 32 (timm's ``features_only``
points after its stride-2 one). ``blocks[6]`` (960 channels at full width) is therefore the
final stage map used for feature distillation.
"""
from __future__ import annotations

import math
import re
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from l2s_jax import layers
from l2s_jax.models.base import Backbone
from l2s_jax.models.registry import Family, StateDict

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "hard_swish": layers.hard_swish,
}

# timm's mobilenetv3_large_100 definition, one tuple per repeated block group:
# (block type, repeats, kernel, stride of the first repeat, expansion ratio, output channels, SE ratio, activation).
# 'ds' = depthwise separable, 'ir' = inverted residual, 'cn' = conv-BN-act.
LARGE_ARCH: tuple[tuple[tuple[str, int, int, int, float, int, float, str], ...], ...] = (
    (("ds", 1, 3, 1, 1.0, 16, 0.0, "relu"),),
    (("ir", 1, 3, 2, 4.0, 24, 0.0, "relu"), ("ir", 1, 3, 1, 3.0, 24, 0.0, "relu")),
    (("ir", 3, 5, 2, 3.0, 40, 0.25, "relu"),),
    (("ir", 1, 3, 2, 6.0, 80, 0.0, "hard_swish"), ("ir", 1, 3, 1, 2.5, 80, 0.0, "hard_swish"),
     ("ir", 2, 3, 1, 2.3, 80, 0.0, "hard_swish")),
    (("ir", 2, 3, 1, 6.0, 112, 0.25, "hard_swish"),),
    (("ir", 3, 5, 2, 6.0, 160, 0.25, "hard_swish"),),
    (("cn", 1, 1, 1, 1.0, 960, 0.0, "hard_swish"),),
)
FEATURE_STAGES = (1, 2, 4, 6)  # last stage at strides 4, 8, 16, 32


def feature_stages(num_stages: int) -> list[int]:
    """Indices of the stages ``features`` returns: FEATURE_STAGES that exist, always ending with the last."""
    return [i for i in FEATURE_STAGES if i < num_stages - 1] + [num_stages - 1]


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None, round_limit: float = 0.9) -> int:
    """timm's channel rounding: nearest multiple of ``divisor`` (>= min_value), bumped up if it loses > 10%."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < round_limit * v:
        new_v += divisor
    return new_v


def large_block_defs(channel_multiplier: float = 1.0) -> list[list[dict[str, Any]]]:
    """Per-stage block definitions of mobilenetv3_large at a channel multiplier (timm's rounding).

    Each block is ``{"type", "kernel", "stride", "out", "act"}`` plus ``"mid"`` (expanded width,
    'ir' only) and ``"se"`` (squeeze-excite width, 0 = none; computed from the expanded width).
    """
    in_ch = stem_size_for(channel_multiplier)
    stages = []
    for group in LARGE_ARCH:
        stage = []
        for kind, repeats, kernel, stride, exp, out, se_ratio, act in group:
            for r in range(repeats):
                out_ch = make_divisible(out * channel_multiplier)
                block: dict[str, Any] = {"type": kind, "kernel": kernel, "stride": stride if r == 0 else 1,
                                         "out": out_ch, "act": act}
                if kind == "ir":
                    block["mid"] = make_divisible(in_ch * exp)
                width = block.get("mid", in_ch)
                if kind != "cn":
                    block["se"] = make_divisible(width * se_ratio) if se_ratio > 0 else 0
                stage.append(block)
                in_ch = out_ch
        stages.append(stage)
    return stages


def stem_size_for(channel_multiplier: float) -> int:
    """Stem width: 16, scaled only for multipliers >= 0.75 (timm's ``fix_stem`` below that)."""
    return 16 if channel_multiplier < 0.75 else make_divisible(16 * channel_multiplier)


def _goog_depthwise_init(kernel: int):
    """timm's TF-style depthwise init: N(0, 2 / (k * k)) (fan-out divided by the groups)."""
    return nnx.initializers.normal(math.sqrt(2.0 / (kernel * kernel)))


# timm's _init_weight_goog for convs (N(0, 2 / fan_out)) and for Linear (U(+-1/sqrt(out_features))).
_GOOG_CONV_INIT = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")
_GOOG_LINEAR_INIT = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_out", "uniform")


def _pw(in_ch: int, out_ch: int, *, dtype, rngs: nnx.Rngs, bias: bool = False) -> layers.Conv2d:
    """1x1 convolution."""
    return layers.Conv2d(in_ch, out_ch, 1, bias=bias, kernel_init=_GOOG_CONV_INIT, dtype=dtype, rngs=rngs)


def _dw(channels: int, kernel: int, stride: int, *, dw_impl: str, dtype, rngs: nnx.Rngs) -> layers.DepthwiseConv2d:
    """Bias-free kxk depthwise conv with padding k//2 and an optional stride."""
    return layers.DepthwiseConv2d(channels, kernel, stride=stride, bias=False, impl=dw_impl,
                                  kernel_init=_goog_depthwise_init(kernel), dtype=dtype, rngs=rngs)


class SqueezeExcite(nnx.Module):
    """Spatial mean -> ``conv_reduce`` -> ReLU -> ``conv_expand`` -> hard-sigmoid gate (timm's MobileNetV3 SE)."""

    def __init__(self, channels: int, reduced: int, *, dtype=None, rngs: nnx.Rngs):
        self.conv_reduce = _pw(channels, reduced, bias=True, dtype=dtype, rngs=rngs)
        self.conv_expand = _pw(reduced, channels, bias=True, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        s = x.astype(jnp.float32).mean((1, 2), keepdims=True).astype(x.dtype)
        gate = layers.hard_sigmoid(self.conv_expand(jax.nn.relu(self.conv_reduce(s))))
        return x * gate


class DepthwiseSeparable(nnx.Module):
    """``conv_dw`` -> ``bn1`` + act -> (SE) -> ``conv_pw`` -> ``bn2`` (no act); residual if shapes allow."""

    def __init__(self, in_ch: int, *, out: int, kernel: int, stride: int, act: str, se: int = 0,
                 drop_path: float, dw_impl: str, dtype=None, rngs: nnx.Rngs):
        self.act = act
        self.has_skip = stride == 1 and in_ch == out
        self.conv_dw = _dw(in_ch, kernel, stride, dw_impl=dw_impl, dtype=dtype, rngs=rngs)
        self.bn1 = layers.BatchNorm(in_ch)
        self.se = SqueezeExcite(in_ch, se, dtype=dtype, rngs=rngs) if se else nnx.data(None)
        self.conv_pw = _pw(in_ch, out, dtype=dtype, rngs=rngs)
        self.bn2 = layers.BatchNorm(out)
        self.drop_path = layers.DropPath(drop_path if self.has_skip else 0.0, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = ACTIVATIONS[self.act](self.bn1(self.conv_dw(x)))
        if self.se is not None:
            y = self.se(y)
        y = self.bn2(self.conv_pw(y))
        return x + self.drop_path(y) if self.has_skip else y


class InvertedResidual(nnx.Module):
    """``conv_pw`` (expand) -> ``bn1`` + act -> ``conv_dw`` -> ``bn2`` + act -> (SE) -> ``conv_pwl`` -> ``bn3``."""

    def __init__(self, in_ch: int, *, mid: int, out: int, kernel: int, stride: int, act: str, se: int = 0,
                 drop_path: float, dw_impl: str, dtype=None, rngs: nnx.Rngs):
        self.act = act
        self.has_skip = stride == 1 and in_ch == out
        self.conv_pw = _pw(in_ch, mid, dtype=dtype, rngs=rngs)
        self.bn1 = layers.BatchNorm(mid)
        self.conv_dw = _dw(mid, kernel, stride, dw_impl=dw_impl, dtype=dtype, rngs=rngs)
        self.bn2 = layers.BatchNorm(mid)
        self.se = SqueezeExcite(mid, se, dtype=dtype, rngs=rngs) if se else nnx.data(None)
        self.conv_pwl = _pw(mid, out, dtype=dtype, rngs=rngs)
        self.bn3 = layers.BatchNorm(out)
        self.drop_path = layers.DropPath(drop_path if self.has_skip else 0.0, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        act = ACTIVATIONS[self.act]
        y = act(self.bn1(self.conv_pw(x)))
        y = act(self.bn2(self.conv_dw(y)))
        if self.se is not None:
            y = self.se(y)
        y = self.bn3(self.conv_pwl(y))
        return x + self.drop_path(y) if self.has_skip else y


class ConvBnAct(nnx.Module):
    """``conv`` (kxk, no bias) -> ``bn1`` + act; the last stage (1x1, 160 -> 960 at full width)."""

    def __init__(self, in_ch: int, *, out: int, kernel: int, stride: int, act: str, dtype=None, rngs: nnx.Rngs):
        self.act = act
        self.conv = layers.Conv2d(in_ch, out, kernel, stride=stride, padding=kernel // 2, bias=False,
                                  kernel_init=_GOOG_CONV_INIT, dtype=dtype, rngs=rngs)
        self.bn1 = layers.BatchNorm(out)

    def __call__(self, x: jax.Array) -> jax.Array:
        return ACTIVATIONS[self.act](self.bn1(self.conv(x)))


def _check_block(block: Mapping[str, Any], where: str) -> None:
    kinds = {"ds": {"out", "kernel", "stride", "act"}, "ir": {"mid", "out", "kernel", "stride", "act"},
             "cn": {"out", "kernel", "stride", "act"}}
    kind = block.get("type")
    if kind not in kinds:
        raise ValueError(f"{where}: unknown block type {kind!r}; choose one of {sorted(kinds)}")
    missing = kinds[kind] - set(block)
    if missing:
        raise ValueError(f"{where}: a {kind!r} block needs {sorted(missing)}")
    if block["act"] not in ACTIVATIONS:
        raise ValueError(f"{where}: unknown activation {block['act']!r}; choose one of {sorted(ACTIVATIONS)}")


class MobileNetV3(Backbone):
    """timm's ``MobileNetV3`` on NHWC images, built from explicit per-stage block definitions.

    ``block_defs`` is a list of stages, each a list of block dicts as produced by
    :func:`large_block_defs`. ``drop_path_rate`` follows timm's builder: block ``i`` of ``n``
    (counted over the whole network) uses ``drop_path_rate * i / n``, applied only on residual
    blocks. ``drop_rate`` is the dropout before ``classifier``.
    """

    def __init__(
        self,
        *,
        block_defs: Sequence[Sequence[Mapping[str, Any]]],
        stem_size: int = 16,
        num_features: int = 1280,
        in_chans: int = 3,
        num_classes: int = 1000,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        dw_impl: str = "auto",
        dtype=None,
        rngs: nnx.Rngs,
    ):
        self.dtype = dtype
        self.conv_stem = layers.Conv2d(in_chans, stem_size, 3, stride=2, padding=1, bias=False,
                                       kernel_init=_GOOG_CONV_INIT, dtype=dtype, rngs=rngs)
        self.bn1 = layers.BatchNorm(stem_size)
        total = sum(len(s) for s in block_defs)
        in_ch, idx, stages, out_channels = stem_size, 0, [], []
        for i, stage_defs in enumerate(block_defs):
            stage = []
            for j, b in enumerate(stage_defs):
                _check_block(b, f"block_defs[{i}][{j}]")
                common = dict(out=int(b["out"]), kernel=int(b["kernel"]), stride=int(b["stride"]), act=b["act"],
                              dtype=dtype, rngs=rngs)
                rate = drop_path_rate * idx / total
                if b["type"] == "ds":
                    block = DepthwiseSeparable(in_ch, se=int(b.get("se", 0)), drop_path=rate, dw_impl=dw_impl,
                                               **common)
                elif b["type"] == "ir":
                    block = InvertedResidual(in_ch, mid=int(b["mid"]), se=int(b.get("se", 0)), drop_path=rate,
                                             dw_impl=dw_impl, **common)
                else:
                    block = ConvBnAct(in_ch, **common)
                stage.append(block)
                in_ch, idx = int(b["out"]), idx + 1
            stages.append(nnx.List(stage))
            out_channels.append(in_ch)
        self.blocks = nnx.List(stages)
        self.stage_channels = tuple(out_channels[i] for i in feature_stages(len(out_channels)))
        self.num_features = num_features
        self.conv_head = _pw(in_ch, num_features, bias=True, dtype=dtype, rngs=rngs)
        self.head_drop = nnx.Dropout(drop_rate, rngs=rngs)
        if num_classes > 0:
            self.classifier = layers.Linear(num_features, num_classes, kernel_init=_GOOG_LINEAR_INIT, dtype=dtype,
                                            rngs=rngs)
        else:
            self.classifier = nnx.data(None)

    def stem(self, images: jax.Array) -> jax.Array:
        """``conv_stem`` (3x3/2) -> ``bn1`` -> hard-swish."""
        x = images if self.dtype is None else images.astype(self.dtype)
        return layers.hard_swish(self.bn1(self.conv_stem(x)))

    def stage_outputs(self, images: jax.Array) -> list[jax.Array]:
        """Outputs of every stage ``blocks[0]`` ... ``blocks[-1]`` (NHWC), in order."""
        x = self.stem(images)
        outs = []
        for stage in self.blocks:
            for block in stage:
                x = block(x)
            outs.append(x)
        return outs

    def forward_stages(self, images: jax.Array) -> list[jax.Array]:
        """The last map at strides 4, 8, 16, 32: outputs of ``blocks[1]``, ``[2]``, ``[4]``, ``[6]``."""
        outs = self.stage_outputs(images)
        return [outs[i] for i in feature_stages(len(outs))]

    def forward_head(self, features: jax.Array, pre_logits: bool = False) -> jax.Array:
        """Pool -> ``conv_head`` -> hard-swish -> dropout -> ``classifier``; float32 logits.

        With ``pre_logits`` (or no classifier) returns the ``num_features`` vector before dropout.
        """
        pooled = layers.global_avg_pool(features)[:, None, None, :]
        x = layers.hard_swish(self.conv_head(pooled))[:, 0, 0, :]
        if pre_logits or self.classifier is None:
            return x.astype(jnp.float32)
        return self.classifier(self.head_drop(x)).astype(jnp.float32)


def build(*, channel_multiplier: float = 1.0, block_defs: Sequence[Sequence[Mapping[str, Any]]] | None = None,
          stem_size: int | None = None, **kwargs: Any) -> MobileNetV3:
    """MobileNetV3-Large at ``channel_multiplier``, or from explicit ``block_defs`` (then the multiplier is unused)."""
    if block_defs is None:
        block_defs = large_block_defs(channel_multiplier)
    if stem_size is None:
        stem_size = stem_size_for(channel_multiplier)
    return MobileNetV3(block_defs=block_defs, stem_size=stem_size, **kwargs)


# --- converter hooks -------------------------------------------------------------------------

def _block_layout(sd: StateDict) -> list[int]:
    counts: dict[int, int] = {}
    for k in sd:
        m = re.match(r"^blocks\.(\d+)\.(\d+)\.", k)
        if m:
            i, j = int(m.group(1)), int(m.group(2))
            counts[i] = max(counts.get(i, 0), j + 1)
    return [counts.get(i, 0) for i in range(max(counts) + 1)] if counts else []


def _infer_block(sd: StateDict, prefix: str, reference: Mapping[str, Any]) -> dict[str, Any]:
    """One block's definition: type, widths and kernel from shapes; stride and activation from ``reference``."""
    if f"{prefix}conv_pwl.weight" in sd:
        kind = "ir"
    elif f"{prefix}conv_dw.weight" in sd:
        kind = "ds"
    elif f"{prefix}conv.weight" in sd:
        kind = "cn"
    else:
        raise ValueError(f"cannot tell the block type of {prefix[:-1]} from its keys")
    if kind != reference["type"]:
        raise ValueError(f"{prefix[:-1]} is a {kind!r} block where mobilenetv3_large has {reference['type']!r}")
    block: dict[str, Any] = {"type": kind, "stride": reference["stride"], "act": reference["act"]}
    if kind == "cn":
        w = sd[f"{prefix}conv.weight"]
        block.update(kernel=int(w.shape[-1]), out=int(w.shape[0]))
        return block
    block["kernel"] = int(sd[f"{prefix}conv_dw.weight"].shape[-1])
    if kind == "ir":
        block["mid"] = int(sd[f"{prefix}conv_pw.weight"].shape[0])
        block["out"] = int(sd[f"{prefix}conv_pwl.weight"].shape[0])
    else:
        block["out"] = int(sd[f"{prefix}conv_pw.weight"].shape[0])
    se = sd.get(f"{prefix}se.conv_reduce.weight")
    block["se"] = int(se.shape[0]) if se is not None else 0
    return block


def infer_config(sd: StateDict) -> dict[str, Any]:
    """Widths, kernels and SE widths from shapes; strides and activations from the large_100 definition.

    Returns the compact ``{"channel_multiplier": m}`` form when the widths are exactly timm's
    rounding at ``m`` (recovered from the last stage: 960 * m), else explicit ``block_defs``.
    """
    reference = large_block_defs(1.0)
    layout = _block_layout(sd)
    expected = [len(s) for s in reference]
    if layout != expected:
        raise ValueError(f"blocks per stage {layout} do not match mobilenetv3_large's {expected}; "
                         "only the Large layout is supported (not mobilenetv3_small / other variants)")
    block_defs = [[_infer_block(sd, f"blocks.{i}.{j}.", reference[i][j]) for j in range(n)]
                  for i, n in enumerate(layout)]
    config: dict[str, Any] = {
        "stem_size": int(sd["conv_stem.weight"].shape[0]),
        "in_chans": int(sd["conv_stem.weight"].shape[1]),
        "num_features": int(sd["conv_head.weight"].shape[0]),
        "num_classes": int(sd["classifier.weight"].shape[0]) if "classifier.weight" in sd else 0,
    }
    multiplier = block_defs[-1][-1]["out"] / LARGE_ARCH[-1][-1][5]
    if large_block_defs(multiplier) == block_defs and stem_size_for(multiplier) == config["stem_size"]:
        config["channel_multiplier"] = multiplier
        del config["stem_size"]
    else:
        config["block_defs"] = block_defs
    return config


def looks_like(sd: StateDict) -> bool:
    """timm MobileNetV3 naming: ``conv_stem``, ``blocks.i.j``, a ``conv_head`` with bias and no head BN."""
    return ("conv_stem.weight" in sd and "conv_head.weight" in sd and "conv_head.bias" in sd
            and "bn2.weight" not in sd and any(k.startswith("blocks.") for k in sd))


FAMILY = Family(
    name="mobilenetv3",
    build=build,
    infer_config=infer_config,
    looks_like=looks_like,
    default_keys=("state_dict", "model", "state_dict_ema", "model_ema"),
    models={
        "mobilenetv3_large_100": dict(channel_multiplier=1.0),
        # The golden set's small variant: the same definition at channel multiplier 0.25, 10 classes.
        "mobilenetv3_mini": dict(channel_multiplier=0.25, num_classes=10),
    },
)
