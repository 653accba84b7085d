"""Benchmark the fused distillation train step, JAX vs PyTorch, and print one table.

    python tools/benchmark_step.py [--cases l2s:8,l2s:32,demo:64] [--repeats 3] [--rounds 1] [--no-torch]

Cases: ``l2s`` is the paper's step at 224 px (configs/nkd_slak_convnext.py: SLaK-T teacher,
fused, eval mode -> ConvNeXt-T+BN student, NKD, Mixup/CutMix, AdamW, EMA, 1000 classes);
``demo`` is configs/demo.py's teacher -> student step at 32 px (4 classes). ``:N`` is the batch.

Each (framework, case) runs in a fresh child process so that its peak memory (max RSS, or the
device's peak bytes on an accelerator) is its own. JAX: the step of :mod:`l2s_jax.main`
(``setup_training``), compile seconds = lower + compile, then the median of ``--repeats``
timed steps. PyTorch (when importable): the same step written with
:mod:`l2s_jax.reference.torch_slak` in channels_last, teacher in eval mode under ``no_grad``,
NKD (eq. 4), batch Mixup, AdamW without decay on 1-D params, EMA; "compile" is its first step.
Models are randomly initialised (speed does not depend on the weights). Timings on a shared
machine are noisy: ``--rounds N`` alternates N child processes per framework and keeps the
fastest of each.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from l2s_jax import host_memory  # noqa: E402
from l2s_jax.benchmarking import run_child  # noqa: E402


def _config(case: str, batch: int, precision: str = "float32"):
    spec = importlib.util.spec_from_file_location("cfg", ROOT / "configs" / (
        "nkd_slak_convnext.py" if case == "l2s" else "demo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(None)
    config.batch_size = batch
    # Mixed precision: bfloat16 compute for both networks, float32 master weights and optimizer.
    config.model.dtype = config.teacher.dtype = precision
    return config, (1000 if case == "l2s" else 4)


def model_flops(case: str) -> float:
    """Model FLOPs of one image's step: teacher forward + 3 x student forward (forward + backward).

    Counted on the networks as defined (unfused teacher, every depthwise layer a direct
    convolution), so the figure does not depend on the formulation that runs.
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from l2s_jax.flops import count_flops
    from l2s_jax.models import create
    from l2s_jax.models.policy import Policy

    config, classes = _config(case, 1)
    name, kwargs = _teacher_kwargs(config)
    image = jax.ShapeDtypeStruct((1, config.data.image_size, config.data.image_size, 3), jnp.float32)

    def forward_flops(model_name: str, overrides: dict) -> float:
        model = nnx.eval_shape(lambda: create(model_name, num_classes=classes,
                                              policy=Policy(depthwise_impl="direct"), **overrides))
        model.eval()
        graph, state = nnx.split(model)
        return count_flops(lambda st, x: nnx.merge(graph, st)(x), state, image)

    return forward_flops(name, kwargs) + 3 * forward_flops(config.model.name, dict(config.model.overrides))


def _teacher_kwargs(config) -> tuple[str, dict]:
    if config.teacher.train:
        return config.teacher.train.model.name, dict(config.teacher.train.model.overrides)
    return config.teacher.model, {}


