#!/usr/bin/env python
"""Distill a pre-trained flow-matching model (FLUX.1, SD3, Qwen-Image, Flux.2 Klein, Z-Image, Chroma, Wan video)
into a 3-8 step SCFM LoRA adapter.

SCFM ("Shortcutting Pre-trained Flow Matching Diffusion Models is Almost Free Lunch", NeurIPS 2025) trains a
LoRA on the model's own velocity field: at (x_σ, σ) the student regresses onto the average velocity of two
finer Euler steps, the first taken by the frozen teacher (a share of the batch) or by a fast EMA of the
student (the rest), the second by a slow EMA. The teacher is the same transformer with adapters disabled;
both EMAs are extra LoRA adapters on it. The script only wires: configuration (`training.config`, from which
`--help` is built), components (`training.components`, `training.prepare`), ONE library call per step
(`training.step.scfm_training_losses`), checkpoints, validation and the adapter folder. Everything
model-specific is the family's (`scfm_diffusers.families`). By default the self rows train the jumps of the
--num_inference_steps grid (--target_steps 3 4 8: one adapter for several step counts), and after training a
LoRA scale per step count is calibrated against the teacher on --validation_prompt (docs/method.md).

One GPU:
    accelerate launch examples/train_scfm_lora.py --pretrained_model_name_or_path black-forest-labs/FLUX.1-dev \
        --prompts_file prompts.txt --output_dir flux-scfm --mixed_precision bf16 --gradient_checkpointing \
        --use_8bit_adam --train_batch_size 8 --max_train_steps 2000 --num_inference_steps 4 \
        --validation_prompt "a red fox in the snow"
From a local folder, name the base's Hub id for the card (a local path is never written or published):
    accelerate launch examples/train_scfm_lora.py --pretrained_model_name_or_path /data/FLUX.1-dev \
        --base_model_id black-forest-labs/FLUX.1-dev ... --push_to_hub   # token: `hf auth login` or HF_TOKEN
Large data: aspect-ratio buckets over a cached data set, or WebDataset shards streamed and encoded on the fly:
    accelerate launch examples/train_scfm_lora.py ... --dataset_name my-org/captioned --aspect_ratio_buckets
    accelerate launch examples/train_scfm_lora.py ... --dataset_name webdataset --data_files "shards/{00000..00099}.tar" \
        --image_column jpg --caption_column txt --streaming --aspect_ratio_buckets --dataloader_num_workers 4
Several GPUs (DDP) or DeepSpeed ZeRO-2:
    accelerate launch --config_file examples/configs/multi_gpu.yaml examples/train_scfm_lora.py ...
    accelerate launch --config_file examples/configs/deepspeed_zero2.yaml examples/train_scfm_lora.py ...
A base too large for one GPU (Qwen-Image, Flux.2 dev, Wan 2.2 A14B): FSDP2 shards it, one config per family:
    accelerate launch --config_file examples/configs/fsdp2_qwenimage.yaml examples/train_scfm_lora.py ...
CPU smoke test (a locally saved tiny pipeline):
    accelerate launch --cpu --num_processes 1 examples/train_scfm_lora.py --pretrained_model_name_or_path tiny \
        --train_data_dir data --resolution 32 --max_train_steps 2 --rank 4 --lora_alpha 4
"""

from __future__ import annotations

import argparse
import sys

from scfm_diffusers.training.config import conditioning_config, grid_config, parse_args

if __name__ == "__main__":  # parse before the heavy imports below: --help and usage errors answer in seconds
    ARGS = parse_args()

import logging
import math
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import (
    DataLoaderConfiguration,
    DistributedDataParallelKwargs,
    InitProcessGroupKwargs,
    ProjectConfiguration,
    set_seed,
)
from diffusers.training_utils import cast_training_params
from tqdm.auto import tqdm

