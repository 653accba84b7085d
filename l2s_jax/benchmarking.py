"""Shared plumbing of the benchmark tools: each measurement runs in its own child process."""
from __future__ import annotations

import json
import subprocess
from typing import Any, Mapping, Sequence

from l2s_jax import host_memory


def run_child(cmd: Sequence[str], env: Mapping[str, str] | None = None) -> dict[str, Any] | str:
    """Run a benchmark child; its result is the last JSON line it prints, else ``"failed: <last stderr line>"``.

    The child reads no stdin and its memory is its own (peak RSS is per process). Every child,
    JAX or PyTorch, starts with the host malloc settings the l2s_jax commands use
    (:mod:`l2s_jax.host_memory`; ``L2S_HOST_MALLOC=system`` for glibc's defaults on both sides).
    """
    proc = subprocess.run(list(cmd), capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          env=host_memory.child_env(env))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        return f"failed: {(proc.stderr.strip().splitlines() or ['?'])[-1][:60]}"
    return json.loads(lines[-1])
