"""Image/caption data for SCFM training: loading, preprocessing, teacher-generated data and caching.

Three sources feed the same path, as in the diffusers example scripts:

* a Hub dataset or a local dataset folder (``--dataset_name``),
* an image folder with a ``metadata.jsonl`` of ``{"file_name": ..., "text": ...}`` rows (``--train_data_dir``),
* data-free: images the teacher generates from a prompt list (:func:`read_prompts`,
  :func:`generate_teacher_images`), written as such an image folder.

The rows are then decoded with PIL (unreadable files are skipped, counted and named), resized and cropped
to ``(3, res, res)`` pixels in ``[-1, 1]`` (:class:`ImageCaptionPreprocessor`), encoded once into VAE
latents and text embeddings (:func:`cache_latents_and_embeddings`), after which the encoders can be freed
and training reads :class:`CachedDataset`. Few-shot sets are repeated to fill a batch
(:func:`repeat_to_length`).

Nothing here knows a model family: the caller passes the image and text encoders as callables.

Example:
    >>> dataset = load_image_caption_dataset(train_data_dir="my_images")  # doctest: +SKIP
    >>> samples = ImageCaptionPreprocessor(512, center_crop=True)(dataset)  # doctest: +SKIP
    >>> cached = cache_latents_and_embeddings(samples, encode_images=..., encode_prompts=..., batch_size=8)  # doctest: +SKIP
    >>> print(f"skipped {len(samples.skipped)} unreadable images")  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import datasets
import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
from safetensors.torch import load_file, safe_open, save_file
from tqdm.auto import tqdm

__all__ = [
    "CachedDataset",
    "ImageCaptionPreprocessor",
    "ImageCaptionSample",
    "ImageCaptionSamples",
    "SkippedImage",
    "cache_latents_and_embeddings",
    "generate_teacher_images",
    "load_image_caption_dataset",
    "make_fingerprint",
    "read_prompts",
    "repeat_to_length",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Files the ``imagefolder`` loader reads captions from.
METADATA_FILES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")
#: Written next to teacher images; records the settings each image was generated with.
MANIFEST_FILE = "generation_manifest.json"
# Errors PIL and the file system raise for missing, truncated or non-image files.
_UNREADABLE_ERRORS = (OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombError)


# --------------------------------------------------------------------------------------------------------
# 1. Loading
# --------------------------------------------------------------------------------------------------------


def load_image_caption_dataset(
    *,
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_data_dir: str | os.PathLike | None = None,
    image_column: str = "image",
    caption_column: str = "text",
    cache_dir: str | os.PathLike | None = None,
    max_train_samples: int | None = None,
    split: str = "train",
    seed: int | None = None,
) -> datasets.Dataset:
    """Load an image/caption dataset from the Hub, a local dataset folder or an image folder.

    Images are not decoded here (``datasets`` decodes lazily); :class:`ImageCaptionPreprocessor` does it.

    Args:
        dataset_name: A Hub dataset id or a local dataset folder, passed to ``datasets.load_dataset``.
        dataset_config_name: The dataset's config name, if it has several.
        train_data_dir: An image folder with a ``metadata.jsonl`` holding one ``{"file_name": ..., "text":
            ...}`` row per image (``file_name`` relative to the folder). Exactly one of ``dataset_name`` and
            ``train_data_dir`` must be given.
        image_column: Column holding the images.
        caption_column: Column holding the captions.
        cache_dir: Where ``datasets`` caches downloads and the prepared dataset.
        max_train_samples: Keep only this many rows (after shuffling with ``seed`` if it is given).
        split: The split to load.
        seed: If given with ``max_train_samples``, shuffle with this seed before truncating.

    Returns:
        The dataset, with at least ``image_column`` and ``caption_column``.

    Raises:
        ValueError: Neither or both sources given, a column missing, or a folder without metadata file.
        FileNotFoundError: ``train_data_dir`` does not exist.
    """
    if (dataset_name is None) == (train_data_dir is None):
        raise ValueError(
            "Give exactly one data source: --dataset_name (a Hub dataset id or a local dataset folder) or "
            "--train_data_dir (an image folder with a metadata.jsonl)."
        )
    if train_data_dir is not None:
        folder = Path(train_data_dir)
        if not folder.is_dir():
            raise FileNotFoundError(f"--train_data_dir {str(folder)!r} is not a directory.")
        if not any(next(folder.rglob(name), None) for name in METADATA_FILES):
            raise ValueError(
                f"--train_data_dir {str(folder)!r} has no metadata.jsonl. Add one with a JSON line per image "
                'holding its path relative to the folder and its caption, e.g. {"file_name": "0001.png", '
                '"text": "a photo of a cat"}.'
            )
        dataset = datasets.load_dataset("imagefolder", data_dir=str(folder), cache_dir=cache_dir, split=split)
    else:
        dataset = datasets.load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir, split=split)

    for column, flag in ((image_column, "--image_column"), (caption_column, "--caption_column")):
        if column not in dataset.column_names:
            raise ValueError(
                f"Column {column!r} not found in the dataset; its columns are {dataset.column_names}. "
                f"Set {flag} to the column that holds the {flag[2:].split('_')[0]}s."
            )
    if max_train_samples is not None:
        if seed is not None:
            dataset = dataset.shuffle(seed=seed)
        dataset = dataset.select(range(min(max_train_samples, len(dataset))))
    return dataset


# --------------------------------------------------------------------------------------------------------
# 2. Decoding and preprocessing
# --------------------------------------------------------------------------------------------------------


class ImageCaptionSample(NamedTuple):
    """One preprocessed training pair.

    Attributes:
        pixel_values: ``(3, res, res)`` float32 in ``[-1, 1]``.
        caption: The caption.
    """

    pixel_values: torch.Tensor
    caption: str


@dataclass(frozen=True)
class SkippedImage:
    """An image that could not be decoded.

    Attributes:
        index: Row in the dataset.
        source: The file path, or ``"row <index>"`` for images stored as bytes without a path.
        error: The decoding error, as text.
    """

    index: int
    source: str
    error: str


class ImageCaptionPreprocessor:
    """Decode, resize and crop images to ``(3, res, res)`` tensors in ``[-1, 1]``, like the diffusers scripts.

    The shorter side is resized to ``resolution`` (bilinear), then a ``resolution`` square is cropped at the
    centre (``center_crop=True``) or at random, and flipped horizontally with probability ½ if
    ``random_flip``. Random choices come from a generator seeded with ``seed``, so they are reproducible.
    When latents are cached, the augmentation is drawn once, at caching time.

    Args:
        resolution: Side of the square output.
        center_crop: Crop at the centre instead of at random.
        random_flip: Flip horizontally with probability ½.
        image_column: Column holding the images (``datasets.Image`` or file paths).
        caption_column: Column holding the captions (a string, or a list of strings: one is drawn).
        seed: Seed of the crop / flip / caption choices.
    """

    def __init__(
        self,
        resolution: int,
        *,
        center_crop: bool = False,
        random_flip: bool = False,
        image_column: str = "image",
        caption_column: str = "text",
        seed: int | None = 0,
    ) -> None:
        if resolution <= 0:
            raise ValueError(f"resolution must be positive, got {resolution}.")
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.image_column = image_column
        self.caption_column = caption_column
        self.generator = torch.Generator()
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)

    def _randint(self, high: int) -> int:
        """A random integer in ``[0, high]``."""
        return int(torch.randint(high + 1, (), generator=self.generator))

    def transform(self, image: PIL.Image.Image) -> torch.Tensor:
        """Turn a PIL image into a ``(3, res, res)`` float32 tensor in ``[-1, 1]``."""
        image = PIL.ImageOps.exif_transpose(image).convert("RGB")
        res = self.resolution
        scale = res / min(image.size)
        size = (max(res, round(image.width * scale)), max(res, round(image.height * scale)))
        image = image.resize(size, PIL.Image.Resampling.BILINEAR)
        if self.center_crop:
            left, top = (image.width - res) // 2, (image.height - res) // 2
        else:
            left, top = self._randint(image.width - res), self._randint(image.height - res)
        image = image.crop((left, top, left + res, top + res))
        if self.random_flip and self._randint(1):
            image = image.transpose(PIL.Image.Transpose.FLIP_LEFT_RIGHT)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1)
        return pixels / 127.5 - 1.0

    def caption(self, value: Any, index: int) -> str:
        """Return the caption of row ``index``; draws one if the row holds a list of captions."""
        if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
            return value[self._randint(len(value) - 1)]
        if not isinstance(value, str):
            raise ValueError(
                f"Row {index}: caption column {self.caption_column!r} holds {value!r}; expected a string or a "
                "list of strings (set --caption_column)."
            )
        return value

    def __call__(self, dataset: datasets.Dataset) -> ImageCaptionSamples:
        """Wrap ``dataset`` into a lazy iterable of :class:`ImageCaptionSample` that skips unreadable images."""
        return ImageCaptionSamples(dataset, self)


def _open_image(entry: Any) -> PIL.Image.Image:
    """Open an undecoded ``datasets.Image`` entry (``{"bytes": ..., "path": ...}``), a path or a PIL image."""
    if isinstance(entry, PIL.Image.Image):
        return entry
    if isinstance(entry, (str, os.PathLike)):
        entry = {"bytes": None, "path": str(entry)}
    if not isinstance(entry, Mapping):
        raise ValueError(f"not an image: {type(entry).__name__}")
    path = entry.get("path")
    data = entry.get("bytes")
    image = PIL.Image.open(io.BytesIO(data)) if data is not None else PIL.Image.open(path)
    image.load()  # PIL is lazy too: a truncated file only fails here
    return image


class ImageCaptionSamples:
    """A lazy, re-iterable view of a dataset as :class:`ImageCaptionSample` s, skipping unreadable images.

    Each unreadable image is logged as a warning naming the file and recorded in :attr:`skipped`
    (reset at the start of each pass). The image column is read with ``datasets.Image(decode=False)`` and
    decoded here with PIL, so the file path is known when decoding fails.

    Args:
        dataset: The dataset, e.g. from :func:`load_image_caption_dataset`.
        preprocessor: Decoding / cropping settings and the column names.

    Attributes:
        skipped: The images skipped during the last complete or ongoing pass.

    Raises:
        ValueError: (when iterated) every image of a non-empty dataset is unreadable.
    """

    def __init__(self, dataset: datasets.Dataset, preprocessor: ImageCaptionPreprocessor) -> None:
        for column in (preprocessor.image_column, preprocessor.caption_column):
            if column not in dataset.column_names:
                raise ValueError(
                    f"Column {column!r} not found in the dataset; its columns are {dataset.column_names}."
                )
        dataset = dataset.select_columns([preprocessor.image_column, preprocessor.caption_column])
        feature = dataset.features[preprocessor.image_column]
        if isinstance(feature, datasets.Image) or (isinstance(feature, datasets.Value) and feature.dtype == "string"):
            dataset = dataset.cast_column(preprocessor.image_column, datasets.Image(decode=False))
        self.dataset = dataset
        self.preprocessor = preprocessor
        self.skipped: list[SkippedImage] = []

    def __len__(self) -> int:
        """Number of rows (an upper bound on the number of samples)."""
        return len(self.dataset)

    def __iter__(self) -> Iterator[ImageCaptionSample]:
        self.skipped = []
        image_column, caption_column = self.preprocessor.image_column, self.preprocessor.caption_column
        num_yielded = 0
        for index, row in enumerate(self.dataset):
            entry = row[image_column]
            try:
                pixels = self.preprocessor.transform(_open_image(entry))
            except _UNREADABLE_ERRORS as error:
                path = entry.get("path") if isinstance(entry, Mapping) else entry
                source = str(path) if path else f"row {index}"
                self.skipped.append(SkippedImage(index, source, f"{type(error).__name__}: {error}"))
                logger.warning("Skipping unreadable image %s (row %d): %s", source, index, error)
                continue
            num_yielded += 1
            yield ImageCaptionSample(pixels, self.preprocessor.caption(row[caption_column], index))
        if num_yielded == 0 and len(self.dataset) > 0:
            examples = ", ".join(s.source for s in self.skipped[:3])
            raise ValueError(
                f"All {len(self.dataset)} images of the dataset are unreadable (e.g. {examples}; first error: "
                f"{self.skipped[0].error}). Check the image column (--image_column) and the files."
            )


def repeat_to_length(items: Sequence[T], min_length: int) -> Sequence[T]:
    """Repeat a small dataset whole until it has at least ``min_length`` items (few-shot training).

    Whole repeats keep every item equally frequent, e.g. 10 pairs with ``min_length=16`` give 20 items.

    Args:
        items: A list / tuple or a ``torch.utils.data.Dataset`` with ``__len__`` (e.g. :class:`CachedDataset`).
        min_length: The least number of items wanted, typically ``batch_size × num_processes``.

    Returns:
        ``items`` itself if long enough; otherwise a list (for lists / tuples) or a
        ``torch.utils.data.ConcatDataset`` of repeats (for datasets; collate with ``CachedDataset.collate``).

    Raises:
        ValueError: ``items`` is empty.
    """
    length = len(items)
    if length == 0:
        raise ValueError("Cannot repeat an empty dataset.")
    if length >= min_length:
        return items
    repeats = math.ceil(min_length / length)
    if isinstance(items, (list, tuple)):
        return list(items) * repeats
    return torch.utils.data.ConcatDataset([items] * repeats)


# --------------------------------------------------------------------------------------------------------
# 3. Data-free mode: teacher-generated images
# --------------------------------------------------------------------------------------------------------


def read_prompts(path: str | os.PathLike) -> list[str]:
    """Read one prompt per line; blank lines and lines starting with ``#`` are skipped.

    Raises:
        FileNotFoundError: The file does not exist.
        ValueError: The file holds no prompt.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Prompt file {str(path)!r} does not exist.")
    lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    prompts = [line for line in lines if line and not line.startswith("#")]
    if not prompts:
        raise ValueError(f"Prompt file {str(path)!r} holds no prompts (one per line; '#' starts a comment).")
    return prompts


