"""Train/eval transforms, RandAugment and RandomErasing against timm's golden outputs.

Deterministic ops are compared with timm's stored outputs at the stored parameters (uint8 exactly
unless stated); samplers are replayed bit-exactly on timm's own random streams through a small
adapter (Python ``random`` / numpy ``RandomState`` behind the Generator methods we call), and
checked statistically with our own Generator, tolerances derived from the sample sizes.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import PIL
import pytest
from PIL import Image

from l2s_jax.data import randaugment as ra
from l2s_jax.data.transforms import (
    EvalTransform,
    TrainTransform,
    center_crop,
    random_erasing,
    random_erasing_boxes,
    random_resized_crop_params,
    resize,
    resize_shorter,
    resized_crop,
    to_normalized_float,
)

Z = 4.0  # two-sided bound in standard errors for statistical checks (false alarm ~6e-5 each)


class TimmStreams:
    """Duck-typed Generator replaying timm's streams: Python ``random`` and numpy's legacy RNG.

    Scalar draws come from ``random.Random(seed)`` (uniform, random, gauss, randint/randrange);
    vector integer draws (``size=`` given) from ``np.random.RandomState(numpy_seed)``, which is how
    ``np.random.choice(ops, n, replace=True)`` picks RandAugment ops.
    """

    def __init__(self, seed: int, numpy_seed: int | None = None) -> None:
        self.py = random.Random(seed)
        self.np = np.random.RandomState(seed if numpy_seed is None else numpy_seed)

    def random(self) -> float:
        return self.py.random()

    def uniform(self, low: float, high: float) -> float:
        return self.py.uniform(low, high)

    def normal(self, loc: float, scale: float) -> float:
        return self.py.gauss(loc, scale)

    def integers(self, low: int, high: int, size=None, endpoint: bool = False):
        top = high + 1 if endpoint else high
        if size is not None:
            return self.np.randint(low, top, size=size)
        return self.py.randrange(low, top)

    def standard_normal(self, size, dtype=np.float64):
        return self.np.standard_normal(size).astype(dtype)


def _ks_two_sample(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Two-sample KS statistic and its critical value at alpha = 1e-4."""
    a, b = np.sort(a), np.sort(b)
    grid = np.concatenate([a, b])
    d = np.max(np.abs(np.searchsorted(a, grid, "right") / a.size - np.searchsorted(b, grid, "right") / b.size))
    crit = math.sqrt(-0.5 * math.log(1e-4 / 2)) * math.sqrt((a.size + b.size) / (a.size * b.size))
    return float(d), crit


def _assert_close_mean(ours: np.ndarray, ref_mean: float, ref_se: float, name: str) -> None:
    """|mean(ours) - ref_mean| <= Z * combined standard error."""
    se = math.sqrt(np.var(ours) / ours.size + ref_se**2)
    diff = abs(float(np.mean(ours)) - ref_mean)
    assert diff <= Z * se, f"{name}: mean {np.mean(ours):.5f} vs {ref_mean:.5f} (|diff| {diff:.4g} > {Z * se:.4g})"


def _assert_fraction(k: int, n: int, p: float, name: str) -> None:
    """Binomial check: |k/n - p| <= Z * sqrt(p (1 - p) / n)."""
    bound = Z * math.sqrt(p * (1 - p) / n)
    assert abs(k / n - p) <= bound, f"{name}: {k / n:.4f} vs {p:.4f} (bound {bound:.4f})"


@pytest.fixture(scope="module")
def aug(golden_dir: Path) -> Path:
    """The golden augmentation folder."""
    path = golden_dir / "augment"
    if not path.is_dir():
        pytest.skip(f"no augmentation golden data at {path}")
    return path


@pytest.fixture(scope="module")
def images(aug: Path) -> dict[str, np.ndarray]:
    """The source photographs (uint8 HWC)."""
    with np.load(aug / "images.npz") as data:
        return {k: data[k] for k in data.files}


