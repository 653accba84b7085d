"""glibc malloc settings for the host memory of a JAX process, applied by the l2s_jax commands.

XLA:CPU allocates and frees its temporary buffers (about 2 GB for the paper's step at batch
8) on every execution. With glibc's defaults each large buffer is a fresh ``mmap`` that is
unmapped on free, so every step first-touches all of it again: about 600,000 page faults and
a quarter of the step's CPU time spent in the kernel on a 2-core machine. Two glibc tunables
fix that: ``glibc.malloc.hugetlb=1`` backs malloc's memory with transparent huge pages (2 MiB
faults instead of 4 KiB, where THP is in ``madvise`` or ``always`` mode) and
``glibc.malloc.arena_max=1`` keeps one heap, which also lowers the peak RSS.

glibc reads ``GLIBC_TUNABLES`` only when a process starts, so the commands (``l2s-train`` /
``python -m l2s_jax.main``, ``l2s-erf``, ``l2s-evaluate``, ``tools/erf.py``,
``tools/evaluate.py``) re-execute themselves once with it set, before JAX is imported, and the
benchmark tools start every child (JAX and PyTorch) with it (:func:`child_env`). Control it with ``L2S_HOST_MALLOC``:

* unset or ``tuned``: the tunables above (on Linux with glibc; elsewhere nothing is done);
* ``system``: glibc's defaults, no re-exec.

A ``GLIBC_TUNABLES`` the user set is left as it is. With ``tuned``, every JAX process of
l2s_jax also hands the heap that a long XLA compile leaves behind back to the OS
(``malloc_trim`` after each compile of a second or more: about 0.45 GB after the paper's
step), before the program first runs and allocates its own buffers. Nothing here changes
numerics.
"""
from __future__ import annotations

import ctypes
import os
import platform
import sys
from typing import Any, Mapping

ENV = "L2S_HOST_MALLOC"
TUNABLES = "glibc.malloc.hugetlb=1:glibc.malloc.arena_max=1"
_CHOICES = ("tuned", "system")
# jax._src.dispatch.BACKEND_COMPILE_EVENT: recorded when an XLA compile (or a cache load) ends.
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
trims = 0  # malloc_trim calls made by the compile listener (for tests and diagnostics)
_listening = False


def setting(env: Mapping[str, str] | None = None) -> str:
    """``tuned`` or ``system`` from ``$L2S_HOST_MALLOC`` (one line naming the choices when it is neither)."""
    value = (os.environ if env is None else env).get(ENV, "tuned").strip().lower() or "tuned"
    if value not in _CHOICES:
        sys.exit(f"error: {ENV}={value!r} is not one of {', '.join(_CHOICES)} (unset it for the default, tuned)")
    return value


def _is_glibc_linux() -> bool:
    return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def tuned_env(env: Mapping[str, str] | None = None) -> dict[str, str] | None:
    """``env`` plus ``GLIBC_TUNABLES``, or None when nothing is to change (off, set already, not glibc)."""
    env = dict(os.environ if env is None else env)
    if setting(env) == "system" or "GLIBC_TUNABLES" in env or not _is_glibc_linux():
        return None
    env["GLIBC_TUNABLES"] = TUNABLES
    return env


def reexec_tuned() -> None:
    """Replace this process by the same command with the tuned ``GLIBC_TUNABLES`` (once; call before JAX).

    Uses :data:`sys.orig_argv`, so ``python -m ...``, console scripts and interpreter flags are
    all repeated as they were given.
    """
    env = tuned_env()
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def describe(env: Mapping[str, str] | None = None) -> str:
    """The host malloc a process with ``env`` (default: this one) runs with, for a log line."""
    env = os.environ if env is None else env
    current = env.get("GLIBC_TUNABLES")
    if current == TUNABLES:
        return f"host malloc GLIBC_TUNABLES={TUNABLES} ({ENV}=system for glibc's defaults)"
    if current is not None:
        return f"host malloc GLIBC_TUNABLES={current} (set by the user)"
    if not _is_glibc_linux():
        return "the platform's default host malloc (the tuned setting is for Linux with glibc)"
    return f"glibc's default host malloc ({ENV}={env.get(ENV, 'tuned, but not started by an l2s_jax command')})"


def child_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's) as the l2s_jax commands would run it: tuned unless turned off."""
    env = dict(os.environ if env is None else env)
    return tuned_env(env) or env


def trim_after_compiles(min_secs: float = 1.0) -> bool:
    """Call glibc's ``malloc_trim(0)`` after every XLA compile of ``min_secs`` or more (once per process).

    Returns whether the listener is (now) registered: not with ``L2S_HOST_MALLOC=system`` or
    without glibc.
    """
    global _listening
    if _listening:
        return True
    if setting() == "system" or not _is_glibc_linux():
        return False
    from jax import monitoring

    trim = ctypes.CDLL("libc.so.6").malloc_trim

    def listener(event: str, duration_secs: float, **_: Any) -> None:
        global trims
        if event == COMPILE_EVENT and duration_secs >= min_secs:
            trim(0)
            trims += 1

    monitoring.register_event_duration_secs_listener(listener)
    _listening = True
    return True
