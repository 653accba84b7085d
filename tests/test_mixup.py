"""Batch-mode Mixup/CutMix (jnp) against timm's golden outputs and its parameter distributions."""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from l2s_jax.data.mixup import MixParams, apply_mix, cutmix_box, mixup_cutmix, one_hot_smooth, sample_mix_params

Z = 4.0  # bound in standard errors for statistical checks
FLOAT_TOL = 1e-6  # float32 ops given the same parameters (timm rounds 1 - lam from float64)


@pytest.fixture(scope="module")
def golden(golden_dir: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """mixup_cutmix.json and .npz (images converted to NHWC)."""
    path = golden_dir / "augment"
    if not (path / "mixup_cutmix.npz").is_file():
        pytest.skip(f"no Mixup golden data in {path}")
    meta = json.loads((path / "mixup_cutmix.json").read_text())
    with np.load(path / "mixup_cutmix.npz") as data:
        arrays = {k: data[k] for k in data.files}
    for k in ("x_in", "mixup_x", "cutmix_x"):
        arrays[k] = arrays[k].transpose(0, 2, 3, 1)
    return meta, arrays


def _params(lam: float, box=(0, 0, 0, 0), cutmix: bool = False) -> MixParams:
    return MixParams(jnp.float32(lam), jnp.asarray(cutmix), jnp.asarray(box, jnp.int32))


def test_mixup_matches_timm(golden) -> None:
    meta, arrays = golden
    num_classes = meta["mixup_args"]["num_classes"]
    smoothing = meta["mixup_args"]["label_smoothing"]
    x, labels = jnp.asarray(arrays["x_in"]), jnp.asarray(arrays["labels"], jnp.int32)
    mixed, targets = apply_mix(x, labels, _params(meta["mixup"]["lam"]), num_classes=num_classes, label_smoothing=smoothing)
    assert float(jnp.max(jnp.abs(mixed - arrays["mixup_x"]))) <= FLOAT_TOL
    assert float(jnp.max(jnp.abs(targets - arrays["mixup_target"]))) <= FLOAT_TOL


def test_cutmix_matches_timm(golden) -> None:
    meta, arrays = golden
    cm = meta["cutmix"]
    box, lam = cutmix_box(cm["lam_raw"], cm["box"]["cy"], cm["box"]["cx"], 224, 224)
    assert box.tolist() == [cm["box"][k] for k in ("yl", "yh", "xl", "xh")]
    assert abs(float(lam) - cm["lam_corrected"]) <= 1e-7
    x, labels = jnp.asarray(arrays["x_in"]), jnp.asarray(arrays["labels"], jnp.int32)
    mixed, targets = apply_mix(x, labels, MixParams(lam, jnp.asarray(True), box), num_classes=1000, label_smoothing=0.1)
    np.testing.assert_array_equal(np.asarray(mixed), arrays["cutmix_x"])
    assert float(jnp.max(jnp.abs(targets - arrays["cutmix_target"]))) <= FLOAT_TOL


def test_seeded_calls_boxes_lambdas_and_targets(golden) -> None:
    meta, arrays = golden
    labels = jnp.asarray(arrays["labels"], jnp.int32)
    x = jnp.asarray(arrays["x_in"])
    for k, call in enumerate(meta["seeded_calls"]):
        if call["use_cutmix"]:
            box, lam = cutmix_box(call["lam_raw"], call["cy"], call["cx"], 224, 224)
            assert box.tolist() == [call["box"][n] for n in ("yl", "yh", "xl", "xh")], call
            assert abs(float(lam) - call["lam"]) <= 1e-7, call
            params = MixParams(lam, jnp.asarray(True), box)
        else:
            params = _params(call["lam"])
        _, targets = apply_mix(x, labels, params, num_classes=1000, label_smoothing=0.1)
        assert float(jnp.max(jnp.abs(targets - arrays["seeded_targets"][k]))) <= FLOAT_TOL, call


def test_one_hot_smooth() -> None:
    y = one_hot_smooth(jnp.array([0, 2]), 4, 0.1)
    np.testing.assert_array_equal(np.asarray(y), np.float32([[0.925, 0.025, 0.025, 0.025], [0.025, 0.025, 0.925, 0.025]]))
    assert y.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(one_hot_smooth(jnp.array([1]), 3, 0.0)), [[0, 1, 0]])
    with pytest.raises(ValueError):
        one_hot_smooth(jnp.array([1]), 3, 1.0)


