"""Benchmark ERF probing per image: our JAX probe, the previous JAX path and the authors' PyTorch method.

    python tools/benchmark_erf.py [--models slak_tiny,convnext_tiny,convnext_tiny_bn] [--size 1024]
        [--images 2] [--batch-size 1] [--rounds 1] [--no-baseline] [--no-torch]

Per model and image size, one table row with seconds per image of:

* JAX: :class:`l2s_jax.erf.ContributionProbe` as ``tools/erf.py`` runs it (fused eval view,
  CPU compiler options). "compile s" is lower + XLA compile of its step, reported separately.
* JAX before (``--no-baseline`` drops it): the same probe with ``fast=False``, i.e. the model's
  own (unfused) layers and default compiler options, the path before the speed-up.
* PyTorch: the authors' ``visualize_erf.py`` method (``torch.autograd.grad`` of the summed ReLU
  of the last map's centre w.r.t. the images, ReLU, sum over batch and channels) on
  :mod:`l2s_jax.reference.torch_slak` in eval mode, NCHW as in their script. ConvNeXt-T is that
  class with 7x7 kernels and no BatchNorm (the depthwise bias is left out: no effect on speed).

Models are randomly initialised (speed does not depend on the weights); images are seeded
uniform noise. Each (framework, model) runs in its own child process; ``--rounds N``
alternates N child processes per framework and keeps the fastest of each (the machine may be
shared). The per-image figure is the median over ``--images`` images (``--batch-size`` per
step). "speed-up" is JAX before / JAX; "JAX/torch" is PyTorch s/img over JAX s/img (above 1:
JAX is faster).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from l2s_jax.benchmarking import run_child  # noqa: E402

FRAMEWORKS = ("jax", "jax_before", "torch")


def _images(count: int, size: int):
    """Seeded normalised float32 NHWC images (as the probe receives them)."""
    from l2s_jax import erf

    return erf.normalize_images(erf.load_erf_images("random", count, size=size))


def _batches(count: int, batch: int) -> list[tuple[int, int]]:
    return [(s, min(s + batch, count)) for s in range(0, count, batch)]


def run_jax(model_name: str, size: int, count: int, batch: int, fast: bool) -> dict:
    """Compile the probe's step once, then time it per batch of images."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from l2s_jax import erf
    from l2s_jax.models import create

    images = _images(count, size)
    model = create(model_name, seed=0)
    probe = erf.ContributionProbe(model, batch_size=batch, fast=fast)
    x = jnp.zeros((batch, size, size, 3), jnp.float32)
    valid = jnp.ones((batch,), bool)
    start = time.perf_counter()
    compiled = probe.step_fn.lower(probe._graphdef, probe.feature_index, probe._state, x, valid).compile()
    compile_s = time.perf_counter() - start
    per_image = []
    for lo, hi in _batches(count, batch):
        chunk = np.zeros((batch, size, size, 3), np.float32)
        chunk[: hi - lo] = images[lo:hi]
        mask = jnp.arange(batch) < hi - lo
        start = time.perf_counter()
        jax.device_get(compiled(probe._state, jnp.asarray(chunk), mask))
        per_image.append((time.perf_counter() - start) / (hi - lo))
    return {"s_per_image": statistics.median(per_image), "compile_s": compile_s,
            "device": jax.devices()[0].platform}


def _torch_model(model_name: str):
    """The reference SLaK class configured as ``model_name`` (ConvNeXt-T: 7x7 kernels, no BN)."""
    from l2s_jax.models import registry
    from l2s_jax.reference.torch_slak import SLaK

    family, kwargs = registry.MODELS[model_name]
    kwargs = {k: v for k, v in kwargs.items() if k not in ("sparse", "drop_path_rate")}
    if family == "convnext":
        kwargs.update(kernel_size=(7, 7, 7, 7, 100), decompose=False, bn=False)
    elif family != "slak":
        raise ValueError(f"no PyTorch reference for {model_name!r} (family {family}); use a SLaK or ConvNeXt model")
    return SLaK(**kwargs)


