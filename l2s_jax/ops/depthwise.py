"""One depthwise-convolution op with interchangeable implementations.

Every depthwise convolution of the model zoo (SLaK branches, ConvNeXt 7x7, MobileNetV3,
CSWin's LePE) calls :func:`depthwise_conv2d`. The implementations compute the same
PyTorch-convention cross-correlation (stride 1, symmetric zero padding ``(ph, pw)``) and are
tested equal in value and in gradient (w.r.t. input and kernel):

* ``"direct"``: ``lax.conv_general_dilated`` with ``feature_group_count=C`` (the reference;
  cuDNN on GPU). Pathologically slow on XLA:CPU (single-threaded, ~1 GFLOP/s).
* ``"fft"``: real FFTs (``jnp.fft``) of the smallest alias-free circular length, in an NCHW
  working layout; custom VJP whose backward reuses the forward's input spectrum, so a
  forward+backward costs four batch transforms. Cost independent of the kernel size.
* ``"dft"``: the same circular convolution with the 2-D real DFT written as four real
  matmuls (DFT matrices shared by all channels, so each is one large GEMM) in an
  (H, W, N*C) working layout; custom VJP with transposed matrices. Also kernel-size
  independent; beats XLA's FFT on small and medium maps.
* ``"shift"``: shift-and-add, one fused elementwise loop over the taps (vectorised over
  channels); the backward computes the input gradient the same way with the flipped kernel
  and the kernel gradient from transforms of x and dy (DFT on small maps, FFT on large
  ones; a tap-by-tap reduction is ~10x slower on XLA:CPU). For small kernels (3x3 ... 7x7).
* ``"toeplitz"``: banded-Toeplitz batched matmul with channels on the matmul batch axis,
  along the axis of the longer kernel extent (W for wide/square kernels, H for tall ones);
  the shifts of the other kernel axis are stacked into the contraction. Never faster than
  the others here (kh x the input's memory, W/kw x the FLOPs); kept as a matmul-only
  formulation without custom VJP.

``fft``, ``dft`` and ``shift`` run the batch in cache-sized chunks (``lax.map`` forward,
``lax.scan`` backward accumulating the kernel gradient in frequency), 1.2-2.4x faster than
whole-batch passes on CPU. They define custom VJPs: reverse mode (grad/vjp) works,
forward mode (jvp) does not; use ``direct`` or ``toeplitz`` for jvp. ``"auto"`` picks per
backend and shape (see :func:`resolve_impl`). Weights are always
arguments, never jit constants, and the transform/band matrices are built in-graph from
``iota`` (XLA would otherwise constant-fold a 51x51 convolution for minutes, and embedded
matrices would bloat every lowered module).
"""
from __future__ import annotations

import functools
from typing import Literal, NamedTuple, Sequence

import jax
import jax.numpy as jnp

Impl = Literal["auto", "direct", "fft", "dft", "shift", "toeplitz"]
IMPLS = ("direct", "fft", "dft", "shift", "toeplitz")
_HI = jax.lax.Precision.HIGHEST
Padding = tuple[int, int]


def resolve_impl(impl: str, height: int, width: int, kh: int, kw: int) -> str:
    """Map ``"auto"`` to a concrete implementation for this backend and shape.

    ``kh, kw`` are the kernel extents after cropping to the taps that can touch the map.
    Policy from ``tools/benchmark_depthwise.py`` and interleaved probes on a shared 2-core
    AVX-512 CPU (jax 0.10.2, batch 8, batch-chunked paths; process CPU ms, i.e. per core):

    * GPU/TPU: ``"direct"`` (cuDNN / the TPU convolution). NOT measured: no accelerator was
      available when this policy was written; benchmark there before relying on it.
    * CPU, kernels up to 7x7 (ConvNeXt 7x7, MobileNet 3x3/5x5): ``"shift"`` on maps of
      side > ``_SMALL_MAP_SIDE``, else ``"dft"``. Student 7x7, forward / forward+backward:
      56x56x96 shift 10.6/39, fft 20/59, dft 30/78; 28x28x192 shift 6.0/20, dft 8.1/19;
      14x14x384 dft 2.7-3.7/10.8, shift 4.0/12; 7x7x768 dft 1.9/4.2, shift 2.8/6.5.
    * CPU, larger kernels (SLaK, usually merged into one K x K kernel): ``"dft"`` on maps of
      side <= ``_DFT_MAX_SIDE``, else ``"fft"``: a DFT matmul costs O(map side) per
      spectrum point against the FFT's O(log L), but runs at GEMM speed without the FFT's
      NCHW transposes. SLaK-T stages, forward: 56x56 K51 fft 69 / dft 96; 28x28 K49 dft
      39 / fft 66; 14x14 K47 dft 12 / fft 30; 7x7 K13 dft 3.5 / fft 16 / shift 11.
    """
    if impl != "auto":
        if impl not in IMPLS:
            raise ValueError(f"unknown depthwise impl {impl!r}; choose one of {IMPLS}")
        return impl
    if jax.default_backend() != "cpu":
        return "direct"
    if kh <= _SHIFT_MAX_TAPS and kw <= _SHIFT_MAX_TAPS and max(height, width) > _SMALL_MAP_SIDE:
        return "shift"
    return "dft" if _prefer_dft(height, width) else "fft"


