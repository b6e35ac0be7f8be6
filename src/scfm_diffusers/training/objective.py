"""The SCFM objective as pure tensor math over velocity callables.

Time convention (diffusers): σ ∈ [0, 1], σ = 1 is pure noise, ``x_σ = (1 − σ)·x0 + σ·ε``, velocity
``v = ε − x0``, Euler step ``x_{σ'} = x_σ + (σ' − σ)·v`` (σ decreases during sampling).

The student's velocity at (x_σ, σ) is regressed onto the average velocity of two Euler half-steps of
lengths d1 and d2 taken by target models (teacher or fast EMA, then slow EMA)::

    v1 = first(x_σ, σ);   x' = x_σ − d1·v1;   v2 = second(x', σ − d1)
    target = (d1·v1 + d2·v2) / (d1 + d2)

Flow-matching rows regress onto ``ε − x0`` instead. Nothing here knows about models, adapters or
accelerate: the caller wraps each network pass in a :data:`VelocityFn`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from scfm_diffusers.training.timesteps import StepSample

__all__ = ["SCFMLossOutput", "VelocityFn", "loss_by_sigma_bins", "scfm_loss", "scfm_target"]

#: ``fn(x_sigma (B', ...), sigma (B',), rows (B',) long) -> velocity (B', ...)``. ``rows`` index the
#: original batch, so the callable can slice per-sample conditioning (text embeddings, guidance).
VelocityFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape ``(B,)`` to ``(B, 1, …, 1)`` so that it broadcasts against ``like`` of shape ``(B, ...)``."""
    return values.reshape(-1, *([1] * (like.dim() - 1)))


@torch.no_grad()
def scfm_target(
    x_sigma: torch.Tensor,
    sigma: torch.Tensor,
    d1: torch.Tensor,
    d2: torch.Tensor,
    first: VelocityFn,
    second: VelocityFn,
    rows: torch.Tensor,
) -> torch.Tensor:
    """Average velocity of two Euler half-steps: ``(d1·v1 + d2·v2) / (d1 + d2)``.

    With ``v1 = first(x_σ, σ)``, ``x' = x_σ − d1·v1`` and ``v2 = second(x', σ − d1)``, the target is the
    velocity of the single coarse step from σ to σ − d1 − d2 that lands where the two half-steps land.

    Args:
        x_sigma: ``(B', ...)`` noisy inputs.
        sigma: ``(B',)`` start σ of the coarse step.
        d1: ``(B',)`` first half-step length (> 0).
        d2: ``(B',)`` second half-step length (> 0).
        first: Velocity of the first half-step (teacher or fast EMA).
        second: Velocity of the second half-step (slow EMA).
        rows: ``(B',)`` long indices of these samples in the original batch, passed to the callables.

    Returns:
        ``(B', ...)`` detached target in ``x_sigma``'s dtype promoted to at least float32.
    """
    dtype = torch.promote_types(x_sigma.dtype, torch.float32)
    x = x_sigma.to(dtype)
    d1_, d2_ = _per_sample(d1.to(dtype), x), _per_sample(d2.to(dtype), x)
    v1 = first(x, sigma, rows).to(dtype)
    v2 = second(x - d1_ * v1, sigma - d1, rows).to(dtype)
    return ((d1_ * v1 + d2_ * v2) / (d1_ + d2_)).detach()


@dataclass
class SCFMLossOutput:
    """Result of :func:`scfm_loss`.

    Attributes:
        loss: Scalar MSE over all elements, with gradient to the student.
        loss_per_sample: ``(B,)`` detached per-sample MSE.
        loss_teacher: Detached scalar, mean MSE of teacher rows (NaN when there are none).
        loss_self: Detached scalar, mean MSE of self rows (NaN when there are none).
        loss_flow_matching: Detached scalar, mean MSE of flow-matching rows (NaN when there are none).
        target: ``(B, ...)`` detached regression target (at least float32).
        x_sigma: ``(B, ...)`` detached noisy input the student saw.
    """

    loss: torch.Tensor
    loss_per_sample: torch.Tensor
    loss_teacher: torch.Tensor
    loss_self: torch.Tensor
    loss_flow_matching: torch.Tensor
    target: torch.Tensor
    x_sigma: torch.Tensor


