"""Model FLOPs from a function's jaxpr: 2 x multiply-adds of its matmuls and convolutions.

The count is the model's, not the implementation's: run it on a model built with
``depthwise_impl="direct"`` so every depthwise convolution is a ``conv_general_dilated``
(counted over the padded map, as ``torch.utils.flop_counter`` does), not an FFT or DFT.
Elementwise work (norms, activations, the optimizer) is not counted; throughput in TFLOP/s is
these FLOPs per second, the usual "model FLOPs utilisation" convention.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
from jax.extend import core


def _eqn_flops(eqn: core.JaxprEqn) -> float:
    name = eqn.primitive.name
    if name == "dot_general":
        (lhs_contract, _), _ = eqn.params["dimension_numbers"]
        lhs = eqn.invars[0].aval.shape
        out = eqn.outvars[0].aval.shape
        return 2.0 * float(np.prod(out)) * float(np.prod([lhs[d] for d in lhs_contract]))
    if name == "conv_general_dilated":
        dn = eqn.params["dimension_numbers"]
        rhs = eqn.invars[1].aval.shape
        out = eqn.outvars[0].aval.shape
        kernel_in = rhs[dn.rhs_spec[1]]  # input channels per group
        window = float(np.prod([rhs[d] for d in dn.rhs_spec[2:]]))
        return 2.0 * float(np.prod(out)) * kernel_in * window
    return 0.0


def _jaxpr_flops(jaxpr: core.Jaxpr) -> float:
    total = 0.0
    for eqn in jaxpr.eqns:
        total += _eqn_flops(eqn)
        for sub in _subjaxprs(eqn):
            total += _jaxpr_flops(sub) * _trip_count(eqn)
    return total


def _subjaxprs(eqn: core.JaxprEqn) -> list[core.Jaxpr]:
    """Jaxprs nested in an equation's parameters (pjit, scan, cond branches, custom rules)."""
    out = []
    for value in eqn.params.values():
        for v in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(v, core.ClosedJaxpr):
                out.append(v.jaxpr)
            elif isinstance(v, core.Jaxpr):
                out.append(v)
    if eqn.primitive.name == "cond" and out:  # one branch runs: count the costliest
        return [max(out, key=_jaxpr_flops)]
    return out


def _trip_count(eqn: core.JaxprEqn) -> int:
    return int(eqn.params.get("length", 1)) if eqn.primitive.name == "scan" else 1


def count_flops(fn: Callable[..., Any], *args: Any) -> float:
    """FLOPs of one call ``fn(*args)`` (abstract: arrays or ``jax.ShapeDtypeStruct`` s, nothing runs)."""
    return _jaxpr_flops(jax.make_jaxpr(fn)(*args).jaxpr)


# Dense peak TFLOP/s (bfloat16 tensor core, float32 non-tensor) by device-kind substring, first
# match wins. Sources: NVIDIA H100 Tensor Core GPU datasheet (SXM: BF16 989.4 dense / 1979 with
# sparsity, FP32 67; PCIe: 756 / 51), NVIDIA H200 datasheet (same compute as H100 SXM), NVIDIA
# A100 datasheet (BF16 312 dense, FP32 19.5, SXM and PCIe).
PEAK_TFLOPS: tuple[tuple[str, float, float], ...] = (
    ("H100 PCIe", 756.0, 51.0),
    ("H100", 989.0, 67.0),
    ("H200", 989.0, 67.0),
    ("A100", 312.0, 19.5),
)


def device_peak_tflops(device_kind: str, dtype: str) -> float | None:
    """Dense peak TFLOP/s of ``device_kind`` for ``dtype`` (``bfloat16``/``float32``), None if unknown."""
    for key, bf16, fp32 in PEAK_TFLOPS:
        if key.lower() in device_kind.lower():
            return bf16 if dtype == "bfloat16" else fp32
    return None
