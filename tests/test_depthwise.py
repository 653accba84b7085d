"""The depthwise op: every implementation equals the grouped-conv reference in value and in
gradient (input and kernel, random cotangents) over kernel shapes, maps, paddings, dtypes."""
from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from l2s_jax.ops import depthwise as dw
from l2s_jax.ops.depthwise import (IMPLS, chosen_impl, depthwise_conv2d, effective_kernel_size, merge_kernels,
                                   resolve_impl)

FAST_IMPLS = [i for i in IMPLS if i != "direct"]

# (batch, H, W, C, kh, kw, padding); padding None = PyTorch 'same' (k // 2).
CASES = [
    (2, 9, 11, 3, 3, 3, None),
    (1, 12, 10, 4, 7, 7, None),
    (3, 16, 12, 2, 51, 5, None),  # tall SLaK branch, cropped to the map
    (1, 12, 16, 3, 5, 51, None),  # wide SLaK branch
    (2, 8, 8, 3, 51, 51, None),  # kernel much larger than the map
    (2, 10, 7, 3, 13, 5, None),
    (2, 10, 7, 3, 7, 7, (0, 0)),  # 'valid'
    (1, 9, 6, 2, 3, 5, (4, 1)),  # custom padding, beyond the kernel's reach in H
    (1, 40, 36, 2, 7, 7, None),  # map above the DFT/FFT switch (shift's FFT kernel gradient)
]


def _run(impl: str, x, k, padding, dy):
    """(y, dx, dk) of ``impl``, jitted, gradients by ``jax.vjp`` with cotangent ``dy``."""

    def f(x_, k_, dy_):
        y, vjp = jax.vjp(lambda a, b: depthwise_conv2d(a, b, padding, impl), x_, k_)
        return (y,) + vjp(dy_)

    return jax.jit(f)(x, k, dy)


@functools.lru_cache(maxsize=None)
def _reference(case, dtype_name: str, seed: int):
    """The float32 grouped-conv reference on the (possibly bf16-rounded) inputs of a case."""
    x, k, padding, dy = _inputs(case, jnp.dtype(dtype_name), seed)
    f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
    return _run("direct", f32(x), f32(k), padding, f32(dy))


def _reference_and_impl(impl: str, case, dtype, seed: int = 0):
    x, k, padding, dy = _inputs(case, dtype, seed)
    return _run(impl, x, k, padding, dy), _reference(case, jnp.dtype(dtype).name, seed)


