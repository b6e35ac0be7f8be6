"""Wan 2.1 / 2.2 text-to-video, beyond the family contract of tests/test_families.py: the two experts of Wan 2.2
(routing by σ, one LoRA per expert, stock loading with ``load_into_transformer_2``), the frame-count rule, and
the real training script on clips (one expert and two; resumed = uninterrupted)."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig

from scfm_diffusers import FlowMatchSCFMScheduler, SCFMInferenceSettings, SCFMPipeline, save_adapter
from scfm_diffusers.families import ConditioningConfig, get_family
from scfm_diffusers.families.wan import TRANSFORMER_2_WEIGHTS_NAME, WanExperts
from scfm_diffusers.testing import TinyModelConfig

FAMILY = get_family("wan")
SIZE, FRAMES, TEXT_LENGTH = FAMILY.tiny_resolution, FAMILY.tiny_num_frames, 8
PROMPT = "a red square drifting over a blue sky"
TWO_EXPERTS = TinyModelConfig(extra={"boundary_ratio": 0.875})


def _pipe(config: TinyModelConfig | None = None):
    pipe = FAMILY.tiny_pipeline(config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _clip(pipe, seed: int = 0, **kwargs) -> torch.Tensor:
    kwargs.setdefault("num_inference_steps", 2)
    return pipe(
        prompt=PROMPT,
        height=SIZE,
        width=SIZE,
        num_frames=FRAMES,
        max_sequence_length=TEXT_LENGTH,
        output_type="pt",
        generator=torch.Generator().manual_seed(seed),
        **kwargs,
    ).frames


def _train_lora(module, seed: int = 0) -> None:
    """A LoRA with alpha != r and non-zero B on the attention of ``module`` (both experts of a WanExperts)."""
    module.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=["to_q", "to_v"]))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, param in module.named_parameters():
            if "lora_B" in key:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)


def test_the_tiny_two_expert_pipeline_is_wan22_shaped():
    pipe = _pipe(TWO_EXPERTS)
    assert pipe.transformer_2 is not None and pipe.config.boundary_ratio == 0.875
    assert not torch.equal(pipe.transformer.proj_out.weight, pipe.transformer_2.proj_out.weight)
    experts = FAMILY.trained_module(pipe)
    assert isinstance(experts, WanExperts) and experts.boundary_timestep == 875.0
    assert experts.experts() == {"transformer": pipe.transformer, "transformer_2": pipe.transformer_2}
    assert FAMILY.trained_module(_pipe()) is not None and not isinstance(FAMILY.trained_module(_pipe()), WanExperts)


def test_the_experts_route_each_row_by_its_sigma_as_the_pipeline_does():
    """One batched call with rows on both sides of the boundary equals each row through its own expert, and the
    family velocity is the pipeline's Euler step on either side (so targets crossing the boundary are right)."""
    pipe = _pipe(TWO_EXPERTS)
    experts = FAMILY.trained_module(pipe)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        text = FAMILY.encode_prompts(pipe, [PROMPT, "a cat"], TEXT_LENGTH)
        x = torch.randn(2, 4, 2, 8, 8, generator=generator)
        timestep = torch.tensor([950.0, 300.0])  # high noise, low noise
        out = experts(x, timestep, text["prompt_embeds"], return_dict=False)[0]
        high = pipe.transformer(x[:1], timestep[:1], text["prompt_embeds"][:1], return_dict=False)[0]
        low = pipe.transformer_2(x[1:], timestep[1:], text["prompt_embeds"][1:], return_dict=False)[0]
        torch.testing.assert_close(out, torch.cat([high, low]), rtol=0, atol=1e-6)
        wrong = pipe.transformer(x[1:], timestep[1:], text["prompt_embeds"][1:], return_dict=False)[0]
        assert (wrong - low).abs().max() > 1e-3, "the experts must differ for the routing to be tested"

        uncond = FAMILY.encode_prompts(pipe, [""], TEXT_LENGTH)
        options = FAMILY.sample_conditioning(experts, 1, ConditioningConfig(cfg_scale=5.0), torch.Generator())
        velocity = FAMILY.velocity_fn(experts, text, x.shape, uncond=uncond, **options)
        # Two Euler steps on the grid σ = 1, 0.5, 0 (shift 1): the first by the high-noise expert, the second by
        # the low-noise one; each step's latents come from the pipeline's step callback.
        pipe.scheduler = FlowMatchSCFMScheduler.from_config(pipe.scheduler.config, shift=1.0)
        latents = [x[:1].clone()]
        call = {"latents": x[:1].clone(), "num_inference_steps": 2, "height": SIZE, "width": SIZE}
        call.update(FAMILY.pipeline_text_kwargs({"prompt_embeds": text["prompt_embeds"][:1]}, uncond))
        FAMILY.fill_guidance(call, 5.0)
        pipe(
            **call,
            num_frames=FRAMES,
            output_type="latent",
            callback_on_step_end=lambda p, i, t, kw: latents.append(kw["latents"].clone()) or kw,
        )
        sigmas = pipe.scheduler.sigmas.float()
        torch.testing.assert_close(sigmas, torch.tensor([1.0, 0.5, 0.0]))
        for step in (0, 1):  # 1000 ≥ 875 (transformer), 500 < 875 (transformer_2)
            sigma = sigmas[step].reshape(1)
            v = velocity(latents[step], sigma, torch.arange(1))
            expected = (latents[step] - latents[step + 1]) / (sigmas[step] - sigmas[step + 1])
            torch.testing.assert_close(v, expected, rtol=1e-4, atol=1e-4)
        single = FAMILY.velocity_fn(pipe.transformer, text, x.shape, uncond=uncond, **options)
        assert (single(latents[1], sigmas[1:2], torch.arange(1)) - expected).abs().max() > 1e-3


