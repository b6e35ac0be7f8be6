"""The base model's Hub identity: what an adapter's card and settings may say about the model it was trained on.

The Hub's model-card check accepts only repository ids as ``base_model``, and a local path would publish the
layout of the user's machine. So a local base folder is named by its own Hub id where the folder carries one
(a snapshot in the Hugging Face cache, ``models--org--name/snapshots/<revision>``), else by the id the user
gives (``--base_model_id``); it is never named by its path. Runs and caches identify the base by content.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

__all__ = ["base_model_hub_id", "base_model_identity", "check_hub_repo_id"]

#: Files whose content identifies a diffusers pipeline folder (its components and their configs).
_IDENTITY_FILES = (
    "model_index.json",
    "transformer/config.json",
    "transformer/diffusion_pytorch_model.safetensors.index.json",
)


def check_hub_repo_id(repo_id: str, what: str) -> str:
    """Return ``repo_id`` if it is a valid Hub repository id, else raise ``ValueError`` naming ``what``."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(
            f"{what} must be a Hub repository id such as 'org/name', got {repo_id!r} ({error})."
        ) from None
    return repo_id


def _cache_snapshot_repo_id(folder: Path) -> str | None:
    """``org/name`` when ``folder`` lies in a Hugging Face cache snapshot (``models--org--name/snapshots/rev``)."""
    for parent in (folder, *folder.parents):
        if parent.parent.name == "snapshots" and parent.parent.parent.name.startswith("models--"):
            return parent.parent.parent.name.removeprefix("models--").replace("--", "/")
    return None


def base_model_hub_id(name_or_path: str | os.PathLike, base_model_id: str | None = None) -> str | None:
    """The Hub id an adapter records as its ``base_model``; never a local path.

    Args:
        name_or_path: What the base was loaded from (``--pretrained_model_name_or_path``): a Hub id or a folder.
        base_model_id: The Hub id the user gives for a local folder (``--base_model_id``); wins when given.

    Returns:
        ``base_model_id``; else the Hub id itself; else the id of the Hugging Face cache snapshot the folder is;
        else None (a local folder with no Hub identity: the card and settings then name no base model).

    Raises:
        ValueError: ``base_model_id`` is not a valid repository id.

    Example:
        >>> base_model_hub_id("black-forest-labs/FLUX.1-dev")
        'black-forest-labs/FLUX.1-dev'
        >>> base_model_hub_id("/hf/hub/models--black-forest-labs--FLUX.1-dev/snapshots/0ef5fff")
        'black-forest-labs/FLUX.1-dev'
        >>> base_model_hub_id("/data/my-flux") is None
        True
    """
    if base_model_id is not None:
        return check_hub_repo_id(base_model_id, "--base_model_id")
    path = Path(name_or_path)
    from_cache = _cache_snapshot_repo_id(path.absolute())
    if from_cache is not None:
        return from_cache
    if path.exists() or path.is_absolute() or str(name_or_path).startswith("."):
        return None
    try:
        validate_repo_id(str(name_or_path))
    except HFValidationError:
        return None
    return str(name_or_path)


def base_model_identity(name_or_path: str | os.PathLike) -> str:
    """What makes a base model the same base model: its Hub id, or for a folder a hash of its pipeline index and
    transformer config (the same folder reached by a symlink or a relative path is the same base; a path is
    never written into a run record or a cache index).

    Example:
        >>> base_model_identity("black-forest-labs/FLUX.1-dev")
        'black-forest-labs/FLUX.1-dev'
    """
    folder = Path(name_or_path)
    if not folder.is_dir():
        return str(name_or_path)
    digest = hashlib.sha256()
    for name in _IDENTITY_FILES:
        file = folder / name
        if file.is_file():
            text = json.dumps(json.loads(file.read_text(encoding="utf-8")), sort_keys=True)
            digest.update(f"{name}\n{text}\n".encode())
    hub_id = _cache_snapshot_repo_id(folder.resolve())
    return f"{hub_id or 'local'}@{digest.hexdigest()[:16]}"
