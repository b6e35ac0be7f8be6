"""SCFM pipelines interoperate with diffusers: saved folders reload through every loader, __call__ is the stock one.

Round trips: an SCFM pipeline with its scheduler and settings, with an unfused LoRA, with a fused LoRA (unloaded
or still loaded) is saved and reloaded by SCFMPipeline, the SCFM subclass, the stock class and
DiffusionPipeline, and samples exactly as before. Calls: the signature is the stock one plus shift/lora_scale,
and callbacks, prompt_embeds and joint_attention_kwargs behave as in the stock pipelines.
"""

import inspect
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import add_trained_lora, generate
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline

from scfm_diffusers import (
    FlowMatchSCFMScheduler,
    SCFMFluxPipeline,
    SCFMInferenceSettings,
    SCFMPipeline,
    SCFMStableDiffusion3Pipeline,
    load_adapter_settings,
    save_adapter,
)

STOCK = {"flux": FluxPipeline, "sd3": StableDiffusion3Pipeline}
SCFM = {"flux": SCFMFluxPipeline, "sd3": SCFMStableDiffusion3Pipeline}
SETTINGS = {"num_inference_steps": 3, "shift": 2.5, "guidance_scale": 4.5, "lora_scale": 1.25}  # no defaults
#: The same sampling, spelled out for a stock pipeline that carries the SCFM scheduler.
STOCK_CALL = {"num_inference_steps": 3, "guidance_scale": 4.5, "joint_attention_kwargs": {"scale": 1.25}}
SCHEDULER_ENTRY = ["scfm_diffusers.scheduling_flow_match_scfm", "FlowMatchSCFMScheduler"]


@pytest.fixture
def scfm_pipe(family, saved_pipelines, tmp_path):
    """An SCFM pipeline in its usual state: adapter loaded (LoRA unfused), SCFM scheduler, adapter settings."""
    stock = STOCK[family].from_pretrained(saved_pipelines[family])
    add_trained_lora(stock.transformer)
    settings = SCFMInferenceSettings.for_family(family, **SETTINGS)
    adapter = save_adapter(tmp_path / "adapter", stock.transformer, settings, scheduler_config=stock.scheduler.config)
    return SCFMPipeline.from_pretrained(saved_pipelines[family], adapter=adapter)


def read_model_index(folder):
    return json.loads((folder / "model_index.json").read_text())


