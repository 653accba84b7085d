"""Map a PyTorch-style state_dict onto an NNX model by walking the model's own layer tables.

Each layer class lists ``torch_params = {torch_name: (attribute, transform)}`` (see
:mod:`l2s_jax.layers`); a module attribute path ``("stages", 0, 1, "norm")`` becomes the key
prefix ``stages.0.1.norm``. Every problem is collected and reported together: missing keys,
unexpected keys and shape mismatches, each by name.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx


class CheckpointMismatchError(ValueError):
    """A state_dict does not fit the model; the message lists every offending key."""


@dataclasses.dataclass(frozen=True)
class TorchSlot:
    """Where one PyTorch tensor goes: ``module.attribute`` after ``transform``."""

    module: nnx.Module
    attribute: str
    transform: Callable[[np.ndarray], np.ndarray] | None

    @property
    def variable(self) -> nnx.Variable:
        return getattr(self.module, self.attribute)


def _key(path: Iterable, name: str) -> str:
    return ".".join([str(p) for p in path] + [name])


def torch_slots(model: nnx.Module) -> tuple[dict[str, TorchSlot], set[str]]:
    """All PyTorch keys the model expects, and the keys it accepts but ignores."""
    slots: dict[str, TorchSlot] = {}
    ignored: set[str] = set()
    for path, module in nnx.iter_modules(model):
        table = getattr(type(module), "torch_params", None) or {}
        for tname, (attr, fn) in table.items():
            if getattr(module, attr, None) is None:
                continue  # e.g. a conv without bias
            slots[_key(path, tname)] = TorchSlot(module, attr, fn)
        for tname in getattr(type(module), "torch_ignored", ()):
            ignored.add(_key(path, tname))
    return slots, ignored


def _describe(keys: list[str], limit: int = 40) -> str:
    shown = "\n    ".join(keys[:limit])
    more = f"\n    ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"\n    {shown}{more}"


def check_state_dict(model: nnx.Module, state_dict: Mapping[str, np.ndarray], what: str = "checkpoint",
                     source_key: Callable[[str], str] | None = None) -> None:
    """Raise :class:`CheckpointMismatchError` naming every missing/unexpected/mis-shaped key.

    ``source_key`` maps the model's key naming to the file's (when the converter renamed the
    file's keys), so that the message names keys as the user's file does.
    """
    name = source_key or (lambda k: k)
    slots, ignored = torch_slots(model)
    missing = [name(k) for k in slots if k not in state_dict]
    unexpected = [name(k) for k in state_dict if k not in slots and k not in ignored]
    mismatched = []
    for k, slot in slots.items():
        if k not in state_dict:
            continue
        arr = np.asarray(state_dict[k])
        try:
            shape = (slot.transform(arr) if slot.transform else arr).shape
        except Exception as e:  # a transform that cannot even apply (wrong rank)
            mismatched.append(f"{name(k)}: {what} has shape {tuple(arr.shape)}, which cannot be mapped ({e})")
            continue
        if tuple(shape) != tuple(slot.variable.shape):
            mismatched.append(
                f"{name(k)}: {what} has shape {tuple(arr.shape)} (-> {tuple(shape)}), "
                f"model expects {tuple(slot.variable.shape)}"
            )
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s) the model needs:{_describe(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s) the model has no place for:{_describe(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es):{_describe(mismatched)}")
    if problems:
        raise CheckpointMismatchError(f"the {what} does not fit {type(model).__name__}:\n" + "\n".join(problems))


def load_state_dict(model: nnx.Module, state_dict: Mapping[str, np.ndarray], what: str = "checkpoint",
                    source_key: Callable[[str], str] | None = None) -> None:
    """Copy a (checked) PyTorch-style state_dict into ``model`` in place (also shape-only models)."""
    check_state_dict(model, state_dict, what, source_key)
    slots, _ = torch_slots(model)
    for k, slot in slots.items():
        arr = np.asarray(state_dict[k])
        value = slot.transform(arr) if slot.transform else arr
        var = slot.variable
        var.set_value(jnp.asarray(value, dtype=var.dtype))


def abstract_torch_shapes(model: nnx.Module) -> dict[str, tuple[int, ...]]:
    """Key -> shape in the model's (Flax) layout; works on ``nnx.eval_shape`` models too."""
    slots, _ = torch_slots(model)
    return {k: tuple(s.variable.shape) for k, s in slots.items()}
