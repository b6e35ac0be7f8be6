#!/usr/bin/env python
"""Distill a pre-trained Flux or SD3 model into a 3-8 step SCFM LoRA adapter.

SCFM ("Shortcutting Pre-trained Flow Matching Diffusion Models is Almost Free Lunch", NeurIPS 2025) trains a
LoRA on the model's own velocity field: at (x_σ, σ) the student regresses onto the average velocity of two
finer Euler steps, the first taken by the frozen teacher (a share of the batch) or by a fast EMA of the
student (the rest), the second by a slow EMA. The teacher is the same transformer with adapters disabled;
both EMAs are extra LoRA adapters on it. All method math lives in `scfm_diffusers.training`; this script
wires data, accelerate and checkpoints around it. By default the self rows train the jumps of the
--num_inference_steps grid (--target_steps 3 4 8: one adapter for several step counts), and after training a
LoRA scale per step count is calibrated against the teacher on --validation_prompt (docs/method.md).

One GPU:
    accelerate launch examples/train_scfm_lora.py --pretrained_model_name_or_path black-forest-labs/FLUX.1-dev \
        --prompts_file prompts.txt --output_dir flux-scfm --mixed_precision bf16 --gradient_checkpointing \
        --use_8bit_adam --train_batch_size 8 --max_train_steps 2000 --num_inference_steps 4 \
        --validation_prompt "a red fox in the snow"
Large data: aspect-ratio buckets over a cached data set, or WebDataset shards streamed and encoded on the fly:
    accelerate launch examples/train_scfm_lora.py ... --dataset_name my-org/captioned --aspect_ratio_buckets
    accelerate launch examples/train_scfm_lora.py ... --dataset_name webdataset --data_files "shards/{00000..00099}.tar" \
        --image_column jpg --caption_column txt --streaming --aspect_ratio_buckets --dataloader_num_workers 4
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
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import (
    DataLoaderConfiguration,
    DistributedType,
    InitProcessGroupKwargs,
    ProjectConfiguration,
    broadcast_object_list,
    set_seed,
)
from diffusers import DiffusionPipeline
from diffusers.optimization import get_scheduler
from diffusers.training_utils import cast_training_params, free_memory, offload_models
from peft import LoraConfig
from tqdm.auto import tqdm

from scfm_diffusers._files import write_text_atomic
from scfm_diffusers.adapter import SCFMInferenceSettings, create_adapter_repo, push_adapter, save_adapter
from scfm_diffusers.calibration import DEFAULT_LORA_SCALE_CANDIDATES, calibrate_lora_scales
from scfm_diffusers.families import ConditioningConfig, family_of_class_name
from scfm_diffusers.training.buckets import BucketBatchSampler, make_buckets
from scfm_diffusers.training.cache import build_latent_cache
from scfm_diffusers.training.checkpoints import (
    latest_checkpoint,
    load_checkpoint,
    register_checkpoint_hooks,
    save_checkpoint,
)
from scfm_diffusers.training.data import (
    ImageCaptionPreprocessor,
    StreamingBatches,
    load_image_caption_dataset,
    read_prompts,
)
from scfm_diffusers.training.ema import DualLoraEMA, lora_parameters
from scfm_diffusers.training.objective import loss_by_sigma_bins
from scfm_diffusers.training.quantization import (
    QUANTIZATION_CHOICES,
    check_distributed_support,
    ddp_ignore_quantized_weights,
    load_quantized_transformer,
)
from scfm_diffusers.training.step import scfm_training_losses
from scfm_diffusers.training.teacher_data import generate_teacher_images
from scfm_diffusers.training.timesteps import GridSamplerConfig

logger = get_logger(__name__)
STUDENT = "default"
CACHE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SECRET_FLAGS = ("hub_token",)  # never logged, tracked or written


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
    model.add_argument(
        "--quantize_base",
        choices=list(QUANTIZATION_CHOICES),
        default=None,
        help="Load the base transformer (= the teacher) quantized, QLoRA-style (docs/quantization.md): "
        + "; ".join(f"{c.name}: {c.description}" for c in QUANTIZATION_CHOICES.values()),
    )

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
    data.add_argument(
        "--data_files",
        nargs="+",
        default=None,
        help="Files for --dataset_name's builder (e.g. webdataset .tar shards).",
    )
    data.add_argument(
        "--aspect_ratio_buckets",
        action="store_true",
        help="Keep aspect ratios: buckets of ~--resolution² pixels (multiples of 16 px); one bucket per batch.",
    )
    data.add_argument(
        "--streaming",
        action="store_true",
        help="Stream --dataset_name and encode on the fly (no cache; one pass; for data sets too large to cache).",
    )
    data.add_argument("--shuffle_buffer_size", type=int, default=1000, help="Shuffle buffer of a streamed data set.")
    data.add_argument(
        "--cache_dtype",
        choices=["bf16", "fp16", "fp32"],
        default="bf16",
        help="Dtype of the cached latents/embeddings.",
    )
    data.add_argument("--cache_shard_size", type=int, default=256, help="Rows (or unique captions) per cache shard.")
    data.add_argument(
        "--offload", action="store_true", help="Keep the VAE and text encoders on the CPU except while they encode."
    )

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
    lora.add_argument(
        "--self_grids",
        choices=["targeted", "generic"],
        default="targeted",
        help="targeted: self rows train the jumps of the --target_steps (default --num_inference_steps) sampling "
        "grids; generic: the method's --self_grid_sizes mix at random shifts (docs/method.md).",
    )
    lora.add_argument("--fast_ema_decay", type=float, default=0.99, help="Decay of the fast EMA.")
    lora.add_argument("--slow_ema_decay", type=float, default=0.999, help="Decay of the slow EMA.")
    lora.add_argument(
        "--ema_restart_steps", type=int, default=0, help="Reset both EMAs to the student every N steps (0: never)."
    )
    lora.add_argument(
        "--guidance_range", type=float, nargs=2, default=(0.0, 7.5), help="Flux-dev: per-sample g ~ U[a, b)."
    )
    lora.add_argument(
        "--guidance_scale",
        type=float,
        default=None,
        help="Flux-dev: train with this one embedded guidance value instead of --guidance_range (as in diffusers).",
    )
    lora.add_argument(
        "--cfg_scale",
        type=float,
        default=None,
        help="CFG families (SD3): CFG scale of every training velocity (default: the family's, SD3 4.5).",
    )
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
        "--inference_guidance_scale",
        type=float,
        default=None,
        help="Guidance the adapter is sampled with (default: Flux 3.5, SD3 --cfg_scale).",
    )
    infer.add_argument(
        "--lora_scale", type=float, default=1.0, help="LoRA scale at inference where none is calibrated."
    )
    infer.add_argument("--validation_prompt", default=None, help="Prompt sampled during training (as in diffusers).")
    infer.add_argument("--num_validation_images", type=int, default=4, help="Images of --validation_prompt.")
    infer.add_argument("--validation_steps", type=int, default=200, help="Validate every N steps.")
    infer.add_argument(
        "--calibration_prompts",
        nargs="+",
        default=None,
        help="Prompts of the LoRA-scale calibration after training (default: --validation_prompt).",
    )
    infer.add_argument(
        "--calibration_images_per_prompt", type=int, default=4, help="Noise seeds per calibration prompt."
    )
    infer.add_argument(
        "--calibration_steps",
        type=int,
        nargs="+",
        default=None,
        help="Step counts given a calibrated LoRA scale (default: --target_steps and --num_inference_steps).",
    )
    infer.add_argument(
        "--lora_scale_candidates",
        type=float,
        nargs="+",
        default=list(DEFAULT_LORA_SCALE_CANDIDATES),
        help="LoRA scales tried per step count (default 0 to 2.0 by 0.1).",
    )
    infer.add_argument(
        "--calibration_reference_steps", type=int, default=32, help="Teacher steps of the calibration reference."
    )
    infer.add_argument(
        "--calibration_batch_size", type=int, default=4, help="Images per pipeline call in the calibration."
    )
    infer.add_argument(
        "--no_lora_scale_calibration", action="store_true", help="Keep --lora_scale for every step count."
    )

    ckpt = p.add_argument_group("checkpoints, logging, Hub")
    ckpt.add_argument(
        "--checkpointing_steps", type=int, default=500, help="Save a resumable checkpoint every N steps."
    )
    ckpt.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep at most this many checkpoints.")
    ckpt.add_argument("--resume_from_checkpoint", default=None, help='A checkpoint folder, or "latest".')
    ckpt.add_argument("--report_to", default="tensorboard", help='"tensorboard", "wandb", "all" or "none".')
    ckpt.add_argument("--logging_dir", default="logs", help="Tracker folder, below --output_dir.")
    ckpt.add_argument(
        "--push_to_hub",
        action="store_true",
        help="Create the Hub repository at the start, upload the adapter at the end.",
    )
    ckpt.add_argument("--hub_model_id", default=None, help="Hub repository (default: the output folder's name).")
    ckpt.add_argument("--hub_token", default=None, help="Hub token (default: the logged-in one).")
    ckpt.add_argument("--hub_private", action="store_true", help="Create the Hub repository as private.")
    ckpt.add_argument(
        "--nccl_timeout", type=int, default=1800, help="Process-group timeout in seconds (long caching/generation)."
    )
    args = p.parse_args(argv)

    sources = [s for s in (args.dataset_name, args.train_data_dir, args.prompts_file) if s]
    if len(sources) != 1:
        p.error("give exactly one data source: --dataset_name, --train_data_dir or --prompts_file.")
    if args.streaming and not args.dataset_name:
        p.error(
            "--streaming reads a --dataset_name (a Hub id, a folder, or a builder such as webdataset with --data_files)."
        )
    if args.data_files and not args.dataset_name:
        p.error("--data_files goes with --dataset_name (e.g. --dataset_name webdataset --data_files 'shards/*.tar').")
    targeted = ("target_steps", "target_levels", "target_shift")
    targeted_flags = [f"--{name}" for name in targeted if getattr(args, name) is not None]
    if args.self_grids == "targeted" and args.self_grid_sizes is not None:
        p.error("--self_grid_sizes sets the generic self grids: add --self_grids generic (or use --target_steps).")
    if args.self_grids == "generic" and targeted_flags:
        p.error(f"{', '.join(targeted_flags)} only apply with --self_grids targeted (the default).")
    if args.resume_from_checkpoint not in (None, "latest") and not Path(args.resume_from_checkpoint).is_dir():
        p.error(
            f"--resume_from_checkpoint {args.resume_from_checkpoint!r} does not exist (use a checkpoint-N folder or 'latest')."
        )
    return args


def grid_config(args: argparse.Namespace, family) -> GridSamplerConfig:
    """The objective's grid settings: flags that were given, family defaults, then the method's defaults.

    ``--self_grids targeted`` (default) trains the jumps of the ``--target_steps`` sampling grids (default: the
    adapter's ``--num_inference_steps``) at the adapter's sampling shift.
    """
    given = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(GridSamplerConfig)
        if getattr(args, f.name) is not None
    }
    given.setdefault("dynamic_shift_prob", family.dynamic_shift_prob)
    if args.self_grids == "targeted":
        given.setdefault("target_steps", [args.num_inference_steps])
        given.setdefault("target_shift", inference_shift(args, family))
    return GridSamplerConfig(**given)


def inference_shift(args: argparse.Namespace, family) -> float:
    """The shift the adapter is sampled with: ``--inference_shift`` or the family's reference shift."""
    return args.inference_shift or family.default_settings["shift"]


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
# 2. Components: base model, data, checkpoint hooks
# ---------------------------------------------------------------------------------------------------------
def load_base_model(args: argparse.Namespace, accelerator: Accelerator, weight_dtype: torch.dtype):
    """The base pipeline (frozen) and its training family, read from ``model_index.json``."""
    config = DiffusionPipeline.load_config(args.pretrained_model_name_or_path, revision=args.revision)
    family = family_of_class_name(config.get("_class_name", "<none>"))
    components = {}
    if args.quantize_base:  # a quantized base is also a quantized teacher (adapters off), at no extra memory
        components["transformer"] = load_quantized_transformer(
            args.pretrained_model_name_or_path,
            family.name,
            args.quantize_base,
            torch_dtype=weight_dtype,
            revision=args.revision,
            variant=args.variant,
            device=accelerator.device,
        )
    pipe = family.pipeline_class.from_pretrained(
        args.pretrained_model_name_or_path,
        revision=args.revision,
        variant=args.variant,
        torch_dtype=weight_dtype,
        **components,
    )
    pipe.set_progress_bar_config(disable=True)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False)
    # With --offload the encoders wait on the CPU and visit the GPU only to encode.
    resident = [pipe.transformer] if args.offload else [m for m in pipe.components.values() if hasattr(m, "to")]
    for module in resident:
        module.to(accelerator.device)
    return pipe, family


