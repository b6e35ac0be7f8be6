"""Validation images, the LoRA-scale calibration and the adapter's settings, for the training script.

Validation samples the SCFM pipeline of the family around the training transformer (whichever adapter is
active) at the adapter's step count; images go to ``output_dir/validation`` and to every tracker that logs
images (tensorboard, wandb). Under mixed precision the pipeline runs in autocast: accelerate's wrapper returns
float32 velocities from the half-precision transformer, which the half-precision VAE could not decode.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch

from .._files import write_text_atomic
from ..calibration import calibrate_lora_scales
from ..families import Family, LoraExperts, pipeline_samples
from ..hub import base_model_hub_id
from ..settings import SCFMInferenceSettings
from .config import conditioning_config, inference_shift
from .timesteps import GridSamplerConfig

__all__ = [
    "calibrate",
    "calibration_prompts",
    "inference_settings",
    "export_video",
    "log_validation_images",
    "log_validation_videos",
    "pipeline_autocast",
    "scfm_pipeline",
    "validate",
]

logger = logging.getLogger(__name__)


def calibration_prompts(args: argparse.Namespace) -> list[str]:
    """The prompts of the LoRA-scale calibration: --calibration_prompts, else --validation_prompt, else none."""
    if args.no_lora_scale_calibration:
        return []
    return list(args.calibration_prompts or ([args.validation_prompt] if args.validation_prompt else []))


def inference_settings(
    args: argparse.Namespace,
    family: Family,
    grid: GridSamplerConfig,
    *,
    effective_batch_size: int,
    lora_scales: dict[int, float] | None = None,
) -> SCFMInferenceSettings:
    """The adapter's settings; ``lora_scales`` are the calibrated scales (the recommended count's is the default).

    ``base_model`` is a Hub id or None, never a local path (:func:`scfm_diffusers.hub.base_model_hub_id`).
    """
    guidance = args.inference_guidance_scale or family.adapter_guidance_scale(conditioning_config(args))
    training = {
        "steps": args.max_train_steps,
        "batch_size": effective_batch_size,
        "learning_rate": args.learning_rate,
        "optimizer": args.optimizer,
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
        base_model=base_model_hub_id(args.pretrained_model_name_or_path, args.base_model_id),
        training=training,
    )


def scfm_pipeline(pipe: Any, transformer: torch.nn.Module, family: Family, settings: SCFMInferenceSettings) -> Any:
    """An SCFM pipeline around the training transformer (whichever adapter is active), with ``settings``."""
    from ..pipeline_scfm import scfm_pipeline_class

    trained = transformer.experts() if isinstance(transformer, LoraExperts) else {"transformer": transformer}
    scfm_pipe = scfm_pipeline_class(family)(**{**pipe.components, **trained})
    scfm_pipe.set_scfm_settings(settings)
    scfm_pipe.set_progress_bar_config(disable=True)
    return scfm_pipe


def pipeline_autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Autocast to the training precision for pipeline calls inside training (a no-op in float32)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _repeat(text: dict[str, torch.Tensor], times: int) -> dict[str, torch.Tensor]:
    return {key: value.repeat_interleave(times, dim=0) for key, value in text.items()}


@torch.no_grad()
def calibrate(
    args: argparse.Namespace,
    scfm_pipe: Any,
    family: Family,
    text: dict[str, torch.Tensor],
    uncond: dict[str, torch.Tensor],
    steps: Sequence[int],
    dtype: torch.dtype,
) -> dict[int, float]:
    """The LoRA scale per step count with the least paired error to the teacher (``scfm_diffusers.calibration``);
    the sweep is written to ``output_dir/lora_scale_calibration.json``."""
    device = scfm_pipe.transformer.device
    with pipeline_autocast(device, dtype):
        result = calibrate_lora_scales(
            scfm_pipe,
            steps,
            candidates=args.lora_scale_candidates,
            reference_steps=args.calibration_reference_steps,
            seed=args.seed,
            batch_size=args.calibration_batch_size,
            progress=True,
            height=args.resolution,
            width=args.resolution,
            max_sequence_length=args.max_sequence_length,
            **family.frame_kwargs(args.num_frames),
            **family.pipeline_text_kwargs(
                _repeat(text, args.calibration_images_per_prompt), uncond, device=device, dtype=dtype
            ),
        )
    logger.info("LoRA scale per step count (paired error to the teacher):\n" + result.summary())
    write_text_atomic(Path(args.output_dir) / "lora_scale_calibration.json", json.dumps(result.to_dict(), indent=2))
    return result.scales


@torch.no_grad()
def validate(
    args: argparse.Namespace,
    scfm_pipe: Any,
    family: Family,
    text: dict[str, torch.Tensor],
    uncond: dict[str, torch.Tensor],
    dtype: torch.dtype,
    step: int,
    trackers: Sequence[Any] = (),
) -> list[PIL.Image.Image]:
    """Sample --validation_prompt --num_validation_images times with ``scfm_pipe`` (the adapter's step count,
    shift, guidance and LoRA scale); save the images and log them to the trackers."""
    device = scfm_pipe.transformer.device
    with pipeline_autocast(device, dtype):
        images = scfm_pipe(
            **family.pipeline_text_kwargs(
                _repeat(text, args.num_validation_images), uncond, device=device, dtype=dtype
            ),
            height=args.resolution,
            width=args.resolution,
            **family.frame_kwargs(args.num_frames),
            generator=torch.Generator().manual_seed(args.seed),
            output_type="pil",  # a video pipeline's default is numpy
        )
    samples = pipeline_samples(images)
    folder = Path(args.output_dir) / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    if family.modality == "video":  # clips: mp4 files, the trackers' videos, the first frames for the card
        paths = [folder / f"step{step:06d}_{index}.mp4" for index in range(len(samples))]
        for frames, path in zip(samples, paths, strict=True):
            export_video(frames, path, fps=args.validation_fps)
        log_validation_videos(trackers, samples, paths, args.validation_prompt, step, fps=args.validation_fps)
        return [frames[0] for frames in samples]
    for index, image in enumerate(samples):
        image.save(folder / f"step{step:06d}_{index}.png")
    log_validation_images(trackers, samples, args.validation_prompt, step)
    return samples


def export_video(frames: Sequence[PIL.Image.Image], path: Path, *, fps: int) -> Path:
    """Write a clip with diffusers' ``export_to_video`` (imageio + ffmpeg: the ``[video]`` extra)."""
    from diffusers.utils import export_to_video

    try:
        import imageio  # noqa: F401  (export_to_video falls back to OpenCV without it, which is absent here)
    except ImportError as error:
        raise ImportError(
            'Writing validation videos needs imageio and imageio-ffmpeg: pip install "scfm-diffusers[video]".'
        ) from error
    export_to_video(list(frames), str(path), fps=fps)
    return path


