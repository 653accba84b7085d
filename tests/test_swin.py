"""Swin-T port: golden parity with timm, window geometry, key remapping, full-size layout, bf16,
and a live comparison of a shifted-window block against a PyTorch transcription."""
from __future__ import annotations

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

import intermediates
from conftest import assert_close_to_reference
from l2s_jax.convert import convert_state_dict, detect_families, resolve_config
from l2s_jax.io.checkpoint_files import read_state_dict
from l2s_jax.io.torch_state import load_state_dict
from l2s_jax.models import attention, create, get_family, swin
from l2s_jax.models.policy import Policy, apply_policy
from test_vit import (abstract_outputs, assert_drop_path_modes, assert_matches_manifest, drop_path_rates,
                      jit_pure, manifest_state_dict, nhwc, params_of, randomize, top1_agrees_and_close)


@pytest.fixture(scope="module")
def golden(golden_dir: Path) -> dict:
    folder = golden_dir / "timm_swin"
    ref = dict(np.load(folder / "swin_mini.npz"))
    sd = load_file(folder / "swin_mini.safetensors")
    model, config = convert_state_dict("swin", sd)
    run, state = jit_pure(model, lambda m, x: {
        "named": intermediates.swin(m, x), "call": m(x), "features": m.features(x),
        "raw_last": m.features(x, raw_last=True)[-1],
    })
    return {"folder": folder, "ref": ref, "sd": sd, "model": model, "config": config,
            "out": run(state, nhwc(ref["images"]))}