def encoders_on_device(args, pipe, accelerator, *names: str):
    """Context: the named components (VAE, text encoders) on the accelerator while inside (with --offload)."""
    modules = [getattr(pipe, name) for name in names if getattr(pipe, name, None) is not None]
    return offload_models(*modules, device=accelerator.device, offload=args.offload)


@dataclasses.dataclass
class TrainData:
    """What the loop needs from the data side.

    Attributes:
        batches: ``(prepared loader, first_step, state) -> iterator`` of raw batches (cache rows or a stream).
        to_training_batch: raw batch -> ``{"latents": (B, C, h, w) fp32, **text}`` on the device.
        uncond: Empty-prompt text tensors (SD3's CFG).
        validation_text: Text tensors of the validation prompts (or None).
        calibration_text: Text tensors of the LoRA-scale calibration prompts (or None: no calibration).
        prepared: The dataloader to hand to ``accelerator.prepare`` (None when streaming).
    """

    batches: Callable
    to_training_batch: Callable
    uncond: dict
    validation_text: dict | None
    prepared: torch.utils.data.DataLoader | None
    calibration_text: dict | None = None


def prepare_data(args, pipe, family, accelerator: Accelerator, weight_dtype: torch.dtype) -> TrainData:
    """Data set -> (teacher images) -> cached latents + embeddings, or a stream encoded on the fly."""
    output_dir = Path(args.output_dir)
    device = accelerator.device
    text_encoders = family.text_encoder_names
    buckets = make_buckets(args.resolution) if args.aspect_ratio_buckets else None

    def encode_prompts(prompts: list[str]) -> dict[str, torch.Tensor]:
        return family.encode_prompts(pipe, prompts, args.max_sequence_length, device=device)

    with torch.no_grad(), encoders_on_device(args, pipe, accelerator, *text_encoders):
        uncond = encode_prompts([""])  # SD3's CFG uses the empty prompt in every velocity
        validation_text = encode_prompts([args.validation_prompt]) if args.validation_prompt else None
        prompts = calibration_prompts(args)
        calibration_text = encode_prompts(prompts) if prompts else None

    train_data_dir = args.train_data_dir
    if args.prompts_file:  # data-free: every process draws its share of the teacher's images
        train_data_dir = output_dir / "cache" / "teacher_data"
        with encoders_on_device(args, pipe, accelerator, "vae", *text_encoders):
            generate_teacher_images(
                pipe,
                read_prompts(args.prompts_file),
                train_data_dir,
                height=args.resolution,
                width=args.resolution,
                num_inference_steps=args.teacher_num_inference_steps,
                seed=args.seed,
                guidance_scale=args.inference_guidance_scale or family.adapter_guidance_scale(conditioning(args)),
                images_per_prompt=args.teacher_images_per_prompt,
                show_progress=accelerator.is_local_main_process,
            )
    with accelerator.main_process_first():  # `datasets` prepares its own cache once
        dataset = load_image_caption_dataset(
            dataset_name=args.dataset_name,
            dataset_config_name=args.dataset_config_name,
            train_data_dir=train_data_dir,
            data_files=args.data_files,
            image_column=args.image_column,
            caption_column=args.caption_column,
            max_train_samples=args.max_train_samples,
            seed=args.seed,
            streaming=args.streaming,
            shuffle_buffer_size=args.shuffle_buffer_size,
        )
    preprocessor = ImageCaptionPreprocessor(
        args.resolution,
        center_crop=args.center_crop,
        random_flip=args.random_flip,
        image_column=args.image_column,
        caption_column=args.caption_column,
        seed=args.seed,
        buckets=buckets,
    )
    if args.streaming:
        data = _streaming_data(
            args, pipe, family, accelerator, weight_dtype, dataset, preprocessor, uncond, validation_text
        )
        return dataclasses.replace(data, calibration_text=calibration_text)

    settings = {  # everything the cache depends on (shard size and dtype are added by the cache)
        "model": str(args.pretrained_model_name_or_path),
        "revision": args.revision,
        "variant": args.variant,
        "encoder_dtype": str(weight_dtype),
        "data": dataset._fingerprint,
        "rows": len(dataset),
        "columns": [args.image_column, args.caption_column],
        "max_train_samples": args.max_train_samples,
        "resolution": args.resolution,
        "buckets": buckets,
        "center_crop": args.center_crop,
        "random_flip": args.random_flip,
        "max_sequence_length": args.max_sequence_length,
        "seed": args.seed,
    }
    cache = build_latent_cache(
        preprocessor(dataset),
        output_dir / "cache" / "latents",
        settings=settings,
        encode_images=lambda pixels, generators: family.encode_images(pipe.vae, pixels, generator=generators),
        encode_prompts=encode_prompts,
        batch_size=args.train_batch_size,
        shard_size=args.cache_shard_size,
        dtype=CACHE_DTYPES[args.cache_dtype],
        text_phase=lambda: encoders_on_device(args, pipe, accelerator, *text_encoders),
        image_phase=lambda: encoders_on_device(args, pipe, accelerator, "vae"),
        show_progress=accelerator.is_local_main_process,
    )
    if cache.skipped_summary():
        logger.warning(cache.skipped_summary())
    for name in text_encoders:  # no longer needed: free them (the VAE stays for validation images)
        if getattr(pipe, name, None) is not None:
            setattr(pipe, name, None)
    free_memory()

    # Every batch from one bucket; a 10-pair few-shot set is repeated so that every process gets a batch.
    sampler = BucketBatchSampler(
        cache.bucket_ids, args.train_batch_size, seed=args.seed, min_batches=accelerator.num_processes
    )
    dataloader = torch.utils.data.DataLoader(
        cache, batch_sampler=sampler, collate_fn=cache.collate, num_workers=args.dataloader_num_workers
    )

    def batches(loader, first_step: int, state: dict):
        """Epoch after epoch of the prepared loader, from ``first_step`` (mid-epoch on resume)."""
        steps_per_epoch = math.ceil(len(loader) / args.gradient_accumulation_steps)
        epoch, skip = divmod(first_step, steps_per_epoch)
        while True:
            loader.set_epoch(epoch)  # before skipping: the skipping loader copies the epoch
            yield from (
                accelerator.skip_first_batches(loader, skip * args.gradient_accumulation_steps) if skip else loader
            )
            epoch, skip = epoch + 1, 0

    def to_training_batch(batch):  # latents in fp32 (the objective's), text in the weights' dtype, masks as they are
        return {
            key: _to_device(value, device, torch.float32 if key == "latents" else weight_dtype)
            for key, value in batch.items()
        }

    return TrainData(
        batches, to_training_batch, uncond, validation_text, prepared=dataloader, calibration_text=calibration_text
    )


