"""The model zoo: teachers and students as Flax NNX modules, created by name or loaded converted.

``create(name, **overrides)`` builds any registered model; ``load_pretrained(dir)`` returns a
model converted by ``tools/convert_weights.py`` in eval mode. Every model maps NHWC images to
logits with ``model(images)`` and exposes its per-stage NHWC feature maps, in stage order,
through ``model.features(images)``.
"""
from l2s_jax.models import convnext, cswin, mobilenetv3, resnet, slak, swin, vit
from l2s_jax.models.pretrained import load_pretrained, read_spec, save_pretrained
from l2s_jax.models.registry import (
    FAMILIES,
    MODELS,
    Family,
    build_abstract,
    create,
    get_family,
    jit_apply,
    list_models,
    register_family,
    register_model,
)

__all__ = [
    "FAMILIES", "MODELS", "Family", "build_abstract", "create", "get_family", "jit_apply", "list_models",
    "load_pretrained", "read_spec", "register_family", "register_model", "save_pretrained",
]

# Every family, in one place: the converter's --arch choices and the named models.
for _family in (slak.FAMILY, convnext.FAMILY, vit.FAMILY, swin.FAMILY, cswin.FAMILY, resnet.FAMILY,
                mobilenetv3.FAMILY):
    register_family(_family)