def _peak_gb(device_peak: int | None) -> float:
    if device_peak:
        return device_peak / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _timed(fn: Callable[[], Any], repeats: int) -> float:
    """Median seconds of ``fn()`` (which must block until its result is ready) after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _jax_parts(run: Any, config: Any, classes: int, teacher: Any, batch_arrays: dict, repeats: int) -> dict:
    """Seconds of each part of the JAX step, each jitted alone (the step's own functions)."""
    import jax
    from flax import nnx

    from l2s_jax import main, train

    schedule = train.make_schedule(config.optim.to_dict(), global_batch_size=config.batch_size,
                                   steps_per_epoch=100, total_steps=1000)
    part = train.make_step_parts(run.student_def, nnx.graphdef(teacher), train.create_optimizer(
        config.optim.to_dict(), schedule), schedule, main._step_config(config, classes))
    key = jax.random.key(0)
    state, tstate = run.state, run.teacher_state
    mix = jax.jit(part.mix)
    images, targets = mix(batch_arrays["images"], batch_arrays["labels"], key)
    teach = jax.jit(part.teacher)
    t_logits, t_feats = teach(tstate, images)
    args = (state.params, state.batch_stats, images, targets, t_logits, t_feats, key)
    fwd = jax.jit(lambda *a: part.loss(*a)[0])
    fwd_bwd = jax.jit(jax.value_and_grad(part.loss, has_aux=True))
    (_, (parts, stats)), grads = fwd_bwd(*args)
    update = jax.jit(part.update)
    ready = jax.block_until_ready
    out = {
        "input mixing": _timed(lambda: ready(mix(batch_arrays["images"], batch_arrays["labels"], key)), repeats),
        "teacher forward": _timed(lambda: ready(teach(tstate, images)), repeats),
        "student forward": _timed(lambda: ready(fwd(*args)), repeats),
    }
    out["student backward"] = _timed(lambda: ready(fwd_bwd(*args)), repeats) - out["student forward"]
    out["optimizer + EMA"] = _timed(lambda: ready(update(state, grads, stats, parts)), repeats)
    return out


def run_jax(case: str, batch: int, repeats: int, breakdown: bool = False, precision: str = "float32",
            started: float | None = None) -> dict:
    """Compile and time the JAX step of ``case`` (and, with ``breakdown``, each of its parts).

    The persistent compilation cache is what ``$L2S_COMPILE_CACHE`` says (the parent turns it
    off for the cold-compile rounds). ``started`` is the wall time at which the parent launched
    this process, for the time from launch to the end of the first step.
    """
    import jax
    import numpy as np

    from l2s_jax import compile_cache, main, train

    compile_cache.enable()
    from l2s_jax.models import create
    from l2s_jax.models.policy import apply_policy

    config, classes = _config(case, batch, precision)
    name, kwargs = _teacher_kwargs(config)
    teacher = create(name, num_classes=classes, **kwargs)
    teacher.eval()
    if config.teacher.fuse and hasattr(teacher, "fuse"):
        teacher.fuse()
    apply_policy(teacher, main.teacher_policy(config))  # as main.load_teacher
    mesh = train.create_mesh()
    run = main.setup_training(config, mesh, num_classes=classes, steps_per_epoch=100, total_steps=1000,
                              teacher=teacher)
    size = config.data.image_size
    rng = np.random.default_rng(0)
    batch_arrays = {"images": rng.standard_normal((batch, size, size, 3), np.float32),
                    "labels": rng.integers(0, classes, batch).astype(np.int32)}
    batch_arrays = jax.device_put(batch_arrays, train.batch_sharding(mesh))
    parts = _jax_parts(run, config, classes, teacher, batch_arrays, repeats) if breakdown else None
    start = time.perf_counter()
    lowered = run.step_fn.lower(run.state, run.teacher_state, batch_arrays)
    trace_s = time.perf_counter() - start
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    state = run.state
    times, faults, sys_s = [], [], []
    for _ in range(repeats + 1):
        before = resource.getrusage(resource.RUSAGE_SELF)
        start = time.perf_counter()
        state, metrics = compiled(state, run.teacher_state, batch_arrays)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_SELF)
        faults.append(after.ru_minflt - before.ru_minflt)
        sys_s.append(after.ru_stime - before.ru_stime)
        if len(times) == 1:
            first_step_at = time.time()
    stats = jax.devices()[0].memory_stats() or {}
    step_s = statistics.median(times[1:])
    return {"images_per_s": batch / step_s, "step_s": step_s, "compile_s": compile_s, "trace_s": trace_s,
            "page_faults_per_step": statistics.median(faults[1:]), "sys_s_per_step": statistics.median(sys_s[1:]),
            "peak_gb": _peak_gb(stats.get("peak_bytes_in_use")), "device": jax.devices()[0].platform,
            "device_kind": jax.devices()[0].device_kind, "parts": parts,
            "launch_to_first_step_s": first_step_at - started if started else None}


def _torch_nkd(s, t, y_soft, temperature: float = 1.0, lam: float = 1.0):
    """Eq. (4) in PyTorch: CE (soft targets) + teacher-weighted target term + non-target KL term."""
    import torch.nn.functional as F

    y = y_soft.argmax(-1)
    log_p = F.log_softmax(s, -1)
    ce = -(y_soft * log_p).sum(-1).mean()
    log_p_y = log_p.gather(1, y[:, None])[:, 0]
    p_t_y = F.softmax(t, -1).gather(1, y[:, None])[:, 0]
    mask = F.one_hot(y, s.shape[1]).bool()
    log_s_hat = F.log_softmax((s / temperature).masked_fill(mask, float("-inf")), -1).masked_fill(mask, 0.0)
    t_hat = F.softmax((t / temperature).masked_fill(mask, float("-inf")), -1)
    return ce - (p_t_y * log_p_y).mean() - lam * temperature**2 * (t_hat * log_s_hat).sum(-1).mean()


