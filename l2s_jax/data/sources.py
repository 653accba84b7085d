"""Random-access image sources: TFDS ArrayRecord datasets, class-per-folder trees, the demo.

Every source is a grain-compatible random-access sequence of records
``{"image": bytes | uint8 (H, W, 3) array, "label": int}``; :func:`decode_image` turns either
into an RGB ``PIL.Image`` / array for the transforms. Encoded images (JPEG/PNG) are decoded
with PIL, exactly as timm's ``ImageFolder`` does (tfds's own numpy decoder prefers OpenCV, whose
JPEG decoding can differ by a few levels), so TFDS image features are read undecoded.

Names (``data_cfg.name``) and what they read; nothing is ever downloaded at run time:

=======================================  ===========  =============  ==========================
name                                     splits       classes        notes
=======================================  ===========  =============  ==========================
``demo``                                 train, test  4              built on first use (demo.py)
``folder``                               train, val   sorted subdirs torchvision ImageFolder ids
``imagenet2012``                         train,       1000
                                         validation
``imagenet2012_corrupted/<c>_<s>``       validation   1000           ImageNet-C, 224x224 images
``imagenet_a``                           test         1000 (200)     ``label_subset``: 200 ids
``imagenet_r``                           test         1000 (200)     ``label_subset``: 200 ids
``imagenet_sketch``                      test         1000
``cifar10`` / ``cifar100``               train, test  10 / 100       32x32 images
=======================================  ===========  =============  ==========================

ImageNet-A and ImageNet-R: TFDS stores their labels in the full 1000-way ImageNet label space
(``ClassLabel`` from ImageNet's sorted synset list), so ``label`` is already a 1000-way index.
Only 200 classes occur; the standard protocol (Hendrycks et al.) evaluates a 1000-way model by
restricting its logits to those 200 classes before the argmax. :data:`IMAGENET_A_CLASSES` and
:data:`IMAGENET_R_CLASSES` are those 200 ImageNet-1k indices (sorted; index = position of the
synset in the sorted 1000-synset list), exposed per source as ``label_subset``.

ImageNet-C (``imagenet2012_corrupted``): TFDS stores 224x224 images, already resized (256) and
centre-cropped, so the eval transform uses ``crop_pct=1.0`` for it (``eval_crop_pct`` below):
re-cropping would zoom in by 1/0.875.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

IMG_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

# The 200 ImageNet-1k class indices of ImageNet-A (Hendrycks et al. 2021, natural adversarial
# examples); e.g. 6 = n01498041 stingray, 988 = n12267677 acorn.
IMAGENET_A_CLASSES: tuple[int, ...] = (
    6, 11, 13, 15, 17, 22, 23, 27, 30, 37, 39, 42, 47, 50, 57, 70, 71, 76, 79, 89, 90, 94, 96, 97,
    99, 105, 107, 108, 110, 113, 124, 125, 130, 132, 143, 144, 150, 151, 207, 234, 235, 254, 277,
    283, 287, 291, 295, 298, 301, 306, 307, 308, 309, 310, 311, 313, 314, 315, 317, 319, 323, 324,
    326, 327, 330, 334, 335, 336, 347, 361, 363, 372, 378, 386, 397, 400, 401, 402, 404, 407, 411,
    416, 417, 420, 425, 428, 430, 437, 438, 445, 456, 457, 461, 462, 470, 472, 483, 486, 488, 492,
    496, 514, 516, 528, 530, 539, 542, 543, 549, 552, 557, 561, 562, 569, 572, 573, 575, 579, 589,
    606, 607, 609, 614, 626, 627, 640, 641, 642, 643, 658, 668, 677, 682, 684, 687, 701, 704, 719,
    736, 746, 749, 752, 758, 763, 765, 768, 773, 774, 776, 779, 780, 786, 792, 797, 802, 803, 804,
    813, 815, 820, 823, 831, 833, 835, 839, 845, 847, 850, 859, 862, 870, 879, 880, 888, 890, 897,
    900, 907, 913, 924, 932, 933, 934, 937, 943, 945, 947, 951, 954, 956, 957, 959, 971, 972, 980,
    981, 984, 986, 987, 988,
)
# The 200 ImageNet-1k class indices of ImageNet-R (Hendrycks et al. 2021, renditions);
# e.g. 1 = n01443537 goldfish, 988 = n12267677 acorn.
IMAGENET_R_CLASSES: tuple[int, ...] = (
    1, 2, 4, 6, 8, 9, 11, 13, 22, 23, 26, 29, 31, 39, 47, 63, 71, 76, 79, 84, 90, 94, 96, 97, 99,
    100, 105, 107, 113, 122, 125, 130, 132, 144, 145, 147, 148, 150, 151, 155, 160, 161, 162, 163,
    171, 172, 178, 187, 195, 199, 203, 207, 208, 219, 231, 232, 234, 235, 242, 245, 247, 250, 251,
    254, 259, 260, 263, 265, 267, 269, 276, 277, 281, 288, 289, 291, 292, 293, 296, 299, 301, 308,
    309, 310, 311, 314, 315, 319, 323, 327, 330, 334, 335, 337, 338, 340, 341, 344, 347, 353, 355,
    361, 362, 365, 366, 367, 368, 372, 388, 390, 393, 397, 401, 407, 413, 414, 425, 428, 430, 435,
    437, 441, 447, 448, 457, 462, 463, 469, 470, 471, 472, 476, 483, 487, 515, 546, 555, 558, 570,
    579, 583, 587, 593, 594, 596, 609, 613, 617, 621, 629, 637, 657, 658, 701, 717, 724, 763, 768,
    774, 776, 779, 780, 787, 805, 812, 815, 820, 824, 833, 847, 852, 866, 875, 883, 889, 895, 907,
    928, 931, 932, 933, 934, 936, 937, 943, 945, 947, 948, 949, 951, 953, 954, 957, 963, 965, 967,
    980, 981, 983, 988,
)

IMAGENET_C_CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
    "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
    "jpeg_compression",
)
IMAGENET_C_EXTRA_CORRUPTIONS: tuple[str, ...] = ("gaussian_blur", "saturate", "spatter", "speckle_noise")


@dataclasses.dataclass(frozen=True)
class TfdsSpec:
    """How a TFDS dataset is read and, when missing, prepared."""

    default_eval_split: str
    num_classes: int
    label_subset: tuple[int, ...] | None = None
    eval_crop_pct: float | None = None
    prepare: str = ""


_TF_NOTE = (
    "Encoding images into TFDS needs TensorFlow for this one preparation step (reading does not): "
    "pip install tensorflow"
)


def _imagenet_prepare(extra: str = "") -> str:
    """The command that prepares an ImageNet-derived TFDS dataset ({name}) from the manual tar files."""
    return (
        f"pip install tensorflow{extra}\n"
        "tfds build {name} --data_dir=DATA_DIR --manual_dir=MANUAL_DIR --file_format=array_record\n"
        "where MANUAL_DIR holds ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar "
        "(from https://image-net.org/download-images)"
    )


# The command that prepares a TFDS dataset ({name}) that TFDS can download itself.
_DOWNLOAD_PREPARE = "pip install tensorflow\ntfds build {name} --data_dir=DATA_DIR --file_format=array_record"


def _imagenet_c_config(config: str) -> None:
    corruption, _, severity = config.rpartition("_")
    known = IMAGENET_C_CORRUPTIONS + IMAGENET_C_EXTRA_CORRUPTIONS
    if corruption not in known or severity not in {"1", "2", "3", "4", "5"}:
        raise ValueError(
            f"unknown ImageNet-C config {config!r}: expected <corruption>_<severity 1-5> with corruption in {known}"
        )


# Every supported TFDS dataset (name before any "/config"), and how to check its config.
TFDS_DATASETS: dict[str, TfdsSpec] = {
    "imagenet2012": TfdsSpec("validation", 1000, prepare=_imagenet_prepare()),
    "imagenet2012_corrupted": TfdsSpec("validation", 1000, eval_crop_pct=1.0,
                                       prepare=_imagenet_prepare(" opencv-python scikit-image scipy wand")),
    "imagenet_a": TfdsSpec("test", 1000, IMAGENET_A_CLASSES, prepare=_DOWNLOAD_PREPARE),
    "imagenet_r": TfdsSpec("test", 1000, IMAGENET_R_CLASSES, prepare=_DOWNLOAD_PREPARE),
    "imagenet_sketch": TfdsSpec("test", 1000, prepare=_DOWNLOAD_PREPARE),
    "cifar10": TfdsSpec("test", 10, prepare=_DOWNLOAD_PREPARE),
    "cifar100": TfdsSpec("test", 100, prepare=_DOWNLOAD_PREPARE),
}
TFDS_CONFIG_CHECKS: dict[str, Callable[[str], None]] = {"imagenet2012_corrupted": _imagenet_c_config}


def tfds_spec(name: str) -> TfdsSpec:
    """The :class:`TfdsSpec` of a supported dataset name (ValueError with the list otherwise).

    A TFDS version may be appended (``imagenet2012:5.0.0``); it is passed on to TFDS.
    """
    name = name.split(":", 1)[0]
    base, sep, config = name.partition("/")
    if base not in TFDS_DATASETS or bool(sep) != (base in TFDS_CONFIG_CHECKS):
        raise ValueError(
            f"unknown dataset {name!r}: expected {', '.join(repr(n) for n in SOURCES)}, "
            "'imagenet2012_corrupted/<corruption>_<severity>' or one of "
            f"{', '.join(repr(n) for n in TFDS_DATASETS if n not in TFDS_CONFIG_CHECKS)}"
        )
    if sep:
        TFDS_CONFIG_CHECKS[base](config)
    spec = TFDS_DATASETS[base]
    return dataclasses.replace(spec, prepare=spec.prepare.replace("{name}", name))


def default_data_dir(data_dir: str | os.PathLike | None = None) -> str:
    """``data_dir`` or TFDS's default (``$TFDS_DATA_DIR`` or ~/tensorflow_datasets)."""
    if data_dir:
        return os.fspath(data_dir)
    return os.path.expanduser(os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets"))


def decode_image(image: Any) -> Image.Image | np.ndarray:
    """An RGB image from encoded bytes (decoded by PIL, like timm) or a uint8 array (unchanged)."""
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3:
        return image
    if isinstance(image, np.ndarray):
        image = image.item() if image.ndim == 0 else image.tobytes()
    if not isinstance(image, (bytes, bytearray, memoryview)):
        raise TypeError(f"cannot decode an image of type {type(image).__name__}")
    with Image.open(io.BytesIO(image)) as img:
        return img.convert("RGB")


@dataclasses.dataclass(frozen=True, eq=False)
class RecordSource:
    """A random-access view of ``base`` yielding ``{"image": ..., "label": int}`` records."""

    base: Sequence[Any]
    image_key: str = "image"
    label_key: str = "label"

    def __len__(self) -> int:
        """The number of records."""
        return len(self.base)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Record ``index`` with only the image and the integer label."""
        record = self.base[index]
        return {"image": record[self.image_key], "label": int(record[self.label_key])}


@dataclasses.dataclass(frozen=True, eq=False)
class ImageFolderSource:
    """Files of a class-per-folder tree (``root/<class>/<file>``) as undecoded records.

    Classes are the sorted subfolder names, ids their positions (torchvision ImageFolder);
    files are sorted within each class and filtered by extension (case-insensitive). Paths
    are kept as one bytes blob plus offsets, compact enough for the 1.28 M ImageNet files to
    be shipped to every loader worker.
    """

    root: str
    classes: tuple[str, ...]
    labels: np.ndarray
    path_blob: bytes
    path_offsets: np.ndarray

    @classmethod
    def scan(cls, root: str | os.PathLike, classes: Sequence[str] | None = None) -> "ImageFolderSource":
        """Index ``root``; ``classes`` fixes the class list (e.g. the train split's)."""
        root_path = Path(root)
        if not root_path.is_dir():
            raise FileNotFoundError(f"image folder {root_path} does not exist")
        found = sorted(e.name for e in os.scandir(root_path) if e.is_dir())
        if classes is None:
            classes = found
        else:
            unknown = sorted(set(found) - set(classes))
            if unknown:
                raise ValueError(f"{root_path} has classes absent from the class list: {unknown[:5]}")
        rel_paths: list[bytes] = []
        labels: list[int] = []
        for label, name in enumerate(classes):
            class_dir = root_path / name
            if not class_dir.is_dir():
                continue
            for dirpath, _, filenames in sorted(os.walk(class_dir, followlinks=True)):
                for filename in sorted(filenames):
                    if filename.lower().endswith(IMG_EXTENSIONS):
                        rel = os.path.relpath(os.path.join(dirpath, filename), root_path)
                        rel_paths.append(rel.encode())
                        labels.append(label)
        if not rel_paths:
            raise FileNotFoundError(
                f"no images ({', '.join(IMG_EXTENSIONS)}) found in class folders under {root_path}"
            )
        offsets = np.zeros(len(rel_paths) + 1, np.int64)
        offsets[1:] = np.cumsum([len(p) for p in rel_paths])
        return cls(str(root_path), tuple(classes), np.asarray(labels, np.int32), b"".join(rel_paths), offsets)

    def __len__(self) -> int:
        """The number of image files."""
        return len(self.labels)

    def path(self, index: int) -> str:
        """The absolute path of file ``index``."""
        rel = self.path_blob[self.path_offsets[index] : self.path_offsets[index + 1]].decode()
        return os.path.join(self.root, rel)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Record ``index``: the file's bytes (decoded later, by PIL) and its class id."""
        index = int(index)
        if not 0 <= index < len(self.labels):
            raise IndexError(f"index {index} out of range for {len(self.labels)} images")
        with open(self.path(index), "rb") as f:
            return {"image": f.read(), "label": int(self.labels[index])}


_FOLDER_SPLIT_DIRS = {"train": ("train",), "validation": ("val", "validation"), "val": ("val", "validation"),
                      "test": ("test",)}


def folder_split_dir(root: str | os.PathLike, split: str) -> Path:
    """The directory of ``split`` under a folder dataset root (``validation`` -> ``val/``)."""
    root_path = Path(root)
    for candidate in _FOLDER_SPLIT_DIRS.get(split, (split,)):
        if (root_path / candidate).is_dir():
            return root_path / candidate
    raise FileNotFoundError(
        f"folder dataset split {split!r} not found under {root_path}: expected "
        f"{root_path}/{_FOLDER_SPLIT_DIRS.get(split, (split,))[0]}/<class>/<image> (the layout of "
        "the authors' code: DATA/train/n01440764/*.JPEG and DATA/val/n01440764/*.JPEG; sort the "
        "ImageNet validation images into class folders first)"
    )


@functools.lru_cache(maxsize=8)
def _scan_folder(root: str, classes: tuple[str, ...] | None) -> ImageFolderSource:
    """:meth:`ImageFolderSource.scan`, once per process for a given folder and class list."""
    return ImageFolderSource.scan(root, classes)


@dataclasses.dataclass(frozen=True)
class OpenedSource:
    """A source with what the pipeline needs to know about it."""

    records: Sequence[dict[str, Any]]
    num_classes: int
    class_names: tuple[str, ...] = ()
    label_subset: tuple[int, ...] | None = None
    eval_crop_pct: float | None = None


def _missing(name: str, data_dir: str, detail: str, prepare: str) -> FileNotFoundError:
    """The error for a dataset that is not prepared, with the command that prepares it."""
    return FileNotFoundError(
        f"dataset {name!r} is not prepared under data_dir={data_dir} ({detail}). Nothing is downloaded "
        f"at run time; prepare it once (ArrayRecord format) with:\n{prepare.replace('DATA_DIR', data_dir)}\n"
        f"{_TF_NOTE}; then pass data_dir={data_dir} (data.data_dir)."
    )


def tfds_builder(name: str, data_dir: str | os.PathLike | None):
    """The prepared TFDS builder of ``name`` (FileNotFoundError with the preparation command)."""
    import tensorflow_datasets as tfds

    spec = tfds_spec(name)
    root = default_data_dir(data_dir)
    builder = tfds.builder(name, data_dir=root)
    if not builder.is_prepared():
        raise _missing(name, root, f"no {builder.data_dir}", spec.prepare)
    return builder


def _tfds_records(builder, name: str, split: str, spec: TfdsSpec, root: str) -> RecordSource:
    """The split as undecoded records; explains how to convert a TFRecord-only build."""
    import tensorflow_datasets as tfds

    if split not in builder.info.splits:
        raise ValueError(f"dataset {name!r} has no split {split!r}; it has {sorted(builder.info.splits)}")
    try:
        base = builder.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()})
    except NotImplementedError as err:
        raise FileNotFoundError(
            f"dataset {name!r} at {builder.data_dir} exists but not as ArrayRecord (random access is "
            "needed). Convert it once with:\npip install tensorflow\ntfds convert_format "
            f"--dataset_version_dir={builder.data_dir} --out_file_format=array_record\n"
            f"or rebuild it with:\n{spec.prepare.replace('DATA_DIR', root)}"
        ) from err
    return RecordSource(base)


