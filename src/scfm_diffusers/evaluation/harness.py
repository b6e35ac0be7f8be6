"""Evaluate any diffusers text-to-image or text-to-video pipeline against a many-step reference, from the same noise.

One call of :func:`evaluate` samples ``len(prompts)`` images or clips (sample i from ``prompts[i]`` and its own
seeded generator ``seeds[i]``, so its initial noise does not depend on batching or on the sampler) and
reports, as an :class:`EvaluationResult`:

* ``latency_s`` — median wall time of a single-sample pipeline call (:func:`~.metrics.time_call`): seconds
  per image, or per clip for a video pipeline;
* ``paired_mse`` / ``paired_rmse`` — error to the reference samples drawn from the *same* seeds (the
  teacher's many-step samples), in [0, 1] pixel units, over every pixel of every frame of a clip;
* ``fd_vs_teacher`` — Fréchet distance of the features to the reference images' features (the paper's
  "FID against the teacher");
* ``fd_vs_real`` — Fréchet distance to a real-data feature set, and ``delta_fd`` = FD(this) − FD(reference
  images), both against that same real set (ΔFD; negative = closer to the real data than the teacher);
* ``accuracy`` — prompt adherence of a classifier (its ``.logits``) on the prompted labels;
* ``clip_score`` — CLIP score against the prompts, when a CLIP model is given.

The last three are image metrics: :func:`evaluate` refuses them for clips (a video has no registered feature
extractor; ``scfm-eval`` skips them and says so).

The pipeline can be a stock ``FluxPipeline`` / ``StableDiffusion3Pipeline`` / ``WanPipeline`` with any scheduler
or an SCFM pipeline with an adapter: only ``pipeline(prompt=list, generator=list, num_inference_steps=N,
height=H, width=W, output_type="pt", **call_kwargs)`` is used, read with
:func:`~scfm_diffusers.families.pipeline_samples` (``.images``, or ``.frames`` of a video pipeline; its
``num_frames`` goes in ``call_kwargs``).

Example:
    >>> teacher = generate(pipe, prompts, seeds, num_inference_steps=32, height=512, width=512)  # doctest: +SKIP
    >>> result = evaluate(pipe, prompts, seeds, num_inference_steps=4, reference_images=teacher,
    ...                   feature_extractor=get_feature_extractor("clip", model_path=...))  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from torch import Tensor

from ..families import pipeline_samples
from .metrics import (
    CLIPFeatureExtractor,
    classifier_accuracy,
    clip_score,
    delta_fd,
    extract_features,
    frechet_distance,
    paired_error,
    time_call,
)

__all__ = ["EvaluationResult", "ReferenceSet", "evaluate", "fixed_shift_scheduler", "generate"]


def fixed_shift_scheduler(pipeline: Any, shift: float) -> FlowMatchEulerDiscreteScheduler:
    """Plain Euler with a fixed shift ``t = s·u / (1 + (s − 1)·u)`` on top of ``pipeline``'s scheduler config.

    Use it to sample a stock pipeline (the teacher) with N Euler steps at a chosen shift:
    ``pipe.scheduler = fixed_shift_scheduler(pipe, 1.0)``.
    """
    return FlowMatchEulerDiscreteScheduler.from_config(
        pipeline.scheduler.config, shift=shift, use_dynamic_shifting=False
    )


@torch.no_grad()
def generate(
    pipeline: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    num_inference_steps: int,
    height: int,
    width: int,
    batch_size: int = 32,
    call_kwargs: dict[str, Any] | None = None,
) -> Tensor:
    """Sample one image (or clip) per (prompt, seed) in batches, each with its own seeded CPU generator.

    Sample i depends only on ``prompts[i]``, ``seeds[i]`` and the sampler, so two samplers called with the same
    lists start every sample from the same noise.

    Args:
        pipeline: A diffusers text-to-image or text-to-video pipeline.
        prompts: N prompts.
        seeds: N seeds.
        num_inference_steps: Sampling steps.
        height: Image height in pixels.
        width: Image width in pixels.
        batch_size: Samples per pipeline call.
        call_kwargs: Further pipeline arguments (``guidance_scale``, ``max_sequence_length``, ``shift``, a video
            pipeline's ``num_frames``, ...).

    Returns:
        Images ``(N, C, H, W)``, or clips ``(N, F, C, H, W)`` of a video pipeline, float32 in [0, 1] on the CPU.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"Got {len(prompts)} prompts but {len(seeds)} seeds; pass one seed per image.")
    if len(prompts) == 0:
        raise ValueError("Nothing to generate: prompts is empty.")
    images = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds[start : start + batch_size]]
        output = pipeline(
            prompt=chunk,
            generator=generators,
            num_inference_steps=num_inference_steps,
            height=height,
            width=width,
            output_type="pt",
            **(call_kwargs or {}),
        )
        images.append(torch.as_tensor(pipeline_samples(output)).float().cpu())
    return torch.cat(images)


