"""Faults a long run meets, and that none of them loses work.

SIGTERM/SIGINT (a checkpoint at the next step, a message, exit status 3, an exact resume),
SIGKILL at a random step (an exact resume), a damaged latest checkpoint (moved aside, the previous
one resumed), a non-finite loss (stop naming the step and terms, or skip the update), and a full
disk or unwritable workdir (one-line errors; earlier checkpoints intact).
"""
from __future__ import annotations

import errno
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from run_helpers import cli_env, demo_cli_args, demo_config, run_cli, save_teachers, teacher_cli_args, with_teacher

from l2s_jax import host_memory, main
from l2s_jax.data import pipeline

STEPS = 12


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    return save_teachers(tmp_path_factory.mktemp("teacher"), ["slak"])["slak"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir, teacher) -> Path:
    """An uninterrupted in-process run of ``_config``: a checkpoint at every one of its 4 steps."""
    workdir = tmp_path_factory.mktemp("faults") / "reference"
    main.train_and_evaluate(_config(data_dir, teacher), workdir)
    return workdir


def _config(data_dir: Path, teacher: Path, steps: int = 4):
    config = with_teacher(demo_config(data_dir, f"steps={steps},teacher_steps=2"), teacher)
    config.checkpoint_every_steps = 1
    config.keep_checkpoints = 2 * steps
    return config


def _final(workdir: Path, step: int) -> list[np.ndarray]:
    with ocp.StandardCheckpointer() as ckptr:
        return [np.asarray(x) for x in jax.tree.leaves(ckptr.restore(workdir / "checkpoints" / str(step) / "state"))]


