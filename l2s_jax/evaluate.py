"""Robustness evaluation (paper Table 7): clean ImageNet, ImageNet-C, -A, -R and -Sketch.

    python tools/evaluate.py --checkpoint l2s=ckpt/convnext_t_l2s base=runs/base \\
        --imagenet-val /data/imagenet/val --imagenet-c /data/imagenet-c --imagenet-a /data/imagenet-a \\
        --imagenet-r /data/imagenet-r --imagenet-sketch tfds:imagenet_sketch --data-dir $TFDS_DATA_DIR --out rob

Protocols (every number in percent):

- clean top-1/top-5 and ImageNet-Sketch top-1: the standard eval transform (shorter side 256
  bicubic, centre crop 224, ImageNet mean/std), plain 1000-way ranking.
- ImageNet-C (Hendrycks & Dietterich, ICLR 2019, reference ``ImageNet-C/test.py``): the released
  224x224 images are centre-cropped to 224 (a no-op) and normalised, never resized. Error
  ``E(s, c)`` per corruption ``c`` and severity ``s``; ``CE_c = sum_s E(s,c) / sum_s E_AlexNet(s,c)``;
  ``mCE`` = mean of ``CE_c`` over the 15 standard corruptions (x100); relative
  ``rCE_c = sum_s (E(s,c) - E_clean) / sum_s (E_AlexNet(s,c) - E_AlexNet_clean)``. mCE is only
  reported when all 75 cells are present. The 4 extra corruptions are reported (errors) when
  present but never enter mCE (no AlexNet reference exists for them).
- ImageNet-A / -R (Hendrycks et al. 2021): the 1000-way logits restricted to the dataset's 200
  classes before ranking.

Paths: a folder tree as released (val ``ROOT/<wnid>/*``, C ``ROOT/<corruption>/<1-5>/<wnid>/*``,
A/R/Sketch ``ROOT/<wnid>/*``) whose class folders map to the standard 1000-class indices through
the sorted ILSVRC-2012 wnid list shipped with tensorflow-datasets; or ``tfds:NAME`` read from
``--data-dir`` (imagenet2012, imagenet2012_corrupted/<c>_<s>, imagenet_a, imagenet_r, imagenet_sketch).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from l2s_jax import host_memory
from l2s_jax.cli import parse_named_dirs
from l2s_jax.data.sources import (
    IMAGENET_A_CLASSES,
    IMAGENET_C_CORRUPTIONS,
    IMAGENET_C_EXTRA_CORRUPTIONS,
    IMAGENET_R_CLASSES,
)
from l2s_jax.data.transforms import IMAGENET_MEAN, IMAGENET_STD, EvalTransform, as_rgb_image, center_crop, \
    to_normalized_float

SEVERITIES = (1, 2, 3, 4, 5)
# AlexNet's top-1 error (fraction) per ImageNet-C corruption and severity 1..5, as published with the
# benchmark (Hendrycks & Dietterich; the per-severity table timm ships as
# ``timm.utils.imagenetc_alexnet_error_rates_list``). Their means are the per-corruption AlexNet
# errors of the reference code (e.g. gaussian_noise 0.886428; checked in tests/test_evaluate.py).
ALEXNET_ERRORS: dict[str, tuple[float, ...]] = {
    "gaussian_noise": (0.69528, 0.82542, 0.93554, 0.98138, 0.99452),
    "shot_noise": (0.71224, 0.85108, 0.93574, 0.98182, 0.99146),
    "impulse_noise": (0.78374, 0.89808, 0.9487, 0.9872, 0.99548),
    "defocus_blur": (0.65624, 0.73202, 0.85036, 0.91364, 0.94714),
    "glass_blur": (0.64308, 0.75054, 0.88806, 0.91622, 0.93344),
    "motion_blur": (0.5843, 0.70048, 0.82108, 0.8975, 0.92638),
    "zoom_blur": (0.70008, 0.76992, 0.80784, 0.84198, 0.87198),
    "snow": (0.71726, 0.88392, 0.86468, 0.9187, 0.94952),
    "frost": (0.6139, 0.79734, 0.8879, 0.89942, 0.9343),
    "fog": (0.67474, 0.7605, 0.84378, 0.8726, 0.945),
    "brightness": (0.4514, 0.48502, 0.54048, 0.62166, 0.7244),
    "contrast": (0.64548, 0.7615, 0.88874, 0.9776, 0.9927),
    "elastic_transform": (0.52596, 0.70116, 0.55686, 0.64076, 0.80554),
    "pixelate": (0.52218, 0.5462, 0.73728, 0.87092, 0.91262),
    "jpeg_compression": (0.51002, 0.54718, 0.57294, 0.65458, 0.74778),
}
# AlexNet's clean ImageNet top-1 error (%) for relative mCE: torchvision's AlexNet (the model the
# reference code evaluates), top-1 accuracy 56.522% as torchvision documents it; the paper
# rounds it to 43.5.
ALEXNET_CLEAN_ERROR = 100.0 - 56.522
BENCHMARKS = ("imagenet_val", "imagenet_c", "imagenet_a", "imagenet_r", "imagenet_sketch")
TFDS_DEFAULTS = {"imagenet_val": ("imagenet2012", "validation"), "imagenet_a": ("imagenet_a", "test"),
                 "imagenet_r": ("imagenet_r", "test"), "imagenet_sketch": ("imagenet_sketch", "test")}
TABLE7_COLUMNS = (("clean", "clean_top1"), ("C (mCE)", "mce"), ("SK", "imagenet_sketch_top1"),
                  ("R", "imagenet_r_top1"), ("A", "imagenet_a_top1"))


# --- protocol --------------------------------------------------------------------------------

def imagenet_wnids() -> tuple[str, ...]:
    """The 1000 ILSVRC-2012 WordNet ids in index order (tensorflow-datasets' shipped labels.txt)."""
    from tensorflow_datasets.datasets.imagenet2012 import imagenet_common

    names = tuple(Path(imagenet_common.label_names_file()).read_text().split())
    assert len(names) == 1000 and list(names) == sorted(names), "unexpected ILSVRC-2012 label file"
    return names


def check_wnid_folders(root: str | os.PathLike) -> list[str]:
    """The class folders of ``root``; ValueError naming the first folder that is not an ILSVRC wnid."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} does not exist or is not a folder")
    folders = sorted(e.name for e in os.scandir(root) if e.is_dir())
    known = set(imagenet_wnids())
    unknown = [f for f in folders if f not in known]
    if unknown:
        raise ValueError(f"{root}/{unknown[0]} is not an ImageNet-1k WordNet id (expected class folders like "
                         f"n01440764; {len(unknown)} unknown folder(s))")
    if not folders:
        raise FileNotFoundError(f"{root} has no class folders (expected ROOT/<wnid>/<image>)")
    return folders


def corruption_table(errors: Mapping[str, Sequence[float | None]], clean_error: float | None = None) -> dict[str, Any]:
    """ImageNet-C summary from errors (%) per corruption and severity 1..5 (None: not evaluated).

    Returns ``{"corruptions": {c: {"errors", "ce", "relative_ce"}}, "mce", "relative_mce", "missing"}``;
    ``ce`` needs all 5 severities (x100, AlexNet = 100); ``mce`` / ``relative_mce`` need all
    15 x 5 standard cells, else only ``missing`` (``"<corruption>/<severity>"`` labels) is set.
    """
    unknown = sorted(set(errors) - set(IMAGENET_C_CORRUPTIONS) - set(IMAGENET_C_EXTRA_CORRUPTIONS))
    if unknown:
        raise ValueError(f"unknown ImageNet-C corruption(s) {unknown}")
    out: dict[str, Any] = {"corruptions": {}}
    missing = []
    for c in IMAGENET_C_CORRUPTIONS + IMAGENET_C_EXTRA_CORRUPTIONS:
        errs = list(errors.get(c, [None] * 5))
        if len(errs) != 5:
            raise ValueError(f"{c}: expected 5 severities, got {len(errs)}")
        if c in IMAGENET_C_CORRUPTIONS:
            missing += [f"{c}/{s}" for s, e in zip(SEVERITIES, errs) if e is None]
        if c not in errors:
            continue
        entry: dict[str, Any] = {"errors": errs}
        if c in ALEXNET_ERRORS and None not in errs:
            alex = [100.0 * e for e in ALEXNET_ERRORS[c]]
            entry["ce"] = 100.0 * sum(errs) / sum(alex)
            if clean_error is not None:
                entry["relative_ce"] = 100.0 * sum(e - clean_error for e in errs) / sum(
                    a - ALEXNET_CLEAN_ERROR for a in alex)
        out["corruptions"][c] = entry
    if missing:
        out["missing"] = missing
    else:
        rows = [out["corruptions"][c] for c in IMAGENET_C_CORRUPTIONS]
        out["mce"] = float(np.mean([r["ce"] for r in rows]))
        if clean_error is not None:
            out["relative_mce"] = float(np.mean([r["relative_ce"] for r in rows]))
    return out


@dataclasses.dataclass(frozen=True)
class CropNormalize:
    """ImageNet-C's test transform: centre crop to ``size`` (no resize; a no-op at 224) + normalise."""

    size: int = 224
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def __call__(self, image: Any) -> np.ndarray:
        """The (size, size, 3) float32 normalised image."""
        return to_normalized_float(center_crop(as_rgb_image(image), self.size), self.mean, self.std)


# --- data ------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Split:
    """One evaluated split: records ``{"image", "label" (1000-way index)}`` and how to score them."""

    name: str
    records: Any
    transform: Callable[[Any], np.ndarray]
    label_subset: tuple[int, ...] | None = None


@dataclasses.dataclass(frozen=True, eq=False)
class Strided:
    """``n`` records evenly spread over ``base`` (``--max-images``: a quick look at every class)."""

    base: Any
    n: int

    def __len__(self) -> int:
        """The number of records kept."""
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        """Record ``i * len(base) // n`` of the base."""
        return self.base[int(i) * len(self.base) // self.n]


def _folder_records(root: Path) -> Any:
    """A wnid class-folder tree as records labelled with the standard 1000-class indices."""
    from l2s_jax.data.sources import ImageFolderSource

    check_wnid_folders(root)
    return ImageFolderSource.scan(root, imagenet_wnids())


def _tfds_records(name: str, data_dir: str | None, split: str) -> Any:
    """A prepared TFDS split as records (FileNotFoundError with the preparation command otherwise)."""
    import ml_collections

    from l2s_jax.data.sources import open_source

    return open_source(ml_collections.ConfigDict({"name": name, "data_dir": data_dir}), split).records


def _limit(records: Any, max_images: int | None) -> Any:
    return records if not max_images or len(records) <= max_images else Strided(records, max_images)


def benchmark_splits(benchmark: str, path: str, *, data_dir: str | None = None,
                     max_images: int | None = None) -> list[Split]:
    """The splits of one benchmark (ImageNet-C: one per present corruption x severity)."""
    standard = EvalTransform(224, 0.875)
    subset = {"imagenet_a": IMAGENET_A_CLASSES, "imagenet_r": IMAGENET_R_CLASSES}.get(benchmark)
    if benchmark != "imagenet_c":
        if path.startswith("tfds:"):
            default_name, split = TFDS_DEFAULTS[benchmark]
            name = path[5:] or default_name
            records = _tfds_records(name, data_dir, split)
        else:
            records = _folder_records(Path(path))
            outside = sorted({records.classes[y] for y in set(records.labels.tolist())} -
                             {imagenet_wnids()[i] for i in (subset or range(1000))})
            if outside:
                raise ValueError(f"{path}/{outside[0]} is not one of the 200 {benchmark} classes (is this the right "
                                 f"dataset? {len(outside)} such folder(s))")
        return [Split(benchmark, _limit(records, max_images), standard, subset)]
    splits = []
    known = IMAGENET_C_CORRUPTIONS + IMAGENET_C_EXTRA_CORRUPTIONS
    if path.startswith("tfds:"):
        from l2s_jax.data.sources import default_data_dir, tfds_builder

        base = path[5:] or "imagenet2012_corrupted"
        for c in known:
            for s in SEVERITIES:
                if not (Path(default_data_dir(data_dir)) / base / f"{c}_{s}").is_dir():
                    continue
                try:
                    tfds_builder(f"{base}/{c}_{s}", data_dir)
                except FileNotFoundError:
                    continue
                records = _tfds_records(f"{base}/{c}_{s}", data_dir, "validation")
                splits.append(Split(f"{c}/{s}", _limit(records, max_images), CropNormalize()))
        if not splits:
            raise FileNotFoundError(f"no {base}/<corruption>_<severity> build under {default_data_dir(data_dir)}")
        return splits
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"--imagenet-c {root} does not exist")
    for entry in sorted(e.name for e in os.scandir(root) if e.is_dir()):
        if entry not in known:
            raise ValueError(f"{root}/{entry} is not an ImageNet-C corruption (expected ROOT/<corruption>/<1-5>/<wnid>/"
                             f"; corruptions: {', '.join(known)})")
    for c in known:
        if not (root / c).is_dir():
            continue
        for entry in sorted(e.name for e in os.scandir(root / c) if e.is_dir()):
            if entry not in {str(s) for s in SEVERITIES}:
                raise ValueError(f"{root / c}/{entry} is not a severity folder (expected 1..5)")
        for s in SEVERITIES:
            if (root / c / str(s)).is_dir():
                splits.append(Split(f"{c}/{s}", _limit(_folder_records(root / c / str(s)), max_images),
                                    CropNormalize()))
    if not splits:
        raise FileNotFoundError(f"--imagenet-c {root} holds no <corruption>/<severity>/<wnid>/ folders")
    return splits


# --- models ----------------------------------------------------------------------------------

def _num_classes_of(name: str, overrides: Mapping[str, Any], params: Mapping[str, Any]) -> int:
    """The class count of saved ``params`` of zoo model ``name``: the axis that follows num_classes."""
    import jax
    from flax import nnx

    from l2s_jax.models import create

    def shapes(n: int) -> dict:
        model = nnx.eval_shape(lambda: create(name, **{**overrides, "num_classes": n}))
        return jax.tree.map(lambda x: x.shape, nnx.state(model, nnx.Param).to_pure_dict())

    a, b = shapes(1000), shapes(1001)
    flat_a = dict(jax.tree_util.tree_flatten_with_path(a, is_leaf=lambda x: isinstance(x, tuple))[0])
    flat_b = dict(jax.tree_util.tree_flatten_with_path(b, is_leaf=lambda x: isinstance(x, tuple))[0])
    saved = {jax.tree_util.keystr(k, simple=True, separator="/"): np.shape(v)
             for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    for key, sa in flat_a.items():
        if sa != flat_b[key]:
            axis = next(i for i, (x, y) in enumerate(zip(sa, flat_b[key])) if x != y)
            path = jax.tree_util.keystr(key, simple=True, separator="/")
            if path in saved:
                return int(saved[path][axis])
    raise ValueError(f"cannot find the classifier of {name} in the saved parameters")


def _unwrap_values(tree: Any) -> Any:
    """A saved ``nnx.State`` (``{..., "kernel": {"value": x}}``) as a pure dict (``{"kernel": x}``)."""
    if isinstance(tree, Mapping):
        if set(tree) == {"value"}:
            return tree["value"]
        return {k: _unwrap_values(v) for k, v in tree.items()}
    return tree


def load_workdir_student(workdir: str | os.PathLike, *, use_ema: bool = False) -> Any:
    """The final student (or its EMA) of a ``python -m l2s_jax.main`` workdir, in eval mode."""
    import orbax.checkpoint as ocp
    from flax import nnx

    from l2s_jax.models import create
    from l2s_jax.train import STATS

    workdir = Path(workdir).resolve()
    config = json.loads((workdir / "config.json").read_text())
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) if (
        workdir / "checkpoints").is_dir() else []
    if not steps:
        raise FileNotFoundError(f"training workdir {workdir} has no checkpoints/<step>/ yet")
    import jax

    path = workdir / "checkpoints" / str(steps[-1]) / "state"
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    with ocp.StandardCheckpointer() as ckptr:  # onto one device, whatever mesh the run was saved from
        meta = ckptr.metadata(path).item_metadata.tree
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), meta)
        state = _unwrap_values(ckptr.restore(path, target))
    params, stats = (state["ema_params"], state["ema_batch_stats"]) if use_ema else (state["params"],
                                                                                     state["batch_stats"])
    if use_ema and params is None:
        raise ValueError(f"{workdir} was trained without EMA (ema_decay 0); drop --use-ema")
    name, overrides = config["model"]["name"], dict(config["model"].get("overrides", {}))
    num_classes = _num_classes_of(name, overrides, params["model"])
    model = create(name, num_classes=num_classes, **overrides)
    model.eval()
    p_state, s_state = nnx.state(model, nnx.Param), nnx.state(model, STATS)
    p_state.replace_by_pure_dict(params["model"])
    s_state.replace_by_pure_dict(stats["model"])
    nnx.update(model, p_state, s_state)
    print(f"{workdir}: {name} ({num_classes} classes), {'EMA' if use_ema else 'final'} weights of step {steps[-1]}")
    return model


