"""LoRA scale per step count, calibrated against the many-step teacher from the same noise.

The authors of SCFM advise a higher LoRA scale for fewer steps (1.0–1.75, e.g. 1.6 at 5 steps). A step-size
free student is a compromise over the jump sizes it was trained on; the LoRA scale moves it towards larger
(scale > 1) or smaller (scale < 1) jumps. :func:`calibrate_lora_scales` measures, for each step count N and
each candidate scale, the paired error between the N-step student and the ``reference_steps``-step teacher
(the same pipeline with every LoRA at scale 0) from the same initial noise, and keeps the best scale per N.
The training script stores the result in the adapter's :class:`~scfm_diffusers.SCFMInferenceSettings`
(``lora_scales``), and :class:`~scfm_diffusers.SCFMPipeline` uses it for the requested step count.

Errors are measured on latents (``output_type="latent"``): no VAE decode, same ranking as pixels up to the
decoder's local scaling. A video family's latents are clips ``(B, C, F', h, w)``: the error is over every latent
frame (pass the pipeline's ``num_frames`` with the other call arguments).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from .families import pipeline_samples

__all__ = ["DEFAULT_LORA_SCALE_CANDIDATES", "LoraScaleCalibration", "calibrate_lora_scales"]

logger = logging.getLogger(__name__)

#: Scales tried by default: 0 to 2.0 in steps of 0.1. The authors advise 1.0–1.75 for Flux; on the digits demo
#: the best scale at 8 steps is 0.5 or lower. Scale 0 is the teacher's own N-step Euler sampler, so a sweep
#: that picks 0 says the adapter does not help at that step count.
DEFAULT_LORA_SCALE_CANDIDATES: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(21))


@dataclass
class LoraScaleCalibration:
    """Result of :func:`calibrate_lora_scales`.

    Attributes:
        scales: ``{N: best LoRA scale}`` for each calibrated step count.
        errors: ``{N: {scale: paired RMSE}}``, the whole sweep.
        reference_steps: Steps of the teacher reference.
        num_images: Images (or clips) per (N, scale) pair.
    """

    scales: dict[int, float]
    errors: dict[int, dict[float, float]] = field(default_factory=dict)
    reference_steps: int = 32
    num_images: int = 0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (keys as strings, as JSON needs)."""
        return {
            "scales": {str(n): s for n, s in self.scales.items()},
            "errors": {str(n): {str(s): e for s, e in row.items()} for n, row in self.errors.items()},
            "reference_steps": self.reference_steps,
            "num_images": self.num_images,
        }

    def summary(self) -> str:
        """One line per step count: best scale, its error, and the error at scale 1."""
        lines = []
        for n, best in sorted(self.scales.items()):
            row = self.errors.get(n, {})
            at_one = f", {row[1.0]:.4g} at scale 1" if 1.0 in row else ""
            lines.append(f"{n} steps: LoRA scale {best:g} (paired RMSE {row.get(best, math.nan):.4g}{at_one})")
        return "\n".join(lines)


