"""Classification and distillation losses of large-to-small kernel distillation.

All functions are pure and jit-able, compute in float32 whatever the input dtype (bfloat16 logits
or features are cast first) and reduce with a batch mean. ``labels`` is either int class ids of
shape ``[N]`` or soft targets (mixup/cutmix rows) of shape ``[N, C]``.

* :func:`cross_entropy` - hard labels with optional label smoothing (timm's convention) or
  soft-target cross-entropy.
* :func:`kd` - Hinton KD, eq. (3) of the paper, and the authors' ``hard`` variant (``loss_kd`` of
  ``engine_kd.py``).
* :func:`nkd` - NKD, eq. (4) (``variant="paper"``) or the authors' released ``NKDLoss``
  (``variant="official"``).
* :func:`smooth_l1`, :func:`whiten`, :func:`tokens_to_map`, :func:`resize_to`,
  :class:`FeatureProjector`, :func:`feature_distillation_loss` - feature distillation, eq. (5),
  following Wei et al. (2022).
* :func:`distillation_loss` - one call per train step for every method of the paper.

The teacher side is always wrapped in ``stop_gradient``: the teacher is frozen, so no gradient
should reach it even when a caller differentiates with respect to both models' outputs.
"""
from __future__ import annotations

import dataclasses
import math
from functools import partial
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from l2s_jax.layers import Conv2d

NKD_VARIANTS = ("paper", "official")
FD_LOSS_TYPES = ("smooth_l1", "mse")
# Every method of the paper: name -> (logit loss, feature distillation?, display name).
METHOD_TABLE = {
    "ce": ("ce", False, "CE"),
    "kd": ("kd", False, "KD"),
    "nkd": ("nkd", False, "NKD"),
    "fd": ("ce", True, "FD"),
    "fd+nkd": ("nkd", True, "FD+NKD"),
    "fd+kd": ("kd", True, "FD+KD"),
}
METHODS = tuple(METHOD_TABLE)

# The released NKDLoss subtracts this from the target logit of student and teacher before the
# tau-softmax, which makes the target probability exactly 0 in float32 for the usual tau.
_OFFICIAL_TARGET_SHIFT = 1000.0


def _f32(x: jax.Array) -> jax.Array:
    """``x`` as a float32 array (losses are always evaluated in float32)."""
    return jnp.asarray(x).astype(jnp.float32)


def _check_logits(logits: jax.Array, name: str) -> None:
    """Logits must be a [N, C] matrix with at least two classes."""
    if logits.ndim != 2:
        raise ValueError(f"{name} must have shape [N, C], got {logits.shape}")
    if logits.shape[1] < 2:
        raise ValueError(f"{name} needs at least 2 classes, got shape {logits.shape}")


def _check_pair(student: jax.Array, teacher: jax.Array) -> None:
    """Student and teacher logits must both be [N, C] matrices of the same shape."""
    _check_logits(student, "student_logits")
    _check_logits(teacher, "teacher_logits")
    if student.shape != teacher.shape:
        raise ValueError(f"student logits {student.shape} and teacher logits {teacher.shape} differ in shape")


def _is_hard(labels: jax.Array, logits_shape: tuple[int, ...]) -> bool:
    """True for int class ids [N], False for soft targets [N, C]; anything else is an error."""
    n, c = logits_shape
    if labels.ndim == 1:
        if not jnp.issubdtype(labels.dtype, jnp.integer):
            raise ValueError(f"1-D labels must be integer class ids, got dtype {labels.dtype}")
        if labels.shape[0] != n:
            raise ValueError(f"labels {labels.shape} do not match logits {logits_shape}")
        return True
    if labels.ndim == 2:
        if labels.shape != (n, c):
            raise ValueError(f"soft labels {labels.shape} do not match logits {logits_shape}")
        return False
    raise ValueError(f"labels must be class ids [N] or soft targets [N, C], got shape {labels.shape}")


def _target_index(labels: jax.Array, logits_shape: tuple[int, ...]) -> jax.Array:
    """Target class per row: the id itself for hard labels, the argmax for soft labels."""
    labels = jnp.asarray(labels)
    if _is_hard(labels, logits_shape):
        return labels.astype(jnp.int32)
    return jnp.argmax(labels, axis=-1).astype(jnp.int32)


