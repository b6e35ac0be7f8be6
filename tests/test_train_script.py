"""The contract of examples/train_scfm_lora.py: launchers, adapter folder, resume, bad input, configs, flags.

End-to-end runs use the tiny saved pipelines of conftest.py and a session-scoped folder of random PNGs. Runs
where the launcher matters go through `accelerate launch` subprocesses; error paths call
``main(parse_args([...]))`` in-process.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
import yaml
from conftest import write_webdataset
from safetensors.torch import load_file

from scfm_diffusers import FlowMatchSCFMScheduler, SCFMPipeline
from scfm_diffusers.families import get_family
from scfm_diffusers.testing import TinyModelConfig
from scfm_diffusers.training import components
from scfm_diffusers.training.cache import LatentCache

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "train_scfm_lora.py"
CONFIGS = REPO / "examples" / "configs"
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
# One valid non-default value per GridSamplerConfig field (each given alone).
NON_DEFAULT_GRID = {
    "teacher_ratio": 0.5,
    "flow_matching_ratio": 0.1,
    "teacher_grid_size_min": 16,
    "teacher_grid_size_max": 64,
    "self_grid_sizes": (2, 4),
    "shift_min": 2.0,
    "shift_max": 5.0,
    "dynamic_shift_prob": 0.3,
    "base_shift": 0.4,
    "max_shift": 1.2,
    "base_image_seq_len": 128,
    "max_image_seq_len": 2048,
    "max_sigma": 0.999,
    "target_steps": (3, 5),
    "target_levels": (1, 2),
    "target_shift": 2.0,
}
# Flags that only apply in one --self_grids mode need it named (the generic grids are not the default).
GRID_MODE = {"self_grid_sizes": ["--self_grids", "generic"]}
RESOLUTION = {
    "flux": 32,
    "sd3": 16,
}  # the tiny VAEs do not downsample: 32 px Flux → 256 packed tokens, 16 px SD3 → 256
NUM_IMAGES = 8
HUB_TOKEN = "hf_TESTTOKENnotarealtoken0123456789"  # must never be written anywhere
# The cheapest settings that still run every part of the objective, at a learning rate at which two or three
# steps move the LoRA visibly (at the method's 2e-5, B stays ~4e-5 and the output change is at noise level).
TINY = [
    "--max_sequence_length", "8",
    "--rank", "4",
    "--lora_alpha", "8",
    "--learning_rate", "1e-3",
    "--teacher_grid_size_min", "4",
    "--teacher_grid_size_max", "4",
    "--report_to", "none",
]  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# Fixtures and helpers
# ---------------------------------------------------------------------------------------------------------
def _write_image_folder(folder: Path, num_good: int, num_garbage: int = 0, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for index in range(num_good):
        name = f"good_{index}.png"
        PIL.Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(folder / name)
        rows.append({"file_name": name, "text": f"a random picture number {index}"})
    for index in range(num_garbage):
        name = f"garbage_{index}.png"
        (folder / name).write_bytes(b"this is not a png" * (index + 1))
        rows.append({"file_name": name, "text": f"a broken picture number {index}"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    """~8 random PNGs (40×36, so every resolution crops) with a metadata.jsonl of captions."""
    return _write_image_folder(tmp_path_factory.mktemp("images"), NUM_IMAGES)


def script_args(pipeline: str, data: Path, output_dir: Path, family: str = "flux", *extra: str) -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(pipeline),
        "--train_data_dir", str(data),
        "--output_dir", str(output_dir),
        "--resolution", str(RESOLUTION[family]),
        *TINY,
        *extra,
    ]  # fmt: skip


def launch(launcher: list[str], argv: list[str], env: dict | None = None, timeout: int = 480) -> str:
    """`accelerate launch <launcher> examples/train_scfm_lora.py <argv>`; fails the test with the log tail."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    full_env.update({"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})})
    result = subprocess.run(
        [ACCELERATE, "launch", *launcher, str(SCRIPT), *argv],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, f"accelerate launch failed ({result.returncode}):\n{log[-6000:]}"
    return log


def checkpoints(output_dir: Path) -> list[str]:
    return sorted((p.name for p in output_dir.glob("checkpoint-*")), key=lambda n: int(n.split("-")[1]))


def stock_pipeline(family: str, pipeline_dir: str):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    cls = {"flux": FluxPipeline, "sd3": StableDiffusion3Pipeline}[family]
    pipe = cls.from_pretrained(pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe, output_dir: Path, family: str) -> torch.Tensor:
    """One image from a stock pipeline with the adapter's SCFM scheduler and recommended settings."""
    settings = json.loads((output_dir / "scfm_settings.json").read_text())
    pipe.scheduler = FlowMatchSCFMScheduler.from_pretrained(output_dir / "scheduler")
    return pipe(
        "a red square on a blue sky",
        num_inference_steps=settings["num_inference_steps"],
        guidance_scale=settings["guidance_scale"],
        height=RESOLUTION[family],
        width=RESOLUTION[family],
        max_sequence_length=8,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images


def assert_adapter_changes_stock_output(family: str, pipeline_dir: str, output_dir: Path) -> None:
    """The adapter folder loads into a STOCK diffusers pipeline and changes its output (same seed, same scheduler)."""
    pipe = stock_pipeline(family, pipeline_dir)
    base = sample(pipe, output_dir, family)
    pipe.load_lora_weights(output_dir)
    with_lora = sample(pipe, output_dir, family)
    assert torch.isfinite(with_lora).all()
    assert (with_lora - base).abs().max() > 1e-4, "the trained adapter does not change the stock pipeline's output"


def adapter_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(output_dir / "pytorch_lora_weights.safetensors")


def assert_adapter_holds(output_dir: Path, checkpoint: Path, which: str = "student") -> None:
    """The adapter file holds exactly ``which`` (student or an EMA) of the final checkpoint, with the LoRA scale
    alpha / r (8 / 4 in these runs: a power of two, so exact) folded into lora_B."""
    state = load_file(checkpoint / "scfm_state.safetensors")
    weights = adapter_weights(output_dir)
    saved = {k.removeprefix(f"{which}."): v for k, v in state.items() if k.startswith(f"{which}.")}
    assert saved and {f"transformer.{k}" for k in saved} == set(weights)
    for key, value in saved.items():
        folded = value * 2 if ".lora_B." in key else value
        torch.testing.assert_close(weights[f"transformer.{key}"].float(), folded, rtol=0, atol=0)


def assert_adapter_is_student(output_dir: Path, checkpoint: Path) -> None:
    """With --save_weights student, the adapter file holds exactly the student of the final checkpoint."""
    assert_adapter_holds(output_dir, checkpoint, "student")


# ---------------------------------------------------------------------------------------------------------
# 1. One process, both families: a stock pipeline loads the adapter folder
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_single_process_run_writes_a_stock_loadable_adapter(family, saved_pipelines, image_folder, tmp_path):
    output_dir = tmp_path / "out"
    argv = script_args(
        saved_pipelines[family],
        image_folder,
        output_dir,
        family,
        "--use_8bit_adam",
        "--gradient_checkpointing",
        "--train_batch_size", "2",
        "--max_train_steps", "3",
        "--learning_rate", "1e-3",
        "--checkpointing_steps", "1",
        "--checkpoints_total_limit", "2",
        "--validation_prompt", "a red square",
        "--num_validation_images", "2",
        "--validation_steps", "2",
        "--report_to", "tensorboard",
        "--hub_token", HUB_TOKEN,
    )  # fmt: skip
    log = launch(["--cpu", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no"], argv)

    for name in (
        "pytorch_lora_weights.safetensors",
        "scfm_settings.json",
        "README.md",
        "scheduler/scheduler_config.json",
    ):
        assert (output_dir / name).is_file(), f"{name} missing from the adapter folder"
    settings = json.loads((output_dir / "scfm_settings.json").read_text())
    assert settings["family"] == family
    assert settings["training"]["steps"] == 3 and settings["training"]["rank"] == 4
    scheduler_config = json.loads((output_dir / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler_config["_class_name"] == "FlowMatchSCFMScheduler"
    # --checkpoints_total_limit 2 with a checkpoint every step: only the newest two remain.
    assert checkpoints(output_dir) == ["checkpoint-2", "checkpoint-3"]
    for name in ("scfm_state.safetensors", "scfm_run.json", "scfm_rng_0.pt"):
        assert (output_dir / "checkpoint-3" / name).is_file()
    # --num_validation_images of --validation_prompt at step 2 and at the end, as in diffusers' scripts.
    assert sorted(p.name for p in (output_dir / "validation").glob("*.png")) == [
        "step000002_0.png",
        "step000002_1.png",
        "step000003_0.png",
        "step000003_1.png",
    ]

    assert_adapter_is_student(output_dir, output_dir / "checkpoint-3")
    assert_adapter_changes_stock_output(family, saved_pipelines[family], output_dir)
    # A checkpoint is an adapter folder too: the stock loader reads it and it is the same student.
    pipe = stock_pipeline(family, saved_pipelines[family])
    pipe.load_lora_weights(output_dir / "checkpoint-3")
    from_checkpoint = sample(pipe, output_dir / "checkpoint-3", family)
    pipe.unload_lora_weights()
    pipe.load_lora_weights(output_dir)
    torch.testing.assert_close(from_checkpoint, sample(pipe, output_dir, family), rtol=0, atol=0)
    pipe.unload_lora_weights()
    scfm = SCFMPipeline.from_pipe(pipe, adapter=output_dir / "checkpoint-3")  # as scfm-eval --adapter does
    final = SCFMPipeline.from_pipe(pipe, adapter=output_dir, adapter_name="final").scfm_settings
    # The final adapter also carries the LoRA scale calibrated on --validation_prompt; checkpoints do not.
    assert list(final.lora_scales) == [4] and final.lora_scale == final.lora_scales[4]
    assert scfm.scfm_settings.lora_scales == {}
    assert scfm.scfm_settings.replace(lora_scale=final.lora_scale, lora_scales=final.lora_scales) == final
    assert (output_dir / "lora_scale_calibration.json").is_file()
    # The token never reaches trackers, logs or files (tensorboard event files included).
    assert HUB_TOKEN not in log
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert HUB_TOKEN.encode() not in path.read_bytes(), f"the Hub token leaked into {path}"
    assert list((output_dir / "logs").rglob("events.out.tfevents.*")), "tensorboard wrote no event file"


# ---------------------------------------------------------------------------------------------------------
# 2. Resume: 2N steps in one run == N steps, then --resume_from_checkpoint latest for N more
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_resume_reproduces_an_uninterrupted_run(train_script, saved_pipelines, image_folder, tmp_path):
    # 8 images, batch 2 → 4 batches per epoch: resuming at step 3 falls mid-epoch, and the run crosses into epoch 1.
    n = 3

    def run(output_dir: Path, steps: int, *extra: str) -> Path:
        argv = script_args(
            saved_pipelines["flux"],
            image_folder,
            output_dir,
            "flux",
            "--train_batch_size", "2",
            "--max_train_steps", str(steps),
            "--checkpointing_steps", str(n),
            "--learning_rate", "1e-3",
            "--fast_ema_decay", "0.5",
            "--slow_ema_decay", "0.9",
            "--seed", "7",
            *extra,
        )  # fmt: skip
        return train_script.main(train_script.parse_args(argv))

    straight = run(tmp_path / "straight", 2 * n)
    resumed = tmp_path / "resumed"
    run(resumed, n)
    assert checkpoints(resumed) == [f"checkpoint-{n}"]
    run(resumed, 2 * n, "--resume_from_checkpoint", "latest")
    assert checkpoints(straight) == checkpoints(resumed) == [f"checkpoint-{n}", f"checkpoint-{2 * n}"]

    a = load_file(straight / f"checkpoint-{2 * n}" / "scfm_state.safetensors")
    b = load_file(resumed / f"checkpoint-{2 * n}" / "scfm_state.safetensors")
    assert a.keys() == b.keys()
    for prefix in ("student.", "fast.", "slow."):  # the student LoRA and BOTH EMAs
        keys = [k for k in a if k.startswith(prefix)]
        assert keys, f"no {prefix} tensors in the checkpoint"
        for key in keys:
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=lambda m, key=key: f"{key}: {m}")
    # The run did train: the student and the EMAs moved away from each other.
    student = [k for k in a if k.startswith("student.") and "lora_B" in k]
    assert any(a[k].abs().max() > 0 for k in student)
    assert any(not torch.equal(a[k], a["fast." + k.removeprefix("student.")]) for k in student)
    wa, wb = adapter_weights(straight), adapter_weights(resumed)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=0, atol=1e-6)


def test_data_free_few_shot_run_saves_the_slow_ema(train_script, saved_pipelines, tmp_path):
    # Data-free mode: 10 prompts, the teacher draws the pairs (10-pair few-shot), batch 16 > 10 pairs.
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# digits\n" + "\n".join(f"a picture of the number {i}" for i in range(10)) + "\n")
    argv = [
        "--pretrained_model_name_or_path", saved_pipelines["flux"],
        "--prompts_file", str(prompts),
        "--teacher_num_inference_steps", "2",
        "--output_dir", str(tmp_path / "out"),
        "--resolution", "16",
        *TINY,
        "--train_batch_size", "16",
        "--max_train_steps", "2",
        "--checkpointing_steps", "2",
        "--save_weights", "ema_slow",
        "--num_inference_steps", "2",
        "--calibration_prompts", "a picture of the number 1", "a picture of the number 7",
        "--calibration_images_per_prompt", "2",
        "--calibration_steps", "1", "2",
        "--lora_scale_candidates", "0.5", "1.5",
        "--calibration_reference_steps", "3",
    ]  # fmt: skip
    out = train_script.main(train_script.parse_args(argv))
    # The LoRA scale per step count was calibrated on the SAVED weights (the slow EMA) against the teacher.
    settings = json.loads((out / "scfm_settings.json").read_text())
    sweep = json.loads((out / "lora_scale_calibration.json").read_text())
    assert set(settings["lora_scales"]) == {"1", "2"} == set(sweep["scales"])
    assert settings["lora_scale"] == settings["lora_scales"]["2"], "the recommended count's scale is the default"
    assert "targeted: steps [2]" in settings["training"]["self_grids"]
    from scfm_diffusers.calibration import calibrate_lora_scales

    pipe = SCFMPipeline.from_pretrained(saved_pipelines["flux"], adapter=out)
    pipe.set_progress_bar_config(disable=True)
    again = calibrate_lora_scales(
        pipe, [1, 2], prompt=[p for p in ("a picture of the number 1", "a picture of the number 7") for _ in range(2)],
        candidates=[0.5, 1.5], reference_steps=3, height=16, width=16, max_sequence_length=8, progress=False,
    )  # fmt: skip
    for n, row in again.errors.items():
        for scale, error in row.items():
            assert sweep["errors"][str(n)][str(scale)] == pytest.approx(error, rel=1e-4)
    teacher_data = out / "cache" / "teacher_data"
    images = sorted(teacher_data.glob("*.png"))
    assert len(images) == 10 and (teacher_data / "metadata.jsonl").is_file()
    assert_adapter_holds(out, out / "checkpoint-2", "slow")
    # A second run reuses the teacher's images (cached) instead of drawing them again.
    mtimes = [p.stat().st_mtime_ns for p in images]
    argv[argv.index("--output_dir") + 1] = str(tmp_path / "out")
    train_script.main(train_script.parse_args([*argv, "--resume_from_checkpoint", "latest", "--max_train_steps", "3"]))
    assert [p.stat().st_mtime_ns for p in images] == mtimes


# ---------------------------------------------------------------------------------------------------------
# 2b. Real-scale data paths: aspect-ratio buckets (cached) and streaming (encoded on the fly)
# ---------------------------------------------------------------------------------------------------------
BUCKET_RESOLUTION = 48  # buckets (32, 64), (48, 48), (64, 32): every shape below stays cheap for both families


@pytest.mark.slow
@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_bucketed_run_keeps_aspect_ratios_and_skips_too_small_images(
    family, train_script, saved_pipelines, tmp_path, caplog
):
    folder = tmp_path / "data"
    folder.mkdir()
    sizes = [(70, 34), (72, 36), (34, 70), (36, 72), (50, 50), (52, 52), (20, 20)]  # (w, h); the last is too small
    rng = np.random.default_rng(0)
    for index, (width, height) in enumerate(sizes):
        PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(folder / f"{index}.png")
    (folder / "metadata.jsonl").write_text(
        "".join(json.dumps({"file_name": f"{i}.png", "text": f"picture {i}"}) + "\n" for i in range(len(sizes)))
    )
    argv = script_args(saved_pipelines[family], folder, tmp_path / "out", family, "--aspect_ratio_buckets")
    argv[argv.index("--resolution") + 1] = str(BUCKET_RESOLUTION)
    with caplog.at_level(logging.WARNING):
        out = train_script.main(
            train_script.parse_args(
                [*argv, "--train_batch_size", "2", "--max_train_steps", "3", "--checkpointing_steps", "3"]
            )
        )
    index = json.loads((out / "cache" / "latents" / "cache_index.json").read_text())
    assert len(index["bucket_shapes"]) == 3 and index["num_rows"] == 6
    assert [s["reason"] for s in index["skipped"]] == [
        "too small"
    ] and "Skipped 1 of 7 images (1 too small)" in caplog.text
    assert json.loads((out / "scfm_settings.json").read_text())["training"]["resolution"] == BUCKET_RESOLUTION
    assert_adapter_is_student(out, out / "checkpoint-3")
    assert_adapter_changes_stock_output(family, saved_pipelines[family], out)


def streaming_args(pipeline: str, shard: str, output_dir: Path, family: str, *extra: str) -> list[str]:
    return [
        "--pretrained_model_name_or_path", pipeline,
        "--dataset_name", "webdataset",
        "--data_files", shard,
        "--image_column", "png",
        "--caption_column", "txt",
        "--streaming",
        "--output_dir", str(output_dir),
        "--resolution", str(RESOLUTION[family]),
        "--train_batch_size", "2",
        *TINY,
        *extra,
    ]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_streaming_webdataset_run_writes_a_loadable_adapter(family, train_script, saved_pipelines, tmp_path):
    shard = write_webdataset(tmp_path / "wds", [(40, 36)] * 8)
    argv = streaming_args(
        saved_pipelines[family], shard, tmp_path / "out", family, "--max_train_steps", "2", "--offload"
    )
    out = train_script.main(train_script.parse_args([*argv, "--checkpointing_steps", "2"]))
    assert not (out / "cache" / "latents").exists(), "a streamed run must not build a cache"
    assert torch.load(out / "checkpoint-2" / "scfm_rng_0.pt")["stream_rows"] == 4
    assert_adapter_is_student(out, out / "checkpoint-2")
    assert_adapter_changes_stock_output(family, saved_pipelines[family], out)


@pytest.mark.slow
def test_a_stream_that_ends_early_stops_clearly_and_keeps_the_last_checkpoint(train_script, saved_pipelines, tmp_path):
    shard = write_webdataset(tmp_path / "wds", [(40, 36)] * 9)  # 4 batches of 2
    out = tmp_path / "out"
    argv = streaming_args(saved_pipelines["flux"], shard, out, "flux", "--max_train_steps", "10")
    with pytest.raises(
        RuntimeError, match=r"streamed data set ran out at step 4 of --max_train_steps 10 \(process 0 had used 8 rows"
    ):
        train_script.main(train_script.parse_args([*argv, "--checkpointing_steps", "2"]))
    assert checkpoints(out) == ["checkpoint-2", "checkpoint-4"]
    assert (out / "checkpoint-4" / "scfm_state.safetensors").is_file()
    # Resuming reads on from where the checkpoint was: the 1 row left is not a batch, so it stops at once.
    with pytest.raises(RuntimeError, match=r"ran out at step 4 .* used 8 rows"):
        train_script.main(train_script.parse_args([*argv, "--resume_from_checkpoint", "latest"]))


# ---------------------------------------------------------------------------------------------------------
# 2c. A quantized base (QLoRA-style): the teacher is the quantized base with adapters off
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_quantized_base_run_writes_an_adapter_for_the_full_precision_base(
    family, train_script, saved_pipelines, image_folder, tmp_path
):
    pytest.importorskip("torchao", reason="the quantization extra is not installed (the Makefile installs it)")
    argv = script_args(
        saved_pipelines[family], image_folder, tmp_path / "out", family, "--quantize_base", "torchao-int8"
    )
    out = train_script.main(train_script.parse_args([*argv, "--train_batch_size", "2", "--max_train_steps", "2"]))
    assert json.loads((out / "checkpoint-2" / "scfm_run.json").read_text())["family"] == family
    assert_adapter_is_student(out, out / "checkpoint-2")
    assert_adapter_changes_stock_output(family, saved_pipelines[family], out)  # on the UNquantized stock base


@pytest.mark.slow
def test_two_process_ddp_on_a_quantized_base(saved_pipelines, image_folder, tmp_path):
    pytest.importorskip("torchao", reason="the quantization extra is not installed (the Makefile installs it)")
    output_dir = tmp_path / "out"
    argv = script_args(saved_pipelines["flux"], image_folder, output_dir, "flux", "--quantize_base", "torchao-int8")
    launch(
        ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"],
        [*argv, "--train_batch_size", "2", "--max_train_steps", "2", "--learning_rate", "1e-3"],
        env={"ACCELERATE_USE_CPU": "true"},
        timeout=300,
    )
    assert {p.name for p in (output_dir / "checkpoint-2").glob("scfm_rng_*.pt")} == {"scfm_rng_0.pt", "scfm_rng_1.pt"}
    assert_adapter_is_student(output_dir, output_dir / "checkpoint-2")
    assert_adapter_changes_stock_output("flux", saved_pipelines["flux"], output_dir)


def test_quantization_the_device_cannot_run_is_a_clear_error(train_script, saved_pipelines, image_folder, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("bitsandbytes nf4 runs on CUDA")
    argv = script_args(saved_pipelines["flux"], image_folder, tmp_path / "out", "flux", "--quantize_base", "nf4")
    with pytest.raises(RuntimeError, match="cannot load on a cpu device.*torchao-int8"):
        train_script.main(train_script.parse_args(argv))
    assert not (tmp_path / "out" / "cache").exists()


# ---------------------------------------------------------------------------------------------------------
# 3. Distributed launchers on CPU: two-process DDP (gloo) and one-process DeepSpeed ZeRO-2
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_process_ddp_on_cpu(saved_pipelines, image_folder, tmp_path):
    output_dir = tmp_path / "out"
    argv = script_args(
        saved_pipelines["flux"],
        image_folder,
        output_dir,
        "flux",
        "--train_batch_size", "2",
        "--max_train_steps", "2",
        "--learning_rate", "1e-3",
        "--checkpointing_steps", "2",
        "--cache_shard_size", "2",
    )  # fmt: skip
    launch(
        ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"],
        argv,
        env={"ACCELERATE_USE_CPU": "true"},
    )
    # Both ranks ran: each saved its sampling RNG, and the recorded global batch is 2 per process × 2.
    assert {p.name for p in (output_dir / "checkpoint-2").glob("scfm_rng_*.pt")} == {"scfm_rng_0.pt", "scfm_rng_1.pt"}
    assert json.loads((output_dir / "scfm_settings.json").read_text())["training"]["batch_size"] == 4
    assert_adapter_is_student(output_dir, output_dir / "checkpoint-2")
    assert_adapter_changes_stock_output("flux", saved_pipelines["flux"], output_dir)

    # Both processes built cache shards, and the result equals the cache one process builds alone.
    single_dir = tmp_path / "single"
    argv[argv.index("--output_dir") + 1] = str(single_dir)
    launch(["--cpu", "--num_processes", "1", "--mixed_precision", "no"], argv)
    two, one = (LatentCache(d / "cache" / "latents") for d in (output_dir, single_dir))
    assert len(one) == len(two) == NUM_IMAGES and one.fingerprint == two.fingerprint
    for row in range(len(one)):
        for key, value in one[row].items():
            assert torch.equal(value, two[row][key]), f"row {row}: {key} differs between 1 and 2 processes"


@pytest.mark.slow
def test_two_process_data_free_generation_and_caching_equal_one_process(saved_pipelines, tmp_path):
    """Both processes draw teacher images and encode shards; the result is what one process makes alone."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"a picture of the number {i}" for i in range(5)) + "\n")
    outputs = {1: tmp_path / "one", 2: tmp_path / "two"}
    for processes, output_dir in outputs.items():
        argv = [
            "--pretrained_model_name_or_path", saved_pipelines["flux"],
            "--prompts_file", str(prompts),
            "--teacher_num_inference_steps", "2",
            "--teacher_images_per_prompt", "2",
            "--output_dir", str(output_dir),
            "--resolution", "16",
            *TINY,
            "--train_batch_size", "2",
            "--max_train_steps", "1",
            "--cache_shard_size", "3",
        ]  # fmt: skip
        if processes == 1:
            launch(["--cpu", "--num_processes", "1", "--mixed_precision", "no"], argv)
        else:
            launcher = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"]
            launch(launcher, argv, env={"ACCELERATE_USE_CPU": "true"})
    teacher = {n: out / "cache" / "teacher_data" for n, out in outputs.items()}
    names = sorted(p.name for p in teacher[2].glob("*.png"))
    assert names == sorted(p.name for p in teacher[1].glob("*.png")) and len(names) == 10
    for name in names:
        a, b = (np.asarray(PIL.Image.open(teacher[n] / name)) for n in (1, 2))
        assert np.array_equal(a, b), f"{name} differs between 1 and 2 processes"
    assert (teacher[2] / "metadata.jsonl").read_text() == (teacher[1] / "metadata.jsonl").read_text()
    one, two = (LatentCache(out / "cache" / "latents") for out in outputs.values())
    assert len(one) == len(two) == 10 and one.num_captions == two.num_captions == 5  # each prompt encoded once
    for row in range(len(one)):
        for key, value in one[row].items():
            assert torch.equal(value, two[row][key]), f"row {row}: {key} differs between 1 and 2 processes"


@pytest.mark.slow
def test_one_process_deepspeed_zero2_on_cpu(saved_pipelines, image_folder, tmp_path):
    pytest.importorskip("deepspeed", reason="deepspeed is not installed (the Makefile installs it)")
    output_dir = tmp_path / "out"
    argv = script_args(
        saved_pipelines["flux"],
        image_folder,
        output_dir,
        "flux",
        "--train_batch_size", "2",
        "--max_train_steps", "2",
        "--learning_rate", "1e-3",
        "--checkpointing_steps", "2",
    )  # fmt: skip
    # No --cpu here: accelerate's --cpu bypasses the DeepSpeed launcher; DeepSpeed finds no GPU and uses its CPU
    # accelerator (the first run JIT-compiles its shared-memory comm extension).
    launch(["--config_file", str(CONFIGS / "deepspeed_zero2.yaml"), "--num_processes", "1"], argv, timeout=560)
    # DeepSpeed really ran: the engine wrote its own model/optimizer state next to the script's SCFM state.
    checkpoint = output_dir / "checkpoint-2"
    assert (checkpoint / "pytorch_model").is_dir(), sorted(p.name for p in checkpoint.iterdir())
    assert (checkpoint / "scfm_state.safetensors").is_file()
    # The engine's model file holds the trainable student LoRA only, never the frozen base (or EMA) weights.
    (model_file,) = (checkpoint / "pytorch_model").rglob("*model_states.pt")
    module = torch.load(model_file, map_location="cpu", weights_only=False)["module"]
    assert module and all("lora_" in key and ".default." in key for key in module), sorted(module)[:5]
    base_bytes = sum(p.stat().st_size for p in Path(saved_pipelines["flux"], "transformer").glob("*.safetensors"))
    assert model_file.stat().st_size < base_bytes / 2
    assert_adapter_is_student(output_dir, checkpoint)
    assert_adapter_changes_stock_output("flux", saved_pipelines["flux"], output_dir)


# ---------------------------------------------------------------------------------------------------------
# 4. Bad input stops early with a clear message
# ---------------------------------------------------------------------------------------------------------
def test_fsdp_and_deepspeed_with_a_quantized_base_are_refused_before_loading(train_script):
    from accelerate.utils import DistributedType

    with pytest.raises(NotImplementedError, match="use FSDP2 \\(fsdp_version: 2"):
        components.check_launch(DistributedType.FSDP, None)
    with pytest.raises(ValueError, match="DeepSpeed"):
        components.check_launch(DistributedType.DEEPSPEED, "torchao-int8")
    for ok in (DistributedType.NO, DistributedType.MULTI_GPU, DistributedType.MULTI_CPU, DistributedType.DEEPSPEED):
        components.check_launch(ok, None)
    components.check_launch(DistributedType.MULTI_GPU, "nf4")


def test_guidance_scale_fixes_the_training_guidance_as_in_diffusers(train_script, tmp_path):
    base = ["--pretrained_model_name_or_path", "x", "--train_data_dir", str(tmp_path)]

    rng = torch.Generator().manual_seed(0)
    flux = get_family("flux")
    guided = flux.tiny_pipeline(TinyModelConfig(guidance_embeds=True)).transformer

    def draw(argv, n):
        return flux.sample_conditioning(
            guided, n, train_script.conditioning_config(train_script.parse_args(argv)), rng
        )

    sampled = draw(base, 1000)["guidance"]
    assert 0.0 <= sampled.min() and sampled.max() < 7.5 and sampled.std() > 1.0  # the method's U[0, 7.5)
    assert torch.equal(draw([*base, "--guidance_scale", "3.5"], 8)["guidance"], torch.full((8,), 3.5))
    unguided = flux.tiny_pipeline().transformer  # schnell-like: no guidance embedding, no guidance input
    assert (
        flux.sample_conditioning(unguided, 8, train_script.conditioning_config(train_script.parse_args(base)), rng)
        == {}
    )


@pytest.mark.parametrize("class_name", ["DDPMPipeline", "StableDiffusionPipeline"])
def test_unsupported_model_family(train_script, image_folder, tmp_path, class_name):
    model = tmp_path / "model"
    model.mkdir()
    (model / "model_index.json").write_text(json.dumps({"_class_name": class_name, "_diffusers_version": "0.42.1"}))
    args = train_script.parse_args(script_args(str(model), image_folder, tmp_path / "out"))
    with pytest.raises(ValueError, match=rf"{class_name}.*not a supported flow-matching model family"):
        train_script.main(args)
    assert not (tmp_path / "out" / "pytorch_lora_weights.safetensors").exists()


@pytest.mark.parametrize("flag", ["--caption_column", "--image_column"])
def test_missing_dataset_column(train_script, saved_pipelines, image_folder, tmp_path, flag):
    args = train_script.parse_args(
        script_args(saved_pipelines["flux"], image_folder, tmp_path / "out", "flux", flag, "nope")
    )
    with pytest.raises(ValueError, match=rf"Column 'nope' not found.*{flag}"):
        train_script.main(args)


def test_unreadable_images_are_skipped_and_counted(train_script, saved_pipelines, tmp_path, caplog):
    data = _write_image_folder(tmp_path / "data", num_good=4, num_garbage=1)
    args = train_script.parse_args(
        script_args(
            saved_pipelines["flux"],
            data,
            tmp_path / "out",
            "flux",
            "--train_batch_size",
            "2",
            "--max_train_steps",
            "1",
        )
    )
    with caplog.at_level(logging.WARNING):
        output_dir = train_script.main(args)
    assert (output_dir / "pytorch_lora_weights.safetensors").is_file()
    assert re.search(
        r"Skipped 1 of 5 images \(1 unreadable\), e\.g\. .*garbage_0\.png \(UnidentifiedImageError", caplog.text
    ), caplog.text
    cache = LatentCache(output_dir / "cache" / "latents")
    assert len(cache) == 4 and [s["source"] for s in cache.index["skipped"]] == [str(data / "garbage_0.png")]


def test_all_images_unreadable(train_script, saved_pipelines, tmp_path):
    data = _write_image_folder(tmp_path / "data", num_good=0, num_garbage=3)
    args = train_script.parse_args(script_args(saved_pipelines["flux"], data, tmp_path / "out"))
    with pytest.raises(ValueError, match=r"No usable image among the 3 rows .*garbage_0\.png \(unreadable"):
        train_script.main(args)


def test_non_finite_loss_stops_before_the_update(train_script, saved_pipelines, image_folder, tmp_path):
    # Adam moves every LoRA weight by ~lr per step: after one step at lr 1e30 the next forward overflows.
    output_dir = tmp_path / "out"
    argv = script_args(
        saved_pipelines["flux"],
        image_folder,
        output_dir,
        "flux",
        "--train_batch_size", "2",
        "--max_train_steps", "4",
        "--checkpointing_steps", "1",
        "--learning_rate", "1e30",
    )  # fmt: skip
    with pytest.raises(FloatingPointError, match=r"Non-finite loss .* at step 1.*checkpoint-1"):
        train_script.main(train_script.parse_args(argv))
    assert checkpoints(output_dir) == ["checkpoint-1"]  # the last good checkpoint is kept, nothing after it
    state = load_file(output_dir / "checkpoint-1" / "scfm_state.safetensors")
    assert all(torch.isfinite(v).all() for k, v in state.items() if not k.startswith("student."))
    assert not (output_dir / "pytorch_lora_weights.safetensors").exists()


def test_missing_resume_folder_is_an_argparse_error(train_script, saved_pipelines, image_folder, tmp_path, capsys):
    missing = tmp_path / "out" / "checkpoint-123"
    with pytest.raises(SystemExit) as error:
        train_script.parse_args(
            script_args(
                saved_pipelines["flux"],
                image_folder,
                tmp_path / "out",
                "flux",
                "--resume_from_checkpoint",
                str(missing),
            )
        )
    assert error.value.code == 2
    assert str(missing) in capsys.readouterr().err


def test_checkpoint_of_another_run_is_refused(train_script, saved_pipelines, image_folder, tmp_path):
    output_dir = tmp_path / "out"
    common = ["--train_batch_size", "2", "--max_train_steps", "1"]
    train_script.main(
        train_script.parse_args(script_args(saved_pipelines["flux"], image_folder, output_dir, "flux", *common))
    )
    assert checkpoints(output_dir) == ["checkpoint-1"]
    argv = script_args(
        saved_pipelines["flux"], image_folder, output_dir, "flux", *common, "--resume_from_checkpoint", "latest"
    )
    argv[argv.index("--rank") + 1] = "8"
    with pytest.raises(ValueError, match="checkpoint of another run"):
        train_script.main(train_script.parse_args(argv))


# ---------------------------------------------------------------------------------------------------------
# 5. accelerate / DeepSpeed config files
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, distributed_type",
    [("single_gpu.yaml", "NO"), ("multi_gpu.yaml", "MULTI_GPU"), ("deepspeed_zero2.yaml", "DEEPSPEED")],
)
def test_accelerate_configs(name, distributed_type):
    from accelerate.commands.config.config_args import load_config_from_file

    path = CONFIGS / name
    config = yaml.safe_load(path.read_text())
    assert config["distributed_type"] == distributed_type
    assert config["compute_environment"] == "LOCAL_MACHINE"
    assert load_config_from_file(str(path)).distributed_type == distributed_type  # accelerate itself accepts it
    if distributed_type == "MULTI_GPU":
        assert config["num_processes"] == 8
    if distributed_type == "DEEPSPEED":
        ds_file = config["deepspeed_config"]["deepspeed_config_file"]
        ds = json.loads((REPO / ds_file).read_text())
        assert ds["zero_optimization"]["stage"] == 2
        # Everything the script's flags decide is left to accelerate ("auto"), so the two never disagree.
        for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
            assert ds[key] == "auto", key
        # Set in the json, these keys must not be repeated in the yaml (accelerate refuses both).
        assert not {"zero_stage", "gradient_accumulation_steps", "gradient_clipping"} & set(config["deepspeed_config"])


# ---------------------------------------------------------------------------------------------------------
# 6. Every flag is read
# ---------------------------------------------------------------------------------------------------------
def test_every_flag_is_read(train_script, tmp_path):
    from scfm_diffusers.training.timesteps import GridSamplerConfig

    args = train_script.parse_args(["--pretrained_model_name_or_path", "x", "--train_data_dir", str(tmp_path)])
    # The script wires; the library modules it calls read the flags too.
    training = REPO / "src" / "scfm_diffusers" / "training"
    source = "\n".join(p.read_text() for p in [SCRIPT, *training.glob("*.py")])
    # parse_args only checks flags: a flag read there alone is not used.
    source = re.sub(r"\ndef parse_args\(.*?\n(?=def )", "\n", source, flags=re.DOTALL)
    grid_fields = {f.name: f for f in dataclasses.fields(GridSamplerConfig)}
    unread = [d for d in vars(args) if d not in grid_fields and not re.search(rf"\bargs\.{d}\b", source)]
    assert not unread, f"flags parsed but never read by the script: {unread}"

    # The GridSamplerConfig flags are read by grid_config: each given value reaches the objective's config.
    family = get_family("flux")
    assert (
        dataclasses.asdict(train_script.grid_config(args, family))["dynamic_shift_prob"] == family.dynamic_shift_prob
    )
    defaults = GridSamplerConfig()
    assert NON_DEFAULT_GRID.keys() == grid_fields.keys(), "add the new GridSamplerConfig field to NON_DEFAULT_GRID"
    base = ["--pretrained_model_name_or_path", "x", "--train_data_dir", str(tmp_path)]
    for name, value in NON_DEFAULT_GRID.items():
        assert getattr(args, name) is None, f"--{name} must default to None (family / method defaults apply)"
        assert value != getattr(defaults, name)
        words = [str(v) for v in value] if isinstance(value, tuple) else [str(value)]
        argv = [*base, *GRID_MODE.get(name, []), f"--{name}", *words]
        got = getattr(train_script.grid_config(train_script.parse_args(argv), family), name)
        assert got == value and type(got) is type(value), f"--{name}: got {got!r}, gave {value!r}"


def test_self_grids_default_to_the_adapter_step_count_at_its_shift(train_script, tmp_path, capsys):
    base = ["--pretrained_model_name_or_path", "x", "--train_data_dir", str(tmp_path)]
    flux, sd3 = get_family("flux"), get_family("sd3")
    grid = train_script.grid_config(train_script.parse_args([*base, "--num_inference_steps", "3"]), flux)
    assert grid.target_steps == (3,) and grid.target_shift == 3.25 and grid.target_levels == (1, 2, 4)
    grid = train_script.grid_config(train_script.parse_args([*base, "--inference_shift", "2.0"]), sd3)
    assert grid.target_steps == (4,) and grid.target_shift == 2.0
    assert train_script.grid_config(train_script.parse_args(base), sd3).target_shift == 3.0  # SD3's reference shift
    grid = train_script.grid_config(train_script.parse_args([*base, "--self_grids", "generic"]), flux)
    assert not grid.step_targeted and grid.self_grid_sizes == (2, 4, 8, 16)
    for wrong, message in (
        (["--self_grid_sizes", "8", "16"], "add --self_grids generic"),
        (["--self_grids", "generic", "--target_steps", "3"], "only apply with --self_grids targeted"),
    ):
        with pytest.raises(SystemExit):
            train_script.parse_args([*base, *wrong])
        assert message in capsys.readouterr().err
