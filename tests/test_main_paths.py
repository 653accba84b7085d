"""Every documented training path run as a user runs it, at a tiny size.

* each model family as a student and as a (converted, loaded) teacher, paired so that one run
  covers a student family and another teacher family, across every distillation method, float32
  and bfloat16 compute and storage, FSDP and gradient accumulation;
* ``python -m l2s_jax.main`` in a subprocess: one ``error:`` line and exit status 2 for each
  expected mistake, and a workdir of another config refused by name.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from l2s_jax import main
from l2s_jax.data import demo
from l2s_jax.models import MODELS, create, read_spec, save_pretrained

REPO = Path(__file__).resolve().parents[1]
SIZE = 32
# One small member of every family at the demo's 32 px (ViT/Swin/CSWin sized for it).
FAMILY_MODELS = {
    "slak": ("slak", dict(depths=(1, 1, 1, 1), dims=(8, 16, 16, 16), kernel_size=(7, 5, 3, 3, 3), decompose=True,
                          bn=True, sparse=False, width_factor=1.0)),
    "convnext": ("convnext", dict(depths=(1, 1, 1, 1), dims=(8, 16, 16, 16))),
    "resnet": ("resnet_mini", {}),
    "mobilenetv3": ("mobilenetv3_mini", {}),
    "vit": ("vit_mini", dict(img_size=SIZE, patch_size=8, embed_dim=32, num_heads=2)),
    "swin": ("swin_mini", dict(img_size=SIZE, window_size=4)),
    "cswin": ("cswin_mini", dict(img_size=SIZE, split_size=(1, 2, 2, 1))),
}
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


def _demo_config(data_dir: Path, arg: str = "steps=2,teacher_steps=2"):
    spec = importlib.util.spec_from_file_location("_demo_cfg_paths", REPO / "configs" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config(arg)
    c.data.update(data_dir=str(data_dir), demo_num_train=32, demo_num_test=16)
    c.update(batch_size=16, eval_batch_size=16, checkpoint_every_steps=2, log_every_steps=1, ema_decay=0.0)
    return c


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> dict[str, Path]:
    """A converted checkpoint (random weights, the demo's classes) of each family."""
    root = tmp_path_factory.mktemp("teachers")
    out = {}
    for family, (name, kwargs) in FAMILY_MODELS.items():
        kwargs = {**MODELS.get(name, (name, {}))[1], **kwargs, "num_classes": demo.NUM_CLASSES}
        out[family] = save_pretrained(create(name, seed=1, **kwargs), MODELS.get(name, (name, {}))[0], kwargs,
                                      root / family, provenance={"test": family})
    return out


@pytest.mark.parametrize("student, teacher, method, settings", CASES, ids=[f"{s}<-{t}:{m}" for s, t, m, _ in CASES])
def test_family_pairs_distil_through_main(student, teacher, method, settings, data_dir, teachers, tmp_path):
    name, overrides = FAMILY_MODELS[student]
    config = _demo_config(data_dir)
    config.model.update(name=name, label=student, overrides=overrides, dtype=settings.get("student_dtype", "float32"),
                        depthwise_impl="auto")
    config.teacher.update(checkpoint=str(teachers[teacher]), evaluate=False, top1=50.0,
                          dtype=settings.get("teacher_dtype", "float32"),
                          param_dtype=settings.get("teacher_param_dtype", "float32"))
    config.distill.method = method
    config.baseline.update(train=False, top1=40.0)
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


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    return subprocess.run([sys.executable, "-m", "l2s_jax.main", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def _error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


def test_cli_expected_errors_are_one_line(tmp_path, data_dir, teachers):
    demo_args = ["--config", str(REPO / "configs" / "demo.py") + ":steps=2,teacher_steps=2",
                 f"--config.data.data_dir={data_dir}", "--config.data.demo_num_train=32",
                 "--config.data.demo_num_test=16"]
    cases = [
        (demo_args + ["--config.optim.lrr=1"], ["--config.optim.lrr=1", "Did you mean \"lr\""]),
        (demo_args + ["--config.distill.method=dkd"], ["unknown distillation method 'dkd'"]),
        (demo_args + ["--config.accum_steps=3"], ["accum_steps=3", "multiple of accum_steps x devices"]),
        (demo_args + [f"--config.teacher.checkpoint={tmp_path / 'nowhere'}"],
         ["teacher checkpoint", "python tools/convert_weights.py --arch slak --src FILE"]),
        (["--config", str(REPO / "configs" / "nkd_slak_convnext.py"), f"--config.data.data_dir={tmp_path}"],
         ["dataset 'imagenet2012' is not prepared", "tfds build imagenet2012"]),
        (["--config", str(tmp_path / "missing.py")], ["cannot load the config file", "missing.py"]),
        (["--config", str(REPO / "configs" / "demo.py") + ":bogus=1"], ["unknown config argument 'bogus'"]),
    ]
    for args, expected in cases:
        proc = _cli(*args, "--workdir", str(tmp_path / "w"), cwd=tmp_path)
        lines = _error_lines(proc)
        assert len(lines) == 1 and all(e in proc.stderr for e in expected), (args, proc.stderr[-2000:])
    # A teacher trained on other classes: named with both class counts.
    wrong = tmp_path / "wrong_teacher"
    kwargs = {**FAMILY_MODELS["convnext"][1], "num_classes": demo.NUM_CLASSES + 3}
    save_pretrained(create("convnext", **kwargs), "convnext", kwargs, wrong)
    proc = _cli(*demo_args, f"--config.teacher.checkpoint={wrong}", "--config.teacher.evaluate=False",
                "--config.baseline.train=False", "--workdir", str(tmp_path / "w2"), cwd=tmp_path)
    assert len(_error_lines(proc)) == 1 and f"predicts {demo.NUM_CLASSES + 3} classes" in proc.stderr
    assert "--debug" in main.__doc__
    proc = _cli(*demo_args, "--config.accum_steps=3", "--debug", "--workdir", str(tmp_path / "w3"), cwd=tmp_path)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "RunError" in proc.stderr


def test_workdir_of_another_config_is_refused_by_name(tmp_path, data_dir, teachers):
    """An NKD workdir re-run with KD is refused (naming the key); --resume_changed_config continues it."""
    workdir = tmp_path / "run"
    config = _demo_config(data_dir)
    config.teacher.update(checkpoint=str(teachers["slak"]), evaluate=False, top1=50.0)
    config.baseline.update(train=False, top1=40.0)
    main.train_and_evaluate(config, workdir)
    before = (workdir / "result.json").read_text()
    kd = _demo_config(data_dir)
    kd.teacher.update(checkpoint=str(teachers["slak"]), evaluate=False, top1=50.0)
    kd.baseline.update(train=False, top1=40.0)
    kd.distill.method = "kd"
    with pytest.raises(main.RunError, match=r"distill.method: 'nkd' -> 'kd'.*--resume_changed_config"):
        main.train_and_evaluate(kd, workdir)
    assert (workdir / "result.json").read_text() == before  # nothing of the NKD run was touched
    # Settings that do not change the training (logging cadence, labels) never block a re-run.
    same = _demo_config(data_dir)
    same.teacher.update(checkpoint=str(teachers["slak"]), evaluate=False, top1=50.0, name="another label")
    same.baseline.update(train=False, top1=40.0)
    same.log_every_steps = 2
    main.train_and_evaluate(same, workdir)
    # The CLI says the same in one line.
    args = ["--config", str(REPO / "configs" / "demo.py") + ":steps=2,teacher_steps=2,method=kd",
            f"--config.data.data_dir={data_dir}", "--config.data.demo_num_train=32", "--config.data.demo_num_test=16",
            "--config.batch_size=16", "--config.eval_batch_size=16", "--config.ema_decay=0.0",
            f"--config.teacher.checkpoint={teachers['slak']}", "--config.teacher.evaluate=False",
            "--config.teacher.top1=50", "--config.baseline.train=False", "--config.baseline.top1=40",
            "--workdir", str(workdir)]
    lines = _error_lines(_cli(*args, cwd=tmp_path))
    assert len(lines) == 1 and "holds a run of another config" in lines[0] and "distill.method" in lines[0]
    # Asked for explicitly, the run continues with the new method and says so.
    summary = main.train_and_evaluate(kd, workdir, resume_changed=True)
    assert summary["method"] == "kd" and json.loads((workdir / "result.json").read_text())["method"] == "kd"
    assert jax.device_count() >= 1
