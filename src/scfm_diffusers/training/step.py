"""One SCFM training step's losses: the single call the training loop makes (as DiT's ``training_losses``).

From a batch of cached latents and text tensors: draw the noise, the per-sample steps (σ, d1, d2, teacher
or self) and the family's conditioning (embedded guidance or CFG), then build the target with the teacher
(adapters disabled), the fast EMA and the slow EMA, and regress the student onto it
(:func:`~scfm_diffusers.training.objective.scfm_loss`). Nothing here knows a model family: the
:class:`~scfm_diffusers.families.Family` turns the transformer into velocity callables.

Time convention (diffusers): σ ∈ [0, 1], σ = 1 is noise, ``x_σ = (1 − σ)·x0 + σ·ε``, ``v = ε − x0``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..families import ConditioningConfig, Family
from .distributed import is_sharded_module
from .ema import DualLoraEMA
from .objective import SCFMLossOutput, scfm_loss
from .timesteps import GridSamplerConfig, StepSample, sample_grid_steps

__all__ = ["SCFMStepOutput", "drop_captions", "scfm_training_losses"]


@dataclass
class SCFMStepOutput:
    """The losses of one step and the steps they were drawn at (for logging the loss by σ).

    Attributes:
        losses: The objective's output (``loss`` carries the student's gradient).
        steps: The per-sample steps that were drawn.
    """

    losses: SCFMLossOutput
    steps: StepSample

    def log_values(self) -> dict[str, float]:
        """The loss and those of its parts that this batch has (a part without rows is left out, not NaN)."""
        values = {"loss": self.losses.loss.item()}
        for name, rows in (("loss_teacher", self.steps.is_teacher), ("loss_self", self.steps.is_self)):
            if rows.any():
                values[name] = getattr(self.losses, name).item()
        if self.steps.is_flow_matching.any():
            values["loss_flow_matching"] = self.losses.loss_flow_matching.item()
        return values


def drop_captions(
    text: dict[str, torch.Tensor], uncond: dict[str, torch.Tensor], p: float, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """Replace each row's text tensors by the empty prompt's with probability ``p`` (one draw per row).

    Args:
        text: ``{key: (B, ...)}`` text tensors of the batch.
        uncond: The same keys for the empty prompt, batch 1 (the family pads both to one shape).
        p: Drop probability.
        generator: CPU generator of the draws.
    """
    n = len(next(iter(text.values())))
    dropped = torch.rand(n, generator=generator) < p
    out = {}
    for key, value in text.items():
        keep = dropped.to(value.device).reshape(-1, *([1] * (value.dim() - 1)))
        out[key] = torch.where(keep, uncond[key].to(value), value)
    return out


def scfm_training_losses(
    model: Callable[..., torch.Tensor],
    ema: DualLoraEMA,
    family: Family,
    batch: dict[str, torch.Tensor],
    *,
    uncond: dict[str, torch.Tensor],
    grid: GridSamplerConfig,
    conditioning: ConditioningConfig,
    generator: torch.Generator,
) -> SCFMStepOutput:
    """The SCFM losses of one batch: noise, steps and conditioning drawn, targets built, student regressed.

    Args:
        model: The student as the optimizer sees it (the transformer, or its DDP/DeepSpeed wrapper): the
            only pass with gradient.
        ema: The dual EMA on the unwrapped transformer; its contexts give the teacher and both EMAs.
        family: The model family (conditioning, velocity convention, latent layout).
        batch: ``{"latents": (B, C, h, w) float32, **text}`` on the device (text as the family encodes it).
        uncond: The family's empty-prompt text tensors (CFG families).
        grid: The objective's grid settings.
        conditioning: Guidance / CFG settings of the batch.
        generator: CPU generator of the noise, the steps, the guidance and the caption-dropout draws (in
            that order).

    Returns:
        The losses and the steps.
    """
    text = dict(batch)
    latents = text.pop("latents")
    x0 = family.to_model_space(latents)
    n = len(x0)
    noise = torch.randn(x0.shape, generator=generator).to(x0)
    steps = sample_grid_steps(n, grid, image_seq_len=family.image_seq_len(latents), generator=generator)
    steps = steps.to(x0.device)
    options = family.sample_conditioning(ema.transformer, n, conditioning, generator)
    if conditioning.caption_dropout > 0:
        text = drop_captions(text, uncond, conditioning.caption_dropout, generator)
    target = family.velocity_fn(ema.transformer, text, latents.shape, uncond=uncond, **options)  # no grad
    losses = scfm_loss(
        student=family.velocity_fn(model, text, latents.shape, uncond=uncond, **options),
        teacher=ema.wrap("teacher", target),
        fast_ema=ema.wrap("fast", target),
        slow_ema=ema.wrap("slow", target),
        x0=x0,
        noise=noise,
        steps=steps,
        every_target=is_sharded_module(ema.transformer),  # FSDP: every rank makes the same forward passes
    )
    return SCFMStepOutput(losses, steps)