N_DRAWS = 20000


@jax.jit
def _sample_batch(keys, mixup_alpha, cutmix_alpha, switch_prob, prob) -> MixParams:
    """Vectorised draws; hyperparameters traced so one compilation serves every setting."""
    return jax.vmap(
        lambda k: sample_mix_params(
            k, 224, 224, mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, switch_prob=switch_prob, prob=prob
        )
    )(keys)


def _sample_many(seed: int, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, prob=1.0) -> MixParams:
    keys = jax.random.split(jax.random.key(seed), N_DRAWS)
    return _sample_batch(keys, *(jnp.float32(v) for v in (mixup_alpha, cutmix_alpha, switch_prob, prob)))


def test_parameter_distributions_match_timm(golden) -> None:
    """Switch ~ Bernoulli(0.5); Mixup lam ~ Beta(0.8, 0.8); CutMix raw lam ~ Beta(1, 1), corrected by area."""
    meta, arrays = golden
    n = N_DRAWS
    p = _sample_many(777)
    use_cutmix = np.asarray(p.use_cutmix)
    lam = np.asarray(p.lam, np.float64)
    box = np.asarray(p.box)
    k_cut = int(use_cutmix.sum())
    bound = Z * math.sqrt(0.25 / n)
    assert abs(k_cut / n - 0.5) <= bound
    assert abs(k_cut / n - float(arrays["dist_use_cutmix"].mean())) <= bound * math.sqrt(2)
    mix = lam[~use_cutmix]
    ks = stats.kstest(mix, stats.beta(0.8, 0.8).cdf)
    assert ks.pvalue > 1e-4, f"Mixup lambda not Beta(0.8, 0.8): {ks}"
    ref_mix = arrays["dist_lam_raw"][~arrays["dist_use_cutmix"]]
    assert stats.ks_2samp(mix, ref_mix).pvalue > 1e-4
    # CutMix: lambda is exactly 1 - box_area / image_area, and the box lies inside the image.
    yl, yh, xl, xh = box[use_cutmix].T
    assert (0 <= yl).all() and (yl <= yh).all() and (yh <= 224).all() and (0 <= xl).all() and (xl <= xh).all() and (xh <= 224).all()
    area = ((yh - yl) * (xh - xl)).astype(np.float32)
    assert np.abs(lam[use_cutmix] - (1 - area / (224 * 224))).max() <= 1.2e-7  # float32 rounding
    assert (box[~use_cutmix] == 0).all()
    ref_cut = arrays["dist_use_cutmix"]
    assert stats.ks_2samp(lam[use_cutmix], arrays["dist_lam"][ref_cut]).pvalue > 1e-4
    clipped = (yl == 0) | (yh == 224) | (xl == 0) | (xh == 224)
    ref_box = arrays["dist_box"][ref_cut]
    ref_clipped = (ref_box[:, 0] == 0) | (ref_box[:, 1] == 224) | (ref_box[:, 2] == 0) | (ref_box[:, 3] == 224)
    se = math.sqrt(ref_clipped.mean() * (1 - ref_clipped.mean()) * (1 / k_cut + 1 / ref_clipped.size))
    assert abs(clipped.mean() - ref_clipped.mean()) <= Z * se


def test_cutmix_box_side_and_correction() -> None:
    """Unclipped boxes have side int(224 * sqrt(1 - lam_raw)); lam = 1 - area / 224^2 exactly."""
    rng = np.random.default_rng(0)
    for lam_raw in rng.uniform(0, 1, 50):
        cut = int(224 * math.sqrt(1 - lam_raw))
        box, lam = cutmix_box(lam_raw, 112, 112, 224, 224)
        yl, yh, xl, xh = box.tolist()
        if cut < 224:
            assert yh - yl == cut and xh - xl == cut, (lam_raw, box)
        assert abs(float(lam) - (1 - (yh - yl) * (xh - xl) / 224**2)) <= 1e-7
    box, lam = cutmix_box(0.36, 0, 223, 224, 224)  # cut 179, clipped at the top and the right
    assert box.tolist() == [0, 90, 134, 224] and abs(float(lam) - (1 - 90 * 90 / 224**2)) <= 1e-7


