"""Aspect-ratio buckets: the bucket list, the assignment rule, the pixels and the batch sampler under accelerate."""

import io
import math
from collections import Counter

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate.data_loader import BatchSamplerShard, DataLoaderShard, skip_first_batches
from accelerate.state import AcceleratorState, GradientState
from PIL import Image

from scfm_diffusers.training.buckets import (
    BucketBatchSampler,
    assign_bucket,
    make_buckets,
    oriented_size,
    resize_and_crop,
)

# --- bucket list ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("resolution", [512, 1024])
def test_buckets_are_multiples_near_the_budget_and_cover_the_aspect_range(resolution):
    buckets = make_buckets(resolution)
    assert buckets == make_buckets(resolution)  # deterministic
    assert list(buckets) == sorted(set(buckets))
    assert (resolution, resolution) in buckets
    area = resolution**2
    for height, width in buckets:
        assert height % 16 == 0 and width % 16 == 0
        assert area - resolution * 16 < height * width <= area
        assert height * width >= 0.9 * area
        assert 0.5 <= width / height <= 2.0
    # Portrait and landscape mirror each other for a symmetric range.
    assert {(w, h) for h, w in buckets} == set(buckets)
    # No aspect ratio in [0.5, 2] is more than 10 % from a bucket's.
    log_aspects = sorted(math.log(w / h) for h, w in buckets)
    gaps = np.diff([math.log(0.5), *log_aspects, math.log(2.0)])
    assert gaps.max() <= math.log(1.1)


def test_bucket_list_at_512_is_pinned():
    buckets = make_buckets(512)
    assert len(buckets) == 19
    assert buckets[0] == (368, 704) and buckets[-1] == (704, 368)
    assert (384, 672) in buckets and (448, 576) in buckets


def test_bucket_range_and_multiple_are_honoured():
    assert make_buckets(512, min_aspect=1.0, max_aspect=1.0) == ((512, 512),)
    landscape = make_buckets(512, min_aspect=1.0, max_aspect=2.0)
    assert all(w >= h for h, w in landscape) and (368, 704) in landscape
    coarse = make_buckets(512, multiple=64)
    assert all(h % 64 == 0 and w % 64 == 0 for h, w in coarse) and (512, 512) in coarse


@pytest.mark.parametrize(
    "resolution, kwargs, match",
    [
        (500, {}, "multiple of 16"),
        (0, {}, "multiple of 16"),
        (-512, {}, "multiple of 16"),
        (512, {"multiple": 0}, "multiple"),
        (512, {"min_aspect": 1.5}, "min_aspect"),
        (512, {"max_aspect": 0.8}, "max_aspect"),
        (512, {"min_aspect": 0.0}, "min_aspect"),
    ],
)
def test_bad_bucket_arguments_are_clear_errors(resolution, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_buckets(resolution, **kwargs)


# --- assignment -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size, bucket",
    [
        ((1080, 1920), (384, 672)),  # landscape 16:9 → 1.75
        ((1920, 1080), (672, 384)),  # portrait 9:16
        ((600, 600), (512, 512)),  # square
        ((400, 2000), (368, 704)),  # wider than the range: the widest bucket
        ((1000, 500), (704, 368)),  # 1:2 portrait: the tallest bucket
        ((300, 300), None),  # smaller than every bucket
        ((490, 530), None),  # almost 512² pixels, but no bucket fits inside it
        ((520, 2000), (368, 704)),  # only the short buckets fit; the widest of them is closest
    ],
)
def test_assign_bucket_picks_the_closest_aspect_among_buckets_it_covers(size, bucket):
    assert assign_bucket(*size, make_buckets(512)) == bucket


def test_assign_bucket_never_upscales_and_breaks_ties_by_area_then_order():
    buckets = make_buckets(512)
    for height, width in [(513, 900), (710, 380), (1000, 1000), (372, 5000)]:
        chosen = assign_bucket(height, width, buckets)
        assert chosen[0] <= height and chosen[1] <= width
    assert assign_bucket(40, 80, [(10, 20), (20, 40)]) == (20, 40)  # same aspect: the larger
    assert assign_bucket(100, 100, [(10, 20), (20, 10)]) == (10, 20)  # equally far: the first
    with pytest.raises(ValueError, match="positive"):
        assign_bucket(0, 10, buckets)


