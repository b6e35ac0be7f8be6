"""Small file helpers without heavy imports: write-then-rename (a crash or a kill never leaves half a file under
the final name), one-line disk-full errors, and the prompt-list reader shared by training and ``scfm-eval``."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "DiskFullError",
    "is_disk_full",
    "read_prompts",
    "reporting_disk_full",
    "temporary_sibling",
    "write_text_atomic",
]

# errno of a full disk, and of a full quota (which the user fixes the same way).
_DISK_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


class DiskFullError(OSError):
    """No space was left while writing a file; the message names the file and what to do (errno ENOSPC)."""


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error`` is a full disk or quota: an ``OSError`` with errno ENOSPC / EDQUOT, or an error of a
    library that reports the OS error only in its text (safetensors: ``"... (os error 28)"``)."""
    if isinstance(error, OSError) and error.errno in _DISK_FULL_ERRNOS:
        return True
    text = str(error)
    return any(f"os error {number})" in text for number in _DISK_FULL_ERRNOS) or "No space left on device" in text


@contextlib.contextmanager
def reporting_disk_full(
    path: str | os.PathLike, fix: str = "or write to another disk (--output_dir)"
) -> Iterator[None]:
    """Turn a disk-full error raised inside the block into one :class:`DiskFullError` line naming ``path``.

    Other errors pass unchanged. Used by every writer of the adapter folder; the training cache and checkpoints
    can wrap their writes the same way.

    Example:
        >>> with reporting_disk_full(folder / "shard-00000.safetensors"):  # doctest: +SKIP
        ...     save_file(tensors, folder / "shard-00000.safetensors")
    """
    try:
        yield
    except Exception as error:
        if not is_disk_full(error) or isinstance(error, DiskFullError):
            raise
        path = Path(path)
        try:
            free = f"{shutil.disk_usage(path if path.is_dir() else path.parent).free / 2**20:.1f} MiB free"
        except OSError:
            free = "free space unknown"
        raise DiskFullError(
            errno.ENOSPC, f"No space left on the device while writing {str(path)!r} ({free}): free space there {fix}."
        ) from error


def temporary_sibling(path: Path) -> Path:
    """A temporary name next to ``path``, unique per process (several processes may write one folder)."""
    return path.with_name(f"{path.name}.{os.getpid()}.tmp")


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary sibling and ``os.replace``.

    Raises:
        DiskFullError: The disk is full (the temporary file is removed; ``path`` keeps its old content).
    """
    tmp = temporary_sibling(path)
    try:
        with reporting_disk_full(path):
            tmp.write_text(text, encoding="utf-8")
    except DiskFullError:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def read_prompts(path: str | os.PathLike) -> list[str]:
    """Read one prompt per line of a UTF-8 file (a byte-order mark is dropped); blank lines and lines starting
    with ``#`` are skipped.

    Other encodings are refused rather than guessed: a wrong guess would silently train on other prompts.

    Raises:
        FileNotFoundError: The file does not exist.
        ValueError: The file is not UTF-8 (the message names the line and how to convert it), or holds no prompt.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Prompt file {str(path)!r} does not exist.")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise ValueError(
            f"Prompt file {str(path)!r} is not UTF-8 text (byte 0x{data[error.start]:02x} on line {line}); save it "
            f"as UTF-8, e.g. `iconv -f latin1 -t utf-8 {path} > {path.stem}.utf8{path.suffix}` for a Latin-1 file."
        ) from None
    lines = (line.strip() for line in text.splitlines())
    prompts = [line for line in lines if line and not line.startswith("#")]
    if not prompts:
        raise ValueError(f"Prompt file {str(path)!r} holds no prompts (one per line; '#' starts a comment).")
    return prompts
