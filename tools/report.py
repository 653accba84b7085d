"""The paper's result tables (Tables 1-5, 7, 10-12) from workdirs; see :mod:`l2s_jax.report`."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from l2s_jax.report import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
