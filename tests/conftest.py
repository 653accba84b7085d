"""Shared test fixtures: golden reference data and an 8-device CPU platform for sharding tests."""
import os

# Must happen before JAX initialises its backends: eight simulated CPU devices for mesh tests.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import io  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from l2s_jax import compile_cache  # noqa: E402

# The same persistent compilation cache as the commands (user-level, $L2S_COMPILE_CACHE): the
# CLIs the tests start use it too, so a second run of the suite compiles little; an empty cache
# (CI) only costs time.
compile_cache.enable()

REPO_ROOT = Path(__file__).resolve().parents[1]
GOLDEN_DIR = Path(os.environ.get("L2S_GOLDEN_DIR", REPO_ROOT.parent / "shared" / "golden")).resolve()


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    """The golden reference folder; skips (with the reason) only when it does not exist."""
    if not GOLDEN_DIR.is_dir():
        pytest.skip(
            f"golden reference data not found at {GOLDEN_DIR}: set L2S_GOLDEN_DIR or place "
            "shared/golden beside the repository (present in CI; absent in a fresh clone)"
        )
    return GOLDEN_DIR


@dataclasses.dataclass(frozen=True)
class DemoRun:
    """A finished :func:`run_helpers.full_demo_config` run: its workdir, data, summary and printed progress."""
    workdir: Path
    data_dir: Path
    summary: dict
    out: str


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> DemoRun:
    """The shortened demo end to end, run once for the tests that read a finished workdir."""
    from run_helpers import full_demo_config

    from l2s_jax import main

    root = tmp_path_factory.mktemp("demo")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        summary = main.train_and_evaluate(full_demo_config(root / "tfds"), root / "full")
    return DemoRun(root / "full", root / "tfds", summary, out.getvalue())


def assert_close_to_reference(actual, reference, name: str = "", factor: float = 1e-4) -> float:
    """Project parity criterion: max |a - r| <= factor * max(1, max |r|). Returns the error."""
    import numpy as np

    actual = np.asarray(actual, np.float64)
    reference = np.asarray(reference, np.float64)
    assert actual.shape == reference.shape, f"{name}: shape {actual.shape} != reference {reference.shape}"
    err = float(np.max(np.abs(actual - reference))) if reference.size else 0.0
    bound = factor * max(1.0, float(np.max(np.abs(reference))) if reference.size else 1.0)
    assert err <= bound, f"{name}: max abs diff {err:.3g} > {bound:.3g}"
    return err
