"""Chroma (Chroma1-HD / Base, 8.9B, a FLUX.1-schnell derivative): T5 only, true CFG, masked T5 tokens.

The transformer is Flux's without the AdaLN linears: one "approximator" MLP turns the timestep into every
block's modulation. It takes ``timestep=σ`` (it multiplies by 1000 inside; the pipeline passes
``(1000·σ)/1000``) and predicts the velocity ``ε − x0`` of the packed 2×2 latents, as Flux does. It has no
guidance embedding: ``ChromaPipeline`` samples with true CFG, ``v_u + w·(v_c − v_u)`` against a negative
(here: the empty) prompt whenever ``guidance_scale > 1``, so every velocity of the objective is that
combination too (as for SD3).

Text: the T5 encoder sees the tokenizer's mask; the transformer sees Chroma's mask, the prompt tokens plus
exactly ONE padding token. The stock pipeline hands that mask to the transformer as 0/1 in the embeddings'
floating dtype, which scaled-dot-product attention adds to the logits instead of dropping the masked keys
(diffusers issues #12116, #13619). :meth:`ChromaFamily.velocity_fn` reproduces that arithmetic exactly, so that
training, teacher images and sampling with the stock pipeline agree.

Time convention (the objective's): σ ∈ [0, 1], σ = 1 is noise, ``x_σ = (1 − σ)·x0 + σ·ε``, ``v = ε − x0``.
"""

from __future__ import annotations

import torch

from .base import Family, model_dtype
from .flux import FLUX_ATTENTION, FLUX_FEED_FORWARD

__all__ = ["CHROMA_APPROXIMATOR", "ChromaFamily"]

#: The approximator (``distilled_guidance_layer``): Chroma's replacement for Flux's AdaLN ``norm*.linear`` layers
#: and time/guidance embedders. Chroma1 has 5 residual layers; names a smaller model lacks are skipped.
CHROMA_APPROXIMATOR = (
    "distilled_guidance_layer.in_proj",
    *(f"distilled_guidance_layer.layers.{i}.linear_{j}" for i in range(5) for j in (1, 2)),
    "distilled_guidance_layer.out_proj",
)


def transformer_attention_mask(text_mask: torch.Tensor, image_tokens: int, dtype: torch.dtype) -> torch.Tensor:
    """The ``attention_mask`` that ``ChromaPipeline`` passes to its transformer.

    Args:
        text_mask: ``(B, L)`` bool, Chroma's text mask (prompt tokens plus one padding token).
        image_tokens: Packed image tokens per sample.
        dtype: The transformer's dtype; the pipeline's text mask is in the embeddings' floating dtype.

    Returns:
        ``(B, L + image_tokens)`` in ``dtype``: the 0/1 text mask followed by ones for the image tokens
        (``ChromaPipeline._prepare_attention_mask`` on the mask of ``_get_t5_prompt_embeds``).
    """
    image = torch.ones(len(text_mask), image_tokens, device=text_mask.device, dtype=torch.bool)
    return torch.cat([text_mask.to(dtype), image], dim=1)


