"""The training script's configuration: dataclasses with help text and ranges, from which the CLI is built.

Each group of flags is one dataclass; each field is one flag (``--name``), its default the method's value
(SCFM_METHOD.md) or diffusers' for the flags its LoRA scripts share. :func:`parse_args` builds the parser
from the dataclasses (``--help`` shows every default and loads no torch), checks every range and the rules
that tie flags together, and returns one flat ``argparse.Namespace``. The objective's grid flags come from
:class:`~scfm_diffusers.training.timesteps.GridSamplerConfig` and default to None (family, then method).

Example:
    >>> args = parse_args(["--pretrained_model_name_or_path", "black-forest-labs/FLUX.1-dev",
    ...                    "--prompts_file", "prompts.txt"])
    >>> args.rank, args.learning_rate, args.max_train_steps
    (64, 2e-05, 1000)
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "AdapterArgs",
    "DataArgs",
    "LoraArgs",
    "ModelArgs",
    "OptimizationArgs",
    "RunArgs",
    "build_parser",
    "conditioning_config",
    "grid_config",
    "inference_shift",
    "parse_args",
]

DEFAULT_MAX_TRAIN_STEPS = 1000
MAX_STEPS = 1000  # = settings.MAX_INFERENCE_STEPS: step counts above the schedulers' 1000 training timesteps
MAX_GRID_SIZE = 1000  # finest σ grid of the objective: teacher grids, self grids, 2·N·level of --target_steps
QUANTIZATION_NAMES = ("nf4", "int8", "torchao-int8", "torchao-fp8")  # = training.quantization.QUANTIZATION_CHOICES
INTERPOLATION_NAMES = ("bilinear", "bicubic", "lanczos", "nearest", "box", "hamming")  # = buckets.INTERPOLATION_MODES
LORA_SCALE_CANDIDATES = tuple(round(0.1 * i, 1) for i in range(21))  # = calibration.DEFAULT_LORA_SCALE_CANDIDATES


def arg(default: Any = None, help: str = "", **metadata: Any) -> Any:  # noqa: A002  (argparse's word)
    """A dataclass field that is a flag: ``help``, and optionally ``choices``, ``required``, ``min`` / ``max``
    (inclusive bounds), ``above`` (exclusive lower bound) or ``multiple`` (of an integer), checked by
    :func:`parse_args`."""
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **metadata})
    return field(default=default, metadata={"help": help, **metadata})


@dataclass
class ModelArgs:
    """model"""

    pretrained_model_name_or_path: str = arg(
        None, "Base pipeline: a folder or a Hub id, of any registered family (docs/families.md).", required=True
    )
    revision: str | None = arg(None, "Hub revision of the base model.")
    variant: str | None = arg(None, "Weights variant of the base model (e.g. fp16).")
    cache_dir: str | None = arg(None, "Where downloaded models and data sets are stored (as in diffusers).")
    base_model_id: str | None = arg(
        None,
        "Hub id of the base model, recorded as base_model in the adapter's settings and card when "
        "--pretrained_model_name_or_path is a local folder (a local path is never written; a Hugging Face cache "
        "snapshot is recognised without it). Needed with --push_to_hub from a local folder.",
    )
    quantize_base: str | None = arg(
        None,
        "Load the base transformer (= the teacher) quantized, QLoRA-style (docs/quantization.md): nf4 / int8 "
        "(bitsandbytes, CUDA), torchao-int8 / torchao-fp8 (weight-only, CPU too).",
        choices=QUANTIZATION_NAMES,
    )


@dataclass
class DataArgs:
    """data (exactly one of --dataset_name, --train_data_dir, --prompts_file)"""

    dataset_name: str | None = arg(None, "`datasets` dataset: Hub id, local folder or builder (webdataset, parquet).")
    dataset_config_name: str | None = arg(None, "Config name of --dataset_name.")
    train_data_dir: str | None = arg(
        None, "Folder of images or video clips (.mp4 .webm .mkv .mov .avi) with metadata.jsonl (file_name, text)."
    )
    data_files: list[str] | None = arg(None, "Files for --dataset_name's builder (e.g. webdataset .tar shards).")
    image_column: str = arg("image", "Dataset column with the images.")
    caption_column: str = arg("text", "Dataset column with the captions.")
    video_column: str = arg("video", "Dataset column with the video clips (file paths or bytes), with --num_frames.")
    num_frames: int | None = arg(
        None,
        "Video: frames per training clip (default: image data; needed for clips). The family checks the count: "
        "Wan needs 4k+1 (e.g. 81, 49, 33); --num_frames 1 trains a video family on images.",
        min=1,
    )
    video_fps: float | None = arg(
        None,
        "Video: frame rate the clips are resampled to, by picking the nearest frame (default: each clip's own; "
        "Wan 2.1 was trained at 16).",
        above=0,
    )
    max_train_samples: int | None = arg(None, "Use at most this many pairs (shuffled with --seed first).", min=1)
    prompts_file: str | None = arg(None, "Data-free mode: one prompt per line; the teacher draws the images.")
    teacher_num_inference_steps: int = arg(32, "Teacher steps for data-free images.", min=1, max=MAX_STEPS)
    teacher_images_per_prompt: int = arg(1, "Images per prompt in data-free mode.", min=1)
    resolution: int = arg(
        512, "Square training resolution (pixels), a multiple of the family's latent patch (16 px).", min=8
    )
    center_crop: bool = arg(False, "Center-crop instead of random crops.")
    random_flip: bool = arg(False, "Random horizontal flips.")
    image_interpolation_mode: str = arg("bilinear", "Resize filter of the images.", choices=INTERPOLATION_NAMES)
    max_sequence_length: int = arg(256, "Text tokens per caption (T5 / LLM encoder).", min=1)
    dataloader_num_workers: int = arg(0, "DataLoader worker processes.", min=0)
    aspect_ratio_buckets: bool = arg(
        False, "Keep aspect ratios: buckets of ~--resolution² pixels (multiples of 16 px); one bucket per batch."
    )
    streaming: bool = arg(
        False, "Stream --dataset_name and encode on the fly (no cache; one pass; for data sets too large to cache)."
    )
    shuffle_buffer_size: int = arg(1000, "Shuffle buffer of a streamed data set.", min=1)
    cache_dtype: str = arg("bf16", "Dtype of the cached latents/embeddings.", choices=("bf16", "fp16", "fp32"))
    cache_shard_size: int = arg(256, "Rows (or unique captions) per cache shard.", min=1)
    offload: bool = arg(False, "Keep the VAE and text encoders on the CPU except while they encode.")


@dataclass
class OptimizationArgs:
    """optimisation"""

    output_dir: str = arg("scfm-lora", "Adapter folder; checkpoints and caches go below it.")
    seed: int = arg(0, "Seed of everything random.", min=0, max=2**32 - 1)
    train_batch_size: int = arg(8, "Batch size per device.", min=1)
    gradient_accumulation_steps: int = arg(1, "Micro-batches per optimizer step.", min=1)
    max_train_steps: int | None = arg(
        None, f"Optimizer steps (default {DEFAULT_MAX_TRAIN_STEPS}, or --num_train_epochs' worth).", min=1
    )
    num_train_epochs: int | None = arg(
        None, "Train this many epochs of the cached data (when no --max_train_steps).", min=1
    )
    learning_rate: float = arg(2e-5, "Learning rate (reference: 2e-5; Prodigy: 1.0).", above=0)
    scale_lr: bool = arg(False, "Scale the learning rate by processes × batch size × accumulation steps.")
    lr_scheduler: str = arg(
        "constant",
        "Learning-rate schedule.",
        choices=("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"),
    )
    lr_warmup_steps: int = arg(0, "Warm-up steps of the learning-rate schedule.", min=0)
    lr_num_cycles: int = arg(1, "Hard restarts of cosine_with_restarts.", min=1)
    lr_power: float = arg(1.0, "Power of the polynomial schedule.", above=0)
    optimizer: str = arg("adamw", "Optimizer (Prodigy needs `pip install prodigyopt`).", choices=("adamw", "prodigy"))
    use_8bit_adam: bool = arg(False, "bitsandbytes AdamW8bit (with --optimizer adamw).")
    adam_beta1: float = arg(0.9, "Adam / Prodigy beta1.", min=0, max=1)
    adam_beta2: float = arg(0.999, "Adam / Prodigy beta2.", min=0, max=1)
    adam_weight_decay: float = arg(1e-4, "Weight decay.", min=0)
    adam_epsilon: float = arg(1e-8, "Adam / Prodigy epsilon.", above=0)
    prodigy_beta3: float | None = arg(None, "Prodigy's step-size EMA coefficient (None: sqrt(beta2)).", min=0, max=1)
    prodigy_decouple: bool = arg(True, "Prodigy: AdamW-style decoupled weight decay.")
    prodigy_use_bias_correction: bool = arg(True, "Prodigy: Adam's bias correction.")
    prodigy_safeguard_warmup: bool = arg(True, "Prodigy: no step-size growth during warm-up.")
    max_grad_norm: float | None = arg(None, "Grad-norm clip (default: the family's; Flux 10, SD3 2).", above=0)
    gradient_checkpointing: bool = arg(False, "Recompute activations in backward.")
    mixed_precision: str | None = arg(None, "Overrides accelerate's setting.", choices=("no", "fp16", "bf16"))
    allow_tf32: bool = arg(False, "Allow TF32 matmuls on Ampere+ GPUs.")
    enable_xformers_memory_efficient_attention: bool = arg(False, "xformers attention (CUDA only).")


@dataclass
class LoraArgs:
    """LoRA and SCFM"""

    rank: int = arg(64, "LoRA rank (reference: 64).", min=1)
    lora_alpha: float = arg(64.0, "LoRA alpha (reference: 64).", above=0)
    lora_dropout: float = arg(0.0, "Dropout of the LoRA layers.", min=0, max=0.99)
    lora_layers: str | None = arg(
        None,
        'Comma-separated module names to put the LoRA on, e.g. "to_q,to_k,to_v,to_out.0" (default: the family\'s).',
    )
    self_grids: str = arg(
        "targeted",
        "targeted: self rows train the jumps of the --target_steps (default --num_inference_steps) sampling "
        "grids; generic: the method's --self_grid_sizes mix at random shifts (docs/method.md).",
        choices=("targeted", "generic"),
    )
    fast_ema_decay: float = arg(0.99, "Decay of the fast EMA.", min=0, max=1)
    slow_ema_decay: float = arg(0.999, "Decay of the slow EMA.", min=0, max=1)
    ema_restart_steps: int = arg(0, "Reset both EMAs to the student every N steps (0: never).", min=0)
    guidance_range: tuple[float, float] = arg((0.0, 7.5), "Embedded-guidance families (Flux-dev): g ~ U[a, b).", min=0)
    guidance_scale: float | None = arg(
        None, "Embedded guidance: train with this one value instead of --guidance_range (as in diffusers).", min=0
    )
    cfg_scale: float | None = arg(
        None, "CFG families (SD3, ...): CFG scale of every training velocity (default: the family's).", min=0
    )
    caption_dropout: float = arg(0.0, "Share of rows trained on the empty prompt.", min=0, max=1)
    save_weights: str = arg("student", "Weights written to the adapter.", choices=("student", "ema_slow", "ema_fast"))
    upcast_before_saving: bool = arg(False, "Save the LoRA in float32 (default: the training precision).")


@dataclass
class AdapterArgs:
    """adapter settings, validation and calibration"""

    num_inference_steps: int = arg(4, "Steps the adapter recommends (3-8).", min=1, max=MAX_STEPS)
    inference_shift: float | None = arg(None, "Sampling shift (default: the family's, Flux 3.25, SD3 3.0).", above=0)
    inference_guidance_scale: float | None = arg(
        None, "Guidance the adapter is sampled with (default: the family's; a CFG student keeps --cfg_scale).", min=0
    )
    lora_scale: float = arg(1.0, "LoRA scale at inference where none is calibrated.", min=0)
    validation_prompt: str | None = arg(None, "Prompt sampled during training (as in diffusers).")
    num_validation_images: int = arg(4, "Images (clips) of --validation_prompt.", min=1)
    validation_fps: int = arg(16, "Frame rate of the validation videos of a video family (Wan: 16).", min=1)
    validation_steps: int = arg(200, "Validate every N steps.", min=1)
    calibration_prompts: list[str] | None = arg(
        None, "Prompts of the LoRA-scale calibration after training (default: --validation_prompt)."
    )
    calibration_images_per_prompt: int = arg(4, "Noise seeds per calibration prompt.", min=1)
    calibration_steps: list[int] | None = arg(
        None,
        "Step counts given a calibrated LoRA scale (default: --target_steps and --num_inference_steps).",
        min=1,
        max=MAX_STEPS,
    )
    lora_scale_candidates: list[float] = arg(
        list(LORA_SCALE_CANDIDATES), "LoRA scales tried per step count (default 0 to 2.0 by 0.1).", min=0
    )
    calibration_reference_steps: int = arg(32, "Teacher steps of the calibration reference.", min=1, max=MAX_STEPS)
    calibration_batch_size: int = arg(4, "Images per pipeline call in the calibration.", min=1)
    no_lora_scale_calibration: bool = arg(False, "Keep --lora_scale for every step count.")


@dataclass
class RunArgs:
    """checkpoints, logging, Hub"""

    checkpointing_steps: int = arg(500, "Save a resumable checkpoint every N steps.", min=1)
    checkpoints_total_limit: int | None = arg(None, "Keep at most this many checkpoints.", min=1)
    resume_from_checkpoint: str | None = arg(None, 'A checkpoint folder, or "latest".')
    report_to: str = arg("tensorboard", '"tensorboard", "wandb", "all" or "none".')
    tracker_project_name: str = arg("scfm-lora", "Project name of the trackers (wandb project, tensorboard run).")
    logging_dir: str = arg("logs", "Tracker folder, below --output_dir.")
    push_to_hub: bool = arg(False, "Create the Hub repository at the start, upload the adapter at the end.")
    hub_model_id: str | None = arg(None, "Hub repository (default: the output folder's name).")
    hub_token: str | None = arg(
        None, "Hub token. Prefer HF_TOKEN or `hf auth login`: a token on the command line is visible to others."
    )
    hub_private: bool = arg(False, "Create the Hub repository as private.")
    nccl_timeout: int = arg(1800, "Process-group timeout in seconds (long caching/generation).", min=1)


ARG_GROUPS = (ModelArgs, DataArgs, OptimizationArgs, LoraArgs, AdapterArgs, RunArgs)


def _argparse_kwargs(f: dataclasses.Field, annotation: Any) -> dict[str, Any]:
    """argparse keywords of one dataclass field: type and nargs from the annotation, help, default, choices."""
    kwargs: dict[str, Any] = {"help": f.metadata["help"], "required": f.metadata.get("required", False)}
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    if "choices" in f.metadata:
        kwargs["choices"] = f.metadata["choices"]
    if annotation is bool:
        kwargs["action"] = argparse.BooleanOptionalAction if default else "store_true"
        return {**kwargs, "default": default}
    inner = annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):  # X | None
        inner = next(a for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(inner) in (list, tuple):
        items = typing.get_args(inner)
        kwargs["nargs"] = len(items) if typing.get_origin(inner) is tuple and Ellipsis not in items else "+"
        kwargs["type"] = items[0]
    elif not kwargs["required"]:
        kwargs["type"] = inner
    return {**kwargs, "default": default}


def build_parser() -> argparse.ArgumentParser:
    """The training script's parser: one group per dataclass of :data:`ARG_GROUPS`, plus the grid flags."""
    from .timesteps import GridSamplerConfig  # the objective's own settings, one flag each

    parser = argparse.ArgumentParser(
        description="Distill a pre-trained flow-matching model into a 3-8 step SCFM LoRA adapter.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for group_class in ARG_GROUPS:
        group = parser.add_argument_group(group_class.__doc__)
        hints = typing.get_type_hints(group_class)
        for f in dataclasses.fields(group_class):
            group.add_argument(f"--{f.name}", **_argparse_kwargs(f, hints[f.name]))
    grid = parser.add_argument_group("SCFM objective grids (default: the family's, then the method's)")
    hints = typing.get_type_hints(GridSamplerConfig)
    for f in dataclasses.fields(GridSamplerConfig):
        kwargs = _argparse_kwargs(f, hints[f.name])
        grid.add_argument(f"--{f.name}", **{**kwargs, "default": None})
    return parser


#: Ranges of the objective's grid flags (one per :class:`~scfm_diffusers.training.timesteps.GridSamplerConfig`
#: field), checked when parsed; the rules that tie them together are GridSamplerConfig's, checked once the
#: family's defaults are known (:func:`grid_config`, called by ``components.load_base_model``).
GRID_FLAG_RANGES: dict[str, dict[str, float]] = {
    "teacher_ratio": {"min": 0, "max": 1},
    "flow_matching_ratio": {"min": 0, "max": 1},
    "teacher_grid_size_min": {"min": 2, "max": MAX_GRID_SIZE, "multiple": 2},
    "teacher_grid_size_max": {"min": 2, "max": MAX_GRID_SIZE, "multiple": 2},
    "self_grid_sizes": {"min": 2, "max": MAX_GRID_SIZE, "multiple": 2},
    "shift_min": {"above": 0},
    "shift_max": {"above": 0},
    "dynamic_shift_prob": {"min": 0, "max": 1},
    "base_shift": {},  # μ, any finite value
    "max_shift": {},
    "base_image_seq_len": {"min": 1},
    "max_image_seq_len": {"min": 1},
    "max_sigma": {"above": 0, "max": 1},
    "target_steps": {"min": 1, "max": MAX_GRID_SIZE // 2},
    "target_levels": {"min": 1, "max": MAX_GRID_SIZE // 2},
    "target_shift": {"above": 0},
}


def _range_error(flag: str, value: Any, bounds: dict[str, Any]) -> str | None:
    """The message for a number outside ``bounds`` (``min``, ``max``, ``above``, ``multiple``) or not finite."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    low, above, high, multiple = (bounds.get(key) for key in ("min", "above", "max", "multiple"))
    texts = [
        f">= {low}" if low is not None else "",
        f"> {above}" if above is not None else "",
        f"<= {high}" if high is not None else "",
        f"a multiple of {multiple}" if multiple is not None else "",
    ]
    if (
        not math.isfinite(value)
        or (low is not None and value < low)
        or (high is not None and value > high)
        or (above is not None and value <= above)
        or (multiple is not None and value % multiple)
    ):
        return f"--{flag} must be a finite number {' and '.join(t for t in texts if t)}, got {value}.".replace(
            "number , got", "number, got"
        )
    return None


def _check_ranges(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every numeric flag finite and within its bounds (``min`` / ``max`` / ``above`` / ``multiple`` of the
    dataclass fields, :data:`GRID_FLAG_RANGES` for the grid flags); the message names the flag and the range."""
    from .timesteps import GridSamplerConfig

    checks = [(f.name, f.metadata) for group_class in ARG_GROUPS for f in dataclasses.fields(group_class)]
    checks += [(f.name, GRID_FLAG_RANGES[f.name]) for f in dataclasses.fields(GridSamplerConfig)]
    for name, bounds in checks:
        value = getattr(args, name)
        for v in value if isinstance(value, (list, tuple)) else [value]:
            message = _range_error(name, v, bounds)
            if message:
                parser.error(message)
    if args.self_grids == "targeted":  # the finest self grid is 2·N·level: keep it within MAX_GRID_SIZE
        flag, steps = (
            ("--target_steps", args.target_steps)
            if args.target_steps
            else ("--num_inference_steps", [args.num_inference_steps])
        )
        levels = args.target_levels or GridSamplerConfig().target_levels
        if 2 * max(steps) * max(levels) > MAX_GRID_SIZE:
            parser.error(
                f"{flag} {max(steps)} with --target_levels up to {max(levels)} trains self grids of 2·N·level = "
                f"{2 * max(steps) * max(levels)} steps, above the finest allowed ({MAX_GRID_SIZE}): use {flag} <= "
                f"{MAX_GRID_SIZE // (2 * max(levels))} (SCFM adapters sample in a few steps) or lower --target_levels."
            )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check the training script's command line (see :func:`build_parser`).

    Raises:
        SystemExit: With argparse's message naming the flag, for a bad value or a bad combination of flags.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_ranges(parser, args)
    sources = [s for s in (args.dataset_name, args.train_data_dir, args.prompts_file) if s]
    if len(sources) != 1:
        parser.error("give exactly one data source: --dataset_name, --train_data_dir or --prompts_file.")
    if args.streaming and not args.dataset_name:
        parser.error(
            "--streaming reads a --dataset_name (a Hub id, a folder, or a builder such as webdataset with --data_files)."
        )
    if args.streaming and args.num_train_epochs:
        parser.error("a stream has no epochs: give --max_train_steps with --streaming, not --num_train_epochs.")
    if args.aspect_ratio_buckets and (args.num_frames or 1) > 1:
        parser.error(
            "--aspect_ratio_buckets is for images: clips (--num_frames > 1) are cropped to --resolution squares."
        )
    if args.data_files and not args.dataset_name:
        parser.error(
            "--data_files goes with --dataset_name (e.g. --dataset_name webdataset --data_files 'shards/*.tar')."
        )
    targeted_flags = [
        f"--{n}" for n in ("target_steps", "target_levels", "target_shift") if getattr(args, n) is not None
    ]
    if args.self_grids == "targeted" and args.self_grid_sizes is not None:
        parser.error(
            "--self_grid_sizes sets the generic self grids: add --self_grids generic (or use --target_steps)."
        )
    if args.self_grids == "generic" and targeted_flags:
        parser.error(f"{', '.join(targeted_flags)} only apply with --self_grids targeted (the default).")
    if args.use_8bit_adam and args.optimizer != "adamw":
        parser.error("--use_8bit_adam is an AdamW variant: drop it or use --optimizer adamw.")
    low, high = args.guidance_range
    if low > high:
        parser.error(f"--guidance_range needs low <= high, got {low} {high}.")
    if args.resume_from_checkpoint not in (None, "latest") and not Path(args.resume_from_checkpoint).is_dir():
        parser.error(
            f"--resume_from_checkpoint {args.resume_from_checkpoint!r} does not exist (use a checkpoint-N folder or 'latest')."
        )
    if args.max_train_steps is None and args.num_train_epochs is None:
        args.max_train_steps = DEFAULT_MAX_TRAIN_STEPS
    return args


def inference_shift(args: argparse.Namespace, family) -> float:
    """The shift the adapter is sampled with: ``--inference_shift`` or the family's reference shift."""
    return args.inference_shift or float(family.default_settings["shift"])


def grid_config(args: argparse.Namespace, family):
    """The objective's grid settings: flags that were given, family defaults, then the method's defaults.

    ``--self_grids targeted`` (default) trains the jumps of the ``--target_steps`` sampling grids (default: the
    adapter's ``--num_inference_steps``) at the adapter's sampling shift.
    """
    from .timesteps import GridSamplerConfig

    given = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(GridSamplerConfig)
        if getattr(args, f.name) is not None
    }
    for name, value in family.grid_defaults.items():
        given.setdefault(name, value)
    if args.self_grids == "targeted":
        given.setdefault("target_steps", [args.num_inference_steps])
        given.setdefault("target_shift", inference_shift(args, family))
    try:
        return GridSamplerConfig(**given)
    except ValueError as error:  # a rule between grid flags, or a flag against the family's default: name flags
        names = "|".join(f.name for f in dataclasses.fields(GridSamplerConfig))
        message = re.sub(rf"\b({names})\b", r"--\1", str(error))
        raise ValueError(
            f"{message} Change those flags ({family.name}'s grid defaults: {family.grid_defaults})."
        ) from None


def conditioning_config(args: argparse.Namespace):
    """The batch conditioning: embedded guidance g ~ U[--guidance_range) (``--guidance_scale g`` fixes it, as in
    diffusers' Flux scripts), a CFG family's ``--cfg_scale`` (default: the family's), ``--caption_dropout``."""
    from ..families import ConditioningConfig

    return ConditioningConfig(
        guidance_range=tuple(args.guidance_range),
        guidance_scale=args.guidance_scale,
        cfg_scale=args.cfg_scale,
        caption_dropout=args.caption_dropout,
    )