def _load(aug: Path, name: str) -> tuple[dict, dict[str, np.ndarray]]:
    with np.load(aug / f"{name}.npz") as data:
        arrays = {k: data[k] for k in data.files}
    return json.loads((aug / f"{name}.json").read_text()), arrays


# ----------------------------------------------------------------------------- eval transform


def test_eval_transform_bit_exact(aug: Path, images: dict) -> None:
    meta, arrays = _load(aug, "eval_transform")
    tf = EvalTransform()
    assert tf.resize_size == 256
    for case in meta["cases"]:
        name = case["image"]
        img = Image.fromarray(images[name])
        resized = resize_shorter(img, 256)
        assert np.asarray(resized).shape[:2] == tuple(case["resized_hw"]), name
        if case["resized_stored"]:
            np.testing.assert_array_equal(np.asarray(resized), arrays[f"resized__{name}"], err_msg=name)
        crop = np.asarray(tf.crop(images[name]))
        np.testing.assert_array_equal(crop, arrays[f"crop__{name}"], err_msg=name)
        top, left = case["crop_top"], case["crop_left"]
        np.testing.assert_array_equal(crop, np.asarray(resized)[top : top + 224, left : left + 224])
        out = tf(images[name])
        assert out.dtype == np.float32 and out.shape == (224, 224, 3)
        np.testing.assert_array_equal(out, arrays[f"normalized__{name}"].transpose(1, 2, 0), err_msg=name)


def test_center_crop_rounding_and_padding() -> None:
    img = Image.fromarray(np.arange(5 * 8 * 3, dtype=np.uint8).reshape(5, 8, 3))
    # (8 - 3) / 2 = 2.5 rounds half-to-even to 2; (5 - 2) / 2 = 1.5 rounds to 2.
    np.testing.assert_array_equal(np.asarray(center_crop(img, (2, 3))), np.asarray(img)[2:4, 2:5])
    padded = np.asarray(center_crop(img, (7, 8)))
    assert padded.shape == (7, 8, 3)
    np.testing.assert_array_equal(padded[1:6], np.asarray(img))
    assert not padded[0].any() and not padded[6].any()


# ----------------------------------------------------------------------------- resize / RRC


def test_resized_crop_matches_timm(aug: Path, images: dict) -> None:
    meta, arrays = _load(aug, "rrc")
    for case in meta["cases"]:
        out = resized_crop(Image.fromarray(images[case["image"]]), case["i"], case["j"], case["h"], case["w"], 224)
        np.testing.assert_array_equal(np.asarray(out), arrays["outputs"][case["index"]], err_msg=str(case))


def test_pillow12_pass_order_differs_only_where_the_rule_says(aug: Path, images: dict) -> None:
    """Horizontal-first (Pillow <= 12.3) equals timm's data wherever Pillow 13 also goes horizontal first."""
    meta, arrays = _load(aug, "rrc")
    for case in meta["cases"]:
        h, w = case["h"], case["w"]
        vertical_first = 224 < h and (h - 224) > 2 * (w - 224)
        img = Image.fromarray(images[case["image"]])
        old = np.asarray(resized_crop(img, case["i"], case["j"], h, w, 224, pass_order="horizontal_first"))
        ref = arrays["outputs"][case["index"]]
        if not vertical_first or w == 224:
            np.testing.assert_array_equal(old, ref, err_msg=str(case))


@pytest.mark.skipif(PIL.__version__.split(".")[0] != "13", reason="pins the Pillow 13 pass-order rule")
def test_explicit_pass_order_equals_pillow13_resize() -> None:
    rng = np.random.default_rng(5)
    src = Image.fromarray(rng.integers(0, 256, (320, 320, 3), dtype=np.uint8))
    for _ in range(120):
        iw, ih, ow, oh = (int(v) for v in rng.integers(4, 320, 4))
        img = src.crop((0, 0, iw, ih))
        for interp, flt in (("bicubic", Image.Resampling.BICUBIC), ("bilinear", Image.Resampling.BILINEAR)):
            ours = np.asarray(resize(img, ow, oh, interp))
            np.testing.assert_array_equal(ours, np.asarray(img.resize((ow, oh), flt)), err_msg=f"{iw}x{ih}->{ow}x{oh}")