def test_a_two_expert_adapter_is_two_files_that_stock_wan_loads(tmp_path):
    pipe = _pipe(TWO_EXPERTS)
    base = _clip(pipe)
    experts = FAMILY.trained_module(pipe)
    _train_lora(experts)
    assert {key.split(".")[0] for key, p in experts.named_parameters() if "lora_" in key} == {
        "transformer",
        "transformer_2",
    }
    trained = _clip(pipe)
    settings = SCFMInferenceSettings.for_family("wan", num_inference_steps=2)
    folder = save_adapter(tmp_path / "adapter", experts, settings, scheduler_config=pipe.scheduler.config)
    assert (folder / "pytorch_lora_weights.safetensors").is_file() and (folder / TRANSFORMER_2_WEIGHTS_NAME).is_file()
    saved = json.loads((folder / "scfm_settings.json").read_text())
    assert saved["expert_weights"] == {"transformer_2": TRANSFORMER_2_WEIGHTS_NAME}
    assert (
        f'weight_name="{TRANSFORMER_2_WEIGHTS_NAME}", load_into_transformer_2=True'
        in (folder / "README.md").read_text()
    )

    stock = _pipe(TWO_EXPERTS)  # the same seed: the base model
    stock.load_lora_weights(folder)
    only_high = _clip(stock)
    stock.load_lora_weights(folder, weight_name=TRANSFORMER_2_WEIGHTS_NAME, load_into_transformer_2=True)
    both = _clip(stock)
    torch.testing.assert_close(both, trained, rtol=0, atol=1e-5)
    assert (only_high - both).abs().max() > 1e-4, "the low-noise expert's LoRA must matter"
    assert (both - base).abs().max() > 1e-3

    scfm = SCFMPipeline.from_pipe(_pipe(TWO_EXPERTS), adapter=folder)
    assert scfm.transformer_2.peft_config and scfm.transformer.peft_config
    stock.scheduler = FlowMatchSCFMScheduler.from_config(stock.scheduler.config, shift=settings.shift)
    expected = _clip(stock, guidance_scale=settings.guidance_scale)  # the adapter's settings, by hand
    torch.testing.assert_close(_clip(scfm), expected, rtol=0, atol=1e-5)


def test_a_two_expert_adapter_refuses_a_one_expert_pipeline(tmp_path):
    pipe = _pipe(TWO_EXPERTS)
    experts = FAMILY.trained_module(pipe)
    _train_lora(experts)
    settings = SCFMInferenceSettings.for_family("wan", num_inference_steps=2)
    folder = save_adapter(tmp_path / "adapter", experts, settings)
    one_expert = SCFMPipeline.from_pipe(_pipe())
    with pytest.raises(ValueError, match="transformer_2.*two-expert base"):
        one_expert.load_scfm_adapter(folder)
    assert not getattr(one_expert.transformer, "peft_config", None), "a refused adapter must leave no LoRA behind"


@pytest.mark.parametrize("frames", [0, 2, 4, 6, 80])
def test_frame_counts_other_than_4k_plus_1_are_refused_with_the_nearest(frames):
    with pytest.raises(ValueError, match=r"4k \+ 1"):
        FAMILY.check_num_frames(frames)
    for good in (1, 5, 33, 81):
        FAMILY.check_num_frames(good)
    with pytest.raises(ValueError, match="image model family"):
        get_family("flux").check_num_frames(5)


