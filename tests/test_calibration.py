"""LoRA scale per step count: the calibration sweep, the settings that store it and the pipeline that uses it."""

import json

import pytest
import torch
from conftest import add_trained_lora
from diffusers import FluxPipeline, StableDiffusion3Pipeline

from scfm_diffusers import SCFMInferenceSettings, SCFMPipeline, save_adapter
from scfm_diffusers.adapter import load_adapter_settings
from scfm_diffusers.calibration import LoraScaleCalibration, calibrate_lora_scales
from scfm_diffusers.families import get_family, pipeline_samples

STOCK = {"flux": FluxPipeline, "sd3": StableDiffusion3Pipeline}
PROMPTS = ["a cat", "a red square"]
SIZE = {"height": 32, "width": 32}


def pipe_with_lora(family, saved_pipelines):
    pipe = STOCK[family].from_pretrained(saved_pipelines[family])
    add_trained_lora(pipe.transformer)
    pipe = SCFMPipeline.from_pipe(pipe)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def scfm_pipe(family, saved_pipelines):
    return pipe_with_lora(family, saved_pipelines)


def latents(pipe, steps, scale, seed=0):
    generators = [torch.Generator().manual_seed(seed + i) for i in range(len(PROMPTS))]
    return pipe(
        PROMPTS, num_inference_steps=steps, lora_scale=scale, generator=generators, output_type="latent", **SIZE
    ).images


def test_sweep_is_the_paired_error_to_the_teacher_from_the_same_noise(family, scfm_pipe):
    result = calibrate_lora_scales(
        scfm_pipe,
        [2, 4],
        prompt=PROMPTS,
        candidates=[0.0, 0.5, 1.5],
        reference_steps=4,
        seed=7,
        progress=False,
        **SIZE,
    )
    # At N = reference steps, scale 0 IS the reference (same noise, LoRA off): zero error, so it wins.
    assert result.errors[4][0.0] == 0.0 and result.scales[4] == 0.0
    assert result.errors[4][1.5] > result.errors[4][0.5] > 0
    # Every entry is the RMSE a user would compute by hand.
    reference = latents(scfm_pipe, 4, 0.0, seed=7)
    for scale in (0.0, 0.5, 1.5):
        expected = (latents(scfm_pipe, 2, scale, seed=7) - reference).pow(2).mean().sqrt().item()
        assert result.errors[2][scale] == pytest.approx(expected, rel=1e-5, abs=1e-7)
    assert result.scales[2] == min(result.errors[2], key=result.errors[2].get)
    assert result.num_images == len(PROMPTS) and result.reference_steps == 4
    assert json.loads(json.dumps(result.to_dict()))["scales"] == {"2": result.scales[2], "4": 0.0}
    assert "4 steps: LoRA scale 0" in result.summary()


def test_prompt_embeds_instead_of_prompts(saved_pipelines):
    scfm_pipe = pipe_with_lora("flux", saved_pipelines)  # one family is enough for the embeddings path
    embeds, pooled, _ = scfm_pipe.encode_prompt(prompt=PROMPTS, prompt_2=None)
    by_text = calibrate_lora_scales(
        scfm_pipe, [2], prompt=PROMPTS, candidates=[1.0], reference_steps=3, progress=False, **SIZE
    )
    by_embeds = calibrate_lora_scales(
        scfm_pipe, [2], prompt_embeds=embeds, pooled_prompt_embeds=pooled, candidates=[1.0], reference_steps=3,
        progress=False, **SIZE,
    )  # fmt: skip
    assert by_embeds.errors[2][1.0] == pytest.approx(by_text.errors[2][1.0], rel=1e-5) and by_embeds.num_images == 2
    # One image per call: the same noise per image, so the same sweep (24 GB cards calibrate in small batches).
    one_by_one = calibrate_lora_scales(
        scfm_pipe, [2], prompt_embeds=embeds, pooled_prompt_embeds=pooled, candidates=[1.0], reference_steps=3,
        batch_size=1, progress=False, **SIZE,
    )  # fmt: skip
    assert one_by_one.errors[2][1.0] == pytest.approx(by_embeds.errors[2][1.0], rel=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"step_counts": []}, ValueError, "step_counts"),
        ({"candidates": [-1.0]}, ValueError, "candidates"),
        ({"prompt": None}, ValueError, "prompt_embeds"),
        ({"num_inference_steps": 3}, ValueError, "sets num_inference_steps itself"),
        ({"output_type": "pil"}, ValueError, "compares latents"),
        ({"batch_size": 0}, ValueError, "batch_size"),
    ],
)
def test_bad_arguments(saved_pipelines, kwargs, error, match):
    pipe = SCFMPipeline.from_pretrained(saved_pipelines["flux"])
    kwargs = {"step_counts": [3], "prompt": PROMPTS, **kwargs}
    with pytest.raises(error, match=match):
        calibrate_lora_scales(pipe, kwargs.pop("step_counts"), progress=False, **kwargs)


