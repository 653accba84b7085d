"""ResNet (timm): golden parity, a live PyTorch BasicBlock reference, full-size coverage, train mode."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close_to_reference
from flax import nnx
from safetensors.numpy import load_file

from l2s_jax.convert import ArchitectureMismatchError, convert_state_dict, detect_families
from l2s_jax.io.checkpoint_files import read_state_dict
from l2s_jax.io.torch_state import check_state_dict, torch_slots
from l2s_jax.models import MODELS, build_abstract, create, get_family
from l2s_jax.models.resnet import ResNet

CASE = "timm_resnet/resnet_mini"


def nhwc(x: np.ndarray) -> np.ndarray:
    return np.transpose(x, (0, 2, 3, 1)) if x.ndim == 4 else x


@nnx.jit
def forward_all(model: ResNet, x: jax.Array) -> dict[str, jax.Array]:
    """Every output the golden set stores, from one compiled program (shared by same-shaped models)."""
    feats = model.features(x)
    out = {"stem_pool": model.stem(x), **{f"layer{i}": f for i, f in enumerate(feats, start=1)}}
    return {**out, "pooled": model.forward_head(feats[-1], pre_logits=True), "logits": model.forward_head(feats[-1])}


logits_of = nnx.jit(ResNet.__call__)


def read(path) -> dict[str, np.ndarray]:
    if path.suffix == ".safetensors":
        return load_file(path)
    return read_state_dict(path)[0]


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_golden_parity(golden_dir, fmt):
    meta = json.loads((golden_dir / f"{CASE}.json").read_text())
    ref = np.load(golden_dir / f"{CASE}.npz")
    sd = read(golden_dir / f"{CASE}.{fmt}")
    assert any(k.endswith("num_batches_tracked") for k in sd)
    model, config = convert_state_dict("resnet", sd)
    assert config["block"] == "bottleneck"
    assert config["depths"] == meta["kwargs"]["layers"]
    assert config["channels"] == meta["kwargs"]["channels"]
    assert config["num_classes"] == meta["kwargs"]["num_classes"]
    assert tuple(ref["images"].shape) == tuple(meta["input"]["shape"])

    out = forward_all(model, jnp.asarray(nhwc(ref["images"])))
    errors = {k: assert_close_to_reference(v, nhwc(ref[k]), k) for k, v in out.items()}
    assert set(errors) == set(ref.files) - {"images"}, "every stored intermediate is compared"
    print(f"resnet_mini {fmt} max abs errors:", {k: f"{v:.2e}" for k, v in errors.items()})


class _TorchReference:
    """A from-scratch PyTorch ResNet with BasicBlocks (torchvision/timm layout), built lazily."""

    @staticmethod
    def build(depths, channels, num_classes, seed):
        import torch
        from torch import nn

        class Block(nn.Module):
            def __init__(self, cin, planes, stride):
                super().__init__()
                self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
                self.bn1 = nn.BatchNorm2d(planes)
                self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
                self.bn2 = nn.BatchNorm2d(planes)
                self.downsample = None
                if stride != 1 or cin != planes:
                    self.downsample = nn.Sequential(nn.Conv2d(cin, planes, 1, stride, bias=False),
                                                    nn.BatchNorm2d(planes))

            def forward(self, x):
                y = torch.relu(self.bn1(self.conv1(x)))
                y = self.bn2(self.conv2(y))
                return torch.relu(y + (x if self.downsample is None else self.downsample(x)))

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
                self.bn1 = nn.BatchNorm2d(64)
                cin = 64
                for i, (d, c) in enumerate(zip(depths, channels)):
                    blocks = [Block(cin if j == 0 else c, c, (1 if i == 0 else 2) if j == 0 else 1) for j in range(d)]
                    setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
                    cin = c
                self.fc = nn.Linear(cin, num_classes)

            def forward(self, x):
                x = nn.functional.max_pool2d(torch.relu(self.bn1(self.conv1(x))), 3, 2, 1)
                feats = []
                for i in range(1, 5):
                    x = getattr(self, f"layer{i}")(x)
                    feats.append(x)
                return feats, self.fc(x.mean((2, 3)))

        torch.manual_seed(seed)
        net = Net()
        with torch.no_grad():
            for m in net.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_(0, 0.1)
                    m.running_mean.normal_(0, 0.5)
                    m.running_var.uniform_(0.5, 2.0)
        return net.eval()


@pytest.mark.torch
def test_basic_block_matches_live_pytorch():
    torch = pytest.importorskip("torch")
    depths, channels = (2, 1, 1, 1), (8, 16, 16, 24)
    net = _TorchReference.build(depths, channels, num_classes=5, seed=0)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref_feats, ref_logits = net(images)
    sd = {k: v.numpy() for k, v in net.state_dict().items()}
    model, config = convert_state_dict("resnet", sd)
    assert config == {"block": "basic", "depths": list(depths), "channels": list(channels), "stem_width": 64,
                      "in_chans": 3, "num_classes": 5}
    out = forward_all(model, jnp.asarray(nhwc(images.numpy())))
    for i, r in enumerate(ref_feats, start=1):
        assert_close_to_reference(out[f"layer{i}"], nhwc(r.numpy()), f"basic layer{i}")
    assert_close_to_reference(out["logits"], ref_logits.numpy(), "basic logits")


def _fake_state_dict(manifest: dict) -> dict[str, np.ndarray]:
    """Zero-stride arrays with the manifest's shapes and dtypes (no memory), for shape-only checks."""
    return {k: np.broadcast_to(np.zeros((), dtype), shape) for k, (shape, dtype) in manifest["state_dict"].items()}


