"""JAX's persistent compilation cache, on by default for every l2s_jax command.

A compiled program (the train step, the eval step, an ERF probe) is written to a cache folder
keyed by the program, the JAX/XLA versions and the compile options, so re-running a command, a
resumed run or the test suite loads it instead of compiling again.

Where (first match wins):

* ``L2S_COMPILE_CACHE=off`` (or ``0``, ``none``, empty): no persistent cache.
* ``L2S_COMPILE_CACHE=DIR``: that folder.
* ``JAX_COMPILATION_CACHE_DIR`` (JAX's own setting), when the user set it: left as it is.
* otherwise ``$XDG_CACHE_HOME/l2s_jax/xla/<host>`` (default ``~/.cache/l2s_jax/xla/<host>``),
  where ``<host>`` names the CPU model and instruction set (a CPU executable is only valid on
  the kind of CPU it was compiled for; home folders are often shared across machines).

The folder only ever holds compiled programs: deleting it at any time is safe (the next run
compiles again); it is capped at 4 GiB, least recently used programs first. A folder that
cannot be created disables the cache with a warning; it never stops a run.

JAX writes an entry as two files, ``<key>-cache`` and then ``<key>-atime``. A process killed
in between (SIGKILL, out of memory, a timeout) leaves a ``-cache`` file that may be truncated
and has no ``-atime``; from then on every write of JAX's size-capped cache fails (it reads the
``-atime`` of every entry to pick what to evict) and the cache silently stops growing. A JAX
process pointed at the same folder without a size cap (a bare ``JAX_COMPILATION_CACHE_DIR``)
writes entries with no ``-atime`` at all, with the same effect; the ERF notebook therefore calls
:func:`enable` too. :func:`enable` removes such incomplete entries first, under JAX's own lock.
"""
from __future__ import annotations

import hashlib
import os
import platform
import sys
import warnings
from pathlib import Path

import filelock
import jax

from l2s_jax import host_memory

ENV = "L2S_COMPILE_CACHE"
_OFF = ("", "0", "off", "none", "false", "no")
# Programs that compile faster than this are not worth a file (eager ops, small helpers).
MIN_COMPILE_SECS = 0.1
# Least recently used programs are evicted beyond this size.
MAX_BYTES = 4 * 2**30


def host_tag() -> str:
    """``<arch>-<hash of the CPU model and feature flags>``: one cache per kind of CPU."""
    info = platform.machine()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        info += "".join(sorted({ln for ln in lines if ln.split(":")[0].strip() in ("model name", "flags")}))
    except OSError:
        info += platform.processor()
    return f"{platform.machine()}-{hashlib.sha256(info.encode()).hexdigest()[:12]}"


def default_dir() -> Path:
    """The user-level cache folder for this kind of machine."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "l2s_jax" / "xla" / host_tag()


def resolve_dir(setting: str | None = None) -> Path | None:
    """The folder :func:`enable` would use for ``setting`` (default: ``$L2S_COMPILE_CACHE``); None = off."""
    setting = os.environ.get(ENV) if setting is None else setting
    if setting is not None:
        return None if setting.strip().lower() in _OFF else Path(setting).expanduser()
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return Path(os.environ["JAX_COMPILATION_CACHE_DIR"]).expanduser()
    return default_dir()


def repair(folder: Path) -> int:
    """Remove the incomplete entries an interrupted write left in ``folder``; returns how many.

    An entry is complete when both its ``-cache`` and its ``-atime`` file exist (JAX writes the
    ``-atime`` last). Runs under the lock JAX's cache takes for every write, so an entry another
    process is writing right now is never touched.
    """
    removed = 0
    with filelock.FileLock(folder / ".lockfile", timeout=60):
        cache = {p.name.removesuffix("-cache"): p for p in folder.glob("*-cache")}
        atime = {p.name.removesuffix("-atime"): p for p in folder.glob("*-atime")}
        for key in cache.keys() ^ atime.keys():
            (cache.get(key) or atime[key]).unlink(missing_ok=True)
            removed += key in cache
    return removed


def enable(setting: str | None = None) -> Path | None:
    """Turn the persistent compilation cache on (see the module docstring); returns its folder or None.

    Call before the first compilation. ``setting`` overrides ``$L2S_COMPILE_CACHE`` (a folder or
    ``"off"``). Every command calls this as its JAX set-up, so it also registers the heap trim
    after long compiles (:func:`l2s_jax.host_memory.trim_after_compiles`).
    """
    host_memory.trim_after_compiles()
    folder = resolve_dir(setting)
    if folder is None:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        warnings.warn(f"compilation cache disabled: cannot create {folder} ({e.strerror}); "
                      f"set {ENV}=DIR to a writable folder or {ENV}=off", stacklevel=2)
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    try:
        removed = repair(folder)
    except (OSError, filelock.Timeout) as e:
        warnings.warn(f"compilation cache not checked for interrupted writes: {e}", stacklevel=2)
    else:
        if removed:
            print(f"compilation cache: removed {removed} incomplete entr{'y' if removed == 1 else 'ies'} "
                  f"(a run was interrupted while writing) from {folder}", file=sys.stderr)
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECS)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    return folder
