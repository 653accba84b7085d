"""The ``l2s-train`` console entry point: :func:`l2s_jax.main.cli` in a process with the tuned host malloc."""
from __future__ import annotations

from l2s_jax import host_memory


def main() -> None:
    """Re-execute with :mod:`l2s_jax.host_memory`'s settings (before JAX is imported), then train."""
    host_memory.reexec_tuned()
    from l2s_jax.main import cli

    cli()
