"""The sharded latent / text cache: contents, reuse, stale settings, resume after a crash, buckets, laziness.

Real encoders of the tiny Flux pipeline, real PNG files read through `datasets`.
"""

import json
import logging
import pickle
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from scfm_diffusers.families import get_family
from scfm_diffusers.testing import tiny_flux_pipeline
from scfm_diffusers.training.buckets import make_buckets
from scfm_diffusers.training.cache import (
    INDEX_FILE,
    CorruptCacheError,
    LatentCache,
    build_latent_cache,
    components_fingerprint,
)
from scfm_diffusers.training.data import ImageCaptionPreprocessor, load_image_caption_dataset, row_generator


@pytest.fixture(scope="module")
def pipe():
    return tiny_flux_pipeline()


def write_folder(folder, sizes, captions):
    """PNGs of the given (width, height) sizes with a metadata.jsonl of ``captions``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for index, ((width, height), caption) in enumerate(zip(sizes, captions, strict=True)):
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(folder / f"{index}.png")
        rows.append({"file_name": f"{index}.png", "text": caption})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


class Encoders:
    """The tiny pipeline's real encoders, counting what they are asked to encode (optionally failing)."""

    def __init__(self, pipe, fail_on_image_call=None):
        self.pipe, self.fail_on_image_call = pipe, fail_on_image_call
        self.captions, self.image_calls = [], 0

    def images(self, pixels, generators):
        self.image_calls += 1
        if self.image_calls == self.fail_on_image_call:
            raise RuntimeError("simulated crash while caching")
        return get_family("flux").encode_images(self.pipe.vae, pixels, generator=generators)

    def prompts(self, prompts):
        self.captions.extend(prompts)
        return get_family("flux").encode_prompts(self.pipe, prompts, max_sequence_length=8)


def build(samples, directory, encoders, settings=None, **kwargs):
    kwargs = {"batch_size": 2, "shard_size": 2, "show_progress": False, **kwargs}
    return build_latent_cache(
        samples,
        directory,
        settings=settings or {"model": "tiny", "resolution": 32},
        encode_images=encoders.images,
        encode_prompts=encoders.prompts,
        **kwargs,
    )


def square_samples(tmp_path, captions, resolution=32):
    folder = write_folder(tmp_path / "data", [(40, 36)] * len(captions), captions)
    dataset = load_image_caption_dataset(train_data_dir=folder, cache_dir=tmp_path / "hf")
    return ImageCaptionPreprocessor(resolution, random_flip=True, seed=3)(dataset)


def assert_same_cache(a: LatentCache, b: LatentCache):
    assert len(a) == len(b) and a.num_captions == b.num_captions
    for index in range(len(a)):
        x, y = a[index], b[index]
        assert x.keys() == y.keys()
        for key in x:
            assert torch.equal(x[key], y[key]), f"row {index}: {key} differs"


def test_items_equal_direct_encoding_and_repeated_captions_are_encoded_once(pipe, tmp_path):
    captions = ["a cat", "a dog", "a cat", "a bird", "a dog"]
    samples = square_samples(tmp_path, captions)
    encoders = Encoders(pipe)
    cache = build(samples, tmp_path / "cache", encoders)

    # Each unique caption once, after one caption that measures the embedding size (for the text shard size).
    assert encoders.captions[0] == "a cat" and sorted(encoders.captions[1:]) == ["a bird", "a cat", "a dog"]
    assert len(cache) == 5 and cache.num_captions == 3
    item = cache[2]
    assert item["latents"].shape == (1, 32, 32) and item["latents"].dtype == torch.bfloat16
    assert item["prompt_embeds"].shape == (8, 32) and item["pooled_prompt_embeds"].shape == (32,)
    assert cache.caption(2) == "a cat" and cache.caption(4) == "a dog"
    assert torch.equal(cache[0]["prompt_embeds"], cache[2]["prompt_embeds"])

    # Row 2 encoded alone, with its own seeds, gives exactly the cached row: batching does not matter.
    sample = samples.sample(2)
    with torch.no_grad():
        latents = get_family("flux").encode_images(
            pipe.vae, sample.pixel_values[None], generator=[row_generator(3, 2, 2)]
        )
        text = get_family("flux").encode_prompts(pipe, ["a cat"], max_sequence_length=8)
    torch.testing.assert_close(cache[2]["latents"], latents[0].to(torch.bfloat16), rtol=0, atol=0)
    torch.testing.assert_close(cache[2]["prompt_embeds"], text["prompt_embeds"][0].to(torch.bfloat16), rtol=0, atol=0)

    batch = LatentCache.collate([cache[0], cache[3]])
    assert batch["latents"].shape == (2, 1, 32, 32) and batch["prompt_embeds"].shape == (2, 8, 32)


