"""Z-Image's own traps, beyond the family contract of tests/test_families.py (which runs one short prompt).

Z-Image's transformer takes a LIST of unpadded caption embeddings; the family caches them padded with a mask
and must give back exactly the pipeline's list. Its pipeline combines CFG as ``v_c + w·(v_c − v_u)`` (not
diffusers' usual ``v_u + w·(v_c − v_u)``) and skips CFG at ``w = 0``. And one of its LoRA target names also
ends a SiLU, which peft cannot wrap.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig

from scfm_diffusers import FlowMatchSCFMScheduler
from scfm_diffusers.families import get_family

FAMILY = get_family("zimage")
PROMPTS = ["ab", "a red square on a blue sky"]  # 21 and 45 of 48 tokens after the chat template (the empty prompt: 19)
MAX_SEQUENCE_LENGTH = 48

pytestmark = pytest.mark.skipif(not FAMILY.available, reason="this diffusers has no ZImagePipeline")


@pytest.fixture
def pipe():
    pipe = FAMILY.tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _encode(pipe, prompts):
    with torch.no_grad():
        return FAMILY.encode_prompts(pipe, prompts, MAX_SEQUENCE_LENGTH)


def test_cached_captions_unpad_to_the_pipelines_own_list(pipe):
    prompts = [*PROMPTS, ""]
    text = _encode(pipe, prompts)
    embeds, mask = text["prompt_embeds"], text["prompt_attention_mask"]
    assert embeds.shape[:2] == mask.shape == (3, MAX_SEQUENCE_LENGTH)
    assert embeds.dtype == torch.float32 and mask.dtype == torch.bool
    with torch.no_grad():
        expected, _ = pipe.encode_prompt(list(prompts), do_classifier_free_guidance=False, max_sequence_length=48)
    assert [int(n) for n in mask.sum(1)] == [len(e) for e in expected] and len(set(mask.sum(1).tolist())) == 3
    assert not embeds[~mask].any()  # the padding is zeros
    unpadded = FAMILY.pipeline_text_kwargs(text, text, dtype=torch.float32)["prompt_embeds"]
    for got, want in zip(unpadded, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("guidance_scale", [0.0, 3.0], ids=["no_cfg", "cfg"])
def test_velocity_is_the_pipeline_euler_step_for_prompts_of_different_lengths(pipe, guidance_scale):
    size, n = FAMILY.tiny_resolution, len(PROMPTS)
    pipe.scheduler = FlowMatchSCFMScheduler.from_config(pipe.scheduler.config, shift=2.0, use_dynamic_shifting=False)
    text, uncond = _encode(pipe, PROMPTS), _encode(pipe, [""])
    x = torch.randn(n, 4, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        stepped = pipe(
            **FAMILY.pipeline_text_kwargs(text, uncond, dtype=torch.float32),
            latents=x.clone(),
            num_inference_steps=1,
            guidance_scale=guidance_scale,
            height=size,
            width=size,
            output_type="latent",
        ).images
        sigma = pipe.scheduler.sigmas[0].float().expand(n)
        velocity = FAMILY.velocity_fn(pipe.transformer, text, x.shape, uncond=uncond, cfg_scale=guidance_scale)
        v = velocity(x, sigma, torch.arange(n))
        second = velocity(x[1:], sigma[1:], torch.tensor([1]))  # rows pick their own captions and masks
    torch.testing.assert_close((x - stepped) / sigma[0], v, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(second, v[1:], rtol=1e-5, atol=1e-5)


def test_cfg_is_z_images_own_combination(pipe):
    """``v = v_c + w·(v_c − v_u)``: at w = 0 the conditional velocity alone (no empty-prompt pass)."""
    text, uncond = _encode(pipe, PROMPTS[1:]), _encode(pipe, [""])
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    sigma, rows = torch.tensor([0.7]), torch.arange(1)
    with torch.no_grad():
        cond = FAMILY.velocity_fn(pipe.transformer, text, x.shape, uncond=uncond, cfg_scale=0.0)(x, sigma, rows)
        null = FAMILY.velocity_fn(pipe.transformer, uncond, x.shape, uncond=uncond, cfg_scale=0.0)(x, sigma, rows)
        guided = FAMILY.velocity_fn(pipe.transformer, text, x.shape, uncond=uncond, cfg_scale=2.5)(x, sigma, rows)
    assert (cond - null).abs().max() > 1e-3, "the prompt must change the velocity"
    torch.testing.assert_close(guided, cond + 2.5 * (cond - null), rtol=1e-5, atol=1e-5)


def test_gradient_checkpointing_keeps_the_velocity_and_its_gradient(pipe):
    """Padding masks survive checkpointing (the student's pass with gradient), unlike Chroma's."""
    text, uncond = _encode(pipe, PROMPTS), _encode(pipe, [""])
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    sigma, rows = torch.tensor([0.9, 0.4]), torch.arange(2)
    transformer = pipe.transformer
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q"]))

    def velocity_and_grad():
        v = FAMILY.velocity_fn(transformer, text, x.shape, uncond=uncond, cfg_scale=3.0)(x, sigma, rows)
        v.square().mean().backward()
        grads = [p.grad.clone() for p in transformer.parameters() if p.requires_grad]
        transformer.zero_grad(set_to_none=True)
        return v.detach(), grads

    plain, plain_grads = velocity_and_grad()
    transformer.enable_gradient_checkpointing()
    checkpointed, checkpointed_grads = velocity_and_grad()
    torch.testing.assert_close(checkpointed, plain, rtol=1e-5, atol=1e-6)
    for got, want in zip(checkpointed_grads, plain_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_lora_targets_are_every_linear_layer_and_no_silu(pipe):
    transformer = pipe.transformer
    targets = FAMILY.lora_target_modules(transformer)
    linears = {name for name, module in transformer.named_modules() if isinstance(module, torch.nn.Linear)}
    covered = {name for name in linears if any(name == t or name.endswith("." + t) for t in targets)}
    assert covered == linears
    assert "all_final_layer.2-1.adaLN_modulation.0" not in linears  # the SiLU a bare "adaLN_modulation.0" hits
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets))  # peft accepts them all


def test_caption_dropout_swaps_the_whole_padded_caption_for_the_empty_prompt(pipe):
    from scfm_diffusers.training.step import drop_captions

    text, uncond = _encode(pipe, PROMPTS), _encode(pipe, [""])
    dropped = drop_captions(text, uncond, 1.0, torch.Generator().manual_seed(0))
    captions = FAMILY.pipeline_text_kwargs(dropped, uncond)["prompt_embeds"]
    null = FAMILY.pipeline_text_kwargs(uncond, uncond)["prompt_embeds"][0]
    for caption in captions:
        torch.testing.assert_close(caption, null, rtol=0, atol=0)
