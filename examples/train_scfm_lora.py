#!/usr/bin/env python
"""Distill a pre-trained Flux or SD3 model into a 3-8 step SCFM LoRA adapter.

SCFM ("Shortcutting Pre-trained Flow Matching Diffusion Models is Almost Free Lunch", NeurIPS 2025) trains a
LoRA on the model's own velocity field: at (x_σ, σ) the student regresses onto the average velocity of two
finer Euler steps, the first taken by the frozen teacher (a share of the batch) or by a fast EMA of the
student (the rest), the second by a slow EMA. The teacher is the same transformer with adapters disabled;
both EMAs are extra LoRA adapters on it. All method math lives in `scfm_diffusers.training`; this script
wires data, accelerate and checkpoints around it.

One GPU:
    accelerate launch examples/train_scfm_lora.py --pretrained_model_name_or_path black-forest-labs/FLUX.1-dev \
        --prompts_file prompts.txt --output_dir flux-scfm --mixed_precision bf16 --gradient_checkpointing \
        --use_8bit_adam --train_batch_size 8 --max_train_steps 2000 --num_inference_steps 4
Several GPUs (DDP) or DeepSpeed ZeRO-2:
    accelerate launch --config_file examples/configs/multi_gpu.yaml examples/train_scfm_lora.py ...
    accelerate launch --config_file examples/configs/deepspeed_zero2.yaml examples/train_scfm_lora.py ...
CPU smoke test (a locally saved tiny pipeline):
    accelerate launch --cpu --num_processes 1 examples/train_scfm_lora.py --pretrained_model_name_or_path tiny \
        --train_data_dir data --resolution 32 --max_train_steps 2 --rank 4 --lora_alpha 4
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, DistributedType, ProjectConfiguration, set_seed
from diffusers import DiffusionPipeline
from diffusers.optimization import get_scheduler
from diffusers.training_utils import cast_training_params, free_memory
from peft import LoraConfig
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from scfm_diffusers.adapter import SCFMInferenceSettings, push_adapter, save_adapter
from scfm_diffusers.families import family_of_class_name, get_family
from scfm_diffusers.training.data import (
    ImageCaptionPreprocessor,
    ImageCaptionSamples,
    cache_latents_and_embeddings,
    generate_teacher_images,
    load_image_caption_dataset,
    make_fingerprint,
    read_prompts,
    repeat_to_length,
)
from scfm_diffusers.training.ema import DualLoraEMA, lora_parameters
from scfm_diffusers.training.objective import loss_by_sigma_bins, scfm_loss
from scfm_diffusers.training.timesteps import GridSamplerConfig, sample_grid_steps
from scfm_diffusers.training.velocity import encode_images, get_training_family

logger = get_logger(__name__)
STUDENT = "default"
STATE_FILE, RUN_FILE = "scfm_state.safetensors", "scfm_run.json"


# ---------------------------------------------------------------------------------------------------------
# 1. Arguments
# ---------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    model = p.add_argument_group("model")
    model.add_argument(
        "--pretrained_model_name_or_path", required=True, help="Flux or SD3 pipeline: folder or Hub id."
    )
    model.add_argument("--revision", default=None, help="Hub revision of the base model.")
    model.add_argument("--variant", default=None, help="Weights variant of the base model (e.g. fp16).")

    data = p.add_argument_group("data (exactly one of --dataset_name, --train_data_dir, --prompts_file)")
    data.add_argument("--dataset_name", default=None, help="`datasets` dataset: Hub id or local folder.")
    data.add_argument("--dataset_config_name", default=None, help="Config name of --dataset_name.")
    data.add_argument("--train_data_dir", default=None, help="Image folder with metadata.jsonl (file_name, text).")
    data.add_argument("--image_column", default="image", help="Dataset column with the images.")
    data.add_argument("--caption_column", default="text", help="Dataset column with the captions.")
    data.add_argument("--max_train_samples", type=int, default=None, help="Use at most this many pairs.")
    data.add_argument(
        "--prompts_file", default=None, help="Data-free mode: one prompt per line; the teacher draws the images."
    )
    data.add_argument(
        "--teacher_num_inference_steps", type=int, default=32, help="Teacher steps for data-free images."
    )
    data.add_argument("--teacher_images_per_prompt", type=int, default=1, help="Images per prompt in data-free mode.")
    data.add_argument("--resolution", type=int, default=512, help="Square training resolution.")
    data.add_argument("--center_crop", action="store_true", help="Center-crop instead of random crops.")
    data.add_argument("--random_flip", action="store_true", help="Random horizontal flips.")
    data.add_argument("--max_sequence_length", type=int, default=256, help="T5 tokens per caption.")
    data.add_argument("--dataloader_num_workers", type=int, default=0, help="DataLoader worker processes.")

    train = p.add_argument_group("optimisation")
    train.add_argument("--output_dir", default="scfm-lora", help="Adapter folder; checkpoints and caches go below it.")
    train.add_argument("--seed", type=int, default=0, help="Seed of everything random.")
    train.add_argument("--train_batch_size", type=int, default=8, help="Batch size per device.")
    train.add_argument("--gradient_accumulation_steps", type=int, default=1, help="Micro-batches per optimizer step.")
    train.add_argument("--max_train_steps", type=int, default=1000, help="Optimizer steps.")
    train.add_argument("--learning_rate", type=float, default=2e-5, help="AdamW learning rate (reference: 2e-5).")
    train.add_argument("--lr_scheduler", default="constant", help="diffusers lr schedule (constant, cosine, ...).")
    train.add_argument("--lr_warmup_steps", type=int, default=0, help="Warm-up steps of the lr schedule.")
    train.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW beta1.")
    train.add_argument("--adam_beta2", type=float, default=0.999, help="AdamW beta2.")
    train.add_argument("--adam_weight_decay", type=float, default=1e-4, help="AdamW weight decay.")
    train.add_argument("--adam_epsilon", type=float, default=1e-8, help="AdamW epsilon.")
    train.add_argument("--max_grad_norm", type=float, default=None, help="Grad-norm clip (default: Flux 10, SD3 2).")
    train.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes AdamW8bit.")
    train.add_argument("--gradient_checkpointing", action="store_true", help="Recompute activations in backward.")
    train.add_argument(
        "--mixed_precision", choices=["no", "fp16", "bf16"], default=None, help="Overrides accelerate's."
    )
    train.add_argument("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere+ GPUs.")
    train.add_argument(
        "--enable_xformers_memory_efficient_attention", action="store_true", help="xformers attention (CUDA)."
    )

    lora = p.add_argument_group("LoRA and SCFM")
    lora.add_argument("--rank", type=int, default=64, help="LoRA rank (reference: 64).")
    lora.add_argument("--lora_alpha", type=float, default=64, help="LoRA alpha (reference: 64).")
    for f in dataclasses.fields(GridSamplerConfig):  # one flag per objective setting, defaults = the method's
        kind = {"int": int, "float": float}.get(str(f.type), float)
        nargs = "+" if "tuple" in str(f.type) else None
        lora.add_argument(
            f"--{f.name}", type=int if nargs else kind, nargs=nargs, default=None, help=f.metadata["help"]
        )
    lora.add_argument("--fast_ema_decay", type=float, default=0.99, help="Decay of the fast EMA.")
    lora.add_argument("--slow_ema_decay", type=float, default=0.999, help="Decay of the slow EMA.")
    lora.add_argument(
        "--ema_restart_steps", type=int, default=0, help="Reset both EMAs to the student every N steps (0: never)."
    )
    lora.add_argument(
        "--guidance_range", type=float, nargs=2, default=(0.0, 7.5), help="Flux-dev: per-sample g ~ U[a, b)."
    )
    lora.add_argument("--cfg_scale", type=float, default=4.5, help="SD3: CFG scale of every velocity (reference 4.5).")
    lora.add_argument(
        "--save_weights",
        choices=["student", "ema_slow", "ema_fast"],
        default="student",
        help="Weights written to the adapter.",
    )

    infer = p.add_argument_group("adapter settings and validation")
    infer.add_argument("--num_inference_steps", type=int, default=4, help="Steps the adapter recommends (3-8).")
    infer.add_argument(
        "--inference_shift", type=float, default=None, help="Sampling shift (default: Flux 3.25, SD3 3.0)."
    )
    infer.add_argument(
        "--guidance_scale", type=float, default=None, help="Inference guidance (default: Flux 3.5, SD3 --cfg_scale)."
    )
    infer.add_argument("--lora_scale", type=float, default=1.0, help="Recommended LoRA scale at inference.")
    infer.add_argument("--validation_prompt", nargs="+", default=None, help="Prompt(s) sampled during training.")
    infer.add_argument("--validation_steps", type=int, default=200, help="Validate every N steps.")

    ckpt = p.add_argument_group("checkpoints, logging, Hub")
    ckpt.add_argument(
        "--checkpointing_steps", type=int, default=500, help="Save a resumable checkpoint every N steps."
    )
    ckpt.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep at most this many checkpoints.")
    ckpt.add_argument("--resume_from_checkpoint", default=None, help='A checkpoint folder, or "latest".')
    ckpt.add_argument("--report_to", default="tensorboard", help='"tensorboard", "wandb", "all" or "none".')
    ckpt.add_argument("--logging_dir", default="logs", help="Tracker folder, below --output_dir.")
    ckpt.add_argument("--push_to_hub", action="store_true", help="Upload the adapter folder to the Hub at the end.")
    ckpt.add_argument("--hub_model_id", default=None, help="Hub repository (default: the output folder's name).")
    ckpt.add_argument("--hub_token", default=None, help="Hub token (default: the logged-in one).")
    ckpt.add_argument("--hub_private", action="store_true", help="Create the Hub repository as private.")
    args = p.parse_args(argv)

    sources = [s for s in (args.dataset_name, args.train_data_dir, args.prompts_file) if s]
    if len(sources) != 1:
        p.error("give exactly one data source: --dataset_name, --train_data_dir or --prompts_file.")
    if args.resume_from_checkpoint not in (None, "latest") and not Path(args.resume_from_checkpoint).is_dir():
        p.error(
            f"--resume_from_checkpoint {args.resume_from_checkpoint!r} does not exist (use a checkpoint-N folder or 'latest')."
        )
    return args


def grid_config(args: argparse.Namespace, family) -> GridSamplerConfig:
    """The objective's grid settings: flags that were given, family defaults, then the method's defaults."""
    given = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(GridSamplerConfig)
        if getattr(args, f.name) is not None
    }
    given.setdefault("dynamic_shift_prob", family.dynamic_shift_prob)
    if "self_grid_sizes" in given:
        given["self_grid_sizes"] = tuple(given["self_grid_sizes"])
    return GridSamplerConfig(**given)


def run_record(args: argparse.Namespace, family_name: str, targets: list[str]) -> dict:
    """What a checkpoint must share with the run that resumes it."""
    return {
        "base_model": str(args.pretrained_model_name_or_path),
        "family": family_name,
        "rank": args.rank,
        "lora_alpha": args.lora_alpha,
        "lora_targets": targets,
    }


# ---------------------------------------------------------------------------------------------------------
# 2. Main
# ---------------------------------------------------------------------------------------------------------
def main(args: argparse.Namespace) -> Path:
    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)
        ),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    set_seed(args.seed)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)

    # 2.1 The base model: its family decides LoRA targets, guidance handling and the grad clip.
    config = DiffusionPipeline.load_config(args.pretrained_model_name_or_path, revision=args.revision)
    family = get_training_family(family_of_class_name(config.get("_class_name", "<none>")).name)
    pipe = (
        get_family(family.name)
        .pipeline_class.from_pretrained(
            args.pretrained_model_name_or_path, revision=args.revision, variant=args.variant, torch_dtype=weight_dtype
        )
        .to(accelerator.device)
    )
    pipe.set_progress_bar_config(disable=True)
    transformer = pipe.transformer.requires_grad_(False)
    for module in (pipe.vae, *(getattr(pipe, n, None) for n in ("text_encoder", "text_encoder_2", "text_encoder_3"))):
        if module is not None:
            module.requires_grad_(False)

    # 2.2 Data: dataset, image folder, or teacher-generated images (data-free); latents + embeddings cached once.
    cache_dir = output_dir / "cache"
    train_data_dir = args.train_data_dir
    if args.prompts_file:
        train_data_dir = cache_dir / "teacher_data"
        if accelerator.is_main_process:
            generate_teacher_images(
                pipe,
                read_prompts(args.prompts_file),
                train_data_dir,
                height=args.resolution,
                width=args.resolution,
                num_inference_steps=args.teacher_num_inference_steps,
                seed=args.seed,
                guidance_scale=args.guidance_scale or family.inference_guidance_scale,
                images_per_prompt=args.teacher_images_per_prompt,
            )
        accelerator.wait_for_everyone()
    dataset = load_image_caption_dataset(
        dataset_name=args.dataset_name,
        dataset_config_name=args.dataset_config_name,
        train_data_dir=train_data_dir,
        image_column=args.image_column,
        caption_column=args.caption_column,
        max_train_samples=args.max_train_samples,
    )
    samples = ImageCaptionSamples(
        dataset,
        ImageCaptionPreprocessor(
            args.resolution,
            center_crop=args.center_crop,
            random_flip=args.random_flip,
            image_column=args.image_column,
            caption_column=args.caption_column,
            seed=args.seed,
        ),
    )

    def encode_prompts(prompts: list[str]) -> dict[str, torch.Tensor]:
        return family.encode_prompts(pipe, prompts, args.max_sequence_length)

    fingerprint = make_fingerprint(
        model=args.pretrained_model_name_or_path,
        data=dataset._fingerprint,
        rows=len(dataset),
        resolution=args.resolution,
        crop=args.center_crop,
        flip=args.random_flip,
        seq=args.max_sequence_length,
        seed=args.seed,
    )
    with accelerator.main_process_first():  # the main process encodes and writes the cache; the others read it
        cached = cache_latents_and_embeddings(
            samples,
            encode_images=lambda pixels: encode_images(pipe.vae, pixels),
            encode_prompts=encode_prompts,
            batch_size=args.train_batch_size,
            cache_path=cache_dir / "latents.safetensors",
            fingerprint=fingerprint,
            show_progress=accelerator.is_local_main_process,
        )
    if samples.skipped:
        logger.warning(f"Skipped {len(samples.skipped)} unreadable images, e.g. {samples.skipped[0]}.")
    with torch.no_grad():
        uncond = encode_prompts([""])  # SD3's CFG uses the empty prompt in every velocity
        validation_text = encode_prompts(args.validation_prompt) if args.validation_prompt else None
    # Text encoders are no longer needed: free them (the VAE stays for validation images).
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        if getattr(pipe, name, None) is not None:
            setattr(pipe, name, None)
    free_memory()
    few_shot_min = args.train_batch_size * accelerator.num_processes
    train_rows = repeat_to_length(list(range(len(cached))), few_shot_min)  # a 10-pair few-shot set still fills batches
    train_dataloader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(cached, train_rows),
        batch_size=args.train_batch_size,
        shuffle=True,
        drop_last=True,
        collate_fn=cached.collate,
        num_workers=args.dataloader_num_workers,
    )

    # 2.3 Student LoRA + dual EMA as adapters on the one transformer (teacher = adapters disabled).
    targets = family.lora_target_modules(transformer)
    transformer.add_adapter(
        LoraConfig(r=args.rank, lora_alpha=args.lora_alpha, init_lora_weights="gaussian", target_modules=targets),
        adapter_name=STUDENT,
    )
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    if args.enable_xformers_memory_efficient_attention:
        if not torch.cuda.is_available():
            raise ValueError("--enable_xformers_memory_efficient_attention needs a CUDA GPU; drop the flag on CPU.")
        transformer.enable_xformers_memory_efficient_attention()
    ema = DualLoraEMA(transformer, STUDENT, fast_decay=args.fast_ema_decay, slow_decay=args.slow_ema_decay)
    cast_training_params(transformer, dtype=torch.float32)  # trainable LoRA in fp32 under mixed precision
    student_params = list(lora_parameters(transformer, STUDENT).values())

    if args.use_8bit_adam:
        import bitsandbytes as bnb

        optimizer_class = bnb.optim.AdamW8bit
    else:
        optimizer_class = torch.optim.AdamW
    optimizer = optimizer_class(
        student_params,
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
    )
    rng = torch.Generator().manual_seed(args.seed + accelerator.process_index)  # noise, grids, guidance
    record = run_record(args, family.name, targets)

    # 2.4 Checkpoints hold the student LoRA, BOTH EMAs and the sampling RNG (accelerate adds optimizer,
    #     lr schedule, data order and global RNG). Never the frozen base weights.
    def save_hook(models, weights, folder):
        if weights:  # DeepSpeed saves its own engine state and passes no weights
            weights.pop()
        if accelerator.is_main_process:
            student = {
                f"student.{k}": p.detach().float().cpu() for k, p in lora_parameters(transformer, STUDENT).items()
            }
            save_file({**student, **ema.state_dict()}, os.path.join(folder, STATE_FILE))
            Path(folder, RUN_FILE).write_text(json.dumps(record, indent=2))
        torch.save(rng.get_state(), os.path.join(folder, f"scfm_rng_{accelerator.process_index}.pt"))

    def load_hook(models, folder):
        if accelerator.distributed_type != DistributedType.DEEPSPEED:
            models.pop()
        saved = json.loads(Path(folder, RUN_FILE).read_text()) if Path(folder, RUN_FILE).is_file() else None
        if saved != record:
            raise ValueError(
                f"{folder} is a checkpoint of another run: it has {saved}, this run is {record}. "
                "Point --resume_from_checkpoint at a checkpoint of this run or change --output_dir."
            )
        state = load_file(os.path.join(folder, STATE_FILE))
        with torch.no_grad():
            for key, param in lora_parameters(transformer, STUDENT).items():
                param.copy_(state.pop(f"student.{key}"))
        ema.load_state_dict(state)
        rng.set_state(torch.load(os.path.join(folder, f"scfm_rng_{accelerator.process_index}.pt")))

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
    max_grad_norm = args.max_grad_norm or family.max_grad_norm
    if accelerator.distributed_type == DistributedType.DEEPSPEED:  # DeepSpeed clips in its own step: give it ours
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        if ds_config.get("gradient_clipping", "auto") == "auto":
            ds_config["gradient_clipping"] = max_grad_norm
    model, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
        transformer, optimizer, train_dataloader, lr_scheduler
    )

    steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    num_epochs = math.ceil(args.max_train_steps / steps_per_epoch)
    global_step, first_epoch, skip_batches = 0, 0, 0
    if args.resume_from_checkpoint:
        checkpoint = (
            latest_checkpoint(output_dir)
            if args.resume_from_checkpoint == "latest"
            else Path(args.resume_from_checkpoint)
        )
        if checkpoint is None:
            logger.warning(f"No checkpoint in {output_dir}: starting a new run.")
        else:
            accelerator.load_state(str(checkpoint))
            global_step = int(checkpoint.name.split("-")[-1])
            first_epoch = global_step // steps_per_epoch
            skip_batches = (global_step % steps_per_epoch) * args.gradient_accumulation_steps
            logger.info(f"Resumed from {checkpoint} at step {global_step}.")
    if accelerator.is_main_process:
        accelerator.init_trackers("scfm-lora", config={k: str(v) for k, v in vars(args).items()})

    # 2.5 Training loop: one call to the objective per step.
    grid = grid_config(args, family)
    image_seq_len = family.image_seq_len(cached.latents[:1])
    has_guidance = getattr(transformer.config, "guidance_embeds", False)
    progress = tqdm(
        range(args.max_train_steps), initial=global_step, desc="SCFM", disable=not accelerator.is_local_main_process
    )
    validation_images = []
    for epoch in range(first_epoch, num_epochs):
        train_dataloader.set_epoch(epoch)
        batches = (
            accelerator.skip_first_batches(train_dataloader, skip_batches)
            if epoch == first_epoch
            else train_dataloader
        )
        for batch in batches:
            with accelerator.accumulate(model):
                latents = batch.pop("latents").to(accelerator.device)
                x0 = family.to_model_space(latents)
                n = len(x0)
                noise = torch.randn(x0.shape, generator=rng).to(x0)
                steps = sample_grid_steps(n, grid, image_seq_len=image_seq_len, generator=rng).to(x0.device)
                options = {"uncond": uncond, "cfg_scale": args.cfg_scale, "guidance": None}
                if has_guidance:
                    low, high = args.guidance_range
                    options["guidance"] = (low + (high - low) * torch.rand(n, generator=rng)).to(x0.device)
                text = {k: v.to(accelerator.device) for k, v in batch.items()}

                target = family.velocity_fn(transformer, text, latents.shape, **options)  # unwrapped, no grad
                out = scfm_loss(
                    student=family.velocity_fn(model, text, latents.shape, **options),
                    teacher=ema.wrap("teacher", target),
                    fast_ema=ema.wrap("fast", target),
                    slow_ema=ema.wrap("slow", target),
                    x0=x0,
                    noise=noise,
                    steps=steps,
                )
                mean_loss = accelerator.gather(out.loss.detach()[None]).mean().item()
                if not math.isfinite(mean_loss):
                    last = latest_checkpoint(output_dir)
                    raise FloatingPointError(
                        f"Non-finite loss ({mean_loss}) at step {global_step}; training stopped before the update. "
                        f"Last good checkpoint: {last or 'none'}. Lower --learning_rate or --max_grad_norm, or "
                        "use bf16 instead of fp16, then --resume_from_checkpoint latest."
                    )
                accelerator.backward(out.loss)
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
            logs = {
                "loss": mean_loss,
                "loss_teacher": out.loss_teacher.item(),
                "loss_self": out.loss_self.item(),
                "lr": lr_scheduler.get_last_lr()[0],
                **loss_by_sigma_bins(steps.sigma, out.loss_per_sample),
            }
            progress.set_postfix(
                {
                    "loss": f"{mean_loss:.4f}",
                    "teacher": f"{logs['loss_teacher']:.4f}",
                    "self": f"{logs['loss_self']:.4f}",
                }
            )
            accelerator.log({k: v for k, v in logs.items() if math.isfinite(v)}, step=global_step)

            if global_step % args.checkpointing_steps == 0 or global_step == args.max_train_steps:
                if accelerator.is_main_process:
                    prune_checkpoints(output_dir, args.checkpoints_total_limit)
                accelerator.save_state(str(output_dir / f"checkpoint-{global_step}"))
            if (
                args.validation_prompt
                and accelerator.is_main_process
                and (global_step % args.validation_steps == 0 or global_step == args.max_train_steps)
            ):
                validation_images = validate(
                    args,
                    pipe,
                    accelerator.unwrap_model(model),
                    validation_text,
                    uncond,
                    family,
                    accelerator,
                    global_step,
                )
            if global_step >= args.max_train_steps:
                break
        if global_step >= args.max_train_steps:
            break

    # 2.6 The adapter folder (weights + settings + scheduler + model card), optionally pushed to the Hub.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        settings = inference_settings(args, family, grid, accelerator)
        which = {"student": "student", "ema_slow": "slow", "ema_fast": "fast"}[args.save_weights]
        save_adapter(
            output_dir,
            accelerator.unwrap_model(model),
            settings,
            adapter_name=STUDENT,
            lora_state_dict=ema.adapter_state_dict(which),
            scheduler_config=pipe.scheduler.config,
            validation_images=validation_images,
            validation_prompts=args.validation_prompt,
        )
        logger.info(f"Adapter written to {output_dir}.")
        if args.push_to_hub:
            url = push_adapter(
                output_dir,
                args.hub_model_id or output_dir.resolve().name,
                token=args.hub_token,
                private=args.hub_private,
            )
            logger.info(f"Pushed to {url}.")
    accelerator.end_training()
    return output_dir


# ---------------------------------------------------------------------------------------------------------
# 3. Helpers
# ---------------------------------------------------------------------------------------------------------
def inference_settings(args, family, grid: GridSamplerConfig, accelerator) -> SCFMInferenceSettings:
    defaults = get_family(family.name).default_settings
    guidance = args.guidance_scale or (args.cfg_scale if family.name == "sd3" else family.inference_guidance_scale)
    training = {
        "steps": args.max_train_steps,
        "batch_size": args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps,
        "learning_rate": args.learning_rate,
        "rank": args.rank,
        "lora_alpha": args.lora_alpha,
        "resolution": args.resolution,
        "weights": args.save_weights,
        "teacher_ratio": grid.teacher_ratio,
        "shift_range": f"{grid.shift_min}-{grid.shift_max}",
        "ema_decays": f"{args.fast_ema_decay}/{args.slow_ema_decay}",
    }
    return SCFMInferenceSettings(
        family=family.name,
        num_inference_steps=args.num_inference_steps,
        shift=args.inference_shift or defaults["shift"],
        guidance_scale=guidance,
        lora_scale=args.lora_scale,
        base_model=str(args.pretrained_model_name_or_path),
        training=training,
    )


@torch.no_grad()
def validate(args, pipe, transformer, text, uncond, family, accelerator, step: int) -> list:
    """Sample the validation prompts with the student at the adapter's step count; log and save them."""
    from scfm_diffusers.pipeline_scfm import SCFM_PIPELINE_CLASSES

    settings = inference_settings(args, family, grid_config(args, family), accelerator)
    components = {**pipe.components, "transformer": transformer}
    scfm_pipe = SCFM_PIPELINE_CLASSES[family.name](**components)
    scfm_pipe.set_scfm_settings(settings)
    scfm_pipe.set_progress_bar_config(disable=True)
    extra = {}
    if family.name == "sd3":  # CFG against the empty prompt, as in training
        n = len(text["prompt_embeds"])
        extra = {
            "negative_prompt_embeds": uncond["prompt_embeds"]
            .expand(n, -1, -1)
            .to(accelerator.device, transformer.dtype),
            "negative_pooled_prompt_embeds": uncond["pooled_prompt_embeds"]
            .expand(n, -1)
            .to(accelerator.device, transformer.dtype),
        }
    images = scfm_pipe(
        prompt_embeds=text["prompt_embeds"].to(accelerator.device, transformer.dtype),
        pooled_prompt_embeds=text["pooled_prompt_embeds"].to(accelerator.device, transformer.dtype),
        height=args.resolution,
        width=args.resolution,
        generator=torch.Generator().manual_seed(args.seed),
        **extra,
    ).images
    folder = Path(args.output_dir) / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(images):
        image.save(folder / f"step{step:06d}_{index}.png")
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            import numpy as np

            tracker.writer.add_images(
                "validation", np.stack([np.asarray(i) for i in images]), step, dataformats="NHWC"
            )
    return images


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = sorted(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    return found[-1] if found else None


def prune_checkpoints(output_dir: Path, limit: int | None) -> None:
    """Remove the oldest checkpoints so that, with the one about to be written, at most ``limit`` remain."""
    if not limit:
        return
    found = sorted(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    for old in found[: max(0, len(found) - limit + 1)]:
        logger.info(f"Removing old checkpoint {old}.")
        shutil.rmtree(old)


if __name__ == "__main__":
    main(parse_args())
