"""benchmarks/scaling_estimates.py and benchmarks/gpu_train_step.py: meta-device counts against the published
sizes and against peft, the memory model's orderings, the step-time formula against the objective's own passes,
and both command lines (the GPU benchmark in its --tiny CPU mode)."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_train_step  # noqa: E402
import scaling_estimates as se  # noqa: E402

from scfm_diffusers.families import FAMILIES, get_family  # noqa: E402
from scfm_diffusers.training.objective import scfm_loss  # noqa: E402
from scfm_diffusers.training.timesteps import GridSamplerConfig, sample_grid_steps  # noqa: E402

#: Published transformer sizes (billions), written here independently of the configs in scaling_estimates.MODELS:
#: model cards and docs/families.md. Wan 2.1 "1.3B" holds 1.42B parameters (its fp32 checkpoint is 5.68 GB).
PUBLISHED_B = {
    "flux_dev": 11.9,
    "sd35_large": 8.1,
    "qwen_image": 20.4,
    "flux2_dev": 32.0,
    "flux2_klein_4b": 3.9,
    "flux2_klein_9b": 9.1,
    "z_image": 6.2,
    "chroma": 8.9,
    "wan21_1.3b": 1.42,
    "wan21_14b": 14.0,
    "wan22_a14b": 14.0,  # per expert
}
SMALL = se.Resolution(256, 256)  # 256 image tokens: the meta forward of a big model in ~0.1 s


def test_every_model_has_a_published_size():
    assert set(PUBLISHED_B) == set(se.MODELS)


@pytest.mark.parametrize("name", list(PUBLISHED_B))
def test_meta_parameter_count_matches_the_published_size(name):
    spec = se.MODELS[name]
    count = se.parameter_count(se.build_meta(spec)) / 1e9
    assert count == pytest.approx(PUBLISHED_B[name], rel=0.03), f"{spec.title}: {count:.3f}B"


@pytest.mark.parametrize("family_name", [name for name in FAMILIES if get_family(name).available])
def test_lora_count_equals_what_peft_adds(family_name):
    family = get_family(family_name)
    transformer = family.tiny_pipeline().transformer
    targets = family.lora_target_modules(transformer)
    before = sum(p.numel() for p in transformer.parameters())
    expected = se.lora_parameter_count(transformer, targets, rank=4)
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets))
    added = sum(p.numel() for p in transformer.parameters()) - before
    assert expected == added > 0


def test_lora_count_covers_convolutions():
    """SD3's patch embedding is a Conv2d target: peft's conv LoRA is A (r, in, k, k) and B (out, r, 1, 1)."""
    conv = torch.nn.Sequential()
    conv.add_module("proj", torch.nn.Conv2d(3, 8, kernel_size=2, stride=2))
    assert se.lora_parameter_count(conv, ["proj"], rank=4) == 4 * 3 * 2 * 2 + 8 * 4


def estimate(name: str, resolution: se.Resolution = SMALL, **settings) -> dict:
    return se.estimate(se.MODELS[name], resolution, se.Settings(**settings))


def test_memory_falls_with_the_fsdp_degree_and_a_quantized_base():
    for checkpointing in (False, True):
        memory = estimate("flux_dev", gradient_checkpointing=checkpointing)["memory_gib"]
        totals = [memory[s]["total"] for s in ("ddp", "fsdp2_2", "fsdp2_4", "fsdp2_8")]
        assert totals == sorted(totals, reverse=True) and len(set(totals)) == 4
        assert memory["nf4"]["total"] < memory["int8"]["total"] < memory["ddp"]["total"]
        # 23.8 GB of bf16 weights; nf4 stores the linear weights in 4.5 bits.
        assert memory["1gpu"]["weights"] == pytest.approx(2 * 11.9e9 / se.GiB, rel=0.01)
        assert memory["nf4"]["weights"] < 0.35 * memory["1gpu"]["weights"]


def test_activations_scale_with_batch_cfg_and_checkpointing():
    plain = estimate("flux2_klein_4b")["memory_gib"]["1gpu"]["activations"]
    assert estimate("flux2_klein_4b", batch_size=2)["memory_gib"]["1gpu"]["activations"] == pytest.approx(2 * plain)
    assert estimate("flux2_klein_4b", gradient_checkpointing=True)["memory_gib"]["1gpu"]["activations"] < plain / 3
    no_cfg = se.MODELS["flux2_klein_4b"]
    profile = se.forward_profile(no_cfg, SMALL, se.Settings())
    assert plain * se.GiB == pytest.approx(2 * profile.saved_bytes)  # a CFG family: both halves in one batch


def test_wan22_holds_two_experts_but_runs_one():
    video = se.Resolution(128, 128, 5)
    one, two = estimate("wan21_14b", video), estimate("wan22_a14b", video)
    assert two["params"] == 2 * one["params"] and two["lora_params"] == 2 * one["lora_params"]
    assert two["step_s_per_sample"] == one["step_s_per_sample"]
    assert two["memory_gib"]["1gpu"]["activations"] == one["memory_gib"]["1gpu"]["activations"]
    assert two["memory_gib"]["1gpu"]["weights"] == pytest.approx(2 * one["memory_gib"]["1gpu"]["weights"])


def test_attention_flops_of_the_meta_forward_are_the_closed_form():
    """Flux at 256²: 256 image + 256 text tokens in 19 + 38 blocks of 24 heads of 128: 4·L²·d per block."""
    profile = se.forward_profile(se.MODELS["flux_dev"], SMALL, se.Settings())
    assert profile.attention_flops == 4 * (256 + 256) ** 2 * 3072 * 57
    assert profile.num_blocks == 57
    assert 0 < profile.checkpointed_bytes < profile.saved_bytes


def test_target_passes_are_the_objectives():
    """Count the rows each velocity callable of scfm_loss sees: two target passes per SCFM row, whatever the
    teacher share, none for flow-matching rows; the student sees every row once."""
    config = GridSamplerConfig(teacher_ratio=0.4, flow_matching_ratio=0.25, dynamic_shift_prob=0.0)
    steps = sample_grid_steps(400, config, generator=torch.Generator().manual_seed(0))
    seen = {"student": 0, "teacher": 0, "fast": 0, "slow": 0}

    def counting(name):
        def velocity(x, sigma, rows):
            seen[name] += len(rows)
            return torch.zeros_like(x)

        return velocity

    x0 = torch.randn(400, 4)
    scfm_loss(**{n if n in ("student", "teacher") else f"{n}_ema": counting(n) for n in seen}, x0=x0,
              noise=torch.randn_like(x0), steps=steps)  # fmt: skip
    scfm_rows = int((~steps.is_flow_matching).sum())
    assert seen["teacher"] + seen["fast"] + seen["slow"] == 2 * scfm_rows
    assert seen["student"] == 400
    assert se.target_passes(0.25) * 400 == pytest.approx(2 * 400 * 0.75)


def test_step_flops_formula():
    profile = se.ForwardProfile(100, 20, 0, 0, 1, 1, 1)
    settings = se.Settings()
    # 2 target passes + 1 student forward, each 120; backward 100·1 + 20·2.5 = 150.
    assert se.step_flops(profile, cfg=False, settings=settings, checkpointing=False) == 3 * 120 + 150
    assert se.step_flops(profile, cfg=False, settings=settings, checkpointing=True) == 4 * 120 + 150
    assert se.step_flops(profile, cfg=True, settings=settings, checkpointing=False) == 2 * (3 * 120 + 150)
    half_fm = dataclasses.replace(settings, flow_matching_ratio=0.5)
    assert se.step_flops(profile, cfg=False, settings=half_fm, checkpointing=False) == 2 * 120 + 150


def test_cli_prints_a_markdown_table(capsys):
    rows = se.main(["--models", "flux2_klein_4b", "--gradient_checkpointing", "--markdown", "--json", "-"])
    out = capsys.readouterr().out
    assert "| FLUX.2 [klein] 4B | 1024x1024 | 4096+256 | 3.88B |" in out
    assert "| model | resolution | tokens | params | LoRA r=32 | DDP GiB | FSDP2×2 GiB" in out
    assert rows[0]["fits_80gb"] == "DDP" and rows[0]["gradient_checkpointing"]
    assert json.loads(out[out.index("{") :])["rows"][0]["model"] == "flux2_klein_4b"


def test_gpu_benchmark_runs_tiny_on_cpu(tmp_path):
    families = ["flux", "sd3"] + (["wan"] if "wan" in FAMILIES else [])
    gpu_train_step.main(["--tiny", "--families", *families, "--steps", "1", "--out", str(tmp_path)])
    records = [json.loads(line) for line in (tmp_path / "gpu_train_step.jsonl").read_text().splitlines()]
    assert [(r["model"], r["gradient_checkpointing"]) for r in records] == [
        (f, c) for f in families for c in (True, False)
    ]
    for record in records:
        assert record["status"] == "ok" and record["median_step_s"] > 0, record


def test_gpu_benchmark_real_size_path_on_cpu(tmp_path, monkeypatch):
    """The non-tiny path (a transformer built from a MODELS config, text and latents of the spec's shapes, the
    estimate and the MFU beside the measurement) on CPU, with FLUX.1's and Wan's structure at toy widths."""
    flux = dataclasses.replace(
        se.MODELS["flux_dev"],
        name="flux_toy",
        config={**se.FLUX1_DEV, "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16,
                "num_attention_heads": 2, "joint_attention_dim": 32, "pooled_projection_dim": 32,
                "axes_dims_rope": [4, 4, 8]},
        text_dim=32,
        pooled_dim=32,
    )  # fmt: skip
    wan = dataclasses.replace(
        se.MODELS["wan21_1.3b"],
        name="wan_toy",
        config={**se.WAN_14B, "num_layers": 1, "num_attention_heads": 2, "ffn_dim": 64, "text_dim": 32,
                "freq_dim": 32, "rope_max_seq_len": 32},
        text_dim=32,
    )  # fmt: skip
    toys = [flux] + ([wan] if "wan" in FAMILIES else [])
    for toy in toys:
        monkeypatch.setitem(se.MODELS, toy.name, toy)
    argv = ["--families", *(t.name for t in toys), "--device", "cpu", "--height", "64", "--width", "64"]
    gpu_train_step.main([*argv, "--frames", "5", "--text_tokens", "8", "--steps", "1", "--out", str(tmp_path)])
    records = [json.loads(line) for line in (tmp_path / "gpu_train_step.jsonl").read_text().splitlines()]
    assert len(records) == 2 * len(toys)
    for record in records:
        assert record["status"] == "ok", record
        assert record["estimate"]["memory_gib"]["weights"] > 0 and record["achieved_tflops"] > 0
    assert [r["resolution"] for r in records[::2]] == ["64x64", "64x64x5f"][: len(toys)]
