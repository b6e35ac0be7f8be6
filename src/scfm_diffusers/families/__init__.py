"""The model families SCFM supports, in ONE registry: adding a family is one file plus one line here.

Every model-specific fact lives in a :class:`~scfm_diffusers.families.base.Family` subclass; code elsewhere
looks a family up (by name, pipeline, transformer or ``model_index.json`` class name) and never branches on
its name. Families whose classes the installed diffusers lacks stay registered but report
``available == False`` and raise a clear ``ImportError`` when used.

Example:
    >>> from scfm_diffusers.families import get_family
    >>> family = get_family("flux")
    >>> family.pipeline_class.__name__, family.default_settings["shift"]
    ('FluxPipeline', 3.25)
"""

from __future__ import annotations

import diffusers

from .base import ConditioningConfig, Family, LoraExperts, VelocityFn, pipeline_samples
from .chroma import ChromaFamily
from .flux import FluxFamily
from .flux2klein import Flux2KleinFamily
from .qwenimage import QwenImageFamily
from .sd3 import SD3Family
from .wan import WanFamily
from .zimage import ZImageFamily

__all__ = [
    "FAMILIES",
    "ConditioningConfig",
    "Family",
    "LoraExperts",
    "VelocityFn",
    "available_families",
    "family_of_class_name",
    "family_of_pipeline",
    "family_of_transformer",
    "get_family",
    "pipeline_samples",
]

#: name -> family. The one registry: pipelines, training, adapters and tests all read it.
FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (
        FluxFamily(),
        SD3Family(),
        QwenImageFamily(),
        Flux2KleinFamily(),
        ZImageFamily(),
        ChromaFamily(),
        WanFamily(),
    )
}


def available_families() -> list[Family]:
    """The registered families whose classes the installed diffusers has."""
    return [family for family in FAMILIES.values() if family.available]


def _unsupported(what: str) -> ValueError:
    return ValueError(
        f"{what} is not a supported flow-matching model family. SCFM supports: "
        + ", ".join(f"{f.name} ({f.pipeline_class_name} with {f.transformer_class_name})" for f in FAMILIES.values())
        + "."
    )


def get_family(name: str) -> Family:
    """Return the registered family called ``name``; raises ``ValueError`` listing the known ones."""
    if name not in FAMILIES:
        raise _unsupported(f"Family {name!r}")
    return FAMILIES[name]


def family_of_transformer(transformer) -> Family:
    """Return the family of a diffusers transformer instance (also when it carries peft adapters, or is a
    :class:`~scfm_diffusers.families.base.LoraExperts` of several)."""
    if isinstance(transformer, LoraExperts):
        transformer = next(iter(transformer.experts().values()))
    for family in available_families():
        if isinstance(transformer, family.transformer_class):
            return family
    raise _unsupported(f"A transformer of class {type(transformer).__name__}")


def family_of_pipeline(pipeline) -> Family:
    """Return the family of a pipeline instance, judged by its pipeline class, else by its transformer."""
    for family in available_families():
        if isinstance(pipeline, family.pipeline_class):
            return family
    transformer = getattr(pipeline, "transformer", None)
    if transformer is None:
        raise _unsupported(f"A {type(pipeline).__name__} (it has no `transformer`)")
    return family_of_transformer(transformer)


def family_of_class_name(class_name: str) -> Family:
    """Return the family whose ``model_index.json`` ``_class_name`` is ``class_name``."""
    for family in FAMILIES.values():
        if class_name in family.pipeline_class_names:
            if not family.available:
                raise ImportError(
                    f"{class_name} is a {family.name} model, but diffusers {diffusers.__version__} lacks "
                    f"{family.pipeline_class_name}: upgrade diffusers (pip install -U diffusers)."
                )
            return family
    raise _unsupported(f"A pipeline of class {class_name!r}")