def test_a_stock_pipeline_is_refused_with_the_fix(saved_pipelines):
    with pytest.raises(TypeError, match="SCFMPipeline.from_pipe"):
        calibrate_lora_scales(FluxPipeline.from_pretrained(saved_pipelines["flux"]), [3], prompt=PROMPTS)


# ----------------------------------------------------------------------------------------------------
# Settings and pipeline: the calibrated scale is used for its step count
# ----------------------------------------------------------------------------------------------------
def test_settings_store_scales_per_step_count_through_json(tmp_path, saved_pipelines):
    settings = SCFMInferenceSettings.for_family("flux", lora_scale=1.1, lora_scales={3: 1.5, 8: 1.0})
    assert settings.lora_scale_for(3) == 1.5 and settings.lora_scale_for(8) == 1.0
    assert settings.lora_scale_for(5) == 1.1, "an uncalibrated step count falls back to lora_scale"
    pipe = FluxPipeline.from_pretrained(saved_pipelines["flux"])
    add_trained_lora(pipe.transformer)
    folder = save_adapter(tmp_path / "adapter", pipe.transformer, settings)
    stored = json.loads((folder / "scfm_settings.json").read_text())
    assert stored["lora_scales"] == {"3": 1.5, "8": 1.0}
    assert load_adapter_settings(folder) == settings
    card = (folder / "README.md").read_text()
    assert "1.5 at 3 steps, 1 at 8 steps (calibrated); 1.1 otherwise" in card


@pytest.mark.parametrize(
    ("lora_scales", "error"),
    [({"three": 1.0}, TypeError), ({3: "1.0"}, TypeError), ({0: 1.0}, ValueError), ({3: -0.5}, ValueError)],
)
def test_bad_scales_are_refused(lora_scales, error):
    with pytest.raises(error, match="lora_scales"):
        SCFMInferenceSettings.for_family("flux", lora_scales=lora_scales)


def test_pipeline_uses_the_scale_calibrated_for_the_requested_steps(family, saved_pipelines, tmp_path):
    pipe = STOCK[family].from_pretrained(saved_pipelines[family])
    add_trained_lora(pipe.transformer)
    settings = SCFMInferenceSettings.for_family(
        family, num_inference_steps=3, lora_scale=1.0, lora_scales={3: 1.6, 4: 0.0}
    )
    folder = save_adapter(tmp_path / "adapter", pipe.transformer, settings)
    scfm = SCFMPipeline.from_pretrained(saved_pipelines[family], adapter=folder)
    seen = []
    original = scfm.transformer.forward

    def forward(*args, **kwargs):
        seen.append((kwargs.get("joint_attention_kwargs") or {}).get("scale"))
        return original(*args, **kwargs)

    scfm.transformer.forward = forward
    for steps, expected in ((None, 1.6), (3, 1.6), (4, 0.0), (5, 1.0)):
        seen.clear()
        scfm("a cat", num_inference_steps=steps, output_type="latent", **SIZE)
        assert set(seen) == {expected}, f"{steps} steps used scale {set(seen)}, expected {expected}"
    seen.clear()
    scfm("a cat", num_inference_steps=4, lora_scale=0.7, output_type="latent", **SIZE)
    assert set(seen) == {0.7}, "an explicit lora_scale wins over the calibrated one"
    del scfm.transformer.forward
    # Scale 0 calibrated for 4 steps gives the base model's 4-step output.
    base = SCFMPipeline.from_pretrained(saved_pipelines[family])
    gen = torch.Generator().manual_seed(0)
    expected = base("a cat", num_inference_steps=4, shift=settings.shift, generator=gen, output_type="latent", **SIZE)
    got = scfm(
        "a cat", num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="latent", **SIZE
    )
    torch.testing.assert_close(got.images, expected.images, rtol=1e-5, atol=1e-5)


