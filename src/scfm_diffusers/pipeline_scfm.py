"""SCFM pipelines: thin subclasses of diffusers' Flux and SD3 pipelines that sample with an SCFM adapter.

The subclasses change defaults and the scheduler only; denoising is diffusers' own ``__call__``.
"""

from __future__ import annotations

import os
from typing import Any

from diffusers import DiffusionPipeline, FluxPipeline, StableDiffusion3Pipeline

from .adapter import SCFMInferenceSettings, load_adapter_settings
from .families import FAMILIES, family_of_class_name, family_of_pipeline
from .scheduling_flow_match_scfm import FlowMatchSCFMScheduler

__all__ = ["SCFMFluxPipeline", "SCFMPipeline", "SCFMPipelineMixin", "SCFMStableDiffusion3Pipeline"]

SCFM_ADAPTER_NAME = "scfm"


class SCFMPipelineMixin:
    """Shared behaviour of the SCFM pipelines: adapter loading, settings as call defaults, the SCFM scheduler.

    ``pipe(prompt)`` uses the adapter's steps, shift, guidance and LoRA scale; each can be overridden per call
    (``num_inference_steps=``, ``shift=``, ``guidance_scale=``, ``lora_scale=``). ``lora_scale`` goes through
    diffusers' ``joint_attention_kwargs={"scale": ...}``, so it scales every LoRA loaded on the transformer.
    """

    _scfm_settings: SCFMInferenceSettings | None = None

    @property
    def scfm_settings(self) -> SCFMInferenceSettings:
        """The settings in force: the loaded adapter's, or the method's defaults for this family."""
        if self._scfm_settings is None:
            self._scfm_settings = SCFMInferenceSettings.for_family(family_of_pipeline(self).name)
        return self._scfm_settings

    def set_scfm_settings(self, settings: SCFMInferenceSettings | None = None, **overrides: Any) -> None:
        """Replace the default settings (validated) and install the matching :class:`FlowMatchSCFMScheduler`."""
        settings = (settings or self.scfm_settings).replace(**overrides)
        family = family_of_pipeline(self)
        if settings.family != family.name:
            raise ValueError(f"These settings are for {settings.family!r} but this is a {family.name} pipeline.")
        self._scfm_settings = settings
        self.scheduler = settings.make_scheduler(self.scheduler.config)

    def load_scfm_adapter(
        self,
        adapter: str | os.PathLike,
        *,
        adapter_name: str = SCFM_ADAPTER_NAME,
        revision: str | None = None,
        token: str | None = None,
        **overrides: Any,
    ) -> None:
        """Load an SCFM adapter (local folder or Hub id): LoRA weights plus its settings and scheduler.

        Args:
            adapter: Adapter folder or Hub repository id.
            adapter_name: peft adapter name for the LoRA on the transformer.
            revision: Hub revision.
            token: Hub token.
            **overrides: Settings to change from the adapter's (e.g. ``num_inference_steps=4``).
        """
        settings = load_adapter_settings(adapter, revision=revision, token=token)
        self.set_scfm_settings(settings, **overrides)  # checks the family before touching the weights
        self.load_lora_weights(adapter, adapter_name=adapter_name, revision=revision, token=token)

    def __call__(
        self,
        *args: Any,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        shift: float | None = None,
        lora_scale: float | None = None,
        **kwargs: Any,
    ):
        """Run the parent pipeline with the SCFM settings as defaults; see the parent for all arguments.

        Args:
            num_inference_steps: Euler steps (default: the adapter's).
            guidance_scale: Flux embedded guidance / SD3 CFG scale (default: the adapter's).
            shift: Fixed shift of the σ grid for this call (default: the adapter's).
            lora_scale: LoRA strength for this call (default: the adapter's).
        """
        settings = self.scfm_settings
        if not isinstance(self.scheduler, FlowMatchSCFMScheduler):
            self.scheduler = settings.make_scheduler(self.scheduler.config)
        num_inference_steps = settings.num_inference_steps if num_inference_steps is None else num_inference_steps
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}.")
        guidance_scale = settings.guidance_scale if guidance_scale is None else guidance_scale
        lora_scale = settings.lora_scale if lora_scale is None else lora_scale
        attention_kwargs = dict(kwargs.pop("joint_attention_kwargs", None) or {})
        attention_kwargs.setdefault("scale", lora_scale)

        saved_shift = self.scheduler.shift
        if shift is not None:
            if shift <= 0:
                raise ValueError(f"shift must be > 0, got {shift}.")
            self.scheduler.set_shift(shift)
        try:
            return super().__call__(
                *args,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                joint_attention_kwargs=attention_kwargs,
                **kwargs,
            )
        finally:
            self.scheduler.set_shift(saved_shift)


