"""Small file helpers without heavy imports: write-then-rename (a crash or a kill never leaves half a file under
the final name) and the prompt-list reader shared by training and ``scfm-eval``."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["read_prompts", "temporary_sibling", "write_text_atomic"]


def temporary_sibling(path: Path) -> Path:
    """A temporary name next to ``path``, unique per process (several processes may write one folder)."""
    return path.with_name(f"{path.name}.{os.getpid()}.tmp")


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary sibling and ``os.replace``."""
    tmp = temporary_sibling(path)
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def read_prompts(path: str | os.PathLike) -> list[str]:
    """Read one prompt per line; blank lines and lines starting with ``#`` are skipped.

    Raises:
        FileNotFoundError: The file does not exist.
        ValueError: The file holds no prompt.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Prompt file {str(path)!r} does not exist.")
    lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    prompts = [line for line in lines if line and not line.startswith("#")]
    if not prompts:
        raise ValueError(f"Prompt file {str(path)!r} holds no prompts (one per line; '#' starts a comment).")
    return prompts
