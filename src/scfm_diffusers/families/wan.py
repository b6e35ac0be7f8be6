"""Wan 2.1 / 2.2 text-to-video: a 3-D DiT over video latents, UMT5 prompts, CFG, and (2.2) two experts.

Time and velocity: ``WanPipeline`` passes the scheduler's raw timesteps (``t = 1000·σ``) to the transformer and
its output is the flow velocity ``ε − x0`` of the latents (``prediction_type="flow_prediction"``), so the
objective's convention holds with ``timestep = 1000·σ``. Its default scheduler is UniPC; the SCFM scheduler
(Euler on the SCFM grid) replaces it in an SCFM pipeline, and diffusers' pipeline loop works unchanged with it.

Guidance is CFG against the empty prompt (the pipeline's default negative prompt), kept by the student as for
SD3: each velocity is ``v_u + w·(v_c − v_u)`` from one batched forward of both halves.

Latents: ``AutoencoderKLWan`` compresses 4× in time and 8× in space (``num_frames`` must be ``4k + 1``: latent
frames ``(num_frames − 1)/4 + 1``) and is normalised per channel with ``latents_mean`` / ``latents_std``; the
transformer patchifies 1×2×2. The cache stores ``(C, F', h, w)`` per clip; an image is a one-frame clip.

Wan 2.2 A14B has two experts: ``transformer`` denoises ``t ≥ boundary_ratio·1000`` (high noise) and
``transformer_2`` the rest. Training wraps them in :class:`WanExperts`, one module that routes every row of a
call to the expert its σ belongs to, exactly as the pipeline does per step: each expert's LoRA is trained on its
own σ range (and the targets cross the boundary as sampling does). The adapter folder holds one weights file
per expert, in the format stock ``WanPipeline.load_lora_weights`` reads, ``transformer_2``'s with
``load_into_transformer_2=True``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import Family, LoraExperts, model_dtype

__all__ = ["WanExperts", "WanFamily"]

# Modules of WanTransformer3DModel, mirroring the method's Flux targets: self- and cross-attention q/k/v/out, the
# feed-forward layers, the time/text condition embedders (the AdaLN modulation is `time_proj`) and the output
# projection. The patch embedding is a Conv3d and stays frozen.
WAN_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
WAN_FEED_FORWARD = ("ffn.net.0.proj", "ffn.net.2")
WAN_EMBEDDERS = (
    "condition_embedder.time_embedder.linear_1",
    "condition_embedder.time_embedder.linear_2",
    "condition_embedder.time_proj",
    "condition_embedder.text_embedder.linear_1",
    "condition_embedder.text_embedder.linear_2",
)

#: Wan 2.1 T2V's scheduler (``Wan-AI/Wan2.1-T2V-14B-Diffusers``, ``scheduler/scheduler_config.json``; 480p shift).
WAN_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "prediction_type": "flow_prediction",
    "use_flow_sigmas": True,
    "flow_shift": 3.0,
}

#: Wan 2.2 A14B's ``boundary_ratio`` (``model_index.json``): the high-noise expert takes t ≥ 875.
WAN22_BOUNDARY_RATIO = 0.875

#: File of ``transformer_2``'s LoRA in an adapter folder (``transformer``'s is the usual one).
TRANSFORMER_2_WEIGHTS_NAME = "pytorch_lora_weights_transformer_2.safetensors"


class WanExperts(LoraExperts):
    """Wan 2.2's two experts as the one module training sees: ``transformer`` for ``t ≥ boundary_timestep``,
    ``transformer_2`` below, per row of each call.

    peft adapters go on both experts alike (:meth:`add_adapter`), so the student, its EMAs and the teacher
    (adapters disabled) each have one weight set per expert; every LoRA tensor's name starts with the expert's.

    Sharded by FSDP2, every rank runs the same experts in every call (a rank without rows for an expert runs it on
    one row and discards it), since a sharded expert gathers its weights collectively. Under DDP an expert that no
    row of a step needs is an unused parameter set (the script sets ``find_unused_parameters``).

    Args:
        transformer: The high-noise expert.
        transformer_2: The low-noise expert.
        boundary_timestep: ``boundary_ratio · num_train_timesteps`` (875 for Wan 2.2 A14B).

    Example:
        >>> from scfm_diffusers.families import get_family
        >>> from scfm_diffusers.testing import TinyModelConfig
        >>> wan = get_family("wan")
        >>> pipe = wan.tiny_pipeline(TinyModelConfig(extra={"boundary_ratio": 0.875}))
        >>> experts = wan.trained_module(pipe)
        >>> type(experts).__name__, experts.boundary_timestep
        ('WanExperts', 875.0)
    """

    weight_names = {"transformer": None, "transformer_2": TRANSFORMER_2_WEIGHTS_NAME}

    def __init__(self, transformer: nn.Module, transformer_2: nn.Module, boundary_timestep: float) -> None:
        super().__init__()
        self.transformer = transformer
        self.transformer_2 = transformer_2
        self.boundary_timestep = float(boundary_timestep)

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_kwargs: dict[str, Any] | None = None,
        return_dict: bool = False,
    ) -> tuple[torch.Tensor]:
        """The velocity of each row from its expert: ``(output,)`` as the transformer's ``return_dict=False``."""
        high = timestep >= self.boundary_timestep
        needed = torch.stack([high.any(), (~high).any()]).to(torch.int32)
        if self._sharded():  # every rank runs the experts any rank needs: their weights are gathered collectively
            torch.distributed.all_reduce(needed, op=torch.distributed.ReduceOp.MAX)
        output = None
        for expert, rows, is_needed in ((self.transformer, high, needed[0]), (self.transformer_2, ~high, needed[1])):
            if not is_needed:
                continue
            index = rows.nonzero().flatten()
            run = index if len(index) else torch.zeros(1, dtype=torch.long, device=timestep.device)
            out = expert(
                hidden_states=hidden_states[run],
                timestep=timestep[run],
                encoder_hidden_states=encoder_hidden_states[run],
                attention_kwargs=attention_kwargs,
                return_dict=False,
            )[0]
            if output is None:
                output = out.new_zeros((len(hidden_states), *out.shape[1:]))
            if len(index):
                output = output.index_copy(0, index, out)
            else:  # a row run only to keep ranks in step: its output is dropped, its graph kept (zero gradient)
                output = output + 0 * out.sum()
        return (output,)

    def _sharded(self) -> bool:
        """Whether FSDP2 shards these experts (then every rank must make the same forward passes). Under DDP the
        weights are whole on every rank and an expert left out of a step is one of DDP's unused parameters."""
        try:
            from torch.distributed.fsdp import FSDPModule
        except ImportError:  # a torch without distributed support
            return False
        return any(isinstance(module, FSDPModule) for module in (self, *self.experts().values()))


