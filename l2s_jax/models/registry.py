"""Model families and named configurations: register names, resolve them, ``create``.

A *family* (``slak``, ``convnext``, ``resnet``, ...) is one architecture file: a builder, its
named configurations, and what the weight converter needs (key renaming from other namings,
hyperparameter inference from tensor names and shapes, a recogniser for ``--arch`` mistakes).
A *named model* (``slak_tiny``, ``convnext_tiny_bn``, ``resnet50``, ...) is a family plus
keyword arguments. Every family is listed once, in :mod:`l2s_jax.models`. Saving and loading
converted checkpoints lives in :mod:`l2s_jax.models.pretrained`.
"""
from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Callable, Mapping

import jax
import numpy as np
from flax import nnx

StateDict = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Default:
    """A hyperparameter the weights cannot determine, as ``infer_config`` reports it.

    ``value`` is the published default that ``why`` names (e.g. "ViT-S width 384"), or None when
    no published configuration matches: then the user must pass it (``--override NAME=EXAMPLE``).
    """

    value: Any
    why: str
    example: str = "N"


@dataclasses.dataclass(frozen=True)
class Family:
    """One architecture family, its named configurations and its converter hooks."""

    name: str
    build: Callable[..., nnx.Module]
    infer_config: Callable[[StateDict], dict[str, Any]]
    looks_like: Callable[[StateDict], bool]
    remap_keys: Callable[[StateDict], StateDict] = lambda sd: sd
    # Inverse of remap_keys for one key: the name the file ``sd`` uses (error messages name keys so).
    source_key: Callable[[StateDict, str], str] = lambda sd, key: key
    after_load: Callable[[nnx.Module, StateDict], None] | None = None
    # Another family that should convert this checkpoint instead (e.g. ConvNeXt+BN -> slak).
    redirect: Callable[[StateDict], str | None] | None = None
    # Wrapper keys tried in order when a checkpoint holds several state_dicts.
    default_keys: tuple[str, ...] = ("model", "state_dict", "model_ema", "state_dict_ema")
    # Named configurations: model name -> constructor keyword arguments.
    models: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)


FAMILIES: dict[str, Family] = {}
MODELS: dict[str, tuple[str, dict[str, Any]]] = {}


def register_family(family: Family) -> Family:
    """Register a family and its named configurations."""
    FAMILIES[family.name] = family
    for name, kwargs in family.models.items():
        register_model(name, family.name, **kwargs)
    return family


def register_model(name: str, family: str, **kwargs: Any) -> None:
    """Register a named configuration of a family (e.g. ``slak_tiny``)."""
    MODELS[name] = (family, dict(kwargs))


def list_models() -> list[str]:
    return sorted(MODELS)


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise KeyError(f"unknown model family {name!r}; known: {sorted(FAMILIES)}")
    return FAMILIES[name]


def create(name: str, *, seed: int = 0, rngs: nnx.Rngs | None = None, policy: Any = None,
           **overrides: Any) -> nnx.Module:
    """Build a registered model (or a family by name with explicit kwargs) from scratch, run by ``policy``."""
    from l2s_jax.models.policy import Policy, apply_policy

    if name in MODELS:
        family, kwargs = MODELS[name]
    elif name in FAMILIES:
        family, kwargs = name, {}
    else:
        close = difflib.get_close_matches(name, list(MODELS) + list(FAMILIES), n=3)
        hint = f" Did you mean {close}?" if close else ""
        raise KeyError(f"unknown model {name!r}.{hint} Known models: {sorted(MODELS)}")
    if "dtype" in overrides:
        raise ValueError("set the compute dtype through policy=Policy(compute_dtype=...), not a dtype= override")
    kwargs = {**kwargs, **overrides}
    model = FAMILIES[family].build(**kwargs, rngs=rngs or nnx.Rngs(params=seed, dropout=seed + 1))
    return apply_policy(model, policy or Policy())


def build_abstract(family: str, config: Mapping[str, Any]) -> nnx.Module:
    """The model with shape-only parameters (``jax.eval_shape``): nothing is allocated."""
    fam = get_family(family)
    return nnx.eval_shape(lambda: fam.build(**config, rngs=nnx.Rngs(0)))


def jit_apply(model: nnx.Module, method: str = "__call__") -> Callable[[jax.Array], Any]:
    """A jitted ``images -> model.method(images)`` in the model's current mode.

    The model is split once; parameters are passed as arguments (never baked in as
    constants), so one compile serves every call of the same shape.
    """
    graphdef, state = nnx.split(model)

    @jax.jit
    def apply(state, images):
        return getattr(nnx.merge(graphdef, state), method)(images)

    return lambda images: apply(state, images)
