"""The host input pipeline: sources -> grain -> per-image transforms -> process-local batches.

Train (:func:`create_train_iterator`)::

    MapDataset.source(records).seed(seed)   # records: {"image": bytes | uint8 array, "label"}
      .shuffle().repeat()                   # global shuffle, reshuffled every epoch, infinite
      .random_map(decode + TrainTransform)  # element RNG from (seed, global position): resumable
      [process_index::process_count]        # disjoint, covering shards of every global batch
      .batch(local_batch, drop_remainder=True)
      .to_iter_dataset(ReadOptions) [.mp_prefetch(num_workers)]

Batches are elements of the ``MapDataset`` and augmentation randomness depends only on (seed,
position in the global stream), so the batches are the same for any ``num_workers`` and any
thread count; the iterator's ``get_state()`` / ``set_state()`` resume exactly (a state saved
with ``num_workers=W`` must be restored into an iterator with the same W).

Eval (:func:`create_eval_iterator`): one pass in index order; step ``s`` covers global indices
``[s * G, (s + 1) * G)`` and process ``p`` takes rows ``[p * L, (p + 1) * L)`` of it
(``G = global_batch_size``, ``L = G // process_count``); the last batch is padded with zero
images whose ``mask`` is False, so every process runs ``ceil(N / G)`` steps and every example
is counted exactly once.

Config fields read (``data_cfg``): name, data_dir, train_split, eval_split, image_size,
eval_crop_pct, num_workers, prefetch; optional: num_threads (prefetch threads of the process
computing batches: default 1 without workers, 0 in workers), mean / std (default ImageNet's),
eval_interpolation (bicubic), and for the demo demo_image_size / demo_num_train /
demo_num_test / demo_seed. ``aug_cfg``: rrc_scale,
rrc_ratio, hflip, auto_augment, reprob, remode, interpolation, recount (absent -> timm default).

Worker processes (``num_workers > 0``) are spawned by grain and only run numpy/PIL code: they
never touch JAX devices. Mixup/CutMix and label smoothing happen on device, in the train step.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterator

import grain
import jax
from absl import flags
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from l2s_jax.data.sources import OpenedSource, decode_image, default_eval_split, open_source, split_size
from l2s_jax.data.transforms import IMAGENET_MEAN, IMAGENET_STD, EvalTransform, TrainTransform

ITERATOR_ITEM = "data"


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Sizes of a dataset; ``label_subset`` lists the classes to score (ImageNet-A/R), else None."""

    num_classes: int
    num_train: int
    num_eval: int
    image_size: int
    label_subset: tuple[int, ...] | None = None
    class_names: tuple[str, ...] = ()


def _eval_split(data_cfg: Any, split: str | None) -> str:
    """``split``, else ``data_cfg.eval_split``, else the dataset's default evaluation split."""
    return split or data_cfg.get("eval_split", None) or default_eval_split(data_cfg.name)


def dataset_info(data_cfg: Any) -> DatasetInfo:
    """Class count, split sizes and input size of the dataset named by ``data_cfg``."""
    train_split = data_cfg.get("train_split", "train")
    eval_split = _eval_split(data_cfg, None)
    num_train = split_size(data_cfg, train_split)
    num_eval = split_size(data_cfg, eval_split)
    opened = open_source(data_cfg, eval_split if num_eval else train_split)
    return DatasetInfo(
        num_classes=opened.num_classes,
        num_train=num_train,
        num_eval=num_eval,
        image_size=int(data_cfg.image_size),
        label_subset=opened.label_subset,
        class_names=opened.class_names,
    )


