"""The persistent compilation cache: where it lives, how it is turned off, and that commands fill it."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT
from l2s_jax import compile_cache

# A program that takes well over compile_cache.MIN_COMPILE_SECS to compile (a long unrolled chain).
PROGRAM = """
import jax, jax.numpy as jnp
from l2s_jax import compile_cache
print(compile_cache.enable())
def chain(x):
    for i in range(300):
        x = jnp.sin(x @ x.T) * (i + 1)
    return x
jax.jit(chain)(jnp.ones((8, 8)))
"""


def run_program(env: dict, program: str = PROGRAM) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO_ROOT), **env}
    return subprocess.run([sys.executable, "-c", program], env=env, capture_output=True, text=True, check=True)


def test_resolution_order(monkeypatch, tmp_path):
    monkeypatch.delenv(compile_cache.ENV, raising=False)
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    default = compile_cache.resolve_dir()
    assert default.parent == tmp_path / "xdg" / "l2s_jax" / "xla"
    assert default.name == compile_cache.host_tag() and default.name.startswith(os.uname().machine)
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax_own"))
    assert compile_cache.resolve_dir() == tmp_path / "jax_own"  # the user's JAX setting is kept
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "mine"))
    assert compile_cache.resolve_dir() == tmp_path / "mine"  # ours wins over JAX's
    for off in ("off", "0", "none", "", "OFF"):
        monkeypatch.setenv(compile_cache.ENV, off)
        assert compile_cache.resolve_dir() is None
    assert compile_cache.resolve_dir("~/x") == Path.home() / "x"


def test_programs_are_written_and_reused(tmp_path):
    cache = tmp_path / "cache"
    assert run_program({compile_cache.ENV: str(cache)}).stdout.strip() == str(cache)
    entries = sorted(p.name for p in cache.glob("jit_chain-*-cache"))
    assert len(entries) == 1
    run_program({compile_cache.ENV: str(cache)})  # a re-run loads it: no second entry
    assert sorted(p.name for p in cache.glob("jit_chain-*-cache")) == entries


def test_off_writes_nothing(tmp_path):
    assert run_program({compile_cache.ENV: "off", "XDG_CACHE_HOME": str(tmp_path)}).stdout.strip() == "None"
    assert not any(tmp_path.rglob("*-cache"))


def test_unwritable_folder_warns_and_runs(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.warns(UserWarning, match="compilation cache disabled: cannot create"):
        assert compile_cache.enable(str(blocker / "cache")) is None
    compile_cache.enable()  # back to the suite's setting


def test_an_interrupted_write_does_not_stop_the_cache_growing(tmp_path):
    """A process killed between JAX's two files of an entry left a ``-cache`` without ``-atime``.

    JAX's size-capped cache then fails every later write (FileNotFoundError while choosing what
    to evict), so without the repair in ``enable`` a second program would never be cached.
    """
    cache = tmp_path / "cache"
    run_program({compile_cache.ENV: str(cache)})
    (entry,) = cache.glob("jit_chain-*-cache")
    Path(str(entry).removesuffix("-cache") + "-atime").unlink()  # as if killed before the -atime
    (cache / "jit_gone-0-atime").write_bytes(b"\0" * 8)  # and an -atime whose entry was deleted
    other = PROGRAM.replace("range(300)", "range(301)")
    out = run_program({compile_cache.ENV: str(cache)}, other)
    assert "removed 1 incomplete entry" in out.stderr and "Error writing" not in out.stderr
    assert not (cache / "jit_gone-0-atime").exists() and not entry.exists()
    assert len(list(cache.glob("jit_chain-*-cache"))) == 1  # the new program was written
    assert len(list(cache.glob("jit_chain-*-atime"))) == 1
    assert "removed" not in run_program({compile_cache.ENV: str(cache)}, other).stderr  # nothing left to do


def test_repair_keeps_complete_entries(tmp_path):
    for key in ("a", "b"):
        (tmp_path / f"{key}-cache").write_bytes(b"x")
    (tmp_path / "a-atime").write_bytes(b"\0" * 8)
    assert compile_cache.repair(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["a-atime", "a-cache"]
