"""SCFM pipelines: thin subclasses of each family's stock diffusers pipeline that sample with an SCFM adapter.

One subclass per registered family (:mod:`scfm_diffusers.families`), generated from the registry: the
subclasses change defaults and the scheduler only; denoising is diffusers' own ``__call__``. Their
``__call__`` has the stock signature (built from it, not copied) plus ``shift`` and ``lora_scale``; their
``save_pretrained`` writes a folder that the SCFM pipelines, the stock pipeline classes and
``DiffusionPipeline`` all load (see docs/inference.md, "Saving and reloading").
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict

from .adapter import (
    SETTINGS_NAME,
    WEIGHTS_NAME,
    SCFMInferenceSettings,
    _fold_lora_alpha,
    adapter_weights_file,
    load_adapter_settings,
)
from .families import FAMILIES, Family, family_of_class_name, family_of_pipeline
from .scheduling_flow_match_scfm import FlowMatchSCFMScheduler

__all__ = [
    "SCFM_PIPELINE_CLASSES",
    "SCFMFluxPipeline",
    "SCFMPipeline",
    "SCFMPipelineMixin",
    "SCFMStableDiffusion3Pipeline",
    "scfm_pipeline_class",
]

SCFM_ADAPTER_NAME = "scfm"
logger = logging.getLogger(__name__)


class SCFMPipelineMixin:
    """Shared behaviour of the SCFM pipelines: adapter loading, settings as call defaults, the SCFM scheduler.

    ``pipe(prompt)`` uses the adapter's steps, shift, guidance and LoRA scale; each can be overridden per call
    (``num_inference_steps=``, ``shift=``, ``guidance_scale=``, ``lora_scale=``). The default LoRA scale is the
    one calibrated for the call's step count when the adapter has one (``lora_scales``), else ``lora_scale``.
    ``lora_scale`` goes through the family's attention kwargs (``joint_attention_kwargs={"scale": ...}`` for
    Flux, SD3, Z-Image and Chroma; ``attention_kwargs`` for Qwen-Image, Flux.2 and Wan), so it scales every
    LoRA loaded on the transformer.

    Each subclass gets its own ``__call__`` (see :meth:`__init_subclass__`): its signature is the stock parent's
    (every parameter, same kinds and defaults) with ``num_inference_steps`` and ``guidance_scale`` defaulting to
    None ("the adapter's") plus keyword-only ``shift`` and ``lora_scale``; the body is the parent's ``__call__``.
    """

    _scfm_settings: SCFMInferenceSettings | None = None

    @property
    def scfm_settings(self) -> SCFMInferenceSettings:
        """The settings in force: the loaded adapter's, or the method's defaults for this family."""
        if self._scfm_settings is None:
            self._scfm_settings = SCFMInferenceSettings.for_family(family_of_pipeline(self).name)
        return self._scfm_settings

    def set_scfm_settings(self, settings: SCFMInferenceSettings | None = None, **overrides: Any) -> None:
        """Replace the default settings (validated) and install the matching :class:`FlowMatchSCFMScheduler`."""
        settings = (settings or self.scfm_settings).replace(**overrides)
        family = family_of_pipeline(self)
        if settings.family != family.name:
            raise ValueError(f"These settings are for {settings.family!r} but this is a {family.name} pipeline.")
        self._scfm_settings = settings
        self.scheduler = settings.make_scheduler(self.scheduler.config)

    def load_scfm_adapter(
        self,
        adapter: str | os.PathLike,
        *,
        adapter_name: str = SCFM_ADAPTER_NAME,
        revision: str | None = None,
        token: str | None = None,
        **overrides: Any,
    ) -> None:
        """Load an SCFM adapter (local folder or Hub id): LoRA weights plus its settings and scheduler.

        Args:
            adapter: Adapter folder or Hub repository id.
            adapter_name: peft adapter name for the LoRA on the transformer.
            revision: Hub revision.
            token: Hub token.
            **overrides: Settings to change from the adapter's (e.g. ``num_inference_steps=4``).

        Raises:
            ValueError: The settings are invalid or for another family, the weights file is truncated or damaged,
                or the LoRA's shapes do not fit this transformer (one line: how many tensors, the first one's
                shapes); the pipeline then keeps its previous settings and scheduler.
        """
        settings = load_adapter_settings(adapter, revision=revision, token=token)
        previous = self._scfm_settings, self.scheduler
        self.set_scfm_settings(settings, **overrides)  # checks the family before touching the weights

        def quiet(record: logging.LogRecord) -> bool:  # diffusers logs the whole mismatch list, then raises it
            return "was unsuccessful with the following error" not in record.getMessage()

        peft_logger = logging.getLogger("diffusers.loaders.peft")
        peft_logger.addFilter(quiet)
        try:
            adapter_weights_file(adapter, revision=revision, token=token)  # header and size, before diffusers
            self._check_experts(adapter, settings)  # before any weights load: a refused adapter leaves no LoRA
            self.load_lora_weights(adapter, adapter_name=adapter_name, revision=revision, token=token)
            self._load_expert_loras(adapter, settings, adapter_name=adapter_name, revision=revision, token=token)
        except (RuntimeError, ValueError) as error:
            self._scfm_settings, self.scheduler = previous
            shape = r"torch\.Size\((\[[^\]]*\])\)"
            mismatches = re.findall(rf"size mismatch for (\S+): .*?{shape}.*?{shape}", str(error))
            if not mismatches:
                raise
            name, stored, expected = mismatches[0]
            raise ValueError(
                f"SCFM adapter {str(adapter)!r} does not fit this {type(self.transformer).__name__}: "
                f"{len(mismatches)} LoRA tensors have other shapes, e.g. {name} is {stored} in {WEIGHTS_NAME} "
                f"but {expected} here. It was trained on another base model "
                f"({settings.base_model or 'see its scfm_settings.json'}) or its file's LoRA config (rank) does not "
                "match its tensors: load it into the base it was trained on, or save the adapter again."
            ) from None
        finally:
            peft_logger.removeFilter(quiet)

    def _check_experts(self, adapter: str | os.PathLike, settings: SCFMInferenceSettings) -> None:
        """Refuse an adapter with a LoRA for an expert this pipeline lacks; warn about an expert it has no LoRA for."""
        for component, weight_name in settings.expert_weights.items():
            if getattr(self, component, None) is None:
                raise ValueError(
                    f"The SCFM adapter {str(adapter)!r} has a LoRA for {component} ({weight_name}), which this "
                    f"{type(self).__name__} does not have: it was trained on a two-expert base (Wan 2.2 A14B). Load "
                    "it into that base model."
                )
        for component in ("transformer_2",):
            if getattr(self, component, None) is not None and component not in settings.expert_weights:
                logger.warning(
                    "The SCFM adapter %s has no LoRA for %s: that expert samples without it, as the base does.",
                    adapter,
                    component,
                )

    def _load_expert_loras(
        self, adapter: str | os.PathLike, settings: SCFMInferenceSettings, *, adapter_name: str, **hub: Any
    ) -> None:
        """Each further expert's LoRA from its own file (Wan 2.2: ``load_into_transformer_2``), as stock diffusers
        loads it."""
        for component, weight_name in settings.expert_weights.items():
            self.load_lora_weights(
                adapter, weight_name=weight_name, adapter_name=adapter_name, **{f"load_into_{component}": True}, **hub
            )

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Give each pipeline class a ``__call__`` with its stock parent's signature plus the SCFM arguments."""
        super().__init_subclass__(**kwargs)
        # A subclass of an SCFM pipeline inherits its parent's wrapper; one that defines __call__ keeps its own.
        if "__call__" not in vars(cls) and not hasattr(cls.__call__, "__scfm_parent_call__"):
            cls.__call__ = _scfm_call(cls.__call__)
            cls.__call__.__qualname__ = f"{cls.__qualname__}.__call__"

    def _call_with_scfm_settings(self, parent_call: Callable[..., Any], arguments: dict[str, Any]) -> Any:
        """Fill the SCFM defaults into ``arguments`` (the caller's, by name) and run the stock ``__call__``."""
        settings = self.scfm_settings
        if not isinstance(self.scheduler, FlowMatchSCFMScheduler):
            self.scheduler = settings.make_scheduler(self.scheduler.config)
        shift = arguments.pop("shift", None)
        lora_scale = arguments.pop("lora_scale", None)
        if arguments.get("num_inference_steps") is None:
            arguments["num_inference_steps"] = settings.num_inference_steps
        if arguments["num_inference_steps"] < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {arguments['num_inference_steps']}.")
        family = family_of_pipeline(self)
        family.fill_guidance(arguments, settings.guidance_scale)
        # An explicit {"scale": ...} in the attention kwargs wins over lora_scale, as in the stock pipelines.
        kwarg = family.lora_scale_kwarg
        attention_kwargs = dict(arguments.get(kwarg) or {})
        if lora_scale is None:  # the scale calibrated for this step count, else the adapter's default
            lora_scale = settings.lora_scale_for(arguments["num_inference_steps"])
            explicit = "scale" in attention_kwargs
            if not explicit and lora_scale != settings.lora_scale and _fused_lora_adapters(self.transformer):
                logger.warning(
                    f"The LoRA is fused into the transformer, so the scale calibrated for "
                    f"{arguments['num_inference_steps']} steps ({lora_scale:g}) cannot be applied: a fused LoRA keeps "
                    "the scale it was fused at. Call pipe.unfuse_lora(), or fuse at "
                    f"pipe.scfm_settings.lora_scale_for({arguments['num_inference_steps']})."
                )
        attention_kwargs.setdefault("scale", lora_scale)
        arguments[kwarg] = attention_kwargs

        saved_shift = self.scheduler.shift
        if shift is not None:
            if shift <= 0:
                raise ValueError(f"shift must be > 0, got {shift}.")
            self.scheduler.set_shift(shift)
        try:
            return parent_call(self, **arguments)
        finally:
            self.scheduler.set_shift(saved_shift)

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
        """Save the pipeline so that the SCFM pipelines, the stock class and ``DiffusionPipeline`` reload it.

        On top of diffusers' folder it writes ``scfm_settings.json`` (steps, shift, guidance, LoRA scale) and
        names the stock class (``FluxPipeline`` / ``StableDiffusion3Pipeline``) as ``_class_name`` in
        ``model_index.json``. A LoRA that is loaded but not fused is kept apart, as in an adapter folder:
        ``transformer/`` gets the base weights and ``pytorch_lora_weights.safetensors`` the LoRA, so the folder
        also works as ``adapter=``. A fused LoRA is saved inside the transformer weights.

        Args:
            save_directory: Output folder (created).
            *args: Passed to :meth:`diffusers.DiffusionPipeline.save_pretrained`.
            **kwargs: Passed to :meth:`diffusers.DiffusionPipeline.save_pretrained` (``safe_serialization``,
                ``variant``, ``max_shard_size``, ``push_to_hub``, ...).

        Raises:
            ValueError: The transformer carries more than one unfused LoRA adapter.
        """
        directory = Path(save_directory)
        for component in ("transformer_2",):
            if getattr(self, component, None) is not None and _unfused_lora_adapters(getattr(self, component)):
                raise ValueError(
                    f"save_pretrained keeps a LoRA of the transformer only, but {component} carries one too: fuse "
                    "both (`pipe.fuse_lora(components=['transformer', 'transformer_2'])`, then "
                    "`pipe.unload_lora_weights()`) before saving, or save the adapter with scfm_diffusers.save_adapter."
                )
        unfused = _unfused_lora_adapters(self.transformer)
        if len(unfused) > 1:
            raise ValueError(
                f"save_pretrained keeps one unfused LoRA next to the base weights, but the transformer carries "
                f"{len(unfused)}: {unfused}. Fuse them into the weights first (`pipe.fuse_lora(adapter_names=...)` "
                "then `pipe.unload_lora_weights()`) or remove the ones you do not need (`pipe.delete_adapters(name)`)."
            )
        directory.mkdir(parents=True, exist_ok=True)
        settings = self.scfm_settings.to_dict()
        (directory / SETTINGS_NAME).write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
        (directory / WEIGHTS_NAME).unlink(missing_ok=True)  # a LoRA left by an earlier save would be loaded again
        if unfused:
            (name,) = unfused
            # alpha / r folded into lora_B, as in an adapter folder: every loader (ComfyUI too) scales it alike.
            weights, config = _fold_lora_alpha(
                self.transformer, name, get_peft_model_state_dict(self.transformer, adapter_name=name)
            )
            self.save_lora_weights(
                directory, transformer_lora_layers=weights, transformer_lora_adapter_metadata=config
            )
        with _base_weights_in_state_dict(self.transformer):
            super().save_pretrained(directory, *args, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> SCFMPipelineMixin:
        """Load a diffusers pipeline folder or Hub id; a folder saved by an SCFM pipeline gets its SCFM state back.

        The SCFM state is ``scfm_settings.json`` and, if present, the unfused LoRA (adapter name ``"scfm"``);
        both are read from local folders only (for a Hub repository, ``huggingface_hub.snapshot_download`` it
        and pass the folder).

        Args:
            pretrained_model_name_or_path: Pipeline folder or Hub id.
            **kwargs: Passed to :meth:`diffusers.DiffusionPipeline.from_pretrained`.
        """
        pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        folder = Path(pretrained_model_name_or_path)
        if os.path.isdir(folder) and (folder / SETTINGS_NAME).is_file():
            if (folder / WEIGHTS_NAME).is_file():
                pipe.load_scfm_adapter(folder)
            else:
                pipe.set_scfm_settings(_read_settings(folder / SETTINGS_NAME))
        return pipe

    def to_json_string(self) -> str:
        """The pipeline config as written to ``model_index.json``: ``_class_name`` is the stock pipeline class.

        diffusers' ``DiffusionPipeline.from_pretrained`` resolves ``_class_name`` in the ``diffusers`` package
        only, so a saved SCFM pipeline names its stock parent; the SCFM pipelines load either name.
        """
        config = json.loads(super().to_json_string())
        config["_class_name"] = family_of_pipeline(self).pipeline_class.__name__
        return json.dumps(config, indent=2, sort_keys=True) + "\n"


_SCFM_PARAMETERS = (
    inspect.Parameter("shift", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=float | None),
    inspect.Parameter("lora_scale", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=float | None),
)
#: Stock parameters whose default becomes None, meaning "the adapter's setting".
_SETTINGS_DEFAULTS = {"num_inference_steps": int | None, "guidance_scale": float | None}


def _scfm_call_signature(parent_call: Callable[..., Any]) -> inspect.Signature:
    """The stock ``__call__`` signature with the settings' parameters defaulting to None, plus the SCFM ones."""
    parent = inspect.signature(parent_call)
    names = set(parent.parameters)
    missing = sorted(set(_SETTINGS_DEFAULTS) - names)
    if not names & {"joint_attention_kwargs", "attention_kwargs"}:
        missing.append("joint_attention_kwargs or attention_kwargs")
    clashing = sorted(names & {p.name for p in _SCFM_PARAMETERS})
    if missing or clashing or any(p.kind is p.VAR_POSITIONAL for p in parent.parameters.values()):
        raise TypeError(
            f"{parent_call.__qualname__} cannot be wrapped as an SCFM pipeline call: it needs the parameters "
            "num_inference_steps, guidance_scale and (joint_)attention_kwargs, none called shift or lora_scale, "
            f"and no *args (missing: {missing}, clashing: {clashing})."
        )
    parameters = [
        p.replace(default=None, annotation=_SETTINGS_DEFAULTS[p.name]) if p.name in _SETTINGS_DEFAULTS else p
        for p in parent.parameters.values()
        if p.kind is not p.VAR_KEYWORD
    ]
    parameters += _SCFM_PARAMETERS
    parameters += [p for p in parent.parameters.values() if p.kind is p.VAR_KEYWORD]
    return parent.replace(parameters=parameters)


def _scfm_call(parent_call: Callable[..., Any]) -> Callable[..., Any]:
    """A ``__call__`` for an SCFM pipeline class: binds like the stock one, then adds the SCFM defaults."""
    signature = _scfm_call_signature(parent_call)
    var_keyword = next((p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD), None)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        arguments = dict(signature.bind(self, *args, **kwargs).arguments)  # TypeError for unknown names
        del arguments[next(iter(signature.parameters))]  # self
        arguments.update(arguments.pop(var_keyword, None) or {})
        return self._call_with_scfm_settings(parent_call, arguments)

    __call__.__signature__ = signature
    __call__.__scfm_parent_call__ = parent_call
    __call__.__doc__ = (
        f"Run :meth:`{parent_call.__qualname__}` with the SCFM settings (``scfm_settings``) as defaults.\n\n"
        "    SCFM arguments (every other argument is the stock pipeline's, with its default):\n"
        "        num_inference_steps (int | None): Euler steps (None: the adapter's).\n"
        "        guidance_scale (float | None): embedded guidance or CFG scale, as the family uses it (None: the "
        "adapter's).\n"
        "        shift (float | None): Fixed shift of the σ grid, this call only (None: the scheduler's).\n"
        "        lora_scale (float | None): LoRA strength, sent as ``(joint_)attention_kwargs={'scale': ...}`` "
        "unless that already holds a scale (None: the adapter's scale for this step count, see "
        "``SCFMInferenceSettings.lora_scale_for``).\n\n"
        f"    Stock documentation:\n{parent_call.__doc__ or ''}"
    )
    return __call__


def _read_settings(path: Path) -> SCFMInferenceSettings:
    """Read a ``scfm_settings.json`` written by :meth:`SCFMPipelineMixin.save_pretrained`."""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); re-save the pipeline or delete the file.") from error
    return SCFMInferenceSettings.from_dict(data)