_SHIFT_MAX_TAPS = 7  # shift-add up to 7x7 kernels (49 taps)
_SMALL_MAP_SIDE = 16  # up to this map side, the DFT beats shift-add for small kernels too
_DFT_MAX_SIDE = 32  # above this map side, XLA's FFT beats the matmul DFT


def _prefer_dft(height: int, width: int) -> bool:
    """Matmul DFT over XLA's FFT: its cost per spectrum point grows with the map side."""
    return max(height, width) <= _DFT_MAX_SIDE


# ----------------------------------------------------------------------------- helpers


def merge_kernels(kernels: Sequence[jax.Array], shape: tuple[int, int] | None = None) -> jax.Array:
    """Sum depthwise kernels ``(kh_i, kw_i, C)`` of odd sizes into one centre-aligned kernel.

    The result has ``shape`` (default: the largest extent of each axis, e.g. 51x51 for
    SLaK's 51x5 + 5x51 + 5x5 branches). With 'same' padding (``k // 2``) per branch,
    ``depthwise_conv2d(x, merge_kernels(ks))`` equals the sum of the branches' outputs
    exactly, so several branches cost one convolution.
    """
    if not kernels:
        raise ValueError("merge_kernels needs at least one kernel")
    c = kernels[0].shape[-1]
    th = max(k.shape[0] for k in kernels) if shape is None else shape[0]
    tw = max(k.shape[1] for k in kernels) if shape is None else shape[1]
    out = None
    for k in kernels:
        kh, kw, kc = k.shape
        if kc != c:
            raise ValueError(f"kernels have different channel counts: {kc} != {c}")
        if kh > th or kw > tw or (th - kh) % 2 or (tw - kw) % 2:
            raise ValueError(f"kernel {kh}x{kw} cannot be centre-aligned in {th}x{tw}")
        dh, dw = (th - kh) // 2, (tw - kw) // 2
        k = jnp.pad(k, ((dh, dh), (dw, dw), (0, 0)))
        out = k if out is None else out + k.astype(out.dtype)
    return out


def _out_size(n: int, k: int, p: int) -> int:
    return n + 2 * p - k + 1


def _circular_length(n: int, k: int, p: int) -> int:
    """Smallest circular length whose correlation is alias-free on the kept outputs.

    Output ``i`` in ``[0, out)`` reads input ``i + a - p`` for taps ``a < k``. Wrapped reads
    must land on zeros (indices ``>= n``): ``L >= n + p`` covers the negative reads and
    ``L >= out + k - 1 - p`` the reads past the end; ``L >= k`` places the kernel and
    ``L >= out`` keeps the outputs distinct (padding beyond ``k - 1``). The same bound makes
    both gradients alias-free (they are correlations of the same two supports).
    """
    out = _out_size(n, k, p)
    return max(n + p, out + k - 1 - p, k, out)


def _crop_taps(n: int, k: int, p: int) -> int:
    """Taps to drop from each end of a kernel axis that never touch the unpadded input.

    Tap ``a`` reads ``x[i + a - p]`` for output ``i`` in ``[0, out)``; cropping is symmetric
    so the output size is unchanged.
    """
    out = _out_size(n, k, p)
    lo = max(0, p - out + 1)
    hi = min(k, p + n)
    return max(0, min(lo, k - hi))


