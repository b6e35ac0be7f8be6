"""The one interface every model family implements: everything model-specific, in one object.

SCFM needs nothing from a model but its velocity field. A :class:`Family` turns a diffusers pipeline into
that field and back: which classes make up the model, where the LoRA goes, how prompts and images are
encoded, how the pipeline's time and velocity map onto the objective's, how a training batch is conditioned
(embedded guidance, CFG), the method's inference defaults, and a tiny offline pipeline for tests.

Time convention of the objective (diffusers'): σ ∈ [0, 1], σ = 1 is noise, ``x_σ = (1 − σ)·x0 + σ·ε``,
velocity ``v = ε − x0``, Euler step ``x_{σ'} = x_σ + (σ' − σ)·v``. A family whose transformer takes another
time (``1000·σ``, ``1 − σ``) or predicts another quantity (``−v``) converts in :meth:`Family.velocity_fn`.

Adding a family is one file with a subclass and one line in :mod:`scfm_diffusers.families` (docs/families.md).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import diffusers
import torch

__all__ = [
    "ConditioningConfig",
    "Family",
    "LoraExperts",
    "VelocityFn",
    "model_dtype",
    "pipeline_samples",
    "present_modules",
]

#: ``fn(x_sigma (B', ...), sigma (B',), rows (B',) long) -> velocity (B', ...)`` in the objective's convention.
#: ``rows`` index the original batch, so the callable can slice per-sample conditioning.
VelocityFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

#: How a family conditions a velocity: ``"none"``, ``"embedded"`` (a guidance input, Flux.1-dev) or ``"cfg"``
#: (every velocity is the CFG combination of a conditional and an empty-prompt pass, SD3).
GuidanceMode = Literal["none", "embedded", "cfg"]


@dataclass(frozen=True)
class ConditioningConfig:
    """How the training batch is conditioned (the script's guidance flags).

    Attributes:
        guidance_range: Embedded guidance ``g ~ U[low, high)`` per sample (Flux.1-dev: [0, 7.5)).
        guidance_scale: One fixed embedded guidance instead of ``guidance_range`` (as in diffusers' scripts).
        cfg_scale: CFG families: ``v = v_u + cfg_scale·(v_c − v_u)`` for the student and every target
            (None: the family's ``default_settings["guidance_scale"]``).
        caption_dropout: Share of rows whose caption is replaced by the empty prompt, for the student and
            every target alike (diffusers' ``--caption_dropout``).
    """

    guidance_range: tuple[float, float] = (0.0, 7.5)
    guidance_scale: float | None = None
    cfg_scale: float | None = None
    caption_dropout: float = 0.0

    def __post_init__(self) -> None:
        low, high = self.guidance_range
        if not 0.0 <= low <= high:
            raise ValueError(f"guidance_range must be 0 <= low <= high, got {self.guidance_range}.")
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1], got {self.caption_dropout}.")


def present_modules(transformer: torch.nn.Module, names: tuple[str, ...] | list[str]) -> list[str]:
    """The names among ``names`` that end some module path of ``transformer`` (peft's suffix match)."""
    modules = [name for name, _ in transformer.named_modules()]
    return [n for n in names if any(m == n or m.endswith("." + n) for m in modules)]


def pipeline_samples(output: Any) -> Any:
    """What a pipeline call made: ``output.images`` of an image pipeline, ``output.frames`` of a video one.

    With ``output_type="pt"`` a tensor ``(B, 3, H, W)`` or ``(B, F, 3, H, W)``; with ``"pil"`` a list of images or
    of frame lists.
    """
    return output.frames if hasattr(output, "frames") else output.images


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype of a (possibly accelerate-wrapped) model's frozen floating weights: inputs are cast to it."""
    module = getattr(model, "module", model)
    floating = [p for p in module.parameters() if p.is_floating_point()]
    return next((p.dtype for p in floating if not p.requires_grad), floating[0].dtype)  # LoRA weights train in fp32


class LoraExperts(torch.nn.Module):
    """Several transformers of one pipeline (a model's experts) trained as ONE module with one set of adapters.

    A subclass names the experts (pipeline components, held as submodules of the same names) and routes each call
    (:meth:`forward`). The rest of the training code sees one module: peft adapters are added to every expert
    alike (the student, the EMAs; the teacher is all adapters disabled), each LoRA tensor's name starts with its
    expert's, and :func:`scfm_diffusers.save_adapter` writes one weights file per expert.

    Attributes:
        weight_names: Pipeline component -> its LoRA weights file in an adapter folder (None: the usual
            ``pytorch_lora_weights.safetensors``).
    """

    weight_names: ClassVar[dict[str, str | None]]

    def experts(self) -> dict[str, torch.nn.Module]:
        """Pipeline component name -> expert, in :attr:`weight_names` order."""
        return {name: getattr(self, name) for name in self.weight_names}

    @property
    def config(self) -> Any:
        """The first expert's config (the experts share their architecture)."""
        return next(iter(self.experts().values())).config

    @property
    def dtype(self) -> torch.dtype:
        """The first expert's dtype."""
        return next(iter(self.experts().values())).dtype

    @property
    def peft_config(self) -> dict:
        """The adapters' configs (the same on every expert)."""
        return next(iter(self.experts().values())).peft_config

    def add_adapter(self, adapter_config: Any, adapter_name: str = "default") -> None:
        """Add the same peft adapter to every expert (each gets its own copy of the config)."""
        for expert in self.experts().values():
            expert.add_adapter(copy.deepcopy(adapter_config), adapter_name=adapter_name)

    def enable_gradient_checkpointing(self) -> None:
        """Gradient checkpointing in every expert."""
        for expert in self.experts().values():
            expert.enable_gradient_checkpointing()

    def enable_xformers_memory_efficient_attention(self) -> None:
        """xformers attention in every expert."""
        for expert in self.experts().values():
            expert.enable_xformers_memory_efficient_attention()


class Family:
    """A flow-matching model family: the glue between a diffusers pipeline and the SCFM objective.

    Subclasses set the class attributes and override the methods that differ; instances are stateless and
    live in :data:`scfm_diffusers.families.FAMILIES`.

    Attributes:
        name: Registry key, stored in adapter settings (``"flux"``, ``"sd3"``, ...).
        pipeline_class_name: The stock diffusers pipeline class (its name, resolved lazily so that a
            diffusers without it still imports this package).
        transformer_class_name: The diffusers transformer class that identifies the family.
        other_pipeline_class_names: Further ``model_index.json`` ``_class_name`` values of the family.
        text_encoder_names: Pipeline components that encode prompts (freed after caching).
        lora_targets: Module names the LoRA goes on (those the transformer has are used).
        guidance: ``"none"``, ``"embedded"`` or ``"cfg"`` (see :data:`GuidanceMode`).
        lora_scale_kwarg: The pipeline ``__call__`` argument whose ``"scale"`` scales LoRAs.
        default_settings: Inference defaults: ``num_inference_steps``, ``shift``, ``guidance_scale`` (embedded
            guidance or CFG scale) and ``lora_scale``.
        max_grad_norm: Gradient-norm clip of the reference code.
        dynamic_shift_prob: Share of training grids with the resolution-dependent shift.
        latent_patch: Pixels of one latent token edge = VAE factor × transformer patch (resolution multiple).
        tiny_resolution: Image size that gives the tiny pipeline of :meth:`tiny_pipeline` ~256 latent tokens
            (its VAE does not downsample).
        gradient_checkpointing_issue: Why ``--gradient_checkpointing`` must not be used with this family (a
            diffusers bug that changes the model's output under checkpointing), or None.
        modality: ``"image"`` or ``"video"`` (the pipeline takes ``num_frames`` and returns ``frames``).
        frame_multiple: Video: ``num_frames`` must be ``frame_multiple·k + 1`` (the VAE's time compression).
        tiny_num_frames: Video: frames of the tiny pipeline's clips in tests.
    """

    name: ClassVar[str]
    pipeline_class_name: ClassVar[str]
    transformer_class_name: ClassVar[str]
    other_pipeline_class_names: ClassVar[tuple[str, ...]] = ()
    text_encoder_names: ClassVar[tuple[str, ...]] = ("text_encoder",)
    lora_targets: ClassVar[tuple[str, ...]]
    guidance: ClassVar[GuidanceMode] = "none"
    lora_scale_kwarg: ClassVar[str] = "joint_attention_kwargs"
    default_settings: ClassVar[dict[str, float | int]]
    max_grad_norm: ClassVar[float] = 1.0
    dynamic_shift_prob: ClassVar[float] = 0.0
    latent_patch: ClassVar[int] = 16
    tiny_resolution: ClassVar[int] = 32
    gradient_checkpointing_issue: ClassVar[str | None] = None
    modality: ClassVar[Literal["image", "video"]] = "image"
    frame_multiple: ClassVar[int | None] = None
    tiny_num_frames: ClassVar[int | None] = None

    # ---------------------------------------------------------------------------------------------------
    # Classes
    # ---------------------------------------------------------------------------------------------------
    @property
    def available(self) -> bool:
        """Whether the installed diffusers has this family's pipeline and transformer classes."""
        return hasattr(diffusers, self.pipeline_class_name) and hasattr(diffusers, self.transformer_class_name)

    def _diffusers_class(self, name: str) -> type:
        if not hasattr(diffusers, name):
            raise ImportError(
                f"The {self.name} family needs diffusers.{name}, which diffusers {diffusers.__version__} lacks: "
                f"upgrade diffusers (pip install -U diffusers)."
            )
        return getattr(diffusers, name)

    @property
    def pipeline_class(self) -> type:
        """The stock diffusers pipeline class."""
        return self._diffusers_class(self.pipeline_class_name)

    @property
    def transformer_class(self) -> type:
        """The diffusers transformer class."""
        return self._diffusers_class(self.transformer_class_name)

    @property
    def pipeline_class_names(self) -> tuple[str, ...]:
        """``_class_name`` values in ``model_index.json`` that belong to the family (stock and SCFM)."""
        return (self.pipeline_class_name, f"SCFM{self.pipeline_class_name}", *self.other_pipeline_class_names)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}: {self.pipeline_class_name}>"

    @property
    def grid_defaults(self) -> dict[str, float | int]:
        """The objective's grid settings this family changes from the method's (``GridSamplerConfig`` fields):
        the share of resolution-dependent shifts and, for a family whose scheduler differs from Flux's, its
        dynamic-shift constants."""
        return {"dynamic_shift_prob": self.dynamic_shift_prob}

    @property
    def output_name(self) -> str:
        """The pipeline output's field: ``"images"``, or ``"frames"`` for video."""
        return "frames" if self.modality == "video" else "images"

    def frame_kwargs(self, num_frames: int | None) -> dict[str, int]:
        """Pipeline ``__call__`` arguments for ``num_frames`` (``{}`` for an image family or None)."""
        if self.modality != "video" or num_frames is None:
            return {}
        self.check_num_frames(num_frames)
        return {"num_frames": num_frames}

    def check_num_frames(self, num_frames: int) -> None:
        """Refuse a frame count this family cannot encode (an image family takes one frame)."""
        if self.modality == "image" and num_frames != 1:
            raise ValueError(
                f"{self.name} is an image model family: it takes no --num_frames (got {num_frames}). Train a video "
                "family (wan) on clips, or leave --num_frames out for images."
            )

    def trained_module(self, pipeline: Any) -> torch.nn.Module:
        """The module training puts the LoRA on: ``pipeline.transformer``, or a :class:`LoraExperts` of several."""
        return pipeline.transformer

    # ---------------------------------------------------------------------------------------------------
    # LoRA
    # ---------------------------------------------------------------------------------------------------
    def lora_target_modules(self, transformer: torch.nn.Module) -> list[str]:
        """The reference LoRA targets that this transformer has (e.g. no guidance embedder in schnell)."""
        targets = present_modules(transformer, self.lora_targets)
        if not targets:
            raise ValueError(f"None of the {self.name} LoRA targets {list(self.lora_targets)} exist in this model.")
        return targets

    # ---------------------------------------------------------------------------------------------------
    # Text and images
    # ---------------------------------------------------------------------------------------------------
    def encode_prompts(
        self, pipeline: Any, prompts: list[str], max_sequence_length: int, device: torch.device | None = None
    ) -> dict[str, torch.Tensor]:
        """Per-caption text tensors ``{key: (B, ...)}`` of one fixed shape per key (padded, with a mask where
        the model takes one), so that they cache and batch; floating tensors in float32, masks in their dtype."""
        raise NotImplementedError

    def pipeline_text_kwargs(
        self, text: dict[str, torch.Tensor], uncond: dict[str, torch.Tensor], **to: Any
    ) -> dict[str, Any]:
        """Pipeline ``__call__`` arguments that condition on cached ``text`` (validation, calibration).

        The default suits a family whose text is one ``prompt_embeds`` tensor: those, and the empty prompt's as
        ``negative_prompt_embeds`` (the negative of the pipeline's CFG, as in training). Override it for other
        text tensors (masks, pooled embeddings) or another layout.

        Args:
            text: Tensors from :meth:`encode_prompts` (batch B).
            uncond: The same for the empty prompt (batch 1), for CFG families.
            **to: ``device`` / ``dtype`` for the floating tensors.
        """
        n = len(text["prompt_embeds"])
        return {
            "prompt_embeds": text["prompt_embeds"].to(**to),
            "negative_prompt_embeds": uncond["prompt_embeds"].expand(n, -1, -1).to(**to),
        }

    def encode_images(
        self, vae: torch.nn.Module, pixels: torch.Tensor, generator: torch.Generator | list | None = None
    ) -> torch.Tensor:
        """VAE latents in the transformer's space: ``(z − shift_factor)·scaling_factor`` (override for other
        normalisations).

        Args:
            vae: The pipeline's VAE.
            pixels: ``(B, 3, H, W)`` in [-1, 1].
            generator: For the posterior sample: one, or one per row (each row's noise then depends only on
                its own generator).

        Returns:
            ``(B, C, H/f, W/f)`` float32 latents (the shape the cache stores).
        """
        pixels = pixels.to(device=vae.device, dtype=vae.dtype)
        latents = vae.encode(pixels).latent_dist.sample(generator=generator).float()
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * vae.config.scaling_factor

    def to_model_space(self, latents: torch.Tensor) -> torch.Tensor:
        """Cached latents ``(B, C, h, w)`` → the tensor the transformer denoises (x0 of the objective)."""
        return latents

    def pipeline_latents_to_model_space(self, vae: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
        """The pipeline's ``output_type="latent"`` result → model space (the layout of ``latents=``).

        The identity for pipelines that return the latents in the layout they take; a pipeline that returns
        de-normalised or unpacked VAE latents (Flux.2) maps them back.
        """
        return latents

    def image_seq_len(self, latents: torch.Tensor) -> int:
        """Image tokens of one sample, for the resolution-dependent shift (2×2 patches)."""
        return latents.shape[-2] * latents.shape[-1] // 4

    # ---------------------------------------------------------------------------------------------------
    # Velocity and conditioning
    # ---------------------------------------------------------------------------------------------------
    def sample_conditioning(
        self, transformer: torch.nn.Module, n: int, config: ConditioningConfig, generator: torch.Generator
    ) -> dict[str, Any]:
        """Per-batch conditioning options for :meth:`velocity_fn` (the same for the student and every target).

        Embedded guidance draws ``g ~ U[guidance_range)`` per sample (or the fixed ``guidance_scale``) when the
        transformer has a guidance embedding; CFG families get their ``cfg_scale``.
        """
        if self.guidance == "cfg":
            return {"cfg_scale": self.training_cfg_scale(config)}
        if self.guidance == "embedded" and getattr(transformer.config, "guidance_embeds", False):
            low, high = config.guidance_range if config.guidance_scale is None else (config.guidance_scale,) * 2
            return {"guidance": low + (high - low) * torch.rand(n, generator=generator)}
        return {}

    def training_cfg_scale(self, config: ConditioningConfig) -> float:
        """The CFG scale of every training velocity of a CFG family."""
        return float(config.cfg_scale if config.cfg_scale is not None else self.default_settings["guidance_scale"])

    def adapter_guidance_scale(self, config: ConditioningConfig) -> float:
        """The ``guidance_scale`` an adapter is sampled with by default: a CFG student keeps its training CFG."""
        if self.guidance == "cfg":
            return self.training_cfg_scale(config)
        return float(self.default_settings["guidance_scale"])

    def fill_guidance(self, arguments: dict[str, Any], guidance_scale: float) -> None:
        """Put the adapter's guidance into a pipeline call's ``arguments`` where the caller set none.

        Most pipelines take embedded guidance or CFG as ``guidance_scale``; a family whose pipeline names it
        otherwise (Qwen-Image's ``true_cfg_scale`` with a negative prompt) overrides this.
        """
        if arguments.get("guidance_scale") is None:
            arguments["guidance_scale"] = guidance_scale

    def velocity_fn(
        self,
        model: Callable[..., Any],
        text: dict[str, torch.Tensor],
        latent_shape: tuple[int, ...],
        *,
        uncond: dict[str, torch.Tensor],
        **options: Any,
    ) -> VelocityFn:
        """A :data:`VelocityFn` that calls ``model`` (one adapter setting) with the batch's conditioning.

        Args:
            model: The transformer (or its accelerate/DDP wrapper).
            text: The batch's text tensors (from :meth:`encode_prompts`, on the device).
            latent_shape: Shape of the cached latents ``(B, C, h, w)`` of the batch.
            uncond: Empty-prompt text tensors (batch 1) for CFG families.
            **options: From :meth:`sample_conditioning`.

        Returns:
            ``fn(x_σ, σ, rows)``: x in model space (:meth:`to_model_space`), σ in the objective's convention,
            the velocity ``ε − x0`` as float32.
        """
        raise NotImplementedError

    # ---------------------------------------------------------------------------------------------------
    # Tests
    # ---------------------------------------------------------------------------------------------------
    def tiny_pipeline(self, config: Any = None, *, pipeline_class: type | None = None) -> Any:
        """A tiny real pipeline of this family with random weights, built offline (tests, benchmarks, demo).

        Args:
            config: A :class:`scfm_diffusers.testing.TinyModelConfig` (None: diffusers' test sizes).
            pipeline_class: Build this subclass of the stock pipeline instead (e.g. the SCFM one).
        """
        raise NotImplementedError
