"""timm's RandAugment (``rand-m9-mstd0.5-inc1``) on PIL images with an explicit numpy Generator.

Ops and magnitude -> argument mappings follow timm's ``auto_augment.py`` (timm 1.0.x), magnitude
``m`` on the 0..10 scale, ``s`` a random sign (drawn only for signed ops):

=====================  =====================================  =====================================
op                     argument                               operation
=====================  =====================================  =====================================
AutoContrast           --                                     per-channel autocontrast (PIL)
Equalize               --                                     per-channel histogram equalise (PIL)
Invert                 --                                     255 - v
Rotate                 s * m/10 * 30 degrees                  PIL rotate about the centre, fill
PosterizeIncreasing    4 - int(m/10 * 4) bits                 keep the top bits; <= 0 bits -> black
SolarizeIncreasing     256 - min(256, int(m/10 * 256))        v if v < t else 255 - v
SolarizeAdd            min(128, int(m/10 * 110))              min(255, v + a) if v < 128 else v
Color/Contrast/        max(0.1, 1 + s * m/10 * 0.9)           PIL ImageEnhance blend
Brightness/Sharpness
(...Increasing)
ShearX / ShearY        s * m/10 * 0.3                         PIL affine (1, k, 0, 0, 1, 0) / ...
TranslateXRel / YRel   s * m/10 * translate_pct (0.45) * W/H  PIL affine, content moves left/up
=====================  =====================================  =====================================

The non-increasing set (config without ``inc1``) uses Posterize ``int(m/10 * 4)`` bits, Solarize
``min(256, int(m/10 * 256))`` and unsigned enhance factors ``m/10 * 1.8 + 0.1``.

Per image: ``num_layers`` ops chosen uniformly WITH replacement; per op: skip if
``rng.random() > p``; magnitude ``N(m, mstd)`` (uniform ``[0, m]`` if mstd > 100), clipped to
``[0, mmax or 10]``; then, for signed ops, negative iff ``rng.random() > 0.5``; then, for geometric
ops with a random interpolation, the filter. Geometric ops fill with ``img_mean`` (timm's default
(128, 128, 128); the recipe passes round(255 * ImageNet mean) = (124, 116, 104)).

Robustness: posterize is a numpy-built LUT, so 0 (or fewer) bits gives the all-black image that
timm produced on Pillow <= 12.3 (Pillow 13's ``ImageOps.posterize`` raises for 0 bits; the recipe
reaches 0 bits whenever the magnitude draw clips to 10, about 1 image in 660). All ops are
bit-exact against the golden data: LUT ops are PIL's formulas; AutoContrast, Equalize, the
enhance blends and the affine/rotate resampling are PIL's own code.

Config parsing follows timm except that ``inc0`` means "not increasing" (timm evaluates
``bool("0")``, so any ``inc`` section selects the increasing set there) and ``t...`` (named
transform sets) is rejected.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

LEVEL_DENOM = 10.0
DEFAULT_FILL: tuple[int, int, int] = (128, 128, 128)
RANDOM_INTERPOLATION: tuple[str, str] = ("bilinear", "bicubic")

RAND_TRANSFORMS: tuple[str, ...] = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd",
    "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel",
    "TranslateYRel",
)
RAND_INCREASING_TRANSFORMS: tuple[str, ...] = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
    "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
    "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
)

_GEOMETRIC_FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}


def _point(img: Image.Image, lut: np.ndarray) -> Image.Image:
    """Apply one 256-entry uint8 LUT to every band."""
    return img.point(lut.astype(np.uint8).tolist() * len(img.getbands()))


def auto_contrast(img: Image.Image) -> Image.Image:
    """Per-channel min/max stretch to 0..255 (PIL ``ImageOps.autocontrast``, cutoff 0)."""
    return ImageOps.autocontrast(img)


def equalize(img: Image.Image) -> Image.Image:
    """Per-channel histogram equalisation (PIL ``ImageOps.equalize``)."""
    return ImageOps.equalize(img)


def invert(img: Image.Image) -> Image.Image:
    """255 - v."""
    return _point(img, 255 - np.arange(256))


def posterize(img: Image.Image, bits: int) -> Image.Image:
    """Keep the top ``bits`` bits; >= 8 is the identity and <= 0 gives black (never raises)."""
    if bits >= 8:
        return img
    mask = 0 if bits <= 0 else (0xFF << (8 - bits)) & 0xFF
    return _point(img, np.arange(256) & mask)


def solarize(img: Image.Image, thresh: int) -> Image.Image:
    """v if v < thresh else 255 - v."""
    v = np.arange(256)
    return _point(img, np.where(v < thresh, v, 255 - v))


def solarize_add(img: Image.Image, add: int, thresh: int = 128) -> Image.Image:
    """min(255, v + add) if v < thresh else v."""
    v = np.arange(256)
    return _point(img, np.where(v < thresh, np.minimum(255, v + add), v))


def color(img: Image.Image, factor: float) -> Image.Image:
    """Blend with the ITU-R 601 grey image (PIL ``ImageEnhance.Color``)."""
    return ImageEnhance.Color(img).enhance(factor)


def contrast(img: Image.Image, factor: float) -> Image.Image:
    """Blend with the mean grey level (PIL ``ImageEnhance.Contrast``)."""
    return ImageEnhance.Contrast(img).enhance(factor)


def brightness(img: Image.Image, factor: float) -> Image.Image:
    """Blend with black (PIL ``ImageEnhance.Brightness``)."""
    return ImageEnhance.Brightness(img).enhance(factor)


def sharpness(img: Image.Image, factor: float) -> Image.Image:
    """Blend with the SMOOTH-filtered image (PIL ``ImageEnhance.Sharpness``)."""
    return ImageEnhance.Sharpness(img).enhance(factor)


def _affine(img: Image.Image, matrix: tuple[float, ...], fill: Sequence[int], interpolation: str) -> Image.Image:
    """PIL inverse-mapped affine transform onto the same canvas with a constant fill."""
    return img.transform(
        img.size, Image.Transform.AFFINE, matrix, resample=_GEOMETRIC_FILTERS[interpolation],
        fillcolor=tuple(fill),
    )


def rotate(img: Image.Image, degrees: float, *, fill: Sequence[int], interpolation: str) -> Image.Image:
    """Counter-clockwise rotation about the image centre, canvas size unchanged."""
    return img.rotate(degrees, resample=_GEOMETRIC_FILTERS[interpolation], fillcolor=tuple(fill))


def shear_x(img: Image.Image, factor: float, *, fill: Sequence[int], interpolation: str) -> Image.Image:
    """Source x = x + factor * y."""
    return _affine(img, (1, factor, 0, 0, 1, 0), fill, interpolation)


def shear_y(img: Image.Image, factor: float, *, fill: Sequence[int], interpolation: str) -> Image.Image:
    """Source y = factor * x + y."""
    return _affine(img, (1, 0, 0, factor, 1, 0), fill, interpolation)


def translate_x_rel(img: Image.Image, pct: float, *, fill: Sequence[int], interpolation: str) -> Image.Image:
    """Source x = x + pct * width (content moves left for positive pct)."""
    return _affine(img, (1, 0, pct * img.size[0], 0, 1, 0), fill, interpolation)


def translate_y_rel(img: Image.Image, pct: float, *, fill: Sequence[int], interpolation: str) -> Image.Image:
    """Source y = y + pct * height (content moves up for positive pct)."""
    return _affine(img, (1, 0, 0, 0, 1, pct * img.size[1]), fill, interpolation)


def _signed(value: float, negate: bool) -> float:
    """timm's ``_randomly_negate`` with the coin already drawn."""
    return -value if negate else value


