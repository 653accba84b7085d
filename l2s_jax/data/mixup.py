"""timm Mixup / CutMix in 'batch' mode, in jnp, for use inside the jitted train step.

One set of parameters per batch (timm ``Mixup(mode="batch", correct_lam=True)``):

* with probability ``prob`` the batch is mixed (else lambda = 1 and it is returned unchanged);
* if both alphas are > 0, CutMix with probability ``switch_prob`` (lambda ~ Beta(cutmix_alpha,
  cutmix_alpha)), else Mixup (lambda ~ Beta(mixup_alpha, mixup_alpha));
* sample ``i`` is paired with sample ``N - 1 - i`` (timm's ``x.flip(0)``), images and targets alike;
* Mixup: ``x * lam + flip(x) * (1 - lam)``;
* CutMix: a box of side ``int(H * sqrt(1 - lam))`` x ``int(W * sqrt(1 - lam))`` centred at a uniform
  pixel ``(cy, cx)``, rows ``clip(cy - cut_h // 2, 0, H) : clip(cy + (cut_h + 1) // 2, 0, H)`` (same
  for columns), copied from ``flip(x)``; lambda is then corrected to ``1 - box_area / (H * W)``;
* targets ``lam * y + (1 - lam) * flip(y)`` with label-smoothed one-hot ``y`` (off value
  ``smoothing / C``, on value ``1 - smoothing + smoothing / C``).

Randomness comes from a JAX key (not numpy's global stream), so sampled lambdas/boxes differ
from timm's draw for draw but have the same distribution. Given the parameters, outputs match
timm's float32 results: CutMix images exactly; Mixup images and all targets within one float32
ulp (golden data: worst 2.4e-7 on images, 6e-8 on targets), because timm rounds ``1 - lam`` from
float64 while we subtract in float32, and XLA may fuse the blend into a fused multiply-add.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class MixParams(NamedTuple):
    """Per-batch mixing parameters: target lambda (CutMix: area-corrected), mode and box."""

    lam: jax.Array
    use_cutmix: jax.Array
    box: jax.Array


def one_hot_smooth(labels: jax.Array, num_classes: int, smoothing: float = 0.0) -> jax.Array:
    """Label-smoothed one-hot targets (N, num_classes) float32, as timm's ``one_hot``."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
    off_value = smoothing / num_classes
    on_value = 1.0 - smoothing + off_value
    hot = jnp.asarray(labels)[..., None] == jnp.arange(num_classes)
    return jnp.where(hot, jnp.float32(on_value), jnp.float32(off_value))


