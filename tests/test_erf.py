"""ERF probing: golden parity, the area analysis, analytic receptive fields, the tool and the notebook."""
from __future__ import annotations

import csv
import json
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO_ROOT, assert_close_to_reference
from flax import nnx
from PIL import Image

from l2s_jax import compile_cache, erf, layers
from l2s_jax.convert import convert_state_dict
from l2s_jax.io.checkpoint_files import read_state_dict
from l2s_jax.models import create, get_family, save_pretrained
from l2s_jax.models.policy import Policy, apply_policy
from l2s_jax.models.slak import LargeKernel

CASES = ["dev_erf_slak", "dev_erf_convnext_bn"]


def nhwc(x: np.ndarray) -> np.ndarray:
    return np.transpose(x, (0, 2, 3, 1))


@pytest.fixture(scope="module")
def golden_cases(golden_dir):
    """Each ERF case: its metadata, arrays and the model converted from the checkpoint it names.

    The depthwise convolutions run with the "direct" implementation, the cheapest to compile;
    every implementation is tested equal in value and gradient in the depthwise op's tests.
    """
    out = {}
    for case in CASES:
        meta = json.loads((golden_dir / "erf" / f"{case}.json").read_text())
        sd, _ = read_state_dict(golden_dir / "erf" / meta["checkpoint"], default_keys=get_family("slak").default_keys)
        model, config = convert_state_dict("slak", sd)
        apply_policy(model, Policy(depthwise_impl="direct"))
        out[case] = (meta, np.load(golden_dir / "erf" / f"{case}.npz"), model, config)
    return out


@pytest.mark.parametrize("case", CASES)
def test_golden_contribution_map(golden_cases, case):
    meta, ref, model, _ = golden_cases[case]
    images = nhwc(ref["images"])
    probe = erf.ContributionProbe(model, batch_size=len(images))
    out = probe(images)
    assert_close_to_reference(out.map_sum, ref["grad_map"], f"{case} grad_map")
    assert_close_to_reference(out.central_points.sum(), ref["central_point"], f"{case} central_point")
    assert out.used.all() and out.map_sum.shape == tuple(meta["grad_map_shape"])
    total = erf.contribution_map(model, images, batch_size=2, reduction="sum")
    assert_close_to_reference(total, ref["grad_map"], f"{case} contribution_map sum")
    mean = erf.contribution_map(model, images, batch_size=2)
    np.testing.assert_allclose(mean, total / 2, rtol=1e-6)
    # The stored maps' own area analysis follows from ours.
    areas = erf.high_contribution_area(total, authors_compat=True)
    expected = meta["rectangles_on_log_normalized_grad_map"]
    assert [(a.side_length, a.area_ratio) for a in areas] == [(r["side_length"], r["area_ratio"]) for r in expected]


def test_batch_images_are_independent_in_eval_mode(golden_cases):
    """A batch's map is the sum of its images' maps (BN uses running statistics), whatever the mode."""
    _, ref, model, _ = golden_cases["dev_erf_convnext_bn"]
    images = nhwc(ref["images"])
    probe = erf.ContributionProbe(model, batch_size=2)
    # One image per call: the second slot is a masked zero image in the same compiled program.
    singles = probe(images[:1]).map_sum + probe(images[1:]).map_sum
    np.testing.assert_allclose(probe(images).map_sum, singles, rtol=1e-5, atol=1e-6)
    bn = model.stages[0][0].large_kernel.lkb_origin.bn
    running_mean = np.asarray(bn.mean[...])
    compiled = probe.step_fn._cache_size()
    model.train()
    try:
        from_train_mode = erf.ContributionProbe(model, batch_size=2)(images).map_sum
        assert probe.step_fn._cache_size() == compiled  # the eval view reuses the compiled program
        assert bn.use_running_average is False  # the caller's model keeps its mode
    finally:
        model.eval()
    np.testing.assert_array_equal(from_train_mode, probe(images).map_sum)
    np.testing.assert_array_equal(np.asarray(bn.mean[...]), running_mean)  # statistics untouched


def _load_analysis_matrix(golden_dir, source: str) -> np.ndarray:
    file, _, key = source.partition(":")
    data = np.load(golden_dir / "erf" / file)
    return data[key] if key else data


