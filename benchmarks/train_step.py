"""Cost of one SCFM training step against its floor and against plain LoRA fine-tuning.

Floor: one student forward + backward plus two no-grad forwards of the same model — the least any
implementation of the method must do per step. SCFM's extra work over the floor is adapter switching,
the EMA update and the optimizer. Plain LoRA fine-tuning (flow matching, one forward + backward) is the
memory reference. All variants run interleaved in ONE process (time) and each in its own subprocess
(peak memory: CUDA max_memory_allocated, or peak RSS on CPU), so ratios are measured side by side.

    python benchmarks/train_step.py                           # CPU, a small Flux transformer
    python benchmarks/train_step.py --preset flux-dev --device cuda --dtype bf16 --resolution 512 --text_tokens 256 \\
        --rank 64 --batch_size 1 --steps 10 --separate_processes [--gradient_checkpointing] [--use_8bit_adam] \\
        [--quantize_base nf4]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from diffusers import FluxTransformer2DModel
from peft import LoraConfig

from scfm_diffusers.families import get_family
from scfm_diffusers.training.ema import DualLoraEMA, lora_parameters
from scfm_diffusers.training.objective import scfm_loss
from scfm_diffusers.training.timesteps import GridSamplerConfig, sample_grid_steps

PRESETS = {
    # ~2.3M parameters: big enough that the forward dominates on 2 CPU cores.
    "small": dict(
        num_layers=2,
        num_single_layers=4,
        attention_head_dim=32,
        num_attention_heads=4,
        joint_attention_dim=64,
        pooled_projection_dim=64,
        axes_dims_rope=[8, 8, 16],
    ),
    # The real Flux.1-dev architecture (12B), random weights.
    "flux-dev": dict(
        num_layers=19,
        num_single_layers=38,
        attention_head_dim=128,
        num_attention_heads=24,
        joint_attention_dim=4096,
        pooled_projection_dim=768,
        axes_dims_rope=[16, 56, 56],
        guidance_embeds=True,
    ),
}
VARIANTS = ("lora_fm", "floor", "scfm")


def build(args):
    torch.manual_seed(0)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    config = PRESETS[args.preset]
    # Build directly on the device in the target dtype: a Flux.1-dev-sized model is 24 GB in bf16.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(args.device):
            transformer = FluxTransformer2DModel(
                patch_size=1, in_channels=64 if args.preset == "flux-dev" else 4, **config
            )
    finally:
        torch.set_default_dtype(previous)
    if args.quantize_base:  # the training script's path: a saved transformer loaded quantized
        transformer = quantized_copy(transformer, args, dtype)
    transformer.requires_grad_(False)
    family = get_family("flux")
    transformer.add_adapter(
        LoraConfig(
            r=args.rank,
            lora_alpha=args.rank,
            init_lora_weights="gaussian",
            target_modules=family.lora_target_modules(transformer),
        )
    )
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    return transformer, family, dtype


def quantized_copy(transformer, args, dtype):
    """Save ``transformer`` and load it back quantized with ``load_quantized_transformer`` (as --quantize_base)."""
    from scfm_diffusers.training.quantization import load_quantized_transformer

    with tempfile.TemporaryDirectory(dir=args.tmp_dir) as folder:
        transformer.save_pretrained(os.path.join(folder, "transformer"))
        del transformer
        if args.device == "cuda":
            torch.cuda.empty_cache()
        return load_quantized_transformer(folder, "flux", args.quantize_base, torch_dtype=dtype, device=args.device)


def make_batch(args, transformer, dtype):
    channels = transformer.config.in_channels // 4
    side = args.resolution // (8 if args.preset == "flux-dev" else 1)
    latents = torch.randn(args.batch_size, channels, side, side, device=args.device)
    text_dim = transformer.config.joint_attention_dim
    text = {
        "prompt_embeds": torch.randn(args.batch_size, args.text_tokens, text_dim, device=args.device),
        "pooled_prompt_embeds": torch.randn(
            args.batch_size, transformer.config.pooled_projection_dim, device=args.device
        ),
    }
    return latents, text


def make_step(args, variant: str):
    """Build the model for ``variant`` and return a function running one timed training step."""
    transformer, family, dtype = build(args)
    ema = DualLoraEMA(transformer) if variant == "scfm" else None
    params = list(lora_parameters(transformer, "default").values())
    for p in params:
        p.data = p.data.float()
    if args.use_8bit_adam:
        import bitsandbytes as bnb

        optimizer = bnb.optim.AdamW8bit(params, lr=1e-5)
    else:
        optimizer = torch.optim.AdamW(params, lr=1e-5)
    latents, text = make_batch(args, transformer, dtype)
    x0 = family.to_model_space(latents)
    rows = torch.arange(len(x0), device=args.device)
    guidance = torch.full((len(x0),), 3.5, device=args.device) if transformer.config.guidance_embeds else None
    velocity = family.velocity_fn(transformer, text, latents.shape, guidance=guidance)
    grid = GridSamplerConfig(dynamic_shift_prob=0.0)

    def step() -> float:
        noise = torch.randn_like(x0)
        sync(args)
        start = time.perf_counter()
        sigma = torch.rand(len(x0), device=args.device)
        x = (1 - sigma[:, None, None]) * x0 + sigma[:, None, None] * noise
        if variant == "lora_fm":  # plain LoRA flow matching: one forward + backward
            loss = ((velocity(x, sigma, rows).float() - (noise - x0)) ** 2).mean()
        elif variant == "floor":  # the least SCFM must do: 2 no-grad forwards + 1 forward/backward
            with torch.no_grad():
                v1 = velocity(x, sigma, rows)
                velocity(x - 0.1 * v1, sigma - 0.05, rows)
            loss = ((velocity(x, sigma, rows).float() - v1.float()) ** 2).mean()
        else:  # the real step: teacher/EMA contexts, the objective, the EMA update
            steps = sample_grid_steps(len(x0), grid).to(args.device)
            loss = scfm_loss(
                student=velocity,
                teacher=ema.wrap("teacher", velocity),
                fast_ema=ema.wrap("fast", velocity),
                slow_ema=ema.wrap("slow", velocity),
                x0=x0,
                noise=noise,
                steps=steps,
            ).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update()
        sync(args)
        return time.perf_counter() - start

    return step


def proc_status(key: str) -> int:
    """A memory figure of this process from /proc/self/status, in bytes."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(key + ":"))
    return int(line.split()[1]) * 1024


