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
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import app, flags, logging
from flax import nnx
from ml_collections import config_flags

from l2s_jax import config_lib, layers, losses, metric_io, train
from l2s_jax.data import pipeline
from l2s_jax.models import create, load_pretrained, registry, save_pretrained

config_flags.DEFINE_config_file("config", None, "Training configuration file (configs/*.py[:args]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (SLURM, Open MPI, TPU pods, ...).")

RESULT_FILE = "result.json"
EXPORT_DIR = "export"


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
    if config.model.dtype != "float32":
        kwargs["dtype"] = jnp.dtype(config.model.dtype)
    return kwargs


def build_student(config: ml_collections.ConfigDict, num_classes: int, num_devices: int,
                  teacher_channels: list[int] | None) -> train.DistillStudent:
    """The student of ``config.model`` (+ FD projectors to ``teacher_channels``)."""
    model = create(config.model.name, seed=config.seed, **_student_kwargs(config, num_classes))
    if config.init:
        from l2s_jax.evaluate import load_model, transfer_weights

        transfer_weights(load_model(config.init), model, config.model.name, _student_kwargs(config, num_classes))
    layers.set_bn_stat_groups(model, config.model.bn_stat_groups or num_devices)
    layers.set_depthwise_impl(model, config.model.depthwise_impl)
    projector = None
    if teacher_channels:
        student_channels = train.feature_channels(model, config.data.image_size, len(teacher_channels))
        projector = losses.FeatureProjector(student_channels, teacher_channels, rngs=nnx.Rngs(config.seed + 1))
    return train.DistillStudent(model, projector)


def load_teacher(config: ml_collections.ConfigDict, ckpt_dir: Path, num_classes: int) -> nnx.Module:
    """The frozen teacher in eval mode: fused (SLaK), in its compute dtype."""
    if not (ckpt_dir / registry.SPEC_FILE).exists():
        raise FileNotFoundError(
            f"teacher checkpoint {str(ckpt_dir)!r} not found (config.teacher.checkpoint). Convert the official "
            f"{config.teacher.name} weights first:\n  python tools/convert_weights.py --arch {config.teacher.arch} "
            f"--src FILE --out {ckpt_dir}")
    model = load_pretrained(ckpt_dir)
    if config.teacher.fuse and hasattr(model, "fuse"):
        model.fuse()
    layers.set_depthwise_impl(model, config.teacher.depthwise_impl)
    if config.teacher.dtype != "float32":
        train.set_computejnp.dtype(model, jnp.dtype(config.teacher.dtype))
    graph, state = nnx.split(model)
    size = config.data.image_size
    image = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    logits = jax.eval_shape(lambda s, x: nnx.merge(graph, s)(x), state, image)
    if logits.shape[-1] != num_classes:
        raise ValueError(f"teacher {ckpt_dir} predicts {logits.shape[-1]} classes, the dataset has {num_classes}")
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
    sums = jax.device_get(sums)
    n = max(float(sums["count"]), 1.0)
    return {"top1": 100.0 * float(sums["correct1"]) / n, "top5": 100.0 * float(sums["correctk"]) / n,
            "loss": float(sums["loss_sum"]) / n}


# --- one training run ------------------------------------------------------------------------

def _step_config(config: ml_collections.ConfigDict, num_classes: int) -> train.StepConfig:
    d = config.distill
    mixup = config.mixup.to_dict()
    use_mixup = mixup["prob"] > 0 and (mixup["mixup_alpha"] > 0 or mixup["cutmix_alpha"] > 0)
    loss = dict(
        label_smoothing=config.label_smoothing, kd_temperature=d.kd_temperature, kd_lam=d.kd_lam,
        kd_hard=d.kd_hard, nkd_temperature=d.nkd_temperature, nkd_lam=d.nkd_lam, nkd_variant=d.nkd_variant,
        fd_weight=d.fd_weight, fd_beta=d.fd_beta, fd_loss_type=d.fd_loss_type,
    )
    return train.StepConfig(
        method=d.method, num_classes=num_classes, seed=config.seed, accum_steps=config.accum_steps,
        fd_stages=d.fd_stages if d.method.startswith("fd") else 0, ema_decay=config.ema_decay,
        mixup=tuple(sorted({**mixup, "label_smoothing": config.label_smoothing}.items())) if use_mixup else (),
        loss=tuple(sorted(loss.items())),
    )


def _checkpoint_args(state: Any, iterator: Any, *, restore: bool) -> ocp.args.Composite:
    state_args = ocp.args.StandardRestore(state) if restore else ocp.args.StandardSave(state)
    return ocp.args.Composite(state=state_args,
                              **{pipeline.ITERATOR_ITEM: pipeline.iterator_checkpoint_args(iterator, restore=restore)})


