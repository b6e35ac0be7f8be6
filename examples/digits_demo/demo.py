"""The end-to-end demo: distill the digits teacher with SCFM, train a reflow baseline at equal compute, compare.

Run ``PYTHONPATH=examples python -m digits_demo --output_dir demo_output`` (``make demo``); ``--quick`` runs a
tiny version of every stage (< 90 s) to check the plumbing. Stages, each cached when its settings match:

1. **Teacher and classifier** — :func:`~.digits.train_digits_teacher` (a 16×16 Flux model, 64 image tokens)
   and :func:`~.digits.train_digits_classifier`, under ``--cache_dir``.
2. **SCFM** — the digits train split is written as an image folder with ``metadata.jsonl`` and distilled by
   the very script users run, by its entry point: ``accelerate launch --cpu --num_processes 1 -m
   train_scfm_lora`` with this package's folder (``examples/``) on ``PYTHONPATH``, in a subprocess, twice:
   with the script's default step-targeted self grids (``--target_steps 3 4 8``: one adapter for the three
   evaluated step counts) and, as the report's extra row, with the method's generic self grids
   (``--self_grids generic``). Both calibrate a LoRA scale per step count on the ten digit prompts.
3. **Reflow baseline** — :func:`~scfm_diffusers.evaluation.baselines.train_reflow_lora` at the same training
   compute as EACH SCFM adapter (:func:`~scfm_diffusers.evaluation.baselines.equal_compute_reflow_plan`),
   with the same LoRA, learning rate and σ distribution, trained in the demo's process while the two SCFM
   subprocesses run.
4. **Evaluation** — :func:`~scfm_diffusers.evaluation.harness.evaluate` on 10 prompts × ``per_class``
   seeds: the teacher in 32 steps (reference), the teacher in N plain Euler steps at each shift of
   ``teacher_shifts`` (the table shows the best one), reflow and SCFM in N steps, for N = 3, 4, 8. FD uses
   the digit classifier's features against the held-out real digits; paired error is to the 32-step teacher
   from the same noise; accuracy is the classifier's on the prompted digit.
5. **Report** — ``results.md``/``results.json``/``grid.png``/``quality_vs_steps.png`` in ``--output_dir``.

**Shift.** The method's fixed-shift range U[2.5, 4.5] and inference shift 3.25 were tuned for 1024² Flux
latents (4096 tokens, where Flux's own dynamic shift is e^1.15 ≈ 3.16). This 64-token model's own shift is
e^μ(64) ≈ 1.60, so the demo scales the range and the inference shift by e^μ(64)/e^μ(4096) ≈ 0.505
(:func:`resolution_scaled_shifts`): training shifts U[1.26, 2.27], inference shift 1.64. The reflow baseline
gets the same σ distribution and inference shift; the teacher's N-step Euler baseline is reported at its best
shift among ``teacher_shifts``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch

from scfm_diffusers.calibration import DEFAULT_LORA_SCALE_CANDIDATES
from scfm_diffusers.evaluation.baselines import (
    ReflowConfig,
    equal_compute_reflow_plan,
    scfm_training_compute,
    train_reflow_lora,
)
from scfm_diffusers.evaluation.harness import ReferenceSet, evaluate, fixed_shift_scheduler, generate
from scfm_diffusers.evaluation.metrics import extract_features
from scfm_diffusers.evaluation.report import markdown_table, write_report
from scfm_diffusers.sigmas import resolution_mu
from scfm_diffusers.training.timesteps import GridSamplerConfig

from .digits import (
    DIGITS_MAX_SEQUENCE_LENGTH,
    IMAGE_SIZE,
    DigitsClassifierConfig,
    DigitsClassifierFeatureExtractor,
    DigitsTeacherConfig,
    default_cache_dir,
    digit_prompt,
    digits_split,
    train_digits_classifier,
    train_digits_teacher,
)

__all__ = ["DemoConfig", "QUICK", "main", "resolution_scaled_shifts", "run_demo", "write_image_folder"]

#: The method's reference shifts for 1024² Flux latents (method doc).
REFERENCE_SHIFT_RANGE, REFERENCE_INFERENCE_SHIFT, REFERENCE_SEQ_LEN = (2.5, 4.5), 3.25, 4096
STAMP_FILE = "demo_settings.json"
#: The training script runs by its entry point, as the module ``train_scfm_lora`` of the folder that holds this
#: package (``examples/``), which the subprocesses get on ``PYTHONPATH``.
TRAIN_MODULE = "train_scfm_lora"
EXAMPLES_DIR = Path(__file__).resolve().parent.parent


def resolution_scaled_shifts(image_seq_len: int) -> dict[str, float]:
    """The method's shift range and inference shift moved to another resolution.

    Both are multiplied by ``e^μ(L) / e^μ(4096)``, the ratio of Flux's own resolution-dependent shift at
    ``L`` packed tokens to the one at 1024² where the method's values were chosen.

    Returns:
        ``{"shift_min", "shift_max", "inference_shift", "ratio"}``; at 64 tokens ≈ 1.26, 2.27, 1.64, 0.505.
    """
    ratio = math.exp(resolution_mu(image_seq_len)) / math.exp(resolution_mu(REFERENCE_SEQ_LEN))
    return {
        "shift_min": round(REFERENCE_SHIFT_RANGE[0] * ratio, 3),
        "shift_max": round(REFERENCE_SHIFT_RANGE[1] * ratio, 3),
        "inference_shift": round(REFERENCE_INFERENCE_SHIFT * ratio, 3),
        "ratio": ratio,
    }


@dataclass
class DemoConfig:
    """Sizes of the demo; :data:`QUICK` is the plumbing check.

    Attributes:
        teacher_train_steps: Pre-training steps of the digits teacher.
        teacher: Teacher model settings (None: the digits module's defaults).
        classifier: Classifier settings (None: defaults).
        scfm_steps: SCFM optimizer steps.
        batch_size: SCFM (and reflow) batch size.
        rank: LoRA rank (alpha = rank).
        learning_rate: SCFM and reflow learning rate.
        teacher_grid_size_min: Smallest SCFM teacher grid.
        teacher_grid_size_max: Largest SCFM teacher grid.
        train_images: Training images written for SCFM (None: the whole train split).
        reference_steps: Teacher steps of the reference and of the reflow pairs.
        eval_steps: Few-step counts N.
        teacher_shifts: Fixed shifts tried for the teacher's N-step Euler baseline.
        per_class: Evaluation images per digit.
        generation_fraction: Share of reflow's budget spent on drawing pairs.
        latency_repeats: Timed single-image calls per sampler.
        seed: Seed of the training runs.
        generic_row: Also train SCFM with the method's generic self grids (the report's extra row).
        calibration_images_per_prompt: Noise seeds per digit prompt in the LoRA-scale calibration.
        parallel_training: Train the two SCFM adapters at once, one thread each (both cores busy; a tiny
            model does not use two threads well).
        scale_one_rows: Also evaluate every SCFM adapter at LoRA scale 1 (rows "<name> @ scale 1" in
            ``results.json``'s ``all_rows``, not in the table): what the calibration adds.
        extra: Further flags of the SCFM training script (name without ``--`` → value), both variants.
    """

    teacher_train_steps: int = 1000
    teacher: DigitsTeacherConfig | None = None
    classifier: DigitsClassifierConfig | None = None
    scfm_steps: int = 1500
    batch_size: int = 32
    rank: int = 16
    learning_rate: float = 3e-4
    teacher_grid_size_min: int = 16
    teacher_grid_size_max: int = 32
    train_images: int | None = None
    reference_steps: int = 32
    eval_steps: tuple[int, ...] = (3, 4, 8)
    teacher_shifts: tuple[float, ...] = (1.0, 1.6, 3.0)
    per_class: int = 50
    generation_fraction: float = 0.4
    latency_repeats: int = 3
    seed: int = 0
    generic_row: bool = True
    calibration_images_per_prompt: int = 4
    parallel_training: bool = True
    scale_one_rows: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


QUICK = DemoConfig(
    teacher_train_steps=20,
    teacher=DigitsTeacherConfig(
        num_layers=1, num_single_layers=1, num_attention_heads=2, vae_channels=4, vae_steps=20, warmup_steps=2
    ),
    classifier=DigitsClassifierConfig(epochs=1),
    scfm_steps=3,
    batch_size=8,
    rank=4,
    teacher_grid_size_min=4,
    teacher_grid_size_max=8,
    train_images=32,
    reference_steps=8,
    eval_steps=(3, 4, 8),
    teacher_shifts=(1.0, 3.0),
    per_class=2,
    latency_repeats=1,
    calibration_images_per_prompt=1,
    scale_one_rows=True,
)

#: The SCFM variants of the demo: the step-targeted default and the method's generic self-grid mix.
SCFM_VARIANTS = {"SCFM": {}, "SCFM generic grids": {"self_grids": "generic"}}


def _log(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def _stamp_matches(folder: Path, settings: dict[str, Any]) -> bool:
    try:
        return (
            json.loads((folder / STAMP_FILE).read_text()) == settings
            and (folder / "pytorch_lora_weights.safetensors").is_file()
        )
    except (OSError, ValueError):
        return False


def write_image_folder(images: torch.Tensor, labels: torch.Tensor, folder: str | Path) -> Path:
    """Write RGB images in [-1, 1] as PNGs with a ``metadata.jsonl`` of ``{"file_name", "text"}`` rows."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    rows = []
    for index, (array, label) in enumerate(zip(pixels, labels.tolist())):
        name = f"{index:05d}.png"
        PIL.Image.fromarray(np.ascontiguousarray(array)).save(folder / name)
        rows.append(json.dumps({"file_name": name, "text": digit_prompt(label)}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return folder


def scfm_training_args(
    teacher: str, data_dir: Path, output_dir: Path, config: DemoConfig, shifts: dict[str, float], **variant: Any
) -> dict[str, Any]:
    """The training script's flags for one SCFM variant (``variant``: e.g. ``{"self_grids": "generic"}``).

    The step-targeted default trains the jumps of every evaluated step count (``--target_steps 3 4 8``) at the
    inference shift, and calibrates a LoRA scale per step count on the ten digit prompts.
    """
    return {
        "pretrained_model_name_or_path": teacher,
        "train_data_dir": str(data_dir),
        "output_dir": str(output_dir),
        "resolution": IMAGE_SIZE,
        "rank": config.rank,
        "lora_alpha": config.rank,
        "learning_rate": config.learning_rate,
        "train_batch_size": config.batch_size,
        "max_train_steps": config.scfm_steps,
        "max_sequence_length": DIGITS_MAX_SEQUENCE_LENGTH,
        "teacher_grid_size_min": config.teacher_grid_size_min,
        "teacher_grid_size_max": config.teacher_grid_size_max,
        "shift_min": shifts["shift_min"],
        "shift_max": shifts["shift_max"],
        "inference_shift": shifts["inference_shift"],
        "num_inference_steps": config.eval_steps[0],
        **({} if variant.get("self_grids") == "generic" else {"target_steps": list(config.eval_steps)}),
        "calibration_prompts": [digit_prompt(label) for label in range(10)],
        "calibration_images_per_prompt": config.calibration_images_per_prompt,
        "calibration_steps": list(config.eval_steps),
        "calibration_reference_steps": config.reference_steps,
        "calibration_batch_size": 10 * config.calibration_images_per_prompt,  # all at once: a tiny model
        "lora_scale_candidates": list(DEFAULT_LORA_SCALE_CANDIDATES),  # in the settings stamp: a change retrains
        "report_to": "none",
        "checkpointing_steps": 10**9,
        "seed": config.seed,
        **config.extra,  # further training-script flags, e.g. {"slow_ema_decay": 0.99}
        **variant,
    }


def _launch_command(args: dict[str, Any]) -> list[str]:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1"]
    command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", TRAIN_MODULE]
    for key, value in args.items():  # list values (e.g. target_steps) become several arguments
        command += [f"--{key}", *(map(str, value) if isinstance(value, list | tuple) else [str(value)])]
    return command + ["--center_crop"]


def train_scfm(
    runs: dict[Path, dict[str, Any]], *, parallel: bool = True, meanwhile: Callable[[], None] | None = None
) -> list[Path]:
    """Distill with the real training script, one subprocess per output folder (folders with the same settings
    are reused).

    Args:
        runs: ``{output folder: flags}`` (see :func:`scfm_training_args`).
        parallel: Run the subprocesses at once, one thread each (their logs go to ``<folder>/train.log``),
            and run ``meanwhile`` in this process while they train; else one after the other, then ``meanwhile``.
        meanwhile: Other work of the demo (the reflow baseline), run while the subprocesses train.

    Returns:
        The adapter folders (the keys of ``runs``), once every adapter exists.
    """
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    env["PYTHONPATH"] = os.pathsep.join([str(EXAMPLES_DIR), *filter(None, [os.environ.get("PYTHONPATH")])])
    if parallel:
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    pending = {}
    for output_dir, args in runs.items():
        if _stamp_matches(output_dir, args):
            _log(f"reusing the SCFM adapter in {output_dir} (same settings)")
            continue
        command = _launch_command(args)
        output_dir.mkdir(parents=True, exist_ok=True)
        _log(
            "SCFM: " + " ".join(command) + (f"\n[demo]   (progress in {output_dir / 'train.log'})" if parallel else "")
        )
        log = open(output_dir / "train.log", "w") if parallel else None  # noqa: SIM115
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT if log else None)
        pending[output_dir] = (process, args, log)
        if not parallel:
            _wait(output_dir, *pending.pop(output_dir))
    try:
        if meanwhile is not None:
            meanwhile()
    except BaseException:
        for process, _, _ in pending.values():
            process.kill()
        raise
    for output_dir, (process, args, log) in pending.items():
        _wait(output_dir, process, args, log)
    return list(runs)


def _wait(output_dir: Path, process: subprocess.Popen, args: dict[str, Any], log: Any) -> None:
    code = process.wait()
    if log is not None:
        log.close()
    if code != 0:
        tail = (output_dir / "train.log").read_text()[-3000:] if log is not None else ""
        raise subprocess.CalledProcessError(code, process.args, output=tail)
    (output_dir / STAMP_FILE).write_text(json.dumps(args, indent=2))


def run_demo(
    output_dir: str | Path, config: DemoConfig | None = None, *, cache_dir: str | Path | None = None
) -> dict[str, Any]:
    """Run every stage of the demo (see the module docstring) and write the report to ``output_dir``.

    Returns:
        The JSON payload written to ``results.json``.
    """
    from diffusers import FluxPipeline

    from scfm_diffusers.pipeline_scfm import SCFMPipeline

    config = config or DemoConfig()
    output_dir = Path(output_dir)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    output_dir.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    shifts = resolution_scaled_shifts((IMAGE_SIZE // 2) ** 2)

    # 1. Teacher and classifier (cached).
    classifier_dir = train_digits_classifier(cache_dir / "classifier", config=config.classifier)
    teacher = train_digits_teacher(
        cache_dir / "teacher", steps=config.teacher_train_steps, config=config.teacher, seed=config.seed
    )
    seconds["teacher_and_classifier"] = time.perf_counter() - start
    split = digits_split(config.seed)

    # 2. SCFM through the training script, on the train split written as an image folder (both variants).
    stage = time.perf_counter()
    count = len(split.train_labels) if config.train_images is None else config.train_images
    data_dir = output_dir / "data" / "train"
    metadata = data_dir / "metadata.jsonl"
    if not metadata.is_file() or len(metadata.read_text().splitlines()) != count:
        write_image_folder(split.train_images[:count], split.train_labels[:count], data_dir)
    variants = {name: flags for name, flags in SCFM_VARIANTS.items() if config.generic_row or not flags}
    scfm_dirs = {name: output_dir / name.lower().replace(" ", "_") for name in variants}

    # 3. Reflow at the same compute, with the same LoRA, learning rate, σ distribution and inference shift;
    #    trained in this process while the SCFM subprocesses run (one thread each: a tiny model is
    #    overhead-bound, so three single-threaded jobs keep the two cores busier than one after the other).
    budget = scfm_training_compute(config.scfm_steps, config.batch_size)
    plan = equal_compute_reflow_plan(
        budget,
        teacher_steps=config.reference_steps,
        batch_size=config.batch_size,
        generation_fraction=config.generation_fraction,
    )
    reflow_config = ReflowConfig(
        num_pairs=plan.num_pairs,
        teacher_steps=plan.teacher_steps,
        train_steps=plan.train_steps,
        batch_size=plan.batch_size,
        rank=config.rank,
        lora_alpha=config.rank,
        learning_rate=config.learning_rate,
        grid=GridSamplerConfig(
            teacher_grid_size_min=config.teacher_grid_size_min,
            teacher_grid_size_max=config.teacher_grid_size_max,
            shift_min=shifts["shift_min"],
            shift_max=shifts["shift_max"],
        ),
        height=IMAGE_SIZE,
        width=IMAGE_SIZE,
        max_sequence_length=DIGITS_MAX_SEQUENCE_LENGTH,
        pair_batch_size=250,
        num_inference_steps=config.eval_steps[0],
        inference_shift=shifts["inference_shift"],
        seed=config.seed,
    )
    reflow_dir = output_dir / "reflow"
    reflow_settings = {"teacher": teacher, "train_images": count, **reflow_config.to_dict()}
    pipe = FluxPipeline.from_pretrained(teacher)
    pipe.set_progress_bar_config(disable=True)

    def train_reflow() -> None:
        if _stamp_matches(reflow_dir, reflow_settings):
            _log(f"reusing the reflow adapter in {reflow_dir} (same settings)")
            return
        threads = torch.get_num_threads()
        if config.parallel_training:
            torch.set_num_threads(1)
        try:
            prompts = [digit_prompt(label) for label in split.train_labels[:count].tolist()]
            train_reflow_lora(pipe, prompts, reflow_dir, reflow_config, base_model=teacher, progress=_log)
        finally:
            torch.set_num_threads(threads)
        (reflow_dir / STAMP_FILE).write_text(json.dumps(reflow_settings, indent=2))

    train_scfm(
        {
            scfm_dirs[name]: scfm_training_args(teacher, data_dir, scfm_dirs[name], config, shifts, **flags)
            for name, flags in variants.items()
        },
        parallel=config.parallel_training,
        meanwhile=train_reflow,
    )
    seconds["scfm_and_reflow"] = time.perf_counter() - stage

    # 4. Evaluation: same prompts and seeds for every sampler.
    stage = time.perf_counter()
    labels = torch.arange(10).repeat_interleave(config.per_class)
    prompts = [digit_prompt(label) for label in labels.tolist()]
    seeds = [10_000 + i for i in range(len(prompts))]
    columns = [label * config.per_class for label in range(10)]  # one image per digit in the grid
    extractor = DigitsClassifierFeatureExtractor(classifier_dir, config=config.classifier)
    real_features = extract_features(extractor, (split.eval_images + 1) / 2)
    call = {"max_sequence_length": DIGITS_MAX_SEQUENCE_LENGTH}
    common = {
        "height": IMAGE_SIZE,
        "width": IMAGE_SIZE,
        "feature_extractor": extractor,
        "real_features": real_features,
        "classifier": extractor,
        "labels": labels,
        "batch_size": 250,
        "latency_repeats": config.latency_repeats,
    }
    reference = ReferenceSet.build(
        generate(
            pipe, prompts, seeds, num_inference_steps=config.reference_steps, height=IMAGE_SIZE, width=IMAGE_SIZE,
            batch_size=250, call_kwargs=call,
        ),
        extractor,
        real_features,
    )  # fmt: skip
    all_rows: list[dict[str, Any]] = []
    grid_images: dict[tuple[str, int], torch.Tensor] = {}

    def run(sampler: Any, method: str, steps: int, shift: Any, lora_scale: float | None = None, **call_extra) -> dict:
        result = evaluate(
            sampler, prompts, seeds, num_inference_steps=steps, reference_images=reference,
            call_kwargs={**call, **call_extra}, name=f"{method} {steps}", **common,
        )  # fmt: skip
        row = {"method": method, "shift": shift, "lora_scale": lora_scale, **result.to_dict()}
        row.pop("settings")
        all_rows.append(row)
        grid_images[(method, steps)] = result.images[columns]
        _log(json.dumps(row))
        return row

    stock = pipe.scheduler
    mu = resolution_mu((IMAGE_SIZE // 2) ** 2)
    run(pipe, "teacher", config.reference_steps, f"dynamic (e^mu={math.exp(mu):.2f})")
    euler_rows: dict[int, list[dict]] = {}
    for shift in config.teacher_shifts:
        pipe.scheduler = fixed_shift_scheduler(pipe, shift)
        for steps in config.eval_steps:
            euler_rows.setdefault(steps, []).append(run(pipe, f"teacher Euler s={shift:g}", steps, shift))
    pipe.scheduler = stock
    for method, folder in (("reflow", reflow_dir), *scfm_dirs.items()):
        student = SCFMPipeline.from_pipe(pipe, adapter=folder, adapter_name="demo")
        for steps in config.eval_steps:  # each at its calibrated LoRA scale, when the adapter has one
            run(student, method, steps, student.scfm_settings.shift, student.scfm_settings.lora_scale_for(steps))
            if config.scale_one_rows and method != "reflow":
                scale_one = {"joint_attention_kwargs": {"scale": 1.0}}  # wins over the calibrated scale
                run(student, f"{method} @ scale 1", steps, student.scfm_settings.shift, 1.0, **scale_one)
        student.delete_adapters("demo")
    seconds["evaluation"] = time.perf_counter() - stage

    # 5. Report: the teacher's N-step Euler row at its best shift (lowest FD vs real), reflow, the SCFM variants.
    rows = [all_rows[0]]
    grid_rows = [(f"teacher {config.reference_steps}", grid_images[("teacher", config.reference_steps)])]
    for steps in config.eval_steps:
        best = min(euler_rows[steps], key=lambda r: r["fd_vs_real"])
        by_method = {r["method"]: r for r in all_rows if r["num_inference_steps"] == steps}
        rows += [{**best, "method": "teacher Euler (best shift)"}, by_method["reflow"]]
        rows += [by_method[name] for name in scfm_dirs]
        grid_rows += [
            (f"Euler {steps} (s={best['shift']:g})", grid_images[(best["method"], steps)]),
            (f"reflow {steps}", grid_images[("reflow", steps)]),
            *((f"{name.replace(' grids', '')} {steps}", grid_images[(name, steps)]) for name in scfm_dirs),
        ]
    seconds["total"] = time.perf_counter() - start
    calibration_compute = (
        10
        * config.calibration_images_per_prompt
        * (config.reference_steps + len(DEFAULT_LORA_SCALE_CANDIDATES) * sum(config.eval_steps))
    )
    settings = {
        "teacher": teacher,
        "scfm_adapters": {name: str(folder) for name, folder in scfm_dirs.items()},
        "reflow_adapter": str(reflow_dir),
        "images": f"{len(prompts)} (10 digits x {config.per_class} seeds), 16x16",
        "scfm": f"{config.scfm_steps} steps x batch {config.batch_size}, rank {config.rank}, lr {config.learning_rate}",
        "reflow": f"{plan.num_pairs} pairs x {plan.teacher_steps} teacher steps + {plan.train_steps} steps x batch {plan.batch_size}",
        "compute_forward_equivalents": {"scfm": budget, "reflow": plan.compute, "calibration": calibration_compute},
        "training_shift_range": f"U[{shifts['shift_min']}, {shifts['shift_max']}] (method's [2.5, 4.5] x {shifts['ratio']:.3f})",
        "inference_shift_students": shifts["inference_shift"],
        "teacher_fd_vs_real": reference.fd_vs_real,
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "config": {k: str(v) for k, v in dataclasses.asdict(config).items()},
    }
    notes = [
        f"Reference: the teacher in {config.reference_steps} steps (its own dynamic shift). FD uses the digit "
        "classifier's penultimate features against the 360 held-out real digits; ΔFD = FD(row) − FD(teacher "
        f"{config.reference_steps}); paired RMSE is to the reference image from the same noise ([0, 1] pixels); "
        "accuracy is the classifier's on the prompted digit; latency is one 16×16 image on this CPU.",
        f"Shifts: SCFM and reflow are trained with fixed shifts U[{shifts['shift_min']}, {shifts['shift_max']}] and "
        f"sampled at shift {shifts['inference_shift']} (the method's 1024² values scaled to 64 tokens); the teacher's "
        f"N-step Euler row shows its best shift among {list(config.teacher_shifts)} (all in results.json: all_rows).",
        f"Equal training compute: SCFM {budget:,} forward-equivalents ({config.scfm_steps} steps × {config.batch_size} "
        f"× 5); reflow {plan.compute:,} ({plan.num_pairs} pairs × {plan.teacher_steps} + {plan.train_steps} steps × "
        f"{plan.batch_size} × 3). The LoRA-scale calibration after SCFM training adds "
        f"{calibration_compute:,} ({10 * config.calibration_images_per_prompt} images × ({config.reference_steps} "
        f"+ {len(DEFAULT_LORA_SCALE_CANDIDATES)} scales × {sum(config.eval_steps)} steps)), "
        f"{calibration_compute / budget:.1%} of the budget; reflow is sampled at LoRA scale 1.",
        "SCFM: one adapter for all three step counts, trained with step-targeted self grids (the training "
        "script's default, --target_steps " + " ".join(map(str, config.eval_steps)) + ") and sampled at the LoRA "
        "scale calibrated for each step count"
        + (
            "; 'SCFM generic grids' is the method's self-grid mix {2, 4, 8, 16} at random shifts, same budget "
            "and calibration."
            if config.generic_row
            else "."
        ),
    ]
    write_report(
        output_dir, rows, title="SCFM digits demo", notes=notes, settings=settings, grid_rows=grid_rows, grid_scale=4
    )
    payload = json.loads((output_dir / "results.json").read_text())
    payload["all_rows"] = all_rows
    (output_dir / "results.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(markdown_table(rows), flush=True)
    _log(f"report in {output_dir} ({seconds['total']:.0f} s)")
    return payload


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command line of the demo."""
    parser = argparse.ArgumentParser(
        prog="python -m digits_demo", description="SCFM vs reflow vs Euler on the digits teacher."
    )
    parser.add_argument("--output_dir", default="demo_output", help="Adapters, data and report.")
    parser.add_argument(
        "--cache_dir", default=None, help="Teacher/classifier cache (default: $SCFM_DIGITS_CACHE or ~/.cache/...)."
    )
    parser.add_argument("--quick", action="store_true", help="Tiny version of every stage (< 90 s), for tests.")
    parser.add_argument("--scfm_steps", type=int, default=None, help="Override the SCFM (and reflow) budget.")
    parser.add_argument("--per_class", type=int, default=None, help="Evaluation images per digit.")
    parser.add_argument(
        "--scale_one_rows",
        action="store_true",
        help="Also evaluate the SCFM adapters at LoRA scale 1 (results.json all_rows): what the calibration adds.",
    )
    args = parser.parse_args(argv)
    config = dataclasses.replace(QUICK if args.quick else DemoConfig())
    if args.scfm_steps is not None:
        config.scfm_steps = args.scfm_steps
    if args.per_class is not None:
        config.per_class = args.per_class
    config.scale_one_rows = config.scale_one_rows or args.scale_one_rows
    cache_dir = args.cache_dir
    if cache_dir is None and args.quick:
        cache_dir = Path(args.output_dir) / "cache"  # never mix the tiny teacher with the real one
    return run_demo(args.output_dir, config, cache_dir=cache_dir)


if __name__ == "__main__":
    main()
