"""Effective receptive fields (paper Section 5.1, Figure 1) of converted checkpoints or zoo models.

    python tools/erf.py --checkpoint supervised=ckpt/convnext_t l2s_slak=ckpt/convnext_t_l2s \\
        --data /data/imagenet/val --num-images 50 --size 1024 --out erf_out
    python tools/erf.py --model slak_tiny convnext_tiny_bn --data demo --num-images 4 --size 256 --out /tmp/erf
    python tools/erf.py --notebook --checkpoint ... --data imagenet2012 --out erf_out   # the notebook, headless

For each model: the mean over the images of ``sum_channels ReLU(d/dx sum_c ReLU(F_centre))``
with ``F`` the last feature map (the authors' ``visualize_erf.py``), saved as ``<name>.npy``
(float32, like the authors' matrices); the high-contribution area ratios at t = 0.2, 0.3, 0.5,
0.99 (printed, ``erf_areas.json``, ``erf_areas.csv``) and a Figure-1-style ``erf.png``.

``--data`` is an image folder (all images under it, in ImageFolder order: pass ``IMAGENET/val``),
a dataset name (``imagenet2012``, ``demo``, ...; ``--data-dir`` is the TFDS root) or ``random``.
``--notebook`` executes ``notebooks/erf_probing.ipynb`` (or the given notebook) with these
settings and writes the executed notebook and its outputs to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

from l2s_jax import host_memory
from l2s_jax.cli import parse_named_dirs

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_NOTEBOOK = REPO_ROOT / "notebooks" / "erf_probing.ipynb"


def check_checkpoint_dirs(dirs: dict[str, str]) -> None:
    """Fail early, before reading images, on a missing or unconverted checkpoint folder."""
    for name, path in dirs.items():
        if not Path(path).is_dir():
            raise FileNotFoundError(f"checkpoint {name!r}: directory {path} does not exist")
        if not (Path(path) / "spec.json").is_file():
            raise FileNotFoundError(
                f"checkpoint {name!r}: {path} has no spec.json, so it is not a converted checkpoint. Convert "
                "PyTorch weights first: python tools/convert_weights.py --arch ARCH --src FILE --out DIR"
            )


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``NAME=JSON`` constructor overrides for ``--model``."""
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--override expects NAME=JSON, got {item!r}")
        out[name] = json.loads(value)
    return out


def model_loaders(args: argparse.Namespace) -> dict[str, Callable[[], Any]]:
    """Zero-argument loaders, one per requested model, in command-line order."""
    from l2s_jax.models import create, list_models, load_pretrained
    from l2s_jax.models.policy import Policy

    policy = Policy(depthwise_impl=args.depthwise_impl)
    loaders: dict[str, Callable[[], Any]] = {}
    for name, path in parse_named_dirs(args.checkpoint).items():
        loaders[name] = lambda path=path: load_pretrained(path, policy=policy)
    overrides = parse_overrides(args.override)
    for name in args.model:
        if name not in list_models():
            raise KeyError(f"unknown model {name!r}; known: {', '.join(list_models())}")
        if name in loaders:
            raise ValueError(f"{name!r} is both a checkpoint name and a --model")
        loaders[name] = lambda name=name: create(name, seed=args.seed, policy=policy, **overrides)
    return loaders


