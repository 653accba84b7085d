"""Every config file and argument parses, validates and builds its models (shapes only)."""
from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path

import pytest
from absl import flags
from flax import nnx
from ml_collections import config_flags

from l2s_jax import config_lib, train
from l2s_jax.models import create

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_cfg_{name}", CONFIGS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PAPER = _load("paper")
CASES = ([("paper", a) for a in PAPER.experiments()]
         + [("nkd_slak_convnext", None), ("nkd_slak_convnext", "epochs=300,T=2,variant=official"),
            ("demo", None), ("demo", "method=fd+nkd,steps=10")])


@functools.lru_cache(maxsize=None)
def _abstract(name: str, overrides: str, num_classes: int) -> nnx.Module:
    return nnx.eval_shape(lambda: create(name, num_classes=num_classes, **json.loads(overrides)))


@functools.lru_cache(maxsize=None)
def _channels(name: str, overrides: str, num_classes: int, size: int, stages: int) -> tuple[int, ...]:
    return tuple(train.feature_channels(_abstract(name, overrides, num_classes), stages))


def _overrides(d) -> str:
    return json.dumps(d.to_dict() if hasattr(d, "to_dict") else dict(d), sort_keys=True)


def test_paper_covers_every_table_row():
    args = PAPER.experiments()
    assert len(args) == len(set(args))
    # Table rows of the paper (teacher x student x method x L) plus one baseline per table/student.
    rows = {1: 11 + 2, 2: 9 + 2, 3: 8 + 1, 4: 8 + 1, 5: 4 + 1, 10: 5 + 1, 11: 5 + 1}
    for table, count in rows.items():
        assert sum(a.startswith(f"table={table},") for a in args) == count, table


@pytest.mark.parametrize("name,arg", CASES, ids=[f"{n}:{a}" for n, a in CASES])
def test_config_parses_validates_and_builds(name, arg):
    config = _load(name).get_config(arg)
    config_lib.validate(config)
    config.lock()
    num_classes = 4 if config.data.name == "demo" else 1000
    size = config.data.image_size
    model = dict(config.model.overrides)
    student = _abstract(config.model.name, _overrides(model), num_classes)
    assert student is not None
    method = config.distill.method
    if name == "demo":
        teacher_cfg = config.teacher.train.model
        teacher_name, teacher_overrides = teacher_cfg.name, _overrides(teacher_cfg.overrides)
    else:
        teacher_name, teacher_overrides = config.teacher.model, "{}"
    if method != "ce":
        _abstract(teacher_name, teacher_overrides, num_classes)
        assert config.teacher.checkpoint or config.teacher.train
    if method.startswith("fd"):
        stages = config.distill.fd_stages
        t = _channels(teacher_name, teacher_overrides, num_classes, size, stages)
        s = _channels(config.model.name, _overrides(model), num_classes, size, stages)
        assert len(t) == len(s) == stages
    if name == "paper":
        assert config.paper.student_top1 is not None
        assert (config.paper.distilled_top1 is None) == (method == "ce")


def test_table_settings():
    t1 = PAPER.get_config("table=1,student=convnext_t,teacher=slak_t")
    assert (t1.distill.method, t1.epochs, t1.optim.name, t1.optim.lr) == ("nkd", 120, "adamw", 4e-3)
    assert t1.batch_size == 4096 and t1.optim.warmup_epochs == 20 and t1.optim.min_lr == 1e-6
    assert t1.model.name == "convnext_tiny_bn" and t1.model.bn_stat_groups == 1 and t1.ema_decay == 0.9999
    assert t1.teacher.checkpoint == "checkpoints/slak_tiny" and t1.paper.distilled_top1 == 82.17
    t4 = PAPER.get_config("table=4,teacher=swin_t,L=3")
    assert (t4.distill.method, t4.distill.fd_stages, t4.model.name) == ("fd", 3, "resnet50")
    t5 = PAPER.get_config("table=5,teacher=convnext_t")
    assert t5.epochs == 300 and t5.paper.distilled_top1 == 80.09
    t11 = PAPER.get_config("table=11,teacher=slak_t,T=5")
    assert (t11.optim.name, t11.model.name, t11.distill.nkd_temperature) == ("lamb", "mobilenetv3_large_100", 5.0)
    base = PAPER.get_config("table=2,student=resnet50,teacher=none")
    assert base.distill.method == "ce" and base.model.bn_stat_groups == 0
    headline = _load("nkd_slak_convnext").get_config(None)
    assert headline.distill.to_dict() == t1.distill.to_dict() and headline.model.to_dict() == t1.model.to_dict()
    assert headline.optim.to_dict() == t1.optim.to_dict() and headline.aug.to_dict() == t1.aug.to_dict()


@pytest.mark.parametrize("arg,match", [
    ("table=4,teacher=vit_s", "no 'vit_s' teacher"),
    ("table=1,student=mobilenetv3", "no rows"),
    ("table=6", "covers tables"),
    ("table=1,stduent=resnet50", "unknown config argument 'stduent'"),
    ("table=2,method=fd", "table 3 only"),
])
def test_bad_arguments_are_rejected(arg, match):
    with pytest.raises(ValueError, match=match):
        PAPER.get_config(arg)


def _parse_command_line(*overrides: str):
    """``--config=configs/demo.py OVERRIDES`` as ``python -m l2s_jax.main`` parses it."""
    argv = ["prog", f"--config={CONFIGS / 'demo.py'}:steps=7", *overrides]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True, sys_argv=argv)
    fv(argv)
    return fv.config


def test_command_line_typo_is_rejected_with_the_key_name():
    config = _parse_command_line("--config.optim.lr=0.5")
    assert config.optim.lr == 0.5 and config.total_steps == 7
    with pytest.raises(Exception, match="lrr"):
        _parse_command_line("--config.optim.lrr=0.5")


def test_typo_inside_a_config_file_is_rejected_with_the_key_name():
    config = config_lib.base_config()
    config.optim.lrr = 0.5
    with pytest.raises(ValueError, match=r"'optim\.lrr' \(did you mean 'optim\.lr'\?\)"):
        config_lib.validate(config)
    config = config_lib.base_config()
    config.distill.method = "nkdd"
    with pytest.raises(ValueError, match="nkdd"):
        config_lib.validate(config)
    with pytest.raises(ValueError, match="optim.lrr"):
        config_lib.apply_overrides(config_lib.base_config(), {"optim": {"lrr": 1.0}})
    config = config_lib.base_config()
    config.teacher.train = {"model": {"name": "slak"}, "totl_steps": 5}
    with pytest.raises(ValueError, match=r"config.teacher.train: override 'totl_steps'"):
        config_lib.validate(config)