@dataclass
class ReferenceSet:
    """The many-step reference an evaluation compares against, computed once and shared by every sampler.

    Attributes:
        images: Reference images ``(N, C, H, W)`` or clips ``(N, F, C, H, W)`` in [0, 1] from the same
            prompts/seeds (teacher many-step).
        features: Their features ``(N, D)`` (None without a feature extractor).
        real_features: Features of real data ``(M, D)``, or None.
        fd_vs_real: FD(reference images, real data), the teacher side of ΔFD (None without real features).
    """

    images: Tensor
    features: Tensor | None = None
    real_features: Tensor | None = None
    fd_vs_real: float | None = None

    @classmethod
    def build(
        cls,
        images: Tensor,
        feature_extractor: Callable[[Tensor], Tensor] | None = None,
        real_features: Tensor | None = None,
        *,
        batch_size: int = 64,
    ) -> ReferenceSet:
        """Extract the reference features and FD(reference, real) once."""
        features = extract_features(feature_extractor, images, batch_size=batch_size) if feature_extractor else None
        fd_real = None
        if features is not None and real_features is not None:
            fd_real = frechet_distance(features, real_features)
        return cls(images=images, features=features, real_features=real_features, fd_vs_real=fd_real)


@dataclass
class EvaluationResult:
    """Metrics of one sampler (pipeline + step count + call arguments); None where not measured.

    For a video pipeline every "image" below is a clip: latency and seconds are per clip, the paired error of a
    clip is over all its frames.

    Attributes:
        name: Label of the sampler in reports.
        num_inference_steps: Sampling steps N.
        num_images: Images (or clips) evaluated.
        num_frames: Frames per clip (None for images).
        latency_s: Median wall time of one single-image (single-clip) pipeline call.
        seconds_per_image: Wall time of the batched generation divided by the number of images (clips).
        paired_mse: Mean over images of the per-pixel MSE to the reference image from the same noise.
        paired_rmse: ``sqrt(paired_mse)``.
        paired_mse_std: Std over images of the per-image MSE.
        fd_vs_teacher: FD to the reference (teacher many-step) images' features.
        fd_vs_real: FD to the real-data features.
        delta_fd: ``fd_vs_real − FD(reference images, real)``: ΔFD against the same real set.
        accuracy: Classifier accuracy on the prompted labels.
        clip_score: CLIP score against the prompts.
        settings: Free-form description (shift, LoRA scale, ...), copied into reports.
        images: The generated images ``(N, C, H, W)`` or clips ``(N, F, C, H, W)`` (not serialised).
        features: Their features ``(N, D)`` (not serialised).
    """

    name: str
    num_inference_steps: int
    num_images: int
    num_frames: int | None = None
    latency_s: float | None = None
    seconds_per_image: float | None = None
    paired_mse: float | None = None
    paired_rmse: float | None = None
    paired_mse_std: float | None = None
    fd_vs_teacher: float | None = None
    fd_vs_real: float | None = None
    delta_fd: float | None = None
    accuracy: float | None = None
    clip_score: float | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    images: Tensor | None = field(default=None, repr=False)
    features: Tensor | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable metrics (without images and features)."""
        return {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("images", "features")
        }


@torch.no_grad()
def evaluate(
    pipeline: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    num_inference_steps: int,
    height: int,
    width: int,
    reference_images: Tensor | ReferenceSet | None = None,
    feature_extractor: Callable[[Tensor], Tensor] | None = None,
    real_features: Tensor | None = None,
    classifier: Any | None = None,
    labels: Sequence[int] | Tensor | None = None,
    clip: str | CLIPFeatureExtractor | None = None,
    call_kwargs: dict[str, Any] | None = None,
    batch_size: int = 32,
    latency_repeats: int = 3,
    name: str | None = None,
    settings: dict[str, Any] | None = None,
) -> EvaluationResult:
    """Sample ``prompts``/``seeds`` with ``pipeline`` and measure latency, paired error, FD, adherence.

    Args:
        pipeline: Any diffusers text-to-image or text-to-video pipeline (its progress bar is switched off). A
            video pipeline's clips take latency and paired error only.
        prompts: N prompts (N ≥ 2 for Fréchet distances).
        seeds: N seeds; image i starts from the noise of ``torch.Generator().manual_seed(seeds[i])``.
        num_inference_steps: Sampling steps N.
        height: Image height in pixels.
        width: Image width in pixels.
        reference_images: The teacher's many-step samples ``(N, C, H, W)`` (clips: ``(N, F, C, H, W)``) in
            [0, 1] from the SAME prompts and seeds (see :func:`generate`), or a prebuilt :class:`ReferenceSet`. Enables the paired error, FD vs
            teacher and ΔFD.
        feature_extractor: Maps images ``(B, C, H, W)`` in [0, 1] to features ``(B, D)`` (see
            :func:`~.metrics.get_feature_extractor`). Enables the Fréchet distances.
        real_features: Real-data features ``(M, D)`` from the same extractor. Enables ``fd_vs_real``/``delta_fd``.
        classifier: Object with ``.logits(images) -> (N, K)`` (e.g. the digits feature extractor); needs
            ``labels``.
        labels: The prompted class of each image, ``(N,)``.
        clip: CLIP model folder / Hub id or a built :class:`~.metrics.CLIPFeatureExtractor`: enables the CLIP
            score (reuse a built one across calls).
        call_kwargs: Further pipeline arguments for every call (``guidance_scale``, ``shift``, ``num_frames``, ...).
        batch_size: Images per pipeline call.
        latency_repeats: Timed single-image (single-clip) calls (after one warm-up call); 0 skips the latency.
        name: Label in reports (default: the pipeline class and the step count).
        settings: Free-form description stored in the result.

    Returns:
        The :class:`EvaluationResult`.

    Raises:
        ValueError: For mismatched prompts and seeds, a classifier without labels, or an image metric
            (feature extractor, real features, classifier, CLIP) asked of a video pipeline's clips.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"Got {len(prompts)} prompts but {len(seeds)} seeds; pass one seed per image.")
    if classifier is not None and labels is None:
        raise ValueError("A classifier needs `labels` (the prompted class of each image).")
    if hasattr(pipeline, "set_progress_bar_config"):
        pipeline.set_progress_bar_config(disable=True)
    call_kwargs = dict(call_kwargs or {})
    common = {"num_inference_steps": num_inference_steps, "height": height, "width": width, "call_kwargs": call_kwargs}

    # 1. Samples (batched, one generator per image) and latency (single-image calls).
    start = time.perf_counter()
    images = generate(pipeline, prompts, seeds, batch_size=batch_size, **common)
    seconds_per_image = (time.perf_counter() - start) / len(prompts)
    if images.ndim == 5:
        image_metrics = {
            "feature_extractor": feature_extractor,
            "real_features": real_features,
            "classifier": classifier,
            "clip": clip,
        }
        asked = [name for name, value in image_metrics.items() if value is not None]
        if asked:
            raise ValueError(
                f"{', '.join(asked)}: image metrics, but the pipeline made clips {tuple(images.shape)}; evaluate "
                "a video pipeline with latency and paired error only."
            )
    latency = None
    if latency_repeats > 0:
        timing = time_call(lambda: generate(pipeline, prompts[:1], seeds[:1], **common), repeats=latency_repeats)
        latency = timing["median_s"]
    result = EvaluationResult(
        name=name or f"{type(pipeline).__name__} {num_inference_steps} steps",
        num_inference_steps=num_inference_steps,
        num_images=len(prompts),
        num_frames=images.shape[1] if images.ndim == 5 else None,
        latency_s=latency,
        seconds_per_image=seconds_per_image,
        settings=dict(settings or {}),
        images=images,
    )

    # 2. Paired error and distances to the reference drawn from the same noise.
    reference = reference_images
    if isinstance(reference, Tensor):
        reference = ReferenceSet.build(reference, feature_extractor, real_features)
    if reference is not None:
        error = paired_error(images, reference.images)
        result.paired_mse, result.paired_rmse, result.paired_mse_std = error["mse"], error["rmse"], error["mse_std"]
    if feature_extractor is not None:
        result.features = extract_features(feature_extractor, images)
        if reference is not None and reference.features is not None:
            result.fd_vs_teacher = frechet_distance(result.features, reference.features)
        real = real_features if real_features is not None else getattr(reference, "real_features", None)
        if real is not None:
            result.fd_vs_real = frechet_distance(result.features, real)
            teacher_fd = reference.fd_vs_real if reference is not None else None
            if teacher_fd is None and reference is not None and reference.features is not None:
                teacher_fd = frechet_distance(reference.features, real)
            if teacher_fd is not None:
                result.delta_fd = delta_fd(result.fd_vs_real, teacher_fd)

    # 3. Prompt adherence.
    if classifier is not None:
        result.accuracy = classifier_accuracy(classifier.logits(images), torch.as_tensor(labels).long())
    if clip is not None:
        result.clip_score = clip_score(images, list(prompts), clip)
    return result