from scfm_diffusers.adapter import save_adapter
from scfm_diffusers.families import LoraExperts
from scfm_diffusers.hub import base_model_hub_id, push_adapter
from scfm_diffusers.training import components, distributed, validation
from scfm_diffusers.training.checkpoints import (
    checkpoint_to_resume,
    latest_checkpoint,
    load_checkpoint,
    register_checkpoint_hooks,
    save_checkpoint,
)
from scfm_diffusers.training.ema import DualLoraEMA, lora_parameters
from scfm_diffusers.training.lock import lock_output_dir
from scfm_diffusers.training.objective import loss_by_sigma_bins
from scfm_diffusers.training.prepare import encoders_on_device, prepare_data, stop_at_end_of_stream
from scfm_diffusers.training.quantization import ddp_ignore_quantized_weights
from scfm_diffusers.training.step import scfm_training_losses

logger = get_logger(__name__)
STUDENT = "default"
SECRET_FLAGS = ("hub_token",)  # never logged, tracked or written


def tracker_config(args: argparse.Namespace) -> dict[str, str]:
    """The flags as the trackers store them: never the token, never a local path of the base model."""
    config = {k: str(v) for k, v in vars(args).items() if k not in SECRET_FLAGS}
    base = base_model_hub_id(args.pretrained_model_name_or_path, args.base_model_id)
    config["pretrained_model_name_or_path"] = base or f"<local folder {Path(args.pretrained_model_name_or_path).name}>"
    return config


def steps_from_epochs(args: argparse.Namespace, loader, num_processes: int) -> None:
    """--num_train_epochs without --max_train_steps: the optimizer steps of that many epochs of the cached data."""
    if args.num_train_epochs is not None and args.max_train_steps is None:
        per_process = math.ceil(len(loader) / num_processes)
        args.max_train_steps = args.num_train_epochs * math.ceil(per_process / args.gradient_accumulation_steps)
        logger.info(f"--num_train_epochs {args.num_train_epochs}: {args.max_train_steps} optimizer steps.")


def resume(args: argparse.Namespace, accelerator: Accelerator) -> int:
    """The step to start from: 0, or that of the checkpoint --resume_from_checkpoint names (restored in full)."""
    checkpoint = checkpoint_to_resume(Path(args.output_dir), args.resume_from_checkpoint)
    if checkpoint is None:
        return 0
    step = load_checkpoint(accelerator, checkpoint)
    logger.info(f"Resumed from {checkpoint} at step {step}.")
    return step


def validate_student(args, pipe, transformer, family, data, grid, accelerator, weight_dtype, step: int) -> None:
    """Validation images of the student during training (the adapter's steps, shift, guidance and scale). Under FSDP
    every rank samples (a sharded forward needs them all) and the main process keeps the images."""
    batch_size = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    settings = validation.inference_settings(args, family, grid, effective_batch_size=batch_size)
    with (
        encoders_on_device(args, pipe, accelerator, "vae"),
        distributed.output_args(args, accelerator.is_main_process) as run_args,
    ):
        scfm_pipe = validation.scfm_pipeline(pipe, transformer, family, settings)
        validation.validate(
            run_args, scfm_pipe, family, data.validation_text, data.uncond, weight_dtype, step, accelerator.trackers
        )


