"""Throughput of the train input pipeline (grain) by worker count, next to a PyTorch DataLoader.

Reads a class-per-folder tree (``--data DIR`` with ``DIR/train/<class>/*.JPEG``) or first writes
``--synthetic-jpegs N`` ImageNet-like JPEGs (400-500 x 333-375 px, quality 90) to a temporary
tree, then times the full train transform (PIL decode -> RandomResizedCrop 224 -> flip ->
RandAugment rand-m9-mstd0.5-inc1 -> normalise -> RandomErasing 0.25) at each worker count::

    python tools/benchmark_input.py --synthetic-jpegs 512 --workers 0,1,2 --batches 10

The PyTorch side is ``torch.utils.data.DataLoader`` over a ``Dataset`` doing the same PIL decode
and the same :class:`~l2s_jax.data.transforms.TrainTransform` (torchvision is not required), so
the two columns differ only in how the loaders parallelise and move batches. "first batch" is
the time to the first batch (worker start-up included); "images/s" is measured over the
following ``--batches`` batches.
"""

from __future__ import annotations

import argparse
import os
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
from l2s_jax.data.sources import ImageFolderSource, decode_image  # noqa: E402
from l2s_jax.data.transforms import TrainTransform  # noqa: E402


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


def time_loader(batches: Iterator, count: int, batch_size: int) -> tuple[float, float]:
    """(seconds to the first batch, images/s over the next ``count`` batches)."""
    start = time.perf_counter()
    next(batches)
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(count):
        next(batches)
    return first, count * batch_size / (time.perf_counter() - start)


def bench_grain(root: str, args: argparse.Namespace, workers: int) -> tuple[float, float]:
    """Time :func:`pipeline.create_train_iterator` with ``workers`` worker processes."""
    data_cfg, aug_cfg = configs(root, args, workers)
    iterator = pipeline.create_train_iterator(data_cfg, aug_cfg, global_batch_size=args.batch_size, seed=args.seed)
    try:
        return time_loader(iterator, args.batches, args.batch_size)
    finally:
        if hasattr(iterator, "close"):
            iterator.close()


class TorchFolderDataset:
    """Map-style dataset for torch: PIL decode + TrainTransform with a per-index generator."""

    def __init__(self, root: str, transform: TrainTransform, seed: int):
        self.folder = ImageFolderSource.scan(Path(root) / "train")
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        record = self.folder[index]
        rng = np.random.default_rng([self.seed, index])
        return self.transform(decode_image(record["image"]), rng), record["label"]


def bench_torch(root: str, args: argparse.Namespace, workers: int) -> tuple[float, float]:
    """Time a torch DataLoader over :class:`TorchFolderDataset`.

    Workers are spawned, like grain's: forking a process that has imported JAX can deadlock
    (jax#18852), and a JAX trainer's loader would have to spawn too.
    """
    import torch
    from torch.utils.data import DataLoader

    data_cfg, aug_cfg = configs(root, args, workers)
    loader = DataLoader(
        TorchFolderDataset(root, pipeline.train_transform(data_cfg, aug_cfg), args.seed),
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        prefetch_factor=2 if workers else None,
        multiprocessing_context="spawn" if workers else None,
        generator=torch.Generator().manual_seed(args.seed),
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
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--auto-augment", default="rand-m9-mstd0.5-inc1", help="'' disables RandAugment")
    parser.add_argument("--reprob", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch DataLoader column")
    args = parser.parse_args(argv)
    if not args.data and args.synthetic_jpegs <= 0:
        args.synthetic_jpegs = 512
    return args


def main(argv: list[str] | None = None) -> int:
    """Run every configuration and print the table."""
    args = parse_args(argv)
    workers = [int(w) for w in args.workers.split(",")]
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
                    "* torch DataLoader (spawned workers, default collation) over a Dataset doing PIL "
                    "decode + the same TrainTransform (torchvision not used): only the loader "
                    "parallelism differs."
                )
            except ImportError:
                torch_note = "torch not installed: PyTorch column skipped."
        rows = []
        for name, bench in loaders:
            for w in workers:
                first, rate = bench(root, args, w)
                rows.append((name, w, first, rate))
                print(f"  {name:34s} workers={w}: first batch {first:6.2f}s, {rate:8.1f} images/s", flush=True)
        print()
        print(
            f"Train pipeline, {args.image_size}px, batch {args.batch_size}, {args.batches} timed batches, "
            f"RandAugment={args.auto_augment or 'off'}, reprob={args.reprob}, {os.cpu_count()} CPUs"
        )
        print(f"| {'loader':34s} | workers | first batch (s) | images/s |")
        print(f"|{'-' * 36}|---------|-----------------|----------|")
        for name, w, first, rate in rows:
            print(f"| {name:34s} | {w:7d} | {first:15.2f} | {rate:8.1f} |")
        if torch_note:
            print(torch_note)
        return 0
    finally:
        if temp_dir:
            shutil.rmtree(temp_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
