"""Export an SCFM adapter as a single-file ComfyUI LoRA, with the ComfyUI settings that sample its SCFM grid.

ComfyUI loads diffusers-named LoRAs for Flux and SD3: its ``model_lora_keys_unet`` (comfy/lora.py) maps
``transformer.<diffusers module>`` onto its own weights for every module of ``comfy.utils.flux_to_diffusers`` /
``mmdit_to_diffusers``, and its LoRA adapter (comfy/weight_adapter/lora.py) reads ``<key>.lora_B.weight``
(up), ``<key>.lora_A.weight`` (down) and an optional ``<key>.alpha``, applying
``ΔW = strength · (alpha / rank) · up @ down`` (alpha / rank = 1 without ``.alpha``). The exported file uses
exactly that format, with ``.alpha = rank`` and the calibrated LoRA scale of the chosen step count folded into
``lora_B``: strength 1.0 in ComfyUI is the scale the adapter was calibrated for.

Time convention (diffusers): σ ∈ [0, 1], σ = 1 is noise; the SCFM grid of N steps is
``shift(linspace(1, 0, N + 1))`` with its first σ clamped to 1 − 1e-5 (:mod:`scfm_diffusers.sigmas`).
docs/comfyui.md shows which ComfyUI nodes reproduce it and by how much they differ.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> from peft import LoraConfig
    >>> from scfm_diffusers import SCFMInferenceSettings, save_adapter
    >>> from scfm_diffusers.testing import tiny_flux_pipeline
    >>> pipe = tiny_flux_pipeline()
    >>> pipe.transformer.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k"]))
    >>> settings = SCFMInferenceSettings.for_family("flux", num_inference_steps=3, lora_scales={3: 1.5})
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     adapter = save_adapter(Path(tmp, "adapter"), pipe.transformer, settings)
    ...     path = export_comfyui_lora(adapter, Path(tmp, "loras", "scfm_3step.safetensors"))  # 3 steps, scale 1.5
    ...     print(path.name)
    scfm_3step.safetensors
    >>> sampling = comfyui_sampling(settings, 3)
    >>> sampling.model_sampling, sampling.model_sampling_inputs["max_shift"], sampling.scheduler
    ('ModelSamplingFlux', 1.18, 'simple')
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError
from peft.utils.other import get_pattern_key
from safetensors import safe_open
from safetensors.torch import save_file

from ._files import temporary_sibling
from .adapter import SETTINGS_NAME, WEIGHTS_NAME, SCFMInferenceSettings, _is_local, load_adapter_settings

__all__ = ["ComfyUISampling", "comfyui_lora_state_dict", "comfyui_sampling", "export_comfyui_lora", "main"]

logger = logging.getLogger(__name__)

PROG = "scfm-export-comfyui"
#: The key diffusers' ``save_lora_weights`` stores peft's LoraConfig under (prefixed ``transformer.``).
LORA_METADATA_KEY = "lora_adapter_metadata"
#: ComfyUI's float widgets (ModelSamplingFlux's shifts) keep two decimals (their ``step`` is 0.01).
WIDGET_DECIMALS = 2
#: Flux's resolution-dependent shift, as ComfyUI's ModelSamplingFlux node and diffusers' FluxPipeline define it.
FLUX_BASE_SHIFT, FLUX_MAX_SHIFT = 0.5, 1.15


@dataclass(frozen=True)
class ComfyUISampling:
    """The ComfyUI nodes and sampler settings that sample an SCFM adapter on (almost exactly) its σ grid.

    Attributes:
        model_sampling: The node that sets the model's σ table: ``"ModelSamplingFlux"`` or ``"ModelSamplingSD3"``.
        model_sampling_inputs: That node's inputs.
        steps: KSampler ``steps`` (the adapter's Euler steps N).
        cfg: KSampler ``cfg``: 1.0 for Flux (one pass, guidance embedded), the CFG scale for SD3.
        flux_guidance: FluxGuidance ``guidance`` on the positive conditioning (Flux), else None.
        sampler_name: KSampler ``sampler_name``: plain Euler, as SCFM samples.
        scheduler: KSampler ``scheduler``: ``"simple"`` walks the σ table uniformly (docs/comfyui.md).
        denoise: KSampler ``denoise`` (text-to-image: 1.0).
        lora_strength: LoraLoaderModelOnly ``strength_model`` for the exported file (its scale is folded in).
    """

    model_sampling: str
    model_sampling_inputs: dict[str, float | int]
    steps: int
    cfg: float
    flux_guidance: float | None = None
    sampler_name: str = "euler"
    scheduler: str = "simple"
    denoise: float = 1.0
    lora_strength: float = 1.0

    def describe(self) -> str:
        """The node chain in one line, for humans."""
        inputs = ", ".join(f"{name}={value:g}" for name, value in self.model_sampling_inputs.items())
        chain = [f"LoraLoaderModelOnly(strength_model={self.lora_strength})", f"{self.model_sampling}({inputs})"]
        if self.flux_guidance is not None:
            chain.append(f"FluxGuidance(guidance={self.flux_guidance:g})")
        chain.append(
            f"KSampler(steps={self.steps}, cfg={self.cfg}, sampler_name={self.sampler_name}, "
            f"scheduler={self.scheduler}, denoise={self.denoise})"
        )
        return " -> ".join(chain)


def comfyui_sampling(
    settings: SCFMInferenceSettings, num_inference_steps: int, *, width: int = 1024, height: int = 1024
) -> ComfyUISampling:
    """The ComfyUI settings that reproduce ``settings``' SCFM grid of ``num_inference_steps`` steps.

    Flux: ModelSamplingFlux with ``max_shift = base_shift = ln(shift)`` (rounded to the widget's two decimals; equal
    shifts make width and height irrelevant), or, for a dynamic-shift adapter, its stock 1.15 / 0.5 at the image
    size. SD3: ModelSamplingSD3 with ``shift``. Both with KSampler ``euler`` / ``simple`` (docs/comfyui.md shows
    why, and the measured σ differences).

    Args:
        settings: The adapter's inference settings (family, shift, guidance).
        num_inference_steps: Euler steps N.
        width: Image width, used by a dynamic-shift Flux adapter only.
        height: Image height, likewise.

    Returns:
        The node settings.

    Raises:
        ValueError: N < 1, or an SD3 adapter with a dynamic shift (no ComfyUI node computes one for SD3).

    Example:
        >>> sampling = comfyui_sampling(SCFMInferenceSettings.for_family("sd3", guidance_scale=4.0), 8)
        >>> print(sampling.describe())  # doctest: +ELLIPSIS
        LoraLoaderModelOnly(strength_model=1.0) -> ModelSamplingSD3(shift=3) -> KSampler(steps=8, cfg=4.0, ...)
    """
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be an int >= 1, got {num_inference_steps!r}.")
    if settings.family not in _SAMPLING:
        raise ValueError(f"No ComfyUI export for the {settings.family!r} family (supported: {sorted(_SAMPLING)}).")
    return _SAMPLING[settings.family](settings, num_inference_steps, width, height)


def _flux_sampling(settings: SCFMInferenceSettings, steps: int, width: int, height: int) -> ComfyUISampling:
    """ModelSamplingFlux's σ table is ``e^μ / (e^μ + 1/t − 1)`` = the fixed shift ``e^μ``, and the model is fed σ
    as Flux expects (ModelSamplingSD3 would feed 1000·σ); guidance is embedded, so cfg is 1 (one pass)."""
    if settings.use_dynamic_shifting:  # μ linear in the packed token count w·h/256, as in diffusers' FluxPipeline
        inputs = {"max_shift": FLUX_MAX_SHIFT, "base_shift": FLUX_BASE_SHIFT, "width": width, "height": height}
    else:  # max_shift = base_shift: μ = ln(shift) at every size
        mu = round(math.log(settings.shift), WIDGET_DECIMALS)
        inputs = {"max_shift": mu, "base_shift": mu, "width": width, "height": height}
    return ComfyUISampling("ModelSamplingFlux", inputs, steps, cfg=1.0, flux_guidance=settings.guidance_scale)


def _sd3_sampling(settings: SCFMInferenceSettings, steps: int, width: int, height: int) -> ComfyUISampling:
    """ModelSamplingSD3's σ table is the fixed shift itself; the student keeps CFG against the empty prompt."""
    if settings.use_dynamic_shifting:
        raise ValueError(
            "This SD3 adapter samples with a resolution-dependent shift, which no ComfyUI node computes for SD3; "
            "re-save its settings with use_dynamic_shifting=False and a fixed shift."
        )
    inputs = {"shift": round(settings.shift, WIDGET_DECIMALS)}
    return ComfyUISampling("ModelSamplingSD3", inputs, steps, cfg=settings.guidance_scale)


#: family name -> ``fn(settings, steps, width, height) -> ComfyUISampling``.
_SAMPLING = {"flux": _flux_sampling, "sd3": _sd3_sampling}


def _lora_config(metadata: dict[str, str] | None) -> dict | None:
    """The transformer's peft LoraConfig from a diffusers LoRA file's metadata (None when it has none)."""
    if not metadata or LORA_METADATA_KEY not in metadata:
        return None
    packed = json.loads(metadata[LORA_METADATA_KEY])
    config = {
        key.removeprefix("transformer."): value for key, value in packed.items() if key.startswith("transformer.")
    }
    return config or None


def comfyui_lora_state_dict(
    state_dict: dict[str, torch.Tensor], lora_config: dict | None = None, scale: float = 1.0
) -> dict[str, torch.Tensor]:
    """Turn a diffusers-format transformer LoRA into ComfyUI's format, with ``scale·alpha/r`` folded into lora_B.

    For every module ``m``: ``transformer.m.lora_A.weight`` = A, ``transformer.m.lora_B.weight`` =
    ``scale·(alpha_m / r_m)·B`` (``alpha_m / sqrt(r_m)`` with rsLoRA) and ``transformer.m.alpha`` = r_m, so that
    ComfyUI's ``strength·(alpha / rank)·B'·A`` at strength 1 is the adapter's ΔW at LoRA scale ``scale``.

    Args:
        state_dict: ``{"transformer.<module>.lora_A.weight": (r, in[, k, k]), ".lora_B.weight": (out, r[, 1, 1])}``
            as diffusers' ``save_lora_weights`` writes it.
        lora_config: peft's LoraConfig as a dict (``lora_alpha``, ``alpha_pattern``, ``use_rslora``); None means
            alpha = r (diffusers' assumption for a file without metadata).
        scale: LoRA scale to fold in (``joint_attention_kwargs={"scale": scale}`` in diffusers).

    Returns:
        The ComfyUI state dict, in the tensors' own dtype (``lora_B`` rounded once from float64).

    Raises:
        ValueError: Keys ComfyUI's LoRA loader would drop: text-encoder LoRAs, LoRA biases, DoRA magnitudes,
            or a ``lora_A`` without its ``lora_B``.
    """
    unsupported = sorted(
        key
        for key in state_dict
        if not key.startswith("transformer.") or not key.endswith((".lora_A.weight", ".lora_B.weight"))
    )
    if unsupported:
        raise ValueError(
            f"Only transformer LoRA weights (lora_A / lora_B) can be exported for ComfyUI, got {unsupported[:5]}: "
            "text-encoder LoRAs, LoRA biases and DoRA magnitudes are not part of an SCFM adapter."
        )
    downs = {key.removesuffix(".lora_A.weight") for key in state_dict if key.endswith(".lora_A.weight")}
    ups = {key.removesuffix(".lora_B.weight") for key in state_dict if key.endswith(".lora_B.weight")}
    if downs != ups:
        raise ValueError(f"LoRA layers with only one of lora_A / lora_B: {sorted(downs ^ ups)[:5]}.")
    config = lora_config or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    out = {}
    for prefix in sorted(downs):
        down, up = state_dict[f"{prefix}.lora_A.weight"], state_dict[f"{prefix}.lora_B.weight"]
        rank = down.shape[0]
        module = prefix.removeprefix("transformer.")
        alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), config.get("lora_alpha", rank))
        folded = scale * alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
        out[f"{prefix}.lora_A.weight"] = down
        out[f"{prefix}.lora_B.weight"] = up if folded == 1.0 else (up.double() * folded).to(up.dtype)
        out[f"{prefix}.alpha"] = torch.tensor(float(rank))  # ComfyUI: alpha / rank = 1, the scale is in lora_B
    return out


