"""MobileNetV3-Large (timm): golden parity (mini and full size), full-size coverage, config inference, train mode."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close_to_reference
from flax import nnx
from safetensors.numpy import load_file

from l2s_jax import layers
from l2s_jax.convert import ArchitectureMismatchError, convert_state_dict, detect_families
from l2s_jax.io.checkpoint_files import read_state_dict
from l2s_jax.io.torch_state import check_state_dict, torch_slots
from l2s_jax.models import build_abstract, create, get_family
from l2s_jax.models.mobilenetv3 import MobileNetV3, large_block_defs, make_divisible

MINI = "timm_mobilenetv3/mobilenetv3_mini"
FULL = "timm_mobilenetv3/mobilenetv3_large_100"


def nhwc(x: np.ndarray) -> np.ndarray:
    return np.transpose(x, (0, 2, 3, 1)) if x.ndim == 4 else x


@nnx.jit
def forward_all(model: MobileNetV3, x: jax.Array) -> dict[str, jax.Array]:
    """Every output the golden set stores, from one compiled program."""
    outs = model.stage_outputs(x)
    return {
        "stem": model.stem(x),
        **{f"blocks_{i}": o for i, o in enumerate(outs)},
        "pooled": layers.global_avg_pool(outs[-1]),
        "pre_logits": model.forward_head(outs[-1], pre_logits=True),
        "logits": model.forward_head(outs[-1]),
        "features": model.features(x),
    }


logits_of = nnx.jit(MobileNetV3.__call__)


def read(path) -> dict[str, np.ndarray]:
    if path.suffix == ".safetensors":
        return load_file(path)
    return read_state_dict(path)[0]


@pytest.mark.parametrize("case, fmt", [(MINI, "pth"), (MINI, "safetensors"), (FULL, "pth")])
def test_golden_parity(golden_dir, case, fmt):
    meta = json.loads((golden_dir / f"{case}.json").read_text())
    ref = np.load(golden_dir / f"{case}.npz")
    model, config = convert_state_dict("mobilenetv3", read(golden_dir / f"{case}.{fmt}"))
    assert config["channel_multiplier"] == meta["kwargs"].get("channel_multiplier", 1.0)
    assert config["num_classes"] == meta["kwargs"].get("num_classes", 1000)
    assert tuple(ref["images"].shape) == tuple(meta["input"]["shape"])

    out = forward_all(model, jnp.asarray(nhwc(ref["images"])))
    features = out.pop("features")
    errors = {k: assert_close_to_reference(v, nhwc(ref[k]), k) for k, v in out.items()}
    assert set(errors) == set(ref.files) - {"images"}, "every stored intermediate is compared"
    # features = the last map at strides 4, 8, 16, 32.
    assert [f.shape[1] for f in features] == [32, 16, 8, 4]
    for f, i in zip(features, (1, 2, 4, 6)):
        np.testing.assert_array_equal(f, out[f"blocks_{i}"])
    print(f"{case} {fmt} max abs errors:", {k: f"{v:.2e}" for k, v in errors.items()})


def _fake_state_dict(manifest: dict) -> dict[str, np.ndarray]:
    """Zero-stride arrays with the manifest's shapes and dtypes (no memory), for shape-only checks."""
    return {k: np.broadcast_to(np.zeros((), dtype), shape) for k, (shape, dtype) in manifest["state_dict"].items()}


def test_full_size_matches_manifest(golden_dir):
    manifest = json.loads((golden_dir / "manifests/timm_mobilenetv3_large_100.json").read_text())
    sd = _fake_state_dict(manifest)
    config = get_family("mobilenetv3").infer_config(sd)
    assert config == {"channel_multiplier": 1.0, "in_chans": 3, "num_features": 1280, "num_classes": 1000}
    model = build_abstract("mobilenetv3", config)
    slots, ignored = torch_slots(model)
    assert set(slots) == set(torch_slots(nnx.eval_shape(lambda: create("mobilenetv3_large_100")))[0])
    assert set(slots) | ignored == set(sd), "every manifest key has a slot, every slot a manifest key"
    assert {k for k in sd if k not in slots} == {k for k in sd if k.endswith("num_batches_tracked")}
    for key, slot in slots.items():
        arr = sd[key]
        assert (slot.transform(arr) if slot.transform else arr).shape == slot.variable.shape, key
    check_state_dict(model, sd)
    n_params = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert n_params == manifest["num_parameters"] == 5_483_032
    dw = [s.module for k, s in slots.items() if k.endswith("conv_dw.weight")]
    assert len(dw) == 15 and all(isinstance(m, layers.DepthwiseConv2d) and m.bias is None for m in dw)


def test_block_table_and_rounding():
    assert [make_divisible(c * 0.25) for c in (16, 24, 40, 80, 112, 160, 960)] == [8, 8, 16, 24, 32, 40, 240]
    full = large_block_defs(1.0)
    assert [len(s) for s in full] == [1, 2, 3, 4, 2, 3, 1]
    irs = [b for s in full for b in s if b["type"] == "ir"]
    assert [b["mid"] for b in irs] == [64, 72, 72, 120, 120, 240, 200, 184, 184, 480, 672, 672, 960, 960]
    assert [b["se"] for b in irs] == [0, 0, 24, 32, 32, 0, 0, 0, 0, 120, 168, 168, 240, 240]
    assert [b["stride"] for s in full for b in s] == [1, 2, 1, 2, 1, 1, 2, 1, 1, 1, 1, 1, 2, 1, 1, 1]
    assert [s[0]["act"] for s in full] == ["relu"] * 3 + ["hard_swish"] * 4
    mini = large_block_defs(0.25)
    assert mini[0][0]["out"] == 8 and [b["mid"] for b in mini[3]] == [96, 64, 56, 56]
    assert [b["se"] for b in mini[5]] == [48, 64, 64]


