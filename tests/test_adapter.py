"""The adapter folder: stock-loader round trip (alpha != rank), settings validation, fuse/stack, Hub paths."""

import json

import numpy as np
import pytest
import torch
from conftest import add_trained_lora, generate
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from huggingface_hub import ModelCard
from huggingface_hub.errors import HFValidationError
from PIL import Image

from scfm_diffusers import FlowMatchSCFMScheduler, SCFMInferenceSettings, load_adapter_settings, save_adapter
from scfm_diffusers.adapter import SETTINGS_NAME, WEIGHTS_NAME, card_tags
from scfm_diffusers.hub import create_adapter_repo, push_adapter

STOCK = {"flux": FluxPipeline, "sd3": StableDiffusion3Pipeline}


def trained_pipeline_and_adapter(family, saved_pipelines, tmp_path, images=None, prompts=None, **settings):
    """A stock pipeline carrying a 'trained' LoRA (alpha 8 != rank 4) and the adapter folder saved from it."""
    pipe = STOCK[family].from_pretrained(saved_pipelines[family])
    add_trained_lora(pipe.transformer, rank=4, alpha=8)
    settings = SCFMInferenceSettings.for_family(family, num_inference_steps=3, **settings)
    folder = save_adapter(
        tmp_path / "adapter",
        pipe.transformer,
        settings,
        scheduler_config=pipe.scheduler.config,
        validation_images=images,
        validation_prompts=prompts,
    )
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


def test_card_has_diffusers_metadata_and_a_widget_of_the_validation_images(family, saved_pipelines, tmp_path):
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)) for _ in range(2)]
    prompts = ["a cat", 'a "quoted": prompt # with YAML syntax']
    _, folder = trained_pipeline_and_adapter(
        family, saved_pipelines, tmp_path, images=images, prompts=prompts, base_model="org/base", training={"lr": 1e-4}
    )
    card = ModelCard.load(folder / "README.md")
    assert card.data.base_model == "org/base" and card.data.library_name == "diffusers"
    assert card.data.license == "other" and card.data.pipeline_tag == "text-to-image"
    assert card.data.tags == card_tags(family)  # each once, as diffusers' populate_model_card added them
    for tag in ("text-to-image", "diffusers-training", "diffusers", "lora", "template:sd-lora", family, "scfm"):
        assert tag in card.data.tags
    assert card.data.widget == [
        {"text": "a cat", "output": {"url": "images/validation_0.png"}},
        {"text": prompts[1], "output": {"url": "images/validation_1.png"}},
    ]
    for index, image in enumerate(images):
        np.testing.assert_array_equal(np.asarray(Image.open(folder / f"images/validation_{index}.png")), image)
    # The body keeps both usage snippets and both tables.
    assert 'SCFMPipeline.from_pretrained("org/base", adapter="path/to/this/adapter"' in card.text
    assert f"{STOCK[family].__name__}.from_pretrained" in card.text and "| steps | 3 |" in card.text
    assert "| lr | 0.0001 |" in card.text and "![a cat](images/validation_0.png)" in card.text


def test_card_without_images_has_no_widget(saved_pipelines, tmp_path):
    _, folder = trained_pipeline_and_adapter("flux", saved_pipelines, tmp_path)
    card = ModelCard.load(folder / "README.md")
    assert not (folder / "images").exists() and "widget" not in card.data.to_dict()
    assert card.data.base_model is None and card.data.tags == card_tags("flux")


def test_save_rejects_prompts_that_do_not_match_the_images(saved_pipelines, tmp_path):
    pipe = FluxPipeline.from_pretrained(saved_pipelines["flux"])
    add_trained_lora(pipe.transformer)
    images = [Image.new("RGB", (8, 8))] * 2
    with pytest.raises(ValueError, match="2 validation images but 1 prompts"):
        save_adapter(
            tmp_path / "adapter",
            pipe.transformer,
            SCFMInferenceSettings.for_family("flux"),
            validation_images=images,
            validation_prompts=["only one"],
        )
    assert not (tmp_path / "adapter").exists()  # checked before anything is written


def test_stock_loader_reproduces_trained_outputs_exactly(family, saved_pipelines, tmp_path):
    trained, folder = trained_pipeline_and_adapter(family, saved_pipelines, tmp_path)
    expected = generate(trained, num_inference_steps=3)

    stock = STOCK[family].from_pretrained(saved_pipelines[family])
    stock.scheduler = FlowMatchSCFMScheduler.from_pretrained(folder / "scheduler")
    base_output = generate(stock, num_inference_steps=3)
    stock.load_lora_weights(folder)
    assert torch.equal(generate(stock, num_inference_steps=3), expected)
    assert not torch.allclose(base_output, expected, atol=1e-3)
    # alpha = 8 != rank = 4 survived, folded into lora_B: the stored adapter has alpha = r (scale 1 in any loader).
    layer = stock.transformer.transformer_blocks[0].attn.to_q
    assert [layer.scaling[name] for name in layer.scaling] == [1.0]


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


def test_create_adapter_repo_rejects_bad_names_before_any_request():
    # conftest sets HF_HUB_OFFLINE: a request would raise OSError, so a ValueError shows none was made.
    with pytest.raises(ValueError, match="'org/my adapter' is not a valid Hub repository id") as raised:
        create_adapter_repo("org/my adapter", token="hf_x")
    assert isinstance(raised.value.__cause__, HFValidationError) and "--hub_model_id" in str(raised.value)


def test_create_adapter_repo_offline_says_how_to_fix_it():
    with pytest.raises(OSError, match="could not be reached") as raised:
        create_adapter_repo("org/adapter", token="hf_secret_offline_token")
    assert "HF_HUB_OFFLINE" in str(raised.value) and "hf_secret_offline_token" not in str(raised.value)
    assert raised.value.__cause__ is not None  # chained, not swallowed
