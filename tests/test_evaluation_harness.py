"""Contracts of the evaluation harness, the equal-compute reflow baseline, the report writer and the demo."""

from __future__ import annotations

import json
from pathlib import Path

import PIL.Image
import pytest
import torch

from scfm_diffusers import SCFMPipeline, load_adapter_settings
from scfm_diffusers.evaluation.baselines import (
    BASELINES,
    ReflowConfig,
    equal_compute_reflow_plan,
    get_baseline,
    reflow_training_compute,
    scfm_training_compute,
)
from scfm_diffusers.evaluation.harness import ReferenceSet, evaluate, fixed_shift_scheduler, generate
from scfm_diffusers.evaluation.report import image_grid, markdown_table, write_report
from scfm_diffusers.testing import tiny_pipeline
from scfm_diffusers.training.timesteps import GridSamplerConfig

PROMPTS = ["a cat", "a dog", "a red car", "a bird"]
SEEDS = [0, 1, 2, 3]
SIZE = {"height": 32, "width": 32}


class RandomFeatures:
    """A fixed random projection of the pixels (D = 6) with a 3-class linear "classifier" on top."""

    name = "random"

    def __init__(self, pixels: int = 3 * 32 * 32, dim: int = 6) -> None:
        generator = torch.Generator().manual_seed(0)
        self.projection = torch.randn(pixels, dim, generator=generator) / pixels**0.5
        self.head = torch.randn(dim, 3, generator=generator)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return images.flatten(1) @ self.projection

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self(images) @ self.head


@pytest.fixture(scope="module")
def flux():
    pipe = tiny_pipeline("flux")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def reference(flux):
    return generate(flux, PROMPTS, SEEDS, num_inference_steps=8, batch_size=3, **SIZE)


def test_generate_is_seeded_per_image_and_independent_of_batching(flux, reference):
    assert reference.shape == (4, 3, 32, 32) and reference.min() >= 0 and reference.max() <= 1
    alone = generate(flux, PROMPTS[2:3], SEEDS[2:3], num_inference_steps=8, **SIZE)
    torch.testing.assert_close(alone[0], reference[2], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="one seed per image"):
        generate(flux, PROMPTS, SEEDS[:2], num_inference_steps=2, **SIZE)


def test_evaluating_the_reference_configuration_gives_zero_error(flux, reference):
    features = RandomFeatures()
    real = torch.randn(16, 6, generator=torch.Generator().manual_seed(1))
    result = evaluate(
        flux, PROMPTS, SEEDS, num_inference_steps=8, reference_images=reference, feature_extractor=features,
        real_features=real, latency_repeats=1, name="teacher", **SIZE,
    )  # fmt: skip
    assert result.images.shape == (4, 3, 32, 32) and result.features.shape == (4, 6)
    assert result.paired_mse < 1e-10 and result.fd_vs_teacher == pytest.approx(0.0, abs=1e-6)
    assert result.delta_fd == pytest.approx(0.0, abs=1e-6) and result.fd_vs_real > 0
    assert result.latency_s > 0 and result.seconds_per_image > 0
    data = result.to_dict()
    assert "images" not in data and json.dumps(data)  # serialisable


def test_fewer_steps_differ_and_delta_fd_is_against_the_same_real_set(flux, reference):
    features = RandomFeatures()
    real = torch.randn(16, 6, generator=torch.Generator().manual_seed(1))
    ref = ReferenceSet.build(reference, features, real)
    flux.scheduler, stock = fixed_shift_scheduler(flux, 1.0), flux.scheduler
    try:
        result = evaluate(
            flux, PROMPTS, SEEDS, num_inference_steps=2, reference_images=ref, feature_extractor=features,
            latency_repeats=0, **SIZE,
        )  # fmt: skip
    finally:
        flux.scheduler = stock
    assert result.paired_mse > 0 and result.latency_s is None
    assert result.paired_rmse == pytest.approx(result.paired_mse**0.5)
    assert result.delta_fd == pytest.approx(result.fd_vs_real - ref.fd_vs_real)