def _rotate_level(m: float, negate: bool, _pct: float) -> tuple:
    """Degrees: s * m/10 * 30."""
    return (_signed((m / LEVEL_DENOM) * 30.0, negate),)


def _enhance_level(m: float, _negate: bool, _pct: float) -> tuple:
    """Unsigned enhance factor: m/10 * 1.8 + 0.1."""
    return ((m / LEVEL_DENOM) * 1.8 + 0.1,)


def _enhance_increasing_level(m: float, negate: bool, _pct: float) -> tuple:
    """Enhance factor max(0.1, 1 + s * m/10 * 0.9)."""
    return (max(0.1, 1.0 + _signed((m / LEVEL_DENOM) * 0.9, negate)),)


def _shear_level(m: float, negate: bool, _pct: float) -> tuple:
    """Shear factor s * m/10 * 0.3."""
    return (_signed((m / LEVEL_DENOM) * 0.3, negate),)


def _translate_rel_level(m: float, negate: bool, pct: float) -> tuple:
    """Translation as a fraction of the size: s * m/10 * translate_pct."""
    return (_signed((m / LEVEL_DENOM) * pct, negate),)


def _posterize_level(m: float, _negate: bool, _pct: float) -> tuple:
    """Bits kept: int(m/10 * 4)."""
    return (int((m / LEVEL_DENOM) * 4),)


