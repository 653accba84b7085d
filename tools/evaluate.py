"""``l2s_jax.evaluate``'s command line from a checkout (installed: see setup.py's console scripts)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from l2s_jax.evaluate import cli, main  # noqa: E402,F401  (main: in-process callers)

if __name__ == "__main__":
    sys.exit(cli())
