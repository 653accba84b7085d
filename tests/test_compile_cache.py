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


def run_program(env: dict) -> str:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO_ROOT), **env}
    out = subprocess.run([sys.executable, "-c", PROGRAM], env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip()


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
    assert run_program({compile_cache.ENV: str(cache)}) == str(cache)
    entries = sorted(p.name for p in cache.glob("jit_chain-*-cache"))
    assert len(entries) == 1
    run_program({compile_cache.ENV: str(cache)})  # a re-run loads it: no second entry
    assert sorted(p.name for p in cache.glob("jit_chain-*-cache")) == entries


def test_off_writes_nothing(tmp_path):
    assert run_program({compile_cache.ENV: "off", "XDG_CACHE_HOME": str(tmp_path)}) == "None"
    assert not any(tmp_path.rglob("*-cache"))


def test_unwritable_folder_warns_and_runs(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.warns(UserWarning, match="compilation cache disabled: cannot create"):
        assert compile_cache.enable(str(blocker / "cache")) is None
    compile_cache.enable()  # back to the suite's setting
