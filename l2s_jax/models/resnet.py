"""ResNet (He et al. 2016) as in timm, in Flax NNX with timm's / torchvision's parameter names.

One class covers ResNet-18/34 (``BasicBlock``) and ResNet-50/101 (``Bottleneck``). This is
ResNet v1.5: in a bottleneck the stride sits on the 3x3 ``conv2``. The stem is timm's default
7x7/2 conv -> BN -> ReLU -> 3x3/2 max-pool; the first block of a stage gets a ``downsample``
(1x1 conv with the stage stride + BN) whenever the stride or the width changes. No conv has a
bias; the head is global average pool -> (dropout) -> ``fc``.

Attribute paths equal timm's module paths (``layer1[0].conv1`` <-> ``layer1.0.conv1.weight``),
so timm, torchvision and hub ``.safetensors`` state_dicts load without renaming. ``model.features``
returns the outputs of ``layer1`` ... ``layer4`` (strides 4, 8, 16, 32) as NHWC maps.
"""
from __future__ import annotations

import math
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from l2s_jax import layers
from l2s_jax.models.base import Backbone
from l2s_jax.models.registry import Family, StateDict

BLOCK_TYPES = ("basic", "bottleneck")
EXPANSION = {"basic": 1, "bottleneck": 4}


def _torch_linear_init(fan_in: int):
    """PyTorch's default ``nn.Linear`` init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (timm keeps it for ``fc``)."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key: jax.Array, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    """``nn.MaxPool2d(3, stride=2, padding=1)`` on NHWC: the padding never wins the max.

    The init value is a Python scalar: an array init value makes ``reduce_window`` impossible
    to differentiate under ``jit``.
    """
    return jax.lax.reduce_window(
        x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), ((0, 0), (1, 1), (1, 1), (0, 0))
    )


def _downsample(in_channels: int, out_channels: int, stride: int, dtype, rngs: nnx.Rngs) -> nnx.List:
    """Projection shortcut ``downsample.0`` (1x1 conv with the block stride) + ``downsample.1`` (BN)."""
    return nnx.List([
        layers.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False, dtype=dtype, rngs=rngs),
        layers.BatchNorm(out_channels),
    ])


def _shortcut(downsample: nnx.List | None, x: jax.Array) -> jax.Array:
    if downsample is None:
        return x
    conv, bn = downsample
    return bn(conv(x))


class BasicBlock(nnx.Module):
    """Two 3x3 conv-BN pairs (stride on the first) + shortcut, ReLU after the sum; ResNet-18/34."""

    def __init__(self, in_channels: int, planes: int, stride: int, *, downsample: bool, drop_path: float,
                 zero_init_last: bool, dtype=None, rngs: nnx.Rngs):
        conv = dict(bias=False, dtype=dtype, rngs=rngs)
        self.conv1 = layers.Conv2d(in_channels, planes, 3, stride=stride, padding=1, **conv)
        self.bn1 = layers.BatchNorm(planes)
        self.conv2 = layers.Conv2d(planes, planes, 3, padding=1, **conv)
        self.bn2 = layers.BatchNorm(planes)
        if zero_init_last:
            self.bn2.scale[...] = jnp.zeros_like(self.bn2.scale[...])
        self.downsample = (_downsample(in_channels, planes, stride, dtype, rngs) if downsample
                           else nnx.data(None))
        self.drop_path = layers.DropPath(drop_path, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jax.nn.relu(self.bn1(self.conv1(x)))
        y = self.drop_path(self.bn2(self.conv2(y)))
        return jax.nn.relu(y + _shortcut(self.downsample, x))


class Bottleneck(nnx.Module):
    """1x1 reduce -> 3x3 (stride) -> 1x1 expand (x4), each with BN, + shortcut; ResNet-50/101."""

    def __init__(self, in_channels: int, planes: int, stride: int, *, downsample: bool, drop_path: float,
                 zero_init_last: bool, dtype=None, rngs: nnx.Rngs):
        out_channels = planes * EXPANSION["bottleneck"]
        conv = dict(bias=False, dtype=dtype, rngs=rngs)
        self.conv1 = layers.Conv2d(in_channels, planes, 1, **conv)
        self.bn1 = layers.BatchNorm(planes)
        self.conv2 = layers.Conv2d(planes, planes, 3, stride=stride, padding=1, **conv)
        self.bn2 = layers.BatchNorm(planes)
        self.conv3 = layers.Conv2d(planes, out_channels, 1, **conv)
        self.bn3 = layers.BatchNorm(out_channels)
        if zero_init_last:
            self.bn3.scale[...] = jnp.zeros_like(self.bn3.scale[...])
        self.downsample = (_downsample(in_channels, out_channels, stride, dtype, rngs) if downsample
                           else nnx.data(None))
        self.drop_path = layers.DropPath(drop_path, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jax.nn.relu(self.bn1(self.conv1(x)))
        y = jax.nn.relu(self.bn2(self.conv2(y)))
        y = self.drop_path(self.bn3(self.conv3(y)))
        return jax.nn.relu(y + _shortcut(self.downsample, x))


class ResNet(Backbone):
    """timm's ``ResNet`` with the default stem, on NHWC images.

    ``depths`` (timm's ``layers``) is the number of blocks per stage and ``channels`` the stage
    planes (the output width is ``planes * expansion``). ``drop_path_rate`` follows timm's rule:
    block ``i`` of ``n`` (counted over the whole network) drops its residual branch with
    probability ``drop_path_rate * i / (n - 1)``. ``num_classes=0`` builds a headless network
    whose ``__call__`` returns the pooled features.
    """

    def __init__(
        self,
        *,
        block: str = "bottleneck",
        depths: Sequence[int] = (3, 4, 6, 3),
        channels: Sequence[int] = (64, 128, 256, 512),
        stem_width: int = 64,
        in_chans: int = 3,
        num_classes: int = 1000,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        zero_init_last: bool = True,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        if block not in BLOCK_TYPES:
            raise ValueError(f"unknown ResNet block {block!r}; choose one of {BLOCK_TYPES}")
        if len(depths) != 4 or len(channels) != 4:
            raise ValueError(f"ResNet needs 4 stages, got depths={list(depths)} channels={list(channels)}")
        block_cls = BasicBlock if block == "basic" else Bottleneck
        expansion = EXPANSION[block]
        self.dtype = dtype
        self.conv1 = layers.Conv2d(in_chans, stem_width, 7, stride=2, padding=3, bias=False, dtype=dtype, rngs=rngs)
        self.bn1 = layers.BatchNorm(stem_width)
        total = sum(depths)
        in_ch, idx = stem_width, 0
        for stage, (depth, planes) in enumerate(zip(depths, channels)):
            blocks = []
            for j in range(depth):
                stride = 2 if (stage > 0 and j == 0) else 1
                blocks.append(block_cls(
                    in_ch, planes, stride,
                    downsample=(j == 0 and (stride != 1 or in_ch != planes * expansion)),
                    drop_path=drop_path_rate * idx / (total - 1) if total > 1 else 0.0,
                    zero_init_last=zero_init_last, dtype=dtype, rngs=rngs,
                ))
                in_ch, idx = planes * expansion, idx + 1
            setattr(self, f"layer{stage + 1}", nnx.List(blocks))
        self.num_features = in_ch
        self.stage_channels = tuple(int(c) * expansion for c in channels)
        self.head_drop = nnx.Dropout(drop_rate, rngs=rngs)
        if num_classes > 0:
            self.fc = layers.Linear(in_ch, num_classes, kernel_init=_torch_linear_init(in_ch), dtype=dtype, rngs=rngs)
            self.fc.bias[...] = _torch_linear_init(in_ch)(rngs.params(), (num_classes,))
        else:
            self.fc = nnx.data(None)

    @property
    def stages(self) -> list[nnx.List]:
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def stem(self, images: jax.Array) -> jax.Array:
        """conv1 (7x7/2) -> bn1 -> ReLU -> 3x3/2 max-pool: the input of ``layer1``."""
        x = images if self.dtype is None else images.astype(self.dtype)
        return max_pool_3x3_s2(jax.nn.relu(self.bn1(self.conv1(x))))

    def forward_stages(self, images: jax.Array) -> list[jax.Array]:
        """Outputs of ``layer1`` ... ``layer4`` (NHWC, strides 4/8/16/32), in stage order."""
        x = self.stem(images)
        feats = []
        for stage in self.stages:
            for block in stage:
                x = block(x)
            feats.append(x)
        return feats

    def forward_head(self, features: jax.Array, pre_logits: bool = False) -> jax.Array:
        """Global average pool -> dropout -> ``fc``; float32 logits (pooled features if ``pre_logits``)."""
        x = self.head_drop(layers.global_avg_pool(features))
        if pre_logits or self.fc is None:
            return x.astype(jnp.float32)
        return self.fc(x).astype(jnp.float32)


# --- converter hooks -------------------------------------------------------------------------

def _stage_depths(sd: StateDict) -> list[int]:
    depths = [0, 0, 0, 0]
    for k in sd:
        m = re.match(r"^layer([1-4])\.(\d+)\.", k)
        if m:
            i, j = int(m.group(1)) - 1, int(m.group(2))
            depths[i] = max(depths[i], j + 1)
    return depths


def infer_config(sd: StateDict) -> dict[str, Any]:
    """Block type, blocks per stage, stage widths, stem width, input channels and classes from keys/shapes."""
    if "conv1.0.weight" in sd:
        raise ValueError("this ResNet has a deep (3-conv) stem (timm resnet*c/d/s variants), which is not supported; "
                         "only the default 7x7 stem of resnet18/34/50/101 is")
    block = "bottleneck" if "layer1.0.conv3.weight" in sd else "basic"
    depths = _stage_depths(sd)
    if min(depths) == 0:
        raise ValueError(f"ResNet checkpoint lacks a stage: blocks per stage found {depths}")
    channels = [int(sd[f"layer{i}.0.conv1.weight"].shape[0]) for i in range(1, 5)]
    if block == "bottleneck":
        for i, planes in enumerate(channels, start=1):
            out = int(sd[f"layer{i}.0.conv3.weight"].shape[0])
            if out != planes * EXPANSION["bottleneck"]:
                raise ValueError(
                    f"layer{i}: bottleneck width {planes} with output {out} is not a plain ResNet (expansion 4, "
                    "base width 64, cardinality 1); wide ResNets / ResNeXt are not supported"
                )
    return {
        "block": block,
        "depths": depths,
        "channels": channels,
        "stem_width": int(sd["conv1.weight"].shape[0]),
        "in_chans": int(sd["conv1.weight"].shape[1]),
        "num_classes": int(sd["fc.weight"].shape[0]) if "fc.weight" in sd else 0,
    }


def looks_like(sd: StateDict) -> bool:
    """timm / torchvision ResNet naming: ``conv1``, ``bn1``, ``layer1..4.j.conv1`` (``fc`` optional).

    Deep-stem variants (``conv1.0``) are recognised too, so that ``infer_config`` can say why
    they are not supported.
    """
    return (("conv1.weight" in sd or "conv1.0.weight" in sd) and "bn1.weight" in sd
            and all(f"layer{i}.0.conv1.weight" in sd for i in range(1, 5)))


def build(**config: Any) -> ResNet:
    return ResNet(**config)


FAMILY = Family(
    name="resnet",
    build=build,
    infer_config=infer_config,
    looks_like=looks_like,
    default_keys=("state_dict", "model", "state_dict_ema", "model_ema"),
    models={
        "resnet18": dict(block="basic", depths=(2, 2, 2, 2)),
        "resnet34": dict(block="basic", depths=(3, 4, 6, 3)),
        "resnet50": dict(block="bottleneck", depths=(3, 4, 6, 3)),
        "resnet101": dict(block="bottleneck", depths=(3, 4, 23, 3)),
        # The golden set's small variant of resnet50 (timm ResNet(Bottleneck, [2, 1, 2, 1], channels=(8, 16, 24, 32))).
        "resnet_mini": dict(block="bottleneck", depths=(2, 1, 2, 1), channels=(8, 16, 24, 32), num_classes=10),
    },
)