class SCFMFluxPipeline(SCFMPipelineMixin, FluxPipeline):
    """:class:`~diffusers.FluxPipeline` sampling an SCFM adapter in few steps (embedded guidance, no true CFG).

    Example:
        >>> from scfm_diffusers import SCFMFluxPipeline
        >>> from scfm_diffusers.testing import tiny_flux_pipeline
        >>> pipe = SCFMFluxPipeline.from_pipe(tiny_flux_pipeline())
        >>> pipe("a cat", height=32, width=32, output_type="pt").images.shape[0]  # 4 steps, shift 3.25
        1
    """


class SCFMStableDiffusion3Pipeline(SCFMPipelineMixin, StableDiffusion3Pipeline):
    """:class:`~diffusers.StableDiffusion3Pipeline` sampling an SCFM adapter (the student keeps CFG)."""


SCFM_PIPELINE_CLASSES: dict[str, type] = {"flux": SCFMFluxPipeline, "sd3": SCFMStableDiffusion3Pipeline}
assert set(SCFM_PIPELINE_CLASSES) == set(FAMILIES), "every family needs an SCFM pipeline class"


class SCFMPipeline:
    """Entry point that picks the SCFM pipeline of the right family (like diffusers' ``AutoPipeline``).

    Example::

        pipe = SCFMPipeline.from_pretrained("black-forest-labs/FLUX.1-dev", adapter="org/flux-scfm-3step",
                                            torch_dtype=torch.bfloat16).to("cuda")
        image = pipe("a photo of a cat").images[0]   # the adapter's steps, shift, guidance and LoRA scale
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise OSError("SCFMPipeline is not instantiated directly; use SCFMPipeline.from_pretrained or from_pipe.")

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *,
        adapter: str | os.PathLike | None = None,
        adapter_name: str = SCFM_ADAPTER_NAME,
        settings: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> SCFMFluxPipeline | SCFMStableDiffusion3Pipeline:
        """Load a Flux or SD3 base model and, optionally, an SCFM adapter on it.

        Args:
            pretrained_model_name_or_path: Base model folder or Hub id (a diffusers pipeline).
            adapter: SCFM adapter folder or Hub id; its settings become the call defaults.
            adapter_name: peft adapter name for the LoRA.
            settings: Overrides of the adapter's settings (e.g. ``{"num_inference_steps": 4}``).
            **kwargs: Passed to diffusers' ``from_pretrained`` (``torch_dtype``, ``revision``, ...).

        Raises:
            ValueError: The base model is not a Flux or SD3 pipeline, or the adapter is for the other family.
        """
        config = DiffusionPipeline.load_config(
            pretrained_model_name_or_path,
            **{k: kwargs[k] for k in ("revision", "token", "cache_dir") if k in kwargs},
        )
        family = family_of_class_name(config.get("_class_name", "<no _class_name>"))
        pipeline_class = SCFM_PIPELINE_CLASSES[family.name]
        adapter_settings = None
        if adapter is not None:
            adapter_settings = load_adapter_settings(adapter, token=kwargs.get("token"))
            if adapter_settings.family != family.name:
                raise ValueError(
                    f"The adapter is for {adapter_settings.family!r} but {pretrained_model_name_or_path!s} is a "
                    f"{family.name} model."
                )
        pipe = pipeline_class.from_pretrained(pretrained_model_name_or_path, **kwargs)
        if adapter is not None:
            pipe.load_scfm_adapter(adapter, adapter_name=adapter_name, token=kwargs.get("token"), **(settings or {}))
        elif settings:
            pipe.set_scfm_settings(**settings)
        return pipe

    @classmethod
    def from_pipe(
        cls,
        pipeline: DiffusionPipeline,
        *,
        adapter: str | os.PathLike | None = None,
        adapter_name: str = SCFM_ADAPTER_NAME,
        **settings: Any,
    ) -> SCFMFluxPipeline | SCFMStableDiffusion3Pipeline:
        """Wrap the components of a loaded stock pipeline (no copy of the weights) as an SCFM pipeline.

        The components are shared: an adapter loaded here is also on ``pipeline``'s transformer.
        """
        family = family_of_pipeline(pipeline)
        pipe = SCFM_PIPELINE_CLASSES[family.name].from_pipe(pipeline)
        if adapter is not None:
            pipe.load_scfm_adapter(adapter, adapter_name=adapter_name, **settings)
        elif settings:
            pipe.set_scfm_settings(**settings)
        return pipe
