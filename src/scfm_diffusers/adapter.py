"""The SCFM adapter folder: LoRA weights, SCFM inference settings, scheduler config and model card.

Layout of a folder (also of a Hub repository)::

    pytorch_lora_weights.safetensors   diffusers LoRA format, with peft's LoRA config (alpha!) as metadata
    scfm_settings.json                 SCFMInferenceSettings: family, steps, shift, guidance, LoRA scale, ...
    scheduler/scheduler_config.json    the FlowMatchSCFMScheduler the adapter was trained for
    README.md                          model card: Hub metadata (tags, widget gallery) and usage snippets
    images/                            optional validation images, the card's widget gallery

Stock diffusers reads the weights directly: ``FluxPipeline.load_lora_weights(folder_or_repo)``.

Settings live in :mod:`scfm_diffusers.settings`, publishing in :mod:`scfm_diffusers.hub`
(:func:`~scfm_diffusers.hub.create_adapter_repo` before training, :func:`save_adapter` after it, then
:func:`~scfm_diffusers.hub.push_adapter`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from diffusers.utils.hub_utils import populate_model_card
from huggingface_hub import ModelCard, ModelCardData, hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
)
from peft.utils import get_peft_model_state_dict

from ._files import reporting_disk_full
from .families import LoraExperts, family_of_transformer, get_family
from .settings import SCFMInferenceSettings

__all__ = [
    "SETTINGS_NAME",
    "WEIGHTS_NAME",
    "SCFMInferenceSettings",
    "adapter_weights_file",
    "card_tags",
    "check_weights_file",
    "load_adapter_settings",
    "model_card",
    "save_adapter",
]

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
SETTINGS_NAME = "scfm_settings.json"
SCHEDULER_SUBFOLDER = "scheduler"
IMAGES_SUBFOLDER = "images"
_ADAPTER_PLACEHOLDER = "path/to/this/adapter"
#: Work folders the training script keeps below its output folder; never uploaded with the adapter.
#: (``.scfm.lock``: the training run's output-folder lock, :mod:`scfm_diffusers.training.lock`.)
WORK_PATTERNS = ("checkpoint-*", "checkpoint-*/**", "cache/**", "logs/**", "validation/**", ".scfm.lock")


def _fold_lora_alpha(transformer, adapter_name: str, lora_state_dict: dict) -> tuple[dict, dict]:
    """Fold each layer's LoRA scale ``alpha / r`` into its ``lora_B``; return the tensors and a config with alpha = r.

    ``ΔW = (alpha / r)·B·A = B'·A`` with ``B' = (alpha / r)·B``, so the stored adapter has the same effect in a
    loader that reads alpha from the metadata (diffusers), in one that assumes alpha = r (ComfyUI without
    ``.alpha`` tensors, diffusers without metadata) and in one that reads ``.alpha`` tensors. Stock
    ``load_lora_weights`` tolerates no ``.alpha`` tensors in a file with metadata (docs/adapter_format.md).
    The product is rounded once, in float64; it is exact when alpha / r is a power of two (alpha = r included).

    Args:
        transformer: The transformer carrying the peft adapter ``adapter_name`` (per-layer r and alpha).
        adapter_name: The adapter whose LoRA config applies to ``lora_state_dict``.
        lora_state_dict: peft-format LoRA tensors ``{"<module>.lora_A.weight": ..., ...}``.

    Returns:
        ``(tensors, config)``: the tensors with every ``lora_B`` (and ``lora_embedding_B``) scaled, and the
        adapter's ``LoraConfig`` as a dict with ``lora_alpha = r``, ``alpha_pattern = rank_pattern``, no rsLoRA.

    Raises:
        ValueError: A ``lora_B`` tensor belongs to no LoRA layer of ``adapter_name``.
    """
    config = transformer.peft_config[adapter_name]
    scales = {}  # module name -> alpha / r (alpha / sqrt(r) with rsLoRA), as peft's layers compute it
    for name, module in transformer.named_modules():
        if isinstance(getattr(module, "r", None), dict) and adapter_name in module.r:
            rank, alpha = module.r[adapter_name], module.lora_alpha[adapter_name]
            rslora = getattr(module, "use_rslora", {}).get(adapter_name, config.use_rslora)
            scales[name] = alpha / (rank**0.5 if rslora else rank)
    folded = {}
    for key, value in lora_state_dict.items():
        module = key.split(".lora_")[0]
        if ".lora_B." in key or ".lora_embedding_B" in key:
            if module not in scales:
                raise ValueError(f"LoRA tensor {key!r} belongs to no LoRA layer of adapter {adapter_name!r}.")
            if scales[module] != 1.0:
                value = (value.double() * scales[module]).to(value.dtype)
        folded[key] = value
    metadata = config.to_dict()
    metadata.update(lora_alpha=config.r, alpha_pattern=dict(config.rank_pattern), use_rslora=False)
    return folded, metadata


def _expert_weights(transformer, lora_state_dict: dict) -> dict[str, tuple[torch.nn.Module, str | None, dict]]:
    """Pipeline component -> (its module, its weights file or None for the usual one, its LoRA tensors).

    A plain transformer is one entry; a :class:`~scfm_diffusers.families.LoraExperts` one per expert, each with
    the tensors under its name (the prefix dropped, as a transformer alone names them).
    """
    if not isinstance(transformer, LoraExperts):
        return {"transformer": (transformer, None, lora_state_dict)}
    experts = {}
    for name, module in transformer.experts().items():
        prefix = f"{name}."
        tensors = {key[len(prefix) :]: value for key, value in lora_state_dict.items() if key.startswith(prefix)}
        experts[name] = (module, transformer.weight_names[name], tensors)
    unassigned = [key for key in lora_state_dict if not key.startswith(tuple(f"{name}." for name in experts))]
    if unassigned:
        raise ValueError(f"LoRA tensors of no expert ({sorted(experts)}): {unassigned[:3]}.")
    return experts


def save_adapter(
    directory: str | os.PathLike,
    transformer,
    settings: SCFMInferenceSettings,
    *,
    adapter_name: str = "default",
    lora_state_dict: dict | None = None,
    scheduler_config: dict | None = None,
    validation_images: list | None = None,
    validation_prompts: list[str] | None = None,
) -> Path:
    """Write an adapter folder that stock diffusers pipelines load with ``load_lora_weights``.

    Args:
        directory: Output folder (created).
        transformer: The transformer carrying the LoRA (peft adapter ``adapter_name``); its family must match
            ``settings.family``.
        settings: Inference settings to store.
        adapter_name: Which peft adapter to save. Each layer's ``alpha / r`` is folded into its ``lora_B`` and
            the stored ``LoraConfig`` (rank, targets) says ``lora_alpha = r``, so that every loader (diffusers
            with or without the metadata, ComfyUI, kohya-style tools) computes the same ΔW = B·A; see
            docs/adapter_format.md, "Alpha".
        lora_state_dict: Save these LoRA tensors (peft format, e.g. an EMA copy) instead of the adapter's own;
            the LoRA config of ``adapter_name`` (its alpha / r per layer) still applies.
        scheduler_config: Stock scheduler config to build the SCFM scheduler on (keeps its other keys).
        validation_images: PIL images to store as ``images/validation_<i>.png``; they become the card's widget
            gallery.
        validation_prompts: Captions of ``validation_images``, one per image.

    Returns:
        The folder path.

    Raises:
        ValueError: The transformer's family differs from ``settings.family``, it has no adapter
            ``adapter_name``, or the numbers of validation images and prompts differ.
        DiskFullError: The disk filled up; the message names the file being written.
    """
    directory = Path(directory)
    if validation_images and validation_prompts is not None and len(validation_prompts) != len(validation_images):
        raise ValueError(
            f"Got {len(validation_images)} validation images but {len(validation_prompts)} prompts; the card "
            "captions image i with prompt i, so pass one prompt per image (or no prompts)."
        )
    family = family_of_transformer(transformer)
    if family.name != settings.family:
        raise ValueError(f"The transformer is a {family.name} model but the settings say {settings.family!r}.")
    if adapter_name not in getattr(transformer, "peft_config", {}):
        known = sorted(getattr(transformer, "peft_config", {}))
        raise ValueError(f"The transformer has no LoRA adapter {adapter_name!r} (it has {known}).")
    if lora_state_dict is None:
        lora_state_dict = get_peft_model_state_dict(transformer, adapter_name=adapter_name)
    experts = _expert_weights(transformer, lora_state_dict)
    settings = settings.replace(expert_weights={name: file for name, (_, file, _) in experts.items() if file})
    with reporting_disk_full(directory):
        directory.mkdir(parents=True, exist_ok=True)
    for module, weight_name, tensors in experts.values():  # one file per expert, as stock loaders read them
        tensors, lora_config = _fold_lora_alpha(module, adapter_name, tensors)
        with reporting_disk_full(directory / (weight_name or WEIGHTS_NAME)):
            family.pipeline_class.save_lora_weights(
                directory,
                transformer_lora_layers=tensors,
                transformer_lora_adapter_metadata=lora_config,
                weight_name=weight_name,
            )
    with reporting_disk_full(directory / SETTINGS_NAME):
        (directory / SETTINGS_NAME).write_text(json.dumps(settings.to_dict(), indent=2, sort_keys=True) + "\n")
    with reporting_disk_full(directory / SCHEDULER_SUBFOLDER):
        settings.make_scheduler(scheduler_config).save_pretrained(directory / SCHEDULER_SUBFOLDER)

    image_paths = []
    for index, image in enumerate(validation_images or []):
        path = f"{IMAGES_SUBFOLDER}/validation_{index}.png"
        with reporting_disk_full(directory / path):
            (directory / IMAGES_SUBFOLDER).mkdir(exist_ok=True)
            image.save(directory / path)
        image_paths.append(path)
    lora_config = transformer.peft_config[adapter_name]
    card = model_card(
        settings, rank=lora_config.r, alpha=lora_config.lora_alpha, image_paths=image_paths, prompts=validation_prompts
    )
    with reporting_disk_full(directory / "README.md"):
        card.save(directory / "README.md")
    return directory


def card_tags(family: str) -> list[str]:
    """Hub tags of an adapter's card: those of diffusers' LoRA training scripts, the family's, and SCFM's.

    ``template:sd-lora`` makes the Hub render the card's ``widget`` as an image gallery.
    """
    family = get_family(family).name
    return [
        f"text-to-{get_family(family).modality}",
        "diffusers-training",
        "diffusers",
        "lora",
        "template:sd-lora",
        family,
        f"{family}-diffusers",
        "scfm",
        "few-step",
        "flow-matching",
    ]


def model_card(
    settings: SCFMInferenceSettings,
    *,
    rank: int,
    alpha: float,
    repo_id: str | None = None,
    image_paths: list[str] | None = None,
    prompts: list[str] | None = None,
) -> ModelCard:
    """The adapter's model card, laid out as diffusers' LoRA training scripts lay out theirs.

    Metadata: ``base_model``, ``library_name: diffusers``, ``license: other``, ``pipeline_tag``,
    :func:`card_tags` (added with diffusers' ``populate_model_card``) and a ``widget`` gallery
    ``[{text: prompt, output: {url: image_path}}, ...]``. Body: usage snippets for :class:`SCFMPipeline` and the
    stock pipeline, the inference settings and the training record.

    diffusers' ``load_or_create_model_card`` is not used: it first looks the card up on the Hub (anything that
    is not an existing file is taken for a repository id), which a local, possibly offline save must not do,
    and it keeps an existing card, whose settings table would then be stale.

    Args:
        settings: The adapter's inference settings (family, steps, shift, guidance, base model, training record).
        rank: LoRA rank r.
        alpha: LoRA alpha (the layers scale by alpha / r).
        repo_id: Hub id or path the usage snippets load the adapter from; default a placeholder that
            :func:`push_adapter` replaces with the repository id.
        image_paths: Validation images, relative to the card's folder (``images/validation_<i>.png``).
        prompts: The prompt of each image in ``image_paths``.

    Returns:
        The card; ``card.save(folder / "README.md")`` writes it.

    Raises:
        ValueError: ``prompts`` and ``image_paths`` have different lengths.
    """
    family = get_family(settings.family)
    image_paths = list(image_paths or [])
    prompts = list(prompts) if prompts is not None else [""] * len(image_paths)
    if len(prompts) != len(image_paths):
        raise ValueError(f"Got {len(image_paths)} card images but {len(prompts)} prompts; pass one prompt per image.")
    widget = [{"text": prompt, "output": {"url": path}} for prompt, path in zip(prompts, image_paths)]
    data = ModelCardData(
        base_model=settings.base_model,
        library_name="diffusers",
        license="other",
        pipeline_tag=f"text-to-{family.modality}",
        widget=widget or None,
    )
    adapter = repo_id or _ADAPTER_PLACEHOLDER
    base = settings.base_model or "path/to/base/model"
    steps = settings.num_inference_steps
    images = "".join(f"\n![{prompt}]({path})" for prompt, path in zip(prompts, image_paths))
    training = "".join(f"\n| {key} | {value} |" for key, value in sorted(settings.training.items()))
    output = f"{family.output_name}[0]"  # a video pipeline returns frames
    load_experts = "".join(  # Wan 2.2: each expert's LoRA from its own file
        f'\npipe.load_lora_weights("{adapter}", weight_name="{file}", load_into_{name}=True)'
        for name, file in settings.expert_weights.items()
    )
    lora_scales = f"{settings.lora_scale:g}"
    if settings.lora_scales:  # calibrated per step count; the default for the others
        calibrated = ", ".join(f"{scale:g} at {n} steps" for n, scale in settings.lora_scales.items())
        lora_scales = f"{calibrated} (calibrated); {settings.lora_scale:g} otherwise"
    body = f"""
