"""The demo dataset: deterministic TFDS build, balance, and only a global rule decides the class."""

import hashlib

import numpy as np
import pytest

from l2s_jax.data import demo
from l2s_jax.data.transforms import EvalTransform

SIZE = 32


@pytest.fixture(scope="module")
def generated():
    """1200 train / 600 test images with their dot centres."""
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
    assert first.data_dir.endswith("s32_train40_test20_seed7/" + str(demo.L2SDemo.VERSION))
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


def test_one_dot_is_independent_of_the_class_and_lines_are_long(generated):
    (images, labels, centres), _ = generated
    dots = [demo.find_dots(im) for im in images]
    assert all(len(d) == demo.NUM_DOTS for d in dots)
    colours = np.array([np.argmin(np.linalg.norm(demo.DOT_COLOURS - im[r, c], axis=1)) for im, (r, c) in
                        zip(images, centres[:, 0])])
    d_row, d_col = (centres[:, -1] - centres[:, 0]).T
    rising = np.sign(-d_row) * np.sign(d_col)  # +1 for +30 / +60 deg, -1 for -30 / -60 deg
    for c in range(4):
        sel = labels == c
        # Colour and the sign of the angle (what a flip changes) are independent of the class.
        assert np.all(np.abs(np.bincount(colours[sel], minlength=3) / sel.sum() - 1 / 3) < 0.08)
        if c in (1, 2):
            assert abs(np.mean(rising[sel] > 0) - 0.5) < 0.08
    spacing = np.linalg.norm(np.diff(centres, axis=1), axis=-1)  # centres are rounded: +-sqrt(2)
    assert spacing.min() >= demo.SPACING_FRACTION[0] * SIZE - 1.5
    assert spacing.max() <= demo.SPACING_FRACTION[1] * SIZE + 1.5


def test_oracle_recovers_every_label_and_respects_flips_and_centre_crops(generated):
    (images, labels, _), (test_images, test_labels, _) = generated
    assert [demo.oracle_label(im) for im in images] == labels.tolist()
    assert [demo.oracle_label(im) for im in test_images] == test_labels.tolist()
    assert [demo.oracle_label(im[:, ::-1]) for im in test_images[:200]] == test_labels[:200].tolist()
    crop = EvalTransform(size=SIZE, crop_pct=0.875)
    assert [demo.oracle_label(np.asarray(crop.crop(im))) for im in test_images[:200]] == test_labels[:200].tolist()
    images48, labels48, _ = demo.generate("test", 40, 48, seed=3)
    assert [demo.oracle_label(im) for im in images48] == labels48.tolist()


def ridge_probe(train_x, train_y, test_x, test_y, lam: float = 0.01) -> float:
    """Test accuracy of a one-vs-all ridge regression classifier on standardised features."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    a = np.c_[(train_x - mean) / std, np.ones(len(train_x))]
    b = np.c_[(test_x - mean) / std, np.ones(len(test_x))]
    targets = np.eye(int(train_y.max()) + 1)[train_y]
    weights = np.linalg.solve(a.T @ a + lam * len(a) * np.eye(a.shape[1]), a.T @ targets)
    return float(np.mean(np.argmax(b @ weights, axis=1) == test_y))


def dot_patches(images: np.ndarray, centres: np.ndarray, which: np.ndarray) -> np.ndarray:
    """Flattened (dot size + 4)-pixel square patches centred on dot ``which[i]`` of image i."""
    p = demo.dot_size(SIZE) + 4
    padded = np.pad(images, ((0, 0), (p, p), (p, p), (0, 0)), mode="edge")
    out = []
    for image, dots, k in zip(padded, centres, which):
        r, c = dots[k] + p - p // 2
        out.append(image[r : r + p, c : c + p].reshape(-1))
    return np.asarray(out, np.float64) / 255


def test_patches_around_one_dot_are_at_chance_while_the_probe_itself_works(generated):
    (images, labels, centres), (test_images, test_labels, test_centres) = generated
    rng = np.random.default_rng(0)
    which, test_which = rng.integers(demo.NUM_DOTS, size=len(labels)), rng.integers(demo.NUM_DOTS, size=len(test_labels))
    train_p, test_p = dot_patches(images, centres, which), dot_patches(test_images, test_centres, test_which)
    # Positive control: the same probe reads a local property (the dot's colour) perfectly.
    colour = np.array([np.argmin(np.linalg.norm(demo.DOT_COLOURS - im[r, c], axis=1))
                       for im, (r, c) in zip(images, centres[np.arange(len(which)), which])])
    test_colour = np.array([np.argmin(np.linalg.norm(demo.DOT_COLOURS - im[r, c], axis=1))
                            for im, (r, c) in zip(test_images, test_centres[np.arange(len(test_which)), test_which])])
    assert ridge_probe(train_p, colour, test_p, test_colour) > 0.95
    # ... but a patch around one dot says nothing about the class.
    chance_band = 0.25 + 4 * np.sqrt(0.25 * 0.75 / len(test_labels))  # 4 sigma above chance
    assert ridge_probe(train_p, labels, test_p, test_labels) < chance_band


def test_invalid_parameters_are_rejected():
    with pytest.raises(ValueError, match="too small"):
        demo.render(np.random.default_rng(0), 16, 0)
    with pytest.raises(ValueError, match="label"):
        demo.render(np.random.default_rng(0), 32, 4)
    with pytest.raises(ValueError, match="num_train"):
        demo.demo_config(num_train=0)


def test_a_run_makes_one_builder_and_logs_its_config_once(tmp_path, caplog):
    """Sizes and splits are opened several times per run; TFDS logs "Using custom data
    configuration" for each builder made from a config object: that must happen once."""
    import logging

    import ml_collections

    from l2s_jax.data import pipeline

    cfg = ml_collections.ConfigDict({"name": "demo", "data_dir": str(tmp_path), "train_split": "train",
                                     "eval_split": "test", "image_size": SIZE, "eval_crop_pct": 0.875,
                                     "num_workers": 0, "prefetch": 2, "demo_num_train": 8, "demo_num_test": 4})
    with caplog.at_level(logging.INFO):
        pipeline.dataset_info(cfg)
        next(pipeline.create_eval_iterator(cfg, global_batch_size=4))
    assert sum("Using custom data configuration" in r.getMessage() for r in caplog.records) == 1
    assert demo.demo_builder(tmp_path, num_train=8, num_test=4) is demo.demo_builder(tmp_path, num_train=8, num_test=4)
