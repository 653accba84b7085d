"""Shared pieces of the tests that run ``l2s_jax.main`` and the tools: tiny configs, teachers, subprocesses."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from l2s_jax.data import demo
from l2s_jax.models import MODELS, create, save_pretrained

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

def _load_demo_module():
    spec = importlib.util.spec_from_file_location("_demo_cfg_paths", REPO / "configs" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def demo_config(data_dir: Path, arg: str = "steps=2,teacher_steps=2"):
    """configs/demo.py shrunk to 32 train / 16 test images and batches of 16."""
    c = _load_demo_module().get_config(arg)
    c.data.update(data_dir=str(data_dir), demo_num_train=32, demo_num_test=16)
    c.update(batch_size=16, eval_batch_size=16, checkpoint_every_steps=2, log_every_steps=1, ema_decay=0.0)
    return c


def full_demo_config(data_dir: Path, steps: int = 4):
    """configs/demo.py end to end (teacher from scratch, baseline, NKD student) on 96 / 40 images, with EMA."""
    c = _load_demo_module().get_config(f"steps={steps},teacher_steps=4")
    c.data.update(data_dir=str(data_dir), demo_num_train=96, demo_num_test=40)
    c.teacher.train.model.overrides.update(dims=(8, 16, 16, 16), depths=(1, 1, 1, 1))
    c.model.overrides.update(dims=(8, 16, 16, 16))
    c.update(batch_size=16, eval_batch_size=16, checkpoint_every_steps=2, log_every_steps=2, keep_checkpoints=2,
             ema_decay=0.9)
    return c


def demo_cli_args(data_dir: Path, arg: str = "steps=2,teacher_steps=2") -> list[str]:
    """The command-line flags that give :func:`demo_config` (teacher and baseline set separately)."""
    return ["--config", str(REPO / "configs" / "demo.py") + f":{arg}", f"--config.data.data_dir={data_dir}",
            "--config.data.demo_num_train=32", "--config.data.demo_num_test=16", "--config.batch_size=16",
            "--config.eval_batch_size=16", "--config.checkpoint_every_steps=2", "--config.log_every_steps=1",
            "--config.ema_decay=0.0"]


def with_teacher(config, checkpoint: Path):
    """``config`` distilling from a converted ``checkpoint`` with known teacher and baseline top-1."""
    config.teacher.update(checkpoint=str(checkpoint), evaluate=False, top1=50.0)
    config.baseline.update(train=False, top1=40.0)
    return config


def teacher_cli_args(checkpoint: Path) -> list[str]:
    return [f"--config.teacher.checkpoint={checkpoint}", "--config.teacher.evaluate=False", "--config.teacher.top1=50",
            "--config.baseline.train=False", "--config.baseline.top1=40"]


def save_teachers(root: Path, families=None) -> dict[str, Path]:
    """A converted checkpoint (random weights, the demo's classes) of each family."""
    out = {}
    for family in families or FAMILY_MODELS:
        name, kwargs = FAMILY_MODELS[family]
        kwargs = {**MODELS.get(name, (name, {}))[1], **kwargs, "num_classes": demo.NUM_CLASSES}
        out[family] = save_pretrained(create(name, seed=1, **kwargs), MODELS.get(name, (name, {}))[0], kwargs,
                                      root / family, provenance={"test": family})
    return out


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of a command as a user runs it: this checkout importable, one CPU device."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
            "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", **extra}


def run_cli(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m l2s_jax.main ARGS`` in a fresh interpreter (:func:`cli_env`)."""
    return subprocess.run([sys.executable, "-m", "l2s_jax.main", *args], cwd=cwd, env=cli_env(), capture_output=True,
                          text=True, timeout=timeout)


def run_tool(script: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python tools/<script> ARGS`` in a fresh interpreter (:func:`cli_env`)."""
    return subprocess.run([sys.executable, str(REPO / "tools" / script), *args], env=cli_env(), capture_output=True,
                          text=True, timeout=timeout)


def run_main_in_process(*args: str, capsys) -> subprocess.CompletedProcess:
    """``python -m l2s_jax.main ARGS`` in this process, for its error paths: the flag parsing and
    ``main`` that ``l2s_jax.main.cli`` hands to absl's ``app.run``, with stdout/stderr captured and
    ``SystemExit`` as the exit status. Any other exception propagates (a traceback the user would see)."""
    from absl import flags

    from l2s_jax import main

    argv = ["l2s_jax.main", *args]
    saved_argv = sys.argv

    def reset() -> None:  # absl's flags are global: forget the previous call's values and --config.* flags
        for name in [n for n in flags.FLAGS if n.startswith("config.")]:
            delattr(flags.FLAGS, name)
        flags.FLAGS.unparse_flags()

    reset()
    capsys.readouterr()
    code = 0
    sys.argv = argv  # ml_collections reads the --config.* overrides from sys.argv
    try:
        main.main(main.parse_flags(argv))
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = saved_argv
        reset()
    out = capsys.readouterr()
    return subprocess.CompletedProcess(argv, code, out.out, out.err)


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    """The ``error:`` lines of a run that must have failed with exit status 2 and no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]