def test_rrc_sampler_replays_timm_stream(aug: Path, images: dict) -> None:
    meta, arrays = _load(aug, "rrc")
    spec = meta["getparams"][0]
    stream = TimmStreams(spec["python_random_seed"])
    draws = np.array([random_resized_crop_params(spec["width"], spec["height"], stream) for _ in range(spec["n"])])
    np.testing.assert_array_equal(draws, arrays[spec["key"]])
    for case in meta["cases"]:
        img = images[case["image"]]
        if case["kind"] == "seeded":
            params = random_resized_crop_params(img.shape[1], img.shape[0], TimmStreams(case["python_random_seed"]))
        elif case["kind"] == "fallback":
            params = random_resized_crop_params(img.shape[1], img.shape[0], np.random.default_rng(0), scale=(2.0, 2.0))
        else:
            continue
        assert params == (case["i"], case["j"], case["h"], case["w"]), case


def test_rrc_sampler_statistics(aug: Path) -> None:
    meta, arrays = _load(aug, "rrc")
    spec = meta["getparams"][0]
    width, height, n = spec["width"], spec["height"], 20000
    rng = np.random.default_rng(1234)
    ours = np.array([random_resized_crop_params(width, height, rng) for _ in range(n)])
    ref = arrays[spec["key"]]
    top, left, h, w = ours.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all()
    area = h * w / (width * height)
    log_aspect = np.log(w / h)
    # Rounding of the sides moves area/aspect slightly outside the continuous ranges.
    assert area.min() >= 0.08 - 0.01 and area.max() <= 1.0
    assert log_aspect.min() >= math.log(3 / 4) - 0.02 and log_aspect.max() <= math.log(4 / 3) + 0.02
    ref_area = ref[:, 2] * ref[:, 3] / (width * height)
    ref_log_aspect = np.log(ref[:, 3] / ref[:, 2])
    _assert_close_mean(area, ref_area.mean(), ref_area.std() / math.sqrt(ref.shape[0]), "area fraction")
    _assert_close_mean(log_aspect, ref_log_aspect.mean(), ref_log_aspect.std() / math.sqrt(ref.shape[0]), "log aspect")
    for name, a, b in (("area", area, ref_area), ("log aspect", log_aspect, ref_log_aspect)):
        d, crit = _ks_two_sample(a, b)
        assert d <= crit, f"{name} distribution: KS {d:.4f} > {crit:.4f}"


# ----------------------------------------------------------------------------- RandAugment ops


