"""Peak memory and step time of SCFM LoRA training on one GPU, at the real model sizes (random weights).

For each model: the real transformer built directly on the GPU in bf16 from its config (scaling_estimates.MODELS;
random weights, nothing downloaded), the student LoRA on the family's targets and the project's ``DualLoraEMA``,
random text tensors of the real shapes (the keys and dtypes the family's ``encode_prompts`` returns, at the real
widths and ``--text_tokens``) and random latents of the real resolution. Then 1 warm-up and ``--steps`` timed
training steps exactly as ``examples/train_scfm_lora.py`` takes them (``scfm_training_losses`` under bf16 autocast,
as accelerate runs it with ``--mixed_precision bf16``; backward, AdamW, EMA update; its LoRA config, optimizer,
grids and conditioning from its own flags), with gradient checkpointing and without. One JSON line per case on stdout and in ``--out/gpu_train_step.jsonl``: peak
``torch.cuda.max_memory_allocated``, median step time, and the estimate of ``scaling_estimates.py`` for the
same case (memory, and the FLOPs the achieved MFU is computed from). An OOM is recorded as ``"OOM"``.

    python benchmarks/gpu_train_step.py --out gpu_results          # the default models, ~6 min on one H200
    python benchmarks/gpu_train_step.py --families flux_dev wan21_14b --frames 33 --steps 3 --out gpu_results
    python benchmarks/gpu_train_step.py --families flux_dev --quantize nf4 --checkpointing on  # bitsandbytes
    python benchmarks/gpu_train_step.py --tiny --families flux sd3  # each family's tiny transformer on CPU: seconds

``--families`` takes model keys of scaling_estimates.MODELS or family names (a family's first model; with
``--tiny``, its tiny pipeline). Wan 2.1 14B defaults to 33 frames at 480×832 (81 frames would take ~40 s a step
on an H200: ``--frames 81`` to measure it anyway).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
from diffusers.training_utils import cast_training_params
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scaling_estimates beside this file
import scaling_estimates as estimates  # noqa: E402

from scfm_diffusers.families import get_family  # noqa: E402
from scfm_diffusers.training import components  # noqa: E402
from scfm_diffusers.training.config import conditioning_config, grid_config, parse_args  # noqa: E402
from scfm_diffusers.training.ema import DualLoraEMA, lora_parameters  # noqa: E402
from scfm_diffusers.training.step import scfm_training_losses  # noqa: E402

#: The default cases, most wanted first (a run that reaches --time_budget_s skips the rest).
DEFAULT_MODELS = (
    "flux_dev",
    "wan21_1.3b",
    "wan21_14b",
    "qwen_image",
    "sd35_large",
    "z_image",
    "flux2_klein_4b",
    "chroma",
)
#: Frames per model where the default resolution's would not fit the time budget.
DEFAULT_FRAMES = {"wan21_14b": 33, "wan22_a14b": 33}
STUDENT = "default"
TINY_TEXT_TOKENS = 8  # the tiny tokenizers' captions are short
START = time.monotonic()


def log(message: str) -> None:
    print(f"[{time.monotonic() - START:6.1f} s] {message}", file=sys.stderr, flush=True)


def emit(record: dict, out: Path | None) -> None:
    line = json.dumps(record)
    print(line, flush=True)
    if out is not None:
        with open(out / "gpu_train_step.jsonl", "a") as f:
            f.write(line + "\n")


def resolve(name: str, tiny: bool) -> tuple[str, estimates.ModelSpec | None]:
    """``(family name, model spec)`` of a ``--families`` entry; no spec in ``--tiny`` mode."""
    if name in estimates.MODELS:
        spec = estimates.MODELS[name]
        return spec.family, None if tiny else spec
    family = get_family(name)  # a family name; raises listing the known ones
    if tiny:
        return family.name, None
    spec = next((s for s in estimates.MODELS.values() if s.family == family.name), None)
    if spec is None:
        raise SystemExit(f"No real-size config of family {name!r} in scaling_estimates.MODELS.")
    return family.name, spec


def training_args(args: argparse.Namespace, checkpointing: bool) -> argparse.Namespace:
    """The training script's own flags for this case (LoRA config, optimizer, grids, conditioning)."""
    argv = ["--pretrained_model_name_or_path", "random", "--prompts_file", "unused.txt"]
    argv += ["--rank", str(args.rank), "--lora_alpha", str(args.rank), "--train_batch_size", str(args.batch_size)]
    argv += ["--max_sequence_length", str(args.text_tokens)]
    argv += ["--gradient_checkpointing"] * checkpointing + ["--use_8bit_adam"] * args.use_8bit_adam
    return parse_args(argv)


