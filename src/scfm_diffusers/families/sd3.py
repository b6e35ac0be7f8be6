"""Stable Diffusion 3 / 3.5: explicit CFG against the empty prompt in every velocity; ``timestep = 1000·σ``.

The student keeps CFG: each of its velocities (and every target's) is ``v_u + w·(v_c − v_u)`` from one
batched forward of the conditional and the empty-prompt halves, so both halves carry the student's gradient.
"""

from __future__ import annotations

import torch

from .base import Family, model_dtype
from .flux import FLUX_ATTENTION, FLUX_EMBEDDERS, FLUX_FEED_FORWARD

__all__ = ["SD3Family"]


class SD3Family(Family):
    """SD3 / SD3.5: ``StableDiffusion3Pipeline`` with ``SD3Transformer2DModel``; two CLIPs and T5."""

    name = "sd3"
    pipeline_class_name = "StableDiffusion3Pipeline"
    transformer_class_name = "SD3Transformer2DModel"
    text_encoder_names = ("text_encoder", "text_encoder_2", "text_encoder_3")
    lora_targets = (
        *FLUX_ATTENTION,
        *FLUX_FEED_FORWARD,
        "norm1.linear",
        "norm1_context.linear",
        "norm_out.linear",
        "proj_out",
        "pos_embed.proj",
        *FLUX_EMBEDDERS,
    )
    guidance = "cfg"
    # Reference: CFG scale 4.5 in training (w = 3.5 in v_c + w·(v_c − v_u)); the student is sampled with the
    # scale it was trained with. Fixed shift 3.0, 8 steps.
    default_settings = {"num_inference_steps": 8, "shift": 3.0, "guidance_scale": 4.5, "lora_scale": 1.0}
    max_grad_norm = 2.0
    latent_patch = 16  # VAE factor 8 × patch 2
    tiny_resolution = 16

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

    def pipeline_text_kwargs(self, text, uncond, **to):
        """CFG against the empty prompt, as in training."""
        n = len(text["prompt_embeds"])
        return {
            "prompt_embeds": text["prompt_embeds"].to(**to),
            "pooled_prompt_embeds": text["pooled_prompt_embeds"].to(**to),
            "negative_prompt_embeds": uncond["prompt_embeds"].expand(n, -1, -1).to(**to),
            "negative_pooled_prompt_embeds": uncond["pooled_prompt_embeds"].expand(n, -1).to(**to),
        }

    def velocity_fn(self, model, text, latent_shape, *, uncond, cfg_scale: float, **_):
        embeds, pooled = text["prompt_embeds"], text["pooled_prompt_embeds"]
        null_embeds, null_pooled = uncond["prompt_embeds"], uncond["pooled_prompt_embeds"]

        def velocity(x, sigma, rows):
            dtype, n = model_dtype(model), len(rows)
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

    def tiny_pipeline(self, config=None, *, pipeline_class=None):
        from ..testing import tiny_sd3_pipeline

        return tiny_sd3_pipeline(config, pipeline_class=pipeline_class or self.pipeline_class)
