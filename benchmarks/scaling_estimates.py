"""Memory and step-time estimates of SCFM LoRA training per model, setup and resolution, from the model configs.

Nothing is downloaded and no GPU is used. Each real transformer is built from its public ``config.json`` on the
meta device (shapes, no storage), which gives its exact parameter count, and the student LoRA is added with the
family's own targets (the training script's ``family.lora_target_modules``). One forward pass of the real input
shapes then runs on the meta device, in train mode, in bf16 with autocast emulated (accelerate's
``--mixed_precision bf16``), and is observed three ways:

- torch's FLOP formulas (``torch.utils.flop_counter``) count the matmul and convolution FLOPs, so every linear layer
  counts the tokens it sees in the model (AdaLN linears one vector per sample, text-stream linears the text tokens);
- ``scaled_dot_product_attention`` is replaced by a flash-attention stand-in that counts ``4·Lq·Lk·d`` per head
  and saves what flash attention saves for backward (q, k, v, output, log-sum-exp), not the Lq×Lk matrix;
- a saved-tensors hook adds up the activations autograd keeps for the backward (deduplicated, frozen weights
  excluded), per transformer block and outside the blocks, plus each block's inputs (what gradient
  checkpointing keeps instead).

The memory and time formulas built on these numbers are in docs/scaling.md (and in :func:`memory_per_gpu` and
:func:`step_flops`). Estimates, not measurements: ``benchmarks/gpu_train_step.py`` measures one GPU.

    python benchmarks/scaling_estimates.py --markdown                   # every model (the table of docs/scaling.md)
    python benchmarks/scaling_estimates.py --family wan --rank 32 --batch_size 1 --gradient_checkpointing \\
        --mfu 0.4 --markdown
    python benchmarks/scaling_estimates.py --models flux_dev --json estimates.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import diffusers
import torch
import torch.nn.functional as F
from peft import LoraConfig
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from scfm_diffusers.families import FAMILIES, get_family
from scfm_diffusers.training.config import DataArgs
from scfm_diffusers.training.quantization import QUANTIZATION_CHOICES
from scfm_diffusers.training.timesteps import GridSamplerConfig

GiB = 2**30
#: H100 SXM dense bf16 peak (the H200 has the same compute, more and faster memory).
H100_BF16_PEAK_FLOPS = 989e12
#: Backward FLOPs over forward FLOPs. Linear layers: the base is frozen, so only the input gradient (one matmul
#: as large as the forward's) is computed; the LoRA's own weight gradients are rank-r and left out. Attention:
#: flash attention's backward recomputes the scores and computes dQ, dK, dV: 5 matmuls against the forward's 2.
LINEAR_BACKWARD_RATIO = 1.0
ATTENTION_BACKWARD_RATIO = 2.5
#: A setup "fits" an 80 GB GPU when the estimate (what max_memory_allocated would show) stays under this, which
#: leaves ~3.5 GiB of the 79.6 GiB an H100 reports for the CUDA context, NCCL buffers and fragmentation.
FITS_LIMIT_GIB = 76.0


# -------------------------------------------------------------------------------------------------------------
# 1. The real models: public transformer configs (diffusers keys), encoders and VAEs
# -------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Resolution:
    """A training sample's size; ``frames > 1`` for video (Wan: ``4k + 1``)."""

    height: int
    width: int
    frames: int = 1

    @property
    def latent_frames(self) -> int:
        """Latent frames: 4× temporal compression after the first frame (Wan's VAE); 1 for images."""
        return (self.frames - 1) // 4 + 1

    @property
    def image_tokens(self) -> int:
        """Transformer tokens of the latents: VAE 8× then 2×2 patches, times the latent frames."""
        return self.latent_frames * (self.height // 16) * (self.width // 16)

    def __str__(self) -> str:
        size = f"{self.width}x{self.height}"
        return f"{size}x{self.frames}f" if self.frames > 1 else size


IMAGE_1024 = Resolution(1024, 1024)
WAN_480P = Resolution(480, 832, 81)
WAN_720P = Resolution(720, 1280, 81)


@dataclass(frozen=True)
class ModelSpec:
    """One real checkpoint: its family, transformer config and the other components' sizes.

    Attributes:
        name: Key of :data:`MODELS` (and of ``gpu_train_step.py --families``).
        title: The checkpoint, as people call it.
        family: The registered family it trains with (``flux2_dev`` borrows ``flux2klein``'s LoRA targets).
        config: The transformer's ``config.json`` values (diffusers keys; defaults omitted where they match).
        published_b: The size the model is published with (billions), the sanity check of the meta count.
        experts: Transformers resident at once (Wan 2.2 A14B: 2, one of them active per call).
        cfg: Whether every velocity is a CFG pair (None: the family's ``guidance == "cfg"``).
        text_dim: Width of the text tensor the transformer takes (``joint_attention_dim`` and the like).
        pooled_dim: Width of the pooled text vector, for families that take one.
        extra_text_tokens: Text tokens besides the ``--max_sequence_length`` ones (SD3: the 77 CLIP tokens).
        latent: ``(channels, downsampling)`` of the cached latents the family trains on.
        text_encoder: The text encoder(s) and their published sizes (freed after caching).
        vae_b: VAE parameters (billions; meta-device count of its diffusers class with the real config).
        resolutions: The training resolutions of the table.
        note: A footnote for the table.
    """

    name: str
    title: str
    family: str
    config: dict
    published_b: float
    text_dim: int
    text_encoder: str
    vae_b: float
    experts: int = 1
    cfg: bool | None = None
    pooled_dim: int | None = None
    extra_text_tokens: int = 0
    latent: tuple[int, int] = (16, 8)
    resolutions: tuple[Resolution, ...] = (IMAGE_1024,)
    note: str = ""

    @property
    def transformer_class(self) -> type:
        return get_family(self.family).transformer_class

    @property
    def uses_cfg(self) -> bool:
        return get_family(self.family).guidance == "cfg" if self.cfg is None else self.cfg


FLUX1_DEV = {  # black-forest-labs/FLUX.1-dev, transformer/config.json
    "attention_head_dim": 128,
    "axes_dims_rope": [16, 56, 56],
    "guidance_embeds": True,
    "in_channels": 64,
    "joint_attention_dim": 4096,
    "num_attention_heads": 24,
    "num_layers": 19,
    "num_single_layers": 38,
    "patch_size": 1,
    "pooled_projection_dim": 768,
}
FLUX2 = {  # the Flux.2 transformer keys every size shares
    "attention_head_dim": 128,
    "axes_dims_rope": [32, 32, 32, 32],
    "in_channels": 128,
    "mlp_ratio": 3.0,
    "patch_size": 1,
    "rope_theta": 2000,
    "timestep_guidance_channels": 256,
}
WAN_14B = {  # Wan-AI/Wan2.1-T2V-14B-Diffusers; each expert of Wan2.2-T2V-A14B-Diffusers is the same
    "attention_head_dim": 128,
    "cross_attn_norm": True,
    "eps": 1e-06,
    "ffn_dim": 13824,
    "freq_dim": 256,
    "in_channels": 16,
    "num_attention_heads": 40,
    "num_layers": 40,
    "out_channels": 16,
    "patch_size": [1, 2, 2],
    "qk_norm": "rms_norm_across_heads",
    "rope_max_seq_len": 1024,
    "text_dim": 4096,
}
T5_XXL = "T5-XXL encoder 4.76B"
WAN_RESOLUTIONS = (WAN_480P, WAN_720P)

MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="flux_dev",
            title="FLUX.1-dev",
            family="flux",
            config=FLUX1_DEV,
            published_b=11.9,
            text_dim=4096,
            pooled_dim=768,
            text_encoder=f"{T5_XXL} + CLIP-L 0.12B",
            vae_b=0.084,
        ),
        ModelSpec(
            name="sd35_large",
            title="SD3.5 Large",
            family="sd3",
            config={  # stabilityai/stable-diffusion-3.5-large
                "attention_head_dim": 64,
                "caption_projection_dim": 2432,
                "in_channels": 16,
                "joint_attention_dim": 4096,
                "num_attention_heads": 38,
                "num_layers": 38,
                "out_channels": 16,
                "patch_size": 2,
                "pooled_projection_dim": 2048,
                "pos_embed_max_size": 192,
                "qk_norm": "rms_norm",
                "sample_size": 128,
            },
            published_b=8.1,
            text_dim=4096,
            pooled_dim=2048,
            extra_text_tokens=77,
            text_encoder=f"{T5_XXL} + CLIP-L 0.12B + CLIP-G 0.69B",
            vae_b=0.084,
        ),
        ModelSpec(
            name="qwen_image",
            title="Qwen-Image",
            family="qwenimage",
            config={  # Qwen/Qwen-Image
                "attention_head_dim": 128,
                "axes_dims_rope": [16, 56, 56],
                "guidance_embeds": False,
                "in_channels": 64,
                "joint_attention_dim": 3584,
                "num_attention_heads": 24,
                "num_layers": 60,
                "out_channels": 16,
                "patch_size": 2,
            },
            published_b=20.4,
            text_dim=3584,
            text_encoder="Qwen2.5-VL-7B 8.29B",
            vae_b=0.127,
        ),
        ModelSpec(
            name="flux2_dev",
            title="FLUX.2-dev",
            family="flux2klein",
            config={
                **FLUX2,
                "guidance_embeds": True,
                "joint_attention_dim": 15360,
                "num_attention_heads": 48,
                "num_layers": 8,
                "num_single_layers": 48,
            },
            published_b=32.0,
            cfg=False,  # guidance-distilled: embedded guidance, one pass per velocity
            text_dim=15360,
            latent=(128, 16),
            text_encoder="Mistral-Small-3.1-24B 24B",
            vae_b=0.084,
            note="no registered family (Flux2Pipeline): architecture estimate with the flux2klein LoRA targets",
        ),
        ModelSpec(
            name="flux2_klein_4b",
            title="FLUX.2 [klein] 4B",
            family="flux2klein",
            config={
                **FLUX2,
                "guidance_embeds": False,
                "joint_attention_dim": 7680,
                "num_attention_heads": 24,
                "num_layers": 5,
                "num_single_layers": 20,
            },
            published_b=4.0,
            text_dim=7680,
            latent=(128, 16),
            text_encoder="Qwen3-4B 4.02B",
            vae_b=0.084,
        ),
        ModelSpec(
            name="flux2_klein_9b",
            title="FLUX.2 [klein] 9B",
            family="flux2klein",
            config={
                **FLUX2,
                "guidance_embeds": False,
                "joint_attention_dim": 12288,
                "num_attention_heads": 32,
                "num_layers": 8,
                "num_single_layers": 24,
            },
            published_b=9.0,
            text_dim=12288,
            latent=(128, 16),
            text_encoder="Qwen3-8B 8.19B",
            vae_b=0.084,
        ),
        ModelSpec(
            name="z_image",
            title="Z-Image (Turbo / base)",
            family="zimage",
            config={  # Tongyi-MAI/Z-Image-Turbo
                "all_f_patch_size": [1],
                "all_patch_size": [2],
                "axes_dims": [32, 48, 48],
                "axes_lens": [1536, 512, 512],
                "cap_feat_dim": 2560,
                "dim": 3840,
                "in_channels": 16,
                "n_heads": 30,
                "n_kv_heads": 30,
                "n_layers": 30,
                "n_refiner_layers": 2,
                "norm_eps": 1e-05,
                "qk_norm": True,
                "rope_theta": 256.0,
                "t_scale": 1000.0,
            },
            published_b=6.2,
            text_dim=2560,
            text_encoder="Qwen3-4B 4.02B",
            vae_b=0.084,
        ),
        ModelSpec(
            name="chroma",
            title="Chroma1-HD",
            family="chroma",
            config={
                **{k: v for k, v in FLUX1_DEV.items() if k not in ("guidance_embeds", "pooled_projection_dim")},
                "approximator_hidden_dim": 5120,
                "approximator_layers": 5,
                "approximator_num_channels": 64,
            },
            published_b=8.9,
            text_dim=4096,
            text_encoder=T5_XXL,
            vae_b=0.084,
        ),
        ModelSpec(
            name="wan21_1.3b",
            title="Wan 2.1 T2V 1.3B",
            family="wan",
            config={**WAN_14B, "ffn_dim": 8960, "num_attention_heads": 12, "num_layers": 30},
            published_b=1.42,  # called "1.3B"; its checkpoint holds 1.42B parameters (5.68 GB in fp32)
            text_dim=4096,
            text_encoder="UMT5-XXL encoder 5.68B",
            vae_b=0.127,
            resolutions=WAN_RESOLUTIONS,
        ),
        ModelSpec(
            name="wan21_14b",
            title="Wan 2.1 T2V 14B",
            family="wan",
            config=WAN_14B,
            published_b=14.0,
            text_dim=4096,
            text_encoder="UMT5-XXL encoder 5.68B",
            vae_b=0.127,
            resolutions=WAN_RESOLUTIONS,
        ),
        ModelSpec(
            name="wan22_a14b",
            title="Wan 2.2 T2V A14B",
            family="wan",
            config=WAN_14B,
            published_b=14.0,  # per expert
            experts=2,
            text_dim=4096,
            text_encoder="UMT5-XXL encoder 5.68B",
            vae_b=0.127,
            resolutions=WAN_RESOLUTIONS,
            note="two 14B experts resident (one runs per row); a LoRA, its EMAs and optimizer state on each",
        ),
    )
}


