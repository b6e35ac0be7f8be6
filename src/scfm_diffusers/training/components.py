"""What the training script builds before its loop: the frozen base, the student LoRA's config, the optimizer
and its schedule, the Hub repository, the launch checks and the record that makes a run the same run.

Every function takes the parsed configuration of :mod:`scfm_diffusers.training.config` (``args``) and the
pieces it needs; nothing here runs a training step.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, broadcast_object_list
from diffusers import DiffusionPipeline
from diffusers.optimization import get_scheduler
from peft import LoraConfig

from ..families import Family, family_of_class_name
from ..hub import base_model_hub_id, base_model_identity, check_hub_repo_id, create_adapter_repo
from .checkpoints import content_identity, files_identity
from .config import conditioning_config, grid_config
from .distributed import checkpoint_blocks
from .quantization import check_distributed_support, load_quantized_transformer

__all__ = [
    "check_launch",
    "configure_deepspeed",
    "configure_fsdp",
    "configure_transformer",
    "create_hub_repo",
    "load_base_model",
    "make_lr_scheduler",
    "make_optimizer",
    "run_record",
    "student_lora_config",
    "warn_about_command_line_token",
]

logger = logging.getLogger(__name__)


def load_base_model(
    args: argparse.Namespace, accelerator: Accelerator, weight_dtype: torch.dtype
) -> tuple[Any, Family]:
    """The base pipeline (frozen, on the device except offloaded encoders) and its family (``model_index.json``).

    Under FSDP the trained transformer stays on the CPU until ``accelerator.prepare`` shards it onto the GPUs (except
    in data-free runs, whose teacher draws images with it first).

    Raises:
        ValueError: Before any weights are read: --resolution is not a multiple of the family's latent patch, or
            the grid flags do not fit together with the family's grid defaults.
    """
    hub = {"revision": args.revision, "cache_dir": args.cache_dir}
    config = DiffusionPipeline.load_config(args.pretrained_model_name_or_path, **hub)
    family = family_of_class_name(config.get("_class_name", "<none>"))
    patch = family.latent_patch  # pixels per latent token edge: other sizes fail in the VAE or the patchify
    if args.resolution % patch:
        low, high = args.resolution // patch * patch, (args.resolution // patch + 1) * patch
        raise ValueError(
            f"--resolution {args.resolution} is not a multiple of {patch}, the pixels of one {family.name} latent "
            f"token (VAE factor × patch): use {' or '.join(str(r) for r in (low, high) if r)}."
        )
    grid_config(args, family)  # the grid flags against the family's defaults, before the weights load
    components = {}
    if args.quantize_base:  # a quantized base is also a quantized teacher (adapters off), at no extra memory
        # Every transformer of the pipeline: Wan 2.2's transformer_2 (a null entry in model_index.json when absent).
        names = [name for name in ("transformer", "transformer_2") if (config.get(name) or [None])[0]]
        for name in names:
            components[name] = load_quantized_transformer(
                args.pretrained_model_name_or_path,
                family.name,
                args.quantize_base,
                torch_dtype=weight_dtype,
                revision=args.revision,
                variant=args.variant,
                device=accelerator.device,
                subfolder=name,
            )
    pipe = family.pipeline_class.from_pretrained(
        args.pretrained_model_name_or_path, variant=args.variant, torch_dtype=weight_dtype, **hub, **components
    )
    pipe.set_progress_bar_config(disable=True)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False)
    # With --offload the encoders wait on the CPU and visit the GPU only to encode.
    resident = (
        [family.trained_module(pipe)] if args.offload else [m for m in pipe.components.values() if hasattr(m, "to")]
    )
    if accelerator.distributed_type == DistributedType.FSDP and not args.prompts_file:
        # accelerator.prepare moves each rank's shard to its GPU, so no GPU ever holds the whole base. (Data-free
        # runs keep it whole there: the teacher draws the training images before it is sharded.)
        trained = set(family.trained_module(pipe).modules())
        resident = [module for module in resident if module not in trained]
    for module in resident:
        module.to(accelerator.device)
    return pipe, family


def student_lora_config(args: argparse.Namespace, family: Family, transformer: torch.nn.Module) -> LoraConfig:
    """The student's LoRA: --lora_layers (comma-separated, as in diffusers' scripts) or the family's targets.

    Raises:
        ValueError: --lora_layers names modules the transformer lacks, or --gradient_checkpointing is asked of a
            family whose diffusers model computes something else under checkpointing.
    """
    if args.gradient_checkpointing and family.gradient_checkpointing_issue:
        raise ValueError(
            f"--gradient_checkpointing cannot be used with {family.name}: {family.gradient_checkpointing_issue}"
        )
    if args.lora_layers:
        targets = [name.strip() for name in args.lora_layers.split(",") if name.strip()]
        modules = {name for name, _ in transformer.named_modules()}
        missing = [t for t in targets if not any(m == t or m.endswith("." + t) for m in modules)]
        if missing:
            raise ValueError(
                f"--lora_layers names modules this {family.name} transformer does not have: {missing}. "
                f"The family's default targets are: {','.join(family.lora_target_modules(transformer))}."
            )
    else:
        targets = family.lora_target_modules(transformer)
    return LoraConfig(
        r=args.rank,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        init_lora_weights="gaussian",
        target_modules=targets,
    )


def configure_transformer(
    args: argparse.Namespace, transformer: torch.nn.Module, accelerator: Accelerator | None = None
) -> None:
    """--gradient_checkpointing and --enable_xformers_memory_efficient_attention (CUDA only: a clear error on CPU).

    Under FSDP, --gradient_checkpointing (or ``fsdp_activation_checkpointing: true`` in the accelerate config, which
    is then handled here instead of by accelerate) checkpoints each block that FSDP shards, keeping parameter names
    (:func:`~scfm_diffusers.training.distributed.checkpoint_blocks` says why neither diffusers' nor accelerate's way).
    """
    sharded = accelerator is not None and accelerator.distributed_type == DistributedType.FSDP
    plugin = accelerator.state.fsdp_plugin if sharded else None
    if plugin is not None and (args.gradient_checkpointing or plugin.activation_checkpointing):
        plugin.activation_checkpointing = False
        blocks = plugin.transformer_cls_names_to_wrap or {
            name for module in transformer.modules() for name in getattr(module, "_no_split_modules", None) or ()
        }
        count = checkpoint_blocks(transformer, blocks)
        logger.info(f"Activation checkpointing of {count} sharded blocks ({', '.join(sorted(blocks))}).")
    elif args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    if args.enable_xformers_memory_efficient_attention:
        if not torch.cuda.is_available():
            raise ValueError("--enable_xformers_memory_efficient_attention needs a CUDA GPU; drop the flag on CPU.")
        transformer.enable_xformers_memory_efficient_attention()


def configure_deepspeed(accelerator: Accelerator, max_grad_norm: float, micro_batch_size: int) -> None:
    """DeepSpeed clips in its own step and cannot see the batch size of bucketed or streamed loaders: give it
    ours where its config says "auto"."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
    if ds_config.get("gradient_clipping", "auto") == "auto":
        ds_config["gradient_clipping"] = max_grad_norm
    if ds_config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        ds_config["train_micro_batch_size_per_gpu"] = micro_batch_size