def run_torch(case: str, batch: int, repeats: int, breakdown: bool = False, compiled: bool = False,
              precision: str = "float32") -> dict:
    """Time the same step in PyTorch, channels_last, eager or under ``torch.compile`` (AMP for bfloat16)."""
    import contextlib

    import torch

    from l2s_jax.reference.torch_slak import SLaK

    torch.set_num_threads(os.cpu_count() or 1)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config, classes = _config(case, batch)
    name, kwargs = _teacher_kwargs(config)
    from l2s_jax.models import registry

    def amp() -> contextlib.AbstractContextManager:
        if precision == "bfloat16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def build(model_name: str, overrides: dict) -> torch.nn.Module:
        base = dict(registry.MODELS[model_name][1]) if model_name in registry.MODELS else {}
        base.update(overrides)
        base.pop("sparse", None)
        return SLaK(num_classes=classes, **base).to(device, memory_format=torch.channels_last)

    teacher = build(name, kwargs).eval()
    student = build(config.model.name, dict(config.model.overrides)).train()
    decay = [p for p in student.parameters() if p.ndim > 1]
    no_decay = [p for p in student.parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": config.optim.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=1e-3, betas=(0.9, 0.999), eps=1e-8)
    ema = [p.detach().clone() for p in student.parameters()]
    size = config.data.image_size
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, size, size, generator=g).to(device, memory_format=torch.channels_last)
    labels = torch.randint(0, classes, (batch,), generator=g).to(device)
    teacher_fwd, student_fwd = (torch.compile(teacher), torch.compile(student)) if compiled else (teacher, student)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def mix() -> tuple[torch.Tensor, torch.Tensor]:
        lam = 0.7
        x = images * lam + images.flip(0) * (1 - lam)
        y = torch.nn.functional.one_hot(labels, classes).float() * 0.9 + 0.1 / classes
        return x, y * lam + y.flip(0) * (1 - lam)

    def teach(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), amp():
            return teacher_fwd(x).float()

    def learn(x: torch.Tensor) -> torch.Tensor:
        with amp():
            return student_fwd(x).float()

    def update() -> None:
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_lerp_(ema, list(student.parameters()), 1 - config.ema_decay)

    def step() -> None:
        x, y = mix()
        loss = _torch_nkd(learn(x), teach(x), y)
        loss.backward()
        update()
        sync()

    start = time.perf_counter()
    step()
    first_s = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    parts = None
    if breakdown:
        x, y = mix()
        t = teach(x)

        def fwd() -> None:
            with torch.no_grad():
                _torch_nkd(learn(x), t, y)
            sync()

        def fwd_bwd() -> None:
            _torch_nkd(learn(x), t, y).backward()
            sync()

        def grads_then_update() -> None:
            opt.step()
            torch._foreach_lerp_(ema, list(student.parameters()), 1 - config.ema_decay)
            sync()

        fwd_bwd()  # leaves gradients for the optimizer timing
        with torch.no_grad():
            update_s = _timed(grads_then_update, repeats)
        parts = {"input mixing": _timed(lambda: (mix(), sync()), repeats),
                 "teacher forward": _timed(lambda: (teach(x), sync()), repeats),
                 "student forward": _timed(fwd, repeats)}
        # Forward in train mode with autograd recording, as the step runs it; minus the no_grad forward.
        parts["student backward"] = _timed(fwd_bwd, repeats) - parts["student forward"]
        parts["optimizer + EMA"] = update_s
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    return {"images_per_s": batch / step_s, "step_s": step_s, "compile_s": first_s, "peak_gb": _peak_gb(peak),
            "device": device.type, "mode": "compile" if compiled else "eager", "parts": parts}


PARTS = ("input mixing", "teacher forward", "student forward", "student backward", "optimizer + EMA")


