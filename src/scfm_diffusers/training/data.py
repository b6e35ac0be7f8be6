"""Image/caption data for SCFM training: loading, preprocessing (square or aspect-ratio buckets), streaming.

Sources, as in the diffusers example scripts:

* a Hub dataset or a local dataset folder (``--dataset_name``), also a ``webdataset`` / ``parquet`` builder
  with ``data_files`` (e.g. WebDataset ``.tar`` shards, as diffusers' LCM ``_wds`` scripts read),
* an image folder with a ``metadata.jsonl`` of ``{"file_name": ..., "text": ...}`` rows (``--train_data_dir``),
* data-free: images the teacher generates from a prompt list (:func:`read_prompts` and
  :mod:`scfm_diffusers.training.teacher_data`), written as such an image folder.

Video clips (``--num_frames``) come from the same sources and go through the same views, cache and stream:
:mod:`scfm_diffusers.training.video` decodes them; here :class:`CaptionPreprocessor` is what both share.

Rows are decoded with PIL (unreadable files, and images smaller than the smallest bucket, are skipped,
counted and named), resized and cropped to ``(3, H, W)`` pixels in ``[-1, 1]``
(:class:`ImageCaptionPreprocessor`): a ``resolution`` square, or the aspect-ratio bucket closest to the
image's shape (:mod:`scfm_diffusers.training.buckets`). Every random choice of row ``i`` (crop, flip, which
caption of a list) comes from :func:`row_generator` ``(seed, i)``, so a row looks the same whichever process
reads it and in whatever order: the sharded cache (:mod:`scfm_diffusers.training.cache`) relies on it.
Data sets too large to cache are streamed (:class:`StreamingBatches`) and encoded on the fly.

Nothing here knows a model family: the caller passes the image and text encoders as callables.

Example:
    >>> dataset = load_image_caption_dataset(train_data_dir="my_images")  # doctest: +SKIP
    >>> samples = ImageCaptionPreprocessor(512, center_crop=True)(dataset)  # doctest: +SKIP
    >>> sample = samples.sample(0)  # ImageCaptionSample(pixel_values (3, 512, 512), caption, index) or SkippedImage  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import datasets
import PIL.Image
import PIL.ImageOps
import torch
from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

from .._files import read_prompts
from .buckets import INTERPOLATION_MODES, assign_bucket, resize_and_crop

__all__ = [
    "VIDEO_EXTENSIONS",
    "CaptionError",
    "CaptionPreprocessor",
    "ImageCaptionPreprocessor",
    "ImageCaptionSample",
    "ImageCaptionSamples",
    "SkippedImage",
    "StreamingBatches",
    "folder_media_kind",
    "load_image_caption_dataset",
    "read_prompts",
    "row_generator",
]

logger = logging.getLogger(__name__)

#: Files the ``imagefolder`` loader reads captions from.
METADATA_FILES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")
#: Clip files of a ``--train_data_dir`` (a folder of them is video data; see :func:`folder_media_kind`).
VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".mov", ".avi")
# Image files as `datasets`' imagefolder reads them, less the MPEG names PIL claims (they are video).
_IMAGE_EXTENSIONS = frozenset(ImageFolder.EXTENSIONS) - {".mpg", ".mpeg"}
# Errors PIL and the file system raise for missing, truncated or non-image files.
_UNREADABLE_ERRORS = (OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombError)
# Streams of row_generator: each random choice of a row has its own, so one never shifts another.
CAPTION_STREAM, IMAGE_STREAM = 0, 1


def row_generator(seed: int, index: int, stream: int) -> torch.Generator:
    """A CPU generator for random choice ``stream`` of data-set row ``index``, independent of order and process.

    Args:
        seed: The run's seed (``--seed``).
        index: The row number in the data set.
        stream: Which choice (captions 0, crops/flips 1, VAE posterior noise 2).
    """
    # Hashed, not packed into bits: torch's CPU generator keeps only the low 32 bits of a seed.
    digest = hashlib.blake2b(f"{seed}/{index}/{stream}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little"))


# --------------------------------------------------------------------------------------------------------
# 1. Loading
# --------------------------------------------------------------------------------------------------------


def load_image_caption_dataset(
    *,
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_data_dir: str | os.PathLike | None = None,
    data_files: str | Sequence[str] | None = None,
    image_column: str = "image",
    caption_column: str = "text",
    cache_dir: str | os.PathLike | None = None,
    max_train_samples: int | None = None,
    split: str = "train",
    seed: int | None = None,
    streaming: bool = False,
    shuffle_buffer_size: int = 1000,
) -> datasets.Dataset | datasets.IterableDataset:
    """Load an image/caption dataset from the Hub, a local dataset folder or an image folder.

    Images are not decoded here (``datasets`` decodes lazily); :class:`ImageCaptionPreprocessor` does it.

    Args:
        dataset_name: A Hub dataset id, a local dataset folder, or a builder name such as ``"webdataset"``
            or ``"parquet"`` (with ``data_files``), passed to ``datasets.load_dataset``.
        dataset_config_name: The dataset's config name, if it has several.
        train_data_dir: An image folder with a ``metadata.jsonl`` holding one ``{"file_name": ..., "text":
            ...}`` row per image (``file_name`` relative to the folder). Exactly one of ``dataset_name`` and
            ``train_data_dir`` must be given.
        data_files: Files (paths or globs) for ``dataset_name``'s builder, e.g. WebDataset ``.tar`` shards.
        image_column: Column holding the images (for WebDataset: the image extension, e.g. ``"jpg"``).
        caption_column: Column holding the captions (for WebDataset e.g. ``"txt"``).
        cache_dir: Where ``datasets`` caches downloads and the prepared dataset.
        max_train_samples: Keep only this many rows, after shuffling with ``seed`` if it is given (streaming:
            through a shuffle buffer of ``shuffle_buffer_size``).
        split: The split to load.
        seed: Shuffle seed for ``max_train_samples``.
        streaming: Return a ``datasets.IterableDataset`` that reads as it goes (nothing is downloaded or
            prepared up front).
        shuffle_buffer_size: Shuffle buffer of a streamed data set with ``max_train_samples``.

    Returns:
        The dataset, with at least ``image_column`` and ``caption_column`` (checked on the first row when a
        streamed data set does not declare its columns).

    Raises:
        ValueError: Neither or both sources given, a column missing, a folder without metadata file, or a folder
            of video clips (or of clips and images).
        FileNotFoundError: ``train_data_dir`` does not exist.
    """
    if (dataset_name is None) == (train_data_dir is None):
        raise ValueError(
            "Give exactly one data source: --dataset_name (a Hub dataset id or a local dataset folder) or "
            "--train_data_dir (an image folder with a metadata.jsonl)."
        )
    options = {"cache_dir": cache_dir, "split": split, "streaming": streaming}
    if train_data_dir is not None:
        folder = Path(train_data_dir)
        if not folder.is_dir():
            raise FileNotFoundError(f"--train_data_dir {str(folder)!r} is not a directory.")
        if folder_media_kind(folder) == "video":
            raise ValueError(
                f"--train_data_dir {str(folder)!r} holds video clips: give --num_frames (frames per clip; Wan needs "
                "4k+1, e.g. 81) to train on them (scfm_diffusers.training.video.load_video_caption_dataset)."
            )
        if not any(next(folder.rglob(name), None) for name in METADATA_FILES):
            raise ValueError(
                f"--train_data_dir {str(folder)!r} has no metadata.jsonl. Add one with a JSON line per image "
                'holding its path relative to the folder and its caption, e.g. {"file_name": "0001.png", '
                '"text": "a photo of a cat"}.'
            )
        dataset = datasets.load_dataset("imagefolder", data_dir=str(folder), **options)
    else:
        files = [data_files] if isinstance(data_files, str) else data_files
        dataset = datasets.load_dataset(dataset_name, dataset_config_name, data_files=files, **options)
    return _checked_and_selected(
        dataset,
        ((image_column, "--image_column"), (caption_column, "--caption_column")),
        max_train_samples=max_train_samples,
        seed=seed,
        streaming=streaming,
        shuffle_buffer_size=shuffle_buffer_size,
    )


def folder_media_kind(folder: str | os.PathLike) -> str | None:
    """What a data folder holds: ``"video"`` (files of :data:`VIDEO_EXTENSIONS`), ``"image"``, or None (neither).

    Hidden files and folders (e.g. a download's ``.cache``) are left out.

    Raises:
        ValueError: The folder holds both images and clips (naming one of each): one run trains on one kind.
    """
    folder = Path(folder)
    examples: dict[str, Path] = {}
    for path in folder.rglob("*"):
        suffix = path.suffix.lower()
        kind = "video" if suffix in VIDEO_EXTENSIONS else "image" if suffix in _IMAGE_EXTENSIONS else None
        if kind is None or kind in examples or any(p.startswith(".") for p in path.relative_to(folder).parts):
            continue
        examples[kind] = path
        if len(examples) == 2:
            raise ValueError(
                f"{str(folder)!r} holds both images (e.g. {examples['image'].relative_to(folder)}) and video clips "
                f"(e.g. {examples['video'].relative_to(folder)}): a run trains on one kind; put them in two folders."
            )
    return next(iter(examples), None)


def _checked_and_selected(
    dataset: datasets.Dataset | datasets.IterableDataset,
    columns: Sequence[tuple[str, str]],
    *,
    max_train_samples: int | None,
    seed: int | None,
    streaming: bool,
    shuffle_buffer_size: int,
) -> datasets.Dataset | datasets.IterableDataset:
    """The loaded data set once ``columns`` (``(column, flag)`` pairs) are checked, cut to ``max_train_samples`` rows."""
    names = dataset.column_names
    if names is None:  # a streamed data set without declared features: look at the first row
        names = list(next(iter(dataset.take(1)), {}).keys())
    for column, flag in columns:
        if column not in names:
            raise ValueError(
                f"Column {column!r} not found in the dataset; its columns are {names}. "
                f"Set {flag} to the column that holds the {flag[2:].split('_')[0]}s."
            )
    if max_train_samples is not None:
        if streaming:
            if seed is not None:
                dataset = dataset.shuffle(seed=seed, buffer_size=shuffle_buffer_size)
            return dataset.take(max_train_samples)
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
        pixel_values: ``(3, H, W)`` float32 in ``[-1, 1]`` (the square or the row's bucket); a clip's
            ``(3, F, H, W)`` (:class:`~scfm_diffusers.training.video.VideoCaptionPreprocessor`).
        caption: The caption.
        index: The row in the data set (in a stream: the running example number).
    """

    pixel_values: torch.Tensor
    caption: str
    index: int


@dataclass(frozen=True)
class SkippedImage:
    """An image (or video clip) that was not used.

    Attributes:
        index: Row in the dataset.
        source: The file path, or ``"row <index>"`` for images stored as bytes without a path.
        error: What was wrong, as text.
        reason: ``"unreadable"`` (decoding failed), ``"too small"`` (smaller than every bucket) or, for a clip,
            ``"too short"`` (fewer frames than ``--num_frames`` at ``--video_fps``).
    """

    index: int
    source: str
    error: str
    reason: str = "unreadable"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ImageTooSmallError(ValueError):
    """The image cannot cover any aspect-ratio bucket without upscaling."""


class CaptionError(ValueError):
    """A row's caption is missing (null), not UTF-8, or not text: it stops the run (an image is never trained
    with a caption that is not the data's)."""


class CaptionPreprocessor:
    """What the data views (:class:`ImageCaptionSamples`, :class:`StreamingBatches`, the latent cache) need of a
    row preprocessor: the columns, the seed, the caption rules, and :meth:`process`, which subclasses implement
    (:class:`ImageCaptionPreprocessor`; :class:`~scfm_diffusers.training.video.VideoCaptionPreprocessor`).

    Attributes:
        column: The column holding the images or clips.
        caption_column: The column holding the captions.
        seed: Seed of every per-row random choice (:func:`row_generator`).
        kind: What a row holds, in messages (``"image"``, ``"clip"``).
        column_flag: The flag that sets :attr:`column`, named in errors.
        rows_per_read: Rows read from the data set at once (None: a whole block of up to 256; clips stored as
            bytes are large, so video reads one row at a time).
    """

    column: str
    caption_column: str
    seed: int
    kind = "image"
    column_flag = "--image_column"
    rows_per_read: int | None = None

    def caption(self, value: Any, index: int, source: str | None = None) -> str:
        """Return the caption of row ``index``; draws one (seeded by the row) if the row holds a list.

        Raises:
            CaptionError: The caption is null, bytes that are not UTF-8, or not text; the message names the row
                (and ``source``, its image, when given) and the fix.
        """
        row = f"Row {index}" + (f" ({source})" if source else "")
        if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
            choice = torch.randint(len(value), (), generator=row_generator(self.seed, index, CAPTION_STREAM))
            return value[int(choice)]
        if value is None:
            raise CaptionError(
                f"{row} has no caption (column {self.caption_column!r} is null): write its caption in the data "
                f'(e.g. its metadata.jsonl line), or "" to train that {self.kind} without a prompt.'
            )
        if isinstance(value, bytes):  # WebDataset .txt entries
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError as error:
                raise CaptionError(
                    f"{row}: the caption is not UTF-8 text (byte 0x{value[error.start]:02x} at {error.start}); "
                    "save the captions as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)."
                ) from None
        if not isinstance(value, str):
            raise CaptionError(
                f"{row}: caption column {self.caption_column!r} holds {value!r}; expected a string or a "
                "list of strings (set --caption_column)."
            )
        return value

    def process(self, entry: Any, caption: Any, index: int) -> ImageCaptionSample | SkippedImage:
        """Decode and preprocess one row: the sample, or why it was skipped (logged as a warning)."""
        raise NotImplementedError

    def undecoded(self, dataset: datasets.Dataset | datasets.IterableDataset):
        """``dataset`` with :attr:`column` left as bytes / paths, so that a failing file can be named."""
        return dataset

    def __call__(self, dataset: datasets.Dataset) -> ImageCaptionSamples:
        """Wrap ``dataset`` into a lazy, random-access view of :class:`ImageCaptionSample` s."""
        return ImageCaptionSamples(dataset, self)


class ImageCaptionPreprocessor(CaptionPreprocessor):
    """Decode, resize and crop images to ``(3, H, W)`` tensors in ``[-1, 1]``, like the diffusers scripts.

    Without ``buckets`` every image becomes a ``resolution`` square: the shorter side is resized to
    ``resolution`` (bilinear by default, upscaling small images), then cropped. With ``buckets`` (see
    :func:`~scfm_diffusers.training.buckets.make_buckets`) each image goes to the bucket closest to its aspect
    ratio among those it covers without upscaling; an image that covers none is skipped as ``"too small"``.
    Crops are centred (``center_crop=True``) or random, with a horizontal flip of probability ½ if
    ``random_flip``. Random choices of row ``i`` come from :func:`row_generator` ``(seed, i)``: reproducible
    and independent of the order rows are read in. When latents are cached, they are drawn once.

    Args:
        resolution: Side of the square output (and the buckets' nominal side).
        center_crop: Crop at the centre instead of at random.
        random_flip: Flip horizontally with probability ½.
        image_column: Column holding the images (``datasets.Image`` or file paths).
        caption_column: Column holding the captions (a string, or a list of strings: one is drawn).
        seed: Seed of the crop / flip / caption choices.
        buckets: ``(height, width)`` buckets, or None for squares.
        interpolation: Resize filter, a key of :data:`~scfm_diffusers.training.buckets.INTERPOLATION_MODES`.
    """

    def __init__(
        self,
        resolution: int,
        *,
        center_crop: bool = False,
        random_flip: bool = False,
        image_column: str = "image",
        caption_column: str = "text",
        seed: int = 0,
        buckets: Sequence[tuple[int, int]] | None = None,
        interpolation: str = "bilinear",
    ) -> None:
        if resolution <= 0:
            raise ValueError(f"resolution must be positive, got {resolution}.")
        if interpolation not in INTERPOLATION_MODES:
            raise ValueError(f"interpolation must be one of {sorted(INTERPOLATION_MODES)}, got {interpolation!r}.")
        self.interpolation = interpolation
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.image_column = image_column
        self.caption_column = caption_column
        self.seed = seed
        self.buckets = tuple(tuple(bucket) for bucket in buckets) if buckets else None

    @property
    def column(self) -> str:
        return self.image_column

    def transform(self, image: PIL.Image.Image, index: int = 0) -> torch.Tensor:
        """Turn the PIL image of row ``index`` into a ``(3, H, W)`` float32 tensor in ``[-1, 1]``.

        Raises:
            ImageTooSmallError: With buckets, the image is smaller than every bucket.
        """
        image = PIL.ImageOps.exif_transpose(image)
        bucket = (self.resolution, self.resolution)
        if self.buckets is not None:
            bucket = assign_bucket(image.height, image.width, self.buckets)
            if bucket is None:
                smallest = min(self.buckets, key=lambda b: b[0] * b[1])
                raise ImageTooSmallError(
                    f"{image.width}×{image.height} px covers no bucket (smallest {smallest[1]}×{smallest[0]} px)"
                )
        generator = row_generator(self.seed, index, IMAGE_STREAM)
        return resize_and_crop(
            image,
            bucket,
            center_crop=self.center_crop,
            generator=generator,
            random_flip=self.random_flip,
            interpolation=self.interpolation,
        )

    def process(self, entry: Any, caption: Any, index: int) -> ImageCaptionSample | SkippedImage:
        """Decode and preprocess one row: the sample, or why it was skipped (logged as a warning)."""
        caption = self.caption(caption, index, _source(entry, index))  # a bad caption stops the run: not skipped
        try:
            return ImageCaptionSample(self.transform(_open_image(entry), index), caption, index)
        except ImageTooSmallError as error:
            skipped = SkippedImage(index, _source(entry, index), str(error), reason="too small")
        except _UNREADABLE_ERRORS as error:
            skipped = SkippedImage(index, _source(entry, index), f"{type(error).__name__}: {error}")
        logger.warning("Skipping %s image %s (row %d): %s", skipped.reason, skipped.source, index, skipped.error)
        return skipped

    def undecoded(self, dataset: datasets.Dataset | datasets.IterableDataset):
        """``dataset`` with its image column read as ``datasets.Image(decode=False)`` (bytes and path)."""
        return _undecoded(dataset, self.image_column)


def _open_image(entry: Any) -> PIL.Image.Image:
    """Open an undecoded ``datasets.Image`` entry (``{"bytes": ..., "path": ...}``), a path, bytes or a PIL image."""
    if isinstance(entry, PIL.Image.Image):
        return entry
    if isinstance(entry, bytes):
        entry = {"bytes": entry, "path": None}
    if isinstance(entry, (str, os.PathLike)):
        entry = {"bytes": None, "path": str(entry)}
    if not isinstance(entry, Mapping):
        raise ValueError(f"not an image: {type(entry).__name__}")
    path = entry.get("path")
    data = entry.get("bytes")
    image = PIL.Image.open(io.BytesIO(data)) if data is not None else PIL.Image.open(path)
    image.load()  # PIL is lazy too: a truncated file only fails here
    return image


def _source(entry: Any, index: int) -> str:
    path = entry.get("path") if isinstance(entry, Mapping) else getattr(entry, "filename", None) or None
    if isinstance(entry, (str, os.PathLike)):
        path = entry
    return str(path) if path else f"row {index}"


def _undecoded(dataset, image_column: str):
    """The data set with its image column left as bytes/paths, so a failing file can be named."""
    feature = (dataset.features or {}).get(image_column)
    if isinstance(feature, datasets.Image) or (isinstance(feature, datasets.Value) and feature.dtype == "string"):
        return dataset.cast_column(image_column, datasets.Image(decode=False))
    return dataset


class ImageCaptionSamples:
    """A lazy, random-access view of a dataset as :class:`ImageCaptionSample` s, skipping unusable images.

    Each skipped image is logged as a warning naming the file and, when iterated, recorded in
    :attr:`skipped` (reset at the start of each pass). The image column is read with
    ``datasets.Image(decode=False)`` and decoded here with PIL, so the file path is known when decoding fails.
    The same holds for video clips with a :class:`~scfm_diffusers.training.video.VideoCaptionPreprocessor`.

    Args:
        dataset: The dataset, e.g. from :func:`load_image_caption_dataset`.
        preprocessor: Decoding / cropping settings and the column names (any :class:`CaptionPreprocessor`).

    Attributes:
        skipped: The images skipped during the last complete or ongoing pass.

    Raises:
        ValueError: (when iterated) every image of a non-empty dataset is unreadable.
    """

    def __init__(self, dataset: datasets.Dataset, preprocessor: CaptionPreprocessor) -> None:
        for column in (preprocessor.column, preprocessor.caption_column):
            if column not in dataset.column_names:
                raise ValueError(
                    f"Column {column!r} not found in the dataset; its columns are {dataset.column_names}."
                )
        dataset = dataset.select_columns([preprocessor.column, preprocessor.caption_column])
        self.dataset = preprocessor.undecoded(dataset)
        self.preprocessor = preprocessor
        self.skipped: list[SkippedImage] = []

    def __len__(self) -> int:
        """Number of rows (an upper bound on the number of samples)."""
        return len(self.dataset)

    def captions(self) -> list[str]:
        """The caption of every row, without decoding a single image (list-valued rows drawn per row)."""
        column_name, image_column = self.preprocessor.caption_column, self.preprocessor.column
        captions = []
        for index, row in enumerate(self.dataset.select_columns([column_name])):
            try:
                captions.append(self.preprocessor.caption(row[column_name], index))
            except CaptionError:  # again, naming the row's image (read only now: images may be large)
                self.preprocessor.caption(row[column_name], index, _source(self.dataset[index][image_column], index))
        return captions

    def rows(self, start: int, stop: int) -> Iterator[ImageCaptionSample | SkippedImage]:
        """Rows ``start ≤ i < stop`` decoded and preprocessed: a sample or a :class:`SkippedImage` each."""
        image_column, caption_column = self.preprocessor.column, self.preprocessor.caption_column
        step = self.preprocessor.rows_per_read or max(stop - start, 1)
        for first in range(start, stop, step):
            block = self.dataset[first : min(stop, first + step)]
            for offset, (entry, caption) in enumerate(zip(block[image_column], block[caption_column], strict=True)):
                yield self.preprocessor.process(entry, caption, first + offset)

    def sample(self, index: int) -> ImageCaptionSample | SkippedImage:
        """Row ``index`` decoded and preprocessed, or why it was skipped."""
        return next(self.rows(index, index + 1))

    def __iter__(self) -> Iterator[ImageCaptionSample]:
        self.skipped = []
        num_yielded = 0
        for start in range(0, len(self.dataset), 256):
            for item in self.rows(start, min(len(self.dataset), start + 256)):
                if isinstance(item, SkippedImage):
                    self.skipped.append(item)
                    continue
                num_yielded += 1
                yield item
        if num_yielded == 0 and len(self.dataset) > 0:
            examples = ", ".join(s.source for s in self.skipped[:3])
            kind, flag = self.preprocessor.kind, self.preprocessor.column_flag
            raise ValueError(
                f"All {len(self.dataset)} {kind}s of the dataset are unusable (e.g. {examples}; first error: "
                f"{self.skipped[0].error}). Check the {kind} column ({flag}) and the files."
            )


class StreamingBatches(torch.utils.data.IterableDataset):
    """A streamed data set (``datasets.IterableDataset``) as an iterable of preprocessed batches.

    For data sets too large to cache: rows are decoded and preprocessed as they arrive (in DataLoader
    workers if any; use ``DataLoader(..., batch_size=None)``) and the caller encodes each batch on the fly.
    Rows are grouped by shape, so with aspect-ratio buckets every batch comes from one bucket (a bucket's
    rows wait in a buffer until it has ``batch_size``; the rows left in buffers when the stream ends are
    dropped). Each process reads its own part (``datasets.distributed.split_dataset_by_node``); rows are
    numbered by their position in it, so per-row random choices stay reproducible. Unusable images are
    skipped, logged and counted in :attr:`num_skipped` (per worker process). Clips (a
    :class:`~scfm_diffusers.training.video.VideoCaptionPreprocessor`) stream the same way.

    Args:
        dataset: A streamed data set, e.g. ``load_image_caption_dataset(..., streaming=True)``.
        preprocessor: Decoding / cropping settings and the column names (any :class:`CaptionPreprocessor`).
        batch_size: Rows per batch.
        process_index: This process's rank (accelerate's ``process_index``).
        num_processes: The number of processes.
        skip: Rows of this process's part to skip (resuming: the rows already trained on).

    Yields:
        ``{"pixel_values": (B, 3, H, W) (clips: (B, 3, F, H, W)), "captions": list of B str, "num_rows": rows of
        the stream read so far (including skipped ones)}``.
    """

    def __init__(
        self,
        dataset: datasets.IterableDataset,
        preprocessor: CaptionPreprocessor,
        *,
        batch_size: int,
        process_index: int = 0,
        num_processes: int = 1,
        skip: int = 0,
    ) -> None:
        super().__init__()
        from datasets.distributed import split_dataset_by_node

        dataset = preprocessor.undecoded(dataset)
        if num_processes > 1:
            dataset = split_dataset_by_node(dataset, rank=process_index, world_size=num_processes)
        self.dataset = dataset.skip(skip) if skip else dataset
        self.preprocessor = preprocessor
        self.batch_size = batch_size
        self.offset = skip
        self.num_skipped = 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        image_column, caption_column = self.preprocessor.column, self.preprocessor.caption_column
        buffers: dict[tuple[int, ...], list[ImageCaptionSample]] = {}
        number = self.offset
        for number, row in enumerate(self.dataset, start=self.offset + 1):
            item = self.preprocessor.process(row[image_column], row[caption_column], number - 1)
            if isinstance(item, SkippedImage):
                self.num_skipped += 1
                continue
            buffer = buffers.setdefault(tuple(item.pixel_values.shape), [])
            buffer.append(item)
            if len(buffer) == self.batch_size:
                pixels = torch.stack([sample.pixel_values for sample in buffer])
                yield {"pixel_values": pixels, "captions": [sample.caption for sample in buffer], "num_rows": number}
                buffer.clear()


# --------------------------------------------------------------------------------------------------------
# 3. Prompt lists (data-free mode, validation)
# --------------------------------------------------------------------------------------------------------
