"""FLUX.2 [klein] specifics that the shared family contract does not pin.

The Klein pipeline returns ``output_type="latent"`` results as RAW VAE latents (de-normalised with the VAE's
batch-norm statistics, unpatchified), not in the patchified, normalised layout it takes as ``latents=``; the
finite-difference check of the velocity therefore maps the pipeline's output back with the family's
``pipeline_latents_to_model_space``. Time convention: σ ∈ [0, 1], σ = 1 noise, v = ε − x0.
"""

from __future__ import annotations

import math

import pytest
import torch

from scfm_diffusers import FlowMatchSCFMScheduler
from scfm_diffusers.families import ConditioningConfig, get_family

FAMILY = get_family("flux2klein")
pytestmark = pytest.mark.skipif(not FAMILY.available, reason="this diffusers has no Flux2KleinPipeline")
PROMPT = "a red square on a blue sky"
MAX_SEQUENCE_LENGTH = 8


@pytest.fixture(scope="module")
def pipe():
    pipe = FAMILY.tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_velocity_is_the_pipeline_euler_step_in_model_space(pipe, guidance):
    """One Euler step of the stock pipeline from ``latents=x`` to σ = 0, mapped back to model space, is
    ``x − σ·v``; at guidance 1 the pipeline runs no CFG and the family uses the conditional pass alone."""
    size = FAMILY.tiny_resolution
    pipe.scheduler = FlowMatchSCFMScheduler.from_config(pipe.scheduler.config, shift=2.0, use_dynamic_shifting=False)
    with torch.no_grad():
        text = FAMILY.encode_prompts(pipe, [PROMPT], MAX_SEQUENCE_LENGTH)
        uncond = FAMILY.encode_prompts(pipe, [""], MAX_SEQUENCE_LENGTH)
        pixels = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1
        latents = FAMILY.encode_images(pipe.vae, pixels, generator=torch.Generator().manual_seed(2))
        x = FAMILY.to_model_space(torch.randn(latents.shape, generator=torch.Generator().manual_seed(3)))
        out = pipe(
            **FAMILY.pipeline_text_kwargs(text, uncond, dtype=torch.float32),
            latents=x.clone(),
            num_inference_steps=1,
            height=size,
            width=size,
            guidance_scale=guidance,
            output_type="latent",
        ).images
        assert out.shape == (1, pipe.vae.config.latent_channels, size, size)  # raw VAE latents, not x's layout
        stepped = FAMILY.pipeline_latents_to_model_space(pipe.vae, out)
        sigma = pipe.scheduler.sigmas[0].reshape(1).float()
        options = FAMILY.sample_conditioning(
            pipe.transformer, 1, ConditioningConfig(cfg_scale=guidance), torch.Generator()
        )
        v = FAMILY.velocity_fn(pipe.transformer, text, latents.shape, uncond=uncond, **options)(
            x, sigma, torch.arange(1)
        )
    assert v.dtype == torch.float32 and v.shape == x.shape == stepped.shape
    torch.testing.assert_close((x - stepped) / sigma, v, rtol=1e-4, atol=1e-4)


def test_cached_latents_use_the_pipelines_own_normalisation(pipe):
    """The cache layout is the pipeline's reference-image encoding: 2×2 patchified, batch-norm normalised."""
    pixels = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        mode = pipe.vae.encode(pixels).latent_dist.mode()
        expected = pipe._encode_vae_image(pixels, generator=None)  # mode, patchified, normalised
        cached = FAMILY.encode_images(pipe.vae, pixels, generator=torch.Generator().manual_seed(0))
    assert pipe.vae.bn.running_mean.abs().max() > 0.1  # the tiny VAE's statistics are not the identity
    torch.testing.assert_close(FAMILY.pipeline_latents_to_model_space(pipe.vae, mode), expected)
    assert cached.shape == expected.shape == (2, 4 * pipe.vae.config.latent_channels, 8, 8)
    assert FAMILY.image_seq_len(cached) == 64  # one token per patchified position


def test_prompt_embeds_stack_the_three_fixed_qwen3_layers(pipe):
    """The tiny Qwen3 is deep enough for the stock ``text_encoder_out_layers`` (9, 18, 27), and the
    transformer's text width is three hidden states."""
    hidden = pipe.text_encoder.config.hidden_size
    assert pipe.text_encoder.config.num_hidden_layers >= 27
    assert pipe.transformer.config.joint_attention_dim == 3 * hidden
    with torch.no_grad():
        text = FAMILY.encode_prompts(pipe, [PROMPT, ""], MAX_SEQUENCE_LENGTH)
    embeds = text["prompt_embeds"]
    assert embeds.shape == (2, MAX_SEQUENCE_LENGTH, 3 * hidden) and embeds.dtype == torch.float32
    layers = embeds.reshape(2, MAX_SEQUENCE_LENGTH, 3, hidden)
    assert not torch.allclose(layers[:, :, 0], layers[:, :, 2])  # three different layers
    assert not torch.allclose(embeds[0], embeds[1])  # the caption matters


def test_lora_targets_are_linear_and_reach_every_single_block(pipe):
    """The bare name ``to_out`` would also hit the double blocks' ModuleList (peft refuses it): the single
    blocks' output projections are targeted by path, and peft wraps every target."""
    from peft import LoraConfig

    transformer = FAMILY.tiny_pipeline().transformer
    targets = FAMILY.lora_target_modules(transformer)
    modules = dict(transformer.named_modules())
    for target in targets:
        matched = [m for path, m in modules.items() if path == target or path.endswith("." + target)]
        assert matched and all(isinstance(m, torch.nn.Linear) for m in matched), target
    singles = len(transformer.single_transformer_blocks)
    assert {f"single_transformer_blocks.{i}.attn.to_out" for i in range(singles)} <= set(targets)
    transformer.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=targets))
    assert "lora_A" in dict(transformer.named_modules())["single_transformer_blocks.0.attn.to_out"]._modules


def test_dynamically_shifted_training_grids_use_the_pipelines_mu():
    """Klein's μ is not FLUX.1's line: the family's grid defaults reproduce ``compute_empirical_mu`` at the default
    step count, and the default sampling shift is its e^μ at 1024² (4096 tokens)."""
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

    from scfm_diffusers.sigmas import resolution_mu
    from scfm_diffusers.training.timesteps import GridSamplerConfig

    grid = GridSamplerConfig(**FAMILY.grid_defaults)
    steps = FAMILY.default_settings["num_inference_steps"]
    assert grid.dynamic_shift_prob == FAMILY.dynamic_shift_prob > 0
    for tokens in (256, 1024, 2304, 4096):
        mu = resolution_mu(tokens, grid.base_image_seq_len, grid.max_image_seq_len, grid.base_shift, grid.max_shift)
        assert mu == pytest.approx(compute_empirical_mu(tokens, steps), abs=1e-9)
    assert math.exp(mu) == pytest.approx(FAMILY.default_settings["shift"], rel=0.01)
