"""The fused train step: sharding invariance, FSDP, gradient accumulation, frozen teacher, schedule.

Models are tiny (32x32 inputs, one block per stage) and every equivalence runs 2 steps on 8
simulated CPU devices (tests/conftest.py). The equivalence tests use AdamW with eps = 1e-3:
Adam's first update is g / (|g| + eps), which with eps = 1e-8 turns float32 round-off on
near-zero gradients into +-lr jumps; a large eps keeps the update a smooth function of the
gradient while still exercising the (sharded) optimizer state.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from l2s_jax import layers, losses, train
from l2s_jax.models import create
from l2s_jax.models.policy import Policy, apply_policy

NUM_CLASSES = 4
BATCH, SIZE = 16, 32
MIXUP = (("cutmix_alpha", 1.0), ("label_smoothing", 0.1), ("mixup_alpha", 0.8), ("prob", 1.0), ("switch_prob", 0.5))
LOSS = {"nkd_temperature": 2.0, "kd_temperature": 2.0, "kd_lam": 0.5, "fd_stages": 1}


def _teacher(train_mode: bool = False) -> nnx.Module:
    """A tiny large-kernel teacher (conv + BN per block) with non-trivial running BN stats, drop path 0.3.

    Run in train mode it would normalise with batch statistics and drop paths, so its outputs
    would differ from eval mode.
    """
    model = create("slak", depths=(1, 1, 1, 1), dims=(8, 16, 16, 24), kernel_size=(9, 5, 3, 3, 100), decompose=False,
                   bn=True, num_classes=NUM_CLASSES, drop_path_rate=0.3, seed=1)
    for _, m in nnx.iter_modules(model):
        if isinstance(m, layers.BatchNorm):
            m.mean[...] = m.mean[...] + 0.3
            m.var[...] = m.var[...] * 2.0
    if train_mode:
        model.train()
    else:
        model.eval()
    return model


def _student(name: str, **overrides) -> train.DistillStudent:
    net = create(name, depths=(1, 1, 1, 1), dims=(8, 16, 16, 16), num_classes=NUM_CLASSES, seed=0, **overrides)
    projector = losses.FeatureProjector([16], [24], rngs=nnx.Rngs(5))
    return train.DistillStudent(net, projector)


def _batch(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"images": rng.standard_normal((BATCH, SIZE, SIZE, 3), np.float32),
            "labels": rng.integers(0, NUM_CLASSES, BATCH).astype(np.int32)}


def run_steps(student: train.DistillStudent, teacher: nnx.Module, *, devices: int, method: str = "fd+nkd",
              accum: int = 1, fsdp: bool = False, steps: int = 2):
    """``steps`` train steps on a mesh of ``devices``; returns (state, metrics list, teacher state, shardings)."""
    mesh = train.create_mesh(jax.devices()[:devices])
    student_def, params, stats = train.split_student(student)
    schedule = optax.constant_schedule(0.05)
    optimizer = optax.adamw(schedule, eps=1e-3, weight_decay=0.05, mask=train.weight_decay_mask)
    state = train.init_train_state(params, stats, optimizer, ema=True)
    shardings = train.tree_shardings(state, mesh, fsdp=fsdp, min_size=64)
    teacher_graph, teacher_state = nnx.split(teacher)
    teacher_sh = train.tree_shardings(teacher_state, mesh, fsdp=fsdp, min_size=64)
    cfg = train.StepConfig(method=losses.Method.from_settings(method, LOSS), num_classes=NUM_CLASSES, seed=3,
                           accum_steps=accum, ema_decay=0.9, mixup=MIXUP)
    step = train.jit_train_step(
        train.make_train_step(student_def, teacher_graph, optimizer, schedule, cfg, mesh=mesh,
                              grad_shardings=shardings.params),
        mesh, shardings, teacher_sh)
    state = jax.device_put(state, shardings)
    teacher_state = jax.device_put(teacher_state, teacher_sh)
    metrics = []
    for i in range(steps):
        batch = jax.device_put(_batch(i), train.batch_sharding(mesh))
        state, m = step(state, teacher_state, batch)
        metrics.append(jax.device_get(m))
    return state, metrics, teacher_state, shardings


def _arrays(tree) -> list[np.ndarray]:
    """Numeric leaves (PRNG keys as their raw data)."""
    leaves = jax.tree.leaves(tree)
    return [np.asarray(jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x)
            for x in leaves]


def _assert_trees_close(a, b, atol: float = 1e-5, rtol: float = 1e-5) -> None:
    la, lb = _arrays(a), _arrays(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_allclose(x, y, atol=atol, rtol=rtol)


@pytest.fixture(scope="module")
def replicated_run():
    """Distillation (FD+NKD, Mixup/CutMix, drop path, SyncBN) on 8 devices, params replicated."""
    return run_steps(_student("convnext_tiny_bn", drop_path_rate=0.2), _teacher(), devices=8)


def test_sharded_step_matches_single_device(replicated_run):
    """8-way data parallel == one device: same mixed batch, drop-path masks, global BN statistics.

    The single-device run gets its teacher in *train* mode: the step must still run it in eval
    mode (running statistics), so the losses agree only if it does.
    """
    state8, metrics8, _, _ = replicated_run
    state1, metrics1, _, _ = run_steps(_student("convnext_tiny_bn", drop_path_rate=0.2), _teacher(train_mode=True),
                                       devices=1)
    for m8, m1 in zip(metrics8, metrics1):
        for k in ("loss", "loss_nkd", "loss_fd", "grad_norm"):
            np.testing.assert_allclose(m8[k], m1[k], rtol=1e-5, atol=1e-6)
    _assert_trees_close(state8.params, state1.params)
    _assert_trees_close(state8.batch_stats, state1.batch_stats)
    _assert_trees_close(state8.ema_params, state1.ema_params)
    assert int(state8.step) == 2


def test_fsdp_matches_replication(replicated_run):
    """FSDP-sharded params, optimizer state, EMA and teacher give the replicated result."""
    state_r, metrics_r, _, _ = replicated_run
    state_f, metrics_f, teacher_f, shardings = run_steps(_student("convnext_tiny_bn", drop_path_rate=0.2), _teacher(),
                                                         devices=8, fsdp=True)
    sharded = [s for s in jax.tree.leaves(shardings.params) if s.spec != P()]
    assert sharded, "min_size=64 should shard some parameters"
    assert any(s.spec != P() for s in jax.tree.leaves(jax.tree.map(lambda x: x.sharding, state_f.opt_state)))
    assert any(x.sharding.spec != P() for x in jax.tree.leaves(teacher_f))
    for mr, mf in zip(metrics_r, metrics_f):
        np.testing.assert_allclose(mr["loss"], mf["loss"], rtol=1e-5)
    _assert_trees_close(state_r.params, state_f.params)
    _assert_trees_close(state_r.opt_state, state_f.opt_state)


def test_teacher_frozen_and_student_bn_updates(replicated_run):
    """The teacher's state is an input only (unchanged, not donated); the student's BN stats move."""
    state, _, teacher_state, _ = replicated_run
    fresh_graph, fresh = nnx.split(_teacher())
    _assert_trees_close(teacher_state, fresh, atol=0, rtol=0)
    _, _, init_stats = train.split_student(_student("convnext_tiny_bn", drop_path_rate=0.2))
    moved = [np.abs(np.asarray(a) - np.asarray(b)).max()
             for a, b in zip(jax.tree.leaves(jax.device_get(state.batch_stats)), jax.tree.leaves(init_stats))]
    assert moved and min(moved) > 0, "every student BatchNorm statistic should have been updated"


def test_accumulation_matches_one_big_batch():
    """2 micro-batches of 8 on 8 devices == one batch of 16 on one device (plain ConvNeXt student).

    The student has no BatchNorm (LayerNorm only). Mixup is applied once to the global batch before it is split, batch-mean losses average to
    the big-batch mean and gradients are averaged, so the updates agree. A BatchNorm student
    would not: its statistics (and running-stat updates) are per micro-batch by design, as in
    PyTorch gradient accumulation. Drop path is off: its masks are drawn per micro-batch.
    """
    def student():
        return _student("convnext_tiny", drop_path_rate=0.0)

    state_1, metrics_1, _, _ = run_steps(student(), _teacher(), devices=1, method="kd", accum=1)
    state_2, metrics_2, _, _ = run_steps(student(), _teacher(), devices=8, method="kd", accum=2)
    for a, b in zip(metrics_1, metrics_2):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
    _assert_trees_close(state_1.params, state_2.params)


def test_mixed_precision_keeps_float32_master_weights():
    """bfloat16 student compute and a bfloat16-held teacher: float32 params, finite float32 loss."""
    student = _student("convnext_tiny_bn", policy=Policy(compute_dtype="bfloat16"))
    teacher = apply_policy(_teacher(), Policy(compute_dtype="bfloat16", param_dtype="bfloat16"))
    assert {x.dtype for x in jax.tree.leaves(nnx.state(teacher, nnx.Param))} == {jnp.dtype(jnp.bfloat16)}
    state, metrics, _, _ = run_steps(student, teacher, devices=1, steps=1)
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
    assert metrics[0]["loss"].dtype == np.float32 and np.isfinite(metrics[0]["loss"])


def test_schedule_warmup_cosine():
    """Linear warmup from 0, peak at the end of warmup, cosine to exactly ``end`` at the last step."""
    sched = functools.partial(train.warmup_cosine, peak=4e-3, warmup_steps=10, total_steps=110, end=1e-6)
    lrs = np.asarray(jax.vmap(sched)(jnp.arange(0, 121)))
    assert lrs[0] == 0.0
    np.testing.assert_allclose(lrs[5], 2e-3, rtol=1e-6)
    np.testing.assert_allclose(lrs[10], 4e-3, rtol=1e-6)
    np.testing.assert_allclose(lrs[60], 1e-6 + 0.5 * (4e-3 - 1e-6), rtol=1e-5)
    np.testing.assert_allclose(lrs[110:], 1e-6, rtol=1e-5)
    assert np.all(np.diff(lrs[10:111]) <= 0) and np.all(np.diff(lrs[:11]) > 0)
    scaled = train.make_schedule(dict(lr=4e-3, lr_base_batch_size=4096, warmup_epochs=2, min_lr=1e-6),
                                 global_batch_size=1024, steps_per_epoch=5, total_steps=50)
    np.testing.assert_allclose(scaled(10), 1e-3, rtol=1e-6)


def test_optimizer_decays_only_matrices():
    """AdamW decays >1-D parameters only (not biases, norms, layer scales), decoupled from the gradient."""
    optim = dict(name="adamw", b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.5, clip_grad_norm=0.0)
    tx = train.create_optimizer(optim, optax.constant_schedule(0.1))
    params = {"kernel": jnp.ones((2, 3)), "bias": jnp.ones((3,)), "dw": jnp.ones((3, 3, 2))}
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero, tx.init(params), params)
    np.testing.assert_allclose(updates["kernel"], -0.05)
    np.testing.assert_allclose(updates["dw"], -0.05)
    np.testing.assert_allclose(updates["bias"], 0.0)
    clipped = train.create_optimizer({**optim, "weight_decay": 0.0, "clip_grad_norm": 1.0},
                                     optax.constant_schedule(1.0))
    g = {"kernel": jnp.full((2, 3), 100.0), "bias": jnp.zeros((3,)), "dw": jnp.zeros((3, 3, 2))}
    _, state = clipped.update(g, clipped.init(params), params)
    # The first moment holds (1 - b1) * the clipped gradient: global norm 1 over 6 equal entries.
    np.testing.assert_allclose(optax.tree_utils.tree_get(state, "mu")["kernel"], 0.1 / np.sqrt(6), rtol=1e-6)
    with pytest.raises(ValueError, match="optim.name"):
        train.create_optimizer({**optim, "name": "adamx"}, optax.constant_schedule(0.1))


def test_fsdp_spec_picks_largest_divisible_axis():
    assert train.fsdp_spec((3, 16, 24), 8, 0) == P(None, None, "data")
    assert train.fsdp_spec((3, 7, 5), 8, 0) == P()
    assert train.fsdp_spec((64, 64), 8, 10**6) == P()
    assert train.fsdp_spec((64, 64), 1, 0) == P()
