"""Benchmark every depthwise-convolution implementation on every depthwise shape of the model zoo.

The shapes are not typed in: each selected model (``--shapes``) is traced abstractly
(``jax.eval_shape`` at 224 px, batch 1, nothing computed) and every call of
:class:`l2s_jax.layers.DepthwiseConv2d` is recorded: map, channels, kernel, padding, stride and
the images per input image (CSWin's LePE convolves each stripe as its own image). SLaK models
are traced twice, with their decomposed branches (K x 5, 5 x K, 5 x 5) and fused
(``model.fuse()``: one K x K kernel, the frozen teacher's path). Identical shapes of several
models are measured once. Strided convolutions (MobileNetV3) run as the model runs them: the
op at stride 1, then subsampled (PyTorch runs its strided kernel).

For each shape, mode (``fwd``; ``fwdbwd`` = forward + gradients of input and kernel for a
random cotangent) and implementation of :mod:`l2s_jax.ops.depthwise` (plus PyTorch's
``conv2d(groups=C)`` in channels_last when torch is importable; on GPU with bf16 autocast
when ``--dtype bfloat16``) it prints the median wall time (compile and first call excluded),
the throughput and, on a GPU of known peak, the fraction of the peak. FLOPs are the useful
MACs of a depthwise conv, ``2 * N * Ho * Wo * C * kh * kw`` (``Ho, Wo`` the strided output,
``kh, kw`` the taps that can touch the map, e.g. 47 -> 27 on a 14x14 map), times 3 for
``fwdbwd``. Then per shape the fastest implementation and what ``auto`` picks (``!`` marks a
mismatch), from which the ``auto`` policy of :func:`l2s_jax.ops.depthwise.resolve_impl` is set.

Guards: a measurement whose first timed call exceeds ``--max-seconds`` keeps that one figure
(marked ``*``) and is not repeated, and its ``fwdbwd`` is skipped (``skip``); ``shift`` is not
compiled above ``--shift-max-taps`` taps (``-``); a failing measurement (e.g. out of memory)
prints ``err`` and its message at the end instead of stopping the run.

Usage::

    python tools/benchmark_depthwise.py                       # CPU: slak_tiny + convnext_tiny, batch 8
    python tools/benchmark_depthwise.py --shapes all --dtype bfloat16 --csv out.csv   # GPU: the zoo

Timings on a shared machine are noisy: compare ratios within one run; the process CPU time
table (CPU backend) is steadier than the wall time.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from l2s_jax import layers  # noqa: E402
from l2s_jax.models import registry  # noqa: E402
from l2s_jax.flops import device_peak_tflops  # noqa: E402
from l2s_jax.ops.depthwise import IMPLS, chosen_impl, depthwise_conv2d, effective_kernel_size  # noqa: E402

# Families whose models have depthwise convolutions; "_mini" models are test-sized.
ZOO_FAMILIES = ("slak", "convnext", "mobilenetv3", "cswin")
ALIASES = {"teacher": ("slak_tiny",), "student": ("convnext_tiny",)}
CPU_DEFAULT_SHAPES = "slak_tiny,convnext_tiny"
TRACE_SIZE = 224
MODES = ("fwd", "fwdbwd")
# ----------------------------------------------------------------------------- shapes


@dataclasses.dataclass(frozen=True, order=True)
class Shape:
    """One depthwise convolution as a model calls it; ``images`` = op images per input image."""

    images: int
    h: int
    w: int
    c: int
    kh: int
    kw: int
    ph: int
    pw: int
    stride: int

    def out_hw(self) -> tuple[int, int]:
        """Output map of the layer (after the stride)."""
        ho, wo = self.h + 2 * self.ph - self.kh + 1, self.w + 2 * self.pw - self.kw + 1
        return -(-ho // self.stride), -(-wo // self.stride)

    def flops(self, batch: int) -> float:
        """Useful FLOPs of the forward: 2 MACs-worth per output and tap that can touch the map."""
        kh, kw = effective_kernel_size((self.h, self.w), (self.kh, self.kw), (self.ph, self.pw))
        ho, wo = self.out_hw()
        return 2.0 * batch * self.images * ho * wo * self.c * kh * kw

    def describe(self, batch: int) -> str:
        """``NxHxWxC khxkw`` plus the cropped kernel, stride and non-'same' padding when present."""
        s = f"{batch * self.images}x{self.h}x{self.w}x{self.c} {self.kh}x{self.kw}"
        eff = effective_kernel_size((self.h, self.w), (self.kh, self.kw), (self.ph, self.pw))
        if eff != (self.kh, self.kw):
            s += f"({eff[0]}x{eff[1]})"
        if (self.ph, self.pw) != (self.kh // 2, self.kw // 2):
            s += f" p{self.ph},{self.pw}"
        return s + (f" s{self.stride}" if self.stride > 1 else "")


@dataclasses.dataclass
class Use:
    """Where a shape occurs: the models and one layer path."""

    models: list[str]
    layer: str


def zoo_models() -> list[str]:
    """Registered models of the depthwise families, test-sized ``_mini`` ones excluded."""
    return [name for name, (family, _) in registry.MODELS.items()
            if family in ZOO_FAMILIES and not name.endswith("_mini")]


def _trace_config(kwargs: dict[str, Any]) -> dict[str, Any]:
    """One block per stage: repeated blocks of a stage have identical depthwise shapes."""
    out = dict(kwargs)
    for key in ("depths", "depth"):
        if key in out:
            out[key] = (1,) * len(out[key])
    return out


def trace_depthwise(name: str, fused: bool = False) -> list[tuple[Shape, str]]:
    """(shape, layer path) of every DepthwiseConv2d call of model ``name`` on a 224 px image."""
    family, kwargs = registry.MODELS[name]
    build = registry.get_family(family).build
    calls: list[tuple[Shape, str]] = []
    paths: dict[int, str] = {}
    original = layers.DepthwiseConv2d.__call__

    def recording(self: layers.DepthwiseConv2d, x: jax.Array) -> jax.Array:
        kh, kw, c = self.kernel.shape
        calls.append((Shape(x.shape[0], x.shape[1], x.shape[2], c, kh, kw, int(self.padding[0]),
                            int(self.padding[1]), int(self.stride)), paths.get(id(self), "?")))
        return original(self, x)

    def forward(images: jax.Array) -> jax.Array:
        model = build(**_trace_config(kwargs), rngs=nnx.Rngs(0))
        if fused:
            model.fuse()
        paths.update({id(m): ".".join(str(p) for p in path) for path, m in nnx.iter_graph(model)
                      if isinstance(m, layers.DepthwiseConv2d)})
        return model(images)

    layers.DepthwiseConv2d.__call__ = recording
    try:
        jax.eval_shape(forward, jax.ShapeDtypeStruct((1, TRACE_SIZE, TRACE_SIZE, 3), jnp.float32))
    finally:
        layers.DepthwiseConv2d.__call__ = original
    return calls


def zoo_shapes(models: Sequence[str]) -> dict[Shape, Use]:
    """Unique depthwise shapes of ``models`` (SLaK: branches and fused), in model then stage order."""
    found: dict[Shape, Use] = {}
    for name in models:
        family = registry.MODELS[name][0]
        calls = trace_depthwise(name)
        if family == "slak":
            calls = trace_depthwise(name, fused=True) + calls
        # Stage order (most map pixels per input image first), the larger kernel first within a stage.
        for shape, layer in sorted(calls, key=lambda sl: (-sl[0].images * sl[0].h * sl[0].w, -sl[0].kh * sl[0].kw)):
            use = found.setdefault(shape, Use([], layer))
            if name not in use.models:
                use.models.append(name)
    return found


def select_models(spec: str) -> list[str]:
    """Model names from ``--shapes``: models, families, ``teacher``/``student`` or ``all``."""
    zoo = zoo_models()
    out: list[str] = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        if item == "all":
            names = zoo
        elif item in ALIASES:
            names = list(ALIASES[item])
        elif item in ZOO_FAMILIES:
            names = [n for n in zoo if registry.MODELS[n][0] == item]
        elif item in registry.MODELS and registry.MODELS[item][0] in ZOO_FAMILIES:
            names = [item]
        else:
            raise ValueError(f"unknown --shapes entry {item!r}; use 'all', a family {ZOO_FAMILIES}, "
                             f"'teacher', 'student' or a model: {', '.join(zoo)}")
        out += [n for n in names if n not in out]
    if not out:
        raise ValueError("--shapes selects no model; e.g. --shapes slak_tiny,convnext_tiny")
    return out


# ----------------------------------------------------------------------------- measuring


@dataclasses.dataclass
class Result:
    """One (shape, impl, mode) measurement: ms per call (wall, process CPU) or why there is none."""

    wall_ms: float = math.nan
    cpu_ms: float = math.nan
    over_budget: bool = False  # one call only: it exceeded --max-seconds
    status: str = "ok"  # ok | skip (fwd over budget) | n/a (not compiled) | err
    error: str = ""


def _error_text(e: BaseException) -> str:
    """The exception's type and first line, short enough for the report."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:200] if lines else ''}"


