"""Z-Image (Tongyi-MAI): a 6B single-stream DiT with a Qwen3 text encoder and the FLUX VAE; true CFG.

Time and velocity: ``ZImagePipeline`` hands the transformer the REVERSED time ``(1000 − t)/1000 = 1 − σ``
(0 is noise, 1 is data) and negates its output before the Euler step, so the transformer predicts
``x0 − ε = −v``. :meth:`ZImageFamily.velocity_fn` therefore calls it at ``1 − σ`` and returns ``−output``:
the objective's ``v = ε − x0`` at σ (σ = 1 noise, ``x_σ = (1 − σ)·x0 + σ·ε``).

Inputs: the transformer takes LISTS, one ``(C, 1, h, w)`` latent and one unpadded ``(L_i, D)`` caption embedding
(the Qwen3 second-to-last hidden states of the chat-templated prompt) per sample. The cache needs one fixed
shape, so :meth:`ZImageFamily.encode_prompts` stores captions left-aligned and zero-padded to
``max_sequence_length`` with a bool ``prompt_attention_mask``; the velocity and the pipeline arguments drop the
padding again with the mask, which gives exactly the pipeline's own caption list.

CFG: the teacher is the base model (``Tongyi-MAI/Z-Image``, sampled with CFG against a negative/empty prompt;
Z-Image-Turbo is already distilled and runs at guidance 0). Its pipeline combines the two passes as
``v_c + w·(v_c − v_u)`` (NOT diffusers' usual ``v_u + w·(v_c − v_u)``: Z-Image's ``w`` is the usual scale − 1)
and skips the empty-prompt pass when ``w = 0``; the velocity copies both (without the optional
``cfg_normalization`` / ``cfg_truncation``, which are off by default).
"""

from __future__ import annotations

import torch

from .base import Family, model_dtype

__all__ = ["ZImageFamily"]


def _unpad(text: dict[str, torch.Tensor], **to) -> list[torch.Tensor]:
    """The padded captions ``(B, L, D)`` back to the pipeline's list of ``(L_i, D)`` embeddings."""
    embeds, mask = text["prompt_embeds"], text["prompt_attention_mask"]
    return [row[keep.to(row.device)].to(**to) for row, keep in zip(embeds, mask, strict=True)]


