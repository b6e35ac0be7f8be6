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
  setting the cache depends on (the base's encoders by content: :func:`components_fingerprint`). A cache built
  with other settings is not reused: the differing settings are logged and the cache is rebuilt.
* **Verified.** Each sidecar records its shard's size and ``xxh3_128`` checksum, the index records them all,
  and sidecars and index carry a checksum of their own content. Every build re-checks every shard (split
  between the processes) before trusting it: a truncated or altered shard, or one of another cache (a foreign
  sidecar), is deleted and re-encoded. :class:`LatentCache` checks every shard's size on opening (and its
  checksum with ``verify=True``) and each shard's safetensors header against the file's size when it opens
  it, so a broken file stops the run before training, with an error naming the file and the fix.
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
import json
import logging
import os
import shutil
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import PartialState
from tqdm.auto import tqdm

from .._files import write_text_atomic
from .cache_files import (
    CACHE_FORMAT_VERSION,
    INDEX_FILE,
    LATENT_NOISE_STREAM,
    ROWS_FILE,
    CorruptCacheError,
    ImageEncoder,
    PromptEncoder,
    _check_file,
    _fix,
    _read_json,
    _read_sidecar,
    _RowReader,
    _sealed,
    _shard_name,
    _unsealed,
    _write_shard,
    _write_tensors,
    components_fingerprint,
    file_checksum,
    make_fingerprint,
)
from .data import ImageCaptionSample, ImageCaptionSamples, SkippedImage, row_generator

__all__ = [
    "CACHE_FORMAT_VERSION",
    "INDEX_FILE",
    "CorruptCacheError",
    "LatentCache",
    "build_latent_cache",
    "components_fingerprint",
    "file_checksum",
    "make_fingerprint",
]

