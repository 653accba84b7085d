"""Two processes x 2 CPU devices on jax.distributed (127.0.0.1) train exactly like one process x 4.

Each process reads its own shard of every global batch, the step is the same jitted function on
the global mesh, evaluation sums over both processes, and Orbax checkpoints are written together;
a two-process run killed mid-way resumes to the same parameters.
"""
from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from run_helpers import cli_env, demo_cli_args, demo_config, save_teachers, teacher_cli_args

from l2s_jax.data import pipeline

STEPS = 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args: list[str], workdir: Path, *, processes: int, devices: int) -> list[subprocess.Popen]:
    env = cli_env(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    extra = [] if processes == 1 else ["--coordinator_address", f"127.0.0.1:{_free_port()}",
                                       "--num_processes", str(processes)]
    return [subprocess.Popen([sys.executable, "-u", "-m", "l2s_jax.main", *args, "--workdir", str(workdir), *extra,
                              *([] if processes == 1 else ["--process_id", str(i)])],
                             cwd=workdir.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i in range(processes)]


def _finish(procs: list[subprocess.Popen]) -> list[str]:
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=400)
        assert p.returncode == 0, err[-3000:]
        outs.append(out)
    return outs


def _params(workdir: Path) -> list[np.ndarray]:
    path = workdir / "checkpoints" / str(STEPS) / "state"
    local = jax.sharding.SingleDeviceSharding(jax.devices()[0])  # saved by 2 processes' devices
    with ocp.StandardCheckpointer() as ckptr:
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=local),
                              ckptr.metadata(path).item_metadata)
        state = ckptr.restore(path, target)
    return [np.asarray(x) for x in jax.tree.leaves(state["params"])]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("multi")
    data_dir = root / "tfds"
    pipeline.dataset_info(demo_config(data_dir).data)  # build the demo data once, before two processes read it
    teacher = save_teachers(root / "teachers", ["slak"])["slak"]
    args = demo_cli_args(data_dir, f"steps={STEPS},teacher_steps=2") + teacher_cli_args(teacher) + [
        "--config.checkpoint_every_steps=2", "--config.keep_checkpoints=5"]
    return root, args


def test_two_processes_match_one_and_resume_after_a_kill(setup):
    root, args = setup
    one = root / "one"
    _finish(_launch(args, one, processes=1, devices=4))
    two = root / "two"
    outs = _finish(_launch(args, two, processes=2, devices=2))
    assert "process 0 of 2, 2 local / 4 global devices" in outs[0]
    a, b = _params(one), _params(two)
    assert len(a) == len(b)
    diff = max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))
    assert diff < 1e-5, diff
    r1, r2 = (json.loads((d / "result.json").read_text()) for d in (one, two))
    assert r1["top1"] == r2["top1"] and r1["total_steps"] == r2["total_steps"] == STEPS

    # Kill both processes once a checkpoint exists, then re-run the same two commands.
    killed = root / "killed"
    procs = _launch(args, killed, processes=2, devices=2)
    for line in procs[0].stdout:
        if line.strip().startswith("step 3/"):
            break
    for p in procs:
        p.kill()
        p.communicate(timeout=60)
    outs = _finish(_launch(args, killed, processes=2, devices=2))
    complete = [int(p.name) for p in (killed / "checkpoints").iterdir() if p.name.isdigit() and int(p.name) < STEPS]
    if complete:
        assert "resumed from step" in outs[0]
    c = _params(killed)
    assert max(float(np.max(np.abs(x - y))) for x, y in zip(b, c)) == 0.0
