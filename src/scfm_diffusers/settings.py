"""SCFMInferenceSettings: how an SCFM adapter is meant to be sampled (``scfm_settings.json`` of an adapter).

Steps, shift, guidance and LoRA scale (one per step count once calibrated), the base model's Hub id and a
record of the training run; validated on construction, and the default of every SCFM pipeline call.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from .families import FAMILIES, get_family
from .scheduling_flow_match_scfm import FlowMatchSCFMScheduler

__all__ = ["MAX_INFERENCE_STEPS", "SCFMInferenceSettings"]

#: Most sampling steps settings may name: the schedulers' 1000 training timesteps (SCFM adapters sample in 3-8).
MAX_INFERENCE_STEPS = 1000


@dataclass
class SCFMInferenceSettings:
    """How an SCFM adapter is meant to be sampled. Every field can be overridden per pipeline call.

    Attributes:
        family: Model family the adapter belongs to (``"flux"`` or ``"sd3"``).
        num_inference_steps: Euler steps N the student was distilled for (3–8 typically).
        shift: Fixed shift of the sampling grid (Flux 3.25, SD3 3.0 in the method's reference sampler).
        use_dynamic_shifting: Use Flux's resolution-dependent shift instead of ``shift``.
        guidance_scale: Flux: embedded guidance; SD3: classifier-free guidance scale.
        lora_scale: Strength of the LoRA at inference (the authors advise 1.0–1.75, higher for fewer steps);
            used for step counts that ``lora_scales`` does not list.
        lora_scales: ``{step count: LoRA scale}`` calibrated after training
            (:func:`~scfm_diffusers.calibration.calibrate_lora_scales`); see :meth:`lora_scale_for`.
        base_model: Hub id or path of the base model the adapter was trained on.
        training: Free-form record of the training run (shown in the model card).
        expert_weights: Further pipeline components that carry a LoRA of their own, each with its weights file
            in the adapter folder (Wan 2.2: ``{"transformer_2": "pytorch_lora_weights_transformer_2.safetensors"}``);
            ``transformer``'s is always ``pytorch_lora_weights.safetensors``.
    """

    family: str
    num_inference_steps: int = 4
    shift: float = 3.0
    use_dynamic_shifting: bool = False
    guidance_scale: float = 3.5
    lora_scale: float = 1.0
    lora_scales: dict[int, float] = field(default_factory=dict)
    base_model: str | None = None
    training: dict[str, Any] = field(default_factory=dict)
    expert_weights: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        get_family(self.family)  # raises for unknown families
        if isinstance(self.num_inference_steps, bool) or not isinstance(self.num_inference_steps, int):
            raise TypeError(f"num_inference_steps must be an int, got {self.num_inference_steps!r}.")
        if not 1 <= self.num_inference_steps <= MAX_INFERENCE_STEPS:
            raise ValueError(
                f"num_inference_steps must be >= 1 and <= {MAX_INFERENCE_STEPS} (an SCFM adapter samples in 3-8), "
                f"got {self.num_inference_steps}."
            )
        for name in ("shift", "guidance_scale", "lora_scale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"{name} must be a number, got {value!r}.")
            setattr(self, name, float(value))
        if not (math.isfinite(self.shift) and self.shift > 0):
            raise ValueError(f"shift must be a finite number > 0, got {self.shift}.")
        for name in ("guidance_scale", "lora_scale"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self, name)}.")
        if not isinstance(self.lora_scales, dict):
            raise TypeError(f"lora_scales must be a dict {{step count: scale}}, got {self.lora_scales!r}.")
        scales = {}
        for steps, scale in self.lora_scales.items():  # JSON keys are strings
            if isinstance(scale, bool) or not isinstance(scale, int | float) or not str(steps).isdigit():
                raise TypeError(f"lora_scales maps step counts to numbers, got {steps!r}: {scale!r}.")
            if not 1 <= int(steps) <= MAX_INFERENCE_STEPS or not math.isfinite(scale) or scale < 0:
                raise ValueError(
                    f"lora_scales needs step counts >= 1 and <= {MAX_INFERENCE_STEPS} and finite scales >= 0, "
                    f"got {steps!r}: {scale!r}."
                )
            scales[int(steps)] = float(scale)
        self.lora_scales = dict(sorted(scales.items()))
        if not isinstance(self.use_dynamic_shifting, bool):
            raise TypeError(f"use_dynamic_shifting must be a bool, got {self.use_dynamic_shifting!r}.")
        if self.base_model is not None and not isinstance(self.base_model, str):
            raise TypeError(f"base_model must be a string or None, got {self.base_model!r}.")
        if not isinstance(self.training, dict):
            raise TypeError(f"training must be a dict, got {self.training!r}.")
        if not isinstance(self.expert_weights, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and v.endswith(".safetensors") and "/" not in v
            for k, v in self.expert_weights.items()
        ):
            raise TypeError(
                f"expert_weights maps pipeline components to .safetensors file names in the adapter folder, got "
                f"{self.expert_weights!r}."
            )

    def lora_scale_for(self, num_inference_steps: int) -> float:
        """The LoRA scale for a step count: the calibrated one (``lora_scales``), else ``lora_scale``.

        Example:
            >>> settings = SCFMInferenceSettings("flux", lora_scale=1.0, lora_scales={3: 1.4, 8: 1.1})
            >>> settings.lora_scale_for(3), settings.lora_scale_for(5)
            (1.4, 1.0)
        """
        return self.lora_scales.get(int(num_inference_steps), self.lora_scale)

    @classmethod
    def for_family(cls, family: str, **overrides: Any) -> SCFMInferenceSettings:
        """Settings with the method's defaults for ``family``, updated by ``overrides``."""
        return cls.from_dict({"family": family, **get_family(family).default_settings, **overrides})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SCFMInferenceSettings:
        """Build settings from a dict, rejecting unknown keys with the list of known ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown SCFM settings keys {unknown}; known keys are {sorted(known)}.")
        if "family" not in data:
            raise ValueError(f"SCFM settings need a 'family' (one of {sorted(FAMILIES)}).")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (``lora_scales`` keys as strings, as JSON writes them)."""
        data = dataclasses.asdict(self)
        data["lora_scales"] = {str(steps): scale for steps, scale in self.lora_scales.items()}
        return data

    def replace(self, **overrides: Any) -> SCFMInferenceSettings:
        """A copy with some fields changed (validated again)."""
        return self.from_dict({**self.to_dict(), **overrides})

    def make_scheduler(self, base_config: dict | None = None) -> FlowMatchSCFMScheduler:
        """The scheduler these settings describe, optionally on top of a stock scheduler's config."""
        overrides = {"shift": self.shift, "use_dynamic_shifting": self.use_dynamic_shifting}
        if base_config is None:
            return FlowMatchSCFMScheduler(**overrides)
        return FlowMatchSCFMScheduler.from_config(base_config, **overrides)