def test_non_standard_widths_give_explicit_block_defs(golden_dir):
    sd = dict(load_file(golden_dir / f"{MINI}.safetensors"))
    # Drop the squeeze-excite of one block: no multiplier reproduces that, so widths are listed per block.
    for k in [k for k in sd if k.startswith("blocks.4.1.se.")]:
        del sd[k]
    config = get_family("mobilenetv3").infer_config(sd)
    assert "channel_multiplier" not in config and config["stem_size"] == 16
    assert config["block_defs"][4][1]["se"] == 0 and config["block_defs"][4][0]["se"] == 40
    model = build_abstract("mobilenetv3", json.loads(json.dumps(config)))  # as stored in spec.json
    assert model.blocks[4][1].se is None
    check_state_dict(model, sd)


def test_train_and_eval_modes(golden_dir):
    """Train mode: BN batch statistics (momentum 0.1, unbiased running variance) and drop path; eval: fixed."""
    model, _ = convert_state_dict("mobilenetv3", load_file(golden_dir / f"{MINI}.safetensors"),
                                  {"drop_path_rate": 0.3})
    model.train()
    x = jax.random.normal(jax.random.key(5), (8, 32, 32, 3))
    conv_out = np.asarray(model.conv_stem(x), np.float64).reshape(-1, 16)
    running_mean, running_var = np.asarray(model.bn1.mean[...]), np.asarray(model.bn1.var[...])
    se_block = model.blocks[2][0]
    deep_before = np.asarray(se_block.bn2.var[...])

    a = logits_of(model, x)
    np.testing.assert_allclose(model.bn1.mean[...], 0.9 * running_mean + 0.1 * conv_out.mean(0), rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(model.bn1.var[...], 0.9 * running_var + 0.1 * conv_out.var(0, ddof=1), rtol=1e-5,
                               atol=1e-5)
    assert not np.allclose(se_block.bn2.var[...], deep_before), "deep BN statistics were not updated"
    # Same batch, same batch statistics: only the drop-path masks can change the output.
    assert not np.allclose(a, logits_of(model, x)), "train mode must draw new drop-path masks"

    model.eval()
    assert all(b.drop_path.deterministic and b.bn1.use_running_average for s in model.blocks[:6] for b in s)
    # Eval forward (the golden test's compiled program): deterministic, statistics untouched.
    golden, _ = convert_state_dict("mobilenetv3", load_file(golden_dir / f"{MINI}.safetensors"))
    images = jnp.asarray(nhwc(np.load(golden_dir / f"{MINI}.npz")["images"]))
    stats = jax.tree.map(np.asarray, nnx.state(golden, nnx.BatchStat))
    np.testing.assert_array_equal(forward_all(golden, images)["logits"], forward_all(golden, images)["logits"])
    jax.tree.map(np.testing.assert_array_equal, stats, jax.tree.map(np.asarray, nnx.state(golden, nnx.BatchStat)))


def test_drop_path_rates_follow_timm_builder():
    model = nnx.eval_shape(lambda: create("mobilenetv3_large_100", drop_path_rate=0.2))
    blocks = [b for s in model.blocks for b in s]
    expected = [0.2 * i / 16 if getattr(b, "has_skip", False) else 0.0 for i, b in enumerate(blocks)]
    assert [b.drop_path.rate if hasattr(b, "drop_path") else 0.0 for b in blocks] == pytest.approx(expected)
    assert sum(getattr(b, "has_skip", False) for b in blocks) == 10


def test_fresh_init_forward():
    """A real (random) init, on a three-stage network with few distinct shapes to keep compiles cheap."""
    block_defs = [
        [{"type": "ds", "kernel": 3, "stride": 1, "out": 8, "act": "relu", "se": 0}],
        [{"type": "ir", "kernel": 3, "stride": 2, "mid": 16, "out": 8, "act": "hard_swish", "se": 8}],
        [{"type": "cn", "kernel": 1, "stride": 1, "out": 16, "act": "hard_swish"}],
    ]
    model = create("mobilenetv3", block_defs=block_defs, stem_size=8, num_features=16, num_classes=4, seed=0)
    dw = np.asarray(model.blocks[1][0].conv_dw.kernel[...])
    assert 0.6 < float(np.std(dw)) / np.sqrt(2.0 / 9) < 1.4, "TF-style depthwise init N(0, 2/k^2)"
    assert model.blocks[0][0].has_skip and not model.blocks[1][0].has_skip
    logits = logits_of(model, jnp.ones((2, 32, 32, 3)))
    assert logits.shape == (2, 4) and bool(jnp.isfinite(logits).all())
    with pytest.raises(ValueError, match="needs"):
        create("mobilenetv3", block_defs=[[{"type": "ir", "kernel": 3, "stride": 1, "out": 8, "act": "relu"}]])


def test_wrong_arch_is_detected(golden_dir):
    sd = load_file(golden_dir / f"{MINI}.safetensors")
    assert detect_families(sd) == ["mobilenetv3"], "no other family claims these keys"
    with pytest.raises(ArchitectureMismatchError, match="mobilenetv3"):
        convert_state_dict("resnet", sd)
    with pytest.raises(ArchitectureMismatchError, match="resnet"):
        convert_state_dict("mobilenetv3", load_file(golden_dir / "timm_resnet/resnet_mini.safetensors"))
    with pytest.raises(ValueError, match="Large layout"):
        get_family("mobilenetv3").infer_config({k: v for k, v in sd.items() if not k.startswith("blocks.3.3.")})