class WanFamily(Family):
    """Wan 2.1 / 2.2 text-to-video: ``WanPipeline`` with ``WanTransformer3DModel`` (one or two experts)."""

    name = "wan"
    pipeline_class_name = "WanPipeline"
    transformer_class_name = "WanTransformer3DModel"
    text_encoder_names = ("text_encoder",)
    lora_targets = (*WAN_ATTENTION, *WAN_FEED_FORWARD, *WAN_EMBEDDERS, "proj_out")
    guidance = "cfg"
    lora_scale_kwarg = "attention_kwargs"
    modality = "video"
    # 4 steps: what the public few-step Wan LoRAs (Lightning) sample with. Shift 5.0: Wan's own 720p flow shift,
    # larger than its 480p 3.0 as few-step grids want (as for SD3/Qwen-Image). CFG 5.0: WanPipeline's default; the
    # student is sampled with the scale it was trained with (both experts: guidance_scale_2 follows it).
    default_settings = {"num_inference_steps": 4, "shift": 5.0, "guidance_scale": 5.0, "lora_scale": 1.0}
    max_grad_norm = 1.0
    latent_patch = 16  # VAE factor 8 × patch 2
    frame_multiple = 4  # num_frames = 4k + 1
    tiny_resolution = 32
    tiny_num_frames = 5

    # ---------------------------------------------------------------------------------------------------
    # The trained module (one or two experts)
    # ---------------------------------------------------------------------------------------------------
    def trained_module(self, pipeline: Any) -> nn.Module:
        """``pipeline.transformer`` (Wan 2.1), or :class:`WanExperts` of both (Wan 2.2, ``boundary_ratio`` set)."""
        transformer_2 = getattr(pipeline, "transformer_2", None)
        ratio = getattr(pipeline.config, "boundary_ratio", None)
        if transformer_2 is None:
            return pipeline.transformer
        if ratio is None:
            raise ValueError(
                "This WanPipeline has a transformer_2 but no boundary_ratio, so no σ decides between the experts: "
                "set pipeline.register_to_config(boundary_ratio=...) (Wan 2.2 A14B: 0.875)."
            )
        return WanExperts(pipeline.transformer, transformer_2, ratio * pipeline.scheduler.config.num_train_timesteps)

    # ---------------------------------------------------------------------------------------------------
    # Text and video
    # ---------------------------------------------------------------------------------------------------
    def encode_prompts(self, pipeline, prompts, max_sequence_length, device=None):
        """``prompt_embeds`` (B, max_sequence_length, D) float32: UMT5's last hidden state, zero past each prompt
        (the transformer takes no mask), as ``WanPipeline.encode_prompt`` makes it."""
        embeds, _ = pipeline.encode_prompt(
            prompt=prompts, do_classifier_free_guidance=False, max_sequence_length=max_sequence_length, device=device
        )
        return {"prompt_embeds": embeds.float()}

    def encode_images(self, vae, pixels, generator=None):
        """Video latents of ``AutoencoderKLWan``, normalised per channel: ``(z − latents_mean)/latents_std``.

        Args:
            vae: An ``AutoencoderKLWan``.
            pixels: Clips ``(B, 3, F, H, W)`` (``F = 4k + 1``) or images ``(B, 3, H, W)`` (one-frame clips), in
                [-1, 1].
            generator: For the posterior sample: one, or one per row.

        Returns:
            ``(B, z_dim, (F − 1)/4 + 1, H/8, W/8)`` float32.
        """
        if pixels.dim() == 4:
            pixels = pixels.unsqueeze(2)
        pixels = pixels.to(device=vae.device, dtype=vae.dtype)
        latents = vae.encode(pixels).latent_dist.sample(generator=generator).float()
        mean = torch.tensor(vae.config.latents_mean, device=latents.device).view(1, -1, 1, 1, 1)
        std = torch.tensor(vae.config.latents_std, device=latents.device).view(1, -1, 1, 1, 1)
        return (latents - mean) / std

    def image_seq_len(self, latents: torch.Tensor) -> int:
        """Video tokens of one sample: latent frames × (h/2) × (w/2)."""
        return latents.shape[-3] * latents.shape[-2] * latents.shape[-1] // 4

    def check_num_frames(self, num_frames: int) -> None:
        """Refuse a frame count the VAE cannot encode (``4k + 1``), naming the nearest valid ones."""
        if num_frames < 1 or (num_frames - 1) % self.frame_multiple:
            low = max(1, (num_frames - 1) // self.frame_multiple * self.frame_multiple + 1)
            raise ValueError(
                f"Wan needs num_frames = 4k + 1 (its VAE compresses 4 frames into one after the first), got "
                f"{num_frames}: use {low} or {low + self.frame_multiple} (81 is Wan's default)."
            )

    # ---------------------------------------------------------------------------------------------------
    # Velocity
    # ---------------------------------------------------------------------------------------------------
    def velocity_fn(self, model, text, latent_shape, *, uncond, cfg_scale: float = 1.0, **_):
        """CFG velocity as ``WanPipeline.__call__`` combines it (the conditional alone when the scale is ≤ 1,
        where the pipeline turns CFG off), from one batched forward of both halves; ``timestep = 1000·σ``."""
        embeds, null_embeds = text["prompt_embeds"], uncond["prompt_embeds"]
        cfg = cfg_scale > 1

        def velocity(x, sigma, rows):
            dtype, n = model_dtype(model), len(rows)
            hidden, timestep, states = x, sigma * 1000, embeds[rows]
            if cfg:
                hidden, timestep = torch.cat([x, x]), torch.cat([timestep, timestep])
                states = torch.cat([states, null_embeds.expand(n, -1, -1)])
            out = model(
                hidden_states=hidden.to(dtype),
                timestep=timestep.float(),  # as the pipeline passes it: the experts' boundary is routed exactly
                encoder_hidden_states=states.to(dtype),
                return_dict=False,
            )[0].float()
            if not cfg:
                return out
            cond, null = out.chunk(2)
            return null + cfg_scale * (cond - null)

        return velocity

    # ---------------------------------------------------------------------------------------------------
    # Tests
    # ---------------------------------------------------------------------------------------------------
    def tiny_pipeline(self, config=None, *, pipeline_class=None):
        """A tiny real ``WanPipeline``: a UMT5 encoder, a Wan VAE that compresses 4× in time and space, UniPC.

        ``config.extra["boundary_ratio"]`` (e.g. 0.875) builds Wan 2.2's two experts (``transformer_2`` from
        another seed). The VAE downsamples 4× spatially (Wan's is 8×), so ``tiny_resolution`` 32 gives 8×8 latents
        and 4×4 tokens per latent frame; ``tiny_num_frames`` 5 gives 2 latent frames.
        """
        from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
        from transformers import UMT5Config, UMT5EncoderModel

        from ..testing import TinyModelConfig, _t5_encoder, character_t5_tokenizer

        config = config or TinyModelConfig()
        pipeline_class = pipeline_class or self.pipeline_class
        channels = config.latent_channels or 4
        boundary_ratio = config.extra.get("boundary_ratio")
        torch.manual_seed(config.seed)
        tokenizer = character_t5_tokenizer()

        def transformer() -> WanTransformer3DModel:
            return WanTransformer3DModel(
                patch_size=(1, 2, 2),
                num_attention_heads=config.num_attention_heads,
                attention_head_dim=config.attention_head_dim,
                in_channels=channels,
                out_channels=channels,
                text_dim=config.t5_dim or config.text_dim,  # the encoder's width (_t5_encoder)
                freq_dim=32,
                ffn_dim=2 * config.num_attention_heads * config.attention_head_dim,
                num_layers=config.num_layers,
                cross_attn_norm=True,
                qk_norm="rms_norm_across_heads",
                rope_max_seq_len=32,
            ).eval()

        first = transformer()
        second = transformer() if boundary_ratio is not None else None  # the next draws: other weights
        text_encoder = _t5_encoder(tokenizer, config, config_class=UMT5Config, model_class=UMT5EncoderModel)
        vae = AutoencoderKLWan(
            base_dim=config.vae_channels,
            z_dim=channels,
            dim_mult=[1, 1, 1],
            num_res_blocks=1,
            temperal_downsample=[True, True],  # 4× in time and (two stages) 4× in space
            scale_factor_temporal=4,
            scale_factor_spatial=4,
            # Not 0/1, so that the per-channel normalisation matters.
            latents_mean=torch.linspace(-0.5, 0.5, channels).tolist(),
            latents_std=torch.linspace(0.5, 2.0, channels).tolist(),
        ).eval()
        return pipeline_class(
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            vae=vae,
            scheduler=UniPCMultistepScheduler(**WAN_SCHEDULER_CONFIG),
            transformer=first,
            transformer_2=second,
            boundary_ratio=boundary_ratio,
        )