def test_authors_area_ratios_match_stored_values_exactly(golden_dir):
    analysis = json.loads((golden_dir / "erf" / "erf_analysis.json").read_text())
    results = {}
    for row in analysis["results"]:
        if row["source_file"] not in results:
            matrix = _load_analysis_matrix(golden_dir, row["source_file"])
            assert matrix.dtype == np.dtype(row["matrix_dtype"]) and list(matrix.shape) == row["matrix_shape"]
            areas = erf.high_contribution_area(matrix, authors_compat=True)
            results[row["source_file"]] = {a.threshold: a for a in areas}
        got = results[row["source_file"]][row["threshold"]]
        assert got.side_length == row["side_length"], row
        assert got.area_ratio == row["area_ratio"], row  # exact, including the None rows
        if row["side_length"] is None:
            assert not got.found and "side 95" in got.reason
    assert any(r["side_length"] is None for r in analysis["results"])
    # On 1024x1024 maps the general mode gives the same numbers (1024 is the actual size there).
    smooth = np.load(golden_dir / "erf" / "synthetic_erf_smooth.npy")
    general = erf.high_contribution_area(smooth)
    assert [(a.side_length, a.area_ratio) for a in general] == [
        (a.side_length, a.area_ratio) for a in results["synthetic_erf_smooth.npy"].values()]


def _uniform_fraction(side: int, h: int, w: int) -> float:
    return side * side / (h * w)


def test_general_mode_on_small_maps():
    # Uniform map: the normalised map is uniform too, a square holds side^2 / (h * w).
    h = w = 21
    areas = erf.high_contribution_area(np.full((h, w), 3.0, np.float32))
    for a in areas[:3]:
        side = next(s for s in range(3, h, 2) if _uniform_fraction(s, h, w) > a.threshold)
        assert a.side_length == side and a.area_ratio == pytest.approx(side * side / (h * w))
        assert a.fraction == pytest.approx(_uniform_fraction(side, h, w), rel=1e-6)
    # 0.99 needs the whole map, but the scan (like the authors') stops at side 2 * (21 // 2 - 1) + 1 = 19.
    assert areas[3].side_length is None and areas[3].area_ratio is None
    assert "up to side 19" in areas[3].reason and areas[3].fraction == pytest.approx(361 / 441, rel=1e-6)
    compat = erf.high_contribution_area(np.full((h, w), 3.0, np.float32), authors_compat=True)
    assert [a.side_length for a in compat] == [a.side_length for a in areas]
    assert compat[0].area_ratio == (compat[0].side_length / 1024) ** 2 != areas[0].area_ratio
    # A point source: the first tested square (3x3) already holds everything.
    point = np.zeros((16, 16), np.float32)
    point[8, 8] = 5.0
    assert [(a.side_length, a.fraction) for a in erf.high_contribution_area(point)] == [(3, 1.0)] * 4
    # Non-square maps: squares stay inside (i < min(h, w) // 2), the ratio uses the real size.
    wide = np.ones((9, 31), np.float32)
    a = erf.high_contribution_area(wide, (0.05, 0.5))
    assert (a[0].side_length, a[0].area_ratio) == (5, 25 / (9 * 31))
    assert a[1].side_length is None and "up to side 7" in a[1].reason
    zero = erf.high_contribution_area(np.zeros((8, 8), np.float32))
    assert all(not a.found and "all zero" in a.reason for a in zero)
    tiny = erf.high_contribution_area(np.ones((3, 3), np.float32))
    assert not tiny[0].found and "too small" in tiny[0].reason
    with pytest.raises(ValueError, match="negative"):
        erf.high_contribution_area(-np.ones((8, 8), np.float32))
    with pytest.raises(ValueError, match="non-finite"):
        erf.high_contribution_area(np.full((8, 8), np.nan, np.float32))


def test_log_normalisation_changes_the_answer():
    """log10(m + 1) compresses a strong centre: the same map needs a larger square than raw."""
    yy, xx = np.mgrid[-32:33, -32:33]
    peaky = (1000.0 * np.exp(-(xx ** 2 + yy ** 2) / 50.0) + 0.5).astype(np.float32)
    logged = erf.high_contribution_area(peaky, (0.5,))[0]
    raw = erf.high_contribution_area(peaky, (0.5,), normalize=False)[0]
    assert logged.side_length > raw.side_length


