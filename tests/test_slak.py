"""SLaK, the ConvNeXt+BN student and ConvNeXt: golden parity, conversion, masks, fusion, full sizes."""
from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close_to_reference
from flax import nnx

from l2s_jax.convert import ArchitectureMismatchError, convert_checkpoint, convert_state_dict, resolve_config
from l2s_jax.io.checkpoint_files import read_state_dict
from l2s_jax.io.torch_state import CheckpointMismatchError, check_state_dict, torch_slots
from l2s_jax.models import build_abstract, get_family, jit_apply, load_pretrained
from l2s_jax.models.slak import SLaK

CASES = ["slak/dev_slak_decom_w13", "slak/dev_slak_nodecom_w10", "convnext_bn/dev_convnext_bn"]


def nhwc(x: np.ndarray) -> np.ndarray:
    return np.transpose(x, (0, 2, 3, 1))


@pytest.fixture(scope="module")
def converted(golden_dir):
    """Each golden case converted from its .pth ('model' entry), with its reference arrays."""
    out = {}
    for case in CASES:
        sd, key = read_state_dict(golden_dir / f"{case}.pth", default_keys=get_family("slak").default_keys)
        assert key == "model"
        model, config = convert_state_dict("slak", sd)
        out[case] = (model, config, sd, np.load(golden_dir / f"{case}.npz"))
    return out


