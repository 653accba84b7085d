"""``python -m l2s_jax.main --config configs/X.py --workdir DIR``: distil (or train) a student.

:func:`train_and_evaluate` does, in order:

1. the teacher: a converted checkpoint (``config.teacher.checkpoint``), or one trained here
   from scratch when ``config.teacher.train`` holds overrides (the demo; in ``DIR/teacher``,
   exported as a converted checkpoint to ``DIR/teacher/export``); it is evaluated first;
2. the baseline student (method ``ce``) when ``config.baseline.train`` (in ``DIR/baseline``);
3. the student with the fused step of :mod:`l2s_jax.train`: periodic evaluation of student and
   EMA (top-1/top-5), metrics to TensorBoard event files and ``DIR/metrics.jsonl``, a progress
   line (step, loss, lr, images/s, ETA), Orbax checkpoints of the train state and the grain
   iterator (periodic + final, last N kept); re-running the same command resumes;
4. teacher / baseline / distilled top-1 with Direct and Effective Gain (x100).

Every finished run leaves ``result.json`` in its directory, so re-running skips finished work.
A workdir belongs to one config: re-running it with settings that change what is trained (another
method, model, schedule, ...) is refused, naming the differing keys, unless
``--resume_changed_config``. Expected errors (a missing teacher or dataset, a bad config) end
with one ``error: ...`` line and exit status 2; ``--debug`` shows their tracebacks.
"""
from __future__ import annotations

if __name__ == "__main__":  # before JAX starts: glibc reads its malloc settings only at process start
    from l2s_jax import host_memory

    host_memory.reexec_tuned()

import contextlib
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import app, flags, logging
from flax import nnx
from ml_collections import config_flags

from l2s_jax import compile_cache, config_lib, host_memory, losses, metric_io, train
from l2s_jax.data import pipeline
from l2s_jax.models import create, load_pretrained, pretrained, registry, save_pretrained
from l2s_jax.models.policy import Policy, apply_policy


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


