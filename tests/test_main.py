"""``python -m l2s_jax.main`` end to end on a shortened demo: gains table, files, exact resume."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from run_helpers import full_demo_config
from tbparse import SummaryReader

from l2s_jax import config_lib, main
from l2s_jax.data import pipeline


def _final_state(workdir: Path, step: int):
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(workdir / "checkpoints" / str(step) / "state")


def test_demo_end_to_end_then_interrupted_run_resumes_exactly(demo_run, tmp_path, monkeypatch, capsys):
    """Teacher from scratch, baseline, NKD student and the gains table (the session's ``demo_run``);
    then the student run is interrupted after 2 of 4 steps and the same call resumes it to the
    uninterrupted params."""
    data_dir, full, summary, out = demo_run.data_dir, demo_run.workdir, demo_run.summary, demo_run.out
    for line in ("training the teacher from scratch", "training the baseline student", "Direct Gain",
                 "Effective Gain (x100)", "img/s | ETA"):
        assert line in out
    assert summary["baseline_source"] == str(full / "baseline")
    direct = summary["distilled_top1"] - summary["baseline_top1"]
    assert f"{direct:.2f}" in summary["table"].splitlines()[4]
    assert (full / "teacher" / "export" / "spec.json").exists()
    assert json.loads((full / "teacher_eval.json").read_text())["top1"] == summary["teacher_top1"]
    rows = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [2, 4]
    assert any("eval/ema_top1" in r for r in rows)
    events = list((full / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    scalars = SummaryReader(str(events[0])).scalars
    loss = scalars[scalars.tag == "train/loss"]
    assert list(loss.step) == [2, 4]
    np.testing.assert_allclose(loss.value, [r["train/loss"] for r in rows if "train/loss" in r], rtol=1e-6)
    assert "eval/ema_top1" in set(scalars.tag)
    assert sorted(p.name for p in (full / "checkpoints").iterdir()) == ["2", "4"]

    resumed = tmp_path / "resumed"
    for part in ("teacher", "baseline"):
        shutil.copytree(full / part, resumed / part)
    real_shard = pipeline.shard_batch
    calls = {"n": 0}

    def crash_on_third_train_batch(batch, mesh, axis="data"):
        if "mask" not in batch:
            calls["n"] += 1
            if calls["n"] == 3:
                raise KeyboardInterrupt("simulated preemption")
        return real_shard(batch, mesh, axis)

    monkeypatch.setattr(pipeline, "shard_batch", crash_on_third_train_batch)
    config = full_demo_config(data_dir)
    config.teacher.evaluate = False  # already evaluated above; its top-1 then comes from its training run
    with pytest.raises(KeyboardInterrupt):
        main.train_and_evaluate(config, resumed)
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir()) == ["2"]
    again = main.train_and_evaluate(config, resumed)
    assert "resumed from step 2" in capsys.readouterr().out
    a, b = _final_state(full, 4), _final_state(resumed, 4)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
    assert again["distilled_top1"] == summary["distilled_top1"]
    assert again["teacher_top1"] == json.loads((full / "teacher" / "result.json").read_text())["top1"]


def test_missing_teacher_checkpoint_says_how_to_convert(tmp_path):
    config = full_demo_config(tmp_path / "tfds")
    config.teacher.train = {}
    config.teacher.update(checkpoint=str(tmp_path / "nowhere"), arch="slak")
    with pytest.raises(main.RunError, match=r"python tools/convert_weights.py --arch slak --src FILE"):
        main.train_and_evaluate(config, tmp_path / "run")
    config.teacher.checkpoint = ""
    with pytest.raises(main.RunError, match="config.teacher.checkpoint is empty"):
        main.train_and_evaluate(config, tmp_path / "run")


def test_gains_table_reproduces_the_papers_arithmetic():
    table = main.gains_table(teacher="SLaK-T", student="ConvNeXt-T", method="NKD", teacher_top1=82.5,
                             baseline_top1=81.0, distilled_top1=82.17)
    lines = table.splitlines()
    assert lines[4].split()[-1] == "1.17" and lines[5].split()[-1] == "1.42"  # Table 1, last row
    no_baseline = main.gains_table(teacher="t", student="s", method="KD", teacher_top1=80.0, baseline_top1=None,
                                   distilled_top1=70.0, paper={"teacher_top1": 82.5, "student_top1": 81.0,
                                                               "distilled_top1": 82.17})
    assert no_baseline.splitlines()[4].split()[-2:] == ["-", "1.17"]


def test_unknown_config_key_is_rejected_before_any_work(tmp_path):
    config = config_lib.base_config()
    config.optim.lrr = 1.0
    with pytest.raises(main.RunError, match="optim.lrr"):
        main.train_and_evaluate(config, tmp_path)
    assert not any(tmp_path.iterdir())
