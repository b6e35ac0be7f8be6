"""Aspect-ratio buckets: train at one pixel budget (e.g. 512²) on images of varied shapes.

Instead of cropping every image to a square, each image is given the *bucket* — a ``(height, width)``
pair of about ``resolution²`` pixels — whose shape is closest to its own, resized to cover it and cropped
to it; every batch holds images of one bucket, so it stacks into one tensor.

The rules, in order:

1. **Buckets** (:func:`make_buckets`). For every short side ``s = resolution, resolution − multiple, ...``
   the long side is the largest multiple of ``multiple`` with ``s × long ≤ resolution²``; ``(s, long)``
   (landscape) and ``(long, s)`` (portrait) are kept while their aspect ratio ``width / height`` lies in
   ``[min_aspect, max_aspect]``. So every bucket has sides that are multiples of ``multiple`` (the VAE
   downsampling times the transformer's patch size: 8 × 2 = 16 for Flux and SD3) and an area in
   ``(resolution² − resolution × multiple, resolution²]`` (within 3.1 % at 512, 1.6 % at 1024), the
   square ``(resolution, resolution)`` is one of them, and the aspect ratios step by about
   ``2 × multiple / s`` in log space up to the limits.
2. **Assignment** (:func:`assign_bucket`). Among the buckets the image covers without upscaling
   (bucket height ≤ image height *and* bucket width ≤ image width), the one whose aspect ratio is closest
   to the image's in log space, ``|log(w_b / h_b) − log(w / h)|`` (so 2:1 and 1:2 are equally far from
   1:1); ties go to the larger bucket, then to the earlier one in the list. An image that covers no bucket
   gets ``None``: the caller skips it and counts it, as it skips unreadable images.
3. **Pixels** (:func:`resize_and_crop`). Resize (bilinear, keeping the aspect ratio) until the image
   covers the bucket, crop the bucket at the centre or at random, optionally flip, scale to ``[-1, 1]``.
4. **Batches** (:class:`BucketBatchSampler`). Rows are shuffled within their bucket, cut into batches,
   and the batches of all buckets shuffled together, from ``seed`` and the epoch; a bucket smaller than a
   batch is repeated whole. Pass it to a ``DataLoader`` as ``batch_sampler``; it works under
   ``accelerator.prepare`` on several processes and with ``accelerator.skip_first_batches``.

Example:
    >>> buckets = make_buckets(512)
    >>> assign_bucket(1080, 1920, buckets)
    (384, 672)
    >>> assign_bucket(300, 300, buckets) is None  # smaller than every bucket: skipped
    True
    >>> sampler = BucketBatchSampler([(384, 672), (512, 512), (384, 672), (512, 512)], 2, seed=0)
    >>> len(sampler)
    2
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterator, Sequence

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch

__all__ = [
    "BucketBatchSampler",
    "assign_bucket",
    "make_buckets",
    "oriented_size",
    "resize_and_crop",
    "to_rgb",
]

# EXIF orientations that rotate by 90° or 270° (with or without a mirror), so width and height swap.
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)
_EXIF_ORIENTATION = 0x0112


# --------------------------------------------------------------------------------------------------------
# 1. Buckets and assignment
# --------------------------------------------------------------------------------------------------------


def make_buckets(
    resolution: int, *, multiple: int = 16, min_aspect: float = 0.5, max_aspect: float = 2.0
) -> tuple[tuple[int, int], ...]:
    """The ``(height, width)`` buckets of about ``resolution²`` pixels with aspect ratios in a range.

    See the module docstring for the rule. E.g. ``make_buckets(512)`` holds ``(368, 704)`` … ``(512, 512)``
    … ``(704, 368)``, 19 buckets with aspect ratios 0.52 … 1.91.

    Args:
        resolution: Side of the square bucket; the pixel budget is ``resolution²``.
        multiple: Both sides of every bucket are multiples of it (16 for Flux and SD3: VAE factor 8 ×
            patch size 2).
        min_aspect: Smallest ``width / height`` (the tallest portrait bucket); in ``(0, 1]``.
        max_aspect: Largest ``width / height`` (the widest landscape bucket); ``≥ 1``.

    Returns:
        The buckets, sorted (by height, then width), without duplicates. Each has ``height × width`` in
        ``(resolution² − resolution × multiple, resolution²]`` and ``width / height`` in
        ``[min_aspect, max_aspect]``; ``(resolution, resolution)`` is one of them.

    Raises:
        ValueError: ``multiple < 1``, ``resolution`` not a positive multiple of ``multiple``, or not
            ``0 < min_aspect ≤ 1 ≤ max_aspect``.
    """
    if multiple < 1:
        raise ValueError(f"multiple must be a positive integer, got {multiple}.")
    if resolution <= 0 or resolution % multiple:
        raise ValueError(
            f"resolution must be a positive multiple of {multiple} (so that latents split into patches), "
            f"got {resolution}."
        )
    if not 0 < min_aspect <= 1 <= max_aspect:
        raise ValueError(
            f"Need 0 < min_aspect ≤ 1 ≤ max_aspect (aspect = width / height), got min_aspect={min_aspect}, "
            f"max_aspect={max_aspect}."
        )
    area = resolution * resolution
    buckets = set()
    for short in range(resolution, 0, -multiple):
        long = area // short // multiple * multiple
        # long / short only grows as short shrinks, so once both shapes are out of range all later ones are.
        landscape_ok, portrait_ok = long / short <= max_aspect, short / long >= min_aspect
        if not (landscape_ok or portrait_ok):
            break
        if landscape_ok:
            buckets.add((short, long))
        if portrait_ok:
            buckets.add((long, short))
    return tuple(sorted(buckets))


def assign_bucket(height: int, width: int, buckets: Sequence[tuple[int, int]]) -> tuple[int, int] | None:
    """The bucket of an image of ``height × width`` pixels, or ``None`` if it is too small for all.

    The rule: among the buckets ``(h_b, w_b)`` with ``h_b ≤ height`` and ``w_b ≤ width`` (the image covers
    them without upscaling), the one minimising ``|log(w_b / h_b) − log(width / height)|``; ties go to the
    larger ``h_b × w_b``, then to the earlier bucket in ``buckets``. If the image covers no bucket, ``None``:
    the caller skips the image and counts it.

    Pass the size the pixels will have after EXIF rotation (:func:`oriented_size`), as
    :func:`resize_and_crop` rotates before cropping.

    Args:
        height: Image height in pixels.
        width: Image width in pixels.
        buckets: ``(height, width)`` pairs, e.g. from :func:`make_buckets`.

    Returns:
        The chosen ``(height, width)``, or ``None``.

    Raises:
        ValueError: A non-positive image side.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"Image sides must be positive, got height={height}, width={width}.")
    target = math.log(width / height)
    best, best_key = None, None
    for bucket_height, bucket_width in buckets:
        if bucket_height > height or bucket_width > width:
            continue
        key = (abs(math.log(bucket_width / bucket_height) - target), -bucket_height * bucket_width)
        if best_key is None or key < best_key:
            best, best_key = (int(bucket_height), int(bucket_width)), key
    return best