def test_finished_cache_is_reused_without_reading_the_data(pipe, tmp_path):
    samples = square_samples(tmp_path, ["a", "b", "c"])
    first = build(samples, tmp_path / "cache", Encoders(pipe), dtype=torch.float32)
    encoders = Encoders(pipe)
    samples.dataset = None  # reading the data set now would fail
    again = build(samples, tmp_path / "cache", encoders, dtype=torch.float32)
    assert encoders.image_calls == 0 and encoders.captions == []
    assert_same_cache(first, again)
    assert first[0]["latents"].dtype == torch.float32


def test_cache_from_other_settings_is_never_reused(pipe, tmp_path, caplog):
    samples = square_samples(tmp_path, ["a", "b", "c"])
    build(samples, tmp_path / "cache", Encoders(pipe))
    encoders = Encoders(pipe)
    with caplog.at_level(logging.WARNING, logger="scfm_diffusers.training.cache"):
        rebuilt = build(samples, tmp_path / "cache", encoders, settings={"model": "tiny", "resolution": 16})
    assert "other settings" in caplog.text and "resolution: 32 → 16" in caplog.text
    assert encoders.image_calls == 2 and len(rebuilt) == 3  # everything encoded again
    assert json.loads((tmp_path / "cache" / INDEX_FILE).read_text())["settings"]["resolution"] == 16

    # A partial cache (no index yet) of other settings is not mixed in either.
    (tmp_path / "cache" / INDEX_FILE).unlink()
    encoders = Encoders(pipe)
    build(samples, tmp_path / "cache", encoders, settings={"model": "other", "resolution": 16})
    assert encoders.image_calls == 2


