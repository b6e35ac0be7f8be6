"""The model families SCFM supports (Flux, SD3) and their method defaults, in one registry.

Everything that differs between Flux and SD3 at inference time is a field of :class:`ModelFamily`; code
elsewhere looks a family up instead of branching on names.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from diffusers import FluxPipeline, FluxTransformer2DModel, SD3Transformer2DModel, StableDiffusion3Pipeline

__all__ = [
    "FAMILIES",
    "ModelFamily",
    "family_of_class_name",
    "family_of_pipeline",
    "family_of_transformer",
    "get_family",
]


@dataclass(frozen=True)
class ModelFamily:
    """A flow-matching model family and the method's defaults for it.

    Attributes:
        name: Registry key (``"flux"`` or ``"sd3"``), stored in adapter settings.
        pipeline_class: The stock diffusers text-to-image pipeline.
        transformer_class: The diffusers transformer class that identifies the family.
        pipeline_class_names: ``_class_name`` values in ``model_index.json`` that belong to the family.
        default_settings: Inference defaults (steps, shift, guidance, LoRA scale) from the method doc.
    """

    name: str
    pipeline_class: type
    transformer_class: type
    pipeline_class_names: tuple[str, ...]
    default_settings: dict = field(default_factory=dict)


FAMILIES: dict[str, ModelFamily] = {
    family.name: family
    for family in (
        ModelFamily(
            name="flux",
            pipeline_class=FluxPipeline,
            transformer_class=FluxTransformer2DModel,
            pipeline_class_names=("FluxPipeline", "SCFMFluxPipeline"),
            # Reference sampler: fixed shift 3.25, embedded guidance 3.5-5, no true CFG.
            default_settings={"num_inference_steps": 4, "shift": 3.25, "guidance_scale": 3.5, "lora_scale": 1.0},
        ),
        ModelFamily(
            name="sd3",
            pipeline_class=StableDiffusion3Pipeline,
            transformer_class=SD3Transformer2DModel,
            pipeline_class_names=("StableDiffusion3Pipeline", "SCFMStableDiffusion3Pipeline"),
            # Reference sampler: fixed shift 3.0, CFG 4, 8 steps.
            default_settings={"num_inference_steps": 8, "shift": 3.0, "guidance_scale": 4.0, "lora_scale": 1.0},
        ),
    )
}


def _unsupported(what: str) -> ValueError:
    return ValueError(
        f"{what} is not a supported flow-matching model family. SCFM supports: "
        + ", ".join(
            f"{f.name} ({f.pipeline_class.__name__} with {f.transformer_class.__name__})" for f in FAMILIES.values()
        )
        + "."
    )


def get_family(name: str) -> ModelFamily:
    """Return the registered family called ``name``; raises ``ValueError`` listing the known ones."""
    if name not in FAMILIES:
        raise _unsupported(f"Family {name!r}")
    return FAMILIES[name]


def family_of_transformer(transformer) -> ModelFamily:
    """Return the family of a diffusers transformer instance (also when it carries peft adapters)."""
    for family in FAMILIES.values():
        if isinstance(transformer, family.transformer_class):
            return family
    raise _unsupported(f"A transformer of class {type(transformer).__name__}")


def family_of_pipeline(pipeline) -> ModelFamily:
    """Return the family of a pipeline instance, judged by its pipeline class and its transformer."""
    for family in FAMILIES.values():
        if isinstance(pipeline, family.pipeline_class):
            return family
    transformer = getattr(pipeline, "transformer", None)
    if transformer is None:
        raise _unsupported(f"A {type(pipeline).__name__} (it has no `transformer`)")
    return family_of_transformer(transformer)


def family_of_class_name(class_name: str) -> ModelFamily:
    """Return the family whose ``model_index.json`` ``_class_name`` is ``class_name``."""
    for family in FAMILIES.values():
        if class_name in family.pipeline_class_names:
            return family
    raise _unsupported(f"A pipeline of class {class_name!r}")