def default_text_tokens() -> int:
    """The training script's ``--max_sequence_length`` default (the text tokens every family caches)."""
    return next(f.default for f in dataclasses.fields(DataArgs) if f.name == "max_sequence_length")


# -------------------------------------------------------------------------------------------------------------
# 2. Meta-device models: parameters and LoRA parameters
# -------------------------------------------------------------------------------------------------------------
def build_meta(spec: ModelSpec, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """One expert of ``spec``'s transformer on the meta device (no storage), in ``dtype``, frozen, eval mode."""
    with torch.device("meta"):
        model = spec.transformer_class.from_config(spec.config)
    return model.to(dtype).requires_grad_(False).eval()


def parameter_count(model: nn.Module) -> int:
    """Parameters of ``model`` (each tensor once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def linear_weight_count(model: nn.Module) -> int:
    """Parameters in ``nn.Linear`` weights: what a bitsandbytes quantizer stores in 4 or 8 bits."""
    return sum(m.weight.numel() for m in model.modules() if type(m) is nn.Linear)


def lora_parameter_count(model: nn.Module, targets: list[str], rank: int) -> int:
    """Parameters peft's LoRA adds at ``rank`` on the modules ``targets`` names (peft's suffix match).

    A linear ``(in → out)`` gets ``A: r×in`` and ``B: out×r``; a convolution gets ``A`` as a convolution to ``r``
    channels with the layer's kernel (``r·in·k…``) and ``B`` as a 1×1 convolution (``out·r``). No biases.

    Raises:
        TypeError: A target names a module that is neither (peft would refuse it too).
    """
    total = 0
    for name, module in model.named_modules():
        if not any(name == t or name.endswith("." + t) for t in targets):
            continue
        if isinstance(module, nn.Linear):
            total += rank * (module.in_features + module.out_features)
        elif isinstance(module, nn.modules.conv._ConvNd):
            total += rank * (module.in_channels // module.groups) * math.prod(module.kernel_size)
            total += module.out_channels * rank
        else:
            raise TypeError(f"LoRA target {name!r} is a {type(module).__name__}, not a linear or convolution.")
    return total


def blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks diffusers checkpoints one by one: the elements of the model's top-level ModuleLists
    (``transformer_blocks``, ``single_transformer_blocks``, ``blocks``, ``layers``, Z-Image's refiners)."""
    return [block for child in model.children() if isinstance(child, nn.ModuleList) for block in child]