Runner = Callable[[int], None]  # run ``n`` calls back to back and wait for the last


def _inputs(shape: Shape, batch: int, dtype, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    n = batch * shape.images
    x = rng.standard_normal((n, shape.h, shape.w, shape.c)).astype(np.float32)
    k = (rng.standard_normal((shape.kh, shape.kw, shape.c)) * 0.05).astype(np.float32)
    ho, wo = shape.out_hw()
    dy = rng.standard_normal((n, ho, wo, shape.c)).astype(np.float32)
    return x, k, dy


def jax_runner(shape: Shape, impl: str, mode: str, batch: int, dtype: str) -> Runner:
    """Compiled JAX op (as DepthwiseConv2d runs it: stride 1 then subsample) as a Runner."""
    dt = jnp.dtype(dtype)
    x, k, dy = (jnp.asarray(a, dt) for a in _inputs(shape, batch, dtype, 0))
    s, pad = shape.stride, (shape.ph, shape.pw)

    def op(x: jax.Array, k: jax.Array) -> jax.Array:
        return depthwise_conv2d(x, k, pad, impl)[:, ::s, ::s, :]

    if mode == "fwd":
        fn, args = jax.jit(op).lower(x, k).compile(), (x, k)
    else:
        def step(x, k, dy):
            y, vjp = jax.vjp(op, x, k)
            return (y,) + vjp(dy)  # y is returned too: otherwise XLA drops the forward as dead code

        fn, args = jax.jit(step).lower(x, k, dy).compile(), (x, k, dy)

    def run(n: int) -> None:
        out = None
        for _ in range(n):
            out = fn(*args)
        jax.block_until_ready(out)

    return run


def torch_runner(shape: Shape, mode: str, batch: int, dtype: str, device: str) -> Runner:
    """``torch.nn.functional.conv2d(groups=C)`` in channels_last (bf16: autocast on GPU) as a Runner."""
    import torch
    import torch.nn.functional as F

    dev = torch.device(device)
    cl = torch.channels_last
    x_np, k_np, dy_np = _inputs(shape, batch, dtype, 0)
    # GPU bf16 runs as training does (float32 tensors, bf16 autocast); CPU casts the tensors.
    tdtype = torch.bfloat16 if dtype == "bfloat16" and device == "cpu" else torch.float32
    autocast = dtype == "bfloat16" and device != "cpu"
    x = torch.from_numpy(x_np).permute(0, 3, 1, 2).to(dev, tdtype).contiguous(memory_format=cl)
    w = torch.from_numpy(k_np).permute(2, 0, 1)[:, None].to(dev, tdtype).contiguous()
    dy = torch.from_numpy(dy_np).permute(0, 3, 1, 2).to(dev, torch.bfloat16 if autocast else tdtype)
    dy = dy.contiguous(memory_format=cl)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def conv() -> Any:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
            return F.conv2d(x, w, stride=shape.stride, padding=(shape.ph, shape.pw), groups=shape.c)

    if mode == "fwd":
        def once() -> Any:
            with torch.no_grad():
                return conv()
    else:
        x.requires_grad_(True)
        w.requires_grad_(True)

        def once() -> Any:
            return torch.autograd.grad(conv(), (x, w), dy)

    def run(n: int) -> None:
        for _ in range(n):
            once()
        sync()

    return run


def measure(runners: dict[str, Runner], repeats: int, max_seconds: float, target_ms: float, retouch: bool,
            stat: Callable[[list[float]], float]) -> dict[str, Result]:
    """Time the runners interleaved within each repeat; ``stat`` of the repeats, per call.

    The first call of each runner is a warm-up; the second is timed alone and decides how many
    calls one sample holds (about ``target_ms``, at least 1: tiny GPU ops otherwise measure the
    dispatch) and whether the runner exceeds ``max_seconds`` (then that figure is kept and it
    is not repeated). With ``retouch`` (CPU) each timed sample follows an untimed one of the
    same runner: a memory-hungry neighbour (e.g. ``direct``) otherwise slows the next one's
    first touches by up to 1.5x. The process CPU time counts all threads of this process.
    """
    results: dict[str, Result] = {}
    calls: dict[str, int] = {}
    samples: dict[str, tuple[list[float], list[float]]] = {}
    for name, run in runners.items():
        try:
            run(1)
            t0, c0 = time.perf_counter(), time.process_time()
            run(1)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        except Exception as e:  # noqa: BLE001 - reported per cell, the run goes on
            results[name] = Result(status="err", error=_error_text(e))
            continue
        if wall > max_seconds:
            results[name] = Result(wall * 1e3, cpu * 1e3, over_budget=True)
            continue
        calls[name] = max(1, min(1000, int(target_ms / 1e3 / max(wall, 1e-6))))
        samples[name] = ([], [])
    for _ in range(repeats):
        for name in samples:
            n = calls[name]
            if retouch:
                runners[name](n)
            t0, c0 = time.perf_counter(), time.process_time()
            runners[name](n)
            samples[name][0].append((time.perf_counter() - t0) * 1e3 / n)
            samples[name][1].append((time.process_time() - c0) * 1e3 / n)
    for name, (wall, cpu) in samples.items():
        results[name] = Result(stat(wall), stat(cpu))
    return results


# ----------------------------------------------------------------------------- report


@dataclasses.dataclass
class Row:
    """All measurements of one (shape, mode)."""

    shape: Shape
    use: Use
    mode: str
    auto: str
    results: dict[str, Result]

    def flops(self, batch: int) -> float:
        return self.shape.flops(batch) * (3 if self.mode == "fwdbwd" else 1)

    def best(self, impls: Sequence[str], field: str = "wall_ms") -> str | None:
        """Fastest measured JAX implementation (over-budget figures included: they are real)."""
        ok = {i: getattr(self.results[i], field) for i in impls if i in self.results
              and self.results[i].status == "ok"}
        return min(ok, key=ok.get) if ok else None


def _cell(r: Result | None, value: Callable[[Result], float], fmt: str) -> str:
    if r is None or r.status == "n/a":
        return "-"
    if r.status != "ok":
        return r.status
    v = value(r)
    return (fmt.format(v) if math.isfinite(v) else "-") + ("*" if r.over_budget else "")


def _label(use: Use) -> str:
    extra = len(use.models) - 1
    return use.models[0] + (f"+{extra}" if extra else "")


def print_table(title: str, rows: list[Row], cols: list[str], impls: list[str], batch: int,
                value: Callable[[Row, Result], float], fmt: str, ratio_field: str | None) -> None:
    """One wide table: a row per (shape, mode), a column per implementation."""
    print(f"\n{title}")
    head = f"{'models':<22} {'shape':<24} {'mode':<6} {'GFLOP':>8} {'auto->':<8}" + "".join(f"{c:>10}" for c in cols)
    if ratio_field:
        head += f" {'best':>9} {'best/torch':>10}"
    print(head)
    for row in rows:
        line = (f"{_label(row.use):<22} {row.shape.describe(batch):<24} {row.mode:<6} "
                f"{row.flops(batch) / 1e9:8.3f} {row.auto:<8}")
        line += "".join(f"{_cell(row.results.get(c), lambda r: value(row, r), fmt):>10}" for c in cols)
        if ratio_field:
            best = row.best(impls, ratio_field)
            torch_r = row.results.get("torch")
            ratio = "-"
            if best and torch_r is not None and torch_r.status == "ok":
                ratio = f"{getattr(row.results[best], ratio_field) / getattr(torch_r, ratio_field):.2f}"
            line += f" {best or '-':>9} {ratio:>10}"
        print(line, flush=True)


def print_policy(rows: list[Row], impls: list[str], batch: int, field: str) -> None:
    """Per shape and mode: the fastest implementation, auto's pick and its slowdown."""
    print(f"\nfastest implementation vs auto ({'process CPU' if field == 'cpu_ms' else 'wall'} time; "
          "'!' = auto is not the fastest, 'auto/best' = its time over the best)")
    print(f"{'models':<22} {'shape':<24} {'mode':<6} {'fastest':>9} {'auto':>9} {'auto/best':>10}")
    for row in rows:
        best = row.best(impls, field)
        a = row.results.get(row.auto)
        slow = "-"
        if best and a is not None and a.status == "ok":
            slow = f"{getattr(a, field) / getattr(row.results[best], field):.2f}"
        mark = " !" if best and best != row.auto else ""
        print(f"{_label(row.use):<22} {row.shape.describe(batch):<24} {row.mode:<6} {best or '-':>9} "
              f"{row.auto:>9} {slow:>10}{mark}")


def _print_shapes(shapes: list[tuple[Shape, Use]], batch: int) -> None:
    print("\nshapes (models using them; one layer):")
    for shape, use in shapes:
        print(f"  {shape.describe(batch):<24} {', '.join(use.models)}; {use.layer}")


def write_csv(path: str, rows: list[Row], batch: int, dtype: str, peak: float | None) -> None:
    """Long format: one line per (shape, mode, implementation)."""
    fields = ["models", "layer", "n", "h", "w", "c", "kh", "kw", "ph", "pw", "stride", "mode", "dtype", "impl",
              "auto", "status", "over_budget", "wall_ms", "cpu_ms", "gflop", "tflops", "peak_fraction", "error"]
    with open(path, "w", newline="") as f:
        out = csv.DictWriter(f, fields)
        out.writeheader()
        for row in rows:
            s = row.shape
            for impl, r in row.results.items():
                tflops = row.flops(batch) / (r.wall_ms * 1e-3) / 1e12 if r.status == "ok" else math.nan
                out.writerow(dict(models=" ".join(row.use.models), layer=row.use.layer, n=batch * s.images, h=s.h,
                                  w=s.w, c=s.c, kh=s.kh, kw=s.kw, ph=s.ph, pw=s.pw, stride=s.stride, mode=row.mode,
                                  dtype=dtype, impl=impl, auto=row.auto, status=r.status, over_budget=r.over_budget,
                                  wall_ms=r.wall_ms, cpu_ms=r.cpu_ms, gflop=row.flops(batch) / 1e9, tflops=tflops,
                                  peak_fraction=tflops / peak if peak else "", error=r.error))


# ----------------------------------------------------------------------------- main


def _split(spec: str, allowed: Sequence[str], what: str) -> list[str]:
    items = [s.strip() for s in spec.split(",") if s.strip()]
    bad = [s for s in items if s not in allowed]
    if bad or not items:
        raise ValueError(f"--{what} {spec!r}: choose a comma-separated subset of {','.join(allowed)}")
    return items


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default=None,
                    help="comma-separated models, families (slak, convnext, mobilenetv3, cswin), teacher "
                         f"(slak_tiny), student (convnext_tiny) or all; default {CPU_DEFAULT_SHAPES} on CPU, "
                         "all elsewhere")
    ap.add_argument("--impls", default=",".join(IMPLS), help="comma-separated JAX impls (auto: time it too)")
    ap.add_argument("--mode", default="fwd,fwdbwd", help="fwd, fwdbwd or both")
    ap.add_argument("--batch", type=int, default=None, help="input images (default 8 on CPU, 64 elsewhere)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--max-seconds", type=float, default=1.0,
                    help="one call slower than this is measured once and marked '*' (its fwdbwd is skipped)")
    ap.add_argument("--target-ms", type=float, default=20.0, help="approximate length of one timed sample")
    ap.add_argument("--shift-max-taps", type=int, default=13 * 5,
                    help="above this many kernel taps 'shift' is not compiled (its graph grows with the taps)")
    ap.add_argument("--limit", type=int, default=0, help="only the first N shapes (0: all)")
    ap.add_argument("--threads", type=int, default=2, help="PyTorch intra-op threads (CPU)")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch column")
    ap.add_argument("--quick", action="store_true", help="at most 2 repeats and no 'direct'")
    ap.add_argument("--stat", choices=("median", "min"), default="median",
                    help="statistic of the repeats (min: least disturbed run on a busy machine)")
    ap.add_argument("--list", action="store_true", help="print the selected shapes and exit")
    ap.add_argument("--csv", default=None, help="also write every measurement to this CSV file")
    args = ap.parse_args(argv)
    for name in ("batch", "repeats", "limit"):
        v = getattr(args, name)
        if v is not None and (v < 0 or (v == 0 and name != "limit")):
            raise ValueError(f"--{name} must be positive, got {v}")
    if args.max_seconds <= 0 or args.target_ms <= 0:
        raise ValueError("--max-seconds and --target-ms must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        backend = jax.default_backend()
        impls = _split(args.impls, ("auto",) + IMPLS, "impls")
        modes = _split(args.mode, MODES, "mode")
        models = select_models(args.shapes or (CPU_DEFAULT_SHAPES if backend == "cpu" else "all"))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    batch = args.batch or (8 if backend == "cpu" else 64)
    repeats = min(args.repeats, 2) if args.quick else args.repeats
    if args.quick:
        impls = [i for i in impls if i != "direct"] or impls
    stat = statistics.median if args.stat == "median" else min

    torch_device = None
    if not args.no_torch:
        try:
            import torch

            if backend == "cpu":
                torch.set_num_threads(args.threads)
                torch_device = "cpu"
            elif backend == "gpu" and torch.cuda.is_available():
                torch_device = "cuda"
        except ImportError:
            torch = None
    kind = jax.devices()[0].device_kind
    peak = device_peak_tflops(kind, args.dtype) if backend == "gpu" else None
    torch_note = (f"torch {torch.__version__} on {torch_device}" if torch_device else
                  "torch: not importable or no CUDA build (column '-')" if not args.no_torch else "torch: off")
    print(f"jax {jax.__version__} ({backend}: {kind}), {torch_note}, batch {batch}, {args.dtype}, "
          f"{args.stat} of {repeats}, max {args.max_seconds:g} s per call"
          + (f", peak {peak:g} TFLOP/s" if peak else (", peak unknown" if backend == "gpu" else "")))

    shapes = list(zoo_shapes(models).items())
    if args.limit:
        shapes = shapes[: args.limit]
    print(f"{len(shapes)} unique depthwise shapes of {', '.join(models)}", flush=True)
    if args.list:
        _print_shapes(shapes, batch)
        return 0

    rows: list[Row] = []
    for shape, use in shapes:
        auto = chosen_impl("auto", (shape.h, shape.w), (shape.kh, shape.kw), (shape.ph, shape.pw))
        over: set[str] = set()
        for mode in modes:
            runners: dict[str, Runner] = {}
            results: dict[str, Result] = {}
            for impl in impls:
                if impl == "shift" and shape.kh * shape.kw > args.shift_max_taps:
                    results[impl] = Result(status="n/a")
                elif impl in over:
                    results[impl] = Result(status="skip")
                else:
                    try:
                        runners[impl] = jax_runner(shape, impl, mode, batch, args.dtype)
                    except Exception as e:  # noqa: BLE001 - e.g. out of memory while compiling
                        results[impl] = Result(status="err", error=_error_text(e))
            if torch_device:
                if "torch" in over:
                    results["torch"] = Result(status="skip")
                else:
                    try:
                        runners["torch"] = torch_runner(shape, mode, batch, args.dtype, torch_device)
                    except Exception as e:  # noqa: BLE001 - e.g. CUDA out of memory
                        results["torch"] = Result(status="err", error=_error_text(e))
            results.update(measure(runners, repeats, args.max_seconds, args.target_ms, backend == "cpu", stat))
            over |= {k for k, r in results.items() if r.over_budget}
            row = Row(shape, use, mode, auto, {k: results[k] for k in [*impls, "torch"] if k in results})
            rows.append(row)
            done = " ".join(f"{k}={_cell(r, lambda r: r.wall_ms, '{:.2f}')}" for k, r in row.results.items())
            print(f"  {shape.describe(batch):<24} {mode:<6} ms: {done}", flush=True)

    cols = impls + (["torch"] if torch_device else [])
    print_table("wall-clock ms per call ('*': one call, over --max-seconds; 'skip': fwd was over; "
                "'-': not run)", rows, cols, impls, batch, lambda row, r: r.wall_ms, "{:.2f}", "wall_ms")
    unit, scale = ("TFLOP/s", 1e12) if backend != "cpu" else ("GFLOP/s", 1e9)
    print_table(f"{unit} (useful FLOPs / wall time)", rows, cols, impls, batch,
                lambda row, r: row.flops(batch) / (r.wall_ms * 1e-3) / scale, "{:.1f}" if backend == "cpu" else "{:.2f}",
                None)
    if backend == "gpu":
        if peak:
            print_table(f"% of the {kind} dense {args.dtype} peak ({peak:g} TFLOP/s)", rows, cols, impls, batch,
                        lambda row, r: 100 * row.flops(batch) / (r.wall_ms * 1e-3) / (peak * 1e12), "{:.2f}", None)
        else:
            print(f"\n% of peak: '-' (no peak known for device kind {kind!r}; add it to l2s_jax/flops.py PEAK_TFLOPS)")
    if backend == "cpu":
        print_table("process CPU ms per call (all threads; steadier on a shared machine)", rows, cols, impls, batch,
                    lambda row, r: r.cpu_ms, "{:.2f}", "cpu_ms")
    print_policy(rows, impls, batch, "cpu_ms" if backend == "cpu" else "wall_ms")

    _print_shapes(shapes, batch)
    errors = [(row, k, r) for row in rows for k, r in row.results.items() if r.status == "err"]
    for row, k, r in errors:
        print(f"err {row.shape.describe(batch)} {row.mode} {k}: {r.error}")
    if args.csv:
        write_csv(args.csv, rows, batch, args.dtype, peak)
        print(f"wrote {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