def _gather(x: jax.Array, index: jax.Array) -> jax.Array:
    """``x[n, index[n]]`` for every row n."""
    return jnp.take_along_axis(x, index[:, None], axis=-1)[:, 0]


def _check_positive(value: float, name: str) -> None:
    """Reject non-positive Python numbers early (traced values are left unchecked)."""
    if isinstance(value, (int, float)) and not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def cross_entropy(logits: jax.Array, labels: jax.Array, *, label_smoothing: float = 0.0) -> jax.Array:
    """Batch-mean cross-entropy for int labels [N] or soft targets [N, C].

    Hard labels with ``label_smoothing = eps`` use timm's ``LabelSmoothingCrossEntropy`` target
    ``(1 - eps) * one_hot + eps / C``. Soft targets are used as given (mixup/cutmix targets already
    carry their smoothing), i.e. timm's ``SoftTargetCrossEntropy``. Class ids must lie in
    ``[0, C)``; under ``jit`` they cannot be checked and an out-of-range id gives NaN.
    """
    logits = _f32(logits)
    _check_logits(logits, "logits")
    labels = jnp.asarray(labels)
    if isinstance(label_smoothing, (int, float)) and not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    log_p = jax.nn.log_softmax(logits, axis=-1)
    if _is_hard(labels, logits.shape):
        nll = -_gather(log_p, labels.astype(jnp.int32))
        per_row = (1.0 - label_smoothing) * nll - label_smoothing * log_p.mean(axis=-1)
    else:
        per_row = -jnp.sum(_f32(labels) * log_p, axis=-1)
    return per_row.mean()


def kd(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    labels: jax.Array,
    *,
    temperature: float,
    lam: float,
    hard: bool = False,
) -> jax.Array:
    """Knowledge distillation, eq. (3), as the authors' ``loss_kd``.

    ``(1 - lam) * CE(s, y) + lam * T^2 * KL(softmax(t / T) || softmax(s / T))`` with the KL summed
    over classes and averaged over the batch ("batchmean"). ``hard=True`` gives
    ``0.5 * CE(s, y) + 0.5 * CE(s, argmax t)`` and ignores ``temperature`` and ``lam``. The CE here
    applies no label smoothing of its own, like ``F.cross_entropy`` in the released code.
    """
    s = _f32(student_logits)
    t = jax.lax.stop_gradient(_f32(teacher_logits))
    _check_pair(s, t)
    ce = cross_entropy(s, labels)
    if hard:
        return 0.5 * ce + 0.5 * cross_entropy(s, jnp.argmax(t, axis=-1).astype(jnp.int32))
    _check_positive(temperature, "temperature")
    log_p = jax.nn.log_softmax(s / temperature, axis=-1)
    log_q = jax.nn.log_softmax(t / temperature, axis=-1)
    kl = jnp.sum(jnp.exp(log_q) * (log_q - log_p)) / s.shape[0]
    return (1.0 - lam) * ce + lam * temperature**2 * kl


def _nkd_paper(s: jax.Array, t: jax.Array, labels: jax.Array, temperature: float, lam: float) -> jax.Array:
    """Eq. (4): ``-log p_s^y - p_t^y log p_s^y - lam T^2 sum_{i != y} T^_i log S^_i``, batch mean.

    T^ and S^ are the tau-softmaxes over the non-target classes only (target logit masked to
    -inf), which equals the paper's ``phi(Z/tau)^i / (1 - phi(Z/tau)^y)`` without cancellation.
    """
    target = _target_index(labels, s.shape)
    log_p = jax.nn.log_softmax(s, axis=-1)
    log_p_y = _gather(log_p, target)
    p_t_y = jnp.exp(_gather(jax.nn.log_softmax(t, axis=-1), target))
    if jnp.asarray(labels).ndim == 1:
        ce = -log_p_y.mean()
    else:
        ce = cross_entropy(s, labels)
    target_term = -(p_t_y * log_p_y).mean()

    is_target = jax.nn.one_hot(target, s.shape[1], dtype=jnp.bool_)
    log_s_hat = jax.nn.log_softmax(jnp.where(is_target, -jnp.inf, s / temperature), axis=-1)
    log_t_hat = jax.nn.log_softmax(jnp.where(is_target, -jnp.inf, t / temperature), axis=-1)
    # The target column is -inf in both logs; zero it so 0 * log 0 neither poisons values nor grads.
    log_s_hat = jnp.where(is_target, 0.0, log_s_hat)
    t_hat = jnp.where(is_target, 0.0, jnp.exp(log_t_hat))
    non_target = jnp.sum(t_hat * log_s_hat, axis=-1).mean()
    return ce + target_term - lam * temperature**2 * non_target


