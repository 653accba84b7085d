"""The demo dataset: deterministic TFDS build, balance, and only a global rule decides the class."""

import hashlib

import numpy as np
import pytest

from l2s_jax.data import demo
from l2s_jax.data.transforms import EvalTransform

SIZE = 32


@pytest.fixture(scope="module")
def generated():
    """1200 train / 600 test images with their markers."""
    return demo.generate("train", 1200, SIZE, seed=0), demo.generate("test", 600, SIZE, seed=0)


def read_split(builder, split: str) -> tuple[np.ndarray, np.ndarray]:
    """All images and labels of a built split, in storage order."""
    source = builder.as_data_source(split)
    records = [source[i] for i in range(len(source))]
    return np.stack([r["image"] for r in records]), np.array([r["label"] for r in records])


def digests(images: np.ndarray) -> list[str]:
    """Sorted content hashes of images (order-free comparison)."""
    return sorted(hashlib.sha1(im.tobytes()).hexdigest() for im in images)


def test_build_is_deterministic_balanced_and_matches_the_generator(tmp_path):
    kwargs = dict(image_size=SIZE, num_train=40, num_test=20, seed=7)
    first = demo.prepare_demo(tmp_path / "a", **kwargs)
    second = demo.prepare_demo(tmp_path / "b", **kwargs)
    assert first.data_dir.endswith("s32_train40_test20_seed7/1.0.0")
    for split, n in (("train", 40), ("test", 20)):
        images_a, labels_a = read_split(first, split)
        images_b, labels_b = read_split(second, split)
        assert images_a.shape == (n, SIZE, SIZE, 3) and images_a.dtype == np.uint8
        np.testing.assert_array_equal(images_a, images_b)
        np.testing.assert_array_equal(labels_a, labels_b)
        assert np.bincount(labels_a, minlength=4).tolist() == [n // 4] * 4
        expected_images, expected_labels, _ = demo.generate(split, n, SIZE, seed=7)
        assert digests(images_a) == digests(expected_images)
        assert [demo.oracle_label(im) for im in images_a] == labels_a.tolist()
    other_seed, _, _ = demo.generate("train", 40, SIZE, seed=8)
    assert digests(other_seed) != digests(read_split(first, "train")[0])
    assert demo.prepare_demo(tmp_path / "a", **kwargs).is_prepared()  # reused, not rebuilt


def test_default_parameters_use_the_predefined_config(tmp_path):
    builder = demo.demo_builder(tmp_path)
    assert builder.builder_config is demo.L2SDemo.BUILDER_CONFIGS[0]
    assert (builder.builder_config.image_size, builder.builder_config.num_train) == (32, 4000)
    assert not builder.is_prepared()
    assert demo.demo_builder(tmp_path, num_train=8).builder_config.num_train == 8


def test_each_marker_alone_is_independent_of_the_class(generated):
    (_, labels, markers), _ = generated
    colours = np.array([[m.colour for m in pair] for pair in markers])
    orients = np.array([[m.orientation for m in pair] for pair in markers])
    for c in range(4):
        sel = labels == c
        # Marginal of one marker: uniform colours and orientations within every class.
        assert np.all(np.abs(np.bincount(colours[sel, 0], minlength=3) / sel.sum() - 1 / 3) < 0.08)
        assert abs(orients[sel, 0].mean() - 0.5) < 0.08
        same_colour = colours[sel, 0] == colours[sel, 1]
        same_orient = orients[sel, 0] == orients[sel, 1]
        assert np.all(same_colour == (c < 2)) and np.all(same_orient == (c % 2 == 0))
    for pair in markers:
        centres = [np.add((m.row, m.col), (np.array(demo.bar_mask(SIZE, m.orientation).shape) - 1) / 2) for m in pair]
        assert np.linalg.norm(centres[0] - centres[1]) >= demo.MIN_DISTANCE_FRACTION * SIZE


def test_oracle_recovers_every_label_and_respects_flips_and_centre_crops(generated):
    (images, labels, _), (test_images, test_labels, _) = generated
    assert [demo.oracle_label(im) for im in images] == labels.tolist()
    assert [demo.oracle_label(im) for im in test_images] == test_labels.tolist()
    assert [demo.oracle_label(im[:, ::-1]) for im in test_images[:200]] == test_labels[:200].tolist()
    crop = EvalTransform(size=SIZE, crop_pct=0.875)
    assert [demo.oracle_label(np.asarray(crop.crop(im))) for im in test_images[:200]] == test_labels[:200].tolist()
    assert demo.oracle_label(demo.generate("test", 4, 48, seed=3)[0][2]) == 2


def ridge_probe(train_x, train_y, test_x, test_y, lam: float = 0.01) -> float:
    """Test accuracy of a one-vs-all ridge regression classifier on standardised features."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    a = np.c_[(train_x - mean) / std, np.ones(len(train_x))]
    b = np.c_[(test_x - mean) / std, np.ones(len(test_x))]
    targets = np.eye(int(train_y.max()) + 1)[train_y]
    weights = np.linalg.solve(a.T @ a + lam * len(a) * np.eye(a.shape[1]), a.T @ targets)
    return float(np.mean(np.argmax(b @ weights, axis=1) == test_y))


def marker_patches(images, markers, which: int) -> np.ndarray:
    """Flattened (m + 4)-pixel square patches centred on marker ``which`` of every image."""
    p = demo.marker_size(SIZE) + 4
    out = []
    for image, pair in zip(images, markers):
        m = pair[which]
        h, w = demo.bar_mask(SIZE, m.orientation).shape
        r, c = m.row + h // 2 - p // 2 + p, m.col + w // 2 - p // 2 + p
        padded = np.pad(image, ((p, p), (p, p), (0, 0)), mode="edge")
        out.append(padded[r : r + p, c : c + p].reshape(-1))
    return np.asarray(out, np.float64) / 255


def test_local_patches_are_at_chance_while_the_probe_itself_works(generated):
    (images, labels, markers), (test_images, test_labels, test_markers) = generated
    chance_band = 0.25 + 4 * np.sqrt(0.25 * 0.75 / len(test_labels))  # 4 sigma above chance
    train_p, test_p = marker_patches(images, markers, 0), marker_patches(test_images, test_markers, 0)
    # Positive control: the same probe reads a local property (the marker's colour) perfectly.
    colour = np.array([pair[0].colour for pair in markers])
    test_colour = np.array([pair[0].colour for pair in test_markers])
    assert ridge_probe(train_p, colour, test_p, test_colour) > 0.95
    # A patch around one marker says nothing about the class ...
    assert ridge_probe(train_p, labels, test_p, test_labels) < chance_band
    # ... nor do random 8x8 patches, nor a linear model of the whole image (the rule is quadratic).
    rng = np.random.default_rng(0)

    def random_patches(x):
        rc = rng.integers(0, SIZE - 8 + 1, size=(len(x), 2))
        return np.stack([im[r : r + 8, c : c + 8].reshape(-1) for im, (r, c) in zip(x, rc)]) / 255.0

    assert ridge_probe(random_patches(images), labels, random_patches(test_images), test_labels) < chance_band
    flat, test_flat = images.reshape(len(images), -1) / 255.0, test_images.reshape(len(test_images), -1) / 255.0
    assert ridge_probe(flat, labels, test_flat, test_labels) < chance_band


def test_invalid_parameters_are_rejected():
    with pytest.raises(ValueError, match="too small"):
        demo.render(np.random.default_rng(0), 8, 0)
    with pytest.raises(ValueError, match="label"):
        demo.render(np.random.default_rng(0), 32, 4)
    with pytest.raises(ValueError, match="num_train"):
        demo.demo_config(num_train=0)