@dataclass
class ModelCounts:
    """Sizes of one model (all experts)."""

    params: int
    linear_params: int
    lora_params: int
    largest_block_params: int
    largest_block_lora_params: int


def model_counts(spec: ModelSpec, model: nn.Module, rank: int) -> ModelCounts:
    """Parameter, quantizable and LoRA counts of ``spec`` (times its experts), from one meta expert."""
    targets = get_family(spec.family).lora_target_modules(model)
    block_sizes = [(parameter_count(b), lora_parameter_count(b, targets, rank)) for b in blocks(model)]
    largest = max(block_sizes)
    return ModelCounts(
        params=spec.experts * parameter_count(model),
        linear_params=spec.experts * linear_weight_count(model),
        lora_params=spec.experts * lora_parameter_count(model, targets, rank),
        largest_block_params=largest[0],
        largest_block_lora_params=largest[1],
    )


# -------------------------------------------------------------------------------------------------------------
# 3. One forward pass on the meta device: FLOPs and the activations autograd keeps
# -------------------------------------------------------------------------------------------------------------
def forward_inputs(spec: ModelSpec, model: nn.Module, resolution: Resolution, text_tokens: int) -> dict:
    """Keyword arguments of one batch-1 forward of the real shapes (meta tensors), per transformer class.

    The layouts are the families' (``velocity_fn``): packed 2×2 tokens for Flux, Chroma and Qwen-Image,
    patchified tokens for Flux.2, ``(C, h, w)`` for SD3, a list of ``(C, 1, h, w)`` for Z-Image, ``(C, F', h, w)``
    for Wan.
    """
    h, w = resolution.height // 8, resolution.width // 8
    tokens, length = resolution.image_tokens, text_tokens + spec.extra_text_tokens
    kind = spec.transformer_class.__name__
    config = model.config

    def empty(*shape):
        return torch.empty(*shape, device="meta", dtype=torch.bfloat16)

    text = empty(1, length, spec.text_dim)
    if kind in ("FluxTransformer2DModel", "ChromaTransformer2DModel"):
        inputs = {
            "hidden_states": empty(1, tokens, config.in_channels),
            "encoder_hidden_states": text,
            "timestep": empty(1),
            "img_ids": empty(tokens, 3),
            "txt_ids": empty(length, 3),
        }
        if kind == "FluxTransformer2DModel":
            inputs.update(
                pooled_projections=empty(1, spec.pooled_dim), guidance=empty(1) if config.guidance_embeds else None
            )
        return inputs
    if kind == "SD3Transformer2DModel":
        return {
            "hidden_states": empty(1, config.in_channels, h, w),
            "encoder_hidden_states": text,
            "pooled_projections": empty(1, spec.pooled_dim),
            "timestep": empty(1),
        }
    if kind == "QwenImageTransformer2DModel":
        return {
            "hidden_states": empty(1, tokens, config.in_channels),
            "encoder_hidden_states": text,
            "encoder_hidden_states_mask": None,
            "timestep": empty(1),
            "img_shapes": [[(1, h // 2, w // 2)]],
        }
    if kind == "Flux2Transformer2DModel":
        return {
            "hidden_states": empty(1, tokens, config.in_channels),
            "encoder_hidden_states": text,
            "timestep": empty(1),
            "guidance": empty(1) if config.guidance_embeds else None,
            "img_ids": empty(tokens, 4),
            "txt_ids": empty(length, 4),
        }
    if kind == "ZImageTransformer2DModel":
        return {"x": [empty(config.in_channels, 1, h, w)], "t": empty(1), "cap_feats": [text[0]]}
    if kind == "WanTransformer3DModel":
        latents = empty(1, config.in_channels, resolution.latent_frames, h, w)
        return {"hidden_states": latents, "timestep": empty(1), "encoder_hidden_states": text}
    raise NotImplementedError(f"No meta-device inputs for {kind}: add them to forward_inputs.")


class _FlashAttention(torch.autograd.Function):
    """Shapes and saved tensors of flash attention: q, k, v, the output and the (B, H, Lq) log-sum-exp."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, *_ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@dataclass
class ForwardProfile:
    """One batch-1 forward (one expert, no CFG doubling), in FLOPs and bytes.

    Attributes:
        matmul_flops: Linear and convolution FLOPs (LoRA included).
        attention_flops: ``4·Lq·Lk·d`` per head and attention call.
        saved_bytes: Activations autograd keeps for the backward, without gradient checkpointing.
        checkpointed_bytes: The same with gradient checkpointing: every block's inputs and what is saved outside
            the blocks, plus the largest block's saved activations (rebuilt while its backward runs).
        largest_block_saved_bytes: The largest block's saved activations.
        hidden_bytes: One ``tokens × hidden`` bf16 tensor, the unit of the per-block multiplier.
        num_blocks: Blocks checkpointed one by one.
    """

    matmul_flops: int
    attention_flops: int
    saved_bytes: int
    checkpointed_bytes: int
    largest_block_saved_bytes: int
    hidden_bytes: int
    num_blocks: int

    @property
    def block_multiplier(self) -> float:
        """The largest block's saved activations in ``tokens × hidden × 2 byte`` units."""
        return self.largest_block_saved_bytes / self.hidden_bytes


def _tensors(value) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


def _storage_key(t: torch.Tensor) -> torch.Tensor:
    while t._base is not None:  # a view keeps its base alive: count the base once
        t = t._base
    return t


@contextmanager
def _flash_attention(counter: list[int]) -> Iterator[None]:
    original = F.scaled_dot_product_attention

    def attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        heads = query.shape[:-2].numel()
        counter[0] += 4 * heads * query.shape[-2] * key.shape[-2] * query.shape[-1]
        if key.dim() == 4 and key.shape[-3] != query.shape[-3]:  # grouped-query attention: repeat the kv heads
            repeat = query.shape[-3] // key.shape[-3]
            key, value = key.repeat_interleave(repeat, -3), value.repeat_interleave(repeat, -3)
        return _FlashAttention.apply(query, key, value)

    F.scaled_dot_product_attention = attention
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


class _FlopCounter(TorchDispatchMode):
    """Matmul and convolution FLOPs by torch's own per-op formulas (``FlopCounterMode``'s, without its per-module
    bookkeeping, which triples the time of a meta forward)."""

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        count = flop_registry.get(func._overloadpacket)
        if count is not None:
            self.flops += count(*args, **kwargs, out_val=out)
        return out


class _MetaAutocast(torch.overrides.TorchFunctionMode):
    """What ``torch.autocast("cuda", dtype=torch.bfloat16)`` (accelerate's ``--mixed_precision bf16``) does to the
    ops of these models, for meta tensors, which autocast itself leaves alone.

    Matmuls and convolutions run in bf16 (so the fp32 LoRA's input is saved in bf16, as on the GPU); layer and group
    norms and softmax run in fp32 (so they save an fp32 copy of their input). The casts happen above autograd, as
    autocast's do, so the saved tensors are the cast ones.
    """

    LOWER = (
        F.linear,
        torch.matmul,
        torch.Tensor.matmul,
        torch.Tensor.__matmul__,
        torch.mm,
        torch.bmm,
        torch.baddbmm,
        torch.addmm,
        F.conv1d,
        F.conv2d,
        F.conv3d,
    )
    FP32 = (F.layer_norm, F.group_norm, F.softmax, F.log_softmax, torch.softmax, torch.Tensor.softmax)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        dtype = torch.bfloat16 if func in self.LOWER else torch.float32 if func in self.FP32 else None
        if dtype is not None:

            def cast(value):
                return value.to(dtype) if isinstance(value, torch.Tensor) and value.is_floating_point() else value

            args = tuple(cast(a) for a in args)
            kwargs = {k: cast(v) for k, v in kwargs.items()}
        return func(*args, **kwargs)


def profile_forward(spec: ModelSpec, model: nn.Module, resolution: Resolution, text_tokens: int) -> ForwardProfile:
    """Run one train-mode forward of ``model`` (a meta expert carrying its student LoRA) and measure it."""
    params = {id(p) for p in model.parameters()}
    found: dict[int, torch.Tensor] = {}  # id -> tensor, kept alive so that ids stay unique
    outside: set[int] = set()
    per_block: list[set[int]] = []
    inputs: set[int] = set()
    current: list[int | None] = [None]

    def key_of(t: torch.Tensor) -> int | None:
        base = _storage_key(t)
        if id(base) in params or isinstance(base, nn.Parameter) or not base.is_floating_point():
            return None
        found[id(base)] = base
        return id(base)

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = key_of(t)
        if key is not None:
            (outside if current[0] is None else per_block[current[0]]).add(key)
        return t

    def enter(index):
        def hook(module, args, kwargs):
            current[0] = index
            inputs.update(k for t in _tensors((args, kwargs)) if (k := key_of(t)) is not None)

        return hook

    def leave(module, args, output):
        current[0] = None

    handles = []
    for index, block in enumerate(blocks(model)):
        per_block.append(set())
        handles.append(block.register_forward_pre_hook(enter(index), with_kwargs=True))
        handles.append(block.register_forward_hook(leave))
    attention = [0]
    kwargs = forward_inputs(spec, model, resolution, text_tokens)
    try:
        with _flash_attention(attention), _FlopCounter() as flops, _MetaAutocast():
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                model(**kwargs, return_dict=False)
    finally:
        for handle in handles:
            handle.remove()

    def nbytes(keys) -> int:
        return sum(found[k].numel() * found[k].element_size() for k in keys)

    block_bytes = [nbytes(keys) for keys in per_block]
    hidden = next(m.in_features for name, m in model.named_modules() if name.endswith("to_q"))
    return ForwardProfile(
        matmul_flops=flops.flops,
        attention_flops=attention[0],
        saved_bytes=nbytes(set().union(outside, *per_block)),
        checkpointed_bytes=nbytes(outside | inputs) + max(block_bytes),
        largest_block_saved_bytes=max(block_bytes),
        hidden_bytes=resolution.image_tokens * hidden * 2,
        num_blocks=len(per_block),
    )


# -------------------------------------------------------------------------------------------------------------
# 4. Step time: the passes of one SCFM step
# -------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Settings:
    """The training setup of the estimates (the script's flags where it has one).

    Attributes:
        rank: LoRA rank.
        batch_size: Samples per GPU and step.
        gradient_checkpointing: Recompute each block in the backward (a family that refuses it trains without).
        use_8bit_adam: bitsandbytes AdamW8bit (2 bytes of Adam state per LoRA parameter instead of 8).
        mfu: Achieved share of the GPU's peak FLOP rate.
        peak_flops: The GPU's dense bf16 peak.
        text_tokens: ``--max_sequence_length``.
        flow_matching_ratio: Share of flow-matching rows (no target passes); the script's default.
        fits_gib: Memory under which a setup counts as fitting an 80 GB GPU.
    """

    rank: int = 32
    batch_size: int = 1
    gradient_checkpointing: bool = False
    use_8bit_adam: bool = False
    mfu: float = 0.4
    peak_flops: float = H100_BF16_PEAK_FLOPS
    text_tokens: int = field(default_factory=default_text_tokens)
    flow_matching_ratio: float = field(default_factory=lambda: GridSamplerConfig().flow_matching_ratio)
    fits_gib: float = FITS_LIMIT_GIB


def target_passes(flow_matching_ratio: float) -> float:
    """No-grad target forwards per sample, as ``scfm_loss`` runs them.

    A teacher row's first half-step is the teacher (adapters disabled), a self row's the fast EMA; the second
    half-step of both is ONE slow-EMA pass. So every SCFM row costs two forwards whatever ``teacher_ratio`` is, and
    a flow-matching row (target ``ε − x0``) none.
    """
    return 2.0 * (1.0 - flow_matching_ratio)


def step_flops(profile: ForwardProfile, cfg: bool, settings: Settings, checkpointing: bool) -> float:
    """FLOPs of one SCFM step per sample.

    ``c·[(n_target + 1 + k)·(F_mm + F_att) + F_mm·b_mm + F_att·b_att]`` with ``c = 2`` for CFG families (each
    velocity is one forward of the conditional and empty-prompt halves), ``n_target`` from :func:`target_passes`,
    one student forward, ``k = 1`` for the recomputation under gradient checkpointing, and the student's backward
    (:data:`LINEAR_BACKWARD_RATIO`, :data:`ATTENTION_BACKWARD_RATIO`).
    """
    forward = profile.matmul_flops + profile.attention_flops
    backward = LINEAR_BACKWARD_RATIO * profile.matmul_flops + ATTENTION_BACKWARD_RATIO * profile.attention_flops
    passes = target_passes(settings.flow_matching_ratio) + 1 + int(checkpointing)
    return (2 if cfg else 1) * (passes * forward + backward)


# -------------------------------------------------------------------------------------------------------------
# 5. Memory per GPU
# -------------------------------------------------------------------------------------------------------------
#: Column key -> header. DDP keeps the whole bf16 base on every GPU (``"1gpu"``, not a column: the same without
#: DDP's gradient buckets); FSDP2 over N GPUs shards the base, the adapters and the optimizer; nf4/int8 quantize the
#: base's linear weights (one GPU, ``--quantize_base``).
SETUPS = {"ddp": "DDP", "fsdp2_2": "FSDP2×2", "fsdp2_4": "FSDP2×4", "fsdp2_8": "FSDP2×8", "nf4": "nf4", "int8": "int8"}


def memory_per_gpu(
    counts: ModelCounts, profile: ForwardProfile, cfg: bool, settings: Settings, setup: str, checkpointing: bool
) -> dict[str, float]:
    """Bytes per GPU (what ``torch.cuda.max_memory_allocated`` would show), by part.

    - weights: ``2·P`` bf16 (DDP); ``2·P/N`` plus two unsharded blocks (the one running and the one prefetched,
      base bf16 + three fp32 adapters) under FSDP2; linear weights at the quantizer's bits per weight (nf4: 4.5
      with its fp32 absmax per 64; int8: 8) and the rest bf16 for a quantized base.
    - LoRA states: the student fp32 (4·R), two EMA adapters fp32 (8·R), its gradients fp32 (4·R), Adam's two
      moments (8·R; 8-bit Adam 2·R); DDP adds its gradient buckets (4·R); FSDP2 divides it all by N.
    - activations: the meta forward's saved tensors (gradient checkpointing: block inputs + outside the blocks +
      one block rebuilt), times the batch, times 2 for a CFG pair.
    """
    params, lora = counts.params, counts.lora_params
    lora_bytes = (4 + 8 + 4 + (2 if settings.use_8bit_adam else 8)) * lora
    if setup in ("1gpu", "ddp"):
        weights = 2 * params
        lora_bytes += 4 * lora if setup == "ddp" else 0
    elif setup.startswith("fsdp2_"):
        shards = int(setup.split("_")[1])
        unsharded = 2 * (2 * counts.largest_block_params + 12 * counts.largest_block_lora_params)
        weights, lora_bytes = 2 * params / shards + unsharded, lora_bytes / shards
    elif setup in ("nf4", "int8"):
        bits = QUANTIZATION_CHOICES[setup].bits_per_weight
        weights = 2 * (params - counts.linear_params) + counts.linear_params * bits / 8
    else:
        raise ValueError(f"Unknown setup {setup!r}; one of {list(SETUPS)}.")
    saved = profile.checkpointed_bytes if checkpointing else profile.saved_bytes
    activations = saved * settings.batch_size * (2 if cfg else 1)
    return {
        "weights": weights,
        "lora_states": lora_bytes,
        "activations": activations,
        "total": weights + lora_bytes + activations,
    }


# -------------------------------------------------------------------------------------------------------------
# 6. The table
# -------------------------------------------------------------------------------------------------------------
_MODELS: dict[tuple, tuple[nn.Module, ModelCounts]] = {}
_PROFILES: dict[tuple, ForwardProfile] = {}


def _key(spec: ModelSpec, *rest) -> tuple:
    # Models with the same family and config share one meta model and its profiles (Wan 2.2's experts are Wan
    # 2.1 14B's).
    return (spec.family, json.dumps(spec.config, sort_keys=True), *rest)


def meta_model(spec: ModelSpec, rank: int) -> tuple[nn.Module, ModelCounts]:
    """One meta expert of ``spec`` carrying its student LoRA at ``rank``, and the counts of all its experts."""
    key = _key(spec, rank)
    if key not in _MODELS:
        one = dataclasses.replace(spec, experts=1)
        model = build_meta(one)
        counts = model_counts(one, model, rank)
        with torch.device("meta"):  # the LoRA tensors too: a rank-32 LoRA of FLUX.2-dev is ~1 GB in fp32
            model.add_adapter(
                LoraConfig(r=rank, lora_alpha=rank, target_modules=get_family(spec.family).lora_target_modules(model))
            )
        _MODELS[key] = model, counts
    model, counts = _MODELS[key]
    scaled = {k: v * spec.experts for k, v in dataclasses.asdict(counts).items() if not k.startswith("largest")}
    return model, dataclasses.replace(counts, **scaled)


def forward_profile(spec: ModelSpec, resolution: Resolution, settings: Settings) -> ForwardProfile:
    """:func:`profile_forward` of ``spec`` at ``resolution`` with the student LoRA at ``settings.rank`` (cached)."""
    key = _key(spec, settings.rank, resolution, settings.text_tokens)
    if key not in _PROFILES:
        _PROFILES[key] = profile_forward(spec, meta_model(spec, settings.rank)[0], resolution, settings.text_tokens)
    return _PROFILES[key]


def estimate(spec: ModelSpec, resolution: Resolution, settings: Settings) -> dict:
    """Every number of one table row: sizes, FLOPs, memory per setup (GiB), what fits, seconds per sample."""
    family = get_family(spec.family)
    checkpointing = settings.gradient_checkpointing and family.gradient_checkpointing_issue is None
    _, counts = meta_model(spec, settings.rank)
    profile = forward_profile(spec, resolution, settings)
    memory = {}
    for setup in ("1gpu", *SETUPS):
        parts = memory_per_gpu(counts, profile, spec.uses_cfg, settings, setup, checkpointing)
        memory[setup] = {part: value / GiB for part, value in parts.items()}
    order = ("ddp", "fsdp2_2", "fsdp2_4", "fsdp2_8", "nf4")  # fewest GPUs first, unquantized before quantized
    fits = next((SETUPS[s] for s in order if memory[s]["total"] <= settings.fits_gib), "no")
    flops = step_flops(profile, spec.uses_cfg, settings, checkpointing)
    return {
        "model": spec.name,
        "title": spec.title,
        "family": spec.family,
        "resolution": str(resolution),
        "image_tokens": resolution.image_tokens,
        "text_tokens": settings.text_tokens + spec.extra_text_tokens,
        "cfg": spec.uses_cfg,
        "gradient_checkpointing": checkpointing,
        "params": counts.params,
        "published_b": spec.published_b * spec.experts,
        "lora_params": counts.lora_params,
        "forward_tflops": (profile.matmul_flops + profile.attention_flops) / 1e12,
        "attention_share": profile.attention_flops / (profile.matmul_flops + profile.attention_flops),
        "block_activation_multiplier": profile.block_multiplier,
        "step_tflops_per_sample": flops / 1e12,
        "step_s_per_sample": flops / (settings.mfu * settings.peak_flops),
        "memory_gib": memory,
        "fits_80gb": fits,
        "note": spec.note
        or ("" if checkpointing == settings.gradient_checkpointing else "refuses gradient checkpointing"),
    }


def parse_resolution(text: str) -> Resolution:
    """``"832x480x81"`` → ``Resolution(480, 832, 81)`` (width first, as the table prints it)."""
    try:
        width, height, *frames = (int(v) for v in text.lower().rstrip("f").split("x"))
        if len(frames) > 1:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not WIDTHxHEIGHT or WIDTHxHEIGHTxFRAMES") from None
    return Resolution(height, width, *frames)


def select_models(family: str | None = None, names: list[str] | None = None) -> list[ModelSpec]:
    """The models of ``family`` and/or ``names`` (all of them by default), in :data:`MODELS` order."""
    specs = [s for s in MODELS.values() if (family is None or s.family == family) and (not names or s.name in names)]
    if not specs:
        raise SystemExit(f"No model matches --family {family} --models {names}; models: {', '.join(MODELS)}.")
    return specs


def table(rows: list[dict], settings: Settings, markdown: bool) -> str:
    """The rows as a Markdown table (or aligned text), memory in GiB per GPU."""
    header = [
        "model",
        "resolution",
        "tokens",
        "params",
        f"LoRA r={settings.rank}",
        *(f"{SETUPS[s]} GiB" for s in SETUPS),
        "fits 80 GB",
        "s/sample",
    ]
    lines = []
    for row in rows:
        mark = " †" if row["note"] else ""
        lines.append(
            [
                f"{row['title']}{mark}",
                row["resolution"],
                f"{row['image_tokens']}+{row['text_tokens']}",
                f"{row['params'] / 1e9:.2f}B",
                f"{row['lora_params'] / 1e6:.0f}M",
                *(f"{row['memory_gib'][s]['total']:.1f}" for s in SETUPS),
                row["fits_80gb"],
                f"{row['step_s_per_sample']:.2f}",
            ]
        )
    if markdown:
        out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        out += ["| " + " | ".join(line) + " |" for line in lines]
    else:
        widths = [max(len(str(c)) for c in column) for column in zip(header, *lines, strict=True)]
        out = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)) for line in [header, *lines]]
    notes = {row["title"]: row["note"] for row in rows if row["note"]}
    out += [""] + [f"† {title}: {note}." for title, note in notes.items()]
    return "\n".join(out)


