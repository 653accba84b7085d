"""Throughput of the train input pipeline (grain) by worker count, next to a PyTorch DataLoader.

Reads a class-per-folder tree (``--data DIR`` with ``DIR/train/<class>/*.JPEG``) or first writes
``--synthetic-jpegs N`` ImageNet-like JPEGs (400-500 x 333-375 px, quality 90) to a temporary
tree, then times the full train transform (PIL decode -> RandomResizedCrop 224 -> flip ->
RandAugment rand-m9-mstd0.5-inc1 -> normalise -> RandomErasing 0.25) at each worker count::

    python tools/benchmark_input.py --synthetic-jpegs 512 --workers 0,1,2 --batches 10

The PyTorch side is ``torch.utils.data.DataLoader`` over a ``Dataset`` whose item ``i`` is
element ``i`` of grain's unbatched stream (:func:`l2s_jax.data.pipeline.train_examples`: the
same PIL decode, :class:`~l2s_jax.data.transforms.TrainTransform` and per-image generator;
torchvision is not required), so both loaders yield the same batches from identical work and
differ only in how they parallelise and move batches. "first batch" is
the time to the first batch (worker start-up included); the rates are measured over the
following ``--batches`` batches, ``--rounds`` times with grain and torch alternating (median):

* images/s: wall clock;
* per core: images/s divided by the cores the loader occupies, ``max(1, workers)`` (workers=0
  runs the transform in the training process: one core);
* per CPU-s: images per second of CPU time used by the loader's process tree (main process and
  workers, via psutil), the per-core efficiency that stays meaningful on a shared machine.

The issue's criterion is grain/torch >= 1.0 per core at every worker count on a quiet machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import ml_collections
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from l2s_jax.data import pipeline  # noqa: E402
from l2s_jax.data.sources import ImageFolderSource  # noqa: E402


def write_synthetic_jpegs(root: Path, count: int, num_classes: int = 10, seed: int = 0) -> None:
    """``count`` JPEGs of ImageNet-like sizes and content statistics under ``root/train/<class>/``."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        width = int(rng.integers(400, 501))
        height = int(rng.integers(333, 376))
        if rng.random() < 0.2:
            width, height = height, width
        coarse = rng.integers(0, 256, size=(height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
        smooth = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
        pixels = np.asarray(smooth, np.int16) + rng.integers(-24, 25, size=(height, width, 3), dtype=np.int16)
        out = root / "train" / f"class_{i % num_classes:03d}" / f"img_{i:06d}.JPEG"
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out, format="JPEG", quality=90)


def configs(root: str, args: argparse.Namespace, workers: int) -> tuple[ml_collections.ConfigDict, ml_collections.ConfigDict]:
    """Data and augmentation configs of the paper's ImageNet recipe on a folder dataset."""
    data_cfg = ml_collections.ConfigDict(
        dict(name="folder", data_dir=root, image_size=args.image_size, num_workers=workers, prefetch=2)
    )
    aug_cfg = ml_collections.ConfigDict(
        dict(
            rrc_scale=(0.08, 1.0),
            rrc_ratio=(3 / 4, 4 / 3),
            hflip=0.5,
            auto_augment=args.auto_augment or None,
            reprob=args.reprob,
            remode="pixel",
            interpolation="bicubic",
        )
    )
    return data_cfg, aug_cfg


@dataclasses.dataclass(frozen=True)
class Timing:
    """One loader run: seconds to the first batch, wall images/s, images per CPU-second (nan: no psutil)."""

    first: float
    rate: float
    per_cpu_s: float


def _tree_cpu_seconds() -> float:
    """User + system CPU seconds of this process and its live descendants (nan without psutil)."""
    try:
        import psutil
    except ImportError:
        return float("nan")
    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.Error:  # exited meanwhile
            pass
    return total


def time_loader(batches: Iterator, count: int, batch_size: int) -> Timing:
    """Time to the first batch, then wall and CPU rates over the next ``count`` batches."""
    start = time.perf_counter()
    next(batches)
    first = time.perf_counter() - start
    start, cpu = time.perf_counter(), _tree_cpu_seconds()
    for _ in range(count):
        next(batches)
    wall, cpu = time.perf_counter() - start, _tree_cpu_seconds() - cpu
    return Timing(first, count * batch_size / wall, count * batch_size / cpu)


def bench_grain(root: str, args: argparse.Namespace, workers: int) -> Timing:
    """Time :func:`pipeline.create_train_iterator` with ``workers`` worker processes."""
    data_cfg, aug_cfg = configs(root, args, workers)
    iterator = pipeline.create_train_iterator(data_cfg, aug_cfg, global_batch_size=args.batch_size, seed=args.seed)
    try:
        return time_loader(iterator, args.batches, args.batch_size)
    finally:
        if hasattr(iterator, "close"):
            iterator.close()


class TorchExamples:
    """Map-style dataset for torch over grain's own unbatched train stream.

    Item ``i`` is element ``i`` of :func:`pipeline.train_examples` (decode + TrainTransform
    with that element's generator), so with ``shuffle=False`` the DataLoader yields exactly
    grain's batches: both loaders do identical work and differ only in how they parallelise
    and move batches.
    """

    def __init__(self, root: str, args: argparse.Namespace, workers: int, epochs: int = 1000):
        data_cfg, aug_cfg = configs(root, args, workers)
        self.examples = pipeline.train_examples(data_cfg, aug_cfg, seed=args.seed, process_index=0, process_count=1)
        self.length = epochs * len(ImageFolderSource.scan(Path(root) / "train"))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.int32]:
        example = self.examples[index]
        return example["images"], example["labels"]


