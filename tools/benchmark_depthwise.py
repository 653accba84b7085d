"""Benchmark the depthwise-convolution implementations against PyTorch channels_last.

Prints one table: milliseconds (median of ``--repeats`` interleaved runs, compile and first
call excluded) per implementation of :mod:`l2s_jax.ops.depthwise`, PyTorch channels_last
(when torch is importable; ``torch.set_num_threads(--threads)``), the fastest JAX
implementation and its ratio to PyTorch. Cases:

* teacher: the SLaK-T large-kernel op of each stage, forward: three depthwise branches
  (K x 5, 5 x K, 5 x 5) summed. ``fft``/``dft``/``auto`` run the merged K x K kernel (the
  model's fused path, :func:`merge_kernels`); ``direct``/``toeplitz``/``shift`` run the three
  branches (their cost grows with the kernel area, so merging would only hurt them);
  PyTorch runs the three branches.
* student: the ConvNeXt 7x7 depthwise conv, forward + backward (gradients of the input and
  the kernel for a random cotangent).

Usage: ``python tools/benchmark_depthwise.py [--batch 8] [--repeats 5] [--quick]``.
A second table gives the process CPU time of the same runs. Timings on a shared machine are
noisy: compare ratios within one run.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from l2s_jax.ops.depthwise import IMPLS, depthwise_conv2d, merge_kernels, resolve_impl  # noqa: E402

# (name, H=W, C, K): SLaK-T stages (kernel_size 51, 49, 47, 13; small kernel 5).
TEACHER = [("teacher s1", 56, 124, 51), ("teacher s2", 28, 249, 49), ("teacher s3", 14, 499, 47),
           ("teacher s4", 7, 998, 13)]
# ConvNeXt-T stages with the 7x7 depthwise conv.
STUDENT = [("student s1", 56, 96, 7), ("student s2", 28, 192, 7), ("student s3", 14, 384, 7),
           ("student s4", 7, 768, 7)]
SMALL = 5
# Above this many taps per branch the shift-add graph gets slow to compile and run.
SHIFT_MAX_TAPS = 13 * 5


def _time(fns: dict[str, Callable[[], object]], repeats: int, sync: Callable[[object], None],
          stat: Callable[[list[float]], float] = statistics.median) -> dict[str, tuple[float, float]]:
    """(wall, process CPU) milliseconds per callable (``stat`` of the repeats, median by
    default), callables interleaved within each repeat.

    The CPU time (all threads of this process) is the work done; on a machine shared with
    other jobs it is steadier than the wall time, which also counts waiting for a core.
    Each timed call follows an untimed one of the same callable: a memory-hungry neighbour
    (e.g. ``direct``) otherwise slows the next one's first touches by up to 1.5x.
    """
    for f in fns.values():
        sync(f())
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, f in fns.items():
            sync(f())  # untimed: re-touch this callable's buffers after its neighbours ran
            t0, c0 = time.perf_counter(), time.process_time()
            sync(f())
            wall[name].append((time.perf_counter() - t0) * 1e3)
            cpu[name].append((time.process_time() - c0) * 1e3)
    return {k: (stat(wall[k]), stat(cpu[k])) for k in fns}


def _jax_sync(out: object) -> None:
    jax.block_until_ready(out)


def _teacher_jax(h: int, c: int, k: int, batch: int, impls: list[str]) -> dict[str, Callable[[], object]]:
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, h, h, c)), jnp.float32)
    shapes = ((k, SMALL, c), (SMALL, k, c), (SMALL, SMALL, c))
    ks = [jnp.asarray(rng.standard_normal(s) * 0.05, jnp.float32) for s in shapes]

    def branches(impl: str):
        return jax.jit(lambda x, a, b, s: sum(depthwise_conv2d(x, w, None, impl) for w in (a, b, s)))

    def merged(impl: str):
        return jax.jit(lambda x, a, b, s: depthwise_conv2d(x, merge_kernels([a, b, s]), None, impl))

    fns = {}
    for impl in impls:
        if impl in ("fft", "dft", "auto"):
            f = merged(impl)
        elif impl == "shift" and k * SMALL > SHIFT_MAX_TAPS:
            continue
        else:
            f = branches(impl)
        fns[impl] = (lambda f=f: f(x, *ks))
    return fns


def _student_jax(h: int, c: int, k: int, batch: int, impls: list[str]) -> dict[str, Callable[[], object]]:
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((batch, h, h, c)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((k, k, c)) * 0.05, jnp.float32)
    dy = jnp.asarray(rng.standard_normal((batch, h, h, c)), jnp.float32)
    fns = {}
    def step(x, w, dy, impl):
        # y is returned too: otherwise XLA drops the forward as dead code.
        y, vjp = jax.vjp(lambda x, w: depthwise_conv2d(x, w, None, impl), x, w)
        return (y,) + vjp(dy)

    for impl in impls:
        f = jax.jit(lambda x, w, dy, impl=impl: step(x, w, dy, impl))
        fns[impl] = (lambda f=f: f(x, w, dy))
    return fns


def _torch_fns(kind: str, h: int, c: int, k: int, batch: int):
    """PyTorch channels_last callables, or None without torch."""
    try:
        import torch
    except ImportError:
        return None
    cl = torch.channels_last
    x = torch.randn(batch, c, h, h).contiguous(memory_format=cl)
    if kind == "teacher":
        convs = [torch.nn.Conv2d(c, c, s, padding=(s[0] // 2, s[1] // 2), groups=c, bias=False).to(memory_format=cl)
                 for s in ((k, SMALL), (SMALL, k), (SMALL, SMALL))]

        def fwd():
            with torch.no_grad():
                return convs[0](x) + convs[1](x) + convs[2](x)

        return fwd
    conv = torch.nn.Conv2d(c, c, k, padding=k // 2, groups=c, bias=False).to(memory_format=cl)
    x.requires_grad_(True)
    dy = torch.randn(batch, c, h, h).contiguous(memory_format=cl)

    def fwd_bwd():
        return torch.autograd.grad(conv(x), (x, conv.weight), dy)

    return fwd_bwd


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2, help="PyTorch intra-op threads")
    ap.add_argument("--quick", action="store_true", help="2 repeats, no 'direct' (minutes per case), fewer cases")
    ap.add_argument("--impls", default=",".join(("auto",) + IMPLS), help="comma-separated JAX impls")
    ap.add_argument("--cases", default="teacher,student", help="teacher, student or both")
    ap.add_argument("--stat", choices=("median", "min"), default="median",
                    help="statistic of the repeats (min: least disturbed run on a busy machine)")
    args = ap.parse_args(argv)
    impls = [i for i in args.impls.split(",") if i]
    repeats = args.repeats
    stat = statistics.median if args.stat == "median" else min
    teacher, student = TEACHER, STUDENT
    if args.quick:
        repeats = min(repeats, 2)
        impls = [i for i in impls if i != "direct"]
        teacher, student = TEACHER[:1] + TEACHER[3:], STUDENT[:1] + STUDENT[3:]
    try:
        import torch

        torch.set_num_threads(args.threads)
    except ImportError:
        torch = None

    print(f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__ if torch else '-'}, "
          f"batch {args.batch}, {args.stat} of {repeats}, ms")
    cols = impls + ["torch_cl"]
    header = f"{'case':<12} {'shape':<18} {'auto->':<7} " + " ".join(f"{c:>9}" for c in cols)
    print("wall-clock ms")
    print(header + f" {'best':>9} {'best/torch':>10}")
    cases = [("teacher", t) for t in teacher if "teacher" in args.cases] + \
            [("student", s) for s in student if "student" in args.cases]
    cpu_rows = []
    for kind, (name, h, c, k) in cases:
        make = _teacher_jax if kind == "teacher" else _student_jax
        times = _time(make(h, c, k, args.batch, impls), repeats, _jax_sync, stat)
        tf = _torch_fns(kind, h, c, k, args.batch)
        if tf is not None:
            times["torch_cl"] = _time({"t": tf}, repeats, lambda o: None, stat)["t"]
        kk = min(k, 2 * h - 1)  # the kernel after cropping to the map
        label = f"{name:<12} {f'{h}x{h}x{c} K{k}' + (' fb' if kind == 'student' else ''):<18} " \
                f"{resolve_impl('auto', h, h, kk, kk):<7} "
        for col, idx in (("wall", 0), ("cpu", 1)):
            jax_t = {i: times[i][idx] for i in impls if i in times}
            best = min(jax_t, key=jax_t.get)
            ratio = jax_t[best] / times["torch_cl"][idx] if "torch_cl" in times else float("nan")
            cells = " ".join(f"{times[i][idx]:9.1f}" if i in times else f"{'-':>9}" for i in cols)
            row = label + cells + f" {best:>9} {ratio:10.2f}"
            if col == "wall":
                print(row, flush=True)
            else:
                cpu_rows.append(row)
    print("process CPU ms (all threads; steadier on a shared machine)")
    print(header + f" {'best':>9} {'best/torch':>10}")
    print("\n".join(cpu_rows))


if __name__ == "__main__":
    main()
