"""The fused distillation train step: one jitted, explicitly sharded function per step.

A step takes the global batch (split over the mesh's ``data`` axis), mixes it on device
(Mixup/CutMix with a per-step key, so teacher and student see the same images), runs the
frozen teacher in eval mode under ``stop_gradient``, differentiates the student (train mode:
batch statistics, drop path) and its FD projectors through
:func:`l2s_jax.losses.distillation_loss`, accumulates gradients over ``accum_steps``
micro-batches (``lax.scan``), applies AdamW (or LAMB) with a per-step warmup + cosine schedule
and updates the EMA of the student. Student parameters, optimizer state and EMA are replicated
or FSDP-sharded; the teacher's state is an argument of the step, never part of
:class:`TrainState`, and has no optimizer state.

Everything here is pure (``nnx.split`` once, ``jax.jit`` on functions of pytrees); the stateful
loop lives in :mod:`l2s_jax.main`.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from l2s_jax import losses
from l2s_jax.data.mixup import mixup_cutmix

DATA = "data"
# Everything of the student that is neither trained nor random: BN running stats, sparse masks.
STATS = nnx.Not(nnx.Any(nnx.Param, nnx.RngState))
Schedule = Callable[[jax.Array], jax.Array]


# --- mesh and shardings ----------------------------------------------------------------------

def create_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh over ``devices`` (default: all devices of all processes) named ``data``."""
    devices = np.asarray(jax.devices() if devices is None else devices).reshape(-1)
    return Mesh(devices, (DATA,))


def fsdp_spec(shape: Sequence[int], num_shards: int, min_size: int) -> P:
    """Shard the largest axis divisible by ``num_shards`` of arrays with >= ``min_size`` elements."""
    if num_shards <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    candidates = [(d, i) for i, d in enumerate(shape) if d % num_shards == 0]
    if not candidates:
        return P()
    _, axis = max(candidates)
    return P(*[DATA if i == axis else None for i in range(len(shape))])


def tree_shardings(tree: Any, mesh: Mesh, *, fsdp: bool = False, min_size: int = 2**18) -> Any:
    """NamedShardings for every leaf: replicated, or FSDP over ``data`` when ``fsdp``."""
    n = mesh.shape[DATA]

    def one(x: Any) -> NamedSharding:
        shape = np.shape(x)
        return NamedSharding(mesh, fsdp_spec(shape, n, min_size) if fsdp else P())

    return jax.tree.map(one, tree)


def put_global(tree: Any, shardings: Any) -> Any:
    """Host (or process-local) values -> global ``jax.Array`` s laid out as ``shardings``.

    Unlike ``jax.device_put`` this works when the mesh spans several processes (each process
    holds the same values and fills its own shards); PRNG keys stay typed keys.
    """

    def one(x: Any, sharding: NamedSharding) -> jax.Array:
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            data = one(np.asarray(jax.random.key_data(x)), sharding)
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(one, tree, shardings)


def to_host(tree: Any) -> Any:
    """Global arrays (replicated or sharded, on any number of processes) -> numpy on every process."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over ``data``."""
    return NamedSharding(mesh, P(DATA))


# --- schedule and optimizer ------------------------------------------------------------------

def warmup_cosine(step: jax.Array, *, peak: float, warmup_steps: int, total_steps: int, end: float) -> jax.Array:
    """Per-step learning rate: linear 0 -> ``peak`` over ``warmup_steps``, then cosine to ``end``.

    As ConvNeXt/DeiT's ``cosine_scheduler``: at ``total_steps`` the rate is exactly ``end``.
    """
    step = jnp.asarray(step, jnp.float32)
    warm = peak * step / max(warmup_steps, 1)
    t = jnp.clip((step - warmup_steps) / max(total_steps - warmup_steps, 1), 0.0, 1.0)
    cosine = end + 0.5 * (peak - end) * (1.0 + jnp.cos(jnp.pi * t))
    return jnp.where(step < warmup_steps, warm, cosine)


def make_schedule(optim: Mapping[str, Any], *, global_batch_size: int, steps_per_epoch: int,
                  total_steps: int) -> Schedule:
    """The warmup + cosine schedule of ``config.optim``, peak lr scaled linearly with the batch."""
    peak = optim["lr"] * global_batch_size / optim["lr_base_batch_size"]
    warmup = int(round(optim["warmup_epochs"] * steps_per_epoch))
    return functools.partial(warmup_cosine, peak=peak, warmup_steps=min(warmup, total_steps),
                             total_steps=total_steps, end=optim["min_lr"])


def weight_decay_mask(params: Any) -> Any:
    """Decay every parameter with more than one dimension (not biases, norms, layer scales)."""
    return jax.tree.map(lambda p: np.ndim(p) > 1, params)


