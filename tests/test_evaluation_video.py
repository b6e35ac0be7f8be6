"""Evaluating a video family (Wan): the harness on clips, and ``scfm-eval`` on a saved tiny ``WanPipeline``.

A clip is ``(F, 3, H, W)``: the paired error to the teacher is over all its frames, latency is seconds per clip,
and the first ``--num_videos`` clips of every sampler are written as mp4 (decoded back here with PyAV).
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import add_trained_lora

from scfm_diffusers import SCFMInferenceSettings, save_adapter
from scfm_diffusers.evaluation.cli import main
from scfm_diffusers.evaluation.harness import evaluate, generate
from scfm_diffusers.families import get_family

av = pytest.importorskip("av")

WAN = get_family("wan")
FRAMES, SIZE = WAN.tiny_num_frames, WAN.tiny_resolution
PROMPTS = ["a cat", "a dog"]
CALL = {"height": SIZE, "width": SIZE, "call_kwargs": {"num_frames": FRAMES, "max_sequence_length": 8}}


@pytest.fixture(scope="module")
def wan():
    pipe = WAN.tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def wan_files(tmp_path_factory):
    """A saved tiny Wan pipeline, an adapter with a trained LoRA on it, and a prompts file."""
    root = tmp_path_factory.mktemp("wan")
    pipe = WAN.tiny_pipeline()
    pipe.save_pretrained(root / "base")
    add_trained_lora(pipe.transformer)
    settings = SCFMInferenceSettings.for_family("wan", num_inference_steps=2)
    save_adapter(root / "adapter", pipe.transformer, settings, scheduler_config=pipe.scheduler.config)
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return root


def scfm_eval(root: Path, output: Path, *argv: str) -> tuple[int, str, str]:
    """``scfm-eval`` on the tiny Wan pipeline and its adapter: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main([
            "--base_model", str(root / "base"), "--adapter", f"scfm={root / 'adapter'}",
            "--prompts_file", str(root / "prompts.txt"), "--num_images", "2", "--steps", "2", "--teacher_steps", "3",
            "--height", str(SIZE), "--width", str(SIZE), "--max_sequence_length", "8", "--latency_repeats", "1",
            "--device", "cpu", "--output_dir", str(output), *argv,
        ])  # fmt: skip
    return status, out.getvalue(), err.getvalue()


def _ours(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if " scfm-eval: " in line or line.startswith("scfm-eval: ")]


@pytest.fixture(scope="module")
def evaluation(wan_files):
    """One run with the image-only extras asked for: they are skipped (their missing models never loaded)."""
    output = wan_files / "eval"
    status, stdout, stderr = scfm_eval(
        wan_files, output, "--num_frames", str(FRAMES),
        "--feature_extractor", "clip", "--feature_extractor_path", str(wan_files / "no_clip"),
        "--clip_model_path", str(wan_files / "no_clip"),
    )  # fmt: skip
    assert status == 0, stderr
    return output, stdout, stderr, json.loads((output / "results.json").read_text())


# ----------------------------------------------------------------------------------------------------
# The harness on clips
# ----------------------------------------------------------------------------------------------------
def test_generate_returns_clips_seeded_per_clip_and_independent_of_batching(wan):
    clips = generate(wan, PROMPTS, [0, 1], num_inference_steps=2, batch_size=2, **CALL)
    assert clips.shape == (2, FRAMES, 3, SIZE, SIZE) and 0 <= clips.min() and clips.max() <= 1
    one_by_one = generate(wan, PROMPTS, [0, 1], num_inference_steps=2, batch_size=1, **CALL)
    torch.testing.assert_close(one_by_one, clips, atol=1e-5, rtol=0)


def test_evaluate_measures_clips_against_the_reference_and_refuses_image_metrics(wan):
    reference = generate(wan, PROMPTS, [0, 1], num_inference_steps=3, **CALL)
    same = evaluate(wan, PROMPTS, [0, 1], num_inference_steps=3, reference_images=reference, latency_repeats=1, **CALL)
    assert same.num_frames == FRAMES and same.num_images == 2 and same.paired_rmse == 0.0 and same.latency_s > 0
    fewer = evaluate(
        wan, PROMPTS, [0, 1], num_inference_steps=2, reference_images=reference, latency_repeats=0, **CALL
    )
    per_clip = (fewer.images - reference).double().square().flatten(1).mean(1)  # every pixel of every frame
    assert fewer.paired_mse == pytest.approx(per_clip.mean().item()) and fewer.paired_mse > 0
    with pytest.raises(ValueError, match="feature_extractor: image metrics, but the pipeline made clips"):
        evaluate(wan, PROMPTS, [0, 1], num_inference_steps=2, feature_extractor=lambda x: x.flatten(1), **CALL)