def test_oriented_size_reads_the_exif_rotation():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90°: stored 40 wide × 20 high, shown 20 wide × 40 high
    buffer = io.BytesIO()
    Image.new("RGB", (40, 20)).save(buffer, format="JPEG", exif=exif.tobytes())
    image = Image.open(buffer)
    assert oriented_size(image) == (40, 20)
    assert oriented_size(Image.new("RGB", (40, 20))) == (20, 40)
    pixels = resize_and_crop(image, (40, 20), center_crop=True, generator=None, random_flip=False)
    assert pixels.shape == (3, 40, 20)


# --- pixels ---------------------------------------------------------------------------------------------


def random_image(width, height, mode="RGB", seed=0):
    channels = {"RGB": 3, "RGBA": 4}.get(mode)
    shape = (height, width) if channels is None else (height, width, channels)
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8), mode=mode)


@pytest.mark.parametrize("image_size", [(64, 48), (48, 64), (20, 10), (300, 40)])
@pytest.mark.parametrize("bucket", [(32, 48), (48, 32), (32, 32)])
@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
def test_resize_and_crop_shape_dtype_and_range(image_size, bucket, mode):
    image = random_image(*image_size, mode=mode)
    generator = torch.Generator().manual_seed(0)
    pixels = resize_and_crop(image, bucket, center_crop=False, generator=generator, random_flip=True)
    assert pixels.shape == (3, *bucket) and pixels.dtype == torch.float32
    assert pixels.min() >= -1.0 and pixels.max() <= 1.0


def test_center_crop_without_resize_is_the_middle_of_the_image():
    image = random_image(64, 32)  # already covers (32, 32) at scale 1
    pixels = resize_and_crop(image, (32, 32), center_crop=True, generator=None, random_flip=False)
    expected = torch.from_numpy(np.asarray(image, dtype=np.float32)[:, 16:48]).permute(2, 0, 1) / 127.5 - 1
    torch.testing.assert_close(pixels, expected, rtol=0, atol=0)


def test_random_crop_and_flip_follow_the_generator():
    image = random_image(80, 40)

    def crop(seed, **kwargs):
        generator = torch.Generator().manual_seed(seed)
        return resize_and_crop(image, (32, 32), generator=generator, **kwargs)

    torch.testing.assert_close(
        crop(3, center_crop=False, random_flip=True), crop(3, center_crop=False, random_flip=True)
    )
    assert len({crop(seed, center_crop=False, random_flip=False).sum().item() for seed in range(8)}) > 1
    centre = crop(0, center_crop=True, random_flip=False)
    flips = [crop(seed, center_crop=True, random_flip=True) for seed in range(16)]
    assert all(torch.equal(f, centre) or torch.equal(f, centre.flip(-1)) for f in flips)
    assert any(torch.equal(f, centre) for f in flips) and any(torch.equal(f, centre.flip(-1)) for f in flips)


# --- sampler --------------------------------------------------------------------------------------------


def rows_for(sizes):
    """A bucket key per row, buckets interleaved: sizes {key: n} → [key, ...] of length sum(n)."""
    rows = [key for key, n in sizes.items() for _ in range(n)]
    return [rows[i] for i in np.random.default_rng(0).permutation(len(rows))]


def epoch_batches(sampler, epoch):
    sampler.set_epoch(epoch)
    return list(sampler)


def assert_single_bucket(batches, bucket_of_rows):
    for batch in batches:
        assert len({bucket_of_rows[i] for i in batch}) == 1, batch


