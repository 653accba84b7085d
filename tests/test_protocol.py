"""The one model protocol (l2s_jax.models.base.Backbone) and run policy, for every family."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from l2s_jax import layers
from l2s_jax.models import create, load_pretrained, save_pretrained
from l2s_jax.models.base import Backbone
from l2s_jax.models.policy import Policy, apply_policy

TINY = dict(depths=(1, 1, 1, 1), dims=(8, 8, 8, 8), num_classes=5)
# (name, overrides, image size): one small configuration per family / registered variant.
SMALL = [
    ("slak", dict(TINY, kernel_size=(9, 7, 5, 3, 3), sparse=True), 32),
    ("convnext_tiny_bn", TINY, 32),
    ("convnext", TINY, 32),
    ("resnet_mini", {}, 32),
    ("mobilenetv3_mini", {}, 32),
    ("vit_mini", dict(img_size=32), 32),
    ("swin_mini", {}, 224),
    ("cswin_mini", {}, 224),
]
FULL = ["slak_tiny", "convnext_tiny_bn", "convnext_tiny", "resnet50", "mobilenetv3_large_100",
        "vit_small_patch16_224", "swin_tiny_patch4_window7_224", "cswin_tiny_224"]
NORMED_LAST = {"vit_mini", "swin_mini", "cswin_mini"}  # families with a map-level final norm


def _images(size: int, batch: int = 2) -> jax.Array:
    return jnp.asarray(np.random.default_rng(0).standard_normal((batch, size, size, 3)), jnp.float32)


@pytest.mark.parametrize("name,overrides,size", SMALL, ids=[s[0] for s in SMALL])
def test_every_protocol_method_agrees(name, overrides, size):
    model = create(name, **overrides)
    model.eval()
    assert isinstance(model, Backbone)
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, x):  # one compiled program for every method
        m = nnx.merge(graphdef, state)
        ff = m.forward_features(x)
        return dict(feats=m.features(x), raw=m.features(x, raw_last=True), ff_map=m.to_map(ff), logits=m(x),
                    head=m.forward_head(ff), pooled=m.forward_head(ff, pre_logits=True),
                    with1=m.forward_with_features(x, 1), with_all=m.forward_with_features(x, len(m.stage_channels)))

    out = run(state, _images(size, batch=1))
    feats, raw, logits = out["feats"], out["raw"], out["logits"]
    assert all(f.ndim == 4 and f.shape[0] == 1 for f in feats)
    assert tuple(f.shape[-1] for f in feats) == model.stage_channels == tuple(f.shape[-1] for f in raw)
    np.testing.assert_allclose(logits, out["head"], atol=1e-6)  # __call__ = forward_head(forward_features)
    np.testing.assert_allclose(feats[-1], out["ff_map"], atol=1e-6)  # last map = what the head pools
    for a, b in zip(feats[:-1], raw[:-1]):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert (not np.allclose(feats[-1], raw[-1])) == (name in NORMED_LAST)
    for both, maps in (out["with1"], out["with_all"]):
        np.testing.assert_allclose(both, logits, atol=1e-5)
        for a, b in zip(maps, feats[-len(maps):]):
            np.testing.assert_allclose(a, b, atol=1e-5)
    assert (len(out["with1"][1]), len(out["with_all"][1])) == (1, len(feats))
    assert out["pooled"].ndim == 2 and out["pooled"].dtype == jnp.float32 and logits.dtype == jnp.float32
    with pytest.raises(ValueError, match="last 99 stages"):
        model.forward_with_features(_images(size, batch=1), 99)


@pytest.mark.parametrize("name", FULL)
def test_full_size_stage_channels_match_features(name):
    """stage_channels (no forward pass) equals the traced maps' channels at full size."""
    model = nnx.eval_shape(lambda: create(name))
    graphdef, state = nnx.split(model)
    images = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
    n = len(model.stage_channels)
    logits, maps = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s).forward_with_features(x, n), state, images)
    assert logits.shape == (2, 1000)
    assert tuple(m.shape[-1] for m in maps) == model.stage_channels
    assert maps[-1].shape[1] == maps[-1].shape[2] in (7, 14)


