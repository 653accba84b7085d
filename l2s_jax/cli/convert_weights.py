"""Convert a PyTorch / timm / safetensors / npz checkpoint into an l2s_jax model directory.

    python tools/convert_weights.py --arch slak --src SLaK_tiny_checkpoint.pth --out ckpt/slak_tiny

Reads .pth (zip and legacy formats) without executing code from the file, .safetensors and
.npz; finds the weights inside the usual wrappers (``--key`` to choose); infers depths, widths,
kernel sizes, decomposition and classes from tensor names and shapes; writes ``spec.json`` and an
Orbax checkpoint that ``l2s_jax.models.load_pretrained(OUT)`` returns as a ready model.

Every hyperparameter is printed with its source: read from shapes, a published default (e.g.
the heads of a ViT of a published width), or --override. What the weights cannot determine and
no published configuration matches (e.g. the heads of a ViT of width 64) is refused, naming the
--override to pass. Errors are one line (exit 2); --verbose shows the traceback.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from l2s_jax.models import FAMILIES, load_pretrained


def parse_overrides(items: list[str]) -> dict:
    """``NAME=JSON`` strings -> {NAME: value}; ValueError naming the bad item."""
    overrides = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ValueError(f"--override expects NAME=JSON, got {item!r} (e.g. --override num_heads=6)")
        try:
            overrides[name] = json.loads(value)
        except json.JSONDecodeError:
            raise ValueError(f"--override {item}: the value must be JSON, e.g. depths=[2,2,6,2] or num_heads=6 "
                             "(quote strings: name=\"\\\"text\\\"\")") from None
    return overrides


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", required=True, choices=sorted(FAMILIES), help="model family of the checkpoint")
    parser.add_argument("--src", required=True, help="checkpoint file (.pth/.pt/.bin, .safetensors, .npz)")
    parser.add_argument("--out", required=True, help="output directory (must not exist yet, or be empty)")
    parser.add_argument("--key", default=None, help="entry holding the weights (e.g. model, model_ema, state_dict_ema)")
    parser.add_argument("--override", action="append", default=[], metavar="NAME=JSON",
                        help="constructor argument the shapes cannot determine, e.g. --override num_heads=[2,4,8,16]")
    parser.add_argument("--verbose", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)

    from l2s_jax.convert import convert_checkpoint
    from l2s_jax.io.safe_pickle import UnsafeCheckpointError

    start = time.time()
    try:
        overrides = parse_overrides(args.override)
        out = convert_checkpoint(args.arch, args.src, args.out, key=args.key, overrides=overrides)
    except (ValueError, LookupError, OSError, UnsafeCheckpointError) as e:
        if args.verbose:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    model = load_pretrained(out)
    spec = json.loads((out / "spec.json").read_text())
    import jax
    from flax import nnx

    n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    print(f"converted {args.src} [{spec['provenance'].get('key') or 'top level'}] -> {out} "
          f"({spec['family']}, {n:,} parameters, {time.time() - start:.1f}s)")
    sources = spec["provenance"]["hyperparameters"]
    for name, value in spec["config"].items():
        print(f"  {name} = {json.dumps(value)}  [{sources[name]}]")
    print("config: " + json.dumps(spec["config"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
