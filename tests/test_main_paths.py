"""Every documented training path run as a user runs it, at a tiny size.

* each model family as a student and as a (converted, loaded) teacher, paired so that one run
  covers a student family and another teacher family, across every distillation method, float32
  and bfloat16 compute and storage, FSDP and gradient accumulation;
* ``python -m l2s_jax.main`` in a subprocess: one ``error:`` line and exit status 2 for each
  expected mistake, and a workdir of another config refused by name.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from run_helpers import (FAMILY_MODELS, REPO, demo_cli_args, demo_config, error_lines, run_cli, run_main_in_process,
                         save_teachers, teacher_cli_args, with_teacher)

from l2s_jax import main
from l2s_jax.data import demo
from l2s_jax.models import create, read_spec, save_pretrained

# (student family, teacher family, method, settings): every family is a student once and a
# teacher once; every method, both dtypes on both sides, FSDP and accumulation appear.
CASES = [
    ("resnet", "vit", "fd+nkd", dict(teacher_dtype="bfloat16")),
    ("mobilenetv3", "swin", "kd", dict(student_dtype="bfloat16")),
    ("vit", "cswin", "fd", dict(teacher_param_dtype="bfloat16")),
    ("swin", "convnext", "fd+kd", dict(fsdp=True)),
    ("cswin", "resnet", "nkd", dict(accum_steps=2)),
    ("convnext", "mobilenetv3", "fd+nkd", dict(teacher_dtype="bfloat16", student_dtype="bfloat16")),
    ("slak", "slak", "kd", dict(fsdp=True, accum_steps=2)),
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> dict[str, Path]:
    return save_teachers(tmp_path_factory.mktemp("teachers"))


@pytest.mark.parametrize("student, teacher, method, settings", CASES, ids=[f"{s}<-{t}:{m}" for s, t, m, _ in CASES])
def test_family_pairs_distil_through_main(student, teacher, method, settings, data_dir, teachers, tmp_path):
    name, overrides = FAMILY_MODELS[student]
    config = demo_config(data_dir)
    config.model.update(name=name, label=student, dtype=settings.get("student_dtype", "float32"), depthwise_impl="auto")
    config.model.overrides = overrides  # replaces the demo student's (update() would merge them)
    with_teacher(config, teachers[teacher])
    config.teacher.update(dtype=settings.get("teacher_dtype", "float32"),
                          param_dtype=settings.get("teacher_param_dtype", "float32"))
    config.distill.method = method
    config.sharding.update(fsdp=settings.get("fsdp", False), fsdp_teacher=settings.get("fsdp", False), fsdp_min_size=64)
    config.accum_steps = settings.get("accum_steps", 1)
    summary = main.train_and_evaluate(config, tmp_path / "run")
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["method"] == method and result["total_steps"] == 2 and result["model"] == name
    assert 0.0 <= result["top1"] <= 100.0 and np.isfinite(result["student_loss"])
    losses = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["train/loss"]) for r in losses if "train/loss" in r)
    if "fd" in method:
        assert any("train/loss_fd" in r for r in losses)
    # The teacher is named after its checkpoint when it is not config.teacher.model's family.
    family = read_spec(teachers[teacher])["family"]
    assert summary["teacher"] == (config.teacher.name if family == "slak" else f"{family} ({teacher})")


def test_cli_expected_errors_are_one_line(tmp_path, data_dir, capsys):
    """Each expected mistake: exit status 2 and one ``error:`` line naming it (the CLI's parsing and
    ``main`` in this process; the subprocess below and test_workdir_of_another_config_is_refused_by_name
    run the real entry point)."""
    demo_args = demo_cli_args(data_dir)
    cases = [
        (demo_args + ["--config.optim.lrr=1"], ["--config.optim.lrr=1", "Did you mean \"lr\""]),
        (demo_args + ["--config.distill.method=dkd"], ["unknown distillation method 'dkd'"]),
        (demo_args + ["--config.accum_steps=3"], ["accum_steps=3", "multiple of accum_steps x devices"]),
        (demo_args + ["--config.nan_policy=ignore"], ["nan_policy must be 'stop' or 'skip'"]),
        (demo_args + [f"--config.teacher.checkpoint={tmp_path / 'nowhere'}"],
         ["teacher checkpoint", "python tools/convert_weights.py --arch slak --src FILE"]),
        (["--config", str(REPO / "configs" / "nkd_slak_convnext.py"), f"--config.data.data_dir={tmp_path}"],
         ["dataset 'imagenet2012' is not prepared", "tfds build imagenet2012"]),
        (["--config", str(tmp_path / "missing.py")], ["cannot load the config file", "missing.py"]),
        (["--config", str(REPO / "configs" / "demo.py") + ":bogus=1"], ["unknown config argument 'bogus'"]),
    ]
    # A teacher trained on other classes: named with both class counts.
    wrong = tmp_path / "wrong_teacher"
    kwargs = {**FAMILY_MODELS["convnext"][1], "num_classes": demo.NUM_CLASSES + 3}
    save_pretrained(create("convnext", **kwargs), "convnext", kwargs, wrong)
    cases.append((demo_args + teacher_cli_args(wrong), [f"predicts {demo.NUM_CLASSES + 3} classes"]))
    for i, (args, expected) in enumerate(cases):
        proc = run_main_in_process(*args, "--workdir", str(tmp_path / f"w{i}"), capsys=capsys)
        lines = error_lines(proc)
        assert len(lines) == 1 and all(e in proc.stderr for e in expected), (args, proc.stderr[-2000:])
    # --debug raises the same expected error (the traceback the real entry point then shows).
    with pytest.raises(main.RunError, match="multiple of accum_steps x devices"):
        run_main_in_process(*demo_args, "--config.accum_steps=3", "--debug", "--workdir", str(tmp_path / "w"),
                            capsys=capsys)
    # The real entry point: a mistake in the flags (found before any work) is one line, exit 2.
    proc = run_cli(*demo_args, "--config.optim.lrr=1", "--workdir", str(tmp_path / "w"), cwd=tmp_path)
    assert len(error_lines(proc)) == 1 and "Did you mean \"lr\"" in proc.stderr


def test_workdir_of_another_config_is_refused_by_name(tmp_path, data_dir, teachers):
    """An NKD workdir re-run with KD is refused (naming the key); --resume_changed_config continues it."""
    workdir = tmp_path / "run"
    main.train_and_evaluate(with_teacher(demo_config(data_dir), teachers["slak"]), workdir)
    before = (workdir / "result.json").read_text()
    kd = with_teacher(demo_config(data_dir), teachers["slak"])
    kd.distill.method = "kd"
    with pytest.raises(main.RunError, match=r"distill.method: 'nkd' -> 'kd'.*--resume_changed_config"):
        main.train_and_evaluate(kd, workdir)
    assert (workdir / "result.json").read_text() == before  # nothing of the NKD run was touched
    # Settings that do not change the training (logging cadence, labels) never block a re-run.
    same = with_teacher(demo_config(data_dir), teachers["slak"])
    same.teacher.name = "another label"
    same.log_every_steps = 2
    main.train_and_evaluate(same, workdir)
    # The CLI says the same in one line.
    args = demo_cli_args(data_dir, "steps=2,teacher_steps=2,method=kd") + teacher_cli_args(teachers["slak"])
    lines = error_lines(run_cli(*args, "--workdir", str(workdir), cwd=tmp_path))
    assert len(lines) == 1 and "holds a run of another config" in lines[0] and "distill.method" in lines[0]
    # Asked for explicitly, the run continues with the new method and says so.
    summary = main.train_and_evaluate(kd, workdir, resume_changed=True)
    assert summary["method"] == "kd" and json.loads((workdir / "result.json").read_text())["method"] == "kd"