def bench_torch(root: str, args: argparse.Namespace, workers: int) -> Timing:
    """Time a torch DataLoader over :class:`TorchExamples`.

    Workers are spawned, like grain's: forking a process that has imported JAX can deadlock
    (jax#18852), and a JAX trainer's loader would have to spawn too. They persist across
    epochs, as a training loop keeps them (and as grain's, which never re-start).
    """
    from torch.utils.data import DataLoader

    loader = DataLoader(
        TorchExamples(root, args, workers),
        batch_size=args.batch_size,
        shuffle=False,  # the stream is grain's, already shuffled
        drop_last=True,
        num_workers=workers,
        prefetch_factor=2 if workers else None,
        multiprocessing_context="spawn" if workers else None,
        persistent_workers=bool(workers),  # as a training loop runs it: no re-spawn every epoch
    )

    def forever() -> Iterator:
        while True:
            yield from loader

    return time_loader(forever(), args.batches, args.batch_size)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--data", help="dataset root holding train/<class>/<image>")
    source.add_argument("--synthetic-jpegs", type=int, default=0, help="write N ImageNet-sized JPEGs to a temp tree")
    parser.add_argument("--workers", default="0,1,2", help="comma-separated worker counts")
    parser.add_argument("--batches", type=int, default=10, help="timed batches per configuration")
    parser.add_argument("--rounds", type=int, default=2, help="runs per configuration, loaders alternating")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--auto-augment", default="rand-m9-mstd0.5-inc1", help="'' disables RandAugment")
    parser.add_argument("--reprob", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch DataLoader column")
    args = parser.parse_args(argv)
    if not args.data and args.synthetic_jpegs <= 0:
        args.synthetic_jpegs = 512
    try:
        args.worker_counts = [int(w) for w in args.workers.split(",") if w.strip()]
    except ValueError:
        args.worker_counts = []
    if not args.worker_counts or min(args.worker_counts) < 0:
        raise ValueError(f"--workers {args.workers!r}: give comma-separated counts >= 0, e.g. 0,1,2")
    for name in ("batches", "rounds", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.data and not (Path(args.data) / "train").is_dir():
        raise ValueError(f"--data {args.data}: no train/ folder there (expected DIR/train/<class>/<image>)")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run every configuration and print the table."""
    try:
        args = parse_args(argv)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    workers = args.worker_counts
    temp_dir = None
    try:
        if args.data:
            root = args.data
        else:
            temp_dir = tempfile.mkdtemp(prefix="l2s_bench_")
            start = time.perf_counter()
            write_synthetic_jpegs(Path(temp_dir), args.synthetic_jpegs, seed=args.seed)
            print(f"wrote {args.synthetic_jpegs} JPEGs to {temp_dir} in {time.perf_counter() - start:.1f}s")
            root = temp_dir
        loaders: list[tuple[str, Callable]] = [("grain (l2s_jax.data.pipeline)", bench_grain)]
        torch_note = ""
        if not args.no_torch:
            try:
                import torch

                loaders.append((f"torch {torch.__version__} DataLoader*", bench_torch))
                torch_note = (
                    "* torch DataLoader (spawned persistent workers, default collation) over a Dataset "
                    "of grain's unbatched examples (same decode, transform and generators, same "
                    "batches; torchvision not used): only the loader parallelism differs."
                )
            except ImportError:
                torch_note = "torch not installed: PyTorch column skipped."
        runs: dict[tuple[str, int], list[Timing]] = {}
        for w in workers:
            for _ in range(args.rounds):
                for name, bench in loaders:
                    t = bench(root, args, w)
                    runs.setdefault((name, w), []).append(t)
                    print(f"  {name:34s} workers={w}: first batch {t.first:6.2f}s, {t.rate:8.1f} images/s, "
                          f"{t.per_cpu_s:8.1f} images/CPU-s", flush=True)
        print()
        print(
            f"Train pipeline, {args.image_size}px, batch {args.batch_size}, {args.batches} timed batches, "
            f"median of {args.rounds} rounds, RandAugment={args.auto_augment or 'off'}, reprob={args.reprob}, "
            f"{os.cpu_count()} CPUs"
        )
        print(f"| {'loader':34s} | workers | first batch (s) | images/s | per core | per CPU-s |")
        print(f"|{'-' * 36}|---------|-----------------|----------|----------|-----------|")
        med: dict[tuple[str, int], Timing] = {}
        for (name, w), ts in runs.items():
            med[name, w] = Timing(*(statistics.median(getattr(t, f) for t in ts) for f in ("first", "rate", "per_cpu_s")))
        for name, _ in loaders:
            for w in workers:
                t = med[name, w]
                print(f"| {name:34s} | {w:7d} | {t.first:15.2f} | {t.rate:8.1f} | {t.rate / max(1, w):8.1f} "
                      f"| {t.per_cpu_s:9.1f} |")
        if len(loaders) == 2:
            g, tr = loaders[0][0], loaders[1][0]
            print()
            print("| workers | cores | grain/torch images/s per core | grain/torch images per CPU-s |")
            print("|---------|-------|-------------------------------|------------------------------|")
            for w in workers:
                print(f"| {w:7d} | {max(1, w):5d} | {med[g, w].rate / med[tr, w].rate:29.2f} "
                      f"| {med[g, w].per_cpu_s / med[tr, w].per_cpu_s:28.2f} |")
        if torch_note:
            print(torch_note)
        return 0
    finally:
        if temp_dir:
            shutil.rmtree(temp_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
