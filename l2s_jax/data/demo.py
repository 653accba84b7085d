"""A procedurally generated demo dataset whose class is decided by long-range structure.

Every image holds three saturated *dots* of one colour (red, green or blue, chosen per image),
equally spaced on a straight line with spacing 0.27-0.33 x the image side, on a distracting
texture that carries no class information: a smooth low-saturation colour field, pixel noise,
thin grey strokes and grey bars. The class is the orientation of the line, folded so that a
horizontal flip keeps the label::

    0 horizontal (0 deg)   1 +-30 deg   2 +-60 deg   3 vertical (90 deg)

Why this needs a large receptive field. A single dot looks the same in every class (colour and
the sign of the angle are drawn independently of the label; neighbouring dots are >= 8 px apart
at 32 px), so a patch holding one dot says nothing about the class: the label is the *relative
direction* of dots a third of the image apart. A large depthwise kernel is a matched filter for
"a dot of my colour at this offset" and solves it in one layer; a small-kernel network needs
several layers to relate the dots. The label is invariant to horizontal flips, to aspect-ratio
jitter up to 4:3 (angles stay on the same side of the class boundaries 15, 45, 75 deg) and to crops
that keep the dots (a 10 % margin: centre crops with crop_pct >= 0.875 never cut them).

What is NOT hidden: the dots must fit in the square, so where a line can lie depends on its
orientation (a horizontal line's middle dot is near the centre column). A linear model with
positional weights on the saturation map therefore reads some of the class (about 60 % at
32 px, chance 25 %); a patch-level probe is at chance (tests/test_demo_data.py).

It is a TFDS ``GeneratorBasedBuilder`` (features: ``image`` uint8 ``Tensor`` (S, S, 3),
``label`` ``ClassLabel(4)``) that builds to ArrayRecord without TensorFlow in seconds and is
read through the same ``as_data_source`` -> grain path as ImageNet. Generation is a pure
function of (seed, split, index), so builds are deterministic. :func:`prepare_demo` builds on
first use; :func:`oracle_label` recovers the label from the pixels alone (100 %).
"""

from __future__ import annotations

import dataclasses
import functools
import os

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from scipy import ndimage

DEMO_NAME = "l2s_demo"
CLASS_NAMES: tuple[str, ...] = ("horizontal", "oblique_30", "oblique_60", "vertical")
LINE_ANGLES: tuple[float, ...] = (0.0, 30.0, 60.0, 90.0)  # degrees from horizontal, per class
NUM_CLASSES = len(CLASS_NAMES)
NUM_DOTS = 3
# Dot palette (RGB centres): red, green, blue. Dot pixels have saturation > 100, background <= 50.
DOT_COLOURS = np.array([[215, 35, 35], [30, 200, 40], [45, 75, 225]], np.float32)
_SPLIT_CODES = {"train": 0, "test": 1}
_BACKGROUND_MAX_SATURATION = 50.0
ORACLE_SATURATION_THRESHOLD = 90.0
SPACING_FRACTION = (0.27, 0.33)  # distance between neighbouring dots, in image sides
MARGIN_FRACTION = 0.1
_GRID = 4  # the smooth background field is a bilinear upsampling of a _GRID x _GRID grid


def dot_size(image_size: int) -> int:
    """The odd side of a (square) dot: 3 at 32 px, 5 at 48 px, 7 at 64 px."""
    return max(3, int(image_size * 0.1) | 1)


