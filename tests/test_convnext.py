"""Plain ConvNeXt (7x7 depthwise conv with bias): timm and official naming, golden parity, full sizes."""
from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close_to_reference
from flax import nnx

from l2s_jax.convert import convert_state_dict
from l2s_jax.io.checkpoint_files import read_state_dict
from l2s_jax.io.torch_state import check_state_dict
from l2s_jax.models import build_abstract, get_family
from l2s_jax.models.convnext import ConvNeXt


def nhwc(x: np.ndarray) -> np.ndarray:
    return np.transpose(x, (0, 2, 3, 1))


def run(model: ConvNeXt, images: jax.Array):
    graphdef, state = nnx.split(model)

    @jax.jit
    def f(state, x):
        m = nnx.merge(graphdef, state)
        stem = x
        for layer in m.downsample_layers[0]:
            stem = layer(stem)
        feats = m.features(x)
        pooled = feats[-1].mean((1, 2))
        return stem, feats, pooled, m.norm(pooled), m.forward_head(feats[-1])

    return f(state, images)


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_timm_golden_parity(golden_dir, fmt):
    sd, _ = read_state_dict(golden_dir / f"timm_convnext/convnext_mini.{fmt}")
    assert any(k.startswith("stem.") for k in sd)  # timm naming, renamed by the converter
    model, config = convert_state_dict("convnext", sd)
    assert config["depths"] == [1, 1, 2, 1] and config["dims"] == [16, 24, 32, 48] and config["num_classes"] == 10
    ref = np.load(golden_dir / "timm_convnext/convnext_mini.npz")
    stem, feats, pooled, pre_logits, logits = run(model, jnp.asarray(nhwc(ref["images"])))
    assert_close_to_reference(stem, nhwc(ref["stem"]), "stem")
    for i in range(4):
        assert_close_to_reference(feats[i], nhwc(ref[f"stages_{i}"]), f"stages_{i}")
    assert_close_to_reference(pooled, ref["pooled"], "pooled")
    assert_close_to_reference(pre_logits, ref["pre_logits"], "pre_logits")
    assert_close_to_reference(logits, ref["logits"], "logits")
    n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert n == json.loads((golden_dir / "timm_convnext/convnext_mini.json").read_text())["num_parameters"]


def test_official_naming_converts_to_the_same_model(golden_dir):
    """The official ConvNeXt key names (what timm renames from) load into the same network."""
    from l2s_jax.models.convnext import remap_timm_keys

    timm_sd, _ = read_state_dict(golden_dir / "timm_convnext/convnext_mini.safetensors")
    official = remap_timm_keys(timm_sd)
    assert "downsample_layers.0.0.weight" in official and "stages.2.1.dwconv.weight" in official
    model, _ = convert_state_dict("convnext", official)
    ref = np.load(golden_dir / "timm_convnext/convnext_mini.npz")
    assert_close_to_reference(run(model, jnp.asarray(nhwc(ref["images"])))[-1], ref["logits"], "logits")


def test_wrong_arch_is_named(golden_dir):
    from l2s_jax.convert import ArchitectureMismatchError

    sd, _ = read_state_dict(golden_dir / "timm_convnext/convnext_mini.safetensors")
    with pytest.raises(ArchitectureMismatchError, match="convnext"):
        convert_state_dict("slak", sd)


@pytest.mark.parametrize("manifest", ["timm_convnext_tiny", "timm_convnext_small"])
def test_full_size_manifest_coverage(golden_dir, manifest):
    meta = json.loads((golden_dir / f"manifests/{manifest}.json").read_text())
    entries = meta["state_dict"]
    items = entries.items() if isinstance(entries, dict) else [(e["key"], (e["shape"], e["dtype"])) for e in entries]
    sd = {k: np.broadcast_to(np.zeros((), np.dtype(dtype)), shape) for k, (shape, dtype) in items}
    fam = get_family("convnext")
    sd = fam.remap_keys(sd)
    config = fam.infer_config(sd)
    model = build_abstract("convnext", config)
    check_state_dict(model, sd)
    n = sum(math.prod(v.shape) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert n == meta["num_parameters"]


def test_bfloat16_compute(golden_dir):
    """bf16 compute (float32 params): same top-1 on the golden images, bf16-sized relative error."""
    sd, _ = read_state_dict(golden_dir / "timm_convnext/convnext_mini.safetensors")
    model, _ = convert_state_dict("convnext", sd, overrides={"dtype": "bfloat16"})
    assert jax.tree.leaves(nnx.state(model, nnx.Param))[0].dtype == jnp.float32
    ref = np.load(golden_dir / "timm_convnext/convnext_mini.npz")
    logits = np.asarray(run(model, jnp.asarray(nhwc(ref["images"])))[-1])
    assert logits.dtype == np.float32
    rel = np.abs(logits - ref["logits"]).max() / np.abs(ref["logits"]).max()
    assert 1e-4 < rel < 5e-2, rel  # really computed in bf16, and still close
    assert np.array_equal(logits.argmax(-1), ref["logits"].argmax(-1))