def final_adapter(args, pipe, transformer, ema, family, data, grid, accelerator, weight_dtype, repo_id) -> None:
    """Calibrate the LoRA scale of the SAVED weights, sample the card's images with them at that scale, write the
    adapter folder and push it (main process; under FSDP every rank samples and gathers, the main one writes)."""
    which = {"student": "student", "ema_slow": "slow", "ema_fast": "fast"}[args.save_weights]
    batch_size = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    settings = validation.inference_settings(args, family, grid, effective_batch_size=batch_size)
    images = []
    with (
        ema.use(which),
        encoders_on_device(args, pipe, accelerator, "vae"),
        distributed.output_args(args, accelerator.is_main_process) as run_args,
    ):
        if data.calibration_text is not None:  # the saved weights, against the teacher, per step count
            steps = args.calibration_steps or sorted({*grid.target_steps, args.num_inference_steps})
            scfm_pipe = validation.scfm_pipeline(pipe, transformer, family, settings)
            scales = validation.calibrate(
                run_args, scfm_pipe, family, data.calibration_text, data.uncond, steps, weight_dtype
            )
            settings = validation.inference_settings(
                args, family, grid, effective_batch_size=batch_size, lora_scales=scales
            )
        if args.validation_prompt:  # the card's images: the uploaded weights at their calibrated scale
            scfm_pipe = validation.scfm_pipeline(pipe, transformer, family, settings)
            images = validation.validate(
                run_args, scfm_pipe, family, data.validation_text, data.uncond, weight_dtype, args.max_train_steps,
                accelerator.trackers,
            )  # fmt: skip
    weights = ema.adapter_state_dict(which)  # whole tensors (gathered on every rank under FSDP)
    if not accelerator.is_main_process:
        return
    if not args.upcast_before_saving:  # as diffusers: the training precision unless asked for float32
        weights = {key: value.to(weight_dtype) for key, value in weights.items()}
    save_adapter(
        args.output_dir,
        transformer,
        settings,
        adapter_name=STUDENT,
        lora_state_dict=weights,
        scheduler_config=pipe.scheduler.config,
        validation_images=images,
        validation_prompts=[args.validation_prompt] * len(images),
    )
    logger.info(f"Adapter written to {args.output_dir}.")
    if repo_id is not None:
        url = push_adapter(args.output_dir, repo_id, token=args.hub_token, private=args.hub_private)
        logger.info(f"Pushed to {url}.")


