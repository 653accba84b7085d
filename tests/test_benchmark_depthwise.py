"""tools/benchmark_depthwise.py: the zoo's depthwise shapes, the peak table, a one-shape CPU run."""
import csv
import functools
import importlib.util
import sys

from conftest import REPO_ROOT
from run_helpers import run_tool


@functools.lru_cache(maxsize=None)
def _tool():
    spec = importlib.util.spec_from_file_location("benchmark_depthwise_tool", REPO_ROOT / "tools" / "benchmark_depthwise.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_zoo_shapes_are_traced_from_the_models():
    tool = _tool()
    slak = tool.zoo_shapes(["slak_tiny"])
    keys = {(s.h, s.c, s.kh, s.kw) for s in slak}
    for h, c, k in ((56, 124, 51), (28, 249, 49), (14, 499, 47), (7, 998, 13)):  # width 1.3
        assert {(h, c, k, k), (h, c, k, 5), (h, c, 5, k), (h, c, 5, 5)} <= keys  # fused + branches
    assert len(slak) == 16
    mobile = tool.zoo_shapes(["mobilenetv3_large_100"])
    assert tool.Shape(1, 112, 112, 64, 3, 3, 1, 1, 2) in mobile  # strided: op at stride 1, then subsampled
    cswin = tool.zoo_shapes(["cswin_tiny_224"])
    assert tool.Shape(56, 56, 1, 32, 3, 3, 1, 1, 1) in cswin  # LePE on each 56x1 stripe
    both = tool.zoo_shapes(["convnext_tiny", "convnext_tiny_bn"])
    assert len(both) == 4 and all(u.models == ["convnext_tiny", "convnext_tiny_bn"] for u in both.values())
    assert tool.Shape(1, 14, 14, 499, 47, 47, 23, 23, 1).flops(2) == 2 * 2 * 14 * 14 * 499 * 27 * 27


def test_one_shape_cpu_run(tmp_path):
    out = tmp_path / "dw.csv"
    r = run_tool("benchmark_depthwise.py", "--shapes", "convnext_tiny", "--limit", "1", "--batch", "1",
                 "--repeats", "1", "--impls", "direct,dft,shift", "--csv", str(out))
    assert r.returncode == 0, r.stderr
    text = r.stdout
    for needle in ("wall-clock ms", "GFLOP/s", "process CPU ms", "fastest implementation vs auto", "best/torch",
                   "1x56x56x96 7x7", "fwdbwd"):
        assert needle in text, needle
    header = next(line for line in text.splitlines() if line.startswith("models ") and "direct" in line)
    assert header.split()[5:9] == ["direct", "dft", "shift", "torch"]
    rows = list(csv.DictReader(out.open()))
    assert {(r["mode"], r["impl"]) for r in rows} == {(m, i) for m in ("fwd", "fwdbwd")
                                                      for i in ("direct", "dft", "shift", "torch")}
    assert all(r["status"] == "ok" and float(r["wall_ms"]) > 0 for r in rows)


def test_bad_arguments_exit_2():
    r = run_tool("benchmark_depthwise.py", "--shapes", "slak_huge")
    assert r.returncode == 2 and r.stderr.startswith("error: unknown --shapes entry 'slak_huge'")
    assert len(r.stderr.strip().splitlines()) == 1
