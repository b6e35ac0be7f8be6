"""A quantized base transformer for SCFM LoRA training (QLoRA-style), diffusers' own quantizers underneath.

SCFM's teacher is the base transformer with its LoRA adapters disabled, and the two EMAs are extra adapters
on the same transformer. So quantizing the base quantizes the teacher too, at no extra memory: one 4-bit or
8-bit copy of the weights serves the teacher, the student and both EMAs. Only the transformer is quantized;
the VAE and the text encoders load as usual (the training cache keeps them off the accelerator anyway).

The choices, one registry (:data:`QUANTIZATION_CHOICES`)::

    name           backend        weights                               runs on
    nf4            bitsandbytes   4-bit NormalFloat, blocks of 64        CUDA / XPU (diffusers' check)
    int8           bitsandbytes   LLM.int8 (row-wise int8 + outliers)    CUDA / XPU (diffusers' check)
    torchao-int8   torchao        int8 weight-only, per-row scales       CPU and CUDA
    torchao-fp8    torchao        float8 e4m3 weight-only, per-row       CPU and CUDA

peft puts the matching LoRA layer on each quantized linear by itself (``lora.Linear4bit`` /
``lora.Linear8bitLt`` / ``TorchaoLoraLinear``), so the only preparation training needs is the one the
unquantized script already does: freeze the base, keep the LoRA tensors in fp32. Gradient checkpointing
needs no input-grad hook because diffusers checkpoints with ``use_reentrant=False``.
``peft.prepare_model_for_kbit_training`` is not needed either: on a torchao model it only freezes, and on
a bitsandbytes one it also upcasts every unquantized parameter (biases, embedders) to fp32, which diffusers'
Flux QLoRA example does but bf16 autocast makes moot.

Example:
    >>> transformer = load_quantized_transformer(
    ...     "black-forest-labs/FLUX.1-dev", "flux", "nf4", torch_dtype=torch.bfloat16, device="cuda"
    ... )  # doctest: +SKIP
    >>> pipe = FluxPipeline.from_pretrained(
    ...     "black-forest-labs/FLUX.1-dev", transformer=transformer, torch_dtype=torch.bfloat16
    ... )  # doctest: +SKIP
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import BitsAndBytesConfig, PipelineQuantizationConfig, TorchAoConfig
from diffusers.quantizers.quantization_config import QuantizationConfigMixin
from packaging import version
from torch import nn

from ..families import get_family

__all__ = [
    "QUANTIZATION_CHOICES",
    "QuantizationChoice",
    "check_distributed_support",
    "ddp_ignore_quantized_weights",
    "is_quantized_weight",
    "load_quantized_transformer",
    "pipeline_quantization_config",
    "quantization_config",
    "weight_memory_bytes",
]


def _nf4(torch_dtype: torch.dtype) -> QuantizationConfigMixin:
    # The settings of diffusers' Flux QLoRA example (no double quantization: it would save ~0.4 bit per
    # weight, ~0.6 GB on FLUX.1-dev, for slower matmuls).
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch_dtype)


def _bnb_int8(torch_dtype: torch.dtype) -> QuantizationConfigMixin:
    return BitsAndBytesConfig(load_in_8bit=True)


def _torchao_int8(torch_dtype: torch.dtype) -> QuantizationConfigMixin:
    from torchao.quantization import Int8WeightOnlyConfig

    return TorchAoConfig(Int8WeightOnlyConfig())


def _torchao_fp8(torch_dtype: torch.dtype) -> QuantizationConfigMixin:
    from torchao.quantization import Float8WeightOnlyConfig

    return TorchAoConfig(Float8WeightOnlyConfig())


@dataclass(frozen=True)
class QuantizationChoice:
    """One value of ``--quantize_base``: a diffusers quantizer, its settings and where it can run.

    Attributes:
        name: The CLI value (``"nf4"``, ``"int8"``, ``"torchao-int8"``, ...).
        backend: The quantization library: ``"bitsandbytes"`` or ``"torchao"``.
        package: The pip distribution that provides the backend.
        min_version: The oldest ``package`` version diffusers accepts for it.
        device_types: ``torch.device`` types diffusers 0.42 loads this choice on.
        bits_per_weight: Storage of a quantized linear weight, scales included (an estimate for docs/logs).
        description: One line for ``--help`` and the docs.
        build: ``torch_dtype -> diffusers quantization config`` (``torch_dtype`` is the compute dtype).
    """

    name: str
    backend: str
    package: str
    min_version: str
    device_types: tuple[str, ...]
    bits_per_weight: float
    description: str
    build: Callable[[torch.dtype], QuantizationConfigMixin]


QUANTIZATION_CHOICES: dict[str, QuantizationChoice] = {
    choice.name: choice
    for choice in (
        QuantizationChoice(
            name="nf4",
            backend="bitsandbytes",
            package="bitsandbytes",
            min_version="0.43.3",
            # bitsandbytes itself has CPU kernels, but diffusers' quantizer refuses to load without a GPU.
            device_types=("cuda", "xpu"),
            bits_per_weight=4.5,  # 4-bit codes + one fp32 absmax per block of 64
            description="4-bit NormalFloat via bitsandbytes (QLoRA); needs a CUDA GPU.",
            build=_nf4,
        ),
        QuantizationChoice(
            name="int8",
            backend="bitsandbytes",
            package="bitsandbytes",
            min_version="0.43.3",
            device_types=("cuda", "xpu"),
            bits_per_weight=8.0,
            description="LLM.int8 via bitsandbytes (computes in fp16); needs a CUDA GPU.",
            build=_bnb_int8,
        ),
        QuantizationChoice(
            name="torchao-int8",
            backend="torchao",
            package="torchao",
            min_version="0.15.0",
            device_types=("cpu", "cuda"),
            bits_per_weight=8.0,
            description="int8 weight-only via torchao (per-row scales); runs on CPU and CUDA.",
            build=_torchao_int8,
        ),
        QuantizationChoice(
            name="torchao-fp8",
            backend="torchao",
            package="torchao",
            min_version="0.15.0",
            device_types=("cpu", "cuda"),
            bits_per_weight=8.0,
            description="float8 (e4m3) weight-only via torchao (per-row scales); runs on CPU and CUDA.",
            build=_torchao_fp8,
        ),
    )
}


def _choice(name: str) -> QuantizationChoice:
    if name not in QUANTIZATION_CHOICES:
        raise ValueError(
            f"Unknown quantization {name!r}. Choose one of: "
            + "; ".join(f"{c.name} ({c.description})" for c in QUANTIZATION_CHOICES.values())
        )
    return QUANTIZATION_CHOICES[name]


def _resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` → the current CUDA (or XPU) device, else CPU; ``"cuda"`` → ``cuda:<current index>``.

    The index matters: accelerate refuses to train a bitsandbytes model whose device map says ``"cuda"``
    while the process trains on ``cuda:0``.
    """
    if device is None:
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if hasattr(torch, "xpu") and torch.xpu.is_available():
            return torch.device("xpu", torch.xpu.current_device())
        return torch.device("cpu")
    device = torch.device(device)
    if device.index is None and device.type == "cuda" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if device.index is None and device.type == "xpu" and hasattr(torch, "xpu") and torch.xpu.is_available():
        return torch.device("xpu", torch.xpu.current_device())
    return device