def transfer_weights(source: Any, target: Any, name: str, kwargs: Mapping[str, Any]) -> None:
    """Copy every parameter and statistic of ``source`` into ``target`` except the classifier.

    The classifier is what depends on ``num_classes`` (found by building ``name`` with 1000 and
    1001 classes); any other missing or mismatched entry is an error listing them all.
    """
    import jax
    from flax import nnx

    from l2s_jax.models import create

    def flat(tree: Any) -> dict[str, Any]:
        return {jax.tree_util.keystr(k, simple=True, separator="/"): v
                for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}

    def shapes(n: int) -> dict[str, Any]:
        return flat(nnx.state(nnx.eval_shape(lambda: create(name, **{**kwargs, "num_classes": n})), weights).to_pure_dict())

    weights = nnx.Not(nnx.RngState)
    a, b = shapes(1000), shapes(1001)
    head = {k for k in a if np.shape(a[k]) != np.shape(b[k])}
    src, dst = flat(nnx.state(source, weights).to_pure_dict()), flat(nnx.state(target, weights).to_pure_dict())
    bad = sorted(f"{k} {np.shape(src.get(k))} -> {np.shape(v)}" if k in src else f"{k} (missing)"
                 for k, v in dst.items() if k not in head and (k not in src or np.shape(src[k]) != np.shape(v)))
    if bad:
        more = f"; ... and {len(bad) - 12} more" if len(bad) > 12 else ""
        raise ValueError(f"config.init: {len(bad)} parameter(s) do not fit {name}: " + "; ".join(bad[:12]) + more)
    state = nnx.state(target, weights)
    pure = state.to_pure_dict()
    leaves, treedef = jax.tree_util.tree_flatten_with_path(pure)
    new = [leaf if jax.tree_util.keystr(k, simple=True, separator="/") in head else
           np.asarray(src[jax.tree_util.keystr(k, simple=True, separator="/")]) for k, leaf in leaves]
    state.replace_by_pure_dict(jax.tree_util.tree_unflatten(treedef, new))
    nnx.update(target, state)
    print(f"config.init: loaded {len(dst) - len(head)} arrays, fresh classifier ({', '.join(sorted(head))})")


