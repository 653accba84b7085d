"""Input pipeline pieces faithful to timm's ConvNeXt/DeiT recipe.

Host side, per image (numpy + Pillow, explicit ``np.random.Generator``): :class:`TrainTransform`
(RandomResizedCrop -> flip -> RandAugment -> normalise -> RandomErasing) and
:class:`EvalTransform` (shorter side 256 -> centre crop 224 -> normalise), outputs HWC float32.
On device, inside the jitted step (jnp, explicit key): :func:`mixup_cutmix`.
"""

from __future__ import annotations

import importlib
from typing import Any

# Name -> submodule. Loaded on first use (PEP 562): ``import l2s_jax.data.sources`` (e.g. by the
# report and evaluation CLIs) must not import JAX through ``mixup``.
_EXPORTS = {
    **dict.fromkeys(("MixParams", "apply_mix", "cutmix_box", "mixup_cutmix", "one_hot_smooth", "sample_mix_params"),
                    "mixup"),
    **dict.fromkeys(("AugmentOp", "RandAugment", "apply_op", "level_to_args", "rand_augment_transform"),
                    "randaugment"),
    **dict.fromkeys(("IMAGENET_MEAN", "IMAGENET_STD", "EvalTransform", "TrainTransform", "as_rgb_image", "center_crop",
                     "random_erasing", "random_erasing_boxes", "random_resized_crop_params", "resize",
                     "resize_shorter", "resized_crop", "to_normalized_float"), "transforms"),
}


def __getattr__(name: str) -> Any:
    """The exported name from its submodule, imported on first access."""
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "AugmentOp",
    "EvalTransform",
    "MixParams",
    "RandAugment",
    "TrainTransform",
    "apply_mix",
    "apply_op",
    "as_rgb_image",
    "center_crop",
    "cutmix_box",
    "level_to_args",
    "mixup_cutmix",
    "one_hot_smooth",
    "rand_augment_transform",
    "random_erasing",
    "random_erasing_boxes",
    "random_resized_crop_params",
    "resize",
    "resize_shorter",
    "resized_crop",
    "sample_mix_params",
    "to_normalized_float",
]
