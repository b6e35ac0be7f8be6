"""The Hugging Face Hub: the adapter repository (created before training, pushed after it, errors mapped to
their fixes, the token never shown) and the base model's identity.

The adapter repository follows the diffusers training scripts: :func:`create_adapter_repo` before training
(fails fast on a bad token or name), :func:`~scfm_diffusers.adapter.save_adapter` after it, then
:func:`push_adapter`.

The base model's Hub identity is what an adapter's card and settings may say about the model it was trained on.

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

from huggingface_hub import HfApi, constants, upload_folder
from huggingface_hub.errors import HFValidationError, LocalTokenNotFoundError
from huggingface_hub.utils import httpx, validate_repo_id

from .adapter import _ADAPTER_PLACEHOLDER, SETTINGS_NAME, WEIGHTS_NAME, WORK_PATTERNS

__all__ = ["base_model_hub_id", "base_model_identity", "check_hub_repo_id", "create_adapter_repo", "push_adapter"]

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