def load_model(path: str | os.PathLike, *, use_ema: bool = False) -> Any:
    """A converted checkpoint (``spec.json``) or a training workdir (``config.json`` + checkpoints)."""
    from l2s_jax.models import load_pretrained

    path = Path(path)
    if (path / "spec.json").is_file():
        return load_pretrained(path)
    if (path / "config.json").is_file():
        return load_workdir_student(path, use_ema=use_ema)
    raise FileNotFoundError(f"{path} is neither a converted checkpoint (spec.json; tools/convert_weights.py) nor a "
                            "training workdir (config.json + checkpoints/)")


# --- evaluation ------------------------------------------------------------------------------

def evaluate_split(model: Any, split: Split, *, batch_size: int, workers: int = 0, mesh: Any = None,
                   bar: Any = None) -> dict[str, float]:
    """Top-1/top-5 (%) and image count of ``model`` on ``split``: one jitted forward sharded over the
    batch axis of all devices, fed by the grain pipeline (padded last batch, masked out)."""
    import jax
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    from l2s_jax import train
    from l2s_jax.data import pipeline

    mesh = mesh or train.create_mesh()
    graph, state = nnx.split(model)
    state = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))
    step = _compiled_step(graph, split.label_subset)
    cfg = {"num_workers": workers, "prefetch": 2}
    sums = None
    for batch in pipeline.eval_batches(split.records, split.transform, cfg, global_batch_size=batch_size):
        out = step((state,), pipeline.shard_batch(batch, mesh))
        sums = out if sums is None else jax.tree.map(lambda a, b: a + b, sums, out)
        if bar is not None:
            bar.update(int(batch["mask"].sum()))
    sums = jax.device_get(sums)
    count = float(sums["count"])
    return {"top1": 100.0 * float(sums["correct1"]) / count, "top5": 100.0 * float(sums["correctk"]) / count,
            "count": int(count)}


