"""Per-sample step sampling for SCFM training: which target, which grid, which coarse step.

Time convention (diffusers): σ ∈ [0, 1], σ = 1 is pure noise, ``x_σ = (1 − σ)·x0 + σ·ε``, velocity
``v = ε − x0``, Euler step ``x_{σ'} = x_σ + (σ' − σ)·v`` (σ decreases during sampling).

For every sample of the batch, independently (method doc, training steps 1–4):

1. Target source: flow matching with probability ``flow_matching_ratio``, teacher with probability
   ``teacher_ratio``, self (EMA) otherwise.
2. Grid size M: teacher and flow-matching rows draw an even M uniformly in
   ``[teacher_grid_size_min, teacher_grid_size_max]``; self rows draw M uniformly from ``self_grid_sizes``
   (the method's generic mix) or, when ``target_steps`` is set, step-targeted (below).
3. ``u = linspace(1, 0, M + 1)``, shifted with probability ``dynamic_shift_prob`` by the Flux dynamic shift
   (μ from the image sequence length), else by a fixed shift s ~ U[shift_min, shift_max]; ``t[0]`` is
   clamped to ``max_sigma``.
4. An even index j ∈ {0, 2, …, M − 2}: ``σ = t[j]``, ``d1 = t[j] − t[j+1]``, ``d2 = t[j+1] − t[j+2]``.

**Step-targeted self rows** (this project's extension, docs/method.md). With ``target_steps`` = (N, …), a self
row draws N uniformly from ``target_steps`` and a level k uniformly from ``target_levels`` (default 1, 2, 4),
and uses the grid M = 2·N·k at the sampling shift ``target_shift`` (no dynamic shift). At k = 1 the coarse
step is exactly a jump of the N-step SCFM sampling grid ``scfm_sigmas(N, shift=target_shift)``, split at the
2N-grid point; at k = 2 and 4 it is a jump of the 2N- and 4N-step grids, which are the half-steps the level
above bootstraps from. Every jump the N-step sampler takes is thus trained directly, on a chain of grids
that ends at the teacher rows' fine grids. Teacher and flow-matching rows are unchanged.

All grid math comes from :mod:`scfm_diffusers.sigmas`.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field, fields

import torch

from scfm_diffusers.sigmas import DEFAULT_MAX_SIGMA, fixed_shift, resolution_mu, uniform_sigmas

__all__ = ["GridSamplerConfig", "StepSample", "TargetSource", "sample_grid_steps"]


class TargetSource(enum.IntEnum):
    """Where a sample's regression target comes from (stored as ``long`` in :class:`StepSample`)."""

    TEACHER = 0  # first half-step by the frozen teacher (adapters disabled)
    SELF = 1  # first half-step by the fast EMA of the student
    FLOW_MATCHING = 2  # plain flow-matching target ε − x0


