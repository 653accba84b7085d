"""SLaK (Liu et al. 2023): ConvNeXt with sparse, decomposed 51x51 depthwise kernels; and the
paper's ConvNeXt + BN student, which is this same class with kernel sizes [7, 7, 7, 7, 100].

Parameter names follow the authors' ``models/SLaK.py`` so their checkpoints map by path:
``stages.i.j.large_kernel.{LoRA1,LoRA2,lkb_origin,small_conv}.{conv,bn}.*``. The large-kernel
op of stage i with ``K = kernel_size[i]`` and ``N = kernel_size[4]`` sums bias-free depthwise
conv + BatchNorm branches: (K, N) + (N, K) [+ (N, N)] with decomposition, (K, K) [+ (N, N)]
without; there is no (N, N) branch when N >= K. Padding is 'same' per dimension.

Sparsity: ``sparse=True`` gives every large-kernel conv a non-trainable 0/1 mask
(:class:`l2s_jax.layers.SparseMask`); the converter derives it from the zeros of a released
checkpoint and the forward pass multiplies it in, so masked weights stay zero under training.

Re-parameterisation: :meth:`SLaK.fuse` folds each op's branches and BatchNorms into one
K x K depthwise kernel plus bias (``lkb_reparam``), exact in eval mode: the fast frozen teacher.
"""
from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from l2s_jax import layers
from l2s_jax.models import convnext
from l2s_jax.models.registry import Default, Family, StateDict


class ConvBN(nnx.Module):
    """Bias-free depthwise conv followed (optionally) by BatchNorm: SLaK's ``conv_bn``."""

    def __init__(self, channels: int, kernel_size: tuple[int, int], *, bn: bool, sparse: bool, dw_impl: str,
                 dtype=None, rngs: nnx.Rngs):
        self.conv = layers.DepthwiseConv2d(channels, kernel_size, bias=False, impl=dw_impl,
                                           kernel_init=layers.TRUNC_NORMAL_02, dtype=dtype, rngs=rngs)
        if sparse:
            self.conv.set_mask(np.ones(self.conv.kernel.shape, np.float32))
        self.bn = layers.BatchNorm(channels) if bn else nnx.data(None)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv(x)
        return x if self.bn is None else self.bn(x)

    def folded(self) -> tuple[jax.Array, jax.Array]:
        """Eval-mode (kernel, bias) of conv + BN: kernel * a, b with bn(y) = y * a + b."""
        k = self.conv.effective_kernel()
        if self.bn is None:
            return k, jnp.zeros((k.shape[-1],), k.dtype)
        a, b = self.bn.folded()
        return k * a, b