_STEPS: dict[Any, Callable] = {}


def _compiled_step(graph: Any, label_subset: tuple[int, ...] | None) -> Callable:
    """One jitted eval step per (graph, class subset)."""
    import jax

    from l2s_jax import train

    key = (graph, label_subset)
    if key not in _STEPS:
        _STEPS[key] = jax.jit(train.make_eval_step(graph, label_subset=label_subset))
    return _STEPS[key]


def evaluate_model(model: Any, splits: Mapping[str, list[Split]], *, batch_size: int, workers: int = 0,
                   name: str = "") -> tuple[dict[str, Any], dict[str, float]]:
    """robustness.json's entry for one model, and its images/s per benchmark."""
    out: dict[str, Any] = {}
    speed: dict[str, float] = {}
    from tqdm import tqdm

    for benchmark, parts in splits.items():
        total, start = sum(len(s.records) for s in parts), time.time()
        with tqdm(total=total, unit="img", desc=f"{name} {benchmark}", file=sys.stdout, leave=False,
                  mininterval=1.0) as bar:
            results = [evaluate_split(model, s, batch_size=batch_size, workers=workers, bar=bar) for s in parts]
        speed[benchmark] = total / max(time.time() - start, 1e-9)
        print(f"{name} {benchmark}: {total} images, {speed[benchmark]:.1f} images/s", flush=True)
        if benchmark == "imagenet_val":
            out["clean_top1"], out["clean_top5"] = results[0]["top1"], results[0]["top5"]
        elif benchmark == "imagenet_c":
            errors: dict[str, list[float | None]] = {}
            for s, r in zip(parts, results):
                c, sev = s.name.split("/")
                errors.setdefault(c, [None] * 5)[int(sev) - 1] = 100.0 - r["top1"]
            clean = None if "clean_top1" not in out else 100.0 - out["clean_top1"]
            out["imagenet_c"] = corruption_table(errors, clean)
        else:
            out[f"{benchmark}_top1"] = results[0]["top1"]
    return out, speed


