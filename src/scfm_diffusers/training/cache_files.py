"""The latent cache's files: the layout constants, shard files and their JSON sidecars, the checksums and header
checks that verify them, and the positioned-read row reader.

A shard is a ``.safetensors`` file written through a temporary sibling; its sidecar (``<name>.json``, written
last) records its size and :data:`CHECKSUM`, and is itself sealed with a checksum of its content, so that a
truncated, bit-flipped or foreign file is seen when the cache is opened or rebuilt. :mod:`scfm_diffusers.training.cache`
builds and reads caches out of these pieces.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import xxhash  # a dependency of `datasets`, which the training data side needs anyway
from safetensors.torch import save_file

from .._files import reporting_disk_full, temporary_sibling, write_text_atomic

__all__ = [
    "CACHE_FORMAT_VERSION",
    "CHECKSUM",
    "INDEX_FILE",
    "ROWS_FILE",
    "CorruptCacheError",
    "components_fingerprint",
    "file_checksum",
    "make_fingerprint",
]


#: Bumped whenever the on-disk layout changes; part of every fingerprint (3: checksums in sidecars and index).
CACHE_FORMAT_VERSION = 3
#: Written last by the main process; its presence (with a matching fingerprint) means the cache is complete.
INDEX_FILE = "cache_index.json"
#: The row table: ``(N, 4)`` int32 (image shard, position in it, caption id, bucket id).
ROWS_FILE = "rows"
#: Checksum of shard files: xxh3_128 hashes 13.5 GiB/s on one core here, sha256 1.45 and blake2b 0.79
#: (docs/benchmarks.md, section 4c), so verifying a cache costs about what reading it from disk costs.
CHECKSUM = "xxh3_128"
_READ_CHUNK = 8 * 2**20
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


class CorruptCacheError(OSError):
    """A cache file is truncated, altered or unreadable (the message names the file and the fix)."""


def _fix(directory: Path) -> str:
    return (
        f"Run the training script (or build_latent_cache) again with the same settings: it re-checks {directory} "
        "and re-encodes what is broken; or delete that folder to rebuild it all."
    )


def file_checksum(path: str | os.PathLike) -> str:
    """``xxh3_128`` of a file's bytes as hex, read in 8 MiB chunks into one buffer (RAM stays flat)."""
    digest = xxhash.xxh3_128()
    buffer = bytearray(_READ_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while count := handle.readinto(buffer):
            digest.update(view[:count])
    return digest.hexdigest()


def components_fingerprint(
    name_or_path: str | os.PathLike, *, skip: Sequence[str] = ("transformer", "scheduler")
) -> str | None:
    """The content of a local pipeline folder's components a cache depends on (VAE, text encoders, tokenizers).

    Every file of every component in ``model_index.json`` whose name does not start with one of ``skip`` (the
    transformer's weights do not change the cache) is hashed in full (``xxh3_128``; configs, tokenizer files and
    weights, by relative path): weights replaced at the same path are seen even when their size, config and
    safetensors header are unchanged (a fine-tuned VAE has the same shapes), while a copy, a move, a symlink or
    a new modification time changes nothing (a rebuild costs hours at scale). Hidden files and folders (e.g. a
    download's ``.cache``) are left out. Cost: the files are read once per run, ~0.7 s for FLUX.1-dev's 9.9 GB of
    VAE and text encoders from the page cache (docs/benchmarks.md, section 4c).

    Returns:
        A hex digest, or None if ``name_or_path`` is not a folder (a Hub id: its id and revision stand for it).
    """
    folder = Path(name_or_path)
    if not (folder / "model_index.json").is_file():
        return None
    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    names = sorted(
        name
        for name, value in index.items()
        if not name.startswith("_") and isinstance(value, list) and value[0] is not None
        if not name.startswith(tuple(skip))
    )
    digest = xxhash.xxh3_128()
    for name in names:
        root = folder / name
        files = sorted(
            p
            for p in root.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
        )
        for file in files:
            digest.update(
                f"{file.relative_to(folder).as_posix()}\t{file.stat().st_size}\t{file_checksum(file)}\n".encode()
            )
    return digest.hexdigest()


def _sealed(record: Mapping[str, Any]) -> dict[str, Any]:
    """``record`` plus a checksum of its own content (``seal``), so an edited or bit-flipped record is seen."""
    return {**record, "seal": xxhash.xxh3_64_hexdigest(json.dumps(record, sort_keys=True).encode())}


def _read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None if missing or unreadable."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _unsealed(record: dict[str, Any] | None) -> dict[str, Any] | None:
    """``record`` without its seal if the seal matches its content, else None."""
    if record is None or "seal" not in record:
        return None
    content = {key: value for key, value in record.items() if key != "seal"}
    return content if _sealed(content)["seal"] == record["seal"] else None


# --------------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------------


def _shard_name(kind: str, index: int) -> str:
    return f"{kind}-{index:05d}"


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Write a ``.safetensors`` file (write-then-rename); return its size and checksum (read back from the page
    cache: the shard is never held twice in RAM)."""
    tmp = temporary_sibling(path)
    with reporting_disk_full(path, "or build the cache on another disk (--output_dir)"):
        save_file({key: value.contiguous() for key, value in tensors.items()}, str(tmp))
    record = {"bytes": tmp.stat().st_size, CHECKSUM: file_checksum(tmp)}
    os.replace(tmp, path)
    return record


def _write_shard(folder: Path, name: str, tensors: dict[str, torch.Tensor], sidecar: dict[str, Any]) -> None:
    """Tensors first, sidecar last (both write-then-rename): a shard with a sidecar is complete."""
    file = _write_tensors(folder / f"{name}.safetensors", tensors)
    record = {**sidecar, "format": CACHE_FORMAT_VERSION, "file": file}
    write_text_atomic(folder / f"{name}.json", json.dumps(_sealed(record)))


def _read_sidecar(folder: Path, name: str) -> dict[str, Any] | None:
    """The sidecar of shard ``name`` if it is intact (its seal matches), else None (missing, unreadable, altered)."""
    if not (folder / f"{name}.safetensors").is_file():
        return None
    return _unsealed(_read_json(folder / f"{name}.json"))


def _read_header(path: Path, size: int, read: Callable[[int, int], bytes]) -> tuple[dict[str, Any], int]:
    """``(header, data start)`` of a ``.safetensors`` file of ``size`` bytes, checked against that size.

    Raises:
        CorruptCacheError: The header is unreadable, or the tensors it lists do not fill the file exactly.
    """
    problem = None
    if size < 8:
        problem = f"it holds {size} bytes, fewer than a safetensors header"
    else:
        (header_size,) = struct.unpack("<Q", read(8, 0))
        if header_size > size - 8:
            problem = f"its header claims {header_size} bytes but the file holds {size}"
    if problem is None:
        try:
            header = json.loads(read(header_size, 8))
            tensors = {key: value for key, value in header.items() if key != "__metadata__"}
            spans = [
                (*info["data_offsets"], math.prod(info["shape"]) * _SAFETENSORS_DTYPES[info["dtype"]].itemsize)
                for info in tensors.values()
            ]
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            problem = f"its safetensors header is unreadable ({type(error).__name__}: {error})"
    if problem is None:
        data_bytes = size - 8 - header_size
        end = max((end for _, end, _ in spans), default=0)
        if any(end - begin != expected for begin, end, expected in spans):
            problem = "its header lists a tensor whose byte range does not match its shape and dtype"
        elif end != data_bytes:
            what = "truncated" if end > data_bytes else "longer than its header says"
            problem = f"it is {what}: the header lists {end} bytes of tensors, the file holds {data_bytes}"
    if problem is not None:
        raise CorruptCacheError(f"{path} is broken: {problem}. {_fix(path.parent)}")
    return tensors, 8 + header_size


def _check_file(path: Path, record: Mapping[str, Any], *, checksum: bool) -> str | None:
    """Why ``path`` does not match its ``record`` (``{"bytes", "xxh3_128"}``), or None if it does."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "the file is missing"
    if size != record["bytes"]:
        return f"it holds {size} bytes, {record['bytes']} were written (truncated or overwritten)"
    with open(path, "rb") as handle:
        try:
            _read_header(path, size, lambda count, offset: os.pread(handle.fileno(), count, offset))
        except CorruptCacheError as error:
            return str(error).removeprefix(f"{path} is broken: ").removesuffix(f". {_fix(path.parent)}")
    if checksum and file_checksum(path) != record[CHECKSUM]:
        return f"its bytes changed since it was written ({CHECKSUM} differs)"
    return None


class _RowReader:
    """Reads a tensor, or one row of it, from a ``.safetensors`` file with ``os.pread`` (no memory map).

    Safe across ``fork`` (DataLoader workers): the file is reopened in each process.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            self.header, self.data_start = _read_header(
                path, size, lambda count, offset: os.pread(handle.fileno(), count, offset)
            )
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
            raise CorruptCacheError(
                f"{self.path} is truncated: wanted {end - begin} bytes of {name!r}, read {len(data)}. "
                f"{_fix(self.path.parent)}"
            )
        return torch.frombuffer(bytearray(data), dtype=_SAFETENSORS_DTYPES[info["dtype"]]).reshape(shape)

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None

    def __getstate__(self) -> dict[str, Any]:  # a descriptor never crosses a pickle (spawned workers)
        return {**self.__dict__, "_fd": None, "_pid": None}
