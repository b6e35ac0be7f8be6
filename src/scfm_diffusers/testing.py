"""Tiny, real Flux and SD3 pipelines built offline, for tests, benchmarks and the demo.

Every model here is a real diffusers / transformers class with random weights; tokenizers are built from
in-memory vocabularies, so nothing is downloaded. The same builders take size arguments, so the demo can
build a larger (still small) teacher with the exact same code path.

Example:
    >>> from scfm_diffusers.testing import tiny_flux_pipeline
    >>> pipe = tiny_flux_pipeline()
    >>> image = pipe("a cat", num_inference_steps=2, height=32, width=32, output_type="pt").images
    >>> tuple(image.shape)
    (1, 3, 32, 32)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

__all__ = [
    "TinyModelConfig",
    "byte_level_clip_tokenizer",
    "byte_level_qwen2_tokenizer",
    "character_t5_tokenizer",
    "save_tiny_pipeline",
    "tiny_flux_pipeline",
    "tiny_pipeline",
    "tiny_sd3_pipeline",
]


@dataclass
class TinyModelConfig:
    """Sizes of a tiny pipeline. The defaults are diffusers' own test sizes (a forward takes milliseconds).

    Attributes:
        num_layers: Dual-stream (MM-DiT) transformer blocks.
        num_single_layers: Single-stream blocks (Flux only).
        attention_head_dim: Per-head width; for Flux it must equal ``sum(axes_dims_rope)``.
        num_attention_heads: Attention heads.
        text_dim: Width of the text encoders (CLIP hidden size, T5 ``d_model``) = ``joint_attention_dim``.
        t5_dim: T5 ``d_model`` (= the transformer's ``joint_attention_dim``) if it differs from ``text_dim``;
            4096 gives FLUX.1-dev's text-embedding shape for memory tests, at a tiny cost (one thin layer).
        text_layers: Layers of each text encoder.
        vae_channels: Channels of the one-block VAE.
        latent_channels: VAE latent channels (Flux: 1 → 4 packed channels; SD3: 4).
        guidance_embeds: Flux only: give the transformer a guidance embedding (like Flux.1-dev).
        axes_dims_rope: Flux rotary dimensions per axis.
        seed: Seed of the random weights.
    """

    num_layers: int = 1
    num_single_layers: int = 1
    attention_head_dim: int = 16
    num_attention_heads: int = 2
    text_dim: int = 32
    text_layers: int = 2
    t5_dim: int | None = None
    vae_channels: int = 4
    latent_channels: int | None = None
    guidance_embeds: bool = False
    axes_dims_rope: tuple[int, int, int] = (4, 4, 8)
    seed: int = 0
    extra: dict = field(default_factory=dict)


def byte_level_clip_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """A CLIP BPE tokenizer over raw bytes (no merges): it can encode any text, one token per byte."""
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = sorted(ByteLevel.alphabet())
    tokens = ["<|startoftext|>", "<|endoftext|>"] + alphabet + [a + "</w>" for a in alphabet]
    vocab = {token: index for index, token in enumerate(tokens)}
    # transformers 5.x wants merges as tuples; no merges at all keeps one token per byte.
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)


#: A Qwen-style chat template (what Qwen2.5-VL / Qwen3 tokenizers ship, less tools and thinking blocks).
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
QWEN_SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>")


def byte_level_qwen2_tokenizer(model_max_length: int = 1024, chat_template: str = QWEN_CHAT_TEMPLATE):
    """A byte-level BPE ``Qwen2Tokenizer`` (no merges: one token per byte) with Qwen's special tokens and a
    chat template: it serves the Qwen2.5-VL (Qwen-Image) and Qwen3 (Flux.2 Klein, Z-Image) text encoders.

    ``<|endoftext|>`` is the pad/eos token, as in Qwen's own tokenizers.
    """
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2Tokenizer

    vocab = {token: index for index, token in enumerate(sorted(ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIAL_TOKENS)})
    tokenizer.chat_template = chat_template
    return tokenizer


def character_t5_tokenizer() -> T5Tokenizer:
    """A Unigram T5 tokenizer over printable ASCII characters (pad=0, eos=1, unk=2)."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)]
    pieces += [(chr(code), -2.0) for code in range(33, 127)]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def _clip_text_config(tokenizer: CLIPTokenizer, config: TinyModelConfig) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.text_dim,
        intermediate_size=2 * config.text_dim,
        num_hidden_layers=config.text_layers,
        num_attention_heads=4,
        projection_dim=config.text_dim,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        hidden_act="gelu",
    )