def create_optimizer(optim: Mapping[str, Any], schedule: Schedule) -> optax.GradientTransformation:
    """AdamW or LAMB of ``config.optim`` with decoupled weight decay on >1-D params, optional clipping."""
    kwargs = dict(b1=optim["b1"], b2=optim["b2"], eps=optim["eps"], weight_decay=optim["weight_decay"],
                  mask=weight_decay_mask)
    if optim["name"] == "adamw":
        tx = optax.adamw(schedule, **kwargs)
    elif optim["name"] == "lamb":
        tx = optax.lamb(schedule, **kwargs)
    elif optim["name"] == "sgd":  # PyTorch SGD: coupled L2 weight decay, heavy-ball momentum
        tx = optax.chain(optax.add_decayed_weights(optim["weight_decay"], mask=weight_decay_mask),
                         optax.sgd(schedule, momentum=optim.get("momentum", 0.9) or None))
    else:
        raise ValueError(f"config.optim.name: unknown optimizer {optim['name']!r}; expected 'adamw', 'lamb' or 'sgd'")
    if optim["clip_grad_norm"]:
        tx = optax.chain(optax.clip_by_global_norm(optim["clip_grad_norm"]), tx)
    return tx


# --- models ----------------------------------------------------------------------------------

class DistillStudent(nnx.Module):
    """The trainable side of distillation: the student network and (for FD) its projectors."""

    def __init__(self, model: nnx.Module, projector: losses.FeatureProjector | None = None):
        self.model = model
        self.projector = projector if projector is not None else nnx.data(None)

    def __call__(self, images: jax.Array) -> jax.Array:
        return self.model(images)


def feature_channels(model: nnx.Module, num_stages: int) -> list[int]:
    """Channel counts of the model's last ``num_stages`` feature maps (no forward pass)."""
    channels = model.stage_channels
    if not 0 < num_stages <= len(channels):
        raise ValueError(f"asked for the last {num_stages} stages of a model with {len(channels)}")
    return list(channels[-num_stages:])


# --- train state -----------------------------------------------------------------------------

@flax.struct.dataclass
class TrainState:
    """Everything a training run checkpoints (the teacher is not part of it)."""

    step: jax.Array
    params: nnx.State
    batch_stats: nnx.State
    opt_state: optax.OptState
    ema_params: nnx.State | None
    ema_batch_stats: nnx.State | None


@dataclasses.dataclass(frozen=True)
class StudentDef:
    """The static halves of the student after ``nnx.split``: train and eval graphs, RNG template."""

    train_graph: nnx.GraphDef
    eval_graph: nnx.GraphDef
    rng_state: nnx.State


def split_student(student: DistillStudent) -> tuple[StudentDef, nnx.State, nnx.State]:
    """``nnx.split`` the student once: its definitions, parameters and non-trainable stats."""
    student.eval()
    eval_graph = nnx.graphdef(student)
    student.train()
    train_graph, params, rng_state, stats = nnx.split(student, nnx.Param, nnx.RngState, STATS)
    return StudentDef(train_graph, eval_graph, rng_state), params, stats


def init_train_state(params: nnx.State, stats: nnx.State, optimizer: optax.GradientTransformation, *,
                     ema: bool) -> TrainState:
    """A fresh state at step 0 (EMA initialised to the parameters, as timm's ModelEmaV2).

    Leaves are made strongly typed (e.g. ``jnp.full`` layer scales are weak), so the state the
    step returns has the same types as the one it was compiled for (no second compilation).
    """
    copy = functools.partial(jax.tree.map, lambda x: jnp.array(x, dtype=x.dtype))
    params, stats = copy(params), copy(stats)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=stats,
        opt_state=optimizer.init(params),
        ema_params=copy(params) if ema else None,
        ema_batch_stats=copy(stats) if ema else None,
    )


# --- the step --------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Static settings of the train step (hashable: they are baked into the compiled step)."""

    method: losses.Method
    num_classes: int
    seed: int = 0
    accum_steps: int = 1
    ema_decay: float = 0.0
    mixup: tuple[tuple[str, Any], ...] = ()


def _micro_batches(x: jax.Array, k: int, mesh: Mesh | None) -> jax.Array:
    """[B, ...] -> [k, B/k, ...]; micro-batch j holds rows j, j + k, ... so every device keeps a share."""
    if x.shape[0] % k:
        raise ValueError(f"batch of {x.shape[0]} does not split into accum_steps={k} micro-batches")
    x = jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)
    if mesh is not None:
        x = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(None, DATA)))
    return x


