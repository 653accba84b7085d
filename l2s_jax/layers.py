"""PyTorch-equivalent building blocks in Flax NNX (NHWC activations, float32 parameters).

Every layer declares ``torch_params``: the PyTorch state_dict name of each of its variables
and the transform from the PyTorch layout. :mod:`l2s_jax.io.torch_state` walks a model with
these tables, so a module attribute path such as ``stages[0][1].large_kernel.LoRA1.conv``
maps to the PyTorch key ``stages.0.1.large_kernel.LoRA1.conv.weight`` with no per-model
name tables. Compute dtype is ``dtype`` (e.g. bfloat16); normalisation statistics are always
computed in float32.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from l2s_jax.ops.depthwise import depthwise_conv2d

TorchParams = dict[str, tuple[str, Callable[[np.ndarray], np.ndarray] | None]]

# timm's ConvNeXt/ViT init (trunc_normal std 0.02) and torchvision/timm ResNet's conv init.
TRUNC_NORMAL_02 = nnx.initializers.truncated_normal(0.02)
KAIMING_FAN_OUT = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


def conv_weight_to_hwio(w: np.ndarray) -> np.ndarray:
    """PyTorch conv weight (O, I/g, kh, kw) -> Flax HWIO (kh, kw, I/g, O)."""
    return np.transpose(w, (2, 3, 1, 0))


def depthwise_weight_to_hwc(w: np.ndarray) -> np.ndarray:
    """PyTorch depthwise weight (C, 1, kh, kw) -> (kh, kw, C)."""
    return np.transpose(w[:, 0], (1, 2, 0))


def linear_weight_to_io(w: np.ndarray) -> np.ndarray:
    """PyTorch Linear weight (out, in) -> Flax kernel (in, out)."""
    return np.transpose(w)


def gelu(x: jax.Array) -> jax.Array:
    """Exact (erf) GELU, PyTorch's ``nn.GELU()`` default."""
    return jax.nn.gelu(x, approximate=False)


def hard_swish(x: jax.Array) -> jax.Array:
    """x * relu6(x + 3) / 6, as PyTorch's ``nn.Hardswish``."""
    return x * jnp.clip(x + 3.0, 0.0, 6.0) / 6.0


def hard_sigmoid(x: jax.Array) -> jax.Array:
    """relu6(x + 3) / 6, as timm's ``hard_sigmoid`` gate."""
    return jnp.clip(x + 3.0, 0.0, 6.0) / 6.0


def _cast(x: jax.Array, dtype) -> jax.Array:
    return x if dtype is None else x.astype(dtype)


