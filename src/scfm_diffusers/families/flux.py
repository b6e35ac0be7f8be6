"""FLUX.1 (dev, schnell, and fine-tunes such as Chroma's ancestors): packed 2×2 latents, embedded guidance.

The transformer takes ``timestep=σ`` (it multiplies by 1000 inside) and, for guidance-distilled checkpoints
(FLUX.1-dev), ``guidance=g``: the method draws g per sample and gives the same g to the student and every
target pass. Its output is the velocity ``ε − x0`` of the packed latents.
"""

from __future__ import annotations

import torch
from diffusers import FluxPipeline

from .base import Family, model_dtype

__all__ = ["FLUX_ATTENTION", "FLUX_EMBEDDERS", "FLUX_FEED_FORWARD", "FluxFamily"]

FLUX_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
FLUX_FEED_FORWARD = ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")
FLUX_EMBEDDERS = (
    "time_text_embed.timestep_embedder.linear_1",
    "time_text_embed.timestep_embedder.linear_2",
    "time_text_embed.text_embedder.linear_1",
    "time_text_embed.text_embedder.linear_2",
    "time_text_embed.guidance_embedder.linear_1",
    "time_text_embed.guidance_embedder.linear_2",
    "context_embedder",
)


class FluxFamily(Family):
    """FLUX.1: ``FluxPipeline`` with ``FluxTransformer2DModel``; CLIP pooled + T5 sequence embeddings."""

    name = "flux"
    pipeline_class_name = "FluxPipeline"
    transformer_class_name = "FluxTransformer2DModel"
    text_encoder_names = ("text_encoder", "text_encoder_2")
    lora_targets = (
        *FLUX_ATTENTION,
        *FLUX_FEED_FORWARD,
        "proj_mlp",
        "proj_out",
        "norm1.linear",
        "norm1_context.linear",
        "norm.linear",
        "norm_out.linear",
        "x_embedder",
        *FLUX_EMBEDDERS,
    )
    guidance = "embedded"
    # Reference sampler: fixed shift 3.25, embedded guidance 3.5-5, no true CFG.
    default_settings = {"num_inference_steps": 4, "shift": 3.25, "guidance_scale": 3.5, "lora_scale": 1.0}
    max_grad_norm = 10.0
    dynamic_shift_prob = 0.1

    def encode_prompts(self, pipeline, prompts, max_sequence_length, device=None):
        prompt_embeds, pooled, _ = pipeline.encode_prompt(
            prompt=prompts, prompt_2=None, max_sequence_length=max_sequence_length, device=device
        )
        return {"prompt_embeds": prompt_embeds.float(), "pooled_prompt_embeds": pooled.float()}

    def pipeline_text_kwargs(self, text, uncond, **to):
        return {
            "prompt_embeds": text["prompt_embeds"].to(**to),
            "pooled_prompt_embeds": text["pooled_prompt_embeds"].to(**to),
        }

    def to_model_space(self, latents):
        batch, channels, height, width = latents.shape
        return FluxPipeline._pack_latents(latents, batch, channels, height, width)

    def velocity_fn(self, model, text, latent_shape, *, uncond=None, guidance: torch.Tensor | None = None, **_):
        _, _, height, width = latent_shape
        embeds, pooled = text["prompt_embeds"], text["pooled_prompt_embeds"]
        img_ids = FluxPipeline._prepare_latent_image_ids(None, height // 2, width // 2, embeds.device, embeds.dtype)
        txt_ids = torch.zeros(embeds.shape[1], 3, device=embeds.device, dtype=embeds.dtype)

        def velocity(x, sigma, rows):
            dtype = model_dtype(model)
            return model(
                hidden_states=x.to(dtype),
                timestep=sigma.to(dtype),
                guidance=None if guidance is None else guidance.to(x.device)[rows].to(dtype),
                pooled_projections=pooled[rows].to(dtype),
                encoder_hidden_states=embeds[rows].to(dtype),
                txt_ids=txt_ids,
                img_ids=img_ids,
                return_dict=False,
            )[0].float()

        return velocity

    def tiny_pipeline(self, config=None, *, pipeline_class=None):
        from ..testing import tiny_flux_pipeline

        return tiny_flux_pipeline(config, pipeline_class=pipeline_class or self.pipeline_class)