def _streaming_data(args, pipe, family, accelerator, weight_dtype, dataset, preprocessor, uncond, validation_text):
    """One pass over a streamed data set; each batch is VAE- and text-encoded in the loop (encoders kept)."""
    device = accelerator.device

    def batches(loader, first_step: int, state: dict):
        stream = StreamingBatches(
            dataset,
            preprocessor,
            batch_size=args.train_batch_size,
            process_index=accelerator.process_index,
            num_processes=accelerator.num_processes,
            skip=state.get("stream_rows", 0),  # rows this process read before the checkpoint
        )
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=args.dataloader_num_workers)
        for batch in loader:
            state["stream_rows"] = int(batch.pop("num_rows"))
            yield batch

    def to_training_batch(batch):
        with torch.no_grad(), encoders_on_device(args, pipe, accelerator, "vae", *family.text_encoder_names):
            text = family.encode_prompts(pipe, batch["captions"], args.max_sequence_length, device=device)
            latents = family.encode_images(pipe.vae, batch["pixel_values"])
        text = {key: _to_device(value, device, weight_dtype) for key, value in text.items()}
        return {"latents": latents.to(device, torch.float32), **text}

    return TrainData(batches, to_training_batch, uncond, validation_text, prepared=None)


def make_optimizer(args, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if args.use_8bit_adam:
        import bitsandbytes as bnb

        optimizer_class = bnb.optim.AdamW8bit
    else:
        optimizer_class = torch.optim.AdamW
    return optimizer_class(
        params,
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )


def create_hub_repo(args, accelerator) -> str:
    """Create the Hub repository on the main process; every process stops if that fails (none waits at a
    barrier for a main process that is gone). The error says what was wrong; the token is never shown."""
    repo_id, failure = None, None
    if accelerator.is_main_process:
        try:
            name = args.hub_model_id or Path(args.output_dir).resolve().name
            repo_id = create_adapter_repo(name, token=args.hub_token, private=args.hub_private)
        except (ValueError, OSError) as error:  # PermissionError is an OSError
            failure = error
    outcome = broadcast_object_list([repo_id, None if failure is None else str(failure)])
    if failure is not None:
        raise failure
    if outcome[1] is not None:
        raise RuntimeError(f"The main process could not create the Hub repository: {outcome[1]}")
    return outcome[0]


def check_launch(distributed_type, quantize_base: str | None) -> None:
    """Refuse launches this script cannot train correctly, before anything is loaded.

    FSDP: accelerate runs it only on accelerators (on CPU it errors or silently falls back to DDP), so this
    project cannot test it, and the EMA adapters and checkpoint hooks assume whole LoRA tensors on every
    process. A quantized base cannot be wrapped by DeepSpeed (or FSDP) either.
    """
    if distributed_type == DistributedType.FSDP:
        raise NotImplementedError(
            "FSDP is not supported by examples/train_scfm_lora.py yet (untestable without GPUs, and the EMA adapters "
            "and checkpoints expect whole LoRA tensors). For a base that does not fit one GPU, train on a quantized "
            "base (--quantize_base nf4) with one process or DDP, or use DeepSpeed ZeRO-2 "
            "(examples/configs/deepspeed_zero2.yaml); see docs/quantization.md."
        )
    if quantize_base:
        check_distributed_support(quantize_base, distributed_type)


def conditioning(args) -> ConditioningConfig:
    """The batch conditioning: Flux-dev's embedded guidance g ~ U[--guidance_range) (``--guidance_scale g`` fixes
    it, as in diffusers' Flux scripts); a CFG family's ``--cfg_scale`` (default: the family's)."""
    return ConditioningConfig(
        guidance_range=tuple(args.guidance_range), guidance_scale=args.guidance_scale, cfg_scale=args.cfg_scale
    )


def _to_device(value: torch.Tensor, device, dtype: torch.dtype) -> torch.Tensor:
    """Floating tensors to ``dtype`` on ``device``; masks and ids keep their dtype."""
    return value.to(device, dtype) if value.is_floating_point() else value.to(device)


def stop_at_end_of_stream(accelerator, args, batch, global_step: int, state: dict) -> None:
    """Every process stops together, with a clear error, when any one's stream ends before max_train_steps."""
    ended = accelerator.gather(torch.tensor([batch is None], device=accelerator.device)).any().item()
    if ended:
        last = latest_checkpoint(Path(args.output_dir))
        raise RuntimeError(
            f"The streamed data set ran out at step {global_step} of --max_train_steps {args.max_train_steps} "
            f"(process {accelerator.process_index} had used {state.get('stream_rows', 0)} rows; a last partial "
            f"batch is dropped). Last checkpoint: {last or 'none'}. Add data, or lower --max_train_steps: a run "
            "needs steps × batch size × accumulation steps rows per process."
        )


# ---------------------------------------------------------------------------------------------------------
# 3. Validation and adapter settings
# ---------------------------------------------------------------------------------------------------------
def calibration_prompts(args: argparse.Namespace) -> list[str]:
    """The prompts of the LoRA-scale calibration: --calibration_prompts, else --validation_prompt, else none."""
    if args.no_lora_scale_calibration:
        return []
    return list(args.calibration_prompts or ([args.validation_prompt] if args.validation_prompt else []))


def inference_settings(
    args, family, grid: GridSamplerConfig, accelerator, lora_scales: dict[int, float] | None = None
) -> SCFMInferenceSettings:
    """The adapter's settings; ``lora_scales`` are the calibrated scales (the recommended count's is the default)."""
    guidance = args.inference_guidance_scale or family.adapter_guidance_scale(conditioning(args))
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
        "self_grids": (
            f"targeted: steps {list(grid.target_steps)}, levels {list(grid.target_levels)}, shift {grid.target_shift}"
            if grid.step_targeted
            else f"generic: {list(grid.self_grid_sizes)}"
        ),
        "ema_decays": f"{args.fast_ema_decay}/{args.slow_ema_decay}",
    }
    return SCFMInferenceSettings(
        family=family.name,
        num_inference_steps=args.num_inference_steps,
        shift=inference_shift(args, family),
        guidance_scale=guidance,
        lora_scale=(lora_scales or {}).get(args.num_inference_steps, args.lora_scale),
        lora_scales=lora_scales or {},
        base_model=str(args.pretrained_model_name_or_path),
        training=training,
    )


