"""Host-side, per-image train and eval transforms (numpy + Pillow), faithful to timm's recipe.

Train: RandomResizedCrop(224, scale 0.08-1, ratio 3/4-4/3, bicubic) -> horizontal flip (p 0.5)
-> RandAugment ``rand-m9-mstd0.5-inc1`` -> ToTensor + Normalize -> RandomErasing (p 0.25,
'pixel'). Eval: resize the shorter side to ``floor(224 / 0.875) = 256`` (bicubic) -> centre crop
224 -> ToTensor + Normalize. Outputs are HWC float32 (our layout; timm's tensors are CHW).

Every random decision takes an explicit ``np.random.Generator`` (``rng``); nothing touches global
RNG state, so the same generator state gives the same output. The draws follow timm's order and
formulas (one generator replaces timm's mix of Python ``random``, numpy and torch streams).

Resize pass order (a deliberate choice). PIL resizes with two separable 1-D passes and rounds the
intermediate image to uint8, so the order of the passes changes the result. Pillow 13.0 runs the
vertical pass first iff the height shrinks and ``in_h - out_h > 2 * (in_w - out_w)``; Pillow <= 12.3
always ran the horizontal pass first. The golden reference data (timm 1.0.31 on Pillow 13.0.0)
follows the Pillow 13 rule, and we match it on ANY Pillow version: :func:`resize` performs the
two single-axis passes itself (each a one-axis PIL resize, which is a single exact pass) in the
Pillow 13 order. ``pass_order="horizontal_first"`` reproduces Pillow <= 12.3 (the resampling the
original ConvNeXt/DeiT runs used): on the golden set it changes 2 of 23 RandomResizedCrop outputs
(8-15% of their values, by up to 7 levels) and no eval crop.

Exactness against timm (golden data): eval crops, RandomResizedCrop outputs and the normalised
tensors are bit-exact; RandomErasing boxes are exact and the noise is N(0, 1) from our generator
(torch's stream cannot be reproduced, so it is matched statistically).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal, Sequence

import numpy as np
from PIL import Image

from l2s_jax.data.randaugment import RandAugment, rand_augment_transform

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

_FILTERS: dict[str, Image.Resampling] = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "hamming": Image.Resampling.HAMMING,
    "box": Image.Resampling.BOX,
}
_RANDOM_INTERPOLATIONS = ("bilinear", "bicubic")
PassOrder = Literal["pillow13", "horizontal_first"]


def pil_filter(interpolation: str) -> Image.Resampling:
    """The PIL resampling filter for an interpolation name (nearest, bilinear, bicubic, ...)."""
    try:
        return _FILTERS[interpolation]
    except KeyError:
        raise ValueError(
            f"unknown interpolation {interpolation!r}; expected one of {sorted(_FILTERS)}"
        ) from None


def as_rgb_image(image: np.ndarray | Image.Image) -> Image.Image:
    """An RGB PIL image from a PIL image (any mode) or a uint8 (H, W, 3) / (H, W) array."""
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    if not isinstance(image, np.ndarray):
        raise TypeError(f"expected a PIL image or a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise TypeError(f"image array must be uint8, got {image.dtype}")
    if image.ndim == 2:
        return Image.fromarray(image, mode="L").convert("RGB")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image array must be (H, W, 3) or (H, W), got shape {image.shape}")
    return Image.fromarray(np.ascontiguousarray(image), mode="RGB")


def resize(
    img: Image.Image,
    width: int,
    height: int,
    interpolation: str = "bicubic",
    *,
    pass_order: PassOrder = "pillow13",
) -> Image.Image:
    """PIL resize to (width, height) with an explicit order of the two separable passes.

    ``"pillow13"``: vertical first iff ``height < in_h`` and ``in_h - height > 2 * (in_w - width)``
    (Pillow 13.0, the golden data); ``"horizontal_first"``: Pillow <= 12.3. Each pass is a
    one-axis PIL resize, i.e. PIL's own fixed-point kernel with a uint8 result.
    """
    if width < 1 or height < 1:
        raise ValueError(f"output size must be positive, got {width}x{height}")
    if pass_order not in ("pillow13", "horizontal_first"):
        raise ValueError(f"pass_order must be 'pillow13' or 'horizontal_first', got {pass_order!r}")
    resample = pil_filter(interpolation)
    in_w, in_h = img.size
    if (in_w, in_h) == (width, height):
        return img.copy()
    if resample == Image.Resampling.NEAREST or in_w == width or in_h == height:
        return img.resize((width, height), resample)
    vertical_first = (
        pass_order == "pillow13" and height < in_h and (in_h - height) > 2 * (in_w - width)
    )
    if vertical_first:
        return img.resize((in_w, height), resample).resize((width, height), resample)
    return img.resize((width, in_h), resample).resize((width, height), resample)


def random_resized_crop_params(
    width: int,
    height: int,
    rng: np.random.Generator,
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """timm's RandomResizedCrop sampler: returns (top, left, h, w) for a width x height image.

    Up to 10 attempts of area ``U(scale) * W * H`` and aspect (w/h) ``exp(U(log ratio))``, sides
    ``int(round(...))`` (half-even), accepted if ``w <= W and h <= H``, then ``top ~ U{0..H-h}``,
    ``left ~ U{0..W-w}``. Fallback: the central crop clamped to the ratio range.
    """
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if scale[0] > scale[1] or ratio[0] > ratio[1]:
        raise ValueError(f"scale and ratio must be (min, max) ranges, got {scale}, {ratio}")
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = float(rng.uniform(scale[0], scale[1])) * area
        aspect = math.exp(float(rng.uniform(log_ratio[0], log_ratio[1])))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if w <= width and h <= height:
            top = int(rng.integers(0, height - h, endpoint=True))
            left = int(rng.integers(0, width - w, endpoint=True))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _size_hw(size: int | Sequence[int]) -> tuple[int, int]:
    """(height, width) from an int or a (height, width) pair."""
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    if len(size) != 2:
        raise ValueError(f"size must be an int or (height, width), got {size!r}")
    return int(size[0]), int(size[1])


def resized_crop(
    img: Image.Image,
    top: int,
    left: int,
    h: int,
    w: int,
    size: int | Sequence[int],
    interpolation: str = "bicubic",
    *,
    pass_order: PassOrder = "pillow13",
) -> Image.Image:
    """Crop rows top:top+h, columns left:left+w (zero padding outside, as PIL) and resize."""
    if h < 1 or w < 1:
        raise ValueError(f"crop size must be positive, got h={h}, w={w}")
    out_h, out_w = _size_hw(size)
    cropped = img.crop((left, top, left + w, top + h))
    return resize(cropped, out_w, out_h, interpolation, pass_order=pass_order)


def resize_shorter(
    img: Image.Image,
    size: int,
    interpolation: str = "bicubic",
    *,
    pass_order: PassOrder = "pillow13",
) -> Image.Image:
    """torchvision Resize(int): shorter side -> size, longer -> int(size * long / short)."""
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    return resize(img, new_w, new_h, interpolation, pass_order=pass_order)


def center_crop(img: Image.Image, size: int | Sequence[int]) -> Image.Image:
    """torchvision CenterCrop: zero-pad if smaller, offsets ``int(round((H - h) / 2))`` (half-even)."""
    crop_h, crop_w = _size_hw(size)
    w, h = img.size
    if crop_w > w or crop_h > h:
        pad_l = (crop_w - w) // 2 if crop_w > w else 0
        pad_t = (crop_h - h) // 2 if crop_h > h else 0
        pad_r = (crop_w - w + 1) // 2 if crop_w > w else 0
        pad_b = (crop_h - h + 1) // 2 if crop_h > h else 0
        arr = np.pad(np.asarray(img), ((pad_t, pad_b), (pad_l, pad_r), (0, 0)))
        img = Image.fromarray(arr, mode=img.mode)
        w, h = img.size
        if (w, h) == (crop_w, crop_h):
            return img
    top = int(round((h - crop_h) / 2.0))
    left = int(round((w - crop_w) / 2.0))
    return img.crop((left, top, left + crop_w, top + crop_h))


def to_normalized_float(
    img: Image.Image | np.ndarray,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> np.ndarray:
    """ToTensor + Normalize in float32, HWC: ``(v / 255 - mean) / std`` with true divisions."""
    arr = np.asarray(img)
    if arr.dtype != np.uint8 or arr.ndim != 3:
        raise ValueError(f"expected a uint8 HWC image, got {arr.dtype} {arr.shape}")
    x = arr.astype(np.float32) / np.float32(255)
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def random_erasing_boxes(
    height: int,
    width: int,
    rng: np.random.Generator,
    *,
    probability: float = 0.25,
    min_area: float = 0.02,
    max_area: float = 1 / 3,
    min_aspect: float = 0.3,
    max_aspect: float | None = None,
    count: int = 1,
) -> list[tuple[int, int, int, int]]:
    """timm RandomErasing's boxes (top, left, h, w) for one image; empty if not erased.

    ``rng.random() > probability`` skips. The number of boxes is ``count`` if 1, else uniform in
    1..count. Each box: up to 10 attempts of area ``U(min_area, max_area) * H * W / n``, aspect
    (h/w, the opposite of RandomResizedCrop) ``exp(U(log min_aspect, log max_aspect))``, accepted
    only if ``w < W and h < H`` (strict), then ``top ~ U{0..H-h}``, ``left ~ U{0..W-w}``.
    """
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"probability must be in [0, 1], got {probability}")
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if rng.random() > probability:
        return []
    max_aspect = max_aspect or 1 / min_aspect
    log_aspect = (math.log(min_aspect), math.log(max_aspect))
    area = height * width
    n = 1 if count == 1 else int(rng.integers(1, count, endpoint=True))
    boxes = []
    for _ in range(n):
        for _ in range(10):
            target_area = float(rng.uniform(min_area, max_area)) * area / n
            aspect = math.exp(float(rng.uniform(log_aspect[0], log_aspect[1])))
            h = int(round(math.sqrt(target_area * aspect)))
            w = int(round(math.sqrt(target_area / aspect)))
            if w < width and h < height:
                top = int(rng.integers(0, height - h, endpoint=True))
                left = int(rng.integers(0, width - w, endpoint=True))
                boxes.append((top, left, h, w))
                break
    return boxes


def random_erasing(
    x: np.ndarray,
    rng: np.random.Generator,
    *,
    probability: float = 0.25,
    mode: str = "pixel",
    min_area: float = 0.02,
    max_area: float = 1 / 3,
    min_aspect: float = 0.3,
    count: int = 1,
) -> np.ndarray:
    """timm RandomErasing on a normalised float HWC image; returns a new array.

    Boxes from :func:`random_erasing_boxes`; each box is filled right after it is drawn with
    'pixel': N(0, 1) per pixel and channel, 'rand': one N(0, 1) value per channel, 'const': 0.
    """
    if mode not in ("pixel", "rand", "const"):
        raise ValueError(f"mode must be 'pixel', 'rand' or 'const', got {mode!r}")
    if x.ndim != 3 or not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"expected a float HWC image, got {x.dtype} {x.shape}")
    height, width, chans = x.shape
    boxes = random_erasing_boxes(
        height, width, rng, probability=probability, min_area=min_area, max_area=max_area,
        min_aspect=min_aspect, count=count,
    )
    out = x.copy()
    for top, left, h, w in boxes:
        if mode == "pixel":
            fill = rng.standard_normal((h, w, chans), dtype=np.float32)
        elif mode == "rand":
            fill = rng.standard_normal((1, 1, chans), dtype=np.float32)
        else:
            fill = np.zeros((1, 1, chans), np.float32)
        out[top : top + h, left : left + w, :] = fill
    return out


def _randaugment_hparams(size: int, mean: Sequence[float], interpolation: str) -> dict:
    """timm create_transform's RandAugment hparams: fill = round(255 * mean), fixed resample."""
    hparams: dict = {
        "translate_const": int(size * 0.45),
        "img_mean": tuple(min(255, round(255 * m)) for m in mean),
    }
    if interpolation != "random":
        hparams["interpolation"] = interpolation
    return hparams