class ChromaFamily(Family):
    """Chroma: ``ChromaPipeline`` with ``ChromaTransformer2DModel``; one T5 encoder, true CFG."""

    name = "chroma"
    pipeline_class_name = "ChromaPipeline"
    transformer_class_name = "ChromaTransformer2DModel"
    text_encoder_names = ("text_encoder",)
    gradient_checkpointing_issue = (
        "diffusers' ChromaTransformer2DModel drops the attention mask of its single-stream blocks under gradient "
        "checkpointing, so the student would be another model than its targets and than sampling "
        "(tests/test_family_chroma.py tracks the fix). Train without it; lower --train_batch_size for memory."
    )
    # Flux's reference targets as far as Chroma has them: no AdaLN linears or time/text embedders, whose work
    # the approximator does (so it takes their place); single blocks have to_q/k/v without to_out.
    lora_targets = (
        *FLUX_ATTENTION,
        *FLUX_FEED_FORWARD,
        "proj_mlp",
        "proj_out",
        "x_embedder",
        "context_embedder",
        *CHROMA_APPROXIMATOR,
    )
    guidance = "cfg"
    # Chroma is sampled with true CFG like SD3.5, so like SD3 the student keeps CFG and gets 8 steps (16
    # transformer passes, against 40 steps × 2 in the model card). CFG 3.0: what the Chroma1-HD card, diffusers'
    # docs and the official demo sample with (the pipeline's signature default, 5.0, is generic). Shift 3.16:
    # the resolution-dependent shift ChromaPipeline computes at 1024² (4096 tokens: μ = 1.15, e^μ ≈ 3.16).
    default_settings = {"num_inference_steps": 8, "shift": 3.16, "guidance_scale": 3.0, "lora_scale": 1.0}
    max_grad_norm = 10.0  # Flux's: same architecture and latent space
    dynamic_shift_prob = 0.1  # ChromaPipeline always passes Flux's μ (base 0.5 → max 1.15), as for Flux
    latent_patch = 16  # VAE factor 8 × 2×2 packing
    tiny_resolution = 16  # the tiny VAE does not downsample: 16×16 latents → 64 packed tokens

    def encode_prompts(self, pipeline, prompts, max_sequence_length, device=None):
        """T5 embeddings ``(B, L, D)`` float32 and Chroma's text mask ``(B, L)`` bool (tokens + one pad)."""
        prompt_embeds, _, mask, *_ = pipeline.encode_prompt(
            prompt=prompts, device=device, do_classifier_free_guidance=False, max_sequence_length=max_sequence_length
        )
        return {"prompt_embeds": prompt_embeds.float(), "prompt_attention_mask": mask.bool()}

    def pipeline_text_kwargs(self, text, uncond, **to):
        """CFG against the empty prompt, as in training; the masks in the embeddings' dtype, as the pipeline
        makes them itself (it only enables CFG for ``guidance_scale > 1``)."""
        n = len(text["prompt_embeds"])
        embeds = text["prompt_embeds"].to(**to)
        null_mask = uncond["prompt_attention_mask"].expand(n, -1)
        return {
            "prompt_embeds": embeds,
            "prompt_attention_mask": text["prompt_attention_mask"].to(embeds.device, embeds.dtype),
            "negative_prompt_embeds": uncond["prompt_embeds"].expand(n, -1, -1).to(**to),
            "negative_prompt_attention_mask": null_mask.to(embeds.device, embeds.dtype),
        }

    def to_model_space(self, latents):
        batch, channels, height, width = latents.shape
        return self.pipeline_class._pack_latents(latents, batch, channels, height, width)

    def velocity_fn(self, model, text, latent_shape, *, uncond, cfg_scale: float, **_):
        """The pipeline's velocity: one pass, or for ``cfg_scale > 1`` ``v_u + cfg_scale·(v_c − v_u)`` from one
        batched pass of the conditional and empty-prompt halves (the pipeline makes two; rows are independent)."""
        _, _, height, width = latent_shape
        embeds, mask = text["prompt_embeds"], text["prompt_attention_mask"]
        null_embeds, null_mask = uncond["prompt_embeds"], uncond["prompt_attention_mask"]
        device = embeds.device
        img_ids = self.pipeline_class._prepare_latent_image_ids(None, height // 2, width // 2, device, embeds.dtype)
        txt_ids = torch.zeros(embeds.shape[1], 3, device=device, dtype=embeds.dtype)
        image_tokens = (height // 2) * (width // 2)
        guided = cfg_scale > 1  # ChromaPipeline.do_classifier_free_guidance

        def velocity(x, sigma, rows):
            dtype, n = model_dtype(model), len(rows)
            context, keep = embeds[rows], mask[rows]
            if guided:
                x, sigma = torch.cat([x, x]), torch.cat([sigma, sigma])
                context = torch.cat([context, null_embeds.expand(n, -1, -1)])
                keep = torch.cat([keep, null_mask.expand(n, -1)])
            out = model(
                hidden_states=x.to(dtype),
                timestep=sigma.to(dtype),
                encoder_hidden_states=context.to(dtype),
                txt_ids=txt_ids,
                img_ids=img_ids,
                attention_mask=transformer_attention_mask(keep, image_tokens, dtype),
                return_dict=False,
            )[0].float()
            if not guided:
                return out
            cond, null = out.chunk(2)
            return null + cfg_scale * (cond - null)  # the pipeline's neg + guidance_scale·(cond − neg)

        return velocity

    def tiny_pipeline(self, config=None, *, pipeline_class=None):
        """diffusers' test sizes (``get_dummy_components``) with the in-code T5 tokenizer and encoder, and a
        Flux-style scheduler with dynamic shifting (``ChromaPipeline`` passes Flux's μ)."""
        from diffusers import ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler

        from ..testing import TinyModelConfig, _t5_encoder, _vae, character_t5_tokenizer

        config = config or TinyModelConfig()
        if sum(config.axes_dims_rope) != config.attention_head_dim:
            raise ValueError(
                f"sum(axes_dims_rope)={sum(config.axes_dims_rope)} must equal "
                f"attention_head_dim={config.attention_head_dim}."
            )
        latent_channels = config.latent_channels or 1
        torch.manual_seed(config.seed)
        transformer = ChromaTransformer2DModel(
            patch_size=1,
            in_channels=4 * latent_channels,
            num_layers=config.num_layers,
            num_single_layers=config.num_single_layers,
            attention_head_dim=config.attention_head_dim,
            num_attention_heads=config.num_attention_heads,
            joint_attention_dim=config.t5_dim or config.text_dim,
            axes_dims_rope=list(config.axes_dims_rope),
            approximator_num_channels=16,
            approximator_hidden_dim=32,
            approximator_layers=1,
        )
        tokenizer = character_t5_tokenizer()
        text_encoder = _t5_encoder(tokenizer, config)
        vae = _vae(config, latent_channels)
        scheduler = FlowMatchEulerDiscreteScheduler(
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        )
        for module in (transformer, text_encoder, vae):  # built modules train; loaded ones are in eval mode
            module.eval()
        return (pipeline_class or self.pipeline_class)(
            scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
        )
