"""The adapter folder: stock-loader round trip (alpha != rank), settings validation, fuse/stack, Hub paths."""

import json

import pytest
import torch
from conftest import add_trained_lora, generate
from diffusers import FluxPipeline, StableDiffusion3Pipeline

from scfm_diffusers import FlowMatchSCFMScheduler, SCFMInferenceSettings, load_adapter_settings, save_adapter
from scfm_diffusers.adapter import SETTINGS_NAME, WEIGHTS_NAME, push_adapter

STOCK = {"flux": FluxPipeline, "sd3": StableDiffusion3Pipeline}


def trained_pipeline_and_adapter(family, saved_pipelines, tmp_path, **settings):
    """A stock pipeline carrying a 'trained' LoRA (alpha 8 != rank 4) and the adapter folder saved from it."""
    pipe = STOCK[family].from_pretrained(saved_pipelines[family])
    add_trained_lora(pipe.transformer, rank=4, alpha=8)
    settings = SCFMInferenceSettings.for_family(family, num_inference_steps=3, **settings)
    folder = save_adapter(tmp_path / "adapter", pipe.transformer, settings, scheduler_config=pipe.scheduler.config)
    pipe.scheduler = settings.make_scheduler(pipe.scheduler.config)
    return pipe, folder


def test_folder_layout_and_card(family, saved_pipelines, tmp_path):
    _, folder = trained_pipeline_and_adapter(family, saved_pipelines, tmp_path, base_model="org/base")
    assert (folder / WEIGHTS_NAME).is_file()
    settings = json.loads((folder / SETTINGS_NAME).read_text())
    assert settings["family"] == family and settings["num_inference_steps"] == 3
    scheduler = FlowMatchSCFMScheduler.from_pretrained(folder / "scheduler")
    assert scheduler.config.shift == settings["shift"] and not scheduler.config.use_dynamic_shifting
    card = (folder / "README.md").read_text()
    assert "base_model: org/base" in card and "library_name: diffusers" in card
    for tag in ("lora", "scfm", "text-to-image", "few-step"):
        assert f"- {tag}\n" in card
    assert "load_lora_weights" in card and "rank / alpha | 4 / 8" in card


def test_stock_loader_reproduces_trained_outputs_exactly(family, saved_pipelines, tmp_path):
    trained, folder = trained_pipeline_and_adapter(family, saved_pipelines, tmp_path)
    expected = generate(trained, num_inference_steps=3)

    stock = STOCK[family].from_pretrained(saved_pipelines[family])
    stock.scheduler = FlowMatchSCFMScheduler.from_pretrained(folder / "scheduler")
    base_output = generate(stock, num_inference_steps=3)
    stock.load_lora_weights(folder)
    assert torch.equal(generate(stock, num_inference_steps=3), expected)
    assert not torch.allclose(base_output, expected, atol=1e-3)
    # alpha = 8 != rank = 4 survived: the loaded layers scale by alpha / r = 2.
    layer = stock.transformer.transformer_blocks[0].attn.to_q
    assert [layer.scaling[name] for name in layer.scaling] == [2.0]


def test_fuse_unfuse_and_stacking(saved_pipelines, tmp_path):
    trained, folder = trained_pipeline_and_adapter("flux", saved_pipelines, tmp_path)
    expected = generate(trained, num_inference_steps=3)
    pipe = FluxPipeline.from_pretrained(saved_pipelines["flux"])
    pipe.scheduler = trained.scheduler
    plain = generate(pipe, num_inference_steps=3)
    pipe.load_lora_weights(folder, adapter_name="scfm")
    pipe.fuse_lora()
    torch.testing.assert_close(generate(pipe, num_inference_steps=3), expected, atol=1e-5, rtol=1e-5)
    pipe.unfuse_lora()
    torch.testing.assert_close(generate(pipe, num_inference_steps=3), expected, atol=1e-5, rtol=1e-5)

    # A second LoRA stacks with the SCFM one through set_adapters; weight 0 of both gives the base model back.
    add_trained_lora(pipe.transformer, adapter_name="style", seed=1)
    pipe.set_adapters(["scfm", "style"], adapter_weights=[1.0, 0.5])
    stacked = generate(pipe, num_inference_steps=3)
    assert not torch.allclose(stacked, expected)
    pipe.set_adapters(["scfm", "style"], adapter_weights=[1.0, 0.0])
    torch.testing.assert_close(generate(pipe, num_inference_steps=3), expected, atol=1e-6, rtol=1e-6)
    pipe.set_adapters(["scfm", "style"], adapter_weights=[0.0, 0.0])
    torch.testing.assert_close(generate(pipe, num_inference_steps=3), plain, atol=1e-6, rtol=1e-6)


def test_save_rejects_family_mismatch_and_missing_adapter(saved_pipelines, tmp_path):
    pipe = FluxPipeline.from_pretrained(saved_pipelines["flux"])
    with pytest.raises(ValueError, match="no LoRA adapter 'default'"):
        save_adapter(tmp_path, pipe.transformer, SCFMInferenceSettings.for_family("flux"))
    add_trained_lora(pipe.transformer)
    with pytest.raises(ValueError, match="flux model but the settings say 'sd3'"):
        save_adapter(tmp_path, pipe.transformer, SCFMInferenceSettings.for_family("sd3"))


@pytest.mark.parametrize(
    ("data", "error", "match"),
    [
        ({"family": "flux", "steps": 3}, ValueError, "Unknown SCFM settings keys \\['steps'\\]"),
        ({"family": "sdxl"}, ValueError, "not a supported flow-matching model family"),
        ({"num_inference_steps": 3}, ValueError, "need a 'family'"),
        ({"family": "flux", "num_inference_steps": "3"}, TypeError, "num_inference_steps must be an int"),
        ({"family": "flux", "num_inference_steps": 0}, ValueError, "must be >= 1"),
        ({"family": "flux", "shift": "3"}, TypeError, "shift must be a number"),
        ({"family": "flux", "use_dynamic_shifting": 1}, TypeError, "must be a bool"),
        ({"family": "flux", "lora_scale": True}, TypeError, "lora_scale must be a number"),
    ],
)
def test_settings_validation(data, error, match):
    with pytest.raises(error, match=match):
        SCFMInferenceSettings.from_dict(data)


def test_settings_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_adapter_settings(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match=f"holds no {WEIGHTS_NAME}"):
        load_adapter_settings(tmp_path)
    (tmp_path / WEIGHTS_NAME).write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=f"no {SETTINGS_NAME}"):
        load_adapter_settings(tmp_path)
    (tmp_path / SETTINGS_NAME).write_text('{"family": "flux", "shift": [1]}')
    with pytest.raises(TypeError, match="shift must be a number"):
        load_adapter_settings(tmp_path)
    (tmp_path / SETTINGS_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_adapter_settings(tmp_path)


def test_hub_id_offline_gives_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="Could not read scfm_settings.json of the Hub repository 'org/flux-scfm'"):
        load_adapter_settings("org/flux-scfm")


def test_push_refuses_incomplete_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a complete SCFM adapter folder"):
        push_adapter(tmp_path, "org/adapter")