# SCFM {steps}-step LoRA for {base}

A LoRA that samples `{base}` in **{steps} steps**, distilled with SCFM ("Shortcutting Pre-trained Flow
Matching Diffusion Models is Almost Free Lunch", NeurIPS 2025) using
[scfm-diffusers](https://github.com/scfm-diffusers/scfm-diffusers).
{images}

## Use it

```python
import torch
from scfm_diffusers import SCFMPipeline

pipe = SCFMPipeline.from_pretrained("{base}", adapter="{adapter}", torch_dtype=torch.bfloat16)
sample = pipe("a photo of a cat").{output}  # {steps} steps, shift {settings.shift:g}
```

or with the stock pipeline:

```python
import torch
from diffusers import {family.pipeline_class.__name__}
from scfm_diffusers import FlowMatchSCFMScheduler

pipe = {family.pipeline_class.__name__}.from_pretrained("{base}", torch_dtype=torch.bfloat16)
pipe.load_lora_weights("{adapter}"){load_experts}
pipe.scheduler = FlowMatchSCFMScheduler.from_config(pipe.scheduler.config, shift={settings.shift:g}, use_dynamic_shifting={settings.use_dynamic_shifting})
sample = pipe("a photo of a cat", num_inference_steps={steps}, guidance_scale={settings.guidance_scale:g},
              {family.lora_scale_kwarg}={{"scale": {settings.lora_scale_for(steps):g}}}).{output}
```

## Settings

| setting | value |
|---|---|
| steps | {steps} |
| shift | {settings.shift:g} (dynamic: {settings.use_dynamic_shifting}) |
| guidance scale | {settings.guidance_scale:g} |
| LoRA scale | {lora_scales} |
| LoRA rank / alpha | {rank} / {alpha:g} |

## Training
| parameter | value |
|---|---|{training}
"""
    return populate_model_card(ModelCard(f"---\n{data.to_yaml()}\n---\n{body}"), tags=card_tags(family.name))


def _is_local(adapter: str | os.PathLike) -> bool:
    """A path that exists or is spelled as a path (./x, /x, ~/x) is local; anything else is a Hub id."""
    return isinstance(adapter, Path) or Path(adapter).exists() or str(adapter).startswith((".", "/", "~"))


def load_adapter_settings(
    adapter: str | os.PathLike, *, revision: str | None = None, token: str | None = None
) -> SCFMInferenceSettings:
    """Read an adapter's :class:`SCFMInferenceSettings` from a local folder or a Hub repository id.

    Raises:
        FileNotFoundError: The folder does not exist, or holds no LoRA weights or no settings file.
        OSError: The Hub repository could not be read (offline, missing, private without a token).
    """
    if _is_local(adapter):
        folder = Path(adapter).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"SCFM adapter folder {str(folder)!r} does not exist.")
        if not (folder / WEIGHTS_NAME).is_file():
            raise FileNotFoundError(
                f"{str(folder)!r} holds no {WEIGHTS_NAME}: it is not an SCFM adapter folder "
                "(write one with scfm_diffusers.save_adapter or examples/train_scfm_lora.py)."
            )
        settings_path = folder / SETTINGS_NAME
        if not settings_path.is_file():
            raise FileNotFoundError(
                f"{str(folder)!r} has LoRA weights but no {SETTINGS_NAME}; load it with "
                "`pipe.load_lora_weights(...)` and pass steps/shift/guidance yourself."
            )
    else:
        try:
            settings_path = Path(hf_hub_download(str(adapter), SETTINGS_NAME, revision=revision, token=token))
        except (EntryNotFoundError, LocalEntryNotFoundError, HfHubHTTPError, OSError) as error:
            raise OSError(
                f"Could not read {SETTINGS_NAME} of the Hub repository {str(adapter)!r} ({type(error).__name__}: "
                f"{error}). Check the id, your token, and that HF_HUB_OFFLINE is not set; or pass a local folder."
            ) from error
    try:
        data = json.loads(settings_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{settings_path} is not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise ValueError(f"{settings_path} must hold a JSON object, got {type(data).__name__}.")
    try:
        return SCFMInferenceSettings.from_dict(data)
    except (TypeError, ValueError) as error:  # same type, with the file named: fix it there or pass overrides
        raise type(error)(f"{settings_path}: {error}") from None


def check_weights_file(path: str | os.PathLike) -> None:
    """Check that a ``.safetensors`` file is complete: its header parses and its tensors end where the file ends.

    Reads only the header (no tensor data), so a truncated or cut download is named before a loader fails on it
    with a message that does not say which file or why.

    Raises:
        ValueError: The file is shorter or longer than its header says, or its header is not safetensors JSON.
    """
    path = Path(path)
    size = path.stat().st_size
    fix = "save or download the adapter again (a download or copy was cut short, or the disk filled up)"
    with open(path, "rb") as file:
        prefix = file.read(8)
        header_size = int.from_bytes(prefix, "little") if len(prefix) == 8 else None
        if header_size is None or header_size > size - 8:
            raise ValueError(f"{str(path)!r} is truncated ({size} bytes, its header is cut off): {fix}.")
        try:
            header = json.loads(file.read(header_size))
            end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as error:
            raise ValueError(f"{str(path)!r} is not a safetensors file (bad header: {error}): {fix}.") from None
    expected = 8 + header_size + end
    if size != expected:
        state = "truncated" if size < expected else "longer than its header says"
        raise ValueError(f"{str(path)!r} is {state} ({size} bytes, its header describes {expected}): {fix}.")


def adapter_weights_file(adapter: str | os.PathLike, *, revision: str | None = None, token: str | None = None) -> Path:
    """The local path of an adapter's LoRA weights (downloaded for a Hub id), checked by :func:`check_weights_file`.

    Raises:
        FileNotFoundError: A local folder holds no weights file.
        OSError: The Hub file could not be downloaded.
        ValueError: The file is truncated or damaged.
    """
    if _is_local(adapter):
        path = Path(adapter).expanduser() / WEIGHTS_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{str(path.parent)!r} holds no {WEIGHTS_NAME}: it is not an SCFM adapter folder.")
    else:
        try:
            path = Path(hf_hub_download(str(adapter), WEIGHTS_NAME, revision=revision, token=token))
        except (EntryNotFoundError, LocalEntryNotFoundError, HfHubHTTPError, OSError) as error:
            raise OSError(
                f"Could not read {WEIGHTS_NAME} of the Hub repository {str(adapter)!r} ({type(error).__name__}: "
                f"{error}). Check the id, your token, and that HF_HUB_OFFLINE is not set; or pass a local folder."
            ) from error
    check_weights_file(path)
    return path
