"""Multi-head attention kernels shared by the transformer teachers (ViT, Swin, CSWin).

Every attention of the zoo goes through :func:`attention`, which calls
``jax.nn.dot_product_attention``: the XLA implementation on any backend by default, cuDNN's
fused flash kernel with ``implementation="cudnn"`` on NVIDIA GPUs in bf16/fp16.
``implementation="explicit"`` selects :func:`reference_attention`, the textbook
``softmax(q * scale @ k^T + bias) @ v`` that the PyTorch reference code computes; tests check
that the paths agree.

Layouts follow ``jax.nn.dot_product_attention``: ``q, k, v`` are ``(batch, tokens, heads,
head_dim)`` and an additive ``bias`` broadcasts to ``(batch, heads, tokens, tokens)``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

IMPLEMENTATIONS = (None, "xla", "cudnn", "explicit")


def check_implementation(implementation: str | None) -> str | None:
    """Validate an ``attention_impl`` setting early, naming the allowed values."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"unknown attention implementation {implementation!r}; choose one of {IMPLEMENTATIONS} "
            "(None = XLA, 'cudnn' = fused GPU kernel for bf16/fp16, 'explicit' = reference softmax)"
        )
    return implementation


class AttentionLayer(nnx.Module):
    """Base of every attention layer: ``attention_impl`` is set by :func:`l2s_jax.models.policy.apply_policy`."""

    attention_impl: str | None = None


def reference_attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array | None = None,
                        *, scale: float | None = None) -> jax.Array:
    """Explicit ``softmax(q * scale @ k^T + bias) @ v`` with float32 logits and softmax."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = jnp.einsum("btnh,bsnh->bnts", q * jnp.asarray(scale, q.dtype), k,
                        preferred_element_type=jnp.float32)
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bnts,bsnh->btnh", probs, v)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array | None = None, *,
              scale: float | None = None, implementation: str | None = None) -> jax.Array:
    """Scaled dot-product attention on ``(B, T, heads, head_dim)``; ``bias`` is additive."""
    if implementation == "explicit":
        return reference_attention(q, k, v, bias, scale=scale)
    if bias is not None:
        bias = bias.astype(q.dtype)
    return jax.nn.dot_product_attention(q, k, v, bias=bias, scale=scale, implementation=implementation)


def windowed_attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array | None = None, *,
                       scale: float | None = None, implementation: str | None = None) -> jax.Array:
    """Attention inside each of W windows: ``q, k, v`` are ``(B, W, T, heads, head_dim)``.

    ``bias`` is ``(W_b, heads, T, T)`` with ``W_b`` either 1 (the same bias in every window,
    e.g. Swin's relative position bias) or W (a per-window bias, e.g. relative bias plus the
    shifted-window mask). A shared bias folds the windows into the batch; a per-window bias
    folds them into the head axis instead, so the bias is broadcast over the batch and never
    materialised per image.
    """
    b, w, t, n, h = q.shape
    if bias is None or bias.shape[0] == 1:
        def fold(x: jax.Array) -> jax.Array:
            return x.reshape(b * w, t, n, h)

        out = attention(fold(q), fold(k), fold(v), bias, scale=scale, implementation=implementation)
        return out.reshape(b, w, t, n, h)
    if bias.shape[0] != w:
        raise ValueError(f"bias has {bias.shape[0]} windows but the input has {w}")

    def fold_heads(x: jax.Array) -> jax.Array:
        return x.transpose(0, 2, 1, 3, 4).reshape(b, t, w * n, h)

    out = attention(fold_heads(q), fold_heads(k), fold_heads(v), bias.reshape(1, w * n, t, t),
                    scale=scale, implementation=implementation)
    return out.reshape(b, t, w, n, h).transpose(0, 2, 1, 3, 4)


def window_partition(x: jax.Array, window: tuple[int, int]) -> jax.Array:
    """``(B, H, W, C)`` -> ``(B, nW, wh*ww, C)``: windows row-major over the grid, tokens row-major inside."""
    b, h, w, c = x.shape
    wh, ww = window
    if h % wh or w % ww:
        raise ValueError(f"a {h}x{w} map does not split into {wh}x{ww} windows")
    x = x.reshape(b, h // wh, wh, w // ww, ww, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // wh) * (w // ww), wh * ww, c)


def window_reverse(windows: jax.Array, window: tuple[int, int], height: int, width: int) -> jax.Array:
    """Inverse of :func:`window_partition`: ``(B, nW, wh*ww, C)`` -> ``(B, H, W, C)``."""
    b, _, _, c = windows.shape
    wh, ww = window
    x = windows.reshape(b, height // wh, width // ww, wh, ww, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, height, width, c)