@pytest.fixture(scope="module")
def ra_golden(aug: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """randaugment_ops.json / .npz."""
    return _load(aug, "randaugment_ops")


def _expected(case: dict, arrays: dict) -> np.ndarray:
    """The stored output, or the all-black image for the Pillow-13 posterize(0) error cases."""
    if case.get("output_index") is None:
        assert "bits must be between" in case["error"], case
        return np.zeros_like(arrays["inputs"][case["input_index"]])
    return arrays["outputs"][case["output_index"]]


def test_randaugment_sweep_ops_bit_exact(ra_golden) -> None:
    meta, arrays = ra_golden
    fill = tuple(meta["recipe_hparams"]["img_mean"])
    worst = {}
    for case in (c for c in meta["cases"] if c["section"] == "sweep"):
        if case["magnitude_clipped"] is not None:
            args = ra.level_to_args(case["op"], case["magnitude_clipped"], case["sign"] == -1)
            assert list(args) == case["level_args"], case
        img = Image.fromarray(arrays["inputs"][case["input_index"]])
        out = np.asarray(ra.apply_op(img, case["op"], tuple(case["level_args"]), fill=fill, interpolation="bicubic"))
        diff = np.abs(out.astype(int) - _expected(case, arrays))
        worst[case["op"]] = max(worst.get(case["op"], 0), int(diff.max()))
    assert set(worst) == set(ra.RAND_INCREASING_TRANSFORMS)
    assert all(v == 0 for v in worst.values()), worst


def test_randaugment_seeded_ops_replay_timm(ra_golden) -> None:
    meta, arrays = ra_golden
    fill = tuple(meta["recipe_hparams"]["img_mean"])
    cases = [c for c in meta["cases"] if c["section"] == "seeded_op"]
    assert cases
    for case in cases:
        op = ra.AugmentOp(
            case["op"], prob=case["op_prob"], magnitude=case["op_magnitude"],
            magnitude_std=case["op_magnitude_std"], fill=fill, interpolation="bicubic",
        )
        draw = op.sample(TimmStreams(case["python_random_seed"]))
        if case["scenario"] == "skipped":
            assert draw is None
        else:
            assert draw.magnitude == case["magnitude_clipped"] and list(draw.args) == case["level_args"], case
        out = op.apply(Image.fromarray(arrays["inputs"][case["input_index"]]), draw)
        np.testing.assert_array_equal(np.asarray(out), _expected(case, arrays), err_msg=str(case))


def test_randaugment_chains_replay_timm(ra_golden) -> None:
    meta, arrays = ra_golden
    hparams = {"img_mean": tuple(meta["recipe_hparams"]["img_mean"]), "interpolation": "bicubic"}
    transform = ra.rand_augment_transform("rand-m9-mstd0.5-inc1", hparams)
    cases = [c for c in meta["cases"] if c["section"] == "chain"]
    assert cases
    for case in cases:
        stream = TimmStreams(case["python_random_seed"], case["numpy_seed"])
        plan = transform.sample(stream)
        assert [transform.ops[i].name for i, _ in plan] == [s["op"] for s in case["steps"]], case
        assert [d is not None for _, d in plan] == [s["applied"] for s in case["steps"]], case
        out = transform.apply(Image.fromarray(arrays["inputs"][case["input_index"]]), plan)
        np.testing.assert_array_equal(np.asarray(out), _expected(case, arrays), err_msg=str(case))


def test_posterize_zero_bits_is_black_and_never_raises() -> None:
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    for bits in (0, -3):
        assert not np.asarray(ra.posterize(img, bits)).any()
    op = ra.AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=9, magnitude_std=0.5)
    rng = np.random.default_rng(3)
    for _ in range(400):
        draw = op.sample(rng)
        out = np.asarray(op.apply(img, draw))
        if draw.magnitude == 10.0:
            assert draw.args == (0,) and not out.any()
    assert np.array_equal(np.asarray(ra.posterize(img, 8)), np.asarray(img))
    np.testing.assert_array_equal(np.asarray(ra.posterize(img, 2)), np.asarray(img) & 0xC0)


def test_rand_augment_config_parsing() -> None:
    t = ra.rand_augment_transform("rand-m9-mstd0.5-inc1")
    assert [op.name for op in t.ops] == list(ra.RAND_INCREASING_TRANSFORMS) and t.num_layers == 2
    op = t.ops[0]
    assert (op.prob, op.magnitude, op.magnitude_std, op.magnitude_max) == (0.5, 9, 0.5, None)
    assert op.fill == (128, 128, 128) and op.interpolation == ("bilinear", "bicubic")
    t = ra.rand_augment_transform("rand-m7-n3-p0.3-mmax12-mstd101-inc0-x", {"img_mean": (1, 2, 3)})
    assert [op.name for op in t.ops] == list(ra.RAND_TRANSFORMS) and t.num_layers == 3
    op = t.ops[0]
    assert (op.prob, op.magnitude, op.magnitude_std, op.magnitude_max, op.fill) == (0.3, 7, math.inf, 12, (1, 2, 3))
    # hparams already holding magnitude_std win over the string, as in timm (setdefault).
    assert ra.rand_augment_transform("rand-mstd0.5", {"magnitude_std": 1.0}).ops[0].magnitude_std == 1.0
    for bad in ("augmix-m9", "rand-q9", "rand-m9.5", "rand-tweights", "rand-p0.x"):
        with pytest.raises(ValueError):
            ra.rand_augment_transform(bad)
    with pytest.raises(ValueError, match="unknown RandAugment hparams"):
        ra.rand_augment_transform("rand-m9", {"fill": 3})
    with pytest.raises(ValueError):
        ra.AugmentOp("Rotate", interpolation="lanczos")


