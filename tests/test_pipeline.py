"""The input pipeline: determinism, resumption, process sharding, eval padding, sources."""

import io
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from jax.sharding import Mesh, PartitionSpec
from PIL import Image

from l2s_jax.data import pipeline, sources
from l2s_jax.data.sources import OpenedSource

DEMO_SIZES = dict(demo_num_train=64, demo_num_test=40)


def data_config(**overrides) -> ml_collections.ConfigDict:
    """A small demo data config."""
    cfg = dict(
        name="demo",
        data_dir=None,
        train_split="train",
        eval_split="test",
        image_size=32,
        eval_crop_pct=0.875,
        num_workers=0,
        prefetch=2,
        **DEMO_SIZES,
    )
    cfg.update(overrides)
    return ml_collections.ConfigDict(cfg)


def aug_config(**overrides) -> ml_collections.ConfigDict:
    """The demo's augmentation: mild crops, flips, no RandAugment, no erasing."""
    cfg = dict(
        rrc_scale=(0.7, 1.0),
        rrc_ratio=(3 / 4, 4 / 3),
        hflip=0.5,
        auto_augment=None,
        reprob=0.0,
        remode="pixel",
        interpolation="bicubic",
    )
    cfg.update(overrides)
    return ml_collections.ConfigDict(cfg)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> str:
    """A data_dir holding a small demo build."""
    root = tmp_path_factory.mktemp("tfds")
    pipeline.dataset_info(data_config(data_dir=str(root)))
    return str(root)


def take(iterator, n: int) -> list[dict[str, np.ndarray]]:
    """The next ``n`` batches."""
    return [next(iterator) for _ in range(n)]


def assert_batches_equal(a: list[dict], b: list[dict]) -> None:
    """Bitwise equality of two lists of batches."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


class IndexRecords:
    """Records whose label is their index (a tiny constant image each), to track examples."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return {"image": np.full((8, 8, 3), i % 256, np.uint8), "label": int(i)}


@pytest.fixture
def index_source(monkeypatch):
    """Make the pipeline read :class:`IndexRecords` of a given size."""

    def install(n: int) -> None:
        opened = OpenedSource(IndexRecords(n), num_classes=n)
        monkeypatch.setattr(pipeline, "open_source", lambda data_cfg, split: opened)

    return install


def test_dataset_info_and_batch_format(demo_dir):
    info = pipeline.dataset_info(data_config(data_dir=demo_dir))
    assert (info.num_classes, info.num_train, info.num_eval, info.image_size) == (4, 64, 40, 32)
    assert info.label_subset is None and len(info.class_names) == 4
    batch = next(pipeline.create_train_iterator(data_config(data_dir=demo_dir), aug_config(), global_batch_size=16, seed=0))
    assert batch["images"].shape == (16, 32, 32, 3) and batch["images"].dtype == np.float32
    assert batch["labels"].shape == (16,) and batch["labels"].dtype == np.int32
    assert set(np.unique(batch["labels"])) <= {0, 1, 2, 3}
    # Normalised with ImageNet statistics: values span negative and positive.
    assert batch["images"].min() < -1.0 and batch["images"].max() > 1.0


def test_same_seed_same_batches_different_seed_different(demo_dir):
    cfg, aug = data_config(data_dir=demo_dir), aug_config()
    a = take(pipeline.create_train_iterator(cfg, aug, global_batch_size=16, seed=3), 5)
    b = take(pipeline.create_train_iterator(cfg, aug, global_batch_size=16, seed=3), 5)
    c = take(pipeline.create_train_iterator(cfg, aug, global_batch_size=16, seed=4), 5)
    assert_batches_equal(a, b)
    assert not np.array_equal(a[0]["images"], c[0]["images"])


def test_restored_state_continues_identically(demo_dir):
    cfg, aug = data_config(data_dir=demo_dir), aug_config()
    it = pipeline.create_train_iterator(cfg, aug, global_batch_size=16, seed=0)
    take(it, 3)
    state = it.get_state()
    expected = take(it, 6)  # crosses the epoch boundary (64 examples = 4 batches)
    resumed = pipeline.create_train_iterator(cfg, aug, global_batch_size=16, seed=0)
    resumed.set_state(state)
    assert_batches_equal(take(resumed, 6), expected)


