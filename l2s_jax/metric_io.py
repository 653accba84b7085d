"""Training metrics to TensorBoard event files (tensorboardX), a ``metrics.jsonl`` and the log.

tensorboardX writes the event files without TensorFlow (``clu.metric_writers`` imports it);
TensorBoard and readers such as tbparse read them as TensorFlow's own.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Mapping

from absl import logging


class EventFileWriter:
    """Scalars to ``logdir/events.out.tfevents.*`` through ``tensorboardX.SummaryWriter``."""

    def __init__(self, logdir: str | os.PathLike):
        from tensorboardX import SummaryWriter

        self._writer = SummaryWriter(logdir=str(logdir), flush_secs=30)

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        for k, v in scalars.items():
            self._writer.add_scalar(k, float(v), global_step=int(step))

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class JsonlWriter:
    """One JSON object per line: ``{"step": s, "time": t, "split": ..., name: value, ...}``."""

    def __init__(self, path: str | os.PathLike):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.path = Path(path)
        self._file = open(self.path, "a")

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        row = {"step": int(step), "time": round(time.time(), 3)}
        row.update({k: (float(v) if math.isfinite(float(v)) else str(float(v))) for k, v in scalars.items()})
        self._file.write(json.dumps(row) + "\n")

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class MetricWriter:
    """Scalars to TensorBoard event files and ``metrics.jsonl`` in ``workdir``, and to the log.

    Only process 0 writes files (``just_logging`` for the others), as clu's default writer does.
    """

    def __init__(self, workdir: str | os.PathLike, *, just_logging: bool = False):
        self.writers: list[Any] = [] if just_logging else [
            EventFileWriter(Path(workdir) / "tensorboard"), JsonlWriter(Path(workdir) / "metrics.jsonl")]

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        scalars = {k: float(v) for k, v in scalars.items()}
        logging.info("[%d] %s", step, ", ".join(f"{k}={v:.6g}" for k, v in scalars.items()))
        for w in self.writers:
            w.write_scalars(step, scalars)

    def flush(self) -> None:
        for w in self.writers:
            w.flush()

    def close(self) -> None:
        for w in self.writers:
            w.close()