def _posterize_increasing_level(m: float, negate: bool, pct: float) -> tuple:
    """Bits kept: 4 - int(m/10 * 4)."""
    return (4 - _posterize_level(m, negate, pct)[0],)


def _solarize_level(m: float, _negate: bool, _pct: float) -> tuple:
    """Threshold min(256, int(m/10 * 256))."""
    return (min(256, int((m / LEVEL_DENOM) * 256)),)


def _solarize_increasing_level(m: float, negate: bool, pct: float) -> tuple:
    """Threshold 256 - min(256, int(m/10 * 256))."""
    return (256 - _solarize_level(m, negate, pct)[0],)


def _solarize_add_level(m: float, _negate: bool, _pct: float) -> tuple:
    """Added value min(128, int(m/10 * 110))."""
    return (min(128, int((m / LEVEL_DENOM) * 110)),)


class _OpSpec(NamedTuple):
    """An op: its image function, its level function (None: no argument), signed, geometric."""

    fn: Callable[..., Image.Image]
    level: Callable[[float, bool, float], tuple] | None
    signed: bool
    geometric: bool


OPS: dict[str, _OpSpec] = {
    "AutoContrast": _OpSpec(auto_contrast, None, False, False),
    "Equalize": _OpSpec(equalize, None, False, False),
    "Invert": _OpSpec(invert, None, False, False),
    "Rotate": _OpSpec(rotate, _rotate_level, True, True),
    "Posterize": _OpSpec(posterize, _posterize_level, False, False),
    "PosterizeIncreasing": _OpSpec(posterize, _posterize_increasing_level, False, False),
    "Solarize": _OpSpec(solarize, _solarize_level, False, False),
    "SolarizeIncreasing": _OpSpec(solarize, _solarize_increasing_level, False, False),
    "SolarizeAdd": _OpSpec(solarize_add, _solarize_add_level, False, False),
    "Color": _OpSpec(color, _enhance_level, False, False),
    "ColorIncreasing": _OpSpec(color, _enhance_increasing_level, True, False),
    "Contrast": _OpSpec(contrast, _enhance_level, False, False),
    "ContrastIncreasing": _OpSpec(contrast, _enhance_increasing_level, True, False),
    "Brightness": _OpSpec(brightness, _enhance_level, False, False),
    "BrightnessIncreasing": _OpSpec(brightness, _enhance_increasing_level, True, False),
    "Sharpness": _OpSpec(sharpness, _enhance_level, False, False),
    "SharpnessIncreasing": _OpSpec(sharpness, _enhance_increasing_level, True, False),
    "ShearX": _OpSpec(shear_x, _shear_level, True, True),
    "ShearY": _OpSpec(shear_y, _shear_level, True, True),
    "TranslateXRel": _OpSpec(translate_x_rel, _translate_rel_level, True, True),
    "TranslateYRel": _OpSpec(translate_y_rel, _translate_rel_level, True, True),
}


def _spec(name: str) -> _OpSpec:
    """The op spec for a timm op name, with a clear error for unknown names."""
    try:
        return OPS[name]
    except KeyError:
        raise ValueError(f"unknown RandAugment op {name!r}; known: {sorted(OPS)}") from None


