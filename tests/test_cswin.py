"""CSWin-T port: golden parity with the official code (EMA and non-EMA weights), stripe/branch
layout, LePE per stripe against a PyTorch transcription, full-size layout, bf16, drop path."""
from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import intermediates
from conftest import assert_close_to_reference
from l2s_jax.convert import convert_checkpoint, convert_state_dict, detect_families, resolve_config
from l2s_jax.io.checkpoint_files import read_state_dict
from l2s_jax.io.torch_state import load_state_dict
from l2s_jax.models import create, cswin, get_family, load_pretrained, read_spec
from l2s_jax.models.policy import Policy, apply_policy
from test_vit import (abstract_outputs, assert_drop_path_modes, assert_matches_manifest, drop_path_rates,
                      jit_pure, manifest_state_dict, nhwc, params_of, random_model, randomize,
                      top1_agrees_and_close)

MINI_HEADS = {"num_heads": [2, 2, 4, 6]}  # cswin_mini: not a published width, heads must be given


@pytest.fixture(scope="module")
def golden(golden_dir: Path) -> dict:
    path = golden_dir / "cswin" / "cswin_mini.pth"
    ref = dict(np.load(golden_dir / "cswin" / "cswin_mini.npz"))
    sd, used_key = read_state_dict(path, default_keys=get_family("cswin").default_keys)
    model, config = convert_state_dict("cswin", sd, MINI_HEADS)
    run, state = jit_pure(model, lambda m, x: {
        "named": intermediates.cswin(m, x), "call": m(x), "features": m.features(x),
        "raw_last": m.features(x, raw_last=True)[-1],
    })
    images = nhwc(ref["images"])
    other_sd, _ = read_state_dict(path, key="state_dict")
    other, _ = convert_state_dict("cswin", other_sd, MINI_HEADS)
    return {"path": path, "ref": ref, "sd": sd, "used_key": used_key, "model": model, "config": config,
            "out": run(state, images), "out_state_dict": run(nnx.state(other), images)}


def test_release_checkpoint_defaults_to_ema_weights(golden: dict, tmp_path: Path) -> None:
    assert golden["used_key"] == "state_dict_ema"
    out = convert_checkpoint("cswin", golden["path"], tmp_path / "cswin_mini", overrides=MINI_HEADS)
    assert read_spec(out)["provenance"]["key"] == "state_dict_ema"
    restored = load_pretrained(out)
    jax.tree.map(np.testing.assert_array_equal, params_of(restored), params_of(golden["model"]))


def test_golden_parity_every_array(golden: dict) -> None:
    ref, out = golden["ref"], golden["out"]["named"]
    names = [k for k in ref if k not in ("images", "logits_from_state_dict")]
    assert set(names) <= set(out), f"not produced: {set(names) - set(out)}"
    errors = {k: assert_close_to_reference(out[k], ref[k], k) for k in names}
    assert errors["logits"] < 5e-6, errors  # stricter than the criterion: catches a wrong LayerNorm eps


def test_non_ema_entry_gives_its_own_logits(golden: dict) -> None:
    ref = golden["ref"]
    logits = golden["out_state_dict"]["named"]["logits"]
    assert_close_to_reference(logits, ref["logits_from_state_dict"], "logits_from_state_dict")
    assert np.abs(np.asarray(logits) - ref["logits"]).max() > 0.05  # the two entries really differ


def test_features_and_call(golden: dict) -> None:
    ref, out = golden["ref"], golden["out"]
    maps = out["features"]
    assert [m.shape for m in maps] == [(2, 56, 56, 12), (2, 28, 28, 24), (2, 14, 14, 48), (2, 7, 7, 96)]
    for i in range(3):
        assert_close_to_reference(maps[i], ref[f"stage{i + 1}"].reshape(maps[i].shape), f"stage{i + 1}")
    assert_close_to_reference(maps[3], ref["final_norm"].reshape(2, 7, 7, 96), "final_norm")
    assert_close_to_reference(out["raw_last"], ref["stage4"].reshape(2, 7, 7, 96), "stage4")
    assert_close_to_reference(out["call"], ref["logits"], "logits")


def test_branch_layout(golden: dict) -> None:
    model = golden["model"]
    layout = [[(a.orientation, a.num_heads, a.split_size) for a in getattr(model, f"stage{s}")[0].attns]
              for s in range(1, 5)]
    assert layout == [
        [("vertical", 1, 1), ("horizontal", 1, 1)],
        [("vertical", 1, 2), ("horizontal", 1, 2)],
        [("vertical", 2, 7), ("horizontal", 2, 7)],
        [("full", 6, 7)],
    ]
    assert golden["config"] == {"img_size": 224, "in_chans": 3, "num_classes": 10, "embed_dim": 12,
                                "depth": [1, 1, 2, 1], "split_size": [1, 2, 7, 7], "num_heads": [2, 2, 4, 6],
                                "mlp_ratio": 4.0, "qkv_bias": True}
    with pytest.raises(ValueError, match=r"--override num_heads=\[2,4,8,16\]"):
        convert_state_dict("cswin", golden["sd"])  # width 12 has no published head count


def test_bfloat16_compute(golden: dict) -> None:
    model, _ = convert_state_dict("cswin", golden["sd"], {**MINI_HEADS, "dtype": jnp.bfloat16})
    run, state = jit_pure(model, lambda m, x: m(x))
    top1_agrees_and_close(run(state, nhwc(golden["ref"]["images"])), golden["ref"]["logits"])