def _check_backend(choice: QuantizationChoice) -> None:
    """Raise ``ImportError`` (what, why, how to fix) if the backend is missing or too old."""
    install = f"pip install -c constraints.txt 'scfm-diffusers[quantization]'  (or: pip install '{choice.package}>={choice.min_version}')"
    if importlib.util.find_spec(choice.package) is None:
        raise ImportError(
            f"Quantization {choice.name!r} needs {choice.package}>={choice.min_version}, which is not installed: "
            f"diffusers quantizes the base transformer with it while loading. Install it with: {install}"
        )
    installed = importlib.metadata.version(choice.package)
    if version.parse(installed) < version.parse(choice.min_version):
        raise ImportError(
            f"Quantization {choice.name!r} needs {choice.package}>={choice.min_version} (diffusers' minimum), "
            f"but {installed} is installed. Upgrade it with: {install}"
        )


def _check_device(choice: QuantizationChoice, device: torch.device) -> None:
    if device.type not in choice.device_types:
        on_device = [c.name for c in QUANTIZATION_CHOICES.values() if device.type in c.device_types]
        raise RuntimeError(
            f"Quantization {choice.name!r} ({choice.backend}) cannot load on a {device.type} device: diffusers' "
            f"{choice.backend} quantizer needs one of {list(choice.device_types)}. "
            + (
                f"On {device.type}, use one of {on_device} instead."
                if on_device
                else f"No quantization choice runs on {device.type}; train without --quantize_base."
            )
        )