def _adapter_weights(adapter: str | os.PathLike, revision: str | None, token: str | None) -> Path:
    """The path of the adapter's LoRA weights (downloaded for a Hub id), with a clear error if it has none."""
    if _is_local(adapter):
        folder = Path(adapter).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(
                f"Adapter folder {str(folder)!r} does not exist. Pass the folder written by save_adapter or "
                "examples/train_scfm_lora.py (its --output_dir, or one of its checkpoint-* folders), or a Hub id."
            )
        if not (folder / WEIGHTS_NAME).is_file():
            raise FileNotFoundError(
                f"Adapter folder {str(folder)!r} holds no {WEIGHTS_NAME}, so there is nothing to export. Pass the "
                "folder written by save_adapter or examples/train_scfm_lora.py (its --output_dir, or one of its "
                "checkpoint-* folders), or re-save the adapter with scfm_diffusers.save_adapter."
            )
        if not (folder / SETTINGS_NAME).is_file():
            raise FileNotFoundError(
                f"Adapter folder {str(folder)!r} has LoRA weights but no {SETTINGS_NAME}, which says the family, shift, "
                "steps and calibrated LoRA scale the export needs. Re-save the adapter with scfm_diffusers.save_adapter "
                "(it writes both), or write the file from SCFMInferenceSettings.for_family(...).to_dict()."
            )
        return folder / WEIGHTS_NAME
    try:
        return Path(hf_hub_download(str(adapter), WEIGHTS_NAME, revision=revision, token=token))
    except (EntryNotFoundError, LocalEntryNotFoundError, HfHubHTTPError, OSError) as error:
        raise OSError(
            f"Could not read {WEIGHTS_NAME} of the Hub repository {str(adapter)!r} ({type(error).__name__}: {error}). "
            "Check the id, your token, and that HF_HUB_OFFLINE is not set; or pass a local adapter folder."
        ) from error