# --- outputs ---------------------------------------------------------------------------------

def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.2f}"


def table7_rows(models: Mapping[str, Mapping[str, Any]]) -> list[list[str]]:
    """Table 7: model, clean top-1, ImageNet-C mCE, Sketch, R, A top-1 ('-' when absent)."""
    rows = []
    for name, m in models.items():
        c = m.get("imagenet_c", {})
        rows.append([name] + [_fmt(c.get("mce") if key == "mce" else m.get(key)) for _, key in TABLE7_COLUMNS])
    return rows


def ce_rows(models: Mapping[str, Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Per-corruption CE table: one row per model, one column per corruption present."""
    present = [c for c in IMAGENET_C_CORRUPTIONS + IMAGENET_C_EXTRA_CORRUPTIONS
               if any(c in m.get("imagenet_c", {}).get("corruptions", {}) for m in models.values())]
    rows = []
    for name, m in models.items():
        corr = m.get("imagenet_c", {}).get("corruptions", {})
        rows.append([name] + [_fmt(corr.get(c, {}).get("ce", None)) if c in ALEXNET_ERRORS else
                              _fmt(np.mean(corr[c]["errors"])) if c in corr and None not in corr[c]["errors"]
                              else "-" for c in present])
    return present, rows


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def write_outputs(report: Mapping[str, Any], out: str | os.PathLike) -> dict[str, Path]:
    """robustness.json / .md / .csv and robustness.png (CE per corruption) in ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    models = report["models"]
    paths = {k: out / f"robustness.{k}" for k in ("json", "md", "csv", "png")}
    paths["json"].write_text(json.dumps(report, indent=2) + "\n")
    header = ["model"] + [h for h, _ in TABLE7_COLUMNS]
    rows = table7_rows(models)
    present, crows = ce_rows(models)
    md = ["# Robustness (Table 7 layout; accuracies top-1 %, C = mCE, lower is better)", "",
          markdown_table(header, rows)]
    if present:
        md += ["", "## ImageNet-C: corruption error CE per corruption (AlexNet = 100; extra corruptions: mean "
               "error %, not in mCE)", "", markdown_table(["model"] + present, crows)]
        for name, m in models.items():
            c = m["imagenet_c"]
            if "missing" in c:
                md += ["", f"{name}: no mCE, {len(c['missing'])} of 75 cells missing: {', '.join(c['missing'])}"]
            elif "relative_mce" in c:
                md += ["", f"{name}: mCE {c['mce']:.2f}, relative mCE {c['relative_mce']:.2f}"]
    if report.get("throughput"):
        md += ["", "Throughput (images/s): " + "; ".join(
            f"{n}: " + ", ".join(f"{b} {v:.1f}" for b, v in t.items()) for n, t in report["throughput"].items())]
    paths["md"].write_text("\n".join(md) + "\n")
    with paths["csv"].open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
        if present:
            writer.writerow([])
            writer.writerow(["model"] + [f"CE {c}" for c in present])
            writer.writerows(crows)
    _plot_ce(models, present, paths["png"])
    return paths


def _plot_ce(models: Mapping[str, Mapping[str, Any]], present: Sequence[str], path: Path) -> None:
    """CE per standard corruption, one bar group per corruption, one bar per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    corrs = [c for c in present if c in ALEXNET_ERRORS]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.7 * len(corrs) + 2), 4))
    if not corrs:
        ax.text(0.5, 0.5, "no complete ImageNet-C corruption evaluated", ha="center", va="center")
        ax.set_axis_off()
    else:
        width = 0.8 / max(len(models), 1)
        x = np.arange(len(corrs))
        for i, (name, m) in enumerate(models.items()):
            corr = m.get("imagenet_c", {}).get("corruptions", {})
            vals = [corr.get(c, {}).get("ce", np.nan) for c in corrs]
            mce = m.get("imagenet_c", {}).get("mce")
            ax.bar(x + (i - (len(models) - 1) / 2) * width, vals, width,
                   label=name + ("" if mce is None else f" (mCE {mce:.1f})"))
        ax.axhline(100, color="grey", lw=0.8, ls="--", label="AlexNet")
        ax.set_xticks(x, [c.replace("_", "\n") for c in corrs], fontsize=7)
        ax.set_ylabel("corruption error CE (AlexNet = 100)")
        ax.set_title("ImageNet-C corruption error per corruption")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- command line ----------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", action="append", default=[], metavar="NAME=DIR",
                   help="converted checkpoint (spec.json) or training workdir (final student); repeatable")
    p.add_argument("--use-ema", action="store_true", help="training workdirs: evaluate the EMA weights")
    p.add_argument("--model", action="append", default=[], metavar="NAME",
                   help="registered architecture from scratch (smoke tests); repeatable")
    for b in BENCHMARKS:
        p.add_argument(f"--{b.replace('_', '-')}", default=None, metavar="PATH",
                       help="folder tree as released, or tfds:NAME (with --data-dir)")
    p.add_argument("--data-dir", default=None, help="TFDS data directory for tfds: paths")
    p.add_argument("--batch-size", type=int, default=64, help="global batch (a multiple of the device count)")
    p.add_argument("--workers", type=int, default=0, help="grain worker processes decoding images")
    p.add_argument("--max-images", type=int, default=None, help="at most N images per split, evenly spread")
    p.add_argument("--override", action="append", default=[], metavar="NAME=JSON",
                   help="constructor argument for the --model models, e.g. --override 'dims=[8,16,16,16]'")
    p.add_argument("--seed", type=int, default=0, help="initialisation seed of --model")
    p.add_argument("--out", required=True, help="output folder (robustness.json/.md/.csv/.png)")
    return p


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Evaluate every model on every given benchmark and write the outputs."""
    import jax

    from l2s_jax.models import create, list_models

    checkpoints = parse_named_dirs(args.checkpoint)
    unknown = [m for m in args.model if m not in list_models()]
    if unknown:
        raise ValueError(f"unknown --model {unknown[0]!r}; known: {', '.join(list_models())}")
    if not checkpoints and not args.model:
        raise ValueError("give at least one --checkpoint NAME=DIR or --model NAME")
    paths = {b: getattr(args, b) for b in BENCHMARKS if getattr(args, b)}
    if not paths:
        raise ValueError("give at least one benchmark: " + ", ".join(f"--{b.replace('_', '-')}" for b in BENCHMARKS))
    if args.batch_size < 1 or args.batch_size % jax.device_count():
        raise ValueError(f"--batch-size {args.batch_size} must be a positive multiple of the {jax.device_count()} "
                         "devices")
    out = Path(args.out)
    if (out / "robustness.json").exists():
        raise FileExistsError(f"{out / 'robustness.json'} exists; choose another --out (nothing is overwritten)")
    for name, path in checkpoints.items():
        if not Path(path).is_dir():
            raise FileNotFoundError(f"--checkpoint {name}={path}: no such directory")
    splits = {b: benchmark_splits(b, p, data_dir=args.data_dir, max_images=args.max_images) for b, p in paths.items()}
    for b, parts in splits.items():
        print(f"{b}: {paths[b]} -> {len(parts)} split(s), {sum(len(s.records) for s in parts)} images")
    loaders = {n: (lambda p=p: load_model(p, use_ema=args.use_ema)) for n, p in checkpoints.items()}
    overrides = {}
    for item in args.override:
        key, sep, value = item.partition("=")
        try:
            overrides[key] = json.loads(value) if sep else None
        except json.JSONDecodeError:
            sep = ""
        if not sep or not key:
            raise ValueError(f"--override expects NAME=JSON, got {item!r}")
    loaders.update({n: (lambda n=n: create(n, seed=args.seed, **overrides)) for n in args.model})
    report: dict[str, Any] = {"models": {}, "throughput": {}, "protocol": protocol(paths, args)}
    for name, loader in loaders.items():
        model = loader()
        model.eval()
        report["models"][name], report["throughput"][name] = evaluate_model(
            model, splits, batch_size=args.batch_size, workers=args.workers, name=name)
    written = write_outputs(report, out)
    print(markdown_table(["model"] + [h for h, _ in TABLE7_COLUMNS], table7_rows(report["models"])))
    print("wrote " + ", ".join(str(p) for p in written.values()))
    return report


def protocol(paths: Mapping[str, str], args: argparse.Namespace) -> dict[str, Any]:
    """What was measured and how (stored in robustness.json)."""
    return {
        "paths": dict(paths), "model_overrides": list(args.override), "max_images": args.max_images, "batch_size": args.batch_size, "units": "percent",
        "clean_sketch_a_r_transform": "shorter side 256 bicubic, centre crop 224, ImageNet mean/std",
        "imagenet_c_transform": "released 224x224 images, centre crop 224 (no resize), ImageNet mean/std",
        "imagenet_c": "CE_c = sum_s E(s,c) / sum_s E_AlexNet(s,c) x100; mCE over the 15 standard corruptions "
                      "(all 75 cells); relative CE uses clean errors (AlexNet clean error "
                      f"{ALEXNET_CLEAN_ERROR:.3f}); extra corruptions never in mCE (Hendrycks & Dietterich 2019)",
        "imagenet_a_r": "1000-way logits restricted to the 200 classes before the argmax (Hendrycks et al. 2021)",
    }


def main(argv: list[str] | None = None) -> int:
    """Entry point; one-line error and exit status 2 on bad input."""
    args = build_parser().parse_args(argv)
    from l2s_jax import compile_cache

    compile_cache.enable()
    try:
        run(args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def cli() -> int:
    """The console entry point: :func:`main` in a process with the tuned host malloc (:mod:`l2s_jax.host_memory`)."""
    host_memory.reexec_tuned()
    return main()


if __name__ == "__main__":
    sys.exit(cli())
