"""Model-family glue for training: text/image encoding, model-space latents and velocity callables.

Time convention (diffusers): σ ∈ [0, 1], σ = 1 is noise, ``x_σ = (1 − σ)·x0 + σ·ε``, ``v = ε − x0``.
The Flux transformer is called with ``timestep=σ`` (it scales by 1000 inside) and, when it has a guidance
embedding (Flux.1-dev), ``guidance=g``; the SD3 transformer is called with ``timestep=σ·1000`` and every
velocity is the CFG combination ``v = v_u + w·(v_c − v_u)`` of a conditional and an empty-prompt pass (one
batched forward, so both halves carry gradient for the student).

Each family is a :class:`TrainingFamily` in the :data:`TRAINING_FAMILIES` registry; the training loop only
calls its methods, never branches on the family name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import FluxPipeline

from ..families import get_family
from .objective import VelocityFn

__all__ = [
    "TRAINING_FAMILIES",
    "FluxTraining",
    "SD3Training",
    "TrainingFamily",
    "encode_images",
    "get_training_family",
]

_ATTENTION = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
_FEED_FORWARD = ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]
_EMBEDDERS = [
    "time_text_embed.timestep_embedder.linear_1",
    "time_text_embed.timestep_embedder.linear_2",
    "time_text_embed.text_embedder.linear_1",
    "time_text_embed.text_embedder.linear_2",
    "time_text_embed.guidance_embedder.linear_1",
    "time_text_embed.guidance_embedder.linear_2",
    "context_embedder",
]


def encode_images(
    vae, pixels: torch.Tensor, generator: torch.Generator | list[torch.Generator] | None = None
) -> torch.Tensor:
    """VAE latents in the transformer's space: ``(z − shift_factor)·scaling_factor``.

    Args:
        vae: diffusers ``AutoencoderKL``.
        pixels: ``(B, 3, H, W)`` in [-1, 1].
        generator: For the posterior sample: one, or one per row (then each row's noise depends on its
            generator only, not on the batch it is in).

    Returns:
        ``(B, C, H/f, W/f)`` float32 latents.
    """
    pixels = pixels.to(device=vae.device, dtype=vae.dtype)
    latents = vae.encode(pixels).latent_dist.sample(generator=generator).float()
    shift = vae.config.shift_factor or 0.0
    return (latents - shift) * vae.config.scaling_factor


def _present(transformer: torch.nn.Module, names: list[str]) -> list[str]:
    """The names among ``names`` that end some module path of ``transformer`` (peft's suffix match)."""
    modules = [name for name, _ in transformer.named_modules()]
    return [n for n in names if any(m == n or m.endswith("." + n) for m in modules)]


@dataclass
class TrainingFamily:
    """What the SCFM training loop needs to know about one model family.

    Attributes:
        name: Family key (see :mod:`scfm_diffusers.families`).
        lora_targets: Module names the LoRA is put on (the method's reference choice).
        max_grad_norm: Gradient-norm clip of the reference code.
        dynamic_shift_prob: Share of grids with the resolution-dependent shift (Flux only).
        inference_guidance_scale: ``guidance_scale`` the adapter is sampled with (stored in its settings).
    """

    name: str
    lora_targets: list[str]
    max_grad_norm: float
    dynamic_shift_prob: float
    inference_guidance_scale: float
    text_keys: tuple[str, ...] = field(default=())

    @property
    def pipeline_class(self):
        return get_family(self.name).pipeline_class

    def lora_target_modules(self, transformer: torch.nn.Module) -> list[str]:
        """The reference LoRA targets that this transformer has (e.g. no guidance embedder in schnell)."""
        targets = _present(transformer, self.lora_targets)
        if not targets:
            raise ValueError(f"None of the {self.name} LoRA targets {self.lora_targets} exist in this transformer.")
        return targets

    def encode_prompts(
        self, pipeline, prompts: list[str], max_sequence_length: int, device: torch.device | None = None
    ) -> dict[str, torch.Tensor]:
        """Per-sample text tensors ``{key: (B, ...)}`` for :attr:`text_keys`, computed on ``device``."""
        raise NotImplementedError

    def to_model_space(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE latents ``(B, C, H, W)`` → the tensor the transformer denoises (x0 of the objective)."""
        return latents

    def image_seq_len(self, latents: torch.Tensor) -> int:
        """Image tokens of one sample (for the resolution-dependent shift)."""
        return latents.shape[-2] * latents.shape[-1] // 4

    def velocity_fn(
        self, model: Callable, text: dict[str, torch.Tensor], latent_shape: tuple[int, ...], **options
    ) -> VelocityFn:
        """A :data:`VelocityFn` calling ``model`` (one adapter setting) with the batch's conditioning."""
        raise NotImplementedError

    def adapter_guidance_scale(self, cfg_scale: float) -> float:
        """The ``guidance_scale`` an adapter is sampled with by default (Flux: embedded guidance)."""
        return self.inference_guidance_scale

    def pipeline_text_kwargs(
        self, text: dict[str, torch.Tensor], uncond: dict[str, torch.Tensor], **to: Any
    ) -> dict[str, Any]:
        """Pipeline ``__call__`` arguments that condition on cached ``text`` (e.g. for validation images).

        Args:
            text: ``{"prompt_embeds": (B, L, D), "pooled_prompt_embeds": (B, D')}``.
            uncond: The same for the empty prompt (batch 1), for families that use it.
            **to: ``device`` / ``dtype`` for the tensors.
        """
        return {
            "prompt_embeds": text["prompt_embeds"].to(**to),
            "pooled_prompt_embeds": text["pooled_prompt_embeds"].to(**to),
        }


class FluxTraining(TrainingFamily):
    """Flux: packed 2×2 latents, positional ids, optional guidance embedding sampled per sample."""

    def encode_prompts(self, pipeline, prompts, max_sequence_length, device=None):
        prompt_embeds, pooled, _ = pipeline.encode_prompt(
            prompt=prompts, prompt_2=None, max_sequence_length=max_sequence_length, device=device
        )
        return {"prompt_embeds": prompt_embeds.float(), "pooled_prompt_embeds": pooled.float()}

    def to_model_space(self, latents):
        batch, channels, height, width = latents.shape
        return FluxPipeline._pack_latents(latents, batch, channels, height, width)

    def velocity_fn(self, model, text, latent_shape, *, guidance: torch.Tensor | None = None, **_):
        _, _, height, width = latent_shape
        embeds, pooled = text["prompt_embeds"], text["pooled_prompt_embeds"]
        img_ids = FluxPipeline._prepare_latent_image_ids(None, height // 2, width // 2, embeds.device, embeds.dtype)
        txt_ids = torch.zeros(embeds.shape[1], 3, device=embeds.device, dtype=embeds.dtype)

        def velocity(x, sigma, rows):
            dtype = _model_dtype(model)
            return model(
                hidden_states=x.to(dtype),
                timestep=sigma.to(dtype),
                guidance=None if guidance is None else guidance[rows].to(dtype),
                pooled_projections=pooled[rows].to(dtype),
                encoder_hidden_states=embeds[rows].to(dtype),
                txt_ids=txt_ids,
                img_ids=img_ids,
                return_dict=False,
            )[0]

        return velocity


class SD3Training(TrainingFamily):
    """SD3 / SD3.5: explicit CFG with the empty prompt in every velocity; ``timestep = σ·1000``."""

    def adapter_guidance_scale(self, cfg_scale: float) -> float:
        """The student keeps CFG: it is sampled with the CFG scale it was trained with."""
        return cfg_scale

    def pipeline_text_kwargs(self, text, uncond, **to):
        """CFG against the empty prompt, as in training."""
        n = len(text["prompt_embeds"])
        return {
            **super().pipeline_text_kwargs(text, uncond, **to),
            "negative_prompt_embeds": uncond["prompt_embeds"].expand(n, -1, -1).to(**to),
            "negative_pooled_prompt_embeds": uncond["pooled_prompt_embeds"].expand(n, -1).to(**to),
        }

    def encode_prompts(self, pipeline, prompts, max_sequence_length, device=None):
        prompt_embeds, _, pooled, _ = pipeline.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            device=device,
            do_classifier_free_guidance=False,
            max_sequence_length=max_sequence_length,
        )
        return {"prompt_embeds": prompt_embeds.float(), "pooled_prompt_embeds": pooled.float()}

    def velocity_fn(self, model, text, latent_shape, *, uncond: dict[str, torch.Tensor], cfg_scale: float, **_):
        embeds, pooled = text["prompt_embeds"], text["pooled_prompt_embeds"]
        null_embeds, null_pooled = uncond["prompt_embeds"], uncond["pooled_prompt_embeds"]

        def velocity(x, sigma, rows):
            dtype, n = _model_dtype(model), len(rows)
            out = model(
                hidden_states=torch.cat([x, x]).to(dtype),
                timestep=torch.cat([sigma, sigma]).to(dtype) * 1000,
                encoder_hidden_states=torch.cat([embeds[rows], null_embeds.expand(n, -1, -1)]).to(dtype),
                pooled_projections=torch.cat([pooled[rows], null_pooled.expand(n, -1)]).to(dtype),
                return_dict=False,
            )[0]
            cond, null = out.float().chunk(2)
            return null + cfg_scale * (cond - null)  # diffusers' CFG: v_c + (cfg_scale − 1)·(v_c − v_u)

        return velocity


def _model_dtype(model) -> torch.dtype:
    module = getattr(model, "module", model)
    return next(p.dtype for p in module.parameters() if p.is_floating_point() and not p.requires_grad)


TRAINING_FAMILIES: dict[str, TrainingFamily] = {
    "flux": FluxTraining(
        name="flux",
        lora_targets=[
            *_ATTENTION,
            *_FEED_FORWARD,
            "proj_mlp",
            "proj_out",
            "norm1.linear",
            "norm1_context.linear",
            "norm.linear",
            "norm_out.linear",
            "x_embedder",
            *_EMBEDDERS,
        ],
        max_grad_norm=10.0,
        dynamic_shift_prob=0.1,
        inference_guidance_scale=3.5,
        text_keys=("prompt_embeds", "pooled_prompt_embeds"),
    ),
    "sd3": SD3Training(
        name="sd3",
        lora_targets=[
            *_ATTENTION,
            *_FEED_FORWARD,
            "norm1.linear",
            "norm1_context.linear",
            "norm_out.linear",
            "proj_out",
            "pos_embed.proj",
            *_EMBEDDERS,
        ],
        max_grad_norm=2.0,
        dynamic_shift_prob=0.0,
        inference_guidance_scale=4.5,  # the training CFG: reference w = 3.5 in v_c + w·(v_c − v_u)
        text_keys=("prompt_embeds", "pooled_prompt_embeds"),
    ),
}


def get_training_family(name: str) -> TrainingFamily:
    """The training glue of family ``name``."""
    get_family(name)  # one error message for unknown families
    return TRAINING_FAMILIES[name]
