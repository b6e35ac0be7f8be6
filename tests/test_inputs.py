"""Bad inputs are refused early, in one line naming the flag or file and the fix (issue 17, items 4 and 5).

Flags at parse time, the resolution against the family's latent patch before any weights load, adapter
settings, 16-bit images read at their scale, non-UTF-8 prompt files, null captions, truncated or misshapen
adapter weights, and a full disk (a real 64 KiB tmpfs where this runs as root, and /dev/full).
"""

import errno
import json
import logging
import math
import os
import subprocess

import numpy as np
import pytest
import torch
from conftest import add_trained_lora
from PIL import Image

from scfm_diffusers import SCFMFluxPipeline, SCFMInferenceSettings, load_adapter_settings, save_adapter
from scfm_diffusers._files import DiskFullError, read_prompts, reporting_disk_full, write_text_atomic
from scfm_diffusers.adapter import SETTINGS_NAME, WEIGHTS_NAME, check_weights_file
from scfm_diffusers.testing import tiny_pipeline
from scfm_diffusers.training import components
from scfm_diffusers.training.buckets import to_rgb
from scfm_diffusers.training.config import GRID_FLAG_RANGES, grid_config, parse_args
from scfm_diffusers.training.data import CaptionError, ImageCaptionPreprocessor, load_image_caption_dataset
from scfm_diffusers.training.timesteps import GridSamplerConfig

BASE = ["--pretrained_model_name_or_path", "x", "--prompts_file", "p"]


# ---------------------------------------------------------------------------------------------------------
# 4. Flags and settings
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "flags, message",
    [
        # the list: each failed late (ZeroDivisionError, IndexError, reshape) or ran to rc 0
        (["--checkpointing_steps", "0"], "--checkpointing_steps must be a finite number >= 1, got 0"),
        (["--validation_steps", "0"], "--validation_steps must be a finite number >= 1, got 0"),
        (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps must be a finite number >= 1"),
        (["--train_batch_size", "0"], "--train_batch_size must be a finite number >= 1"),
        (["--max_train_samples", "0"], "--max_train_samples must be a finite number >= 1"),
        (["--resolution", "7"], "--resolution must be a finite number >= 8"),
        (["--max_train_steps", "0"], "--max_train_steps must be a finite number >= 1"),
        (["--lora_alpha", "-4"], "--lora_alpha must be a finite number > 0"),
        (["--target_steps", "1000"], "--target_steps must be a finite number >= 1 and <= 500, got 1000"),
        # the other numeric flags
        (["--seed", "-1"], "--seed must be a finite number >= 0 and <= 4294967295"),
        (["--num_train_epochs", "0"], "--num_train_epochs must be a finite number >= 1"),
        (["--learning_rate", "0"], "--learning_rate must be a finite number > 0"),
        (["--learning_rate", "nan"], "--learning_rate must be a finite number > 0, got nan"),
        (["--lr_warmup_steps", "-1"], "--lr_warmup_steps must be a finite number >= 0"),
        (["--rank", "0"], "--rank must be a finite number >= 1"),
        (["--lora_dropout", "1"], "--lora_dropout must be a finite number >= 0 and <= 0.99"),
        (["--fast_ema_decay", "-0.1"], "--fast_ema_decay must be a finite number >= 0 and <= 1"),
        (["--guidance_range", "0", "inf"], "--guidance_range must be a finite number >= 0, got inf"),
        (["--num_inference_steps", "1000000"], "--num_inference_steps must be a finite number >= 1 and <= 1000"),
        (["--teacher_num_inference_steps", "0"], "--teacher_num_inference_steps must be a finite number >= 1"),
        (["--calibration_steps", "4", "5000"], "--calibration_steps must be a finite number >= 1 and <= 1000"),
        (["--lora_scale", "inf"], "--lora_scale must be a finite number >= 0, got inf"),
        (["--nccl_timeout", "0"], "--nccl_timeout must be a finite number >= 1"),
        (["--checkpoints_total_limit", "0"], "--checkpoints_total_limit must be a finite number >= 1"),
        (["--cache_shard_size", "0"], "--cache_shard_size must be a finite number >= 1"),
        # the objective's grid flags (GridSamplerConfig fields), unchecked until the model had loaded before
        (["--target_steps", "0"], "--target_steps must be a finite number >= 1"),
        (["--target_levels", "0"], "--target_levels must be a finite number >= 1"),
        (["--target_shift", "nan"], "--target_shift must be a finite number > 0, got nan"),
        (["--teacher_ratio", "nan"], "--teacher_ratio must be a finite number >= 0 and <= 1, got nan"),
        (["--flow_matching_ratio", "-0.5"], "--flow_matching_ratio must be a finite number >= 0 and <= 1"),
        (
            ["--teacher_grid_size_min", "3"],
            "--teacher_grid_size_min must be a finite number >= 2 and <= 1000 and a multiple of 2, got 3",
        ),  # fmt: skip
        (["--teacher_grid_size_max", "2000"], "--teacher_grid_size_max must be a finite number >= 2 and <= 1000"),
        (["--self_grids", "generic", "--self_grid_sizes", "4", "0"], "--self_grid_sizes must be a finite number >= 2"),
        (["--shift_min", "-1"], "--shift_min must be a finite number > 0"),
        (["--shift_max", "inf"], "--shift_max must be a finite number > 0, got inf"),
        (["--dynamic_shift_prob", "2"], "--dynamic_shift_prob must be a finite number >= 0 and <= 1"),
        (["--base_shift", "nan"], "--base_shift must be a finite number, got nan"),
        (["--base_image_seq_len", "0"], "--base_image_seq_len must be a finite number >= 1"),
        (["--max_sigma", "0"], "--max_sigma must be a finite number > 0 and <= 1"),
        # the finest targeted self grid, 2·N·level, from --target_steps or the default --num_inference_steps
        (
            ["--target_steps", "200"],
            "--target_steps 200 with --target_levels up to 4 trains self grids of 2·N·level "
            "= 1600 steps, above the finest allowed (1000): use --target_steps <= 125",
        ),  # fmt: skip
        (["--num_inference_steps", "200"], "use --num_inference_steps <= 125"),
        (["--target_steps", "100", "--target_levels", "1", "8"], "use --target_steps <= 62"),
    ],
)
def test_bad_flags_are_refused_when_parsed_naming_the_flag_and_range(flags, message, capsys):
    with pytest.raises(SystemExit):
        parse_args([*BASE, *flags])
    assert message in capsys.readouterr().err


