"""A procedurally generated demo dataset whose class is decided by long-range structure.

Every image holds exactly two saturated *markers* (small bars, horizontal or vertical, in one
of three colours) placed far apart (centre distance >= 0.45 * size) on a distracting texture:
a smooth low-saturation colour field, pixel noise, thin grey strokes and several grey bars of
the very same shapes as the markers. The four classes are the relation between the markers::

    0 same colour,      same orientation      2 different colour, same orientation
    1 same colour,      different orientation 3 different colour, different orientation

Why this needs a large receptive field. Each marker on its own is drawn uniformly (colour,
orientation, position) whatever the class, so any patch that contains at most one marker
carries no information about the label; positions do not depend on the class either. The
rule is a comparison between two locations at least ``0.45 * size`` apart, quadratic in the
pixels (a linear model on the whole image is also at chance): a network must bring both
markers into one receptive field, which a large kernel does in one layer (a ring-shaped
kernel is a matched filter for "same colour at a distance") and a small-kernel network only
after several layers. The label is invariant to horizontal flips and to crops that keep both
markers (markers keep a 12.5 % margin from the border, so centre crops with crop_pct >= 0.75
never cut them).

It is a TFDS ``GeneratorBasedBuilder`` (features: ``image`` uint8 ``Tensor`` (S, S, 3),
``label`` ``ClassLabel(4)``) that builds to ArrayRecord without TensorFlow in seconds and is
read through the same ``as_data_source`` -> grain path as ImageNet. Generation is a pure
function of (seed, split, index), so builds are deterministic. :func:`prepare_demo` builds on
first use; :func:`oracle_label` recovers the label from pixels alone (100 %).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import NamedTuple

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from scipy import ndimage

from l2s_jax.data.sources import default_data_dir

DEMO_NAME = "l2s_demo"
CLASS_NAMES: tuple[str, ...] = (
    "same_colour_same_orientation",
    "same_colour_different_orientation",
    "different_colour_same_orientation",
    "different_colour_different_orientation",
)
NUM_CLASSES = len(CLASS_NAMES)
# Marker palette (RGB centres): red, green, blue. Marker pixels have saturation > 100, background <= 50.
MARKER_COLOURS = np.array([[215, 35, 35], [30, 200, 40], [45, 75, 225]], np.float32)
ORIENTATIONS: tuple[str, ...] = ("horizontal", "vertical")
_SPLIT_CODES = {"train": 0, "test": 1}
_BACKGROUND_MAX_SATURATION = 50.0
ORACLE_SATURATION_THRESHOLD = 90.0
MIN_DISTANCE_FRACTION = 0.45
MARGIN_FRACTION = 0.125
_GRID = 4  # the smooth background field is a bilinear upsampling of a _GRID x _GRID grid


def marker_size(image_size: int) -> int:
    """The odd side m of a marker's bounding box (bars are m x t): 5 at 32 px, 7 at 48 px."""
    return max(5, int(image_size * 0.15) | 1)


def bar_thickness(image_size: int) -> int:
    """The odd short side t of a marker bar: 3 at 32 and 48 px."""
    half = marker_size(image_size) // 2
    return half if half % 2 else half + 1


class Marker(NamedTuple):
    """One marker: top-left corner (row, col), colour index, orientation index."""

    row: int
    col: int
    colour: int
    orientation: int


def bar_mask(image_size: int, orientation: int) -> np.ndarray:
    """The boolean (h, w) footprint of a bar: (t, m) horizontal, (m, t) vertical."""
    m, t = marker_size(image_size), bar_thickness(image_size)
    shape = (t, m) if orientation == 0 else (m, t)
    return np.ones(shape, bool)


def label_of(a: Marker, b: Marker) -> int:
    """The class of a marker pair: 2 * (colours differ) + (orientations differ)."""
    return 2 * int(a.colour != b.colour) + int(a.orientation != b.orientation)


