"""Numerical kernels shared by the model zoo."""
from l2s_jax.ops.depthwise import IMPLS, depthwise_conv2d, resolve_impl

__all__ = ["IMPLS", "depthwise_conv2d", "resolve_impl"]