class Conv2d(nnx.Module):
    """``nn.Conv2d`` on NHWC: symmetric per-dimension padding, stride, groups, optional bias."""

    torch_params: TorchParams = {"weight": ("kernel", conv_weight_to_hwio), "bias": ("bias", None)}

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        *,
        stride: int = 1,
        padding: int | tuple[int, int] = 0,
        groups: int = 1,
        bias: bool = True,
        kernel_init: Callable = KAIMING_FAN_OUT,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
        self.stride = stride
        self.padding = (padding, padding) if isinstance(padding, int) else tuple(padding)
        self.groups = groups
        self.dtype = dtype
        self.kernel = nnx.Param(kernel_init(rngs.params(), (kh, kw, in_channels // groups, out_channels)))
        self.bias = nnx.Param(jnp.zeros((out_channels,))) if bias else nnx.data(None)

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype if self.dtype is None else self.dtype
        ph, pw = self.padding
        y = jax.lax.conv_general_dilated(
            x.astype(dtype),
            self.kernel[...].astype(dtype),
            window_strides=(self.stride, self.stride),
            padding=((ph, ph), (pw, pw)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=self.groups,
        )
        if self.bias is not None:
            y = y + self.bias[...].astype(dtype)
        return y


class DepthwiseConv2d(nnx.Module):
    """Depthwise ``nn.Conv2d`` (groups = channels) through the shared fast depthwise op.

    ``impl`` selects the implementation (``auto``/``direct``/``fft``/``toeplitz``, see
    :mod:`l2s_jax.ops.depthwise`). A stride > 1 is computed at stride 1 and subsampled, which
    gives PyTorch's output for its symmetric padding. An optional ``mask`` (non-trainable
    :class:`SparseMask`) multiplies the kernel so masked weights stay exactly zero in training.
    """

    torch_params: TorchParams = {"weight": ("kernel", depthwise_weight_to_hwc), "bias": ("bias", None)}

    def __init__(
        self,
        channels: int,
        kernel_size: int | tuple[int, int],
        *,
        stride: int = 1,
        padding: int | tuple[int, int] | None = None,
        bias: bool = True,
        impl: str = "auto",
        kernel_init: Callable = KAIMING_FAN_OUT,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
        if padding is None:
            padding = (kh // 2, kw // 2)
        self.padding = (padding, padding) if isinstance(padding, int) else tuple(padding)
        self.stride = stride
        self.impl = impl
        self.dtype = dtype
        # Initialised as a (kh, kw, 1, C) HWIO kernel, i.e. fan_out = kh * kw as in PyTorch.
        self.kernel = nnx.Param(kernel_init(rngs.params(), (kh, kw, 1, channels))[:, :, 0, :])
        self.bias = nnx.Param(jnp.zeros((channels,))) if bias else nnx.data(None)
        self.mask = nnx.data(None)

    def set_mask(self, mask: np.ndarray | jax.Array | None) -> None:
        """Attach (or remove) a sparsity mask of the kernel's shape; 1 keeps, 0 prunes."""
        if mask is None:
            self.mask = nnx.data(None)
            return
        mask = jnp.asarray(mask, jnp.float32)
        if mask.shape != self.kernel.shape:
            raise ValueError(f"mask shape {mask.shape} does not match kernel shape {self.kernel.shape}")
        self.mask = SparseMask(mask)

    def effective_kernel(self) -> jax.Array:
        """The kernel as used in the forward pass (masked if a mask is attached)."""
        k = self.kernel[...]
        return k if self.mask is None else k * self.mask[...]

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype if self.dtype is None else self.dtype
        y = depthwise_conv2d(x.astype(dtype), self.effective_kernel().astype(dtype), self.padding, self.impl)
        if self.stride > 1:
            y = y[:, :: self.stride, :: self.stride, :]
        if self.bias is not None:
            y = y + self.bias[...].astype(dtype)
        return y


class SparseMask(nnx.Variable):
    """Non-trainable 0/1 mask of a sparse kernel (not touched by the optimizer)."""


class Linear(nnx.Module):
    """``nn.Linear`` over the last axis."""

    torch_params: TorchParams = {"weight": ("kernel", linear_weight_to_io), "bias": ("bias", None)}

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool = True,
        kernel_init: Callable = TRUNC_NORMAL_02,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        self.dtype = dtype
        self.kernel = nnx.Param(kernel_init(rngs.params(), (in_features, out_features)))
        self.bias = nnx.Param(jnp.zeros((out_features,))) if bias else nnx.data(None)

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype if self.dtype is None else self.dtype
        y = jnp.dot(x.astype(dtype), self.kernel[...].astype(dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(dtype)
        return y


class LayerNorm(nnx.Module):
    """``nn.LayerNorm`` over the last (channel) axis; statistics in float32, biased variance.

    On NHWC maps this is also ConvNeXt's 'channels_first' LayerNorm of NCHW tensors.
    """

    torch_params: TorchParams = {"weight": ("scale", None), "bias": ("bias", None)}

    def __init__(self, num_features: int, *, eps: float, affine: bool = True, rngs: nnx.Rngs | None = None):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((num_features,))) if affine else nnx.data(None)
        self.bias = nnx.Param(jnp.zeros((num_features,))) if affine else nnx.data(None)

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        mean = xf.mean(-1, keepdims=True)
        var = jnp.square(xf - mean).mean(-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        if self.scale is not None:
            y = y * self.scale[...] + self.bias[...]
        return y.astype(x.dtype)


class BatchNorm(nnx.Module):
    """``nn.BatchNorm{1,2}d`` with PyTorch semantics on channels-last inputs.

    Train mode (``use_running_average=False``) normalises with the biased batch variance and
    updates ``running = (1 - momentum) * running + momentum * batch`` with the unbiased
    variance, as PyTorch does. Statistics reduce over every axis but the last.

    ``stat_groups`` chooses the statistics' scope under ``jit`` over a globally sharded batch:
    1 (default) reduces over the global batch, i.e. PyTorch SyncBatchNorm; G > 1 splits the
    batch into G contiguous groups (one per data-parallel device) and normalises each by its
    own statistics, i.e. plain BatchNorm under DDP; running statistics then take the mean of
    the groups' statistics. Set it for a whole model through ``Policy(bn_stat_groups=...)``.
    """

    torch_params: TorchParams = {
        "weight": ("scale", None),
        "bias": ("bias", None),
        "running_mean": ("mean", None),
        "running_var": ("var", None),
    }
    torch_ignored = ("num_batches_tracked",)

    def __init__(
        self,
        num_features: int,
        *,
        eps: float = 1e-5,
        momentum: float = 0.1,
        stat_groups: int = 1,
        use_running_average: bool = False,
        rngs: nnx.Rngs | None = None,
    ):
        self.eps = eps
        self.momentum = momentum
        self.stat_groups = stat_groups
        self.use_running_average = use_running_average
        self.scale = nnx.Param(jnp.ones((num_features,)))
        self.bias = nnx.Param(jnp.zeros((num_features,)))
        self.mean = nnx.BatchStat(jnp.zeros((num_features,)))
        self.var = nnx.BatchStat(jnp.ones((num_features,)))

    def folded(self) -> tuple[jax.Array, jax.Array]:
        """Eval-mode affine form ``y = x * a + b`` (used for re-parameterisation)."""
        a = self.scale[...] * jax.lax.rsqrt(self.var[...] + self.eps)
        return a, self.bias[...] - self.mean[...] * a

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.use_running_average:
            a, b = self.folded()
            return (x.astype(jnp.float32) * a + b).astype(x.dtype)
        xf = x.astype(jnp.float32)
        c = xf.shape[-1]
        g = self.stat_groups
        if xf.shape[0] % g:
            raise ValueError(f"batch of {xf.shape[0]} does not split into stat_groups={g}")
        xg = xf.reshape((g, -1, c))
        mean = xg.mean(1, keepdims=True)
        var = jnp.square(xg - mean).mean(1, keepdims=True)
        y = (xg - mean) * jax.lax.rsqrt(var + self.eps)
        y = y.reshape(xf.shape) * self.scale[...] + self.bias[...]
        n = xg.shape[1]
        unbiased = var * (n / max(n - 1, 1))
        m = self.momentum
        # set_value, not ``[...] =``: NNX's indexed assignment compares shardings, which on a tracer
        # builds an error message each time (~10 ms per BatchNorm, over a second of tracing per step).
        self.mean.set_value(_running(self.mean[...], mean.mean((0, 1)), m))
        self.var.set_value(_running(self.var[...], unbiased.mean((0, 1)), m))
        return y.astype(x.dtype)


def _running(old: jax.Array, batch: jax.Array, momentum: float) -> jax.Array:
    """PyTorch's running-statistic update, in the statistic's own dtype."""
    return ((1 - momentum) * old + momentum * jax.lax.stop_gradient(batch)).astype(old.dtype)


class DropPath(nnx.Module):
    """Stochastic depth per sample (timm's ``drop_path``): identity when deterministic."""

    def __init__(self, rate: float, *, deterministic: bool = False, rngs: nnx.Rngs | None = None):
        self.rate = rate
        self.deterministic = deterministic
        self.rngs = rngs["dropout"].fork() if (rngs is not None and rate > 0) else nnx.data(None)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.deterministic or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = jax.random.bernoulli(self.rngs(), keep, shape)
        return jnp.where(mask, x / keep, 0.0).astype(x.dtype)


def global_avg_pool(x: jax.Array) -> jax.Array:
    """Mean over the spatial axes of an NHWC map, accumulated in float32."""
    return x.astype(jnp.float32).mean((1, 2)).astype(x.dtype)
