"""Convert a PyTorch / timm / safetensors / npz checkpoint into an l2s_jax model directory.

    python tools/convert_weights.py --arch slak --src SLaK_tiny_checkpoint.pth --out ckpt/slak_tiny

Reads .pth (zip and legacy formats) without executing code from the file, .safetensors and
.npz; finds the weights inside the usual wrappers (``--key`` to choose); infers depths, widths,
kernel sizes, decomposition and classes from tensor names and shapes; writes ``spec.json`` and an
Orbax checkpoint that ``l2s_jax.models.load_pretrained(OUT)`` returns as a ready model.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from l2s_jax.models import FAMILIES, get_family, load_pretrained


def main(argv: list[str] | None = None) -> int:
    get_family("slak")  # register every family before listing the choices
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", required=True, choices=sorted(FAMILIES), help="model family of the checkpoint")
    parser.add_argument("--src", required=True, help="checkpoint file (.pth/.pt/.bin, .safetensors, .npz)")
    parser.add_argument("--out", required=True, help="output directory (must not already hold a checkpoint)")
    parser.add_argument("--key", default=None, help="entry holding the weights (e.g. model, model_ema, state_dict_ema)")
    parser.add_argument("--override", action="append", default=[], metavar="NAME=JSON",
                        help="constructor argument the shapes cannot determine, e.g. --override num_heads=[2,4,8,16]")
    args = parser.parse_args(argv)

    from l2s_jax.convert import convert_checkpoint
    from l2s_jax.io.safe_pickle import UnsafeCheckpointError

    overrides = {}
    for item in args.override:
        name, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--override expects NAME=JSON, got {item!r}")
        overrides[name] = json.loads(value)
    start = time.time()
    try:
        out = convert_checkpoint(args.arch, args.src, args.out, key=args.key, overrides=overrides)
    except (ValueError, KeyError, FileNotFoundError, FileExistsError, LookupError, UnsafeCheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model = load_pretrained(out)
    spec = json.loads((out / "spec.json").read_text())
    import jax
    from flax import nnx

    n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    print(f"converted {args.src} [{spec['provenance'].get('key') or 'top level'}] -> {out} "
          f"({spec['family']}, {n:,} parameters, {time.time() - start:.1f}s)")
    print("config: " + json.dumps(spec["config"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
