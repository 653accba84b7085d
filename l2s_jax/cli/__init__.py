"""Command-line tools; each module's ``main`` is a console entry point (see setup.py) and
``tools/<name>.py`` runs it from a checkout."""
from __future__ import annotations

from pathlib import Path


def parse_named_dirs(items: list[str]) -> dict[str, str]:
    """``NAME=DIR`` or ``DIR`` (named after the folder) -> ordered ``{name: dir}``."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = Path(item.rstrip("/")).name, item
        if not name or not path:
            raise ValueError(f"--checkpoint expects NAME=DIR or DIR, got {item!r}")
        if name in out:
            raise ValueError(f"two checkpoints are named {name!r}; use NAME=DIR to tell them apart")
        out[name] = path
    return out