def _process_shard(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    """(process_index, process_count), checked; defaults come from JAX."""
    index = jax.process_index() if process_index is None else int(process_index)
    count = jax.process_count() if process_count is None else int(process_count)
    if not 0 <= index < count:
        raise ValueError(f"process_index {index} not in [0, {count})")
    return index, count


def _process_layout(
    global_batch_size: int, process_index: int | None, process_count: int | None
) -> tuple[int, int, int]:
    """(process_index, process_count, local_batch); defaults come from JAX."""
    index, count = _process_shard(process_index, process_count)
    if global_batch_size <= 0 or global_batch_size % count:
        raise ValueError(f"global_batch_size {global_batch_size} must be a positive multiple of {count} processes")
    return index, count, global_batch_size // count


def _norm_stats(data_cfg: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Normalisation mean and std (ImageNet's unless ``data_cfg.mean`` / ``data_cfg.std`` are set)."""
    mean = data_cfg.get("mean", None) or IMAGENET_MEAN
    std = data_cfg.get("std", None) or IMAGENET_STD
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


_AUG_FIELDS = {
    "rrc_scale": "scale",
    "rrc_ratio": "ratio",
    "hflip": "hflip",
    "auto_augment": "auto_augment",
    "interpolation": "interpolation",
    "reprob": "reprob",
    "remode": "remode",
    "recount": "recount",
}


def train_transform(data_cfg: Any, aug_cfg: Any) -> TrainTransform:
    """The :class:`TrainTransform` of ``data_cfg`` (size, normalisation) and ``aug_cfg``.

    Fields absent from ``aug_cfg`` keep TrainTransform's defaults (the paper's recipe);
    ``auto_augment`` None or "" disables RandAugment.
    """
    mean, std = _norm_stats(data_cfg)
    kwargs: dict[str, Any] = {}
    for cfg_key, arg in _AUG_FIELDS.items():
        if cfg_key in aug_cfg:
            value = aug_cfg[cfg_key]
            if arg in ("scale", "ratio"):
                value = tuple(float(v) for v in value)
            elif arg == "auto_augment":
                value = value or None
            kwargs[arg] = value
    return TrainTransform(size=int(data_cfg.image_size), mean=mean, std=std, **kwargs)


def eval_transform(data_cfg: Any, opened: OpenedSource | None = None) -> EvalTransform:
    """The :class:`EvalTransform`; a source's own crop (ImageNet-C: 1.0) overrides ``eval_crop_pct``."""
    mean, std = _norm_stats(data_cfg)
    crop_pct = opened.eval_crop_pct if opened is not None and opened.eval_crop_pct else None
    return EvalTransform(
        size=int(data_cfg.image_size),
        crop_pct=float(crop_pct or data_cfg.get("eval_crop_pct", 0.875)),
        interpolation=data_cfg.get("eval_interpolation", "bicubic"),
        mean=mean,
        std=std,
    )


@dataclasses.dataclass(frozen=True)
class TrainExample:
    """grain random map: record -> {"images": float32 (S, S, 3), "labels": int32}."""

    transform: TrainTransform

    def __call__(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Decode with PIL and augment with the element's own generator."""
        image = self.transform(decode_image(record["image"]), rng)
        return {"images": image, "labels": np.int32(record["label"])}


@dataclasses.dataclass(frozen=True)
class EvalExample:
    """grain map over process-local positions -> one eval example or a masked pad."""

    records: Any
    transform: EvalTransform
    num_examples: int
    global_batch: int
    local_batch: int
    process_index: int

    def global_index(self, position: int) -> int:
        """The dataset index read at process-local ``position`` (>= num_examples: padding)."""
        step, row = divmod(int(position), self.local_batch)
        return step * self.global_batch + self.process_index * self.local_batch + row

    def __call__(self, position: int) -> dict[str, np.ndarray]:
        """{"images", "labels", "mask"}: the transformed example, or zeros with mask False."""
        index = self.global_index(position)
        if index >= self.num_examples:
            size = self.transform.size
            return {
                "images": np.zeros((size, size, 3), np.float32),
                "labels": np.int32(0),
                "mask": np.bool_(False),
            }
        record = self.records[index]
        image = self.transform(decode_image(record["image"]))
        return {"images": image, "labels": np.int32(record["label"]), "mask": np.bool_(True)}


def _read_options(data_cfg: Any) -> grain.ReadOptions:
    """Threads and buffer of the in-process prefetch (each element is a whole batch).

    With worker processes this runs inside each worker, whose output queue already prefetches:
    the default is then no thread, so a batch stacked into shared memory goes straight to that
    queue, which grain unlinks on close (a thread's buffer would leak its blocks until exit).
    """
    prefetch = int(data_cfg.get("prefetch", 2))
    threads = data_cfg.get("num_threads", None)
    if threads is None:
        threads = 1 if prefetch > 0 and int(data_cfg.get("num_workers", 0)) == 0 else 0
    return grain.ReadOptions(num_threads=int(threads), prefetch_buffer_size=max(prefetch, int(threads)))


def _to_iterator(ds: grain.MapDataset, data_cfg: Any) -> grain.DatasetIterator:
    """The batched MapDataset as an iterator, with multiprocessing prefetch when num_workers > 0."""
    workers = int(data_cfg.get("num_workers", 0))
    if workers > 0 and hasattr(ds, "enable_shared_memory_output"):
        # Workers stack each batch straight into shared memory. Otherwise grain stacks it in
        # private memory and copies it into shared memory again (all worker counts for the
        # batch MapDataset; grain only handles IterDataset batches itself): about 8% of a
        # worker's CPU time at 2 workers, 32 x 224 px. Same values, same arrays in the main
        # process (grain's shared-memory arrays either way).
        ds.enable_shared_memory_output()
    it_ds = ds.to_iter_dataset(_read_options(data_cfg))
    if workers > 0:
        # grain 0.2.x reads an absl flag when starting workers and fails in programs that do not
        # parse absl flags (google/grain#1355); their defaults are what we want.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        options = grain.MultiprocessingOptions(
            num_workers=workers, per_worker_buffer_size=max(1, int(data_cfg.get("prefetch", 2)))
        )
        it_ds = it_ds.mp_prefetch(options)
    return iter(it_ds)


def train_dataset(
    data_cfg: Any,
    aug_cfg: Any,
    *,
    global_batch_size: int,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.MapDataset:
    """The infinite, batched train ``MapDataset`` of this process (see the module docstring)."""
    index, count, local_batch = _process_layout(global_batch_size, process_index, process_count)
    ds = train_examples(data_cfg, aug_cfg, seed=seed, process_index=index, process_count=count)
    return ds.batch(local_batch, drop_remainder=True)


def train_examples(
    data_cfg: Any,
    aug_cfg: Any,
    *,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.MapDataset:
    """This process's infinite stream of transformed train examples, before batching.

    Element ``i`` is ``{"images", "labels"}`` of row ``i % L`` of local batch ``i // L``
    (random access; e.g. a PyTorch ``Dataset`` over it loads exactly the same images).
    """
    index, count = _process_shard(process_index, process_count)
    opened = open_source(data_cfg, data_cfg.get("train_split", "train"))
    if len(opened.records) == 0:
        raise ValueError(f"the train split of {data_cfg.name!r} is empty")
    ds = grain.MapDataset.source(opened.records).seed(int(seed))
    ds = ds.shuffle().repeat()
    ds = ds.random_map(TrainExample(train_transform(data_cfg, aug_cfg)))
    return ds[index::count]


def create_train_iterator(
    data_cfg: Any,
    aug_cfg: Any,
    *,
    global_batch_size: int,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.DatasetIterator:
    """Infinite iterator of process-local train batches.

    Yields ``{"images": float32 [L, S, S, 3] normalised, "labels": int32 [L]}`` with
    ``L = global_batch_size // process_count``. Deterministic in ``seed`` and resumable with
    ``get_state()`` / ``set_state()`` (or :func:`iterator_checkpoint_args`).
    ``process_index`` / ``process_count`` default to JAX's (override them to simulate hosts).
    """
    ds = train_dataset(
        data_cfg,
        aug_cfg,
        global_batch_size=global_batch_size,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
    )
    return _to_iterator(ds, data_cfg)


def create_eval_iterator(
    data_cfg: Any,
    *,
    global_batch_size: int,
    split: str | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """One pass over ``split`` (default: the eval split) in padded process-local batches.

    Yields ``{"images": float32 [L, S, S, 3], "labels": int32 [L], "mask": bool [L]}``; padding
    rows have ``mask`` False. Every process yields ``ceil(N / global_batch_size)`` batches.
    """
    opened = open_source(data_cfg, _eval_split(data_cfg, split))
    return eval_batches(opened.records, eval_transform(data_cfg, opened), data_cfg, global_batch_size=global_batch_size,
                        process_index=process_index, process_count=process_count)


def eval_batches(
    records: Any,
    transform: Any,
    data_cfg: Any,
    *,
    global_batch_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """:func:`create_eval_iterator` over any random-access ``records`` and per-image ``transform``.

    ``transform`` maps a decoded image to a float32 (size, size, 3) array and has ``size``;
    ``data_cfg`` supplies only num_workers / prefetch / num_threads.
    """
    index, count, local_batch = _process_layout(global_batch_size, process_index, process_count)
    num_examples = len(records)
    steps = math.ceil(num_examples / global_batch_size)
    element = EvalExample(
        records=records,
        transform=transform,
        num_examples=num_examples,
        global_batch=global_batch_size,
        local_batch=local_batch,
        process_index=index,
    )
    ds = grain.MapDataset.range(steps * local_batch).map(element).batch(local_batch)
    return _to_iterator(ds, data_cfg)


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh, axis: str = "data") -> dict[str, jax.Array]:
    """Process-local numpy arrays -> global ``jax.Array`` s sharded along ``axis`` (leading dim)."""
    sharding = NamedSharding(mesh, PartitionSpec(axis))
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def iterator_checkpoint_args(iterator: grain.DatasetIterator, *, restore: bool = False) -> Any:
    """Orbax args that save (or restore into) a grain iterator, as item ``ITERATOR_ITEM``.

    Each process writes ``process_<i>-of-<n>.json`` with its iterator state. Usage::

        import orbax.checkpoint as ocp
        mngr = ocp.CheckpointManager(ckpt_dir)
        mngr.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=iterator_checkpoint_args(train_iter)))
        # resume: build the iterator exactly as before (same seed, batch, num_workers), then
        train_iter = create_train_iterator(data_cfg, aug_cfg, global_batch_size=B, seed=s)
        restored = mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=iterator_checkpoint_args(train_iter, restore=True)))
        train_iter = restored[ITERATOR_ITEM]  # the same object, positioned after the saved step

    Outside Orbax, ``iterator.get_state()`` (a JSON-serialisable dict) and
    ``iterator.set_state(state)`` do the same.
    """
    import grain.checkpoint as grain_checkpoint

    if restore:
        return grain_checkpoint.CheckpointRestore(iterator)
    return grain_checkpoint.CheckpointSave(iterator)