def test_full_size_resnet50_matches_manifest(golden_dir):
    manifest = json.loads((golden_dir / "manifests/timm_resnet50.json").read_text())
    sd = _fake_state_dict(manifest)
    config = get_family("resnet").infer_config(sd)
    assert config == {"block": "bottleneck", "depths": [3, 4, 6, 3], "channels": [64, 128, 256, 512],
                      "stem_width": 64, "in_chans": 3, "num_classes": 1000}
    model = build_abstract("resnet", config)
    reference = nnx.eval_shape(lambda: create("resnet50"))
    slots, ignored = torch_slots(model)
    assert set(slots) == set(torch_slots(reference)[0])
    assert set(slots) | ignored == set(sd), "every manifest key has a slot, every slot a manifest key"
    assert {k for k in sd if k not in slots} == {k for k in sd if k.endswith("num_batches_tracked")}
    assert len(ignored) == 53
    for key, slot in slots.items():
        arr = sd[key]
        assert (slot.transform(arr) if slot.transform else arr).shape == slot.variable.shape, key
    check_state_dict(model, sd)
    n_params = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert n_params == manifest["num_parameters"] == 25_557_032


@pytest.mark.parametrize("name, block, blocks, params", [
    ("resnet18", "basic", 8, 11_689_512),
    ("resnet34", "basic", 16, 21_797_672),
    ("resnet101", "bottleneck", 33, 44_549_160),
])
def test_other_named_sizes(name, block, blocks, params):
    model = nnx.eval_shape(lambda: create(name))
    assert MODELS[name][1]["block"] == block
    assert sum(len(s) for s in model.stages) == blocks
    assert sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(model, nnx.Param))) == params


def golden_model(golden_dir, **overrides) -> ResNet:
    """resnet_mini with the golden weights (non-trivial BN statistics and residual branches)."""
    model, _ = convert_state_dict("resnet", load_file(golden_dir / f"{CASE}.safetensors"), overrides)
    return model


