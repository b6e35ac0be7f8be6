"""Few-step baselines trained at the same compute as SCFM, saved as adapter folders the harness loads alike.

Compute is counted in transformer forward-equivalents (a forward pass = 1, its backward = 2; text encoders
and VAE are ignored, and so is the CFG doubling of SD3, which multiplies every method equally):

* SCFM, one optimizer step: ``batch × (3 + 2)`` — the student's forward + backward, and the two no-grad
  target passes (teacher or fast EMA, then slow EMA).
* reflow: ``pairs × teacher_steps`` to draw the (noise, teacher sample) pairs, then ``steps × batch × 3``.

:func:`equal_compute_reflow_plan` splits SCFM's budget. The default split (``generation_fraction = 0.4``)
gives reflow the same number of optimizer steps at the same batch size as SCFM and spends the budget of
SCFM's two target passes per sample on drawing pairs instead: ``pairs = 2·steps·batch / teacher_steps``
(e.g. 1500 steps × 32 with a 32-step teacher → 3000 pairs, each seen 16 times).

**Reflow** (rectified-flow distillation, Liu et al. 2022): with ``x̂0 = teacher(ε, c)`` sampled in
``teacher_steps`` Euler steps from the noise ε, the LoRA student regresses at
``x_σ = (1 − σ)·x̂0 + σ·ε`` onto the straight velocity ``ε − x̂0`` (diffusers σ convention, σ = 1 is noise).
σ is drawn exactly as SCFM draws its coarse-step starts (:func:`~scfm_diffusers.training.timesteps.sample_grid_steps`
with the same :class:`~scfm_diffusers.training.timesteps.GridSamplerConfig`); LoRA targets, rank, alpha,
AdamW settings and gradient clip are SCFM's.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig

from ..adapter import SCFMInferenceSettings, save_adapter
from ..families import ConditioningConfig, family_of_pipeline, pipeline_samples
from ..training.objective import scfm_loss
from ..training.timesteps import GridSamplerConfig, TargetSource, sample_grid_steps

__all__ = [
    "BASELINES",
    "ReflowConfig",
    "ReflowPlan",
    "equal_compute_reflow_plan",
    "generate_reflow_pairs",
    "get_baseline",
    "reflow_training_compute",
    "scfm_training_compute",
    "train_reflow_lora",
]

#: Forward-equivalents of a backward pass.
BACKWARD_COST = 2
#: No-grad target passes per SCFM sample (first half-step by teacher / fast EMA, second by slow EMA).
SCFM_TARGET_PASSES = 2


# ----------------------------------------------------------------------------------------------------
# 1. Compute accounting
# ----------------------------------------------------------------------------------------------------
def scfm_training_compute(steps: int, batch_size: int) -> int:
    """Forward-equivalents of SCFM training: ``steps × batch × (2 + 3)``."""
    return steps * batch_size * (SCFM_TARGET_PASSES + 1 + BACKWARD_COST)


def reflow_training_compute(num_pairs: int, teacher_steps: int, steps: int, batch_size: int) -> int:
    """Forward-equivalents of reflow: ``pairs × teacher_steps + steps × batch × 3``."""
    return num_pairs * teacher_steps + steps * batch_size * (1 + BACKWARD_COST)


@dataclass(frozen=True)
class ReflowPlan:
    """How reflow spends a compute budget.

    Attributes:
        num_pairs: (noise, teacher sample) pairs to draw.
        train_steps: Optimizer steps.
        batch_size: Pairs per optimizer step.
        teacher_steps: Euler steps of the teacher per pair.
        budget: The budget to match (forward-equivalents).
        compute: What the plan costs (≤ budget; the rest is rounding).
    """

    num_pairs: int
    train_steps: int
    batch_size: int
    teacher_steps: int
    budget: int
    compute: int


def equal_compute_reflow_plan(
    budget: int, *, teacher_steps: int, batch_size: int, generation_fraction: float = 0.4
) -> ReflowPlan:
    """Split ``budget`` forward-equivalents into pair generation and training for reflow.

    ``pairs = floor(generation_fraction · budget / teacher_steps)``; the rest buys
    ``steps = floor((budget − pairs·teacher_steps) / (3·batch))``. With SCFM's batch size, the default 0.4
    (= 2/5, SCFM's share of target passes) gives exactly SCFM's number of optimizer steps.

    Args:
        budget: Forward-equivalents to spend, e.g. :func:`scfm_training_compute` of the SCFM run.
        teacher_steps: Euler steps of the teacher per pair.
        batch_size: Reflow batch size.
        generation_fraction: Share of the budget spent on drawing pairs, in (0, 1).

    Returns:
        The :class:`ReflowPlan` (at least 1 pair and 1 step).
    """
    if not 0.0 < generation_fraction < 1.0:
        raise ValueError(f"generation_fraction must be in (0, 1), got {generation_fraction}.")
    if min(budget, teacher_steps, batch_size) < 1:
        raise ValueError(
            f"budget, teacher_steps and batch_size must be >= 1, got {budget}, {teacher_steps}, {batch_size}."
        )
    num_pairs = max(1, math.floor(generation_fraction * budget / teacher_steps + 1e-9))
    train_steps = max(1, (budget - num_pairs * teacher_steps) // (batch_size * (1 + BACKWARD_COST)))
    return ReflowPlan(
        num_pairs=num_pairs,
        train_steps=train_steps,
        batch_size=batch_size,
        teacher_steps=teacher_steps,
        budget=budget,
        compute=reflow_training_compute(num_pairs, teacher_steps, train_steps, batch_size),
    )


# ----------------------------------------------------------------------------------------------------
# 2. Reflow
# ----------------------------------------------------------------------------------------------------
@dataclass
class ReflowConfig:
    """Settings of a reflow LoRA run; defaults are SCFM's (method doc) where the two share a setting."""

    num_pairs: int = field(default=3000, metadata={"help": "(noise, teacher sample) pairs to draw."})
    teacher_steps: int = field(default=32, metadata={"help": "Teacher Euler steps per pair."})
    train_steps: int = field(default=1500, metadata={"help": "Optimizer steps."})
    batch_size: int = field(default=32, metadata={"help": "Pairs per optimizer step."})
    rank: int = field(default=64, metadata={"help": "LoRA rank (SCFM reference: 64)."})
    lora_alpha: float = field(default=64, metadata={"help": "LoRA alpha (SCFM reference: 64)."})
    learning_rate: float = field(default=2e-5, metadata={"help": "AdamW learning rate (constant)."})
    adam_betas: tuple[float, float] = field(default=(0.9, 0.999), metadata={"help": "AdamW betas."})
    weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay."})
    max_grad_norm: float | None = field(default=None, metadata={"help": "Grad clip (default: the family's)."})
    grid: GridSamplerConfig = field(
        default_factory=GridSamplerConfig, metadata={"help": "σ distribution: SCFM's coarse-step starts."}
    )
    height: int = field(default=512, metadata={"help": "Image height of the pairs."})
    width: int = field(default=512, metadata={"help": "Image width of the pairs."})
    max_sequence_length: int = field(default=256, metadata={"help": "T5 tokens per prompt."})
    guidance_scale: float | None = field(
        default=None, metadata={"help": "Teacher guidance for the pairs and the student (default: the family's)."}
    )
    pair_batch_size: int = field(default=64, metadata={"help": "Images per teacher call when drawing pairs."})
    num_inference_steps: int = field(default=4, metadata={"help": "Steps stored in the adapter settings."})
    inference_shift: float = field(default=3.0, metadata={"help": "Sampling shift stored in the adapter settings."})
    seed: int = field(default=0, metadata={"help": "Seed of noise, σ and batches."})

    def __post_init__(self) -> None:
        for name in ("num_pairs", "teacher_steps", "train_steps", "batch_size", "rank", "pair_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}.")

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable settings (for caches and the adapter's training record)."""
        return json.loads(json.dumps(asdict(self)))  # tuples as lists: equal to what a JSON file gives back


def _latent_shape(pipeline: Any, family: Any, height: int, width: int) -> tuple[int, ...]:
    """The family's cached-latent shape ``(1, ...)`` of a ``height × width`` image (one VAE encode of zeros)."""
    pixels = torch.zeros(1, 3, height, width, device=pipeline.vae.device, dtype=pipeline.vae.dtype)
    generator = torch.Generator(pipeline.vae.device).manual_seed(0)  # never a draw from the global RNG
    return tuple(family.encode_images(pipeline.vae, pixels, generator=generator).shape)


@torch.no_grad()
def generate_reflow_pairs(
    pipeline: Any,
    prompts: Sequence[str],
    config: ReflowConfig,
    *,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Draw ``config.num_pairs`` (ε, x̂0) pairs in the transformer's latent space with the teacher.

    Pair i uses ``prompts[i % len(prompts)]``. ε is fresh Gaussian noise in model space (packed for Flux);
    x̂0 is the pipeline's ``output_type="latent"`` result of ``config.teacher_steps`` steps from ``latents=ε``
    with its current scheduler (the teacher: call this before any adapter is active).

    Returns:
        ``{"noise": (P, ...), "samples": (P, ...), "prompt_index": (P,) long, "prompts": unique prompts,
        "latent_shape": unpacked latent shape of one sample}`` on the CPU, float32.
    """
    family = family_of_pipeline(pipeline)
    unique = list(dict.fromkeys(prompts))
    index_of = {prompt: i for i, prompt in enumerate(unique)}
    generator = torch.Generator().manual_seed(config.seed)
    guidance = (
        config.guidance_scale
        if config.guidance_scale is not None
        else family.adapter_guidance_scale(ConditioningConfig())
    )
    device, dtype = pipeline.transformer.device, pipeline.transformer.dtype
    latent_shape = _latent_shape(pipeline, family, config.height, config.width)
    noises, samples, indices = [], [], []
    for start in range(0, config.num_pairs, config.pair_batch_size):
        n = min(config.pair_batch_size, config.num_pairs - start)
        batch_prompts = [prompts[(start + i) % len(prompts)] for i in range(n)]
        noise = family.to_model_space(torch.randn((n, *latent_shape[1:]), generator=generator))
        call = {
            "prompt": batch_prompts,
            "latents": noise.to(device, dtype),
            "num_inference_steps": config.teacher_steps,
        }
        family.fill_guidance(call, guidance)  # the pipeline's own guidance argument (Qwen-Image: true CFG)
        output = pipeline(
            **call,
            height=config.height,
            width=config.width,
            max_sequence_length=config.max_sequence_length,
            output_type="latent",
        )
        noises.append(noise.float())
        sample = family.pipeline_latents_to_model_space(pipeline.vae, torch.as_tensor(pipeline_samples(output)))
        samples.append(sample.float().cpu())
        indices.append(torch.tensor([index_of[p] for p in batch_prompts]))
        if progress is not None:
            progress(f"reflow pairs {start + n}/{config.num_pairs}")
    return {
        "noise": torch.cat(noises),
        "samples": torch.cat(samples),
        "prompt_index": torch.cat(indices),
        "prompts": unique,
        "latent_shape": latent_shape,
    }


def train_reflow_lora(
    pipeline: Any,
    prompts: Sequence[str],
    output_dir: str | os.PathLike[str],
    config: ReflowConfig,
    *,
    base_model: str | None = None,
    progress: Callable[[str], None] | None = print,
) -> Path:
    """Reflow-distill a LoRA on ``pipeline``'s transformer and save it as an SCFM-style adapter folder.

    Steps: draw pairs with the teacher (:func:`generate_reflow_pairs`); add a LoRA with the family's SCFM
    targets (B = 0 init, so the student starts as the teacher); for ``train_steps`` steps, sample a batch
    of pairs, σ from SCFM's grid distribution, and minimise ``mean((v_θ(x_σ, σ, c) − (ε − x̂0))²)`` with
    AdamW; save with :func:`~scfm_diffusers.save_adapter` (settings: ``num_inference_steps``,
    ``inference_shift``) and remove the LoRA from the transformer again.

    Args:
        pipeline: A Flux or SD3 pipeline holding the teacher (no active adapter).
        prompts: Prompts of the pairs (cycled).
        output_dir: Adapter folder to write.
        config: Run settings.
        base_model: Stored in the adapter settings.
        progress: Called with progress lines (None: silent).

    Returns:
        The adapter folder.
    """
    log = progress or (lambda message: None)
    family = family_of_pipeline(pipeline)
    transformer = pipeline.transformer
    start = time.perf_counter()
    pairs = generate_reflow_pairs(pipeline, prompts, config, progress=None)
    generation_seconds = time.perf_counter() - start
    log(f"reflow: drew {config.num_pairs} teacher pairs in {generation_seconds:.1f} s")

    # Text conditioning of the unique prompts, indexed per pair (SD3 also needs the empty prompt for CFG).
    with torch.no_grad():
        text = family.encode_prompts(pipeline, pairs["prompts"], config.max_sequence_length)
        uncond = family.encode_prompts(pipeline, [""], config.max_sequence_length)
    device = transformer.device
    text = {k: v.to(device) for k, v in text.items()}
    uncond = {k: v.to(device) for k, v in uncond.items()}
    guidance_scale = (
        config.guidance_scale
        if config.guidance_scale is not None
        else family.adapter_guidance_scale(ConditioningConfig())
    )
    # Reflow trains at the one guidance it samples with (embedded guidance fixed; CFG families at that scale).
    condition = ConditioningConfig(guidance_scale=guidance_scale, cfg_scale=guidance_scale)

    adapter_name = "reflow"
    transformer.requires_grad_(False)
    transformer.add_adapter(
        LoraConfig(
            r=config.rank,
            lora_alpha=config.lora_alpha,
            init_lora_weights="gaussian",
            target_modules=family.lora_target_modules(transformer),
        ),
        adapter_name=adapter_name,
    )
    transformer.set_adapter(adapter_name)
    params = [p for n, p in transformer.named_parameters() if p.requires_grad and adapter_name in n]
    for p in params:
        p.data = p.data.float()
    optimizer = torch.optim.AdamW(
        params, lr=config.learning_rate, betas=tuple(config.adam_betas), weight_decay=config.weight_decay
    )
    max_grad_norm = config.max_grad_norm or family.max_grad_norm
    generator = torch.Generator().manual_seed(config.seed + 1)
    image_seq_len = family.image_seq_len(torch.empty(pairs["latent_shape"], device="meta"))
    losses: list[float] = []
    train_start = time.perf_counter()
    try:
        transformer.train()
        for step in range(config.train_steps):
            rows = torch.randint(len(pairs["noise"]), (config.batch_size,), generator=generator)
            x0, noise = pairs["samples"][rows].to(device), pairs["noise"][rows].to(device)
            steps = sample_grid_steps(config.batch_size, config.grid, image_seq_len=image_seq_len, generator=generator)
            # Reflow is flow matching on the teacher's (ε, x̂0) pairs: every row regresses onto ε − x̂0, through
            # the library's own interpolation and loss (no target pass runs for flow-matching rows).
            steps = dataclasses.replace(steps, source=torch.full_like(steps.source, TargetSource.FLOW_MATCHING))
            batch_text = {k: v[pairs["prompt_index"][rows].to(device)] for k, v in text.items()}
            options = family.sample_conditioning(transformer, config.batch_size, condition, generator)
            velocity = family.velocity_fn(transformer, batch_text, pairs["latent_shape"], uncond=uncond, **options)
            loss = scfm_loss(
                student=velocity,
                teacher=velocity,
                fast_ema=velocity,
                slow_ema=velocity,
                x0=x0,
                noise=noise,
                steps=steps,
            ).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            losses.append(loss.item())
            if step % 250 == 0 or step == config.train_steps - 1:
                log(f"reflow step {step}: loss {loss.item():.4f}")
        transformer.eval()
        train_seconds = time.perf_counter() - train_start
        settings = SCFMInferenceSettings(
            family=family.name,
            num_inference_steps=config.num_inference_steps,
            shift=config.inference_shift,
            guidance_scale=guidance_scale,
            base_model=base_model,
            training={
                "method": "reflow",
                "steps": config.train_steps,
                "batch_size": config.batch_size,
                "pairs": config.num_pairs,
                "teacher_steps": config.teacher_steps,
                "learning_rate": config.learning_rate,
                "rank": config.rank,
                "lora_alpha": config.lora_alpha,
                "shift_range": f"{config.grid.shift_min}-{config.grid.shift_max}",
                "compute_forward_equivalents": reflow_training_compute(
                    config.num_pairs, config.teacher_steps, config.train_steps, config.batch_size
                ),
                "generation_seconds": round(generation_seconds, 2),
                "train_seconds": round(train_seconds, 2),
                "final_loss_last_100": sum(losses[-100:]) / len(losses[-100:]),
            },
        )
        folder = save_adapter(
            output_dir,
            transformer,
            settings,
            adapter_name=adapter_name,
            scheduler_config=pipeline.scheduler.config,
        )
    finally:
        transformer.eval()
        transformer.delete_adapters(adapter_name)
    log(f"reflow: trained {config.train_steps} steps in {train_seconds:.1f} s, adapter in {folder}")
    return folder


#: Baselines by name; each is ``fn(pipeline, prompts, output_dir, config, *, base_model, progress) -> Path``.
BASELINES: dict[str, Callable[..., Path]] = {"reflow": train_reflow_lora}
#: The config class of each baseline.
BASELINE_CONFIGS: dict[str, type] = {"reflow": ReflowConfig}


def get_baseline(name: str) -> Callable[..., Path]:
    """The baseline trainer registered as ``name``; raises ``ValueError`` listing the known ones."""
    if name not in BASELINES:
        raise ValueError(f"Unknown baseline {name!r}; known: {sorted(BASELINES)}.")
    return BASELINES[name]
