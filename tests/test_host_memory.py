"""l2s_jax.host_memory: the commands re-execute once with glibc's malloc tuned, which removes the
per-execution page faults of XLA:CPU's freshly mapped buffers; L2S_HOST_MALLOC=system opts out."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
from run_helpers import cli_env

from l2s_jax import host_memory

glibc_linux = pytest.mark.skipif(not (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"),
                                 reason="the tuned host malloc is for Linux with glibc")

REEXEC = ("import os; from l2s_jax import host_memory; host_memory.reexec_tuned(); "
          "print(os.environ.get('GLIBC_TUNABLES')); print(host_memory.describe())")

# 128 MiB outputs: above glibc's largest dynamic mmap threshold, so each one is a fresh mapping
# that is unmapped again when freed (the pattern of XLA:CPU's large temporaries).
FAULTS = """
import resource, statistics
import jax, jax.numpy as jnp
x = jnp.ones((4096, 8192), jnp.float32)
add = jax.jit(lambda x: x * 3.0 + 1.0)
faults = []
for _ in range(6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    y = add(x).block_until_ready()
    del y
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(statistics.median(faults[2:]))
"""


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in cli_env().items() if k not in ("GLIBC_TUNABLES", host_memory.ENV)}
    return subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True,
                          timeout=300)


@glibc_linux
def test_reexec_sets_the_tunables_once_and_says_so():
    proc = _python(REEXEC)
    assert proc.returncode == 0, proc.stderr
    tunables, described = proc.stdout.splitlines()
    assert tunables == host_memory.TUNABLES
    assert described.startswith(f"host malloc GLIBC_TUNABLES={host_memory.TUNABLES}") and "=system" in described


@glibc_linux
def test_system_setting_and_a_users_tunables_are_left_alone():
    off = _python(REEXEC, L2S_HOST_MALLOC="system")
    assert off.returncode == 0 and off.stdout.splitlines() == [
        "None", "glibc's default host malloc (L2S_HOST_MALLOC=system)"], off.stderr
    mine = _python(REEXEC, GLIBC_TUNABLES="glibc.malloc.arena_max=2")
    assert mine.stdout.splitlines() == ["glibc.malloc.arena_max=2",
                                        "host malloc GLIBC_TUNABLES=glibc.malloc.arena_max=2 (set by the user)"]


def test_a_bad_setting_is_one_line_naming_the_choices():
    proc = _python(REEXEC, L2S_HOST_MALLOC="fast")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: L2S_HOST_MALLOC='fast' is not one of tuned, system (unset it for the default, tuned)"]


def test_child_env_is_what_the_commands_get():
    env = host_memory.child_env({"PATH": "/bin"})
    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        assert env == {"PATH": "/bin", "GLIBC_TUNABLES": host_memory.TUNABLES}
    assert host_memory.child_env({"L2S_HOST_MALLOC": "system"}) == {"L2S_HOST_MALLOC": "system"}


def _thp_mode() -> str:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "unknown"
    return text.split("[")[1].split("]")[0] if "[" in text else "unknown"


@glibc_linux
@pytest.mark.skipif(_thp_mode() != "madvise", reason=f"transparent huge pages are {_thp_mode()!r}, not 'madvise': "
                                                      "glibc's defaults and the tuned setting fault alike")
def test_tuned_malloc_removes_the_page_faults_of_each_execution():
    """Per execution of a jitted op with a 128 MiB output: 32,768 faults (4 KiB pages) by default."""
    counts = {}
    for name, env in (("system", {"L2S_HOST_MALLOC": "system"}), ("tuned", {"GLIBC_TUNABLES": host_memory.TUNABLES})):
        proc = _python(FAULTS, **env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        counts[name] = float(proc.stdout.split()[-1])
    assert counts["system"] >= 0.9 * 2**27 / os.sysconf("SC_PAGE_SIZE"), counts
    assert counts["tuned"] <= counts["system"] / 10, counts


TRIM = """
import jax, jax.numpy as jnp
from l2s_jax import compile_cache, host_memory
compile_cache.enable("off")
before = host_memory.trims
jax.jit(lambda x: jnp.cumsum(jnp.sin(x) @ x.T, axis=0)).lower(jnp.ones((64, 64))).compile()
print(host_memory.trims - before)
"""


@glibc_linux
def test_long_compiles_return_the_compilers_heap():
    """The listener fires on JAX's compile event (a rename in JAX would silently disable it)."""
    code = TRIM.replace("compile_cache.enable", "host_memory.trim_after_compiles(min_secs=0.0); compile_cache.enable")
    assert _python(code).stdout.split()[-1] != "0"
    assert _python(code, L2S_HOST_MALLOC="system").stdout.split()[-1] == "0"


ENTRY_POINTS = {
    "python -m l2s_jax.main": [sys.executable, "-m", "l2s_jax.main"],
    "l2s-train": [str(Path(sys.executable).parent / "l2s-train")],
    "l2s-erf": [str(Path(sys.executable).parent / "l2s-erf")],
    "l2s-evaluate": [str(Path(sys.executable).parent / "l2s-evaluate")],
    "tools/erf.py": [sys.executable, str(Path(__file__).resolve().parents[1] / "tools" / "erf.py")],
    "tools/evaluate.py": [sys.executable, str(Path(__file__).resolve().parents[1] / "tools" / "evaluate.py")],
}


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_every_jax_command_starts_through_host_memory(name):
    """A bad L2S_HOST_MALLOC stops each command first: proof that it reads the setting before anything else."""
    cmd = ENTRY_POINTS[name]
    if not Path(cmd[0]).exists():
        pytest.skip(f"{cmd[0]} is not installed (pip install -e . creates the console scripts)")
    env = {**cli_env(), "L2S_HOST_MALLOC": "fast"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        "error: L2S_HOST_MALLOC='fast' is not one of tuned, system (unset it for the default, tuned)"], proc.stderr