logger = logging.getLogger(__name__)

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
        verify: Also check every shard's checksum (reads the whole cache once: ~0.1 s a GiB from the page cache,
            disk speed otherwise; docs/benchmarks.md, section 4c). Sizes are always checked, and each shard's
            header against its size when it is first read. :func:`build_latent_cache` verifies (split between
            the processes, rebuilding what is broken) and opens with ``verify=False``.

    Attributes:
        index: The parsed ``cache_index.json`` (fingerprint, settings, counts, skipped images, shard checksums).
        bucket_shapes: Latent shape ``(C, h, w)`` of each bucket id.
        bucket_ids: ``(N,)`` bucket id of each row (for :class:`~scfm_diffusers.training.buckets.BucketBatchSampler`).

    Raises:
        FileNotFoundError: The folder holds no finished cache.
        CorruptCacheError: A file of the cache is truncated or altered (the message names it and the fix).
    """

    def __init__(self, directory: str | os.PathLike, *, max_open_files: int = 64, verify: bool = True) -> None:
        self.directory = Path(directory)
        index_path = self.directory / INDEX_FILE
        if not index_path.is_file():
            raise FileNotFoundError(f"{self.directory} holds no finished latent cache ({INDEX_FILE} is missing).")
        index = _unsealed(_read_json(index_path))
        if index is None or index.get("format") != CACHE_FORMAT_VERSION:
            raise CorruptCacheError(
                f"{index_path} is unreadable, altered, or of another cache format (expected format "
                f"{CACHE_FORMAT_VERSION}). {_fix(self.directory)}"
            )
        self.index: dict[str, Any] = index
        for name, record in self.index["files"].items():
            problem = _check_file(self.directory / f"{name}.safetensors", record, checksum=verify)
            if problem is not None:
                raise CorruptCacheError(
                    f"{self.directory / name}.safetensors is broken: {problem}. {_fix(self.directory)}"
                )
        self.text_shard_size: int = self.index["text_shard_size"]
        self.text_keys: list[str] = self.index["text_keys"]
        self.bucket_shapes: list[tuple[int, ...]] = [tuple(shape) for shape in self.index["bucket_shapes"]]
        table = _RowReader(self.directory / f"{ROWS_FILE}.safetensors")
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

    @property
    def kind(self) -> str:
        """What the rows are: ``"clips"`` for a video cache (its settings name ``num_frames``), else ``"images"``."""
        return "clips" if (self.index.get("settings") or {}).get("num_frames") else "images"

    def skipped_summary(self) -> str | None:
        """One line on the images (or clips) left out while caching (how many, why, an example), or None."""
        skipped = self.index["skipped"]
        if not skipped:
            return None
        reasons = ", ".join(f"{n} {why}" for why, n in Counter(s["reason"] for s in skipped).items())
        first = skipped[0]
        return (
            f"Skipped {len(skipped)} of {self.index['num_source_rows']} {self.kind} ({reasons}), "
            f"e.g. {first['source']} ({first['error']})."
        )

    def caption(self, index: int) -> str:
        """The caption of row ``index`` (read from its text shard's sidecar)."""
        caption_id = int(self._rows[index, 2])
        name = _shard_name("text", caption_id // self.text_shard_size)
        sidecar = _read_sidecar(self.directory, name)
        if sidecar is None:
            raise CorruptCacheError(
                f"{self.directory / name}.json is missing, unreadable or altered. {_fix(self.directory)}"
            )
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
    """Remove a cache built with other settings, saying which settings differ (main process only).

    An index that is unreadable or altered is removed (the cache is then unfinished: its shards are checked one
    by one and what is intact is kept).
    """
    index_path = directory / INDEX_FILE
    stored = _read_json(index_path)
    if index_path.is_file() and (
        stored is None or (stored.get("fingerprint") == fingerprint and not _unsealed(stored))
    ):
        logger.warning("%s is unreadable or altered: it is removed and the cache's shards are checked.", index_path)
        index_path.unlink()
        stored = None
    if stored is None:  # a partial cache: judged by its first readable sidecar (others are checked one by one)
        stored = next(filter(None, (_read_json(path) for path in sorted(directory.glob("*-*.json")))), None)
    if stored is None or stored.get("fingerprint") == fingerprint:
        return
    old = stored.get("settings") or {}
    changed = sorted(key for key in {*old, *settings} if old.get(key) != json.loads(json.dumps(settings.get(key))))
    details = [f"{key}: {old.get(key)!r} → {settings.get(key)!r}" for key in changed[:8]]
    if stored.get("format", 2) != CACHE_FORMAT_VERSION:
        details.insert(0, f"cache format {stored.get('format', 2)} → {CACHE_FORMAT_VERSION}")
    logger.warning(
        "The latent cache in %s was built with other settings (%s); it is not reused and is rebuilt now.",
        directory,
        ", ".join(details) or "unknown",
    )
    shutil.rmtree(directory)


def _shard_problem(directory: Path, name: str, fingerprint: str) -> str | None:
    """Why finished-looking shard ``name`` cannot be trusted, or None if it is intact and of this cache."""
    sidecar = _unsealed(_read_json(directory / f"{name}.json"))
    if sidecar is None:
        return "its sidecar is unreadable or altered"
    if sidecar.get("fingerprint") != fingerprint or "file" not in sidecar:
        return f"its sidecar belongs to another cache (fingerprint {sidecar.get('fingerprint')}, not {fingerprint})"
    return _check_file(directory / f"{name}.safetensors", sidecar["file"], checksum=True)


def _verify(directory: Path, fingerprint: str, state: PartialState) -> None:
    """Check this process's share of the finished shards, and (main process) the row table; delete what is
    broken, saying which file and why, so that it is re-encoded (a shard without its sidecar is unfinished)."""
    names = sorted(path.stem for path in directory.glob("*-*.json"))
    broken = []
    for name in names[state.process_index :: state.num_processes]:
        problem = _shard_problem(directory, name, fingerprint)
        if problem is not None:
            broken.append(f"{name}.safetensors ({problem})")
            (directory / f"{name}.json").unlink(missing_ok=True)  # the sidecar first: unfinished from now on
            (directory / f"{name}.safetensors").unlink(missing_ok=True)
    index = _unsealed(_read_json(directory / INDEX_FILE))
    if state.is_main_process and index is not None:
        problem = _check_file(directory / f"{ROWS_FILE}.safetensors", index["files"][ROWS_FILE], checksum=True)
        if problem is not None:
            broken.append(f"{ROWS_FILE}.safetensors ({problem})")
            (directory / INDEX_FILE).unlink()
    if broken:
        logger.warning(
            "%d file(s) of the latent cache in %s failed verification and are rebuilt now: %s",
            len(broken),
            directory,
            "; ".join(broken[:5]) + ("; ..." if len(broken) > 5 else "."),
        )


def _finished_index(directory: Path) -> dict[str, Any] | None:
    """The intact index if every shard it lists still has its sidecar (after :func:`_verify`), else None."""
    index = _unsealed(_read_json(directory / INDEX_FILE))
    if index is None or not all(
        (directory / f"{name}.json").is_file() for name in index["files"] if name != ROWS_FILE
    ):
        return None
    return index


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


def _gather_rows(
    directory: Path, fingerprint: str, num_rows: int, shard_size: int, num_text_shards: int
) -> tuple[list, dict, list, dict]:
    """Read the sidecars into ``(rows, bucket shapes, skipped, {shard: file record})``; every process can call it.

    Raises:
        ValueError: No row of the data set gave a usable image.
    """
    rows, shapes, skipped, files = [], {}, [], {}
    shards = [("text", shard) for shard in range(num_text_shards)]
    shards += [("images", shard) for shard in range(-(-num_rows // shard_size))]
    for kind, shard in shards:
        name = _shard_name(kind, shard)
        sidecar = _read_sidecar(directory, name)
        if sidecar is None or sidecar["fingerprint"] != fingerprint:
            raise RuntimeError(
                f"Shard {directory / name} is missing after every process finished: another run may be writing "
                f"{directory}. Run one training run per output folder, then run it again."
            )
        files[name] = sidecar["file"]
        if kind == "text":
            continue
        for position, (caption_id, shape) in enumerate(zip(sidecar["caption_ids"], sidecar["shapes"], strict=True)):
            rows.append((shard, position, caption_id, shapes.setdefault(tuple(shape), len(shapes))))
        skipped.extend(sidecar["skipped"])
    if not rows:
        examples = "; ".join(f"{s['source']} ({s['reason']}: {s['error']})" for s in skipped[:3])
        raise ValueError(
            f"No usable image among the {num_rows} rows of the data set (e.g. {examples}). Check the image column "
            "(--image_column), the files, and that images are at least as large as the smallest bucket."
        )
    return rows, shapes, skipped, files


def _write_index(directory: Path, rows: list, shapes: dict, skipped: list, files: dict, **fields: Any) -> None:
    """Write the row table, then ``cache_index.json`` (last: it marks the cache complete). Main process only."""
    rows_file = _write_tensors(directory / f"{ROWS_FILE}.safetensors", {"rows": torch.tensor(rows, dtype=torch.int32)})
    index = {
        **fields,
        "format": CACHE_FORMAT_VERSION,
        "num_rows": len(rows),
        "text_keys": _read_sidecar(directory, _shard_name("text", 0))["keys"],
        "bucket_shapes": [list(shape) for shape in shapes],
        "skipped": skipped,
        "files": {**files, ROWS_FILE: rows_file},
    }
    write_text_atomic(directory / INDEX_FILE, json.dumps(_sealed(index), indent=1))


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
    if directory.is_dir():  # every shard is checked (checksum included) before it is trusted, finished cache or not
        _verify(directory, fingerprint, state)
    state.wait_for_everyone()
    if _finished_index(directory) is not None:
        logger.info("Using the latent cache in %s (verified).", directory)
        return LatentCache(directory, verify=False)
    if state.is_main_process:  # something was rebuilt: the index is rewritten once the shards are complete again
        (directory / INDEX_FILE).unlink(missing_ok=True)
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
    num_text_shards = -(-len(unique) // text_shard_size)
    rows, shapes, skipped, files = _gather_rows(directory, fingerprint, len(samples), shard_size, num_text_shards)
    if state.is_main_process:  # _gather_rows raised on every rank if anything is wrong
        _write_index(
            directory,
            rows,
            shapes,
            skipped,
            files,
            fingerprint=fingerprint,
            settings=json.loads(json.dumps(settings, default=str)),
            dtype=str(dtype).removeprefix("torch."),
            num_source_rows=len(samples),
            num_captions=len(unique),
            text_shard_size=text_shard_size,
        )
    state.wait_for_everyone()
    cache = LatentCache(directory, verify=False)  # every shard was verified above or written by this run
    logger.info(
        "Cached %d latents and %d unique text embeddings in %s (%d %s skipped).",
        len(cache),
        cache.num_captions,
        directory,
        len(cache.index["skipped"]),
        cache.kind,
    )
    return cache
