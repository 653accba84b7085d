"""Converted checkpoints: a directory with ``spec.json`` and an Orbax checkpoint of the state.

``spec.json`` holds the family, its constructor arguments and the provenance (source file,
wrapper key, where each hyperparameter came from); ``state/`` holds ``nnx.state(model)``.
:func:`save_pretrained` writes one (the converter's output), :func:`load_pretrained` returns
the model ready to use.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from l2s_jax.models.registry import build_abstract

SPEC_FILE = "spec.json"
STATE_DIR = "state"
FORMAT_VERSION = 1


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
            v.set_value(jnp.zeros(v.shape, v.dtype))
        elif isinstance(v, SparseMask):
            v.set_value(jnp.ones(v.shape, v.dtype))


def abstract_paths(model: nnx.Module) -> list[str]:
    """Paths of variables that still hold no value (shape-only)."""
    return [
        "/".join(map(str, p))
        for p, v in nnx.iter_graph(model)
        if isinstance(v, nnx.Variable) and isinstance(v.get_value(), jax.ShapeDtypeStruct)
    ]


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

    Everything is written into a temporary sibling folder that is renamed to ``out_dir`` only
    when complete, so a failure leaves nothing behind. ``out_dir`` must not exist yet (or be an
    empty folder): a user's files are never overwritten or mixed with ours.
    """
    import orbax.checkpoint as ocp

    out = Path(out_dir).resolve()
    check_new_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    try:
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(tmp / STATE_DIR, nnx.to_pure_dict(nnx.state(model)))
        spec = {
            "format_version": FORMAT_VERSION,
            "family": family,
            "config": _jsonable(dict(config)),
            "provenance": _jsonable(dict(provenance or {})),
        }
        (tmp / SPEC_FILE).write_text(json.dumps(spec, indent=2) + "\n")
        os.rename(tmp, out)  # atomic; replaces only an empty folder
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def check_new_dir(out: Path) -> None:
    """Raise ``FileExistsError`` unless ``out`` is free for a new converted checkpoint."""
    if out.is_file() or out.is_symlink():
        raise FileExistsError(f"{out} is an existing file; the output must be a directory that does not exist yet")
    if (out / SPEC_FILE).exists() or (out / STATE_DIR).exists():
        raise FileExistsError(f"{out} already holds a converted checkpoint; choose another --out or remove it first")
    if out.is_dir() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose a new directory for the converted checkpoint")


def read_spec(ckpt_dir: str | Path) -> dict[str, Any]:
    path = Path(ckpt_dir) / SPEC_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: {ckpt_dir} is not a converted checkpoint. Convert PyTorch weights with "
            "`python tools/convert_weights.py --arch ARCH --src FILE --out DIR`."
        )
    return json.loads(path.read_text())


def _uncommitted(x: jax.Array) -> jax.Array:
    """``x`` as a fresh array on the default device that jit may place anywhere (keys stay keys)."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        return jax.random.wrap_key_data(_uncommitted(jax.random.key_data(x)), impl=jax.random.key_impl(x))
    return jnp.asarray(np.asarray(x))


def load_pretrained(ckpt_dir: str | Path, *, eval_mode: bool = True, policy: Any = None) -> nnx.Module:
    """Rebuild a converted model from ``ckpt_dir`` (``spec.json`` + Orbax state), in eval mode, run by ``policy``.

    Every variable comes back as a JAX array (RNG keys as typed keys) on this process's first
    device, so the model can be trained or updated in place (``model.train()``; BatchNorm
    statistics) like a fresh one, and every process of a multi-host job can load it.
    """
    import orbax.checkpoint as ocp

    from l2s_jax.models.policy import Policy, apply_policy

    ckpt_dir = Path(ckpt_dir).resolve()
    spec = read_spec(ckpt_dir)
    model = build_abstract(spec["family"], spec["config"])
    local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=local),
                            nnx.to_pure_dict(nnx.state(model)))
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(ckpt_dir / STATE_DIR, abstract)
    graphdef, state = nnx.split(model)
    nnx.replace_by_pure_dict(state, jax.tree.map(_uncommitted, restored))
    model = nnx.merge(graphdef, state)
    if eval_mode:
        model.eval()
    return apply_policy(model, policy or Policy())
