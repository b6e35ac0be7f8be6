"""The SCFM adapter folder: LoRA weights, SCFM inference settings, scheduler config and model card.

Layout of a folder (also of a Hub repository)::

    pytorch_lora_weights.safetensors   diffusers LoRA format, with peft's LoRA config (alpha!) as metadata
    scfm_settings.json                 SCFMInferenceSettings: family, steps, shift, guidance, LoRA scale, ...
    scheduler/scheduler_config.json    the FlowMatchSCFMScheduler the adapter was trained for
    README.md                          model card: Hub metadata (tags, widget gallery) and usage snippets
    images/                            optional validation images, the card's widget gallery

Stock diffusers reads the weights directly: ``FluxPipeline.load_lora_weights(folder_or_repo)``.

Publishing follows the diffusers training scripts: :func:`create_adapter_repo` before training (fails fast on
a bad token or name), :func:`save_adapter` after it, then :func:`push_adapter`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffusers.utils.hub_utils import populate_model_card
from huggingface_hub import HfApi, ModelCard, ModelCardData, constants, hf_hub_download, upload_folder
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    LocalTokenNotFoundError,
)
from huggingface_hub.utils import httpx, validate_repo_id
from peft.utils import get_peft_model_state_dict

from .families import FAMILIES, family_of_transformer, get_family
from .scheduling_flow_match_scfm import FlowMatchSCFMScheduler

__all__ = [
    "SETTINGS_NAME",
    "WEIGHTS_NAME",
    "SCFMInferenceSettings",
    "card_tags",
    "create_adapter_repo",
    "load_adapter_settings",
    "model_card",
    "push_adapter",
    "save_adapter",
]

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
SETTINGS_NAME = "scfm_settings.json"
SCHEDULER_SUBFOLDER = "scheduler"
IMAGES_SUBFOLDER = "images"
_ADAPTER_PLACEHOLDER = "path/to/this/adapter"
#: Work folders the training script keeps below its output folder; never uploaded with the adapter.
WORK_PATTERNS = ("checkpoint-*", "checkpoint-*/**", "cache/**", "logs/**", "validation/**")


@dataclass
class SCFMInferenceSettings:
    """How an SCFM adapter is meant to be sampled. Every field can be overridden per pipeline call.

    Attributes:
        family: Model family the adapter belongs to (``"flux"`` or ``"sd3"``).
        num_inference_steps: Euler steps N the student was distilled for (3–8 typically).
        shift: Fixed shift of the sampling grid (Flux 3.25, SD3 3.0 in the method's reference sampler).
        use_dynamic_shifting: Use Flux's resolution-dependent shift instead of ``shift``.
        guidance_scale: Flux: embedded guidance; SD3: classifier-free guidance scale.
        lora_scale: Strength of the LoRA at inference (the authors advise 1.0–1.75, higher for fewer steps);
            used for step counts that ``lora_scales`` does not list.
        lora_scales: ``{step count: LoRA scale}`` calibrated after training
            (:func:`~scfm_diffusers.calibration.calibrate_lora_scales`); see :meth:`lora_scale_for`.
        base_model: Hub id or path of the base model the adapter was trained on.
        training: Free-form record of the training run (shown in the model card).
    """

    family: str
    num_inference_steps: int = 4
    shift: float = 3.0
    use_dynamic_shifting: bool = False
    guidance_scale: float = 3.5
    lora_scale: float = 1.0
    lora_scales: dict[int, float] = field(default_factory=dict)
    base_model: str | None = None
    training: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        get_family(self.family)  # raises for unknown families
        if isinstance(self.num_inference_steps, bool) or not isinstance(self.num_inference_steps, int):
            raise TypeError(f"num_inference_steps must be an int, got {self.num_inference_steps!r}.")
        if self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {self.num_inference_steps}.")
        for name in ("shift", "guidance_scale", "lora_scale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"{name} must be a number, got {value!r}.")
            setattr(self, name, float(value))
        if self.shift <= 0:
            raise ValueError(f"shift must be > 0, got {self.shift}.")
        if not isinstance(self.lora_scales, dict):
            raise TypeError(f"lora_scales must be a dict {{step count: scale}}, got {self.lora_scales!r}.")
        scales = {}
        for steps, scale in self.lora_scales.items():  # JSON keys are strings
            if isinstance(scale, bool) or not isinstance(scale, int | float) or not str(steps).isdigit():
                raise TypeError(f"lora_scales maps step counts to numbers, got {steps!r}: {scale!r}.")
            if int(steps) < 1 or scale < 0:
                raise ValueError(f"lora_scales needs step counts >= 1 and scales >= 0, got {steps!r}: {scale!r}.")
            scales[int(steps)] = float(scale)
        self.lora_scales = dict(sorted(scales.items()))
        if not isinstance(self.use_dynamic_shifting, bool):
            raise TypeError(f"use_dynamic_shifting must be a bool, got {self.use_dynamic_shifting!r}.")
        if self.base_model is not None and not isinstance(self.base_model, str):
            raise TypeError(f"base_model must be a string or None, got {self.base_model!r}.")
        if not isinstance(self.training, dict):
            raise TypeError(f"training must be a dict, got {self.training!r}.")

    def lora_scale_for(self, num_inference_steps: int) -> float:
        """The LoRA scale for a step count: the calibrated one (``lora_scales``), else ``lora_scale``.

        Example:
            >>> settings = SCFMInferenceSettings("flux", lora_scale=1.0, lora_scales={3: 1.4, 8: 1.1})
            >>> settings.lora_scale_for(3), settings.lora_scale_for(5)
            (1.4, 1.0)
        """
        return self.lora_scales.get(int(num_inference_steps), self.lora_scale)

    @classmethod
    def for_family(cls, family: str, **overrides: Any) -> SCFMInferenceSettings:
        """Settings with the method's defaults for ``family``, updated by ``overrides``."""
        return cls.from_dict({"family": family, **get_family(family).default_settings, **overrides})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SCFMInferenceSettings:
        """Build settings from a dict, rejecting unknown keys with the list of known ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown SCFM settings keys {unknown}; known keys are {sorted(known)}.")
        if "family" not in data:
            raise ValueError(f"SCFM settings need a 'family' (one of {sorted(FAMILIES)}).")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (``lora_scales`` keys as strings, as JSON writes them)."""
        data = dataclasses.asdict(self)
        data["lora_scales"] = {str(steps): scale for steps, scale in self.lora_scales.items()}
        return data

    def replace(self, **overrides: Any) -> SCFMInferenceSettings:
        """A copy with some fields changed (validated again)."""
        return self.from_dict({**self.to_dict(), **overrides})

    def make_scheduler(self, base_config: dict | None = None) -> FlowMatchSCFMScheduler:
        """The scheduler these settings describe, optionally on top of a stock scheduler's config."""
        overrides = {"shift": self.shift, "use_dynamic_shifting": self.use_dynamic_shifting}
        if base_config is None:
            return FlowMatchSCFMScheduler(**overrides)
        return FlowMatchSCFMScheduler.from_config(base_config, **overrides)


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
    lora_state_dict, lora_config = _fold_lora_alpha(transformer, adapter_name, lora_state_dict)
    directory.mkdir(parents=True, exist_ok=True)
    family.pipeline_class.save_lora_weights(
        directory, transformer_lora_layers=lora_state_dict, transformer_lora_adapter_metadata=lora_config
    )
    (directory / SETTINGS_NAME).write_text(json.dumps(settings.to_dict(), indent=2, sort_keys=True) + "\n")
    settings.make_scheduler(scheduler_config).save_pretrained(directory / SCHEDULER_SUBFOLDER)

    image_paths = []
    for index, image in enumerate(validation_images or []):
        (directory / IMAGES_SUBFOLDER).mkdir(exist_ok=True)
        path = f"{IMAGES_SUBFOLDER}/validation_{index}.png"
        image.save(directory / path)
        image_paths.append(path)
    lora_config = transformer.peft_config[adapter_name]
    card = model_card(
        settings, rank=lora_config.r, alpha=lora_config.lora_alpha, image_paths=image_paths, prompts=validation_prompts
    )
    card.save(directory / "README.md")
    return directory


def card_tags(family: str) -> list[str]:
    """Hub tags of an adapter's card: those of diffusers' LoRA training scripts, the family's, and SCFM's.

    ``template:sd-lora`` makes the Hub render the card's ``widget`` as an image gallery.
    """
    family = get_family(family).name
    return [
        "text-to-image",
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
        pipeline_tag="text-to-image",
        widget=widget or None,
    )
    adapter = repo_id or _ADAPTER_PLACEHOLDER
    base = settings.base_model or "path/to/base/model"
    steps = settings.num_inference_steps
    images = "".join(f"\n![{prompt}]({path})" for prompt, path in zip(prompts, image_paths))
    training = "".join(f"\n| {key} | {value} |" for key, value in sorted(settings.training.items()))
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
image = pipe("a photo of a cat").images[0]  # {steps} steps, shift {settings.shift:g}
```

or with the stock pipeline:

```python
import torch
from diffusers import {family.pipeline_class.__name__}
from scfm_diffusers import FlowMatchSCFMScheduler

pipe = {family.pipeline_class.__name__}.from_pretrained("{base}", torch_dtype=torch.bfloat16)
pipe.load_lora_weights("{adapter}")
pipe.scheduler = FlowMatchSCFMScheduler.from_config(pipe.scheduler.config, shift={settings.shift:g}, use_dynamic_shifting={settings.use_dynamic_shifting})
image = pipe("a photo of a cat", num_inference_steps={steps}, guidance_scale={settings.guidance_scale:g},
             joint_attention_kwargs={{"scale": {settings.lora_scale_for(steps):g}}}).images[0]
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
        data = json.loads(settings_path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{settings_path} is not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise ValueError(f"{settings_path} must hold a JSON object, got {type(data).__name__}.")
    return SCFMInferenceSettings.from_dict(data)


def _safe_cause(error: Exception, token: str | None) -> Exception | None:
    """``error`` to chain to a Hub failure, or None if its text holds the token (the failure's message then
    carries the Hub's answer with the token masked, so nothing is lost but the secret)."""
    seen, link = [], error
    while link is not None and link not in seen:  # the error and everything chained to it
        seen.append(link)
        link = link.__cause__ or link.__context__
    return None if token and any(token in f"{link!r} {link}" for link in seen) else error


def _hub_failure(action: str, repo_id: str, error: Exception, token: str | None) -> Exception:
    """A clear error for a failed Hub call: what failed, the Hub's answer, how to fix it. Never shows the token."""
    status = getattr(getattr(error, "response", None), "status_code", None)
    answer = f"{type(error).__name__}: {error}"
    if token:  # the Hub does not echo tokens, but a proxy or a future message might
        answer = answer.replace(token, "<token>")
    login = (
        "Log in with `hf auth login` (`huggingface-cli login` before huggingface_hub 1.0), set HF_TOKEN, or pass a "
        "token with write access (--hub_token in the training script); tokens: https://huggingface.co/settings/tokens."
    )
    if isinstance(error, LocalTokenNotFoundError):
        return PermissionError(f"Cannot {action} {repo_id!r}: no Hugging Face token found. {login}")
    if status == 401:
        return PermissionError(
            f"Cannot {action} {repo_id!r}: the Hub at {constants.ENDPOINT} refused the token (401 Unauthorized; "
            f"{answer}). The token is invalid, expired or revoked. {login}"
        )
    if status == 403:
        return PermissionError(
            f"Cannot {action} {repo_id!r}: the token may not write to the namespace {repo_id.split('/')[0]!r} "
            f"(403 Forbidden; {answer}). Use your user name or an organisation you can write to as the namespace, "
            f"or a token with write access to it. {login}"
        )
    if status is not None:
        return OSError(
            f"Cannot {action} {repo_id!r}: the Hub at {constants.ENDPOINT} answered {status} ({answer}). "
            "Check the repository name ('name' or 'namespace/name') and the Hub's status, then try again."
        )
    return OSError(
        f"Cannot {action} {repo_id!r}: the Hub at {constants.ENDPOINT} could not be reached ({answer}). Check the "
        "network, HF_ENDPOINT, and that HF_HUB_OFFLINE is not set."
    )


def create_adapter_repo(repo_id: str, *, token: str | None = None, private: bool = False) -> str:
    """Create the Hub model repository of an adapter, or reuse it if it exists, and check the token can write.

    Call it before training, as diffusers' training scripts call ``create_repo`` first: a missing, refused or
    read-only token, or a bad name, then fails in seconds instead of after hours of training. The upload at the
    end (:func:`push_adapter`) reuses the repository.

    Args:
        repo_id: ``"name"`` (in the token owner's namespace) or ``"namespace/name"``.
        token: Hub token with write access; default the logged-in one (``hf auth login`` or ``HF_TOKEN``).
            It is only sent to the Hub: never logged nor written anywhere.
        private: Create the repository private (ignored if it already exists).

    Returns:
        The full repository id, ``"namespace/name"``.

    Raises:
        ValueError: ``repo_id`` is not a valid Hub repository id.
        PermissionError: No token was found, or the Hub refused it, or it is read-only or may not write to the
            namespace.
        OSError: The Hub could not be reached or refused the creation for another reason.
    """
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(
            f"{repo_id!r} is not a valid Hub repository id ({error}). Expected 'name' or 'namespace/name' of at most "
            "96 letters, digits, '-', '_' and '.'; check --hub_model_id."
        ) from error
    api = HfApi()
    action = "create the Hub repository"
    try:
        # create_repo alone is not enough: for an existing repository it answers a refused or missing token by
        # reading the repository instead, and the upload would then fail after training. whoami checks the token.
        access = (api.whoami(token=token).get("auth") or {}).get("accessToken") or {}
    except (OSError, httpx.HTTPError) as error:  # HfHubHTTPError and LocalTokenNotFoundError are OSErrors
        raise _hub_failure(action, repo_id, error, token) from _safe_cause(error, token)
    if access.get("role") == "read":
        raise PermissionError(
            f"Cannot {action} {repo_id!r}: the token is read-only. Create a token with write access at "
            "https://huggingface.co/settings/tokens and log in with it (`hf auth login`) or pass it (--hub_token)."
        )
    try:
        repo = api.create_repo(repo_id, token=token, private=private, exist_ok=True, repo_type="model")
    except (OSError, httpx.HTTPError) as error:
        raise _hub_failure(action, repo_id, error, token) from _safe_cause(error, token)
    return repo.repo_id


def push_adapter(
    directory: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    commit_message: str = "Upload SCFM adapter",
    ignore_patterns: tuple[str, ...] = WORK_PATTERNS,
) -> str:
    """Upload a whole adapter folder to the Hub model repository ``repo_id``, creating it if needed.

    The repository may exist already (made by :func:`create_adapter_repo` before training, or an earlier push).
    The card's usage snippets are pointed at the full repository id first. The training script's work folders
    (checkpoints, caches, logs: :data:`WORK_PATTERNS`) stay local; everything else in the folder is uploaded.

    Args:
        directory: An adapter folder written by :func:`save_adapter`.
        repo_id: ``"name"`` (in the token owner's namespace) or ``"namespace/name"``.
        token: Hub token with write access; default the logged-in one.
        private: Create the repository private if it does not exist yet.
        commit_message: Message of the upload commit.
        ignore_patterns: Glob patterns of files below ``directory`` not to upload.

    Returns:
        The URL of the commit.

    Raises:
        FileNotFoundError: ``directory`` is not a complete adapter folder.
        ValueError, PermissionError, OSError: As :func:`create_adapter_repo`.
    """
    directory = Path(directory)
    if not (directory / WEIGHTS_NAME).is_file() or not (directory / SETTINGS_NAME).is_file():
        raise FileNotFoundError(
            f"{str(directory)!r} is not a complete SCFM adapter folder (it needs {WEIGHTS_NAME} and {SETTINGS_NAME}; "
            "write one with save_adapter); nothing pushed."
        )
    repo_id = create_adapter_repo(repo_id, token=token, private=private)
    card_path = directory / "README.md"
    if card_path.is_file():  # point the card's usage snippets at the repository it is pushed to
        card_path.write_text(card_path.read_text().replace(_ADAPTER_PLACEHOLDER, repo_id))
    commit = upload_folder(
        repo_id=repo_id,
        folder_path=directory,
        token=token,
        commit_message=commit_message,
        repo_type="model",
        ignore_patterns=list(ignore_patterns),
    )
    return str(commit)