def test_a_best_scale_at_the_edge_of_the_candidates_is_a_warning(saved_pipelines, caplog):
    pipe = pipe_with_lora("flux", saved_pipelines)
    with caplog.at_level("WARNING", logger="scfm_diffusers.calibration"):
        result = calibrate_lora_scales(
            pipe, [3], prompt=PROMPTS, candidates=[0.0, 0.5], reference_steps=3, progress=False, **SIZE
        )
    assert result.scales == {3: 0.0}
    assert "edge of the candidates" in caplog.text and "--lora_scale_candidates" in caplog.text


def test_a_fused_lora_warns_that_the_calibrated_scale_cannot_apply(saved_pipelines, tmp_path, caplog):
    pipe = FluxPipeline.from_pretrained(saved_pipelines["flux"])
    add_trained_lora(pipe.transformer)
    settings = SCFMInferenceSettings.for_family("flux", num_inference_steps=4, lora_scales={3: 1.5, 4: 1.0})
    scfm = SCFMPipeline.from_pretrained(
        saved_pipelines["flux"], adapter=save_adapter(tmp_path / "adapter", pipe.transformer, settings)
    )
    with caplog.at_level("WARNING", logger="scfm_diffusers.pipeline_scfm"):
        scfm("a cat", num_inference_steps=3, output_type="latent", **SIZE)
    assert not caplog.text, "an unfused LoRA takes the calibrated scale: nothing to warn about"
    scfm.fuse_lora(lora_scale=scfm.scfm_settings.lora_scale)
    with caplog.at_level("WARNING", logger="scfm_diffusers.pipeline_scfm"):
        scfm("a cat", num_inference_steps=4, output_type="latent", **SIZE)  # fused at this count's scale: fine
        assert not caplog.text
        scfm("a cat", num_inference_steps=3, output_type="latent", **SIZE)
    assert "fused" in caplog.text and "lora_scale_for(3)" in caplog.text


def test_calibration_result_defaults():
    result = LoraScaleCalibration({3: 1.4})
    assert result.to_dict()["scales"] == {"3": 1.4} and "3 steps: LoRA scale 1.4" in result.summary()


def test_a_video_family_calibrates_on_its_latent_clips():
    """Wan: the sweep runs with ``num_frames`` among the call arguments, over every latent frame of a clip."""
    family = get_family("wan")
    pipe = family.tiny_pipeline()
    add_trained_lora(pipe.transformer)
    pipe = SCFMPipeline.from_pipe(pipe)
    pipe.set_progress_bar_config(disable=True)
    call = {"num_frames": family.tiny_num_frames, "max_sequence_length": 8, "height": 32, "width": 32}
    result = calibrate_lora_scales(
        pipe, [1, 2], prompt=PROMPTS, candidates=[0.0, 1.0], reference_steps=2, progress=False, **call
    )
    assert set(result.scales) == {1, 2} and result.scales[2] == 0.0 and result.errors[2][0.0] == 0.0

    def clips(steps, scale):
        generators = [torch.Generator().manual_seed(i) for i in range(len(PROMPTS))]
        return pipeline_samples(
            pipe(
                PROMPTS,
                num_inference_steps=steps,
                lora_scale=scale,
                generator=generators,
                output_type="latent",
                **call,
            )
        )

    reference = clips(2, 0.0)
    assert reference.shape[:3] == (len(PROMPTS), 4, 2)  # (B, C, latent frames, h, w): 5 frames -> 2
    expected = (clips(1, 1.0) - reference).pow(2).mean().sqrt().item()
    assert result.errors[1][1.0] == pytest.approx(expected, rel=1e-5, abs=1e-7)
