"""The converter command line: success output, load_pretrained round trip, and clear failures."""
from __future__ import annotations

import json
import os
import pickle
import subprocess
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from run_helpers import run_tool


def convert(*args: str) -> subprocess.CompletedProcess:
    """``python tools/convert_weights.py ARGS`` as a user runs it (a fresh interpreter)."""
    return run_tool("convert_weights.py", *args)


@pytest.fixture
def convert_here(capsys):
    """The same command line in this process (``l2s_jax.cli.convert_weights.main``), for the many
    error and output checks: its exit status and captured stdout/stderr."""
    from l2s_jax.cli.convert_weights import main

    def run(*args: str) -> subprocess.CompletedProcess:
        capsys.readouterr()
        try:
            code = main(list(args))
        except SystemExit as e:  # argparse's usage errors
            code = e.code
        out = capsys.readouterr()
        return subprocess.CompletedProcess(["convert_weights.py", *args], code, out.out, out.err)

    return run


def one_line_error(r: subprocess.CompletedProcess) -> str:
    """The CLI's answer to bad input: exit 2 and a single stderr line, no traceback."""
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


def test_cli_converts_and_refuses_to_overwrite(golden_dir, tmp_path, convert_here):
    out = tmp_path / "slak"
    r = convert("--arch", "slak", "--src", str(golden_dir / "slak/dev_slak_decom_w13.pth"), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "converted" in r.stdout and "[model]" in r.stdout and '"kernel_size": [51, 49, 47, 13, 5]' in r.stdout
    assert (out / "spec.json").exists() and (out / "state").is_dir()
    again = convert_here("--arch", "slak", "--src", str(golden_dir / "slak/dev_slak_decom_w13.pth"), "--out", str(out))
    assert again.returncode == 2 and "already holds a converted checkpoint" in again.stderr


def test_cli_errors_name_the_problem(golden_dir, tmp_path, convert_here):
    wrong = convert_here("--arch", "convnext", "--src", str(golden_dir / "timm_convnext/convnext_mini.pth"),
                    "--key", "nope", "--out", str(tmp_path / "a"))
    assert wrong.returncode == 2 and "nope" in wrong.stderr
    missing = convert_here("--arch", "slak", "--src", str(tmp_path / "absent.pth"), "--out", str(tmp_path / "b"))
    assert missing.returncode == 2 and "absent.pth" in missing.stderr
    mismatch = convert_here("--arch", "slak", "--src", str(golden_dir / "timm_convnext/convnext_mini.safetensors"),
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


def vit_state_dict(width: int, classes: int = 10) -> dict[str, np.ndarray]:
    """A random timm-named ViT (patch 16, 32 pixels, one block) of the given width."""
    rng = np.random.default_rng(0)
    shapes = {
        "cls_token": (1, 1, width), "pos_embed": (1, 5, width),
        "patch_embed.proj.weight": (width, 3, 16, 16), "patch_embed.proj.bias": (width,),
        "blocks.0.norm1.weight": (width,), "blocks.0.norm1.bias": (width,),
        "blocks.0.attn.qkv.weight": (3 * width, width), "blocks.0.attn.qkv.bias": (3 * width,),
        "blocks.0.attn.proj.weight": (width, width), "blocks.0.attn.proj.bias": (width,),
        "blocks.0.norm2.weight": (width,), "blocks.0.norm2.bias": (width,),
        "blocks.0.mlp.fc1.weight": (4 * width, width), "blocks.0.mlp.fc1.bias": (4 * width,),
        "blocks.0.mlp.fc2.weight": (width, 4 * width), "blocks.0.mlp.fc2.bias": (width,),
        "norm.weight": (width,), "norm.bias": (width,), "head.weight": (classes, width), "head.bias": (classes,),
    }
    return {k: (0.1 * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}


def test_vit_heads_are_never_guessed(tmp_path, convert_here):
    src = tmp_path / "vit64.safetensors"
    save_file(vit_state_dict(64), str(src))
    refused = one_line_error(convert_here("--arch", "vit", "--src", str(src), "--out", str(tmp_path / "a")))
    assert "num_heads" in refused and "--override num_heads=" in refused and "width 64" in refused
    assert not (tmp_path / "a").exists()
    ok = convert_here("--arch", "vit", "--src", str(src), "--out", str(tmp_path / "a"), "--override", "num_heads=1")
    assert ok.returncode == 0, ok.stderr
    assert "  num_heads = 1  [override]" in ok.stdout and "  embed_dim = 64  [read from shapes]" in ok.stdout
    spec = json.loads((tmp_path / "a" / "spec.json").read_text())
    assert spec["config"]["num_heads"] == 1 and spec["provenance"]["hyperparameters"]["num_heads"] == "override"

    src = tmp_path / "vit384.safetensors"  # a published width: its default, said so
    save_file(vit_state_dict(384), str(src))
    ok = convert_here("--arch", "vit", "--src", str(src), "--out", str(tmp_path / "b"))
    assert ok.returncode == 0, ok.stderr
    assert "  num_heads = 6  [published default (ViT-S, width 384)]" in ok.stdout


def test_bad_input_gets_one_line(golden_dir, tmp_path, convert_here):
    good = golden_dir / "timm_resnet/resnet_mini.pth"
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    line = one_line_error(convert_here("--arch", "resnet", "--src", str(truncated), "--out", str(tmp_path / "a")))
    assert "truncated.pth" in line and "truncated" in line.split("truncated.pth", 1)[1]

    line = one_line_error(convert_here("--arch", "resnet", "--src", str(tmp_path), "--out", str(tmp_path / "a")))
    assert "is a directory" in line

    line = one_line_error(convert_here("--arch", "resnet", "--src", str(good), "--out", str(tmp_path / "a"),
                                  "--override", "foo=1"))
    assert "'foo'" in line and "depths" in line and "num_classes" in line

    line = one_line_error(convert_here("--arch", "resnet", "--src", str(good), "--out", str(tmp_path / "a"),
                                  "--override", "depths=bad"))
    assert "depths=bad" in line and "must be JSON" in line and "depths=[2,2,6,2]" in line

    existing = tmp_path / "a_file"
    existing.write_text("mine")
    line = one_line_error(convert_here("--arch", "resnet", "--src", str(good), "--out", str(existing)))
    assert "a_file" in line and "is an existing file" in line and existing.read_text() == "mine"

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    line = one_line_error(convert_here("--arch", "resnet", "--src", str(good), "--out", str(busy)))
    assert "not empty" in line and [p.name for p in busy.iterdir()] == ["notes.txt"]
    assert not (tmp_path / "a").exists()

    loud = convert("--arch", "resnet", "--src", str(good), "--out", str(tmp_path / "a"), "--override", "foo=1",
                   "--verbose")  # the real entry point: the traceback is printed
    assert loud.returncode != 0 and "Traceback" in loud.stderr


def test_missing_keys_are_named_as_in_the_file(golden_dir, tmp_path, convert_here):
    """A timm-named ConvNeXt file is told which timm-named key it lacks (not the internal name)."""
    sd = load_file(golden_dir / "timm_convnext/convnext_mini.safetensors")
    del sd["stages.0.blocks.0.mlp.fc1.weight"]
    sd["stages.0.blocks.0.extra.weight"] = np.zeros(3, np.float32)
    src = tmp_path / "broken.safetensors"
    save_file(sd, str(src))
    r = convert_here("--arch", "convnext", "--src", str(src), "--out", str(tmp_path / "out"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "stages.0.blocks.0.mlp.fc1.weight" in r.stderr and "stages.0.blocks.0.extra.weight" in r.stderr
    assert "pwconv1" not in r.stderr and "stages.0.0." not in r.stderr
    assert not (tmp_path / "out").exists()


def test_source_key_inverts_the_renaming(golden_dir):
    from l2s_jax.models import get_family

    for arch, rel in (("convnext", "timm_convnext/convnext_mini.safetensors"),
                      ("swin", "timm_swin/swin_mini.safetensors")):
        fam, sd = get_family(arch), load_file(golden_dir / rel)
        renamed = fam.remap_keys(sd)
        assert [fam.source_key(sd, k) for k in renamed] == list(sd)
    # The original Swin layout (PatchMerging at the end of a stage, classifier "head").
    fam, sd = get_family("swin"), load_file(golden_dir / "timm_swin/swin_mini.safetensors")
    original = {}
    for k, v in sd.items():
        if ".downsample." in k:
            i, rest = k.split(".downsample.")
            k = f"layers.{int(i.split('.')[1]) - 1}.downsample.{rest}"
        original[k.replace("head.fc.", "head.")] = v
    assert [fam.source_key(original, k) for k in fam.remap_keys(original)] == list(original)


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    """save_pretrained writes into a temporary sibling: a failure midway leaves no output folder."""
    import orbax.checkpoint as ocp

    from flax import nnx

    from l2s_jax.models import save_pretrained

    model = nnx.Linear(2, 2, rngs=nnx.Rngs(0))

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ocp.StandardCheckpointer, "save", fail)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(model, "resnet", {}, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
