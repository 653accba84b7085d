"""What a user does with every converter family: ``tools/convert_weights.py`` on a golden
checkpoint file (subprocess), then ``load_pretrained(out)``: logits and features must equal the
golden PyTorch ones; and a converted BatchNorm model trains (eagerly) like a fresh one."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from conftest import assert_close_to_reference
from run_helpers import run_tool
from l2s_jax.models import load_pretrained


def convert(*args: str) -> subprocess.CompletedProcess:
    return run_tool("convert_weights.py", *args)


def nhwc(a: np.ndarray) -> np.ndarray:
    return np.transpose(a, (0, 2, 3, 1))


def tokens_to_map(t: np.ndarray) -> np.ndarray:
    n, length, c = t.shape
    side = int(round(length ** 0.5))
    return t.reshape(n, side, side, c)


# arch, checkpoint file (relative to the golden folder), --override arguments, golden features
# in the order of ``model.features(images)`` (as NHWC).
CASES = {
    "slak": ("slak", "slak/dev_slak_nodecom_w10.pth", [],
             lambda r: [nhwc(r[f"stage{i}"]) for i in range(4)]),
    "convnext_bn": ("convnext", "convnext_bn/dev_convnext_bn.pth", [],
                    lambda r: [nhwc(r[f"stage{i}"]) for i in range(4)]),
    "convnext": ("convnext", "timm_convnext/convnext_mini.pth", [],
                 lambda r: [nhwc(r[f"stages_{i}"]) for i in range(4)]),
    "resnet": ("resnet", "timm_resnet/resnet_mini.pth", [],
               lambda r: [nhwc(r[f"layer{i}"]) for i in range(1, 5)]),
    "mobilenetv3": ("mobilenetv3", "timm_mobilenetv3/mobilenetv3_mini.pth", [],
                    lambda r: [nhwc(r[f"blocks_{i}"]) for i in (1, 2, 4, 6)]),
    "vit": ("vit", "timm_vit/vit_mini.pth", ["--override", "num_heads=3"],
            lambda r: [tokens_to_map(r["blocks_0"][:, 1:]), tokens_to_map(r["tokens_post_norm"][:, 1:])]),
    "swin": ("swin", "timm_swin/swin_mini.pth", [],
             lambda r: [r["layers_0"], r["layers_1"], r["layers_2"], r["final_norm"]]),
    "cswin": ("cswin", "cswin/cswin_mini.pth", ["--override", "num_heads=[2,2,4,6]"],
              lambda r: [tokens_to_map(r[k]) for k in ("stage1", "stage2", "stage3", "final_norm")]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_convert_cli_then_load_pretrained_matches_golden(case: str, golden_dir: Path, tmp_path: Path) -> None:
    arch, rel, extra, golden_features = CASES[case]
    src = golden_dir / rel
    out = tmp_path / case
    r = convert("--arch", arch, "--src", str(src), "--out", str(out), *extra)
    assert r.returncode == 0, r.stderr
    spec = json.loads((out / "spec.json").read_text())
    sources = spec["provenance"]["hyperparameters"]
    assert set(sources) == set(spec["config"])
    for name in spec["config"]:  # one printed line per hyperparameter, with its source
        assert f"  {name} = " in r.stdout and f"[{sources[name]}]" in r.stdout

    ref = dict(np.load(src.with_suffix(".npz")))
    model = load_pretrained(out)
    images = jnp.asarray(nhwc(ref["images"]))
    graphdef, state = nnx.split(model)  # one compile for logits and features
    logits, feats = jax.jit(lambda s, x: (lambda m: (m(x), m.features(x)))(nnx.merge(graphdef, s)))(state, images)
    assert_close_to_reference(logits, ref["logits"], f"{case} logits")
    expected = golden_features(ref)
    assert len(feats) == len(expected)
    for i, (f, e) in enumerate(zip(feats, expected)):
        assert_close_to_reference(f, e, f"{case} features[{i}]")


@pytest.fixture(scope="module")
def converted_resnet(golden_dir: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("converted") / "resnet"
    r = convert("--arch", "resnet", "--src", str(golden_dir / "timm_resnet/resnet_mini.pth"), "--out", str(out))
    assert r.returncode == 0, r.stderr
    return out


def test_converted_resnet_trains(converted_resnet: Path) -> None:
    """load_pretrained -> train mode, eagerly: BatchNorm statistics update in place; and a step."""
    out = converted_resnet
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))

    evaluating, training = load_pretrained(out), load_pretrained(out, eval_mode=False)
    assert evaluating.bn1.use_running_average and not training.bn1.use_running_average
    evaluating.train()
    for model in (evaluating, training):
        before = np.array(model.bn1.mean.get_value())
        model(x)
        assert not np.allclose(np.asarray(model.bn1.mean.get_value()), before)

    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
    labels = jnp.array([1, 2])

    @nnx.jit
    def step(model: nnx.Module, optimizer: nnx.Optimizer) -> jax.Array:
        loss_fn = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), labels).mean()  # noqa: E731
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    first, second = step(model, optimizer), step(model, optimizer)
    assert np.isfinite(float(first)) and float(second) != float(first)


def test_erf_tool_on_a_converted_checkpoint(converted_resnet: Path, tmp_path: Path) -> None:
    r = run_tool("erf.py", "--checkpoint", f"resnet={converted_resnet}", "--data", "random", "--num-images", "1",
                 "--size", "32", "--out", str(tmp_path / "erf"))
    assert r.returncode == 0, r.stderr
    assert "resnet: 1 images" in r.stdout
    erf_map = np.load(tmp_path / "erf" / "resnet.npy")
    assert erf_map.shape[:2] == (32, 32) and np.isfinite(erf_map).all() and erf_map.max() > 0