def oriented_size(image: PIL.Image.Image) -> tuple[int, int]:
    """``(height, width)`` of ``image`` after EXIF rotation, read from the header without decoding pixels."""
    orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    if orientation in _TRANSPOSING_ORIENTATIONS:
        return image.width, image.height
    return image.height, image.width


# --------------------------------------------------------------------------------------------------------
# 2. Pixels
# --------------------------------------------------------------------------------------------------------


def _randint(high: int, generator: torch.Generator | None) -> int:
    """A random integer in ``[0, high]``."""
    return int(torch.randint(high + 1, (), generator=generator))


#: ``--image_interpolation_mode`` names -> PIL resampling filters (diffusers' scripts offer the same names).
INTERPOLATION_MODES = {
    "bilinear": PIL.Image.Resampling.BILINEAR,
    "bicubic": PIL.Image.Resampling.BICUBIC,
    "lanczos": PIL.Image.Resampling.LANCZOS,
    "nearest": PIL.Image.Resampling.NEAREST,
    "box": PIL.Image.Resampling.BOX,
    "hamming": PIL.Image.Resampling.HAMMING,
}


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """An 8-bit RGB copy of ``image``, with high-bit-depth grey modes scaled by their range, not clipped.

    PIL's own ``convert("RGB")`` clips these modes at 255, so a 16-bit PNG would read as nearly all white. Here
    ``I;16*`` and ``I`` (how Pillow opens 16-bit PNG and TIFF files) are read as 0-65535, ``F`` (float TIFF) as
    0-1, each rounded to 0-255 and clipped; every other mode goes through ``convert("RGB")`` (alpha dropped).

    Example:
        >>> grey16 = PIL.Image.fromarray(np.array([[0, 257, 65535]], dtype=np.uint16))  # mode I;16
        >>> np.asarray(to_rgb(grey16))[0, :, 0].tolist()
        [0, 1, 255]
    """
    if image.mode.startswith("I;16") or image.mode == "I":
        scale = 255 / 65535
    elif image.mode == "F":
        scale = 255.0
    else:
        return image.convert("RGB")
    grey = np.clip(np.nan_to_num(np.rint(np.asarray(image, dtype=np.float64) * scale)), 0, 255).astype(np.uint8)
    return PIL.Image.fromarray(grey).convert("RGB")  # 2-D uint8: mode L