def _restore(manager: ocp.CheckpointManager, state: train.TrainState, iterator: Any, workdir: Path):
    """Resume from the latest checkpoint, if any; never touches checkpoints that do not fit."""
    step = manager.latest_step()
    if step is None:
        return state, iterator
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    try:
        restored = manager.restore(step, args=_checkpoint_args(abstract, iterator, restore=True))
    except (ValueError, KeyError, TypeError) as e:
        raise RuntimeError(
            f"the checkpoints in {workdir / 'checkpoints'} do not match this config ({e}). They were left "
            "untouched: use another --workdir for a different model or method.") from e
    _say(f"resumed from step {step} ({workdir / 'checkpoints'})")
    return restored["state"], restored[pipeline.ITERATOR_ITEM]


def _check_config_change(config: ml_collections.ConfigDict, workdir: Path) -> None:
    path = workdir / "config.json"
    now = json.loads(config.to_json_best_effort())
    before = _read_json(path)
    if before is not None and before != now:
        changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
        logging.warning("config differs from the one saved in %s (top-level keys %s)", path, changed)
    _write_json(path, now)


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
    method = config.distill.method
    teacher_graph = teacher_state = teacher_sh = None
    teacher_channels = None
    if method != "ce":
        if teacher is None:
            raise ValueError(f"method {method!r} needs a teacher")
        if method.startswith("fd"):
            teacher_channels = train.feature_channels(teacher, config.data.image_size, config.distill.fd_stages)
        teacher_graph, teacher_state = nnx.split(teacher)
        if config.teacher.param_dtype != "float32":
            teacher_state = train.cast_floating(teacher_state, jnp.dtype(config.teacher.param_dtype))
        teacher_sh = train.tree_shardings(teacher_state, mesh, fsdp=config.sharding.fsdp_teacher,
                                          min_size=config.sharding.fsdp_min_size)
        teacher_state = jax.device_put(teacher_state, teacher_sh)

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
    return Training(jax.device_put(state, state_sh), step_fn, jax.jit(train.make_eval_step(student_def.eval_graph)),
                    student_def, teacher_state)