def test_classifier_accuracy_on_known_logits(flux):
    class KnownLogits(RandomFeatures):
        def logits(self, images):  # class 1 for every image
            return torch.tensor([[0.0, 1.0, 0.0]]).expand(len(images), -1)

    result = evaluate(
        flux, PROMPTS, SEEDS, num_inference_steps=1, classifier=KnownLogits(), labels=[1, 1, 0, 2],
        latency_repeats=0, **SIZE,
    )  # fmt: skip
    assert result.accuracy == pytest.approx(0.5) and result.paired_mse is None and result.fd_vs_real is None
    with pytest.raises(ValueError, match="labels"):
        evaluate(flux, PROMPTS, SEEDS, num_inference_steps=1, classifier=KnownLogits(), **SIZE)


def test_sd3_pipeline_works_too():
    pipe = tiny_pipeline("sd3")
    images = generate(pipe, PROMPTS[:2], SEEDS[:2], num_inference_steps=2, **SIZE)
    result = evaluate(
        pipe, PROMPTS[:2], SEEDS[:2], num_inference_steps=2, reference_images=images, latency_repeats=0, **SIZE
    )
    assert result.paired_mse < 1e-10


# ----------------------------------------------------------------------------------------------------
# Baselines
# ----------------------------------------------------------------------------------------------------
def test_compute_arithmetic_and_equal_compute_plan():
    assert scfm_training_compute(1500, 32) == 1500 * 32 * 5 == 240_000
    assert reflow_training_compute(3000, 32, 1500, 32) == 3000 * 32 + 1500 * 32 * 3
    plan = equal_compute_reflow_plan(240_000, teacher_steps=32, batch_size=32)
    # Default split: SCFM's optimizer steps, and SCFM's two target passes per sample buy the pairs.
    assert (plan.num_pairs, plan.train_steps) == (3000, 1500) and plan.compute == plan.budget == 240_000
    other = equal_compute_reflow_plan(240_000, teacher_steps=32, batch_size=16, generation_fraction=0.5)
    assert other.num_pairs == 3750 and other.compute <= 240_000 and 240_000 - other.compute < 16 * 3
    with pytest.raises(ValueError):
        equal_compute_reflow_plan(100, teacher_steps=32, batch_size=8, generation_fraction=1.0)


def test_reflow_settings_survive_json_so_a_cached_adapter_is_reused():
    from scfm_diffusers.evaluation.baselines import ReflowConfig
    from scfm_diffusers.training.timesteps import GridSamplerConfig

    config = ReflowConfig(grid=GridSamplerConfig(target_steps=(3, 4), target_shift=1.5))
    # The demo compares the stored JSON stamp with to_dict(): any tuple left in it would never compare equal.
    assert json.loads(json.dumps(config.to_dict())) == config.to_dict()


def test_two_step_reflow_run_writes_a_loadable_adapter(flux, tmp_path):
    assert set(BASELINES) == {"reflow"} and get_baseline("reflow") is BASELINES["reflow"]
    with pytest.raises(ValueError, match="known"):
        get_baseline("nope")
    config = ReflowConfig(
        num_pairs=4, teacher_steps=2, train_steps=2, batch_size=2, rank=4, lora_alpha=8, learning_rate=1e-3,
        height=32, width=32, max_sequence_length=16, pair_batch_size=3, num_inference_steps=3, inference_shift=1.5,
        grid=GridSamplerConfig(teacher_grid_size_min=4, teacher_grid_size_max=8),
    )  # fmt: skip
    before = generate(flux, PROMPTS[:2], SEEDS[:2], num_inference_steps=2, **SIZE)
    folder = get_baseline("reflow")(flux, PROMPTS, tmp_path / "reflow", config, base_model="tiny", progress=None)
    assert not getattr(flux.transformer, "peft_config", {})  # the LoRA was removed from the teacher again
    torch.testing.assert_close(generate(flux, PROMPTS[:2], SEEDS[:2], num_inference_steps=2, **SIZE), before)
    settings = load_adapter_settings(folder)
    assert settings.num_inference_steps == 3 and settings.shift == 1.5 and settings.training["method"] == "reflow"
    assert settings.training["compute_forward_equivalents"] == 4 * 2 + 2 * 2 * 3
    student = SCFMPipeline.from_pipe(tiny_pipeline("flux"), adapter=folder)
    result = evaluate(student, PROMPTS[:2], SEEDS[:2], num_inference_steps=3, latency_repeats=0, **SIZE)
    assert result.images.shape == (2, 3, 32, 32)