def configure_fsdp(accelerator: Accelerator) -> None:
    """FSDP2 in bf16/fp16: reduce the gradients in float32, as DDP does. accelerate's policy reduces them in the
    training precision; only the LoRA has gradients, a few MB, so float32 costs next to nothing."""
    if accelerator.distributed_type != DistributedType.FSDP:
        return
    plugin = accelerator.state.fsdp_plugin
    policy = plugin.mixed_precision_policy
    if policy is not None and getattr(policy, "reduce_dtype", None) not in (None, torch.float32):
        plugin.mixed_precision_policy = dataclasses.replace(policy, reduce_dtype=torch.float32)


def make_optimizer(args: argparse.Namespace, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW (8-bit with --use_8bit_adam) or Prodigy, with the script's hyper-parameters."""
    if args.optimizer == "prodigy":
        try:
            import prodigyopt
        except ImportError as error:
            raise ImportError("--optimizer prodigy needs the prodigyopt package: pip install prodigyopt") from error
        if args.learning_rate <= 0.1:
            logger.warning(
                f"Prodigy estimates the step size itself and expects --learning_rate around 1.0; got {args.learning_rate}."
            )
        return prodigyopt.Prodigy(
            params,
            lr=args.learning_rate,
            betas=(args.adam_beta1, args.adam_beta2),
            beta3=args.prodigy_beta3,
            weight_decay=args.adam_weight_decay,
            eps=args.adam_epsilon,
            decouple=args.prodigy_decouple,
            use_bias_correction=args.prodigy_use_bias_correction,
            safeguard_warmup=args.prodigy_safeguard_warmup,
        )
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


def make_lr_scheduler(args: argparse.Namespace, optimizer: torch.optim.Optimizer, num_processes: int) -> Any:
    """diffusers' learning-rate schedule (counted per process, as accelerate steps it on every process)."""
    return get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * num_processes,
        num_training_steps=args.max_train_steps * num_processes,
        num_cycles=args.lr_num_cycles,
        power=args.lr_power,
    )