def _nkd_official(s: jax.Array, t: jax.Array, labels: jax.Array, temperature: float, lam: float) -> jax.Array:
    """The released ``NKDLoss`` (engine_kd.py): no plain CE term, y = argmax for soft labels.

    Target term ``-mean_n q_y log p_y`` at temperature 1. Non-target term: the target logit of
    both models is lowered by 1000, tau-softmaxes ``T``, ``S`` are renormalised by ``1 - T_y`` and
    ``1 - S_y``, and every position where the teacher's value equals its target value ``T_y``
    (the target column, plus any class whose teacher probability underflowed to 0 when ``T_y`` is
    0) is dropped from the sum, as the released code's masked assignments do. Whether a tiny
    teacher probability rounds to exactly 0 depends on float32 subnormal handling of the backend,
    so only that boundary may differ from PyTorch on CPU. Student log-probabilities come from
    ``log_softmax``: where the released ``log(softmax)`` underflows to -inf (an infinite loss),
    this stays finite; everywhere else the two agree to float32 rounding.
    """
    target = _target_index(labels, s.shape)
    log_p_y = _gather(jax.nn.log_softmax(s, axis=-1), target)
    q_y = jnp.exp(_gather(jax.nn.log_softmax(t, axis=-1), target))
    target_term = -(q_y * log_p_y).mean()

    shift = _OFFICIAL_TARGET_SHIFT * jax.nn.one_hot(target, s.shape[1], dtype=jnp.float32)
    teacher_p = jax.nn.softmax((t - shift) / temperature, axis=-1)
    log_student_p = jax.nn.log_softmax((s - shift) / temperature, axis=-1)
    teacher_p_y = _gather(teacher_p, target)
    student_p_y = jnp.exp(_gather(log_student_p, target))
    dropped = teacher_p == teacher_p_y[:, None]
    np_t = jnp.where(dropped, 0.0, teacher_p / (1.0 - teacher_p_y)[:, None])
    log_np_s = jnp.where(dropped, 0.0, log_student_p - jnp.log1p(-student_p_y)[:, None])
    non_target = jnp.sum(np_t * log_np_s, axis=-1).mean()
    return target_term - lam * temperature**2 * non_target


def nkd(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    labels: jax.Array,
    *,
    temperature: float = 1.0,
    lam: float = 1.0,
    variant: str = "paper",
) -> jax.Array:
    """Normalized KD (Yang et al. 2022), eq. (4) of the paper or the authors' released loss.

    ``variant="paper"``: eq. (4) with a plain cross-entropy term. Its target class y is the label
    (argmax of the row for soft labels, as the authors do); the plain CE term uses the full soft
    target for soft labels (soft-target CE, consistent with the baseline's mixup criterion) and
    ``-log p_s^y`` for hard labels. ``p_t^y`` is detached.

    ``variant="official"``: the released ``NKDLoss`` exactly (see :func:`_nkd_official`); it has
    no plain CE term, so ``paper - official == CE(s, y)`` for hard labels. The authors' training
    loop builds it with tau = 1 and lam = 1 whatever ``--T``/``--alpha`` say.
    """
    if variant not in NKD_VARIANTS:
        raise ValueError(f"unknown NKD variant {variant!r}; expected one of {NKD_VARIANTS}")
    _check_positive(temperature, "temperature")
    s = _f32(student_logits)
    t = jax.lax.stop_gradient(_f32(teacher_logits))
    _check_pair(s, t)
    labels = jnp.asarray(labels)
    if variant == "paper":
        return _nkd_paper(s, t, labels, temperature, lam)
    return _nkd_official(s, t, labels, temperature, lam)