# ----------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------
def test_report_files(tmp_path):
    rows = [
        {"method": "teacher", "num_inference_steps": 32, "fd_vs_real": 30.0, "paired_rmse": 0.0, "latency_s": 0.5},
        *(
            {"method": m, "num_inference_steps": n, "fd_vs_real": 40.0 / n, "paired_rmse": 0.1 / n, "delta_fd": 1.0}
            for m in ("SCFM", "reflow")
            for n in (3, 4, 8)
        ),
    ]
    images = torch.rand(5, 3, 16, 16)
    grid_rows = [("teacher 32", images), ("SCFM 3", images[:4])]
    written = write_report(
        tmp_path, rows, title="t", notes=["a note"], settings={"x": 1}, grid_rows=grid_rows, grid_scale=4
    )
    assert {"markdown", "json", "grid", "plot"} <= set(written) and all(p.is_file() for p in written.values())
    payload = json.loads(written["json"].read_text())
    assert payload["rows"][1]["method"] == "SCFM" and payload["settings"] == {"x": 1}
    markdown = written["markdown"].read_text()
    assert "| SCFM | 3 |" in markdown and "a note" in markdown and "clip" not in markdown.lower()
    with PIL.Image.open(written["grid"]) as grid:
        assert grid.size == (160 + 5 * (16 * 4 + 4), 2 * (16 * 4 + 4))
    assert image_grid([("a", torch.rand(2, 1, 8, 8))], scale=0.5, padding=0, label_width=10).size == (18, 4)
    assert markdown_table([{"method": "x", "fd_vs_real": None}]) == "| method |\n|---|\n| x |"  # empty columns dropped


# ----------------------------------------------------------------------------------------------------
# The demo, end to end (tiny)
# ----------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path, capsys, monkeypatch):
    from digits_demo.demo import QUICK, main

    payload = main(["--output_dir", str(tmp_path), "--quick"])
    assert {p.name for p in tmp_path.iterdir()} >= {"results.md", "results.json", "grid.png", "quality_vs_steps.png"}
    for folder in ("scfm", "scfm_generic_grids", "reflow"):
        assert (tmp_path / folder / "pytorch_lora_weights.safetensors").is_file()
    methods = [(r["method"], r["num_inference_steps"]) for r in payload["rows"]]
    assert methods[0] == ("teacher", QUICK.reference_steps)
    rows = {(r["method"], r["num_inference_steps"]): r for r in payload["rows"]}
    for steps in QUICK.eval_steps:
        assert {("teacher Euler (best shift)", steps), ("reflow", steps), ("SCFM", steps)} <= set(methods)
        assert ("SCFM generic grids", steps) in methods  # the method's generic mix, as an extra row
        assert rows[("reflow", steps)]["lora_scale"] == 1.0
    # The step-targeted adapter trains the evaluated step counts and carries a calibrated scale for each,
    # which is the one its rows were sampled with.
    settings = json.loads((tmp_path / "scfm" / "scfm_settings.json").read_text())
    assert settings["training"]["self_grids"].startswith(f"targeted: steps {list(QUICK.eval_steps)}")
    assert json.loads((tmp_path / "scfm_generic_grids" / "scfm_settings.json").read_text())["training"][
        "self_grids"
    ].startswith("generic")
    assert {int(n) for n in settings["lora_scales"]} == set(QUICK.eval_steps)
    every_row = {(r["method"], r["num_inference_steps"]): r for r in payload["all_rows"]}
    for steps in QUICK.eval_steps:
        assert rows[("SCFM", steps)]["lora_scale"] == settings["lora_scales"][str(steps)]
        assert every_row[("SCFM @ scale 1", steps)]["lora_scale"] == 1.0  # the calibration ablation
        if settings["lora_scales"][str(steps)] != 1.0:
            assert every_row[("SCFM @ scale 1", steps)]["paired_rmse"] != rows[("SCFM", steps)]["paired_rmse"]
    assert all(r["fd_vs_real"] is not None and r["accuracy"] is not None for r in payload["rows"])
    compute = payload["settings"]["compute_forward_equivalents"]
    assert compute["reflow"] <= compute["scfm"]
    with PIL.Image.open(tmp_path / "grid.png") as grid:
        rows = 1 + 4 * len(QUICK.eval_steps)
        assert grid.size == (160 + 10 * (16 * 4 + 4), rows * (16 * 4 + 4))
    assert "| SCFM |" in capsys.readouterr().out
    # A second run reuses both SCFM adapters without starting the training script.
    from digits_demo import demo

    def no_training(*args, **kwargs):
        raise AssertionError("the cached SCFM adapters should have been reused")

    monkeypatch.setattr(demo.subprocess, "Popen", no_training)
    shifts = demo.resolution_scaled_shifts(64)
    teacher = str(tmp_path / "cache" / "teacher")
    runs = {
        tmp_path / folder: demo.scfm_training_args(
            teacher, tmp_path / "data" / "train", tmp_path / folder, QUICK, shifts, **flags
        )
        for folder, flags in (("scfm", {}), ("scfm_generic_grids", {"self_grids": "generic"}))
    }
    assert demo.train_scfm(runs) == list(runs)