def _tmp_path(path: Path) -> Path:
    """A sibling temporary name, unique per process, for write-then-rename (a crash never leaves half a file)."""
    return path.with_name(f"{path.name}.{os.getpid()}.tmp")


def _write_atomic(path: Path, text: str) -> None:
    tmp = _tmp_path(path)
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def generate_teacher_images(
    pipeline: Any,
    prompts: Sequence[str],
    output_dir: str | os.PathLike,
    *,
    height: int,
    width: int,
    num_inference_steps: int = 32,
    guidance_scale: float | None = None,
    seed: int = 0,
    images_per_prompt: int = 1,
    batch_size: int = 4,
    pipeline_kwargs: Mapping[str, Any] | None = None,
    show_progress: bool = True,
) -> Path:
    """Generate training images with the teacher pipeline into an image folder (data-free SCFM).

    Image ``i = prompt_index × images_per_prompt + k`` is ``{i:06d}.png``, generated with seed ``seed + i``
    on a CPU generator, so it does not depend on the batch size or the device. The settings of each image
    (prompt, seed, steps, size, guidance, extra kwargs, teacher name) are kept in
    ``generation_manifest.json``; a re-run regenerates only the images whose file is missing or whose
    settings changed, and removes images of the previous run that are no longer wanted. The manifest is
    updated after every batch, so an interrupted run loses at most one batch. ``metadata.jsonl`` is written
    at the end, so :func:`load_image_caption_dataset` reads the folder with ``train_data_dir=output_dir``.

    Run it on one process (e.g. ``if accelerator.is_main_process``) and wait for it on the others.

    Args:
        pipeline: A diffusers text-to-image pipeline (e.g. a stock ``FluxPipeline``) taking ``prompt``,
            ``height``, ``width``, ``num_inference_steps``, ``generator`` and optionally ``guidance_scale``.
        prompts: The prompts.
        output_dir: The image folder (created if needed).
        height: Image height in pixels.
        width: Image width in pixels.
        num_inference_steps: Teacher sampling steps.
        guidance_scale: Passed to the pipeline if given; otherwise the pipeline's default is used.
        seed: Seed of image 0; image ``i`` uses ``seed + i``.
        images_per_prompt: Images per prompt.
        batch_size: Images per pipeline call.
        pipeline_kwargs: Further JSON-serialisable pipeline arguments (e.g. ``max_sequence_length``).
        show_progress: Show a tqdm bar (the pipeline's own per-call bar is hidden meanwhile).

    Returns:
        ``output_dir`` as a :class:`~pathlib.Path`.
    """
    if not prompts:
        raise ValueError("No prompts to generate images from.")
    if images_per_prompt < 1 or batch_size < 1:
        raise ValueError(f"images_per_prompt and batch_size must be ≥ 1, got {images_per_prompt}, {batch_size}.")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = output_dir / MANIFEST_FILE
    manifest: dict[str, dict] = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}

    common = {
        "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale,
        "height": height,
        "width": width,
        "pipeline_kwargs": dict(pipeline_kwargs or {}),
        "teacher": getattr(pipeline, "name_or_path", None),
    }
    wanted = {
        f"{i:06d}.png": {"prompt": prompt, "seed": seed + i, **common}
        for i, prompt in enumerate(p for p in prompts for _ in range(images_per_prompt))
    }
    # The JSON round trip makes tuples lists, as in the stored manifest.
    wanted = json.loads(json.dumps(wanted))
    for stale in set(manifest) - set(wanted):
        (output_dir / stale).unlink(missing_ok=True)
        del manifest[stale]
    todo = [
        name
        for name, settings in wanted.items()
        if manifest.get(name) != settings or not (output_dir / name).is_file()
    ]
    if len(todo) < len(wanted):
        logger.info("Reusing %d of %d teacher images in %s.", len(wanted) - len(todo), len(wanted), output_dir)

    call_kwargs = {
        "height": height,
        "width": width,
        "num_inference_steps": num_inference_steps,
        **common["pipeline_kwargs"],
    }
    if guidance_scale is not None:
        call_kwargs["guidance_scale"] = guidance_scale
    progress_config = dict(getattr(pipeline, "_progress_bar_config", {}))
    if show_progress and hasattr(pipeline, "set_progress_bar_config"):
        pipeline.set_progress_bar_config(disable=True)
    try:
        with tqdm(total=len(todo), desc="Teacher images", unit="img", disable=not show_progress or not todo) as bar:
            for start in range(0, len(todo), batch_size):
                names = todo[start : start + batch_size]
                generators = [torch.Generator().manual_seed(wanted[name]["seed"]) for name in names]
                images = pipeline(
                    prompt=[wanted[name]["prompt"] for name in names], generator=generators, **call_kwargs
                ).images
                for name, image in zip(names, images, strict=True):
                    tmp = _tmp_path(output_dir / name)
                    image.save(tmp, format="PNG")
                    os.replace(tmp, output_dir / name)
                    manifest[name] = wanted[name]
                _write_atomic(manifest_path, json.dumps(manifest, indent=1))
                bar.update(len(names))
    finally:
        if hasattr(pipeline, "_progress_bar_config"):
            pipeline._progress_bar_config = progress_config

    _write_atomic(manifest_path, json.dumps(manifest, indent=1))
    lines = (json.dumps({"file_name": name, "text": settings["prompt"]}) for name, settings in wanted.items())
    _write_atomic(output_dir / "metadata.jsonl", "\n".join(lines) + "\n")
    return output_dir