def test_level_functions_and_magnitude_clipping() -> None:
    assert ra.level_to_args("Rotate", 9.0, True) == (-27.0,)
    assert ra.level_to_args("PosterizeIncreasing", 9.0) == (1,)
    assert ra.level_to_args("SolarizeIncreasing", 10.0) == (0,)
    assert ra.level_to_args("SolarizeAdd", 10.0) == (110,)
    assert ra.level_to_args("ColorIncreasing", 10.0, True) == (0.1,)
    assert ra.level_to_args("Color", 5.0) == (1.0,)
    assert ra.level_to_args("TranslateXRel", 10.0, False, 0.3) == (0.3,)
    assert ra.level_to_args("Invert", 9.0, True) == ()
    op = ra.AugmentOp("Rotate", prob=1.0, magnitude=30, magnitude_std=0.0, magnitude_max=20)
    assert op.sample(np.random.default_rng(0)).magnitude == 20.0
    uniform = ra.AugmentOp("Rotate", prob=1.0, magnitude=8, magnitude_std=math.inf)
    mags = np.array([uniform.sample(np.random.default_rng(s)).magnitude for s in range(300)])
    assert mags.min() >= 0 and mags.max() <= 8 and abs(mags.mean() - 4) <= Z * 8 / math.sqrt(12 * 300)


def test_randaugment_draw_statistics(aug: Path) -> None:
    """Op choice (uniform, with replacement), p = 0.5, N(9, 0.5) clipped at 10, random sign."""
    meta, arrays = _load(aug, "full_pipeline_stats")
    transform = ra.rand_augment_transform("rand-m9-mstd0.5-inc1", {"interpolation": "bicubic"})
    rng = np.random.default_rng(2024)
    n_images = 6000
    plans = [transform.sample(rng) for _ in range(n_images)]
    chosen = np.array([[i for i, _ in p] for p in plans])
    applied = np.array([[d is not None for _, d in p] for p in plans])
    counts = np.bincount(chosen.ravel(), minlength=15)
    expected = chosen.size / 15
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 36.12, f"op choice not uniform: chi2 {chi2:.1f} (df 14, p=0.001 critical 36.12)"
    _assert_fraction(int((chosen[:, 0] == chosen[:, 1]).sum()), n_images, 1 / 15, "same op twice")
    _assert_fraction(int(applied.sum()), applied.size, 0.5, "applied fraction")
    draws = [d for p in plans for _, d in p if d is not None]
    mags = np.array([d.magnitude for d in draws])
    assert mags.max() == 10.0 and mags.min() > 0
    q = 0.5 * math.erfc(2 / math.sqrt(2))  # P(N(9, 0.5) >= 10)
    _assert_fraction(int((mags == 10.0).sum()), mags.size, q, "clipped at 10")
    phi = math.exp(-2) / math.sqrt(2 * math.pi)
    _assert_close_mean(mags, 9 - 0.5 * (phi - 2 * q), 0.0, "clipped magnitude mean")
    signed = [d for d in draws if ra.OPS[d.name].signed]
    _assert_fraction(sum(d.negate for d in signed), len(signed), 0.5, "negative sign")
    # Against timm's 2,000-image record of the same recipe.
    ref_applied = arrays["ra_applied"]
    ref_mags = arrays["ra_magnitude"][ref_applied & ~np.isnan(arrays["ra_magnitude"])]
    _assert_close_mean(applied.ravel().astype(float), ref_applied.mean(), ref_applied.std() / math.sqrt(ref_applied.size), "applied vs timm")
    _assert_close_mean(mags, ref_mags.mean(), ref_mags.std() / math.sqrt(ref_mags.size), "magnitude vs timm")
    se_std = math.sqrt(ref_mags.var() / (2 * ref_mags.size) + mags.var() / (2 * mags.size))
    assert abs(mags.std() - ref_mags.std()) <= Z * se_std, (mags.std(), ref_mags.std())


