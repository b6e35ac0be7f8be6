"""``scfm-eval``: measure a base model and its few-step adapters against the base model's many-step samples.

For a base model of any family, ``num_images`` (prompt, seed) pairs are sampled by:

1. the teacher (the base model, its own scheduler) in ``--teacher_steps`` steps: the reference;
2. the teacher in N plain Euler steps for every N of ``--steps`` (its own scheduler, or each fixed shift of
   ``--teacher_shifts``: report the best one as the fair baseline);
3. every ``--adapter`` (an SCFM adapter folder or Hub id, or any baseline saved the same way) in N steps
   with its stored shift, guidance and LoRA scale (``--shift``/``--lora_scale`` override them).

Image i always starts from the noise of seed ``--seed + i``, so the paired error to the reference is
measured from the same noise. Writes ``results.json``, ``results.md``, ``grid.png`` and
``quality_vs_steps.png`` (with matplotlib: ``pip install "scfm-diffusers[eval]"``) to ``--output_dir`` and
prints the table on stdout; progress goes to stderr. Exit status: 0 on success, 2 for a usage error, 1 when
the evaluation fails (one ``scfm-eval: error: ...`` line on stderr).

``--feature_extractor`` takes a registered name (see ``--help``) or the ``module:factory`` of any
extractor, imported only when built (e.g. the digits demo's classifier,
``digits_demo.digits:DigitsClassifierFeatureExtractor`` with ``PYTHONPATH=examples``).

A video family (Wan) makes clips of ``--num_frames`` frames (default: the pipeline's, 81 for Wan). The table gives
latency per clip and the paired error over all frames of a clip; the first ``--num_videos`` clips of every
sampler are written as ``videos/<method>/<N>steps/<prompt index>_<seed>.mp4`` at ``--fps`` (with imageio:
``pip install "scfm-diffusers[video]"``). The image metrics (FD, CLIP score) and the image grid are skipped,
and the log says so.

Example (one GPU)::

    scfm-eval --base_model black-forest-labs/FLUX.1-dev --adapter flux-scfm-4step \\
        --prompts_file prompts.txt --num_images 1000 --steps 3 4 8 --teacher_steps 32 \\
        --feature_extractor clip --feature_extractor_path openai/clip-vit-large-patch14 \\
        --clip_model_path openai/clip-vit-large-patch14 --device cuda --dtype bf16 --output_dir eval-flux
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch

from .._files import read_prompts
from .harness import ReferenceSet, evaluate, fixed_shift_scheduler, generate
from .metrics import available_feature_extractors, extract_features, feature_extractor_factory
from .report import DEFAULT_COLUMNS, VIDEO_COLUMNS, markdown_table, require_video_writer, write_report, write_video

__all__ = ["build_feature_extractor", "load_image_folder", "main", "parse_args", "run"]

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and check the command line (see the module docstring); exits with status 2 on a usage error."""
    p = argparse.ArgumentParser(prog="scfm-eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--base_model", required=True, help="Pipeline of any SCFM family: folder or Hub id.")
    p.add_argument(
        "--adapter",
        action="append",
        default=[],
        help="Adapter folder or Hub id, optionally NAME=PATH; repeat for several (SCFM and baselines).",
    )
    p.add_argument("--prompts_file", required=True, help="One prompt per line; cycled to --num_images.")
    p.add_argument("--num_images", type=int, default=100, help="Images per sampler (>= 2 for FD).")
    p.add_argument("--seed", type=int, default=0, help="Image i uses seed SEED + i (same noise for every sampler).")
    p.add_argument("--steps", type=int, nargs="+", default=[3, 4, 8], help="Few-step counts to evaluate.")
    p.add_argument("--teacher_steps", type=int, default=32, help="Steps of the reference samples.")
    p.add_argument(
        "--teacher_shifts",
        type=float,
        nargs="*",
        default=[],
        help="Also sample the teacher at N steps with these fixed shifts (default: only its own scheduler).",
    )
    p.add_argument("--height", type=int, default=1024, help="Image height.")
    p.add_argument("--width", type=int, default=1024, help="Image width.")
    p.add_argument(
        "--num_frames",
        type=int,
        default=None,
        help="Video families: frames per clip (Wan: 4k + 1; default: the pipeline's, 81 for Wan).",
    )
    p.add_argument("--fps", type=int, default=16, help="Video families: frames per second of the written mp4s.")
    p.add_argument(
        "--num_videos", type=int, default=8, help="Video families: clips written per sampler as mp4 (0: none)."
    )
    p.add_argument(
        "--guidance_scale",
        type=float,
        default=None,
        help="Guidance for every sampler (default: the teacher at its family's SCFM guidance, each adapter at its own).",
    )
    p.add_argument("--max_sequence_length", type=int, default=None, help="T5 tokens (default: the pipeline's).")
    p.add_argument("--shift", type=float, default=None, help="Override the adapters' sampling shift.")
    p.add_argument("--lora_scale", type=float, default=None, help="Override the adapters' LoRA scale.")
    p.add_argument(
        "--feature_extractor",
        default=None,
        help=f"Feature extractor for FD: {', '.join(available_feature_extractors())} or a module:factory.",
    )
    p.add_argument(
        "--feature_extractor_path",
        default=None,
        help="Weights of the feature extractor (CLIP folder or Hub id; the digits demo's classifier folder).",
    )
    p.add_argument("--real_images_dir", default=None, help="Folder of real images: enables FD vs real and ΔFD.")
    p.add_argument("--clip_model_path", default=None, help="CLIP model for the CLIP score (folder or Hub id).")
    p.add_argument("--batch_size", type=int, default=4, help="Images per pipeline call.")
    p.add_argument("--latency_repeats", type=int, default=3, help="Timed single-image calls (0: skip).")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="Device.")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="Pipeline dtype (bf16 on GPUs).")
    p.add_argument("--grid_images", type=int, default=8, help="Columns of the image grid (0: no grid).")
    p.add_argument("--output_dir", default="scfm-eval", help="Report folder.")
    args = p.parse_args(argv)
    if args.num_images < 1 or min(args.steps + [args.teacher_steps]) < 1 or args.batch_size < 1:
        p.error("--num_images, --steps, --teacher_steps and --batch_size must be >= 1.")
    if args.num_frames is not None and args.num_frames < 1:
        p.error(f"--num_frames must be >= 1, got {args.num_frames}.")
    if args.fps < 1 or args.num_videos < 0:
        p.error("--fps must be >= 1 and --num_videos >= 0.")
    if args.num_images < 2 and args.feature_extractor:
        p.error("--num_images must be >= 2 for Fréchet distances.")
    if not os.path.isfile(args.prompts_file):
        p.error(f"--prompts_file {args.prompts_file!r} is not a file.")
    if args.real_images_dir is not None and not os.path.isdir(args.real_images_dir):
        p.error(f"--real_images_dir {args.real_images_dir!r} is not a folder.")
    known = available_feature_extractors()
    if args.feature_extractor and args.feature_extractor not in known and ":" not in args.feature_extractor:
        p.error(
            f"unknown --feature_extractor {args.feature_extractor!r}; known: {', '.join(known)} or a module:factory."
        )
    return args