def _sample_pair(rng: np.random.Generator, image_size: int, label: int) -> tuple[Marker, Marker]:
    """Two markers realising ``label``; each marker alone is uniform whatever the label."""
    margin = max(1, round(MARGIN_FRACTION * image_size))
    m = marker_size(image_size)
    min_dist = MIN_DISTANCE_FRACTION * image_size
    if image_size - 2 * margin - m < min_dist:
        raise ValueError(
            f"image_size {image_size} is too small for two markers of size {m} at distance "
            f">= {min_dist:.1f} within a {margin}-pixel margin; use a larger image_size"
        )
    diff_colour, diff_orient = divmod(label, 2)
    colour_a = int(rng.integers(3))
    colour_b = (colour_a + int(rng.integers(1, 3))) % 3 if diff_colour else colour_a
    orient_a = int(rng.integers(2))
    orient_b = 1 - orient_a if diff_orient else orient_a
    shapes = [bar_mask(image_size, o).shape for o in (orient_a, orient_b)]
    while True:
        corners = [rng.integers(margin, image_size - margin - np.array(hw) + 1) for hw in shapes]
        centres = [c + (np.array(hw) - 1) / 2 for c, hw in zip(corners, shapes)]
        if np.linalg.norm(centres[0] - centres[1]) >= min_dist:
            break
    (r0, c0), (r1, c1) = corners
    return Marker(int(r0), int(c0), colour_a, orient_a), Marker(int(r1), int(c1), colour_b, orient_b)


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
        mask = bar_mask(s, int(rng.integers(2)))
        r = int(rng.integers(0, s - mask.shape[0] + 1))
        c = int(rng.integers(0, s - mask.shape[1] + 1))
        shade = rng.uniform(30, 230) + rng.uniform(-20, 20, size=3)
        img[r : r + mask.shape[0], c : c + mask.shape[1]][mask] = shade
    return _limit_saturation(img, _BACKGROUND_MAX_SATURATION)


def render(rng: np.random.Generator, image_size: int, label: int) -> tuple[np.ndarray, tuple[Marker, Marker]]:
    """One (S, S, 3) uint8 image of class ``label`` and its two markers."""
    if not 0 <= label < NUM_CLASSES:
        raise ValueError(f"label must be in [0, {NUM_CLASSES}), got {label}")
    pair = _sample_pair(rng, image_size, label)
    img = _background(rng, image_size)
    for marker in pair:
        mask = bar_mask(image_size, marker.orientation)
        colour = MARKER_COLOURS[marker.colour] + rng.uniform(-10, 10, size=3)
        pixels = colour + rng.normal(0, 3, size=(*mask.shape, 3))
        h, w = mask.shape
        img[marker.row : marker.row + h, marker.col : marker.col + w] = pixels
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), pair


def example_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator for one example: a pure function of (seed, split, index)."""
    return np.random.default_rng([seed, _SPLIT_CODES[split], index])


def generate(
    split: str, num_examples: int, image_size: int = 32, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, list[tuple[Marker, Marker]]]:
    """Images (N, S, S, 3) uint8, labels (N,) int32 and markers of a split, in index order.

    Labels cycle 0, 1, 2, 3, ... so every class has ``num_examples // 4`` or one more examples.
    """
    images = np.empty((num_examples, image_size, image_size, 3), np.uint8)
    labels = np.arange(num_examples, dtype=np.int32) % NUM_CLASSES
    markers = []
    for i in range(num_examples):
        images[i], pair = render(example_rng(seed, split, i), image_size, int(labels[i]))
        markers.append(pair)
    return images, labels, markers


def find_markers(image: np.ndarray) -> list[Marker]:
    """The saturated components of an uint8 image as markers (colour by nearest palette entry)."""
    img = image.astype(np.float32)
    saturation = img.max(axis=-1) - img.min(axis=-1)
    components, count = ndimage.label(saturation > ORACLE_SATURATION_THRESHOLD)
    markers = []
    for k, box in enumerate(ndimage.find_objects(components), start=1):
        rows, cols = box
        mean = img[components == k].mean(axis=0)
        colour = int(np.argmin(np.linalg.norm(MARKER_COLOURS - mean, axis=1)))
        height, width = rows.stop - rows.start, cols.stop - cols.start
        markers.append(Marker(rows.start, cols.start, colour, int(height > width)))
    return markers


def oracle_label(image: np.ndarray) -> int:
    """The label computed from pixels by the global rule (find both markers, compare them)."""
    markers = find_markers(image)
    if len(markers) != 2:
        raise ValueError(f"expected exactly 2 markers, found {len(markers)}")
    return label_of(*markers)


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
    """The l2s demo dataset (see the module docstring): two far-apart markers decide the class."""

    name = DEMO_NAME
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Marker-relation dataset (colour x orientation, 4 classes)."}
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
    """The demo builder for these parameters under ``data_dir`` (not necessarily built yet)."""
    config = demo_config(image_size, num_train, num_test, seed)
    # TFDS refuses a config object named like a predefined one: pass the predefined one by name.
    predefined = {c.name for c in L2SDemo.BUILDER_CONFIGS}
    return L2SDemo(
        config=config.name if config.name in predefined else config,
        data_dir=default_data_dir(data_dir),
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
        builder.download_and_prepare(download_dir=os.path.join(default_data_dir(data_dir), "downloads"))
    return builder