class ZImageFamily(Family):
    """Z-Image: ``ZImagePipeline`` with ``ZImageTransformer2DModel``; one Qwen3 encoder, lists of inputs."""

    name = "zimage"
    pipeline_class_name = "ZImagePipeline"
    transformer_class_name = "ZImageTransformer2DModel"
    text_encoder_names = ("text_encoder",)
    # Every linear layer of the network, as the method does for Flux. Single-stream: the attention and
    # feed-forward names cover the image refiner (noise_refiner), the text refiner (context_refiner, the
    # "context" twins) and the joint layers alike.
    lora_targets = (
        "to_q",
        "to_k",
        "to_v",
        "to_out.0",
        "feed_forward.w1",
        "feed_forward.w2",
        "feed_forward.w3",
        "adaLN_modulation.0",  # the blocks' AdaLN linear (in the final layer, index 0 is a SiLU: skipped)
        "adaLN_modulation.1",  # the final layer's AdaLN linear
        "all_final_layer.2-1.linear",  # proj_out (patch 2, frame patch 1)
        "all_x_embedder.2-1",  # x_embedder
        "cap_embedder.1",  # context_embedder (after its RMSNorm)
        "t_embedder.mlp.0",
        "t_embedder.mlp.2",
    )
    guidance = "cfg"
    lora_scale_kwarg = "joint_attention_kwargs"
    # CFG 4 as in the base model card (3-5 recommended; the pipeline's default is 5), in the pipeline's own
    # convention v_c + w·(v_c − v_u). Shift 3.0: what Tongyi samples its own 8-step distillation of this model
    # (Z-Image-Turbo) with, and inside the method's training shift range [2.5, 4.5]; the base's scheduler shift
    # 6.0 is tuned for its 28-50 step sampling. 8 steps as for SD3 (the reference CFG family) and Turbo.
    default_settings = {"num_inference_steps": 8, "shift": 3.0, "guidance_scale": 4.0, "lora_scale": 1.0}
    max_grad_norm = 1.0  # no SCFM reference for Z-Image; diffusers' Z-Image LoRA script clips at 1.0
    dynamic_shift_prob = 0.0  # the real scheduler has a fixed shift (use_dynamic_shifting=False)
    latent_patch = 16  # VAE factor 8 × patch 2
    tiny_resolution = 16  # the tiny VAE does not downsample: 16×16 latents, 8×8 = 64 image tokens

    def lora_target_modules(self, transformer: torch.nn.Module) -> list[str]:
        """The reference targets; a name that also ends a non-linear module (``adaLN_modulation.0`` is the final
        layer's SiLU, which peft cannot wrap) is replaced by the full paths of the linear modules it ends."""
        modules = dict(transformer.named_modules())
        targets = []
        for target in super().lora_target_modules(transformer):
            matched = {path: m for path, m in modules.items() if path == target or path.endswith("." + target)}
            if all(isinstance(m, torch.nn.Linear) for m in matched.values()):
                targets.append(target)
            else:
                targets += [path for path, m in matched.items() if isinstance(m, torch.nn.Linear)]
        return targets

    def encode_prompts(self, pipeline, prompts, max_sequence_length, device=None):
        """``prompt_embeds`` ``(B, max_sequence_length, D)`` float32, left-aligned and zero-padded, and the bool
        ``prompt_attention_mask`` ``(B, max_sequence_length)`` of the real tokens (the pipeline's own encoding:
        chat template, Qwen3 second-to-last hidden states)."""
        # encode_prompt writes the chat-templated prompts into the list it is given: hand it a copy.
        embeds, _ = pipeline.encode_prompt(
            prompt=list(prompts),
            device=device,
            do_classifier_free_guidance=False,
            max_sequence_length=max_sequence_length,
        )
        first = embeds[0]
        padded = torch.zeros(len(embeds), max_sequence_length, first.shape[-1], device=first.device)
        mask = torch.zeros(len(embeds), max_sequence_length, dtype=torch.bool, device=first.device)
        for row, embed in enumerate(embeds):
            padded[row, : len(embed)] = embed.float()
            mask[row, : len(embed)] = True
        return {"prompt_embeds": padded, "prompt_attention_mask": mask}

    def pipeline_text_kwargs(self, text, uncond, **to):
        """Unpadded caption lists, with the empty prompt as the negative one (CFG as in training)."""
        return {
            "prompt_embeds": _unpad(text, **to),
            "negative_prompt_embeds": _unpad(uncond, **to) * len(text["prompt_embeds"]),
        }

    def velocity_fn(self, model, text, latent_shape, *, uncond, cfg_scale: float, **_):
        null = _unpad(uncond)[0]

        def velocity(x, sigma, rows):
            dtype, n = model_dtype(model), len(rows)
            captions = _unpad({key: text[key][rows] for key in ("prompt_embeds", "prompt_attention_mask")})
            timestep = 1 - sigma.float()  # the pipeline's (1000 − 1000σ)/1000: reversed time
            if cfg_scale > 0:  # the pipeline runs CFG only for w > 0: [cond; uncond] in one batch
                x, timestep, captions = torch.cat([x, x]), torch.cat([timestep, timestep]), captions + [null] * n
            out = model(
                x=list(x.to(dtype).unsqueeze(2).unbind(0)),  # (C, 1, h, w) per sample
                t=timestep,
                cap_feats=[caption.to(dtype) for caption in captions],
                return_dict=False,
            )[0]
            out = torch.stack([sample.float() for sample in out]).squeeze(2)
            if cfg_scale > 0:
                cond, null_out = out.chunk(2)
                out = cond + cfg_scale * (cond - null_out)  # Z-Image's CFG: v_c + w·(v_c − v_u)
            return -out  # the transformer predicts x0 − ε

        return velocity

    def tiny_pipeline(self, config=None, *, pipeline_class=None):
        """A tiny real ``ZImagePipeline``: 1 refiner + ``num_layers`` joint blocks, a ``text_layers``-layer Qwen3
        (byte-level tokenizer with a chat template), a one-block FLUX-style VAE (Z-Image's scaling and shift)
        and Z-Image's scheduler (fixed shift 6.0). Sizes from diffusers' own Z-Image tests."""
        from diffusers import FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel
        from transformers import Qwen3Config, Qwen3Model

        from ..testing import TinyModelConfig, _vae, byte_level_qwen2_tokenizer

        config = config or TinyModelConfig()
        if sum(config.axes_dims_rope) != config.attention_head_dim:
            raise ValueError(
                f"sum(axes_dims_rope)={sum(config.axes_dims_rope)} must equal "
                f"attention_head_dim={config.attention_head_dim}."
            )
        latent_channels = config.latent_channels or 4
        torch.manual_seed(config.seed)
        transformer = ZImageTransformer2DModel(
            all_patch_size=(2,),
            all_f_patch_size=(1,),
            in_channels=latent_channels,
            dim=config.attention_head_dim * config.num_attention_heads,
            n_layers=config.num_layers,
            n_refiner_layers=1,
            n_heads=config.num_attention_heads,
            n_kv_heads=config.num_attention_heads,
            cap_feat_dim=config.text_dim,
            axes_dims=list(config.axes_dims_rope),
            axes_lens=[1024, 64, 64],  # axis 0: caption positions (≤ 1024 tokens), then 64×64 latent patches
        )
        tokenizer = byte_level_qwen2_tokenizer()
        text_encoder = Qwen3Model(
            Qwen3Config(
                vocab_size=len(tokenizer),
                hidden_size=config.text_dim,
                intermediate_size=2 * config.text_dim,
                num_hidden_layers=config.text_layers,  # the pipeline reads hidden_states[-2]: needs ≥ 2 layers
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=config.text_dim // 4,
                max_position_embeddings=tokenizer.model_max_length,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        )
        vae = _vae(config, latent_channels, scaling_factor=0.3611, shift_factor=0.1159)  # Z-Image's (FLUX.1's)
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=6.0, use_dynamic_shifting=False)
        for module in (transformer, text_encoder, vae):  # loaded modules are in eval mode: match them
            module.eval()
        return (pipeline_class or self.pipeline_class)(
            scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
        )