def _center_pad(kernel: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Zero-pad a (kh, kw, C) kernel to ``size`` around its centre (odd sizes)."""
    dh, dw = size[0] - kernel.shape[0], size[1] - kernel.shape[1]
    return jnp.pad(kernel, ((dh // 2, dh - dh // 2), (dw // 2, dw - dw // 2), (0, 0)))


class LargeKernel(nnx.Module):
    """SLaK's ``ReparamLargeKernelConv``: the sum of depthwise conv + BN branches."""

    def __init__(self, channels: int, kernel_size: int, small_kernel: int, *, decompose: bool, bn: bool,
                 sparse: bool, dw_impl: str, dtype=None, rngs: nnx.Rngs):
        k, n = kernel_size, small_kernel
        branch = dict(bn=bn, sparse=sparse, dw_impl=dw_impl, dtype=dtype, rngs=rngs)
        self.kernel_size = k
        if decompose:
            self.LoRA1 = ConvBN(channels, (k, n), **branch)
            self.LoRA2 = ConvBN(channels, (n, k), **branch)
            self.lkb_origin = nnx.data(None)
        else:
            self.LoRA1 = self.LoRA2 = nnx.data(None)
            self.lkb_origin = ConvBN(channels, (k, k), **branch)
        self.small_conv = ConvBN(channels, (n, n), **branch) if n < k else nnx.data(None)
        self.lkb_reparam = nnx.data(None)

    def branches(self) -> list[ConvBN]:
        return [b for b in (self.LoRA1, self.LoRA2, self.lkb_origin, self.small_conv) if b is not None]

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.lkb_reparam is not None:
            return self.lkb_reparam(x)
        out = None
        for b in self.branches():
            y = b(x)
            out = y if out is None else out + y
        return out

    def fused_kernel(self) -> tuple[jax.Array, jax.Array]:
        """One (K, K, C) kernel and (C,) bias equal to the eval-mode sum of the branches."""
        size = (self.kernel_size, self.kernel_size)
        kernel, bias = 0.0, 0.0
        for b in self.branches():
            k, c = b.folded()
            kernel = kernel + _center_pad(k, size)
            bias = bias + c
        return kernel, bias

    def fuse(self, fused: tuple[jax.Array, jax.Array] | None = None) -> None:
        """Replace the branches by ``lkb_reparam`` (exact in eval mode; for frozen teachers).

        ``fused`` is this op's :meth:`fused_kernel` when the caller computed it already
        (:meth:`SLaK.fuse` does so for every op in one compiled program).
        """
        if self.lkb_reparam is not None:
            return
        kernel, bias = self.fused_kernel() if fused is None else fused
        like = self.branches()[0].conv  # the fused conv keeps the branches' policy (impl, dtype)
        # Built shape-only: its random initial values would be overwritten at once.
        conv = nnx.eval_shape(lambda: layers.DepthwiseConv2d(kernel.shape[-1], self.kernel_size, bias=True,
                                                             impl=like.impl, dtype=like.dtype, rngs=nnx.Rngs(0)))
        conv.kernel.set_value(kernel)
        conv.bias.set_value(bias)
        self.lkb_reparam = conv
        self.LoRA1 = self.LoRA2 = self.lkb_origin = self.small_conv = nnx.data(None)


class Block(convnext.Block):
    """SLaK block: the ConvNeXt block with the large-kernel op as token mixer."""

    def __init__(self, dim: int, *, kernel_size: int, small_kernel: int, decompose: bool, bn: bool, sparse: bool,
                 drop_path: float, layer_scale_init_value: float, dw_impl: str = "auto", dtype=None,
                 rngs: nnx.Rngs):
        self.large_kernel = LargeKernel(dim, kernel_size, small_kernel, decompose=decompose, bn=bn, sparse=sparse,
                                        dw_impl=dw_impl, dtype=dtype, rngs=rngs)
        self._init_mlp(dim, drop_path, layer_scale_init_value, dtype, rngs)

    def token_mixer(self, x: jax.Array) -> jax.Array:
        return self.large_kernel(x)


class SLaK(convnext.ConvNeXt):
    """SLaK / ConvNeXt+BN on NHWC images.

    ``dims`` are multiplied by ``width_factor`` and truncated (``int(d * w)``), as in the
    authors' code: SLaK-T/S use 1.3, giving [124, 249, 499, 998].
    """

    def __init__(
        self,
        *,
        depths: Sequence[int] = (3, 3, 9, 3),
        dims: Sequence[int] = (96, 192, 384, 768),
        kernel_size: Sequence[int] = (51, 49, 47, 13, 5),
        width_factor: float = 1.0,
        decompose: bool = True,
        bn: bool = True,
        sparse: bool = False,
        rngs: nnx.Rngs,
        **kwargs: Any,
    ):
        if len(kernel_size) != 5:
            raise ValueError(f"kernel_size needs 5 entries (4 stage kernels + the small kernel), got {kernel_size}")
        self.kernel_size = tuple(int(k) for k in kernel_size)
        self.decompose, self.bn, self.sparse = decompose, bn, sparse
        super().__init__(depths=depths, dims=[int(d * width_factor) for d in dims], rngs=rngs, **kwargs)

    def make_block(self, stage: int, dim: int, **kwargs: Any) -> nnx.Module:
        return Block(dim, kernel_size=self.kernel_size[stage], small_kernel=self.kernel_size[4],
                     decompose=self.decompose, bn=self.bn, sparse=self.sparse, **kwargs)

    def fuse(self) -> "SLaK":
        """Re-parameterise every large-kernel op into one K x K kernel + bias (eval mode only)."""
        fuse_large_kernels(self)
        return self


def fuse_large_kernels(model: nnx.Module) -> int:
    """:meth:`LargeKernel.fuse` every large-kernel op in ``model``; returns how many it holds.

    The folded kernels of all ops come from one jitted program (op by op, the folding and
    padding are hundreds of small dispatches: seconds for SLaK-T). Already fused ops count.
    """
    ops = [m for _, m in nnx.iter_modules(model) if isinstance(m, LargeKernel)]
    todo = [m for m in ops if m.lkb_reparam is None]
    if todo:
        fused = nnx.jit(lambda todo: [m.fused_kernel() for m in todo])(todo)
        for m, kernel_bias in zip(todo, fused):
            m.fuse(kernel_bias)
    return len(ops)


# --- converter hooks -------------------------------------------------------------------------

_LK = re.compile(r"^stages\.(\d)\.(\d+)\.large_kernel\.(LoRA1|LoRA2|lkb_origin|small_conv)\.conv\.weight$")


def _looks_like_slak(sd: StateDict) -> bool:
    return "downsample_layers.0.0.weight" in sd and any(_LK.match(k) for k in sd)


def infer_config(sd: StateDict) -> dict[str, Any]:
    """SLaK hyperparameters from names and shapes: depths, widths, kernels, decomposition, BN, sparsity."""
    config = convnext.macro_config(sd)
    decompose = any(".LoRA1." in k for k in sd)
    kernels = [0, 0, 0, 0]
    small = None
    for i in range(4):
        prefix = f"stages.{i}.0.large_kernel."
        if decompose:
            kernels[i] = int(sd[prefix + "LoRA1.conv.weight"].shape[2])
            small = int(sd[prefix + "LoRA1.conv.weight"].shape[3])
        else:
            kernels[i] = int(sd[prefix + "lkb_origin.conv.weight"].shape[2])
        if prefix + "small_conv.conv.weight" in sd:
            small = int(sd[prefix + "small_conv.conv.weight"].shape[2])
    small_read = small is not None
    if small is None:
        # No small branch anywhere and nothing tells N: any N >= max(K) builds the same network.
        small = 100 if max(kernels) < 100 else max(kernels) + 1
    kernel_size = [*kernels, small] if small_read else Default(
        [*kernels, small], f"large kernels {kernels} read from shapes; no small-kernel branch, so the small size "
        f"{small} is the convention (any size above the largest kernel builds the same network)")
    lk_weights = [v for k, v in sd.items() if _LK.match(k)]
    config.update(
        kernel_size=kernel_size,
        width_factor=1.0,
        decompose=decompose,
        bn=any(re.search(r"large_kernel\.\w+\.bn\.weight$", k) for k in sd),
        sparse=any(np.any(np.asarray(w) == 0) for w in lk_weights),
    )
    return config


def derive_masks(model: SLaK, sd: StateDict) -> None:
    """Sparse checkpoints store pruned weights as zeros: the mask is ``weight != 0``."""
    if not model.sparse:
        return
    for path, m in nnx.iter_modules(model):
        if isinstance(m, ConvBN) and m.conv.mask is not None:
            key = ".".join(str(p) for p in path) + ".conv.weight"
            m.conv.set_mask(layers.depthwise_weight_to_hwc(np.asarray(sd[key]) != 0).astype(np.float32))


def build(**config: Any) -> SLaK:
    return SLaK(**config)


_SLAK = dict(kernel_size=(51, 49, 47, 13, 5), width_factor=1.3, decompose=True, bn=True, sparse=True)
_STUDENT = dict(kernel_size=(7, 7, 7, 7, 100), width_factor=1.0, decompose=False, bn=True)

FAMILY = Family(
    name="slak",
    build=build,
    infer_config=infer_config,
    looks_like=_looks_like_slak,
    after_load=derive_masks,
    default_keys=("model", "state_dict", "model_ema", "state_dict_ema"),
    models={
        "slak_tiny": dict(depths=(3, 3, 9, 3), dims=(96, 192, 384, 768), drop_path_rate=0.1, **_SLAK),
        "slak_small": dict(depths=(3, 3, 27, 3), dims=(96, 192, 384, 768), drop_path_rate=0.4, **_SLAK),
        "slak_base": dict(depths=(3, 3, 27, 3), dims=(128, 256, 512, 1024), drop_path_rate=0.5, **_SLAK),
        "convnext_tiny_bn": dict(depths=(3, 3, 9, 3), dims=(96, 192, 384, 768), drop_path_rate=0.1, **_STUDENT),
        "convnext_small_bn": dict(depths=(3, 3, 27, 3), dims=(96, 192, 384, 768), drop_path_rate=0.4, **_STUDENT),
    },
)
