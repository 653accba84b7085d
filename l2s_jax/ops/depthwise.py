"""One depthwise-convolution op with interchangeable implementations.

Every depthwise convolution of the model zoo (SLaK branches, ConvNeXt 7x7, MobileNetV3,
CSWin's LePE) calls :func:`depthwise_conv2d`. The implementations compute the same
PyTorch-convention cross-correlation (stride 1, zero padding ``(ph, pw)`` per dimension) and
are tested equal in value and gradient:

* ``"direct"``: ``lax.conv_general_dilated`` with ``feature_group_count=C`` (the reference;
  cuDNN on GPU). Pathologically slow on XLA:CPU.
* ``"fft"``: real FFTs over the spatial axes; cost independent of the kernel size.
* ``"toeplitz"``: each kernel row becomes a banded (W x W) matrix per channel, built with a
  constant one-hot matmul so that its gradient is a matmul too; rows are shifted and summed.

``"auto"`` picks per backend and shape (see :func:`resolve_impl`). Weights are always
arguments, never jit constants (XLA would constant-fold a 51x51 convolution for minutes).
"""
from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

Impl = Literal["auto", "direct", "fft", "toeplitz"]
IMPLS = ("direct", "fft", "toeplitz")
_DEFAULT_IMPL: list[str] = ["auto"]


def set_default_impl(impl: Impl) -> None:
    """Set the process-wide implementation used when a layer asks for ``"auto"``."""
    if impl not in ("auto",) + IMPLS:
        raise ValueError(f"unknown depthwise impl {impl!r}; choose one of {('auto',) + IMPLS}")
    _DEFAULT_IMPL[0] = impl


def resolve_impl(impl: str, height: int, width: int, kh: int, kw: int) -> str:
    """Map ``"auto"`` to a concrete implementation for this backend and shape.

    On CPU the grouped convolution is never chosen; FFT wins on large maps and the banded
    Toeplitz form on small ones (measured by ``tools/benchmark_depthwise.py``). On GPU/TPU
    the library convolution is used.
    """
    if impl == "auto":
        impl = _DEFAULT_IMPL[0]
    if impl != "auto":
        if impl not in IMPLS:
            raise ValueError(f"unknown depthwise impl {impl!r}; choose one of {IMPLS}")
        return impl
    if jax.default_backend() != "cpu":
        return "direct"
    if width <= 14:
        return "toeplitz"
    return "fft"


def _crop_kernel(kernel: jax.Array, padding: tuple[int, int], size: tuple[int, int]):
    """Drop taps that never touch the unpadded input (kernels larger than the map); exact."""
    pads = list(padding)
    for axis in (0, 1):
        k, p, n = kernel.shape[axis], pads[axis], size[axis]
        out = n + 2 * p - k + 1
        lo = max(0, p - out + 1)  # tap a reads x[i + a - p] for output i in [0, out)
        hi = min(k, p + n)
        t = min(lo, k - hi)  # crop symmetrically so the output size is unchanged
        if t > 0:
            kernel = jax.lax.slice_in_dim(kernel, t, k - t, axis=axis)
            pads[axis] = p - t
    return kernel, tuple(pads)


def _fast_len(n: int) -> int:
    """Smallest m >= n whose prime factors are all 2, 3, 5 or 7 (fast FFT sizes)."""
    m = n
    while True:
        r = m
        for p in (2, 3, 5, 7):
            while r % p == 0:
                r //= p
        if r == 1:
            return m
        m += 1


def _direct(x, kernel, padding):
    c = x.shape[-1]
    return jax.lax.conv_general_dilated(
        x,
        kernel[:, :, None, :],
        window_strides=(1, 1),
        padding=((padding[0], padding[0]), (padding[1], padding[1])),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=c,
    )


def _fft(x, kernel, padding):
    n, h, w, c = x.shape
    kh, kw, _ = kernel.shape
    ph, pw = padding
    ho, wo = h + 2 * ph - kh + 1, w + 2 * pw - kw + 1
    # Circular correlation of length >= padded size has no wrap-around on the kept outputs.
    fh, fw = _fast_len(h + 2 * ph), _fast_len(w + 2 * pw)
    compute = jnp.promote_types(x.dtype, jnp.float32)
    xp = jnp.pad(x.astype(compute), ((0, 0), (ph, ph), (pw, pw), (0, 0)))
    xf = jnp.fft.rfft2(xp, s=(fh, fw), axes=(1, 2))
    kf = jnp.fft.rfft2(kernel.astype(compute), s=(fh, fw), axes=(0, 1))
    y = jnp.fft.irfft2(xf * jnp.conj(kf), s=(fh, fw), axes=(1, 2))
    return y[:, :ho, :wo, :].astype(x.dtype)


@functools.lru_cache(maxsize=None)
def _band_selector(w_in: int, w_out: int, kw: int, pw: int) -> np.ndarray:
    """One-hot tensor S[b, j_in, j_out] = 1 where j_in = j_out + b - pw."""
    sel = np.zeros((kw, w_in, w_out), np.float32)
    for b in range(kw):
        for j in range(w_out):
            i = j + b - pw
            if 0 <= i < w_in:
                sel[b, i, j] = 1.0
    return sel


def _toeplitz(x, kernel, padding):
    n, h, w, c = x.shape
    kh, kw, _ = kernel.shape
    ph, pw = padding
    ho, wo = h + 2 * ph - kh + 1, w + 2 * pw - kw + 1
    sel = jnp.asarray(_band_selector(w, wo, kw, pw), kernel.dtype)
    # bands[a, c, j_in, j_out] = kernel[a, j_in - j_out + pw, c]
    bands = jnp.einsum("abc,bij->acij", kernel, sel)
    xp = jnp.pad(x, ((0, 0), (ph, ph), (0, 0), (0, 0)))
    y = None
    for a in range(kh):
        rows = jax.lax.slice_in_dim(xp, a, a + ho, axis=1)  # (n, ho, w, c)
        term = jnp.einsum("nhic,cij->nhjc", rows, bands[a])
        y = term if y is None else y + term
    return y


def depthwise_conv2d(
    x: jax.Array,
    kernel: jax.Array,
    padding: tuple[int, int] | None = None,
    impl: str = "auto",
) -> jax.Array:
    """Depthwise cross-correlation of NHWC ``x`` with a ``(kh, kw, C)`` kernel, stride 1.

    ``padding`` is the symmetric zero padding per dimension; ``None`` means PyTorch's
    ``(kh // 2, kw // 2)``, i.e. 'same' output size for odd kernels.
    """
    if x.ndim != 4 or kernel.ndim != 3 or kernel.shape[-1] != x.shape[-1]:
        raise ValueError(
            f"depthwise_conv2d expects x (N,H,W,C) and kernel (kh,kw,C); got {x.shape} and {kernel.shape}"
        )
    if padding is None:
        padding = (kernel.shape[0] // 2, kernel.shape[1] // 2)
    kernel = kernel.astype(x.dtype)
    kernel, padding = _crop_kernel(kernel, tuple(padding), x.shape[1:3])
    which = resolve_impl(impl, x.shape[1], x.shape[2], kernel.shape[0], kernel.shape[1])
    return {"direct": _direct, "fft": _fft, "toeplitz": _toeplitz}[which](x, kernel, padding)
