"""Convert foreign (PyTorch / timm / safetensors / npz) checkpoints into l2s_jax models.

``convert_state_dict(arch, state_dict)`` recognises the family, infers the architecture's
hyperparameters from tensor names and shapes, builds the model and fills it;
``convert_checkpoint`` does the same from a file and writes a directory that
:func:`l2s_jax.models.load_pretrained` reads back. The command-line front end is
``tools/convert_weights.py``.

Hyperparameters the weights cannot determine (ViT/CSWin heads, input size, ...) are never
guessed: they come from a published configuration that matches the shapes, or from an
override, and every value's source is recorded (``spec.json`` ``provenance.hyperparameters``).
"""
from __future__ import annotations

import dataclasses
import inspect
import typing
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from flax import nnx

from l2s_jax.io.torch_state import load_state_dict
from l2s_jax.models.pretrained import abstract_paths, check_new_dir, materialize_auxiliary, save_pretrained
from l2s_jax.models.registry import FAMILIES, Default, Family, build_abstract, get_family

FROM_SHAPES = "read from shapes"
OVERRIDE = "override"


class ArchitectureMismatchError(ValueError):
    """``--arch`` names a family the checkpoint does not belong to."""


class UnknownHyperparameterError(ValueError):
    """A hyperparameter the weights cannot determine has no published default: it must be given."""


@dataclasses.dataclass
class Converted:
    model: nnx.Module
    family: str
    config: dict[str, Any]
    provenance: dict[str, str]  # hyperparameter -> where its value came from


def detect_families(state_dict: Mapping[str, np.ndarray]) -> list[str]:
    """Names of the families whose key layout the state_dict matches."""
    return [name for name, fam in FAMILIES.items() if fam.looks_like(dict(state_dict))]


def constructor_args(fam: Family) -> set[str]:
    """The keyword arguments the family's builder accepts (for checking overrides), following
    ``**kwargs`` into the class a builder returns and into base classes."""
    def named(fn: Any) -> tuple[set[str], bool]:
        params = inspect.signature(fn).parameters
        return ({n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)},
                any(p.kind == p.VAR_KEYWORD for p in params.values()))

    cls = fam.build if inspect.isclass(fam.build) else None
    names, forwards = (set(), True) if cls else named(fam.build)
    if forwards and cls is None:  # a builder passing **kwargs on to the class it returns
        cls = typing.get_type_hints(fam.build).get("return")
    for base in (cls.__mro__ if inspect.isclass(cls) else ()):
        if not forwards:
            break
        if "__init__" in vars(base):
            more, forwards = named(vars(base)["__init__"])
            names |= more
    return names - {"self", "rngs"}


def resolve_config(arch: str, inferred: Mapping[str, Any],
                   overrides: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """The constructor arguments and, for each, where it came from; unknown overrides and
    undeterminable values without a published default raise, naming what to pass."""
    valid = constructor_args(get_family(arch))
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise ValueError(f"--override {unknown[0]}: {arch} has no constructor argument {unknown[0]!r}; "
                         f"valid: {', '.join(sorted(valid))}")
    config, provenance = {}, {}
    for name, value in inferred.items():
        if isinstance(value, Default):
            config[name], provenance[name] = value.value, f"published default ({value.why})"
        else:
            config[name], provenance[name] = value, FROM_SHAPES
    for name, value in overrides.items():
        config[name], provenance[name] = value, OVERRIDE
    for name, value in inferred.items():
        if isinstance(value, Default) and value.value is None and name not in overrides:
            raise UnknownHyperparameterError(
                f"{name} cannot be read from a {arch} checkpoint and {value.why}: pass it, e.g. "
                f"--override {name}={value.example} (overrides={{'{name}': {value.example}}} from Python)")
    return config, provenance


def convert(arch: str, state_dict: Mapping[str, np.ndarray],
            overrides: Mapping[str, Any] | None = None) -> Converted:
    """Build the ``arch`` model described by ``state_dict`` and load it, in eval mode.

    A family may redirect (a ConvNeXt+BN student checkpoint given as ``convnext`` is built by
    ``slak``); ``Converted.family`` is the family actually used.
    """
    fam = get_family(arch)
    source = {k: np.asarray(v) for k, v in state_dict.items()}
    if not fam.looks_like(source):
        others = [f for f in detect_families(source) if f != arch]
        looks = f"it looks like a {' / '.join(others)} checkpoint; try --arch {others[0]}" if others else (
            "it matches no known family; first keys: " + ", ".join(list(source)[:8])
        )
        raise ArchitectureMismatchError(f"--arch {arch} does not fit this checkpoint: {looks}")
    target = fam.redirect(source) if fam.redirect is not None else None
    if target is not None:
        arch, fam = target, get_family(target)
    sd = fam.remap_keys(source)
    config, provenance = resolve_config(arch, fam.infer_config(sd), dict(overrides or {}))
    model = build_abstract(arch, config)  # shape-only: nothing is randomly initialised
    materialize_auxiliary(model)
    load_state_dict(model, sd, what=f"{arch} checkpoint", source_key=lambda k: fam.source_key(source, k))
    if fam.after_load is not None:
        fam.after_load(model, sd)
    unfilled = abstract_paths(model)
    if unfilled:
        raise RuntimeError(f"converter bug: {arch} variables left without a value: {unfilled[:10]}")
    model.eval()
    return Converted(model, arch, config, provenance)


def convert_state_dict(
    arch: str,
    state_dict: Mapping[str, np.ndarray],
    overrides: Mapping[str, Any] | None = None,
    *,
    return_family: bool = False,
) -> tuple[nnx.Module, dict[str, Any]] | tuple[nnx.Module, dict[str, Any], str]:
    """:func:`convert` as ``(model, config)``, or ``(model, config, family)`` with ``return_family``."""
    c = convert(arch, state_dict, overrides)
    return (c.model, c.config, c.family) if return_family else (c.model, c.config)


def convert_checkpoint(
    arch: str,
    src: str | Path,
    out: str | Path,
    *,
    key: str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Path:
    """Read ``src`` safely, convert it as ``arch`` and write ``out`` (spec.json + Orbax state).

    ``out`` is checked before the work and written atomically: a failed conversion leaves nothing.
    """
    from l2s_jax.io.checkpoint_files import read_state_dict

    fam = get_family(arch)
    check_new_dir(Path(out).resolve())
    state_dict, used_key = read_state_dict(src, key=key, default_keys=fam.default_keys)
    c = convert(arch, state_dict, overrides)
    provenance = {"source": str(Path(src).resolve()), "key": used_key, "num_tensors": len(state_dict),
                  "hyperparameters": c.provenance}
    return save_pretrained(c.model, c.family, c.config, out, provenance)