def level_to_args(name: str, magnitude: float, negate: bool = False, translate_pct: float = 0.45) -> tuple:
    """timm's level function: the op's arguments for a (clipped) magnitude and sign."""
    spec = _spec(name)
    return () if spec.level is None else spec.level(magnitude, negate and spec.signed, translate_pct)


def apply_op(
    img: Image.Image,
    name: str,
    args: Sequence[Any] = (),
    *,
    fill: Sequence[int] = DEFAULT_FILL,
    interpolation: str = "bicubic",
) -> Image.Image:
    """Apply op ``name`` with resolved arguments (geometric ops use fill and interpolation)."""
    spec = _spec(name)
    if spec.geometric:
        if interpolation not in _GEOMETRIC_FILTERS:
            raise ValueError(
                f"geometric ops support {sorted(_GEOMETRIC_FILTERS)} interpolation, got {interpolation!r}"
            )
        return spec.fn(img, *args, fill=fill, interpolation=interpolation)
    return spec.fn(img, *args)


class OpSample(NamedTuple):
    """The random draws of one applied op: clipped magnitude, sign, arguments, filter."""

    name: str
    magnitude: float
    negate: bool
    args: tuple
    interpolation: str


@dataclasses.dataclass(frozen=True)
class AugmentOp:
    """One RandAugment op with timm's per-application randomness (probability, noise, sign)."""

    name: str
    prob: float = 0.5
    magnitude: float = 10.0
    magnitude_std: float = 0.0
    magnitude_max: float | None = None
    fill: tuple[int, ...] = DEFAULT_FILL
    interpolation: str | tuple[str, ...] = RANDOM_INTERPOLATION
    translate_pct: float = 0.45

    def __post_init__(self) -> None:
        """Validate the name, probability and interpolation."""
        _spec(self.name)
        if not 0.0 <= self.prob <= 1.0:
            raise ValueError(f"op probability must be in [0, 1], got {self.prob}")
        if self.magnitude_std < 0:
            raise ValueError(f"magnitude_std must be >= 0, got {self.magnitude_std}")
        choices = (self.interpolation,) if isinstance(self.interpolation, str) else self.interpolation
        bad = [c for c in choices if c not in _GEOMETRIC_FILTERS]
        if not choices or bad:
            raise ValueError(f"interpolation must be in {sorted(_GEOMETRIC_FILTERS)}, got {self.interpolation!r}")

    def sample(self, rng: np.random.Generator) -> OpSample | None:
        """Draw (in timm's order) whether the op runs, its magnitude, sign and filter; None = skip."""
        if self.prob < 1.0 and rng.random() > self.prob:
            return None
        m = float(self.magnitude)
        if self.magnitude_std == math.inf:
            m = float(rng.uniform(0.0, m))
        elif self.magnitude_std > 0:
            m = float(rng.normal(m, self.magnitude_std))
        m = max(0.0, min(m, self.magnitude_max or LEVEL_DENOM))
        spec = OPS[self.name]
        negate = bool(spec.level is not None and spec.signed and rng.random() > 0.5)
        args = level_to_args(self.name, m, negate, self.translate_pct)
        interpolation = self.interpolation
        if not isinstance(interpolation, str):
            index = int(rng.integers(0, len(interpolation))) if spec.geometric else 0
            interpolation = interpolation[index]
        return OpSample(self.name, m, negate, args, interpolation)

    def apply(self, img: Image.Image, draw: OpSample | None) -> Image.Image:
        """Apply a previous draw of this op (None: identity)."""
        if draw is None:
            return img
        return apply_op(img, self.name, draw.args, fill=self.fill, interpolation=draw.interpolation)

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        """Draw and apply."""
        return self.apply(img, self.sample(rng))