def to_original_layout(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """timm names -> Microsoft's: PatchMerging at the end of the previous stage, ``head``, plus buffers."""
    out = {}
    for key, value in sd.items():
        m = re.match(r"^layers\.(\d+)\.downsample\.(.*)$", key)
        if m:
            key = f"layers.{int(m.group(1)) - 1}.downsample.{m.group(2)}"
        key = key.replace("head.fc.", "head.")
        out[key] = value
        if key.endswith("attn.relative_position_bias_table"):
            out[key.replace("relative_position_bias_table", "relative_position_index")] = np.zeros((49, 49), np.int64)
            out[key.replace("attn.relative_position_bias_table", "attn_mask")] = np.zeros((64, 49, 49), np.float32)
    return out


# --- golden mini model -----------------------------------------------------------------------

def test_golden_parity_every_array(golden: dict) -> None:
    ref, out = golden["ref"], golden["out"]["named"]
    names = [k for k in ref if k != "images"]
    assert set(names) <= set(out), f"not produced: {set(names) - set(out)}"
    errors = {k: assert_close_to_reference(out[k], ref[k], k) for k in names}
    assert errors["logits"] < 5e-6, errors  # stricter than the criterion: catches a wrong LayerNorm eps


def test_features_follow_forward_intermediates(golden: dict) -> None:
    ref, out = golden["ref"], golden["out"]
    normed = out["features"]
    assert [f.shape for f in normed] == [(2, 56, 56, 12), (2, 28, 28, 24), (2, 14, 14, 48), (2, 7, 7, 96)]
    for i in range(3):
        assert_close_to_reference(normed[i], ref[f"layers_{i}"], f"layers_{i}")
    assert_close_to_reference(normed[3], ref["final_norm"], "final_norm")
    assert_close_to_reference(out["raw_last"], ref["layers_3"], "layers_3")
    assert_close_to_reference(out["call"], ref["logits"], "logits")


def test_pth_and_original_layout_give_the_same_model(golden: dict) -> None:
    sd, _ = read_state_dict(golden["folder"] / "swin_mini.pth", default_keys=get_family("swin").default_keys)
    for variant in (sd, to_original_layout(sd)):
        model, config = convert_state_dict("swin", variant)
        assert config == golden["config"]
        jax.tree.map(np.testing.assert_array_equal, params_of(model), params_of(golden["model"]))


def test_inferred_config(golden: dict) -> None:
    assert golden["config"] == {"img_size": 224, "patch_size": 4, "in_chans": 3, "num_classes": 10, "embed_dim": 12,
                                "depths": [2, 2, 2, 1], "num_heads": [1, 2, 3, 6], "window_size": 7,
                                "mlp_ratio": 4.0, "qkv_bias": True}
    blocks = [b for stage in golden["model"].layers for b in stage.blocks]
    assert [b.shift for b in blocks] == [(0, 0), (3, 3)] * 3 + [(0, 0)]  # stage 4: 7x7 map, one window


def test_bfloat16_compute(golden: dict) -> None:
    model, _ = convert_state_dict("swin", golden["sd"], {"dtype": jnp.bfloat16})
    run, state = jit_pure(model, lambda m, x: m(x))
    logits = run(state, nhwc(golden["ref"]["images"]))
    top1_agrees_and_close(logits, golden["ref"]["logits"])


# --- window geometry -------------------------------------------------------------------------

def test_relative_position_index_formula() -> None:
    index = swin.relative_position_index((7, 7))
    for t1 in range(49):
        for t2 in range(49):
            (h1, w1), (h2, w2) = divmod(t1, 7), divmod(t2, 7)
            assert index[t1, t2] == (h1 - h2 + 6) * 13 + (w1 - w2 + 6)


def brute_force_mask(height: int, width: int, window: int, shift: int) -> np.ndarray:
    """-100 between two tokens of one window whose rolled-map regions differ, token by token."""
    def region(pos: int, size: int) -> int:
        return 0 if pos < size - window else (1 if pos < size - shift else 2)

    n_w = width // window
    mask = np.zeros(((height // window) * n_w, window * window, window * window), np.float32)
    for w_idx in range(mask.shape[0]):
        wy, wx = divmod(w_idx, n_w)
        labels = [(region(wy * window + t // window, height), region(wx * window + t % window, width))
                  for t in range(window * window)]
        for a in range(window * window):
            for b in range(window * window):
                mask[w_idx, a, b] = 0.0 if labels[a] == labels[b] else -100.0
    return mask


@pytest.mark.parametrize("size", [(14, 14), (14, 21), (21, 14)])
def test_shifted_window_mask(size: tuple[int, int]) -> None:
    h, w = size
    np.testing.assert_array_equal(swin.shifted_window_mask(h, w, (7, 7), (3, 3)), brute_force_mask(h, w, 7, 3))


def test_window_partition_roundtrip() -> None:
    x = jnp.arange(2 * 14 * 21 * 3, dtype=jnp.float32).reshape(2, 14, 21, 3)
    windows = attention.window_partition(x, (7, 7))
    assert windows.shape == (2, 6, 49, 3)
    np.testing.assert_array_equal(windows[0, 1, 8], x[0, 1, 8])  # window (0, 1), token (1, 1)
    np.testing.assert_array_equal(attention.window_reverse(windows, (7, 7), 14, 21), x)


def numpy_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """softmax(q k^T / sqrt(d) + bias) v in float64 on ``(B, T, heads, d)``."""
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1]) + bias
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    return np.einsum("bhqk,bkhd->bqhd", probs / probs.sum(-1, keepdims=True), v)


def test_windowed_attention_with_per_window_bias_equals_explicit_loop() -> None:
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((2, 4, 49, 3, 8)) for _ in range(3))  # (B, windows, T, heads, d)
    bias = rng.standard_normal((4, 3, 49, 49)) + swin.shifted_window_mask(14, 14, (7, 7), (3, 3))[:, None]
    per_window, shared = jax.jit(lambda q, k, v, b: (attention.windowed_attention(q, k, v, b),
                                                     attention.windowed_attention(q, k, v, b[:1])))(
        *(jnp.asarray(a, jnp.float32) for a in (q, k, v, bias)))
    for w in range(4):
        np.testing.assert_allclose(per_window[:, w], numpy_attention(q[:, w], k[:, w], v[:, w], bias[w]), atol=2e-6)
        np.testing.assert_allclose(shared[:, w], numpy_attention(q[:, w], k[:, w], v[:, w], bias[0]), atol=2e-6)


# --- live comparison with PyTorch --------------------------------------------------------------

def torch_swin_block(dim: int, heads: int, window: int, shift: int, seed: int):
    """A Swin block in PyTorch, written from the golden README's description of timm."""
    torch = pytest.importorskip("torch")
    nn = torch.nn

    class Attn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.relative_position_bias_table = nn.Parameter(0.5 * torch.randn((2 * window - 1) ** 2, heads))
            self.qkv = nn.Linear(dim, 3 * dim)
            self.proj = nn.Linear(dim, dim)

    class Mlp(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = nn.Linear(dim, 4 * dim)
            self.fc2 = nn.Linear(4 * dim, dim)

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm1, self.attn, self.norm2, self.mlp = nn.LayerNorm(dim), Attn(), nn.LayerNorm(dim), Mlp()

        def forward(self, x):  # (B, H, W, C)
            b, h, w, c = x.shape
            y = self.norm1(x)
            if shift:
                y = torch.roll(y, (-shift, -shift), (1, 2))
            ph, pw = (-h) % window, (-w) % window
            y = nn.functional.pad(y, (0, 0, 0, pw, 0, ph))
            hp, wp = h + ph, w + pw
            nh, nw, n = hp // window, wp // window, window * window
            y = y.view(b, nh, window, nw, window, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, n, c)
            q, k, v = self.attn.qkv(y).reshape(-1, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
            logits = (q * (c // heads) ** -0.5) @ k.transpose(-2, -1)
            rows = torch.tensor([[(a // window - t // window + window - 1) * (2 * window - 1)
                                  + (a % window - t % window + window - 1) for t in range(n)] for a in range(n)])
            logits = logits + self.attn.relative_position_bias_table[rows].permute(2, 0, 1)
            if shift:
                def region(pos, size):
                    return 0 if pos < size - window else (1 if pos < size - shift else 2)
                labels = torch.tensor([[[region(i * window + t // window, hp), region(j * window + t % window, wp)]
                                        for t in range(n)] for i in range(nh) for j in range(nw)])
                differ = (labels[:, :, None, :] != labels[:, None, :, :]).any(-1)
                mask = torch.where(differ, -100.0, 0.0)
                logits = (logits.view(b, nh * nw, heads, n, n) + mask[None, :, None]).view(-1, heads, n, n)
            out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(-1, n, c)
            out = self.attn.proj(out).view(b, nh, nw, window, window, c).permute(0, 1, 3, 2, 4, 5)
            out = out.reshape(b, hp, wp, c)[:, :h, :w]
            if shift:
                out = torch.roll(out, (shift, shift), (1, 2))
            x = x + out
            return x + self.mlp.fc2(nn.functional.gelu(self.mlp.fc1(self.norm2(x))))

    torch.manual_seed(seed)
    block = Block().eval()
    with torch.no_grad():
        for name, p in block.named_parameters():
            if name.endswith("bias") and "norm" not in name:
                p.copy_(0.1 * torch.randn_like(p))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(torch.rand_like(p) + 0.5)
    return block


@pytest.mark.torch
@pytest.mark.parametrize("resolution", [(14, 14), (10, 10), (14, 21)])
def test_shifted_block_matches_pytorch(resolution: tuple[int, int]) -> None:
    """Shifted windows on whole, padded (10 -> 14) and non-square maps; the golden model covers
    the unshifted blocks and the single-window last stage."""
    torch = pytest.importorskip("torch")
    dim, heads = 16, 2
    block = nnx.eval_shape(lambda: swin.SwinTransformerBlock(
        dim, heads, resolution=resolution, window_size=7, shifted=True, mlp_ratio=4.0, qkv_bias=True,
        drop_path=0.0, attention_impl=None, rngs=nnx.Rngs(0)))  # shape-only; the torch weights fill it
    assert block.shift == (3, 3)
    ref = torch_swin_block(dim, heads, 7, 3, seed=sum(resolution))
    load_state_dict(block, {k: v.numpy() for k, v in ref.state_dict().items()})
    x = np.random.default_rng(0).standard_normal((2, *resolution, dim)).astype(np.float32)
    with torch.no_grad():
        expect = ref(torch.from_numpy(x)).numpy()
    run = nnx.jit(lambda b, x: b(x))
    assert_close_to_reference(run(block, jnp.asarray(x)), expect, f"block {resolution}")
    if resolution == (14, 14):
        apply_policy(block, Policy(attention_impl="explicit"))
        assert_close_to_reference(run(block, jnp.asarray(x)), expect, f"explicit block {resolution}")


# --- full size, registry, converter hooks ----------------------------------------------------

def test_full_size_layout_matches_timm_manifest(golden_dir: Path) -> None:
    manifest, sd = manifest_state_dict(golden_dir / "manifests" / "timm_swin_tiny_patch4_window7_224.json")
    model = nnx.eval_shape(lambda: create("swin_tiny_patch4_window7_224"))
    assert assert_matches_manifest(model, manifest, sd) == 28_288_354
    assert abstract_outputs(model) == ([(2, 56, 56, 96), (2, 28, 28, 192), (2, 14, 14, 384), (2, 7, 7, 768)],
                                       (2, 1000))
    fam = get_family("swin")
    config, provenance = resolve_config("swin", fam.infer_config(fam.remap_keys(sd)), {})
    assert provenance["img_size"].startswith("published default") and provenance["num_heads"] == "read from shapes"
    assert config == {
        "img_size": 224, "patch_size": 4, "in_chans": 3, "num_classes": 1000, "embed_dim": 96,
        "depths": [2, 2, 6, 2], "num_heads": [3, 6, 12, 24], "window_size": 7, "mlp_ratio": 4.0, "qkv_bias": True}
    original = to_original_layout(sd)
    assert "layers.0.downsample.reduction.weight" in original and "head.weight" in original
    assert sorted(fam.remap_keys(original)) == sorted(sd)
    assert detect_families(sd) == ["swin"] and detect_families(original) == ["swin"]


def test_drop_path_train_and_eval() -> None:
    model = nnx.eval_shape(lambda: create("swin_mini", drop_path_rate=0.2))
    np.testing.assert_allclose(drop_path_rates(model), np.linspace(0.0, 0.2, 7))  # timm's linear schedule
    block = randomize(nnx.eval_shape(lambda: swin.SwinTransformerBlock(
        8, 1, resolution=(10, 10), window_size=7, shifted=True, mlp_ratio=4.0, qkv_bias=True, drop_path=0.5,
        attention_impl=None, rngs=nnx.Rngs(0))))
    assert_drop_path_modes(block, (4, 10, 10, 8))