config_flags.DEFINE_config_file("config", None, "Training configuration file (configs/*.py[:args]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
flags.DEFINE_bool("distributed", False,
                  "Initialise jax.distributed from what JAX detects (SLURM, Open MPI, TPU pods, GKE) or from the "
                  "three flags below.")
flags.DEFINE_string("coordinator_address", os.environ.get("L2S_COORDINATOR_ADDRESS"),
                    "HOST:PORT of process 0 for jax.distributed (env L2S_COORDINATOR_ADDRESS).")
flags.DEFINE_integer("num_processes", _env_int("L2S_NUM_PROCESSES"), "Processes in the job (env L2S_NUM_PROCESSES).")
flags.DEFINE_integer("process_id", _env_int("L2S_PROCESS_ID"), "This process's index (env L2S_PROCESS_ID).")
flags.DEFINE_bool("resume_changed_config", False,
                  "Continue the run in --workdir although its saved config.json differs from this config.")
flags.DEFINE_bool("debug", False, "Show tracebacks of expected errors too.")

RESULT_FILE = "result.json"
CONFIG_FILE = "config.json"
PREEMPTED_EXIT = 3  # exit status of a run stopped by SIGTERM/SIGINT after saving a checkpoint
EXPORT_DIR = "export"
# Config keys that do not change what a run trains: a workdir may be resumed with other values.
NEUTRAL_KEYS = ("log_every_steps", "eval_every_epochs", "checkpoint_every_steps", "keep_checkpoints",
                "eval_batch_size", "teacher.evaluate", "teacher.name", "model.label", "data.data_dir",
                "data.num_workers", "data.prefetch", "baseline.", "paper.")


class RunError(Exception):
    """An expected error (bad config, missing data or teacher): shown as one line, exit status 2."""


@contextlib.contextmanager
def _user_errors(what: str = "") -> Iterator[None]:
    """Turn the library's input errors raised inside into :class:`RunError` (prefixed by ``what``)."""
    try:
        yield
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        raise RunError(f"{what}{message}") from e


def _is_lead() -> bool:
    return jax.process_index() == 0


def _say(message: str) -> None:
    """Progress a person can follow (process 0 only)."""
    if _is_lead():
        print(message, flush=True)
    else:
        logging.info(message)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    if _is_lead():
        path.write_text(json.dumps(data, indent=2) + "\n")


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


# --- models ----------------------------------------------------------------------------------

def _student_kwargs(config: ml_collections.ConfigDict, num_classes: int) -> dict[str, Any]:
    kwargs = dict(config.model.overrides)
    kwargs["num_classes"] = num_classes
    return kwargs


def build_student(config: ml_collections.ConfigDict, num_classes: int, num_devices: int,
                  teacher_channels: list[int] | None) -> train.DistillStudent:
    """The student of ``config.model`` (+ FD projectors to ``teacher_channels``)."""
    policy = Policy(compute_dtype=config.model.dtype, depthwise_impl=config.model.depthwise_impl,
                    bn_stat_groups=config.model.bn_stat_groups or num_devices)
    model = create(config.model.name, seed=config.seed, policy=policy, **_student_kwargs(config, num_classes))
    if config.init:
        from l2s_jax.evaluate import load_model, transfer_weights

        with _user_errors():
            transfer_weights(load_model(config.init), model, config.model.name, _student_kwargs(config, num_classes))
    projector = None
    if teacher_channels:
        student_channels = train.feature_channels(model, len(teacher_channels))
        projector = losses.FeatureProjector(student_channels, teacher_channels, rngs=nnx.Rngs(config.seed + 1))
    return train.DistillStudent(model, projector)


def teacher_policy(config: ml_collections.ConfigDict) -> Policy:
    """How the frozen teacher runs (``config.teacher``: compute and storage dtypes, depthwise kernel)."""
    return Policy(compute_dtype=config.teacher.dtype, param_dtype=config.teacher.param_dtype,
                  depthwise_impl=config.teacher.depthwise_impl)


def load_teacher(config: ml_collections.ConfigDict, ckpt_dir: Path, num_classes: int) -> nnx.Module:
    """The frozen teacher in eval mode: fused (SLaK), in its compute dtype."""
    if not (ckpt_dir / pretrained.SPEC_FILE).exists():
        raise RunError(
            f"teacher checkpoint {str(ckpt_dir)!r} not found (config.teacher.checkpoint). Convert the official "
            f"{config.teacher.name} weights first:\n  python tools/convert_weights.py --arch {config.teacher.arch} "
            f"--src FILE --out {ckpt_dir}")
    model = load_pretrained(ckpt_dir)
    if config.teacher.fuse and hasattr(model, "fuse"):
        model.fuse()  # from the float32 weights, before the policy casts them
    apply_policy(model, teacher_policy(config))
    graph, state = nnx.split(model)
    size = config.data.image_size
    image = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    logits = jax.eval_shape(lambda s, x: nnx.merge(graph, s)(x), state, image)
    if logits.shape[-1] != num_classes:
        raise RunError(f"teacher {ckpt_dir} predicts {logits.shape[-1]} classes but the dataset "
                       f"{config.data.name!r} has {num_classes}: use a teacher trained on this dataset")
    return model


def _export_model(model: nnx.Module, config: ml_collections.ConfigDict, num_classes: int, out: Path) -> None:
    """Save a model trained here as a converted checkpoint that ``load_pretrained`` reads."""
    family, kwargs = registry.MODELS[config.model.name] if config.model.name in registry.MODELS else (
        config.model.name, {})
    spec = {**kwargs, **config.model.overrides.to_dict(), "num_classes": num_classes}
    if _is_lead():
        save_pretrained(model, family, spec, out, provenance={"trained_by": "l2s_jax.main", "model": config.model.name})


# --- evaluation ------------------------------------------------------------------------------

def evaluate(eval_fn: Any, states: tuple[Any, ...], config: ml_collections.ConfigDict,
             mesh: jax.sharding.Mesh) -> dict[str, float]:
    """Top-1 / top-5 (%) and loss over one pass of the eval split."""
    sums = None
    for batch in pipeline.create_eval_iterator(config.data, global_batch_size=config.eval_batch_size):
        out = eval_fn(states, pipeline.shard_batch(batch, mesh))
        sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
    sums = train.to_host(sums)
    n = max(float(sums["count"]), 1.0)
    return {"top1": 100.0 * float(sums["correct1"]) / n, "top5": 100.0 * float(sums["correctk"]) / n,
            "loss": float(sums["loss_sum"]) / n}


# --- one training run ------------------------------------------------------------------------

def _step_config(config: ml_collections.ConfigDict, num_classes: int) -> train.StepConfig:
    mixup = config.mixup.to_dict()
    use_mixup = mixup["prob"] > 0 and (mixup["mixup_alpha"] > 0 or mixup["cutmix_alpha"] > 0)
    return train.StepConfig(
        method=config_lib.distill_method(config), num_classes=num_classes, seed=config.seed,
        accum_steps=config.accum_steps, ema_decay=config.ema_decay,
        mixup=tuple(sorted({**mixup, "label_smoothing": config.label_smoothing}.items())) if use_mixup else (),
    )


def _checkpoint_args(state: Any, iterator: Any, *, restore: bool) -> ocp.args.Composite:
    state_args = ocp.args.StandardRestore(state) if restore else ocp.args.StandardSave(state)
    return ocp.args.Composite(state=state_args,
                              **{pipeline.ITERATOR_ITEM: pipeline.iterator_checkpoint_args(iterator, restore=restore)})


def _shapes(tree: Any) -> list[tuple[int, ...]]:
    """The sorted array shapes of a state or of its checkpoint metadata (whose tree type differs)."""
    return sorted(tuple(x.shape) for x in jax.tree.leaves(tree) if hasattr(x, "shape"))


def _restore(manager: ocp.CheckpointManager, state: train.TrainState, iterator: Any, workdir: Path):
    """Resume from the newest readable checkpoint, if any.

    A checkpoint of another shape (another model) is refused and left untouched; an unreadable one
    (truncated file, bad metadata) is renamed aside (``unreadable-STEP-TIME``, never deleted) and
    the previous one is tried.
    """
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    ckpt_dir = workdir / "checkpoints"
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            with ocp.StandardCheckpointer() as reader:
                saved = reader.metadata(ckpt_dir / str(step) / "state").item_metadata
            shapes = _shapes(saved)
            layout_differs = bool(shapes) and shapes != _shapes(abstract)  # empty: unreadable, handled below
        except Exception:  # unreadable metadata: a damaged checkpoint, handled below
            layout_differs = False
        if layout_differs:
            raise RunError(f"the checkpoints in {ckpt_dir} hold another model or optimizer than this config; they "
                           "were left untouched: use another --workdir")
        try:
            restored = manager.restore(step, args=_checkpoint_args(abstract, iterator, restore=True))
        except Exception as e:  # noqa: BLE001 - any failure to read means this checkpoint is damaged
            aside = ckpt_dir / f"unreadable-{step}-{time.strftime('%Y%m%d-%H%M%S')}"
            reason = " ".join(f"{type(e).__name__}: {e}".split())[:300]
            if _is_lead():
                (ckpt_dir / str(step)).rename(aside)
            _sync("unreadable checkpoint moved aside")
            _say(f"checkpoint {ckpt_dir / str(step)} is unreadable ({reason}); moved it aside to {aside.name} "
                 "and trying the previous one")
            manager.reload()
            continue
        _say(f"resumed from step {step} ({ckpt_dir})")
        return restored["state"], restored[pipeline.ITERATOR_ITEM]
    return state, iterator


def _sync(name: str) -> None:
    """A barrier across processes (no-op on one)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


class Preempted(Exception):
    """SIGTERM/SIGINT arrived: a checkpoint of ``step`` was written; re-running resumes."""

    def __init__(self, step: int):
        super().__init__(f"preempted at step {step}; re-run the same command to resume")
        self.step = step


class PreemptionGuard:
    """Catches SIGTERM and a first SIGINT so the loop can checkpoint and stop; a second SIGINT exits.

    On several processes :meth:`requested` agrees on the same step everywhere (any process that
    got the signal stops all of them), so every process saves the same checkpoint.
    """

    def __init__(self) -> None:
        self.signalled = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "PreemptionGuard":
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        import signal

        if self.signalled and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop at once
        self.signalled = True
        _say(f"  received {signal.Signals(signum).name}: saving a checkpoint after this step")

    def requested(self) -> bool:
        if jax.process_count() == 1:
            return self.signalled
        from jax.experimental import multihost_utils

        return bool(np.any(multihost_utils.process_allgather(np.int32(self.signalled))))


def _nonfinite_report(pending: list[tuple[int, dict[str, Any]]]) -> tuple[int, list[str]] | None:
    """The first step of ``pending`` whose loss or gradient norm is not finite, with those terms."""
    for step, metrics in pending:
        m = train.to_host(metrics)
        if m["nonfinite"] > 0:
            terms = [f"{k}={float(v):g}" for k, v in m.items()
                     if (k.startswith("loss") or k == "grad_norm") and not np.isfinite(v)]
            return step, terms
    return None


def _save(manager: ocp.CheckpointManager, step: int, args: Any, ckpt_dir: Path) -> None:
    """Write a checkpoint; a full disk or unwritable directory is a one-line error (older ones intact)."""
    try:
        manager.save(step, args=args)
    except OSError as e:
        raise RunError(f"cannot write the checkpoint of step {step} to {ckpt_dir}: {e.strerror or e}; free space or "
                       "fix the permissions, then re-run (the earlier checkpoints are intact)") from e


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict) or not tree:
        return {prefix.rstrip("."): tree}
    return {k: v for key, value in tree.items() for k, v in _flatten(value, f"{prefix}{key}.").items()}


def config_differences(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ and that change what a run trains (not :data:`NEUTRAL_KEYS`)."""
    a, b = _flatten(before), _flatten(now)
    return sorted(k for k in set(a) | set(b)
                  if a.get(k, "<absent>") != b.get(k, "<absent>")
                  and not any(k == n or (n.endswith(".") and k.startswith(n)) for n in NEUTRAL_KEYS))


def claim_workdir(config: ml_collections.ConfigDict, workdir: Path, *, resume_changed: bool = False) -> None:
    """Record ``config`` as the config of ``workdir``; refuse a workdir that holds another run.

    A workdir whose ``config.json`` differs in a key that changes the training is never silently
    reused (its checkpoints and results would be passed off as this config's).
    """
    path = workdir / CONFIG_FILE
    now = json.loads(config.to_json_best_effort())
    before = _read_json(path)
    if before is not None:
        changed = config_differences(before, now)
        if changed and not resume_changed:
            a, b = _flatten(before), _flatten(now)
            shown = "; ".join(f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}" for k in changed[:6])
            more = f" (and {len(changed) - 6} more)" if len(changed) > 6 else ""
            raise RunError(f"{workdir} holds a run of another config ({shown}{more}); use another --workdir, or "
                           "pass --resume_changed_config to continue that run with the new settings")
        if changed:
            _say(f"continuing {workdir} with changed settings: {', '.join(changed)}")
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        _write_json(path, now)
    except OSError as e:
        raise RunError(f"cannot write to the workdir {workdir}: {e.strerror or e}; choose a writable --workdir") from e
    _sync("workdir claimed")


def schedule_length(config: ml_collections.ConfigDict, num_train: int) -> tuple[int, int]:
    """(steps per epoch, total steps): ``config.total_steps`` if set, else ``config.epochs``."""
    steps_per_epoch = max(num_train // config.batch_size, 1)
    return steps_per_epoch, config.total_steps or max(int(round(config.epochs * steps_per_epoch)), 1)


@dataclasses.dataclass
class Training:
    """Everything a run needs on device: state, compiled step and eval, the teacher's state."""

    state: train.TrainState
    step_fn: Any
    eval_fn: Any
    student_def: train.StudentDef
    teacher_state: nnx.State | None


def setup_training(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, *, num_classes: int,
                   steps_per_epoch: int, total_steps: int, teacher: nnx.Module | None) -> Training:
    """Build the student, optimizer, sharded train state and the jitted step for ``config``."""
    method = config_lib.distill_method(config)
    teacher_graph = teacher_state = teacher_sh = None
    teacher_channels = None
    if method.uses_teacher:
        if teacher is None:
            raise ValueError(f"method {method.name!r} needs a teacher")
        if method.feature_stages:
            teacher_channels = train.feature_channels(teacher, method.feature_stages)
        teacher_graph, teacher_state = nnx.split(teacher)
        teacher_sh = train.tree_shardings(teacher_state, mesh, fsdp=config.sharding.fsdp_teacher,
                                          min_size=config.sharding.fsdp_min_size)
        teacher_state = train.put_global(teacher_state, teacher_sh)

    student = build_student(config, num_classes, mesh.size, teacher_channels)
    student_def, params, stats = train.split_student(student)
    schedule = train.make_schedule(config.optim.to_dict(), global_batch_size=config.batch_size,
                                   steps_per_epoch=steps_per_epoch, total_steps=total_steps)
    optimizer = train.create_optimizer(config.optim.to_dict(), schedule)
    state = train.init_train_state(params, stats, optimizer, ema=config.ema_decay > 0)
    state_sh = train.tree_shardings(state, mesh, fsdp=config.sharding.fsdp, min_size=config.sharding.fsdp_min_size)
    step_fn = train.jit_train_step(
        train.make_train_step(student_def, teacher_graph, optimizer, schedule, _step_config(config, num_classes),
                              mesh=mesh, grad_shardings=state_sh.params),
        mesh, state_sh, teacher_sh)
    return Training(train.put_global(state, state_sh), step_fn, jax.jit(train.make_eval_step(student_def.eval_graph)),
                    student_def, teacher_state)


def train_run(config: ml_collections.ConfigDict, workdir: Path, teacher: nnx.Module | None, *,
              resume_changed: bool = False) -> tuple[dict[str, Any], nnx.Module]:
    """Train ``config.model`` (distilled from ``teacher`` unless method ``ce``) in ``workdir``.

    Returns the result (final top-1/top-5 of student and EMA) and the trained network (the
    EMA one when ``config.report == "ema"``).
    """
    claim_workdir(config, workdir, resume_changed=resume_changed)
    info = pipeline.dataset_info(config.data)
    mesh = train.create_mesh()
    steps_per_epoch, total = schedule_length(config, info.num_train)
    method = config_lib.distill_method(config)
    run = setup_training(config, mesh, num_classes=info.num_classes, steps_per_epoch=steps_per_epoch,
                         total_steps=total, teacher=teacher)
    state, step_fn, eval_fn, student_def, teacher_state = (run.state, run.step_fn, run.eval_fn, run.student_def,
                                                           run.teacher_state)

    train_iter = pipeline.create_train_iterator(config.data, config.aug, global_batch_size=config.batch_size,
                                                seed=config.seed)
    options = ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True)
    manager = ocp.CheckpointManager(workdir / "checkpoints", options=options)
    state, train_iter = _restore(manager, state, train_iter, workdir)
    writer = metric_io.MetricWriter(workdir, just_logging=not _is_lead())
    start = int(train.to_host(state.step))
    eval_every = int(round(config.eval_every_epochs * steps_per_epoch))
    _say(f"{workdir}: {config.model.label or config.model.name} ({method.display_name}), {total} steps of "
         f"{config.batch_size} images ({steps_per_epoch} per epoch), {mesh.size} devices")

    def run_eval(step: int) -> dict[str, float]:
        out = {f"student_{k}": v for k, v in evaluate(eval_fn, (state.params, student_def.rng_state,
                                                                 state.batch_stats), config, mesh).items()}
        if state.ema_params is not None:
            out.update({f"ema_{k}": v for k, v in evaluate(eval_fn, (state.ema_params, student_def.rng_state,
                                                                      state.ema_batch_stats), config, mesh).items()})
        writer.write_scalars(step, {f"eval/{k}": v for k, v in out.items()})
        ema = f", EMA top-1 {out['ema_top1']:.2f}%" if "ema_top1" in out else ""
        _say(f"  eval @ {step}: top-1 {out['student_top1']:.2f}%, top-5 {out['student_top5']:.2f}%{ema}")
        return out

    pending: list[tuple[int, dict[str, jax.Array]]] = []
    skipped = 0
    ckpt_dir = workdir / "checkpoints"

    checked = start  # steps up to here were checked for non-finite updates

    def check_finite() -> None:
        nonlocal skipped, checked
        fresh = [(i, m) for i, m in pending if i > checked]
        if not fresh:
            return
        checked = fresh[-1][0]
        bad = _nonfinite_report(fresh)
        if bad is None:
            return
        if config.nan_policy == "skip":
            skipped += sum(int(train.to_host(m["nonfinite"])) for _, m in fresh)
            return
        last = manager.latest_step()
        good = f"step {last} in {ckpt_dir}" if last is not None else "none yet"
        raise RunError(f"non-finite loss or gradient at step {bad[0]} ({', '.join(bad[1])}); the update was not "
                       f"applied and the run stopped. Last good checkpoint: {good}. Lower optim.lr, set "
                       "optim.clip_grad_norm, or pass --config.nan_policy=skip to skip such updates")

    tick, tick_step = time.time(), start
    guard = PreemptionGuard()
    try:
        with guard:
            for step in range(start + 1, total + 1):
                state, metrics = step_fn(state, teacher_state, pipeline.shard_batch(next(train_iter), mesh))
                pending.append((step, metrics))
                if step == start + 1:
                    jax.block_until_ready(state)
                    _say(f"  first step (including compilation) took {time.time() - tick:.1f}s")
                    check_finite()
                    pending, tick, tick_step = [], time.time(), step
                if pending and (step % config.log_every_steps == 0 or step == total):
                    check_finite()
                    means = {k: float(np.mean([m[k] for _, m in train.to_host(pending)])) for k in pending[0][1]}
                    per_step = (time.time() - tick) / (step - tick_step)
                    means["images_per_sec"] = config.batch_size / per_step
                    means["skipped_updates"] = float(skipped)
                    writer.write_scalars(step, {f"train/{k}": v for k, v in means.items()})
                    eta = time.strftime("%H:%M:%S", time.gmtime(per_step * (total - step)))
                    skip = f" | {skipped} non-finite updates skipped" if skipped else ""
                    _say(f"  step {step}/{total} | loss {means['loss']:.4f} | lr {means['lr']:.3g} | "
                         f"{means['images_per_sec']:.1f} img/s | ETA {eta}{skip}")
                    pending, tick, tick_step = [], time.time(), step
                preempted = guard.requested()
                if step % config.checkpoint_every_steps == 0 or step == total or preempted:
                    check_finite()
                    _save(manager, step, _checkpoint_args(state, train_iter, restore=False), ckpt_dir)
                if preempted:
                    manager.wait_until_finished()
                    raise Preempted(step)
                if eval_every and step % eval_every == 0 and step != total:
                    run_eval(step)
                    tick = time.time()
    finally:
        try:
            manager.wait_until_finished()  # an interrupted run still completes the checkpoint being written
        except OSError as e:
            raise RunError(f"cannot write a checkpoint to {ckpt_dir}: {e.strerror or e}; free space or fix the "
                           "permissions, then re-run (the earlier checkpoints are intact)") from e
        writer.flush()

    final = run_eval(total)
    key = "ema" if config.report == "ema" and state.ema_params is not None else "student"
    result = {"model": config.model.name, "method": method.name, "total_steps": total, **final,
              "top1": final[f"{key}_top1"], "top5": final[f"{key}_top5"]}
    _write_json(workdir / RESULT_FILE, result)
    writer.close()
    manager.close()
    params = state.ema_params if key == "ema" else state.params
    stats = state.ema_batch_stats if key == "ema" else state.batch_stats
    trained = nnx.merge(student_def.eval_graph, train.to_host(params), student_def.rng_state, train.to_host(stats))
    return result, trained.model


def _finished(workdir: Path, total_steps: int | None = None) -> dict[str, Any] | None:
    result = _read_json(workdir / RESULT_FILE)
    if result is None or (total_steps is not None and result.get("total_steps") != total_steps):
        return None
    return result


def _sub_config(config: ml_collections.ConfigDict, *overrides: Any) -> ml_collections.ConfigDict:
    """``config`` turned into a plain CE run (no teacher, no baseline) with ``overrides`` on top."""
    out = config_lib.apply_overrides(config, {
        "distill": {"method": "ce"}, "teacher": {"train": {}, "checkpoint": ""},
        "baseline": {"train": False, "overrides": {}}})
    for o in overrides:
        out = config_lib.apply_overrides(out, o)
    return out


def check_batching(config: ml_collections.ConfigDict, num_devices: int, what: str = "config") -> None:
    """The global batch must split into ``accum_steps`` micro-batches that split over the devices."""
    b, k = config.batch_size, config.accum_steps
    if k < 1 or b % k or (b // k) % num_devices:
        raise RunError(f"{what}: batch_size={b} does not split into accum_steps={k} micro-batches spread over "
                       f"{num_devices} devices; choose batch_size a multiple of accum_steps x devices = "
                       f"{max(k, 1) * num_devices}")
    if config.eval_batch_size % num_devices:
        raise RunError(f"{what}: eval_batch_size={config.eval_batch_size} must be a multiple of the "
                       f"{num_devices} devices")


def preflight(config: ml_collections.ConfigDict, num_devices: int) -> pipeline.DatasetInfo:
    """Everything that can be checked before any training: config keys, data, batching, teacher."""
    with _user_errors():
        config_lib.validate(config)
        method = config_lib.distill_method(config)
    with _user_errors("data: "):
        info = pipeline.dataset_info(config.data)
    check_batching(config, num_devices)
    if method.uses_teacher and config.teacher.train and not config.teacher.checkpoint:
        check_batching(_sub_config(config, config.teacher.train.to_dict()), num_devices, "config.teacher.train")
    if config.baseline.train and config.baseline.top1 is None:
        check_batching(_sub_config(config, config.baseline.overrides.to_dict()), num_devices,
                       "config.baseline.overrides")
    if method.uses_teacher and not config.teacher.train and not config.teacher.checkpoint:
        raise RunError(
            f"config.teacher.checkpoint is empty: method {method.name!r} needs a teacher. Convert the official "
            f"weights with `python tools/convert_weights.py --arch {config.teacher.arch} --src FILE --out DIR` "
            "and pass --config.teacher.checkpoint=DIR")
    return info


def prepare_teacher(config: ml_collections.ConfigDict, workdir: Path, num_classes: int, *,
                    resume_changed: bool = False) -> tuple[Path, dict | None]:
    """The converted teacher checkpoint to use and, when trained here, its result.

    ``config.teacher.checkpoint`` wins over ``config.teacher.train`` (which trains one from
    scratch in ``WORKDIR/teacher``, as the demo does).
    """
    if config.teacher.checkpoint:
        if config.teacher.train:
            _say(f"teacher: the converted checkpoint {config.teacher.checkpoint} (config.teacher.train is not used)")
        return Path(config.teacher.checkpoint).expanduser().resolve(), None
    teacher_dir = workdir / "teacher"
    export = teacher_dir / EXPORT_DIR
    sub = _sub_config(config, config.teacher.train.to_dict())
    result = _finished(teacher_dir)
    if result is None or not (export / pretrained.SPEC_FILE).exists():
        _say(f"== training the teacher from scratch in {teacher_dir}")
        result, model = train_run(sub, teacher_dir, None, resume_changed=resume_changed)
        if not (export / pretrained.SPEC_FILE).exists():
            _export_model(model, sub, num_classes, export)
    return export, result


def teacher_label(config: ml_collections.ConfigDict, ckpt: Path) -> str:
    """``config.teacher.name``, unless the checkpoint holds another architecture than ``teacher.model``."""
    spec = pretrained.read_spec(ckpt)
    expected = registry.MODELS.get(config.teacher.model, (config.teacher.model, {}))[0]
    if (config.teacher.train and not config.teacher.checkpoint) or spec["family"] == expected:
        return config.teacher.name
    return f"{spec['family']} ({ckpt.name})"


def baseline_top1(config: ml_collections.ConfigDict, workdir: Path, *,
                  resume_changed: bool = False) -> tuple[float | None, str]:
    """The baseline student's top-1: given, trained here, or read from a previous run."""
    if config.baseline.top1 is not None:
        return float(config.baseline.top1), "config"
    baseline_dir = Path(config.baseline.workdir).expanduser() if config.baseline.workdir else workdir / "baseline"
    result = _finished(baseline_dir)
    if result is None and config.baseline.train:
        _say(f"== training the baseline student (CE) in {baseline_dir}")
        result, _ = train_run(_sub_config(config, config.baseline.overrides.to_dict()), baseline_dir, None,
                              resume_changed=resume_changed)
    if result is None:
        return None, ""
    return float(result["top1"]), str(baseline_dir)


def gains_table(*, teacher: str, student: str, method: str, teacher_top1: float | None,
                baseline_top1: float | None, distilled_top1: float,
                paper: dict[str, float | None] | None = None) -> str:
    """Teacher / baseline / distilled top-1 with Direct Gain and Effective Gain (x100)."""
    direct = None if baseline_top1 is None else distilled_top1 - baseline_top1
    effective = None if direct is None or not teacher_top1 else 100.0 * direct / teacher_top1
    paper = paper or {}
    p_direct = p_effective = None
    if paper.get("student_top1") is not None and paper.get("distilled_top1") is not None:
        p_direct = paper["distilled_top1"] - paper["student_top1"]
        if paper.get("teacher_top1"):
            p_effective = 100.0 * p_direct / paper["teacher_top1"]
    with_paper = any(v is not None for v in paper.values())

    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    rows = [
        (f"teacher ({teacher})", teacher_top1, paper.get("teacher_top1")),
        (f"student ({student}, baseline CE)", baseline_top1, paper.get("student_top1")),
        (f"student ({student}, {method})", distilled_top1, paper.get("distilled_top1")),
        ("Direct Gain", direct, p_direct),
        ("Effective Gain (x100)", effective, p_effective),
    ]
    width = max(len(r[0]) for r in rows) + 2
    head = f"{'':{width}}{'top-1 (%)':>10}" + (f"{'paper':>10}" if with_paper else "")
    lines = [head] + [f"{name:{width}}{fmt(ours):>10}" + (f"{fmt(ref):>10}" if with_paper else "")
                      for name, ours, ref in rows]
    return "\n".join(lines)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path, *,
                       resume_changed: bool = False) -> dict[str, Any]:
    """The whole job of the module docstring; returns the summary also written to ``summary.json``."""
    mesh = train.create_mesh()
    info = preflight(config, mesh.size)
    workdir = Path(workdir).expanduser().resolve()
    claim_workdir(config, workdir, resume_changed=resume_changed)
    method = config_lib.distill_method(config)
    teacher = None
    teacher_top1 = config.teacher.top1
    teacher_name = config.teacher.name
    if method.uses_teacher:
        ckpt, trained = prepare_teacher(config, workdir, info.num_classes, resume_changed=resume_changed)
        teacher = load_teacher(config, ckpt, info.num_classes)
        teacher_name = teacher_label(config, ckpt)
        if config.teacher.evaluate:
            cache = workdir / "teacher_eval.json"
            cached = _read_json(cache)
            if cached is None or cached.get("checkpoint") != str(ckpt):
                graph, state = nnx.split(teacher)
                result = evaluate(jax.jit(train.make_eval_step(graph)), (state,), config, mesh)
                cached = {"checkpoint": str(ckpt), **result}
                _write_json(cache, cached)
            teacher_top1 = cached["top1"]
            _say(f"teacher {teacher_name}: top-1 {cached['top1']:.2f}%, top-5 {cached['top5']:.2f}%")
        elif trained is not None:
            teacher_top1 = trained["top1"]
    base_top1, base_source = baseline_top1(config, workdir, resume_changed=resume_changed)

    result = _finished(workdir, schedule_length(config, info.num_train)[1])
    if result is None or result.get("method") != method.name:
        _say(f"== training the student ({method.display_name}) in {workdir}")
        result, _ = train_run(config, workdir, teacher, resume_changed=resume_changed)
    summary = {"teacher": teacher_name if method.uses_teacher else None, "teacher_top1": teacher_top1,
               "student": config.model.name, "method": method.name, "baseline_top1": base_top1,
               "baseline_source": base_source, "distilled_top1": result["top1"], "result": result}
    if method.uses_teacher:
        table = gains_table(teacher=teacher_name, student=config.model.label or config.model.name,
                            method=method.display_name, teacher_top1=teacher_top1,
                            baseline_top1=base_top1, distilled_top1=result["top1"], paper=config.paper.to_dict())
        summary["table"] = table
        _say("\n" + table)
    _write_json(workdir / "summary.json", summary)
    return summary


def _innermost_message(e: BaseException) -> str:
    """The message of the innermost exception that ``e`` wraps (ml_collections nests them)."""
    while e.args and isinstance(e.args[0], BaseException):
        e = e.args[0]
    return str(e.args[0]) if e.args else str(e)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with config files and overrides that fail reported in one line."""
    try:
        rest = flags.FLAGS(argv)
        if flags.FLAGS.config is not None:
            flags.FLAGS.config.keys()  # a config file that failed to load raises only when first read
        return rest
    except flags.Error as e:  # a get_config() that raised: its traceback is in the message
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        _fail(f"{lines[0]} {lines[-1]}" if len(lines) > 1 and "Traceback" in str(e) else " ".join(lines))
    except OSError as e:
        _fail(f"cannot load the config file: {_innermost_message(e).splitlines()[-1].strip()}")
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        message = " ".join(_innermost_message(e).split())
        overrides = [a for a in argv[1:] if a.startswith("--config.")]
        bad = [a for a in overrides if any(f"'{part}'" in message for part in a.split("=", 1)[0].split(".")[1:])]
        where = (bad or overrides or ["--config"])[0]
        _fail(f"{where}: {message} (the keys are listed in l2s_jax/config_lib.py base_config)")
    raise AssertionError("unreachable")


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # the progress lines are printed; library INFO logs are noise
    f = flags.FLAGS
    explicit = {k: v for k, v in (("coordinator_address", f.coordinator_address), ("num_processes", f.num_processes),
                                  ("process_id", f.process_id)) if v is not None}
    if f.distributed or explicit:
        jax.distributed.initialize(**explicit)
        _say(f"jax.distributed: process {jax.process_index()} of {jax.process_count()}, "
             f"{jax.local_device_count()} local / {jax.device_count()} global devices")
    compile_cache.enable()
    _say(host_memory.describe())
    try:
        train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir,
                           resume_changed=flags.FLAGS.resume_changed_config)
    except RunError as e:
        if flags.FLAGS.debug:
            raise
        _fail(str(e))
    except Preempted as e:
        print(str(e), file=sys.stderr, flush=True)
        sys.exit(PREEMPTED_EXIT)


def cli() -> None:
    """``python -m l2s_jax.main`` (and ``l2s-train`` through :mod:`l2s_jax.cli.train`)."""
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    cli()