def test_orbax_checkpoint_round_trip(demo_dir, tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    cfg, aug = data_config(data_dir=demo_dir), aug_config()
    it = pipeline.create_train_iterator(cfg, aug, global_batch_size=16, seed=1)
    take(it, 2)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(7, args=ocp.args.Composite(data=pipeline.iterator_checkpoint_args(it)))
        mngr.wait_until_finished()
    expected = take(it, 3)
    fresh = pipeline.create_train_iterator(cfg, aug, global_batch_size=16, seed=1)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        restored = mngr.restore(7, args=ocp.args.Composite(data=pipeline.iterator_checkpoint_args(fresh, restore=True)))
    assert restored[pipeline.ITERATOR_ITEM] is fresh
    assert_batches_equal(take(fresh, 3), expected)


def test_epochs_are_reshuffled_permutations(index_source):
    index_source(24)
    cfg, aug = data_config(), aug_config(rrc_scale=(1.0, 1.0), rrc_ratio=(1.0, 1.0), hflip=0.0)
    labels = np.concatenate([b["labels"] for b in take(pipeline.create_train_iterator(cfg, aug, global_batch_size=8, seed=0), 6)])
    first, second = labels[:24], labels[24:]
    assert sorted(first) == list(range(24)) and sorted(second) == list(range(24))
    assert not np.array_equal(first, second) and not np.array_equal(first, np.arange(24))


def test_processes_get_disjoint_covering_shards(index_source):
    index_source(48)
    cfg, aug = data_config(), aug_config(rrc_scale=(1.0, 1.0), rrc_ratio=(1.0, 1.0), hflip=0.0)
    seen = []
    for p in range(3):
        it = pipeline.create_train_iterator(cfg, aug, global_batch_size=12, seed=5, process_index=p, process_count=3)
        batches = take(it, 4)  # 4 steps x 12 = one epoch of 48
        assert all(b["labels"].shape == (4,) for b in batches)
        seen.append(np.concatenate([b["labels"] for b in batches]))
    union = np.concatenate(seen)
    assert sorted(union) == list(range(48))  # disjoint and covering
    # Each step's global batch is the union of the three local batches of that step.
    single = take(pipeline.create_train_iterator(cfg, aug, global_batch_size=12, seed=5, process_index=0, process_count=1), 4)
    for step in range(4):
        local = np.concatenate([s[step * 4 : (step + 1) * 4] for s in seen])
        assert sorted(local) == sorted(single[step]["labels"])


def test_eval_counts_every_example_once_with_padding(index_source):
    index_source(41)
    cfg = data_config(image_size=16)
    labels, padding = [], 0
    for p in range(2):
        batches = list(pipeline.create_eval_iterator(cfg, global_batch_size=16, process_index=p, process_count=2))
        assert len(batches) == 3  # ceil(41 / 16) on every process
        for b in batches:
            assert b["images"].shape == (8, 16, 16, 3) and b["mask"].dtype == np.bool_
            labels.extend(b["labels"][b["mask"]].tolist())
            padding += int((~b["mask"]).sum())
            assert np.all(b["images"][~b["mask"]] == 0)
    assert sorted(labels) == list(range(41))
    assert padding == 3 * 16 - 41


def test_eval_on_demo_uses_every_test_example(demo_dir):
    batches = list(pipeline.create_eval_iterator(data_config(data_dir=demo_dir), global_batch_size=16))
    assert len(batches) == 3
    assert sum(int(b["mask"].sum()) for b in batches) == 40
    counts = np.bincount(np.concatenate([b["labels"][b["mask"]] for b in batches]), minlength=4)
    assert counts.tolist() == [10, 10, 10, 10]


@pytest.mark.parametrize("workers", [1, 2])
def test_worker_processes_give_the_same_batches(demo_dir, workers):
    """Workers (batches stacked into shared memory) give the in-process batches exactly."""
    cfg, aug = data_config(data_dir=demo_dir), aug_config()
    expected = take(pipeline.create_train_iterator(cfg, aug, global_batch_size=8, seed=2), 3)
    it = pipeline.create_train_iterator(data_config(data_dir=demo_dir, num_workers=workers), aug,
                                        global_batch_size=8, seed=2)
    try:
        assert_batches_equal(take(it, 3), expected)
    finally:
        it.close()


def test_eval_worker_gives_the_same_batches(demo_dir):
    expected = list(pipeline.create_eval_iterator(data_config(data_dir=demo_dir), global_batch_size=16))
    got = list(pipeline.create_eval_iterator(data_config(data_dir=demo_dir, num_workers=1), global_batch_size=16))
    assert len(got) == len(expected) == 3
    for a, b in zip(got, expected):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


def test_train_examples_are_the_unbatched_stream(demo_dir):
    cfg, aug = data_config(data_dir=demo_dir), aug_config()
    batch = take(pipeline.create_train_iterator(cfg, aug, global_batch_size=4, seed=2, process_index=1,
                                                process_count=2), 1)[0]
    examples = pipeline.train_examples(cfg, aug, seed=2, process_index=1, process_count=2)
    np.testing.assert_array_equal(np.stack([examples[i]["images"] for i in range(2)]), batch["images"])
    np.testing.assert_array_equal([examples[i]["labels"] for i in range(2)], batch["labels"])


def test_shard_batch_builds_global_array_over_8_devices():
    devices = jax.devices()
    if len(devices) < 8:
        pytest.skip("needs 8 devices (tests/conftest.py sets XLA_FLAGS for 8 CPU devices)")
    mesh = Mesh(np.array(devices[:8]), ("data",))
    batch = {
        "images": np.arange(16 * 4 * 4 * 3, dtype=np.float32).reshape(16, 4, 4, 3),
        "labels": np.arange(16, dtype=np.int32),
        "mask": np.ones(16, bool),
    }
    out = pipeline.shard_batch(batch, mesh)
    for key, value in out.items():
        assert value.shape == batch[key].shape and value.dtype == batch[key].dtype
        assert value.sharding.spec == PartitionSpec("data")
        assert len(value.addressable_shards) == 8
        assert all(s.data.shape[0] == 2 for s in value.addressable_shards)
        np.testing.assert_array_equal(np.asarray(value), batch[key])


def test_missing_imagenet_gives_the_preparation_command(tmp_path):
    cfg = data_config(name="imagenet2012", data_dir=str(tmp_path), image_size=224)
    with pytest.raises(FileNotFoundError) as err:
        pipeline.dataset_info(cfg)
    message = str(err.value)
    for fragment in (
        "pip install tensorflow",
        f"tfds build imagenet2012 --data_dir={tmp_path} --manual_dir=",
        "--file_format=array_record",
        "ILSVRC2012_img_train.tar",
    ):
        assert fragment in message
    with pytest.raises(FileNotFoundError, match="tfds build imagenet_a"):
        pipeline.create_eval_iterator(data_config(name="imagenet_a", data_dir=str(tmp_path)), global_batch_size=8)
    with pytest.raises(ValueError, match="unknown dataset"):
        pipeline.dataset_info(data_config(name="imagenet3000", data_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="ImageNet-C config"):
        sources.tfds_spec("imagenet2012_corrupted/fog_9")
    with pytest.raises(FileNotFoundError, match="train"):
        pipeline.dataset_info(data_config(name="folder", data_dir=str(tmp_path)))


def test_robustness_sets_label_spaces():
    labels_file = Path(tfds.__file__).parent / "datasets" / "imagenet2012" / "labels.txt"
    synsets = labels_file.read_text().split()
    for name, first, last in (("imagenet_a", "n01498041", "n12267677"), ("imagenet_r", "n01443537", "n12267677")):
        subset = sources.tfds_spec(name).label_subset
        assert len(subset) == 200 and len(set(subset)) == 200 and list(subset) == sorted(subset)
        assert 0 <= subset[0] and subset[-1] < 1000
        assert (synsets[subset[0]], synsets[subset[-1]]) == (first, last)
    spec = sources.tfds_spec("imagenet2012_corrupted/gaussian_noise_3")
    assert (spec.default_eval_split, spec.num_classes, spec.eval_crop_pct) == ("validation", 1000, 1.0)
    assert sources.tfds_spec("imagenet_sketch").label_subset is None
    assert sources.tfds_spec("cifar100").num_classes == 100


def write_jpeg(path: Path, rng: np.random.Generator, size: tuple[int, int]) -> bytes:
    """A random JPEG of (height, width) ``size`` at ``path``; returns its bytes."""
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def test_folder_source_reads_a_class_per_folder_tree(tmp_path):
    rng = np.random.default_rng(0)
    classes = ["dog", "ant", "cat"]  # ids follow the sorted names: ant 0, cat 1, dog 2
    for split, per_class in (("train", 4), ("val", 2)):
        for c in classes:
            for i in range(per_class):
                write_jpeg(tmp_path / split / c / f"{c}_{i}.JPEG", rng, (30 + 3 * i, 40))
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    cfg = data_config(name="folder", data_dir=str(tmp_path), image_size=24, eval_split="validation")
    info = pipeline.dataset_info(cfg)
    assert (info.num_classes, info.num_train, info.num_eval) == (3, 12, 6)
    assert info.class_names == ("ant", "cat", "dog")
    src = sources.ImageFolderSource.scan(tmp_path / "train")
    assert len(src) == 12 and src.path(0).endswith("ant_0.JPEG")
    assert [src[i]["label"] for i in range(12)] == [0] * 4 + [1] * 4 + [2] * 4
    record = src[5]
    assert record["image"] == Path(src.path(5)).read_bytes()
    decoded = sources.decode_image(record["image"])
    np.testing.assert_array_equal(np.asarray(decoded), np.asarray(Image.open(src.path(5)).convert("RGB")))
    batch = next(pipeline.create_train_iterator(cfg, aug_config(), global_batch_size=6, seed=0))
    assert batch["images"].shape == (6, 24, 24, 3)
    batches = list(pipeline.create_eval_iterator(cfg, global_batch_size=4))
    assert sorted(np.concatenate([b["labels"][b["mask"]] for b in batches]).tolist()) == [0, 0, 1, 1, 2, 2]
    other = tmp_path / "other"
    write_jpeg(other / "train" / "ant" / "a.jpg", rng, (20, 20))
    write_jpeg(other / "val" / "zebra" / "z.jpg", rng, (20, 20))  # a class the train split lacks
    with pytest.raises(ValueError, match="zebra"):
        pipeline.dataset_info(data_config(name="folder", data_dir=str(other), eval_split="validation"))


def test_imagenet_tfds_arrayrecord_is_read_and_decoded_with_pil(tmp_path):
    """A stand-in for a prepared imagenet2012 (same features), built without TensorFlow."""
    rng = np.random.default_rng(1)
    jpegs = {split: [write_jpeg(tmp_path / "src" / f"{split}{i}.jpg", rng, (36 + i, 44)) for i in range(n)]
             for split, n in (("train", 6), ("validation", 3))}

    with tfds.core.registered.skip_registration():

        class StandIn(tfds.core.GeneratorBasedBuilder):
            name = "imagenet2012"
            VERSION = tfds.core.Version(tfds.builder_cls("imagenet2012").VERSION)
            code_path = tmp_path / "stand_in.py"

            def _info(self):
                return tfds.core.DatasetInfo(
                    builder=self,
                    features=tfds.features.FeaturesDict(
                        {
                            "image": tfds.features.Image(encoding_format="jpeg"),
                            "label": tfds.features.ClassLabel(num_classes=1000),
                            "file_name": tfds.features.Text(),
                        }
                    ),
                )

            def _split_generators(self, dl_manager):
                return {s: self._generate_examples(s) for s in jpegs}

            def _generate_examples(self, split):
                for i, data in enumerate(jpegs[split]):
                    yield f"{split}{i}", {"image": data, "label": 100 + i, "file_name": f"{split}{i}.JPEG"}

    StandIn(data_dir=str(tmp_path / "tfds"), file_format="array_record").download_and_prepare()
    cfg = data_config(name="imagenet2012", data_dir=str(tmp_path / "tfds"), image_size=32, eval_split=None)
    info = pipeline.dataset_info(cfg)
    assert (info.num_classes, info.num_train, info.num_eval) == (1000, 6, 3)
    opened = sources.open_source(cfg, "validation")
    for i in range(3):
        record = opened.records[i]
        assert isinstance(record["image"], bytes)
        original = jpegs["validation"][record["label"] - 100]
        assert record["image"] == original
        np.testing.assert_array_equal(
            np.asarray(sources.decode_image(record["image"])), np.asarray(Image.open(io.BytesIO(original)).convert("RGB"))
        )
    batches = list(pipeline.create_eval_iterator(cfg, global_batch_size=2))
    assert sorted(np.concatenate([b["labels"][b["mask"]] for b in batches]).tolist()) == [100, 101, 102]
    batch = next(pipeline.create_train_iterator(cfg, aug_config(auto_augment="rand-m9-mstd0.5-inc1", reprob=0.25),
                                                global_batch_size=4, seed=0))
    assert batch["images"].shape == (4, 32, 32, 3) and set(batch["labels"]) <= set(range(100, 106))