# --------------------------------------------------------------------------------------------------------
# 4. Latent and text-embedding cache
# --------------------------------------------------------------------------------------------------------


def make_fingerprint(**settings: Any) -> str:
    """A short stable hash of the settings that determine a cache (model, resolution, data, crops, ...)."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class CachedDataset(torch.utils.data.Dataset):
    """Precomputed VAE latents and text embeddings, one row per training pair.

    Items are dicts ``{"latents": (C, h, w), **text}`` where ``text`` holds per-sample tensors such as
    ``prompt_embeds`` ``(L, D)`` and ``pooled_prompt_embeds`` ``(D',)``; :meth:`collate` stacks them.

    Args:
        latents: ``(N, C, h, w)`` latents.
        text: Per-sample text tensors, each ``(N, ...)``; the key ``"latents"`` is reserved.
        captions: The N captions (kept for logging and validation prompts).

    Raises:
        ValueError: The leading dimensions or the number of captions differ from N.
    """

    def __init__(self, latents: torch.Tensor, text: Mapping[str, torch.Tensor], captions: Sequence[str] | None = None):
        if "latents" in text:
            raise ValueError("The text-tensor key 'latents' is reserved for the image latents.")
        self.latents = latents
        self.text = dict(text)
        self.captions = list(captions) if captions is not None else None
        for key, tensor in {"latents": latents, **self.text}.items():
            if tensor.shape[0] != len(latents):
                raise ValueError(f"{key!r} has {tensor.shape[0]} rows, but there are {len(latents)} latents.")
        if self.captions is not None and len(self.captions) != len(latents):
            raise ValueError(f"{len(self.captions)} captions for {len(latents)} latents.")

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"latents": self.latents[index], **{key: value[index] for key, value in self.text.items()}}

    @staticmethod
    def collate(items: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Stack a list of items into a batch: ``{"latents": (B, C, h, w), **text (B, ...)}``."""
        return {key: torch.stack([item[key] for item in items]) for key in items[0]}

    def save(self, path: str | os.PathLike, fingerprint: str) -> None:
        """Write the cache as one safetensors file with ``fingerprint`` (and the captions) in its header."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"latents": self.latents, **{f"text.{key}": value for key, value in self.text.items()}}
        metadata = {"fingerprint": fingerprint, "captions": json.dumps(self.captions)}
        tmp = _tmp_path(path)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> tuple[CachedDataset, str | None]:
        """Read a cache written by :meth:`save`; returns ``(dataset, fingerprint)``."""
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(path))
        text = {key.removeprefix("text."): value for key, value in tensors.items() if key.startswith("text.")}
        captions = json.loads(metadata.get("captions", "null"))
        return cls(tensors["latents"], text, captions), metadata.get("fingerprint")


def _read_cache(path: Path, fingerprint: str) -> CachedDataset | None:
    """The cache at ``path`` if it exists and was made with ``fingerprint``; logs why it is not used."""
    if not path.is_file():
        return None
    try:
        cached, stored = CachedDataset.load(path)
    except Exception as error:  # a truncated or foreign file: recompute rather than fail
        logger.warning("Latent cache %s is unreadable (%s): recomputing.", path, error)
        return None
    if stored != fingerprint:
        logger.warning(
            "Latent cache %s was made with other settings (fingerprint %s, now %s): recomputing.",
            path,
            stored,
            fingerprint,
        )
        return None
    logger.info("Loaded %d cached latents and text embeddings from %s.", len(cached), path)
    return cached


def cache_latents_and_embeddings(
    samples: Iterable[ImageCaptionSample | tuple[torch.Tensor, str]],
    *,
    encode_images: Callable[[torch.Tensor], torch.Tensor],
    encode_prompts: Callable[[list[str]], Mapping[str, torch.Tensor]],
    batch_size: int,
    cache_path: str | os.PathLike | None = None,
    fingerprint: str | None = None,
    dtype: torch.dtype = torch.float32,
    show_progress: bool = True,
) -> CachedDataset:
    """Encode every pair once (under ``torch.no_grad``) into latents and text embeddings.

    With ``cache_path``, a cache file made with the same ``fingerprint`` is loaded instead (``samples`` is
    then not read, so no image is decoded); otherwise the result is computed and written there. A different
    fingerprint recomputes and says so in a warning. After this the caller can free the encoders.

    Args:
        samples: ``(pixel_values (3, H, W), caption)`` pairs, e.g. :class:`ImageCaptionSamples`.
        encode_images: ``(B, 3, H, W)`` pixels in ``[-1, 1]`` → ``(B, C, h, w)`` latents, already scaled
            and shifted as the transformer expects; moves the batch to its device itself.
        encode_prompts: ``B`` captions → dict of per-sample tensors with leading dimension ``B``
            (e.g. ``{"prompt_embeds": (B, L, D), "pooled_prompt_embeds": (B, D')}``).
        batch_size: Pairs per encoder call.
        cache_path: A ``.safetensors`` file to load from / save to (main process only under DDP).
        fingerprint: Identifies the settings the cache depends on (see :func:`make_fingerprint`);
            required with ``cache_path``.
        dtype: Dtype of the stored tensors (on the CPU).
        show_progress: Show a tqdm bar.

    Returns:
        The :class:`CachedDataset`, tensors on the CPU.

    Raises:
        ValueError: ``cache_path`` without ``fingerprint``, no samples, or an encoder output with the wrong
            leading dimension.
    """
    if cache_path is not None:
        if fingerprint is None:
            raise ValueError("A fingerprint is needed to reuse a latent cache safely (see make_fingerprint).")
        cached = _read_cache(Path(cache_path), fingerprint)
        if cached is not None:
            return cached

    latents: list[torch.Tensor] = []
    text: dict[str, list[torch.Tensor]] = {}
    captions: list[str] = []

    def encode(batch: list[tuple[torch.Tensor, str]]) -> None:
        pixels = torch.stack([pixel_values for pixel_values, _ in batch])
        prompts = [caption for _, caption in batch]
        outputs = {"latents": encode_images(pixels), **encode_prompts(prompts)}
        for key, value in outputs.items():
            if value.shape[0] != len(batch):
                raise ValueError(
                    f"Encoder output {key!r} has leading dimension {value.shape[0]}, expected {len(batch)}."
                )
        latents.append(outputs.pop("latents").detach().to("cpu", dtype))
        for key, value in outputs.items():
            text.setdefault(key, []).append(value.detach().to("cpu", dtype))
        captions.extend(prompts)

    total = len(samples) if hasattr(samples, "__len__") else None
    batch: list[tuple[torch.Tensor, str]] = []
    with torch.no_grad(), tqdm(total=total, desc="Caching latents", unit="img", disable=not show_progress) as bar:
        for sample in samples:
            batch.append(tuple(sample))
            if len(batch) == batch_size:
                encode(batch)
                bar.update(len(batch))
                batch = []
        if batch:
            encode(batch)
            bar.update(len(batch))
    if not latents:
        raise ValueError("No samples to cache: the dataset is empty.")

    dataset = CachedDataset(torch.cat(latents), {key: torch.cat(values) for key, values in text.items()}, captions)
    if cache_path is not None:
        dataset.save(cache_path, fingerprint)
        logger.info("Cached %d latents and text embeddings in %s.", len(dataset), cache_path)
    return dataset
