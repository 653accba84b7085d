"""Robustness evaluation: the protocol by hand, and tools/evaluate.py end to end on generated trees."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from run_helpers import run_tool

from l2s_jax import evaluate as ev
from l2s_jax.data.sources import IMAGENET_A_CLASSES, IMAGENET_C_CORRUPTIONS, IMAGENET_C_EXTRA_CORRUPTIONS, \
    IMAGENET_R_CLASSES
from l2s_jax.data.transforms import EvalTransform
from l2s_jax.models import jit_apply

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(os.environ.get("L2S_GOLDEN_DIR", REPO.parent / "shared" / "golden"))
# Published per-corruption AlexNet errors of the reference code (Hendrycks & Dietterich).
PUBLISHED_ALEXNET = {
    "gaussian_noise": 0.886428, "shot_noise": 0.894468, "impulse_noise": 0.922640, "defocus_blur": 0.819880,
    "glass_blur": 0.826268, "motion_blur": 0.785948, "zoom_blur": 0.798360, "snow": 0.866816,
    "frost": 0.826572, "fog": 0.819324, "brightness": 0.564592, "contrast": 0.853204,
    "elastic_transform": 0.646056, "pixelate": 0.717840, "jpeg_compression": 0.606500,
}


def test_alexnet_constants_match_published_means():
    assert set(ev.ALEXNET_ERRORS) == set(IMAGENET_C_CORRUPTIONS)
    for c, errs in ev.ALEXNET_ERRORS.items():
        assert np.mean(errs) == pytest.approx(PUBLISHED_ALEXNET[c], abs=5e-7), c


def test_mce_and_relative_mce_by_hand():
    errors = {c: [10.0 + i + s for s in range(5)] for i, c in enumerate(IMAGENET_C_CORRUPTIONS)}
    errors["saturate"] = [1.0, 2.0, 3.0, 4.0, 5.0]
    out = ev.corruption_table(errors, clean_error=8.0)
    ces, rces = [], []
    for i, c in enumerate(IMAGENET_C_CORRUPTIONS):
        e = [10.0 + i + s for s in range(5)]
        a = [100 * x for x in ev.ALEXNET_ERRORS[c]]
        ces.append(100 * sum(e) / sum(a))
        rces.append(100 * sum(x - 8.0 for x in e) / sum(y - 43.478 for y in a))
        assert out["corruptions"][c]["ce"] == pytest.approx(ces[-1], rel=1e-12)
    assert out["mce"] == pytest.approx(np.mean(ces), rel=1e-12)
    assert out["relative_mce"] == pytest.approx(np.mean(rces), rel=1e-12)
    assert "ce" not in out["corruptions"]["saturate"] and out["corruptions"]["saturate"]["errors"] == errors["saturate"]
    # AlexNet's own errors give exactly 100.
    alex = ev.corruption_table({c: [100 * x for x in e] for c, e in ev.ALEXNET_ERRORS.items()}, 43.478)
    assert alex["mce"] == pytest.approx(100.0) and alex["relative_mce"] == pytest.approx(100.0)


def test_mce_only_with_all_75_cells():
    errors = {c: [20.0] * 5 for c in IMAGENET_C_CORRUPTIONS}
    errors["fog"][2] = None
    del errors["snow"]
    out = ev.corruption_table(errors, 10.0)
    assert "mce" not in out and "relative_mce" not in out
    assert out["missing"] == ["snow/1", "snow/2", "snow/3", "snow/4", "snow/5", "fog/3"]
    assert "ce" not in out["corruptions"]["fog"] and "ce" in out["corruptions"]["frost"]
    with pytest.raises(ValueError, match="unknown ImageNet-C corruption"):
        ev.corruption_table({"rain": [1.0] * 5})


def test_wnid_index_and_unknown_folder(tmp_path):
    wnids = ev.imagenet_wnids()
    assert wnids[0] == "n01440764" and wnids[6] == "n01498041" and wnids[988] == "n12267677"
    (tmp_path / wnids[5]).mkdir()
    (tmp_path / "cats").mkdir()
    with pytest.raises(ValueError, match="cats is not an ImageNet-1k WordNet id"):
        ev.check_wnid_folders(tmp_path)
    a_root = tmp_path / "a"
    _jpeg(a_root / wnids[6] / "x.JPEG", np.random.default_rng(0), (8, 8))
    assert ev.benchmark_splits("imagenet_a", str(a_root))[0].records.labels.tolist() == [6]
    _jpeg(a_root / wnids[0] / "y.JPEG", np.random.default_rng(0), (8, 8))  # tench: not an ImageNet-A class
    with pytest.raises(ValueError, match=f"{wnids[0]} is not one of the 200 imagenet_a classes"):
        ev.benchmark_splits("imagenet_a", str(a_root))


def test_label_subset_restricts_argmax():
    import jax.numpy as jnp
    from flax import nnx

    from l2s_jax import train

    class Fixed(nnx.Module):
        def __call__(self, x):
            logits = jnp.zeros((x.shape[0], 1000)).at[:, 0].set(9.0).at[:, IMAGENET_A_CLASSES[3]].set(5.0)
            return logits.at[:, IMAGENET_A_CLASSES[7]].set(4.0)

    graph, state = nnx.split(Fixed())
    batch = {"images": jnp.zeros((2, 1, 1, 3)), "labels": jnp.asarray([IMAGENET_A_CLASSES[3], 0]),
             "mask": jnp.asarray([True, False])}
    full = train.make_eval_step(graph)((state,), batch)
    sub = train.make_eval_step(graph, label_subset=IMAGENET_A_CLASSES)((state,), batch)
    assert float(full["correct1"]) == 0 and float(sub["correct1"]) == 1 and float(sub["count"]) == 1
    assert np.isfinite(float(sub["loss_sum"]))


# --- end to end ------------------------------------------------------------------------------

CLASSES = (6, 11, 13)  # in ImageNet-1k, -A and -R


def _jpeg(path: Path, rng: np.random.Generator, size: tuple[int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, quality=90)


def make_trees(root: Path, seed: int = 0,
               corruptions: tuple[str, ...] = IMAGENET_C_CORRUPTIONS + IMAGENET_C_EXTRA_CORRUPTIONS) -> dict[str, Path]:
    """Tiny released-layout trees: val/A/R/Sketch with 2 images per class, C with 1 per cell."""
    rng = np.random.default_rng(seed)
    wnids = ev.imagenet_wnids()
    out = {}
    for bench in ("val", "a", "r", "sketch"):
        for k in CLASSES:
            for j in range(2):
                _jpeg(root / bench / wnids[k] / f"{bench}_{k}_{j}.JPEG", rng, (int(rng.integers(60, 90)), 70))
        out[bench] = root / bench
    for c in corruptions:
        for s in range(1, 6):
            k = CLASSES[int(rng.integers(len(CLASSES)))]
            _jpeg(root / "c" / c / str(s) / wnids[k] / f"{c}_{s}.JPEG", rng, (224, 224))
    out["c"] = root / "c"
    return out


SCRATCH = ["--model", "convnext_tiny_bn", "--override", "dims=[8,8,16,16]", "--override", "depths=[1,1,1,1]"]


def _expected(model, trees: dict[str, Path]) -> dict[str, object]:
    """Every number of robustness.json from one direct forward over all images."""
    wnids = ev.imagenet_wnids()
    std, crop = EvalTransform(224, 0.875), ev.CropNormalize()
    groups = {k: sorted(trees[k].glob("*/*.JPEG")) for k in ("val", "a", "r", "sketch")}
    cells = [(c, s) for c in IMAGENET_C_CORRUPTIONS + IMAGENET_C_EXTRA_CORRUPTIONS for s in range(1, 6)]
    groups.update({f"{c}/{s}": sorted((trees["c"] / c / str(s)).glob("*/*.JPEG")) for c, s in cells})
    groups = {k: v for k, v in groups.items() if v}
    paths = [p for ps in groups.values() for p in ps]
    x = np.stack([(crop if p.is_relative_to(trees["c"]) else std)(Image.open(p).convert("RGB")) for p in paths])
    logits = dict(zip(paths, np.asarray(jit_apply(model)(x), np.float64)))

    def acc(key, subset=None, k=1):
        if key not in groups:
            return None
        ps = groups[key]
        lg = np.stack([logits[p] for p in ps])
        if subset is not None:
            lg = np.where(np.isin(np.arange(1000), subset), lg, -np.inf)
        top = np.argsort(-lg, axis=1, kind="stable")[:, :k]
        labels = np.asarray([wnids.index(p.parent.name) for p in ps])
        return 100.0 * float(np.sum(np.any(top == labels[:, None], axis=1))) / len(ps)

    exp = {"clean_top1": acc("val"), "clean_top5": acc("val", k=5), "imagenet_a_top1": acc("a", IMAGENET_A_CLASSES),
           "imagenet_r_top1": acc("r", IMAGENET_R_CLASSES), "imagenet_sketch_top1": acc("sketch")}
    errors = {c: [None if f"{c}/{s}" not in groups else 100.0 - acc(f"{c}/{s}") for s in range(1, 6)]
              for c in IMAGENET_C_CORRUPTIONS + IMAGENET_C_EXTRA_CORRUPTIONS}
    if any(None in e for e in errors.values()):
        exp["errors"] = {c: e for c, e in errors.items() if any(x is not None for x in e)}
        return exp
    clean_err = 100.0 - exp["clean_top1"]
    ces = {c: 100.0 * sum(errors[c]) / sum(100.0 * a for a in ev.ALEXNET_ERRORS[c]) for c in IMAGENET_C_CORRUPTIONS}
    rces = {c: 100.0 * sum(e - clean_err for e in errors[c]) / sum(100.0 * a - 43.478 for a in ev.ALEXNET_ERRORS[c])
            for c in IMAGENET_C_CORRUPTIONS}
    exp["errors"], exp["ce"] = errors, ces
    exp["mce"], exp["relative_mce"] = float(np.mean(list(ces.values()))), float(np.mean(list(rces.values())))
    return exp


def _run_cli(args: list[str]) -> subprocess.CompletedProcess:
    return run_tool("evaluate.py", *args, timeout=900)


def _check_report(entry: dict, exp: dict) -> None:
    for key in ("clean_top1", "clean_top5", "imagenet_a_top1", "imagenet_r_top1", "imagenet_sketch_top1"):
        assert entry[key] == pytest.approx(exp[key], abs=1e-9), key
    c = entry["imagenet_c"]
    for corr, errs in exp["errors"].items():
        assert c["corruptions"][corr]["errors"] == pytest.approx(errs, abs=1e-9), corr
        if corr in exp["ce"]:
            assert c["corruptions"][corr]["ce"] == pytest.approx(exp["ce"][corr], rel=1e-12), corr
        else:
            assert "ce" not in c["corruptions"][corr]
    assert c["mce"] == pytest.approx(exp["mce"], rel=1e-12)
    assert c["relative_mce"] == pytest.approx(exp["relative_mce"], rel=1e-12)


@pytest.mark.skipif(not (GOLDEN / "convnext_bn" / "dev_convnext_bn.pth").exists(), reason="no golden checkpoint")
def test_evaluate_cli_golden_checkpoint(tmp_path):
    """A converted golden 1000-class checkpoint on every benchmark, all 19 x 5 ImageNet-C cells."""
    from l2s_jax.models import load_pretrained

    ckpt = tmp_path / "ckpt"
    conv = run_tool("convert_weights.py", "--arch", "slak", "--src", str(GOLDEN / "convnext_bn" / "dev_convnext_bn.pth"),
                    "--out", str(ckpt))
    assert conv.returncode == 0, conv.stderr
    trees = make_trees(tmp_path / "data")
    out = tmp_path / "out"
    proc = _run_cli(["--checkpoint", f"golden={ckpt}", "--imagenet-val", str(trees["val"]),
                     "--imagenet-c", str(trees["c"]), "--imagenet-a", str(trees["a"]), "--imagenet-r",
                     str(trees["r"]), "--imagenet-sketch", str(trees["sketch"]), "--batch-size", "8",
                     "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "images/s" in proc.stdout
    report = json.loads((out / "robustness.json").read_text())
    assert set(report["models"]) == {"golden"}
    _check_report(report["models"]["golden"], _expected(load_pretrained(ckpt), trees))
    md = (out / "robustness.md").read_text()
    assert "| golden |" in md and "mCE" in md and (out / "robustness.png").stat().st_size > 10_000
    assert (out / "robustness.csv").read_text().startswith("model,clean,C (mCE),SK,R,A")
    # Nothing is overwritten; bad input is one line naming the problem.
    again = _run_cli([*SCRATCH, "--imagenet-val", str(trees["val"]), "--out", str(out)])
    assert again.returncode == 2 and "exists" in again.stderr and "Traceback" not in again.stderr


def test_evaluate_cli_scratch_model_partial_c_unknown_folder_and_max_images(tmp_path):
    """A --model from scratch on val/A/R/Sketch (exact numbers) and a partial ImageNet-C (no mCE)."""
    from l2s_jax.models import create

    trees = make_trees(tmp_path / "data", seed=1, corruptions=("fog", "saturate"))
    shutil.rmtree(trees["c"] / "fog" / "4")
    out = tmp_path / "out"
    proc = _run_cli([*SCRATCH, "--imagenet-c", str(trees["c"]), "--imagenet-val", str(trees["val"]),
                     "--imagenet-a", str(trees["a"]), "--imagenet-r", str(trees["r"]), "--imagenet-sketch",
                     str(trees["sketch"]), "--batch-size", "8", "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    entry = json.loads((out / "robustness.json").read_text())["models"]["convnext_tiny_bn"]
    scratch = create("convnext_tiny_bn", seed=0, dims=[8, 8, 16, 16], depths=[1, 1, 1, 1])
    scratch.eval()
    exp = _expected(scratch, trees)
    for key in ("clean_top1", "clean_top5", "imagenet_a_top1", "imagenet_r_top1", "imagenet_sketch_top1"):
        assert entry[key] == pytest.approx(exp[key], abs=1e-9), key
    for corr, errs in exp["errors"].items():
        assert entry["imagenet_c"]["corruptions"][corr]["errors"] == pytest.approx(errs, abs=1e-9), corr
    c = entry["imagenet_c"]
    assert "mce" not in c and len(c["missing"]) == 71 and "fog/4" in c["missing"] and "fog/3" not in c["missing"]
    assert c["corruptions"]["fog"]["errors"][3] is None and "ce" not in c["corruptions"]["fog"]
    assert set(c["corruptions"]) == {"fog", "saturate"} and None not in c["corruptions"]["saturate"]["errors"]
    assert "71 of 75 cells missing" in (out / "robustness.md").read_text()
    (split,) = ev.benchmark_splits("imagenet_val", str(trees["val"]), max_images=2)  # --max-images
    assert len(split.records) == 2 and [r["label"] for r in split.records] == [CLASSES[0], CLASSES[1]]  # images 0 and 3 of 6
    (trees["a"] / "not_a_wnid").mkdir()
    bad = _run_cli([*SCRATCH, "--imagenet-a", str(trees["a"]), "--out", str(tmp_path / "o2")])
    assert bad.returncode == 2 and "not_a_wnid is not an ImageNet-1k WordNet id" in bad.stderr
    assert "Traceback" not in bad.stderr


def _stand_in(name: str, data_dir: Path, splits: dict[str, list[tuple[bytes, int]]], config: str | None = None,
              num_classes: int = 1000, fmt: str = "jpeg") -> None:
    """A prepared TFDS build of ``name`` (same name, version and features), without TensorFlow."""
    import tensorflow_datasets as tfds

    registered = tfds.builder_cls(name)  # outside skip_registration: legacy builders register on import
    with tfds.core.registered.skip_registration():

        class StandIn(tfds.core.GeneratorBasedBuilder):
            VERSION = tfds.core.Version(registered.VERSION)
            BUILDER_CONFIGS = [tfds.core.BuilderConfig(
                name=config, version=registered.builder_configs[config].version)] if config else []
            code_path = data_dir / "stand_in.py"

            def _info(self):
                return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                    "image": tfds.features.Image(encoding_format=fmt),
                    "label": tfds.features.ClassLabel(num_classes=num_classes)}))

            def _split_generators(self, dl_manager):
                return {s: self._generate_examples(s) for s in splits}

            def _generate_examples(self, split):
                for i, (data, label) in enumerate(splits[split]):
                    yield f"{split}{i}", {"image": data, "label": label}

        StandIn.name = name
    StandIn(data_dir=str(data_dir), config=config, file_format="array_record").download_and_prepare()


def test_evaluate_cli_tfds_builds(tmp_path):
    """tfds: paths read prepared ArrayRecord builds; numbers equal a direct forward."""
    import io

    from l2s_jax.models import create

    rng = np.random.default_rng(3)

    def images(n: int, size: tuple[int, int], classes=CLASSES) -> list[tuple[bytes, int]]:
        out = []
        for i in range(n):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG")
            out.append((buf.getvalue(), int(classes[i % len(classes)])))
        return out

    data = tmp_path / "tfds"
    built = {"imagenet2012": images(3, (70, 60)), "imagenet_a": images(3, (64, 80)),
             "imagenet_r": images(3, (80, 64)), "imagenet_sketch": images(3, (66, 66))}
    for name, recs in built.items():
        _stand_in(name, data, {"validation" if name == "imagenet2012" else "test": recs})
    cells = {"fog_1": images(2, (224, 224)), "saturate_3": images(2, (224, 224))}
    for cfg, recs in cells.items():
        _stand_in("imagenet2012_corrupted", data, {"validation": recs}, config=cfg)
    out = tmp_path / "out"
    proc = _run_cli([*SCRATCH, "--imagenet-val", "tfds:", "--imagenet-c", "tfds:", "--imagenet-a", "tfds:",
                     "--imagenet-r", "tfds:imagenet_r", "--imagenet-sketch", "tfds:", "--data-dir", str(data),
                     "--batch-size", "8", "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    entry = json.loads((out / "robustness.json").read_text())["models"]["convnext_tiny_bn"]
    model = create("convnext_tiny_bn", seed=0, dims=[8, 8, 16, 16], depths=[1, 1, 1, 1])
    model.eval()
    apply = jit_apply(model)

    def acc(recs, transform, subset=None, k=1):
        x = np.stack([transform(Image.open(io.BytesIO(b)).convert("RGB")) for b, _ in recs])
        lg = np.asarray(apply(x), np.float64)
        if subset is not None:
            lg = np.where(np.isin(np.arange(1000), subset), lg, -np.inf)
        top = np.argsort(-lg, axis=1, kind="stable")[:, :k]
        labels = np.asarray([y for _, y in recs])
        return 100.0 * float(np.sum(np.any(top == labels[:, None], axis=1))) / len(recs)

    std = EvalTransform(224, 0.875)
    assert entry["clean_top1"] == pytest.approx(acc(built["imagenet2012"], std), abs=1e-9)
    assert entry["clean_top5"] == pytest.approx(acc(built["imagenet2012"], std, k=5), abs=1e-9)
    assert entry["imagenet_a_top1"] == pytest.approx(acc(built["imagenet_a"], std, IMAGENET_A_CLASSES), abs=1e-9)
    assert entry["imagenet_r_top1"] == pytest.approx(acc(built["imagenet_r"], std, IMAGENET_R_CLASSES), abs=1e-9)
    assert entry["imagenet_sketch_top1"] == pytest.approx(acc(built["imagenet_sketch"], std), abs=1e-9)
    c = entry["imagenet_c"]
    assert c["corruptions"]["fog"]["errors"] == pytest.approx(
        [100.0 - acc(cells["fog_1"], ev.CropNormalize()), None, None, None, None])
    assert c["corruptions"]["saturate"]["errors"][2] == pytest.approx(100.0 - acc(cells["saturate_3"], ev.CropNormalize()))
    assert "mce" not in c and len(c["missing"]) == 74
