"""scfm-diffusers: shortcut pre-trained flow-matching models (FLUX.1, SD3, Qwen-Image, Flux.2 Klein, Z-Image,
Chroma, ...) into 3-8 step samplers with SCFM.

Public API::

    FlowMatchSCFMScheduler          the SCFM sampling grid as a diffusers scheduler
    SCFMPipeline                    picks the SCFM pipeline of a base model's family (SCFMFluxPipeline, ...)
    SCFMFluxPipeline, SCFMStableDiffusion3Pipeline, ...   one per family (scfm_diffusers.families)
    SCFMInferenceSettings, save_adapter, load_adapter_settings, create_adapter_repo, push_adapter   the adapter folder
    export_comfyui_lora             a single-file ComfyUI LoRA for one step count, calibrated scale folded in

Names are imported on first use (as diffusers does), so that ``scfm_diffusers.training.config`` and command-line
``--help`` answer without loading diffusers.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name -> the submodule that defines it
_EXPORTS = {
    "FlowMatchSCFMScheduler": "scheduling_flow_match_scfm",
    "SCFMPipeline": "pipeline_scfm",
    "SCFMFluxPipeline": "pipeline_scfm",
    "SCFMStableDiffusion3Pipeline": "pipeline_scfm",
    "SCFMInferenceSettings": "adapter",
    "create_adapter_repo": "adapter",
    "load_adapter_settings": "adapter",
    "push_adapter": "adapter",
    "save_adapter": "adapter",
    "export_comfyui_lora": "comfyui",
}

__all__ = [
    "FlowMatchSCFMScheduler",
    "SCFMFluxPipeline",
    "SCFMInferenceSettings",
    "SCFMPipeline",
    "SCFMStableDiffusion3Pipeline",
    "create_adapter_repo",
    "export_comfyui_lora",
    "load_adapter_settings",
    "push_adapter",
    "save_adapter",
]
assert sorted(__all__) == sorted(_EXPORTS)

if TYPE_CHECKING:
    from .adapter import SCFMInferenceSettings, create_adapter_repo, load_adapter_settings, push_adapter, save_adapter
    from .comfyui import export_comfyui_lora
    from .pipeline_scfm import SCFMFluxPipeline, SCFMPipeline, SCFMStableDiffusion3Pipeline
    from .scheduling_flow_match_scfm import FlowMatchSCFMScheduler


def _register_lazily(submodule: str) -> None:
    """Put ``scfm_diffusers.<submodule>`` into ``sys.modules`` now and run it on first attribute access.

    diffusers finds the library of a saved non-diffusers component (our scheduler, named in a saved pipeline's
    ``model_index.json``) in ``sys.modules`` only: ``import scfm_diffusers`` must be enough for
    ``DiffusionPipeline.from_pretrained`` to load an SCFM pipeline, without making every import pay for diffusers.
    """
    name = f"{__name__}.{submodule}"
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    spec.loader = importlib.util.LazyLoader(spec.loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)


_register_lazily("scheduling_flow_match_scfm")


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
