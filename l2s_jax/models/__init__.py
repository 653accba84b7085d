"""The model zoo: teachers and students as Flax NNX modules, created by name or loaded converted.

``create(name, policy=..., **overrides)`` builds any registered model; ``load_pretrained(dir,
policy=...)`` returns a model converted by ``tools/convert_weights.py`` in eval mode; the
:class:`~l2s_jax.models.policy.Policy` says how it runs (dtypes, depthwise/attention kernels,
BatchNorm scope). Every model implements :class:`~l2s_jax.models.base.Backbone`:
``model(images)`` logits, ``forward_features`` / ``forward_head``, per-stage NHWC maps in stage
order from ``features(images)`` (the last one as the head pools it, i.e. after any final norm;
``raw_last=True`` for the raw stage output), ``forward_with_features(images, L)`` and
``stage_channels``.
"""
from l2s_jax.models import convnext, cswin, mobilenetv3, resnet, slak, swin, vit
from l2s_jax.models.base import Backbone
from l2s_jax.models.policy import Policy, apply_policy
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
    "load_pretrained", "read_spec", "register_family", "register_model", "save_pretrained", "Backbone", "Policy",
    "apply_policy",
]

# Every family, in one place: the converter's --arch choices and the named models.
for _family in (slak.FAMILY, convnext.FAMILY, vit.FAMILY, swin.FAMILY, cswin.FAMILY, resnet.FAMILY,
                mobilenetv3.FAMILY):
    register_family(_family)