def warn_about_command_line_token(args: argparse.Namespace) -> None:
    """A token given as --hub_token shows in process lists, shell history and accelerate's failure messages."""
    if args.hub_token:
        logger.warning(
            "--hub_token puts the token on the command line, where process lists, shell history and accelerate's "
            "error messages (which echo the whole command) show it. Use `hf auth login` or the HF_TOKEN variable."
        )


def create_hub_repo(args: argparse.Namespace, accelerator: Accelerator) -> str:
    """Create the Hub repository on the main process, after checking the card's metadata; every process stops if
    that fails (none waits at a barrier for a main process that is gone). The token is never shown."""
    base_model = base_model_hub_id(args.pretrained_model_name_or_path, args.base_model_id)
    if base_model is None:
        raise ValueError(
            f"--push_to_hub needs the Hub id of the base model for the model card's base_model, and "
            f"{args.pretrained_model_name_or_path!r} is a local folder with none: add --base_model_id org/name (the "
            "repository the folder was downloaded from). A local path is never published."
        )
    check_hub_repo_id(base_model, "The base model id")
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


def check_launch(
    distributed_type: DistributedType, quantize_base: str | None, fsdp_version: int | None = None
) -> None:
    """Refuse launches this script cannot train correctly, before anything is loaded.

    FSDP must be FSDP2 (``fsdp_version: 2``): FSDP1 flattens the parameters of each wrapped block into one
    ``FlatParameter``, where the frozen base, the trainable student LoRA and the never-trained EMA LoRAs of that
    block cannot be told apart (it refuses mixed ``requires_grad`` without ``use_orig_params``), and the gathering of
    whole LoRA tensors for files works on FSDP2's ``DTensor`` parameters. A quantized base cannot be sharded (FSDP)
    or wrapped by DeepSpeed.

    Args:
        distributed_type: accelerate's ``DistributedType`` of the launch.
        quantize_base: The ``--quantize_base`` value (None: the base in the training precision).
        fsdp_version: The FSDP plugin's ``fsdp_version`` under FSDP (``distributed.fsdp_version(accelerator)``).

    Raises:
        NotImplementedError: FSDP other than version 2.
        ValueError: A quantized base with FSDP or DeepSpeed.
    """
    if distributed_type == DistributedType.FSDP:
        if fsdp_version != 2:
            raise NotImplementedError(
                f"FSDP{fsdp_version or ''} is not supported by examples/train_scfm_lora.py: use FSDP2 (fsdp_version: 2 "
                "in the accelerate config, or --fsdp_version 2), as in examples/configs/fsdp2_flux.yaml. FSDP1 flattens "
                "each block's parameters into one, where the frozen base and the student and EMA LoRAs cannot be "
                "told apart."
            )
        if quantize_base:
            raise ValueError(
                f"--quantize_base {quantize_base} cannot be sharded with FSDP: FSDP2's fully_shard fails on torchao's "
                "quantized weights, and accelerate leaves bitsandbytes' 4-bit weights (uint8 storage, as "
                "--quantize_base loads them) out of the sharding, whole on every GPU, so FSDP would shard nothing of "
                "the base. Shard the bf16 base instead (drop --quantize_base, keep FSDP), or train the quantized base "
                "with plain data parallelism (examples/configs/multi_gpu.yaml): only the LoRA trains, so each GPU "
                "holds one quantized copy and nothing else of size."
            )
    if quantize_base:
        check_distributed_support(quantize_base, distributed_type)


