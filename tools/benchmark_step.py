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
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _config(case: str, batch: int):
    spec = importlib.util.spec_from_file_location("cfg", ROOT / "configs" / (
        "nkd_slak_convnext.py" if case == "l2s" else "demo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(None)
    config.batch_size = batch
    return config, (1000 if case == "l2s" else 4)


def _teacher_kwargs(config) -> tuple[str, dict]:
    if config.teacher.train:
        return config.teacher.train.model.name, dict(config.teacher.train.model.overrides)
    return config.teacher.model, {}


def _peak_gb(device_peak: int | None) -> float:
    if device_peak:
        return device_peak / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_jax(case: str, batch: int, repeats: int) -> dict:
    """Compile and time the JAX step of ``case``."""
    import jax
    import numpy as np

    from l2s_jax import main, train
    from l2s_jax.models import create
    from l2s_jax.models.policy import apply_policy

    config, classes = _config(case, batch)
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
    start = time.perf_counter()
    compiled = run.step_fn.lower(run.state, run.teacher_state, batch_arrays).compile()
    compile_s = time.perf_counter() - start
    state = run.state
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        state, metrics = compiled(state, run.teacher_state, batch_arrays)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - start)
    stats = jax.devices()[0].memory_stats() or {}
    step_s = statistics.median(times[1:])
    return {"images_per_s": batch / step_s, "step_s": step_s, "compile_s": compile_s,
            "peak_gb": _peak_gb(stats.get("peak_bytes_in_use")), "device": jax.devices()[0].platform}


def _torch_nkd(s, t, y_soft, temperature: float = 1.0, lam: float = 1.0):
    """Eq. (4) in PyTorch: CE (soft targets) + teacher-weighted target term + non-target KL term."""
    import torch
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


def run_torch(case: str, batch: int, repeats: int) -> dict:
    """Time the same step in PyTorch eager, channels_last."""
    import torch

    from l2s_jax.reference.torch_slak import SLaK

    torch.set_num_threads(os.cpu_count() or 1)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config, classes = _config(case, batch)
    name, kwargs = _teacher_kwargs(config)
    from l2s_jax.models import registry

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

    def step() -> None:
        lam = 0.7
        x = images * lam + images.flip(0) * (1 - lam)
        y = torch.nn.functional.one_hot(labels, classes).float() * 0.9 + 0.1 / classes
        y = y * lam + y.flip(0) * (1 - lam)
        with torch.no_grad():
            t = teacher(x)
        loss = _torch_nkd(student(x), t, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, list(student.parameters()), 1 - config.ema_decay)
        if device.type == "cuda":
            torch.cuda.synchronize()

    start = time.perf_counter()
    step()
    first_s = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    return {"images_per_s": batch / step_s, "step_s": step_s, "compile_s": first_s, "peak_gb": _peak_gb(peak),
            "device": device.type}


def _child(framework: str, case: str, batch: int, repeats: int) -> dict | str:
    cmd = [sys.executable, __file__, "--child", framework, "--cases", f"{case}:{batch}", "--repeats", str(repeats)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        return f"failed: {(proc.stderr.strip().splitlines() or ['?'])[-1][:60]}"
    return json.loads(lines[-1])


def _best(results: list[dict | str]) -> dict | str:
    """The round with the highest throughput (least disturbed by other load), else the failure."""
    ok = [r for r in results if isinstance(r, dict)]
    return max(ok, key=lambda r: r["images_per_s"]) if ok else results[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="l2s:8,l2s:32,demo:64")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1, help="child processes per framework and case; best kept")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--child", choices=("jax", "torch"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    cases = [(c.split(":")[0], int(c.split(":")[1])) for c in args.cases.split(",")]
    if args.child:
        case, batch = cases[0]
        fn = run_jax if args.child == "jax" else run_torch
        print(json.dumps(fn(case, batch, args.repeats)), flush=True)
        return
    with_torch = not args.no_torch and importlib.util.find_spec("torch") is not None
    head = f"{'case':<10}{'batch':>6} | {'JAX img/s':>10}{'compile s':>10}{'peak GB':>9}"
    if with_torch:
        head += f" | {'torch img/s':>11}{'1st step s':>11}{'peak GB':>9} | {'JAX/torch':>9}"
    print(head)
    print("-" * len(head), flush=True)
    frameworks = ("jax", "torch") if with_torch else ("jax",)
    for case, batch in cases:
        runs: dict[str, list] = {fw: [] for fw in frameworks}
        for _ in range(args.rounds):
            for fw in frameworks:
                runs[fw].append(_child(fw, case, batch, args.repeats))
        j = _best(runs["jax"])
        row = f"{case:<10}{batch:>6} | "
        row += (f"{j['images_per_s']:>10.2f}{j['compile_s']:>10.1f}{j['peak_gb']:>9.2f}" if isinstance(j, dict)
                else f"{j:>29}")
        if with_torch:
            t = _best(runs["torch"])
            row += " | " + (f"{t['images_per_s']:>11.2f}{t['compile_s']:>11.1f}{t['peak_gb']:>9.2f}"
                            if isinstance(t, dict) else f"{t:>31}")
            ratio = j["images_per_s"] / t["images_per_s"] if isinstance(j, dict) and isinstance(t, dict) else None
            row += " | " + (f"{ratio:>9.2f}" if ratio else f"{'-':>9}")
        print(row, flush=True)
    device = j["device"] if isinstance(j, dict) else "?"
    print(f"\n(JAX on {device}; best of {args.rounds} round(s); compile = lower + XLA compile; PyTorch eager, "
          f"channels_last; peak = max RSS of the process on CPU, device peak on GPU)")


if __name__ == "__main__":
    main()