def scfm_pipeline(args, pipe, transformer, family, accelerator):
    """An SCFM pipeline around the training transformer (whichever adapter is active), with the adapter's settings."""
    from scfm_diffusers.pipeline_scfm import scfm_pipeline_class

    scfm_pipe = scfm_pipeline_class(family)(**{**pipe.components, "transformer": transformer})
    scfm_pipe.set_scfm_settings(inference_settings(args, family, grid_config(args, family), accelerator))
    scfm_pipe.set_progress_bar_config(disable=True)
    return scfm_pipe


@torch.no_grad()
def calibrate(args, pipe, transformer, data: TrainData, family, accelerator, grid: GridSamplerConfig):
    """The LoRA scale per step count with the least paired error to the teacher (``scfm_diffusers.calibration``)."""
    steps = args.calibration_steps or sorted({*grid.target_steps, args.num_inference_steps})
    repeat = args.calibration_images_per_prompt
    text = {key: value.repeat_interleave(repeat, dim=0) for key, value in data.calibration_text.items()}
    result = calibrate_lora_scales(
        scfm_pipeline(args, pipe, transformer, family, accelerator),
        steps,
        candidates=args.lora_scale_candidates,
        reference_steps=args.calibration_reference_steps,
        seed=args.seed,
        batch_size=args.calibration_batch_size,
        progress=accelerator.is_local_main_process,
        height=args.resolution,
        width=args.resolution,
        max_sequence_length=args.max_sequence_length,
        **family.pipeline_text_kwargs(text, data.uncond, device=accelerator.device, dtype=transformer.dtype),
    )
    logger.info("LoRA scale per step count (paired error to the teacher):\n" + result.summary())
    write_text_atomic(Path(args.output_dir) / "lora_scale_calibration.json", json.dumps(result.to_dict(), indent=2))
    return result.scales