def probe(model: SLaK, images: jax.Array, stage_inputs: list[jax.Array], lk_inputs: list[jax.Array]):
    """One jitted pass: stage maps, logits, and each stage's downsampling / first large-kernel op."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, images, stage_inputs, lk_inputs):
        m = nnx.merge(graphdef, state)
        feats = m.features(images)
        downs = []
        for i, x in enumerate(stage_inputs):
            for layer in m.downsample_layers[i]:
                x = layer(x)
            downs.append(x)
        lks = [m.stages[i][0].large_kernel(x) for i, x in enumerate(lk_inputs)]
        return feats, m.forward_head(feats[-1]), downs, lks

    return run(state, images, stage_inputs, lk_inputs)


@pytest.mark.parametrize("case", CASES)
def test_golden_parity(converted, golden_dir, case):
    model, config, _, ref = converted[case]
    meta = json.loads((golden_dir / f"{case}.json").read_text())
    assert config["dims"] == meta["effective_dims"]
    assert config["kernel_size"][:4] == meta["constructor_kwargs"]["kernel_size"][:4]
    assert config["decompose"] == meta["constructor_kwargs"]["Decom"]
    x = jnp.asarray(nhwc(ref["images"]))
    stage_inputs = [x] + [jnp.asarray(nhwc(ref[f"stage{i}"])) for i in range(3)]
    lk_inputs = [jnp.asarray(nhwc(ref[f"down{i}"])) for i in range(4)]
    feats, logits, downs, lks = probe(model, x, stage_inputs, lk_inputs)
    for i in range(4):
        assert_close_to_reference(downs[i], nhwc(ref[f"down{i}"]), f"{case} down{i}")
        assert_close_to_reference(lks[i], nhwc(ref[f"lk{i}"]), f"{case} lk{i}")
        assert_close_to_reference(feats[i], nhwc(ref[f"stage{i}"]), f"{case} stage{i}")
    assert_close_to_reference(logits, ref["logits"], f"{case} logits")


def test_ema_weights_and_masks(golden_dir):
    case = "slak/dev_slak_decom_w13"
    ref = np.load(golden_dir / f"{case}.npz")
    meta = json.loads((golden_dir / f"{case}.json").read_text())
    sd, key = read_state_dict(golden_dir / f"{case}.pth", key="model_ema")
    assert key == "model_ema"
    model, config = convert_state_dict("slak", sd)
    assert config["sparse"]
    assert_close_to_reference(jit_apply(model)(jnp.asarray(nhwc(ref["images"]))), ref["logits_ema"], "logits_ema")
    # Masks are the checkpoint's zeros, tensor by tensor.
    slots, _ = torch_slots(model)
    for name, zeros in meta["zeroed_entries_per_tensor"].items():
        conv = slots[name].module
        assert conv.mask is not None, name
        assert int((np.asarray(conv.mask[...]) == 0).sum()) == zeros, name


def test_masked_weights_stay_zero_in_training(golden_dir):
    sd, _ = read_state_dict(golden_dir / "slak/dev_slak_nodecom_w10.pth")
    model, _ = convert_state_dict("slak", sd)
    model.train()
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))

    @nnx.jit
    def sgd_step(m):
        grads = nnx.grad(lambda m: jnp.mean(m(x) ** 2))(m)
        params = nnx.state(m, nnx.Param)
        nnx.update(m, jax.tree.map(lambda p, g: p - 0.1 * g - 0.01 * p, params, grads))  # SGD + decoupled decay
        return grads

    grads = sgd_step(model)
    updated = model
    lk = updated.stages[0][0].large_kernel.lkb_origin.conv
    mask = np.asarray(lk.mask[...])
    assert (mask == 0).mean() == pytest.approx(0.4, abs=0.01)
    assert np.all(np.asarray(lk.effective_kernel())[mask == 0] == 0)
    g = grads["stages"][0][0]["large_kernel"]["lkb_origin"]["conv"]["kernel"][...]
    assert np.all(np.asarray(g)[mask == 0] == 0) and np.any(np.asarray(g)[mask == 1] != 0)


@pytest.mark.parametrize("case", ["slak/dev_slak_decom_w13", "slak/dev_slak_nodecom_w10"])
def test_fused_equals_unfused(converted, case):
    model, config, sd, ref = converted[case]
    # Op level: the folded K x K kernel + bias equals the sum of the BN'd branches.
    lk = model.stages[1][0].large_kernel
    x = jax.random.normal(jax.random.key(1), (2, 12, 12, lk.branches()[0].conv.kernel.shape[-1]))
    kernel, bias = lk.fused_kernel()
    from l2s_jax.ops import depthwise_conv2d

    np.testing.assert_allclose(depthwise_conv2d(x, kernel, impl="direct") + bias, lk(x), rtol=0, atol=2e-5)
    # Model level: the fused model reproduces the reference (= unfused) logits to float32 rounding.
    fused, _ = convert_state_dict("slak", sd)
    fused.fuse()
    assert fused.stages[0][0].large_kernel.lkb_reparam is not None
    assert not fused.stages[0][0].large_kernel.branches()
    logits = jit_apply(fused)(jnp.asarray(nhwc(ref["images"])))
    assert_close_to_reference(logits, ref["logits"], f"{case} fused", factor=2e-5)


def test_convert_checkpoint_roundtrip_and_arch_errors(golden_dir, tmp_path):
    src = golden_dir / "convnext_bn/dev_convnext_bn.pth"
    # The student checkpoint uses SLaK's key names: --arch convnext recognises it and builds SLaK.
    out = convert_checkpoint("convnext", src, tmp_path / "student")
    spec = json.loads((out / "spec.json").read_text())
    assert spec["family"] == "slak" and spec["config"]["kernel_size"] == [7, 7, 7, 7, 100]
    model = load_pretrained(out)
    assert isinstance(model, SLaK) and model.stages[0][0].large_kernel.lkb_origin.bn.use_running_average
    ref = np.load(golden_dir / "convnext_bn/dev_convnext_bn.npz")
    assert_close_to_reference(jit_apply(model)(jnp.asarray(nhwc(ref["images"]))), ref["logits"], "reloaded")
    with pytest.raises(FileExistsError):
        convert_checkpoint("slak", src, tmp_path / "student")
    sd, _ = read_state_dict(src)
    with pytest.raises(ArchitectureMismatchError, match="slak|convnext"):
        convert_state_dict(_a_non_slak_family(), sd)


def _a_non_slak_family() -> str:
    from l2s_jax.models import FAMILIES

    others = [f for f in FAMILIES if f not in ("slak", "convnext")]
    if not others:
        pytest.skip("no other family registered")
    return others[0]


def test_mismatch_errors_name_keys_and_shapes(golden_dir):
    sd, _ = read_state_dict(golden_dir / "slak/dev_slak_decom_w13.pth")
    model = build_abstract("slak", dict(depths=(1, 1, 2, 1), dims=(20, 41, 83, 166), num_classes=1000))
    broken = dict(sd)
    del broken["stages.0.0.large_kernel.LoRA1.bn.running_var"]
    broken["stages.0.0.extra.weight"] = np.zeros(3, np.float32)
    broken["head.weight"] = np.zeros((10, 166), np.float32)
    with pytest.raises(CheckpointMismatchError) as e:
        check_state_dict(model, broken)
    msg = str(e.value)
    assert "stages.0.0.large_kernel.LoRA1.bn.running_var" in msg
    assert "stages.0.0.extra.weight" in msg
    assert "head.weight" in msg and "(10, 166)" in msg and "(166, 1000)" in msg


MANIFESTS = {
    "SLaK_tiny": ("slak_tiny", 50_703_838, 30e6),
    "SLaK_small": ("slak_small", 91_131_820, 55e6),
    "SLaK_base": ("slak_base", 157_950_792, 95e6),
    "L2S_ConvNeXt_T_student": ("convnext_tiny_bn", 28_595_752, None),
    "L2S_ConvNeXt_S_student": ("convnext_small_bn", 50_237_224, None),
}


@pytest.mark.parametrize("manifest", sorted(MANIFESTS))
def test_full_size_manifest_coverage(golden_dir, manifest):
    """Every key of the full-size state_dict maps to a parameter of the same shape (no allocation)."""
    name, dense, published_sparse = MANIFESTS[manifest]
    manifest_json = json.loads((golden_dir / f"manifests/{manifest}.json").read_text())
    entries = manifest_json["state_dict"]
    # Zero-strided arrays: shapes without memory. All zeros, so the converter infers sparse=True.
    sd = {e["key"]: np.broadcast_to(np.zeros((), e["dtype"]), e["shape"]) for e in entries}
    fam = get_family("slak")
    assert fam.looks_like(sd)
    config, provenance = resolve_config("slak", fam.infer_config(sd), {})
    assert provenance["kernel_size"].startswith("published default" if "student" in manifest.lower() else "read from")
    model = build_abstract("slak", config)
    check_state_dict(model, sd)  # raises naming any missing / unexpected / mis-shaped key
    reference = build_abstract("slak", {**_registered(name), "sparse": config["sparse"]})
    assert [int(d) for d in config["dims"]] == [int(d) for d in _dims(reference)]
    n_params = sum(math.prod(v.shape) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
    buffers = sum(math.prod(e["shape"]) for e in entries if e["key"].endswith(("running_mean", "running_var")))
    floats = sum(math.prod(e["shape"]) for e in entries if e["dtype"] == "float32")
    assert n_params == dense == manifest_json["num_parameters"] == floats - buffers
    if published_sparse:
        # The paper counts non-zeros of the 40%-sparse model (every >= 2-D weight pruned).
        multi = sum(math.prod(e["shape"]) for e in entries if len(e["shape"]) >= 2)
        nonzero = dense - 0.4 * multi
        assert abs(nonzero - published_sparse) / published_sparse < 0.05, nonzero


def _registered(name: str) -> dict:
    from l2s_jax.models import MODELS

    return dict(MODELS[name][1])


def _dims(model: SLaK) -> list[int]:
    return [int(model.downsample_layers[i][-2 if i == 0 else -1].kernel.shape[-1]) for i in range(4)]


@pytest.mark.torch
@pytest.mark.parametrize("seed,decompose,size", [(0, True, 64), (1, False, 96)])
def test_live_against_pytorch(seed, decompose, size):
    """Freshly randomised PyTorch models (written from reference.md) convert to equal outputs."""
    torch = pytest.importorskip("torch")
    from l2s_jax.reference.torch_slak import SLaK as TorchSLaK, randomize_

    kwargs = dict(num_classes=7, depths=(1, 2, 1, 1), dims=(8, 16, 24, 32), kernel_size=(31, 29, 27, 13, 5),
                  width_factor=1.3, decompose=decompose)
    tm = randomize_(TorchSLaK(**kwargs), seed, sparsity=0.4).eval()
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref_feats = [f.numpy() for f in tm.features(x)]
        ref_logits = tm(x).numpy()
    model, config = convert_state_dict("slak", {k: v.numpy() for k, v in tm.state_dict().items()})
    xj = jnp.asarray(nhwc(x.numpy()))
    for i, f in enumerate(jit_apply(model, "features")(xj)):
        assert_close_to_reference(f, nhwc(ref_feats[i]), f"seed {seed} stage{i}")
    assert_close_to_reference(jit_apply(model)(xj), ref_logits, f"seed {seed} logits")
