"""The family contract, pinned for EVERY registered family with its tiny real pipeline (built offline).

A family is one file behind :class:`scfm_diffusers.families.Family`; these tests are what "supported" means:
its tiny pipeline is the stock diffusers class; its velocity at σ is the finite difference of its own
pipeline's Euler step (time and velocity conventions); the SCFM scheduler drops into the stock pipeline; an
adapter loads with the stock ``load_lora_weights`` and changes the output; ``SCFMPipeline`` samples with the
adapter's settings and survives save/load; and the real training script runs end to end on it (slow).
"""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig

from scfm_diffusers import FlowMatchSCFMScheduler, SCFMInferenceSettings, SCFMPipeline, save_adapter
from scfm_diffusers.families import (
    ConditioningConfig,
    available_families,
    family_of_class_name,
    family_of_pipeline,
    get_family,
    pipeline_samples,
)
from scfm_diffusers.pipeline_scfm import scfm_pipeline_class
from scfm_diffusers.sigmas import scfm_sigmas

FAMILY_NAMES = [family.name for family in available_families()]
PROMPT = "a red square on a blue sky"
MAX_SEQUENCE_LENGTH = 8


@pytest.fixture(params=FAMILY_NAMES)
def name(request) -> str:
    return request.param


def _tiny(name: str, **kwargs):
    pipe = get_family(name).tiny_pipeline(**kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sample(pipe, name: str, seed: int = 0, **kwargs) -> torch.Tensor:
    """Images ``(B, 3, H, W)``, or clips ``(B, F, 3, H, W)`` of a video family (its tiny frame count)."""
    family = get_family(name)
    size = family.tiny_resolution
    kwargs.setdefault("max_sequence_length", MAX_SEQUENCE_LENGTH)
    kwargs = {**family.frame_kwargs(family.tiny_num_frames), **kwargs}
    output = pipe(
        prompt=PROMPT,  # by name: Flux.2's pipelines take an image first
        height=size,
        width=size,
        output_type="pt",
        generator=torch.Generator().manual_seed(seed),
        **kwargs,
    )
    return pipeline_samples(output)


def _lora_targets(name: str, transformer) -> list[str]:
    """A few of the family's own LoRA targets (attention projections where it has them)."""
    targets = get_family(name).lora_target_modules(transformer)
    attention = [t for t in targets if t in ("to_q", "to_k", "to_v", "to_out.0")]
    return attention or targets[:4]


def _trained_lora(name: str, transformer, rank: int = 4, alpha: int = 8):
    """A LoRA with alpha != rank and non-zero B (as after training) on the family's targets."""
    transformer.add_adapter(
        LoraConfig(
            r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=_lora_targets(name, transformer)
        )
    )
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for key, param in transformer.named_parameters():
            if "lora_B" in key:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return transformer


def test_the_tiny_pipeline_is_the_stock_class_and_samples(name):
    family = get_family(name)
    pipe = _tiny(name)
    assert type(pipe) is family.pipeline_class and isinstance(pipe.transformer, family.transformer_class)
    assert family_of_pipeline(pipe) is family and family_of_class_name(family.pipeline_class_name) is family
    image = _sample(pipe, name, num_inference_steps=2)
    assert image.shape[-2:] == (family.tiny_resolution,) * 2 and torch.isfinite(image).all()
    assert set(family.default_settings) == {"num_inference_steps", "shift", "guidance_scale", "lora_scale"}
    assert family.lora_scale_kwarg in ("joint_attention_kwargs", "attention_kwargs")
    for component in family.text_encoder_names:
        assert getattr(pipe, component, None) is not None, f"{name}: no pipeline component {component!r}"


def test_velocity_is_the_finite_difference_of_the_pipeline_euler_step(name):
    """The family's velocity at (x, σ) in the objective's convention (σ = 1 noise, v = ε − x0) equals
    (x − x')/(σ − σ') for one Euler step x → x' of the family's OWN stock pipeline from the same latents."""
    family = get_family(name)
    pipe = _tiny(name)
    size = family.tiny_resolution
    pipe.scheduler = FlowMatchSCFMScheduler.from_config(pipe.scheduler.config, shift=2.0, use_dynamic_shifting=False)
    with torch.no_grad():
        text = family.encode_prompts(pipe, [PROMPT], MAX_SEQUENCE_LENGTH)
        uncond = family.encode_prompts(pipe, [""], MAX_SEQUENCE_LENGTH)
        pixels = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1
        latents = family.encode_images(pipe.vae, pixels, generator=torch.Generator().manual_seed(2))
        x = family.to_model_space(torch.randn(latents.shape, generator=torch.Generator().manual_seed(3)))
        guidance = float(family.default_settings["guidance_scale"])
        options = family.sample_conditioning(
            pipe.transformer, 1, ConditioningConfig(guidance_scale=guidance, cfg_scale=guidance), torch.Generator()
        )
        call = {"latents": x.clone(), "num_inference_steps": 1, "height": size, "width": size}
        call.update(family.pipeline_text_kwargs(text, uncond, dtype=torch.float32))
        family.fill_guidance(call, guidance)  # after the text: it may add a negative prompt only where none is given
        stepped = family.pipeline_latents_to_model_space(
            pipe.vae, pipeline_samples(pipe(**call, output_type="latent"))
        )
        sigma = pipe.scheduler.sigmas[0].reshape(1).float()
        assert pipe.scheduler.sigmas[1] == 0
        velocity = family.velocity_fn(pipe.transformer, text, latents.shape, uncond=uncond, **options)
        v = velocity(x, sigma, torch.arange(1))
    assert v.dtype == torch.float32 and v.shape == x.shape
    torch.testing.assert_close((x - stepped.reshape(x.shape)) / sigma, v, rtol=1e-4, atol=1e-4)


def test_the_scfm_scheduler_drops_into_the_stock_pipeline(name):
    family = get_family(name)
    pipe = _tiny(name)
    pipe.scheduler = FlowMatchSCFMScheduler.from_config(pipe.scheduler.config, shift=3.0, use_dynamic_shifting=False)
    seen = []

    def record(pipeline, step, timestep, callback_kwargs):
        seen.append(float(pipeline.scheduler.sigmas[pipeline.scheduler.step_index - 1]))
        return callback_kwargs

    image = _sample(pipe, name, num_inference_steps=3, callback_on_step_end=record)
    assert torch.isfinite(image).all()
    torch.testing.assert_close(torch.tensor(seen), scfm_sigmas(3, shift=3.0)[:3].float(), rtol=0, atol=1e-6)
    assert family.pipeline_class.__name__ in scfm_pipeline_class(family).__mro__[2].__name__


def test_an_adapter_loads_in_the_stock_pipeline_and_scfm_pipeline_uses_its_settings(name, tmp_path):
    family = get_family(name)
    pipe = _tiny(name)
    base = _sample(pipe, name, num_inference_steps=2)
    _trained_lora(name, pipe.transformer)
    trained = _sample(pipe, name, num_inference_steps=2)
    assert (trained - base).abs().max() > 1e-3, "the test LoRA must change the output"
    settings = SCFMInferenceSettings.for_family(name, num_inference_steps=3, shift=2.5, lora_scale=1.0)
    save_adapter(tmp_path / "adapter", pipe.transformer, settings, scheduler_config=pipe.scheduler.config)

    stock = _tiny(name)  # same seed, same weights: the base model
    stock.load_lora_weights(tmp_path / "adapter")
    torch.testing.assert_close(_sample(stock, name, num_inference_steps=2), trained, rtol=0, atol=1e-6)

    scfm = SCFMPipeline.from_pipe(_tiny(name), adapter=tmp_path / "adapter")
    assert type(scfm) is scfm_pipeline_class(family) and scfm.scfm_settings == settings
    steps = []
    _sample(scfm, name, callback_on_step_end=lambda p, i, t, kw: steps.append(i) or kw)
    assert len(steps) == 3 and scfm.scheduler.shift == 2.5


def test_save_pretrained_round_trip(name, tmp_path):
    scfm = SCFMPipeline.from_pipe(_tiny(name), num_inference_steps=2)
    _trained_lora(name, scfm.transformer)
    expected = _sample(scfm, name)
    scfm.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "model_index.json").read_text())["_class_name"] == (
        get_family(name).pipeline_class_name
    )
    again = SCFMPipeline.from_pretrained(tmp_path / "saved")
    again.set_progress_bar_config(disable=True)
    assert again.scfm_settings.num_inference_steps == 2
    # The saved LoRA has alpha / r folded into lora_B: the same ΔW, rounded differently (Wan's clip: 1.7e-6).
    torch.testing.assert_close(_sample(again, name), expected, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# The real training script, end to end, on each family's tiny pipeline (image folder, data-free, streaming)
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_family_pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("family_pipelines")
    folders = {}

    def folder(name: str) -> str:
        if name not in folders:
            get_family(name).tiny_pipeline().save_pretrained(root / name)
            folders[name] = str(root / name)
        return folders[name]

    return folder


def _script_argv(name: str, pipeline_dir: str, output_dir, *extra: str) -> list[str]:
    from test_train_script import TINY

    return [
        "--pretrained_model_name_or_path", pipeline_dir,
        "--output_dir", str(output_dir),
        "--resolution", str(get_family(name).tiny_resolution),
        *TINY,
        "--train_batch_size", "2",
        "--max_train_steps", "2",
        "--checkpointing_steps", "2",
        "--num_inference_steps", "2",
        *extra,
    ]  # fmt: skip


def _assert_adapter_changes_stock_output(name: str, pipeline_dir: str, output_dir) -> None:
    family = get_family(name)
    settings = json.loads((output_dir / "scfm_settings.json").read_text())
    assert settings["family"] == name
    stock = family.pipeline_class.from_pretrained(pipeline_dir)
    stock.set_progress_bar_config(disable=True)
    stock.scheduler = FlowMatchSCFMScheduler.from_pretrained(output_dir / "scheduler")
    steps = settings["num_inference_steps"]
    scale = SCFMInferenceSettings.from_dict(settings).lora_scale_for(steps)  # the calibrated one, if any
    kwargs = {"num_inference_steps": steps, family.lora_scale_kwarg: {"scale": scale}}
    family.fill_guidance(kwargs, settings["guidance_scale"])
    base = _sample(stock, name, **kwargs)
    stock.load_lora_weights(output_dir)
    with_lora = _sample(stock, name, **kwargs)
    assert torch.isfinite(with_lora).all()
    assert (with_lora - base).abs().max() > 1e-4, "the trained adapter does not change the stock pipeline's output"
    scfm = SCFMPipeline.from_pretrained(pipeline_dir, adapter=output_dir)
    scfm.set_progress_bar_config(disable=True)
    torch.testing.assert_close(_sample(scfm, name), with_lora, rtol=0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["image_folder", "data_free", "streaming"])
def test_the_training_script_distills_every_family(name, mode, train_script, saved_family_pipelines, tmp_path):
    from conftest import write_webdataset
    from test_train_script import _write_image_folder

    pipeline_dir = saved_family_pipelines(name)
    if mode == "image_folder":
        data = ["--train_data_dir", str(_write_image_folder(tmp_path / "images", 4)), "--validation_prompt", PROMPT]
        data += ["--num_validation_images", "1", "--calibration_images_per_prompt", "1"]
        data += ["--lora_scale_candidates", "0.5", "1.0", "--calibration_reference_steps", "3"]
    elif mode == "data_free":
        (tmp_path / "prompts.txt").write_text("a cat\na dog\n")
        data = ["--prompts_file", str(tmp_path / "prompts.txt"), "--teacher_num_inference_steps", "2"]
    else:
        size = get_family(name).tiny_resolution
        shard = write_webdataset(tmp_path / "shards", [(size + 4, size + 2)] * 6)
        data = ["--dataset_name", "webdataset", "--data_files", shard, "--streaming"]
        data += ["--image_column", "png", "--caption_column", "txt"]
    family = get_family(name)
    if family.modality == "video":  # images are one-frame clips; the teacher draws real clips
        data += ["--num_frames", str(family.tiny_num_frames if mode == "data_free" else 1)]
    out = train_script.main(train_script.parse_args(_script_argv(name, pipeline_dir, tmp_path / "out", *data)))
    _assert_adapter_changes_stock_output(name, pipeline_dir, out)
    if mode == "image_folder":  # calibrated on the validation prompt, for the adapter's step count
        assert list(json.loads((out / "scfm_settings.json").read_text())["lora_scales"]) == ["2"]


def test_the_docs_table_of_families_is_the_registry():
    """docs/families.md lists every registered family with its pipeline, guidance mode, defaults and kwarg."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "families.md").read_text()
    rows = {}
    for line in text.splitlines():  # the first table (supported families); later tables repeat the names
        if line.startswith("| `"):
            rows.setdefault(line.split("|")[1].strip(" `"), line)
    for family in available_families():
        row = rows.get(family.name)
        assert row is not None, f"docs/families.md has no row for {family.name}"
        d = family.default_settings
        assert f"`{family.pipeline_class_name}`" in row and f"`{family.lora_scale_kwarg}`" in row
        assert f"{d['num_inference_steps']} / {d['shift']:g} / {d['guidance_scale']:g}" in row, row
        assert ("embedded" in row) == (family.guidance == "embedded")


def test_scfm_eval_measures_an_adapter_of_every_family(name, saved_family_pipelines, tmp_path):
    """scfm-eval on the family's base and an adapter: the teacher rows and the adapter row, from the same noise."""
    from scfm_diffusers.evaluation.cli import parse_args, run

    family = get_family(name)
    pipe = _tiny(name)
    _trained_lora(name, pipe.transformer)
    settings = SCFMInferenceSettings.for_family(name, num_inference_steps=2)
    save_adapter(tmp_path / "adapter", pipe.transformer, settings, scheduler_config=pipe.scheduler.config)
    (tmp_path / "prompts.txt").write_text("a cat\na dog\n")
    size = str(family.tiny_resolution)
    argv = [
        "--base_model", saved_family_pipelines(name), "--adapter", f"scfm={tmp_path / 'adapter'}",
        "--prompts_file", str(tmp_path / "prompts.txt"), "--num_images", "2", "--steps", "2", "--teacher_steps", "3",
        "--height", size, "--width", size, "--max_sequence_length", str(MAX_SEQUENCE_LENGTH),
        "--latency_repeats", "1", "--grid_images", "0", "--device", "cpu", "--output_dir", str(tmp_path / "eval"),
    ]  # fmt: skip
    if family.modality == "video":  # the pipeline's own default (Wan: 81 frames) is slow on a CPU
        argv += ["--num_frames", str(family.tiny_num_frames)]
    payload = run(parse_args(argv))
    rows = {row["method"]: row for row in payload["rows"]}
    assert {"teacher", "teacher Euler", "scfm"} <= set(rows), sorted(rows)
    assert rows["teacher"]["paired_rmse"] == 0.0  # the reference against itself
    assert rows["scfm"]["num_inference_steps"] == 2 and rows["scfm"]["paired_rmse"] > 0
    assert rows["scfm"]["shift"] == family.default_settings["shift"]  # sampled with the adapter's settings
