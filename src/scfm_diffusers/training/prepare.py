"""The training script's data side: data set -> (teacher images) -> cached latents and text, or a stream.

:func:`prepare_data` encodes the empty prompt (CFG families), the validation and calibration prompts, draws
the teacher's images in data-free mode, and then either builds the disk cache of latents and text embeddings
(freeing the text encoders) with a bucketed, resumable loader, or sets up a stream that is encoded on the fly.
What the loop gets back is a :class:`TrainData`.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from diffusers.training_utils import free_memory, offload_models

from ..families import Family
from ..hub import base_model_identity
from .buckets import BucketBatchSampler, make_buckets
from .cache import build_latent_cache, components_fingerprint
from .checkpoints import latest_checkpoint
from .config import conditioning_config
from .data import (
    ImageCaptionPreprocessor,
    StreamingBatches,
    folder_media_kind,
    load_image_caption_dataset,
    read_prompts,
)
from .teacher_data import generate_teacher_images
from .validation import calibration_prompts
from .video import VideoCaptionPreprocessor, load_video_caption_dataset

__all__ = ["TrainData", "encoders_on_device", "prepare_data", "stop_at_end_of_stream"]

logger = logging.getLogger(__name__)
CACHE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclasses.dataclass
class TrainData:
    """What the loop needs from the data side.

    Attributes:
        batches: ``(prepared loader, first_step, state) -> iterator`` of raw batches (cache rows or a stream).
        to_training_batch: raw batch -> ``{"latents": (B, C, h, w) fp32, **text}`` on the device.
        uncond: Empty-prompt text tensors (CFG families, caption dropout).
        validation_text: Text tensors of the validation prompt (or None).
        calibration_text: Text tensors of the LoRA-scale calibration prompts (or None: no calibration).
        prepared: The dataloader to hand to ``accelerator.prepare`` (None when streaming).
    """

    batches: Callable[[Any, int, dict], Iterator[dict]]
    to_training_batch: Callable[[dict], dict[str, torch.Tensor]]
    uncond: dict[str, torch.Tensor]
    validation_text: dict[str, torch.Tensor] | None
    prepared: torch.utils.data.DataLoader | None
    calibration_text: dict[str, torch.Tensor] | None = None


def encoders_on_device(args: argparse.Namespace, pipe: Any, accelerator: Accelerator, *names: str):
    """Context: the named components (VAE, text encoders) on the accelerator while inside (with --offload)."""
    modules = [getattr(pipe, name) for name in names if getattr(pipe, name, None) is not None]
    return offload_models(*modules, device=accelerator.device, offload=args.offload)


def _to_device(value: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Floating tensors to ``dtype`` on ``device``; masks and ids keep their dtype."""
    return value.to(device, dtype) if value.is_floating_point() else value.to(device)


