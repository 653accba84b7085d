"""Losses: parity with the authors' NKDLoss/loss_kd/feature losses, eq. (4) in float64, relations.

Losses are called through jitted wrappers (temperature and lam traced) so that each input shape
compiles once; one test compares jit with eager execution.
"""
from __future__ import annotations

import json
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from l2s_jax import losses as L

RTOL = 1e-5
N, C = 8, 10  # shape of the small random cases

_ce = jax.jit(L.cross_entropy)
_kd = jax.jit(L.kd, static_argnames=("hard",))
_nkd = jax.jit(L.nkd, static_argnames=("variant",))
_fd = nnx.jit(L.feature_distillation_loss, static_argnames=("beta", "num_prefix_tokens", "loss_type"))
_projected_fd = jax.jit(L.projected_feature_loss, static_argnames=("beta", "num_prefix_tokens", "loss_type"))


@partial(jax.jit, static_argnames=("variant",))
def _nkd_vg(s, t, y, temperature, lam, variant):
    return jax.value_and_grad(lambda x: L.nkd(x, t, y, temperature=temperature, lam=lam, variant=variant))(s)


@jax.jit
def _kd_vg_both(s, t, y, temperature, lam):
    """Value and gradient of kd with hard=False and hard=True (one compile per shape)."""
    soft = jax.value_and_grad(lambda x: L.kd(x, t, y, temperature=temperature, lam=lam))(s)
    hard = jax.value_and_grad(lambda x: L.kd(x, t, y, temperature=temperature, lam=lam, hard=True))(s)
    return soft, hard


# ----------------------------------------------------------------------------- helpers


def _rel_err(actual, reference) -> float:
    """max |a - r| / max |r|: one relative error for a whole array (or scalar)."""
    actual = np.asarray(actual, np.float64)
    reference = np.asarray(reference, np.float64)
    assert actual.shape == reference.shape, (actual.shape, reference.shape)
    return float(np.max(np.abs(actual - reference)) / max(np.max(np.abs(reference)), 1e-30))


def _logits(seed: int, n: int = N, c: int = C, scale: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """Independent N(0, scale^2) student and teacher logits, like the golden cases."""
    rng = np.random.default_rng(seed)
    return rng.normal(0, scale, (n, c)).astype(np.float32), rng.normal(0, scale, (n, c)).astype(np.float32)


def _hard_labels(seed: int, n: int = N, c: int = C) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, c, n)


def _soft_labels(seed: int, n: int = N, c: int = C) -> np.ndarray:
    """Mixup-style rows lam * smooth(a) + (1 - lam) * smooth(b) with a unique maximum."""
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, c, n), rng.integers(0, c, n)
    lam = rng.uniform(0.6, 0.9, (n, 1))
    smooth = lambda k: np.full((n, c), 0.1 / c) + (1 - 0.1) * np.eye(c)[k]  # noqa: E731
    return (lam * smooth(a) + (1 - lam) * smooth(b)).astype(np.float32)


def _np_log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _np_nkd_eq4(s, t, labels, tau, lam) -> float:
    """Eq. (4) in float64 from the formula: phi(Z/tau)^i / (1 - phi(Z/tau)^y) renormalisation."""
    s, t = np.asarray(s, np.float64), np.asarray(t, np.float64)
    n, c = s.shape
    labels = np.asarray(labels)
    y = labels if labels.ndim == 1 else labels.argmax(axis=1)
    rows = np.arange(n)
    p_s = np.exp(_np_log_softmax(s))
    p_t = np.exp(_np_log_softmax(t))
    if labels.ndim == 1:
        ce = -np.log(p_s[rows, y])
    else:
        ce = -(labels.astype(np.float64) * np.log(p_s)).sum(axis=1)
    target = -p_t[rows, y] * np.log(p_s[rows, y])
    s_tau, t_tau = np.exp(_np_log_softmax(s / tau)), np.exp(_np_log_softmax(t / tau))
    total = 0.0
    for k in range(n):
        others = [i for i in range(c) if i != y[k]]
        t_hat = t_tau[k, others] / (1.0 - t_tau[k, y[k]])
        s_hat = s_tau[k, others] / (1.0 - s_tau[k, y[k]])
        total += np.sum(t_hat * np.log(s_hat))
    return float(ce.mean() + target.mean() - lam * tau**2 * total / n)


def _np_smooth_l1(d: np.ndarray, beta: float = 2.0) -> float:
    a = np.abs(d)
    return float(np.where(a < beta, 0.5 * d * d / beta, a - 0.5 * beta).mean())


