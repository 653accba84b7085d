"""The model zoo: teachers and students as Flax NNX modules, created by name or loaded converted.

``create(name, **overrides)`` builds any registered model; ``load_pretrained(dir)`` returns a
model converted by ``tools/convert_weights.py`` in eval mode. Every model maps NHWC images to
logits with ``model(images)`` and exposes its per-stage NHWC feature maps, in stage order,
through ``model.features(images)``.
"""
from l2s_jax.models.registry import (
    FAMILIES,
    MODELS,
    Family,
    build_abstract,
    create,
    get_family,
    jit_apply,
    list_models,
    load_pretrained,
    read_spec,
    register_family,
    register_model,
    save_pretrained,
)

__all__ = [
    "FAMILIES", "MODELS", "Family", "build_abstract", "create", "get_family", "jit_apply", "list_models",
    "load_pretrained", "read_spec", "register_family", "register_model", "save_pretrained",
]

from l2s_jax.models import convnext, slak  # noqa: E402,F401  (registers the families)
from l2s_jax.models import vit, swin, cswin  # noqa: E402,F401
from l2s_jax.models import resnet, mobilenetv3  # noqa: E402,F401  (registers the families)