def test_sampler_batches_are_single_bucket_shuffled_and_reproducible():
    bucket_of_rows = rows_for({(512, 512): 10, (384, 672): 7, (672, 384): 5})
    sampler = BucketBatchSampler(bucket_of_rows, 4, seed=0)
    batches = epoch_batches(sampler, 0)
    assert len(batches) == len(sampler) == 2 + 1 + 1
    assert all(len(batch) == 4 for batch in batches)
    assert_single_bucket(batches, bucket_of_rows)
    rows = [i for batch in batches for i in batch]
    assert len(rows) == len(set(rows))  # no repetition when every bucket fills a batch
    assert all(isinstance(i, int) for i in rows)
    assert epoch_batches(sampler, 0) == batches
    assert epoch_batches(BucketBatchSampler(bucket_of_rows, 4, seed=0), 0) == batches
    assert epoch_batches(sampler, 1) != batches
    assert epoch_batches(BucketBatchSampler(bucket_of_rows, 4, seed=1), 0) != batches
    # Over epochs, batch order varies (not only the rows inside the batches).
    first_buckets = {bucket_of_rows[epoch_batches(sampler, epoch)[0][0]] for epoch in range(20)}
    assert len(first_buckets) == 3


def test_sampler_without_drop_last_yields_every_row_once():
    bucket_of_rows = rows_for({"a": 10, "b": 7, "c": 1})
    sampler = BucketBatchSampler(bucket_of_rows, 4, seed=0, drop_last=False)
    batches = epoch_batches(sampler, 2)
    assert len(batches) == len(sampler) == 3 + 2 + 1
    assert_single_bucket(batches, bucket_of_rows)
    assert sorted(i for batch in batches for i in batch) == list(range(len(bucket_of_rows)))
    assert sampler.copies == {"a": 1, "b": 1, "c": 1}


def test_few_shot_buckets_are_repeated_whole_to_fill_a_batch():
    bucket_of_rows = rows_for({"one": 1, "three": 3, "nine": 9})
    sampler = BucketBatchSampler(bucket_of_rows, 4, seed=0)
    assert sampler.copies == {"one": 4, "three": 2, "nine": 1}
    assert len(sampler) == 1 + 1 + 2  # 4 copies of 1 row, 6 rows of "three" (2 dropped), 9 rows of "nine"
    for epoch in range(5):
        batches = epoch_batches(sampler, epoch)
        assert len(batches) == len(sampler)
        assert_single_bucket(batches, bucket_of_rows)
        by_bucket = {bucket_of_rows[batch[0]]: batch for batch in batches}
        only = bucket_of_rows.index("one")
        assert by_bucket["one"] == [only] * 4
        # Copies are shuffled one after the other: the first batch holds every row of the bucket.
        three = {i for i, key in enumerate(bucket_of_rows) if key == "three"}
        assert set(by_bucket["three"]) == three and max(Counter(by_bucket["three"]).values()) == 2


def test_min_batches_repeats_the_whole_data():
    bucket_of_rows = rows_for({"a": 5, "b": 2})
    sampler = BucketBatchSampler(bucket_of_rows, 2, seed=0, min_batches=6)
    assert sampler.copies == {"a": 2, "b": 2} and len(sampler) == 5 + 2
    counts = Counter(i for batch in epoch_batches(sampler, 0) for i in batch)
    assert set(counts) <= set(range(7)) and all(count <= 2 for count in counts.values())
    assert sum(counts.values()) == 14
    assert BucketBatchSampler(bucket_of_rows, 2, seed=0, min_batches=3).copies == {"a": 1, "b": 1}


@pytest.mark.parametrize("drop_last", [True, False])
@pytest.mark.parametrize("batch_size", [1, 3, 4, 16])
@pytest.mark.parametrize("min_batches", [None, 7])
def test_len_is_exact(drop_last, batch_size, min_batches):
    bucket_of_rows = rows_for({"a": 1, "b": 2, "c": 5, "d": 13, "e": 32})
    sampler = BucketBatchSampler(bucket_of_rows, batch_size, seed=3, drop_last=drop_last, min_batches=min_batches)
    for epoch in range(3):
        batches = epoch_batches(sampler, epoch)
        assert len(batches) == len(sampler)
        assert_single_bucket(batches, bucket_of_rows)
        if drop_last:
            assert all(len(batch) == batch_size for batch in batches)
    if min_batches is not None:
        assert len(sampler) >= min_batches