def _np_whiten(t: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    t = t.astype(np.float64)
    return (t - t.mean(-1, keepdims=True)) / np.sqrt(t.var(-1, keepdims=True) + eps)


def _np_bilinear(x: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """PyTorch's bilinear, align_corners=False: source = (i + 0.5) * in / out - 0.5, clamped at 0."""
    out = x.astype(np.float64)
    for axis, size in ((1, hw[0]), (2, hw[1])):
        n_in = out.shape[axis]
        src = np.maximum((np.arange(size) + 0.5) * n_in / size - 0.5, 0.0)
        lo = np.floor(src).astype(int)
        hi = np.minimum(lo + 1, n_in - 1)
        frac = (src - lo).reshape([-1 if a == axis else 1 for a in range(4)])
        out = np.take(out, lo, axis=axis) * (1 - frac) + np.take(out, hi, axis=axis) * frac
    return out


def _load_cases(golden_dir, kind: str) -> list[tuple[dict, dict]]:
    """The (index entry, arrays) pairs of one loss kind listed in golden/losses/index.json."""
    folder = golden_dir / "losses"
    index = json.loads((folder / "index.json").read_text())
    out = []
    for case in index["cases"]:
        if case["loss"].startswith(kind):
            with np.load(folder / case["file"]) as z:
                out.append((case, {k: z[k] for k in z.files}))
    return out


# ----------------------------------------------------------------------------- golden parity


def test_official_nkd_matches_released_code(golden_dir):
    cases = _load_cases(golden_dir, "NKDLoss")
    assert len(cases) == 24
    for case, d in cases:
        assert d["labels"].ndim == (1 if case["labels"] == "hard" else 2)
        value, grad = _nkd_vg(d["logit_s"], d["logit_t"], d["labels"], case["temp"], case["alpha"], "official")
        assert value.dtype == jnp.float32
        assert _rel_err(value, d["loss"]) < RTOL, case["file"]
        assert _rel_err(grad, d["grad_logit_s"]) < RTOL, case["file"]


def test_kd_matches_released_loss_kd(golden_dir):
    cases = _load_cases(golden_dir, "loss_kd")
    assert len(cases) == 32
    for case, d in cases:
        both = _kd_vg_both(d["preds"], d["teacher_preds"], d["labels"], float(case["T"]), case["alpha"])
        value, grad = both[int(case["hard"])]
        assert _rel_err(value, d["loss"]) < RTOL, case["file"]
        assert _rel_err(grad, d["grad_preds"]) < RTOL, case["file"]


def test_feature_losses_match_torch(golden_dir):
    fns = {
        "nn.SmoothL1Loss": jax.jit(jax.value_and_grad(L.smooth_l1)),
        "nn.MSELoss": jax.jit(jax.value_and_grad(L.mse)),
    }
    for kind, fn in fns.items():
        cases = _load_cases(golden_dir, kind)
        assert len(cases) == 2
        for case, d in cases:
            value, grad = fn(d["student"], d["target"])
            assert _rel_err(value, d["loss"]) < RTOL, case["file"]
            assert _rel_err(grad, d["grad_student"]) < RTOL, case["file"]
            if kind == "nn.MSELoss":
                assert _rel_err(value, np.mean((d["student"] - d["target"]).astype(np.float64) ** 2)) < RTOL


# ----------------------------------------------------------------------------- eq. (4)


@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_paper_nkd_matches_float64_formula(soft):
    n, c = 12, 37
    for seed, tau in enumerate((1.0, 2.0, 5.0, 10.0)):
        s, t = _logits(seed, n, c)
        labels = _soft_labels(seed, n, c) if soft else _hard_labels(seed, n, c)
        for lam in (1.0, 0.5):
            got = _nkd(s, t, labels, temperature=tau, lam=lam, variant="paper")
            assert _rel_err(got, _np_nkd_eq4(s, t, labels, tau, lam)) < RTOL, (tau, lam)


def test_paper_nkd_gradient_matches_finite_differences():
    tau, lam = 2.0, 0.7
    s, t = _logits(11)
    labels = _hard_labels(5)
    grad = np.asarray(_nkd_vg(s, t, labels, tau, lam, "paper")[1])
    h = 1e-5
    numeric = np.zeros((N, C))
    for i in range(N):
        for j in range(C):
            up, down = s.astype(np.float64), s.astype(np.float64)
            up[i, j] += h
            down[i, j] -= h
            numeric[i, j] = (_np_nkd_eq4(up, t, labels, tau, lam) - _np_nkd_eq4(down, t, labels, tau, lam)) / (2 * h)
    assert _rel_err(grad, numeric) < 1e-4


# ----------------------------------------------------------------------------- relations


def test_paper_minus_official_is_the_ce_term():
    s, t = _logits(21)
    labels = _hard_labels(1)
    for tau in (1.0, 3.0):
        paper = _nkd(s, t, labels, temperature=tau, lam=1.0, variant="paper")
        official = _nkd(s, t, labels, temperature=tau, lam=1.0, variant="official")
        assert _rel_err(paper - official, _ce(s, labels)) < RTOL, tau


def test_official_nkd_drops_positions_where_teacher_equals_its_target_value():
    # Teacher class 1 sits exactly 1000 below the target logit, so after the released code's
    # -1000 target shift its tau-probability equals the target's and it is dropped, although it
    # is not 0 at tau = 50. The paper variant keeps it; a student logit of -1e6 makes it visible.
    tau = 50.0
    s = np.array([[0.5, -1e6, 1.0, -0.3, 2.0]], np.float32)
    t = np.array([[0.0, -1000.0, 0.7, 1.1, -0.4]], np.float32)
    labels = np.array([0])
    keep = [0, 2, 3, 4]
    official = _nkd(s, t, labels, temperature=tau, variant="official")
    paper_full = _nkd(s, t, labels, temperature=tau, variant="paper") - _ce(s, labels)
    paper_without = _nkd(s[:, keep], t[:, keep], labels, temperature=tau, variant="paper") - _ce(s[:, keep], labels)
    assert _rel_err(official, paper_without) < RTOL
    assert abs(float(paper_full - official)) > 1e-2


@pytest.mark.parametrize("variant", L.NKD_VARIANTS)
def test_nkd_ignores_classes_that_underflow_in_both_models(variant):
    s, t = _logits(31, c=C - 1)
    labels = _hard_labels(2, c=C - 1)
    wide_s = np.concatenate([s, np.full((N, 1), -1e4, np.float32)], axis=1)
    wide_t = np.concatenate([t, np.full((N, 1), -1e4, np.float32)], axis=1)
    value, grad = _nkd_vg(wide_s, wide_t, labels, 1.0, 1.0, variant)
    assert np.all(np.isfinite(grad))
    assert _rel_err(value, _nkd(s, t, labels, variant=variant)) < RTOL


def test_nkd_soft_labels_use_argmax_target():
    s, t = _logits(41)
    soft = _soft_labels(9)
    hard = soft.argmax(axis=1)
    assert _rel_err(_nkd(s, t, soft, variant="official"), _nkd(s, t, hard, variant="official")) < RTOL
    # Paper variant: only the plain CE term sees the whole soft row.
    diff = _nkd(s, t, soft, variant="paper") - _nkd(s, t, hard, variant="paper")
    assert _rel_err(diff, _ce(s, soft) - _ce(s, hard)) < 1e-4


def test_kd_with_zero_lam_is_cross_entropy_and_hard_ignores_t_and_lam():
    s, t = _logits(51)
    labels = _hard_labels(4)
    assert _rel_err(_kd(s, t, labels, temperature=4.0, lam=0.0), _ce(s, labels)) < RTOL
    hard_a = _kd(s, t, labels, temperature=1.0, lam=0.1, hard=True)
    hard_b = _kd(s, t, labels, temperature=7.0, lam=0.9, hard=True)
    expected = 0.5 * _ce(s, labels) + 0.5 * _ce(s, t.argmax(axis=1))
    assert float(hard_a) == float(hard_b)
    assert _rel_err(hard_a, expected) < RTOL
    # The KL term vanishes when the student reproduces the teacher.
    assert abs(float(_kd(s, s, labels, temperature=3.0, lam=1.0))) < 1e-5


def test_label_smoothing_matches_manual_formula():
    s, _ = _logits(61)
    labels = _hard_labels(6)
    for eps in (0.0, 0.1, 0.3):
        target = (1 - eps) * np.eye(C)[labels] + eps / C
        expected = -(target * _np_log_softmax(s.astype(np.float64))).sum(axis=1).mean()
        assert _rel_err(_ce(s, labels, label_smoothing=eps), expected) < RTOL, eps
        # Soft targets are used as given (no second smoothing).
        assert _rel_err(_ce(s, target.astype(np.float32), label_smoothing=eps), expected) < RTOL, eps


def test_jit_matches_eager():
    s, t = _logits(71)
    labels = _hard_labels(7)
    for variant in L.NKD_VARIANTS:
        eager = L.nkd(s, t, labels, temperature=2.0, lam=0.5, variant=variant)
        assert _rel_err(_nkd(s, t, labels, temperature=2.0, lam=0.5, variant=variant), eager) < RTOL


@jax.jit
def _all_logit_losses(s, t, hard_labels, soft_labels):
    """Every logit loss on one input pair, hard and soft labels (one compile per dtype)."""
    out = {}
    for kind, labels in (("hard", hard_labels), ("soft", soft_labels)):
        out[f"ce_{kind}"] = L.cross_entropy(s, labels, label_smoothing=0.1)
        out[f"kd_{kind}"] = L.kd(s, t, labels, temperature=4.0, lam=0.5)
        out[f"nkd_paper_{kind}"] = L.nkd(s, t, labels, temperature=2.0)
        out[f"nkd_official_{kind}"] = L.nkd(s, t, labels, variant="official")
    return out


def test_bfloat16_inputs_give_float32_results():
    s, t = _logits(81)
    hard, soft = _hard_labels(8), _soft_labels(8)
    sb, tb = jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16)
    low = _all_logit_losses(sb, tb, hard, soft)
    upcast = _all_logit_losses(sb.astype(jnp.float32), tb.astype(jnp.float32), hard, soft)
    full = _all_logit_losses(s, t, hard, soft)
    assert len(low) == 8
    for name, value in low.items():
        assert value.dtype == jnp.float32, name
        # float32 math on the bf16 values, and close to the loss of the float32 inputs.
        assert _rel_err(value, upcast[name]) < 1e-6, name
        assert _rel_err(value, full[name]) < 2e-2, name


def test_invalid_arguments_raise():
    s, t = _logits(91)
    labels = _hard_labels(9)
    with pytest.raises(ValueError, match="paper.*official"):
        _nkd(s, t, labels, variant="nkd")
    with pytest.raises(ValueError, match="integer class ids"):
        _ce(s, labels.astype(np.float32))
    with pytest.raises(ValueError, match="do not match"):
        _ce(s, np.zeros((N, C + 1), np.float32))
    with pytest.raises(ValueError, match="differ in shape"):
        _kd(s, t[:, :4], labels, temperature=1.0, lam=0.1)
    with pytest.raises(ValueError, match="temperature"):
        L.kd(s, t, labels, temperature=0.0, lam=0.1)
    with pytest.raises(ValueError, match="label_smoothing"):
        L.cross_entropy(s, labels, label_smoothing=1.0)


# ----------------------------------------------------------------------------- feature distillation


def test_smooth_l1_regimes_and_beta_zero():
    x = np.array([0.0, 1.0, -1.5, 2.0, -3.0, 5.0], np.float32)
    y = np.zeros_like(x)
    f = jax.jit(L.smooth_l1, static_argnames=("beta",))
    assert _rel_err(f(x, y, beta=2.0), np.mean([0.0, 0.25, 0.5625, 1.0, 2.0, 4.0])) < RTOL
    assert _rel_err(f(x, y, beta=0.0), np.mean(np.abs(x))) < RTOL
    with pytest.raises(ValueError, match="differ in shape"):
        L.smooth_l1(x, y[:3])


def test_whiten_zero_mean_unit_variance_per_position():
    rng = np.random.default_rng(0)
    scale = rng.uniform(0.5, 20.0, (2, 5, 6, 1))
    t = (rng.normal(3.0, 1.0, (2, 5, 6, 48)) * scale).astype(np.float32)
    w = np.asarray(jax.jit(L.whiten)(t), np.float64)
    assert np.max(np.abs(w.mean(axis=-1))) < 1e-5
    var = t.astype(np.float64).var(axis=-1)
    np.testing.assert_allclose(w.var(axis=-1), var / (var + 1e-5), rtol=1e-5)
    assert np.max(np.abs(w.var(axis=-1) - 1.0)) < 1e-4


def test_tokens_to_map_drops_prefix_and_keeps_row_major_order():
    tokens = np.random.default_rng(1).normal(size=(2, 1 + 14 * 14, 8)).astype(np.float32)
    m = L.tokens_to_map(tokens, num_prefix_tokens=1)
    assert m.shape == (2, 14, 14, 8)
    np.testing.assert_array_equal(np.asarray(m[1, 3, 5]), tokens[1, 1 + 3 * 14 + 5])
    assert L.tokens_to_map(tokens[:, 1:, :], hw=(7, 28)).shape == (2, 7, 28, 8)
    with pytest.raises(ValueError, match="square"):
        L.tokens_to_map(tokens)
    with pytest.raises(ValueError, match="does not hold"):
        L.tokens_to_map(tokens, hw=(14, 15), num_prefix_tokens=1)


def test_resize_to_is_pytorch_bilinear():
    x = np.random.default_rng(2).normal(size=(2, 7, 9, 3)).astype(np.float32)
    for hw in ((14, 14), (4, 5)):
        np.testing.assert_allclose(np.asarray(L.resize_to(x, hw)), _np_bilinear(x, hw), atol=1e-5)
    assert L.resize_to(x, (7, 9)) is x


# Two distilled stages: student widths (6, 10) -> teacher widths (12, 16).
@pytest.fixture(scope="module")
def projector() -> L.FeatureProjector:
    return L.FeatureProjector([6, 10], [12, 16], rngs=nnx.Rngs(0))


def _stage_feats(seed: int, teacher_hw: int = 7) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Student maps (7x7x6, 4x4x10) and teacher maps (hw x hw x 12, 4x4x16), non-trivial statistics."""
    rng = np.random.default_rng(seed)
    student = [rng.normal(size=(2, 7, 7, 6)), rng.normal(size=(2, 4, 4, 10))]
    teacher = [rng.normal(2.0, 3.0, (2, teacher_hw, teacher_hw, 12)), rng.normal(size=(2, 4, 4, 16))]
    return [a.astype(np.float32) for a in student], [a.astype(np.float32) for a in teacher]


def _np_projected(projector: L.FeatureProjector, student: list[np.ndarray]) -> list[np.ndarray]:
    """The 1x1 convolutions as float64 matrix products with the module's own weights."""
    return [
        f.astype(np.float64) @ np.asarray(conv.kernel[...])[0, 0] + np.asarray(conv.bias[...])
        for conv, f in zip(projector.projections, student)
    ]


def test_feature_projector_and_loss_value_against_numpy(projector):
    student, teacher = _stage_feats(3)
    projected = nnx.jit(lambda p, x: p(x))(projector, student)
    assert [p.shape for p in projected] == [(2, 7, 7, 12), (2, 4, 4, 16)]
    reference = _np_projected(projector, student)
    assert max(_rel_err(a, b) for a, b in zip(projected, reference)) < 1e-5
    expected = sum(_np_smooth_l1(g - _np_whiten(tf)) for g, tf in zip(reference, teacher))
    got = _fd(student, teacher, projector)
    assert _rel_err(got, expected) < 1e-5
    assert _rel_err(_projected_fd(projected, teacher), got) < 1e-6


def test_feature_loss_resize_and_token_paths(projector):
    student, teacher = _stage_feats(4, teacher_hw=14)
    tokens = np.concatenate([np.ones((2, 1, 12), np.float32), teacher[0].reshape(2, 14 * 14, 12)], axis=1)
    via_tokens = _fd(student, [tokens, teacher[1]], projector, num_prefix_tokens=1)
    via_map = _fd(student, teacher, projector)
    reference = _np_projected(projector, student)
    expected = _np_smooth_l1(_np_bilinear(reference[0], (14, 14)) - _np_whiten(teacher[0]))
    expected += _np_smooth_l1(reference[1] - _np_whiten(teacher[1]))
    assert _rel_err(via_tokens, via_map) < 1e-6
    assert _rel_err(via_map, expected) < 1e-5
    # Raised while tracing, before any computation.
    with pytest.raises(ValueError, match="square"):
        _fd(student, [tokens, teacher[1]], projector)
    with pytest.raises(ValueError, match="stage 1"):
        _fd(student, [teacher[0], teacher[1][..., :12]], projector)


def test_feature_gradient_reaches_projector_and_student_not_teacher(projector):
    student, teacher = _stage_feats(5, teacher_hw=14)

    def loss(p, s, t):
        return L.feature_distillation_loss(s, t, p)

    g_proj, g_student, g_teacher = nnx.jit(nnx.grad(loss, argnums=(0, 1, 2)))(projector, student, teacher)
    params = jax.tree.leaves(nnx.state(g_proj, nnx.Param))
    assert len(params) == 4 and all(np.abs(np.asarray(p)).max() > 0 for p in params)
    assert all(np.abs(np.asarray(g)).max() > 0 for g in g_student)
    assert all(np.abs(np.asarray(g)).max() == 0.0 for g in g_teacher)


def test_feature_projector_validates_widths(projector):
    with pytest.raises(ValueError, match="one teacher width"):
        L.FeatureProjector([4, 8], [6], rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="student maps"):
        projector([np.zeros((1, 2, 2, 6), np.float32)])


# ----------------------------------------------------------------------------- combinations


@jax.jit
def _every_method(s, t, labels, ps, tf):
    """distillation_loss of every method (teacher logits omitted where unused), one compile."""
    settings = dict(fd_weight=0.5, label_smoothing=0.1, kd_temperature=4.0, kd_lam=0.9, nkd_temperature=2.0,
                    nkd_lam=0.5, nkd_variant="official")
    return {m: L.distillation_loss(L.Method(m, **settings), s, None if m in ("ce", "fd") else t, labels,
                                   projected_student_feats=ps, teacher_feats=tf) for m in L.METHODS}


@jax.jit
def _separate_terms(s, t, labels, ps, tf):
    """The individual terms the combinations are made of."""
    return {
        "fd": L.projected_feature_loss(ps, tf),
        "ce": L.cross_entropy(s, labels, label_smoothing=0.1),
        "kd": L.kd(s, t, labels, temperature=4.0, lam=0.9),
        "nkd": L.nkd(s, t, labels, temperature=2.0, lam=0.5, variant="official"),
    }


def test_distillation_loss_combines_each_method():
    s, t = _logits(101)
    labels = _hard_labels(10)
    rng = np.random.default_rng(10)
    ps = [rng.normal(size=(N, 3, 3, 5)).astype(np.float32)]
    tf = [rng.normal(size=(N, 6, 6, 5)).astype(np.float32)]
    got = _every_method(s, t, labels, ps, tf)
    term = _separate_terms(s, t, labels, ps, tf)
    expected = {
        "ce": (term["ce"], {"ce"}),
        "kd": (term["kd"], {"kd"}),
        "nkd": (term["nkd"], {"nkd"}),
        "fd": (term["ce"] + 0.5 * term["fd"], {"ce", "fd"}),
        "fd+kd": (term["kd"] + 0.5 * term["fd"], {"kd", "fd"}),
        "fd+nkd": (term["nkd"] + 0.5 * term["fd"], {"nkd", "fd"}),
    }
    assert set(expected) == set(L.METHODS) == set(got)
    for method, (value, keys) in expected.items():
        total, parts = got[method]
        assert set(parts) == keys | {"total"}, method
        assert _rel_err(total, value) < RTOL and float(parts["total"]) == float(total), method
        for key in keys:
            assert _rel_err(parts[key], term[key]) < RTOL, (method, key)


def test_distillation_loss_validates_arguments():
    s, t = _logits(111)
    labels = _hard_labels(11)
    with pytest.raises(ValueError, match="fd\\+nkd"):
        L.Method("dkd")
    with pytest.raises(ValueError, match="teacher_logits"):
        L.distillation_loss(L.Method("kd"), s, None, labels)
    with pytest.raises(ValueError, match="projected_student_feats"):
        L.distillation_loss(L.Method("fd+kd"), s, t, labels)


@pytest.mark.parametrize("name, logit, stages, teacher, display", [
    ("ce", "ce", 0, False, "CE"), ("kd", "kd", 0, True, "KD"), ("nkd", "nkd", 0, True, "NKD"),
    ("fd", "ce", 2, True, "FD"), ("fd+kd", "kd", 2, True, "FD+KD"), ("fd+nkd", "nkd", 2, True, "FD+NKD")])
def test_method_is_parsed_once(name, logit, stages, teacher, display):
    """Every method name parses into its logit loss, distilled stages and teacher use."""
    m = L.Method.from_settings(name, {"fd_stages": 2, "kd_lam": 0.5, "not_a_loss_setting": 1})
    assert (m.logit_loss, m.feature_stages, m.uses_teacher, m.display_name) == (logit, stages, teacher, display)
    assert m.kd_lam == 0.5 and hash(m) == hash(L.Method.from_settings(name, {"fd_stages": 2, "kd_lam": 0.5}))


def test_method_rejects_bad_settings():
    for kwargs, match in ((dict(nkd_variant="x"), "NKD variant"), (dict(fd_loss_type="l3"), "FD loss type")):
        with pytest.raises(ValueError, match=match):
            L.Method("nkd", **kwargs)
    with pytest.raises(ValueError, match="fd_stages"):
        L.Method("fd", fd_stages=0)