def log_validation_videos(
    trackers: Sequence[Any],
    clips: Sequence[Sequence[PIL.Image.Image]],
    paths: Sequence[Path],
    prompt: str,
    step: int,
    *,
    fps: int,
) -> None:
    """Log clips to every tracker that takes videos (tensorboard ``add_video``, wandb ``Video``)."""
    for tracker in trackers:
        if tracker.name == "tensorboard":
            video = np.stack([np.stack([np.asarray(frame) for frame in clip]) for clip in clips])  # N, T, H, W, C
            if importlib.util.find_spec("moviepy") is not None:  # tensorboard encodes videos as GIFs with moviepy
                tracker.writer.add_video("validation", video.transpose(0, 1, 4, 2, 3), step, fps=fps)
            else:
                tracker.writer.add_images("validation", video[:, 0], step, dataformats="NHWC")
                logger.info("tensorboard gets the first frames (install moviepy for videos); the clips are mp4s.")
        elif tracker.name == "wandb":
            import wandb

            tracker.log(
                {"validation": [wandb.Video(str(p), caption=f"{n}: {prompt}") for n, p in enumerate(paths)]},
                step=step,
            )
        else:
            logger.info("Tracker %r logs no videos; validation clips are in output_dir/validation.", tracker.name)


def log_validation_images(trackers: Sequence[Any], images: Sequence[PIL.Image.Image], prompt: str, step: int) -> None:
    """Log images to every tracker that takes images (tensorboard, wandb), as diffusers' scripts do."""
    for tracker in trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images(
                "validation", np.stack([np.asarray(i) for i in images]), step, dataformats="NHWC"
            )
        elif tracker.name == "wandb":
            import wandb

            tracker.log(
                {"validation": [wandb.Image(i, caption=f"{n}: {prompt}") for n, i in enumerate(images)]}, step=step
            )
        else:
            logger.info("Tracker %r logs no images; validation images are in output_dir/validation.", tracker.name)
