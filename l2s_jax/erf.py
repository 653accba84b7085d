"""Effective receptive field (ERF) probing: paper Section 5.1 and Figure 1.

The procedure follows the authors' ``erf/visualize_erf.py`` and ``erf/analyze_erf.py`` (SLaK
repository, adapted from RepLKNet):

1. Images are resized to ``size x size`` (1024, bicubic, aspect ratio not kept) and normalised
   with the ImageNet mean/std (:func:`resize_for_erf`).
2. For each image ``x``: ``P = sum_c ReLU(F[h//2, w//2, c])`` with ``F`` the last feature map
   (``model.features(x)[-1]``, NHWC, ``(h, w)`` its size); the image's contribution map is
   ``sum_channels ReLU(dP/dx)``, an ``H x W`` array (:func:`contribution_map`).
3. The maps are accumulated over the images; the authors save the MEAN (``AverageMeter.avg``)
   and skip an image whose map contains NaN. Both are the default here.
4. Analysis: ``m = log10(map + 1); m = m / max(m)``, then for each threshold t the smallest
   centred square holding MORE than t of the total (:func:`high_contribution_area`).

Batching. The map of a batch is computed from the gradient of the SUM of the per-image central
responses. That equals the per-image gradients only if images do not interact; in eval mode they
do not (BatchNorm uses its running statistics, stochastic depth is off), and the probe always runs
an eval-mode view of the model, whatever mode the caller's model is in. ReLU and the NaN check are
applied per image before summing, so a batch gives exactly the sum of its single-image maps.
The model is split once; one jitted program serves every batch (the last batch is padded and
masked, so it does not recompile) and every model of the same architecture.

Fixed-resolution transformers (ViT, Swin, CSWin) only accept the size they were built for
(e.g. 224); build them with that ``img_size`` or probe at that size.
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import json
import math
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from l2s_jax.data.transforms import IMAGENET_MEAN, IMAGENET_STD, as_rgb_image, resize, to_normalized_float

ERF_SIZE = 1024
THRESHOLDS: tuple[float, ...] = (0.2, 0.3, 0.5, 0.99)
# ``get_rectangle`` divides the side length by this constant, whatever the matrix size.
AUTHORS_AREA_DENOMINATOR = 1024
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

Reduction = Literal["sum", "mean"]
Sample = Literal["first", "random"]


# ----------------------------------------------------------------------------- images


def resize_for_erf(
    image: np.ndarray | Any,
    size: int = ERF_SIZE,
    *,
    normalize: bool = True,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> np.ndarray:
    """``Resize((size, size), bicubic)`` then ``ToTensor + Normalize``: an HWC float32 image.

    ``image`` is a PIL image or a uint8 ``(H, W, 3)`` / ``(H, W)`` array. With
    ``normalize=False`` the resized uint8 image is returned (normalise later with
    :func:`normalize_images`).
    """
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    resized = resize(as_rgb_image(image), size, size, "bicubic")
    if not normalize:
        return np.asarray(resized, np.uint8)
    return to_normalized_float(resized, mean, std)


def normalize_images(
    images: np.ndarray, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> np.ndarray:
    """uint8 ``(N, H, W, 3)`` images -> float32 ``(v / 255 - mean) / std``."""
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"expected uint8 NHWC images, got {images.dtype} {images.shape}")
    x = images.astype(np.float32) / np.float32(255)
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def list_image_files(folder: str | os.PathLike) -> list[Path]:
    """Image files under ``folder``, recursively, in torchvision ``ImageFolder`` order.

    Sorted sub-folders then sorted file names, so ``DATA/val`` gives the authors' sequential
    order (class folders ``n01440764/``, ... first).
    """
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    files = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        files.extend(Path(dirpath) / f for f in sorted(filenames) if f.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {root}")
    return files


def _pick(count: int, num_images: int, sample: Sample, seed: int, what: str) -> np.ndarray:
    """Indices of the images to use: the first ``num_images`` or a seeded random subset."""
    if num_images < 1:
        raise ValueError(f"num_images must be positive, got {num_images}")
    if count < num_images:
        raise ValueError(f"{what} holds only {count} images, fewer than num_images={num_images}")
    if sample == "first":
        return np.arange(num_images)
    if sample == "random":
        return np.random.default_rng(seed).choice(count, num_images, replace=False)
    raise ValueError(f"sample must be 'first' or 'random', got {sample!r}")


def load_erf_images(
    data: str | os.PathLike,
    num_images: int = 50,
    *,
    size: int = ERF_SIZE,
    data_dir: str | os.PathLike | None = None,
    split: str | None = None,
    sample: Sample = "first",
    seed: int = 0,
    data_options: Mapping[str, Any] | None = None,
) -> np.ndarray:
    """``num_images`` images resized to ``size x size``: uint8 ``(N, size, size, 3)``.

    ``data`` is an image folder (every image under it, e.g. ``IMAGENET/val``), a dataset name
    of :mod:`l2s_jax.data.sources` (``imagenet2012``, ``demo``, ...; ``data_dir`` is the TFDS
    root, ``split`` defaults to the evaluation split), or ``"random"`` (seeded uniform noise,
    for demonstrations). ``sample="first"`` takes the first images in order, like the authors'
    sequential loader; ``"random"`` a seeded random subset. ``data_options`` are extra dataset
    settings (e.g. ``{"demo_num_test": 64}``, see :func:`l2s_jax.data.sources.open_source`).
    """
    text = os.fspath(data)
    if text == "random":
        if num_images < 1:
            raise ValueError(f"num_images must be positive, got {num_images}")
        return np.random.default_rng(seed).integers(0, 256, (num_images, size, size, 3), dtype=np.uint8)
    if os.path.isdir(text):
        files = list_image_files(text)
        picked = _pick(len(files), num_images, sample, seed, f"image folder {text}")
        from PIL import Image

        out = []
        for i in picked:
            with Image.open(files[int(i)]) as img:
                out.append(resize_for_erf(img.convert("RGB"), size, normalize=False))
        return np.stack(out)
    if os.sep in text or text.startswith("."):
        raise FileNotFoundError(f"image folder {text} does not exist")
    import ml_collections

    from l2s_jax.data.sources import decode_image, default_eval_split, open_source

    cfg = ml_collections.ConfigDict({
        **dict(data_options or {}), "name": text, "data_dir": None if data_dir is None else os.fspath(data_dir),
    })
    split = split or default_eval_split(text)
    records = open_source(cfg, split).records
    picked = _pick(len(records), num_images, sample, seed, f"dataset {text!r} split {split!r}")
    return np.stack([resize_for_erf(decode_image(records[int(i)]["image"]), size, normalize=False) for i in picked])


# ----------------------------------------------------------------------------- gradients


def as_feature_map(features: jax.Array) -> jax.Array:
    """An NHWC map from an NHWC map or a token sequence ``(N, T, C)``.

    Tokens are reshaped row-major to ``sqrt(T) x sqrt(T)``; with a class token first
    (``T - 1`` a square and ``T`` not) it is dropped.
    """
    if features.ndim == 4:
        return features
    if features.ndim == 3:
        n, t, c = features.shape
        for skip in (0, 1):
            side = math.isqrt(t - skip)
            if side * side == t - skip and side > 0:
                return features[:, skip:].reshape(n, side, side, c)
        raise ValueError(f"cannot reshape {t} tokens to a square map (with or without a class token)")
    raise ValueError(f"expected an NHWC feature map or (N, T, C) tokens, got shape {features.shape}")


class OffCentreWarning(UserWarning):
    """The probed map's 'centre' position is not its geometric centre (or sits near a border)."""


