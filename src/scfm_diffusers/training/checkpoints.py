"""Resumable SCFM checkpoints through accelerate: what is saved, atomic folders, DeepSpeed, finding the latest.

A ``checkpoint-N/`` folder is

* an adapter folder of the student at step N (what :func:`~scfm_diffusers.adapter.save_adapter` writes:
  ``load_lora_weights`` and ``scfm-eval --adapter`` read it),
* plus what resuming needs: the student LoRA and BOTH EMAs (``scfm_state.safetensors``), the run record
  (``scfm_run.json``: a checkpoint of another run is refused, naming the fields that differ), and per process
  the script's sampling RNG and stream position (``scfm_rng_<rank>.pt``, read back with
  ``weights_only=True``: tensors and numbers only, never pickled code); accelerate's ``save_state`` adds
  optimizer, lr schedule, data order and global RNG states.

Never the frozen base weights (the hooks drop the model weights accelerate would save, and under DeepSpeed
``save_state`` gets ``exclude_frozen_parameters=True``), except under FSDP, where accelerate's ``save_state`` itself
writes the whole sharded transformer, base included (``pytorch_model_fsdp*``; docs/training.md). Under FSDP2 the
LoRA tensors are sharded: the hooks gather whole ones on every rank (a collective) before the main process writes,
and on resume each rank takes its own rows of them (:mod:`scfm_diffusers.training.distributed`).

A folder is written as ``checkpoint-N.partial`` and renamed once every process is done; only then are old
checkpoints pruned (``--checkpoints_total_limit``), so a run killed while saving keeps its previous checkpoint, and
a ``.partial`` folder is never resumed from.

Example:
    >>> register_checkpoint_hooks(accelerator, transformer, ema, rng=rng, record=record, state=state,
    ...                           write_adapter=write_adapter)  # doctest: +SKIP
    >>> save_checkpoint(accelerator, output_dir, step=500, limit=3)  # doctest: +SKIP
    >>> step = load_checkpoint(accelerator, checkpoint_to_resume(output_dir, "latest"))  # doctest: +SKIP
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .._files import reporting_disk_full
from .distributed import copy_full_, full_tensors
from .ema import DualLoraEMA

__all__ = [
    "RUN_FILE",
    "STATE_FILE",
    "checkpoint_problem",
    "checkpoint_step",
    "checkpoint_to_resume",
    "content_identity",
    "files_identity",
    "finished_checkpoints",
    "latest_checkpoint",
    "load_checkpoint",
    "prune_checkpoints",
    "record_differences",
    "register_checkpoint_hooks",
    "save_checkpoint",
]

logger = logging.getLogger(__name__)

STATE_FILE, RUN_FILE = "scfm_state.safetensors", "scfm_run.json"
#: A finished checkpoint's folder name (a partial one is ``checkpoint-N.partial``).
CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")
PARTIAL_NAME = re.compile(r"checkpoint-\d+\.partial")


def _rng_file(folder: str | os.PathLike, rank: int) -> Path:
    return Path(folder, f"scfm_rng_{rank}.pt")


def register_checkpoint_hooks(
    accelerator: Accelerator,
    transformer: torch.nn.Module,
    ema: DualLoraEMA,
    *,
    rng: torch.Generator,
    record: dict,
    state: dict,
    write_adapter: Callable[[str | os.PathLike], None],
) -> None:
    """Make ``accelerator.save_state`` / ``load_state`` save and restore the SCFM state described above.

    Args:
        accelerator: The run's accelerator (hooks run on every process; files are written by the main one).
        transformer: The unwrapped transformer carrying the student adapter ``ema.student_adapter``.
        ema: The dual EMA (its fast and slow adapters are saved and restored exactly).
        rng: The script's sampling generator (noise, grids, guidance), one per process.
        record: What a resuming run must share with the saved one (JSON-serialisable, nested dicts allowed:
            :func:`~scfm_diffusers.training.components.run_record`).
        state: Mutable per-process state saved alongside (``{"stream_rows": int}`` for streamed data).
        write_adapter: ``(folder, lora_state_dict=...) -> None``, writes the student's adapter folder with these LoRA
            tensors (weights, settings, scheduler).
    """

    def save_hook(models, weights, folder):
        if weights:  # DeepSpeed and FSDP save their own model state and pass no weights
            weights.pop()
        # Whole tensors on every rank first: gathering sharded (FSDP2) tensors is a collective.
        adapter = ema.adapter_state_dict("student")
        student = {f"student.{k}": v.float() for k, v in full_tensors(ema.parameters("student")).items()}
        emas = ema.state_dict()
        if accelerator.is_main_process:
            write_adapter(folder, lora_state_dict=adapter)
            save_file({**student, **emas}, os.path.join(folder, STATE_FILE))
            Path(folder, RUN_FILE).write_text(json.dumps(record, indent=2))
        process_state = {"rng": rng.get_state(), "stream_rows": state.get("stream_rows", 0)}
        torch.save(process_state, _rng_file(folder, accelerator.process_index))

    def load_hook(models, folder):
        if models:  # DeepSpeed and FSDP restore their own model state and pass no models
            models.pop()
        saved = json.loads(Path(folder, RUN_FILE).read_text()) if Path(folder, RUN_FILE).is_file() else {}
        differences = record_differences(saved, record)
        if differences:
            raise ValueError(
                f"{folder} is a checkpoint of another run: {'; '.join(differences)}. Resume with the flags and data "
                "of that run, point --resume_from_checkpoint at a checkpoint of this run, or use another --output_dir."
            )
        tensors = load_file(os.path.join(folder, STATE_FILE))  # whole tensors on every rank
        for key, param in ema.parameters("student").items():
            copy_full_(param, tensors.pop(f"student.{key}"))
        ema.load_state_dict(tensors)
        # Tensors and numbers only: a crafted file cannot run code (torch < 2.6 unpickles anything by default).
        process_state = torch.load(_rng_file(folder, accelerator.process_index), weights_only=True)
        rng.set_state(process_state["rng"])
        state["stream_rows"] = process_state["stream_rows"]

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def record_differences(saved: dict, record: dict) -> list[str]:
    """The fields in which two run records differ, each as ``"name: <saved> in the checkpoint, <now> now"``.

    Nested fields are named by their path (``objective.learning_rate``); both records are compared as JSON
    stores them (tuples are lists).

    Example:
        >>> record_differences({"seed": 0, "objective": {"learning_rate": 1e-3}},
        ...                    {"seed": 1, "objective": {"learning_rate": 1e-3}})
        ['seed: 0 in the checkpoint, 1 now']
    """
    old, new = _flatten(json.loads(json.dumps(saved))), _flatten(json.loads(json.dumps(record)))
    absent = object()
    return [
        f"{key}: {json.dumps(old[key]) if key in old else 'absent (an older version wrote it?)'} in the checkpoint, "
        f"{json.dumps(new[key]) if key in new else 'absent'} now"
        for key in [*new, *(k for k in old if k not in new)]
        if old.get(key, absent) != new.get(key, absent)
    ]


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        return {k: v for name, item in value.items() for k, v in _flatten(item, f"{prefix}{name}.").items()}
    return {prefix.removesuffix("."): value}


def save_checkpoint(accelerator: Accelerator, output_dir: Path, step: int, limit: int | None = None) -> Path:
    """Write ``checkpoint-{step}`` atomically (via ``checkpoint-{step}.partial``), then keep at most ``limit``.

    Old checkpoints are pruned only once the new one is complete: a run killed at any point keeps a usable
    checkpoint. Call it on every process. Under DeepSpeed the engine's files hold the trainable (LoRA)
    parameters only.

    Returns:
        The finished folder.
    """
    final, partial = output_dir / f"checkpoint-{step}", output_dir / f"checkpoint-{step}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)  # left by a run killed while saving
    accelerator.wait_for_everyone()
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    with reporting_disk_full(partial, "or checkpoint less often / keep fewer (--checkpoints_total_limit)"):
        accelerator.save_state(str(partial), **({"exclude_frozen_parameters": True} if deepspeed else {}))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():  # the same step again (a resume from an earlier checkpoint): swap, then delete
            replaced = final.with_name(final.name + ".replaced")
            shutil.rmtree(replaced, ignore_errors=True)
            os.replace(final, replaced)
            os.replace(partial, final)
            shutil.rmtree(replaced)
        else:
            os.replace(partial, final)
        prune_checkpoints(output_dir, limit, keep=final)
    accelerator.wait_for_everyone()
    return final


def checkpoint_step(folder: str | os.PathLike) -> int:
    """The step of a checkpoint folder, read from its name ``checkpoint-N``.

    Raises:
        ValueError: The folder is not named ``checkpoint-<step>`` (e.g. renamed to ``checkpoint-final``).
    """
    match = CHECKPOINT_NAME.fullmatch(Path(folder).name)
    if match is None:
        raise ValueError(
            f"--resume_from_checkpoint {folder}: a checkpoint folder is named checkpoint-<step> (the step it "
            "resumes at is read from the name). Rename it back to checkpoint-<step>."
        )
    return int(match.group(1))


def load_checkpoint(accelerator: Accelerator, folder: Path) -> int:
    """Restore a checkpoint written by :func:`save_checkpoint`; returns its step.

    Raises:
        ValueError: The folder is not named ``checkpoint-<step>``, misses a file, or is of another run.
    """
    step = checkpoint_step(folder)
    problem = checkpoint_problem(folder)
    if problem is not None:
        raise ValueError(
            f"--resume_from_checkpoint {folder} is not a usable checkpoint: {problem}. Resume from another "
            "checkpoint (or 'latest'), or delete the folder."
        )
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    accelerator.load_state(str(folder), **({"load_module_strict": False} if deepspeed else {}))
    return step


def checkpoint_problem(folder: str | os.PathLike) -> str | None:
    """Why a ``checkpoint-N`` folder cannot be resumed from (a missing or unreadable file), or None if it can.

    Checks what the SCFM hooks write (cheap: the run record is parsed, the state file's header read); the
    folder's completeness as a whole comes from its name, given only once every file is written.
    """
    folder = Path(folder)
    for name in (RUN_FILE, STATE_FILE, _rng_file(folder, 0).name):
        if not (folder / name).is_file() or (folder / name).stat().st_size == 0:
            return f"{name} is missing or empty"
    try:
        json.loads((folder / RUN_FILE).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        return f"{RUN_FILE} is not valid JSON ({error})"
    try:
        with safe_open(folder / STATE_FILE, framework="pt") as f:
            f.keys()
    except Exception as error:  # safetensors raises its own SafetensorError for a truncated header
        return f"{STATE_FILE} is unreadable ({type(error).__name__}: {error})"
    return None


def finished_checkpoints(output_dir: Path) -> list[Path]:
    """The ``checkpoint-N`` folders (not partial or renamed ones), oldest first."""
    found = [p for p in Path(output_dir).glob("checkpoint-*") if p.is_dir() and CHECKPOINT_NAME.fullmatch(p.name)]
    return sorted(found, key=checkpoint_step)


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint (a finished ``checkpoint-N`` with every file readable), or None."""
    return next((p for p in reversed(finished_checkpoints(output_dir)) if checkpoint_problem(p) is None), None)


def checkpoint_to_resume(output_dir: Path, resume_from_checkpoint: str | None) -> Path | None:
    """The checkpoint ``--resume_from_checkpoint`` names: a folder, or for ``latest`` the newest complete one.

    ``latest`` logs which checkpoint it took and which newer ones it skipped and why. It returns None (a new
    run) when ``output_dir`` holds no checkpoint folder, or only ``.partial`` ones (a run killed during its first
    save).

    Raises:
        ValueError: ``latest``, and checkpoint folders exist but none can be resumed from (each named with why).
    """
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint != "latest":
        return Path(resume_from_checkpoint)
    others = [p for p in Path(output_dir).glob("checkpoint-*") if p.is_dir() and not CHECKPOINT_NAME.fullmatch(p.name)]
    for folder in others:
        if not PARTIAL_NAME.fullmatch(folder.name):
            logger.warning(f"Ignoring {folder}: not named checkpoint-<step>, so `latest` cannot tell its step.")
    skipped = []
    for folder in reversed(finished_checkpoints(output_dir)):
        problem = checkpoint_problem(folder)
        if problem is None:
            later = f" (skipped newer, unusable: {'; '.join(skipped)})" if skipped else ""
            logger.info(f"--resume_from_checkpoint latest: {folder}, the newest complete checkpoint{later}.")
            return folder
        skipped.append(f"{folder.name}: {problem}")
    unusable = skipped + [
        f"{p.name}: not named checkpoint-<step>" for p in others if not PARTIAL_NAME.fullmatch(p.name)
    ]
    if unusable:
        raise ValueError(
            f"--resume_from_checkpoint latest: {output_dir} holds checkpoint folders but none can be resumed from "
            f"({'; '.join(unusable)}). Point --resume_from_checkpoint at a usable checkpoint, or move these folders "
            "away (or drop the flag) to start a new run."
        )
    if others:
        logger.warning(
            f"--resume_from_checkpoint latest: {output_dir} holds only unfinished checkpoints "
            f"({', '.join(p.name for p in others)}: a run killed during its first save); starting a new run."
        )
    else:
        logger.warning(f"--resume_from_checkpoint latest: no checkpoint in {output_dir}; starting a new run.")
    return None


def prune_checkpoints(output_dir: Path, limit: int | None, keep: Path | None = None) -> None:
    """Remove the oldest ``checkpoint-N`` folders so that at most ``limit`` remain, never ``keep`` (the one just
    written). Partial and renamed folders are neither counted nor removed."""
    if not limit:
        return
    found = [p for p in finished_checkpoints(output_dir) if keep is None or p.name != Path(keep).name]
    room = limit - (keep is not None)
    for old in found[: max(0, len(found) - room)]:
        logger.info(f"Removing old checkpoint {old} (--checkpoints_total_limit {limit}).")
        shutil.rmtree(old)


def content_identity(path: str | os.PathLike | None) -> str | None:
    """What makes local data the same data, by content, never by path (a run record stores no path).

    A file (a prompts file): the SHA-256 of its bytes. A folder (an image folder): the SHA-256 of every file's
    name relative to the folder and size, plus the bytes of its ``metadata.*`` files (the captions); image bytes
    are not read, so a replaced image of the same size is not seen (reading them would cost the whole data set's
    size at every start). Anything else (a Hub id, a builder name such as ``webdataset``): the name itself.
    """
    if path is None:
        return None
    path = Path(path)
    if path.is_file():
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()[:16]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        return _listing_digest(files, path, read=lambda file: file.name.startswith("metadata."))
    return str(path)


def files_identity(patterns: Iterable[str] | None) -> list[str] | None:
    """``--data_files`` by content: per pattern, the names (without folders) and sizes of the local files it
    matches, hashed; or the pattern itself where it matches no local file (a URL, a Hub path)."""
    if patterns is None:
        return None
    found = [sorted(Path(m) for m in glob.glob(p, recursive=True) if Path(m).is_file()) for p in patterns]
    return [_listing_digest(files, None, read=lambda _: False) if files else p for p, files in zip(patterns, found)]


def _listing_digest(files: list[Path], root: Path | None, read: Callable[[Path], bool]) -> str:
    digest = hashlib.sha256()
    for file in files:
        name = file.relative_to(root).as_posix() if root is not None else file.name
        digest.update(f"{name}\0{file.stat().st_size}\n".encode())
        if read(file):
            digest.update(file.read_bytes())
    return digest.hexdigest()[:16]
