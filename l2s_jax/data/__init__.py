"""Input pipeline pieces faithful to timm's ConvNeXt/DeiT recipe.

Host side, per image (numpy + Pillow, explicit ``np.random.Generator``): :class:`TrainTransform`
(RandomResizedCrop -> flip -> RandAugment -> normalise -> RandomErasing) and
:class:`EvalTransform` (shorter side 256 -> centre crop 224 -> normalise), outputs HWC float32.
On device, inside the jitted step (jnp, explicit key): :func:`mixup_cutmix`.
"""

from l2s_jax.data.mixup import MixParams, apply_mix, cutmix_box, mixup_cutmix, one_hot_smooth, sample_mix_params
from l2s_jax.data.randaugment import AugmentOp, RandAugment, apply_op, level_to_args, rand_augment_transform
from l2s_jax.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EvalTransform,
    TrainTransform,
    as_rgb_image,
    center_crop,
    random_erasing,
    random_erasing_boxes,
    random_resized_crop_params,
    resize,
    resize_shorter,
    resized_crop,
    to_normalized_float,
)

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