# -------------------------------------------------------------------------------------------------------------
# 1. The model and its batch
# -------------------------------------------------------------------------------------------------------------
def build_real(spec: estimates.ModelSpec, device: str, dtype: torch.dtype) -> nn.Module:
    """The real-size transformer(s) of ``spec`` built directly on ``device`` in ``dtype`` (random weights)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # no fp32 copy on the way: a 20B model is 41 GB in bf16
    try:
        with torch.device(device):
            experts = [spec.transformer_class.from_config(spec.config) for _ in range(spec.experts)]
    finally:
        torch.set_default_dtype(previous)
    if spec.experts == 1:
        return experts[0]
    from scfm_diffusers.families.wan import WAN22_BOUNDARY_RATIO, WanExperts

    return WanExperts(*experts, boundary_timestep=WAN22_BOUNDARY_RATIO * 1000)


def quantize_nf4_(model: nn.Module, dtype: torch.dtype) -> int:
    """Replace every ``nn.Linear`` by a bitsandbytes nf4 ``Linear4bit`` (the settings of ``--quantize_base nf4``:
    4-bit NormalFloat, blocks of 64, bf16 compute, no double quantization); returns how many were replaced."""
    import bitsandbytes as bnb

    replaced = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is not nn.Linear:
                continue
            device = child.weight.device
            with torch.device("meta"):
                layer = bnb.nn.Linear4bit(
                    child.in_features,
                    child.out_features,
                    bias=child.bias is not None,
                    compute_dtype=dtype,
                    quant_type="nf4",
                )
            layer.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4")
            layer.bias = child.bias
            setattr(module, name, layer.to(device))  # quantizes on a CUDA (or CPU) device
            replaced += 1
    return replaced


def text_batch(family, spec: estimates.ModelSpec | None, pipe, n: int, length: int, device, dtype) -> dict:
    """Text tensors of ``n`` rows with the keys and dtypes of the family's ``encode_prompts``.

    ``--tiny``: the tiny pipeline's own encoding. Real size: random tensors of the real widths (``spec.text_dim``,
    ``spec.pooled_dim``) and ``length`` tokens plus the family's fixed extra tokens (SD3's 77 CLIP tokens), masks
    all ones (full-length prompts).
    """
    with torch.no_grad():
        probe = family.encode_prompts(pipe, ["a photo"] * n, length if spec is None else 8)
    if spec is None:
        return {k: v.to(device, dtype if v.is_floating_point() else v.dtype) for k, v in probe.items()}
    tokens = length + spec.extra_text_tokens
    out = {}
    for key, value in probe.items():
        if not value.is_floating_point():
            out[key] = torch.ones(n, tokens, dtype=value.dtype, device=device)
        elif value.dim() == 3:
            out[key] = torch.randn(n, tokens, spec.text_dim, device=device, dtype=dtype)
        else:
            out[key] = torch.randn(n, spec.pooled_dim, device=device, dtype=dtype)
    return out


def latent_batch(family, spec, pipe, n: int, resolution: estimates.Resolution, device) -> torch.Tensor:
    """Cached-latent-shaped noise: ``(n, C, [F',] H/f, W/f)`` float32 (``--tiny``: the tiny VAE's encoding)."""
    if spec is None:
        frames = getattr(family, "tiny_num_frames", None) or 1
        size = family.tiny_resolution
        pixels = torch.rand(n, 3, *([frames] if frames > 1 else []), size, size) * 2 - 1
        with torch.no_grad():
            return family.encode_images(pipe.vae, pixels).to(device, torch.float32)
    channels, factor = spec.latent
    frames = [resolution.latent_frames] if resolution.frames > 1 else []
    shape = (n, channels, *frames, resolution.height // factor, resolution.width // factor)
    return torch.randn(shape, device=device)


# -------------------------------------------------------------------------------------------------------------
# 2. One case: the steps, timed
# -------------------------------------------------------------------------------------------------------------
def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def set_checkpointing(transformer: nn.Module, on: bool) -> None:
    """Gradient checkpointing on or off, in every expert of a ``LoraExperts``."""
    experts = transformer.experts().values() if hasattr(transformer, "experts") else [transformer]
    for expert in experts:
        expert.enable_gradient_checkpointing() if on else expert.disable_gradient_checkpointing()


def run_variant(case: dict, trainer: dict, args, checkpointing: bool, deadline: float) -> dict:
    """One warm-up and up to ``--steps`` timed training steps; the record of the variant."""
    record = {**case, "gradient_checkpointing": checkpointing}
    transformer, family = trainer["transformer"], trainer["family"]
    if checkpointing and family.gradient_checkpointing_issue:
        return {**record, "status": "refused: the family refuses gradient checkpointing"}
    set_checkpointing(transformer, checkpointing)
    cuda = args.device.startswith("cuda")
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        record["resident_gib"] = torch.cuda.memory_allocated() / estimates.GiB
    times, status, steps = [], "ok", args.steps
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    try:
        for i in range(1 + args.steps):
            sync(args.device)
            start = time.perf_counter()
            with autocast:  # the script's --mixed_precision bf16: accelerate runs every forward under it
                out = scfm_training_losses(
                    transformer,
                    trainer["ema"],
                    family,
                    trainer["batch"],
                    uncond=trainer["uncond"],
                    grid=trainer["grid"],
                    conditioning=trainer["conditioning"],
                    generator=trainer["generator"],
                )
            out.losses.loss.backward()
            trainer["optimizer"].step()
            trainer["optimizer"].zero_grad(set_to_none=True)
            trainer["ema"].update()
            sync(args.device)
            times.append(time.perf_counter() - start)
            del out
            if i == 0:  # fit the timed steps into what is left of the budget
                steps = max(1, min(args.steps, int((deadline - time.monotonic()) / max(times[0], 1e-3)) - 1))
                log(f"  warm-up step {times[0]:.2f} s; {steps} timed step(s)")
            if i >= steps:
                break
    except torch.cuda.OutOfMemoryError:
        status = "OOM"
    except Exception as error:  # some kernels (bitsandbytes) raise a plain RuntimeError when out of memory
        status = "OOM" if "out of memory" in str(error).lower() else f"error: {type(error).__name__}: {error}"[:400]
    if status != "ok":  # drop what the failed step left (its graph, the gradients) before the next variant
        trainer["optimizer"].zero_grad(set_to_none=True)
        gc.collect()
    if cuda:
        record["peak_gib"] = torch.cuda.max_memory_allocated() / estimates.GiB
        record["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / estimates.GiB
        torch.cuda.empty_cache()
    set_checkpointing(transformer, False)
    if status == "ok":
        record["median_step_s"] = statistics.median(times[1:])
        record["step_times_s"] = [round(t, 4) for t in times]
    return {**record, "status": status}


def prepare(transformer: nn.Module, family, args) -> dict:
    """The student LoRA, the dual EMA, the optimizer, the grids and conditioning, as the training script makes
    them (its own functions and flag defaults)."""
    script = training_args(args, checkpointing=False)
    transformer.requires_grad_(False)
    transformer.add_adapter(components.student_lora_config(script, family, transformer), adapter_name=STUDENT)
    ema = DualLoraEMA(transformer, STUDENT, fast_decay=script.fast_ema_decay, slow_decay=script.slow_ema_decay)
    cast_training_params(transformer, dtype=torch.float32)  # the trainable LoRA in fp32, as the script does
    optimizer = components.make_optimizer(script, list(lora_parameters(transformer, STUDENT).values()))
    return {
        "transformer": transformer,
        "family": family,
        "ema": ema,
        "optimizer": optimizer,
        "grid": grid_config(script, family),
        "conditioning": conditioning_config(script),
        "generator": torch.Generator().manual_seed(0),
    }


def estimate_for(spec: estimates.ModelSpec, resolution: estimates.Resolution, args, checkpointing: bool) -> dict:
    """scaling_estimates.py's numbers for this case: memory on one GPU by part (GiB) and FLOPs per step."""
    settings = estimates.Settings(
        rank=args.rank,
        batch_size=args.batch_size,
        gradient_checkpointing=checkpointing,
        use_8bit_adam=args.use_8bit_adam,
        text_tokens=args.text_tokens,
    )
    row = estimates.estimate(spec, resolution, settings)
    return {
        "memory_gib": row["memory_gib"][args.quantize or "1gpu"],
        "step_tflops": row["step_tflops_per_sample"] * args.batch_size,
        f"step_s_at_mfu_{settings.mfu}": row["step_s_per_sample"] * args.batch_size,
    }


def run_case(name: str, args, out: Path | None, deadline: float) -> None:
    """Build one model and its batch, run its variants, emit one record per variant."""
    family_name, spec = resolve(name, args.tiny)
    family = get_family(family_name)
    dtype = torch.float32 if args.tiny else torch.bfloat16
    pipe = family.tiny_pipeline()  # the text keys and dtypes (and, --tiny, the model and its batch)
    if spec is None:
        resolution = estimates.Resolution(family.tiny_resolution, family.tiny_resolution)
    else:
        first = spec.resolutions[0]
        frames = (args.frames or DEFAULT_FRAMES.get(spec.name, first.frames)) if first.frames > 1 else 1
        resolution = estimates.Resolution(args.height or first.height, args.width or first.width, frames)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    case = {
        "model": name,
        "family": family_name,
        "tiny": args.tiny,
        "resolution": str(resolution),
        "batch_size": args.batch_size,
        "rank": args.rank,
        "text_tokens": TINY_TEXT_TOKENS if args.tiny else args.text_tokens,
        "quantize": args.quantize,
        "device": device_name,
    }
    variants = {"both": (True, False), "on": (True,), "off": (False,)}[args.checkpointing]

    def emit_all(status: str) -> None:
        for checkpointing in variants:
            emit({**case, "gradient_checkpointing": checkpointing, "status": status}, out)

    if time.monotonic() > deadline:
        return emit_all("skipped: time budget")
    log(f"{name}: building ({resolution})")
    trainer = None
    try:
        if spec is None:
            transformer = family.trained_module(pipe).to(args.device)
        else:
            transformer = build_real(spec, args.device, dtype)
        if args.quantize == "nf4":
            try:
                case["quantized_linears"] = quantize_nf4_(transformer, dtype)
            except ImportError as error:
                return emit_all(f"skipped: {error}")
        trainer = prepare(transformer, family, args)
        length = case["text_tokens"]
        trainer["batch"] = {
            "latents": latent_batch(family, spec, pipe, args.batch_size, resolution, args.device),
            **text_batch(family, spec, pipe, args.batch_size, length, args.device, dtype),
        }
        trainer["uncond"] = text_batch(family, spec, pipe, 1, length, args.device, dtype)
    except torch.cuda.OutOfMemoryError:
        trainer = None
        gc.collect()
        torch.cuda.empty_cache()
        return emit_all("OOM (building the model)")
    log(f"{name}: built")
    cuda = args.device.startswith("cuda")
    device_gib = torch.cuda.get_device_properties(args.device).total_memory / estimates.GiB if cuda else math.inf
    for checkpointing in variants:
        refused = checkpointing and family.gradient_checkpointing_issue
        expected = None if spec is None or refused else estimate_for(spec, resolution, args, checkpointing)
        if expected and not args.try_predicted_oom and expected["memory_gib"]["total"] > 1.3 * device_gib:
            total = expected["memory_gib"]["total"]
            record = {
                **case,
                "gradient_checkpointing": checkpointing,
                "estimate": expected,
                "status": f"skipped: estimated {total:.0f} GiB > 1.3 x {device_gib:.0f} GiB",
            }
        else:
            record = run_variant(case, trainer, args, checkpointing, deadline)
        if expected:
            record["estimate"] = expected
            if "median_step_s" in record:  # the MFU this step time means, with the estimate's FLOP count
                record["achieved_tflops"] = expected["step_tflops"] / record["median_step_s"]
                record["mfu_of_989_tflops"] = record["achieved_tflops"] / (estimates.H100_BF16_PEAK_FLOPS / 1e12)
        log(
            f"{name} ckpt={'on' if checkpointing else 'off'}: {record['status']}, "
            f"peak {record.get('peak_gib', float('nan')):.1f} GiB, "
            f"step {record.get('median_step_s', float('nan')):.3f} s"
        )
        emit(record, out)
    trainer.clear()
    gc.collect()
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--families", nargs="+", default=list(DEFAULT_MODELS), help="Model keys or family names.")
    p.add_argument("--tiny", action="store_true", help="Each family's tiny transformer (CPU by default; seconds).")
    p.add_argument("--device", default=None, help="Default: cuda, or cpu with --tiny.")
    p.add_argument("--steps", type=int, default=3, help="Timed steps per case, after one warm-up step.")
    p.add_argument("--checkpointing", choices=("both", "on", "off"), default="both", help="Gradient checkpointing.")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--text_tokens", type=int, default=estimates.default_text_tokens(), help="--max_sequence_length.")
    p.add_argument("--height", type=int, default=None, help="Override every model's height (pixels).")
    p.add_argument("--width", type=int, default=None, help="Override every model's width (pixels).")
    p.add_argument("--frames", type=int, default=None, help="Override the frames of video models (4k + 1).")
    p.add_argument("--use_8bit_adam", action="store_true")
    p.add_argument("--quantize", choices=("nf4",), default=None, help="nf4 base (needs bitsandbytes; else skipped).")
    p.add_argument("--time_budget_s", type=float, default=300, help="Cases starting after this are skipped.")
    p.add_argument(
        "--try_predicted_oom",
        action="store_true",
        help="Also run the variants whose estimate exceeds 1.3x the GPU's memory (skipped by default: time).",
    )
    p.add_argument("--out", default=None, help="Also append the JSON lines to OUT/gpu_train_step.jsonl.")
    args = p.parse_args(argv)
    args.device = args.device or ("cpu" if args.tiny else "cuda")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("No CUDA device: run with --tiny (CPU) or on a GPU.")
    out = Path(args.out) if args.out else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    deadline = time.monotonic() + args.time_budget_s  # from this call, not from the import (tests import it early)
    for name in args.families:  # every name checked before any device time is spent
        resolve(name, args.tiny)
    for name in args.families:
        try:
            run_case(name, args, out, deadline)
        except Exception as error:  # one broken case must not cost the others their device time
            traceback.print_exc()
            emit({"model": name, "status": f"error: {type(error).__name__}: {error}"[:400]}, out)
            gc.collect()
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
    log("done")


if __name__ == "__main__":
    main()