def prepare_data(
    args: argparse.Namespace, pipe: Any, family: Family, accelerator: Accelerator, weight_dtype: torch.dtype
) -> TrainData:
    """Data set -> (teacher images) -> cached latents + embeddings, or a stream encoded on the fly.

    Args:
        args: The parsed training configuration (:mod:`scfm_diffusers.training.config`).
        pipe: The frozen base pipeline.
        family: Its family (text and image encoding).
        accelerator: The run's accelerator (processes, device).
        weight_dtype: Dtype of the frozen weights (the text tensors are cast to it).
    """
    output_dir = Path(args.output_dir)
    device = accelerator.device
    text_encoders = family.text_encoder_names
    if family.modality == "video" and args.num_frames is None:
        raise ValueError(
            f"{family.name} is a video model: pass --num_frames (4k + 1, e.g. 33 or 81) to train on clips, or "
            "--num_frames 1 to train on images."
        )
    if args.num_frames is not None:
        family.check_num_frames(args.num_frames)
    buckets = make_buckets(args.resolution) if args.aspect_ratio_buckets else None

    def encode_prompts(prompts: list[str]) -> dict[str, torch.Tensor]:
        return family.encode_prompts(pipe, prompts, args.max_sequence_length, device=device)

    with torch.no_grad(), encoders_on_device(args, pipe, accelerator, *text_encoders):
        uncond = encode_prompts([""])  # CFG families use the empty prompt in every velocity
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
                guidance_scale=args.inference_guidance_scale
                or family.adapter_guidance_scale(conditioning_config(args)),
                images_per_prompt=args.teacher_images_per_prompt,
                show_progress=accelerator.is_local_main_process,
                pipeline_kwargs=family.frame_kwargs(1) if args.num_frames == 1 else None,  # a video family's images
                num_frames=args.num_frames if args.num_frames and args.num_frames > 1 else None,
                fps=args.video_fps or args.validation_fps,
            )
    # Images or clips: the same loading options, views, cache and stream; only the column and the decoder differ.
    video = _trains_on_clips(args, train_data_dir)
    if video and buckets:
        raise ValueError("--aspect_ratio_buckets is for images: video clips are cropped to --resolution squares.")
    load, column = (
        (load_video_caption_dataset, {"video_column": args.video_column})
        if video
        else (load_image_caption_dataset, {"image_column": args.image_column})
    )
    with accelerator.main_process_first():  # `datasets` prepares its own cache once
        dataset = load(
            dataset_name=args.dataset_name,
            dataset_config_name=args.dataset_config_name,
            train_data_dir=train_data_dir,
            data_files=args.data_files,
            caption_column=args.caption_column,
            cache_dir=args.cache_dir,
            max_train_samples=args.max_train_samples,
            seed=args.seed,
            streaming=args.streaming,
            shuffle_buffer_size=args.shuffle_buffer_size,
            **column,
        )
    options = {"center_crop": args.center_crop, "random_flip": args.random_flip, "seed": args.seed}
    options.update(caption_column=args.caption_column, interpolation=args.image_interpolation_mode, **column)
    preprocessor = (
        VideoCaptionPreprocessor(args.resolution, num_frames=args.num_frames or 1, fps=args.video_fps, **options)
        if video
        else ImageCaptionPreprocessor(args.resolution, buckets=buckets, **options)
    )
    if args.streaming:
        data = _streaming_data(args, pipe, family, accelerator, weight_dtype, dataset, preprocessor)
        return dataclasses.replace(
            data, uncond=uncond, validation_text=validation_text, calibration_text=calibration_text
        )

    settings = {  # everything the cache depends on (shard size and dtype are added by the cache)
        "model": base_model_identity(args.pretrained_model_name_or_path),  # by content: no path is written
        # The VAE, text encoders and tokenizers by their files' content: weights replaced at the same path (same
        # config, same shapes) are seen; a copy or a moved folder is not a change. None for a Hub id.
        "encoders": components_fingerprint(args.pretrained_model_name_or_path),
        "revision": args.revision,
        "variant": args.variant,
        "encoder_dtype": str(weight_dtype),
        "data": dataset._fingerprint,
        "rows": len(dataset),
        "columns": [preprocessor.column, args.caption_column],
        "max_train_samples": args.max_train_samples,
        "resolution": args.resolution,
        "buckets": buckets,
        "center_crop": args.center_crop,
        "random_flip": args.random_flip,
        "max_sequence_length": args.max_sequence_length,
        "seed": args.seed,
    }
    if args.image_interpolation_mode != "bilinear":  # caches built before the flag existed stay valid
        settings["interpolation"] = args.image_interpolation_mode
    if video:  # image caches keep their fingerprint
        settings.update(num_frames=preprocessor.num_frames, video_fps=args.video_fps)
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

    def batches(loader: torch.utils.data.DataLoader, first_step: int, state: dict) -> Iterator[dict]:
        """Epoch after epoch of the prepared loader, from ``first_step`` (mid-epoch on resume)."""
        steps_per_epoch = math.ceil(len(loader) / args.gradient_accumulation_steps)
        epoch, skip = divmod(first_step, steps_per_epoch)
        while True:
            loader.set_epoch(epoch)  # before skipping: the skipping loader copies the epoch
            yield from (
                accelerator.skip_first_batches(loader, skip * args.gradient_accumulation_steps) if skip else loader
            )
            epoch, skip = epoch + 1, 0

    def to_training_batch(batch: dict) -> dict[str, torch.Tensor]:  # latents fp32, text in the weights' dtype
        return {
            key: _to_device(value, device, torch.float32 if key == "latents" else weight_dtype)
            for key, value in batch.items()
        }

    return TrainData(
        batches, to_training_batch, uncond, validation_text, prepared=dataloader, calibration_text=calibration_text
    )


def _trains_on_clips(args: argparse.Namespace, train_data_dir: str | Path | None) -> bool:
    """Whether the data are video clips: a local folder (``--train_data_dir``, the teacher's, or a local
    ``--dataset_name`` without ``--data_files``) by the files it holds, any other source by ``--num_frames > 1``.

    Raises:
        ValueError: Clips without ``--num_frames``, or images with ``--num_frames`` above 1.
    """
    folder = train_data_dir
    if folder is None and args.dataset_name and not args.data_files and Path(args.dataset_name).is_dir():
        folder = args.dataset_name
    kind = folder_media_kind(folder) if folder is not None and Path(folder).is_dir() else None
    if kind is None:
        return (args.num_frames or 1) > 1
    if kind == "video" and args.num_frames is None:
        raise ValueError(
            f"{str(folder)!r} holds video clips: give --num_frames, the frames per training clip (Wan needs 4k + 1, "
            "e.g. 81), and optionally --video_fps."
        )
    if kind == "image" and (args.num_frames or 1) > 1:
        raise ValueError(
            f"{str(folder)!r} holds images, not video clips: --num_frames {args.num_frames} needs clips "
            "(.mp4 .webm .mkv .mov .avi). Train on images without --num_frames (a video family: --num_frames 1)."
        )
    return kind == "video"


def _streaming_data(args, pipe, family, accelerator, weight_dtype, dataset, preprocessor) -> TrainData:
    """One pass over a streamed data set; each batch is VAE- and text-encoded in the loop (encoders kept)."""
    device = accelerator.device

    def batches(loader: None, first_step: int, state: dict) -> Iterator[dict]:
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

    def to_training_batch(batch: dict) -> dict[str, torch.Tensor]:
        with torch.no_grad(), encoders_on_device(args, pipe, accelerator, "vae", *family.text_encoder_names):
            text = family.encode_prompts(pipe, batch["captions"], args.max_sequence_length, device=device)
            latents = family.encode_images(pipe.vae, batch["pixel_values"])
        text = {key: _to_device(value, device, weight_dtype) for key, value in text.items()}
        return {"latents": latents.to(device, torch.float32), **text}

    return TrainData(batches, to_training_batch, {}, None, prepared=None)


def stop_at_end_of_stream(
    accelerator: Accelerator, args: argparse.Namespace, batch: dict | None, global_step: int, state: dict
) -> None:
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