@dataclasses.dataclass(frozen=True)
class TrainTransform:
    """timm's training transform (RRC -> flip -> RandAugment -> normalise -> RandomErasing).

    ``auto_augment=None`` disables RandAugment (timm would then add ColorJitter; we do not).
    ``interpolation="random"`` picks bilinear or bicubic per image, as timm does.
    """

    size: int = 224
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    interpolation: str = "bicubic"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    reprob: float = 0.25
    remode: str = "pixel"
    recount: int = 1
    pass_order: PassOrder = "pillow13"
    randaugment: RandAugment | None = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        """Validate the fields and build the RandAugment op list once."""
        if self.interpolation != "random":
            pil_filter(self.interpolation)
        if self.remode not in ("pixel", "rand", "const"):
            raise ValueError(f"remode must be 'pixel', 'rand' or 'const', got {self.remode!r}")
        if not 0.0 <= self.hflip <= 1.0 or not 0.0 <= self.reprob <= 1.0:
            raise ValueError(f"hflip and reprob must be in [0, 1], got {self.hflip}, {self.reprob}")
        ra = None
        if self.auto_augment:
            hparams = _randaugment_hparams(self.size, self.mean, self.interpolation)
            ra = rand_augment_transform(self.auto_augment, hparams)
        object.__setattr__(self, "randaugment", ra)

    def __call__(self, image: np.ndarray | Image.Image, rng: np.random.Generator) -> np.ndarray:
        """One augmented (size, size, 3) float32 normalised image."""
        img = as_rgb_image(image)
        top, left, h, w = random_resized_crop_params(img.width, img.height, rng, self.scale, self.ratio)
        interpolation = self.interpolation
        if interpolation == "random":
            interpolation = _RANDOM_INTERPOLATIONS[int(rng.integers(0, 2))]
        img = resized_crop(img, top, left, h, w, self.size, interpolation, pass_order=self.pass_order)
        if self.hflip > 0 and rng.random() < self.hflip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self.randaugment is not None:
            img = self.randaugment(img, rng)
        x = to_normalized_float(img, self.mean, self.std)
        if self.reprob > 0:
            x = random_erasing(x, rng, probability=self.reprob, mode=self.remode, count=self.recount)
        return x


@dataclasses.dataclass(frozen=True)
class EvalTransform:
    """timm's eval transform: shorter side -> floor(size / crop_pct), centre crop, normalise."""

    size: int = 224
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    pass_order: PassOrder = "pillow13"

    def __post_init__(self) -> None:
        """Validate the fields."""
        pil_filter(self.interpolation)
        if not self.crop_pct > 0:
            raise ValueError(f"crop_pct must be positive, got {self.crop_pct}")

    @property
    def resize_size(self) -> int:
        """The shorter-side size before cropping (256 for 224 / 0.875)."""
        return math.floor(self.size / self.crop_pct)

    def crop(self, image: np.ndarray | Image.Image) -> Image.Image:
        """The uint8 resized + centre-cropped image, before normalisation."""
        img = resize_shorter(
            as_rgb_image(image), self.resize_size, self.interpolation, pass_order=self.pass_order
        )
        return center_crop(img, self.size)

    def __call__(self, image: np.ndarray | Image.Image) -> np.ndarray:
        """The (size, size, 3) float32 normalised image."""
        return to_normalized_float(self.crop(image), self.mean, self.std)