def _assert_identical(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def _interrupt_on_train_batch(monkeypatch, n: int, *, poison: bool = False) -> None:
    """The n-th train batch raises KeyboardInterrupt (or, with ``poison``, carries a NaN image)."""
    real, calls = pipeline.shard_batch, {"n": 0}

    def shard(batch, mesh, axis="data"):
        if "mask" not in batch:
            calls["n"] += 1
            if calls["n"] == n:
                if not poison:
                    raise KeyboardInterrupt("simulated crash")
                batch = {**batch, "images": np.full_like(batch["images"], np.nan)}
        return real(batch, mesh, axis)

    monkeypatch.setattr(pipeline, "shard_batch", shard)


def test_damaged_latest_checkpoint_is_moved_aside_and_the_previous_resumed(tmp_path, data_dir, teacher, reference,
                                                                         monkeypatch, capsys):
    run = tmp_path / "run"
    _interrupt_on_train_batch(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        main.train_and_evaluate(_config(data_dir, teacher), run)
    monkeypatch.undo()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["1", "2", "3"]
    for f in (run / "checkpoints" / "3" / "state").rglob("*"):  # truncate every data file of step 3
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(f.read_bytes()[:7])
    capsys.readouterr()
    main.train_and_evaluate(_config(data_dir, teacher), run)
    out = capsys.readouterr().out
    assert "checkpoints/3 is unreadable" in out and "resumed from step 2" in out
    aside = [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("unreadable-3-")]
    assert len(aside) == 1  # kept, never deleted
    _assert_identical(_final(reference, 4), _final(run, 4))


def test_checkpoints_of_another_model_are_refused_and_kept(tmp_path, data_dir, teacher, reference):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    (run / "result.json").unlink()  # unfinished: the run would resume from its checkpoints
    other = _config(data_dir, teacher)
    other.model.overrides.dims = (8, 16, 24, 32)
    with pytest.raises(main.RunError, match="hold another model or optimizer"):
        main.train_and_evaluate(other, run, resume_changed=True)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["1", "2", "3", "4"]  # untouched


def test_nonfinite_loss_stops_naming_the_step_or_is_skipped(tmp_path, data_dir, teacher, monkeypatch, capsys):
    _interrupt_on_train_batch(monkeypatch, 3, poison=True)
    with pytest.raises(main.RunError, match=r"non-finite loss or gradient at step 3 \(grad_norm=nan, loss=nan, "
                                            r"loss_nkd=nan\).*Last good checkpoint: "
                                            r"step 2 .*nan_policy=skip"):
        main.train_and_evaluate(_config(data_dir, teacher), tmp_path / "stop")
    assert sorted(p.name for p in (tmp_path / "stop" / "checkpoints").iterdir()) == ["1", "2"]
    _interrupt_on_train_batch(monkeypatch, 3, poison=True)
    config = _config(data_dir, teacher)
    config.nan_policy = "skip"
    summary = main.train_and_evaluate(config, tmp_path / "skip")
    assert "1 non-finite updates skipped" in capsys.readouterr().out
    assert np.isfinite(summary["result"]["student_loss"])
    # The skipped update left the parameters exactly as after step 2.
    step2, step3 = _final(tmp_path / "skip", 2), _final(tmp_path / "skip", 3)
    assert all(np.array_equal(a, b) for a, b in zip(step2, step3) if a.dtype.kind == "f" and a.ndim > 1)


def test_full_disk_and_unwritable_workdir_are_one_line_errors(tmp_path, data_dir, teacher, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(main.RunError, match="cannot write to the workdir"):
        main.train_and_evaluate(_config(data_dir, teacher), blocker / "run")
    real_save, calls = ocp.CheckpointManager.save, {"n": 0}

    def save(self, step, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", save)
    with pytest.raises(main.RunError, match=r"cannot write the checkpoint of step 3 .*No space left on device.*intact"):
        main.train_and_evaluate(_config(data_dir, teacher), tmp_path / "full")
    assert sorted(p.name for p in (tmp_path / "full" / "checkpoints").iterdir()) == ["1", "2"]


def _start(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-u", "-m", "l2s_jax.main", *args], cwd=cwd, env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_step(proc: subprocess.Popen, step: int) -> str:
    """Read the run's output up to its ``step STEP/`` progress line; returns what was read."""
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.strip().startswith(f"step {step}/"):
            return "".join(seen)
    raise AssertionError(f"the run ended before step {step}: {proc.stderr.read()[-2000:]}")


def _complete_steps(workdir: Path) -> list[int]:
    """The checkpoints a resume can read (Orbax lists only finalized ones, not one cut off mid-write)."""
    options = ocp.CheckpointManagerOptions(read_only=True)
    with ocp.CheckpointManager(workdir / "checkpoints", options=options) as manager:
        return list(manager.all_steps())


def test_sigkill_then_sigterm_then_the_same_command_resumes_exactly(tmp_path, data_dir, teacher):
    """One workdir killed (SIGKILL at a seeded random step), re-run and preempted (SIGTERM), re-run
    to the end: each re-run of the same command resumes, and the final parameters equal an
    uninterrupted run's."""
    args = demo_cli_args(data_dir, f"steps={STEPS},teacher_steps=2") + teacher_cli_args(teacher) + [
        "--config.checkpoint_every_steps=4"]
    done = run_cli(*args, "--workdir", str(tmp_path / "reference"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    if host_memory.child_env().get("GLIBC_TUNABLES") == host_memory.TUNABLES:  # the command's host malloc
        assert f"host malloc GLIBC_TUNABLES={host_memory.TUNABLES}" in done.stdout, done.stdout[-2000:]
    expected = _final(tmp_path / "reference", STEPS)

    # SIGKILL: no chance to save; the re-run resumes from the last complete checkpoint.
    run = tmp_path / "run"
    rng = random.Random(0)
    proc = _start([*args, "--workdir", str(run)], tmp_path)
    _wait_for_step(proc, rng.randint(5, 7))
    proc.kill()
    proc.communicate(timeout=60)
    complete = _complete_steps(run)

    # SIGTERM during the resumed run: finish the step, checkpoint it, say so, exit 3.
    proc = _start([*args, "--workdir", str(run)], tmp_path)
    seen = _wait_for_step(proc, 9)
    assert (f"resumed from step {max(complete)}" in seen) if complete else ("resumed" not in seen), seen
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == main.PREEMPTED_EXIT, err[-2000:]
    stopped = int(err.split("preempted at step ")[1].split(";")[0])
    assert 9 <= stopped < STEPS and "re-run the same command to resume" in err
    assert stopped in _complete_steps(run)

    again = run_cli(*args, "--workdir", str(run), cwd=tmp_path)
    assert again.returncode == 0 and f"resumed from step {stopped}" in again.stdout, again.stderr[-2000:]
    _assert_identical(expected, _final(run, STEPS))
