"""tools/benchmark_step.py end to end on the demo case: the table, the notes and the breakdown."""
import importlib.util
import sys

import pytest

from conftest import REPO_ROOT
from run_helpers import run_tool

HEAD = ["case", "batch", "JAX img/s", "compile s", "peak GB", "torch img/s", "1st step s", "peak GB", "JAX/torch",
        "mem ratio"]


def _tool():
    spec = importlib.util.spec_from_file_location("benchmark_step_tool", REPO_ROOT / "tools" / "benchmark_step.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_model_flops_of_the_paper_step():
    # SLaK-T forward (17.4 GFLOP as defined, unfused) + 3 x ConvNeXt-T+BN forward (8.91).
    assert _tool().model_flops("l2s") / 1e9 == pytest.approx(17.1 + 3 * 8.91, rel=0.02)


def test_demo_case_runs_both_frameworks_with_breakdown():
    pytest.importorskip("torch")
    out = run_tool("benchmark_step.py", "--cases", "demo:4", "--repeats", "1", "--torch-modes", "eager",
                   "--breakdown", timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    head = lines[0]
    positions = [head.index(name) for name in HEAD[:5]] + [head.index(n, head.index("|", 30)) for n in HEAD[5:]]
    assert positions == sorted(positions)  # every column, in order
    row = lines[2].replace("|", " ").split()
    assert row[:2] == ["demo", "4"] and len(row) == 10
    assert all(float(v) > 0 for v in row[2:]), row
    text = out.stdout
    assert "PyTorch eager" in text and "JAX compile" in text and "re-run with a warm cache: compile" in text
    assert "GFLOP/image: JAX" in text and "TFLOP/s" in text
    for part in ("input mixing", "teacher forward", "student forward", "student backward", "optimizer + EMA",
                 "sum of parts"):
        cells = next(ln for ln in lines if part in ln).split()[-3:]
        assert all(c != "-" for c in cells), (part, cells)