@torch.no_grad()
def validate(args, pipe, transformer, data: TrainData, family, accelerator, step: int) -> list:
    """Sample the validation prompts with the student at the adapter's step count; log and save them."""
    text, uncond = data.validation_text, data.uncond
    scfm_pipe = scfm_pipeline(args, pipe, transformer, family, accelerator)
    text = {key: value.repeat_interleave(args.num_validation_images, dim=0) for key, value in text.items()}
    images = scfm_pipe(
        **family.pipeline_text_kwargs(text, uncond, device=accelerator.device, dtype=transformer.dtype),
        height=args.resolution,
        width=args.resolution,
        generator=torch.Generator().manual_seed(args.seed),
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


# ---------------------------------------------------------------------------------------------------------
# 4. Main
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
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=args.nccl_timeout))],
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    set_seed(args.seed)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)

    # 4.1 Fail fast: the Hub repository is created (token and name checked) before hours of work.
    repo_id = create_hub_repo(args, accelerator) if args.push_to_hub else None

    check_launch(accelerator.distributed_type, args.quantize_base)  # before loading 12B weights

    # 4.2 Base model (its family decides LoRA targets, guidance and grad clip) and data.
    pipe, family = load_base_model(args, accelerator, weight_dtype)
    data = prepare_data(args, pipe, family, accelerator, weight_dtype)
    transformer = pipe.transformer

    # 4.3 Student LoRA + dual EMA as adapters on the one transformer (teacher = adapters disabled).
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
    optimizer = make_optimizer(args, student_params)
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
    )
    rng = torch.Generator().manual_seed(args.seed + accelerator.process_index)  # noise, grids, guidance
    data_state: dict = {}  # the stream position (streaming), saved with each checkpoint
    grid = grid_config(args, family)

    def write_adapter(folder, lora_state_dict=None, images=(), prompts=None, lora_scales=None):
        save_adapter(
            folder,
            transformer,
            inference_settings(args, family, grid, accelerator, lora_scales),
            adapter_name=STUDENT,
            lora_state_dict=lora_state_dict,
            scheduler_config=pipe.scheduler.config,
            validation_images=list(images),
            validation_prompts=prompts,
        )

    record = run_record(args, family.name, targets)
    register_checkpoint_hooks(
        accelerator, transformer, ema, rng=rng, record=record, state=data_state, write_adapter=write_adapter
    )
    max_grad_norm = args.max_grad_norm or family.max_grad_norm
    if accelerator.distributed_type == DistributedType.DEEPSPEED:  # DeepSpeed clips in its own step: give it ours
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        if ds_config.get("gradient_clipping", "auto") == "auto":
            ds_config["gradient_clipping"] = max_grad_norm
        if ds_config.get("train_micro_batch_size_per_gpu", "auto") == "auto":  # bucket batches / streams hide it
            ds_config["train_micro_batch_size_per_gpu"] = args.train_batch_size
    if args.quantize_base:  # DDP must not broadcast the quantized (frozen, identical) base weights
        ddp_ignore_quantized_weights(transformer)
    if data.prepared is not None:
        model, optimizer, data.prepared, lr_scheduler = accelerator.prepare(
            transformer, optimizer, data.prepared, lr_scheduler
        )
    else:  # a stream is split between processes by `datasets` itself
        model, optimizer, lr_scheduler = accelerator.prepare(transformer, optimizer, lr_scheduler)

    global_step = 0
    if args.resume_from_checkpoint:
        checkpoint = (
            latest_checkpoint(output_dir)
            if args.resume_from_checkpoint == "latest"
            else Path(args.resume_from_checkpoint)
        )
        if checkpoint is None:
            logger.warning(f"No checkpoint in {output_dir}: starting a new run.")
        else:
            global_step = load_checkpoint(accelerator, checkpoint)
            logger.info(f"Resumed from {checkpoint} at step {global_step}.")
    if accelerator.is_main_process:
        # Never the token: trackers upload their config (tensorboard hparams, wandb).
        config = {k: str(v) for k, v in vars(args).items() if k not in SECRET_FLAGS}
        accelerator.init_trackers("scfm-lora", config=config)

    # 4.4 Training loop: one call to the objective per step.
    condition = conditioning(args)
    progress = tqdm(
        range(args.max_train_steps), initial=global_step, desc="SCFM", disable=not accelerator.is_local_main_process
    )
    validation_images = []
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
            out = step.losses
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
            **step.log_values(),
            "loss": mean_loss,
            "lr": lr_scheduler.get_last_lr()[0],
            **loss_by_sigma_bins(step.steps.sigma, out.loss_per_sample),
        }
        progress.set_postfix({k: f"{v:.4f}" for k, v in logs.items() if k.startswith("loss") and "sigma" not in k})
        accelerator.log({k: v for k, v in logs.items() if math.isfinite(v)}, step=global_step)

        if global_step % args.checkpointing_steps == 0 or global_step == args.max_train_steps:
            save_checkpoint(accelerator, output_dir, global_step, args.checkpoints_total_limit)
        if (
            args.validation_prompt
            and accelerator.is_main_process
            and (global_step % args.validation_steps == 0 or global_step == args.max_train_steps)
        ):
            with encoders_on_device(args, pipe, accelerator, "vae"):
                validation_images = validate(
                    args, pipe, accelerator.unwrap_model(model), data, family, accelerator, global_step
                )

    # 4.5 The adapter folder (weights + settings + scheduler + model card), optionally pushed to the Hub.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        which = {"student": "student", "ema_slow": "slow", "ema_fast": "fast"}[args.save_weights]
        lora_scales = None
        if data.calibration_text is not None:  # the saved weights, against the teacher, per step count
            with ema.use(which):
                lora_scales = calibrate(args, pipe, transformer, data, family, accelerator, grid)
        prompts = [args.validation_prompt] * len(validation_images)
        write_adapter(output_dir, ema.adapter_state_dict(which), validation_images, prompts, lora_scales)
        logger.info(f"Adapter written to {output_dir}.")
        if args.push_to_hub:
            url = push_adapter(output_dir, repo_id, token=args.hub_token, private=args.hub_private)
            logger.info(f"Pushed to {url}.")
    accelerator.end_training()
    return output_dir


if __name__ == "__main__":
    main(parse_args())
