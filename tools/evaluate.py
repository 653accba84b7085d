"""Robustness evaluation (Table 7); see :mod:`l2s_jax.evaluate` for benchmarks, protocols and outputs."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from l2s_jax.evaluate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