def build_feature_extractor(name: str, path: str | None = None, device: str | None = None) -> Any:
    """Build a registered (or ``module:factory``) extractor, passing ``path`` as its ``model_path`` or ``path``."""
    factory = feature_extractor_factory(name)
    params = inspect.signature(factory).parameters
    kwargs: dict[str, Any] = {}
    if path is not None:
        kwargs["model_path" if "model_path" in params else "path"] = path
    if device is not None and "device" in params:
        kwargs["device"] = device
    return factory(**kwargs)


def load_image_folder(folder: str | Path, height: int, width: int) -> torch.Tensor:
    """All images below ``folder`` as ``(N, 3, height, width)`` float in [0, 1] (bicubic resize)."""
    paths = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise FileNotFoundError(f"No images ({', '.join(IMAGE_SUFFIXES)}) found below {str(folder)!r}.")
    arrays = []
    for path in paths:
        with PIL.Image.open(path) as image:
            arrays.append(np.asarray(image.convert("RGB").resize((width, height), PIL.Image.BICUBIC)))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0


def _video_folder(method: str, steps: int) -> str:
    """``videos/<method>/<N>steps``, the method's name made a safe folder name."""
    return f"videos/{re.sub(r'[^A-Za-z0-9._-]+', '_', method).strip('_') or 'method'}/{steps}steps"


