"""FLUX.2 [klein] (4B, 9B): Flux.2 transformer, a Qwen3 text encoder, the Flux.2 VAE; true CFG.

Time and velocity: ``Flux2KleinPipeline`` calls the transformer with ``timestep = t/1000 = σ`` (it multiplies by
1000 inside) and no guidance embedding (``guidance_embeds=False``); the output is the objective's velocity
``v = ε − x0`` at σ (σ = 1 noise, ``x_σ = (1 − σ)·x0 + σ·ε``), which the pipeline feeds straight into the Euler
step. Nothing to convert but the layout.

Latents: the Flux.2 VAE (``AutoencoderKLFlux2``, 32 channels, factor 8) has no ``scaling_factor``; the pipeline
patchifies its latents 2×2 into channels, ``(B, 32, h, w) → (B, 128, h/2, w/2)``, and normalises them with the
VAE's batch-norm running statistics ``(z − bn.running_mean) / sqrt(bn.running_var + eps)``. That patchified,
normalised tensor is what ``__call__`` takes as ``latents=`` and what the cache stores; the transformer sees it
packed as ``(B, h/2·w/2, 128)`` tokens with 4-D position ids ``(t, h, w, l)``. Beware: with
``output_type="latent"`` the pipeline returns the raw VAE latents ``(B, 32, h, w)`` (un-normalised,
unpatchified), not the model space: :meth:`Flux2KleinFamily.pipeline_latents_to_model_space` maps them back.

Text: the prompt, chat-templated, goes through Qwen3 and the hidden states of three FIXED layers
(``text_encoder_out_layers``, default 9, 18, 27) are concatenated per token, ``(B, L, 3·hidden)``, padded to
``max_sequence_length``; the transformer takes no text mask (the pipeline passes the padded tokens as they are).

CFG: Klein comes as a base model (``FLUX.2-klein-base-4B`` / ``-9B``, sampled with 50 steps and true CFG 4.0
against the empty prompt) and as BFL's own 4-step distillation (``FLUX.2-klein-4B`` / ``-9B``,
``is_distilled=True``: the pipeline then skips CFG). The SCFM teacher is the base model: every velocity is
the pipeline's ``v_u + w·(v_c − v_u)``, which the pipeline (and :meth:`Flux2KleinFamily.velocity_fn`) applies
only for ``w > 1``; a distilled checkpoint therefore trains with ``--cfg_scale 1`` (plain conditional velocity).
"""

from __future__ import annotations

import inspect

import torch

from .base import Family, model_dtype

__all__ = ["Flux2KleinFamily"]

#: Qwen3's chat template for a user turn with thinking disabled, as the pipeline applies it
#: (``enable_thinking=False`` adds an empty think block after the generation prompt).
QWEN3_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}"
    "{% endif %}{% endif %}"
)


