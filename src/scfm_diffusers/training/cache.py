"""A disk-backed, sharded cache of VAE latents and text embeddings, built by every process and read lazily.

Real SCFM runs use thousands to hundreds of thousands of captioned images; a FLUX.1-dev caption alone is a
``(256, 4096)`` T5 embedding (2 MiB in bf16). This cache keeps all of it on disk and training RAM flat:

* **Two kinds of shard.** ``text-NNNNN`` holds the embeddings of up to ``text_shard_bytes`` (64 MiB) of
  *unique* captions, stacked (identical captions, e.g. data-free runs with several images per prompt, are
  encoded once);
  ``images-NNNNN`` holds the latents of ``shard_size`` consecutive data-set rows, one tensor per row (so rows
  of different aspect-ratio buckets share a shard). Each shard is a ``.safetensors`` file plus a ``.json``
  sidecar (captions, row numbers, skipped images) written last: a shard whose sidecar exists is finished.
* **Every process works.** Shard ``s`` is built by process ``s mod num_processes`` (accelerate's
  :class:`~accelerate.PartialState`). Shard contents depend only on the rows, never on which or how many
  processes built them: crops, flips, caption choice and the VAE's posterior noise come from per-row seeds
  (:func:`~scfm_diffusers.training.data.row_generator`). A 2-process cache therefore equals the 1-process one.
* **Resumable.** An interrupted build keeps its finished shards; the next run builds only the missing ones.
* **Never stale.** ``cache_index.json`` (written last, by the main process) holds the fingerprint of every
  setting the cache depends on. A cache built with other settings is not reused: the differing settings are
  logged and the cache is rebuilt.
* **Read lazily.** :class:`LatentCache` keeps a small per-row table (16 bytes a row) in RAM and reads each
  item with positioned reads (``os.pread``), not a memory map, so the file pages it touches do not count
  against the process (a memory map's pages do: they would make RSS grow with the data set).

Time and tensor conventions are those of :mod:`scfm_diffusers.families`: latents are in the
transformer's space, ``(C, h, w)`` per row.

Example:
    >>> cache = build_latent_cache(samples, "out/cache/latents", settings={...},
    ...                            encode_images=..., encode_prompts=..., batch_size=8)  # doctest: +SKIP
    >>> item = cache[0]  # {"latents": (C, h, w), "prompt_embeds": (L, D), "pooled_prompt_embeds": (D',)}  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import struct
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import PartialState
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .._files import temporary_sibling, write_text_atomic
from .data import ImageCaptionSample, ImageCaptionSamples, SkippedImage, row_generator

__all__ = [
    "CACHE_FORMAT_VERSION",
    "INDEX_FILE",
    "LatentCache",
    "build_latent_cache",
    "make_fingerprint",
]

logger = logging.getLogger(__name__)

#: Bumped whenever the on-disk layout changes; part of every fingerprint.
CACHE_FORMAT_VERSION = 2
#: Written last by the main process; its presence (with a matching fingerprint) means the cache is complete.
INDEX_FILE = "cache_index.json"
#: Per-row VAE posterior noise uses this stream of :func:`row_generator` (crops / captions use others).
LATENT_NOISE_STREAM = 2

_SAFETENSORS_DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}

#: ``pixels (B, 3, H, W), per-row generators`` → latents ``(B, C, h, w)`` in the transformer's space.
ImageEncoder = Callable[[torch.Tensor, list[torch.Generator]], torch.Tensor]
#: ``B`` captions → ``{key: (B, ...)}`` per-caption text tensors.
PromptEncoder = Callable[[list[str]], Mapping[str, torch.Tensor]]


def make_fingerprint(**settings: Any) -> str:
    """A short stable hash of the settings that determine a cache (model, resolution, data, crops, ...)."""
    text = json.dumps({"cache_format": CACHE_FORMAT_VERSION, **settings}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------------


def _shard_name(kind: str, index: int) -> str:
    return f"{kind}-{index:05d}"


def _write_shard(folder: Path, name: str, tensors: dict[str, torch.Tensor], sidecar: dict[str, Any]) -> None:
    """Tensors first, sidecar last (both write-then-rename): a shard with a sidecar is complete."""
    tmp = temporary_sibling(folder / f"{name}.safetensors")
    save_file({key: value.contiguous() for key, value in tensors.items()}, str(tmp))
    os.replace(tmp, folder / f"{name}.safetensors")
    write_text_atomic(folder / f"{name}.json", json.dumps(sidecar))


def _read_sidecar(folder: Path, name: str) -> dict[str, Any] | None:
    path = folder / f"{name}.json"
    if not path.is_file() or not (folder / f"{name}.safetensors").is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


class _RowReader:
    """Reads a tensor, or one row of it, from a ``.safetensors`` file with ``os.pread`` (no memory map).

    Safe across ``fork`` (DataLoader workers): the file is reopened in each process.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        with open(path, "rb") as handle:
            (header_size,) = struct.unpack("<Q", handle.read(8))
            self.header = json.loads(handle.read(header_size))
        self.data_start = 8 + header_size
        self._fd: int | None = None
        self._pid: int | None = None

    def _descriptor(self) -> int:
        if self._fd is None or self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return self._fd

    def read(self, name: str, row: int | None = None) -> torch.Tensor:
        """Tensor ``name`` (shape as stored), or its row ``row`` (shape ``stored[1:]``)."""
        info = self.header[name]
        shape, (begin, end) = list(info["shape"]), info["data_offsets"]
        if row is not None:
            row_bytes = (end - begin) // shape[0]
            begin, end, shape = begin + row * row_bytes, begin + (row + 1) * row_bytes, shape[1:]
        data = os.pread(self._descriptor(), end - begin, self.data_start + begin)
        if len(data) != end - begin:
            raise OSError(f"{self.path} is truncated: wanted {end - begin} bytes of {name!r}, read {len(data)}.")
        return torch.frombuffer(bytearray(data), dtype=_SAFETENSORS_DTYPES[info["dtype"]]).reshape(shape)

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None

    def __getstate__(self) -> dict[str, Any]:  # a descriptor never crosses a pickle (spawned workers)
        return {**self.__dict__, "_fd": None, "_pid": None}


