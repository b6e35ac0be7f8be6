"""FlowMatchSCFMScheduler: plain Euler on the SCFM few-step grid, for diffusers' flow-matching pipelines.

Time convention (diffusers): σ ∈ [0, 1], σ = 1 is noise, ``x_σ = (1 − σ)·x0 + σ·ε``, the model predicts the
velocity ``v = ε − x0`` and one step is ``x_{σ'} = x_σ + (σ' − σ)·v``.
"""

from __future__ import annotations

import numpy as np
import torch

# A pipeline saved with this scheduler names it ["scfm_diffusers.scheduling_flow_match_scfm",
# "FlowMatchSCFMScheduler"] in model_index.json. To load it, diffusers looks up the base classes whose
# `from_pretrained` it knows (SchedulerMixin, ModelMixin, ...) as attributes of *that module*
# (`pipeline_loading_utils.get_class_obj_and_candidates`): without `SchedulerMixin` here it finds no loading
# method and every `from_pretrained` of the saved pipeline fails. See docs/inference.md, "Saving and reloading".
from diffusers import FlowMatchEulerDiscreteScheduler, SchedulerMixin  # noqa: F401  (SchedulerMixin: see above)
from diffusers.configuration_utils import register_to_config

from .sigmas import DEFAULT_MAX_SIGMA, dynamic_shift, fixed_shift, uniform_sigmas

__all__ = ["FlowMatchSCFMScheduler"]


class FlowMatchSCFMScheduler(FlowMatchEulerDiscreteScheduler):
    """Euler sampler on the grid an SCFM student was trained for.

    The grid of N steps is the uniform grid ``u = linspace(1, 0, N + 1)`` under a shift: the fixed shift
    ``t = s·u / (1 + (s − 1)·u)`` (the method's default, ``shift`` = 3.25 for Flux, 3.0 for SD3) or, with
    ``use_dynamic_shifting=True``, Flux's resolution-dependent shift with the ``mu`` the pipeline passes. The
    first σ is clamped to ``max_sigma`` (1 − 1e-5). With ``shift=3`` the 3-step grid is 1, .857, .6, 0.

    It is a :class:`~diffusers.FlowMatchEulerDiscreteScheduler` (same ``step``, ``scale_noise``, indices), so it
    drops into ``FluxPipeline`` and ``StableDiffusion3Pipeline``: Flux passes ``sigmas`` (the uniform grid
    without its final 0) and ``mu``, SD3 passes ``num_inference_steps``; both give the SCFM grid. It loads from
    a stock scheduler config, keeping the keys it knows and any you override:

    Example:
        >>> from diffusers import FlowMatchEulerDiscreteScheduler
        >>> stock = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)  # a Flux config
        >>> scheduler = FlowMatchSCFMScheduler.from_config(stock.config, shift=3.0, use_dynamic_shifting=False)
        >>> scheduler.set_timesteps(3)
        >>> [round(s, 3) for s in scheduler.sigmas.tolist()]
        [1.0, 0.857, 0.6, 0.0]

    Args:
        num_train_timesteps: Scale between σ and the ``timesteps`` the pipelines hand to the model (σ·1000).
        shift: Fixed shift s of the sampling grid.
        use_dynamic_shifting: Use Flux's resolution-dependent shift (``mu`` given by the pipeline) instead.
        base_shift: μ at ``base_image_seq_len`` tokens (dynamic shift only).
        max_shift: μ at ``max_image_seq_len`` tokens (dynamic shift only).
        base_image_seq_len: Packed image tokens at which μ = ``base_shift``.
        max_image_seq_len: Packed image tokens at which μ = ``max_shift``.
        max_sigma: The first σ of the grid (1 − 1e-5, as the method's reference sampler).
    """

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: float = 3.0,
        use_dynamic_shifting: bool = False,
        base_shift: float = 0.5,
        max_shift: float = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        max_sigma: float = DEFAULT_MAX_SIGMA,
    ):
        if not 0.0 < max_sigma <= 1.0:
            raise ValueError(f"max_sigma must be in (0, 1], got {max_sigma}.")
        if shift <= 0:
            raise ValueError(f"shift must be > 0, got {shift}.")
        super().__init__(
            num_train_timesteps=num_train_timesteps,
            shift=shift,
            use_dynamic_shifting=use_dynamic_shifting,
            base_shift=base_shift,
            max_shift=max_shift,
            base_image_seq_len=base_image_seq_len,
            max_image_seq_len=max_image_seq_len,
        )

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        sigmas: list[float] | np.ndarray | None = None,
        mu: float | None = None,
        timesteps: list[float] | None = None,
    ) -> None:
        """Build the N-step SCFM grid (``self.sigmas``: N + 1 values ending in 0; ``self.timesteps``: σ·1000).

        Args:
            num_inference_steps: Number of Euler steps N (≥ 1). May be omitted when ``sigmas`` is given.
            device: Device of ``sigmas`` and ``timesteps``.
            sigmas: The unshifted grid ``u`` without its final 0 (what ``FluxPipeline`` passes); the shift is
                applied on top. Defaults to the uniform grid ``linspace(1, 0, N + 1)[:-1]``.
            mu: Flux's μ; required when ``use_dynamic_shifting`` is on, ignored otherwise.
            timesteps: Explicit timesteps (σ·1000, used as given, without shift); left to the parent scheduler.

        Raises:
            ValueError: N < 1, lengths that disagree, or a dynamic shift without ``mu``.
        """
        if num_inference_steps is not None and num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}.")
        if timesteps is not None:
            super().set_timesteps(num_inference_steps, device, sigmas=sigmas, mu=mu, timesteps=timesteps)
            return
        if self.config.use_dynamic_shifting and mu is None:
            raise ValueError(
                "`mu` must be passed when `use_dynamic_shifting=True` (FluxPipeline passes it); "
                "or load the scheduler with use_dynamic_shifting=False for the fixed SCFM shift."
            )
        if sigmas is None:
            if num_inference_steps is None:
                raise ValueError("Pass `num_inference_steps` or `sigmas`.")
            grid = uniform_sigmas(num_inference_steps)[:-1]
        else:
            grid = torch.as_tensor(np.asarray(sigmas), dtype=torch.float64)
            if num_inference_steps is not None and len(grid) != num_inference_steps:
                raise ValueError(f"Got {len(grid)} sigmas for num_inference_steps={num_inference_steps}.")
            if len(grid) < 1:
                raise ValueError("`sigmas` must hold at least one value.")
        grid = dynamic_shift(grid, mu) if self.config.use_dynamic_shifting else fixed_shift(grid, self.shift)
        grid = grid.clamp(max=self.config.max_sigma).to(torch.float32)

        self.num_inference_steps = len(grid)
        self.sigmas = torch.cat([grid, torch.zeros(1)]).to(device)  # N + 1 values, the last one 0
        self.timesteps = (grid * self.config.num_train_timesteps).to(device)  # what the model is called with
        self._step_index = None
        self._begin_index = None