def export_comfyui_lora(
    adapter: str | os.PathLike,
    output_file: str | os.PathLike,
    num_inference_steps: int | None = None,
    *,
    revision: str | None = None,
    token: str | None = None,
) -> Path:
    """Write an SCFM adapter as one ComfyUI LoRA file, its calibrated LoRA scale for N steps folded in.

    The file holds ``transformer.<module>.lora_A.weight`` / ``.lora_B.weight`` / ``.alpha`` (alpha = rank), which
    ComfyUI's LoRA loaders accept for Flux and SD3, with ``lora_B`` scaled by ``settings.lora_scale_for(N)`` and
    the adapter's alpha / r: load it at strength 1.0. Its safetensors metadata records the SCFM settings
    (``scfm.*``: steps, shift, guidance, LoRA scale, base model) and the ComfyUI ones (``scfm.comfyui.*``: the
    model-sampling node and its inputs, sampler, scheduler, cfg, FluxGuidance), each value JSON-encoded.

    Args:
        adapter: Adapter folder (``save_adapter`` / the training script's output or checkpoint) or Hub id.
        output_file: The ``.safetensors`` file to write (its folder is created); put it in ComfyUI's
            ``models/loras``.
        num_inference_steps: Steps N the file is made for (default: the adapter's ``num_inference_steps``). A step
            count without a calibrated scale gets the adapter's default ``lora_scale``.
        revision: Hub revision, for a Hub id.
        token: Hub token, for a private Hub repository.

    Returns:
        The path written.

    Raises:
        FileNotFoundError: The adapter folder does not exist or holds no LoRA weights or settings.
        OSError: The Hub repository could not be read.
        ValueError: N < 1, an output name that is not ``.safetensors``, or weights ComfyUI would not load.
    """
    return _export(adapter, output_file, num_inference_steps, revision=revision, token=token)[0]


