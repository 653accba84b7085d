"""Training metrics to TensorBoard event files, a ``metrics.jsonl`` and the log, without TensorFlow.

``clu.metric_writers`` cannot be imported without TensorFlow (its package imports the TF summary
writer), and neither ``tensorboard`` nor ``tensorboardX`` is a dependency, so scalars are
encoded here: an event file is a sequence of TFRecords (little-endian length, masked CRC-32C of
the length, payload, masked CRC-32C of the payload) whose payloads are ``tensorflow.Event``
protocol buffers; a scalar is ``Event{wall_time, step, summary{value{tag, simple_value}}}``.
TensorBoard reads these files as it reads TensorFlow's.
"""
from __future__ import annotations

import json
import math
import os
import socket
import struct
import time
from pathlib import Path
from typing import Any, Mapping

from absl import logging

_CRC32C_POLY = 0x82F63B78
_CRC32C_TABLE = []
for _n in range(256):
    _c = _n
    for _ in range(8):
        _c = (_c >> 1) ^ _CRC32C_POLY if _c & 1 else _c >> 1
    _CRC32C_TABLE.append(_c)


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), the checksum of TFRecord framing."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC: rotate right by 15 and add a constant (mod 2^32)."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(payload: bytes) -> bytes:
    """One framed TFRecord."""
    length = struct.pack("<Q", len(payload))
    return length + struct.pack("<I", masked_crc32c(length)) + payload + struct.pack("<I", masked_crc32c(payload))


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        bits = value & 0x7F
        value >>= 7
        if value:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


def _field(number: int, wire_type: int) -> bytes:
    return _varint((number << 3) | wire_type)


def _bytes_field(number: int, data: bytes) -> bytes:
    return _field(number, 2) + _varint(len(data)) + data


def scalar_event(step: int, wall_time: float, scalars: Mapping[str, float]) -> bytes:
    """``Event{wall_time=1, step=2, summary=5{value=1{tag=1, simple_value=2}}}`` encoded."""
    values = b"".join(
        _bytes_field(1, _bytes_field(1, tag.encode()) + _field(2, 5) + struct.pack("<f", float(v)))
        for tag, v in scalars.items()
    )
    return (_field(1, 1) + struct.pack("<d", wall_time) + _field(2, 0) + _varint(int(step))
            + _bytes_field(5, values))


def version_event(wall_time: float) -> bytes:
    """The first event of every file: ``file_version = "brain.Event:2"`` (field 3)."""
    return _field(1, 1) + struct.pack("<d", wall_time) + _bytes_field(3, b"brain.Event:2")


class EventFileWriter:
    """Scalars to ``logdir/events.out.tfevents.<time>.<host>`` (a new file per writer)."""

    def __init__(self, logdir: str | os.PathLike):
        Path(logdir).mkdir(parents=True, exist_ok=True)
        now = time.time()
        self.path = Path(logdir) / f"events.out.tfevents.{int(now)}.{socket.gethostname()}.{os.getpid()}"
        self._file = open(self.path, "ab")
        self._file.write(tfrecord(version_event(now)))

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        finite = {k: float(v) for k, v in scalars.items()}
        self._file.write(tfrecord(scalar_event(step, time.time(), finite)))

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


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

    Only process 0 writes files (``just_logging`` for the others), as clu's default writer.
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