def run_probe(args: argparse.Namespace) -> int:
    """Compute, print and write the ERFs of every requested model."""
    from l2s_jax import erf

    if not args.checkpoint and not args.model:
        raise ValueError("give at least one --checkpoint DIR or --model NAME")
    if args.data is None:
        raise ValueError("--data is required: an image folder, a dataset name (imagenet2012, demo, ...) or 'random'")
    check_checkpoint_dirs(parse_named_dirs(args.checkpoint))
    loaders = model_loaders(args)
    start = time.time()
    images = erf.load_erf_images(args.data, args.num_images, size=args.size, data_dir=args.data_dir,
                                 split=args.split, sample=args.sample, seed=args.seed)
    print(f"{len(images)} images from {args.data} resized to {args.size}x{args.size} ({time.time() - start:.1f}s)")
    maps, info = {}, {}
    for name, loader in loaders.items():
        start = time.time()
        result = erf.compute_erfs({name: loader}, images, batch_size=args.batch_size, progress=True)[name]
        maps[name] = result.reduce("mean")
        info[name] = {"images_used": result.num_used, "images_skipped_non_finite": result.num_skipped,
                      "seconds": round(time.time() - start, 2)}
        skipped = f", {result.num_skipped} skipped (non-finite)" if result.num_skipped else ""
        print(f"{name}: {result.num_used} images{skipped}, {info[name]['seconds']}s")
    metadata = {
        "data": os.fspath(args.data), "split": args.split, "num_images": args.num_images, "size": args.size,
        "sample": args.sample, "seed": args.seed, "reduction": "mean", "authors_compat": args.authors_compat,
        "checkpoints": parse_named_dirs(args.checkpoint), "random_init_models": list(args.model),
        "per_model": info,
    }
    paths = erf.write_outputs(maps, args.out, authors_compat=args.authors_compat, metadata=metadata)
    print(erf.format_table(erf.area_rows(maps, authors_compat=args.authors_compat)))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def run_as_notebook(args: argparse.Namespace) -> int:
    """Execute the ERF notebook headless with the command-line settings as its parameters."""
    from l2s_jax.erf import run_notebook

    if args.model:
        raise ValueError("--model is not a notebook parameter; the notebook's demonstration models are used "
                         "when no --checkpoint is given")
    checkpoints = parse_named_dirs(args.checkpoint)
    check_checkpoint_dirs(checkpoints)
    out = Path(args.out).resolve()
    parameters: dict[str, Any] = {
        "checkpoints": {k: str(Path(v).resolve()) for k, v in checkpoints.items()},
        "num_images": args.num_images, "size": args.size, "batch_size": args.batch_size,
        "sample": args.sample, "seed": args.seed, "out_dir": str(out), "depthwise_impl": args.depthwise_impl,
        "data_dir": None if args.data_dir is None else str(Path(args.data_dir).resolve()), "split": args.split,
    }
    if args.data is not None:
        parameters["data"] = str(Path(args.data).resolve()) if os.path.isdir(args.data) else args.data
    notebook = Path(args.notebook)
    executed = run_notebook(notebook, parameters, out / notebook.name, timeout=args.timeout)
    print(f"executed {notebook} -> {executed}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", nargs="+", action="extend", default=[], metavar="[NAME=]DIR",
                        help="converted checkpoint folder(s) (tools/convert_weights.py); NAME labels the output")
    parser.add_argument("--model", nargs="+", action="extend", default=[], metavar="NAME",
                        help="randomly initialised zoo model(s), e.g. slak_tiny convnext_tiny_bn")
    parser.add_argument("--override", action="append", default=[], metavar="NAME=JSON",
                        help="constructor argument for the --model models, e.g. --override img_size=256")
    parser.add_argument("--data", default=None, help="image folder, dataset name (imagenet2012, demo, ...) or 'random'")
    parser.add_argument("--data-dir", default=None,
                        help="TFDS data directory (default $TFDS_DATA_DIR or ~/tensorflow_datasets)")
    parser.add_argument("--split", default=None, help="dataset split (default: the evaluation split)")
    parser.add_argument("--num-images", type=int, default=50, help="images to average over (paper: 50)")
    parser.add_argument("--size", type=int, default=1024, help="images are resized to SIZE x SIZE (paper: 1024)")
    parser.add_argument("--sample", choices=("first", "random"), default="first",
                        help="first N images in order (the authors' loader) or a seeded random subset")
    parser.add_argument("--seed", type=int, default=0, help="seed for --sample random, 'random' data and --model init")
    parser.add_argument("--batch-size", type=int, default=1, help="images per jitted gradient step")
    parser.add_argument("--depthwise-impl", default="auto",
                        choices=("auto", "direct", "fft", "dft", "shift", "toeplitz"),
                        help="depthwise convolution implementation (see l2s_jax.ops.depthwise)")
    parser.add_argument("--authors-compat", action="store_true",
                        help="area ratio as the authors compute it: (side / 1024)^2 whatever the map size")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--notebook", nargs="?", const=str(DEFAULT_NOTEBOOK), default=None, metavar="PATH",
                        help=f"execute the notebook (default {DEFAULT_NOTEBOOK.relative_to(REPO_ROOT)}) instead")
    parser.add_argument("--timeout", type=int, default=3600, help="per-cell timeout in seconds for --notebook")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (2 on a usage, data or checkpoint error)."""
    from tqdm import tqdm

    args = build_parser().parse_args(argv)
    from l2s_jax import compile_cache

    compile_cache.enable()
    try:
        with warnings.catch_warnings():
            # One line per warning, on its own line even under a running progress bar.
            warnings.showwarning = lambda message, *_, **__: tqdm.write(f"warning: {message}", file=sys.stderr)
            return run_as_notebook(args) if args.notebook else run_probe(args)
    except (ValueError, KeyError, FileNotFoundError) as e:
        print(f"error: {e.args[0] if isinstance(e, KeyError) and e.args else e}", file=sys.stderr)
        return 2


def cli() -> int:
    """The console entry point: :func:`main` in a process with the tuned host malloc (:mod:`l2s_jax.host_memory`)."""
    host_memory.reexec_tuned()
    return main()


if __name__ == "__main__":
    sys.exit(cli())
