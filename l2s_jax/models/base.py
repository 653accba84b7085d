"""The one model protocol every family implements (:class:`Backbone`).

A family defines four things: ``forward_stages`` (the raw stage outputs in its native layout),
``final_norm`` (the norm between the last stage and pooling; identity where there is none),
``forward_head`` and the ``stage_channels`` attribute. Everything else (``forward_features``,
``features``, ``forward_with_features``, ``__call__``) is implemented once here, so the
trainer, feature distillation, ERF probing and the converter never ask what a model is.

Convention for the last map: ``features(x)[-1]`` is the map the head pools, i.e.
``forward_features(x)`` as an NHWC map (after Swin's/CSWin's/ViT's final LayerNorm; ConvNeXt,
ResNet and MobileNetV3 have no map-level final norm, so there it equals the raw stage output).
``features(x, raw_last=True)`` returns the last stage's raw output instead.
"""
from __future__ import annotations

import jax
from flax import nnx


class Backbone(nnx.Module):
    """Shared forward API of the zoo; subclasses set ``stage_channels`` in ``__init__``."""

    stage_channels: tuple[int, ...]

    def forward_stages(self, images: jax.Array) -> list[jax.Array]:
        """Raw outputs of every stage, in stage order, in the family's native layout."""
        raise NotImplementedError

    def final_norm(self, last: jax.Array) -> jax.Array:
        """The norm applied to the last stage output before pooling (identity by default)."""
        return last

    def to_map(self, x: jax.Array) -> jax.Array:
        """A stage output as an NHWC map (identity for convolutional families)."""
        return x

    def forward_head(self, features: jax.Array, pre_logits: bool = False) -> jax.Array:
        """Pooling + norm + classifier on ``forward_features``; float32 (pooled embedding if ``pre_logits``)."""
        raise NotImplementedError

    def forward_features(self, images: jax.Array) -> jax.Array:
        """The final map (or tokens) before pooling, after the final norm."""
        return self.final_norm(self.forward_stages(images)[-1])

    def features(self, images: jax.Array, *, raw_last: bool = False) -> list[jax.Array]:
        """Per-stage NHWC maps in stage order; the last one normed as the head reads it unless ``raw_last``."""
        outs = self.forward_stages(images)
        if not raw_last:
            outs[-1] = self.final_norm(outs[-1])
        return [self.to_map(o) for o in outs]

    def forward_with_features(self, images: jax.Array, num_stages: int) -> tuple[jax.Array, list[jax.Array]]:
        """Logits and the last ``num_stages`` maps of :meth:`features` from one forward pass."""
        if num_stages > len(self.stage_channels):
            raise ValueError(f"asked for the last {num_stages} stages of a model with {len(self.stage_channels)}")
        outs = self.forward_stages(images)
        last = self.final_norm(outs[-1])
        logits = self.forward_head(last)
        if num_stages <= 0:
            return logits, []
        return logits, [self.to_map(o) for o in outs[len(outs) - num_stages:-1]] + [self.to_map(last)]

    def __call__(self, images: jax.Array) -> jax.Array:
        return self.forward_head(self.forward_features(images))