def test_randaugment_same_seed_same_output(images: dict) -> None:
    transform = ra.rand_augment_transform("rand-m9-mstd0.5-inc1", {"img_mean": (124, 116, 104)})
    img = Image.fromarray(images["coffee_500x375"][:224, :224])
    outs = [np.asarray(transform(img, np.random.default_rng(s))) for s in (7, 7, 8)]
    np.testing.assert_array_equal(outs[0], outs[1])
    with pytest.raises(ValueError, match="RGB"):
        transform(img.convert("L"), np.random.default_rng(0))


# ----------------------------------------------------------------------------- RandomErasing


def test_random_erasing_replays_timm(aug: Path) -> None:
    meta, arrays = _load(aug, "random_erasing")
    for case in meta["cases"]:
        k = case["index"]
        x = arrays[f"input_{k}"].transpose(1, 2, 0)
        ref = arrays[f"output_{k}"].transpose(1, 2, 0)
        out = random_erasing(x, TimmStreams(case["python_random_seed"]), probability=1.0)
        box = case["box"]
        inside = np.zeros(x.shape[:2], bool)
        inside[box["top"] : box["top"] + box["h"], box["left"] : box["left"] + box["w"]] = True
        np.testing.assert_array_equal(out[~inside], ref[~inside])
        np.testing.assert_array_equal(out[~inside], x[~inside])
        assert (out[inside] != x[inside]).mean() > 0.99 and (ref[inside] != x[inside]).mean() > 0.99
        noise = out[inside]
        n = noise.size
        assert abs(noise.mean()) <= Z / math.sqrt(n) and abs(noise.std() - 1) <= Z / math.sqrt(2 * n)
    spec = meta["box_samples"]
    stream = TimmStreams(spec["python_random_seed"])
    boxes = [random_erasing_boxes(224, 224, stream, probability=1.0) for _ in range(spec["n"])]
    ours = np.array([b[0] if b else (-1, -1, 0, 0) for b in boxes])
    np.testing.assert_array_equal(ours, arrays["box_samples"])


def test_random_erasing_statistics(aug: Path) -> None:
    meta, arrays = _load(aug, "random_erasing")
    rng = np.random.default_rng(99)
    n = 20000
    boxes = [random_erasing_boxes(224, 224, rng, probability=0.25) for _ in range(n)]
    erased = [b[0] for b in boxes if b]
    _assert_fraction(len(erased), n, 0.25, "erase probability")
    top, left, h, w = np.array(erased).T
    assert (h < 224).all() and (w < 224).all() and (top + h <= 224).all() and (left + w <= 224).all()
    area = h * w / 224**2
    ref = arrays["box_samples"]
    ref_area = ref[:, 2] * ref[:, 3] / 224**2
    _assert_close_mean(area, ref_area.mean(), ref_area.std() / math.sqrt(ref_area.size), "erase area")
    d, crit = _ks_two_sample(np.log(h / w), np.log(ref[:, 2] / ref[:, 3]))
    assert d <= crit, f"erase aspect distribution: KS {d:.4f} > {crit:.4f}"