@dataclasses.dataclass(frozen=True)
class RandAugment:
    """``num_layers`` ops drawn uniformly with replacement from ``ops``, applied in order."""

    ops: tuple[AugmentOp, ...]
    num_layers: int = 2

    def __post_init__(self) -> None:
        """Validate the op list."""
        if not self.ops:
            raise ValueError("RandAugment needs at least one op")
        if self.num_layers < 0:
            raise ValueError(f"num_layers must be >= 0, got {self.num_layers}")

    def sample(self, rng: np.random.Generator) -> list[tuple[int, OpSample | None]]:
        """The chosen op indices and their draws (the whole plan; independent of the image)."""
        chosen = rng.integers(0, len(self.ops), size=self.num_layers)
        return [(int(i), self.ops[int(i)].sample(rng)) for i in chosen]

    def apply(self, img: Image.Image, plan: Sequence[tuple[int, OpSample | None]]) -> Image.Image:
        """Apply a plan from :meth:`sample`."""
        for index, draw in plan:
            img = self.ops[index].apply(img, draw)
        return img

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        """Augment one RGB PIL image."""
        if img.mode != "RGB":
            raise ValueError(f"RandAugment expects an RGB image, got mode {img.mode!r}")
        return self.apply(img, self.sample(rng))


_CONFIG_PARSERS: dict[str, Callable[[str], float | int]] = {
    "m": int, "n": int, "p": float, "mstd": float, "mmax": int, "inc": int,
}
_HPARAM_KEYS = {"magnitude_std", "magnitude_max", "img_mean", "interpolation", "translate_pct", "translate_const"}


def rand_augment_transform(config_str: str, hparams: dict | None = None) -> RandAugment:
    """Build RandAugment from a timm config string such as ``"rand-m9-mstd0.5-inc1"``.

    Sections after ``rand`` (split at ``-``, key = text before the first digit): ``m`` int
    magnitude (default 10), ``n`` int number of ops (2), ``p`` float op probability (0.5),
    ``mstd`` float magnitude noise (> 100: uniform in [0, m]), ``mmax`` int clip bound (10),
    ``inc`` int: increasing-severity op set. Sections without a digit are ignored. As in timm,
    ``mstd``/``mmax`` already present in ``hparams`` take precedence over the string. hparams:
    ``img_mean`` (fill), ``interpolation`` (str or tuple, default random bilinear/bicubic),
    ``translate_pct`` (0.45); ``translate_const`` is accepted and unused by these ops.
    """
    hp = dict(hparams or {})
    unknown = set(hp) - _HPARAM_KEYS
    if unknown:
        raise ValueError(f"unknown RandAugment hparams {sorted(unknown)}; allowed {sorted(_HPARAM_KEYS)}")
    sections = config_str.split("-")
    if sections[0] != "rand":
        raise ValueError(f"RandAugment config must start with 'rand', got {config_str!r}")
    values: dict[str, float | int] = {"m": 10, "n": 2, "p": 0.5, "inc": 0}
    for section in sections[1:]:
        if section.startswith("t"):
            raise ValueError(f"named transform sets ({section!r}) are not supported")
        parts = re.split(r"(\d.*)", section)
        if len(parts) < 2:
            continue
        key, val = parts[0], parts[1]
        if key not in _CONFIG_PARSERS:
            raise ValueError(f"unknown RandAugment config section {section!r} in {config_str!r}")
        try:
            values[key] = _CONFIG_PARSERS[key](val)
        except ValueError:
            raise ValueError(f"bad value {val!r} for {key!r} in RandAugment config {config_str!r}") from None
    if "mstd" in values:
        hp.setdefault("magnitude_std", math.inf if values["mstd"] > 100 else values["mstd"])
    if "mmax" in values:
        hp.setdefault("magnitude_max", values["mmax"])
    increasing = bool(values["inc"])
    names = RAND_INCREASING_TRANSFORMS if increasing else RAND_TRANSFORMS
    interpolation = hp.get("interpolation", RANDOM_INTERPOLATION)
    if not isinstance(interpolation, str):
        interpolation = tuple(interpolation)
    ops = tuple(
        AugmentOp(
            name,
            prob=float(values["p"]),
            magnitude=values["m"],
            magnitude_std=float(hp.get("magnitude_std", 0.0)),
            magnitude_max=hp.get("magnitude_max"),
            fill=tuple(int(c) for c in hp.get("img_mean", DEFAULT_FILL)),
            interpolation=interpolation,
            translate_pct=float(hp.get("translate_pct", 0.45)),
        )
        for name in names
    )
    return RandAugment(ops, int(values["n"]))
