"""Resumable SCFM checkpoints through accelerate: what is saved, atomic folders, DeepSpeed, finding the latest.

A ``checkpoint-N/`` folder is

* an adapter folder of the student at step N (what :func:`~scfm_diffusers.adapter.save_adapter` writes:
  ``load_lora_weights`` and ``scfm-eval --adapter`` read it),
* plus what resuming needs: the student LoRA and BOTH EMAs (``scfm_state.safetensors``), the run record
  (``scfm_run.json``: a checkpoint of another run is refused), and per process the script's sampling RNG and
  stream position (``scfm_rng_<rank>.pt``); accelerate's ``save_state`` adds optimizer, lr schedule, data
  order and global RNG states.

Never the frozen base weights: the hooks drop the model weights accelerate would save, and under DeepSpeed
``save_state`` gets ``exclude_frozen_parameters=True``. A folder is written as ``checkpoint-N.partial`` and
renamed once every process is done, so a run killed while saving leaves nothing that a resume would pick.

Example:
    >>> register_checkpoint_hooks(accelerator, transformer, ema, rng=rng, record=record, state=state,
    ...                           write_adapter=write_adapter)  # doctest: +SKIP
    >>> save_checkpoint(accelerator, output_dir, step=500, limit=3)  # doctest: +SKIP
    >>> step = load_checkpoint(accelerator, latest_checkpoint(output_dir))  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from safetensors.torch import load_file, save_file

from .ema import DualLoraEMA, lora_parameters

__all__ = [
    "RUN_FILE",
    "STATE_FILE",
    "finished_checkpoints",
    "latest_checkpoint",
    "load_checkpoint",
    "prune_checkpoints",
    "register_checkpoint_hooks",
    "save_checkpoint",
]

logger = logging.getLogger(__name__)

STATE_FILE, RUN_FILE = "scfm_state.safetensors", "scfm_run.json"
#: A finished checkpoint's folder name (a partial one is ``checkpoint-N.partial``).
CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")


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
        record: What a resuming run must share with the saved one (base model, family, rank, alpha, targets).
        state: Mutable per-process state saved alongside (``{"stream_rows": int}`` for streamed data).
        write_adapter: ``folder -> None``, writes the student's adapter folder (weights, settings, scheduler).
    """

    def save_hook(models, weights, folder):
        if weights:  # DeepSpeed saves its own engine state and passes no weights
            weights.pop()
        if accelerator.is_main_process:
            write_adapter(folder)
            student = lora_parameters(transformer, ema.student_adapter)
            tensors = {f"student.{k}": p.detach().float().cpu() for k, p in student.items()}
            save_file({**tensors, **ema.state_dict()}, os.path.join(folder, STATE_FILE))
            Path(folder, RUN_FILE).write_text(json.dumps(record, indent=2))
        process_state = {"rng": rng.get_state(), "stream_rows": state.get("stream_rows", 0)}
        torch.save(process_state, os.path.join(folder, f"scfm_rng_{accelerator.process_index}.pt"))

    def load_hook(models, folder):
        if accelerator.distributed_type != DistributedType.DEEPSPEED:
            models.pop()
        saved = json.loads(Path(folder, RUN_FILE).read_text()) if Path(folder, RUN_FILE).is_file() else None
        if saved != record:
            raise ValueError(
                f"{folder} is a checkpoint of another run: it has {saved}, this run is {record}. "
                "Point --resume_from_checkpoint at a checkpoint of this run or change --output_dir."
            )
        tensors = load_file(os.path.join(folder, STATE_FILE))
        with torch.no_grad():
            for key, param in lora_parameters(transformer, ema.student_adapter).items():
                param.copy_(tensors.pop(f"student.{key}"))
        ema.load_state_dict(tensors)
        process_state = torch.load(os.path.join(folder, f"scfm_rng_{accelerator.process_index}.pt"))
        rng.set_state(process_state["rng"])
        state["stream_rows"] = process_state["stream_rows"]

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_checkpoint(accelerator: Accelerator, output_dir: Path, step: int, limit: int | None = None) -> Path:
    """Write ``checkpoint-{step}`` atomically (via ``checkpoint-{step}.partial``), keeping at most ``limit``.

    Call it on every process. Under DeepSpeed the engine's files hold the trainable (LoRA) parameters only.

    Returns:
        The finished folder.
    """
    final, partial = output_dir / f"checkpoint-{step}", output_dir / f"checkpoint-{step}.partial"
    if accelerator.is_main_process:
        prune_checkpoints(output_dir, limit)
        shutil.rmtree(partial, ignore_errors=True)  # left by a run killed while saving
    accelerator.wait_for_everyone()
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    accelerator.save_state(str(partial), **({"exclude_frozen_parameters": True} if deepspeed else {}))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, folder: Path) -> int:
    """Restore a checkpoint written by :func:`save_checkpoint`; returns its step."""
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    accelerator.load_state(str(folder), **({"load_module_strict": False} if deepspeed else {}))
    return int(CHECKPOINT_NAME.fullmatch(Path(folder).name).group(1))


def finished_checkpoints(output_dir: Path) -> list[Path]:
    """The ``checkpoint-N`` folders (not partial ones), oldest first."""
    found = [p for p in Path(output_dir).glob("checkpoint-*") if p.is_dir() and CHECKPOINT_NAME.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT_NAME.fullmatch(p.name).group(1)))


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest finished checkpoint, or None."""
    found = finished_checkpoints(output_dir)
    return found[-1] if found else None


def prune_checkpoints(output_dir: Path, limit: int | None) -> None:
    """Remove the oldest checkpoints so that, with the one about to be written, at most ``limit`` remain."""
    if not limit:
        return
    found = finished_checkpoints(output_dir)
    for old in found[: max(0, len(found) - limit + 1)]:
        logger.info("Removing old checkpoint %s.", old)
        shutil.rmtree(old)