def _lora_layers(transformer: torch.nn.Module) -> dict[str, BaseTunerLayer]:
    """The peft-wrapped layers of a model, by module name."""
    return {name: module for name, module in transformer.named_modules() if isinstance(module, BaseTunerLayer)}


def _fused_lora_adapters(transformer: torch.nn.Module) -> list[str]:
    """Names of the LoRA adapters merged into the weights of ``transformer``."""
    return sorted({name for layer in _lora_layers(transformer).values() for name in layer.merged_adapters})


def _unfused_lora_adapters(transformer: torch.nn.Module) -> list[str]:
    """Names of the LoRA adapters on ``transformer`` that are not merged into its weights."""
    layers = _lora_layers(transformer)
    if not layers:  # also after unload_lora_weights(), which may leave peft_config behind
        return []
    return sorted(set(transformer.peft_config) - set(_fused_lora_adapters(transformer)))


@contextmanager
def _base_weights_in_state_dict(transformer: torch.nn.Module) -> Iterator[None]:
    """While active, ``transformer.state_dict()`` holds the plain model's weights under the plain model's names.

    A peft-wrapped layer ``to_q`` stores ``to_q.base_layer.weight`` and ``to_q.lora_A.<name>.weight``; a model
    saved like that loads as neither the base model nor the LoRA model. The hook replaces each wrapped layer's
    entries by its base layer's (which hold any fused LoRA), without copying or changing the weights.
    """
    layers = _lora_layers(transformer)

    def keep_base_weights(module: torch.nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
        for name, layer in layers.items():
            layer_prefix = f"{prefix}{name}."
            for key in [key for key in state_dict if key.startswith(layer_prefix)]:
                del state_dict[key]
            for key, value in layer.get_base_layer().state_dict().items():
                state_dict[layer_prefix + key] = value

    handle = transformer.register_state_dict_post_hook(keep_base_weights) if layers else None
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()


def _make_scfm_pipeline_class(family: Family) -> type:
    """``SCFM<Stock>Pipeline``: the family's stock pipeline with :class:`SCFMPipelineMixin` in front."""
    stock = family.pipeline_class
    return type(
        f"SCFM{stock.__name__}",
        (SCFMPipelineMixin, stock),
        {
            "__module__": __name__,
            "__doc__": f":class:`~diffusers.{stock.__name__}` sampling an SCFM adapter in few steps "
            f"({family.name} family: guidance {family.guidance!r}). See :class:`SCFMPipelineMixin`.",
        },
    )


#: family name -> its SCFM pipeline class, one per registered family that the installed diffusers has.
SCFM_PIPELINE_CLASSES: dict[str, type] = {
    family.name: _make_scfm_pipeline_class(family) for family in FAMILIES.values() if family.available
}
globals().update({cls.__name__: cls for cls in SCFM_PIPELINE_CLASSES.values()})  # importable by name
SCFMFluxPipeline: type = SCFM_PIPELINE_CLASSES["flux"]
SCFMFluxPipeline.__doc__ += """

    Example:
        >>> from scfm_diffusers import SCFMFluxPipeline
        >>> from scfm_diffusers.testing import tiny_flux_pipeline
        >>> pipe = SCFMFluxPipeline.from_pipe(tiny_flux_pipeline())
        >>> pipe("a cat", height=32, width=32, output_type="pt").images.shape[0]  # 4 steps, shift 3.25
        1
"""
SCFMStableDiffusion3Pipeline: type = SCFM_PIPELINE_CLASSES["sd3"]


def scfm_pipeline_class(family: str | Family) -> type:
    """The SCFM pipeline class of a family (by name or object); raises a clear error for unavailable ones."""
    family = family if isinstance(family, Family) else FAMILIES.get(family) or family_of_class_name(family)
    if family.name not in SCFM_PIPELINE_CLASSES:
        family.pipeline_class  # noqa: B018  (raises the ImportError that says which diffusers is needed)
    return SCFM_PIPELINE_CLASSES[family.name]


class SCFMPipeline:
    """Entry point that picks the SCFM pipeline of the right family (like diffusers' ``AutoPipeline``).

    Example::

        pipe = SCFMPipeline.from_pretrained("black-forest-labs/FLUX.1-dev", adapter="org/flux-scfm-3step",
                                            torch_dtype=torch.bfloat16).to("cuda")
        image = pipe("a photo of a cat").images[0]   # the adapter's steps, shift, guidance and LoRA scale
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise OSError("SCFMPipeline is not instantiated directly; use SCFMPipeline.from_pretrained or from_pipe.")

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *,
        adapter: str | os.PathLike | None = None,
        adapter_name: str = SCFM_ADAPTER_NAME,
        settings: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> SCFMPipelineMixin:
        """Load a base model of any registered family and, optionally, an SCFM adapter on it.

        Args:
            pretrained_model_name_or_path: Base model folder or Hub id (a diffusers pipeline), or a folder saved
                by an SCFM pipeline (its settings and unfused LoRA come back; see ``save_pretrained``).
            adapter: SCFM adapter folder or Hub id; its settings become the call defaults.
            adapter_name: peft adapter name for the LoRA.
            settings: Overrides of the adapter's settings (e.g. ``{"num_inference_steps": 4}``).
            **kwargs: Passed to diffusers' ``from_pretrained`` (``torch_dtype``, ``revision``, ...).

        Raises:
            ValueError: The base model is not of a registered family, or the adapter is for another family.
        """
        config = DiffusionPipeline.load_config(
            pretrained_model_name_or_path,
            **{k: kwargs[k] for k in ("revision", "token", "cache_dir") if k in kwargs},
        )
        family = family_of_class_name(config.get("_class_name", "<no _class_name>"))
        pipeline_class = scfm_pipeline_class(family)
        adapter_settings = None
        if adapter is not None:
            adapter_settings = load_adapter_settings(adapter, token=kwargs.get("token"))
            if adapter_settings.family != family.name:
                raise ValueError(
                    f"The adapter is for {adapter_settings.family!r} but {pretrained_model_name_or_path!s} is a "
                    f"{family.name} model."
                )
        pipe = pipeline_class.from_pretrained(pretrained_model_name_or_path, **kwargs)
        if adapter is not None:
            pipe.load_scfm_adapter(adapter, adapter_name=adapter_name, token=kwargs.get("token"), **(settings or {}))
        elif settings:
            pipe.set_scfm_settings(**settings)
        return pipe

    @classmethod
    def from_pipe(
        cls,
        pipeline: DiffusionPipeline,
        *,
        adapter: str | os.PathLike | None = None,
        adapter_name: str = SCFM_ADAPTER_NAME,
        **settings: Any,
    ) -> SCFMPipelineMixin:
        """Wrap the components of a loaded stock pipeline (no copy of the weights) as an SCFM pipeline.

        The components are shared: an adapter loaded here is also on ``pipeline``'s transformer.
        """
        family = family_of_pipeline(pipeline)
        pipe = scfm_pipeline_class(family).from_pipe(pipeline)
        if adapter is not None:
            pipe.load_scfm_adapter(adapter, adapter_name=adapter_name, **settings)
        elif settings:
            pipe.set_scfm_settings(**settings)
        return pipe
