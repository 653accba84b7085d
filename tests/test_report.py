"""tools/report.py on a real (short) demo run (the session's ``demo_run``), and evaluate.py's
training-workdir loading."""
from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest
from run_helpers import run_tool

from l2s_jax import evaluate, report
from l2s_jax.data import pipeline

REPO = Path(__file__).resolve().parents[1]


def test_report_cli_on_demo_workdir(demo_run, tmp_path):
    workdir = demo_run.workdir
    summary = json.loads((workdir / "summary.json").read_text())
    rob = tmp_path / "rob.json"
    rob.write_text(json.dumps({"models": {"m": {"clean_top1": 70.0, "imagenet_a_top1": 5.5,
                                                "imagenet_c": {"mce": 60.25}}}, "protocol": {}}))
    out = tmp_path / "report"
    proc = run_tool("report.py", "--glob", str(workdir.parent / "*"), "--robustness", str(rob), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = list(csv.reader((out / "report.csv").open()))
    assert rows[0] == list(report.COLUMNS)
    row = dict(zip(rows[0], rows[1]))
    direct = summary["distilled_top1"] - summary["baseline_top1"]
    assert row["Direct Gain"] == f"{direct:.2f}" and row["method"] == "NKD" and row["kernel size"] == "15x15"
    assert row["Effective Gain"] == f"{100 * direct / summary['teacher_top1']:.2f}"
    assert row["teacher top-1"] == f"{summary['teacher_top1']:.2f}" and row["type"] == "CNN"
    md = (out / "report.md").read_text()
    assert "| m | 70.00 | 60.25 | - | - | 5.50 |" in md
    assert (out / "direct_gain.png").stat().st_size > 5000
    again = run_tool("report.py", str(workdir), "--out", str(out))
    assert again.returncode == 2 and "exists" in again.stderr and "Traceback" not in again.stderr


def test_paper_experiment_is_matched():
    spec = importlib.util.spec_from_file_location("_p", REPO / "configs" / "paper.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = json.loads(module.get_config("table=1,student=convnext_t,teacher=slak_t").to_json_best_effort())
    row = report.distillation_row(Path("run"), {"teacher_top1": 82.5, "baseline_top1": 81.0,
                                                "distilled_top1": 82.0}, config)
    assert row["table"] == 1 and row["paper distilled top-1"] == 82.17
    assert row["paper Direct Gain"] == pytest.approx(1.17) and row["kernel size"] == "51x51"
    assert row["Direct Gain"] == pytest.approx(1.0) and row["Effective Gain"] == pytest.approx(100 / 82.5)
    t10 = json.loads(module.get_config("table=10,teacher=vit_s").to_json_best_effort())
    assert report.paper_experiments()[report._signature(t10)]["table"] == 10
    assert report.teacher_kind(t10) == ("Transformer", "-")


def test_evaluate_loads_training_workdir_student_and_ema(demo_run):
    """The final student / EMA of a workdir reproduce the top-1 the trainer recorded."""
    import ml_collections

    workdir = demo_run.workdir
    result = json.loads((workdir / "result.json").read_text())
    config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
    opened = pipeline.open_source(config.data, "test")
    split = evaluate.Split("demo", opened.records, pipeline.eval_transform(config.data, opened))
    for use_ema, key in ((False, "student_top1"), (True, "ema_top1")):
        model = evaluate.load_model(workdir, use_ema=use_ema)
        out = evaluate.evaluate_split(model, split, batch_size=config.eval_batch_size)
        assert out["top1"] == result[key] and out["count"] == len(opened.records)
    with pytest.raises(FileNotFoundError, match="neither a converted checkpoint"):
        evaluate.load_model(workdir / "checkpoints")