def _export(
    adapter: str | os.PathLike,
    output_file: str | os.PathLike,
    num_inference_steps: int | None,
    *,
    revision: str | None,
    token: str | None,
) -> tuple[Path, SCFMInferenceSettings, ComfyUISampling, float]:
    """:func:`export_comfyui_lora`, also returning the settings, the ComfyUI settings and the folded LoRA scale."""
    output_file = Path(output_file)
    if output_file.suffix != ".safetensors":
        raise ValueError(
            f"The output must be a .safetensors file (ComfyUI's LoRA loaders list those), got {str(output_file)!r}."
        )
    weights_path = _adapter_weights(adapter, revision, token)
    settings = load_adapter_settings(adapter, revision=revision, token=token)
    steps = settings.num_inference_steps if num_inference_steps is None else num_inference_steps
    sampling = comfyui_sampling(settings, steps)
    scale = settings.lora_scale_for(steps)

    with safe_open(weights_path, framework="pt") as weights:
        lora_config = _lora_config(weights.metadata())
        state_dict = {key: weights.get_tensor(key) for key in weights.keys()}
    if lora_config is None:
        logger.warning("%s has no LoRA config metadata: assuming alpha = rank, as diffusers does.", weights_path)
    comfy_state_dict = comfyui_lora_state_dict(state_dict, lora_config, scale)

    record = {
        "family": settings.family,
        "base_model": settings.base_model,
        "num_inference_steps": steps,
        "lora_scale": scale,
        "shift": settings.shift,
        "use_dynamic_shifting": settings.use_dynamic_shifting,
        "guidance_scale": settings.guidance_scale,
        "adapter": None if _is_local(adapter) else str(adapter),  # a Hub id; never a local path
    }
    metadata = {"format": "pt"}
    metadata.update({f"scfm.{key}": json.dumps(value) for key, value in record.items()})
    metadata.update({f"scfm.comfyui.{key}": json.dumps(value) for key, value in asdict(sampling).items()})
    output_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(output_file)  # a crash never leaves half a LoRA in ComfyUI's folder
    save_file({key: value.contiguous() for key, value in comfy_state_dict.items()}, tmp, metadata=metadata)
    os.replace(tmp, output_file)
    logger.info(
        "Wrote %s: %d LoRA layers, LoRA scale %g for %d steps.", output_file, len(state_dict) // 2, scale, steps
    )
    return output_file, settings, sampling, scale


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the ``scfm-export-comfyui`` command line."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Export an SCFM adapter as a single-file ComfyUI LoRA (load it at strength 1.0: the calibrated "
        "LoRA scale for --steps is folded in) and print the ComfyUI nodes that sample its SCFM grid.",
    )
    parser.add_argument("--adapter", required=True, help="Adapter folder (save_adapter / training output) or Hub id.")
    parser.add_argument(
        "--steps", type=int, default=None, help="Sampling steps N to export for (default: the adapter's own)."
    )
    parser.add_argument("--output", required=True, help="The .safetensors file to write (ComfyUI's models/loras).")
    parser.add_argument("--revision", default=None, help="Hub revision of --adapter.")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """The ``scfm-export-comfyui`` command: 0 on success, 2 for a usage error, 1 when the export fails.

    The path written and the ComfyUI settings go to stdout; an expected failure (missing adapter or weights,
    unreadable Hub repository, bad step count) is one ``scfm-export-comfyui: error: ...`` line on stderr.
    """
    try:
        args = parse_args(argv)
    except SystemExit as stop:  # argparse: --help (0) or a usage error (2), already printed
        return stop.code if isinstance(stop.code, int) else 2
    try:
        path, settings, sampling, scale = _export(
            args.adapter, args.output, args.steps, revision=args.revision, token=None
        )
    except (OSError, ValueError) as error:
        print(" ".join(f"{PROG}: error: {type(error).__name__}: {error}".split()), file=sys.stderr)
        return 1
    print(f"Wrote {path}")
    print(f"ComfyUI ({settings.family}, {sampling.steps} steps, LoRA scale {scale:g} folded in):")
    print(f"  {sampling.describe()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