def test_train_and_eval_modes(golden_dir):
    """Train mode: BN batch statistics (momentum 0.1, unbiased running variance) and drop path; eval: fixed."""
    model = golden_model(golden_dir, drop_path_rate=0.3)
    model.train()
    x = jax.random.normal(jax.random.key(3), (8, 32, 32, 3))
    conv_out = np.asarray(model.conv1(x), np.float64).reshape(-1, 64)
    running_mean, running_var = np.asarray(model.bn1.mean[...]), np.asarray(model.bn1.var[...])
    deep_before = np.asarray(model.layer4[0].bn3.mean[...])

    a = logits_of(model, x)
    np.testing.assert_allclose(model.bn1.mean[...], 0.9 * running_mean + 0.1 * conv_out.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(model.bn1.var[...], 0.9 * running_var + 0.1 * conv_out.var(0, ddof=1), rtol=1e-5,
                               atol=1e-5)
    assert not np.allclose(model.layer4[0].bn3.mean[...], deep_before), "deep BN statistics were not updated"
    # Same batch, same batch statistics: only the drop-path masks can change the output.
    assert not np.allclose(a, logits_of(model, x)), "train mode must draw new drop-path masks"

    model.eval()
    assert all(b.drop_path.deterministic and b.bn1.use_running_average for s in model.stages for b in s)
    # Eval forward (the golden test's compiled program): deterministic, statistics untouched.
    golden = golden_model(golden_dir)
    images = jnp.asarray(nhwc(np.load(golden_dir / f"{CASE}.npz")["images"]))
    stats = jax.tree.map(np.asarray, nnx.state(golden, nnx.BatchStat))
    np.testing.assert_array_equal(forward_all(golden, images)["logits"], forward_all(golden, images)["logits"])
    jax.tree.map(np.testing.assert_array_equal, stats, jax.tree.map(np.asarray, nnx.state(golden, nnx.BatchStat)))


def test_drop_path_rates_follow_timm_rule():
    model = nnx.eval_shape(lambda: create("resnet50", drop_path_rate=0.1))
    rates = [b.drop_path.rate for stage in model.stages for b in stage]
    np.testing.assert_allclose(rates, [0.1 * i / 15 for i in range(16)])


def test_fresh_init_follows_timm():
    model = create("resnet", block="basic", depths=(1, 1, 1, 1), channels=(8, 8, 8, 8), stem_width=8,
                   num_classes=3, seed=0)
    assert all(float(jnp.abs(b.bn2.scale[...]).max()) == 0.0 for s in model.stages for b in s), "zero_init_last"
    bias = np.asarray(model.fc.bias[...])
    assert np.abs(bias).max() <= 1 / np.sqrt(8) and np.abs(bias).min() > 0, "PyTorch Linear init"
    std = float(np.std(np.asarray(model.layer3[0].conv1.kernel[...])))
    assert 0.7 < std / np.sqrt(2.0 / (9 * 8)) < 1.3, "Kaiming normal, fan_out"
    logits = logits_of(model, jnp.ones((2, 32, 32, 3)))
    assert logits.shape == (2, 3) and bool(jnp.isfinite(logits).all())


def test_bfloat16_compute_close_to_float32(golden_dir):
    x = jnp.asarray(nhwc(np.load(golden_dir / f"{CASE}.npz")["images"]))
    f32, bf16 = golden_model(golden_dir), golden_model(golden_dir, dtype=jnp.bfloat16)
    assert bf16.conv1.kernel[...].dtype == jnp.float32, "parameters stay float32"
    out16, logits32 = forward_all(bf16, x), forward_all(f32, x)["logits"]
    assert all(out16[f"layer{i}"].dtype == jnp.bfloat16 for i in range(1, 5))
    logits16 = out16["logits"]
    assert logits16.dtype == jnp.float32
    # bf16 rounding (2^-8 relative) accumulates over the 19 conv layers to about 2% of the logit range here.
    assert float(jnp.abs(logits16 - logits32).max()) < 0.05 * float(jnp.abs(logits32).max())


def test_wrong_arch_is_detected(golden_dir):
    sd = load_file(golden_dir / f"{CASE}.safetensors")
    assert detect_families(sd) == ["resnet"], "no other family claims these keys"
    with pytest.raises(ArchitectureMismatchError, match="resnet"):
        convert_state_dict("mobilenetv3", sd)
    assert not get_family("resnet").looks_like(load_file(golden_dir / "timm_mobilenetv3/mobilenetv3_mini.safetensors"))


def test_unsupported_variants_fail_clearly(golden_dir):
    sd = dict(load_file(golden_dir / f"{CASE}.safetensors"))
    deep_stem = {("conv1.0.weight" if k == "conv1.weight" else k): v for k, v in sd.items()}
    with pytest.raises(ValueError, match="deep"):
        convert_state_dict("resnet", deep_stem)
    wide = {**sd, "layer2.0.conv1.weight": np.zeros((32, 32, 1, 1), np.float32)}
    with pytest.raises(ValueError, match="wide ResNets"):
        convert_state_dict("resnet", wide)
    with pytest.raises(ValueError, match="block"):
        ResNet(block="bottle", rngs=nnx.Rngs(0))


def test_headless_model_returns_pooled_features():
    model = nnx.eval_shape(lambda: create("resnet_mini", num_classes=0))
    assert model.fc is None
    out = nnx.eval_shape(lambda m: m(jnp.zeros((1, 64, 64, 3))), model)
    assert out.shape == (1, 128)
    assert model.stage_channels == (32, 64, 96, 128)


def test_jitted_gradient_through_the_stem_pool():
    """Training needs grad under jit through the max-pool (an array init value broke it)."""
    from l2s_jax.models.resnet import max_pool_3x3_s2

    x = jax.random.normal(jax.random.key(0), (2, 9, 9, 3))
    g = jax.jit(jax.grad(lambda x: jnp.sum(max_pool_3x3_s2(x) ** 2)))(x)
    assert g.shape == x.shape and float(jnp.abs(g).sum()) > 0
    # Each output's max position receives 2 * value; padding never wins.
    np.testing.assert_allclose(float(jnp.sum(g * x)), 2 * float(jnp.sum(max_pool_3x3_s2(x) ** 2)), rtol=1e-5)
