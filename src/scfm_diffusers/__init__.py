"""scfm-diffusers: shortcut pre-trained Flux / SD3 flow-matching models into 3-8 step samplers (SCFM).

Public API::

    FlowMatchSCFMScheduler          the SCFM sampling grid as a diffusers scheduler
    SCFMPipeline                    picks SCFMFluxPipeline / SCFMStableDiffusion3Pipeline for a base model
    SCFMFluxPipeline, SCFMStableDiffusion3Pipeline
    SCFMInferenceSettings, save_adapter, load_adapter_settings, create_adapter_repo, push_adapter   the adapter folder
"""

from .adapter import SCFMInferenceSettings, create_adapter_repo, load_adapter_settings, push_adapter, save_adapter
from .pipeline_scfm import SCFMFluxPipeline, SCFMPipeline, SCFMStableDiffusion3Pipeline
from .scheduling_flow_match_scfm import FlowMatchSCFMScheduler

__version__ = "0.1.0"

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