def quantization_config(
    quantize: str, *, torch_dtype: torch.dtype = torch.bfloat16, device: str | torch.device | None = None
) -> QuantizationConfigMixin:
    """The diffusers quantization config of one choice, after checking it can run here.

    Pass the result as ``quantization_config=`` to ``FluxTransformer2DModel.from_pretrained`` /
    ``SD3Transformer2DModel.from_pretrained`` (or use :func:`load_quantized_transformer`).

    Args:
        quantize: A key of :data:`QUANTIZATION_CHOICES`.
        torch_dtype: Dtype of the weights left unquantized and of the compute (bitsandbytes 4-bit).
        device: Where the model will be loaded; ``None`` means the current CUDA (or XPU) device, else CPU.

    Returns:
        A ``BitsAndBytesConfig`` or ``TorchAoConfig``.

    Raises:
        ValueError: ``quantize`` is not a known choice.
        ImportError: Its backend is not installed or too old.
        RuntimeError: Its backend cannot load on ``device`` (e.g. ``nf4`` on CPU).
    """
    choice = _choice(quantize)
    _check_device(choice, _resolve_device(device))
    _check_backend(choice)
    return choice.build(torch_dtype)


def pipeline_quantization_config(
    quantize: str, *, torch_dtype: torch.dtype = torch.bfloat16, device: str | torch.device | None = None
) -> PipelineQuantizationConfig:
    """A ``PipelineQuantizationConfig`` that quantizes only the pipeline's ``transformer``.

    For inference in one call: ``FluxPipeline.from_pretrained(path, quantization_config=...,
    torch_dtype=torch.bfloat16)``; the VAE and the text encoders load unquantized. Arguments and errors are
    those of :func:`quantization_config`.
    """
    config = quantization_config(quantize, torch_dtype=torch_dtype, device=device)
    return PipelineQuantizationConfig(quant_mapping={"transformer": config})


def load_quantized_transformer(
    pretrained_model_name_or_path: str | os.PathLike,
    family_name: str,
    quantize: str,
    *,
    torch_dtype: torch.dtype = torch.bfloat16,
    revision: str | None = None,
    variant: str | None = None,
    device: str | torch.device | None = None,
    subfolder: str = "transformer",
) -> nn.Module:
    """Load only the pipeline's transformer, quantized, frozen and ready for LoRA adapters.

    Hand the result to the pipeline (``family.pipeline_class.from_pretrained(path, transformer=it, ...)``) so
    the other components load as usual. The returned model needs no further preparation for LoRA training:
    add adapters with ``transformer.add_adapter`` (peft picks the quantized LoRA layer), keep the LoRA in fp32
    (``cast_training_params``), and never cast the model's dtype (diffusers refuses ``.to(dtype)`` /
    ``.half()`` on quantized models; ``.to(device)`` is fine).

    Args:
        pretrained_model_name_or_path: A pipeline folder or Hub id (its ``transformer/`` subfolder is read).
        family_name: ``"flux"`` or ``"sd3"`` (:data:`scfm_diffusers.families.FAMILIES`).
        quantize: A key of :data:`QUANTIZATION_CHOICES`.
        torch_dtype: Dtype of the unquantized weights (norms, biases, embedders) and of 4-bit compute.
        revision: Hub revision.
        variant: Weight file variant (e.g. ``"fp16"``).
        device: The training device (``accelerator.device``). Weights are quantized there as they load;
            bitsandbytes models must sit on the device they train on (accelerate checks). ``None``: the
            current CUDA/XPU device, else CPU.
        subfolder: The transformer's subfolder in the pipeline folder.

    Returns:
        The family's transformer class (e.g. ``FluxTransformer2DModel``), quantized, in eval mode, with
        ``requires_grad=False`` everywhere.

    Raises:
        ValueError: Unknown family or quantization choice.
        ImportError: The backend is not installed or too old.
        RuntimeError: The backend cannot load on ``device``.
    """
    family = get_family(family_name)
    device = _resolve_device(device)
    config = quantization_config(quantize, torch_dtype=torch_dtype, device=device)
    # Quantize on the target device as weights load. torchao on CPU gets no device_map: diffusers' torchao
    # quantizer reads "cpu" in one as CPU offload and then leaves those weights unquantized.
    torchao_on_cpu = QUANTIZATION_CHOICES[quantize].backend == "torchao" and device.type == "cpu"
    device_map = None if torchao_on_cpu else {"": str(device)}
    transformer = family.transformer_class.from_pretrained(
        pretrained_model_name_or_path,
        subfolder=subfolder,
        revision=revision,
        variant=variant,
        torch_dtype=torch_dtype,
        quantization_config=config,
        device_map=device_map,
    )
    transformer.requires_grad_(False)
    return transformer.eval()