def _bar_shape(image_size: int, vertical: bool) -> tuple[int, int]:
    """(h, w) of a grey decoy bar: 3 x 5 or 5 x 3 at 32 px."""
    long_side = max(5, int(image_size * 0.15) | 1)
    short_side = max(3, (long_side // 2) | 1)
    return (long_side, short_side) if vertical else (short_side, long_side)


def sample_line(rng: np.random.Generator, image_size: int, label: int) -> np.ndarray:
    """(NUM_DOTS, 2) integer (row, col) dot centres on a line of the class's orientation."""
    m = dot_size(image_size)
    margin = max(1, round(MARGIN_FRACTION * image_size))
    lo, hi = margin + m // 2, image_size - 1 - margin - m // 2
    max_extent = (NUM_DOTS - 1) * SPACING_FRACTION[1] * image_size
    if hi - lo < max_extent:
        raise ValueError(
            f"image_size {image_size} is too small for {NUM_DOTS} dots of size {m} spaced up to "
            f"{SPACING_FRACTION[1]} x the side within a {margin}-pixel margin; use a larger image_size"
        )
    angle = np.deg2rad(LINE_ANGLES[label]) * (1.0 if rng.random() < 0.5 else -1.0)
    spacing = rng.uniform(*SPACING_FRACTION) * image_size
    step = spacing * np.array([-np.sin(angle), np.cos(angle)])
    offsets = np.outer(np.arange(NUM_DOTS) - (NUM_DOTS - 1) / 2, step)
    extent = offsets.max(axis=0)
    middle = rng.uniform(lo + extent, hi - extent)
    return np.rint(middle + offsets).astype(int)


def _limit_saturation(img: np.ndarray, max_saturation: float) -> np.ndarray:
    """Shrink each pixel's channels towards their mean so that max - min <= max_saturation."""
    mean = img.mean(axis=-1, keepdims=True)
    sat = img.max(axis=-1, keepdims=True) - img.min(axis=-1, keepdims=True)
    scale = np.minimum(1.0, max_saturation / np.maximum(sat, 1e-6))
    return mean + (img - mean) * scale


@functools.lru_cache(maxsize=8)
def _upsampling_matrix(image_size: int) -> np.ndarray:
    """The (S, _GRID) matrix of corner-aligned linear interpolation from _GRID to S samples."""
    pos = np.linspace(0, _GRID - 1, image_size)
    lower = np.clip(np.floor(pos).astype(int), 0, _GRID - 2)
    frac = pos - lower
    mat = np.zeros((image_size, _GRID))
    mat[np.arange(image_size), lower] = 1 - frac
    mat[np.arange(image_size), lower + 1] = frac
    return mat


def _background(rng: np.random.Generator, image_size: int) -> np.ndarray:
    """Class-independent texture: smooth field + noise + grey strokes + grey decoy bars."""
    s = image_size
    coarse = rng.uniform(70, 190, size=(_GRID, _GRID, 1)) + rng.uniform(-30, 30, size=(_GRID, _GRID, 3))
    up = _upsampling_matrix(s)
    img = np.einsum("ig,ghc,jh->ijc", up, coarse, up, optimize=True)
    img += 10.0 * rng.standard_normal(size=(s, s, 3))
    for _ in range(int(rng.integers(2, 5))):
        r0, c0, r1, c1 = rng.integers(0, s, size=4)
        n = int(max(abs(r1 - r0), abs(c1 - c0))) + 1
        rr = np.linspace(r0, r1, n).round().astype(int)
        cc = np.linspace(c0, c1, n).round().astype(int)
        img[rr, cc] = rng.uniform(30, 230) + rng.uniform(-15, 15, size=3)
    for _ in range(int(rng.integers(3, 7))):
        h, w = _bar_shape(s, bool(rng.integers(2)))
        r = int(rng.integers(0, s - h + 1))
        c = int(rng.integers(0, s - w + 1))
        img[r : r + h, c : c + w] = rng.uniform(30, 230) + rng.uniform(-20, 20, size=3)
    return _limit_saturation(img, _BACKGROUND_MAX_SATURATION)


def render(rng: np.random.Generator, image_size: int, label: int) -> tuple[np.ndarray, np.ndarray]:
    """One (S, S, 3) uint8 image of class ``label`` and its (NUM_DOTS, 2) dot centres."""
    if not 0 <= label < NUM_CLASSES:
        raise ValueError(f"label must be in [0, {NUM_CLASSES}), got {label}")
    centres = sample_line(rng, image_size, label)
    img = _background(rng, image_size)
    colour = DOT_COLOURS[int(rng.integers(len(DOT_COLOURS)))] + rng.uniform(-10, 10, size=3)
    m = dot_size(image_size)
    for row, col in centres:
        top, left = row - m // 2, col - m // 2
        img[top : top + m, left : left + m] = colour + rng.normal(0, 3, size=(m, m, 3))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), centres


def example_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator for one example: a pure function of (seed, split, index)."""
    return np.random.default_rng([seed, _SPLIT_CODES[split], index])


def generate(
    split: str, num_examples: int, image_size: int = 32, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images (N, S, S, 3) uint8, labels (N,) int32 and dot centres (N, 3, 2) of a split.

    Labels cycle 0, 1, 2, 3, ... so every class has ``num_examples // 4`` or one more examples.
    """
    images = np.empty((num_examples, image_size, image_size, 3), np.uint8)
    labels = np.arange(num_examples, dtype=np.int32) % NUM_CLASSES
    centres = np.empty((num_examples, NUM_DOTS, 2), np.int64)
    for i in range(num_examples):
        images[i], centres[i] = render(example_rng(seed, split, i), image_size, int(labels[i]))
    return images, labels, centres


def find_dots(image: np.ndarray) -> np.ndarray:
    """(K, 2) centroids (row, col) of the saturated components of a uint8 RGB image."""
    img = image.astype(np.float32)
    saturated = img.max(axis=-1) - img.min(axis=-1) > ORACLE_SATURATION_THRESHOLD
    components, count = ndimage.label(saturated)
    return np.asarray(ndimage.center_of_mass(saturated, components, range(1, count + 1))).reshape(-1, 2)


def line_angle(centres: np.ndarray) -> float:
    """The folded orientation in [0, 90] degrees of the line through the two farthest dots."""
    diffs = centres[:, None, :] - centres[None, :, :]
    i, j = np.unravel_index(np.argmax(np.square(diffs).sum(-1)), diffs.shape[:2])
    d_row, d_col = np.abs(centres[i] - centres[j])
    return float(np.degrees(np.arctan2(d_row, d_col)))


def oracle_label(image: np.ndarray) -> int:
    """The label computed from pixels by the global rule (find the dots, measure the line)."""
    centres = find_dots(image)
    if len(centres) != NUM_DOTS:
        raise ValueError(f"expected {NUM_DOTS} dots, found {len(centres)}")
    return int(np.argmin(np.abs(np.asarray(LINE_ANGLES) - line_angle(centres))))


@dataclasses.dataclass(eq=False)
class DemoConfig(tfds.core.BuilderConfig):
    """Size, split sizes and seed of a demo build (the name encodes all of them)."""

    image_size: int = 32
    num_train: int = 4000
    num_test: int = 1000
    seed: int = 0


def demo_config(image_size: int = 32, num_train: int = 4000, num_test: int = 1000, seed: int = 0) -> DemoConfig:
    """A :class:`DemoConfig` whose name identifies its parameters (its folder in data_dir)."""
    for field, value in (("image_size", image_size), ("num_train", num_train), ("num_test", num_test)):
        if value <= 0:
            raise ValueError(f"{field} must be positive, got {value}")
    return DemoConfig(
        name=f"s{image_size}_train{num_train}_test{num_test}_seed{seed}",
        description=f"{image_size}px, {num_train} train / {num_test} test images, seed {seed}",
        image_size=image_size,
        num_train=num_train,
        num_test=num_test,
        seed=seed,
    )


class L2SDemo(tfds.core.GeneratorBasedBuilder):
    """The l2s demo dataset (see the module docstring): far-apart dots decide the class."""

    name = DEMO_NAME
    VERSION = tfds.core.Version("2.0.0")
    RELEASE_NOTES = {
        "1.0.0": "Same/different colour and orientation of two markers (too slow to learn for a demo).",
        "2.0.0": "Orientation of a line of three far-apart dots (4 classes).",
    }
    BUILDER_CONFIGS = [demo_config()]
    # TFDS derives this from package resources, which needs the optional importlib_resources
    # for some installs (e.g. editable ones); the builder's own file is the right answer.
    code_path = epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        """Features: image uint8 (S, S, 3) Tensor and a 4-way ClassLabel."""
        size = self.builder_config.image_size
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=(size, size, 3), dtype=np.uint8),
                    "label": tfds.features.ClassLabel(names=list(CLASS_NAMES)),
                }
            ),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        """The train and test splits; nothing is downloaded."""
        del dl_manager
        cfg = self.builder_config
        return {
            "train": self._generate_examples("train", cfg.num_train),
            "test": self._generate_examples("test", cfg.num_test),
        }

    def _generate_examples(self, split: str, num_examples: int):
        """(key, example) pairs; example i of a split depends only on (seed, split, i)."""
        cfg = self.builder_config
        for i in range(num_examples):
            label = i % NUM_CLASSES
            image, _ = render(example_rng(cfg.seed, split, i), cfg.image_size, label)
            yield i, {"image": image, "label": label}


