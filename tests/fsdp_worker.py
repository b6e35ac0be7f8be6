"""One training run for tests/test_fsdp.py: FSDP2-sharded on every rank of a torchrun (gloo, CPU), or its
one-process reference (diffusers gradient checkpointing there). Not a test module itself (pytest collects ``test_*.py`` only).

    python tests/fsdp_worker.py reference OUT                        # one process, no sharding
    torchrun --standalone --nproc_per_node 2 tests/fsdp_worker.py sharded OUT

Both runs train the same tiny real Flux transformer (peft LoRA on the family's targets, the project's
DualLoraEMA, its ``scfm_training_losses`` step, AdamW, global-norm clipping) on the same global batch. Sharded,
rank r takes rows r·B/2 … (r+1)·B/2 − 1 with the generator seeded SEED + r (as the script seeds each process) and
FSDP2 averages the gradients; the reference computes both halves, each with its generator, and averages their
losses. Blocks and root are wrapped as accelerate's TRANSFORMER_BASED_WRAP does. After training, both write
whole tensors (student, EMAs, the slow EMA's adapter state dict), the per-step losses and gradient norms, a
sharded forward of the slow EMA, and a checkpoint through the real hooks that is then resumed into zeroed
parameters.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from diffusers import FluxTransformer2DModel  # noqa: E402
from diffusers.models.transformers.transformer_flux import (  # noqa: E402
    FluxSingleTransformerBlock,
    FluxTransformerBlock,
)
from peft import LoraConfig  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from scfm_diffusers.families import ConditioningConfig, get_family  # noqa: E402
from scfm_diffusers.training.checkpoints import (  # noqa: E402
    load_checkpoint,
    register_checkpoint_hooks,
    save_checkpoint,
)
from scfm_diffusers.training.distributed import checkpoint_blocks, full_tensors  # noqa: E402
from scfm_diffusers.training.ema import DualLoraEMA  # noqa: E402
from scfm_diffusers.training.step import scfm_training_losses  # noqa: E402
from scfm_diffusers.training.timesteps import GridSamplerConfig  # noqa: E402

SEED, STEPS, GLOBAL_BATCH, HALVES = 100, 3, 4, 2
FAMILY = get_family("flux")
GRID = GridSamplerConfig(teacher_grid_size_min=4, teacher_grid_size_max=4)
CONDITIONING = ConditioningConfig()
BLOCKS = (FluxTransformerBlock, FluxSingleTransformerBlock)


def tiny_student() -> tuple[torch.nn.Module, DualLoraEMA]:
    """The tiny Flux transformer (diffusers' test sizes, embedded guidance) with a rank-3 student on the family's
    LoRA targets (inside the blocks and at the root) and its dual EMA; the same weights in every run and rank."""
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
        guidance_embeds=True,
    )
    transformer.requires_grad_(False)
    targets = FAMILY.lora_target_modules(transformer)
    transformer.add_adapter(LoraConfig(r=3, lora_alpha=6, init_lora_weights="gaussian", target_modules=targets))
    return transformer, DualLoraEMA(transformer, fast_decay=0.5, slow_decay=0.8)


def global_batch() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Cached-style rows: packed-able latents (B, 1, 8, 8) and Flux text tensors, and the empty prompt's."""
    g = torch.Generator().manual_seed(1)
    batch = {
        "latents": torch.randn(GLOBAL_BATCH, 1, 8, 8, generator=g),
        "prompt_embeds": torch.randn(GLOBAL_BATCH, 6, 32, generator=g),
        "pooled_prompt_embeds": torch.randn(GLOBAL_BATCH, 32, generator=g),
    }
    uncond = {key: torch.zeros_like(value[:1]) for key, value in batch.items() if key != "latents"}
    return batch, uncond


def half(batch: dict[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
    rows = GLOBAL_BATCH // HALVES
    return {key: value[index * rows : (index + 1) * rows] for key, value in batch.items()}


def shard(transformer: torch.nn.Module, world_size: int) -> None:
    """The script's --gradient_checkpointing under FSDP (each block checkpointed, names kept), then what
    accelerate's FSDP2 prepare does with TRANSFORMER_BASED_WRAP: each block sharded, then the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    assert checkpoint_blocks(transformer, [cls.__name__ for cls in BLOCKS]) == 2
    mesh = init_device_mesh("cpu", (world_size,))
    for module in transformer.modules():
        if isinstance(module, BLOCKS):
            fully_shard(module, mesh=mesh)
    fully_shard(transformer, mesh=mesh)


def main(mode: str, out: Path) -> None:
    accelerator = Accelerator(cpu=True)  # MULTI_CPU (gloo) under torchrun, one plain process otherwise
    rank, world_size = accelerator.process_index, accelerator.num_processes
    assert (mode == "sharded") == (world_size == HALVES), f"{mode} with {world_size} processes"
    transformer, ema = tiny_student()
    if mode == "sharded":
        shard(transformer, world_size)
        ema.refresh()
    else:  # the script's --gradient_checkpointing without FSDP
        transformer.enable_gradient_checkpointing()
    student = list(ema.parameters("student").values())
    optimizer = torch.optim.AdamW(student, lr=1e-2)
    batch, uncond = global_batch()
    halves = [rank] if mode == "sharded" else list(range(HALVES))
    generators = {h: torch.Generator().manual_seed(SEED + h) for h in halves}

    losses, norms = [], []
    for _ in range(STEPS):
        parts = [
            scfm_training_losses(
                transformer, ema, FAMILY, half(batch, h), uncond=uncond, grid=GRID, conditioning=CONDITIONING,
                generator=generators[h],
            ).losses.loss
            for h in halves
        ]  # fmt: skip
        loss = sum(parts) / len(parts)  # FSDP averages the ranks' gradients the same way
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(student, max_norm=0.5)  # the global norm, also over shards
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update()
        if mode == "sharded":
            loss = loss.detach().clone()
            dist.all_reduce(loss)
            loss /= world_size
        losses.append(loss.item())
        norms.append(norm.item())

    # A forward pass of the sharded slow EMA (every rank takes part) on fixed inputs.
    g = torch.Generator().manual_seed(2)
    x, sigma = torch.randn(2, 16, 4, generator=g), torch.tensor([0.3, 0.8])
    text = {key: value[:2] for key, value in batch.items() if key != "latents"}
    velocity = FAMILY.velocity_fn(transformer, text, (2, 1, 8, 8), guidance=torch.tensor([3.5, 3.5]))
    with torch.no_grad(), ema.use("slow"):
        slow_output = velocity(x, sigma, torch.arange(2))

    # Whole tensors: collectives on every rank, written by the main process.
    tensors = {
        **{f"student.{k}": v for k, v in full_tensors(ema.parameters("student")).items()},
        **ema.state_dict(),
        **{f"adapter_slow.{k}": v for k, v in ema.adapter_state_dict("slow").items()},
        "slow_output": slow_output.detach().cpu(),
    }
    local = [p.to_local().numel() for p in student if hasattr(p, "to_local")]

    # A checkpoint through the real hooks, resumed into zeroed LoRA tensors.
    rng = generators[halves[0]]
    register_checkpoint_hooks(
        accelerator, transformer, ema, rng=rng, record={"run": "fsdp"}, state={},
        write_adapter=lambda folder, lora_state_dict: save_file(lora_state_dict, Path(folder, "adapter.safetensors")),
    )  # fmt: skip
    folder = save_checkpoint(accelerator, out, step=STEPS)
    with torch.no_grad():
        for params in (ema.parameters("student"), ema.parameters("fast"), ema.parameters("slow")):
            for p in params.values():
                p.zero_()
    load_checkpoint(accelerator, folder)
    resumed = {
        **{f"student.{k}": v for k, v in full_tensors(ema.parameters("student")).items()},
        **ema.state_dict(),
    }
    if accelerator.is_main_process:
        save_file({k: v.contiguous() for k, v in tensors.items()}, out / "tensors.safetensors")
        save_file({k: v.contiguous() for k, v in resumed.items()}, out / "resumed.safetensors")
        summary = {
            "world_size": world_size,
            "losses": losses,
            "norms": norms,
            "sharded_params": len(local),
            "local_numel": sum(local),
            "full_numel": sum(p.numel() for p in student),
        }
        (out / "summary.json").write_text(json.dumps(summary))
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