def run_record(args: argparse.Namespace, family: Family, lora_config: LoraConfig) -> dict:
    """What a checkpoint must share with the run that resumes it: the base, the LoRA, the seed, the data and the
    objective. Everything by content, never by path (the same base or data reached by a symlink or a relative
    path is the same run; no local path is written). What a resume may change is left out: step counts,
    checkpoint and validation cadence, logging, the adapter's inference settings.
    """
    data = {
        "dataset_name": content_identity(args.dataset_name),  # a local folder by content, else the Hub id
        "dataset_config_name": args.dataset_config_name,
        "train_data_dir": content_identity(args.train_data_dir),
        "data_files": files_identity(args.data_files),
        "columns": [args.image_column, args.caption_column],
        "max_train_samples": args.max_train_samples,
        "prompts_file": content_identity(args.prompts_file),
        "resolution": args.resolution,
        "aspect_ratio_buckets": args.aspect_ratio_buckets,
        "center_crop": args.center_crop,
        "random_flip": args.random_flip,
        "image_interpolation_mode": args.image_interpolation_mode,
        "max_sequence_length": args.max_sequence_length,
        "cache_dtype": args.cache_dtype,
        "streaming": args.streaming,
    }
    if args.num_frames is not None:  # clips (absent for image runs: their checkpoints from before still resume)
        data["video"] = [args.num_frames, args.video_fps, args.video_column]
    if args.prompts_file:  # data-free: the teacher's images are the data
        data["teacher"] = [
            args.teacher_num_inference_steps,
            args.teacher_images_per_prompt,
            args.inference_guidance_scale,
        ]
    if args.streaming:
        data["shuffle_buffer_size"] = args.shuffle_buffer_size
    return {
        "base_model": base_model_identity(args.pretrained_model_name_or_path),
        "revision": args.revision,
        "variant": args.variant,
        "quantize_base": args.quantize_base,
        "family": family.name,
        "rank": args.rank,
        "lora_alpha": args.lora_alpha,
        "lora_dropout": args.lora_dropout,
        "lora_targets": sorted(lora_config.target_modules),
        "seed": args.seed,
        "data": data,
        "objective": {
            "grid": dataclasses.asdict(grid_config(args, family)),
            "conditioning": dataclasses.asdict(conditioning_config(args)),
            "fast_ema_decay": args.fast_ema_decay,
            "slow_ema_decay": args.slow_ema_decay,
            "ema_restart_steps": args.ema_restart_steps,
            "learning_rate": args.learning_rate,  # after --scale_lr
            "optimizer": "adamw8bit" if args.use_8bit_adam else args.optimizer,
            "train_batch_size": args.train_batch_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "max_grad_norm": args.max_grad_norm or family.max_grad_norm,
        },
    }