def _adapter_name_and_path(spec: str) -> tuple[str, str]:
    if "=" in spec:
        name, path = spec.split("=", 1)
        return name, path
    return Path(spec.rstrip("/")).name or spec, spec


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Evaluate as ``args`` (from :func:`parse_args`) say; returns the payload written to ``results.json``.

    Raises the error of whatever fails (a missing model, an unreadable adapter, ...).
    """
    from diffusers import DiffusionPipeline

    from ..families import family_of_pipeline
    from ..pipeline_scfm import SCFMPipeline

    start = time.perf_counter()
    prompt_list = read_prompts(args.prompts_file)
    prompts = [prompt_list[i % len(prompt_list)] for i in range(args.num_images)]
    seeds = [args.seed + i for i in range(args.num_images)]
    logger.info("Loading %s (%s on %s).", args.base_model, args.dtype, args.device)
    pipe = DiffusionPipeline.from_pretrained(args.base_model, dtype=DTYPES[args.dtype]).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    common: dict[str, Any] = {}
    if args.guidance_scale is not None:
        common["guidance_scale"] = args.guidance_scale
    if args.max_sequence_length is not None:
        common["max_sequence_length"] = args.max_sequence_length
    # The teacher samples at --guidance_scale or, by default, at the guidance its family's adapters are trained
    # and sampled with, in the pipeline's own terms (Qwen-Image: true CFG needs a negative prompt): the few-step
    # rows are compared with the teacher they were distilled from.
    family = family_of_pipeline(pipe)
    video = family.modality == "video"
    if args.num_frames is not None:
        family.check_num_frames(args.num_frames)  # an image family takes no --num_frames
        common.update(family.frame_kwargs(args.num_frames))
    if video and args.num_videos > 0:
        require_video_writer()  # before the sampling, not after it
    extras = {
        "--feature_extractor": args.feature_extractor,
        "--real_images_dir": args.real_images_dir,
        "--clip_model_path": args.clip_model_path,
        "the image grid": args.grid_images > 0 or None,
    }
    skipped = [name for name, value in extras.items() if value]
    if video and skipped:
        logger.info(
            "Video (%s): skipping %s (image-only); the table has latency per clip and paired error over all frames.",
            family.name,
            ", ".join(skipped),
        )
    teacher = dict(common)
    guidance = args.guidance_scale if args.guidance_scale is not None else family.default_settings["guidance_scale"]
    family.fill_guidance(teacher, float(guidance))
    extractor = real_features = clip = None
    if args.feature_extractor and not video:
        logger.info("Building the feature extractor %s.", args.feature_extractor)
        extractor = build_feature_extractor(args.feature_extractor, args.feature_extractor_path, args.device)
    if args.real_images_dir and extractor is not None:
        real_features = extract_features(extractor, load_image_folder(args.real_images_dir, args.height, args.width))
    if args.clip_model_path and not video:
        clip = build_feature_extractor("clip", args.clip_model_path, args.device)
    shared = {
        "height": args.height,
        "width": args.width,
        "feature_extractor": extractor,
        "real_features": real_features,
        "clip": clip,
        "batch_size": args.batch_size,
        "latency_repeats": args.latency_repeats,
    }

    # 1. Reference: the teacher's many-step samples (its own scheduler).
    samples = "clips" if video else "images"
    logger.info("Reference: %d %s from the teacher in %d steps.", args.num_images, samples, args.teacher_steps)
    reference_images = generate(
        pipe,
        prompts,
        seeds,
        num_inference_steps=args.teacher_steps,
        height=args.height,
        width=args.width,
        batch_size=args.batch_size,
        call_kwargs=teacher,
    )
    reference = ReferenceSet.build(reference_images, extractor, real_features)
    results = []

    def measure(sampler: Any, method: str, steps: int, shift: Any, call_kwargs: dict[str, Any]) -> None:
        result = evaluate(
            sampler,
            prompts,
            seeds,
            num_inference_steps=steps,
            reference_images=reference,
            call_kwargs={**common, **call_kwargs},
            name=f"{method} ({steps} steps)",
            settings={"shift": shift},
            **shared,
        )
        row = {"method": method, "shift": shift, **result.to_dict()}
        kept = None
        if video:  # written now and dropped: a sampler's clips are many times its images' memory
            folder = _video_folder(method, steps)
            for i, frames in enumerate(result.images[: args.num_videos]):
                write_video(
                    Path(args.output_dir, folder, f"{i % len(prompt_list)}_{seeds[i]}.mp4"), frames, fps=args.fps
                )
            row["videos"] = folder if args.num_videos > 0 else None
        elif args.grid_images > 0:
            kept = result.images[: args.grid_images].clone()  # a copy: a view would keep every image alive
        results.append((row, kept))
        logger.info(json.dumps({k: v for k, v in row.items() if k != "settings"}))

    # 2. Teacher: many steps (reference) and N steps, own scheduler and each requested fixed shift.
    stock_scheduler = pipe.scheduler
    measure(pipe, "teacher", args.teacher_steps, "default", teacher)
    for steps in args.steps:
        measure(pipe, "teacher Euler", steps, "default", teacher)
    for shift in args.teacher_shifts:
        pipe.scheduler = fixed_shift_scheduler(pipe, shift)
        for steps in args.steps:
            measure(pipe, f"teacher Euler shift {shift:g}", steps, shift, teacher)
    pipe.scheduler = stock_scheduler

    # 3. Adapters, one at a time on the shared base weights.
    for spec in args.adapter:
        name, path = _adapter_name_and_path(spec)
        adapter_name = "eval_adapter"
        scfm = SCFMPipeline.from_pipe(pipe, adapter=path, adapter_name=adapter_name)
        scfm.set_progress_bar_config(disable=True)
        overrides = {k: v for k, v in (("shift", args.shift), ("lora_scale", args.lora_scale)) if v is not None}
        shift = overrides.get("shift", scfm.scfm_settings.shift)
        try:
            for steps in args.steps:
                measure(scfm, name, steps, shift, overrides)
        finally:
            scfm.delete_adapters(adapter_name)

    # 4. Report.
    rows = [row for row, _ in results]
    grid_rows = [
        (f"{row['method']} {row['num_inference_steps']}", images) for row, images in results if images is not None
    ]
    settings = {k: v for k, v in vars(args).items()}
    settings["teacher_fd_vs_real"] = reference.fd_vs_real
    settings["seconds"] = round(time.perf_counter() - start, 1)
    notes = [
        f"Reference: the teacher in {args.teacher_steps} steps from the same seeds. Paired RMSE is in [0, 1] pixel "
        "units; ΔFD = FD(sampler, real) − FD(reference, real); shift 'default' is the pipeline's own scheduler."
    ]
    columns = VIDEO_COLUMNS if video else DEFAULT_COLUMNS
    if video:
        written_clips = min(args.num_videos, args.num_images)
        notes.append(
            f"Video: {reference_images.shape[1]} frames per clip; latency is seconds per clip and the paired RMSE is "
            "over every frame of a clip."
            + (
                f" The first {written_clips} clips of each row are in the row's folder, "
                f"videos/<method>/<N>steps/<prompt index>_<seed>.mp4 ({args.fps} fps)."
                if written_clips
                else ""
            )
        )
    written = write_report(
        args.output_dir,
        rows,
        title=f"scfm-eval: {args.base_model}",
        notes=notes,
        settings=settings,
        grid_rows=grid_rows or None,
        columns=columns,
        grid_scale=max(1, 128 // max(args.height, args.width))
        if max(args.height, args.width) <= 128
        else 256 / max(args.height, args.width),
    )
    print(markdown_table(rows, columns), flush=True)
    logger.info("Wrote %s.", ", ".join(str(path) for path in written.values()))
    return json.loads(written["json"].read_text())


def main(argv: Sequence[str] | None = None) -> int:
    """The ``scfm-eval`` command: 0 on success, 2 for a usage error, 1 when the evaluation fails.

    Progress goes to stderr through logging, the table to stdout. An expected failure (a missing or
    unreadable model, adapter or file, a missing optional dependency, CUDA out of memory) is one line on
    stderr; anything else is a bug and keeps its traceback.
    """
    try:
        args = parse_args(argv)
    except SystemExit as stop:  # argparse: --help (0) or a usage error (2), already printed
        return stop.code if isinstance(stop.code, int) else 2
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s scfm-eval: %(message)s", "%H:%M:%S"))
    package_logger = logging.getLogger("scfm_diffusers")
    previous_level = package_logger.level
    package_logger.addHandler(handler)
    package_logger.setLevel(logging.INFO)
    try:
        run(args)
    except (OSError, ValueError, ImportError, torch.cuda.OutOfMemoryError) as error:
        print(" ".join(f"scfm-eval: error: {type(error).__name__}: {error}".split()), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("scfm-eval: interrupted", file=sys.stderr)
        return 130
    finally:
        package_logger.removeHandler(handler)
        package_logger.setLevel(previous_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