def smooth_l1(x: jax.Array, y: jax.Array, *, beta: float = 2.0) -> jax.Array:
    """Mean over all elements of PyTorch's ``SmoothL1Loss(beta)``.

    ``0.5 * d^2 / beta`` where ``|d| < beta``, else ``|d| - 0.5 * beta`` (``beta = 0`` is L1).
    """
    x, y = _f32(x), _f32(y)
    if x.shape != y.shape:
        raise ValueError(f"smooth_l1 operands differ in shape: {x.shape} vs {y.shape}")
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    d = x - y
    a = jnp.abs(d)
    if beta == 0:
        return a.mean()
    return jnp.where(a < beta, 0.5 * d * d / beta, a - 0.5 * beta).mean()


def mse(x: jax.Array, y: jax.Array) -> jax.Array:
    """Mean squared difference over all elements (``nn.MSELoss()``, the released FD option)."""
    x, y = _f32(x), _f32(y)
    if x.shape != y.shape:
        raise ValueError(f"mse operands differ in shape: {x.shape} vs {y.shape}")
    return jnp.mean(jnp.square(x - y))


def whiten(t: jax.Array, eps: float = 1e-5) -> jax.Array:
    """Non-parametric LayerNorm over the last (channel) axis: the FD target "whitening".

    Per position ``(t - mean_c) / sqrt(var_c + eps)`` with the biased variance, as Wei et al.'s
    ``nn.LayerNorm(embed_dim, elementwise_affine=False)`` (PyTorch's default eps 1e-5) applied to
    each teacher token; the paper describes the same non-parametric layer norm. (The released SLaK
    ``engine_kd.py`` builds LayerNorms over (C, H, W) jointly under ``--target_Lnorm`` but its
    training loop never applies them.) Float32 out.
    """
    t = _f32(t)
    mean = t.mean(axis=-1, keepdims=True)
    var = jnp.square(t - mean).mean(axis=-1, keepdims=True)
    return (t - mean) * jax.lax.rsqrt(var + eps)


def tokens_to_map(
    tokens: jax.Array, hw: tuple[int, int] | None = None, num_prefix_tokens: int = 0
) -> jax.Array:
    """Transformer tokens (N, T, C) -> NHWC map, dropping ``num_prefix_tokens`` leading tokens.

    Tokens are in row-major (h, w) order, as ViT/Swin flatten their patch grids. Without ``hw`` the
    remaining token count must be a perfect square (ViT-S: 197 - 1 cls = 14 x 14; Swin-T: 7 x 7).
    """
    if tokens.ndim != 3:
        raise ValueError(f"tokens must have shape (N, T, C), got {tokens.shape}")
    if num_prefix_tokens < 0 or num_prefix_tokens >= tokens.shape[1]:
        raise ValueError(f"num_prefix_tokens={num_prefix_tokens} invalid for {tokens.shape[1]} tokens")
    grid = tokens[:, num_prefix_tokens:, :]
    n, count, c = grid.shape
    if hw is None:
        side = math.isqrt(count)
        if side * side != count:
            raise ValueError(
                f"{count} tokens (after dropping {num_prefix_tokens} prefix tokens) are not a square grid; pass hw"
            )
        hw = (side, side)
    h, w = hw
    if h * w != count:
        raise ValueError(f"hw={hw} does not hold {count} tokens")
    return grid.reshape(n, h, w, c)


def resize_to(x: jax.Array, hw: tuple[int, int]) -> jax.Array:
    """Bilinearly resize an NHWC map to spatial size ``hw`` (identity when it already matches).

    Half-pixel centres without antialiasing, i.e. PyTorch's
    ``F.interpolate(mode="bilinear", align_corners=False)`` used by the authors' feature losses.
    """
    if x.ndim != 4:
        raise ValueError(f"resize_to expects an NHWC map, got shape {x.shape}")
    h, w = hw
    if x.shape[1:3] == (h, w):
        return x
    return jax.image.resize(x, (x.shape[0], h, w, x.shape[3]), method="bilinear", antialias=False)


def _teacher_map(feat: jax.Array, num_prefix_tokens: int) -> jax.Array:
    """A teacher feature as an NHWC map: 4-D maps as given, 3-D token sequences reshaped."""
    if feat.ndim == 4:
        return feat
    if feat.ndim == 3:
        return tokens_to_map(feat, num_prefix_tokens=num_prefix_tokens)
    raise ValueError(f"teacher feature must be an NHWC map or (N, T, C) tokens, got shape {feat.shape}")