def test_the_bounds_keep_the_values_that_work():
    args = parse_args([*BASE, "--target_steps", "500", "--target_levels", "1", "--seed", "4294967295"])
    assert args.target_steps == [500] and args.seed == 4294967295
    assert parse_args([*BASE, "--num_inference_steps", "200", "--self_grids", "generic"]).num_inference_steps == 200
    assert parse_args([*BASE, "--target_steps", "3", "4", "8"]).target_steps == [3, 4, 8]


def test_every_grid_flag_has_a_range():
    """A new GridSamplerConfig field is a new flag: it must come with bounds, or parse_args raises KeyError."""
    assert set(GRID_FLAG_RANGES) == {f.name for f in GridSamplerConfig.__dataclass_fields__.values()}


def test_grid_rules_against_the_family_defaults_name_the_flags():
    from scfm_diffusers.families import get_family

    args = parse_args([*BASE, "--teacher_grid_size_min", "8", "--teacher_grid_size_max", "4"])
    with pytest.raises(ValueError, match=r"--teacher_grid_size_min \(8\) must be <= --teacher_grid_size_max \(4\)"):
        grid_config(args, get_family("flux"))


def test_resolution_must_be_a_multiple_of_the_latent_patch_before_any_weights_load(tmp_path):
    """Only model_index.json exists: the error comes from the family's check, not from a missing weights file."""
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    args = parse_args(["--pretrained_model_name_or_path", str(tmp_path), "--prompts_file", "p", "--resolution", "24"])
    with pytest.raises(
        ValueError, match=r"--resolution 24 is not a multiple of 16, .* flux latent token .*: use 16 or 32"
    ):
        components.load_base_model(args, accelerator=None, weight_dtype=torch.float32)
    args = parse_args([*BASE[:0], "--pretrained_model_name_or_path", str(tmp_path), "--prompts_file", "p",
                       "--resolution", "32", "--teacher_grid_size_min", "8", "--teacher_grid_size_max", "4"])  # fmt: skip
    with pytest.raises(ValueError, match="--teacher_grid_size_min"):  # the grid rules, also before the weights
        components.load_base_model(args, accelerator=None, weight_dtype=torch.float32)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("shift", math.nan, "shift must be a finite number > 0, got nan"),
        ("shift", 0, "shift must be a finite number > 0"),
        ("guidance_scale", math.nan, "guidance_scale must be a finite number >= 0, got nan"),
        ("guidance_scale", -1.0, "guidance_scale must be a finite number >= 0"),
        ("lora_scale", math.inf, "lora_scale must be a finite number >= 0, got inf"),
        ("lora_scale", -0.5, "lora_scale must be a finite number >= 0"),
        ("num_inference_steps", 1_000_000, "num_inference_steps must be >= 1 and <= 1000"),
        (
            "lora_scales",
            {"4": -1.0},
            r"lora_scales needs step counts >= 1 and <= 1000 and finite scales >= 0, got '4': -1.0",
        ),
        ("lora_scales", {"4": math.inf}, "finite scales >= 0, got '4': inf"),
        ("lora_scales", {"4": math.nan}, "finite scales >= 0, got '4': nan"),
        ("lora_scales", {"0": 1.0}, "step counts >= 1"),
        ("lora_scales", {"5000": 1.0}, "<= 1000"),
    ],
)
def test_bad_adapter_settings_are_refused_naming_the_field(field, value, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        SCFMInferenceSettings.from_dict({"family": "flux", field: value})
    # in a file (JSON writes NaN / Infinity), the error names the file too
    (tmp_path / WEIGHTS_NAME).write_bytes(b"")
    (tmp_path / SETTINGS_NAME).write_text(json.dumps({"family": "flux", field: value}))
    with pytest.raises(ValueError, match=f"{SETTINGS_NAME}: .*{message}"):
        load_adapter_settings(tmp_path)


# ---------------------------------------------------------------------------------------------------------
# 5. Images, prompt files, captions
# ---------------------------------------------------------------------------------------------------------
def test_a_16_bit_png_is_read_at_its_scale(tmp_path):
    """A 16×16 grey gradient stored as 16-bit (k·257 for k = 0..255) reads back as k exactly, not all white."""
    levels = np.arange(256).reshape(16, 16)
    Image.fromarray((levels * 257).astype(np.uint16)).save(tmp_path / "grey16.png")
    image = Image.open(tmp_path / "grey16.png")
    assert image.mode == "I;16"
    pixels = ImageCaptionPreprocessor(16, center_crop=True).transform(image)  # same size: no resampling
    expected = torch.from_numpy(levels.astype(np.float32)) / 127.5 - 1.0
    assert pixels.shape == (3, 16, 16)
    for channel in pixels:
        torch.testing.assert_close(channel, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "array, expected",
    [
        (np.array([[0, 32768, 65535]], dtype=np.int32), [0, 128, 255]),  # mode I: how older Pillow opens 16-bit
        (np.array([[0.0, 0.5, 1.0, 2.0, -1.0]], dtype=np.float32), [0, 128, 255, 255, 0]),  # mode F, clipped
        (np.array([[0, 128, 255]], dtype=np.uint8), [0, 128, 255]),  # 8-bit grey unchanged
    ],
)
def test_other_grey_modes_are_read_by_their_range(array, expected):
    rgb = np.asarray(to_rgb(Image.fromarray(array)))
    assert rgb.shape[-1] == 3 and rgb[0, :, 0].tolist() == expected and (rgb[..., 0] == rgb[..., 2]).all()


def test_a_latin1_prompts_file_is_refused_naming_the_file_line_and_fix(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes("a cat\nun café\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"prompts\.txt' is not UTF-8 text \(byte 0xe9 on line 2\); save it as "
                                         r"UTF-8, e\.g\. `iconv -f latin1 -t utf-8"):  # fmt: skip
        read_prompts(path)
    path.write_bytes("\ufeffun café\n".encode())  # UTF-8 with a byte-order mark (Windows editors)
    assert read_prompts(path) == ["un café"]


def test_a_null_caption_stops_with_the_row_the_image_and_the_fix(tmp_path):
    for i in range(2):
        Image.new("RGB", (16, 16), (i * 100, 0, 0)).save(tmp_path / f"{i}.png")
    rows = [{"file_name": "0.png", "text": "a red square"}, {"file_name": "1.png", "text": None}]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    samples = ImageCaptionPreprocessor(16)(load_image_caption_dataset(train_data_dir=tmp_path))
    expected = r"Row 1 \(.*1\.png\) has no caption \(column 'text' is null\): write its caption .* or \"\""
    with pytest.raises(CaptionError, match=expected):
        samples.captions()  # the cache reads every caption first
    assert samples.sample(0).caption == "a red square"
    with pytest.raises(CaptionError, match=expected):  # not skipped as an "unreadable image"
        samples.sample(1)
    with pytest.raises(CaptionError, match=r"Row 3: the caption is not UTF-8 text \(byte 0xe9 at 3\)"):
        samples.preprocessor.caption("caf\xe9".encode("latin-1"), 3)  # a WebDataset .txt entry


# ---------------------------------------------------------------------------------------------------------
# 5. Adapter weights: truncated, misshapen; a full disk
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture
def adapter_folder(tmp_path):
    pipe = tiny_pipeline("flux")
    add_trained_lora(pipe.transformer, rank=4, alpha=8)
    return save_adapter(tmp_path / "adapter", pipe.transformer, SCFMInferenceSettings.for_family("flux"))


def test_a_truncated_weights_file_is_named_before_diffusers_reads_it(adapter_folder):
    weights = adapter_folder / WEIGHTS_NAME
    check_weights_file(weights)  # the intact file passes
    data = weights.read_bytes()
    pipe = SCFMFluxPipeline(**tiny_pipeline("flux").components)
    for cut in (data[: len(data) // 2], data[:5], data + b"\0"):
        weights.write_bytes(cut)
        with pytest.raises(ValueError, match=rf"{WEIGHTS_NAME}' is (truncated|longer than its header says) .*: save "
                                             "or download the adapter again"):  # fmt: skip
            pipe.load_scfm_adapter(adapter_folder, num_inference_steps=7)
        assert pipe.scfm_settings.num_inference_steps != 7  # the failed load left the settings as they were
        assert not getattr(pipe.transformer, "peft_config", {})


def test_a_wrong_rank_adapter_gives_one_clear_error(adapter_folder, caplog):
    """Tensors of rank 8 under a LoRA config that says rank 4: one line, not one peft line per tensor."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    weights = adapter_folder / WEIGHTS_NAME
    with safe_open(str(weights), "pt") as file:
        metadata = file.metadata()
    tensors = {
        name: torch.zeros(8, t.shape[1]) if "lora_A" in name else torch.zeros(t.shape[0], 8)
        for name, t in load_file(weights).items()
    }
    save_file(tensors, weights, metadata=metadata)
    pipe = SCFMFluxPipeline(**tiny_pipeline("flux").components)
    with caplog.at_level(logging.INFO), pytest.raises(ValueError) as raised:
        pipe.load_scfm_adapter(adapter_folder)
    message = str(raised.value)
    assert "\n" not in message and str(adapter_folder) in message
    assert f"{len(tensors)} LoRA tensors have other shapes, e.g. " in message
    assert "is [8, 32] in pytorch_lora_weights.safetensors but [4, 32] here" in message
    assert "size mismatch" not in caplog.text  # diffusers' per-tensor list is not logged
    assert not pipe.transformer.peft_config  # diffusers removed the half-loaded adapter


@pytest.fixture
def full_disk(tmp_path):
    """A real 64 KiB tmpfs (needs root to mount; skipped elsewhere: the /dev/full test below runs anywhere)."""
    folder = tmp_path / "tiny-disk"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_disk_full_while_saving_an_adapter_names_the_file_and_the_fix(full_disk):
    pipe = tiny_pipeline("flux")
    add_trained_lora(pipe.transformer, rank=64, alpha=64)  # ~170 KB of LoRA: more than the disk holds
    with pytest.raises(DiskFullError, match=rf"No space left on the device while writing '.*/{WEIGHTS_NAME}' "
                                            r"\(.* MiB free\): free space there or write to another disk "
                                            r"\(--output_dir\)\.$") as raised:  # fmt: skip
        save_adapter(full_disk / "adapter", pipe.transformer, SCFMInferenceSettings.for_family("flux"))
    assert raised.value.errno == errno.ENOSPC and "\n" not in str(raised.value)


def test_disk_full_in_write_text_atomic_keeps_the_old_file(full_disk):
    target = full_disk / "index.json"
    target.write_text("old")
    (full_disk / "filler").write_bytes(b"\0" * (64 * 1024 - 8192))
    with pytest.raises(DiskFullError, match=r"while writing '.*index\.json'"):
        write_text_atomic(target, "x" * 65536)
    assert target.read_text() == "old" and sorted(p.name for p in full_disk.iterdir()) == ["filler", "index.json"]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_reporting_disk_full_turns_a_real_enospc_into_one_line_and_passes_other_errors():
    with pytest.raises(
        DiskFullError, match=r"while writing '/dev/full' .*: free space there or write to another disk"
    ):
        with reporting_disk_full("/dev/full"), open("/dev/full", "wb") as file:
            file.write(b"x")
            file.flush()
    with pytest.raises(FileNotFoundError), reporting_disk_full("/nowhere/file"):
        open("/nowhere/file", "rb")


def test_disk_full_while_caching_names_the_shard(full_disk):
    """The cache's shard writer reports a full disk in one line naming the shard (not safetensors' os error 28)."""
    from scfm_diffusers.training.cache_files import _write_tensors

    (full_disk / "filler").write_bytes(b"\0" * (64 * 1024 - 8192))
    with pytest.raises(DiskFullError, match=r"while writing '.*/images-00000\.safetensors' .*build the cache on"):
        _write_tensors(full_disk / "images-00000.safetensors", {"latents": torch.zeros(64, 64)})  # 16 KiB