MIN_CENTRE_MARGIN = 3  # positions between the probed centre and the nearest border


def centre_note(height: int, width: int, image_size: tuple[int, int]) -> str | None:
    """Why the probed position ``(h // 2, w // 2)`` of an ``h x w`` map is off-centre, or None."""
    ci, cj = height // 2, width // 2
    problems = []
    if height % 2 == 0 or width % 2 == 0:
        stride = image_size[0] / height
        problems.append(f"an even side puts it half a position ({stride / 2:g} px) below/right of the true centre")
    if min(ci, cj, height - 1 - ci, width - 1 - cj) < MIN_CENTRE_MARGIN:
        problems.append(f"it lies within {MIN_CENTRE_MARGIN} positions of the border, so zero padding clips the ERF")
    if not problems:
        return None
    return (f"ERF: the probed feature map is {height}x{width} for {image_size[0]}x{image_size[1]} images; its "
            f"'centre' is position ({ci}, {cj}): {' and '.join(problems)} (choose an image size giving an odd "
            f"map side >= {2 * MIN_CENTRE_MARGIN + 1} for a centred probe)")


def central_responses(feature_map: jax.Array) -> jax.Array:
    """``sum_c ReLU(F[n, h//2, w//2, c])`` per image: shape ``(N,)``, float32."""
    _, h, w, _ = feature_map.shape
    return jnp.maximum(feature_map[:, h // 2, w // 2, :].astype(jnp.float32), 0.0).sum(-1)


def batch_contribution(
    features_fn: Callable[[jax.Array], jax.Array], images: jax.Array, valid: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Pure ERF step for a batch of independent images.

    ``features_fn(images)`` is the probed feature map (or tokens). Returns the sum over the
    valid images with a finite map of ``sum_channels ReLU(d central / d image)``, ``(H, W)``;
    which images were used (valid and finite), ``(N,)``; and each image's central response.
    """
    def total(x: jax.Array) -> tuple[jax.Array, jax.Array]:
        points = jnp.where(valid, central_responses(as_feature_map(features_fn(x))), 0.0)
        return points.sum(), points

    grads, points = jax.grad(total, has_aux=True)(images)
    maps = jnp.maximum(grads.astype(jnp.float32), 0.0).sum(-1)
    used = valid & jnp.all(jnp.isfinite(maps), axis=(1, 2))
    return jnp.where(used[:, None, None], maps, 0.0).sum(0), used, points


@dataclasses.dataclass(frozen=True)
class BatchContribution:
    """One batch's result: the summed map of the used images, which were used, central values."""

    map_sum: np.ndarray
    used: np.ndarray
    central_points: np.ndarray


def _probe_step_impl(graphdef: nnx.GraphDef, feature_index: int, state: nnx.State, images: jax.Array,
                     valid: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """:func:`batch_contribution` of ``merge(graphdef, state).features(x)[feature_index]``.

    Only the input gradient is taken: the parameters are closed over, so no kernel or weight
    gradient is computed (custom VJPs see them as unperturbed and XLA drops their cotangents).
    """
    model = nnx.merge(graphdef, state)
    return batch_contribution(lambda x: model.features(x)[feature_index], images, valid)


# Jitted at module level with the graph definition static: models of one architecture
# (e.g. a supervised and a distilled ConvNeXt-T) share one compiled program.
_probe_step = jax.jit(_probe_step_impl, static_argnums=(0, 1))

# XLA:CPU's YNNPACK "reduce" library fusion (on by default in jax 0.10) grows from a
# LayerNorm's mean into the producing depthwise shift-add and, since it cannot fuse that
# chain's slices and broadcasts, materialises one full map per tap (49 per 7x7 layer): most of
# ConvNeXt-T's ERF time at 1024 px. The fast probe compiles without it (dot fusions kept).
CPU_COMPILER_OPTIONS: dict[str, str] = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
}


@functools.cache
def _fast_probe_step(backend: str) -> Callable[..., tuple[jax.Array, jax.Array, jax.Array]]:
    """The probe step with this backend's compiler options (one jitted function per backend)."""
    options = CPU_COMPILER_OPTIONS if backend == "cpu" else None
    return jax.jit(_probe_step_impl, static_argnums=(0, 1), compiler_options=options)


def fuse_reparameterizable(model: nnx.Module) -> int:
    """Fold every SLaK large-kernel op of ``model`` into one K x K kernel + bias, in place.

    Exact in eval mode (BatchNorm with running statistics is affine): the 51x5 + 5x51 + 5x5
    branches and their BatchNorms of SLaK (or the 7x7 conv + BN of the ConvNeXt+BN student)
    become one depthwise convolution. Returns the number of ops fused (already fused ones count).
    """
    from l2s_jax.models.slak import fuse_large_kernels

    return fuse_large_kernels(model)


class ContributionProbe:
    """A jitted ERF step for one model: an eval-mode view, split once, fixed batch size.

    ``probe(images)`` takes NHWC float32 images, at most ``batch_size`` of them (fewer are
    padded and masked, so every call reuses one compiled program per image size).

    ``fast=True`` (default) probes a re-parameterised view (:func:`fuse_reparameterizable`:
    SLaK's branches and BatchNorms folded into one kernel per op, exact in eval mode) and, on
    CPU, compiles with :data:`CPU_COMPILER_OPTIONS`; the map equals the plain path's
    (``fast=False``: the model's own layers, default compiler options) to float32 round-off.
    The caller's model is never modified.
    """

    def __init__(self, model: nnx.Module, *, batch_size: int = 4, feature_index: int = -1, fast: bool = True):
        if not callable(getattr(model, "features", None)):
            raise TypeError(f"{type(model).__name__} has no features(images) method to probe")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        view = nnx.merge(*nnx.split(model))
        view.eval()
        if fast:
            fuse_reparameterizable(view)
        self.batch_size = batch_size
        self.feature_index = feature_index
        self.fast = fast
        self.step_fn = _fast_probe_step(jax.default_backend()) if fast else _probe_step
        self._graphdef, self._state = nnx.split(view)
        self._checked: set[tuple[int, ...]] = set()

    def check_centre(self, shape: tuple[int, ...]) -> None:
        """Warn once per image shape when the probed map's centre is off-centre (shape inference only)."""
        if shape in self._checked:
            return
        self._checked.add(shape)
        model = nnx.merge(self._graphdef, self._state)
        images = jax.ShapeDtypeStruct(shape, jnp.float32)
        fmap = jax.eval_shape(lambda x: as_feature_map(model.features(x)[self.feature_index]), images)
        note = centre_note(fmap.shape[1], fmap.shape[2], shape[1:3])
        if note:
            warnings.warn(note, OffCentreWarning, stacklevel=3)

    def __call__(self, images: np.ndarray | jax.Array) -> BatchContribution:
        """The contribution of up to ``batch_size`` NHWC images."""
        if images.ndim != 4:
            raise ValueError(f"expected NHWC images, got shape {tuple(images.shape)}")
        n = images.shape[0]
        if not 1 <= n <= self.batch_size:
            raise ValueError(f"got {n} images; this probe takes 1 to {self.batch_size} per call")
        images = jnp.asarray(images, jnp.float32)
        if n < self.batch_size:
            images = jnp.pad(images, ((0, self.batch_size - n), (0, 0), (0, 0), (0, 0)))
        valid = jnp.arange(self.batch_size) < n
        self.check_centre(tuple(images.shape))
        step = self.step_fn(self._graphdef, self.feature_index, self._state, images, valid)
        map_sum, used, points = jax.device_get(step)
        return BatchContribution(np.asarray(map_sum), np.asarray(used[:n]), np.asarray(points[:n]))


@dataclasses.dataclass
class ContributionResult:
    """Maps accumulated over images: the float64 sum of the used ones, and the counts."""

    total: np.ndarray
    num_used: int = 0
    num_skipped: int = 0
    central_points: list[float] = dataclasses.field(default_factory=list)

    def add(self, batch: BatchContribution) -> None:
        """Accumulate one batch."""
        self.total += batch.map_sum
        self.num_used += int(batch.used.sum())
        self.num_skipped += int((~batch.used).sum())
        self.central_points.extend(float(p) for p in batch.central_points)

    def reduce(self, reduction: Reduction = "mean") -> np.ndarray:
        """The float32 map: the mean over the used images (the authors' saved matrix) or the sum."""
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
        if self.num_used == 0:
            raise ValueError(f"no usable image: all {self.num_skipped} maps were non-finite (NaN/inf)")
        out = self.total if reduction == "sum" else self.total / self.num_used
        return out.astype(np.float32)


def iter_batches(images: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    """Consecutive float32 batches; uint8 images are normalised on the fly."""
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        yield normalize_images(chunk) if chunk.dtype == np.uint8 else np.asarray(chunk, np.float32)


def accumulate(
    probe: ContributionProbe,
    batches: Iterable[np.ndarray],
    *,
    progress: bool = False,
    total: int | None = None,
    desc: str | None = None,
) -> ContributionResult:
    """Run ``probe`` over ``batches`` and accumulate; a tqdm bar over images if ``progress``."""
    result: ContributionResult | None = None
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc=desc, unit="img", file=sys.stderr)
    try:
        for batch in batches:
            out = probe(batch)
            if result is None:
                result = ContributionResult(np.zeros(out.map_sum.shape, np.float64))
            result.add(out)
            if bar is not None:
                bar.update(len(out.used))
    finally:
        if bar is not None:
            bar.close()
    if result is None:
        raise ValueError("no images to probe")
    return result


def contribution_map(
    model: nnx.Module,
    images: np.ndarray | jax.Array,
    *,
    batch_size: int = 4,
    reduction: Reduction = "mean",
    feature_index: int = -1,
    progress: bool = False,
    fast: bool = True,
) -> np.ndarray:
    """The ``H x W`` float32 ERF contribution map of ``model`` over NHWC ``images``.

    ``images`` are normalised float32 (see :func:`resize_for_erf`; 1024x1024 in the paper) or
    uint8 (normalised here with the ImageNet statistics). Per image: the input gradient of the
    summed ReLU of the central position of ``model.features(x)[feature_index]``, ReLU'd and
    summed over channels. ``reduction="mean"`` averages over the images (the authors' saved
    matrix), ``"sum"`` adds them. Images whose map is not finite are skipped, as the authors do.
    ``fast`` selects the probe's fused view and compiler options (see :class:`ContributionProbe`).
    """
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"expected NHWC images, got shape {images.shape}")
    probe = ContributionProbe(model, batch_size=min(batch_size, len(images)), feature_index=feature_index,
                              fast=fast)
    result = accumulate(probe, iter_batches(images, probe.batch_size), progress=progress, total=len(images))
    return result.reduce(reduction)


def compute_erfs(
    models: Mapping[str, nnx.Module | Callable[[], nnx.Module]],
    images: np.ndarray,
    *,
    batch_size: int = 1,
    progress: bool = True,
    fast: bool = True,
) -> dict[str, ContributionResult]:
    """:func:`accumulate` for several models on the same images (uint8 or float32 NHWC).

    A value may be a zero-argument loader instead of a model; it is called when that model's
    turn comes, so only one model is held at a time.
    """
    results = {}
    for name, entry in models.items():
        model = entry if isinstance(entry, nnx.Module) else entry()
        probe = ContributionProbe(model, batch_size=min(batch_size, len(images)), fast=fast)
        results[name] = accumulate(probe, iter_batches(images, probe.batch_size), progress=progress,
                                   total=len(images), desc=name)
        del model, probe
    return results


# ----------------------------------------------------------------------------- analysis


def normalize_erf(matrix: np.ndarray) -> np.ndarray:
    """The paper's display scaling ``log10(m + 1) / max``, in the matrix's own float dtype."""
    m = np.asarray(matrix)
    if not np.issubdtype(m.dtype, np.floating):
        m = m.astype(np.float64)
    data = np.log10(m + 1)
    return data / np.max(data)


@dataclasses.dataclass(frozen=True)
class HighContributionArea:
    """The smallest centred square holding more than ``threshold`` of the (normalised) map.

    ``side_length``/``area_ratio`` are None when no tested square qualifies; ``reason`` then
    says why. ``fraction`` is the share held by the square found (or by the largest tested).
    """

    threshold: float
    side_length: int | None
    area_ratio: float | None
    fraction: float | None
    reason: str | None = None

    @property
    def found(self) -> bool:
        """Whether a square qualified."""
        return self.side_length is not None


def _validate_map(matrix: np.ndarray) -> np.ndarray:
    m = np.asarray(matrix)
    if m.ndim != 2:
        raise ValueError(f"an ERF map is 2-D (H, W), got shape {m.shape}")
    if not np.all(np.isfinite(m)):
        raise ValueError("the ERF map has non-finite values")
    if np.any(m < 0):
        raise ValueError("the ERF map has negative values (a contribution map is a sum of ReLU'd gradients)")
    return m


def square_fractions(data: np.ndarray, *, authors_compat: bool = False, stop_above: float | None = None) -> np.ndarray:
    """Share of the total held by the centred square of side ``2i + 1`` for ``i = 1, 2, ...``.

    Entry ``i - 1`` is ``sum(square_i) / sum(data)`` computed exactly as ``get_rectangle`` does
    (numpy sums in the matrix's dtype). ``i`` runs to ``h//2 - 1`` (authors) or
    ``min(h, w)//2 - 1`` (general, so non-square maps stay inside); ``stop_above`` ends the scan
    at the first share above it.
    """
    h, w = data.shape
    last = h // 2 if authors_compat else min(h, w) // 2
    all_sum = np.sum(data)
    out = []
    for i in range(1, last):
        frac = np.sum(data[h // 2 - i:h // 2 + 1 + i, w // 2 - i:w // 2 + 1 + i]) / all_sum
        out.append(frac)
        if stop_above is not None and frac > stop_above:
            break
    return np.asarray(out, dtype=np.result_type(data.dtype, np.float32))


def high_contribution_area(
    matrix: np.ndarray,
    thresholds: Sequence[float] = THRESHOLDS,
    *,
    authors_compat: bool = False,
    normalize: bool = True,
) -> list[HighContributionArea]:
    """The paper's high-contribution area ratio of an ERF map, one entry per threshold.

    With ``normalize`` the map first gets ``log10(m + 1) / max`` (as in ``analyze_erf.py``).
    For threshold t: the first ``i >= 1`` whose centred ``(2i+1)``-square holds strictly more
    than t of the total (same sums, same order, same ``i`` range as ``get_rectangle``; the
    1x1 square is never tested). The area ratio is ``side**2 / (H * W)``; with
    ``authors_compat=True`` it is ``(side / 1024) ** 2`` whatever the size, reproducing the
    authors' numbers (identical for 1024x1024 maps). When no square qualifies (e.g. t = 0.99 on
    a map whose last row/column matter: the largest square tested is ``2*(h//2 - 1) + 1``),
    the entry has None values and a reason.
    """
    data = _validate_map(matrix)
    h, w = data.shape
    if not np.any(data > 0):
        reason = "the map is all zero: no input pixel contributes to the central response"
        return [HighContributionArea(float(t), None, None, None, reason) for t in thresholds]
    if normalize:
        data = normalize_erf(data)
    fractions = square_fractions(data, authors_compat=authors_compat, stop_above=max(thresholds))
    results = []
    for t in thresholds:
        hits = np.nonzero(fractions > t)[0]
        if hits.size:
            side = 2 * (int(hits[0]) + 1) + 1
            ratio = (side / AUTHORS_AREA_DENOMINATOR) ** 2 if authors_compat else side ** 2 / (h * w)
            results.append(HighContributionArea(float(t), side, ratio, float(fractions[hits[0]])))
            continue
        if fractions.size == 0:
            reason = f"the {h}x{w} map is too small: no centred square of side >= 3 fits"
            results.append(HighContributionArea(float(t), None, None, None, reason))
            continue
        largest = 2 * fractions.size + 1
        reason = (f"no centred square up to side {largest} holds more than {t} of the {h}x{w} map "
                  f"(it holds {float(fractions[-1]):.6f}); like the authors' get_rectangle, the scan stops "
                  f"at i = {fractions.size}")
        results.append(HighContributionArea(float(t), None, None, float(fractions[-1]), reason))
    return results


def area_rows(
    maps: Mapping[str, np.ndarray], thresholds: Sequence[float] = THRESHOLDS, *, authors_compat: bool = False
) -> list[dict[str, Any]]:
    """The area-ratio table: one row per (model, threshold)."""
    rows = []
    for name, m in maps.items():
        for a in high_contribution_area(m, thresholds, authors_compat=authors_compat):
            rows.append({"model": name, "shape": list(np.shape(m)), **dataclasses.asdict(a)})
    return rows


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """A fixed-width text table of :func:`area_rows`."""
    lines = [f"{'model':<28} {'threshold':>9} {'side':>6} {'area ratio':>12} {'fraction':>9}"]
    for r in rows:
        side = "-" if r["side_length"] is None else str(r["side_length"])
        ratio = "none" if r["area_ratio"] is None else f"{r['area_ratio']:.6f}"
        frac = "-" if r["fraction"] is None else f"{r['fraction']:.4f}"
        lines.append(f"{r['model']:<28} {r['threshold']:>9g} {side:>6} {ratio:>12} {frac:>9}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- plots and files


def plot_erf(
    maps: Mapping[str, np.ndarray],
    path: str | os.PathLike | None = None,
    *,
    cmap: str = "RdYlGn",
    panel_size: float = 4.0,
    annotate: bool = True,
    dpi: int = 100,
):
    """Figure-1-style heatmaps, one panel per model side by side; saved to ``path`` if given.

    Each map is shown as ``log10(m + 1) / max`` on a shared [0, 1] colour scale with a colour
    bar; ``annotate`` adds the area ratios at t = 0.2 and 0.99 to the titles. Uses the Agg
    canvas (no display needed). Returns the ``matplotlib.figure.Figure``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not maps:
        raise ValueError("plot_erf needs at least one map")
    fig = Figure(figsize=(panel_size * len(maps) + 1.0, panel_size + 0.6), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(maps), squeeze=False)[0]
    image = None
    for ax, (name, m) in zip(axes, maps.items()):
        m = _validate_map(m)
        shown = normalize_erf(m) if np.any(m > 0) else np.zeros_like(m, np.float32)
        image = ax.imshow(shown, cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
        title = name
        if annotate:
            areas = high_contribution_area(m, (0.2, 0.99))
            parts = [f"t={a.threshold:g}: " + ("n/a" if a.area_ratio is None else f"{100 * a.area_ratio:.2f}%")
                     for a in areas]
            title += "\n" + ", ".join(parts)
        ax.set_title(title, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(image, ax=list(axes), shrink=0.85, label="log10(m + 1) / max")
    if path is not None:
        fig.savefig(path)
    return fig


def safe_name(name: str) -> str:
    """A file-name-safe version of a model name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "model"


def write_outputs(
    maps: Mapping[str, np.ndarray],
    out_dir: str | os.PathLike,
    *,
    thresholds: Sequence[float] = THRESHOLDS,
    authors_compat: bool = False,
    metadata: Mapping[str, Any] | None = None,
) -> dict[str, Path]:
    """Write ``<model>.npy`` maps, ``erf_areas.json``/``.csv`` and ``erf.png`` to ``out_dir``.

    Returns the written paths: ``"<model>.npy"`` per model, ``"json"``, ``"csv"``, ``"png"``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    names = {name: safe_name(name) for name in maps}
    if len(set(names.values())) != len(names):
        raise ValueError(f"model names collide as file names: {sorted(names)}")
    for name, m in maps.items():
        paths[f"{name}.npy"] = out / f"{names[name]}.npy"
        np.save(paths[f"{name}.npy"], np.asarray(m, np.float32))
    rows = area_rows(maps, thresholds, authors_compat=authors_compat)
    paths["json"] = out / "erf_areas.json"
    paths["json"].write_text(json.dumps({"metadata": dict(metadata or {}), "rows": rows}, indent=2) + "\n")
    paths["csv"] = out / "erf_areas.csv"
    with open(paths["csv"], "w", newline="") as f:
        fields = ["model", "threshold", "side_length", "area_ratio", "fraction", "reason"]
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    paths["png"] = out / "erf.png"
    plot_erf(maps, paths["png"])
    return paths


# ----------------------------------------------------------------------------- notebook


def run_notebook(
    path: str | os.PathLike,
    parameters: Mapping[str, Any],
    out: str | os.PathLike,
    *,
    timeout: int = 3600,
    kernel_name: str = "python3",
    cwd: str | os.PathLike | None = None,
) -> Path:
    """Execute a notebook headless through papermill; write the executed copy to ``out``.

    papermill injects ``parameters`` as a cell tagged ``injected-parameters`` right after the
    cell tagged ``parameters``. ``out`` is a ``.ipynb`` path or a directory (the notebook's file
    name is used). Cells run in ``cwd`` (default: the notebook's folder). A failing cell raises
    papermill's ``PapermillExecutionError`` (with its traceback); the partly executed notebook is
    still written.
    """
    import papermill

    src = Path(path)
    if not src.is_file():
        raise FileNotFoundError(f"notebook {src} does not exist")
    target = Path(out)
    if target.suffix != ".ipynb":
        target = target / src.name
    target.parent.mkdir(parents=True, exist_ok=True)
    papermill.execute_notebook(str(src), str(target), parameters=dict(parameters), kernel_name=kernel_name,
                               cwd=str(cwd or src.parent), execution_timeout=timeout, progress_bar=False,
                               log_output=False)
    return target