def train_run(config: ml_collections.ConfigDict, workdir: Path,
              teacher: nnx.Module | None) -> tuple[dict[str, Any], nnx.Module]:
    """Train ``config.model`` (distilled from ``teacher`` unless method ``ce``) in ``workdir``.

    Returns the result (final top-1/top-5 of student and EMA) and the trained network (the
    EMA one when ``config.report == "ema"``).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    _check_config_change(config, workdir)
    info = pipeline.dataset_info(config.data)
    mesh = train.create_mesh()
    steps_per_epoch, total = schedule_length(config, info.num_train)
    method = config.distill.method
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
    start = int(jax.device_get(state.step))
    eval_every = int(round(config.eval_every_epochs * steps_per_epoch))
    _say(f"{workdir}: {config.model.label or config.model.name} ({config_lib.METHOD_NAMES[method]}), {total} steps of "
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

    pending: list[dict[str, jax.Array]] = []
    tick, tick_step = time.time(), start
    try:
        for step in range(start + 1, total + 1):
            state, metrics = step_fn(state, teacher_state, pipeline.shard_batch(next(train_iter), mesh))
            pending.append(metrics)
            if step == start + 1:
                jax.block_until_ready(state)
                _say(f"  first step (including compilation) took {time.time() - tick:.1f}s")
                pending, tick, tick_step = [], time.time(), step
            if pending and (step % config.log_every_steps == 0 or step == total):
                means = {k: float(np.mean([m[k] for m in jax.device_get(pending)])) for k in pending[0]}
                per_step = (time.time() - tick) / (step - tick_step)
                means["images_per_sec"] = config.batch_size / per_step
                writer.write_scalars(step, {f"train/{k}": v for k, v in means.items()})
                eta = time.strftime("%H:%M:%S", time.gmtime(per_step * (total - step)))
                _say(f"  step {step}/{total} | loss {means['loss']:.4f} | lr {means['lr']:.3g} | "
                     f"{means['images_per_sec']:.1f} img/s | ETA {eta}")
                pending, tick, tick_step = [], time.time(), step
            if step % config.checkpoint_every_steps == 0 or step == total:
                manager.save(step, args=_checkpoint_args(state, train_iter, restore=False))
            if eval_every and step % eval_every == 0 and step != total:
                run_eval(step)
                tick = time.time()
    finally:
        manager.wait_until_finished()  # an interrupted run still completes the checkpoint being written
        writer.flush()

    final = run_eval(total)
    key = "ema" if config.report == "ema" and state.ema_params is not None else "student"
    result = {"model": config.model.name, "method": method, "total_steps": total, **final,
              "top1": final[f"{key}_top1"], "top5": final[f"{key}_top5"]}
    _write_json(workdir / RESULT_FILE, result)
    writer.close()
    manager.close()
    params = state.ema_params if key == "ema" else state.params
    stats = state.ema_batch_stats if key == "ema" else state.batch_stats
    trained = nnx.merge(student_def.eval_graph, jax.device_get(params), student_def.rng_state, jax.device_get(stats))
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


def prepare_teacher(config: ml_collections.ConfigDict, workdir: Path, num_classes: int) -> tuple[Path, dict | None]:
    """The converted teacher checkpoint to use; trains one from scratch when ``config.teacher.train``."""
    if not config.teacher.train:
        if not config.teacher.checkpoint:
            raise ValueError(
                f"config.teacher.checkpoint is empty: method {config.distill.method!r} needs a teacher. Convert the "
                f"official weights with `python tools/convert_weights.py --arch {config.teacher.arch} --src FILE "
                "--out DIR` and pass --config.teacher.checkpoint=DIR")
        return Path(config.teacher.checkpoint).expanduser().resolve(), None
    teacher_dir = workdir / "teacher"
    export = teacher_dir / EXPORT_DIR
    result = _finished(teacher_dir)
    if result is None or not (export / registry.SPEC_FILE).exists():
        _say(f"== training the teacher from scratch in {teacher_dir}")
        result, model = train_run(_sub_config(config, config.teacher.train.to_dict()), teacher_dir, None)
        if not (export / registry.SPEC_FILE).exists():
            _export_model(model, _sub_config(config, config.teacher.train.to_dict()), num_classes, export)
    return export, result


def baseline_top1(config: ml_collections.ConfigDict, workdir: Path) -> tuple[float | None, str]:
    """The baseline student's top-1: given, trained here, or read from a previous run."""
    if config.baseline.top1 is not None:
        return float(config.baseline.top1), "config"
    baseline_dir = Path(config.baseline.workdir).expanduser() if config.baseline.workdir else workdir / "baseline"
    result = _finished(baseline_dir)
    if result is None and config.baseline.train:
        _say(f"== training the baseline student (CE) in {baseline_dir}")
        result, _ = train_run(_sub_config(config, config.baseline.overrides.to_dict()), baseline_dir, None)
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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
    """The whole job of the module docstring; returns the summary also written to ``summary.json``."""
    config_lib.validate(config)
    workdir = Path(workdir).expanduser().resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    method = config.distill.method
    info = pipeline.dataset_info(config.data)
    mesh = train.create_mesh()
    teacher = None
    teacher_top1 = config.teacher.top1
    if method != "ce":
        ckpt, trained = prepare_teacher(config, workdir, info.num_classes)
        teacher = load_teacher(config, ckpt, info.num_classes)
        if config.teacher.evaluate:
            cache = workdir / "teacher_eval.json"
            cached = _read_json(cache)
            if cached is None or cached.get("checkpoint") != str(ckpt):
                graph, state = nnx.split(teacher)
                result = evaluate(jax.jit(train.make_eval_step(graph)), (state,), config, mesh)
                cached = {"checkpoint": str(ckpt), **result}
                _write_json(cache, cached)
            teacher_top1 = cached["top1"]
            _say(f"teacher {config.teacher.name}: top-1 {cached['top1']:.2f}%, top-5 {cached['top5']:.2f}%")
        elif trained is not None:
            teacher_top1 = trained["top1"]
    base_top1, base_source = baseline_top1(config, workdir)

    result = _finished(workdir, schedule_length(config, info.num_train)[1])
    if result is None or result.get("method") != method:
        _say(f"== training the student ({config_lib.METHOD_NAMES[method]}) in {workdir}")
        result, _ = train_run(config, workdir, teacher)
    summary = {"teacher": config.teacher.name if method != "ce" else None, "teacher_top1": teacher_top1,
               "student": config.model.name, "method": method, "baseline_top1": base_top1,
               "baseline_source": base_source, "distilled_top1": result["top1"], "result": result}
    if method != "ce":
        table = gains_table(teacher=config.teacher.name, student=config.model.label or config.model.name,
                            method=config_lib.METHOD_NAMES[method], teacher_top1=teacher_top1,
                            baseline_top1=base_top1, distilled_top1=result["top1"], paper=config.paper.to_dict())
        summary["table"] = table
        _say("\n" + table)
    _write_json(workdir / "summary.json", summary)
    return summary


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # the progress lines are printed; library INFO logs are noise
    if flags.FLAGS.distributed:
        jax.distributed.initialize()
    train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)


def cli() -> None:
    """The ``l2s-train`` console entry point (same as ``python -m l2s_jax.main``)."""
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)


if __name__ == "__main__":
    cli()
