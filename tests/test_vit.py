"""ViT-S/16 port: golden parity with timm, full-size layout, bf16, attention paths, drop path."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

import intermediates
from conftest import assert_close_to_reference
from l2s_jax import layers
from l2s_jax.convert import convert_state_dict, detect_families, resolve_config
from l2s_jax.io.checkpoint_files import read_state_dict
from l2s_jax.io.torch_state import check_state_dict, torch_slots
from l2s_jax.models import attention, build_abstract, create, get_family
from l2s_jax.models.policy import Policy, apply_policy
from l2s_jax.models.pretrained import materialize_auxiliary

MINI_HEADS = {"num_heads": 3}  # vit_mini: embed 96 with 3 heads (not a published width)


# --- helpers shared with test_swin.py and test_cswin.py ---------------------------------------

def jit_pure(model: nnx.Module, fn: Callable[[nnx.Module, jax.Array], Any]) -> tuple[Callable, nnx.State]:
    """``jax.jit`` of ``(state, images) -> fn(model, images)`` and the model's state: one compile
    serves several weight sets of one architecture (and CPU compiles are the slow part here)."""
    graphdef, state = nnx.split(model)
    return jax.jit(lambda s, x: fn(nnx.merge(graphdef, s), x)), state


def randomize(model: nnx.Module) -> nnx.Module:
    """Give a shape-only model random N(0, 0.1^2) weights (numpy, avoiding the truncated-normal
    initialisers, which are slow to compile on CPU) and concrete RNG streams."""
    materialize_auxiliary(model)
    rng = np.random.default_rng(0)
    for _, v in nnx.iter_graph(model):
        if isinstance(v, nnx.Param):
            v.set_value(jnp.asarray(0.1 * rng.standard_normal(v.shape), v.dtype))
    return model


def random_model(family: str, **config: Any) -> nnx.Module:
    return randomize(build_abstract(family, config))


def drop_path_rates(model: nnx.Module) -> list[float]:
    return [m.rate for _, m in nnx.iter_modules(model) if isinstance(m, layers.DropPath)]


def abstract_outputs(model: nnx.Module, batch: int = 2, size: int = 224) -> tuple:
    """Shapes of the last 4 feature maps and the logits by tracing only (no compile, no FLOPs)."""
    graphdef, state = nnx.split(model)
    images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
    logits, feats = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s).forward_with_features(x, 4),
                                   state, images)
    return [f.shape for f in feats], logits.shape


def params_of(model: nnx.Module) -> dict:
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def nhwc(images_nchw: np.ndarray) -> jax.Array:
    return jnp.asarray(np.transpose(images_nchw, (0, 2, 3, 1)))


def manifest_state_dict(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """A manifest's metadata and a zero-cost state_dict of its shapes (broadcast zeros)."""
    manifest = json.loads(path.read_text())
    sd = {k: np.broadcast_to(np.zeros((), np.float32), tuple(shape))
          for k, (shape, _dtype) in manifest["state_dict"].items()}
    return manifest, sd


def assert_matches_manifest(model: nnx.Module, manifest: dict, sd: dict[str, np.ndarray]) -> int:
    """Every manifest key used with its shape, every parameter filled by a key; returns #params."""
    check_state_dict(model, sd, what=manifest["name"])  # missing / unexpected / shape mismatches
    slots, _ = torch_slots(model)
    filled = {id(slot.variable) for slot in slots.values()}
    params = [v for _, v in nnx.iter_graph(model) if isinstance(v, nnx.Param)]
    unfilled = [v for v in params if id(v) not in filled]
    assert not unfilled, f"{len(unfilled)} parameters have no checkpoint key"
    n_params = sum(int(np.prod(v.shape)) for v in params)
    assert n_params == manifest["num_parameters"]
    return n_params


def top1_agrees_and_close(bf16_logits: jax.Array, f32_logits: jax.Array, rel: float = 3e-2) -> float:
    """bf16 logits: same top-1 as float32, error within bf16's range relative to the logit scale."""
    a, r = np.asarray(bf16_logits, np.float64), np.asarray(f32_logits, np.float64)
    np.testing.assert_array_equal(a.argmax(-1), r.argmax(-1))
    err = float(np.max(np.abs(a - r)) / np.max(np.abs(r)))
    assert err <= rel, f"bf16 relative error {err:.3g} > {rel}"
    return err


# --- golden mini model -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def golden(golden_dir: Path) -> dict:
    folder = golden_dir / "timm_vit"
    ref = dict(np.load(folder / "vit_mini.npz"))
    sd = load_file(folder / "vit_mini.safetensors")
    model, config = convert_state_dict("vit", sd, MINI_HEADS)
    run, state = jit_pure(model, lambda m, x: {
        "named": intermediates.vit(m, x), "call": m(x), "features": m.features(x),
        "raw": m.features(x, raw_last=True),
    })
    return {"folder": folder, "ref": ref, "sd": sd, "model": model, "config": config,
            "out": run(state, nhwc(ref["images"]))}


def test_golden_parity_every_array(golden: dict) -> None:
    ref, out = golden["ref"], golden["out"]["named"]
    names = [k for k in ref if k != "images"]
    assert set(names) <= set(out), f"not produced: {set(names) - set(out)}"
    errors = {k: assert_close_to_reference(out[k], ref[k], k) for k in names}
    assert errors["logits"] < 5e-6, errors  # stricter than the criterion: catches a wrong LayerNorm eps