def demo_builder(
    data_dir: str | os.PathLike | None = None,
    *,
    image_size: int = 32,
    num_train: int = 4000,
    num_test: int = 1000,
    seed: int = 0,
) -> L2SDemo:
    """The demo builder for these parameters under ``data_dir`` (TFDS's default data_dir when None:
    ``$TFDS_DATA_DIR`` or ~/tensorflow_datasets), not necessarily built yet.

    One builder per (data_dir, parameters) and process: TFDS logs "Using custom data
    configuration" for every builder made from a config object, and a run opens the demo
    several times (sizes of both splits, then the splits themselves).
    """
    return _demo_builder(os.fspath(data_dir) if data_dir else None, image_size, num_train, num_test, seed)


@functools.lru_cache(maxsize=16)
def _demo_builder(data_dir: str | None, image_size: int, num_train: int, num_test: int, seed: int) -> L2SDemo:
    config = demo_config(image_size, num_train, num_test, seed)
    # TFDS refuses a config object named like a predefined one: pass the predefined one by name.
    predefined = {c.name for c in L2SDemo.BUILDER_CONFIGS}
    return L2SDemo(
        config=config.name if config.name in predefined else config,
        data_dir=data_dir,
        file_format="array_record",
    )


def prepare_demo(
    data_dir: str | os.PathLike | None = None,
    *,
    image_size: int = 32,
    num_train: int = 4000,
    num_test: int = 1000,
    seed: int = 0,
) -> L2SDemo:
    """The demo builder, built to ArrayRecord under ``data_dir`` on first use (seconds)."""
    builder = demo_builder(data_dir, image_size=image_size, num_train=num_train, num_test=num_test, seed=seed)
    if not builder.is_prepared():
        builder.download_and_prepare()  # downloads nothing; TFDS's download_dir is DATA_DIR/downloads
    return builder
