"""A quantized base transformer for SCFM LoRA training, on tiny real Flux and SD3 models (CPU).

torchao's int8/fp8 weight-only quantizers run on CPU through diffusers' own loader, so they carry the
contracts here. bitsandbytes nf4/int8 (the CUDA choices) also run on CPU through bitsandbytes' CPU kernels once
diffusers' "GPU needed" check is bypassed, which exercises peft's 4-bit/8-bit LoRA layers on the same path.
"""

import dataclasses
import importlib.util

import pytest
import torch
from diffusers.quantizers.bitsandbytes.bnb_quantizer import BnB4BitDiffusersQuantizer, BnB8BitDiffusersQuantizer
from peft import LoraConfig, get_peft_model_state_dict

from scfm_diffusers import SCFMInferenceSettings, SCFMPipeline, save_adapter
from scfm_diffusers.families import get_family
from scfm_diffusers.testing import TinyModelConfig, save_tiny_pipeline
from scfm_diffusers.training import quantization
from scfm_diffusers.training.ema import DualLoraEMA, lora_parameters
from scfm_diffusers.training.quantization import (
    QUANTIZATION_CHOICES,
    check_distributed_support,
    ddp_ignore_quantized_weights,
    is_quantized_weight,
    load_quantized_transformer,
    pipeline_quantization_config,
    quantization_config,
    weight_memory_bytes,
)

# The torchao tests need it installed; the error tests and the bitsandbytes ones do not.
requires_torchao = pytest.mark.skipif(
    importlib.util.find_spec("torchao") is None,
    reason="torchao is not installed: pip install -c constraints.txt 'scfm-diffusers[quantization]'",
)
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
CPU_CHOICES = ["torchao-int8", "torchao-fp8"]
# Widths that are multiples of 64 (bitsandbytes' 4-bit block size on CPU) and 16 latent channels as in
# FLUX.1 / SD3, so that Flux's packed x_embedder has 64 inputs. SD3 needs text_dim = heads × head_dim.
WIDE = TinyModelConfig(
    attention_head_dim=64, num_attention_heads=2, text_dim=128, axes_dims_rope=(16, 16, 32), latent_channels=16
)


@pytest.fixture(scope="module")
def wide_pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("wide")
    return {family: save_tiny_pipeline(family, root / family, WIDE) for family in ("flux", "sd3")}


def model_inputs(transformer, seed: int = 0, batch: int = 2) -> dict:
    """Fixed transformer inputs for either family (4×4 latent grid, 8 text tokens)."""
    g = torch.Generator().manual_seed(seed)
    c = transformer.config
    text = {
        "encoder_hidden_states": torch.randn(batch, 8, c.joint_attention_dim, generator=g),
        "pooled_projections": torch.randn(batch, c.pooled_projection_dim, generator=g),
        "timestep": torch.rand(batch, generator=g) * 1000,
    }
    if "axes_dims_rope" in c:  # Flux: packed tokens plus position ids
        tokens = torch.randn(batch, 16, c.in_channels, generator=g)
        return {"hidden_states": tokens, "img_ids": torch.zeros(16, 3), "txt_ids": torch.zeros(8, 3), **text}
    return {"hidden_states": torch.randn(batch, c.in_channels, 4, 4, generator=g), **text}


def run(transformer, inputs) -> torch.Tensor:
    return transformer(**inputs, return_dict=False)[0]


def add_student_and_emas(transformer) -> DualLoraEMA:
    """Student LoRA (alpha != rank, non-zero B, fp32) plus the two EMA adapters, as the training script does."""
    transformer.add_adapter(
        LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=TARGETS), adapter_name="default"
    )
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in lora_parameters(transformer, "default").items():
            param.data = param.data.float()
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.3)
    return DualLoraEMA(transformer, "default")


def linear_bytes(model) -> int:
    """Memory of the linear layers only (SD3's fp32 position-embedding buffer would dominate a tiny model)."""
    return sum(weight_memory_bytes(m) for m in model.modules() if isinstance(m, torch.nn.Linear))


def quantized_names(transformer) -> set[str]:
    return {n for n, p in transformer.named_parameters() if is_quantized_weight(p)}