def test_call_and_features_match_golden(golden: dict) -> None:
    ref, out = golden["ref"], golden["out"]
    assert_close_to_reference(out["call"], ref["logits"], "logits")
    final = out["features"][-1]
    assert final.shape == (2, 14, 14, 96)
    assert_close_to_reference(final, ref["tokens_post_norm"][:, 1:].reshape(2, 14, 14, 96), "features")
    for i, fmap in enumerate(out["raw"]):
        assert_close_to_reference(fmap, ref[f"blocks_{i}"][:, 1:].reshape(2, 14, 14, 96), f"blocks_{i} map")
    for i, fmap in enumerate(out["features"][:-1]):
        np.testing.assert_array_equal(fmap, out["raw"][i])


def test_pth_file_gives_the_same_model(golden: dict) -> None:
    sd, _ = read_state_dict(golden["folder"] / "vit_mini.pth", default_keys=get_family("vit").default_keys)
    model, config = convert_state_dict("vit", sd, MINI_HEADS)
    assert config == golden["config"]
    jax.tree.map(np.testing.assert_array_equal, params_of(model), params_of(golden["model"]))


def test_inferred_config(golden: dict) -> None:
    config = golden["config"]
    assert (config["img_size"], config["patch_size"], config["embed_dim"], config["depth"]) == (224, 16, 96, 2)
    assert (config["num_classes"], config["num_heads"], config["mlp_ratio"]) == (10, 3, 4.0)
    with pytest.raises(ValueError, match="width 96 is not a published ViT width .* --override num_heads=N"):
        convert_state_dict("vit", golden["sd"])  # 96 channels: heads must be given


def test_bfloat16_compute(golden: dict) -> None:
    model, _ = convert_state_dict("vit", golden["sd"], {**MINI_HEADS, "dtype": jnp.bfloat16})
    run, state = jit_pure(model, lambda m, x: m(x))
    logits = run(state, nhwc(golden["ref"]["images"]))
    assert logits.dtype == jnp.float32
    top1_agrees_and_close(logits, golden["ref"]["logits"])


# --- attention paths -------------------------------------------------------------------------

def test_fused_attention_equals_explicit_softmax() -> None:
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q, k, v = (np.asarray(jax.random.normal(key, (2, 197, 3, 32)), np.float64) for key in (kq, kk, kv))
    fused, explicit = jax.jit(lambda q, k, v: (attention.attention(q, k, v), attention.reference_attention(q, k, v)))(
        *(jnp.asarray(a, jnp.float32) for a in (q, k, v)))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(32)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    by_hand = np.einsum("bhqk,bkhd->bqhd", probs / probs.sum(-1, keepdims=True), v)  # float64 numpy
    np.testing.assert_allclose(fused, by_hand, atol=2e-6)
    np.testing.assert_allclose(explicit, by_hand, atol=2e-6)


def test_attention_impl_switch_and_validation() -> None:
    model = nnx.eval_shape(lambda: create("vit_mini"))
    apply_policy(model, Policy(attention_impl="explicit"))
    assert all(b.attn.attention_impl == "explicit" for b in model.blocks)
    with pytest.raises(ValueError, match="attention_impl='flash' is not one of"):
        Policy(attention_impl="flash")


# --- full size, registry, converter hooks ----------------------------------------------------

def test_full_size_layout_matches_timm_manifest(golden_dir: Path) -> None:
    manifest, sd = manifest_state_dict(golden_dir / "manifests" / "timm_vit_small_patch16_224.json")
    model = nnx.eval_shape(lambda: create("vit_small_patch16_224"))
    assert assert_matches_manifest(model, manifest, sd) == 22_050_664
    assert abstract_outputs(model) == ([(2, 14, 14, 384)] * 4, (2, 1000))
    config, provenance = resolve_config("vit", get_family("vit").infer_config(sd), {})
    assert config == {"img_size": 224, "patch_size": 16, "in_chans": 3, "num_classes": 1000, "embed_dim": 384,
                      "depth": 12, "num_heads": 6, "mlp_ratio": 4.0, "qkv_bias": True}
    assert provenance["num_heads"] == "published default (ViT-S, width 384)"
    assert {v for k, v in provenance.items() if k != "num_heads"} == {"read from shapes"}
    assert detect_families(sd) == ["vit"]


def test_wrong_image_size_is_a_clear_error() -> None:
    model = nnx.eval_shape(lambda: create("vit_mini"))
    with pytest.raises(ValueError, match="img_size=160"):
        model(jnp.zeros((1, 160, 160, 3)))


def test_drop_path_train_and_eval() -> None:
    model = random_model("vit", img_size=32, embed_dim=96, depth=3, num_heads=3, num_classes=10, drop_path_rate=0.5)
    np.testing.assert_allclose(drop_path_rates(model), [0.0, 0.25, 0.5])  # timm's linear schedule
    assert_drop_path_modes(model, (4, 32, 32, 3))


def assert_drop_path_modes(model: nnx.Module, shape: tuple[int, ...]) -> None:
    """Train mode resamples the stochastic depth masks per call; eval mode is deterministic."""
    x = jax.random.normal(jax.random.key(1), shape)
    step = nnx.jit(lambda m, x: m(x))
    model.train()
    assert not np.allclose(step(model, x), step(model, x)), "drop path must resample in train mode"
    model.eval()
    np.testing.assert_array_equal(step(model, x), step(model, x))