def _max_rel_err(a, b) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _inputs(case, dtype, seed=0):
    n, h, w, c, kh, kw, padding = case
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((n, h, w, c)), dtype)
    k = jnp.asarray(rng.standard_normal((kh, kw, c)), dtype)
    ph, pw = (kh // 2, kw // 2) if padding is None else padding
    out = (n, h + 2 * ph - kh + 1, w + 2 * pw - kw + 1, c)
    dy = jnp.asarray(rng.standard_normal(out), dtype)
    return x, k, padding, dy


@pytest.mark.parametrize("impl", FAST_IMPLS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "n{}_{}x{}_c{}_k{}x{}_p{}".format(*c))
def test_value_and_gradients_match_direct_f32(impl, case):
    got, ref = _reference_and_impl(impl, case, jnp.float32)
    for name, a, b in zip(("y", "dx", "dk"), got, ref):
        assert a.shape == b.shape and a.dtype == jnp.float32, name
        assert _max_rel_err(a, b) < 2e-5, f"{impl} {name}: rel err {_max_rel_err(a, b):.2e}"


@pytest.mark.parametrize("impl", FAST_IMPLS)
@pytest.mark.parametrize("case", [CASES[1], CASES[7]], ids=["7x7", "pad41"])
def test_value_and_gradients_match_direct_bf16(impl, case):
    # Reference in float32 on the same bf16-rounded inputs; the impls compute in float32
    # and round once, so the error is about one bf16 ulp of the largest entry.
    got, ref = _reference_and_impl(impl, case, jnp.bfloat16, seed=1)
    for name, a, b in zip(("y", "dx", "dk"), got, ref):
        assert a.shape == b.shape and a.dtype == jnp.bfloat16, name
        assert _max_rel_err(a, b) < 1e-2, f"{impl} {name}: rel err {_max_rel_err(a, b):.2e}"


@pytest.mark.parametrize("impl", ["fft", "dft", "shift"])
def test_batch_chunks_match_direct(impl, monkeypatch):
    # One image per chunk: forward by lax.map, backward by lax.scan accumulating the
    # kernel gradient across chunks. 40x36 also takes shift's FFT kernel-gradient branch.
    monkeypatch.setattr(dw, "_CHUNK_ELEMS", 1)
    for case in [(3, 9, 11, 3, 5, 5, None), (2, 40, 36, 2, 7, 7, None)]:
        got, ref = _reference_and_impl(impl, case, jnp.float32)
        for name, a, b in zip(("y", "dx", "dk"), got, ref):
            assert _max_rel_err(a, b) < 2e-5, f"{impl} {name}: rel err {_max_rel_err(a, b):.2e}"


def test_auto_matches_direct_and_resolves_on_cpu():
    got, ref = _reference_and_impl("auto", (2, 14, 14, 4, 7, 7, None), jnp.float32)
    for a, b in zip(got, ref):
        assert _max_rel_err(a, b) < 2e-5
    assert jax.default_backend() == "cpu"
    for shape in [(56, 56, 7, 7), (56, 56, 51, 51), (28, 28, 49, 49), (7, 7, 13, 13), (14, 14, 3, 3)]:
        assert resolve_impl("auto", *shape) in FAST_IMPLS


def test_impl_selection():
    assert resolve_impl("toeplitz", 8, 8, 3, 3) == "toeplitz"
    assert resolve_impl("fft", 56, 56, 7, 7) == "fft"  # explicit choices win
    with pytest.raises(ValueError):
        resolve_impl("winograd", 8, 8, 3, 3)
    assert resolve_impl("auto", 56, 56, 7, 7) in FAST_IMPLS


def test_effective_kernel_and_chosen_impl():
    """The static helpers agree with what depthwise_conv2d crops and runs."""
    assert effective_kernel_size((14, 14), (47, 47)) == (27, 27)  # SLaK-T stage 3
    assert effective_kernel_size((7, 7), (13, 13)) == (13, 13)
    assert effective_kernel_size((14, 7), (47, 5), (23, 2)) == (27, 5)
    assert effective_kernel_size((8, 8), (3, 3), (0, 0)) == (3, 3)
    assert chosen_impl("auto", (14, 14), (47, 47)) == resolve_impl("auto", 14, 14, 27, 27)
    assert chosen_impl("fft", (14, 14), (47, 47)) == "fft"


def test_merge_kernels_equals_sum_of_branches():
    rng = np.random.default_rng(3)
    c = 3
    x = jnp.asarray(rng.standard_normal((2, 12, 10, c)), jnp.float32)
    ks = [jnp.asarray(rng.standard_normal(s + (c,)), jnp.float32) for s in ((13, 3), (3, 13), (3, 3))]
    merged = merge_kernels(ks)
    assert merged.shape == (13, 13, c)
    branches = jax.jit(lambda a, *b: sum(depthwise_conv2d(a, k, None, "direct") for k in b))(x, *ks)
    for impl in ("fft", "dft"):
        y = jax.jit(lambda a, m: depthwise_conv2d(a, m, None, impl))(x, merged)
        assert _max_rel_err(y, branches) < 2e-5
    assert merge_kernels(ks, shape=(15, 13)).shape == (15, 13, c)
    with pytest.raises(ValueError):
        merge_kernels([ks[0], jnp.zeros((4, 4, c))])  # even size cannot be centred in 13x13
    with pytest.raises(ValueError):
        merge_kernels([ks[0], jnp.zeros((3, 3, c + 1))])


def test_shape_errors():
    x = jnp.zeros((1, 5, 6, 3))
    with pytest.raises(ValueError):
        depthwise_conv2d(x, jnp.zeros((3, 3, 4)))
    with pytest.raises(ValueError):
        depthwise_conv2d(x, jnp.zeros((7, 7, 3)), (0, 1))  # kernel larger than the padded map
    with pytest.raises(ValueError):
        depthwise_conv2d(x, jnp.zeros((3, 3, 3)), (-1, 0))


def _largest_constant(text: str) -> int:
    """Length of the longest ``dense<...>`` payload of the lowered module."""
    return max((len(m) for m in re.findall(r"dense<([^>]*)>", text)), default=0)


@pytest.mark.parametrize("impl", IMPLS)
def test_weights_stay_arguments_under_jit(impl):
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((1, 9, 9, 4)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((7, 7, 4)), jnp.float32)

    def loss(x_, k_):
        y, vjp = jax.vjp(lambda a, b: depthwise_conv2d(a, b, None, impl), x_, k_)
        return vjp(y)

    # No transform matrix or weight may be embedded as a constant (XLA would fold them).
    assert _largest_constant(jax.jit(loss).lower(x, k).as_text()) < 100
    # Negative control: a kernel closed over is a constant, and the check sees it.
    assert _largest_constant(jax.jit(lambda a: loss(a, k)).lower(x).as_text()) > 1000