# ---------------------------------------------------------------------------------------------------------
# (e) choices and errors
# ---------------------------------------------------------------------------------------------------------
def test_choices_are_the_cli_values():
    assert list(QUANTIZATION_CHOICES) == ["nf4", "int8", "torchao-int8", "torchao-fp8"]
    for name, choice in QUANTIZATION_CHOICES.items():
        assert choice.name == name and choice.description


def test_cuda_configs_are_built_without_a_gpu():
    nf4 = quantization_config("nf4", torch_dtype=torch.bfloat16, device="cuda")
    assert nf4.load_in_4bit and nf4.bnb_4bit_quant_type == "nf4" and nf4.bnb_4bit_compute_dtype == torch.bfloat16
    assert quantization_config("int8", device="cuda").load_in_8bit


@requires_torchao
def test_torchao_configs():
    config = quantization_config("torchao-int8", device="cpu")
    assert type(config).__name__ == "TorchAoConfig" and type(config.quant_type).__name__ == "Int8WeightOnlyConfig"
    mapping = pipeline_quantization_config("torchao-fp8", device="cpu").quant_mapping
    assert list(mapping) == ["transformer"]


def test_unknown_choice_lists_the_known_ones():
    with pytest.raises(ValueError, match="Unknown quantization 'int3'.*nf4.*torchao-int8"):
        quantization_config("int3")


@pytest.mark.parametrize("name", ["nf4", "int8"])
def test_bitsandbytes_on_cpu_says_why_and_what_to_use(name):
    with pytest.raises(RuntimeError, match=rf"{name}.*cannot load on a cpu device.*torchao-int8"):
        quantization_config(name, device="cpu")


def test_missing_backend_says_how_to_install(monkeypatch):
    real = quantization.importlib.util.find_spec
    monkeypatch.setattr(
        quantization.importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a)
    )
    with pytest.raises(ImportError, match=r"torchao>=0\.15\.0, which is not installed.*pip install"):
        quantization_config("torchao-int8", device="cpu")


@requires_torchao
def test_old_backend_says_how_to_upgrade(monkeypatch):
    monkeypatch.setattr(quantization.importlib.metadata, "version", lambda name: "0.10.0")
    with pytest.raises(ImportError, match=r"but 0\.10\.0 is installed.*Upgrade"):
        quantization_config("torchao-int8", device="cpu")


def test_unknown_family(wide_pipelines):
    with pytest.raises(ValueError, match="Family 'sdxl'"):
        load_quantized_transformer(wide_pipelines["flux"], "sdxl", "torchao-int8", device="cpu")


# ---------------------------------------------------------------------------------------------------------
# (a) the weights really are quantized
# ---------------------------------------------------------------------------------------------------------
@requires_torchao
@pytest.mark.parametrize("quantize", CPU_CHOICES)
@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_weights_are_quantized_and_smaller(wide_pipelines, family, quantize):
    path = wide_pipelines[family]
    model = load_quantized_transformer(path, family, quantize, torch_dtype=torch.bfloat16, device="cpu")
    full = get_family(family).transformer_class.from_pretrained(
        path, subfolder="transformer", torch_dtype=torch.bfloat16
    )

    assert isinstance(model, get_family(family).transformer_class)
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert {n.rsplit(".", 1)[0] for n in quantized_names(model)} == linears  # every linear, nothing else
    storage = torch.int8 if quantize == "torchao-int8" else torch.float8_e4m3fn
    assert model.transformer_blocks[0].attn.to_q.weight.qdata.dtype == storage
    # Linear layers: 1 byte per weight instead of 2 (bf16), plus per-row scales and the bf16 biases.
    assert linear_bytes(model) < 0.56 * linear_bytes(full)
    assert weight_memory_bytes(full) - weight_memory_bytes(model) == linear_bytes(full) - linear_bytes(model)
    assert weight_memory_bytes(full) == sum(
        t.numel() * t.element_size() for t in (*full.parameters(), *full.buffers())
    )


