"""SCFMPipeline dispatch, adapter settings as defaults, per-call overrides, from_pipe, bad input."""

import pytest
import torch
from conftest import add_trained_lora, generate
from diffusers import DiffusionPipeline, FluxPipeline, StableDiffusion3Pipeline

import scfm_diffusers
from scfm_diffusers import (
    FlowMatchSCFMScheduler,
    SCFMFluxPipeline,
    SCFMInferenceSettings,
    SCFMPipeline,
    SCFMStableDiffusion3Pipeline,
    save_adapter,
)

STOCK = {"flux": FluxPipeline, "sd3": StableDiffusion3Pipeline}
SCFM = {"flux": SCFMFluxPipeline, "sd3": SCFMStableDiffusion3Pipeline}


@pytest.fixture
def adapter(family, saved_pipelines, tmp_path):
    pipe = STOCK[family].from_pretrained(saved_pipelines[family])
    add_trained_lora(pipe.transformer)
    settings = SCFMInferenceSettings.for_family(
        family, num_inference_steps=3, shift=2.5, guidance_scale=4.5, lora_scale=1.25
    )
    return save_adapter(tmp_path / "adapter", pipe.transformer, settings, scheduler_config=pipe.scheduler.config)


def record_call(pipe, **kwargs):
    """Run a call and record the σ of every step and the guidance the transformer saw."""
    seen = {"sigmas": [], "guidance": []}
    original = pipe.transformer.forward

    def forward(*args, **inner):
        seen["guidance"].append(inner.get("guidance"))
        seen["scale"] = (inner.get("joint_attention_kwargs") or {}).get("scale")
        return original(*args, **inner)

    pipe.transformer.forward = forward
    try:
        images = generate(
            pipe, callback_on_step_end=lambda p, i, t, kw: seen["sigmas"].append(float(t) / 1000) or {}, **kwargs
        )
    finally:
        del pipe.transformer.forward
    return images, seen


def test_public_names():
    for name in ("FlowMatchSCFMScheduler", "SCFMPipeline", "SCFMFluxPipeline", "SCFMStableDiffusion3Pipeline"):
        assert name in scfm_diffusers.__all__ and hasattr(scfm_diffusers, name)


def test_dispatch_and_adapter_defaults(family, saved_pipelines, adapter):
    pipe = SCFMPipeline.from_pretrained(saved_pipelines[family], adapter=adapter)
    assert type(pipe) is SCFM[family]
    assert isinstance(pipe, STOCK[family])
    assert isinstance(pipe.scheduler, FlowMatchSCFMScheduler) and pipe.scheduler.config.shift == 2.5
    _, seen = record_call(pipe)
    expected = FlowMatchSCFMScheduler(shift=2.5)
    expected.set_timesteps(3)
    assert seen["sigmas"] == pytest.approx(expected.sigmas[:-1].tolist(), abs=1e-6)
    assert seen["scale"] == 1.25


def test_output_equals_stock_pipeline_with_same_settings(family, saved_pipelines, adapter):
    pipe = SCFMPipeline.from_pretrained(saved_pipelines[family], adapter=adapter)
    stock = STOCK[family].from_pretrained(saved_pipelines[family])
    stock.load_lora_weights(adapter)
    stock.scheduler = FlowMatchSCFMScheduler.from_config(stock.scheduler.config, shift=2.5, use_dynamic_shifting=False)
    expected = generate(stock, num_inference_steps=3, guidance_scale=4.5, joint_attention_kwargs={"scale": 1.25})
    assert torch.equal(generate(pipe), expected)


def test_per_call_overrides(family, saved_pipelines, adapter):
    pipe = SCFMPipeline.from_pretrained(saved_pipelines[family], adapter=adapter)
    default_images, _ = record_call(pipe)
    images, seen = record_call(pipe, num_inference_steps=5, shift=1.0, lora_scale=0.0, guidance_scale=2.0)
    assert seen["sigmas"][1:] == pytest.approx([0.8, 0.6, 0.4, 0.2], abs=1e-6)
    assert seen["scale"] == 0.0
    assert pipe.scheduler.shift == 2.5, "a per-call shift must not stick"
    if family == "flux" and pipe.transformer.config.guidance_embeds:
        assert float(seen["guidance"][0][0]) == 2.0
    assert not torch.allclose(images, default_images)
    # lora_scale=0 gives the base model's output on the same grid.
    base = STOCK[family].from_pretrained(saved_pipelines[family])
    base.scheduler = FlowMatchSCFMScheduler(shift=1.0)
    torch.testing.assert_close(generate(base, num_inference_steps=5, guidance_scale=2.0), images, atol=1e-5, rtol=1e-5)


def test_settings_override_at_load(family, saved_pipelines, adapter):
    pipe = SCFMPipeline.from_pretrained(saved_pipelines[family], adapter=adapter, settings={"num_inference_steps": 4})
    assert pipe.scfm_settings.num_inference_steps == 4 and pipe.scfm_settings.shift == 2.5
    _, seen = record_call(pipe)
    assert len(seen["sigmas"]) == 4


def test_from_pipe_shares_components(family, saved_pipelines, adapter):
    stock = STOCK[family].from_pretrained(saved_pipelines[family])
    pipe = SCFMPipeline.from_pipe(stock, adapter=adapter)
    assert type(pipe) is SCFM[family] and pipe.transformer is stock.transformer
    assert pipe.scfm_settings.num_inference_steps == 3
    # Without an adapter: the method's family defaults.
    plain = SCFM[family].from_pipe(STOCK[family].from_pretrained(saved_pipelines[family]))
    defaults = SCFMInferenceSettings.for_family(family)
    assert plain.scfm_settings == defaults
    _, seen = record_call(plain)
    assert len(seen["sigmas"]) == defaults.num_inference_steps
    assert isinstance(plain.scheduler, FlowMatchSCFMScheduler) and plain.scheduler.config.shift == defaults.shift


def test_bad_inputs(saved_pipelines, adapter, family, tmp_path):
    other = "sd3" if family == "flux" else "flux"
    with pytest.raises(ValueError, match=f"adapter is for '{family}'"):
        SCFMPipeline.from_pretrained(saved_pipelines[other], adapter=adapter)
    pipe = SCFMPipeline.from_pretrained(saved_pipelines[family], adapter=adapter)
    with pytest.raises(ValueError, match="num_inference_steps must be >= 1"):
        pipe("a cat", num_inference_steps=0)
    with pytest.raises(FileNotFoundError, match="holds no pytorch_lora_weights.safetensors"):
        pipe.load_scfm_adapter(tmp_path)
    with pytest.raises(ValueError, match="Unknown SCFM settings keys"):
        pipe.set_scfm_settings(steps=3)
    with pytest.raises(OSError, match="not instantiated directly"):
        SCFMPipeline()


def test_rejects_non_flow_matching_pipeline(tmp_path):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(4, 8),
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    ddpm = DDPMPipeline(unet=unet, scheduler=DDPMScheduler())
    ddpm.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="'DDPMPipeline'.*not a supported flow-matching model family"):
        SCFMPipeline.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="DDPMPipeline.*not a supported flow-matching model family"):
        SCFMPipeline.from_pipe(ddpm)
    assert isinstance(DiffusionPipeline.load_config(tmp_path), dict)