@torch.no_grad()
def calibrate_lora_scales(
    pipe: Any,
    step_counts: Sequence[int],
    *,
    prompt: str | list[str] | None = None,
    candidates: Sequence[float] = DEFAULT_LORA_SCALE_CANDIDATES,
    reference_steps: int = 32,
    seed: int = 0,
    batch_size: int | None = None,
    progress: bool = True,
    **call_kwargs: Any,
) -> LoraScaleCalibration:
    """Find the LoRA scale with the lowest paired error to the teacher, for each step count.

    The reference is the same pipeline with ``lora_scale=0.0`` (every LoRA off: the base model the adapter was
    distilled from) in ``reference_steps`` steps on the adapter's shift. Every call of the sweep starts from
    the same per-image noise (one ``torch.Generator`` per image, seeded ``seed + i``).

    Args:
        pipe: An :class:`~scfm_diffusers.SCFMPipeline` (any family) with the adapter loaded and NOT fused (a
            fused LoRA ignores the scale).
        step_counts: Step counts N to calibrate (e.g. ``[3, 4, 8]``).
        prompt: Prompts, one image (or clip) each; or None when ``call_kwargs`` carries ``prompt_embeds``.
        candidates: LoRA scales tried for each N.
        reference_steps: Teacher steps of the reference.
        seed: Seed of the first image's noise.
        batch_size: Images per pipeline call (None: all at once). Each image has its own generator, so the
            result does not depend on it; lower it when memory is short.
        progress: Show a progress bar over the sweep.
        **call_kwargs: Further pipeline arguments, the same for every call (``prompt_embeds``, ``height``,
            ``guidance_scale``, ``max_sequence_length``, a video family's ``num_frames``, ...); tensors and lists
            with one row per image are split into the batches.

    Returns:
        The best scale per N and the whole sweep.

    Example:
        >>> from scfm_diffusers import SCFMPipeline
        >>> pipe = SCFMPipeline.from_pretrained("black-forest-labs/FLUX.1-dev", adapter="org/flux-scfm")  # doctest: +SKIP
        >>> result = calibrate_lora_scales(pipe, [3, 4], prompt=["a red fox in snow", "a city at night"])  # doctest: +SKIP
        >>> pipe.set_scfm_settings(lora_scales=result.scales)  # doctest: +SKIP
    """
    from .pipeline_scfm import SCFMPipelineMixin

    if not isinstance(pipe, SCFMPipelineMixin):
        raise TypeError(
            f"calibrate_lora_scales needs an SCFM pipeline (it passes lora_scale per call), got "
            f"{type(pipe).__name__}; wrap it with SCFMPipeline.from_pipe(pipe)."
        )
    steps = sorted({int(n) for n in step_counts})
    if not steps or steps[0] < 1:
        raise ValueError(f"step_counts must hold step counts >= 1, got {list(step_counts)}.")
    scales = [float(s) for s in candidates]
    if not scales or any(not math.isfinite(s) or s < 0 for s in scales):
        raise ValueError(f"candidates must be finite LoRA scales >= 0, got {list(candidates)}.")
    if prompt is not None:
        call_kwargs["prompt"] = prompt
        num_images = 1 if isinstance(prompt, str) else len(prompt)
    elif call_kwargs.get("prompt_embeds") is not None:
        num_images = len(call_kwargs["prompt_embeds"])
    else:
        raise ValueError("Give the calibration prompts: prompt=[...] or prompt_embeds=... (one image per row).")
    if call_kwargs.pop("output_type", "latent") != "latent":
        raise ValueError("calibrate_lora_scales compares latents; do not pass output_type.")
    for name in ("num_inference_steps", "lora_scale", "generator", "num_images_per_prompt"):
        if name in call_kwargs:
            raise ValueError(f"calibrate_lora_scales sets {name} itself; remove it from the arguments.")
    batch_size = num_images if batch_size is None else int(batch_size)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if isinstance(call_kwargs.get("prompt"), str):
        call_kwargs["prompt"] = [call_kwargs["prompt"]]

    def rows(value: Any, start: int, stop: int) -> Any:  # one batch of the per-image arguments
        if isinstance(value, torch.Tensor | list) and len(value) == num_images:
            return value[start:stop]
        return value

    def sample(num_steps: int, lora_scale: float) -> torch.Tensor:
        batches = []
        for start in range(0, num_images, batch_size):
            stop = min(start + batch_size, num_images)
            out = pipe(
                num_inference_steps=num_steps,
                lora_scale=lora_scale,
                generator=[torch.Generator().manual_seed(seed + i) for i in range(start, stop)],
                output_type="latent",
                **{name: rows(value, start, stop) for name, value in call_kwargs.items()},
            )
            batches.append(pipeline_samples(out).float().cpu())
        return torch.cat(batches)

    bar = tqdm(total=1 + len(steps) * len(scales), desc="LoRA scale calibration", disable=not progress)
    reference = sample(reference_steps, 0.0)
    bar.update(1)
    errors: dict[int, dict[float, float]] = {}
    for n in steps:
        errors[n] = {}
        for scale in scales:
            latents = sample(n, scale)
            errors[n][scale] = (latents - reference).pow(2).mean().sqrt().item()
            bar.update(1)
    bar.close()
    best = {n: min(row, key=row.get) for n, row in errors.items()}
    edges = [n for n, scale in best.items() if len(scales) > 1 and scale in (min(scales), max(scales))]
    if edges:
        logger.warning(
            f"The best LoRA scale at {edges} steps is at the edge of the candidates ({min(scales)}–{max(scales)}): "
            "the optimum may lie outside; widen the candidates (--lora_scale_candidates in the training script)."
        )
    return LoraScaleCalibration(best, errors, reference_steps=reference_steps, num_images=num_images)
