"""Qwen-Image specifics beyond the family contract: the dropped system prompt, the text mask, the per-channel
VAE normalisation, true CFG with its norm-preserving rescale, and ``true_cfg_scale`` + negative prompt filling."""

from __future__ import annotations

import pytest
import torch
from diffusers import QwenImageImg2ImgPipeline

from scfm_diffusers import FlowMatchSCFMScheduler, SCFMPipeline
from scfm_diffusers.families import ConditioningConfig, get_family

FAMILY = get_family("qwenimage")
PROMPT = "a red square on a blue sky"
SIZE = FAMILY.tiny_resolution


@pytest.fixture(scope="module")
def pipe():
    pipe = FAMILY.tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sample(pipe, **kwargs) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return pipe(height=SIZE, width=SIZE, num_inference_steps=2, output_type="pt", generator=generator, **kwargs).images


def test_the_pipeline_drops_exactly_the_system_prompt(pipe):
    """The tiny tokenizer makes the template's header the 34 tokens the pipeline drops, so the prompt is kept."""
    template, drop = pipe.prompt_template_encode, pipe.prompt_template_encode_start_idx
    ids = pipe.tokenizer(template.format(PROMPT))["input_ids"]
    assert pipe.tokenizer.decode(ids[drop:]).startswith(PROMPT + "<|im_end|>")
    with torch.no_grad():
        text = FAMILY.encode_prompts(pipe, [PROMPT, "b" + PROMPT[1:]], 8)
    assert not torch.allclose(text["prompt_embeds"][0, 0], text["prompt_embeds"][1, 0])


def test_padded_cached_text_with_its_mask_reproduces_the_prompt(pipe):
    """Cached embeddings padded to max_sequence_length (mask 0 on the padding) give the pipeline's own output for
    the prompt string; the same padding without the mask does not."""
    with torch.no_grad():
        text = FAMILY.encode_prompts(pipe, [PROMPT], 64)
        uncond = FAMILY.encode_prompts(pipe, [""], 64)
    mask = text["prompt_embeds_mask"]
    assert text["prompt_embeds"].shape[:2] == mask.shape == (1, 64) and mask.dtype == torch.long
    assert 0 < int(mask.sum()) < 64 and text["prompt_embeds"].dtype == torch.float32
    cached = FAMILY.pipeline_text_kwargs(text, uncond)
    expected = _sample(pipe, prompt=PROMPT, negative_prompt="", true_cfg_scale=4.0, max_sequence_length=64)
    torch.testing.assert_close(_sample(pipe, true_cfg_scale=4.0, **cached), expected, rtol=0, atol=1e-5)
    cached["prompt_embeds_mask"] = torch.ones_like(mask)
    assert (_sample(pipe, true_cfg_scale=4.0, **cached) - expected).abs().max() > 1e-4


def test_encode_images_normalises_per_channel_as_diffusers_img2img(pipe):
    pixels = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        latents = FAMILY.encode_images(pipe.vae, pixels, generator=torch.Generator().manual_seed(1))
        img2img = QwenImageImg2ImgPipeline(**pipe.components)
        expected = img2img._encode_vae_image(pixels.unsqueeze(2), generator=torch.Generator().manual_seed(1))
    assert latents.shape == (2, pipe.vae.config.z_dim, SIZE, SIZE) and latents.dtype == torch.float32
    torch.testing.assert_close(latents, expected[:, :, 0])
    assert FAMILY.to_model_space(latents).shape == (2, SIZE * SIZE // 4, 4 * pipe.vae.config.z_dim)


@pytest.mark.parametrize("cfg_scale", [1.0, 4.0])
def test_velocity_matches_the_pipeline_step_with_padding_and_cfg(pipe, cfg_scale):
    """Padded text (a real mask) and both CFG branches of the pipeline (off at scale ≤ 1, else rescaled CFG)."""
    scheduler = pipe.scheduler
    pipe.scheduler = FlowMatchSCFMScheduler.from_config(scheduler.config, shift=2.0, use_dynamic_shifting=False)
    try:
        with torch.no_grad():
            text = FAMILY.encode_prompts(pipe, [PROMPT, "a cat"], 48)
            uncond = FAMILY.encode_prompts(pipe, [""], 48)
            shape = (2, pipe.vae.config.z_dim, SIZE, SIZE)
            x = FAMILY.to_model_space(torch.randn(shape, generator=torch.Generator().manual_seed(3)))
            call = {"latents": x.clone(), "num_inference_steps": 1, "height": SIZE, "width": SIZE}
            call.update(FAMILY.pipeline_text_kwargs(text, uncond))
            FAMILY.fill_guidance(call, cfg_scale)
            stepped = pipe(**call, max_sequence_length=48, output_type="latent").images
            sigma = pipe.scheduler.sigmas[0].reshape(1).float().expand(2)
            options = FAMILY.sample_conditioning(
                pipe.transformer, 2, ConditioningConfig(cfg_scale=cfg_scale), torch.Generator()
            )
            v = FAMILY.velocity_fn(pipe.transformer, text, shape, uncond=uncond, **options)(x, sigma, torch.arange(2))
    finally:
        pipe.scheduler = scheduler
    torch.testing.assert_close((x - stepped) / sigma[0], v, rtol=1e-4, atol=1e-4)


def test_fill_guidance_sets_true_cfg_and_the_empty_negative_prompt_only_where_missing():
    arguments = {"prompt": PROMPT}
    FAMILY.fill_guidance(arguments, 4.0)
    assert arguments == {"prompt": PROMPT, "true_cfg_scale": 4.0, "negative_prompt": ""}
    arguments = {"guidance_scale": 2.5, "negative_prompt_embeds": torch.zeros(1)}  # an SCFM guidance_scale is CFG
    FAMILY.fill_guidance(arguments, 4.0)
    assert (
        arguments["true_cfg_scale"] == 2.5 and "guidance_scale" not in arguments and "negative_prompt" not in arguments
    )
    arguments = {"true_cfg_scale": 1.5, "negative_prompt": "blurry"}
    FAMILY.fill_guidance(arguments, 4.0)
    assert arguments == {"true_cfg_scale": 1.5, "negative_prompt": "blurry"}


def test_the_scfm_pipeline_samples_with_the_cfg_it_was_trained_with(pipe):
    """SCFMPipeline(prompt) = stock pipeline with true_cfg_scale and the empty negative prompt (CFG on)."""
    scfm = SCFMPipeline.from_pipe(pipe, num_inference_steps=2)
    scfm.set_progress_bar_config(disable=True)
    stock_scheduler = pipe.scheduler
    pipe.scheduler = scfm.scheduler
    try:
        with_cfg = _sample(pipe, prompt=PROMPT, negative_prompt="", true_cfg_scale=4.0)
        without = _sample(pipe, prompt=PROMPT, true_cfg_scale=1.0)
    finally:
        pipe.scheduler = stock_scheduler
    torch.testing.assert_close(_sample(scfm, prompt=PROMPT), with_cfg, rtol=0, atol=1e-6)
    assert (with_cfg - without).abs().max() > 1e-4