@dataclass
class GridSamplerConfig:
    """Settings of :func:`sample_grid_steps`; defaults are the method's reference values."""

    teacher_ratio: float = field(
        default=0.4, metadata={"help": "Share of the batch whose first half-step is taken by the teacher."}
    )
    flow_matching_ratio: float = field(
        default=0.0,
        metadata={"help": "Share of the batch trained on the plain flow-matching target ε − x0 (0 = off)."},
    )
    teacher_grid_size_min: int = field(
        default=32, metadata={"help": "Smallest teacher grid size M (even, >= 2); M is uniform over even values."}
    )
    teacher_grid_size_max: int = field(
        default=32, metadata={"help": "Largest teacher grid size M (even, >= teacher_grid_size_min)."}
    )
    self_grid_sizes: tuple[int, ...] = field(
        default=(2, 4, 8, 16), metadata={"help": "Grid sizes M for self samples, drawn uniformly (each even, >= 2)."}
    )
    shift_min: float = field(default=2.5, metadata={"help": "Lower bound of the fixed shift s ~ U[min, max]."})
    shift_max: float = field(default=4.5, metadata={"help": "Upper bound of the fixed shift s ~ U[min, max]."})
    dynamic_shift_prob: float = field(
        default=0.1,
        metadata={"help": "Probability of the resolution-dependent (Flux) dynamic shift; set 0 for SD3."},
    )
    base_shift: float = field(default=0.5, metadata={"help": "Dynamic shift μ at base_image_seq_len tokens."})
    max_shift: float = field(default=1.15, metadata={"help": "Dynamic shift μ at max_image_seq_len tokens."})
    base_image_seq_len: int = field(default=256, metadata={"help": "Sequence length where μ = base_shift."})
    max_image_seq_len: int = field(default=4096, metadata={"help": "Sequence length where μ = max_shift."})
    max_sigma: float = field(
        default=DEFAULT_MAX_SIGMA, metadata={"help": "Value the first σ of a grid is clamped to."}
    )
    target_steps: tuple[int, ...] = field(
        default=(),
        metadata={
            "help": "Step-targeted self rows: sampling step counts N whose jumps are trained directly, on the "
            "grids M = 2·N·level at --target_shift (empty: the method's generic --self_grid_sizes mix)."
        },
    )
    target_levels: tuple[int, ...] = field(
        default=(1, 2, 4),
        metadata={"help": "Step-targeted self grids are M = 2·N·level for each level (1 = the N-step jumps)."},
    )
    target_shift: float | None = field(
        default=None, metadata={"help": "Fixed shift of the step-targeted grids: the adapter's sampling shift."}
    )

    def __post_init__(self) -> None:
        self.self_grid_sizes = tuple(int(m) for m in self.self_grid_sizes)
        for name in ("teacher_ratio", "flow_matching_ratio", "dynamic_shift_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {value}.")
        if self.teacher_ratio + self.flow_matching_ratio > 1.0 + 1e-12:
            raise ValueError(
                "teacher_ratio + flow_matching_ratio must be <= 1 (the rest of the batch are self samples), got "
                f"{self.teacher_ratio} + {self.flow_matching_ratio}."
            )
        for name in ("teacher_grid_size_min", "teacher_grid_size_max"):
            _check_grid_size(name, getattr(self, name))
        if self.teacher_grid_size_min > self.teacher_grid_size_max:
            raise ValueError(
                f"teacher_grid_size_min ({self.teacher_grid_size_min}) must be <= "
                f"teacher_grid_size_max ({self.teacher_grid_size_max})."
            )
        if not self.self_grid_sizes:
            raise ValueError("self_grid_sizes must contain at least one grid size, got an empty tuple.")
        for m in self.self_grid_sizes:
            _check_grid_size("every entry of self_grid_sizes", m)
        if not (math.isfinite(self.shift_min) and self.shift_min > 0):
            raise ValueError(f"shift_min must be a positive finite number, got {self.shift_min}.")
        if not (math.isfinite(self.shift_max) and self.shift_max >= self.shift_min):
            raise ValueError(f"shift_max must be finite and >= shift_min ({self.shift_min}), got {self.shift_max}.")
        if not 0 < self.base_image_seq_len < self.max_image_seq_len:
            raise ValueError(
                "Expected 0 < base_image_seq_len < max_image_seq_len, got "
                f"{self.base_image_seq_len} and {self.max_image_seq_len}."
            )
        if not 0.0 < self.max_sigma <= 1.0:
            raise ValueError(f"max_sigma must be in (0, 1], got {self.max_sigma}.")
        self.target_steps = tuple(int(n) for n in self.target_steps)
        self.target_levels = tuple(int(k) for k in self.target_levels)
        if any(n < 1 for n in self.target_steps):
            raise ValueError(f"every entry of target_steps must be a step count >= 1, got {self.target_steps}.")
        if not self.target_levels or any(k < 1 for k in self.target_levels):
            raise ValueError(f"target_levels must be integers >= 1 (1 = the N-step jumps), got {self.target_levels}.")
        if self.target_steps and not (
            self.target_shift is not None and math.isfinite(self.target_shift) and self.target_shift > 0
        ):
            raise ValueError(
                "target_steps needs target_shift, the positive shift the adapter samples with "
                f"(e.g. target_shift=3.25 for Flux at 1024²), got {self.target_shift}."
            )

    @property
    def step_targeted(self) -> bool:
        """Whether self rows are step-targeted (``target_steps`` set) rather than the generic mix."""
        return bool(self.target_steps)

    def self_grid_choices(self) -> list[int]:
        """The self grid sizes M that can be drawn (with repeats when two targets share a grid)."""
        if self.step_targeted:
            return [2 * n * k for n in self.target_steps for k in self.target_levels]
        return list(self.self_grid_sizes)

    @classmethod
    def help(cls) -> dict[str, str]:
        """Return ``{field name: help text}`` (for CLI flags)."""
        return {f.name: f.metadata["help"] for f in fields(cls)}


def _check_grid_size(name: str, value: int) -> None:
    if isinstance(value, bool) or int(value) != value or value < 2 or value % 2:
        raise ValueError(f"{name} must be an even integer >= 2 (two half-steps per coarse step), got {value}.")