# ---------------------------------------------------------------------------------------------------------
# The real training script on clips: one expert and two, validation videos, resume
# ---------------------------------------------------------------------------------------------------------
def _clip_folder(folder, n: int = 4, frames: int = 9, size: int = SIZE + 8):
    """``n`` lossless clips of moving coloured squares (more frames and pixels than trained on), with captions."""
    import PIL.Image

    from scfm_diffusers.training.teacher_data import write_lossless_clip

    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    lines = []
    for index in range(n):
        background = (torch.rand(3, generator=generator) * 255).tolist()
        clip = []
        for t in range(frames):
            image = PIL.Image.new("RGB", (size, size), tuple(int(c) for c in background))
            image.paste((255, 40 * index, 0), (2 + 2 * t, 4, 14 + 2 * t, 16))
            clip.append(image)
        write_lossless_clip(folder / f"clip{index}.mkv", clip, fps=8, tags={})
        lines.append(json.dumps({"file_name": f"clip{index}.mkv", "text": f"a red square moving, take {index}"}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def wan_pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan")
    FAMILY.tiny_pipeline().save_pretrained(root / "wan21")
    FAMILY.tiny_pipeline(TWO_EXPERTS).save_pretrained(root / "wan22")
    return {"wan21": str(root / "wan21"), "wan22": str(root / "wan22")}


def _argv(pipeline_dir: str, output_dir, *extra: str) -> list[str]:
    from test_train_script import TINY

    return [
        "--pretrained_model_name_or_path", pipeline_dir,
        "--output_dir", str(output_dir),
        "--resolution", str(SIZE),
        "--num_frames", str(FRAMES),
        *TINY,
        "--train_batch_size", "2",
        "--num_inference_steps", "2",
        *extra,
    ]  # fmt: skip


def _stock_clips(pipeline_dir: str, adapter=None) -> torch.Tensor:
    """The stock WanPipeline's clips at the adapter's settings, with its LoRA(s) loaded the stock way."""
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    settings = SCFMInferenceSettings.from_dict(json.loads((adapter / "scfm_settings.json").read_text()))
    pipe.scheduler = FlowMatchSCFMScheduler.from_pretrained(adapter / "scheduler")
    kwargs = {"guidance_scale": settings.guidance_scale, "num_inference_steps": settings.num_inference_steps}
    base = _clip(pipe, **kwargs)
    pipe.load_lora_weights(adapter)
    for component, weight_name in settings.expert_weights.items():
        pipe.load_lora_weights(adapter, weight_name=weight_name, **{f"load_into_{component}": True})
    scale = {"scale": settings.lora_scale_for(settings.num_inference_steps)}
    return base, _clip(pipe, attention_kwargs=scale, **kwargs)


@pytest.mark.slow
def test_the_script_distills_wan_on_a_clip_folder_and_writes_validation_videos(train_script, wan_pipelines, tmp_path):
    import av

    data = _clip_folder(tmp_path / "clips")
    argv = _argv(
        wan_pipelines["wan21"], tmp_path / "out", "--train_data_dir", str(data), "--max_train_steps", "2",
        "--validation_prompt", PROMPT, "--num_validation_images", "1", "--validation_steps", "1",
        "--no_lora_scale_calibration",
    )  # fmt: skip
    out = train_script.main(train_script.parse_args(argv))
    videos = sorted((out / "validation").glob("*.mp4"))
    assert [v.name for v in videos] == ["step000001_0.mp4", "step000002_0.mp4"]
    with av.open(str(videos[-1])) as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    assert len(frames) == FRAMES and frames[0].shape == (SIZE, SIZE, 3)
    base, with_lora = _stock_clips(wan_pipelines["wan21"], out)
    assert (with_lora - base).abs().max() > 1e-4, "the adapter must change the stock pipeline's clips"
    scfm = SCFMPipeline.from_pretrained(wan_pipelines["wan21"], adapter=out)
    scfm.set_progress_bar_config(disable=True)
    torch.testing.assert_close(_clip(scfm, num_inference_steps=None), with_lora, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_the_script_distills_both_experts_of_wan22_data_free(train_script, wan_pipelines, tmp_path):
    (tmp_path / "prompts.txt").write_text("a cat walking\na dog running\n")
    argv = _argv(
        wan_pipelines["wan22"], tmp_path / "out", "--prompts_file", str(tmp_path / "prompts.txt"),
        "--teacher_num_inference_steps", "2", "--max_train_steps", "2", "--shift_min", "0.3", "--shift_max", "8",
    )  # fmt: skip
    out = train_script.main(train_script.parse_args(argv))
    assert sorted(p.name for p in (out / "cache" / "teacher_data").glob("*.mkv")) == ["000000.mkv", "000001.mkv"]
    assert (out / TRANSFORMER_2_WEIGHTS_NAME).is_file()
    from safetensors.torch import load_file

    high, low = load_file(out / "pytorch_lora_weights.safetensors"), load_file(out / TRANSFORMER_2_WEIGHTS_NAME)
    # Each file is one expert's LoRA in a lone transformer's names, as stock diffusers reads both.
    assert high.keys() == low.keys() and all(k.startswith("transformer.") and "transformer_2" not in k for k in high)
    assert any(v.abs().max() > 0 for k, v in low.items() if "lora_B" in k), "the low-noise expert's LoRA trained"
    base, with_lora = _stock_clips(wan_pipelines["wan22"], out)
    assert (with_lora - base).abs().max() > 1e-4


@pytest.mark.slow
def test_a_resumed_video_run_equals_an_uninterrupted_one(train_script, wan_pipelines, tmp_path):
    """Two experts on a clip folder: 4 steps straight == 2 steps, then --resume_from_checkpoint latest for 2 more
    (the student and both EMAs of both experts, bit for bit)."""
    from safetensors.torch import load_file

    data = _clip_folder(tmp_path / "clips", n=6)

    def run(output_dir, steps: int, *extra: str):
        argv = _argv(
            wan_pipelines["wan22"], output_dir, "--train_data_dir", str(data), "--max_train_steps", str(steps),
            "--checkpointing_steps", "2", "--fast_ema_decay", "0.5", "--slow_ema_decay", "0.9", "--seed", "3",
            "--shift_min", "0.3", "--shift_max", "8", *extra,
        )  # fmt: skip
        return train_script.main(train_script.parse_args(argv))

    straight = run(tmp_path / "straight", 4)
    run(tmp_path / "resumed", 2)
    resumed = run(tmp_path / "resumed", 4, "--resume_from_checkpoint", "latest")
    a = load_file(straight / "checkpoint-4" / "scfm_state.safetensors")
    b = load_file(resumed / "checkpoint-4" / "scfm_state.safetensors")
    assert a.keys() == b.keys()
    assert {k.split(".")[1] for k in a} == {"transformer", "transformer_2"}  # "student.transformer_2.blocks..."
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, msg=lambda m, key=key: f"{key}: {m}")
    moved = [k for k in a if k.startswith("student.") and "lora_B" in k and a[k].abs().max() > 0]
    assert {k.split(".")[1] for k in moved} == {"transformer", "transformer_2"}, "both experts must have trained"


@pytest.mark.slow
def test_two_process_ddp_trains_both_experts_on_cpu(wan_pipelines, tmp_path):
    """Two gloo processes with batch 1 each: a step whose rows use one expert on one rank and the other on the other
    (or one expert only) must not hang DDP, and both experts' LoRAs train."""
    from safetensors.torch import load_file
    from test_train_script import launch

    data = _clip_folder(tmp_path / "clips", n=4)
    out = tmp_path / "out"
    argv = _argv(
        wan_pipelines["wan22"], out, "--train_data_dir", str(data), "--max_train_steps", "3",
        "--checkpointing_steps", "3", "--shift_min", "0.3", "--shift_max", "8",
    )  # fmt: skip
    argv[argv.index("--train_batch_size") + 1] = "1"
    launch(
        ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"],
        argv,
        env={"ACCELERATE_USE_CPU": "true"},
    )
    assert {p.name for p in (out / "checkpoint-3").glob("scfm_rng_*.pt")} == {"scfm_rng_0.pt", "scfm_rng_1.pt"}
    state = load_file(out / "checkpoint-3" / "scfm_state.safetensors")
    moved = {k.split(".")[1] for k, v in state.items() if k.startswith("student.") and "lora_B" in k and v.any()}
    assert moved == {"transformer", "transformer_2"}
    base, with_lora = _stock_clips(wan_pipelines["wan22"], out)
    assert (with_lora - base).abs().max() > 1e-4


@pytest.mark.slow
def test_a_quantized_two_expert_base_quantizes_both_experts(train_script, wan_pipelines, tmp_path):
    """--quantize_base quantizes transformer AND transformer_2 (torchao int8 on CPU), and both LoRAs train on them."""
    pytest.importorskip("torchao")
    from safetensors.torch import load_file

    from scfm_diffusers.training.components import load_base_model
    from scfm_diffusers.training.quantization import is_quantized_weight

    data = _clip_folder(tmp_path / "clips", n=2)
    argv = _argv(
        wan_pipelines["wan22"], tmp_path / "out", "--train_data_dir", str(data), "--max_train_steps", "2",
        "--quantize_base", "torchao-int8", "--shift_min", "0.3", "--shift_max", "8",
    )  # fmt: skip
    args = train_script.parse_args(argv)
    from accelerate import Accelerator

    pipe, _ = load_base_model(args, Accelerator(cpu=True), torch.float32)
    for expert in (pipe.transformer, pipe.transformer_2):
        assert is_quantized_weight(expert.blocks[0].attn1.to_q.weight)
    out = train_script.main(args)
    state = load_file(out / "checkpoint-2" / "scfm_state.safetensors")
    moved = {k.split(".")[1] for k, v in state.items() if k.startswith("student.") and "lora_B" in k and v.any()}
    assert moved == {"transformer", "transformer_2"}
