"""A user's first real run of the training script: the README's command shape under bf16, images in the
trackers, no local path in anything written, the card's images, diffusers' flags with diffusers' meanings.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors import safe_open
from test_train_script import ACCELERATE, TINY, _write_image_folder

from scfm_diffusers import SCFMPipeline
from scfm_diffusers.families import get_family
from scfm_diffusers.testing import save_tiny_pipeline
from scfm_diffusers.training import components
from scfm_diffusers.training.config import parse_args
from scfm_diffusers.training.data import ImageCaptionPreprocessor
from scfm_diffusers.training.step import SCFMStepOutput, drop_captions
from scfm_diffusers.training.timesteps import GridSamplerConfig, sample_grid_steps

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "train_scfm_lora.py"
PROMPT = "a red square"
BASE = ["--pretrained_model_name_or_path", "x", "--prompts_file", "p"]


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory) -> Path:
    """A tiny Flux pipeline saved under a distinctive local path (which must never be written anywhere)."""
    return Path(save_tiny_pipeline("flux", tmp_path_factory.mktemp("my-private-models") / "tiny-flux-local"))


def _written_files(folder: Path):
    return [p for p in folder.rglob("*") if p.is_file()]


# ---------------------------------------------------------------------------------------------------------
# 1. The README's command shape: accelerate launch ... --mixed_precision bf16 --validation_prompt ...
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_bf16_run_validates_calibrates_saves_and_logs_images_to_every_tracker(base_folder, tmp_path):
    out, wandb_dir = tmp_path / "out", tmp_path / "wandb"
    wandb_dir.mkdir()
    argv = [
        "--pretrained_model_name_or_path", str(base_folder),
        "--base_model_id", "org/tiny-flux",
        "--train_data_dir", str(_write_image_folder(tmp_path / "images", 4)),
        "--output_dir", str(out),
        "--resolution", "32",
        *TINY,
        "--report_to", "all",
        "--tracker_project_name", "first-run",
        "--mixed_precision", "bf16",
        "--train_batch_size", "2", "--max_train_steps", "2", "--checkpointing_steps", "2",
        "--validation_prompt", PROMPT, "--num_validation_images", "2", "--validation_steps", "1",
        "--num_inference_steps", "2", "--lora_scale_candidates", "0.5", "1.0", "1.5",
        "--calibration_images_per_prompt", "1", "--calibration_reference_steps", "3",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", WANDB_MODE="offline", WANDB_DIR=str(wandb_dir))
    launcher = ["--cpu", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "bf16"]
    result = subprocess.run(
        [ACCELERATE, "launch", *launcher, str(SCRIPT), *argv], cwd=REPO, env=env, capture_output=True, text=True
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-6000:]

    # Validated (step 1, and the final images with the saved weights), calibrated, saved.
    assert sorted(p.name for p in (out / "validation").glob("*.png")) == [
        "step000001_0.png",
        "step000001_1.png",
        "step000002_0.png",
        "step000002_1.png",
    ]
    settings = json.loads((out / "scfm_settings.json").read_text())
    assert list(settings["lora_scales"]) == ["2"] and (out / "lora_scale_calibration.json").is_file()
    with safe_open(str(out / "pytorch_lora_weights.safetensors"), "pt") as weights:  # diffusers: training dtype
        assert {weights.get_tensor(k).dtype for k in weights.keys()} == {torch.bfloat16}
    assert sorted(p.name for p in (out / "images").glob("*.png")) == ["validation_0.png", "validation_1.png"]

    # Images reached both trackers: tensorboard (an image summary in the project's run) and wandb (media files).
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = (out / "logs" / "first-run").glob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(events), size_guidance={"images": 0})
    accumulator.Reload()
    assert [e.step for e in accumulator.Images("validation")] == [1, 2]  # one summary of the 2 images a step
    media = sorted(p.name for p in wandb_dir.rglob("media/images/*.png"))
    assert len(media) == 4 and all(name.startswith("validation_") for name in media)

    # The base's local path is in no file the run wrote (card, settings, checkpoints, cache, tracker logs).
    assert settings["base_model"] == "org/tiny-flux"
    assert "base_model: org/tiny-flux" in (out / "README.md").read_text()
    for path in _written_files(out):
        data = path.read_bytes()
        for local in {str(base_folder), str(base_folder.resolve()), base_folder.parent.name}:
            assert local.encode() not in data, f"the local base path leaked into {path}"
    assert "--hub_token" not in log  # no token given: no warning


# ---------------------------------------------------------------------------------------------------------
# 2. The card's images are the uploaded weights at their calibrated scale; epochs, scale_lr, lora_layers, cache_dir
# ---------------------------------------------------------------------------------------------------------
def test_card_images_are_the_saved_weights_at_their_calibrated_scale(train_script, base_folder, tmp_path):
    out, hf_cache = tmp_path / "out", tmp_path / "hf-cache"
    argv = [
        "--pretrained_model_name_or_path", str(base_folder),
        "--train_data_dir", str(_write_image_folder(tmp_path / "images", 4)),
        "--output_dir", str(out),
        "--resolution", "32",
        *TINY,
        "--train_batch_size", "2",
        "--num_train_epochs", "2",  # 4 images / batch 2 = 2 steps per epoch
        "--scale_lr",
        "--lora_layers", "to_q,to_k,to_v,to_out.0",
        "--lora_dropout", "0.1",
        "--cache_dir", str(hf_cache),
        "--checkpointing_steps", "10",
        "--save_weights", "ema_slow",
        "--validation_prompt", PROMPT, "--num_validation_images", "2", "--validation_steps", "100",
        "--num_inference_steps", "2", "--lora_scale_candidates", "0.0", "1.0", "2.0",
        "--calibration_images_per_prompt", "2", "--calibration_reference_steps", "3",
    ]  # fmt: skip
    args = train_script.parse_args(argv)
    assert args.max_train_steps is None
    train_script.main(args)

    settings = json.loads((out / "scfm_settings.json").read_text())
    assert settings["training"]["steps"] == 4, "--num_train_epochs 2 over 2 batches an epoch"
    assert settings["training"]["learning_rate"] == pytest.approx(1e-3 * 2), "--scale_lr: × batch × accumulation"
    with safe_open(str(out / "pytorch_lora_weights.safetensors"), "pt") as weights:
        keys, metadata = list(weights.keys()), weights.metadata()
    assert keys and all(k.split(".")[-3] in ("to_q", "to_k", "to_v", "0") for k in keys), "--lora_layers"
    assert json.loads(metadata["lora_adapter_metadata"])["transformer.lora_dropout"] == 0.1
    assert any(hf_cache.rglob("*.arrow")), "--cache_dir: datasets caches the image folder there"

    # Sampling the uploaded adapter at its calibrated scale for its step count gives the card's images.
    pipe = SCFMPipeline.from_pretrained(base_folder, adapter=out)
    pipe.set_progress_bar_config(disable=True)
    scale = pipe.scfm_settings.lora_scale_for(2)
    assert scale == settings["lora_scales"]["2"]
    images = pipe(
        [PROMPT] * 2, height=32, width=32, max_sequence_length=8, generator=torch.Generator().manual_seed(0)
    ).images
    for index, image in enumerate(images):
        card = np.asarray(PIL.Image.open(out / "images" / f"validation_{index}.png"), dtype=np.int16)
        assert np.abs(card - np.asarray(image, dtype=np.int16)).max() <= 1


# ---------------------------------------------------------------------------------------------------------
# 3. Flags with diffusers' meanings, each shown to act
# ---------------------------------------------------------------------------------------------------------
def test_help_answers_before_the_heavy_imports_and_shows_defaults():
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['train_scfm_lora.py', '--help']\n"
        f"try:\n    runpy.run_path({str(SCRIPT)!r}, run_name='__main__')\n"
        "except SystemExit:\n    pass\n"
        "print('LOADED', sorted(m for m in ('diffusers', 'accelerate', 'peft', 'transformers') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "LOADED []" in result.stdout, result.stdout[-500:]
    assert "(default: 2e-05)" in result.stdout and "(default: 64)" in result.stdout
    for flag in ("--cache_dir", "--lora_layers", "--optimizer", "--num_train_epochs", "--caption_dropout"):
        assert flag in result.stdout


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--train_batch_size", "0", "--train_batch_size must be a finite number >= 1"),
        ("--lora_alpha", "-4", "--lora_alpha must be a finite number > 0"),
        ("--inference_shift", "nan", "--inference_shift must be a finite number > 0"),
        ("--caption_dropout", "1.5", "--caption_dropout must be a finite number >= 0 and <= 1"),
        ("--checkpointing_steps", "0", "--checkpointing_steps must be a finite number >= 1"),
    ],
)
def test_out_of_range_flags_are_refused_when_parsed(flag, value, message, capsys):
    with pytest.raises(SystemExit):
        parse_args([*BASE, flag, value])
    assert message in capsys.readouterr().err


def test_lora_layers_must_exist_and_use_8bit_adam_goes_with_adamw(capsys):
    transformer = get_family("flux").tiny_pipeline().transformer
    with pytest.raises(ValueError, match=r"--lora_layers names modules .* does not have: \['to_nowhere'\]"):
        components.student_lora_config(
            parse_args([*BASE, "--lora_layers", "to_q,to_nowhere"]), get_family("flux"), transformer
        )
    with pytest.raises(SystemExit):
        parse_args([*BASE, "--optimizer", "prodigy", "--use_8bit_adam"])
    assert "--use_8bit_adam is an AdamW variant" in capsys.readouterr().err


def test_prodigy_optimizer_gets_the_flags():
    import prodigyopt

    param = torch.nn.Parameter(torch.ones(3))
    args = parse_args([*BASE, "--optimizer", "prodigy", "--learning_rate", "1.0", "--prodigy_beta3", "0.5",
                       "--no-prodigy_decouple", "--adam_weight_decay", "0.01"])  # fmt: skip
    optimizer = components.make_optimizer(args, [param])
    assert isinstance(optimizer, prodigyopt.Prodigy)
    group = optimizer.param_groups[0]
    assert group["beta3"] == 0.5 and group["decouple"] is False and group["weight_decay"] == 0.01
    assert group["use_bias_correction"] is True and group["safeguard_warmup"] is True


def test_lr_num_cycles_and_lr_power_shape_the_schedule():
    def lrs(*flags: str) -> list[float]:
        args = parse_args([*BASE, "--learning_rate", "1.0", "--max_train_steps", "8", *flags])
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=1.0)
        schedule = components.make_lr_scheduler(args, optimizer, num_processes=1)
        values = []
        for _ in range(8):
            values.append(schedule.get_last_lr()[0])
            optimizer.step()
            schedule.step()
        return values

    one, two = (
        lrs("--lr_scheduler", "cosine_with_restarts"),
        lrs("--lr_scheduler", "cosine_with_restarts", "--lr_num_cycles", "2"),
    )
    assert one[4] < 0.6 and two[4] == pytest.approx(1.0), "two cycles restart at the half"
    linear, squared = lrs("--lr_scheduler", "polynomial"), lrs("--lr_scheduler", "polynomial", "--lr_power", "2")
    assert squared[4] < linear[4]


def test_image_interpolation_mode_resizes_with_that_filter():
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 36, 3), dtype=np.uint8))
    bilinear = ImageCaptionPreprocessor(16, center_crop=True).transform(image)
    lanczos = ImageCaptionPreprocessor(16, center_crop=True, interpolation="lanczos").transform(image)
    expected = np.asarray(image.resize((16, 18), PIL.Image.Resampling.LANCZOS), dtype=np.float32)[1:17] / 127.5 - 1
    torch.testing.assert_close(lanczos, torch.from_numpy(expected).permute(2, 0, 1))
    assert not torch.equal(bilinear, lanczos)
    with pytest.raises(ValueError, match="interpolation must be one of"):
        ImageCaptionPreprocessor(16, interpolation="cubic-ish")


def test_caption_dropout_swaps_in_the_empty_prompt_per_row():
    text = {"prompt_embeds": torch.ones(1000, 3, 2), "mask": torch.ones(1000, 3, dtype=torch.bool)}
    uncond = {"prompt_embeds": torch.zeros(1, 3, 2), "mask": torch.zeros(1, 3, dtype=torch.bool)}
    generator = torch.Generator().manual_seed(0)
    assert drop_captions(text, uncond, 0.0, generator)["prompt_embeds"].eq(1).all()
    dropped = drop_captions(text, uncond, 0.3, generator)
    rows = dropped["prompt_embeds"].flatten(1).eq(0).all(1)
    assert 0.25 < rows.float().mean() < 0.35 and torch.equal(dropped["mask"].any(1), ~rows)
    assert dropped["mask"].dtype == torch.bool


def test_progress_shows_only_the_loss_parts_a_batch_has():
    from scfm_diffusers.training.objective import SCFMLossOutput

    nan = torch.tensor(float("nan"))
    for ratio, present, absent in ((1.0, "loss_teacher", "loss_self"), (0.0, "loss_self", "loss_teacher")):
        steps = sample_grid_steps(
            4, GridSamplerConfig(teacher_ratio=ratio), image_seq_len=64, generator=torch.Generator()
        )
        losses = SCFMLossOutput(
            loss=torch.tensor(0.5), loss_per_sample=torch.full((4,), 0.5), loss_teacher=torch.tensor(0.5) if ratio else nan,
            loss_self=nan if ratio else torch.tensor(0.5), loss_flow_matching=nan, target=torch.zeros(4), x_sigma=torch.zeros(4),
        )  # fmt: skip
        values = SCFMStepOutput(losses, steps).log_values()
        assert values == {"loss": 0.5, present: 0.5} and absent not in values
