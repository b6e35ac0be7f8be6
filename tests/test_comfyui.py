"""ComfyUI: alpha folded so that every loader agrees, the exported file against ComfyUI's key map and LoRA math,
ComfyUI's σ schedule against the SCFM grid, and the ``scfm-export-comfyui`` command.

ComfyUI itself is not installed: the parts of it these tests need are re-expressed below from its source
(comfyanonymous/ComfyUI), each citing the file and function it follows.
"""

import doctest
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import generate
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from peft import LoraConfig
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import scfm_diffusers.comfyui as comfyui
from scfm_diffusers import FlowMatchSCFMScheduler, SCFMInferenceSettings, save_adapter
from scfm_diffusers.adapter import SETTINGS_NAME, WEIGHTS_NAME
from scfm_diffusers.comfyui import comfyui_lora_state_dict, comfyui_sampling, export_comfyui_lora, main
from scfm_diffusers.families import family_of_transformer, get_family
from scfm_diffusers.sigmas import resolution_mu

STOCK = {"flux": FluxPipeline, "sd3": StableDiffusion3Pipeline}
REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------------
# ComfyUI, re-expressed
# ---------------------------------------------------------------------------------------------------------
def comfyui_flux_modules(depth: int, depth_single: int) -> list[str]:
    """The diffusers names of the ``.weight`` keys of comfy/utils.py ``flux_to_diffusers`` (its key_map's keys)."""
    names = []
    for i in range(depth):
        block = f"transformer_blocks.{i}"
        names += [f"{block}.attn.{p}" for p in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")]
        names += [
            f"{block}.{k}"
            for k in (  # block_map
                "attn.to_out.0", "norm1.linear", "norm1_context.linear", "attn.to_add_out", "ff.net.0.proj",
                "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "ff.linear_in", "ff.linear_out",
                "ff_context.linear_in", "ff_context.linear_out", "attn.norm_q", "attn.norm_k", "attn.norm_added_q",
                "attn.norm_added_k",
            )
        ]  # fmt: skip
    for i in range(depth_single):
        block = f"single_transformer_blocks.{i}"
        names += [f"{block}.attn.to_q", f"{block}.attn.to_k", f"{block}.attn.to_v", f"{block}.proj_mlp"]
        names += [
            f"{block}.{k}"
            for k in ("norm.linear", "proj_out", "attn.norm_q", "attn.norm_k", "attn.to_qkv_mlp_proj", "attn.to_out")
        ]
    return names + [  # MAP_BASIC
        "proj_out", "x_embedder", "context_embedder", "norm_out.linear", "controlnet_x_embedder",
        "time_text_embed.timestep_embedder.linear_1", "time_text_embed.timestep_embedder.linear_2",
        "time_text_embed.text_embedder.linear_1", "time_text_embed.text_embedder.linear_2",
        "time_text_embed.guidance_embedder.linear_1", "time_text_embed.guidance_embedder.linear_2",
    ]  # fmt: skip


def comfyui_sd3_modules(depth: int) -> list[str]:
    """The diffusers names of the ``.weight`` keys of comfy/utils.py ``mmdit_to_diffusers``."""
    names = []
    for i in range(depth):
        block = f"transformer_blocks.{i}"
        names += [f"{block}.attn.{p}" for p in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")]
        names += [f"{block}.attn2.{p}" for p in ("to_q", "to_k", "to_v")]
        names += [
            f"{block}.{k}"
            for k in (  # MMDIT_MAP_BLOCK
                "norm1_context.linear", "attn.to_add_out", "ff_context.net.0.proj", "ff_context.net.2",
                "attn.norm_added_q", "attn.norm_added_k", "norm1.linear", "attn.to_out.0", "attn.norm_q",
                "attn.norm_k", "attn2.to_out.0", "attn2.norm_q", "attn2.norm_k", "ff.net.0.proj", "ff.net.2",
            )
        ]  # fmt: skip
    return names + [  # MMDIT_MAP_BASIC
        "context_embedder", "pos_embed.proj", "norm_out.linear", "proj_out",
        "time_text_embed.timestep_embedder.linear_1", "time_text_embed.timestep_embedder.linear_2",
        "time_text_embed.text_embedder.linear_1", "time_text_embed.text_embedder.linear_2",
    ]  # fmt: skip


def comfyui_key_map(transformer) -> dict[str, str]:
    """comfy/lora.py ``model_lora_keys_unet``, diffusers-LoRA part: ``"transformer.<k>"`` -> the weight it patches.

    ComfyUI's targets are its own (BFL / MMDiT) weights, q/k/v as slices of the fused qkv and ``norm_out`` with
    scale and shift swapped; those are re-layouts of the same diffusers weight, so the map here points at the
    diffusers module itself.
    """
    if isinstance(transformer, get_family("flux").transformer_class):
        modules = comfyui_flux_modules(transformer.config.num_layers, transformer.config.num_single_layers)
    else:
        modules = comfyui_sd3_modules(transformer.config.num_layers)
    return {f"transformer.{module}": module for module in modules}


def comfyui_convert_lora_is_identity(lora: dict) -> bool:
    """comfy/lora_convert.py ``convert_lora``: none of its special formats is detected."""
    return not (
        ("img_in.lora_A.weight" in lora and "single_blocks.0.norm.key_norm.scale" in lora)
        or "lora_unet__blocks_0_cross_attn_k.lora_down.weight" in lora
        or "single_blocks.37.processor.qkv_lora.up.weight" in lora
        or any(key.startswith("t_embedder.") for key in lora)
    )


def comfyui_load_lora(lora: dict, key_map: dict[str, str]) -> tuple[dict, set]:
    """comfy/lora.py ``load_lora`` with comfy/weight_adapter/lora.py ``LoRAAdapter.load`` (its diffusers branch:
    up = ``{x}.lora_B.weight``, down = ``{x}.lora_A.weight``, alpha = ``{x}.alpha``.item() if present).

    Returns:
        ``{target: (up, down, alpha)}`` and the keys of ``lora`` it did not load ("lora key not loaded").
    """
    patches, loaded = {}, set()
    for x, target in key_map.items():
        alpha = lora[f"{x}.alpha"].item() if f"{x}.alpha" in lora else None
        if f"{x}.alpha" in lora:
            loaded.add(f"{x}.alpha")
        if f"{x}.lora_B.weight" in lora:
            patches[target] = (lora[f"{x}.lora_B.weight"], lora[f"{x}.lora_A.weight"], alpha)
            loaded |= {f"{x}.lora_B.weight", f"{x}.lora_A.weight"}
    return patches, set(lora) - loaded


def comfyui_lora_diff(up, down, alpha, shape, strength=1.0) -> torch.Tensor:
    """comfy/weight_adapter/lora.py ``LoRAAdapter.calculate_weight``: ``strength·(alpha / rank)·up @ down``."""
    scale = alpha / down.shape[0] if alpha is not None else 1.0
    return (strength * scale) * torch.mm(up.float().flatten(start_dim=1), down.float().flatten(start_dim=1)).reshape(
        shape
    )


def comfyui_patch(transformer, lora: dict, strength=1.0) -> None:
    """Apply a LoRA file to a (LoRA-free) diffusers transformer the way ComfyUI patches its weights."""
    patches, not_loaded = comfyui_load_lora(lora, comfyui_key_map(transformer))
    assert not not_loaded, f"ComfyUI would warn 'lora key not loaded' for {sorted(not_loaded)[:5]}"
    modules = dict(transformer.named_modules())
    with torch.no_grad():
        for name, (up, down, alpha) in patches.items():
            weight = modules[name].weight
            weight += comfyui_lora_diff(up, down, alpha, weight.shape, strength).to(weight.dtype)


def time_snr_shift(alpha, t):
    """comfy/model_sampling.py ``time_snr_shift``."""
    if alpha == 1.0:
        return t
    return alpha * t / (1 + (alpha - 1) * t)


def flux_time_shift(mu, sigma, t):
    """comfy/model_sampling.py ``flux_time_shift``."""
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)


class ModelSamplingDiscreteFlow:
    """comfy/model_sampling.py ``ModelSamplingDiscreteFlow`` (``set_parameters``: a 1000-entry σ table)."""

    def __init__(self, shift=1.0, timesteps=1000, multiplier=1000):
        self.shift, self.multiplier = shift, multiplier
        self.sigmas = self.sigma((torch.arange(1, timesteps + 1, 1) / timesteps) * multiplier)

    def timestep(self, sigma):
        return sigma * self.multiplier

    def sigma(self, timestep):
        return time_snr_shift(self.shift, timestep / self.multiplier)


class ModelSamplingFlux:
    """comfy/model_sampling.py ``ModelSamplingFlux`` (``set_parameters``: a 10000-entry σ table)."""

    def __init__(self, shift=1.15, timesteps=10000):
        self.shift = shift
        self.sigmas = self.sigma(torch.arange(1, timesteps + 1, 1) / timesteps)

    def timestep(self, sigma):
        return sigma

    def sigma(self, timestep):
        return flux_time_shift(self.shift, 1.0, timestep)


def model_sampling_node(name: str, inputs: dict):
    """The model_sampling object a comfy_extras/nodes_model_advanced.py node patches in."""
    if name == "ModelSamplingSD3":  # ModelSamplingSD3.patch(shift, multiplier=1000)
        return ModelSamplingDiscreteFlow(shift=inputs["shift"], multiplier=1000)
    if name == "ModelSamplingAuraFlow":  # ModelSamplingAuraFlow.patch_aura: multiplier=1.0
        return ModelSamplingDiscreteFlow(shift=inputs["shift"], multiplier=1.0)
    if name == "ModelSamplingFlux":  # ModelSamplingFlux.patch: μ linear in the packed token count
        x1, x2 = 256, 4096
        mm = (inputs["max_shift"] - inputs["base_shift"]) / (x2 - x1)
        b = inputs["base_shift"] - mm * x1
        return ModelSamplingFlux(shift=(inputs["width"] * inputs["height"] / (8 * 8 * 2 * 2)) * mm + b)
    raise ValueError(name)


def simple_scheduler(model_sampling, steps):
    """comfy/samplers.py ``simple_scheduler``: every len/steps-th entry of the σ table, from the top, then 0."""
    s = model_sampling
    sigs = []
    ss = len(s.sigmas) / steps
    for x in range(steps):
        sigs += [float(s.sigmas[-(1 + int(x * ss))])]
    sigs += [0.0]
    return torch.FloatTensor(sigs)


def normal_scheduler(model_sampling, steps, sgm=False):
    """comfy/samplers.py ``normal_scheduler`` (``sgm=True``: the ``sgm_uniform`` scheduler)."""
    s = model_sampling
    start = s.timestep(s.sigmas[-1])
    end = s.timestep(s.sigmas[0])
    append_zero = True
    if sgm:
        timesteps = torch.linspace(start, end, steps + 1)[:-1]
    else:
        if math.isclose(float(s.sigma(end)), 0, abs_tol=0.00001):
            steps += 1
            append_zero = False
        timesteps = torch.linspace(start, end, steps)
    sigs = [float(s.sigma(ts)) for ts in timesteps]
    if append_zero:
        sigs += [0.0]
    return torch.FloatTensor(sigs)


# ---------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------
def add_lora(transformer, *, rank=4, alpha=8, use_rslora=False, seed=0):
    """A 'trained' LoRA (non-zero B) on every SCFM target of the family that the transformer has."""
    targets = family_of_transformer(transformer).lora_target_modules(transformer)
    config = LoraConfig(
        r=rank, lora_alpha=alpha, use_rslora=use_rslora, init_lora_weights="gaussian", target_modules=targets
    )
    transformer.add_adapter(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # seeded A as well: peft's gaussian init draws from the global generator
        for name, param in transformer.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * (1 / rank if "lora_A" in name else 0.05))
    return transformer


def trained_adapter(family, saved_pipelines, tmp_path, *, rank=4, alpha=8, use_rslora=False, **settings):
    """A stock pipeline with a trained LoRA and the adapter folder save_adapter wrote from it."""
    pipe = STOCK[family].from_pretrained(saved_pipelines[family])
    add_lora(pipe.transformer, rank=rank, alpha=alpha, use_rslora=use_rslora)
    settings = SCFMInferenceSettings.for_family(family, **{"num_inference_steps": 3, **settings})
    folder = save_adapter(tmp_path / "adapter", pipe.transformer, settings)
    pipe.scheduler = settings.make_scheduler(pipe.scheduler.config)
    return pipe, folder, settings


def lora_kwargs(family, scale):
    return {get_family(family).lora_scale_kwarg: {"scale": scale}}


def fresh(family, saved_pipelines, settings):
    pipe = STOCK[family].from_pretrained(saved_pipelines[family])
    pipe.scheduler = settings.make_scheduler(pipe.scheduler.config)
    return pipe


# ---------------------------------------------------------------------------------------------------------
# 1. Alpha: stock diffusers rejects `.alpha` tensors next to the metadata, so save_adapter folds alpha / r
# ---------------------------------------------------------------------------------------------------------
def test_stock_loaders_reject_alpha_tensors_in_an_adapter_file(family, saved_pipelines, tmp_path):
    """Why alpha is folded into lora_B rather than stored as `.alpha` tensors (ComfyUI's way): diffusers'
    Flux loader pops them into `network_alphas` and then refuses them next to the LoRA metadata; its SD3 loader
    refuses any key without "lora" in it. Should diffusers ever accept them, this test says so."""
    _, folder, _ = trained_adapter(family, saved_pipelines, tmp_path)
    path = folder / WEIGHTS_NAME
    with safe_open(path, framework="pt") as weights:
        metadata = weights.metadata()
    tensors = load_file(path)
    alphas = {
        k.replace(".lora_A.weight", ".alpha"): torch.tensor(4.0) for k in tensors if k.endswith(".lora_A.weight")
    }
    save_file({**tensors, **alphas}, path, metadata=metadata)
    expected = {"flux": "Both `network_alphas` and `metadata` cannot be specified", "sd3": "Invalid LoRA checkpoint"}
    with pytest.raises(ValueError, match=expected[family]):
        STOCK[family].from_pretrained(saved_pipelines[family]).load_lora_weights(folder)


@pytest.mark.parametrize(
    ("rank", "alpha", "use_rslora", "exact"),
    [(4, 8, False, True), (4, 8, True, True), (4, 5, False, False)],  # alpha / r (/ sqrt r): 2, 4, 1.25
)
def test_saved_adapter_folds_alpha_so_every_loader_agrees(
    family, saved_pipelines, tmp_path, rank, alpha, use_rslora, exact
):
    trained, folder, settings = trained_adapter(
        family, saved_pipelines, tmp_path, rank=rank, alpha=alpha, use_rslora=use_rslora
    )
    expected = generate(trained, num_inference_steps=3)
    scale = alpha / (math.sqrt(rank) if use_rslora else rank)
    # The file: lora_B carries alpha / r, the metadata says alpha = r.
    with safe_open(folder / WEIGHTS_NAME, framework="pt") as weights:
        config = json.loads(weights.metadata()["lora_adapter_metadata"])
    assert config["transformer.lora_alpha"] == config["transformer.r"] == rank
    assert not config["transformer.use_rslora"] and config["transformer.alpha_pattern"] == {}
    stored = load_file(folder / WEIGHTS_NAME)
    layer = trained.transformer.transformer_blocks[0].attn.to_q
    torch.testing.assert_close(
        stored["transformer.transformer_blocks.0.attn.to_q.lora_B.weight"],
        (layer.lora_B["default"].weight.double() * scale).float(),
        rtol=0,
        atol=0,
    )
    # diffusers with the metadata (the folder), and without it (a dict: diffusers then assumes alpha = r).
    # Bit-exact when alpha / r is a power of two, else up to one rounding of lora_B.
    for source in (folder, load_file(folder / WEIGHTS_NAME)):
        stock = fresh(family, saved_pipelines, settings)
        stock.load_lora_weights(source)
        output = generate(stock, num_inference_steps=3)
        if exact:  # diffusers 0.40 (the floor) rounds the loaded LoRA differently: 2e-7; 0.42 is bit-exact
            torch.testing.assert_close(output, expected, rtol=0, atol=1e-6)
        else:
            torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-5)
    # ComfyUI: the adapter file as it is, in ComfyUI's key map, at strength 1.
    patched = fresh(family, saved_pipelines, settings)
    comfyui_patch(patched.transformer, load_file(folder / WEIGHTS_NAME))
    torch.testing.assert_close(generate(patched, num_inference_steps=3), expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# 2. The exported file: ComfyUI's keys and ComfyUI's ΔW at the calibrated scale
# ---------------------------------------------------------------------------------------------------------
def test_exported_keys_are_the_ones_comfyui_loads(family, saved_pipelines, tmp_path):
    trained, folder, _ = trained_adapter(family, saved_pipelines, tmp_path)
    path = export_comfyui_lora(folder, tmp_path / "comfy.safetensors")
    lora = load_file(path)
    assert comfyui_convert_lora_is_identity(lora)
    key_map = comfyui_key_map(trained.transformer)
    patches, not_loaded = comfyui_load_lora(lora, key_map)
    assert not not_loaded  # every key (lora_A, lora_B, alpha) is consumed: no "lora key not loaded" warning
    lora_modules = {name for name, module in trained.transformer.named_modules() if hasattr(module, "lora_A")}
    assert set(patches) == lora_modules  # every LoRA layer of the adapter, and nothing else
    for _, down, alpha in patches.values():
        assert alpha == down.shape[0]  # alpha = rank: ComfyUI's alpha / rank is 1
    # The diffusers modules ComfyUI names must exist in the diffusers transformer (the map is not stale).
    existing = dict(trained.transformer.named_modules())
    assert all(module in existing for module in patches)


@pytest.mark.parametrize("steps", [3, 4])
def test_exported_file_is_the_adapter_at_its_calibrated_scale(family, saved_pipelines, tmp_path, steps):
    """ΔW per layer (ComfyUI's formula on the exported file, strength 1) = the adapter fused in diffusers at
    lora_scale_for(steps); and ComfyUI-patched weights sample like the adapter at that scale."""
    trained, folder, settings = trained_adapter(family, saved_pipelines, tmp_path, lora_scales={3: 1.5})
    scale = settings.lora_scale_for(steps)
    assert scale == {3: 1.5, 4: 1.0}[steps]  # 4 steps: not calibrated, the default lora_scale
    lora = load_file(export_comfyui_lora(folder, tmp_path / "comfy.safetensors", steps))

    reference = fresh(family, saved_pipelines, settings)
    reference.load_lora_weights(folder)
    expected = generate(reference, num_inference_steps=steps, **lora_kwargs(family, scale))
    base = {name: p.detach().clone() for name, p in reference.transformer.named_parameters() if "lora" not in name}
    reference.fuse_lora(lora_scale=scale)
    fused = {name: p.detach() for name, p in reference.transformer.named_parameters() if "lora" not in name}
    patches, _ = comfyui_load_lora(lora, comfyui_key_map(reference.transformer))
    for module, (up, down, alpha) in patches.items():
        name = f"{module}.base_layer.weight"
        delta = comfyui_lora_diff(up, down, alpha, fused[name].shape)
        torch.testing.assert_close(delta, fused[name] - base[name], rtol=1e-4, atol=1e-6)

    patched = fresh(family, saved_pipelines, settings)
    plain = generate(patched, num_inference_steps=steps)
    comfyui_patch(patched.transformer, lora)
    torch.testing.assert_close(generate(patched, num_inference_steps=steps), expected, rtol=1e-5, atol=1e-5)
    assert (expected - plain).abs().max() > 1e-3  # the LoRA matters at this scale


def test_stock_flux_loader_also_reads_the_exported_file(saved_pipelines, tmp_path):
    """The exported Flux file also loads in diffusers (its `.alpha` tensors become network alphas = rank);
    diffusers' SD3 loader refuses `.alpha` keys, so the SD3 file is for ComfyUI only."""
    _, folder, settings = trained_adapter("flux", saved_pipelines, tmp_path, lora_scales={3: 1.5})
    reference = fresh("flux", saved_pipelines, settings)
    reference.load_lora_weights(folder)
    expected = generate(reference, num_inference_steps=3, joint_attention_kwargs={"scale": 1.5})
    stock = fresh("flux", saved_pipelines, settings)
    stock.load_lora_weights(str(export_comfyui_lora(folder, tmp_path / "comfy.safetensors")))
    torch.testing.assert_close(generate(stock, num_inference_steps=3), expected, rtol=1e-5, atol=1e-5)


def test_exported_metadata_records_the_settings(family, saved_pipelines, tmp_path):
    _, folder, settings = trained_adapter(
        family, saved_pipelines, tmp_path, lora_scales={3: 1.5, 8: 1.2}, base_model="org/base"
    )
    for steps, scale in ((None, 1.5), (8, 1.2), (5, settings.lora_scale)):
        path = export_comfyui_lora(folder, tmp_path / f"comfy-{steps}.safetensors", steps)
        with safe_open(path, framework="pt") as weights:
            metadata = {key: json.loads(value) for key, value in weights.metadata().items() if key.startswith("scfm.")}
        n = steps or 3  # None: the adapter's own step count
        assert metadata["scfm.num_inference_steps"] == metadata["scfm.comfyui.steps"] == n
        assert metadata["scfm.lora_scale"] == scale and metadata["scfm.comfyui.lora_strength"] == 1.0
        assert metadata["scfm.family"] == family and metadata["scfm.base_model"] == "org/base"
        assert metadata["scfm.shift"] == settings.shift and metadata["scfm.guidance_scale"] == settings.guidance_scale
        assert metadata["scfm.adapter"] is None  # a local path is not recorded
        assert metadata["scfm.comfyui.sampler_name"] == "euler" and metadata["scfm.comfyui.scheduler"] == "simple"
        sampling = comfyui_sampling(settings, n)
        assert metadata["scfm.comfyui.model_sampling"] == sampling.model_sampling
        assert metadata["scfm.comfyui.model_sampling_inputs"] == sampling.model_sampling_inputs
        assert metadata["scfm.comfyui.cfg"] == {"flux": 1.0, "sd3": settings.guidance_scale}[family]
        assert metadata["scfm.comfyui.flux_guidance"] == {"flux": settings.guidance_scale, "sd3": None}[family]


def test_export_errors_name_the_path_and_the_fix(saved_pipelines, tmp_path):
    out = tmp_path / "out.safetensors"
    with pytest.raises(FileNotFoundError, match="'.*missing' does not exist.*save_adapter"):
        export_comfyui_lora(tmp_path / "missing", out)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(
        FileNotFoundError, match=f"{re.escape(repr(str(empty)))} holds no {WEIGHTS_NAME}.*save_adapter"
    ):
        export_comfyui_lora(empty, out)
    _, folder, _ = trained_adapter("flux", saved_pipelines, tmp_path)
    with pytest.raises(ValueError, match="must be a .safetensors file"):
        export_comfyui_lora(folder, tmp_path / "out.ckpt")
    with pytest.raises(ValueError, match="num_inference_steps must be an int >= 1"):
        export_comfyui_lora(folder, out, 0)
    (folder / SETTINGS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=f"no {SETTINGS_NAME}.*save_adapter"):
        export_comfyui_lora(folder, out)
    with pytest.raises(OSError, match="Could not read pytorch_lora_weights.safetensors of the Hub repository"):
        export_comfyui_lora("org/flux-scfm", out)  # conftest: HF_HUB_OFFLINE=1
    assert not out.exists()


def test_comfyui_state_dict_rejects_what_comfyui_would_drop():
    a, b = torch.zeros(2, 3), torch.zeros(3, 2)
    with pytest.raises(ValueError, match="Only transformer LoRA weights"):
        comfyui_lora_state_dict({"text_encoder.x.lora_A.weight": a, "text_encoder.x.lora_B.weight": b})
    with pytest.raises(ValueError, match="Only transformer LoRA weights"):
        comfyui_lora_state_dict({"transformer.x.lora_B.bias": torch.zeros(3)})
    with pytest.raises(ValueError, match="only one of lora_A / lora_B"):
        comfyui_lora_state_dict({"transformer.x.lora_A.weight": a})
    # alpha_pattern and rsLoRA are honoured per module.
    sd = {"transformer.x.lora_A.weight": a, "transformer.x.lora_B.weight": torch.ones(3, 2)}
    sd |= {"transformer.y.lora_A.weight": a, "transformer.y.lora_B.weight": torch.ones(3, 2)}
    out = comfyui_lora_state_dict(sd, {"lora_alpha": 4, "alpha_pattern": {"y": 8}, "use_rslora": True}, scale=0.5)
    assert out["transformer.x.lora_B.weight"][0, 0] == 0.5 * 4 / math.sqrt(2)
    assert out["transformer.y.lora_B.weight"][0, 0] == 0.5 * 8 / math.sqrt(2)
    assert out["transformer.x.alpha"].item() == 2.0


# ---------------------------------------------------------------------------------------------------------
# 3. The σ schedule: ComfyUI's nodes + "simple" scheduler against FlowMatchSCFMScheduler
# ---------------------------------------------------------------------------------------------------------
#: max |σ_ComfyUI − σ_SCFM| of the recommended settings; docs/comfyui.md quotes these numbers. 1e-5 is the
#: clamp of the first σ (1 − 1e-5); 3 steps do not divide the σ table, whose index ComfyUI truncates; for Flux
#: the shift widget's two decimals (μ = 1.18 for ln 3.25 = 1.1787) add ~3.4e-4.
DOCUMENTED_MAX_DIFF = {
    ("flux", 3): 3.88e-4,
    ("flux", 4): 3.36e-4,
    ("flux", 8): 3.36e-4,
    ("sd3", 3): 7.19e-4,
    ("sd3", 4): 1.0e-5,
    ("sd3", 8): 1.0e-5,
}


def comfyui_sigmas(sampling) -> torch.Tensor:
    return simple_scheduler(
        model_sampling_node(sampling.model_sampling, sampling.model_sampling_inputs), sampling.steps
    )


@pytest.mark.parametrize("steps", [3, 4, 8])
def test_comfyui_schedule_matches_the_scfm_grid(family, steps):
    settings = SCFMInferenceSettings.for_family(family)  # Flux: shift 3.25, SD3: shift 3.0
    sampling = comfyui_sampling(settings, steps)
    assert (sampling.sampler_name, sampling.scheduler) == ("euler", "simple")
    scfm = FlowMatchSCFMScheduler(shift=settings.shift)
    scfm.set_timesteps(steps)
    comfy = comfyui_sigmas(sampling)
    assert comfy.shape == scfm.sigmas.shape and comfy[-1] == 0 and abs(comfy[0] - 1) < 1e-6  # ComfyUI: σ0 = 1
    diff = (comfy.double() - scfm.sigmas.double()).abs().max().item()
    assert diff == pytest.approx(DOCUMENTED_MAX_DIFF[family, steps], rel=0.01, abs=2e-7)


def test_aura_flow_node_gives_flux_the_exact_shift():
    """The alternative docs/comfyui.md names for Flux: ModelSamplingAuraFlow (σ fed to the model as is, like
    ModelSamplingFlux; ComfyUI's own FLUX.1-schnell config) takes the shift itself, 3.25."""
    for steps, documented in ((3, 7.07e-4), (4, 1.0e-5), (8, 1.0e-5)):
        scfm = FlowMatchSCFMScheduler(shift=3.25)
        scfm.set_timesteps(steps)
        comfy = simple_scheduler(model_sampling_node("ModelSamplingAuraFlow", {"shift": 3.25}), steps)
        diff = (comfy.double() - scfm.sigmas.double()).abs().max().item()
        assert diff == pytest.approx(documented, rel=0.01, abs=2e-7)


def test_dynamic_shift_flux_adapter_maps_to_stock_model_sampling_flux():
    settings = SCFMInferenceSettings.for_family("flux", use_dynamic_shifting=True)
    sampling = comfyui_sampling(settings, 4, width=1024, height=1024)
    assert sampling.model_sampling_inputs == {"max_shift": 1.15, "base_shift": 0.5, "width": 1024, "height": 1024}
    scfm = settings.make_scheduler()
    scfm.set_timesteps(4, mu=resolution_mu((1024 // 16) ** 2))  # FluxPipeline: packed tokens (H/16)·(W/16)
    diff = (comfyui_sigmas(sampling).double() - scfm.sigmas.double()).abs().max().item()
    assert diff < 2e-5


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_other_schedulers_miss_the_grid(family):
    """Why "simple": "normal" ends on the table's smallest σ (≈ 0.003) instead of the grid's last step, and
    "sgm_uniform" spreads the steps down to that σ instead of to 0."""
    settings = SCFMInferenceSettings.for_family(family)
    sampling = comfyui_sampling(settings, 4)
    model_sampling = model_sampling_node(sampling.model_sampling, sampling.model_sampling_inputs)
    scfm = FlowMatchSCFMScheduler(shift=settings.shift)
    scfm.set_timesteps(4)
    assert (normal_scheduler(model_sampling, 4) - scfm.sigmas).abs().max() > 0.1
    assert (normal_scheduler(model_sampling, 4, sgm=True) - scfm.sigmas).abs().max() > 3e-4


def test_sd3_dynamic_shift_has_no_comfyui_node():
    with pytest.raises(ValueError, match="no ComfyUI node computes for SD3"):
        comfyui_sampling(SCFMInferenceSettings.for_family("sd3", use_dynamic_shifting=True), 8)


# ---------------------------------------------------------------------------------------------------------
# 4. The command and the examples
# ---------------------------------------------------------------------------------------------------------
def export_command() -> list[str]:
    """The installed console script; `python -m` until the package is reinstalled with the new entry point."""
    script = Path(sys.executable).with_name("scfm-export-comfyui")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "scfm_diffusers.comfyui"]


def test_console_script_exports_in_a_subprocess(saved_pipelines, tmp_path):
    _, folder, _ = trained_adapter("flux", saved_pipelines, tmp_path, lora_scales={3: 1.5})
    out = tmp_path / "loras" / "scfm.safetensors"
    args = ["--adapter", str(folder), "--steps", "3", "--output", str(out)]
    result = subprocess.run([*export_command(), *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert out.is_file() and f"Wrote {out}" in result.stdout
    assert "LoRA scale 1.5 folded in" in result.stdout and "ModelSamplingFlux(max_shift=1.18" in result.stdout
    assert "scheduler=simple" in result.stdout

    missing = subprocess.run(
        [*export_command(), *args[:1], str(tmp_path / "nope"), *args[2:]], capture_output=True, text=True, timeout=300
    )
    lines = missing.stderr.strip().splitlines()
    assert missing.returncode == 1 and lines[-1].startswith("scfm-export-comfyui: error: FileNotFoundError: ")


def test_main_exit_codes(capsys):
    assert main(["--adapter", "x"]) == 2  # usage error (argparse): --output missing
    assert "required" in capsys.readouterr().err


def test_setup_declares_the_console_script():
    assert '"scfm-export-comfyui=scfm_diffusers.comfyui:main"' in (REPO / "setup.py").read_text()


def test_docstring_examples_run():
    result = doctest.testmod(comfyui, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