def test_a_build_killed_midway_resumes_and_equals_an_uninterrupted_one(pipe, tmp_path):
    samples = square_samples(tmp_path, [f"caption {i}" for i in range(7)])  # 4 image shards of ≤ 2 rows
    crashing = Encoders(pipe, fail_on_image_call=3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        build(samples, tmp_path / "cache", crashing)
    assert not (tmp_path / "cache" / INDEX_FILE).exists()
    finished = sorted(p.name for p in (tmp_path / "cache").glob("images-*.json"))
    assert finished == ["images-00000.json", "images-00001.json"]

    resumed_encoders = Encoders(pipe)
    resumed = build(samples, tmp_path / "cache", resumed_encoders)
    assert resumed_encoders.image_calls == 2 and resumed_encoders.captions == []  # only what was missing
    assert_same_cache(resumed, build(samples, tmp_path / "fresh", Encoders(pipe)))


def test_buckets_keep_aspect_ratios_and_too_small_images_are_skipped_and_counted(pipe, tmp_path):
    # 64-px buckets: landscape, portrait, square, and one image smaller than every bucket.
    sizes = [(96, 48), (48, 96), (70, 70), (40, 30), (100, 52)]
    folder = write_folder(tmp_path / "data", sizes, [f"c{i}" for i in range(len(sizes))])
    dataset = load_image_caption_dataset(train_data_dir=folder, cache_dir=tmp_path / "hf")
    samples = ImageCaptionPreprocessor(64, center_crop=True, seed=0, buckets=make_buckets(64))(dataset)
    cache = build(samples, tmp_path / "cache", Encoders(pipe), settings={"buckets": True})

    assert len(cache) == 4
    skipped = cache.index["skipped"]
    assert len(skipped) == 1 and skipped[0]["reason"] == "too small" and skipped[0]["source"].endswith("3.png")
    shapes = [tuple(cache[i]["latents"].shape) for i in range(len(cache))]
    assert shapes[0][2] > shapes[0][1] and shapes[1][1] > shapes[1][2] and shapes[2][1] == shapes[2][2]
    assert shapes[3] == shapes[0]  # two landscape images share a bucket
    assert len(cache.bucket_shapes) == 3 and cache.bucket_ids[0] == cache.bucket_ids[3]
    with pytest.raises(ValueError, match="mixes latent shapes"):
        LatentCache.collate([cache[0], cache[1]])


def test_no_usable_image_is_a_clear_error(pipe, tmp_path):
    folder = write_folder(tmp_path / "data", [(20, 20), (24, 24)], ["a", "b"])
    dataset = load_image_caption_dataset(train_data_dir=folder, cache_dir=tmp_path / "hf")
    samples = ImageCaptionPreprocessor(64, buckets=make_buckets(64))(dataset)
    with pytest.raises(ValueError, match="No usable image among the 2 rows.*too small"):
        build(samples, tmp_path / "cache", Encoders(pipe))


def test_the_dataset_object_holds_no_tensors(pipe, tmp_path):
    """Training RAM must not grow with the data: the dataset keeps a 16-byte row table, not the tensors."""
    samples = square_samples(tmp_path, [f"caption {i}" for i in range(12)])
    cache = build(samples, tmp_path / "cache", Encoders(pipe), dtype=torch.float32)
    stored = sum(p.stat().st_size for p in (tmp_path / "cache").glob("*.safetensors"))
    item_bytes = sum(t.numel() * t.element_size() for t in cache[5].values())
    assert stored > 10 * item_bytes
    assert len(pickle.dumps(cache)) < 2 * item_bytes + 4096
    cache.close()


def test_text_shards_are_bounded_in_bytes(pipe, tmp_path):
    """A FLUX.1-dev caption is 2 MiB: text shards hold as many captions as fit in text_shard_bytes."""
    samples = square_samples(tmp_path, [f"caption {i}" for i in range(7)])
    per_caption = (8 * 32 + 32) * 2  # prompt_embeds (8, 32) + pooled (32,), bf16
    cache = build(samples, tmp_path / "cache", Encoders(pipe), shard_size=100, text_shard_bytes=3 * per_caption)
    assert sorted(p.name for p in (tmp_path / "cache").glob("text-*.json")) == [
        "text-00000.json",
        "text-00001.json",
        "text-00002.json",
    ]
    assert cache.index["text_shard_size"] == 3 and cache.caption(6) == "caption 6"
    assert torch.equal(cache[6]["prompt_embeds"], build(samples, tmp_path / "big", Encoders(pipe))[6]["prompt_embeds"])


class MaskedEncoders(Encoders):
    """Encoders of a family whose text is padded embeddings plus a mask and ids (Qwen-Image, Z-Image)."""

    def prompts(self, prompts):
        text = super().prompts(prompts)
        lengths = torch.tensor([min(len(p), 8) for p in prompts])
        text["prompt_embeds_mask"] = torch.arange(8)[None] < lengths[:, None]  # bool (B, 8)
        text["token_ids"] = torch.arange(8, dtype=torch.int64)[None].repeat(len(prompts), 1) * 1000003  # > bf16
        return text


def test_masks_and_ids_keep_their_dtype_and_count_in_the_shard_bound(pipe, tmp_path):
    samples = square_samples(tmp_path, ["a", "a much longer caption", "mid size"])
    cache = build(samples, tmp_path / "cache", MaskedEncoders(pipe), dtype=torch.bfloat16)
    for index, caption in enumerate(["a", "a much longer caption", "mid size"]):
        item = cache[index]
        assert item["prompt_embeds"].dtype == torch.bfloat16
        assert item["prompt_embeds_mask"].dtype == torch.bool
        assert item["prompt_embeds_mask"].sum() == min(len(caption), 8)
        assert torch.equal(item["token_ids"], torch.arange(8) * 1000003)  # exact: never through bf16
    batch = cache.collate([cache[0], cache[1]])
    assert batch["prompt_embeds_mask"].dtype == torch.bool and batch["prompt_embeds_mask"].shape == (2, 8)
    # 8·32 + 32 bf16 values + 8 bool + 8 int64 bytes per caption: 2 captions fit, not 3.
    per_caption = (8 * 32 + 32) * 2 + 8 + 8 * 8
    bounded = build(
        samples, tmp_path / "bounded", MaskedEncoders(pipe), shard_size=100, text_shard_bytes=2 * per_caption
    )
    assert bounded.index["text_shard_size"] == 2


# --- verification: every file is checked before it is trusted; what is broken is rebuilt ----------------


def break_file(path, how, at=0.5):
    """Truncate ``path`` by 10 bytes, or flip one bit of the byte at fraction ``at`` of it (same length)."""
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(bytes(data[:-10]))
    else:
        data[int(len(data) * at)] ^= 0x01
        path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncate", "flip"])
def test_a_broken_image_shard_is_refused_when_opened_and_re_encoded_by_the_next_build(pipe, tmp_path, caplog, how):
    samples = square_samples(tmp_path, ["a", "b", "c", "d", "e"])  # 3 image shards of ≤ 2 rows
    build(samples, tmp_path / "cache", Encoders(pipe))
    shard = tmp_path / "cache" / "images-00001.safetensors"
    break_file(shard, how)

    # Opened directly: one error naming the file, what is wrong and the fix, before any item is read.
    reason = "it holds .* bytes, .* were written" if how == "truncate" else "its bytes changed since it was written"
    with pytest.raises(CorruptCacheError, match=rf"{shard}.* is broken: {reason}.*Run the training script"):
        LatentCache(tmp_path / "cache")
    if how == "truncate":  # sizes are checked even without the checksum pass
        with pytest.raises(CorruptCacheError, match="truncated or overwritten"):
            LatentCache(tmp_path / "cache", verify=False)

    # The next build re-encodes that shard alone (one batch of 2 rows; no caption), and equals a fresh cache.
    encoders = Encoders(pipe)
    with caplog.at_level(logging.WARNING, logger="scfm_diffusers.training.cache"):
        healed = build(samples, tmp_path / "cache", encoders)
    assert "failed verification" in caplog.text and "images-00001.safetensors" in caplog.text
    assert encoders.image_calls == 1 and encoders.captions == []
    assert_same_cache(healed, build(samples, tmp_path / "fresh", Encoders(pipe)))
    assert_same_cache(healed, LatentCache(tmp_path / "cache"))  # verifies clean now


def test_a_bit_flipped_text_shard_is_re_encoded(pipe, tmp_path):
    samples = square_samples(tmp_path, ["a", "b", "c"])
    build(samples, tmp_path / "cache", Encoders(pipe))
    break_file(tmp_path / "cache" / "text-00000.safetensors", "flip")
    encoders = Encoders(pipe)
    healed = build(samples, tmp_path / "cache", encoders)
    assert encoders.image_calls == 0 and sorted(set(encoders.captions)) == ["a", "b"]  # text-00000 holds a, b
    assert_same_cache(healed, build(samples, tmp_path / "fresh", Encoders(pipe)))


def test_a_truncated_shard_header_is_named_when_the_shard_is_opened(pipe, tmp_path):
    """The safetensors header is checked against the file's size whenever a shard is opened for reading."""
    from scfm_diffusers.training.cache_files import _RowReader

    samples = square_samples(tmp_path, ["a", "b"])
    build(samples, tmp_path / "cache", Encoders(pipe))
    shard = tmp_path / "cache" / "images-00000.safetensors"
    break_file(shard, "truncate")
    with pytest.raises(CorruptCacheError, match=rf"{shard} is broken: it is truncated: the header lists \d+ bytes"):
        _RowReader(shard)
    shard.write_bytes(b"\x05")
    with pytest.raises(CorruptCacheError, match="holds 1 bytes, fewer than a safetensors header"):
        _RowReader(shard)


def test_edited_sidecars_rows_and_index_are_seen_and_healed(pipe, tmp_path, caplog):
    samples = square_samples(tmp_path, ["a", "b", "c", "d"])
    build(samples, tmp_path / "cache", Encoders(pipe))
    fresh = build(samples, tmp_path / "fresh", Encoders(pipe))
    folder = tmp_path / "cache"

    # A sidecar whose row → caption table was edited (valid JSON, same length): its shard is re-encoded.
    sidecar = folder / "images-00001.json"
    sidecar.write_text(sidecar.read_text().replace('"caption_ids": [2, 3]', '"caption_ids": [3, 2]'))
    encoders = Encoders(pipe)
    assert_same_cache(build(samples, folder, encoders), fresh)
    assert encoders.image_calls == 1

    # A flipped byte in the row table, or an edited index: refused when opened; the next build rewrites the
    # index from the intact shards without encoding anything.
    break_file(folder / "rows.safetensors", "flip", at=0.99)  # in the table, not its header
    with pytest.raises(CorruptCacheError, match="rows.safetensors is broken: its bytes changed"):
        LatentCache(folder)
    encoders = Encoders(pipe)
    assert_same_cache(build(samples, folder, encoders), fresh)
    index = folder / INDEX_FILE
    index.write_text(index.read_text().replace('"num_rows": 4', '"num_rows": 5'))
    with pytest.raises(CorruptCacheError, match=rf"{index} is unreadable, altered.*Run the training script"):
        LatentCache(folder)
    with caplog.at_level(logging.WARNING, logger="scfm_diffusers.training.cache"):
        assert_same_cache(build(samples, folder, encoders), fresh)
    assert "unreadable or altered" in caplog.text
    assert encoders.image_calls == 0 and encoders.captions == []


def test_a_partial_cache_with_a_foreign_sidecar_heals(pipe, tmp_path):
    """A shard of another cache (other settings) in a partial cache is re-encoded, not trusted or fatal."""
    samples = square_samples(tmp_path, ["a", "b", "c", "d"])
    build(samples, tmp_path / "other", Encoders(pipe), settings={"model": "other", "resolution": 32})
    build(samples, tmp_path / "cache", Encoders(pipe))
    (tmp_path / "cache" / INDEX_FILE).unlink()  # unfinished
    for suffix in (".json", ".safetensors"):
        shutil.copy(tmp_path / "other" / f"images-00001{suffix}", tmp_path / "cache" / f"images-00001{suffix}")
    encoders = Encoders(pipe)
    healed = build(samples, tmp_path / "cache", encoders)
    assert encoders.image_calls == 1  # the foreign shard alone
    assert_same_cache(healed, build(samples, tmp_path / "fresh", Encoders(pipe)))


def test_encoder_weights_replaced_at_the_same_path_change_the_fingerprint(pipe, tmp_path, caplog):
    """Same config, same shapes, new VAE weights at the same path: the encoders' fingerprint changes and the cache
    is re-encoded; a copied folder (new modification times) or new transformer weights change nothing."""
    folder = tmp_path / "base"
    pipe.save_pretrained(folder)
    before = components_fingerprint(folder)
    shutil.copytree(folder, tmp_path / "copy")  # new mtimes, same bytes
    assert components_fingerprint(tmp_path / "copy") == before
    assert components_fingerprint("black-forest-labs/FLUX.1-dev") is None  # a Hub id: id + revision name it

    transformer = type(pipe.transformer).from_pretrained(folder / "transformer")  # the cache does not depend on it
    with torch.no_grad():
        next(transformer.parameters()).add_(1.0)
    transformer.save_pretrained(folder / "transformer")
    assert components_fingerprint(folder) == before

    vae_config = (folder / "vae" / "config.json").read_text()
    vae = type(pipe.vae).from_pretrained(folder / "vae")
    with torch.no_grad():
        next(vae.parameters()).mul_(0.5)
    vae.save_pretrained(folder / "vae")  # same shapes and safetensors header, other bytes
    assert (
        json.loads((folder / "vae" / "config.json").read_text()).items()
        >= {k: v for k, v in json.loads(vae_config).items() if k != "_name_or_path"}.items()
    )
    after = components_fingerprint(folder)
    assert after != before

    samples = square_samples(tmp_path, ["a", "b"])
    build(samples, tmp_path / "cache", Encoders(pipe), settings={"model": "base", "encoders": before})
    encoders = Encoders(pipe)
    with caplog.at_level(logging.WARNING, logger="scfm_diffusers.training.cache"):
        build(samples, tmp_path / "cache", encoders, settings={"model": "base", "encoders": after})
    assert "other settings (encoders:" in caplog.text and encoders.image_calls == 1