def run_torch(model_name: str, size: int, count: int, batch: int) -> dict:
    """The authors' input-gradient ERF step in PyTorch eager (their visualize_erf.py)."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = _torch_model(model_name).to(device).eval()
    images = torch.from_numpy(_images(count, size)).permute(0, 3, 1, 2).contiguous()

    def step(samples: torch.Tensor) -> torch.Tensor:
        samples = samples.to(device).requires_grad_(True)
        out = model.features(samples)[-1]
        h, w = out.shape[2:]
        central = torch.nn.functional.relu(out[:, :, h // 2, w // 2]).sum()
        grad = torch.autograd.grad(central, samples)[0]
        return torch.nn.functional.relu(grad).sum((0, 1)).cpu()

    per_image = []
    first_s = None
    for lo, hi in _batches(count, batch):
        start = time.perf_counter()
        step(images[lo:hi])
        elapsed = time.perf_counter() - start
        first_s = elapsed if first_s is None else first_s
        per_image.append(elapsed / (hi - lo))
    return {"s_per_image": statistics.median(per_image), "compile_s": first_s, "device": device.type}


def _child(framework: str, model: str, args: argparse.Namespace) -> dict | str:
    cmd = [sys.executable, __file__, "--child", framework, "--models", model, "--size", str(args.size),
           "--images", str(args.images), "--batch-size", str(args.batch_size)]
    return run_child(cmd)


def _best(results: list[dict | str]) -> dict | str:
    ok = [r for r in results if isinstance(r, dict)]
    return min(ok, key=lambda r: r["s_per_image"]) if ok else results[-1]


def _cell(result: dict | str | None, width: int, key: str = "s_per_image", fmt: str = ".2f") -> str:
    if result is None:
        return f"{'-':>{width}}"
    if isinstance(result, str):
        return f"{result[:width]:>{width}}"
    return f"{result[key]:>{width}{fmt}}"


def _ratio(num: dict | str | None, den: dict | str | None, width: int) -> str:
    if isinstance(num, dict) and isinstance(den, dict):
        return f"{num['s_per_image'] / den['s_per_image']:>{width}.2f}"
    return f"{'-':>{width}}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="slak_tiny,convnext_tiny", help="comma-separated zoo model names")
    parser.add_argument("--size", type=int, default=1024, help="images are SIZE x SIZE (paper: 1024)")
    parser.add_argument("--images", type=int, default=2, help="timed images per child process")
    parser.add_argument("--batch-size", type=int, default=1, help="images per gradient step")
    parser.add_argument("--rounds", type=int, default=1, help="child processes per framework and model; best kept")
    parser.add_argument("--no-baseline", action="store_true", help="skip the 'JAX before' (fast=False) column")
    parser.add_argument("--no-torch", action="store_true", help="skip PyTorch")
    parser.add_argument("--child", choices=FRAMEWORKS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    from l2s_jax.models import registry

    args.model_list = [m for m in args.models.split(",") if m]
    for name in args.model_list:
        if name not in registry.MODELS or registry.MODELS[name][0] not in ("slak", "convnext"):
            parser.exit(2, f"error: --models: {name!r} is not a SLaK or ConvNeXt zoo model "
                           f"(e.g. slak_tiny, convnext_tiny, convnext_tiny_bn)\n")
    for flag in ("size", "images", "batch_size", "rounds"):
        if getattr(args, flag) < 1:
            parser.exit(2, f"error: --{flag.replace('_', '-')} must be a positive integer\n")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        model = args.model_list[0]
        if args.child == "torch":
            result = run_torch(model, args.size, args.images, args.batch_size)
        else:
            result = run_jax(model, args.size, args.images, args.batch_size, fast=args.child == "jax")
        print(json.dumps(result), flush=True)
        return 0
    frameworks = ["jax"]
    if not args.no_baseline:
        frameworks.append("jax_before")
    if not args.no_torch and importlib.util.find_spec("torch") is not None:
        frameworks.append("torch")
    head = f"{'model':<18}{'size':>6} | {'JAX s/img':>10}{'compile s':>10}"
    if "jax_before" in frameworks:
        head += f" | {'before s/img':>12}{'compile s':>10}{'speed-up':>9}"
    if "torch" in frameworks:
        head += f" | {'torch s/img':>11}{'JAX/torch':>10}"
    print(head)
    print("-" * len(head), flush=True)
    device = "?"
    for model in args.model_list:
        runs: dict[str, list] = {fw: [] for fw in frameworks}
        for _ in range(args.rounds):
            for fw in frameworks:
                runs[fw].append(_child(fw, model, args))
        best = {fw: _best(r) for fw, r in runs.items()}
        j = best["jax"]
        device = j["device"] if isinstance(j, dict) else device
        row = f"{model:<18}{args.size:>6} | {_cell(j, 10)}{_cell(j, 10, 'compile_s', '.1f')}"
        if "jax_before" in best:
            b = best["jax_before"]
            row += f" | {_cell(b, 12)}{_cell(b, 10, 'compile_s', '.1f')}{_ratio(b, j, 9)}"
        if "torch" in best:
            row += f" | {_cell(best['torch'], 11)}{_ratio(best['torch'], j, 10)}"
        print(row, flush=True)
    print(f"\n(JAX on {device}; median over {args.images} image(s), batch {args.batch_size}; best of {args.rounds} "
          f"round(s); compile = lower + XLA compile; JAX before = ContributionProbe(fast=False); PyTorch eager, "
          f"NCHW, the authors' autograd.grad method)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