# --------------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------------


class LatentCache(torch.utils.data.Dataset):
    """A finished cache folder as a map-style dataset of ``{"latents": (C, h, w), **text}`` items.

    Items keep the stored dtype (bf16 by default); the training loop casts. Batches of rows from one bucket
    (same latent shape) stack with :meth:`collate`.

    Args:
        directory: A folder written by :func:`build_latent_cache`.
        max_open_files: Shard files kept open at once (least recently used are closed).

    Attributes:
        index: The parsed ``cache_index.json`` (fingerprint, settings, counts, skipped images).
        bucket_shapes: Latent shape ``(C, h, w)`` of each bucket id.
        bucket_ids: ``(N,)`` bucket id of each row (for :class:`~scfm_diffusers.training.buckets.BucketBatchSampler`).

    Raises:
        FileNotFoundError: The folder holds no finished cache.
    """

    def __init__(self, directory: str | os.PathLike, *, max_open_files: int = 64) -> None:
        self.directory = Path(directory)
        index_path = self.directory / INDEX_FILE
        if not index_path.is_file():
            raise FileNotFoundError(f"{self.directory} holds no finished latent cache ({INDEX_FILE} is missing).")
        self.index: dict[str, Any] = json.loads(index_path.read_text(encoding="utf-8"))
        self.text_shard_size: int = self.index["text_shard_size"]
        self.text_keys: list[str] = self.index["text_keys"]
        self.bucket_shapes: list[tuple[int, ...]] = [tuple(shape) for shape in self.index["bucket_shapes"]]
        table = _RowReader(self.directory / "rows.safetensors")
        # 4 × int32 per row: image shard, position in it, caption id, bucket id.
        self._rows = table.read("rows").numpy()
        table.close()
        self.bucket_ids: np.ndarray = self._rows[:, 3]
        self._readers: OrderedDict[str, _RowReader] = OrderedDict()
        self._max_open_files = max_open_files

    @property
    def fingerprint(self) -> str:
        return self.index["fingerprint"]

    @property
    def num_captions(self) -> int:
        """Number of unique captions (text embeddings stored once each)."""
        return self.index["num_captions"]

    def __len__(self) -> int:
        return len(self._rows)

    def _reader(self, name: str) -> _RowReader:
        reader = self._readers.pop(name, None)
        if reader is None:
            reader = _RowReader(self.directory / f"{name}.safetensors")
            while len(self._readers) >= self._max_open_files:
                self._readers.popitem(last=False)[1].close()
        self._readers[name] = reader
        return reader

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        shard, position, caption_id, _ = (int(v) for v in self._rows[index])
        item = {"latents": self._reader(_shard_name("images", shard)).read(f"latents.{position}")}
        text = self._reader(_shard_name("text", caption_id // self.text_shard_size))
        for key in self.text_keys:
            item[key] = text.read(key, row=caption_id % self.text_shard_size)
        return item

    def skipped_summary(self) -> str | None:
        """One line on the images left out while caching (how many, why, an example), or None if none were."""
        skipped = self.index["skipped"]
        if not skipped:
            return None
        reasons = ", ".join(f"{n} {why}" for why, n in Counter(s["reason"] for s in skipped).items())
        first = skipped[0]
        return (
            f"Skipped {len(skipped)} of {self.index['num_source_rows']} images ({reasons}), "
            f"e.g. {first['source']} ({first['error']})."
        )

    def caption(self, index: int) -> str:
        """The caption of row ``index`` (read from its text shard's sidecar)."""
        caption_id = int(self._rows[index, 2])
        sidecar = _read_sidecar(self.directory, _shard_name("text", caption_id // self.text_shard_size))
        return sidecar["captions"][caption_id % self.text_shard_size]

    @staticmethod
    def collate(items: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Stack items of one bucket: ``{"latents": (B, C, h, w), **text (B, ...)}``."""
        shapes = {tuple(item["latents"].shape) for item in items}
        if len(shapes) > 1:
            raise ValueError(f"A batch mixes latent shapes {sorted(shapes)}; batch by bucket (BucketBatchSampler).")
        return {key: torch.stack([item[key] for item in items]) for key in items[0]}

    def close(self) -> None:
        """Close the open shard files."""
        while self._readers:
            self._readers.popitem()[1].close()


# --------------------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------------------


def _check_rows(outputs: Mapping[str, torch.Tensor], expected: int) -> None:
    for key, value in outputs.items():
        if value.shape[0] != expected:
            raise ValueError(f"Encoder output {key!r} has leading dimension {value.shape[0]}, expected {expected}.")


def _discard_stale(directory: Path, fingerprint: str, settings: Mapping[str, Any]) -> None:
    """Remove a cache built with other settings, saying which settings differ (main process only)."""
    stored = None
    index_path = directory / INDEX_FILE
    if index_path.is_file():
        stored = json.loads(index_path.read_text(encoding="utf-8"))
    else:
        sidecar = next(directory.glob("*-*.json"), None)
        stored = json.loads(sidecar.read_text(encoding="utf-8")) if sidecar else None
    if stored is None or stored.get("fingerprint") == fingerprint:
        return
    old = stored.get("settings") or {}
    changed = sorted(key for key in {*old, *settings} if old.get(key) != json.loads(json.dumps(settings.get(key))))
    details = ", ".join(f"{key}: {old.get(key)!r} → {settings.get(key)!r}" for key in changed[:8]) or "unknown"
    logger.warning(
        "The latent cache in %s was built with other settings (%s); it is not reused and is rebuilt now.",
        directory,
        details,
    )
    shutil.rmtree(directory)


def _stored_dtype(value: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    """Embeddings are stored in the cache dtype; masks and ids (bool, int) keep their own."""
    return dtype if value.is_floating_point() else value.dtype


def _text_shard_size(
    directory: Path, captions: list[str], encode_prompts: PromptEncoder, dtype: torch.dtype, limit: int, max_bytes: int
) -> int:
    """Captions per text shard: as many as fit in ``max_bytes`` (at most ``limit``).

    A FLUX.1-dev caption is a 2 MiB embedding: a shard of 256 would need 0.5 GiB of RAM to assemble and write.
    The size is read from a finished first shard (resuming), else measured by encoding one caption; it
    depends only on the encoder's output shape, so every process finds the same one.
    """
    first = _read_sidecar(directory, _shard_name("text", 0))
    if first is not None:
        return len(first["captions"])  # all shards but the last have this size; a lone shard may be shorter
    probe = encode_prompts(captions[:1])
    per_caption = sum(value[0].numel() * _stored_dtype(value, dtype).itemsize for value in probe.values())
    return max(1, min(limit, max_bytes // max(per_caption, 1)))


def _build_text_shards(
    directory: Path,
    captions: list[str],
    *,
    shard_size: int,
    fingerprint: str,
    encode_prompts: PromptEncoder,
    batch_size: int,
    dtype: torch.dtype,
    state: PartialState,
    show_progress: bool,
) -> None:
    num_shards = -(-len(captions) // shard_size)
    mine = [s for s in range(state.process_index, num_shards, state.num_processes)]
    todo = [s for s in mine if _read_sidecar(directory, _shard_name("text", s)) is None]
    total = sum(len(captions[s * shard_size : (s + 1) * shard_size]) for s in todo)
    with tqdm(total=total, desc="Caching text", unit="caption", disable=not show_progress or not total) as bar:
        for shard in todo:
            shard_captions = captions[shard * shard_size : (shard + 1) * shard_size]
            tensors: dict[str, torch.Tensor] = {}  # filled in place: one copy of the shard in RAM, not two
            for start in range(0, len(shard_captions), batch_size):
                batch = shard_captions[start : start + batch_size]
                outputs = encode_prompts(list(batch))
                _check_rows(outputs, len(batch))
                for key, value in outputs.items():
                    if key not in tensors:
                        stored = _stored_dtype(value, dtype)
                        tensors[key] = torch.empty((len(shard_captions), *value.shape[1:]), dtype=stored)
                    tensors[key][start : start + len(batch)] = value.detach().to("cpu", tensors[key].dtype)
                bar.update(len(batch))
            sidecar = {"fingerprint": fingerprint, "captions": shard_captions, "keys": sorted(tensors)}
            _write_shard(directory, _shard_name("text", shard), tensors, sidecar)
            del tensors


def _encode_rows(
    batch: list[tuple[int, ImageCaptionSample]], encode_images: ImageEncoder, seed: int, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """``{"latents.<position>": (C, h, w)}`` for ``(position in shard, sample)`` pairs of one shape."""
    pixels = torch.stack([sample.pixel_values for _, sample in batch])
    noise = [row_generator(seed, sample.index, LATENT_NOISE_STREAM) for _, sample in batch]
    encoded = encode_images(pixels, noise)
    _check_rows({"latents": encoded}, len(batch))
    rows = encoded.detach().to("cpu", dtype)
    return {f"latents.{position}": row.clone() for (position, _), row in zip(batch, rows, strict=True)}


def _build_image_shards(
    directory: Path,
    samples: ImageCaptionSamples,
    caption_ids: list[int],
    *,
    shard_size: int,
    fingerprint: str,
    encode_images: ImageEncoder,
    batch_size: int,
    dtype: torch.dtype,
    state: PartialState,
    show_progress: bool,
) -> None:
    num_rows = len(samples)
    num_shards = -(-num_rows // shard_size)
    mine = [s for s in range(state.process_index, num_shards, state.num_processes)]
    todo = [s for s in mine if _read_sidecar(directory, _shard_name("images", s)) is None]
    total = sum(min(num_rows, (s + 1) * shard_size) - s * shard_size for s in todo)
    with tqdm(total=total, desc="Caching latents", unit="img", disable=not show_progress or not total) as bar:
        for shard in todo:
            rows, skipped, latents = [], [], {}
            # Pixels wait in one buffer per shape and are encoded as soon as a batch is full, so a shard never
            # holds more than batch_size images per shape (256 decoded 1024² images would be 3 GiB). Batches
            # depend only on the rows, in order: any process builds the same shard.
            buffers: dict[tuple[int, ...], list[tuple[int, ImageCaptionSample]]] = {}
            seed = samples.preprocessor.seed
            for item in samples.rows(shard * shard_size, min(num_rows, (shard + 1) * shard_size)):
                bar.update(1)
                if isinstance(item, SkippedImage):
                    skipped.append(item)
                    continue
                shape = tuple(item.pixel_values.shape)
                buffers.setdefault(shape, []).append((len(rows), item))
                rows.append(item.index)
                if len(buffers[shape]) == batch_size:
                    latents.update(_encode_rows(buffers.pop(shape), encode_images, seed, dtype))
            for shape in list(buffers):
                latents.update(_encode_rows(buffers.pop(shape), encode_images, seed, dtype))
            sidecar = {
                "fingerprint": fingerprint,
                "rows": rows,
                "caption_ids": [caption_ids[index] for index in rows],
                "shapes": [list(latents[f"latents.{p}"].shape) for p in range(len(rows))],
                "skipped": [item.to_dict() for item in skipped],
            }
            _write_shard(directory, _shard_name("images", shard), latents, sidecar)


def _gather_rows(directory: Path, fingerprint: str, num_rows: int, shard_size: int) -> tuple[list, dict, list]:
    """Read the image sidecars into ``(rows, bucket shapes, skipped)``; every process can call it (read only).

    Raises:
        ValueError: No row of the data set gave a usable image.
    """
    rows, shapes, skipped = [], {}, []
    for shard in range(-(-num_rows // shard_size)):
        sidecar = _read_sidecar(directory, _shard_name("images", shard))
        if sidecar is None or sidecar["fingerprint"] != fingerprint:
            raise RuntimeError(f"Image shard {shard} of {directory} is missing after every process finished.")
        for position, (caption_id, shape) in enumerate(zip(sidecar["caption_ids"], sidecar["shapes"], strict=True)):
            rows.append((shard, position, caption_id, shapes.setdefault(tuple(shape), len(shapes))))
        skipped.extend(sidecar["skipped"])
    if not rows:
        examples = "; ".join(f"{s['source']} ({s['reason']}: {s['error']})" for s in skipped[:3])
        raise ValueError(
            f"No usable image among the {num_rows} rows of the data set (e.g. {examples}). Check the image column "
            "(--image_column), the files, and that images are at least as large as the smallest bucket."
        )
    return rows, shapes, skipped


def _write_index(directory: Path, rows: list, shapes: dict, skipped: list, **fields: Any) -> None:
    """Write the row table, then ``cache_index.json`` (last: it marks the cache complete). Main process only."""
    save_file({"rows": torch.tensor(rows, dtype=torch.int32)}, str(directory / "rows.safetensors"))
    index = {
        **fields,
        "format": CACHE_FORMAT_VERSION,
        "num_rows": len(rows),
        "text_keys": _read_sidecar(directory, _shard_name("text", 0))["keys"],
        "bucket_shapes": [list(shape) for shape in shapes],
        "skipped": skipped,
    }
    write_text_atomic(directory / INDEX_FILE, json.dumps(index, indent=1))


def build_latent_cache(
    samples: ImageCaptionSamples,
    directory: str | os.PathLike,
    *,
    settings: Mapping[str, Any],
    encode_images: ImageEncoder,
    encode_prompts: PromptEncoder,
    batch_size: int,
    shard_size: int = 256,
    text_shard_bytes: int = 64 * 2**20,
    dtype: torch.dtype = torch.bfloat16,
    text_phase: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    image_phase: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    show_progress: bool = True,
) -> LatentCache:
    """Encode a data set once into a sharded latent + text cache on disk, on every process, and open it.

    Call it on every process (it splits the shards with accelerate's :class:`~accelerate.PartialState` and
    waits for the others). A finished cache with the same fingerprint is opened at once, without reading
    ``samples``; a partial one is completed; one with other settings is rebuilt (a warning names the
    settings that differ). Under ``torch.no_grad``, the text phase encodes each unique caption once, then the
    image phase encodes the latents.

    Args:
        samples: The preprocessed data set (:class:`~scfm_diffusers.training.data.ImageCaptionSamples`).
        directory: The cache folder (created).
        settings: Everything the cache depends on (model, revision, dtype, data set, every preprocessing
            flag); its hash is the fingerprint. JSON-serialisable values.
        encode_images: ``(pixels (B, 3, H, W) in [-1, 1], per-row generators)`` → ``(B, C, h, w)`` latents
            in the transformer's space (e.g. :meth:`scfm_diffusers.families.Family.encode_images`).
        encode_prompts: ``B`` captions → ``{key: (B, ...)}`` per-caption tensors.
        batch_size: Rows (or captions) per encoder call.
        shard_size: Rows per image shard (and at most this many captions per text shard).
        text_shard_bytes: Bytes a text shard may hold (it is assembled in RAM before it is written): a
            FLUX.1-dev caption (256 × 4096 in bf16) takes 2 MiB, so 64 MiB gives 32 captions a shard.
        dtype: Stored dtype (bf16 halves the disk and I/O of float32 with no effect on training in bf16).
        text_phase: Context manager factory wrapped around the text phase (e.g. diffusers'
            ``offload_models`` to bring the text encoders to the GPU only now).
        image_phase: The same for the image phase (the VAE).
        show_progress: Show tqdm bars (one per process).

    Returns:
        The opened :class:`LatentCache`.

    Raises:
        ValueError: No usable image, or an encoder output with the wrong leading dimension.
    """
    directory = Path(directory)
    state = PartialState()
    layout = {"shard_size": shard_size, "text_shard_bytes": text_shard_bytes, "dtype": str(dtype)}
    fingerprint = make_fingerprint(**settings, **layout)
    settings = {**settings, **layout}
    if state.is_main_process and directory.is_dir():
        _discard_stale(directory, fingerprint, settings)
    state.wait_for_everyone()
    index_path = directory / INDEX_FILE
    if index_path.is_file():
        logger.info("Using the latent cache in %s.", directory)
        return LatentCache(directory)
    directory.mkdir(parents=True, exist_ok=True)

    captions = samples.captions()
    unique = list(dict.fromkeys(captions))
    position = {caption: index for index, caption in enumerate(unique)}
    caption_ids = [position[caption] for caption in captions]
    common = {"fingerprint": fingerprint, "batch_size": batch_size, "dtype": dtype, "state": state}
    common["show_progress"] = show_progress
    with torch.no_grad():
        with text_phase():
            text_shard_size = _text_shard_size(directory, unique, encode_prompts, dtype, shard_size, text_shard_bytes)
            state.wait_for_everyone()  # every process has decided before anyone writes a first shard
            _build_text_shards(directory, unique, shard_size=text_shard_size, encode_prompts=encode_prompts, **common)
        with image_phase():
            _build_image_shards(
                directory, samples, caption_ids, shard_size=shard_size, encode_images=encode_images, **common
            )
    state.wait_for_everyone()
    rows, shapes, skipped = _gather_rows(directory, fingerprint, len(samples), shard_size)  # raises on every rank
    if state.is_main_process:
        _write_index(
            directory,
            rows,
            shapes,
            skipped,
            fingerprint=fingerprint,
            settings=json.loads(json.dumps(settings, default=str)),
            dtype=str(dtype).removeprefix("torch."),
            num_source_rows=len(samples),
            num_captions=len(unique),
            text_shard_size=text_shard_size,
        )
    state.wait_for_everyone()
    cache = LatentCache(directory)
    logger.info(
        "Cached %d latents and %d unique text embeddings in %s (%d images skipped).",
        len(cache),
        cache.num_captions,
        directory,
        len(cache.index["skipped"]),
    )
    return cache