class Flux2KleinFamily(Family):
    """FLUX.2 [klein]: ``Flux2KleinPipeline`` with ``Flux2Transformer2DModel``; Qwen3 layers 9/18/27, true CFG."""

    name = "flux2klein"
    pipeline_class_name = "Flux2KleinPipeline"
    transformer_class_name = "Flux2Transformer2DModel"
    text_encoder_names = ("text_encoder",)
    # The method's Flux targets, in Flux.2's names: attention q/k/v/out and their text-stream twins, the
    # feed-forward layers of both streams, the single blocks' fused qkv+MLP input and their output (the
    # single-block `attn.to_out` is listed per block by lora_target_modules: the bare name would also hit the
    # double blocks' to_out ModuleList, which peft cannot wrap), the AdaLN modulation linears (shared per
    # stream in Flux.2), the embedders and proj_out. `guidance_embedder` exists only in guidance-distilled
    # Flux.2 checkpoints (FLUX.2-dev), not in Klein: kept so that such a transformer gets it too.
    lora_targets = (
        "to_q",
        "to_k",
        "to_v",
        "to_out.0",
        "add_q_proj",
        "add_k_proj",
        "add_v_proj",
        "to_add_out",
        "ff.linear_in",
        "ff.linear_out",
        "ff_context.linear_in",
        "ff_context.linear_out",
        "to_qkv_mlp_proj",
        "double_stream_modulation_img.linear",
        "double_stream_modulation_txt.linear",
        "single_stream_modulation.linear",
        "norm_out.linear",
        "proj_out",
        "x_embedder",
        "context_embedder",
        "time_guidance_embed.timestep_embedder.linear_1",
        "time_guidance_embed.timestep_embedder.linear_2",
        "time_guidance_embed.guidance_embedder.linear_1",
        "time_guidance_embed.guidance_embedder.linear_2",
    )
    guidance = "cfg"
    lora_scale_kwarg = "attention_kwargs"
    # 4 steps: what BFL's own distillation of Klein samples with, the baseline a Klein student is held against.
    # Shift 9.9 = e^μ with the pipeline's μ = compute_empirical_mu(image_seq_len=4096, num_steps=4) = 2.29 at
    # 1024² (4096 tokens): the stock pipeline's own 4-step grid there (the base model's 50-step grid has
    # e^μ = 7.6). CFG 4.0: the pipeline's default for the base model, in its convention v_u + w·(v_c − v_u).
    default_settings = {"num_inference_steps": 4, "shift": 9.9, "guidance_scale": 4.0, "lora_scale": 1.0}
    max_grad_norm = 10.0  # no SCFM reference for Flux.2; the method's Flux value
    dynamic_shift_prob = 0.1  # the real scheduler shifts dynamically, with the pipeline's μ (see grid_defaults)
    latent_patch = 16  # VAE factor 8 × 2×2 patchify (transformer patch_size 1)
    tiny_resolution = 16  # the tiny VAE does not downsample: 16×16 latents, 8×8 = 64 image tokens

    @property
    def grid_defaults(self) -> dict[str, float | int]:
        """The dynamically shifted training grids use the pipeline's own μ, not FLUX.1's line: Klein's
        ``compute_empirical_mu(image_seq_len, num_steps)`` is, at the default step count, linear in the image
        tokens up to 4300 (1.97 at 256 tokens → 2.29 at 4096, i.e. shift 7.1 → 9.9); this is that line."""
        from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

        steps = int(self.default_settings["num_inference_steps"])
        line = {"base_image_seq_len": 256, "max_image_seq_len": 4096}
        line["base_shift"] = compute_empirical_mu(line["base_image_seq_len"], steps)
        line["max_shift"] = compute_empirical_mu(line["max_image_seq_len"], steps)
        return {**super().grid_defaults, **line}

    def lora_target_modules(self, transformer: torch.nn.Module) -> list[str]:
        """The reference targets plus ``single_transformer_blocks.{i}.attn.to_out`` for every single block."""
        blocks = getattr(getattr(transformer, "module", transformer), "single_transformer_blocks", ())
        single_out = [f"single_transformer_blocks.{i}.attn.to_out" for i in range(len(blocks))]
        return [*super().lora_target_modules(transformer), *single_out]

    # ---------------------------------------------------------------------------------------------------
    # Text and images
    # ---------------------------------------------------------------------------------------------------
    def encode_prompts(self, pipeline, prompts, max_sequence_length, device=None):
        """``prompt_embeds`` ``(B, max_sequence_length, 3·hidden)`` float32: the pipeline's own encoding (chat
        template, Qwen3 layers ``text_encoder_out_layers`` concatenated), padded to ``max_sequence_length``."""
        embeds, _ = pipeline.encode_prompt(
            prompt=list(prompts), device=device, max_sequence_length=max_sequence_length
        )
        return {"prompt_embeds": embeds.float()}

    def encode_images(self, vae, pixels, generator=None):
        """VAE latents as the pipeline's ``latents=`` takes them: patchified and batch-norm normalised.

        Returns:
            ``(B, 4·C, H/(2f), W/(2f))`` float32 (``(B, 128, H/16, W/16)`` for the real VAE).
        """
        pixels = pixels.to(device=vae.device, dtype=vae.dtype)
        latents = vae.encode(pixels).latent_dist.sample(generator=generator).float()
        return self._normalise(vae, self.pipeline_class._patchify_latents(latents))

    def pipeline_latents_to_model_space(self, vae: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
        """The pipeline's ``output_type="latent"`` result ``(B, C, h, w)`` (raw VAE latents) → model space.

        Inverse of the pipeline's de-normalisation and unpatchify; its output is in the layout of
        :meth:`encode_images` and ``latents=``.
        """
        return self._normalise(vae, self.pipeline_class._patchify_latents(latents.float()))

    @staticmethod
    def _normalise(vae: torch.nn.Module, patchified: torch.Tensor) -> torch.Tensor:
        """``(z − running_mean) / sqrt(running_var + eps)`` per patchified channel, in float32."""
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(patchified.device, torch.float32)
        var = vae.bn.running_var.view(1, -1, 1, 1).to(patchified.device, torch.float32)
        return (patchified - mean) / torch.sqrt(var + vae.config.batch_norm_eps)

    def image_seq_len(self, latents):
        """One image token per position of the (already patchified) cached latents."""
        return latents.shape[-2] * latents.shape[-1]

    # ---------------------------------------------------------------------------------------------------
    # Velocity
    # ---------------------------------------------------------------------------------------------------
    def velocity_fn(self, model, text, latent_shape, *, uncond, cfg_scale: float, **_):
        """The pipeline's velocity: packed tokens in, ``σ`` as the timestep, CFG as ``v_u + w·(v_c − v_u)``
        for ``w > 1`` (else the conditional pass alone, as the pipeline), unpacked back to ``(B', 4C, h, w)``."""
        pipeline_class = self.pipeline_class
        embeds, null = text["prompt_embeds"], uncond["prompt_embeds"]
        _, channels, height, width = latent_shape
        img_ids = pipeline_class._prepare_latent_ids(torch.empty(1, 1, height, width, device="meta"))
        txt_ids = pipeline_class._prepare_text_ids(embeds[:1])  # one row: the transformer uses ids[0] anyway
        use_cfg = cfg_scale > 1  # the pipeline's do_classifier_free_guidance

        def velocity(x, sigma, rows):
            dtype, n = model_dtype(model), len(rows)
            tokens = pipeline_class._pack_latents(x)  # (B', h·w, 4C)
            captions = embeds[rows]
            if use_cfg:  # [cond; uncond] in one batch: the pipeline's two passes
                tokens, sigma, captions = (
                    torch.cat([tokens, tokens]),
                    torch.cat([sigma, sigma]),
                    torch.cat([captions, null.expand(n, -1, -1)]),
                )
            out = model(
                hidden_states=tokens.to(dtype),
                timestep=sigma.to(dtype),  # the pipeline's t/1000
                guidance=None,
                encoder_hidden_states=captions.to(dtype),
                txt_ids=txt_ids.to(x.device),
                img_ids=img_ids.to(x.device),
                return_dict=False,
            )[0].float()
            if use_cfg:
                cond, null_out = out.chunk(2)
                out = null_out + cfg_scale * (cond - null_out)
            return out.permute(0, 2, 1).reshape(n, channels, height, width)

        return velocity

    # ---------------------------------------------------------------------------------------------------
    # Tests
    # ---------------------------------------------------------------------------------------------------
    def tiny_pipeline(self, config=None, *, pipeline_class=None):
        """A tiny real ``Flux2KleinPipeline`` (the base model: ``is_distilled=False``, CFG).

        Sizes from diffusers' own Klein tests: ``num_layers`` double and ``num_single_layers`` single blocks;
        a Qwen3 ``text_dim`` wide with as many layers as the pipeline's deepest ``text_encoder_out_layers``
        (27), so the stock layer choice works; a byte-level Qwen2 tokenizer with Qwen3's chat template; a
        one-block Flux.2 VAE with random batch-norm statistics (so that the normalisation matters) and the
        real scheduler config (FLUX.1-dev's: dynamic shift, the pipeline passes μ).
        """
        from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel
        from transformers import Qwen3Config, Qwen3ForCausalLM

        from ..testing import TinyModelConfig, byte_level_qwen2_tokenizer

        config = config or TinyModelConfig()
        axes = tuple(config.axes_dims_rope)
        if len(axes) != 4:  # Flux.2 ropes four axes (t, h, w, l); split the head evenly
            axes = (config.attention_head_dim // 4,) * 4
        if sum(axes) != config.attention_head_dim or any(a % 2 for a in axes):
            raise ValueError(f"Flux.2 needs 4 even rope axes summing to attention_head_dim, got {axes}.")
        out_layers = inspect.signature(self.pipeline_class.__call__).parameters["text_encoder_out_layers"].default
        latent_channels = config.latent_channels or 1
        torch.manual_seed(config.seed)
        transformer = Flux2Transformer2DModel(
            patch_size=1,
            in_channels=4 * latent_channels,
            num_layers=config.num_layers,
            num_single_layers=config.num_single_layers,
            attention_head_dim=config.attention_head_dim,
            num_attention_heads=config.num_attention_heads,
            joint_attention_dim=len(out_layers) * config.text_dim,
            timestep_guidance_channels=256,
            axes_dims_rope=axes,
            guidance_embeds=False,
        )
        tokenizer = byte_level_qwen2_tokenizer(chat_template=QWEN3_CHAT_TEMPLATE)
        text_encoder = Qwen3ForCausalLM(
            Qwen3Config(
                vocab_size=len(tokenizer),
                hidden_size=config.text_dim,
                intermediate_size=2 * config.text_dim,
                num_hidden_layers=max(config.text_layers, *out_layers),
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=config.text_dim // 4,
                max_position_embeddings=tokenizer.model_max_length,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        )
        vae = AutoencoderKLFlux2(
            sample_size=32,
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",),
            up_block_types=("UpDecoderBlock2D",),
            block_out_channels=(config.vae_channels,),
            layers_per_block=1,
            latent_channels=latent_channels,
            norm_num_groups=1,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
        with torch.no_grad():  # a trained VAE's statistics are not (0, 1): make the normalisation visible
            vae.bn.running_mean.copy_(0.5 * torch.randn(vae.bn.num_features))
            vae.bn.running_var.copy_(0.5 + torch.rand(vae.bn.num_features))
        scheduler = FlowMatchEulerDiscreteScheduler(
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        )
        for module in (transformer, text_encoder, vae):  # loaded modules are in eval mode: match them
            module.eval()
        return (pipeline_class or self.pipeline_class)(
            scheduler=scheduler,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            transformer=transformer,
            is_distilled=False,
        )