def _child(framework: str, case: str, batch: int, repeats: int, *extra: str, cache: str = "off") -> dict | str:
    cmd = [sys.executable, __file__, "--child", framework, "--cases", f"{case}:{batch}", "--repeats", str(repeats),
           "--started", repr(time.time()), *extra]
    return run_child(cmd, env={**os.environ, "L2S_COMPILE_CACHE": cache})


def _best(results: list[dict | str]) -> dict | str:
    """The round with the highest throughput (least disturbed by other load), else the failure."""
    ok = [r for r in results if isinstance(r, dict)]
    return max(ok, key=lambda r: r["images_per_s"]) if ok else results[-1]


def _breakdown_table(case: str, batch: int, jax_parts: dict | None, torch_parts: dict | None) -> str:
    """Milliseconds per part, side by side (JAX/PyTorch as a time ratio: < 1 means JAX is faster)."""
    head = f"{case}:{batch} part{'':<14}{'JAX ms':>10}{'torch ms':>10}{'JAX/torch':>10}"
    rows = [head, "-" * len(head)]
    for name in (*PARTS, "sum of parts"):
        def ms(parts: dict | None) -> float | None:
            if not parts:
                return None
            return 1e3 * (sum(parts[p] for p in PARTS) if name == "sum of parts" else parts[name])
        j, t = ms(jax_parts), ms(torch_parts)
        cell = lambda v: f"{v:>10.1f}" if v is not None else f"{'-':>10}"  # noqa: E731
        ratio = f"{j / t:>10.2f}" if j is not None and t else f"{'-':>10}"
        rows.append(f"{'':<{len(case) + len(str(batch)) + 1}} {name:<18}{cell(j)}{cell(t)}{ratio}")
    return "\n".join(rows)