def _ema(old: Any, new: Any, decay: float) -> Any:
    return jax.tree.map(lambda e, p: e * decay + (1.0 - decay) * p.astype(e.dtype), old, new)


@dataclasses.dataclass(frozen=True)
class StepParts:
    """The pure pieces of one train step, in the order it runs them (the benchmark times each).

    * ``mix(images, labels, key) -> (images, soft_targets)``: Mixup/CutMix (identity without it).
    * ``teacher(teacher_state, images) -> (logits, feats)``: frozen, eval mode, no gradient.
    * ``loss(params, stats, images, targets, t_logits, t_feats, key) -> (loss, (parts, stats))``:
      the student forward (train mode) and the distillation loss; differentiate w.r.t. ``params``.
    * ``update(state, grads, stats, parts) -> (state, metrics)``: optimizer, EMA, metrics and the
      non-finite guard.
    """

    mix: Callable[..., tuple[jax.Array, jax.Array]]
    teacher: Callable[..., tuple[jax.Array | None, list[jax.Array]]]
    loss: Callable[..., tuple[jax.Array, tuple[dict[str, jax.Array], nnx.State]]]
    update: Callable[..., tuple[TrainState, dict[str, jax.Array]]]


def make_step_parts(
    student_def: StudentDef,
    teacher_graph: nnx.GraphDef | None,
    optimizer: optax.GradientTransformation,
    schedule: Schedule,
    cfg: StepConfig,
) -> StepParts:
    """The :class:`StepParts` of ``cfg`` (see :func:`make_train_step` for how they compose)."""
    mixup = dict(cfg.mixup)
    method = cfg.method
    fd_stages = method.feature_stages
    if method.uses_teacher and teacher_graph is None:
        raise ValueError(f"method {method.name!r} needs a teacher")

    def mix(images: jax.Array, labels: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
        if not mixup:
            return images, labels
        return mixup_cutmix(images, labels, key, num_classes=cfg.num_classes, **mixup)

    def teacher_forward(teacher_state: nnx.State, images: jax.Array) -> tuple[jax.Array | None, list[jax.Array]]:
        if not method.uses_teacher:
            return None, []
        teacher = nnx.merge(teacher_graph, teacher_state)
        teacher.eval()  # running BN statistics, no drop path, whatever mode it was split in
        out = teacher.forward_with_features(images, fd_stages)
        return jax.lax.stop_gradient(out)

    def loss_fn(params, stats, images, targets, t_logits, t_feats, key):
        # Fresh variables in this trace (NNX refuses to mutate the caller's), RNG reseeded per step.
        rng_state, stats = jax.tree.map(lambda x: x, (student_def.rng_state, stats))
        student = nnx.merge(student_def.train_graph, params, rng_state, stats)
        nnx.reseed(student, dropout=key)
        logits, feats = student.model.forward_with_features(images, fd_stages)
        projected = student.projector(feats) if fd_stages else None
        loss, parts = losses.distillation_loss(method, logits, t_logits, targets, projected_student_feats=projected,
                                               teacher_feats=t_feats or None)
        return loss, (parts, nnx.state(student, STATS))

    def update(state: TrainState, grads: Any, stats: nnx.State, parts: dict[str, jax.Array]):
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new = state.replace(params=params, batch_stats=stats, opt_state=opt_state)
        if state.ema_params is not None:
            new = new.replace(ema_params=_ema(state.ema_params, params, cfg.ema_decay),
                              ema_batch_stats=_ema(state.ema_batch_stats, stats, cfg.ema_decay))
        metrics = {f"loss_{name}" if name != "total" else "loss": v.mean() for name, v in parts.items()}
        grad_norm = optax.global_norm(grads)
        # A non-finite loss or gradient never reaches the state: the update is dropped (the loop
        # then stops or counts it, as config.nan_policy says).
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
        new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
        metrics.update(lr=schedule(state.step), grad_norm=grad_norm, nonfinite=1 - finite.astype(jnp.int32))
        return new.replace(step=state.step + 1), metrics

    return StepParts(mix=mix, teacher=teacher_forward, loss=loss_fn, update=update)


def make_train_step(
    student_def: StudentDef,
    teacher_graph: nnx.GraphDef | None,
    optimizer: optax.GradientTransformation,
    schedule: Schedule,
    cfg: StepConfig,
    *,
    mesh: Mesh | None = None,
    grad_shardings: Any = None,
) -> Callable[[TrainState, nnx.State | None, dict[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
    """The pure train step ``(state, teacher_state, batch) -> (state, metrics)`` (jit it).

    ``batch`` holds ``images`` [B, H, W, 3] float32 and int ``labels`` [B]. With ``mesh`` the
    micro-batches stay spread over all devices; ``grad_shardings`` (the params' shardings)
    keeps accumulated gradients FSDP-sharded.
    """
    part = make_step_parts(student_def, teacher_graph, optimizer, schedule, cfg)

    def train_step(state: TrainState, teacher_state: nnx.State | None, batch: dict[str, jax.Array]):
        key = jax.random.fold_in(jax.random.key(cfg.seed), state.step)
        mix_key, drop_key = jax.random.split(key)
        images, targets = part.mix(batch["images"], batch["labels"], mix_key)
        k = cfg.accum_steps

        def micro_step(stats, x, y, j):
            t_logits, t_feats = part.teacher(teacher_state, x)
            (_, (parts, stats)), g = jax.value_and_grad(part.loss, has_aux=True)(
                state.params, stats, x, y, t_logits, t_feats, jax.random.fold_in(drop_key, j))
            return g, stats, parts

        def accumulate(carry, inputs):
            grads, stats, j = carry
            g, stats, parts = micro_step(stats, *inputs, j)
            grads = jax.tree.map(jnp.add, grads, g)
            if grad_shardings is not None:
                grads = jax.lax.with_sharding_constraint(grads, grad_shardings)
            return (grads, stats, j + 1), parts

        if k == 1:  # no loop: XLA fuses and assigns buffers better outside a while loop
            grads, stats, parts = micro_step(state.batch_stats, images, targets, 0)
        else:
            micro = (_micro_batches(images, k, mesh), _micro_batches(targets, k, mesh))
            zeros = jax.tree.map(jnp.zeros_like, state.params)
            (grads, stats, _), parts = jax.lax.scan(accumulate, (zeros, state.batch_stats, 0), micro)
            grads = jax.tree.map(lambda g: g / k, grads)
        return part.update(state, grads, stats, parts)

    return train_step


# XLA:CPU options of the train step, measured with tools/benchmark_step.py (figures in the README).
# LLVM at optimisation level 1 instead of 2 compiles the paper's step faster with no measurable
# change in its speed (the hot loops are library calls: dots, convolutions); level 0 halves the
# speed. The memory-optimised scheduler orders the step's ops so that fewer temporaries are live
# at once: a smaller peak, and fewer freshly mapped pages to fault in every step. It only
# reorders the ops (the step's results are bit-identical with and without it).
CPU_STEP_COMPILER_OPTIONS: dict[str, Any] = {
    "xla_backend_optimization_level": 1,
    "xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED",
}


def jit_train_step(step_fn: Callable, mesh: Mesh, state_shardings: Any, teacher_shardings: Any) -> Callable:
    """``jax.jit`` the step with explicit shardings and the train state donated."""
    on_cpu = mesh.devices.flat[0].platform == "cpu"
    return jax.jit(
        step_fn,
        in_shardings=(state_shardings, teacher_shardings, batch_sharding(mesh)),
        out_shardings=(state_shardings, NamedSharding(mesh, P())),
        donate_argnums=(0,),
        compiler_options=CPU_STEP_COMPILER_OPTIONS if on_cpu else None,
    )


# --- evaluation ------------------------------------------------------------------------------

def make_eval_step(graph: nnx.GraphDef, top_k: int = 5,
                   label_subset: Sequence[int] | None = None) -> Callable[..., dict[str, jax.Array]]:
    """Pure ``(states, batch) -> sums`` of correct top-1/top-k predictions over ``batch['mask']``.

    ``states`` is the tuple of ``nnx.State`` parts that ``graph`` merges (e.g. params, RNG
    template and stats of the student, or the single state of a teacher). ``label_subset``
    restricts the logits to those classes before ranking (ImageNet-A/R's 200 of 1000).
    """
    keep = None if label_subset is None else np.asarray(label_subset, np.int32)

    def eval_step(states: tuple[nnx.State, ...], batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        logits = nnx.merge(graph, *states)(batch["images"]).astype(jnp.float32)
        if keep is not None:
            logits = jnp.full_like(logits, -jnp.inf).at[:, keep].set(logits[:, keep])
        labels = batch["labels"]
        mask = batch["mask"].astype(jnp.float32)
        k = min(top_k, logits.shape[-1])
        top = jax.lax.top_k(logits, k)[1]
        hit1 = (top[:, 0] == labels).astype(jnp.float32)
        hitk = jnp.any(top == labels[:, None], axis=-1).astype(jnp.float32)
        loss = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=-1)[:, 0]
        return {"correct1": (hit1 * mask).sum(), "correctk": (hitk * mask).sum(), "loss_sum": jnp.where(mask > 0, loss, 0.0).sum(),
                "count": mask.sum()}

    return eval_step
