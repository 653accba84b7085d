"""How a built model runs: one frozen :class:`Policy`, applied by :func:`apply_policy`.

The same policy mechanism serves students and teachers: ``create(name, policy=...)`` and
``load_pretrained(dir, policy=...)`` apply it, and so can :func:`apply_policy` on any built
model (or one of its submodules). Every setting lives on the model's own layers, so two
models (or two tests) never share a process-wide default.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from l2s_jax import layers
from l2s_jax.models import attention
from l2s_jax.models.base import Backbone
from l2s_jax.ops.depthwise import IMPLS

DTYPES = ("float32", "bfloat16", "float16")
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "explicit")


@dataclasses.dataclass(frozen=True)
class Policy:
    """Compute/parameter dtypes and kernel choices of one model.

    ``compute_dtype``: activations and matmuls (normalisation statistics stay float32).
    ``param_dtype``: storage of floating state (e.g. a bfloat16 frozen teacher).
    ``depthwise_impl``: ``auto`` (chosen per layer from backend and map/kernel size) or one
    of :data:`l2s_jax.ops.depthwise.IMPLS`. ``bn_stat_groups``: BatchNorm statistics scope
    (None or 1 = global batch, i.e. SyncBN; G = per data-parallel group). ``attention_impl``:
    ``auto`` (XLA), ``xla``, ``cudnn`` or ``explicit``.
    """

    compute_dtype: str = "float32"
    param_dtype: str = "float32"
    depthwise_impl: str = "auto"
    bn_stat_groups: int | None = None
    attention_impl: str = "auto"

    def __post_init__(self):
        for name in ("compute_dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"Policy.{name}={getattr(self, name)!r} is not one of {DTYPES}")
        if self.depthwise_impl not in ("auto",) + IMPLS:
            raise ValueError(f"Policy.depthwise_impl={self.depthwise_impl!r} is not one of {('auto',) + IMPLS}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"Policy.attention_impl={self.attention_impl!r} is not one of {ATTENTION_IMPLS}")
        if self.bn_stat_groups is not None and (not isinstance(self.bn_stat_groups, int) or self.bn_stat_groups < 1):
            raise ValueError(f"Policy.bn_stat_groups={self.bn_stat_groups!r} must be None or an integer >= 1")


def cast_floating(tree: Any, dtype: Any) -> Any:
    """Cast every floating-point leaf of ``tree`` to ``dtype`` (e.g. a bfloat16 teacher)."""
    dtype = jnp.dtype(dtype)
    return jax.tree.map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dtype else x, tree)


def apply_policy(model: nnx.Module, policy: Policy) -> nnx.Module:
    """Set ``policy`` on every layer of ``model`` in place (and return it)."""
    compute = jnp.dtype(policy.compute_dtype)
    attn = None if policy.attention_impl == "auto" else policy.attention_impl
    for _, m in nnx.iter_modules(model):
        if isinstance(m, (Backbone, layers.Conv2d, layers.DepthwiseConv2d, layers.Linear)):
            m.dtype = compute
        if isinstance(m, layers.DepthwiseConv2d):
            m.impl = policy.depthwise_impl
        elif isinstance(m, layers.BatchNorm):
            m.stat_groups = policy.bn_stat_groups or 1
        elif isinstance(m, attention.AttentionLayer):
            m.attention_impl = attn
    nnx.update(model, cast_floating(nnx.state(model), policy.param_dtype))
    if isinstance(model, Backbone):
        model.policy = policy
    return model
