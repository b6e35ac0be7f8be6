"""scfm-diffusers: shortcut pre-trained flow-matching models (FLUX.1, SD3, Qwen-Image, Flux.2 Klein, Z-Image,
Chroma, ...) into 3-8 step samplers with SCFM.

Public API::

    FlowMatchSCFMScheduler          the SCFM sampling grid as a diffusers scheduler
    SCFMPipeline                    picks the SCFM pipeline of a base model's family (SCFMFluxPipeline, ...)
    SCFMFluxPipeline, SCFMStableDiffusion3Pipeline, ...   one per family (scfm_diffusers.families)
    SCFMInferenceSettings, save_adapter, load_adapter_settings, create_adapter_repo, push_adapter   the adapter folder

Names are imported on first use (as diffusers does), so that ``scfm_diffusers.training.config`` and command-line
``--help`` answer without loading diffusers.
"""

from __future__ import annotations

import importlib
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
}

__all__ = [
    "FlowMatchSCFMScheduler",
    "SCFMFluxPipeline",
    "SCFMInferenceSettings",
    "SCFMPipeline",
    "SCFMStableDiffusion3Pipeline",
    "create_adapter_repo",
    "load_adapter_settings",
    "push_adapter",
    "save_adapter",
]
assert sorted(__all__) == sorted(_EXPORTS)

if TYPE_CHECKING:
    from .adapter import SCFMInferenceSettings, create_adapter_repo, load_adapter_settings, push_adapter, save_adapter
    from .pipeline_scfm import SCFMFluxPipeline, SCFMPipeline, SCFMStableDiffusion3Pipeline
    from .scheduling_flow_match_scfm import FlowMatchSCFMScheduler


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