@pytest.mark.parametrize("name,overrides,size", SMALL, ids=[s[0] for s in SMALL])
def test_bfloat16_policy_gives_bfloat16_activations_and_float32_params(name, overrides, size):
    model = create(name, policy=Policy(compute_dtype="bfloat16"), **overrides)
    assert model.policy.compute_dtype == "bfloat16"
    assert {p.dtype for p in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype(jnp.float32)}
    graphdef, state = nnx.split(model)
    images = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
    logits, maps = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s).forward_with_features(x, 1), state, images)
    assert maps[0].dtype == jnp.bfloat16 and logits.dtype == jnp.float32


def test_param_dtype_casts_floating_state_only():
    model = create("resnet_mini", policy=Policy(param_dtype="bfloat16"))
    dtypes = {x.dtype for x in jax.tree.leaves(nnx.state(model, (nnx.Param, nnx.BatchStat)))}
    assert dtypes == {jnp.dtype(jnp.bfloat16)}


def _dw_impls(model) -> set[str]:
    return {m.impl for _, m in nnx.iter_modules(model) if isinstance(m, layers.DepthwiseConv2d)}


def test_depthwise_impl_is_per_model():
    """A second model's policy never changes the first's (no process-wide default)."""
    a = create("convnext_tiny_bn", policy=Policy(depthwise_impl="direct"), **TINY)
    b = create("convnext_tiny_bn", policy=Policy(depthwise_impl="toeplitz"), **TINY)
    c = create("convnext_tiny_bn", **TINY)
    assert (_dw_impls(a), _dw_impls(b), _dw_impls(c)) == ({"direct"}, {"toeplitz"}, {"auto"})
    for m in (a, b):
        m.eval()
    x = _images(32)
    np.testing.assert_allclose(a(x), b(x), atol=1e-5)
    a.fuse()  # the fused kernel keeps the branches' policy
    assert _dw_impls(a) == {"direct"}


def test_bn_stat_groups_are_honoured():
    model = create("resnet_mini", policy=Policy(bn_stat_groups=2))
    groups = {m.stat_groups for _, m in nnx.iter_modules(model) if isinstance(m, layers.BatchNorm)}
    assert groups == {2}
    with pytest.raises(ValueError, match="stat_groups=2"):
        model(_images(32, batch=3))
    model(_images(32, batch=4))


def test_policy_validation():
    for bad in (dict(compute_dtype="fp8"), dict(depthwise_impl="winograd"), dict(attention_impl="flash"),
                dict(bn_stat_groups=0)):
        with pytest.raises(ValueError, match="Policy."):
            Policy(**bad)
    with pytest.raises(ValueError, match="policy=Policy"):
        create("resnet_mini", dtype="bfloat16")


def test_bfloat16_teacher_from_load_pretrained(tmp_path):
    config = dict(TINY, drop_path_rate=0.0)
    saved = create("convnext", **config)
    save_pretrained(saved, "convnext", config, tmp_path / "ckpt")
    teacher = load_pretrained(tmp_path / "ckpt", policy=Policy(compute_dtype="bfloat16", param_dtype="bfloat16"))
    assert teacher.policy == Policy(compute_dtype="bfloat16", param_dtype="bfloat16")
    assert {p.dtype for p in jax.tree.leaves(nnx.state(teacher, nnx.Param))} == {jnp.dtype(jnp.bfloat16)}
    x = _images(32)
    logits, maps = teacher.forward_with_features(x, 2)
    assert maps[-1].dtype == jnp.bfloat16 and logits.dtype == jnp.float32
    saved.eval()
    np.testing.assert_allclose(logits, saved(x), atol=0.05, rtol=0.05)
    apply_policy(teacher, Policy())  # back to float32: the same model, re-run
    assert teacher.forward_with_features(x, 1)[1][0].dtype == jnp.float32
