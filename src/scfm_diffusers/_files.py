"""Write-then-rename helpers: a crash (or a kill) never leaves half a file under the final name."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["temporary_sibling", "write_text_atomic"]


def temporary_sibling(path: Path) -> Path:
    """A temporary name next to ``path``, unique per process (several processes may write one folder)."""
    return path.with_name(f"{path.name}.{os.getpid()}.tmp")


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary sibling and ``os.replace``."""
    tmp = temporary_sibling(path)
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
