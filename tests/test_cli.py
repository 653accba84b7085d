"""Every console script of setup.py points at an importable callable."""
import importlib
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_console_scripts_resolve():
    scripts = re.findall(r'"(l2s-[a-z]+)=([\w.]+):(\w+)"', (REPO / "setup.py").read_text())
    assert {s for s, _, _ in scripts} == {"l2s-train", "l2s-convert", "l2s-erf", "l2s-evaluate", "l2s-report"}
    for _, module, attr in scripts:
        assert callable(getattr(importlib.import_module(module), attr)), (module, attr)