@dataclass
class StepSample:
    """One coarse step per sample, as drawn by :func:`sample_grid_steps`.

    Attributes:
        sigma: ``(B,)`` float32, the start σ = t[j] of the coarse step.
        d1: ``(B,)`` float32, first half-step length t[j] − t[j+1] (> 0).
        d2: ``(B,)`` float32, second half-step length t[j+1] − t[j+2] (> 0); the step ends at σ − d1 − d2.
        source: ``(B,)`` long, :class:`TargetSource` values.
        grid_size: ``(B,)`` long, the grid size M the step was taken from.
        shift: ``(B,)`` float32, the effective fixed shift of the grid (e^μ for dynamically shifted rows).
    """

    sigma: torch.Tensor
    d1: torch.Tensor
    d2: torch.Tensor
    source: torch.Tensor
    grid_size: torch.Tensor
    shift: torch.Tensor

    def to(self, device: torch.device | str | None) -> StepSample:
        """Return a copy with every tensor moved to ``device``."""
        return StepSample(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def __len__(self) -> int:
        return self.sigma.shape[0]

    @property
    def is_teacher(self) -> torch.Tensor:
        """``(B,)`` bool mask of teacher samples."""
        return self.source == TargetSource.TEACHER

    @property
    def is_self(self) -> torch.Tensor:
        """``(B,)`` bool mask of self (EMA) samples."""
        return self.source == TargetSource.SELF

    @property
    def is_flow_matching(self) -> torch.Tensor:
        """``(B,)`` bool mask of plain flow-matching samples."""
        return self.source == TargetSource.FLOW_MATCHING


def sample_grid_steps(
    batch_size: int,
    config: GridSamplerConfig,
    *,
    image_seq_len: int | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> StepSample:
    """Draw a target source, a shifted grid and a coarse step for each of ``batch_size`` samples.

    The shifted grid is ``t = clamp(fixed_shift(linspace(1, 0, M + 1), s), max=max_sigma)`` with
    ``s ~ U[shift_min, shift_max]``, or ``s = e^μ``, ``μ = resolution_mu(image_seq_len)`` with probability
    ``dynamic_shift_prob`` (the Flux dynamic shift equals the fixed shift with s = e^μ). With an even index
    j ∈ {0, 2, …, M − 2}: ``σ = t[j]``, ``d1 = t[j] − t[j+1]``, ``d2 = t[j+1] − t[j+2]``.
    Flow-matching rows use a teacher-sized grid for σ; their d1, d2 are filled in but unused.

    Args:
        batch_size: Number of samples B (>= 1).
        config: Sampler settings.
        image_seq_len: Packed image sequence length (Flux); required when ``config.dynamic_shift_prob > 0``.
        generator: CPU random generator; the result is a deterministic function of its state.
        device: Device of the returned tensors (drawing always happens on the CPU, in float64).

    Returns:
        A :class:`StepSample` of ``(B,)`` tensors.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if config.dynamic_shift_prob > 0 and image_seq_len is None:
        raise ValueError("image_seq_len is required when dynamic_shift_prob > 0 (it sets the dynamic shift μ).")

    def rand() -> torch.Tensor:
        return torch.rand(batch_size, generator=generator, dtype=torch.float64)

    # 1. Source: [0, fm) flow matching, [fm, fm + teacher) teacher, the rest self.
    r = rand()
    source = torch.full((batch_size,), int(TargetSource.SELF), dtype=torch.long)
    source[r < config.flow_matching_ratio + config.teacher_ratio] = TargetSource.TEACHER
    source[r < config.flow_matching_ratio] = TargetSource.FLOW_MATCHING

    # 2. Grid size M: even values in the teacher range, or one of the self grid sizes.
    half_lo, half_hi = config.teacher_grid_size_min // 2, config.teacher_grid_size_max // 2
    teacher_m = 2 * (half_lo + (rand() * (half_hi - half_lo + 1)).long().clamp(max=half_hi - half_lo))
    # Step-targeted: N and the level are drawn independently and uniformly, i.e. uniform over (N, level) pairs.
    self_sizes = torch.tensor(config.self_grid_choices(), dtype=torch.long)
    self_m = self_sizes[(rand() * len(self_sizes)).long().clamp(max=len(self_sizes) - 1)]
    grid_size = torch.where(source == TargetSource.SELF, self_m, teacher_m)

    # 3. Shift: fixed s ~ U[min, max], or the dynamic shift e^μ.
    shift = config.shift_min + (config.shift_max - config.shift_min) * rand()
    is_dynamic = rand() < config.dynamic_shift_prob
    if is_dynamic.any():
        mu = resolution_mu(
            image_seq_len,
            base_seq_len=config.base_image_seq_len,
            max_seq_len=config.max_image_seq_len,
            base_shift=config.base_shift,
            max_shift=config.max_shift,
        )
        shift = torch.where(is_dynamic, torch.tensor(math.exp(mu), dtype=torch.float64), shift)
    if config.step_targeted:  # self rows follow the sampling schedule exactly
        shift = torch.where(source == TargetSource.SELF, torch.tensor(config.target_shift, dtype=torch.float64), shift)

    # 4. Even index j, then the three grid points u[j], u[j+1], u[j+2] of each row's own uniform grid.
    j = 2 * (rand() * (grid_size // 2)).long().clamp(max=grid_size // 2 - 1)
    u = torch.empty(batch_size, 3, dtype=torch.float64)
    for m in grid_size.unique().tolist():
        rows = grid_size == m
        u[rows] = uniform_sigmas(m)[j[rows, None] + torch.arange(3)]
    # Round the grid points, not the differences, so that σ − d1 is (nearly) the float32 grid point t[j+1].
    t = fixed_shift(u, shift[:, None]).clamp(max=config.max_sigma).float()

    return StepSample(
        sigma=t[:, 0],
        d1=t[:, 0] - t[:, 1],
        d2=t[:, 1] - t[:, 2],
        source=source,
        grid_size=grid_size,
        shift=shift.float(),
    ).to(device)
