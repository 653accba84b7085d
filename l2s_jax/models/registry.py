"""Model families, named configurations, ``create`` and converted-checkpoint I/O.

A *family* (``slak``, ``convnext``, ``resnet``, ...) is one architecture file: a builder, and
what the weight converter needs (key renaming from other namings, hyperparameter inference
from tensor names and shapes, a recogniser for ``--arch`` mistakes). A *named model*
(``slak_tiny``, ``convnext_tiny_bn``, ``resnet50``, ...) is a family plus keyword arguments.

A converted checkpoint directory holds ``spec.json`` (family, constructor arguments,
provenance) and ``state/`` (an Orbax checkpoint of ``nnx.state(model)``).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import numpy as np
from flax import nnx

StateDict = dict[str, np.ndarray]
SPEC_FILE = "spec.json"
STATE_DIR = "state"
FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Family:
    """One architecture family and its converter hooks."""

    name: str
    build: Callable[..., nnx.Module]
    infer_config: Callable[[StateDict], dict[str, Any]]
    looks_like: Callable[[StateDict], bool]
    remap_keys: Callable[[StateDict], StateDict] = lambda sd: sd
    after_load: Callable[[nnx.Module, StateDict], None] | None = None
    # Another family that should convert this checkpoint instead (e.g. ConvNeXt+BN -> slak).
    redirect: Callable[[StateDict], str | None] | None = None
    # Wrapper keys tried in order when a checkpoint holds several state_dicts.
    default_keys: tuple[str, ...] = ("model", "state_dict", "model_ema", "state_dict_ema")


FAMILIES: dict[str, Family] = {}
MODELS: dict[str, tuple[str, dict[str, Any]]] = {}


def register_family(family: Family) -> Family:
    FAMILIES[family.name] = family
    return family


def register_model(name: str, family: str, **kwargs: Any) -> None:
    """Register a named configuration of a family (e.g. ``slak_tiny``)."""
    MODELS[name] = (family, dict(kwargs))


def _ensure_loaded() -> None:
    # Importing the package registers every family.
    import l2s_jax.models  # noqa: F401


def list_models() -> list[str]:
    _ensure_loaded()
    return sorted(MODELS)


def get_family(name: str) -> Family:
    _ensure_loaded()
    if name not in FAMILIES:
        raise KeyError(f"unknown model family {name!r}; known: {sorted(FAMILIES)}")
    return FAMILIES[name]


def create(name: str, *, seed: int = 0, rngs: nnx.Rngs | None = None, policy: Any = None,
           **overrides: Any) -> nnx.Module:
    """Build a registered model (or a family by name with explicit kwargs) from scratch, run by ``policy``."""
    from l2s_jax.models.policy import Policy, apply_policy

    _ensure_loaded()
    if name in MODELS:
        family, kwargs = MODELS[name]
    elif name in FAMILIES:
        family, kwargs = name, {}
    else:
        import difflib

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


def materialize_auxiliary(model: nnx.Module, seed: int = 0) -> None:
    """Give concrete values to the non-weight state of an abstract model, in place.

    Sparse masks start as ones (the converter then derives them from the checkpoint), RNG
    streams get distinct keys derived from ``seed`` and zero counters. Weights and BatchNorm
    statistics are left for the converter to fill.
    """
    from l2s_jax.layers import SparseMask

    n = 0
    for _, v in nnx.iter_graph(model):
        if not isinstance(v, nnx.Variable) or not isinstance(v.get_value(), jax.ShapeDtypeStruct):
            continue
        if isinstance(v, nnx.RngKey):
            v.set_value(jax.random.fold_in(jax.random.key(seed), n))
            n += 1
        elif isinstance(v, nnx.RngCount):
            v.set_value(np.zeros(v.shape, v.dtype))
        elif isinstance(v, SparseMask):
            v.set_value(np.ones(v.shape, v.dtype))


def abstract_paths(model: nnx.Module) -> list[str]:
    """Paths of variables that still hold no value (shape-only)."""
    return [
        "/".join(map(str, p))
        for p, v in nnx.iter_graph(model)
        if isinstance(v, nnx.Variable) and isinstance(v.get_value(), jax.ShapeDtypeStruct)
    ]


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


def _jsonable(x: Any) -> Any:
    if isinstance(x, (tuple, list)):
        return [_jsonable(v) for v in x]
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, np.generic):
        return x.item()
    return x


def save_pretrained(model: nnx.Module, family: str, config: Mapping[str, Any], out_dir: str | Path,
                    provenance: Mapping[str, Any] | None = None) -> Path:
    """Write ``spec.json`` and an Orbax checkpoint of the model's state to ``out_dir``.

    Refuses to overwrite an existing converted checkpoint (never loses a user's files).
    """
    import orbax.checkpoint as ocp

    out = Path(out_dir).resolve()
    if (out / SPEC_FILE).exists() or (out / STATE_DIR).exists():
        raise FileExistsError(f"{out} already holds a converted checkpoint; choose another --out or remove it first")
    out.mkdir(parents=True, exist_ok=True)
    state = nnx.to_pure_dict(nnx.state(model))
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(out / STATE_DIR, state)
    spec = {
        "format_version": FORMAT_VERSION,
        "family": family,
        "config": _jsonable(dict(config)),
        "provenance": _jsonable(dict(provenance or {})),
    }
    (out / SPEC_FILE).write_text(json.dumps(spec, indent=2) + "\n")
    return out


def read_spec(ckpt_dir: str | Path) -> dict[str, Any]:
    path = Path(ckpt_dir) / SPEC_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: {ckpt_dir} is not a converted checkpoint. Convert PyTorch weights with "
            "`python tools/convert_weights.py --arch ARCH --src FILE --out DIR`."
        )
    return json.loads(path.read_text())


def load_pretrained(ckpt_dir: str | Path, *, eval_mode: bool = True, policy: Any = None) -> nnx.Module:
    """Rebuild a converted model from ``ckpt_dir`` (``spec.json`` + Orbax state), in eval mode, run by ``policy``."""
    import orbax.checkpoint as ocp

    from l2s_jax.models.policy import Policy, apply_policy

    ckpt_dir = Path(ckpt_dir).resolve()
    spec = read_spec(ckpt_dir)
    model = build_abstract(spec["family"], spec["config"])
    abstract = nnx.to_pure_dict(nnx.state(model))
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(ckpt_dir / STATE_DIR, abstract)
    graphdef, state = nnx.split(model)
    nnx.replace_by_pure_dict(state, jax.tree.map(np.asarray, restored))
    model = nnx.merge(graphdef, state)
    if eval_mode:
        model.eval()
    return apply_policy(model, policy or Policy())
