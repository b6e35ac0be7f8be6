"""Sharded training (FSDP2): which launch shards, whole tensors from sharded ones and back.

Under accelerate's FSDP plugin with ``fsdp_version: 2``, ``fully_shard`` replaces every parameter of the wrapped
transformer (the frozen base AND the LoRA tensors of the student and both EMAs, which live inside the wrapped
blocks) by a ``DTensor`` holding this rank's rows. Arithmetic on shards is local and needs nothing here: the
optimizer step and the EMA's ``lerp`` update each rank's rows. What leaves the process does:

* :func:`full_tensors` all-gathers whole tensors for a file (checkpoint, adapter). It is a collective: EVERY rank
  calls it, in the same order; then only the main process writes.
* :func:`copy_full_` puts a whole tensor (read from a file by every rank) back into a parameter; a sharded one
  keeps its own rows, without communication.
* A forward pass of the sharded transformer all-gathers each block's weights, so every rank must make the same
  passes: the objective calls each target model even where a rank has no rows for it (:func:`is_sharded_module`),
  and validation and calibration run on every rank (:func:`output_args` gives the others a throwaway folder).

Without FSDP every function here is the plain operation (a copy, a no-op), so the callers have one code path.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn

__all__ = [
    "checkpoint_blocks",
    "copy_full_",
    "fsdp_version",
    "full_tensors",
    "is_sharded",
    "is_sharded_module",
    "output_args",
    "reshard",
]


def fsdp_version(accelerator: Accelerator) -> int | None:
    """The FSDP version of the launch (1 or 2), or None when it does not use FSDP."""
    if accelerator.distributed_type != DistributedType.FSDP:
        return None
    return int(accelerator.state.fsdp_plugin.fsdp_version)


def is_sharded(accelerator: Accelerator) -> bool:
    """Whether the transformer is sharded between the processes (FSDP)."""
    return accelerator.distributed_type == DistributedType.FSDP


def is_sharded_module(module: nn.Module) -> bool:
    """Whether ``module`` is sharded by FSDP2 (``fully_shard`` applied to it: accelerate always wraps the root)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch built without distributed support
        return False
    return isinstance(module, FSDPModule)


def checkpoint_blocks(module: nn.Module, class_names: Iterable[str]) -> int:
    """Activation checkpointing of every submodule whose class is named in ``class_names`` (the blocks FSDP wraps),
    by torch's composable ``checkpoint``: hooks, no wrapper module, so every parameter keeps its name. Call it
    before the blocks are sharded. Returns how many blocks it applied to.

    Not diffusers' ``enable_gradient_checkpointing``, which checkpoints around each block call: FSDP2 casts a block's
    inputs to bf16 in its forward hook, torch before 2.13 not again when the block is recomputed in backward, and the
    checkpoint then refuses the recomputed float32 tensors (seen with torch 2.11 on an H200). Nor accelerate's
    ``fsdp_activation_checkpointing``, whose wrapper module renames every parameter of a block (peft then leaves the
    block's LoRA out of its state dict).
    """
    from torch.distributed._composable import checkpoint

    names = {name.strip() for name in class_names}
    blocks = [m for m in module.modules() if type(m).__name__ in names]
    for block in blocks:
        checkpoint(block)
    return len(blocks)


def _dtensor_class() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed support
        return None
    return DTensor


def reshard(module: nn.Module) -> None:
    """Put every FSDP2 unit of ``module`` back in its sharded state (a no-op for others).

    After a forward pass without backward the root unit keeps its gathered weights (``reshard_after_forward`` is
    off for the root), and its modules then hold plain tensors instead of the sharded parameters that the
    optimizer and the EMA update. Reading parameters from the modules is only safe after this.
    """
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return
    for submodule in module.modules():
        if isinstance(submodule, FSDPModule):
            submodule.reshard()


def full_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Whole, detached CPU copies of ``tensors``, in their order (sharded ones all-gathered).

    A collective when any tensor is sharded: call it on every rank with the same keys in the same order.
    """
    dtensor = _dtensor_class()
    out = {}
    for key, value in tensors.items():
        value = value.detach()
        if dtensor is not None and isinstance(value, dtensor):
            value = value.full_tensor()
        out[key] = value.to("cpu", copy=True)
    return out


@torch.no_grad()
def copy_full_(param: torch.Tensor, value: torch.Tensor) -> None:
    """Copy the whole tensor ``value`` into ``param``; a sharded ``param`` takes its own rows of it.

    Every rank must pass the same ``value`` (all read the same file): the rows are cut locally, no rank sends any.
    """
    dtensor = _dtensor_class()
    if dtensor is not None and isinstance(param, dtensor):
        from torch.distributed.tensor import distribute_tensor

        value = distribute_tensor(
            value.to(device=param.device, dtype=param.dtype), param.device_mesh, param.placements, src_data_rank=None
        )
    param.copy_(value)


@contextmanager
def output_args(args: argparse.Namespace, is_main_process: bool) -> Iterator[argparse.Namespace]:
    """The flags for work every rank must do but whose files only the main process keeps (sampling with a sharded
    transformer): ``args`` itself on the main process; elsewhere a copy whose ``output_dir`` is a temporary folder,
    deleted on exit (the images are the same on every rank)."""
    if is_main_process:
        yield args
        return
    with tempfile.TemporaryDirectory(prefix="scfm-other-rank-") as scratch:
        yield argparse.Namespace(**{**vars(args), "output_dir": scratch})