class FeatureProjector(nnx.Module):
    """The trainable 1x1 convolutions ``g`` of eq. (5), one per distilled stage (student -> teacher channels)."""

    def __init__(self, student_channels: Sequence[int], teacher_channels: Sequence[int], *, rngs: nnx.Rngs):
        if len(student_channels) != len(teacher_channels) or not student_channels:
            raise ValueError(
                f"need one teacher width per student width, got {list(student_channels)} and {list(teacher_channels)}"
            )
        self.projections = nnx.List(
            [Conv2d(cs, ct, 1, bias=True, rngs=rngs) for cs, ct in zip(student_channels, teacher_channels)]
        )

    def __call__(self, student_feats: Sequence[jax.Array]) -> list[jax.Array]:
        """Project each NHWC student map to its teacher's channel count."""
        if len(student_feats) != len(self.projections):
            raise ValueError(f"got {len(student_feats)} student maps for {len(self.projections)} projections")
        return [proj(f) for proj, f in zip(self.projections, student_feats)]


def projected_feature_loss(
    projected_feats: Sequence[jax.Array],
    teacher_feats: Sequence[jax.Array],
    *,
    beta: float = 2.0,
    num_prefix_tokens: int = 0,
    loss_type: str = "smooth_l1",
) -> jax.Array:
    """Eq. (5) feature term for already projected student maps, summed over the given stages.

    Each teacher feature (NHWC map or (N, T, C) tokens) is reshaped to a map, whitened and
    detached; each projected student map is resized to the teacher's spatial size.
    """
    if loss_type not in FD_LOSS_TYPES:
        raise ValueError(f"unknown feature loss {loss_type!r}; expected one of {FD_LOSS_TYPES}")
    if len(projected_feats) != len(teacher_feats) or not projected_feats:
        raise ValueError(f"need matching non-empty stage lists, got {len(projected_feats)} and {len(teacher_feats)}")
    teacher_maps = [_teacher_map(jnp.asarray(t), num_prefix_tokens) for t in teacher_feats]
    for stage, (student, target) in enumerate(zip(projected_feats, teacher_maps)):
        if student.ndim != 4 or student.shape[0] != target.shape[0] or student.shape[3] != target.shape[3]:
            raise ValueError(
                f"stage {stage}: projected student map {student.shape} cannot match teacher map {target.shape}"
            )
    distance = partial(smooth_l1, beta=beta) if loss_type == "smooth_l1" else mse
    total = jnp.zeros((), jnp.float32)
    for student, target in zip(projected_feats, teacher_maps):
        target = jax.lax.stop_gradient(whiten(target))
        total = total + distance(resize_to(student, target.shape[1:3]), target)
    return total


def feature_distillation_loss(
    student_feats: Sequence[jax.Array],
    teacher_feats: Sequence[jax.Array],
    projectors: Callable[[Sequence[jax.Array]], Sequence[jax.Array]],
    *,
    beta: float = 2.0,
    num_prefix_tokens: int = 0,
    loss_type: str = "smooth_l1",
) -> jax.Array:
    """Eq. (5) feature term: ``sum_l smooth_l1(g(S^l), norm(T^l))`` over the stages passed.

    The caller passes the last L stages of both models (L = 1 by default in the paper);
    ``projectors`` is usually a :class:`FeatureProjector`.
    """
    projected = list(projectors(student_feats))
    return projected_feature_loss(
        projected, teacher_feats, beta=beta, num_prefix_tokens=num_prefix_tokens, loss_type=loss_type
    )


