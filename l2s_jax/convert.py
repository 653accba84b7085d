"""Convert foreign (PyTorch / timm / safetensors / npz) checkpoints into l2s_jax models.

``convert_state_dict(arch, state_dict)`` recognises the family, infers the architecture's
hyperparameters from tensor names and shapes, builds the model and fills it;
``convert_checkpoint`` does the same from a file and writes a directory that
:func:`l2s_jax.models.load_pretrained` reads back. The command-line front end is
``tools/convert_weights.py``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np
from flax import nnx

from l2s_jax.io.torch_state import load_state_dict
from l2s_jax.models.registry import (
    FAMILIES,
    abstract_paths,
    build_abstract,
    get_family,
    materialize_auxiliary,
    save_pretrained,
)


class ArchitectureMismatchError(ValueError):
    """``--arch`` names a family the checkpoint does not belong to."""


def detect_families(state_dict: Mapping[str, np.ndarray]) -> list[str]:
    """Names of the families whose key layout the state_dict matches."""
    get_family("slak")  # make sure every family is registered
    return [name for name, fam in FAMILIES.items() if fam.looks_like(dict(state_dict))]


def convert_state_dict(
    arch: str,
    state_dict: Mapping[str, np.ndarray],
    overrides: Mapping[str, Any] | None = None,
    *,
    return_family: bool = False,
) -> tuple[nnx.Module, dict[str, Any]] | tuple[nnx.Module, dict[str, Any], str]:
    """Build the ``arch`` model described by ``state_dict`` and load it; returns (model, config).

    With ``return_family`` also the family actually used (a family may redirect, e.g. a
    ConvNeXt+BN student checkpoint given as ``convnext`` is built by ``slak``).
    """
    fam = get_family(arch)
    sd = {k: np.asarray(v) for k, v in state_dict.items()}
    if not fam.looks_like(sd):
        others = [f for f in detect_families(sd) if f != arch]
        looks = f"it looks like a {' / '.join(others)} checkpoint; try --arch {others[0]}" if others else (
            "it matches no known family; first keys: " + ", ".join(list(sd)[:8])
        )
        raise ArchitectureMismatchError(f"--arch {arch} does not fit this checkpoint: {looks}")
    target = fam.redirect(sd) if fam.redirect is not None else None
    if target is not None:
        arch, fam = target, get_family(target)
    sd = fam.remap_keys(sd)
    config = {**fam.infer_config(sd), **dict(overrides or {})}
    model = build_abstract(arch, config)  # shape-only: nothing is randomly initialised
    materialize_auxiliary(model)
    load_state_dict(model, sd, what=f"{arch} checkpoint")
    if fam.after_load is not None:
        fam.after_load(model, sd)
    unfilled = abstract_paths(model)
    if unfilled:
        raise RuntimeError(f"converter bug: {arch} variables left without a value: {unfilled[:10]}")
    model.eval()
    return (model, config, arch) if return_family else (model, config)


def convert_checkpoint(
    arch: str,
    src: str | Path,
    out: str | Path,
    *,
    key: str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Path:
    """Read ``src`` safely, convert it as ``arch`` and write ``out`` (spec.json + Orbax state)."""
    from l2s_jax.io.checkpoint_files import read_state_dict

    fam = get_family(arch)
    state_dict, used_key = read_state_dict(src, key=key, default_keys=fam.default_keys)
    model, config, family = convert_state_dict(arch, state_dict, overrides, return_family=True)
    provenance = {"source": str(Path(src).resolve()), "key": used_key, "num_tensors": len(state_dict)}
    return save_pretrained(model, family, config, out, provenance)
