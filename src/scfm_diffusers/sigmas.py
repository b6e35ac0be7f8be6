"""The σ grid: the one place where SCFM's time grids are computed.

Both sampling (:class:`~scfm_diffusers.FlowMatchSCFMScheduler`) and training
(:mod:`scfm_diffusers.training.timesteps`) build their grids from these functions.

Time convention (diffusers): σ ∈ [0, 1], σ = 1 is pure noise, ``x_σ = (1 − σ)·x0 + σ·ε``, velocity
``v = ε − x0``; sampling runs σ from 1 down to 0.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "DEFAULT_MAX_SIGMA",
    "dynamic_shift",
    "fixed_shift",
    "resolution_mu",
    "scfm_sigmas",
    "uniform_sigmas",
]

#: The first σ of every SCFM grid: 1 − 1e-5 rather than 1, as in the method's reference code.
DEFAULT_MAX_SIGMA = 1.0 - 1e-5


def uniform_sigmas(num_steps: int, *, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Return the uniform grid ``linspace(1, 0, num_steps + 1)``.

    Args:
        num_steps: Number of Euler steps N (≥ 1).
        dtype: Floating dtype of the result.

    Returns:
        Tensor of shape ``(N + 1,)`` from 1 down to 0.

    Example:
        >>> uniform_sigmas(4).tolist()
        [1.0, 0.75, 0.5, 0.25, 0.0]
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}.")
    return torch.linspace(1.0, 0.0, num_steps + 1, dtype=dtype)


def fixed_shift(sigmas: torch.Tensor, shift: float | torch.Tensor) -> torch.Tensor:
    """Apply the fixed (SD3-style) shift ``t = s·u / (1 + (s − 1)·u)``.

    ``shift`` may be a float or a tensor broadcastable against ``sigmas`` (one shift per sample).
    ``shift = 1`` is the identity; larger shifts spend more steps near σ = 1. Endpoints 0 and 1 are kept.
    """
    return shift * sigmas / (1.0 + (shift - 1.0) * sigmas)


def dynamic_shift(sigmas: torch.Tensor, mu: float | torch.Tensor) -> torch.Tensor:
    """Apply the resolution-dependent (Flux) shift ``t = e^μ / (e^μ + (1/u − 1))``.

    This equals :func:`fixed_shift` with ``shift = e^μ``; it is written in the Flux form so that
    ``u = 0`` maps to 0 without a division by zero. ``mu`` may be a float or a broadcastable tensor.
    """
    shift = torch.exp(torch.as_tensor(mu, dtype=sigmas.dtype, device=sigmas.device))
    return fixed_shift(sigmas, shift)


def resolution_mu(
    image_seq_len: int | torch.Tensor,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float | torch.Tensor:
    """Return μ for the dynamic shift, linear in the packed image sequence length.

    Same line as diffusers' ``calculate_shift`` (256 tokens → 0.5, 4096 tokens → 1.15 by default).
    """
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return base_shift + slope * (image_seq_len - base_seq_len)


def scfm_sigmas(
    num_steps: int,
    *,
    shift: float = 3.0,
    mu: float | None = None,
    max_sigma: float = DEFAULT_MAX_SIGMA,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Return the SCFM sampling grid: a shifted uniform grid whose first σ is ``max_sigma``.

    Args:
        num_steps: Number of Euler steps N (≥ 1).
        shift: Fixed shift s, used when ``mu`` is None.
        mu: If given, the dynamic shift with this μ is used instead of ``shift``.
        max_sigma: Value the first σ is clamped to (the method uses 1 − 1e-5).
        dtype: Floating dtype of the result.

    Returns:
        Tensor of shape ``(N + 1,)``, strictly decreasing from ``max_sigma`` to 0.

    Example:
        >>> [round(s, 3) for s in scfm_sigmas(3, shift=3.0).tolist()]
        [1.0, 0.857, 0.6, 0.0]
    """
    if not 0.0 < max_sigma <= 1.0:
        raise ValueError(f"max_sigma must be in (0, 1], got {max_sigma}.")
    if mu is None and not (math.isfinite(shift) and shift > 0):
        raise ValueError(f"shift must be a positive finite number, got {shift}.")
    grid = uniform_sigmas(num_steps, dtype=dtype)
    grid = dynamic_shift(grid, mu) if mu is not None else fixed_shift(grid, shift)
    return grid.clamp(max=max_sigma)