def test_cli_end_to_end(tmp_path, saved_pipelines, flux, capsys):
    from scfm_diffusers.evaluation.cli import parse_args, run
    from scfm_diffusers.evaluation.metrics import register_feature_extractor

    register_feature_extractor("test-random-features", overwrite=True)(RandomFeatures)
    config = ReflowConfig(
        num_pairs=2, teacher_steps=2, train_steps=1, batch_size=2, rank=4, lora_alpha=4, height=32, width=32,
        max_sequence_length=16, grid=GridSamplerConfig(teacher_grid_size_min=4, teacher_grid_size_max=4),
    )  # fmt: skip
    adapter = BASELINES["reflow"](flux, PROMPTS, tmp_path / "adapter", config, progress=None)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    real = tmp_path / "real"
    real.mkdir()
    for i in range(3):
        PIL.Image.fromarray((torch.rand(20, 20, 3) * 255).byte().numpy()).save(real / f"{i}.png")
    out = tmp_path / "eval"
    payload = run(parse_args([
        "--base_model", saved_pipelines["flux"], "--adapter", f"mine={adapter}", "--prompts_file", str(prompts),
        "--num_images", "3", "--steps", "1", "2", "--teacher_steps", "4", "--teacher_shifts", "1.0",
        "--feature_extractor", "test-random-features",
        "--real_images_dir", str(real), "--height", "32", "--width", "32", "--latency_repeats", "1",
        "--max_sequence_length", "16", "--output_dir", str(out),
    ]))  # fmt: skip
    methods = [(r["method"], r["num_inference_steps"]) for r in payload["rows"]]
    assert methods[0] == ("teacher", 4) and ("mine", 2) in methods and ("teacher Euler shift 1", 1) in methods
    assert payload["rows"][0]["paired_mse"] < 1e-10 and payload["rows"][-1]["fd_vs_real"] is not None
    assert all((out / name).is_file() for name in ("results.md", "results.json", "grid.png", "quality_vs_steps.png"))
    assert Path(adapter, "scfm_settings.json").is_file()
    assert capsys.readouterr().out.strip() == (out / "results.md").read_text().split("\n\n")[1].strip()  # the table


def test_reflow_pairs_leave_the_global_rng_alone(flux):
    """The demo's reflow row is reproducible only if drawing the pairs takes nothing from torch's global RNG
    (the LoRA's gaussian init draws from it next): all randomness comes from the config's seed."""
    from scfm_diffusers.evaluation.baselines import generate_reflow_pairs

    config = ReflowConfig(num_pairs=2, teacher_steps=2, height=32, width=32, max_sequence_length=16, pair_batch_size=2)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    pairs = generate_reflow_pairs(flux, PROMPTS[:2], config)
    assert torch.equal(torch.get_rng_state(), state), "generate_reflow_pairs drew from the global RNG"
    again = generate_reflow_pairs(flux, PROMPTS[:2], config)
    assert torch.equal(pairs["samples"], again["samples"]) and torch.equal(pairs["noise"], again["noise"])