@dataclasses.dataclass(frozen=True)
class Method:
    """A distillation method parsed once, with every setting of its loss (hashable, jit-static).

    ``logit_loss`` is ``"ce"`` (no teacher logits), ``"kd"`` or ``"nkd"``; ``fd_stages > 0``
    adds feature distillation, eq. (5), on the last ``fd_stages`` stages. Defaults follow the
    released code: KD T = 1, lam = 0.1; NKD tau = 1, lam = 1; FD weight 1.0 (``--lr_fd``).
    """

    name: str
    label_smoothing: float = 0.0
    kd_temperature: float = 1.0
    kd_lam: float = 0.1
    kd_hard: bool = False
    nkd_temperature: float = 1.0
    nkd_lam: float = 1.0
    nkd_variant: str = "paper"
    fd_stages: int = 1
    fd_weight: float = 1.0
    fd_beta: float = 2.0
    fd_loss_type: str = "smooth_l1"
    num_prefix_tokens: int = 0

    def __post_init__(self) -> None:
        if self.name not in METHOD_TABLE:
            raise ValueError(f"unknown distillation method {self.name!r}; expected one of {METHODS}")
        if self.nkd_variant not in NKD_VARIANTS:
            raise ValueError(f"unknown NKD variant {self.nkd_variant!r}; expected one of {NKD_VARIANTS}")
        if self.fd_loss_type not in FD_LOSS_TYPES:
            raise ValueError(f"unknown FD loss type {self.fd_loss_type!r}; expected one of {FD_LOSS_TYPES}")
        if METHOD_TABLE[self.name][1] and self.fd_stages < 1:
            raise ValueError(f"method {self.name!r} distils features: fd_stages must be >= 1, got {self.fd_stages}")

    @classmethod
    def from_settings(cls, name: str, settings: Mapping[str, Any]) -> "Method":
        """The method ``name`` with the fields of ``settings`` it knows (others are ignored)."""
        fields = {f.name for f in dataclasses.fields(cls)} - {"name"}
        return cls(name=name, **{k: v for k, v in settings.items() if k in fields})

    @property
    def logit_loss(self) -> str:
        return METHOD_TABLE[self.name][0]

    @property
    def feature_stages(self) -> int:
        """Stages whose maps are distilled (0: none)."""
        return self.fd_stages if METHOD_TABLE[self.name][1] else 0

    @property
    def uses_teacher(self) -> bool:
        return self.logit_loss != "ce" or self.feature_stages > 0

    @property
    def display_name(self) -> str:
        return METHOD_TABLE[self.name][2]


def distillation_loss(
    method: Method,
    student_logits: jax.Array,
    teacher_logits: jax.Array | None,
    labels: jax.Array,
    *,
    projected_student_feats: Sequence[jax.Array] | None = None,
    teacher_feats: Sequence[jax.Array] | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Total training loss of one method and its unweighted components (for logging).

    Methods, following the authors' ``engine_kd.py``:
    ``"ce"``: CE (the baseline student); ``"kd"``: :func:`kd`; ``"nkd"``: :func:`nkd`;
    ``"fd"``: CE + fd_weight * FD; ``"fd+kd"``: KD + fd_weight * FD; ``"fd+nkd"``: NKD +
    fd_weight * FD (no extra CE: the paper variant of NKD contains one already).
    ``label_smoothing`` applies to the CE of ``"ce"`` and ``"fd"`` only (the authors' criterion);
    KD's CE is unsmoothed like ``loss_kd``. FD methods take the student maps already projected by a
    :class:`FeatureProjector` and the teacher maps/tokens of the same stages.
    """
    m = method
    logit_method = m.logit_loss
    if logit_method != "ce" and teacher_logits is None:
        raise ValueError(f"method {m.name!r} needs teacher_logits")
    if m.feature_stages and (projected_student_feats is None or teacher_feats is None):
        raise ValueError(f"method {m.name!r} needs projected_student_feats and teacher_feats")

    if logit_method == "ce":
        logit_loss = cross_entropy(student_logits, labels, label_smoothing=m.label_smoothing)
    elif logit_method == "kd":
        logit_loss = kd(student_logits, teacher_logits, labels, temperature=m.kd_temperature, lam=m.kd_lam,
                        hard=m.kd_hard)
    else:
        logit_loss = nkd(student_logits, teacher_logits, labels, temperature=m.nkd_temperature, lam=m.nkd_lam,
                         variant=m.nkd_variant)
    components = {logit_method: logit_loss}
    total = logit_loss
    if m.feature_stages:
        fd = projected_feature_loss(projected_student_feats, teacher_feats, beta=m.fd_beta,
                                    num_prefix_tokens=m.num_prefix_tokens, loss_type=m.fd_loss_type)
        components["fd"] = fd
        total = total + m.fd_weight * fd
    components["total"] = total
    return total, components
