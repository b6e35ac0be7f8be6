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
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name -> the submodule that defines it
_EXPORTS = {
    "FlowMatchSCFMScheduler": "scheduling_flow_match_scfm",
    "SCFMPipeline": "pipeline_scfm",
    "SCFMFluxPipeline": "pipeline_scfm",
    "SCFMStableDiffusion3Pipeline": "pipeline_scfm",
    "SCFMInferenceSettings": "settings",
    "create_adapter_repo": "hub",
    "load_adapter_settings": "adapter",
    "push_adapter": "hub",
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
    from .adapter import load_adapter_settings, save_adapter
    from .comfyui import export_comfyui_lora
    from .hub import create_adapter_repo, push_adapter
    from .pipeline_scfm import SCFMFluxPipeline, SCFMPipeline, SCFMStableDiffusion3Pipeline
    from .scheduling_flow_match_scfm import FlowMatchSCFMScheduler
    from .settings import SCFMInferenceSettings


class _ImportedOnUse(types.ModuleType):
    """A stand-in for a submodule in ``sys.modules`` that imports the real one when a name of it is asked for.

    diffusers finds the library of a saved non-diffusers component (our scheduler, named in a saved pipeline's
    ``model_index.json``) in ``sys.modules`` only: ``import scfm_diffusers`` must be enough for
    ``DiffusionPipeline.from_pretrained`` to load an SCFM pipeline, without making every import (and the training
    script's ``--help``) pay for importing diffusers. Dunder look-ups (``__file__``: torch's ``inspect.getmodule``
    walks every module while torch itself is being imported) never import anything.
    """

    def __getattr__(self, attribute: str) -> Any:
        if attribute.startswith("__"):
            raise AttributeError(attribute)
        if sys.modules.get(self.__name__) is self:
            del sys.modules[self.__name__]  # the real import replaces the stand-in
        return getattr(importlib.import_module(self.__name__), attribute)


def _register_on_use(submodule: str) -> None:
    name = f"{__name__}.{submodule}"
    if name not in sys.modules:
        stand_in = _ImportedOnUse(name)
        stand_in.__file__ = importlib.util.find_spec(name).origin
        sys.modules[name] = stand_in


_register_on_use("scheduling_flow_match_scfm")


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