def scfm_loss(
    *,
    student: VelocityFn,
    teacher: VelocityFn,
    fast_ema: VelocityFn,
    slow_ema: VelocityFn,
    x0: torch.Tensor,
    noise: torch.Tensor,
    steps: StepSample,
    every_target: bool = False,
) -> SCFMLossOutput:
    """The SCFM training loss for one batch.

    ``x_σ = (1 − σ)·x0 + σ·ε``. Targets (no grad, :func:`scfm_target`): the first half-step of teacher rows
    is taken by ``teacher``, of self rows by ``fast_ema``; the second half-step of all of them by ONE
    ``slow_ema`` call; flow-matching rows use ``ε − x0``. Each first-step callable only sees its own rows
    and is skipped when they are empty. Per step that is two no-grad forwards of the batch plus the
    student's forward and backward: the method's floor.
    Then ``v_s = student(x_σ, σ, all rows)`` and ``loss = mean((v_s − target)²)`` over all elements.

    All target passes run before the student pass: the callables may switch adapters on one shared
    model, and the student's autograd graph must be the last one built. With ``every_target`` each target
    callable runs every time, on one row whose result is dropped where it has no rows: a sharded model (FSDP)
    gathers its weights in every pass, collectively, so every rank must make the same passes.

    Args:
        student: Student velocity (the only pass with gradient).
        teacher: Teacher velocity (the base model, adapters disabled).
        fast_ema: Fast-EMA velocity (first half-step of self rows).
        slow_ema: Slow-EMA velocity (second half-step of all SCFM rows).
        x0: ``(B, ...)`` clean latents.
        noise: ``(B, ...)`` Gaussian noise ε.
        steps: Per-sample steps from :func:`~scfm_diffusers.training.timesteps.sample_grid_steps`.
        every_target: Call the teacher, the fast EMA and the slow EMA once each in every call (FSDP).

    Returns:
        An :class:`SCFMLossOutput`.
    """
    if x0.shape != noise.shape or x0.shape[0] != len(steps):
        raise ValueError(
            f"x0 {tuple(x0.shape)} and noise {tuple(noise.shape)} must have the same shape, with "
            f"len(steps) = {len(steps)} rows."
        )
    dtype = torch.promote_types(x0.dtype, torch.float32)
    steps = steps.to(x0.device)
    sigma = steps.sigma.to(dtype)
    x0_, noise_ = x0.to(dtype), noise.to(dtype)
    x_sigma = (1 - _per_sample(sigma, x0_)) * x0_ + _per_sample(sigma, x0_) * noise_

    def first(x: torch.Tensor, s: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        # Teacher rows take their first half-step with the teacher, self rows with the fast EMA.
        out = torch.empty_like(x)
        from_teacher = steps.is_teacher[rows]
        for mask, velocity in ((from_teacher, teacher), (~from_teacher, fast_ema)):
            if mask.any():
                out[mask] = velocity(x[mask], s[mask], rows[mask]).to(out.dtype)
            elif every_target:  # no rows here, but other ranks' passes gather weights with this one's
                velocity(x[:1], s[:1], rows[:1])
        return out

    target = torch.empty_like(x_sigma)
    rows = (~steps.is_flow_matching).nonzero().squeeze(1)
    if rows.numel():  # one slow-EMA pass serves the second half-step of teacher and self rows alike
        target[rows] = scfm_target(x_sigma[rows], sigma[rows], steps.d1[rows], steps.d2[rows], first, slow_ema, rows)
    elif every_target:  # only flow-matching rows here: the target passes still run, on one row, result dropped
        one = torch.zeros(1, dtype=torch.long, device=x0.device)
        scfm_target(x_sigma[one], sigma[one], steps.d1[one], steps.d2[one], first, slow_ema, one)
    fm_rows = steps.is_flow_matching
    target[fm_rows] = (noise_[fm_rows] - x0_[fm_rows]).detach()

    v_student = student(x_sigma, sigma, torch.arange(len(steps), device=x0.device))
    squared_error = (v_student.to(dtype) - target) ** 2
    loss_per_sample = squared_error.detach().flatten(1).mean(1)

    def part(mask: torch.Tensor) -> torch.Tensor:
        return loss_per_sample[mask].mean() if mask.any() else loss_per_sample.new_tensor(math.nan)

    return SCFMLossOutput(
        loss=squared_error.mean(),
        loss_per_sample=loss_per_sample,
        loss_teacher=part(steps.is_teacher),
        loss_self=part(steps.is_self),
        loss_flow_matching=part(fm_rows),
        target=target,
        x_sigma=x_sigma.detach(),
    )


def loss_by_sigma_bins(sigma: torch.Tensor, loss_per_sample: torch.Tensor, num_bins: int = 4) -> dict[str, float]:
    """Mean per-sample loss in ``num_bins`` equal σ bins of [0, 1], for logging.

    Args:
        sigma: ``(B,)`` σ of each sample.
        loss_per_sample: ``(B,)`` per-sample loss.
        num_bins: Number of bins; σ = 1 falls into the last one.

    Returns:
        ``{"loss_sigma_0.00-0.25": mean, ...}``; empty bins are omitted.
    """
    if num_bins < 1:
        raise ValueError(f"num_bins must be >= 1, got {num_bins}.")
    sigma, loss = sigma.detach().double().cpu(), loss_per_sample.detach().double().cpu()
    index = (sigma * num_bins).long().clamp(0, num_bins - 1)
    out = {}
    for b in range(num_bins):
        mask = index == b
        if mask.any():
            out[f"loss_sigma_{b / num_bins:.2f}-{(b + 1) / num_bins:.2f}"] = loss[mask].mean().item()
    return out