def test_random_erasing_modes_and_purity() -> None:
    x = np.zeros((32, 40, 3), np.float32)
    const = random_erasing(x, np.random.default_rng(0), probability=1.0, mode="const")
    assert not const.any()
    rand = random_erasing(x, np.random.default_rng(0), probability=1.0, mode="rand")
    changed = np.argwhere(rand.any(axis=2))
    (t, l), (b, r) = changed.min(0), changed.max(0)
    region = rand[t : b + 1, l : r + 1]
    np.testing.assert_array_equal(region, np.broadcast_to(region[:1, :1], region.shape))
    multi = random_erasing_boxes(224, 224, np.random.default_rng(4), probability=1.0, count=3)
    assert 1 <= len(multi) <= 3
    a = random_erasing(x, np.random.default_rng(1), probability=1.0)
    np.testing.assert_array_equal(a, random_erasing(x, np.random.default_rng(1), probability=1.0))
    assert not x.any(), "input must not be modified"
    assert np.array_equal(random_erasing(x + 1, np.random.default_rng(0), probability=0.0), x + 1)
    with pytest.raises(ValueError):
        random_erasing(x, np.random.default_rng(0), mode="noise")


# ----------------------------------------------------------------------------- full train transform


def test_train_transform_composition_order(images: dict) -> None:
    """RRC -> flip -> RandAugment -> normalise -> erase, drawing from one generator in that order."""
    img = images["chelsea_451x300"]
    tf = TrainTransform()
    for seed in range(6):
        out = tf(img, np.random.default_rng(seed))
        rng = np.random.default_rng(seed)
        top, left, h, w = random_resized_crop_params(451, 300, rng)
        ref = resized_crop(Image.fromarray(img), top, left, h, w, 224)
        if rng.random() < 0.5:
            ref = ref.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        ref = tf.randaugment(ref, rng)
        ref = random_erasing(to_normalized_float(ref), rng, probability=0.25, mode="pixel")
        np.testing.assert_array_equal(out, ref)
    assert tf.randaugment.ops[0].fill == (124, 116, 104)
    assert tf.randaugment.ops[0].interpolation == "bicubic"


def test_train_transform_determinism_and_inputs(images: dict) -> None:
    img = images["rocket_640x427"]
    tf = TrainTransform()
    a = tf(img, np.random.default_rng(11))
    assert a.shape == (224, 224, 3) and a.dtype == np.float32
    np.testing.assert_array_equal(a, tf(Image.fromarray(img), np.random.default_rng(11)))
    assert not np.array_equal(a, tf(img, np.random.default_rng(12)))
    plain = TrainTransform(auto_augment=None, reprob=0.0, hflip=0.0, interpolation="random")
    assert plain.randaugment is None and plain(img[:, :, 0], np.random.default_rng(0)).shape == (224, 224, 3)
    with pytest.raises(TypeError):
        tf(img.astype(np.float32), np.random.default_rng(0))
    with pytest.raises(ValueError):
        TrainTransform(interpolation="cubic")


def test_train_transform_statistics_match_timm(aug: Path, images: dict) -> None:
    """Channel means, flip/erase fractions and crop areas of the full recipe vs timm's 2,000 draws."""
    meta, arrays = _load(aug, "full_pipeline_stats")
    img = images[meta["image"]]
    tf = TrainTransform()
    rng = np.random.default_rng(42)
    n = 500
    means = np.array([tf(img, rng).reshape(-1, 3).mean(0) for _ in range(n)])
    ref = arrays["per_draw_channel_mean"]
    for c in range(3):
        _assert_close_mean(means[:, c], meta["channel_mean"][c], ref[:, c].std() / math.sqrt(ref.shape[0]), f"channel {c}")
    rng = np.random.default_rng(43)
    flips = erased = 0
    areas = []
    for _ in range(4000):
        top, left, h, w = random_resized_crop_params(img.shape[1], img.shape[0], rng)
        areas.append(h * w / (img.shape[0] * img.shape[1]))
        flips += rng.random() < 0.5
        erased += bool(random_erasing_boxes(224, 224, rng, probability=0.25))
    _assert_fraction(flips, 4000, 0.5, "flip")
    _assert_fraction(erased, 4000, 0.25, "erase")
    ref_area = arrays["rrc_params"][:, 2] * arrays["rrc_params"][:, 3] / (img.shape[0] * img.shape[1])
    _assert_close_mean(np.array(areas), ref_area.mean(), ref_area.std() / math.sqrt(ref_area.size), "rrc area")