@pytest.mark.parametrize("lora", ["none", "unfused", "fused", "fused_still_loaded"])
def test_save_and_reload_with_every_loader(family, scfm_pipe, lora, tmp_path):
    pipe, folder = scfm_pipe, tmp_path / "saved"
    if lora == "none":
        pipe.unload_lora_weights()  # only the SCFM scheduler and settings are left
    if lora.startswith("fused"):
        pipe.fuse_lora(lora_scale=pipe.scfm_settings.lora_scale)
    if lora == "fused":
        pipe.unload_lora_weights()
    expected = generate(pipe)
    pipe.save_pretrained(folder)
    assert torch.equal(generate(pipe), expected), "saving must leave the live pipeline as it was"

    index = read_model_index(folder)
    assert index["_class_name"] == STOCK[family].__name__  # what DiffusionPipeline can resolve
    assert index["scheduler"] == SCHEDULER_ENTRY
    assert (folder / "pytorch_lora_weights.safetensors").is_file() == (lora == "unfused")
    if lora == "unfused":  # the folder doubles as an adapter folder
        assert load_adapter_settings(folder) == pipe.scfm_settings

    for loader in (SCFMPipeline, SCFM[family]):
        loaded = loader.from_pretrained(folder)
        assert type(loaded) is SCFM[family]
        assert loaded.scfm_settings == pipe.scfm_settings
        assert isinstance(loaded.scheduler, FlowMatchSCFMScheduler) and loaded.scheduler.config.shift == 2.5
        assert torch.equal(generate(loaded), expected), loader.__name__

    for loader in (STOCK[family], DiffusionPipeline):
        loaded = loader.from_pretrained(folder)
        assert type(loaded) is STOCK[family] and isinstance(loaded.scheduler, FlowMatchSCFMScheduler)
        if lora == "unfused":  # transformer/ holds the base weights; the stock class loads the LoRA on request
            assert not torch.equal(generate(loaded, **STOCK_CALL), expected)
            loaded.load_lora_weights(folder)
        assert torch.equal(generate(loaded, **STOCK_CALL), expected), loader.__name__


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`:UserWarning")  # the second adapter, on purpose
def test_two_unfused_adapters_are_refused(family, scfm_pipe, tmp_path):
    add_trained_lora(scfm_pipe.transformer, adapter_name="style", seed=1)
    with pytest.raises(ValueError, match=r"carries 2: \['scfm', 'style'\]\. Fuse them"):
        scfm_pipe.save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved").exists()


def test_folder_with_stock_scheduler_gets_the_scfm_scheduler_back(family, scfm_pipe, tmp_path):
    """The recipe for a folder that plain diffusers (and the Hub) load: a merged model with the stock scheduler."""
    scfm_pipe.fuse_lora(lora_scale=scfm_pipe.scfm_settings.lora_scale)
    scfm_pipe.unload_lora_weights()
    expected = generate(scfm_pipe)
    scfm_pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(scfm_pipe.scheduler.config)
    scfm_pipe.save_pretrained(tmp_path)
    assert read_model_index(tmp_path)["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    loaded = SCFMPipeline.from_pretrained(tmp_path)
    assert isinstance(loaded.scheduler, FlowMatchSCFMScheduler) and loaded.scfm_settings == scfm_pipe.scfm_settings
    assert torch.equal(generate(loaded), expected)


def test_plain_diffusers_process_loads_after_importing_scfm_diffusers(saved_pipelines, tmp_path):
    pipe = SCFMFluxPipeline.from_pretrained(saved_pipelines["flux"])
    pipe.set_scfm_settings()
    pipe.save_pretrained(tmp_path)
    script = (
        "import sys\n"
        "from diffusers import FluxPipeline\n"
        "try:\n"
        "    print('BEFORE IMPORT:', type(FluxPipeline.from_pretrained(sys.argv[1]).scheduler).__name__)\n"
        "except ValueError as error:\n"
        "    print('REFUSED:', error)\n"
        "import scfm_diffusers\n"
        "print('LOADED:', type(FluxPipeline.from_pretrained(sys.argv[1]).scheduler).__name__)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    # Before the import, diffusers 0.42 refuses with a hint; older releases import the module themselves. Either
    # way the stock loader never silently swaps in another scheduler.
    refused = "REFUSED:" in result.stdout and "import scfm_diffusers.scheduling_flow_match_scfm" in result.stdout
    assert refused or "BEFORE IMPORT: FlowMatchSCFMScheduler" in result.stdout, result.stdout
    assert "LOADED: FlowMatchSCFMScheduler" in result.stdout


@pytest.mark.parametrize("family_name", ["flux", "sd3"])
def test_call_signature_is_the_stock_one_plus_scfm_arguments(family_name):
    ours = inspect.signature(SCFM[family_name].__call__).parameters
    stock = inspect.signature(STOCK[family_name].__call__).parameters
    assert list(ours)[: len(stock)] == list(stock), "same names in the same order: positional calls bind alike"
    for name, parameter in stock.items():
        assert ours[name].kind == parameter.kind, name
        default = None if name in ("num_inference_steps", "guidance_scale") else parameter.default
        assert ours[name].default == default, name
    assert list(ours)[len(stock) :] == ["shift", "lora_scale"]
    assert all(ours[name].kind is inspect.Parameter.KEYWORD_ONLY for name in ("shift", "lora_scale"))
    assert all(ours[name].default is None for name in ("shift", "lora_scale"))


def test_callbacks_see_every_step_as_in_the_stock_pipeline(family, scfm_pipe):
    stock = STOCK[family].from_pipe(scfm_pipe)  # same weights, LoRA and SCFM scheduler

    def recorder(seen):
        def callback(pipe, step, timestep, tensors):
            seen.append(tensors["latents"].clone())
            return {}

        return callback

    ours, theirs = [], []
    images = generate(scfm_pipe, callback_on_step_end=recorder(ours), callback_on_step_end_tensor_inputs=["latents"])
    expected = generate(stock, callback_on_step_end=recorder(theirs), **STOCK_CALL)
    assert len(ours) == len(theirs) == SETTINGS["num_inference_steps"]
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))
    assert not torch.equal(ours[0], ours[1])
    assert torch.equal(images, expected)

    def zero_latents(pipe, step, timestep, tensors):
        return {"latents": torch.zeros_like(tensors["latents"])}

    zeroed = generate(scfm_pipe, callback_on_step_end=zero_latents)
    assert not torch.equal(zeroed, images)
    assert torch.equal(zeroed, generate(stock, callback_on_step_end=zero_latents, **STOCK_CALL))
    with pytest.raises(TypeError, match="bogus"):
        scfm_pipe("a cat", bogus=1)


ENCODE_PROMPT = {
    "flux": lambda pipe: dict(zip(("prompt_embeds", "pooled_prompt_embeds"), pipe.encode_prompt("a cat", None)[:2])),
    "sd3": lambda pipe: dict(
        zip(
            ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds"),
            pipe.encode_prompt("a cat", None, None, do_classifier_free_guidance=True),
        )
    ),
}


def test_prompt_embeds_give_the_prompt_output(family, scfm_pipe):
    with torch.no_grad():  # as inside the pipeline call: with autograd on, kernels may differ in the last bit
        embeds = ENCODE_PROMPT[family](scfm_pipe)
    assert torch.equal(generate(scfm_pipe, prompt=None, **embeds), generate(scfm_pipe, "a cat"))


def test_explicit_joint_attention_scale_wins_over_lora_scale(family, scfm_pipe):
    off = generate(scfm_pipe, joint_attention_kwargs={"scale": 0.0})
    assert torch.equal(off, generate(scfm_pipe, lora_scale=0.0))
    assert torch.equal(off, generate(scfm_pipe, lora_scale=2.0, joint_attention_kwargs={"scale": 0.0}))
    assert not torch.equal(off, generate(scfm_pipe))