def _precision(arg: str) -> str:
    """``auto``: bfloat16 mixed precision on an accelerator, float32 on CPU (where bf16 is emulated)."""
    if arg != "auto":
        return arg
    import jax

    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def _throughput_note(case: str, batch: int, flops: float, results: dict[str, dict | str], precision: str) -> str:
    """Model TFLOP/s of each framework, and the fraction of the device's dense peak when known."""
    from l2s_jax.flops import device_peak_tflops

    parts = []
    for label, r in results.items():
        if not isinstance(r, dict):
            continue
        tflops = flops * r["images_per_s"] / 1e12
        peak = device_peak_tflops(r.get("device_kind", r["device"]), precision) if r["device"] != "cpu" else None
        parts.append(f"{label} {tflops:.3f} TFLOP/s" + (f" ({100 * tflops / peak:.1f}% of the {peak:g} TFLOP/s "
                                                         f"{precision} peak)" if peak else ""))
    return f"  {case}:{batch} model {flops / 1e9:.1f} GFLOP/image: " + ", ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="l2s:8,l2s:32,demo:64")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1, help="child processes per framework and case; best kept")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--torch-modes", default="eager,compile",
                        help="PyTorch variants to run (eager, compile); the faster is the PyTorch column")
    parser.add_argument("--precision", choices=("auto", "float32", "bfloat16"), default="auto",
                        help="auto: bfloat16 mixed precision on GPU/TPU (both frameworks), float32 on CPU")
    parser.add_argument("--breakdown", action="store_true",
                        help="also time each part of the step (one extra child per framework and case)")
    parser.add_argument("--no-cache-check", action="store_true",
                        help="skip the two extra JAX runs that time a re-run with a warm compilation cache")
    parser.add_argument("--child", choices=("jax", "torch", "torch-compile"), help=argparse.SUPPRESS)
    parser.add_argument("--child-breakdown", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--started", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    cases = [(c.split(":")[0], int(c.split(":")[1])) for c in args.cases.split(",")]
    precision = _precision(args.precision)
    if args.child:
        case, batch = cases[0]
        if args.child == "jax":
            result = run_jax(case, batch, args.repeats, breakdown=args.child_breakdown, precision=precision,
                             started=args.started)
        else:
            result = run_torch(case, batch, args.repeats, breakdown=args.child_breakdown,
                               compiled=args.child == "torch-compile", precision=precision)
        print(json.dumps(result), flush=True)
        return
    with_torch = not args.no_torch and importlib.util.find_spec("torch") is not None
    torch_children = [{"eager": "torch", "compile": "torch-compile"}[m] for m in args.torch_modes.split(",") if m]
    frameworks = ("jax", *torch_children) if with_torch else ("jax",)
    child_args = ("--precision", precision)
    head = f"{'case':<10}{'batch':>6} | {'JAX img/s':>10}{'compile s':>10}{'peak GB':>9}"
    if with_torch:
        head += f" | {'torch img/s':>11}{'1st step s':>11}{'peak GB':>9} | {'JAX/torch':>9}{'mem ratio':>10}"
    print(head)
    print("-" * len(head), flush=True)
    notes, breakdowns, j = [], [], None
    for case, batch in cases:
        runs: dict[str, list] = {fw: [] for fw in frameworks}
        for _ in range(args.rounds):
            for fw in frameworks:
                runs[fw].append(_child(fw, case, batch, args.repeats, *child_args))
        j = _best(runs["jax"])
        row = f"{case:<10}{batch:>6} | "
        row += (f"{j['images_per_s']:>10.2f}{j['compile_s']:>10.2f}{j['peak_gb']:>9.2f}" if isinstance(j, dict)
                else f"{j:>29}")
        results = {"JAX": j}
        if with_torch:
            per_mode = {fw: _best(runs[fw]) for fw in torch_children}
            t = _best(list(per_mode.values()))
            results["PyTorch"] = t
            row += " | " + (f"{t['images_per_s']:>11.2f}{t['compile_s']:>11.2f}{t['peak_gb']:>9.2f}"
                            if isinstance(t, dict) else f"{t:>31}")
            both = isinstance(j, dict) and isinstance(t, dict)
            row += " | " + (f"{j['images_per_s'] / t['images_per_s']:>9.2f}{j['peak_gb'] / t['peak_gb']:>10.2f}"
                            if both else f"{'-':>9}{'-':>10}")
            modes = ", ".join(f"{r['mode']} {r['images_per_s']:.2f} img/s (first step {r['compile_s']:.1f} s, "
                              f"{r['peak_gb']:.2f} GB)" if isinstance(r, dict) else f"{fw}: {r}"
                              for fw, r in per_mode.items())
            notes.append(f"  {case}:{batch} PyTorch {modes}")
        print(row, flush=True)
        if isinstance(j, dict):
            note = (f"  {case}:{batch} JAX compile {j['compile_s']:.1f} s cold (trace + lower {j['trace_s']:.1f} s); "
                    f"per step {j['page_faults_per_step']:,.0f} page faults, {j['sys_s_per_step']:.2f} s in the kernel")
            if not args.no_cache_check:
                with tempfile.TemporaryDirectory(prefix="l2s_bench_cache_") as cache:
                    _child("jax", case, batch, 1, *child_args, cache=cache)  # fills the cache
                    warm = _child("jax", case, batch, 1, *child_args, cache=cache)
                note += (f"; re-run with a warm cache: compile {warm['compile_s']:.1f} s, launch to end of first "
                         f"step {warm['launch_to_first_step_s']:.1f} s" if isinstance(warm, dict)
                         else f"; warm-cache run {warm}")
            notes.append(note)
        notes.append(_throughput_note(case, batch, model_flops(case), results, precision))
        if args.breakdown:
            jp = _child("jax", case, batch, args.repeats, *child_args, "--child-breakdown")
            tp = (_child(torch_children[0], case, batch, args.repeats, *child_args, "--child-breakdown")
                  if with_torch else None)
            breakdowns.append(_breakdown_table(case, batch, jp.get("parts") if isinstance(jp, dict) else None,
                                               tp.get("parts") if isinstance(tp, dict) else None))
    device = j["device"] if isinstance(j, dict) else "?"
    print(f"\n(JAX on {device}, {precision}; best of {args.rounds} round(s), each framework in its own process; "
          f"compile = trace + lower + XLA compile with no persistent cache; PyTorch channels_last, teacher eval + "
          f"no_grad{', AMP' if precision == 'bfloat16' else ''}, the faster of "
          f"{'/'.join(args.torch_modes.split(','))}; peak = max RSS of the process on CPU, device peak on GPU; "
          f"mem ratio = JAX peak / PyTorch peak; both with {host_memory.describe(host_memory.child_env())})")
    for note in notes:
        print(note)
    for table in breakdowns:
        print("\n" + table)
    if breakdowns:
        print("\n(parts jitted / run alone with the step's own functions; 'student forward' runs without "
              "gradient bookkeeping, 'student backward' = forward+backward minus that)")


if __name__ == "__main__":
    main()