def _t5_encoder(
    tokenizer: T5Tokenizer,
    config: TinyModelConfig,
    *,
    config_class: type = T5Config,
    model_class: type = T5EncoderModel,
) -> T5EncoderModel:
    """A tiny T5 encoder (or another class with T5's config keys: ``UMT5Config`` / ``UMT5EncoderModel`` for Wan)."""
    t5_config = config_class(
        vocab_size=len(tokenizer),
        d_model=config.t5_dim or config.text_dim,
        d_ff=2 * config.text_dim,
        d_kv=8,
        num_heads=4,
        num_layers=config.text_layers,
        relative_attention_num_buckets=8,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
        dropout_rate=0.0,
    )
    return model_class(t5_config).eval()


def _vae(
    config: TinyModelConfig, latent_channels: int, *, scaling_factor: float = 1.5035, shift_factor: float = 0.0609
) -> AutoencoderKL:
    """A one-block ``AutoencoderKL`` that does not downsample, with a family's latent normalisation."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(config.vae_channels,),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=shift_factor,
        scaling_factor=scaling_factor,
    )


def tiny_flux_pipeline(config: TinyModelConfig | None = None, *, pipeline_class: type = FluxPipeline) -> FluxPipeline:
    """Build a tiny real :class:`~diffusers.FluxPipeline` (or a subclass given by ``pipeline_class``).

    The scheduler is the stock Flux one (``use_dynamic_shifting=True``), as in Flux.1-dev.
    """
    config = config or TinyModelConfig()
    if sum(config.axes_dims_rope) != config.attention_head_dim:
        raise ValueError(
            f"sum(axes_dims_rope)={sum(config.axes_dims_rope)} must equal attention_head_dim={config.attention_head_dim}."
        )
    latent_channels = config.latent_channels or 1
    torch.manual_seed(config.seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * latent_channels,
        num_layers=config.num_layers,
        num_single_layers=config.num_single_layers,
        attention_head_dim=config.attention_head_dim,
        num_attention_heads=config.num_attention_heads,
        joint_attention_dim=config.t5_dim or config.text_dim,
        pooled_projection_dim=config.text_dim,
        guidance_embeds=config.guidance_embeds,
        axes_dims_rope=list(config.axes_dims_rope),
    )
    tokenizer = byte_level_clip_tokenizer()
    text_encoder = CLIPTextModel(_clip_text_config(tokenizer, config))
    tokenizer_2 = character_t5_tokenizer()
    text_encoder_2 = _t5_encoder(tokenizer_2, config)
    vae = _vae(config, latent_channels)
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    # Freshly built modules are in train mode; loaded ones are in eval mode. Match the loaded state.
    for module in (transformer, text_encoder, vae):
        module.eval()
    return pipeline_class(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )


def tiny_sd3_pipeline(
    config: TinyModelConfig | None = None, *, pipeline_class: type = StableDiffusion3Pipeline
) -> StableDiffusion3Pipeline:
    """Build a tiny real :class:`~diffusers.StableDiffusion3Pipeline` (or a subclass).

    The scheduler is the stock SD3 one (fixed shift 3.0).
    """
    config = config or TinyModelConfig()
    latent_channels = config.latent_channels or 4
    torch.manual_seed(config.seed)
    transformer = SD3Transformer2DModel(
        sample_size=32,
        patch_size=1,
        in_channels=latent_channels,
        out_channels=latent_channels,
        num_layers=config.num_layers,
        attention_head_dim=config.attention_head_dim // 2,
        num_attention_heads=2 * config.num_attention_heads,
        caption_projection_dim=config.text_dim,
        joint_attention_dim=config.t5_dim or config.text_dim,
        pooled_projection_dim=2 * config.text_dim,
    )
    tokenizer = byte_level_clip_tokenizer()
    text_encoder = CLIPTextModelWithProjection(_clip_text_config(tokenizer, config))
    text_encoder_2 = CLIPTextModelWithProjection(_clip_text_config(tokenizer, config))
    tokenizer_3 = character_t5_tokenizer()
    text_encoder_3 = _t5_encoder(tokenizer_3, config)
    vae = _vae(config, latent_channels)
    for module in (transformer, text_encoder, text_encoder_2, vae):
        module.eval()
    return pipeline_class(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=byte_level_clip_tokenizer(),
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )


def tiny_pipeline(family: str, config: TinyModelConfig | None = None, **kwargs):
    """Build the tiny pipeline of ``family`` (any name of :data:`scfm_diffusers.families.FAMILIES`)."""
    from .families import get_family

    return get_family(family).tiny_pipeline(config, **kwargs)


def save_tiny_pipeline(family: str, directory: str | os.PathLike, config: TinyModelConfig | None = None) -> str:
    """Build a tiny pipeline and ``save_pretrained`` it to ``directory``; returns the directory as a string.

    The folder loads back with ``FluxPipeline.from_pretrained(directory)`` (or the SD3 class) offline.
    """
    pipe = tiny_pipeline(family, config)
    pipe.save_pretrained(directory)
    return str(directory)