def test_rows_without_bucket_are_skipped_and_no_batch_is_an_error():
    bucket_of_rows = [None, "a", None, "a", "a"]
    batches = epoch_batches(BucketBatchSampler(bucket_of_rows, 2, seed=0), 0)
    assert all(bucket_of_rows[i] == "a" for batch in batches for i in batch)
    with pytest.raises(ValueError, match="No batch can be formed"):
        BucketBatchSampler([None, None], 2, seed=0)
    with pytest.raises(ValueError, match="No batch can be formed"):
        BucketBatchSampler([], 2, seed=0)
    with pytest.raises(ValueError, match="batch_size"):
        BucketBatchSampler(["a"], 0, seed=0)
    with pytest.raises(ValueError, match="min_batches"):
        BucketBatchSampler(["a"], 1, seed=0, min_batches=0)


# --- accelerate -----------------------------------------------------------------------------------------


class IndexDataset(torch.utils.data.Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        return index


def as_lists(loader):
    return [batch.tolist() for batch in loader]


@pytest.fixture
def accelerator():
    accelerator = Accelerator(cpu=True)
    yield accelerator
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


BUCKET_OF_ROWS = rows_for({(512, 512): 9, (384, 672): 6, (672, 384): 2, (448, 576): 4})


def reference(epoch, **kwargs):
    """The order a fresh, unwrapped sampler gives for ``epoch``."""
    return epoch_batches(BucketBatchSampler(BUCKET_OF_ROWS, 2, seed=7, **kwargs), epoch)


def test_prepared_dataloader_sets_the_epoch_and_skips_batches(accelerator):
    sampler = BucketBatchSampler(BUCKET_OF_ROWS, 2, seed=7)
    loader = accelerator.prepare(torch.utils.data.DataLoader(IndexDataset(len(BUCKET_OF_ROWS)), batch_sampler=sampler))
    assert len(loader) == len(sampler) == 4 + 3 + 1 + 2

    loader.set_epoch(1)
    epoch_1 = as_lists(loader)
    assert sampler.epoch == 1 and epoch_1 == reference(1)
    assert_single_bucket(epoch_1, BUCKET_OF_ROWS)
    # accelerate advances its own epoch counter after a full pass and passes it on at the next one.
    assert as_lists(loader) == reference(2) != epoch_1
    loader.set_epoch(1)
    assert as_lists(loader) == epoch_1

    # Resuming mid-epoch: set the epoch on the prepared loader, then skip.
    loader.set_epoch(3)
    skipped = accelerator.skip_first_batches(loader, 4)
    assert len(skipped) == len(sampler) - 4
    assert as_lists(skipped) == reference(3)[4:]
    assert sampler.epoch == 3


@pytest.mark.parametrize("odd", [False, True])
def test_two_process_shards_split_the_batches_of_one_order(accelerator, odd):
    # 10 batches, or 9 with one row fewer in the 4-row bucket (an odd count: the last batch is dropped).
    bucket_of_rows = list(BUCKET_OF_ROWS)
    if odd:
        bucket_of_rows[bucket_of_rows.index((448, 576))] = None
    full = epoch_batches(BucketBatchSampler(bucket_of_rows, 2, seed=7), 5)
    shards = []
    for process_index in range(2):
        # Each process builds its own sampler; DataLoaderShard over BatchSamplerShard is what prepare()
        # builds on each of 2 processes.
        sampler = BucketBatchSampler(bucket_of_rows, 2, seed=7)
        batch_sampler = BatchSamplerShard(sampler, num_processes=2, process_index=process_index)
        loader = DataLoaderShard(IndexDataset(len(bucket_of_rows)), batch_sampler=batch_sampler)
        loader.set_epoch(5)
        assert sampler.epoch == 5  # set_epoch reaches through the shard wrapper
        shard = as_lists(loader)
        assert len(shard) == len(batch_sampler) == len(full) // 2
        assert_single_bucket(shard, bucket_of_rows)
        shards.append(shard)

        loader.set_epoch(5)  # resuming: set the epoch on the loader, then skip
        assert as_lists(skip_first_batches(loader, 2)) == shard[2:]
    interleaved = [batch for pair in zip(*shards) for batch in pair]
    assert interleaved == full[: 2 * (len(full) // 2)]
    assert len(full) == (9 if odd else 10)
