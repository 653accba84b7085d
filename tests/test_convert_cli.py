"""The converter command line: success output, load_pretrained round trip, and clear failures."""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT

TOOL = REPO_ROOT / "tools" / "convert_weights.py"


def convert(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True, env=env, timeout=600)


def test_cli_converts_and_refuses_to_overwrite(golden_dir, tmp_path):
    out = tmp_path / "slak"
    r = convert("--arch", "slak", "--src", str(golden_dir / "slak/dev_slak_decom_w13.pth"), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "converted" in r.stdout and "[model]" in r.stdout and '"kernel_size": [51, 49, 47, 13, 5]' in r.stdout
    assert (out / "spec.json").exists() and (out / "state").is_dir()
    again = convert("--arch", "slak", "--src", str(golden_dir / "slak/dev_slak_decom_w13.pth"), "--out", str(out))
    assert again.returncode == 2 and "already holds a converted checkpoint" in again.stderr


def test_cli_errors_name_the_problem(golden_dir, tmp_path):
    wrong = convert("--arch", "convnext", "--src", str(golden_dir / "timm_convnext/convnext_mini.pth"),
                    "--key", "nope", "--out", str(tmp_path / "a"))
    assert wrong.returncode == 2 and "nope" in wrong.stderr
    missing = convert("--arch", "slak", "--src", str(tmp_path / "absent.pth"), "--out", str(tmp_path / "b"))
    assert missing.returncode == 2 and "absent.pth" in missing.stderr
    mismatch = convert("--arch", "slak", "--src", str(golden_dir / "timm_convnext/convnext_mini.safetensors"),
                       "--out", str(tmp_path / "c"))
    assert mismatch.returncode == 2 and "--arch convnext" in mismatch.stderr


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_cli_refuses_code_in_pickles(tmp_path):
    marker = tmp_path / "pwned"
    src = tmp_path / "evil.pth"
    src.write_bytes(pickle.dumps({"model": {"w": _Exploit(marker)}}, protocol=2))
    r = convert("--arch", "slak", "--src", str(src), "--out", str(tmp_path / "out"))
    assert r.returncode == 2 and "system" in r.stderr and "Traceback" not in r.stderr
    assert not marker.exists()
    assert not (tmp_path / "out").exists()