def _demo_options(data_cfg: Any) -> dict[str, int]:
    """The demo build parameters: demo_image_size (default image_size), demo_num_train/test, demo_seed."""
    get = data_cfg.get
    return {
        "image_size": int(get("demo_image_size", None) or get("image_size", 32)),
        "num_train": int(get("demo_num_train", 4000)),
        "num_test": int(get("demo_num_test", 1000)),
        "seed": int(get("demo_seed", 0)),
    }


def _open_demo(data_cfg: Any, split: str) -> OpenedSource:
    from l2s_jax.data import demo  # imports TFDS: only when the demo is used

    builder = demo.prepare_demo(data_cfg.get("data_dir", None), **_demo_options(data_cfg))
    if split not in builder.info.splits:
        raise ValueError(f"the demo dataset has splits 'train' and 'test', not {split!r}")
    return OpenedSource(RecordSource(builder.as_data_source(split)), len(demo.CLASS_NAMES), demo.CLASS_NAMES)


def _demo_size(data_cfg: Any, split: str) -> int:
    return len(_open_demo(data_cfg, split).records) if split in ("train", "test") else 0


def _open_folder(data_cfg: Any, split: str) -> OpenedSource:
    data_dir = data_cfg.get("data_dir", None)
    if not data_dir:
        raise ValueError("data.name='folder' needs data.data_dir: a root holding train/ and val/ class folders")
    train_dir = Path(data_dir) / "train"
    classes = None
    if train_dir.is_dir():
        classes = tuple(sorted(e.name for e in os.scandir(train_dir) if e.is_dir()))
    source = _scan_folder(str(folder_split_dir(data_dir, split)), classes)
    return OpenedSource(source, len(source.classes), source.classes)