# ---------------------------------------------------------------------------------------------------------
# (b) teacher = quantized base with adapters off; (c) the LoRA trains on it
# ---------------------------------------------------------------------------------------------------------
@requires_torchao
@pytest.mark.parametrize("quantize", CPU_CHOICES)
@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_teacher_is_the_quantized_base(wide_pipelines, family, quantize):
    model = load_quantized_transformer(
        wide_pipelines[family], family, quantize, torch_dtype=torch.float32, device="cpu"
    )
    inputs = model_inputs(model)
    with torch.no_grad():
        base = run(model, inputs)
        ema = add_student_and_emas(model)
        assert {type(m).__name__ for m in model.modules() if hasattr(m, "lora_A")} == {"TorchaoLoraLinear"}
        with ema.teacher():
            teacher = run(model, inputs)
        student = run(model, inputs)
        model.disable_adapters()
        disabled = run(model, inputs)
    assert torch.equal(teacher, base) and torch.equal(disabled, base)
    assert (student - base).abs().max() > 1e-2


@requires_torchao
@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_lora_trains_on_the_quantized_base(wide_pipelines, family):
    model = load_quantized_transformer(
        wide_pipelines[family], family, "torchao-int8", torch_dtype=torch.float32, device="cpu"
    )
    ema = add_student_and_emas(model)
    frozen = {n: p.qdata.clone() for n, p in model.named_parameters() if is_quantized_weight(p)}
    inputs = model_inputs(model)
    target = torch.randn(run(model, inputs).shape, generator=torch.Generator().manual_seed(2))
    student = lora_parameters(model, "default")
    optimizer = torch.optim.AdamW(student.values(), lr=1e-2)

    losses = []
    for step in range(6):
        if step == 3:  # diffusers checkpoints with use_reentrant=False: no input-grad hook needed
            model.enable_gradient_checkpointing()
            model.train()
        loss = (run(model, inputs) - target).pow(2).mean()
        loss.backward()
        with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
        assert with_grad and all(".default." in n and "lora_" in n for n in with_grad)
        assert all(student[k].grad.abs().sum() > 0 for k in student if "lora_A" in k)
        optimizer.step()
        optimizer.zero_grad()
        ema.update()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
    assert all(losses[i + 1] < losses[i] for i in range(len(losses) - 1)), losses
    for name, param in model.named_parameters():
        if name in frozen:
            assert torch.equal(param.qdata, frozen[name])