def components_table(specs: list[ModelSpec]) -> str:
    """Markdown: transformer weights and the components the script frees after caching."""
    out = [
        "| model | transformer (bf16) | text encoder(s), freed after caching | VAE, freed after caching |",
        "|---|---|---|---|",
    ]
    for spec in specs:
        _, counts = meta_model(spec, 32)
        size = f"{counts.params / 1e9:.2f}B, {2 * counts.params / 1e9:.1f} GB"
        out.append(f"| {spec.title} | {size} | {spec.text_encoder} | {spec.vae_b * 1e3:.0f}M |")
    return "\n".join(out)


def settings_line(settings: Settings) -> str:
    return (
        f"rank {settings.rank}, batch {settings.batch_size} per GPU, "
        f"gradient checkpointing {'on' if settings.gradient_checkpointing else 'off'}, "
        f"{'8-bit' if settings.use_8bit_adam else 'fp32'} Adam, {settings.text_tokens} text tokens, "
        f"MFU {settings.mfu} of {settings.peak_flops / 1e12:.0f} TFLOP/s, fits = under {settings.fits_gib} GiB"
    )


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", choices=sorted({s.family for s in MODELS.values()} & set(FAMILIES)), default=None)
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=None, help="Model keys (default: all).")
    p.add_argument("--rank", type=int, default=32, help="LoRA rank.")
    p.add_argument("--batch_size", type=int, default=1, help="Samples per GPU and step.")
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--use_8bit_adam", action="store_true")
    p.add_argument("--mfu", type=float, default=0.4, help="Achieved share of the peak FLOP rate.")
    p.add_argument("--peak_tflops", type=float, default=H100_BF16_PEAK_FLOPS / 1e12, help="Dense bf16 peak.")
    p.add_argument("--text_tokens", type=int, default=default_text_tokens(), help="--max_sequence_length.")
    p.add_argument(
        "--resolutions",
        nargs="+",
        type=parse_resolution,
        default=None,
        help="WIDTHxHEIGHT or WIDTHxHEIGHTxFRAMES for every model (default: each model's own, 1024x1024 for images, "
        "832x480x81 and 1280x720x81 for Wan).",
    )
    p.add_argument("--fits_gib", type=float, default=FITS_LIMIT_GIB, help="Memory limit of 'fits 80 GB'.")
    p.add_argument("--markdown", action="store_true", help="Markdown tables (else aligned text).")
    p.add_argument("--json", default=None, help="Also write every number (per part of memory) here; '-' for stdout.")
    args = p.parse_args(argv)
    diffusers.utils.logging.set_verbosity_error()  # "modules to keep in float32": a meta model computes no values
    settings = Settings(
        rank=args.rank,
        batch_size=args.batch_size,
        gradient_checkpointing=args.gradient_checkpointing,
        use_8bit_adam=args.use_8bit_adam,
        mfu=args.mfu,
        peak_flops=args.peak_tflops * 1e12,
        text_tokens=args.text_tokens,
        fits_gib=args.fits_gib,
    )
    specs = select_models(args.family, args.models)
    rows = [estimate(spec, res, settings) for spec in specs for res in args.resolutions or spec.resolutions]
    print(f"SCFM LoRA training per GPU: {settings_line(settings)}.\n")
    print(table(rows, settings, args.markdown))
    if args.markdown:
        print("\n" + components_table(specs))
    if args.json:
        payload = json.dumps({"settings": dataclasses.asdict(settings), "rows": rows}, indent=2)
        if args.json == "-":
            print(payload)
        else:
            with open(args.json, "w") as f:
                f.write(payload)
    sys.stdout.flush()
    return rows


if __name__ == "__main__":
    main()
