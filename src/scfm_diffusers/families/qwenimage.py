"""Qwen-Image: a 20B MM-DiT with a Qwen2.5-VL text encoder, packed 2×2 latents and true CFG.

Time and velocity: the pipeline calls the transformer with ``timestep = t/1000 = σ`` (the transformer's
timestep projection multiplies by 1000 inside) and the output is the velocity ``ε − x0`` of the packed latents,
so the objective's convention holds as is: σ ∈ [0, 1], σ = 1 is noise, ``x_σ = (1 − σ)·x0 + σ·ε``.

Guidance is true CFG (``true_cfg_scale``, on only with a negative prompt) with the pipeline's norm-preserving
rescale: ``v = c·‖v_c‖/‖c‖`` with ``c = v_u + w·(v_c − v_u)``, norms over the channels of each token. As for
SD3, the student keeps CFG: each of its velocities (and every target's) is that combination, from one batched
forward of the conditional and empty-prompt halves. ``guidance_scale`` of the stock pipeline is for
guidance-distilled checkpoints, of which there is none.

Text: the pipeline formats each prompt with a chat template, runs the text encoder, drops the first
``prompt_template_encode_start_idx`` (34) tokens (the system prompt) and keeps the last hidden state of the
rest, with a mask; the transformer takes that mask and ``img_shapes`` (frame, height, width of the 2×2 patch
grid) for its rotary embedding. Latents: a Wan-style 16-channel video VAE (one frame here) normalised per
channel with ``latents_mean`` / ``latents_std``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from diffusers import QwenImagePipeline

from .base import Family, model_dtype
from .flux import FLUX_ATTENTION

__all__ = ["QwenImageFamily"]

# Modules of QwenImageTransformer2DModel, mirroring the method's Flux targets: attention q/k/v/out and their text
# twins, both streams' feed-forward layers, the AdaLN modulation linears (`img_mod.1`, `txt_mod.1`, `norm_out`),
# the image/text input embedders, the timestep embedder and the output projection.
QWEN_IMAGE_FEED_FORWARD = ("img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2")
QWEN_IMAGE_MODULATION = ("img_mod.1", "txt_mod.1", "norm_out.linear")
QWEN_IMAGE_EMBEDDERS = (
    "img_in",
    "txt_in",
    "time_text_embed.timestep_embedder.linear_1",
    "time_text_embed.timestep_embedder.linear_2",
)

#: Qwen-Image's scheduler config (``Qwen/Qwen-Image``, ``scheduler/scheduler_config.json``).
QWEN_IMAGE_SCHEDULER_CONFIG = {
    "shift": 1.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 0.9,
    "base_image_seq_len": 256,
    "max_image_seq_len": 8192,
    "shift_terminal": 0.02,
    "time_shift_type": "exponential",
}


class QwenImageFamily(Family):
    """Qwen-Image: ``QwenImagePipeline`` with ``QwenImageTransformer2DModel``; Qwen2.5-VL prompt embeddings."""

    @property
    def grid_defaults(self) -> dict[str, float | int]:
        """The dynamically shifted training grids use Qwen-Image's own μ line (0.5 at 256 → 0.9 at 8192 tokens)."""
        keys = ("base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len")
        return {**super().grid_defaults, **{key: QWEN_IMAGE_SCHEDULER_CONFIG[key] for key in keys}}

    name = "qwenimage"
    pipeline_class_name = "QwenImagePipeline"
    transformer_class_name = "QwenImageTransformer2DModel"
    text_encoder_names = ("text_encoder",)
    lora_targets = (
        *FLUX_ATTENTION,
        *QWEN_IMAGE_FEED_FORWARD,
        *QWEN_IMAGE_MODULATION,
        *QWEN_IMAGE_EMBEDDERS,
        "proj_out",
    )
    guidance = "cfg"
    lora_scale_kwarg = "attention_kwargs"
    # CFG 4.0: the pipeline's default `true_cfg_scale` and the model card's; the student is sampled with the scale
    # it was trained with. Shift 3.0: the teacher's resolution-dependent shift is e^μ ≈ 2.0 at 1024² and ≈ 2.3 at
    # its native 1328² (μ from base/max shift 0.5/0.9 over 256..8192 tokens); few-step grids want a larger shift,
    # and 3 is what Qwen-Image-Lightning distils its 4/8-step LoRAs at (and the method's SD3 value). 8 steps, as
    # for the other CFG MM-DiT (SD3).
    default_settings = {"num_inference_steps": 8, "shift": 3.0, "guidance_scale": 4.0, "lora_scale": 1.0}
    max_grad_norm = 1.0  # no reference value for Qwen-Image; diffusers' Qwen-Image LoRA script's default
    dynamic_shift_prob = 0.1  # the real scheduler shifts dynamically, as Flux's
    latent_patch = 16  # VAE factor 8 × 2×2 packing
    tiny_resolution = 32  # the tiny VAE does not downsample: 32² pixels -> 16×16 = 256 packed tokens

    # ---------------------------------------------------------------------------------------------------
    # Text and images
    # ---------------------------------------------------------------------------------------------------
    def encode_prompts(self, pipeline, prompts, max_sequence_length, device=None):
        """``prompt_embeds`` (B, max_sequence_length, D) float32 and ``prompt_embeds_mask`` (B, max_sequence_length)
        long (1 = token, 0 = padding), as the pipeline encodes them (system prompt dropped), padded."""
        embeds, mask = pipeline.encode_prompt(prompt=prompts, device=device, max_sequence_length=max_sequence_length)
        if mask is None:  # the pipeline drops an all-ones mask
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        pad = max_sequence_length - embeds.shape[1]
        return {"prompt_embeds": F.pad(embeds.float(), (0, 0, 0, pad)), "prompt_embeds_mask": F.pad(mask, (0, pad))}

    def pipeline_text_kwargs(self, text, uncond, **to):
        """The prompt embeddings and, as the negative prompt of the pipeline's true CFG, the empty prompt's."""
        n, device = len(text["prompt_embeds"]), to.get("device")
        return {
            "prompt_embeds": text["prompt_embeds"].to(**to),
            "prompt_embeds_mask": text["prompt_embeds_mask"].to(device),
            "negative_prompt_embeds": uncond["prompt_embeds"].expand(n, -1, -1).to(**to),
            "negative_prompt_embeds_mask": uncond["prompt_embeds_mask"].expand(n, -1).to(device),
        }

    def encode_images(self, vae, pixels, generator=None):
        """One-frame video latents of the Qwen-Image VAE, normalised per channel: ``(z − latents_mean)/latents_std``.

        Args:
            vae: An ``AutoencoderKLQwenImage`` (5-D: batch, channels, frames, height, width).
            pixels: ``(B, 3, H, W)`` in [-1, 1].
            generator: For the posterior sample: one, or one per row.

        Returns:
            ``(B, z_dim, H/8, W/8)`` float32 (the frame axis dropped), as ``QwenImageImg2ImgPipeline`` encodes.
        """
        pixels = pixels.to(device=vae.device, dtype=vae.dtype).unsqueeze(2)
        latents = vae.encode(pixels).latent_dist.sample(generator=generator).float()[:, :, 0]
        mean = torch.tensor(vae.config.latents_mean, device=latents.device).view(1, -1, 1, 1)
        std = torch.tensor(vae.config.latents_std, device=latents.device).view(1, -1, 1, 1)
        return (latents - mean) / std

    def to_model_space(self, latents):
        """``(B, C, h, w)`` -> the pipeline's packed ``(B, h/2·w/2, 4C)`` tokens."""
        batch, channels, height, width = latents.shape
        return QwenImagePipeline._pack_latents(latents, batch, channels, height, width)

    # ---------------------------------------------------------------------------------------------------
    # Velocity and conditioning
    # ---------------------------------------------------------------------------------------------------
    def fill_guidance(self, arguments: dict[str, Any], guidance_scale: float) -> None:
        """Set ``true_cfg_scale`` and the empty negative prompt (CFG is off without one) where the caller did not.

        An SCFM pipeline's ``guidance_scale`` is this family's CFG scale, so a given one becomes ``true_cfg_scale``
        (the stock ``guidance_scale`` only feeds a guidance embedding, which Qwen-Image does not have).
        """
        given = arguments.pop("guidance_scale", None)
        if arguments.get("true_cfg_scale") is None:
            arguments["true_cfg_scale"] = guidance_scale if given is None else given
        if arguments.get("negative_prompt") is None and arguments.get("negative_prompt_embeds") is None:
            arguments["negative_prompt"] = ""  # the empty prompt the CFG student is trained against

    def velocity_fn(self, model, text, latent_shape, *, uncond, cfg_scale: float = 1.0, **_):
        """CFG velocity exactly as ``QwenImagePipeline.__call__`` combines it (plain conditional when the scale is
        ≤ 1, where the pipeline turns CFG off), from one batched forward of both halves."""
        _, _, height, width = latent_shape
        embeds, mask = text["prompt_embeds"], text["prompt_embeds_mask"]
        null_embeds, null_mask = uncond["prompt_embeds"], uncond["prompt_embeds_mask"]
        cfg = cfg_scale > 1
        # The pipeline passes no mask when it is all ones; a full mask gives the same attention, only slower.
        full = bool(mask.all()) and (not cfg or bool(null_mask.all()))

        def velocity(x, sigma, rows):
            dtype, n = model_dtype(model), len(rows)
            hidden, timestep, states, states_mask = x, sigma, embeds[rows], mask[rows]
            if cfg:
                hidden, timestep = torch.cat([x, x]), torch.cat([sigma, sigma])
                states = torch.cat([states, null_embeds.expand(n, -1, -1)])
                states_mask = torch.cat([states_mask, null_mask.expand(n, -1)])
            out = model(
                hidden_states=hidden.to(dtype),
                timestep=timestep.to(dtype),
                encoder_hidden_states=states.to(dtype),
                encoder_hidden_states_mask=None if full else states_mask,
                img_shapes=[[(1, height // 2, width // 2)]] * len(hidden),
                return_dict=False,
            )[0].float()
            if not cfg:
                return out
            cond, null = out.chunk(2)
            combined = null + cfg_scale * (cond - null)
            return combined * (cond.norm(dim=-1, keepdim=True) / combined.norm(dim=-1, keepdim=True))

        return velocity

    # ---------------------------------------------------------------------------------------------------
    # Tests
    # ---------------------------------------------------------------------------------------------------
    def tiny_pipeline(self, config=None, *, pipeline_class=None):
        """A tiny real ``QwenImagePipeline``: Qwen2.5-VL text encoder, Qwen-Image VAE without downsampling.

        The byte-level tokenizer gets one added token for the head of the template's system prompt, so that the
        system prompt and user header are exactly the 34 tokens the pipeline drops (as with Qwen's tokenizer) and
        the prompt itself reaches the transformer. The scheduler is configured as the real model's.
        """
        from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        from ..testing import TinyModelConfig

        config = config or TinyModelConfig()
        pipeline_class = pipeline_class or self.pipeline_class
        channels = config.latent_channels or 4
        torch.manual_seed(config.seed)
        tokenizer = _qwen_image_tokenizer()
        transformer = QwenImageTransformer2DModel(
            patch_size=2,
            in_channels=4 * channels,
            out_channels=channels,
            num_layers=config.num_layers,
            attention_head_dim=config.attention_head_dim,
            num_attention_heads=config.num_attention_heads,
            joint_attention_dim=config.text_dim,
            guidance_embeds=False,
            axes_dims_rope=_rope_axes(config.attention_head_dim),
        )
        special = {name: tokenizer.convert_tokens_to_ids(token) for name, token in _SPECIAL_TOKEN_IDS.items()}
        text_heads = 2
        half_head = config.text_dim // text_heads // 2
        text_encoder = Qwen2_5_VLForConditionalGeneration(
            Qwen2_5_VLConfig(
                text_config={
                    "vocab_size": len(tokenizer),
                    "hidden_size": config.text_dim,
                    "intermediate_size": 2 * config.text_dim,
                    "num_hidden_layers": config.text_layers,
                    "num_attention_heads": text_heads,
                    "num_key_value_heads": text_heads,
                    "rope_scaling": {"mrope_section": _mrope_section(half_head), "rope_type": "default"},
                    "rope_theta": 1000000.0,
                    "bos_token_id": special["bos_token_id"],
                    "eos_token_id": special["eos_token_id"],
                    "pad_token_id": special["bos_token_id"],
                },
                vision_config={
                    "depth": 1,
                    "hidden_size": 16,
                    "intermediate_size": 16,
                    "num_heads": 2,
                    "out_hidden_size": config.text_dim,
                },
                vocab_size=len(tokenizer),
                **{key: value for key, value in special.items() if key.startswith(("image", "vision"))},
            )
        )
        vae = AutoencoderKLQwenImage(
            base_dim=config.vae_channels,
            z_dim=channels,
            dim_mult=[1],
            num_res_blocks=1,
            temperal_downsample=[],  # vae_scale_factor = 2 ** len(temperal_downsample) = 1
            # Not 0/1, so that the per-channel normalisation matters.
            latents_mean=torch.linspace(-0.5, 0.5, channels).tolist(),
            latents_std=torch.linspace(0.5, 2.0, channels).tolist(),
        )
        for module in (transformer, text_encoder, vae):
            module.eval()
        return pipeline_class(
            scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER_CONFIG),
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            transformer=transformer,
        )


_SPECIAL_TOKEN_IDS = {
    "bos_token_id": "<|endoftext|>",
    "eos_token_id": "<|im_end|>",
    "image_token_id": "<|image_pad|>",
    "vision_start_token_id": "<|vision_start|>",
    "vision_end_token_id": "<|vision_end|>",
}


def _qwen_image_tokenizer():
    """The byte-level Qwen2 tokenizer, with the template's system prompt + user header made exactly as many tokens
    as ``QwenImagePipeline`` drops (``prompt_template_encode_start_idx``); user text stays one token per byte."""
    from tokenizers import AddedToken

    from ..testing import byte_level_qwen2_tokenizer

    bare = QwenImagePipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=None)
    template, drop = bare.prompt_template_encode, bare.prompt_template_encode_start_idx
    tokenizer = byte_level_qwen2_tokenizer()
    header = template.split("{}")[0]  # "<|im_start|>system\n<instruction><|im_end|>\n<|im_start|>user\n"
    instruction = header.split("<|im_end|>")[0].split("\n", 1)[1]
    surplus = len(tokenizer(header)["input_ids"]) - drop  # bytes of the instruction to merge into one token
    tokenizer.add_tokens([AddedToken(instruction[: surplus + 1], normalized=False)])
    if len(tokenizer(header)["input_ids"]) != drop:
        raise RuntimeError(f"The tiny Qwen-Image tokenizer does not make the template's header {drop} tokens.")
    return tokenizer


def _rope_axes(head_dim: int) -> tuple[int, int, int]:
    """(frame, height, width) rotary dimensions in Qwen-Image's proportions (16, 56, 56 for 128), all even."""
    side = 2 * ((head_dim - head_dim // 8) // 4)
    return head_dim - 2 * side, side, side


def _mrope_section(half_head: int) -> list[int]:
    """Qwen2.5-VL's multimodal rotary sections (temporal, height, width) for half a head: [16, 24, 24] for 64."""
    temporal = half_head // 4
    height = (half_head - temporal) // 2
    return [temporal, height, half_head - temporal - height]
