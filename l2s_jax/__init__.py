"""l2s_jax: large-to-small kernel knowledge distillation in JAX / Flax NNX."""

__version__ = "0.1.0"