def sync(args):
    if args.device == "cuda":
        torch.cuda.synchronize()


def run_isolated(variant: str) -> dict:
    """Peak memory (MiB above the weights) and step times of ``variant`` in a fresh subprocess."""
    command = [sys.executable, __file__, "--isolated_run", variant, *sys.argv[1:]]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="small")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--resolution", type=int, default=8, help="Pixels (flux-dev: /8 latents) or latent side.")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--text_tokens", type=int, default=8)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=12, help="Timed steps per variant (after 2 warm-up steps).")
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--use_8bit_adam", action="store_true")
    p.add_argument(
        "--quantize_base",
        default=None,
        help="Quantize the base like the script's --quantize_base (nf4, int8: CUDA; torchao-int8, torchao-fp8).",
    )
    p.add_argument("--tmp_dir", default=None, help="Where the transformer is saved before a quantized load.")
    p.add_argument(
        "--separate_processes",
        action="store_true",
        help="Time each variant in its own process too (for models too big to hold three copies, e.g. flux-dev).",
    )
    p.add_argument("--isolated_run", choices=VARIANTS, default=None, help=argparse.SUPPRESS)
    p.add_argument("--json", default=None, help="Write the results here too.")
    args = p.parse_args()

    if args.isolated_run:
        # Peak memory of training above the model's own footprint (weights loaded, before the first step).
        step = make_step(args, args.isolated_run)
        if args.device == "cuda":
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:  # Linux: reset the peak-RSS mark, then read it back after the steps
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            base = proc_status("VmRSS")
        times = [step() for _ in range(2 + (args.steps if args.separate_processes else 1))][2:]
        peak = torch.cuda.max_memory_allocated() if args.device == "cuda" else proc_status("VmHWM")
        print(json.dumps({"peak_mib": (peak - base) / 2**20, "total_mib": peak / 2**20, "times": times}))
        return

    isolated = {v: run_isolated(v) for v in VARIANTS}
    memory = {v: isolated[v]["peak_mib"] for v in VARIANTS}
    if args.separate_processes:
        timings = {v: isolated[v]["times"] for v in VARIANTS}
    else:  # interleave the variants, one step at a time, so machine noise hits them alike
        steps = {v: make_step(args, v) for v in VARIANTS}
        timings = {v: [] for v in VARIANTS}
        for _ in range(2):  # warm-up
            for v in VARIANTS:
                steps[v]()
        for _ in range(args.steps):
            for v in VARIANTS:
                timings[v].append(steps[v]())
    median = {v: statistics.median(t) for v, t in timings.items()}
    result = {
        "config": {k: v for k, v in vars(args).items() if k not in ("isolated_run", "json")},
        "median_step_s": median,
        "scfm_over_floor": median["scfm"] / median["floor"],
        "scfm_over_lora_fm_time": median["scfm"] / median["lora_fm"],
        "peak_mib": memory,
        "scfm_over_lora_fm_memory": memory["scfm"] / memory["lora_fm"],
    }
    print(f"{'variant':<10}{'median step (s)':>18}{'peak MiB over weights':>24}")
    for v in VARIANTS:
        print(f"{v:<10}{median[v]:>18.4f}{memory[v]:>24.1f}")
    print(
        f"SCFM step / floor: {result['scfm_over_floor']:.3f}   SCFM memory / plain LoRA: "
        f"{result['scfm_over_lora_fm_memory']:.3f}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