# ----------------------------------------------------------------------------------------------------
# scfm-eval on a video family
# ----------------------------------------------------------------------------------------------------
def test_rows_give_per_clip_latency_and_paired_error_to_the_teacher(evaluation):
    _, _, _, payload = evaluation
    rows = {(row["method"], row["num_inference_steps"]): row for row in payload["rows"]}
    assert list(rows) == [("teacher", 3), ("teacher Euler", 2), ("scfm", 2)]
    for row in rows.values():
        assert row["num_frames"] == FRAMES and row["num_images"] == 2
        assert row["latency_s"] > 0 and row["seconds_per_image"] > 0  # seconds per clip
        assert row["fd_vs_teacher"] is None and row["clip_score"] is None  # image-only: skipped
    assert rows[("teacher", 3)]["paired_rmse"] == 0.0  # the reference against itself
    assert rows[("scfm", 2)]["paired_rmse"] > 0 and rows[("scfm", 2)]["shift"] == WAN.default_settings["shift"]
    assert payload["settings"]["num_frames"] == FRAMES and payload["settings"]["fps"] == 16


def test_every_row_writes_its_clips_as_mp4_that_decode(evaluation):
    output, _, _, payload = evaluation
    for row in payload["rows"]:
        folder = output / row["videos"]
        assert row["videos"] == f"videos/{row['method'].replace(' ', '_')}/{row['num_inference_steps']}steps"
        assert sorted(path.name for path in folder.iterdir()) == ["0_0.mp4", "1_1.mp4"]  # <prompt index>_<seed>
        for path in folder.iterdir():
            with av.open(str(path)) as container:
                stream = container.streams.video[0]
                frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
                assert stream.average_rate == 16
            assert len(frames) == FRAMES and all(frame.shape == (SIZE, SIZE, 3) for frame in frames)


def test_stdout_is_the_per_clip_table_and_the_skipped_extras_are_one_log_line(evaluation):
    output, stdout, stderr, _ = evaluation
    table = stdout.strip().splitlines()
    assert table[0] == "| method | steps | frames | shift | latency s/clip | paired RMSE |" and len(table) == 5
    assert table[2].startswith("| teacher | 3 | 5 | default | ") and table[2].endswith(" | 0.0000 |")
    assert stdout.strip() == (output / "results.md").read_text().split("\n\n")[1].strip()
    skipped = [line for line in _ours(stderr) if "skipping" in line]
    assert len(skipped) == 1
    assert all(name in skipped[0] for name in ("--feature_extractor", "--clip_model_path", "the image grid"))
    assert not (output / "grid.png").exists()
    assert "5 frames per clip; latency is seconds per clip" in (output / "results.md").read_text()


@pytest.mark.parametrize(
    "argv, message",
    [(["--num_frames", "0"], "--num_frames must be >= 1"), (["--fps", "0"], "--fps must be >= 1")],
)
def test_bad_video_flags_are_usage_errors(wan_files, tmp_path, argv, message):
    status, stdout, stderr = scfm_eval(wan_files, tmp_path / "eval", *argv)
    assert status == 2 and stdout == "" and message in stderr


def test_num_frames_is_checked_by_the_family_before_sampling(wan_files, saved_pipelines, tmp_path):
    status, stdout, stderr = scfm_eval(wan_files, tmp_path / "wan", "--num_frames", "4")
    assert status == 1 and stdout == "" and not (tmp_path / "wan").exists()
    assert _ours(stderr)[-1].startswith("scfm-eval: error: ValueError: Wan needs num_frames = 4k + 1")
    assert "use 1 or 5" in _ours(stderr)[-1]
    flux = ["--base_model", saved_pipelines["flux"], "--prompts_file", str(wan_files / "prompts.txt")]
    status, _, stderr = scfm_eval(wan_files, tmp_path / "flux", *flux, "--num_frames", "5")
    assert status == 1 and "flux is an image model family: it takes no --num_frames" in _ours(stderr)[-1]


def test_without_imageio_the_error_names_the_video_extra_before_sampling(wan_files, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # what an install without the extra looks like
    status, _, stderr = scfm_eval(wan_files, tmp_path / "eval", "--num_frames", str(FRAMES))
    assert status == 1 and not (tmp_path / "eval").exists()
    assert _ours(stderr)[-1] == (
        "scfm-eval: error: ImportError: Writing videos needs imageio and imageio-ffmpeg (imageio_ffmpeg is missing): "
        'pip install "scfm-diffusers[video]".'
    )
    # Writing no clips needs neither.
    status, _, stderr = scfm_eval(wan_files, tmp_path / "eval", "--num_frames", str(FRAMES), "--num_videos", "0")
    assert status == 0, stderr
    assert not (tmp_path / "eval" / "videos").exists()
    rows = json.loads((tmp_path / "eval" / "results.json").read_text())["rows"]
    assert [row["videos"] for row in rows] == [None] * 3
