"""One training run per output folder at a time: an ``fcntl.flock`` on ``<output_dir>/.scfm.lock``.

Two runs writing the same checkpoints, cache and adapter would overwrite each other's files (one crashes on
the other's temporary file, or worse, both finish with mixed state). The main process takes an exclusive lock
at the start and holds it until it exits; the lock file holds its pid, which the refusal names. The kernel
releases a ``flock`` when its process dies, so a lock file left by a killed run (``kill -9``, a pre-empted node)
never blocks the next one. Within one process the lock is re-entrant (``main()`` called again on the same
folder, as tests and notebooks do). On a network file system without ``flock`` support the lock may not hold.

Example:
    >>> lock_output_dir("flux-scfm", accelerator)  # doctest: +SKIP
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

__all__ = ["LOCK_FILE", "acquire_lock", "lock_output_dir", "release_lock"]

LOCK_FILE = ".scfm.lock"
#: Folder (resolved) -> (pid, file descriptor) of the locks this process holds.
_HELD: dict[Path, tuple[int, int]] = {}


def acquire_lock(output_dir: str | os.PathLike) -> Path:
    """Take the exclusive lock of ``output_dir`` (created if needed) for this process; returns the lock file.

    Raises:
        RuntimeError: Another live process holds it; the message names the folder and that process's pid.
    """
    folder = Path(output_dir).resolve()
    path = folder / LOCK_FILE
    if _HELD.get(folder, (None,))[0] == os.getpid():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by subprocesses (O_CLOEXEC by default)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise RuntimeError(
            f"--output_dir {folder} is in use by another training run (pid {holder}; lock {path}). Wait for it to "
            "finish or stop it, or give this run another --output_dir."
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _HELD[folder] = (os.getpid(), fd)
    return path


def release_lock(output_dir: str | os.PathLike) -> None:
    """Release this process's lock of ``output_dir`` (exiting releases it too); nothing if it holds none."""
    pid, fd = _HELD.pop(Path(output_dir).resolve(), (None, None))
    if pid == os.getpid():
        os.close(fd)  # closing the last descriptor releases the flock


def lock_output_dir(output_dir: str | os.PathLike, accelerator: Accelerator) -> None:
    """The training script's lock: the main process takes it; every process stops if that fails (none waits at a
    barrier for a main process that is gone).

    Raises:
        RuntimeError: Another run holds ``output_dir`` (on every process).
    """
    failure = None
    if accelerator.is_main_process:
        try:
            acquire_lock(output_dir)
        except RuntimeError as error:
            failure = error
    if accelerator.num_processes > 1:
        message = broadcast_object_list([None if failure is None else str(failure)])[0]
        if failure is None and message is not None:
            raise RuntimeError(message)
    if failure is not None:
        raise failure