def cutmix_box(lam: jax.Array, cy: jax.Array, cx: jax.Array, height: int, width: int) -> tuple[jax.Array, jax.Array]:
    """timm's ``rand_bbox`` + lambda correction for a given raw lambda and centre.

    Returns ``(box, lam_corrected)`` with ``box = [yl, yh, xl, xh]`` (int32, half-open) and
    ``lam_corrected = 1 - (yh - yl) * (xh - xl) / (height * width)``.
    """
    ratio = jnp.sqrt(1.0 - jnp.asarray(lam, jnp.float32))
    cut_h = jnp.floor(height * ratio).astype(jnp.int32)
    cut_w = jnp.floor(width * ratio).astype(jnp.int32)
    cy = jnp.asarray(cy, jnp.int32)
    cx = jnp.asarray(cx, jnp.int32)
    yl = jnp.clip(cy - cut_h // 2, 0, height)
    yh = jnp.clip(cy + (cut_h + 1) // 2, 0, height)
    xl = jnp.clip(cx - cut_w // 2, 0, width)
    xh = jnp.clip(cx + (cut_w + 1) // 2, 0, width)
    area = ((yh - yl) * (xh - xl)).astype(jnp.float32)
    lam_corrected = 1.0 - area / jnp.float32(height * width)
    return jnp.stack([yl, yh, xl, xh]), lam_corrected


def _check_probability(name: str, value: float | jax.Array) -> None:
    """Range-check a concrete probability (traced values are not checked)."""
    if isinstance(value, (int, float)) and not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def sample_mix_params(
    key: jax.Array,
    height: int,
    width: int,
    *,
    mixup_alpha: float | jax.Array = 0.8,
    cutmix_alpha: float | jax.Array = 1.0,
    switch_prob: float | jax.Array = 0.5,
    prob: float | jax.Array = 1.0,
) -> MixParams:
    """Draw one batch's parameters (timm ``_params_per_batch`` + ``cutmix_bbox_and_lam``).

    The four hyperparameters may be traced arrays: one compiled step then serves every setting
    (e.g. ``prob=0`` to switch mixing off late in training, as timm's ``mixup_off_epoch``).
    """
    if isinstance(mixup_alpha, (int, float)) and isinstance(cutmix_alpha, (int, float)):
        if mixup_alpha <= 0 and cutmix_alpha <= 0:
            raise ValueError("at least one of mixup_alpha and cutmix_alpha must be > 0")
    _check_probability("prob", prob)
    _check_probability("switch_prob", switch_prob)
    k_apply, k_switch, k_lam, k_cy, k_cx = jax.random.split(key, 5)
    alphas = jnp.stack([jnp.asarray(mixup_alpha, jnp.float32), jnp.asarray(cutmix_alpha, jnp.float32)])
    enabled = alphas > 0
    safe_alphas = jnp.where(enabled, alphas, 1.0)
    lam_mix, lam_cut = jax.random.beta(k_lam, safe_alphas, safe_alphas)
    switch = jax.random.uniform(k_switch) < switch_prob
    use_cutmix = jnp.where(enabled[0] & enabled[1], switch, enabled[1])
    apply = jax.random.uniform(k_apply) < prob
    lam_raw = jnp.where(apply, jnp.where(use_cutmix, lam_cut, lam_mix), 1.0).astype(jnp.float32)
    use_cutmix = use_cutmix & apply
    cy = jax.random.randint(k_cy, (), 0, height)
    cx = jax.random.randint(k_cx, (), 0, width)
    box, lam_corrected = cutmix_box(lam_raw, cy, cx, height, width)
    lam = jnp.where(use_cutmix, lam_corrected, lam_raw)
    box = jnp.where(use_cutmix, box, jnp.zeros_like(box))
    return MixParams(lam=lam, use_cutmix=use_cutmix, box=box)


def _check_batch(images: jax.Array, labels: jax.Array) -> None:
    """Validate an (N, H, W, C) floating batch with (N,) labels and an even N."""
    if images.ndim != 4:
        raise ValueError(f"images must be (N, H, W, C), got shape {images.shape}")
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise TypeError(f"images must be floating point (normalised), got {images.dtype}")
    n = images.shape[0]
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},), got {labels.shape}")
    if n % 2:
        raise ValueError(f"batch size must be even for flip pairing, got {n}")


def apply_mix(
    images: jax.Array,
    labels: jax.Array,
    params: MixParams,
    *,
    num_classes: int,
    label_smoothing: float = 0.1,
) -> tuple[jax.Array, jax.Array]:
    """Mix an NHWC float batch with its flip and build the soft targets for given parameters."""
    _check_batch(images, labels)
    _, height, width, _ = images.shape
    lam = jnp.asarray(params.lam, jnp.float32)
    flipped = images[::-1]
    yl, yh, xl, xh = (params.box[i] for i in range(4))
    rows = jnp.arange(height)[:, None]
    cols = jnp.arange(width)[None, :]
    inside = (rows >= yl) & (rows < yh) & (cols >= xl) & (cols < xh)
    cut = jnp.where(inside[None, :, :, None], flipped, images)
    lam_x = lam.astype(images.dtype)
    blend = images * lam_x + flipped * (1 - lam_x)
    mixed = jnp.where(lam == 1.0, images, jnp.where(params.use_cutmix, cut, blend))
    y = one_hot_smooth(labels, num_classes, label_smoothing)
    targets = y * lam + y[::-1] * (1.0 - lam)
    return mixed, targets


def mixup_cutmix(
    images: jax.Array,
    labels: jax.Array,
    key: jax.Array,
    *,
    num_classes: int,
    mixup_alpha: float | jax.Array = 0.8,
    cutmix_alpha: float | jax.Array = 1.0,
    switch_prob: float | jax.Array = 0.5,
    prob: float | jax.Array = 1.0,
    label_smoothing: float = 0.1,
) -> tuple[jax.Array, jax.Array]:
    """timm batch-mode Mixup/CutMix: (mixed NHWC images, soft targets (N, num_classes) float32).

    ``num_classes`` and ``label_smoothing`` are static; the other hyperparameters may be traced.
    """
    _check_batch(images, labels)
    params = sample_mix_params(
        key, images.shape[1], images.shape[2], mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha,
        switch_prob=switch_prob, prob=prob,
    )
    return apply_mix(images, labels, params, num_classes=num_classes, label_smoothing=label_smoothing)