# ----------------------------------------------------------------------------- analytic receptive fields


class ConvStack(nnx.Module):
    """``n`` full k x k convolutions ('same', stride 1) with positive weights; one feature map."""

    def __init__(self, n: int, k: int, channels: int = 4, *, rngs: nnx.Rngs):
        chans = [3] + [channels] * n
        self.convs = nnx.List([layers.Conv2d(chans[i], chans[i + 1], k, padding=k // 2, rngs=rngs) for i in range(n)])
        for conv in self.convs:
            conv.kernel[...] = jnp.abs(conv.kernel[...]) + 0.01

    def features(self, images: jax.Array) -> list[jax.Array]:
        x = images
        for conv in self.convs:
            x = conv(x)
        return [x]


def _support(m: np.ndarray) -> np.ndarray:
    return np.argwhere(m > 0)


@pytest.mark.parametrize("n,k", [(1, 5), (3, 3), (2, 7)])
def test_conv_stack_support_is_the_theoretical_receptive_field(n, k):
    size = 40
    images = jax.random.uniform(jax.random.key(n), (2, size, size, 3), minval=0.1, maxval=1.0)
    model = ConvStack(n, k, rngs=nnx.Rngs(0))
    m = erf.contribution_map(model, np.asarray(images), reduction="sum")
    side = (k - 1) * n + 1
    assert int((m > 0).sum()) == side * side
    pts = _support(m)
    assert pts.min(0).tolist() == [size // 2 - side // 2] * 2 and pts.max(0).tolist() == [size // 2 + side // 2] * 2
    if n == 1:
        # d out[c, centre] / d x[centre + (a - p, b - p), cin] = w[a, b, cin, c]: summed over cin and c.
        kernel = np.asarray(model.convs[0].kernel[...]).sum((2, 3))
        expected = np.zeros((size, size), np.float32)
        lo = size // 2 - k // 2
        expected[lo:lo + k, lo:lo + k] = 2 * kernel  # two images
        np.testing.assert_allclose(m, expected, rtol=1e-5)


class OneLayer(nnx.Module):
    """One layer applied at full resolution, exposed as the model's only feature map."""

    def __init__(self, layer: nnx.Module):
        self.layer = layer

    def features(self, images: jax.Array) -> list[jax.Array]:
        return [self.layer(images)]


def _positive(module: nnx.Module) -> None:
    for _, m in nnx.iter_modules(module):
        if isinstance(m, layers.DepthwiseConv2d):
            m.kernel[...] = jnp.abs(m.kernel[...]) + 0.01


def test_large_kernel_depthwise_support_equals_the_kernel():
    size = 48
    images = np.asarray(jax.random.uniform(jax.random.key(0), (1, size, size, 3), minval=0.1, maxval=1.0))
    conv = layers.DepthwiseConv2d(3, 31, impl="direct", rngs=nnx.Rngs(0))
    _positive(conv)
    m = erf.contribution_map(OneLayer(conv), images, reduction="sum")
    assert int((m > 0).sum()) == 31 * 31
    lo = size // 2 - 15
    np.testing.assert_allclose(m[lo:lo + 31, lo:lo + 31], np.asarray(conv.kernel[...]).sum(-1), rtol=1e-5)
    # SLaK's decomposed op: (K, N) + (N, K) + (N, N) branches -> a cross of 2 K N - N^2 pixels.
    k, n = 21, 5
    lk = LargeKernel(3, k, n, decompose=True, bn=True, sparse=False, dw_impl="direct", rngs=nnx.Rngs(1))
    _positive(lk)
    cross = erf.contribution_map(OneLayer(lk), images, reduction="sum")
    assert int((cross > 0).sum()) == 2 * k * n - n * n
    c = size // 2
    assert (cross[c - k // 2:c + k // 2 + 1, c - n // 2:c + n // 2 + 1] > 0).all()
    assert (cross[c - n // 2:c + n // 2 + 1, c - k // 2:c + k // 2 + 1] > 0).all()


def test_feature_maps_from_tokens_and_errors():
    tokens = jnp.arange(2 * 17 * 3, dtype=jnp.float32).reshape(2, 17, 3)
    fmap = erf.as_feature_map(tokens)
    assert fmap.shape == (2, 4, 4, 3) and float(fmap[0, 0, 0, 0]) == 3.0  # class token dropped
    assert erf.as_feature_map(tokens[:, 1:]).shape == (2, 4, 4, 3)
    with pytest.raises(ValueError, match="square"):
        erf.as_feature_map(tokens[:, :7])
    with pytest.raises(TypeError, match="features"):
        erf.ContributionProbe(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
    probe = erf.ContributionProbe(ConvStack(1, 3, rngs=nnx.Rngs(0)), batch_size=1)
    with pytest.raises(ValueError, match="1 to 1"):
        probe(np.zeros((2, 8, 8, 3), np.float32))


class Squared(nnx.Module):
    """A 3x3 convolution, squared: its input gradient depends on the input (NaN in, NaN out)."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.conv = layers.Conv2d(3, 4, 3, padding=1, rngs=rngs)

    def features(self, images: jax.Array) -> list[jax.Array]:
        return [jnp.square(self.conv(images))]


def test_non_finite_images_are_skipped():
    model = Squared(rngs=nnx.Rngs(0))
    images = np.stack([np.full((12, 12, 3), v, np.float32) for v in (1.0, 2.0, 3.0)])
    images[2, 6, 6, 0] = np.nan  # in the receptive field: the image's map is NaN and is dropped
    probe = erf.ContributionProbe(model, batch_size=3)
    result = erf.accumulate(probe, [images])
    assert (result.num_used, result.num_skipped) == (2, 1)
    np.testing.assert_allclose(result.reduce("mean"), erf.contribution_map(model, images[:2]), rtol=1e-6)
    assert result.reduce("mean").max() > 0
    with pytest.raises(ValueError, match="no usable image"):
        erf.accumulate(probe, [images[2:]]).reduce()


def test_off_centre_probe_warns_once_per_shape():
    assert erf.centre_note(7, 7, (224, 224)) is None
    assert "half a position (16 px)" in erf.centre_note(32, 32, (1024, 1024))
    assert "border" in erf.centre_note(5, 5, (160, 160)) and "position (2, 2)" in erf.centre_note(5, 5, (160, 160))
    probe = erf.ContributionProbe(ConvStack(1, 3, rngs=nnx.Rngs(0)), batch_size=1)
    with pytest.warns(erf.OffCentreWarning, match="is 8x8 for 8x8 images; its 'centre' is position \\(4, 4\\)"):
        probe(np.ones((1, 8, 8, 3), np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        probe(np.ones((1, 8, 8, 3), np.float32))  # once per shape
        probe(np.ones((1, 9, 9, 3), np.float32))  # odd, 4 positions from every border: centred


def test_zoo_models_through_features():
    """A transformer (tokens reshaped to a map by its features()) and a plain ConvNeXt."""
    images = erf.load_erf_images("random", 1, size=32)
    direct = Policy(depthwise_impl="direct")
    for model in (create("vit_mini", img_size=32), create("convnext", depths=(1, 1, 1, 1), dims=(8, 8, 8, 8),
                                                           policy=direct)):
        m = erf.contribution_map(model, images)
        assert m.shape == (32, 32) and m.dtype == np.float32 and np.all(np.isfinite(m)) and m.max() > 0


# ----------------------------------------------------------------------------- images


def test_resize_and_image_sources(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    x = erf.resize_for_erf(img, 64)
    assert x.shape == (64, 64, 3) and x.dtype == np.float32
    expected = np.asarray(Image.fromarray(img).resize((64, 64), Image.Resampling.BICUBIC), np.float32) / 255
    np.testing.assert_allclose(x, (expected - np.array(erf.IMAGENET_MEAN)) / np.array(erf.IMAGENET_STD), atol=1e-5)
    # Folder: ImageFolder order (sorted classes, then files), any image size.
    for cls, name, value in (("b", "x.png", 30), ("a", "z.png", 20), ("a", "y.jpg", 10)):
        (tmp_path / "val" / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((10 + value, 12, 3), value, np.uint8)).save(tmp_path / "val" / cls / name, quality=100)
    images = erf.load_erf_images(tmp_path / "val", 3, size=16)
    assert images.shape == (3, 16, 16, 3) and images.dtype == np.uint8
    assert [int(np.median(i)) for i in images] == [10, 20, 30]
    random_pick = erf.load_erf_images(tmp_path / "val", 2, size=16, sample="random", seed=1)
    assert random_pick.shape == (2, 16, 16, 3)
    with pytest.raises(ValueError, match="only 3 images"):
        erf.load_erf_images(tmp_path / "val", 4, size=16)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        erf.load_erf_images(tmp_path / "absent", 1)
    demo = erf.load_erf_images("demo", 2, size=24, data_dir=tmp_path / "tfds",
                               data_options={"demo_num_train": 4, "demo_num_test": 4})
    assert demo.shape == (2, 24, 24, 3) and demo.std() > 0
    noise = erf.load_erf_images("random", 2, size=8, seed=3)
    np.testing.assert_array_equal(noise, erf.load_erf_images("random", 2, size=8, seed=3))


# ----------------------------------------------------------------------------- outputs, tool, notebook


def test_write_outputs_and_plot(tmp_path):
    yy, xx = np.mgrid[-16:16, -16:16]
    maps = {"wide/erf": np.exp(-(xx ** 2 + yy ** 2) / 200.0).astype(np.float32),
            "narrow": np.exp(-(xx ** 2 + yy ** 2) / 10.0).astype(np.float32)}
    paths = erf.write_outputs(maps, tmp_path, metadata={"note": "test"})
    np.testing.assert_array_equal(np.load(tmp_path / "wide_erf.npy"), maps["wide/erf"])
    data = json.loads(paths["json"].read_text())
    assert data["metadata"] == {"note": "test"} and len(data["rows"]) == 8
    by = {(r["model"], r["threshold"]): r for r in data["rows"]}
    assert by[("wide/erf", 0.5)]["area_ratio"] > by[("narrow", 0.5)]["area_ratio"]
    with open(paths["csv"]) as f:
        assert len(list(csv.DictReader(f))) == 8
    png = Image.open(paths["png"])
    assert png.size[0] > png.size[1] > 100  # panels side by side
    text = erf.format_table(data["rows"])
    assert "wide/erf" in text and "narrow" in text


def _run_tool(*args: str) -> int:
    import importlib.util

    spec = importlib.util.spec_from_file_location("erf_tool", REPO_ROOT / "tools" / "erf.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool.main(list(args))


def test_tool_writes_maps_table_and_figure(golden_cases, tmp_path, capsys):
    _, _, model, config = golden_cases["dev_erf_convnext_bn"]
    ckpt = save_pretrained(model, "slak", config, tmp_path / "ckpt")
    out_dir = tmp_path / "out"
    rc = _run_tool("--checkpoint", f"student={ckpt}", "--model", "vit_mini", "--override", "img_size=32",
                   "--data", "random", "--num-images", "2", "--size", "32", "--batch-size", "2",
                   "--depthwise-impl", "direct", "--out", str(out_dir))
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "student: 2 images" in out.out and "vit_mini: 2 images" in out.out and "area ratio" in out.out
    assert "img" in out.err  # the progress bar
    warned = [line for line in out.err.splitlines() if line.startswith("warning: ERF")]
    assert len(warned) == 2 and "is 1x1 for 32x32 images" in warned[0] and "is 2x2" in warned[1], out.err
    for name in ("student.npy", "vit_mini.npy", "erf_areas.json", "erf_areas.csv", "erf.png"):
        assert (out_dir / name).is_file(), name
    meta = json.loads((out_dir / "erf_areas.json").read_text())["metadata"]
    assert meta["num_images"] == 2 and meta["per_model"]["vit_mini"]["images_used"] == 2
    # The checkpoint's map is the mean over the same images, as the library computes it.
    images = erf.load_erf_images("random", 2, size=32)
    np.testing.assert_allclose(np.load(out_dir / "student.npy"), erf.contribution_map(model, images), rtol=1e-5)


def test_tool_errors_are_clear(tmp_path, capsys):
    assert _run_tool("--checkpoint", str(tmp_path / "nope"), "--data", "random", "--out", str(tmp_path)) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert _run_tool("--checkpoint", f"x={tmp_path / 'empty'}", "--data", "random", "--out", str(tmp_path)) == 2
    assert "spec.json" in capsys.readouterr().err
    assert _run_tool("--model", "resnet_mini", "--data", str(tmp_path / "no_images"), "--out", str(tmp_path)) == 2
    assert "no_images does not exist" in capsys.readouterr().err
    assert _run_tool("--model", "resnet_min", "--data", "random", "--out", str(tmp_path)) == 2
    assert "unknown model" in capsys.readouterr().err
    assert _run_tool("--data", "random", "--out", str(tmp_path)) == 2
    assert "--checkpoint" in capsys.readouterr().err


def test_notebook_runs_headless(tmp_path, monkeypatch):
    import nbformat

    # The kernel uses the suite's cache through compile_cache.enable() (as every command does); a
    # plain JAX_COMPILATION_CACHE_DIR would make it write entries without the -atime that the
    # size-capped cache of this process needs, and break this process's later cache writes.
    monkeypatch.setenv(compile_cache.ENV, str(compile_cache.resolve_dir() or "off"))
    params = {"data": "random", "num_images": 2, "size": 128, "batch_size": 2, "out_dir": str(tmp_path),
              "demo_dims": [8, 16, 16, 16], "demo_slak_kernels": [13, 11, 9, 7, 3], "depthwise_impl": "direct"}
    executed = erf.run_notebook(REPO_ROOT / "notebooks" / "erf_probing.ipynb", params, tmp_path, timeout=600)
    nb = nbformat.read(executed, as_version=4)
    tags = [c.metadata.get("tags", []) for c in nb.cells]
    assert tags.index(["injected-parameters"]) == tags.index(["parameters"]) + 1
    assert (tmp_path / "erf.png").is_file() and (tmp_path / "erf_areas.json").is_file()
    rows = json.loads((tmp_path / "erf_areas.json").read_text())["rows"]
    assert {r["model"] for r in rows} == {"SLaK-style 13x13 (random init)", "ConvNeXt+BN 7x7 (random init)"}
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert any("image/png" in o.get("data", {}) for o in outputs)
    assert not any(o.get("output_type") == "error" for o in outputs)
    assert math.isfinite(sum(r["area_ratio"] or 0.0 for r in rows))
    if compile_cache.resolve_dir() is not None:  # the kernel wrote complete entries only
        assert compile_cache.repair(compile_cache.resolve_dir()) == 0


@pytest.mark.parametrize("name", ["slak_tiny", "convnext_tiny_bn", "convnext_tiny"])
def test_fast_probe_equals_plain_probe(name):
    """The fused view + CPU compiler options give the plain path's map to float32 round-off."""
    model = create(name, depths=(1, 1, 1, 1), dims=(16, 24, 32, 40), num_classes=10, seed=3)
    if name == "slak_tiny":
        for _, m in nnx.iter_modules(model):  # non-trivial BatchNorm statistics, so folding matters
            if isinstance(m, layers.BatchNorm):
                m.mean[...] = jax.random.normal(jax.random.key(1), m.mean.shape) * 0.1
                m.var[...] = jax.random.uniform(jax.random.key(2), m.var.shape, minval=0.5, maxval=1.5)
    images = np.asarray(jax.random.normal(jax.random.key(0), (2, 128, 128, 3)))
    plain = erf.contribution_map(model, images, reduction="sum", fast=False)
    fast = erf.contribution_map(model, images, reduction="sum", fast=True)
    assert np.max(plain) > 0
    np.testing.assert_allclose(fast, plain, rtol=0, atol=1e-5 * float(np.max(plain)))
    assert all(m.lkb_reparam is None for _, m in nnx.iter_modules(model) if isinstance(m, LargeKernel))


def test_benchmark_erf_prints_all_three_columns():
    """tools/benchmark_erf.py as a user runs it, at a tiny size: JAX, JAX before and PyTorch per image."""
    from run_helpers import run_tool

    pytest.importorskip("torch")
    out = run_tool("benchmark_erf.py", "--models", "convnext_tiny", "--size", "32", "--images", "1", timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    row = next(ln for ln in out.stdout.splitlines() if ln.startswith("convnext_tiny"))
    cells = row.replace("|", " ").split()
    assert cells[:2] == ["convnext_tiny", "32"] and len(cells) == 9, row
    assert all(float(c) > 0 for c in cells[2:]), row
