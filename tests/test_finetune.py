"""configs/finetune_cifar.py through the trainer: fresh head, every other weight from init=DIR."""
from __future__ import annotations

import importlib.util
import io
import json
import os
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from l2s_jax import main

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(os.environ.get("L2S_GOLDEN_DIR", REPO.parent / "shared" / "golden"))


def _config(arg: str):
    spec = importlib.util.spec_from_file_location("_ft_cfg", REPO / "configs" / "finetune_cifar.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


@pytest.mark.skipif(not (GOLDEN / "convnext_bn" / "dev_convnext_bn.pth").exists(), reason="no golden checkpoint")
def test_finetune_cifar10_from_converted_checkpoint(tmp_path, capsys):
    sys.path.insert(0, str(REPO / "tests"))
    from test_evaluate import _stand_in

    from l2s_jax.convert import convert_checkpoint
    from l2s_jax.models import load_pretrained

    rng = np.random.default_rng(0)

    def recs(n):
        out = []
        for i in range(n):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG")
            out.append((buf.getvalue(), i % 10))
        return out

    _stand_in("cifar10", tmp_path / "tfds", {"train": recs(16), "test": recs(8)}, num_classes=10, fmt="png")
    ckpt = tmp_path / "ckpt"
    convert_checkpoint("slak", GOLDEN / "convnext_bn" / "dev_convnext_bn.pth", ckpt)
    c = _config(f"dataset=cifar10,init={ckpt},size=32,batch_size=8")
    c.model.overrides = dict(dims=(16, 24, 32, 48), depths=(2, 1, 2, 1))
    c.data.update(data_dir=str(tmp_path / "tfds"), num_workers=0)
    c.update(total_steps=2, log_every_steps=1, checkpoint_every_steps=2, eval_every_epochs=0.0)
    assert c.optim.name == "sgd" and c.optim.lr == 1e-3 and c.optim.momentum == 0.9 and c.epochs == 50
    summary = main.train_and_evaluate(c, tmp_path / "run")
    assert "config.init: loaded" in capsys.readouterr().out
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert summary["distilled_top1"] == result["top1"] and 0 <= result["top1"] <= 100
    from l2s_jax import report

    assert report.main([str(tmp_path / "run"), "--out", str(tmp_path / "report")]) == 0  # Table 12
    md = (tmp_path / "report" / "report.md").read_text()
    assert f"| {ckpt} | {result['top1']:.2f} | - |" in md and "Table 12" in md

    # every non-head weight started from the checkpoint: step-0 student == golden except the head
    student = main.build_student(c, 10, 1, None).model
    golden = load_pretrained(ckpt)
    flat = lambda m: {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(
        nnx.state(m, nnx.Param).to_pure_dict())[0]}
    s, g = flat(student), flat(golden)
    same = [k for k in s if np.shape(s[k]) == np.shape(g[k]) and np.array_equal(s[k], g[k])]
    assert len(same) == len(s) - 2 and all("head" in k for k in set(s) - set(same))

    bad = _config(f"dataset=cifar10,init={ckpt},size=32")  # default widths do not fit the checkpoint
    with pytest.raises(main.RunError, match=r"config.init: \d+ parameter\(s\) do not fit convnext_tiny_bn: "):
        main.build_student(bad, 10, 1, None)
