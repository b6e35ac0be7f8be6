"""Video clips for SCFM training: probing, streaming decode to ``(3, F, H, W)`` pixels, clip folders, preprocessing.

Text-to-video data (``--num_frames``) comes from the same sources as images and goes through the same views,
latent cache and stream (:mod:`scfm_diffusers.training.data`, :mod:`scfm_diffusers.training.cache`):

* a folder of clips (:data:`~scfm_diffusers.training.data.VIDEO_EXTENSIONS`) with a ``metadata.jsonl`` of
  ``{"file_name": ..., "text": ...}`` rows (``--train_data_dir``, or a local ``--dataset_name`` folder), the
  image folder's convention (:func:`load_clip_folder`);
* a ``datasets`` data set whose ``--video_column`` holds file paths, bytes or ``datasets.Video`` entries.

Clips are decoded with PyAV (``pip install "scfm-diffusers[video]"``) one frame at a time: a decoded frame is
converted only if it is picked, and besides the output at most two decoded frames are held, so memory does
not grow with the clip's length. The window is reached by seeking to the key frame before it.

**Time.** A clip becomes ``F`` frames at the target rate ``fps`` (``--video_fps``; default the clip's own):
target ``k`` at ``start + k / fps`` seconds takes the source frame whose timestamp (``pts × time_base``, from
the stream's start) is nearest, the earlier one on a tie. The window needs ``(F − 1) / fps`` seconds; a clip
whose frames do not cover it (within half a source frame) is too short (:class:`ClipTooShortError`; in a data
set it is skipped, counted and named, like an unreadable file). **Space.** Each frame is resized so that it
covers ``(H, W)`` (keeping the aspect ratio, as images are) and cropped; the crop box and the flip are drawn
once per clip and applied to every frame alike.

Frame counts are the family's business (Wan needs ``F = 4k + 1``); here any ``F ≥ 1`` works.

Example:
    >>> info = probe_clip("clip.mp4")  # ClipInfo(frames=120, fps=24.0, width=1280, height=720, duration=5.0)  # doctest: +SKIP
    >>> pixels = read_clip("clip.mp4", num_frames=81, fps=16, height=480, width=832)  # (3, 81, 480, 832)  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import datasets
import numpy as np
import PIL.Image
import torch

from .buckets import INTERPOLATION_MODES
from .data import (
    IMAGE_STREAM,
    METADATA_FILES,
    VIDEO_EXTENSIONS,
    CaptionPreprocessor,
    ImageCaptionSample,
    SkippedImage,
    _checked_and_selected,
    _source,
    folder_media_kind,
    row_generator,
)

__all__ = [
    "VIDEO_EXTENSIONS",
    "ClipInfo",
    "ClipTooShortError",
    "VideoCaptionPreprocessor",
    "load_clip_folder",
    "load_video_caption_dataset",
    "probe_clip",
    "read_clip",
]

logger = logging.getLogger(__name__)

#: A clip: a file path, or the file's bytes.
ClipSource = str | os.PathLike | bytes
# Seconds: timestamps closer than this are the same instant (float rounding of pts × time_base, k / fps).
_EPS = 1e-6


@dataclass(frozen=True)
class ClipInfo:
    """What a clip's container says about its (first) video stream.

    Attributes:
        frames: Number of frames (from the stream's frame count, else its duration × rate, else by counting
            packets).
        fps: Average frame rate.
        width: Frame width in pixels (as stored: rotation metadata is not applied).
        height: Frame height in pixels.
        duration: ``frames / fps`` seconds.
    """

    frames: int
    fps: float
    width: int
    height: int
    duration: float


class ClipTooShortError(ValueError):
    """A clip has too few frames for ``num_frames`` at the target rate (the message names it and the fix)."""


def _import_av():
    try:
        import av
    except ImportError as error:
        raise ImportError(
            'Training on video clips needs PyAV to decode them: pip install "scfm-diffusers[video]" (or av).'
        ) from error
    return av


def _open(av, source: ClipSource):
    if isinstance(source, (bytes, bytearray, memoryview)):
        return av.open(io.BytesIO(source))
    return av.open(os.fspath(source))


def _name(source: ClipSource) -> str:
    return "the clip" if isinstance(source, (bytes, bytearray, memoryview)) else str(source)


def _video_stream(container, source: ClipSource):
    if not container.streams.video:
        raise ValueError(f"{_name(source)} holds no video stream.")
    return container.streams.video[0]


def _stream_info(av, container, stream, source: ClipSource) -> tuple[ClipInfo, float]:
    """``(info, start)``: the stream's :class:`ClipInfo` and its first timestamp in seconds (frame times count
    from it)."""
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    if not rate:
        raise ValueError(f"{_name(source)} does not say its frame rate.")
    fps = float(rate)
    start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
    frames = stream.frames  # 0 in Matroska / WebM: the duration says it, else the packets are counted
    if not frames and stream.duration is not None:
        frames = round(float(stream.duration * stream.time_base) * fps)
    if not frames and container.duration is not None:
        frames = round(container.duration / av.time_base * fps)
    if not frames:
        with _open(av, source) as again:
            frames = sum(1 for packet in again.demux(_video_stream(again, source)) if packet.size)
    width, height = stream.codec_context.width, stream.codec_context.height
    return ClipInfo(frames=frames, fps=fps, width=width, height=height, duration=frames / fps), start


def probe_clip(source: ClipSource) -> ClipInfo:
    """Frame count, rate, size and duration of a clip's first video stream, from its container (no decoding).

    Args:
        source: A file path, or the file's bytes.

    Raises:
        ImportError: PyAV is not installed.
        ValueError: No video stream, or no frame rate. PyAV's errors (``av.FFmpegError``) for unreadable files.
    """
    av = _import_av()
    with _open(av, source) as container:
        return _stream_info(av, container, _video_stream(container, source), source)[0]


def _too_short(source: ClipSource, info: ClipInfo, num_frames: int, rate: float, detail: str = "") -> str:
    span = (num_frames - 1) / rate
    needed = math.floor(span * info.fps + 0.5 + _EPS) + 1
    return (
        f"{_name(source)} is too short: {info.frames} frames at {info.fps:g} fps ({info.duration:.2f} s){detail}; "
        f"{num_frames} frames at {rate:g} fps span {span:.2f} s and need {needed} of its frames. Lower --num_frames "
        "or --video_fps (unset, it is each clip's own rate), or remove the clip."
    )


def _window_start(
    source: ClipSource,
    info: ClipInfo,
    num_frames: int,
    rate: float,
    start: float | str,
    generator: torch.Generator | None,
) -> float:
    """The first target time in seconds; the window must end by the last frame (within half a frame)."""
    last = (info.frames - 1) / info.fps  # timestamp of the last frame
    span = (num_frames - 1) / rate
    slack = last - span
    if slack < -0.5 / info.fps - _EPS:
        raise ClipTooShortError(_too_short(source, info, num_frames, rate))
    slack = max(slack, 0.0)
    if start == "center":
        return slack / 2
    if start == "random":
        return float(torch.rand((), generator=generator, dtype=torch.float64)) * slack
    if isinstance(start, str):
        raise ValueError(f"start must be a number of seconds, 'center' or 'random', got {start!r}.")
    if not 0 <= start <= slack + _EPS:
        raise ValueError(
            f"start {start:g} s is outside {_name(source)}: {num_frames} frames at {rate:g} fps must start within "
            f"[0, {slack:.3f}] s ({info.frames} frames at {info.fps:g} fps)."
        )
    return float(start)


def _timed_frames(av, source: ClipSource, origin: float, seek: float | None) -> Iterator[tuple[float, Any]]:
    """``(seconds from the stream's start, frame)`` for the frames from the key frame at or before ``seek``
    (None: from the first), decoded one at a time."""
    with _open(av, source) as container:
        stream = _video_stream(container, source)
        if seek:
            container.seek(int((origin + seek) / stream.time_base), stream=stream, backward=True, any_frame=False)
        for frame in container.decode(stream):
            time = float(frame.pts * frame.time_base) - origin if frame.pts is not None else None
            yield time, frame


def _nearest(frames: Iterable[tuple[float, Any]], times: Sequence[float], period: float) -> Iterator[tuple[int, Any]]:
    """``(k, frame)``: for each target time ``times[k]`` (ascending), the frame whose time is nearest (the earlier
    on a tie). Reading stops after the last target; a target after the last frame takes it only within half a
    ``period``. Holds two frames at a time."""
    k, previous = 0, None
    for time, frame in frames:
        if time is None:  # no timestamp: one period after the previous frame
            time = previous[0] + period if previous is not None else 0.0
        while k < len(times) and time >= times[k] - _EPS:
            earlier = previous is not None and times[k] - previous[0] <= time - times[k] + _EPS
            yield k, previous[1] if earlier else frame
            k += 1
        if k == len(times):
            return
        previous = (time, frame)
    while previous is not None and k < len(times) and times[k] - previous[0] <= period / 2 + _EPS:
        yield k, previous[1]
        k += 1


def _randint(high: int, generator: torch.Generator | None) -> int:
    """A random integer in ``[0, high]`` (as :func:`~scfm_diffusers.training.buckets.resize_and_crop` draws)."""
    return int(torch.randint(high + 1, (), generator=generator))


def read_clip(
    source: ClipSource,
    *,
    num_frames: int,
    height: int,
    width: int,
    fps: float | None = None,
    center_crop: bool = True,
    start: float | Literal["center", "random"] = 0.0,
    generator: torch.Generator | None = None,
    random_flip: bool = False,
    interpolation: str = "bilinear",
) -> torch.Tensor:
    """Decode ``num_frames`` frames of a clip at ``fps`` into ``(3, F, H, W)`` float32 pixels in ``[-1, 1]``.

    The layout is one sample of diffusers' ``AutoencoderKLWan`` input ``(B, 3, F, H, W)``. Frames are picked by
    timestamp (module docstring: the nearest source frame to ``start + k / fps``), decoded as they stream by
    (memory does not grow with the clip), converted to RGB, resized so that they cover ``height × width``
    (keeping the aspect ratio), cropped (one box for the whole clip) and optionally flipped (all frames alike).
    Random draws, in order: the start (``"random"``), the crop's left and top offsets (``center_crop=False``),
    the flip (``random_flip``), all from ``generator`` (torch's global one if None).

    Args:
        source: A file path (any container FFmpeg reads: .mp4, .webm, .mkv, .mov, .avi, ...) or its bytes.
        num_frames: Frames to return (``F ≥ 1``).
        height: Output height in pixels.
        width: Output width in pixels.
        fps: Target frame rate (None: the clip's own, i.e. consecutive frames).
        center_crop: Crop at the centre instead of at a random offset.
        start: Time of the first frame in seconds from the clip's start; ``"center"`` centres the window in the
            clip, ``"random"`` draws it uniformly among those that fit.
        generator: Source of the random start, crop and flip.
        random_flip: Flip every frame horizontally with probability ½.
        interpolation: Resize filter, a key of :data:`~scfm_diffusers.training.buckets.INTERPOLATION_MODES`.

    Returns:
        ``(3, num_frames, height, width)`` float32 in ``[-1, 1]``.

    Raises:
        ClipTooShortError: The clip's frames do not cover ``num_frames`` at ``fps`` (the message gives its frames,
            rate and duration, what the window needs, and the fix).
        ValueError: A bad argument, a numeric ``start`` whose window leaves the clip, or a file without a video
            stream. PyAV's errors (``av.FFmpegError``, also ``OSError`` / ``ValueError``) for unreadable files.
        ImportError: PyAV is not installed.
    """
    if num_frames < 1 or height < 1 or width < 1:
        raise ValueError(f"num_frames, height and width must be >= 1, got {num_frames}, {height}, {width}.")
    if fps is not None and not (math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be a positive number or None, got {fps}.")
    if interpolation not in INTERPOLATION_MODES:
        raise ValueError(f"interpolation must be one of {sorted(INTERPOLATION_MODES)}, got {interpolation!r}.")
    av = _import_av()
    with _open(av, source) as container:
        info, origin = _stream_info(av, container, _video_stream(container, source), source)
    rate = fps or info.fps
    period = 1 / info.fps
    first = _window_start(source, info, num_frames, rate, start, generator)
    times = [first + k / rate for k in range(num_frames)]

    # Seek to the key frame before the window (a frame earlier: the nearest may precede the first target); a
    # container whose seek lands after it is read from its start instead.
    seek = first - period if first > period else None
    decoded = _timed_frames(av, source, origin, seek)
    head = next(decoded, None)
    if seek is not None and head is not None and head[0] is not None and head[0] > times[0] + _EPS:
        decoded.close()
        decoded = _timed_frames(av, source, origin, None)
        head = next(decoded, None)

    out = torch.empty(3, num_frames, height, width)
    layout, converted, filled = None, (None, None), 0
    try:
        for k, frame in _nearest(_chain(head, decoded), times, period):
            if converted[0] is not frame:  # a frame picked twice (fps above the clip's) is converted once
                if layout is None:  # the crop box and the flip, drawn once for the whole clip
                    layout = _layout(frame.width, frame.height, height, width, center_crop, generator, random_flip)
                converted = (frame, _to_pixels(frame, layout, interpolation))
            out[:, k] = converted[1]
            filled = k + 1
    finally:
        decoded.close()  # closes the container at once, not when the generator is collected
    if filled < num_frames:  # the container said more frames than it holds
        detail = f", but its frames end before {times[filled]:.2f} s"
        raise ClipTooShortError(_too_short(source, info, num_frames, rate, detail))
    return out


def _chain(head: Any, rest: Iterator) -> Iterator:
    """``head`` (unless None) then ``rest``."""
    if head is not None:
        yield head
    yield from rest


@dataclass(frozen=True)
class _Layout:
    size: tuple[int, int]  # resized (width, height)
    box: tuple[int, int, int, int]  # crop (left, top, right, bottom)
    flip: bool


def _layout(
    frame_width: int,
    frame_height: int,
    height: int,
    width: int,
    center_crop: bool,
    generator: torch.Generator | None,
    random_flip: bool,
) -> _Layout:
    """Resize to cover ``height × width`` (as :func:`~scfm_diffusers.training.buckets.resize_and_crop`), then the
    crop box (centred, or left then top offset drawn) and the flip."""
    scale = max(height / frame_height, width / frame_width)
    size = (max(width, round(frame_width * scale)), max(height, round(frame_height * scale)))
    if center_crop:
        left, top = (size[0] - width) // 2, (size[1] - height) // 2
    else:
        left, top = _randint(size[0] - width, generator), _randint(size[1] - height, generator)
    flip = bool(random_flip and _randint(1, generator))
    return _Layout(size, (left, top, left + width, top + height), flip)


def _to_pixels(frame, layout: _Layout, interpolation: str) -> torch.Tensor:
    """One decoded frame as ``(3, H, W)`` float32 in ``[-1, 1]``."""
    image = frame.to_image()  # RGB, 8 bits, converted by FFmpeg from the stream's pixel format
    if image.size != layout.size:
        image = image.resize(layout.size, INTERPOLATION_MODES[interpolation])
    image = image.crop(layout.box)
    if layout.flip:
        image = image.transpose(PIL.Image.Transpose.FLIP_LEFT_RIGHT)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1)
    return pixels / 127.5 - 1.0


# --------------------------------------------------------------------------------------------------------
# Data sets of clips
# --------------------------------------------------------------------------------------------------------


def _metadata_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of one metadata file (``.jsonl``, ``.csv`` or ``.parquet``)."""
    if path.suffix == ".parquet":
        import pyarrow.parquet

        return pyarrow.parquet.read_table(path).to_pylist()
    if path.suffix == ".csv":
        import csv

        with open(path, newline="", encoding="utf-8") as handle:
            return list(csv.DictReader(handle))
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError as error:
                raise ValueError(f"{path}:{number} is not a JSON object ({error}).") from None
            if not isinstance(rows[-1], dict):
                raise ValueError(f"{path}:{number} is not a JSON object.")
    return rows


def load_clip_folder(folder: str | os.PathLike, *, video_column: str = "video") -> datasets.Dataset:
    """A folder of clips with metadata files, as a data set of one row per metadata row.

    The image folder's convention (``datasets``' ``imagefolder``): every ``metadata.jsonl`` (or ``.csv`` /
    ``.parquet``) in the folder or below holds rows with a ``file_name`` relative to that file's folder and the
    other columns (e.g. ``text``). Clips no row names are not used (a warning counts them); a listed clip that
    is missing or unreadable is skipped when decoded, like a broken image. Unlike ``datasets``' own
    ``videofolder``, every extension of :data:`VIDEO_EXTENSIONS` is read (WebM too).

    Args:
        folder: The clip folder.
        video_column: Name of the column holding each clip (``datasets.Video(decode=False)``: its path).

    Returns:
        The data set; its fingerprint covers every row and each listed clip's size and modification time (as
        ``datasets`` fingerprints a local folder's files), so replacing a clip rebuilds a latent cache.

    Raises:
        ValueError: No metadata file, a row without ``file_name``, or a metadata line that is not JSON.
    """
    folder = Path(folder)
    files = sorted(
        path
        for name in METADATA_FILES
        for path in folder.rglob(name)
        if not any(part.startswith(".") for part in path.relative_to(folder).parts)
    )
    if not files:
        raise ValueError(
            f"--train_data_dir {str(folder)!r} has no metadata.jsonl. Add one with a JSON line per clip holding its "
            'path relative to the folder and its caption, e.g. {"file_name": "0001.mp4", "text": "a cat jumps"}.'
        )
    rows, identity = [], hashlib.sha256()
    for file in files:
        for number, row in enumerate(_metadata_rows(file), start=1):
            if "file_name" not in row:
                raise ValueError(f"{file} row {number} has no file_name (the clip's path relative to {file.parent}).")
            if video_column in row:
                raise ValueError(f"{file} row {number} has a {video_column!r} column: name the clip in file_name.")
            clip = file.parent / str(row.pop("file_name"))
            stat = clip.stat() if clip.is_file() else None
            record = [clip.relative_to(folder).as_posix(), stat and stat.st_size, stat and stat.st_mtime_ns, row]
            identity.update(json.dumps(record, sort_keys=True, default=str).encode() + b"\n")
            rows.append({video_column: os.path.abspath(clip), **row})
    listed = {row[video_column] for row in rows}
    unlisted = [
        path
        for path in folder.rglob("*")
        if path.suffix.lower() in VIDEO_EXTENSIONS and os.path.abspath(path) not in listed
        if not any(part.startswith(".") for part in path.relative_to(folder).parts)
    ]
    if unlisted:
        logger.warning(
            "%d clip(s) in %s have no metadata row and are not used, e.g. %s.", len(unlisted), folder, unlisted[0]
        )
    columns = list(dict.fromkeys(key for row in rows for key in row))
    table = datasets.table.InMemoryTable.from_pydict({key: [row.get(key) for row in rows] for key in columns})
    dataset = datasets.Dataset(table, fingerprint=identity.hexdigest()[:16])
    if not hasattr(datasets, "Video"):  # datasets < 4: the paths stay strings, which the preprocessor reads alike
        return dataset
    return dataset.cast_column(video_column, datasets.Video(decode=False))


def load_video_caption_dataset(
    *,
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_data_dir: str | os.PathLike | None = None,
    data_files: str | Sequence[str] | None = None,
    video_column: str = "video",
    caption_column: str = "text",
    cache_dir: str | os.PathLike | None = None,
    max_train_samples: int | None = None,
    split: str = "train",
    seed: int | None = None,
    streaming: bool = False,
    shuffle_buffer_size: int = 1000,
) -> datasets.Dataset | datasets.IterableDataset:
    """Load a clip/caption data set: a clip folder, a local data set folder or a Hub data set.

    :func:`~scfm_diffusers.training.data.load_image_caption_dataset` for clips: the same arguments, with
    ``video_column`` for ``image_column``. Clips are not decoded here; :class:`VideoCaptionPreprocessor` does it.

    Args:
        dataset_name: A Hub dataset id, a local folder, or a builder (``"webdataset"``, ``"parquet"`` with
            ``data_files``). A local folder of clips (no ``data_files``) is read as ``train_data_dir``.
        dataset_config_name: The dataset's config name, if it has several.
        train_data_dir: A folder of clips with a ``metadata.jsonl`` (:func:`load_clip_folder`; its clips are in
            column ``"video"``).
        data_files: Files (paths or globs) for ``dataset_name``'s builder.
        video_column: Column holding the clips: paths, bytes, or ``datasets.Video`` entries (for WebDataset:
            the extension, e.g. ``"mp4"``).
        caption_column: Column holding the captions.
        cache_dir: Where ``datasets`` caches downloads and the prepared dataset.
        max_train_samples: Keep only this many rows, after shuffling with ``seed`` if it is given.
        split: The split to load (a clip folder has one).
        seed: Shuffle seed for ``max_train_samples``.
        streaming: Return a ``datasets.IterableDataset`` (a clip folder: read in order, in up to 64 shards for
            DataLoader workers).
        shuffle_buffer_size: Shuffle buffer of a streamed data set with ``max_train_samples``.

    Returns:
        The dataset, with at least ``video_column`` and ``caption_column``.

    Raises:
        ValueError: Neither or both sources given, a column missing, or a folder without clips or metadata.
        FileNotFoundError: ``train_data_dir`` does not exist.
    """
    if (dataset_name is None) == (train_data_dir is None):
        raise ValueError(
            "Give exactly one data source: --dataset_name (a Hub dataset id or a local dataset folder) or "
            "--train_data_dir (a folder of clips with a metadata.jsonl)."
        )
    folder = train_data_dir
    if folder is None and data_files is None and Path(dataset_name).is_dir():
        if folder_media_kind(dataset_name) == "video":  # as a clip folder: WebM too, which videofolder skips
            folder = dataset_name
    if folder is not None:
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"--train_data_dir {str(folder)!r} is not a directory.")
        kind = folder_media_kind(folder)
        if kind != "video":
            raise ValueError(
                f"--train_data_dir {str(folder)!r} holds no video clips ({' '.join(VIDEO_EXTENSIONS)})"
                + (
                    ": it holds images. Train on them without --num_frames (a video family: --num_frames 1)."
                    if kind == "image"
                    else "."
                )
            )
        dataset = load_clip_folder(folder)
        if streaming:  # in order; shards so that DataLoader workers (and processes) can share the decoding
            dataset = dataset.to_iterable_dataset(num_shards=max(1, min(len(dataset), 64)))
    else:
        files = [data_files] if isinstance(data_files, str) else data_files
        options = {"cache_dir": cache_dir, "split": split, "streaming": streaming}
        dataset = datasets.load_dataset(dataset_name, dataset_config_name, data_files=files, **options)
    return _checked_and_selected(
        dataset,
        ((video_column, "--video_column"), (caption_column, "--caption_column")),
        max_train_samples=max_train_samples,
        seed=seed,
        streaming=streaming,
        shuffle_buffer_size=shuffle_buffer_size,
    )


# --------------------------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------------------------


def _clip_source(entry: Any) -> ClipSource:
    """The path or bytes of an undecoded ``datasets.Video`` entry (``{"bytes": ..., "path": ...}``), a path or bytes."""
    if isinstance(entry, dict):
        source = entry.get("bytes") if entry.get("bytes") is not None else entry.get("path")
        if source is not None:
            return source
    elif isinstance(entry, (str, os.PathLike, bytes)):
        return entry
    raise ValueError(f"not a clip (a path, bytes or a datasets.Video entry): {type(entry).__name__}")


class VideoCaptionPreprocessor(CaptionPreprocessor):
    """Decode clips to ``(3, F, H, W)`` tensors in ``[-1, 1]``: the video side of
    :class:`~scfm_diffusers.training.data.ImageCaptionPreprocessor`, for the same data views, cache and stream.

    Each clip is read with :func:`read_clip`: ``num_frames`` frames at ``fps``, the window centred in the clip
    and the crop centred (``center_crop=True``), or both drawn from the row's generator
    (:func:`~scfm_diffusers.training.data.row_generator` ``(seed, i)``), and a flip of all frames alike with
    probability ½ (``random_flip``). Clips too short for the window are skipped as ``"too short"``, unreadable
    ones as ``"unreadable"``, each logged and counted (:class:`~scfm_diffusers.training.data.SkippedImage`).
    Captions follow the image rules (:meth:`~scfm_diffusers.training.data.CaptionPreprocessor.caption`).
    No aspect-ratio buckets: every clip becomes the same ``(H, W)``.

    Args:
        resolution: Side of the square output, or ``(height, width)``.
        num_frames: Frames per clip (``F ≥ 1``; the family may need more, e.g. Wan ``4k + 1``).
        fps: Target frame rate (None: each clip's own).
        center_crop: Centre the window and the crop instead of drawing them.
        random_flip: Flip horizontally with probability ½.
        video_column: Column holding the clips (paths, bytes or ``datasets.Video`` entries).
        caption_column: Column holding the captions (a string, or a list of strings: one is drawn).
        seed: Seed of the window / crop / flip / caption choices.
        interpolation: Resize filter, a key of :data:`~scfm_diffusers.training.buckets.INTERPOLATION_MODES`.
    """

    kind = "clip"
    column_flag = "--video_column"
    rows_per_read = 1  # clips stored as bytes are large: one row of the data set in RAM at a time

    def __init__(
        self,
        resolution: int | tuple[int, int],
        *,
        num_frames: int,
        fps: float | None = None,
        center_crop: bool = False,
        random_flip: bool = False,
        video_column: str = "video",
        caption_column: str = "text",
        seed: int = 0,
        interpolation: str = "bilinear",
    ) -> None:
        height, width = (resolution, resolution) if isinstance(resolution, int) else resolution
        if height <= 0 or width <= 0:
            raise ValueError(f"resolution must be positive, got {resolution}.")
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}.")
        if fps is not None and not (math.isfinite(fps) and fps > 0):
            raise ValueError(f"fps must be a positive number or None, got {fps}.")
        if interpolation not in INTERPOLATION_MODES:
            raise ValueError(f"interpolation must be one of {sorted(INTERPOLATION_MODES)}, got {interpolation!r}.")
        self.height, self.width = height, width
        self.num_frames, self.fps = num_frames, fps
        self.center_crop, self.random_flip = center_crop, random_flip
        self.video_column, self.caption_column = video_column, caption_column
        self.seed, self.interpolation = seed, interpolation

    @property
    def column(self) -> str:
        return self.video_column

    def transform(self, entry: Any, index: int = 0) -> torch.Tensor:
        """The clip of row ``index`` (a path, bytes or a ``datasets.Video`` entry) as ``(3, F, H, W)`` pixels.

        Raises:
            ClipTooShortError: The clip is too short for ``num_frames`` at ``fps``.
        """
        return read_clip(
            _clip_source(entry),
            num_frames=self.num_frames,
            height=self.height,
            width=self.width,
            fps=self.fps,
            center_crop=self.center_crop,
            start="center" if self.center_crop else "random",
            generator=row_generator(self.seed, index, IMAGE_STREAM),
            random_flip=self.random_flip,
            interpolation=self.interpolation,
        )

    def process(self, entry: Any, caption: Any, index: int) -> ImageCaptionSample | SkippedImage:
        """Decode and preprocess one row: the sample, or why it was skipped (logged as a warning)."""
        av = _import_av()  # a missing PyAV stops the run: it is not a broken clip
        source = _source(entry, index)
        caption = self.caption(caption, index, source)  # a bad caption stops the run: not skipped
        try:
            return ImageCaptionSample(self.transform(entry, index), caption, index)
        except ClipTooShortError as error:
            skipped = SkippedImage(index, source, str(error), reason="too short")
        except (OSError, ValueError, av.FFmpegError) as error:
            skipped = SkippedImage(index, source, f"{type(error).__name__}: {error}")
        logger.warning("Skipping %s clip %s (row %d): %s", skipped.reason, skipped.source, index, skipped.error)
        return skipped

    def undecoded(self, dataset: datasets.Dataset | datasets.IterableDataset):
        """``dataset`` with its clip column read as ``datasets.Video(decode=False)`` (bytes and path: no
        torchcodec needed, and a failing file can be named)."""
        video = getattr(datasets, "Video", None)  # datasets < 4 has no Video feature: paths and bytes as they are
        feature = (dataset.features or {}).get(self.video_column)
        strings = isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")
        if video is not None and (isinstance(feature, video) or strings):
            return dataset.cast_column(self.video_column, video(decode=False))
        return dataset