def effective_kernel_size(map_size: tuple[int, int], kernel_size: tuple[int, int],
                          padding: tuple[int, int] | None = None) -> tuple[int, int]:
    """Kernel extents after dropping the taps that can never touch the map (what runs).

    E.g. SLaK-T's 47x47 kernel on a 14x14 map is a 27x27 one. ``padding`` None is 'same'.
    """
    pads = (kernel_size[0] // 2, kernel_size[1] // 2) if padding is None else padding
    return tuple(k - 2 * _crop_taps(n, k, p) for n, k, p in zip(map_size, kernel_size, pads))


def chosen_impl(impl: str, map_size: tuple[int, int], kernel_size: tuple[int, int],
                padding: tuple[int, int] | None = None) -> str:
    """The implementation :func:`depthwise_conv2d` runs for these static sizes (``auto`` resolved)."""
    kh, kw = effective_kernel_size(map_size, kernel_size, padding)
    return resolve_impl(impl, map_size[0], map_size[1], kh, kw)


def _crop_kernel(kernel: jax.Array, padding: Padding, size: tuple[int, int]) -> tuple[jax.Array, Padding]:
    """Drop taps that never touch the unpadded input (kernels larger than the map); exact."""
    pads = list(padding)
    for axis in (0, 1):
        k, p, n = kernel.shape[axis], pads[axis], size[axis]
        t = _crop_taps(n, k, p)
        if t > 0:
            kernel = jax.lax.slice_in_dim(kernel, t, k - t, axis=axis)
            pads[axis] = p - t
    return kernel, (pads[0], pads[1])


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


def _compute_dtype(dtype) -> jnp.dtype:
    """Transforms run in at least float32 (bfloat16 spectra would lose ~2 digits)."""
    return jnp.promote_types(dtype, jnp.float32)


def _phase(rows: int, cols: int, length: int, row_offset: int = 0, col_offset: int = 0) -> jax.Array:
    """Angles ``2 pi ((r + row_offset) * (c + col_offset) mod length) / length``, in-graph.

    Built from iota and reduced modulo ``length`` in integers first, so the float32 angle
    stays in ``[0, 2 pi)`` and cos/sin are accurate to ~1e-7 whatever the sizes.
    """
    r = jax.lax.broadcasted_iota(jnp.int32, (rows, cols), 0) + row_offset
    c = jax.lax.broadcasted_iota(jnp.int32, (rows, cols), 1) + col_offset
    return jnp.mod(r * c, length).astype(jnp.float32) * jnp.float32(2 * jnp.pi / length)


# ----------------------------------------------------------------------------- direct


def _direct(x: jax.Array, kernel: jax.Array, padding: Padding) -> jax.Array:
    c = x.shape[-1]
    return jax.lax.conv_general_dilated(
        x,
        kernel[:, :, None, :],
        window_strides=(1, 1),
        padding=((padding[0], padding[0]), (padding[1], padding[1])),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=c,
        precision=_HI,
    )


# ----------------------------------------------------------------------------- geometry


class _Geom(NamedTuple):
    """Static sizes of one convolution: map, kernel, padding, output, circular lengths."""

    h: int
    w: int
    kh: int
    kw: int
    ph: int
    pw: int
    ho: int
    wo: int
    lh: int
    lw: int

    @property
    def fh(self) -> int:
        """Number of kept frequencies of the real (half-spectrum) transform along H."""
        return self.lh // 2 + 1


def _geometry(x_shape, k_shape, padding: Padding, fast_lengths: bool) -> _Geom:
    _, h, w, _ = x_shape
    kh, kw = k_shape[0], k_shape[1]
    ph, pw = padding
    lh, lw = _circular_length(h, kh, ph), _circular_length(w, kw, pw)
    if fast_lengths:
        lh, lw = _fast_len(lh), _fast_len(lw)
    return _Geom(h, w, kh, kw, ph, pw, _out_size(h, kh, ph), _out_size(w, kw, pw), lh, lw)


def _real_dtype(complex_dtype) -> jnp.dtype:
    return jnp.finfo(complex_dtype).dtype


# Transform and shift paths run the batch in chunks of about this many input elements
# (lax.map / lax.scan): each chunk's maps and spectra stay cache-resident between the
# passes. One image per chunk measured 1.2-2x faster than the whole batch at batch 8 and
# up to 2.4x at batch 32 (e.g. SLaK-T 28x28 K49 dft 57 -> 29 ms, 56x56 K51 fft 111 -> 73).
_CHUNK_ELEMS = 64 * 1024


def _images_per_chunk(g: _Geom, batch: int, channels: int) -> int:
    """Largest divisor of the batch whose chunk stays within ``_CHUNK_ELEMS`` (at least 1)."""
    n = max(1, min(batch, _CHUNK_ELEMS // max(1, g.h * g.w * channels)))
    while batch % n:
        n -= 1
    return n


def _split_batch(a: jax.Array, n: int) -> jax.Array:
    """(B, ...) -> (B // n, n, ...)."""
    return a.reshape((a.shape[0] // n, n) + a.shape[1:])


def _merge_batch(a: jax.Array) -> jax.Array:
    """(B // n, n, ...) -> (B, ...)."""
    return a.reshape((a.shape[0] * a.shape[1],) + a.shape[2:])


# ----------------------------------------------------------------------------- fft


def _to_nchw(a: jax.Array, dtype) -> jax.Array:
    return jnp.transpose(a.astype(dtype), (0, 3, 1, 2))


def _kernel_rfft(kernel: jax.Array, g: _Geom) -> jax.Array:
    """Spectrum ``(C, Lh, Lw//2+1)`` of the kernel placed at offsets ``-p`` (circularly)."""
    k = jnp.pad(jnp.transpose(kernel, (2, 0, 1)), ((0, 0), (0, g.lh - g.kh), (0, g.lw - g.kw)))
    return jnp.fft.rfft2(jnp.roll(k, (-g.ph, -g.pw), axis=(1, 2)))


def _fft_forward(x: jax.Array, kernel: jax.Array, g: _Geom, keep_spectra: bool = True):
    """Forward over batch chunks; with ``keep_spectra`` also the per-chunk input spectra."""
    ct = _compute_dtype(x.dtype)
    ks = _kernel_rfft(kernel.astype(ct), g)

    def chunk(xc):
        xs = jnp.fft.rfft2(_to_nchw(xc, ct), s=(g.lh, g.lw))
        # Correlation theorem: y = irfft(X * conj(K)); outputs [0, ho) x [0, wo) are alias-free.
        y = jnp.fft.irfft2(xs * jnp.conj(ks), s=(g.lh, g.lw))[:, :, : g.ho, : g.wo]
        y = jnp.transpose(y, (0, 2, 3, 1)).astype(x.dtype)
        return (y, xs) if keep_spectra else y

    n = _images_per_chunk(g, x.shape[0], x.shape[-1])
    out = jax.lax.map(chunk, _split_batch(x, n))
    if not keep_spectra:
        return _merge_batch(out)
    y, xs = out
    return _merge_batch(y), (xs, ks)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _fft(x: jax.Array, kernel: jax.Array, g: _Geom) -> jax.Array:
    return _fft_forward(x, kernel, g, keep_spectra=False)


def _fft_kernel_from_product(acc: jax.Array, g: _Geom) -> jax.Array:
    """Kernel gradient from ``sum_n X * conj(DY)`` (C, Lh, Lw//2+1).

    dk is the correlation of dy with x, so one (C-sized) inverse transform of the
    batch-summed product; tap ``a`` sits at circular lag ``a - p``.
    """
    dg = jnp.fft.irfft2(acc, s=(g.lh, g.lw))
    dk = jnp.roll(dg, (g.ph, g.pw), axis=(1, 2))[:, : g.kh, : g.kw]
    return jnp.transpose(dk, (1, 2, 0))


def _fft_bwd(g: _Geom, res, dy: jax.Array):
    # y = crop(x (*) k) with (*) circular correlation, so dx = pad(dy) * k, a convolution
    # (spectrum DY * K). Avoids JAX's transpose of rfft, which runs a full complex FFT.
    xs, ks = res
    ct = _real_dtype(xs.dtype)

    def chunk(acc, inputs):
        xs_c, dy_c = inputs
        ds = jnp.fft.rfft2(_to_nchw(dy_c, ct), s=(g.lh, g.lw))
        dx = jnp.fft.irfft2(ds * ks, s=(g.lh, g.lw))[:, :, : g.h, : g.w]
        acc = acc + jnp.sum(xs_c * jnp.conj(ds), axis=0)
        return acc, jnp.transpose(dx, (0, 2, 3, 1)).astype(dy.dtype)

    acc, dx = jax.lax.scan(chunk, jnp.zeros(ks.shape, ks.dtype), (xs, _split_batch(dy, xs.shape[1])))
    return _merge_batch(dx), _fft_kernel_from_product(acc, g).astype(dy.dtype)


_fft.defvjp(_fft_forward, _fft_bwd)


# ----------------------------------------------------------------------------- dft
#
# Working layout: a map (N, H, W, C) is viewed as (H, W * N * C). The real DFT along H is
# one GEMM (2*Fh, H) @ (H, W*N*C) with rows (frequency, re/im); the complex DFT along W is a
# batched GEMM over the Fh frequencies, (2*Lw, 2*W) @ (2*W, N*C), whose rows and columns are
# (re/im, index). The synthesis mirrors it; the kernel's spectrum is the same analysis of
# the kernel placed at offsets -p. All matrices are real, channel-independent and built
# directly in the orientation each GEMM consumes (a transposed operand would fall off
# XLA:CPU's fast matmul path); the backward uses the adjoint (transposed) stages.


def _cos_sin(n: int, length: int, rows: int, offset: int, transpose: bool) -> tuple[jax.Array, jax.Array]:
    """cos/sin of ``2 pi f (j + offset) / length`` for frequency ``f < rows`` and index
    ``j < n``, as ``(rows, n)`` arrays, or ``(n, rows)`` when ``transpose``."""
    t = _phase(n, rows, length, row_offset=offset) if transpose else _phase(rows, n, length, col_offset=offset)
    return jnp.cos(t), jnp.sin(t)


def _rdft(n: int, length: int, offset: int = 0, transpose: bool = False) -> jax.Array:
    """Half-spectrum real DFT ``(2F, n)``, rows (frequency, re/im), ``F = length // 2 + 1``;
    or its transpose ``(n, 2F)``."""
    f = length // 2 + 1
    c, s = _cos_sin(n, length, f, offset, transpose)
    if transpose:
        return jnp.stack([c, -s], axis=2).reshape(n, 2 * f)
    return jnp.stack([c, -s], axis=1).reshape(2 * f, n)


def _cdft(n: int, length: int, offset: int = 0, transpose: bool = False) -> jax.Array:
    """Complex DFT on (re, im)-stacked vectors, ``(2 length, 2n)``; or its transpose."""
    c, s = _cos_sin(n, length, length, offset, transpose)
    if transpose:
        return jnp.block([[c, -s], [s, c]])
    return jnp.block([[c, s], [-s, c]])  # (re + i im)(cos - i sin)


def _half_weights(length: int, transpose: bool) -> jax.Array:
    """Hermitian weights of the half spectrum (1 at f = 0 and Nyquist, else 2) over ``length``,
    repeated over (re, im), as a column (rows of a 2F-row matrix) or a row."""
    f = jnp.arange(length // 2 + 1)
    w = jnp.where((f == 0) | (2 * f == length), 1.0, 2.0).astype(jnp.float32) / length
    w = jnp.repeat(w, 2)
    return w[None, :] if transpose else w[:, None]


def _synthesis_matrices(g: _Geom, adjoint: bool) -> tuple[jax.Array, jax.Array]:
    """Inverse complex DFT along W to ``wo`` outputs and half-spectrum inverse along H to
    ``ho`` outputs: ``(2wo, 2Lw)``, ``(ho, 2Fh)``; or their transposes (``adjoint``)."""
    s3 = _cdft(g.wo, g.lw, transpose=not adjoint) / g.lw  # (re + i im)(cos + i sin) / Lw
    s4 = _rdft(g.ho, g.lh, transpose=not adjoint) * _half_weights(g.lh, transpose=not adjoint)
    return s3, s4


def _bmm(m: jax.Array, a: jax.Array) -> jax.Array:
    """``m @ a[i]`` for every leading index ``i`` (one batched GEMM, canonical layout)."""
    return jnp.matmul(jnp.broadcast_to(m.astype(a.dtype), (a.shape[0],) + m.shape), a, precision=_HI)


def _dft_analysis(xt: jax.Array, a1: jax.Array, a2: jax.Array, fh: int, nc: int) -> jax.Array:
    """(H_in, W_in*NC) map -> (Fh, 2*L, NC) spectrum (rows re/im, frequency)."""
    a = jnp.dot(a1.astype(xt.dtype), xt, precision=_HI).reshape(fh, -1, nc)
    return _bmm(a2, a)


def _dft_synthesis(z: jax.Array, s3: jax.Array, s4: jax.Array, fh: int) -> jax.Array:
    """(Fh, 2*L, NC) spectrum -> (H_out, W_out*NC) map."""
    u = _bmm(s3, z)
    return jnp.dot(s4.astype(z.dtype), u.reshape(2 * fh, -1), precision=_HI)


def _dft_kernel_spectrum(kernel: jax.Array, g: _Geom) -> jax.Array:
    """Spectrum ``(Fh, 2Lw, C)`` of the kernel with tap ``a`` at circular position ``a - p``."""
    kh, kw, c = kernel.shape
    return _dft_analysis(kernel.reshape(kh, kw * c), _rdft(kh, g.lh, -g.ph), _cdft(kw, g.lw, -g.pw), g.fh, c)


def _dft_kernel_spectrum_adjoint(dg: jax.Array, g: _Geom) -> jax.Array:
    """Adjoint of :func:`_dft_kernel_spectrum`: ``(Fh, 2Lw, C)`` -> ``(kh, kw, C)``."""
    c = dg.shape[-1]
    dk = _dft_synthesis(dg, _cdft(g.kw, g.lw, -g.pw, transpose=True), _rdft(g.kh, g.lh, -g.ph, transpose=True), g.fh)
    return dk.reshape(g.kh, g.kw, c)


def _split(z: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
    """(Fh, 2L, N*C) -> real and imaginary parts (Fh, L, N, C)."""
    fh, two_l, nc = z.shape
    z = z.reshape(fh, 2, two_l // 2, n, nc // n)
    return z[:, 0], z[:, 1]


def _cmul(z: jax.Array, spec: jax.Array, n: int, conj: bool) -> jax.Array:
    """Multiply the spectrum by the kernel's (broadcast over the batch), or by its conjugate.

    Written as ``z * [gr, gr] + swap(z) * [+-gi, -+gi]`` with ``swap`` exchanging the re/im
    halves (a reverse), so XLA emits one elementwise loop instead of a concatenation.
    """
    fh, two_l, nc = z.shape
    z5 = z.reshape(fh, 2, two_l // 2, n, nc // n)
    gr, gi = _split(spec, 1)
    sign = jnp.asarray([1.0, -1.0] if conj else [-1.0, 1.0], z.dtype)[None, :, None, None, None]
    a = jnp.stack([gr, gr], axis=1)
    b = jnp.stack([gi, gi], axis=1) * sign
    return (z5 * a + jnp.flip(z5, axis=1) * b).reshape(z.shape)


def _to_hwnc(a: jax.Array, dtype) -> jax.Array:
    n, h, w, c = a.shape
    return jnp.transpose(a.astype(dtype), (1, 2, 0, 3)).reshape(h, w * n * c)


def _from_hwnc(a: jax.Array, n: int, c: int, dtype) -> jax.Array:
    h = a.shape[0]
    return jnp.transpose(a.reshape(h, -1, n, c), (2, 0, 1, 3)).astype(dtype)


def _dft_input_spectrum(x: jax.Array, g: _Geom, dtype) -> jax.Array:
    n, _, _, c = x.shape
    return _dft_analysis(_to_hwnc(x, dtype), _rdft(g.h, g.lh), _cdft(g.w, g.lw), g.fh, n * c)


def _dft_output_spectrum(dy: jax.Array, g: _Geom, dtype) -> jax.Array:
    """Cotangent of the forward's product spectrum: the adjoint of the synthesis applied to dy."""
    n, _, _, c = dy.shape
    s3t, s4t = _synthesis_matrices(g, adjoint=True)
    return _dft_analysis(_to_hwnc(dy, dtype), s4t, s3t, g.fh, n * c)


def _dft_spectral_product(xs: jax.Array, ds: jax.Array, n: int) -> jax.Array:
    """Cotangent ``(Fh, 2Lw, C)`` of the kernel spectrum, summed over the batch in frequency.

    Z = X conj(G): zr = xr gr + xi gi, zi = xi gr - xr gi, so dgr = dr xr + di xi and
    dgi = dr xi - di xr.
    """
    xr, xi = _split(xs, n)
    dr, di = _split(ds, n)
    return jnp.concatenate([jnp.sum(dr * xr + di * xi, axis=2), jnp.sum(dr * xi - di * xr, axis=2)], axis=1)


def _dft_forward(x: jax.Array, kernel: jax.Array, g: _Geom, keep_spectra: bool = True):
    """Forward over batch chunks; with ``keep_spectra`` also the per-chunk input spectra."""
    c = x.shape[-1]
    ct = _compute_dtype(x.dtype)
    ks = _dft_kernel_spectrum(kernel.astype(ct), g)
    s3, s4 = _synthesis_matrices(g, adjoint=False)
    n = _images_per_chunk(g, x.shape[0], c)

    def chunk(xc):
        xs = _dft_input_spectrum(xc, g, ct)
        y = _from_hwnc(_dft_synthesis(_cmul(xs, ks, n, conj=True), s3, s4, g.fh), n, c, x.dtype)
        return (y, xs) if keep_spectra else y

    out = jax.lax.map(chunk, _split_batch(x, n))
    if not keep_spectra:
        return _merge_batch(out)
    y, xs = out
    return _merge_batch(y), (xs, ks)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _dft(x: jax.Array, kernel: jax.Array, g: _Geom) -> jax.Array:
    return _dft_forward(x, kernel, g, keep_spectra=False)


def _dft_bwd(g: _Geom, res, dy: jax.Array):
    xs, ks = res  # xs: (chunks, Fh, 2Lw, n*C)
    c = dy.shape[-1]
    n = xs.shape[-1] // c
    a2t, a1t = _cdft(g.w, g.lw, transpose=True), _rdft(g.h, g.lh, transpose=True)

    def chunk(acc, inputs):
        xs_c, dy_c = inputs
        ds = _dft_output_spectrum(dy_c, g, xs.dtype)
        dx = _dft_synthesis(_cmul(ds, ks, n, conj=False), a2t, a1t, g.fh)
        return acc + _dft_spectral_product(xs_c, ds, n), _from_hwnc(dx, n, c, dy.dtype)

    acc, dx = jax.lax.scan(chunk, jnp.zeros(ks.shape, ks.dtype), (xs, _split_batch(dy, n)))
    return _merge_batch(dx), _dft_kernel_spectrum_adjoint(acc, g).astype(dy.dtype)


_dft.defvjp(_dft_forward, _dft_bwd)


# ----------------------------------------------------------------------------- shift


def _shift_add(x: jax.Array, kernel: jax.Array, padding: Padding) -> jax.Array:
    """Sum over taps of shifted slices times per-channel weights; XLA fuses it into one loop.

    Negative padding crops (used by the input gradient when padding exceeds ``k - 1``).
    """
    kh, kw, _ = kernel.shape
    ct = _compute_dtype(x.dtype)
    ph, pw = padding
    xp = jax.lax.pad(x.astype(ct), jnp.zeros((), ct), ((0, 0, 0), (ph, ph, 0), (pw, pw, 0), (0, 0, 0)))
    n, hp, wp, c = xp.shape
    ho, wo = hp - kh + 1, wp - kw + 1
    k = kernel.astype(ct)
    y = None
    for a in range(kh):
        for b in range(kw):
            t = jax.lax.slice(xp, (0, a, b, 0), (n, a + ho, b + wo, c)) * k[a, b]
            y = t if y is None else y + t
    return y.astype(x.dtype)


def _shift_chunked(x: jax.Array, kernel: jax.Array, g: _Geom) -> jax.Array:
    n = _images_per_chunk(g, x.shape[0], x.shape[-1])
    return _merge_batch(jax.lax.map(lambda xc: _shift_add(xc, kernel, (g.ph, g.pw)), _split_batch(x, n)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _shift(x: jax.Array, kernel: jax.Array, g: _Geom) -> jax.Array:
    return _shift_chunked(x, kernel, g)


def _shift_fwd(x, kernel, g: _Geom):
    return _shift_chunked(x, kernel, g), (x, kernel)


def _shift_bwd(g: _Geom, res, dy: jax.Array):
    x, kernel = res
    c = x.shape[-1]
    ct = _compute_dtype(x.dtype)
    n = _images_per_chunk(g, x.shape[0], c)
    flipped = kernel[::-1, ::-1]
    # dk from transforms of x and dy (a 49-tap reduction is several times slower on
    # XLA:CPU): matmul DFT on small maps, FFT on large ones, as resolve_impl for big kernels.
    use_dft = _prefer_dft(g.h, g.w)
    gf = g._replace(lh=_fast_len(g.lh), lw=_fast_len(g.lw))  # g has the minimal lengths
    if use_dft:
        acc0 = jnp.zeros((g.fh, 2 * g.lw, c), ct)
    else:
        acc0 = jnp.zeros((c, gf.lh, gf.lw // 2 + 1), jnp.result_type(ct, jnp.complex64))

    def chunk(acc, inputs):
        x_c, dy_c = inputs
        # dx[j] = sum_a dy[j + p - a] k[a]: a correlation of dy with the flipped kernel.
        dx = _shift_add(dy_c, flipped, (g.kh - 1 - g.ph, g.kw - 1 - g.pw))
        if use_dft:
            xs, ds = _dft_input_spectrum(x_c, g, ct), _dft_output_spectrum(dy_c, g, ct)
            acc = acc + _dft_spectral_product(xs, ds, n)
        else:
            xs = jnp.fft.rfft2(_to_nchw(x_c, ct), s=(gf.lh, gf.lw))
            ds = jnp.fft.rfft2(_to_nchw(dy_c, ct), s=(gf.lh, gf.lw))
            acc = acc + jnp.sum(xs * jnp.conj(ds), axis=0)
        return acc, dx.astype(dy.dtype)

    acc, dx = jax.lax.scan(chunk, acc0, (_split_batch(x, n), _split_batch(dy, n)))
    dk = _dft_kernel_spectrum_adjoint(acc, g) if use_dft else _fft_kernel_from_product(acc, gf)
    return _merge_batch(dx), dk.astype(kernel.dtype)


_shift.defvjp(_shift_fwd, _shift_bwd)


# ----------------------------------------------------------------------------- toeplitz


def _band_selector(w_in: int, w_out: int, kw: int, pw: int, dtype) -> jax.Array:
    """One-hot ``S[b, j_in, j_out] = [j_in == j_out + b - pw]``, built in-graph from iota."""
    shape = (kw, w_in, w_out)
    b = jax.lax.broadcasted_iota(jnp.int32, shape, 0)
    i = jax.lax.broadcasted_iota(jnp.int32, shape, 1)
    j = jax.lax.broadcasted_iota(jnp.int32, shape, 2)
    return (i == j + b - pw).astype(dtype)


def _toeplitz_along_w(x: jax.Array, kernel: jax.Array, padding: Padding) -> jax.Array:
    n, h, w, c = x.shape
    kh, kw, _ = kernel.shape
    ph, pw = padding
    ho, wo = _out_size(h, kh, ph), _out_size(w, kw, pw)
    ct = _compute_dtype(x.dtype)
    xt = jnp.transpose(x.astype(ct), (3, 0, 1, 2))  # (C, N, H, W): channels batch the matmul
    xt = jnp.pad(xt, ((0, 0), (0, 0), (ph, ph), (0, 0)))
    rows = jnp.stack([jax.lax.slice_in_dim(xt, a, a + ho, axis=2) for a in range(kh)], axis=3)
    rows = rows.reshape(c, n * ho, kh * w)  # the kernel rows' shifts join the contraction
    # bands[c, (a, j_in), j_out] = kernel[a, j_in - j_out + pw, c]; a matmul, so its
    # gradient is a matmul too (no scatter).
    bands = jnp.einsum("abc,bij->caij", kernel.astype(ct), _band_selector(w, wo, kw, pw, ct), precision=_HI)
    y = jnp.matmul(rows, bands.reshape(c, kh * w, wo), precision=_HI)
    return jnp.transpose(y.reshape(c, n, ho, wo), (1, 2, 3, 0)).astype(x.dtype)


def _toeplitz(x: jax.Array, kernel: jax.Array, padding: Padding) -> jax.Array:
    """Band matrices along the longer kernel axis (fewer stacked shifts, fewer FLOPs)."""
    if kernel.shape[0] > kernel.shape[1]:
        y = _toeplitz_along_w(jnp.swapaxes(x, 1, 2), jnp.swapaxes(kernel, 0, 1), (padding[1], padding[0]))
        return jnp.swapaxes(y, 1, 2)
    return _toeplitz_along_w(x, kernel, padding)


# ----------------------------------------------------------------------------- entry point


def depthwise_conv2d(
    x: jax.Array,
    kernel: jax.Array,
    padding: tuple[int, int] | None = None,
    impl: str = "auto",
) -> jax.Array:
    """Depthwise cross-correlation of NHWC ``x`` with a ``(kh, kw, C)`` kernel, stride 1.

    ``padding`` is the symmetric zero padding per dimension; ``None`` means PyTorch's
    ``(kh // 2, kw // 2)``, i.e. 'same' output size for odd kernels. The kernel is cast to
    ``x.dtype``; transforms compute in at least float32.
    """
    if x.ndim != 4 or kernel.ndim != 3 or kernel.shape[-1] != x.shape[-1]:
        raise ValueError(
            f"depthwise_conv2d expects x (N,H,W,C) and kernel (kh,kw,C); got {x.shape} and {kernel.shape}"
        )
    if padding is None:
        padding = (kernel.shape[0] // 2, kernel.shape[1] // 2)
    padding = (int(padding[0]), int(padding[1]))
    if min(padding) < 0:
        raise ValueError(f"padding must be non-negative, got {padding}")
    for n, k, p in zip(x.shape[1:3], kernel.shape[:2], padding):
        if _out_size(n, k, p) < 1:
            raise ValueError(f"kernel {kernel.shape[:2]} with padding {padding} does not fit map {x.shape[1:3]}")
    kernel = kernel.astype(x.dtype)
    kernel, padding = _crop_kernel(kernel, padding, x.shape[1:3])
    which = resolve_impl(impl, x.shape[1], x.shape[2], kernel.shape[0], kernel.shape[1])
    if which == "direct":
        return _direct(x, kernel, padding)
    if which == "toeplitz":
        return _toeplitz(x, kernel, padding)
    g = _geometry(x.shape, kernel.shape, padding, fast_lengths=which == "fft")
    return {"fft": _fft, "dft": _dft, "shift": _shift}[which](x, kernel, g)