def main(args: argparse.Namespace) -> Path:
    # 1. Accelerator, logging, seeds; fail fast on the Hub and the launch before loading 12B weights.
    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)
        ),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=args.nccl_timeout))],
    )
    lock_output_dir(output_dir, accelerator)  # one run per output folder; a second one refuses, naming the pid
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    set_seed(args.seed)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    components.warn_about_command_line_token(args)
    repo_id = components.create_hub_repo(args, accelerator) if args.push_to_hub else None
    components.check_launch(accelerator.distributed_type, args.quantize_base, distributed.fsdp_version(accelerator))
    sharded = distributed.is_sharded(accelerator)  # FSDP: forward passes and gathers need every rank
    samples = accelerator.is_main_process or sharded  # the processes that run validation and the final adapter

    # 2. The frozen base (its family decides LoRA targets, conditioning, grad clip) and the data.
    pipe, family = components.load_base_model(args, accelerator, weight_dtype)
    data = prepare_data(args, pipe, family, accelerator, weight_dtype)
    transformer = family.trained_module(pipe)  # the transformer, or Wan 2.2's two experts as one module
    if data.prepared is not None:
        steps_from_epochs(args, data.prepared, accelerator.num_processes)

    # 3. Student LoRA + dual EMA as adapters on the one transformer (teacher = adapters disabled).
    lora_config = components.student_lora_config(args, family, transformer)
    transformer.add_adapter(lora_config, adapter_name=STUDENT)
    components.configure_transformer(args, transformer, accelerator)  # gradient checkpointing, xformers
    ema = DualLoraEMA(transformer, STUDENT, fast_decay=args.fast_ema_decay, slow_decay=args.slow_ema_decay)
    cast_training_params(transformer, dtype=torch.float32)  # trainable LoRA in fp32 under mixed precision
    student_params = list(lora_parameters(transformer, STUDENT).values())
    if args.scale_lr:
        args.learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    optimizer = components.make_optimizer(args, student_params)
    lr_scheduler = components.make_lr_scheduler(args, optimizer, accelerator.num_processes)
    rng = torch.Generator().manual_seed(args.seed + accelerator.process_index)  # noise, grids, guidance
    data_state: dict = {}  # the stream position (streaming), saved with each checkpoint
    grid, condition = grid_config(args, family), conditioning_config(args)
    batch_size = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps

    def write_adapter(folder, lora_state_dict=None):  # each checkpoint is an adapter folder too
        settings = validation.inference_settings(args, family, grid, effective_batch_size=batch_size)
        save_adapter(folder, transformer, settings, adapter_name=STUDENT, lora_state_dict=lora_state_dict,
                     scheduler_config=pipe.scheduler.config)  # fmt: skip

    # 4. Checkpoint hooks, distribution, resume, trackers.
    record = components.run_record(args, family, lora_config)
    register_checkpoint_hooks(
        accelerator, transformer, ema, rng=rng, record=record, state=data_state, write_adapter=write_adapter
    )
    max_grad_norm = args.max_grad_norm or family.max_grad_norm
    components.configure_deepspeed(accelerator, max_grad_norm, args.train_batch_size)
    components.configure_fsdp(accelerator)  # LoRA gradients reduced in float32 under FSDP2
    if isinstance(transformer, LoraExperts):  # a step may use one expert: DDP must not wait for the other's grads
        accelerator.ddp_handler = DistributedDataParallelKwargs(find_unused_parameters=True)
    if args.quantize_base:  # DDP must not broadcast the quantized (frozen, identical) base weights
        ddp_ignore_quantized_weights(transformer)
    if data.prepared is not None:
        model, optimizer, data.prepared, lr_scheduler = accelerator.prepare(
            transformer, optimizer, data.prepared, lr_scheduler
        )
    else:  # a stream is split between processes by `datasets` itself
        model, optimizer, lr_scheduler = accelerator.prepare(transformer, optimizer, lr_scheduler)
    if sharded:  # fully_shard replaced every parameter by its shard: the EMA and the clipping need the new ones
        ema.refresh()
        student_params = list(ema.parameters("student").values())
    global_step = resume(args, accelerator)
    if accelerator.is_main_process:
        accelerator.init_trackers(args.tracker_project_name, config=tracker_config(args))

    # 5. Training loop: ONE library call per step for the losses.
    progress = tqdm(
        range(args.max_train_steps), initial=global_step, desc="SCFM", disable=not accelerator.is_local_main_process
    )
    batches = data.batches(data.prepared, global_step, data_state)
    while global_step < args.max_train_steps:
        raw = next(batches, None)
        if data.prepared is None:
            stop_at_end_of_stream(accelerator, args, raw, global_step, data_state)
        batch = data.to_training_batch(raw)
        with accelerator.accumulate(model):
            step = scfm_training_losses(
                model, ema, family, batch, uncond=data.uncond, grid=grid, conditioning=condition, generator=rng
            )
            mean_loss = accelerator.gather(step.losses.loss.detach()[None]).mean().item()
            if not math.isfinite(mean_loss):
                raise FloatingPointError(
                    f"Non-finite loss ({mean_loss}) at step {global_step}; training stopped before the update. "
                    f"Last good checkpoint: {latest_checkpoint(output_dir) or 'none'}. Lower --learning_rate or "
                    "--max_grad_norm, or use bf16 instead of fp16, then --resume_from_checkpoint latest."
                )
            accelerator.backward(step.losses.loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(student_params, max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        if not accelerator.sync_gradients:
            continue
        ema.update()
        global_step += 1
        progress.update(1)
        if args.ema_restart_steps and global_step % args.ema_restart_steps == 0:
            ema.restart()
        parts = {**step.log_values(), "loss": mean_loss}  # only the parts this batch has (no NaN)
        progress.set_postfix({k: f"{v:.4f}" for k, v in parts.items()})
        logs = {
            **parts,
            "lr": lr_scheduler.get_last_lr()[0],
            **loss_by_sigma_bins(step.steps.sigma, step.losses.loss_per_sample),
        }
        accelerator.log(logs, step=global_step)
        if global_step % args.checkpointing_steps == 0 or global_step == args.max_train_steps:
            save_checkpoint(accelerator, output_dir, global_step, args.checkpoints_total_limit)
        if args.validation_prompt and samples and global_step % args.validation_steps == 0:
            if global_step < args.max_train_steps:  # the last step's images come with the final adapter
                validate_student(args, pipe, accelerator.unwrap_model(model), family, data, grid, accelerator,
                                 weight_dtype, global_step)  # fmt: skip

    # 6. The adapter folder (weights + settings + scheduler + model card), optionally pushed to the Hub.
    accelerator.wait_for_everyone()
    if samples:
        final_adapter(args, pipe, transformer, ema, family, data, grid, accelerator, weight_dtype, repo_id)
    accelerator.end_training()
    return output_dir


if __name__ == "__main__":
    sys.exit(0 if main(ARGS) else 1)