def resize_and_crop(
    image: PIL.Image.Image,
    bucket: tuple[int, int],
    *,
    center_crop: bool,
    generator: torch.Generator | None,
    random_flip: bool,
    interpolation: str = "bilinear",
) -> torch.Tensor:
    """Turn a PIL image into a ``(3, h, w)`` float32 tensor in ``[-1, 1]`` for the bucket ``(h, w)``.

    As :meth:`~scfm_diffusers.training.data.ImageCaptionPreprocessor.transform`, with a rectangle instead
    of a square: apply the EXIF rotation and convert to 8-bit RGB (:func:`to_rgb`, 16-bit and float images by their
    value range); resize (bilinear, keeping the aspect ratio) so
    that the image just covers the bucket, i.e. by ``max(h / H, w / W)`` (this upscales an image smaller
    than the bucket, which :func:`assign_bucket` never picks); crop ``h × w`` at the centre or at a random
    offset; flip horizontally with probability ½ if ``random_flip``. The random draws (left offset, top
    offset, then flip) come from ``generator``, or from torch's global generator if it is ``None``.

    Args:
        image: The image, ``H × W`` pixels.
        bucket: ``(h, w)``, the output size.
        center_crop: Crop at the centre instead of at random.
        generator: Source of the crop offsets and the flip.
        random_flip: Flip horizontally with probability ½.
        interpolation: PIL resampling filter of the resize (:data:`INTERPOLATION_MODES`; diffusers'
            ``--image_interpolation_mode``).

    Returns:
        ``(3, h, w)`` float32 pixels in ``[-1, 1]``.

    Raises:
        ValueError: A non-positive bucket side, or an unknown interpolation mode.
    """
    height, width = bucket
    if height <= 0 or width <= 0:
        raise ValueError(f"Bucket sides must be positive, got {bucket}.")
    if interpolation not in INTERPOLATION_MODES:
        raise ValueError(f"Unknown interpolation {interpolation!r}; expected one of {sorted(INTERPOLATION_MODES)}.")
    image = to_rgb(PIL.ImageOps.exif_transpose(image))
    scale = max(height / image.height, width / image.width)
    size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    image = image.resize(size, INTERPOLATION_MODES[interpolation])
    if center_crop:
        left, top = (image.width - width) // 2, (image.height - height) // 2
    else:
        left, top = _randint(image.width - width, generator), _randint(image.height - height, generator)
    image = image.crop((left, top, left + width, top + height))
    if random_flip and _randint(1, generator):
        image = image.transpose(PIL.Image.Transpose.FLIP_LEFT_RIGHT)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1)
    return pixels / 127.5 - 1.0


# --------------------------------------------------------------------------------------------------------
# 3. Batches
# --------------------------------------------------------------------------------------------------------


class BucketBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of row indices, each batch from one bucket, shuffled reproducibly per epoch.

    Each epoch, the rows of every bucket are shuffled and cut into batches of ``batch_size``, then the
    batches of all buckets are shuffled together. The order depends only on ``(seed, epoch)``, so every
    process of a multi-process run builds the same order and accelerate's ``BatchSamplerShard`` hands each
    process every ``num_processes``-th batch. Set the epoch with :meth:`set_epoch` (the sampler does not
    advance it by itself); accelerate's prepared ``DataLoader`` does it at the start of every pass.

    Repetition, so that small data still trains (every row of a bucket stays equally frequent):

    * with ``drop_last``, a bucket of ``n < batch_size`` rows is repeated whole ``⌈batch_size / n⌉``
      times, each copy shuffled on its own, so it fills at least one batch instead of none;
    * with ``min_batches``, the whole data (every bucket, after the rule above) is repeated the least
      whole number of times that gives at least ``min_batches`` batches per epoch — e.g.
      ``accelerator.num_processes``, so that no process is left without a batch.

    :attr:`copies` says how often each bucket's rows appear per epoch (a dropped tail excepted).

    Args:
        bucket_of_rows: The bucket of every row of the dataset, e.g. its ``(height, width)`` from
            :func:`assign_bucket`; any hashable key works. Rows whose key is ``None`` are never sampled
            (the images too small for every bucket).
        batch_size: Rows per batch.
        seed: Seed of the shuffles (≥ 0); the same on every process.
        drop_last: Drop each bucket's incomplete last batch. With ``False`` those short batches are kept
            (and no bucket is repeated); on several processes accelerate only treats batches of exactly
            ``batch_size`` rows as complete, so keep ``True`` there.
        min_batches: The least number of batches per epoch (see above); ``None`` for no minimum.

    Raises:
        ValueError: ``batch_size < 1``, ``min_batches < 1``, ``seed < 0``, or no row has a bucket.
    """

    def __init__(
        self,
        bucket_of_rows: Sequence[Hashable],
        batch_size: int,
        *,
        seed: int,
        drop_last: bool = True,
        min_batches: int | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}.")
        if min_batches is not None and min_batches < 1:
            raise ValueError(f"min_batches must be ≥ 1 or None, got {min_batches}.")
        if seed < 0:
            raise ValueError(f"seed must be ≥ 0, got {seed}.")
        rows_of_bucket: dict[Hashable, list[int]] = {}
        for row, bucket in enumerate(bucket_of_rows):
            if bucket is not None:
                rows_of_bucket.setdefault(bucket, []).append(row)
        if not rows_of_bucket:
            raise ValueError(
                f"No batch can be formed: none of the {len(bucket_of_rows)} rows has a bucket (all images are "
                "smaller than every bucket, or the dataset is empty). Lower the resolution or add larger images."
            )
        # accelerate's BatchSamplerShard reads these two attributes.
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.seed = seed
        self.epoch = 0
        # Buckets in order of first appearance: deterministic without requiring sortable keys.
        self._rows = {bucket: np.asarray(rows, dtype=np.int64) for bucket, rows in rows_of_bucket.items()}
        fill = {
            bucket: math.ceil(batch_size / len(rows)) if drop_last and len(rows) < batch_size else 1
            for bucket, rows in self._rows.items()
        }
        repeats = 1
        while min_batches is not None and self._count_batches(fill, repeats) < min_batches:
            repeats += 1
        #: How many times each bucket's rows appear per epoch.
        self.copies: dict[Hashable, int] = {bucket: fill[bucket] * repeats for bucket in self._rows}
        self._length = self._count_batches(self.copies, 1)

    def _count_batches(self, copies: dict[Hashable, int], repeats: int) -> int:
        """Batches per epoch when bucket ``b``'s rows appear ``copies[b] × repeats`` times."""
        num_rows = (len(rows) * copies[bucket] * repeats for bucket, rows in self._rows.items())
        if self.drop_last:
            return sum(n // self.batch_size for n in num_rows)
        return sum(math.ceil(n / self.batch_size) for n in num_rows)

    @property
    def sampler(self) -> BucketBatchSampler:
        """This sampler itself: the attribute accelerate looks in to call ``set_epoch``.

        ``DataLoaderShard.set_epoch`` calls ``batch_sampler.set_epoch`` but, once the batch sampler is
        wrapped (``BatchSamplerShard`` on several processes, ``SkipBatchSampler`` after
        ``skip_first_batches``), only ``batch_sampler.batch_sampler.sampler.set_epoch``.
        """
        return self

    def set_epoch(self, epoch: int) -> None:
        """Use the order of ``epoch`` from the next iteration on."""
        self.epoch = epoch

    def __len__(self) -> int:
        """The exact number of batches per epoch (the same for every epoch)."""
        return self._length

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng((self.seed, self.epoch))
        batches: list[list[int]] = []
        for bucket, rows in self._rows.items():
            order = np.concatenate([rng.permutation(rows) for _ in range(self.copies[bucket])]).tolist()
            stop = len(order) - len(order) % self.batch_size if self.drop_last else len(order)
            batches.extend(order[start : start + self.batch_size] for start in range(0, stop, self.batch_size))
        for index in rng.permutation(len(batches)).tolist():
            yield batches[index]