def test_mixup_cutmix_end_to_end_properties() -> None:
    """Under jit: the sampled lambda/mode drive the mix, targets sum to 1, pairing is by flip."""
    x = jax.random.normal(jax.random.key(0), (6, 16, 12, 3))
    labels = jnp.array([1, 4, 7, 0, 4, 2])  # pair (1, 4) shares label 4
    y = one_hot_smooth(labels, 10, 0.1)
    fn = jax.jit(mixup_cutmix, static_argnames=("num_classes",))
    keys = jax.random.split(jax.random.key(3), N_DRAWS)
    # vmap draws the same lambda and mode per key as an unbatched call (the box depends on H, W).
    drawn = _sample_batch(keys, *(jnp.float32(v) for v in (0.8, 1.0, 0.5, 1.0)))
    seen_cutmix = set()
    for i in range(16):
        mixed, targets = fn(x, labels, keys[i], num_classes=10, prob=jnp.float32(1.0))
        use_cutmix = bool(drawn.use_cutmix[i])
        seen_cutmix.add(use_cutmix)
        if use_cutmix:
            changed = np.asarray((mixed != x).any(-1).any(0))
            rows, cols = changed.any(1).nonzero()[0], changed.any(0).nonzero()[0]
            box = np.zeros_like(changed)
            if rows.size:
                box[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1] = True
            np.testing.assert_array_equal(changed, box)  # the replaced region is one rectangle
            np.testing.assert_array_equal(np.asarray(mixed)[:, box], np.asarray(x[::-1])[:, box])
            lam = 1 - box.sum() / (16 * 12)
        else:
            lam = float(drawn.lam[i])
            np.testing.assert_allclose(np.asarray(mixed), np.asarray(x * lam + x[::-1] * (1 - lam)), atol=1e-6)
        np.testing.assert_allclose(np.asarray(targets), np.asarray(lam * y + (1 - lam) * y[::-1]), atol=1e-6)
        np.testing.assert_allclose(np.asarray(targets.sum(-1)), 1.0, atol=1e-6)
        np.testing.assert_allclose(np.asarray(targets[1]), np.asarray(y[1]), atol=1e-6)
    assert seen_cutmix == {True, False}
    first = fn(x, labels, keys[0], num_classes=10, prob=jnp.float32(1.0))
    again = fn(x, labels, keys[0], num_classes=10, prob=jnp.float32(1.0))
    for a, b in zip(first, again):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    off_x, off_t = fn(x, labels, keys[0], num_classes=10, prob=jnp.float32(0.0))
    np.testing.assert_array_equal(np.asarray(off_x), np.asarray(x))
    np.testing.assert_array_equal(np.asarray(off_t), np.asarray(y))


def test_prob_and_single_modes() -> None:
    x = jax.random.normal(jax.random.key(1), (4, 8, 8, 3))
    labels = jnp.array([0, 1, 2, 3])
    only_mix = _sample_many(1, cutmix_alpha=0.0)
    assert not np.asarray(only_mix.use_cutmix).any()
    assert stats.kstest(np.asarray(only_mix.lam), stats.beta(0.8, 0.8).cdf).pvalue > 1e-4
    only_cut = _sample_many(2, mixup_alpha=0.0)
    assert np.asarray(only_cut.use_cutmix).all()
    half = np.asarray(_sample_many(3, prob=0.5).lam) == 1.0
    assert abs(half.mean() - 0.5) <= Z * math.sqrt(0.25 / N_DRAWS)
    always_cut = np.asarray(_sample_many(4, switch_prob=1.0).use_cutmix)
    assert always_cut.all()
    with pytest.raises(ValueError):
        sample_mix_params(jax.random.key(0), 8, 8, mixup_alpha=0.0, cutmix_alpha=0.0)
    with pytest.raises(ValueError):
        sample_mix_params(jax.random.key(0), 8, 8, prob=1.5)
    with pytest.raises(ValueError, match="even"):
        mixup_cutmix(x[:3], labels[:3], jax.random.key(0), num_classes=5)
    with pytest.raises(TypeError):
        mixup_cutmix(x.astype(jnp.int32), labels, jax.random.key(0), num_classes=5)