# --- LePE per stripe against PyTorch ---------------------------------------------------------

def torch_lepe_branch(q, k, v, weight, bias, heads: int, stripe: tuple[int, int]):
    """One CSWin branch in PyTorch from the golden README: NCHW in, NHWC out."""
    torch = pytest.importorskip("torch")
    b, c, h, w = q.shape
    hs, ws = stripe
    hd = c // heads

    def to_stripes(x):  # (B', C, hs, ws), stripes row-major over the grid
        return x.view(b, c, h // hs, hs, w // ws, ws).permute(0, 2, 4, 1, 3, 5).reshape(-1, c, hs, ws)

    def to_heads(x):  # (B', heads, T, hd), tokens row-major inside a stripe
        return x.reshape(-1, heads, hd, hs * ws).transpose(-1, -2)

    qs, ks, vs = (to_heads(to_stripes(t)) for t in (q, k, v))
    out = ((qs * hd ** -0.5) @ ks.transpose(-2, -1)).softmax(-1) @ vs
    lepe = torch.nn.functional.conv2d(to_stripes(v), weight, bias, padding=1, groups=c)  # each stripe alone
    out = (out + to_heads(lepe)).transpose(1, 2).reshape(-1, hs * ws, c)
    out = out.view(b, h // hs, w // ws, hs, ws, c).permute(0, 1, 3, 2, 4, 5)
    return out.reshape(b, h, w, c)


@pytest.mark.torch
@pytest.mark.parametrize("orientation, split, size", [("vertical", 1, (6, 6)), ("horizontal", 2, (8, 8)),
                                                      ("vertical", 3, (6, 9)), ("full", 7, (7, 7))])
def test_lepe_branch_matches_pytorch(orientation: str, split: int, size: tuple[int, int]) -> None:
    torch = pytest.importorskip("torch")
    c, heads = 8, 2
    gen = torch.Generator().manual_seed(split)
    q, k, v = (torch.randn(2, c, *size, generator=gen) for _ in range(3))
    weight, bias = torch.randn(c, 1, 3, 3, generator=gen) / 3, 0.1 * torch.randn(c, generator=gen)
    branch = nnx.eval_shape(lambda: cswin.LePEAttention(c, heads, orientation=orientation, split_size=split,
                                                        rngs=nnx.Rngs(0)))
    load_state_dict(branch, {"get_v.weight": weight.numpy(), "get_v.bias": bias.numpy()})
    stripe = branch.stripe(*size)
    expect = torch_lepe_branch(q, k, v, weight, bias, heads, stripe).numpy()
    run = nnx.jit(lambda m, q, k, v: m(q, k, v))
    args = [jnp.asarray(t.numpy().transpose(0, 2, 3, 1)) for t in (q, k, v)]
    assert_close_to_reference(run(branch, *args), expect, f"{orientation} {split} {size}")
    if orientation == "vertical" and split == 1:
        apply_policy(branch, Policy(attention_impl="explicit"))
        assert_close_to_reference(run(branch, *args), expect, "explicit path")


def test_stripes_must_tile_the_map() -> None:
    model = random_model("cswin", img_size=224, embed_dim=12, depth=(1, 1, 1, 1), split_size=(1, 2, 7, 7),
                         num_heads=(2, 2, 4, 6), num_classes=10)
    graphdef, state = nnx.split(model)
    with pytest.raises(ValueError, match="25x25 CSWin map does not split into 25x2 stripes"):
        jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state, jnp.zeros((1, 200, 200, 3)))


# --- full size, registry, converter hooks ----------------------------------------------------

def test_full_size_layout_matches_official_manifest(golden_dir: Path) -> None:
    manifest, sd = manifest_state_dict(golden_dir / "manifests" / "cswin_CSWin_64_12211_tiny_224.json")
    model = nnx.eval_shape(lambda: create("cswin_tiny_224"))
    assert assert_matches_manifest(model, manifest, sd) == 22_320_552
    assert abstract_outputs(model) == ([(2, 56, 56, 64), (2, 28, 28, 128), (2, 14, 14, 256), (2, 7, 7, 512)],
                                       (2, 1000))
    config, provenance = resolve_config("cswin", get_family("cswin").infer_config(sd), {})
    assert config == {
        "img_size": 224, "in_chans": 3, "num_classes": 1000, "embed_dim": 64, "depth": [1, 2, 21, 1],
        "split_size": [1, 2, 7, 7], "num_heads": [2, 4, 8, 16], "mlp_ratio": 4.0, "qkv_bias": True}
    assert provenance["num_heads"] == "published default (CSWin-T, embed_dim 64)"
    assert {k for k, v in provenance.items() if v.startswith("published default")} == {
        "img_size", "split_size", "num_heads"}
    assert detect_families(sd) == ["cswin"]


def test_drop_path_train_and_eval() -> None:
    model = nnx.eval_shape(lambda: create("cswin_mini", drop_path_rate=0.2))
    np.testing.assert_allclose(drop_path_rates(model), np.linspace(0.0, 0.2, 5))
    block = randomize(nnx.eval_shape(lambda: cswin.CSWinBlock(
        8, 2, resolution=8, split_size=2, last_stage=False, mlp_ratio=4.0, qkv_bias=True, drop_path=0.5,
        attention_impl=None, rngs=nnx.Rngs(0))))
    assert_drop_path_modes(block, (4, 8, 8, 8))