def _folder_size(data_cfg: Any, split: str) -> int:
    if split != "train" and data_cfg.get("data_dir", None):
        try:
            folder_split_dir(data_cfg.data_dir, split)
        except FileNotFoundError:
            return 0
    return len(_open_folder(data_cfg, split).records)


def _open_tfds(data_cfg: Any, split: str) -> OpenedSource:
    name, data_dir = data_cfg.name, data_cfg.get("data_dir", None)
    spec = tfds_spec(name)
    builder = tfds_builder(name, data_dir)
    label = builder.info.features["label"]
    return OpenedSource(
        _tfds_records(builder, name, split, spec, default_data_dir(data_dir)),
        spec.num_classes,
        tuple(label.names),
        spec.label_subset,
        spec.eval_crop_pct,
    )


def _tfds_size(data_cfg: Any, split: str) -> int:
    builder = tfds_builder(data_cfg.name, data_cfg.get("data_dir", None))
    if split not in builder.info.splits:
        return 0
    return int(builder.info.splits[split].num_examples)


@dataclasses.dataclass(frozen=True)
class SourceKind:
    """How one kind of dataset is opened, sized, and evaluated by default."""

    open: Callable[[Any, str], OpenedSource]
    size: Callable[[Any, str], int]  # 0 when the dataset has no such split
    eval_split: Callable[[str], str]


DEMO = SourceKind(_open_demo, _demo_size, lambda name: "test")
FOLDER = SourceKind(_open_folder, _folder_size, lambda name: "validation")
TFDS = SourceKind(_open_tfds, _tfds_size, lambda name: tfds_spec(name).default_eval_split)
# Dataset names with their own source; every other name is a TFDS dataset (TFDS_DATASETS).
SOURCES: dict[str, SourceKind] = {"demo": DEMO, "l2s_demo": DEMO, "folder": FOLDER}


def source_kind(name: str) -> SourceKind:
    """The :class:`SourceKind` reading dataset ``name``."""
    return SOURCES.get(name, TFDS)


def default_eval_split(name: str) -> str:
    """The evaluation split of a dataset name."""
    return source_kind(name).eval_split(name)


def open_source(data_cfg: Any, split: str) -> OpenedSource:
    """Open ``split`` of the dataset named by ``data_cfg.name`` (see the module docstring)."""
    return source_kind(data_cfg.name).open(data_cfg, split)


def split_size(data_cfg: Any, split: str) -> int:
    """The number of examples of ``split`` (0 when the dataset has no such split)."""
    return source_kind(data_cfg.name).size(data_cfg, split)