def is_quantized_weight(tensor: torch.Tensor) -> bool:
    """Whether a parameter is stored quantized (bitsandbytes 4/8-bit, or a torchao tensor subclass)."""
    if type(tensor).__name__ in ("Params4bit", "Int8Params"):
        return tensor.dtype in (torch.uint8, torch.int8)  # before quantization they still hold floats
    return type(tensor).__module__.startswith("torchao.")  # Int8Tensor, Float8Tensor, ... (not DTensor)


def _tensor_bytes(tensor: torch.Tensor) -> int:
    if hasattr(tensor, "__tensor_flatten__"):  # a tensor subclass: count what it really stores
        names, _ = tensor.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(tensor, name)) for name in names)
    total = tensor.numel() * tensor.element_size()
    state = getattr(tensor, "quant_state", None)  # bitsandbytes 4-bit: block absmax (+ nested state)
    while state is not None:
        total += sum(v.numel() * v.element_size() for v in vars(state).values() if isinstance(v, torch.Tensor))
        state = getattr(state, "state2", None)
    scales = getattr(tensor, "SCB", None)  # bitsandbytes int8: per-row scales
    if isinstance(scales, torch.Tensor):
        total += scales.numel() * scales.element_size()
    return total


def weight_memory_bytes(module: nn.Module) -> int:
    """Bytes held by a module's parameters and buffers, counting quantized storage as stored.

    diffusers' ``get_memory_footprint`` reports a torchao-quantized model at its unquantized size (it reads
    the subclass's logical dtype); this counts the int8/fp8 data and the scales inside the subclass, and
    bitsandbytes' packed 4-bit data with its absmax.
    """
    tensors = {id(t): t for t in (*module.parameters(), *module.buffers())}
    return sum(_tensor_bytes(t) for t in tensors.values())


def ddp_ignore_quantized_weights(model: nn.Module) -> list[str]:
    """Tell DistributedDataParallel to leave the quantized base weights alone; returns their names.

    DDP broadcasts every parameter from rank 0 when it wraps a model; torchao's quantized tensors do not
    implement the ``view`` that broadcast needs (``NotImplementedError: Int8Tensor dispatch ... aten.view``).
    The base is frozen and every process loads the same checkpoint, so there is nothing to synchronise: call
    this on the unwrapped transformer before ``accelerator.prepare``. The LoRA tensors (student and EMAs)
    stay synchronised as before.
    """
    names = [name for name, param in model.named_parameters() if is_quantized_weight(param)]
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)
    return names


def check_distributed_support(quantize: str, distributed_type: object) -> None:
    """Refuse the distributed modes a quantized base does not work with; DDP and one process are fine.

    Checked on CPU with torchao-int8 (accelerate 1.15, deepspeed 0.19.8, torch 2.13): DeepSpeed ZeRO-2's
    engine fails in ``module.to(device)`` ("Couldn't swap Linear.weight"), and FSDP2's ``fully_shard``
    fails on the quantized weights (``aten.split`` unimplemented); accelerate itself never enters FSDP on
    CPU. bitsandbytes under either was not run (no GPU here). Neither would help anyway: only the LoRA
    trains, so ZeRO-2's sharded optimizer state and gradients are a few MB, and FSDP-sharding a 4-bit
    base needs settings (``bnb_4bit_quant_storage``) this package does not use.

    Args:
        quantize: The ``--quantize_base`` value (``None`` or empty: nothing to check).
        distributed_type: accelerate's ``DistributedType`` (or its string value).

    Raises:
        ValueError: For DeepSpeed and FSDP, saying what to use instead.
    """
    mode = str(getattr(distributed_type, "value", distributed_type)).upper()
    if quantize and mode in ("DEEPSPEED", "FSDP"):
        raise ValueError(
            f"--quantize_base {quantize} is not supported with {mode}: {mode} fails at start-up on torchao's "
            "quantized weights and is untested with bitsandbytes'. Train a quantized base with plain data parallelism "
            "instead (accelerate config examples/configs/multi_gpu.yaml, or one GPU): only the LoRA trains, so "
            "sharding optimizer state saves next to nothing; or drop --quantize_base to keep DeepSpeed/FSDP."
        )