@requires_torchao
def test_checkpointing_gives_the_same_lora_grads(wide_pipelines, monkeypatch):
    calls = []
    real_checkpoint = torch.utils.checkpoint.checkpoint

    def counting_checkpoint(*args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return real_checkpoint(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting_checkpoint)
    model = load_quantized_transformer(
        wide_pipelines["flux"], "flux", "torchao-int8", torch_dtype=torch.float32, device="cpu"
    )
    add_student_and_emas(model)
    inputs = model_inputs(model)
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            model.enable_gradient_checkpointing()
        model.train()
        run(model, inputs).pow(2).mean().backward()
        grads.append({k: p.grad.clone() for k, p in lora_parameters(model, "default").items()})
        model.zero_grad()
    assert calls and set(calls) == {False}  # it ran, non-reentrant, once per block
    assert grads[0].keys() == grads[1].keys()
    for key in grads[0]:
        torch.testing.assert_close(grads[1][key], grads[0][key], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# (d) the adapter trained on the quantized base loads on the full-precision base; inference
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_adapters(wide_pipelines, tmp_path_factory):
    """{family: (lora folder, student state dict)} trained 3 steps on the torchao-int8 base."""
    out = {}
    for family in ("flux", "sd3"):
        model = load_quantized_transformer(
            wide_pipelines[family], family, "torchao-int8", torch_dtype=torch.float32, device="cpu"
        )
        add_student_and_emas(model)
        inputs = model_inputs(model)
        optimizer = torch.optim.AdamW(lora_parameters(model, "default").values(), lr=1e-2)
        for _ in range(3):
            run(model, inputs).pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
        folder = tmp_path_factory.mktemp(f"lora-{family}")
        state = get_peft_model_state_dict(model, adapter_name="default")
        get_family(family).pipeline_class.save_lora_weights(
            folder,
            transformer_lora_layers=state,
            transformer_lora_adapter_metadata=model.peft_config["default"].to_dict(),
        )
        out[family] = (str(folder), {k: v.detach().clone() for k, v in state.items()})
    return out


def generate(pipe, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return pipe("a cat", num_inference_steps=2, height=32, width=32, output_type="pt", generator=generator).images


@requires_torchao
@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_adapter_loads_on_the_unquantized_base(wide_pipelines, trained_adapters, family):
    folder, trained = trained_adapters[family]
    pipe = get_family(family).pipeline_class.from_pretrained(wide_pipelines[family])  # stock, full precision
    pipe.set_progress_bar_config(disable=True)
    before = generate(pipe)
    pipe.load_lora_weights(folder)
    loaded = get_peft_model_state_dict(pipe.transformer, adapter_name=pipe.get_active_adapters()[0])
    assert loaded.keys() == trained.keys()
    for key, value in trained.items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0)
    assert pipe.transformer.peft_config[pipe.get_active_adapters()[0]].lora_alpha == 8  # metadata kept alpha
    assert (generate(pipe) - before).abs().max() > 1e-3


@requires_torchao
@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_quantized_base_plus_adapter_through_a_stock_pipeline(wide_pipelines, trained_adapters, family):
    spec = get_family(family)
    transformer = load_quantized_transformer(wide_pipelines[family], family, "torchao-int8", device="cpu")
    pipe = spec.pipeline_class.from_pretrained(
        wide_pipelines[family], transformer=transformer, torch_dtype=torch.bfloat16
    )
    pipe.set_progress_bar_config(disable=True)
    base = generate(pipe)
    pipe.load_lora_weights(trained_adapters[family][0])
    images = generate(pipe)
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()
    assert (images - base).abs().max() > 1e-3
    assert quantized_names(pipe.transformer) and not quantized_names(pipe.text_encoder)


@requires_torchao
@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_scfm_adapter_from_a_quantized_run_samples_on_both_bases(wide_pipelines, family, tmp_path):
    """The training script's adapter format (save_adapter) from a quantized base, sampled by SCFMPipeline on
    the quantized base and on the full-precision one."""
    model = load_quantized_transformer(wide_pipelines[family], family, "torchao-int8", device="cpu")
    add_student_and_emas(model)
    folder = save_adapter(tmp_path / "adapter", model, SCFMInferenceSettings.for_family(family))

    images = {}
    fresh = load_quantized_transformer(wide_pipelines[family], family, "torchao-int8", device="cpu")
    for name, extra in (("quantized", {"transformer": fresh}), ("full", {})):
        pipe = SCFMPipeline.from_pretrained(
            wide_pipelines[family], adapter=folder, torch_dtype=torch.bfloat16, **extra
        )
        pipe.set_progress_bar_config(disable=True)
        images[name] = generate(pipe).float()
        assert images[name].shape == (1, 3, 32, 32) and torch.isfinite(images[name]).all()
    assert quantized_names(fresh)
    # Same adapter, base weights within int8 rounding of each other: close images, not equal ones.
    assert 0 < (images["quantized"] - images["full"]).abs().mean() < 0.02  # measured 0.002-0.004 (pixels in [0, 1])


@requires_torchao
def test_pipeline_quantization_config_quantizes_only_the_transformer(wide_pipelines):
    config = pipeline_quantization_config("torchao-int8", torch_dtype=torch.bfloat16, device="cpu")
    pipe = get_family("sd3").pipeline_class.from_pretrained(
        wide_pipelines["sd3"], quantization_config=config, torch_dtype=torch.bfloat16
    )
    pipe.set_progress_bar_config(disable=True)
    assert quantized_names(pipe.transformer)
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3", "vae"):
        assert not quantized_names(getattr(pipe, name)), name
    assert torch.isfinite(generate(pipe)).all()


# ---------------------------------------------------------------------------------------------------------
# DDP: the quantized weights must be left out of DDP's start-up broadcast
# ---------------------------------------------------------------------------------------------------------
@requires_torchao
def test_ddp_ignore_list_names_exactly_the_quantized_weights(wide_pipelines):
    # DDP's start-up broadcast needs aten.view, which torchao's tensors lack: DDP must skip them. (A real
    # 2-process DDP run on a quantized base: tests/test_train_script.py, in subprocesses. An in-process DDP
    # whose construction fails leaves a gloo group whose destructor can hang the test worker.)
    model = load_quantized_transformer(
        wide_pipelines["flux"], "flux", "torchao-int8", torch_dtype=torch.float32, device="cpu"
    )
    add_student_and_emas(model)
    ignored = ddp_ignore_quantized_weights(model)
    assert set(ignored) == quantized_names(model) and ignored
    assert set(model._ddp_params_and_buffers_to_ignore) == set(ignored)


@pytest.mark.parametrize("mode", ["DEEPSPEED", "FSDP"])
def test_deepspeed_and_fsdp_are_refused_with_a_way_out(mode):
    from accelerate.utils import DistributedType

    with pytest.raises(ValueError, match=rf"nf4 is not supported with {mode}.*multi_gpu.yaml"):
        check_distributed_support("nf4", DistributedType(mode))
    check_distributed_support(None, DistributedType(mode))  # no quantization: nothing to refuse
    for fine in ("NO", "MULTI_GPU", "MULTI_CPU"):
        check_distributed_support("nf4", DistributedType(fine))


# ---------------------------------------------------------------------------------------------------------
# nf4 / int8 (the CUDA choices) on CPU: bitsandbytes' CPU kernels, diffusers' GPU check bypassed
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture
def bitsandbytes_on_cpu(monkeypatch):
    """Let diffusers' bitsandbytes loaders run on CPU (their only obstacle there is a "GPU needed" check)."""
    for quantizer in (BnB4BitDiffusersQuantizer, BnB8BitDiffusersQuantizer):
        monkeypatch.setattr(quantizer, "validate_environment", lambda self, *a, **k: None)
    for name in ("nf4", "int8"):
        choice = QUANTIZATION_CHOICES[name]
        monkeypatch.setitem(QUANTIZATION_CHOICES, name, dataclasses.replace(choice, device_types=("cpu",)))


@pytest.mark.parametrize(
    "family, quantize, layer, bits",
    [("flux", "nf4", "Linear4bit", 4.5), ("sd3", "nf4", "Linear4bit", 4.5), ("flux", "int8", "Linear8bitLt", 8)],
)
def test_bitsandbytes_lora_path_on_cpu(wide_pipelines, bitsandbytes_on_cpu, family, quantize, layer, bits):
    model = load_quantized_transformer(
        wide_pipelines[family], family, quantize, torch_dtype=torch.float32, device="cpu"
    )
    assert model.dtype == torch.float32  # diffusers reads the first floating parameter, not the packed codes
    kinds = {type(p).__name__ for p in model.parameters() if is_quantized_weight(p)}
    assert kinds == {"Params4bit" if quantize == "nf4" else "Int8Params"}
    full = get_family(family).transformer_class.from_pretrained(wide_pipelines[family], subfolder="transformer")
    assert linear_bytes(model) < (bits + 1.5) / 32 * linear_bytes(full)  # codes + scales (+ fp32 biases)
    # On CPU only, bitsandbytes repacks 4-bit weights in place for an inference-only kernel at the first
    # eval-mode no-grad forward, after which backward fails; train mode keeps the trainable layout.
    model.train()
    inputs = model_inputs(model)
    with torch.no_grad():
        base = run(model, inputs)
    ema = add_student_and_emas(model)
    assert {type(m).__name__ for m in model.modules() if hasattr(m, "lora_A")} == {layer}
    with torch.no_grad(), ema.teacher():
        assert torch.equal(run(model, inputs), base)
    optimizer = torch.optim.AdamW(lora_parameters(model, "default").values(), lr=1e-2)
    losses = []
    for _ in range(3):
        loss = run(model, inputs).pow(2).mean()
        loss.backward()
        assert all(".default." in n for n, p in model.named_parameters() if p.grad is not None)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
