"""The data side of SCFM training: real `datasets`, real PIL files and the tiny real Flux pipeline."""

import io
import json
import logging

import datasets
import numpy as np
import pytest
import torch
from conftest import write_webdataset
from PIL import Image

from scfm_diffusers.testing import tiny_flux_pipeline
from scfm_diffusers.training.data import (
    ImageCaptionPreprocessor,
    SkippedImage,
    StreamingBatches,
    load_image_caption_dataset,
    read_prompts,
)
from scfm_diffusers.training.teacher_data import MANIFEST_FILE, PNG_SETTINGS_KEY, generate_teacher_images


def write_image_folder(folder, n=3, *, corrupt=(), size=(40, 24), metadata=True):
    """Write ``n`` random PNGs (``corrupt`` indices hold garbage bytes) and a metadata.jsonl."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        name = f"img_{i}.png"
        if i in corrupt:
            (folder / name).write_bytes(b"this is not a png")
        else:
            Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(folder / name)
        rows.append({"file_name": name, "text": f"caption {i}"})
    if metadata:
        (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


def load(folder, tmp_path, **kwargs):
    return load_image_caption_dataset(train_data_dir=folder, cache_dir=tmp_path / "hf_cache", **kwargs)


@pytest.fixture(scope="module")
def pipe():
    return tiny_flux_pipeline()


# --- loading -------------------------------------------------------------------------------------------


def test_imagefolder_loads_images_and_captions(tmp_path):
    folder = write_image_folder(tmp_path / "data", n=4)
    dataset = load(folder, tmp_path)
    assert len(dataset) == 4
    assert {"image", "text"} <= set(dataset.column_names)
    assert sorted(dataset["text"]) == [f"caption {i}" for i in range(4)]
    assert len(load(folder, tmp_path, max_train_samples=2)) == 2


def test_dataset_name_accepts_a_local_folder(tmp_path):
    folder = write_image_folder(tmp_path / "data", n=2)
    dataset = load_image_caption_dataset(dataset_name=str(folder), cache_dir=tmp_path / "hf_cache")
    assert len(dataset) == 2


@pytest.mark.parametrize(
    ("kwargs", "flag", "column"),
    [({"image_column": "img"}, "--image_column", "img"), ({"caption_column": "prompt"}, "--caption_column", "prompt")],
)
def test_missing_column_names_column_columns_and_flag(tmp_path, kwargs, flag, column):
    folder = write_image_folder(tmp_path / "data", n=2)
    with pytest.raises(ValueError) as info:
        load(folder, tmp_path, **kwargs)
    message = str(info.value)
    assert repr(column) in message and flag in message and "'image'" in message and "'text'" in message


def test_folder_without_metadata_says_what_it_must_hold(tmp_path):
    folder = write_image_folder(tmp_path / "data", n=2, metadata=False)
    with pytest.raises(ValueError, match="metadata.jsonl.*file_name.*text"):
        load(folder, tmp_path)


def test_exactly_one_source(tmp_path):
    with pytest.raises(ValueError, match="exactly one"):
        load_image_caption_dataset()
    with pytest.raises(ValueError, match="exactly one"):
        load_image_caption_dataset(dataset_name="x", train_data_dir=tmp_path)


# --- decoding and preprocessing ------------------------------------------------------------------------


def test_preprocessing_shape_range_and_center_crop(tmp_path):
    folder = write_image_folder(tmp_path / "data", n=2, size=(40, 24))
    samples = list(ImageCaptionPreprocessor(16, center_crop=True)(load(folder, tmp_path)))
    assert len(samples) == 2
    for pixels, caption, _ in samples:
        assert pixels.shape == (3, 16, 16) and pixels.dtype == torch.float32
        assert -1.0 <= pixels.min() and pixels.max() <= 1.0
        assert caption.startswith("caption")
    # A uniform image stays uniform whatever the crop / flip; its value maps 0 → -1, 255 → 1.
    image = Image.new("RGB", (30, 20), (255, 0, 255))
    pixels = ImageCaptionPreprocessor(8, random_flip=True, seed=1).transform(image)
    assert torch.equal(pixels[:, 0, 0], torch.tensor([1.0, -1.0, 1.0]))


def test_random_crop_and_flip_are_seeded(tmp_path):
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (20, 50, 3), dtype=np.uint8))
    draws = [
        [ImageCaptionPreprocessor(12, random_flip=True, seed=s).transform(image) for _ in range(2)] for s in (3, 3)
    ]
    assert all(torch.equal(a, b) for a, b in zip(draws[0], draws[1]))
    many = [ImageCaptionPreprocessor(12, random_flip=True, seed=s).transform(image) for s in range(8)]
    assert len({tuple(p.flatten()[:20].tolist()) for p in many}) > 1


def test_corrupt_file_skipped_counted_and_named(tmp_path, caplog):
    folder = write_image_folder(tmp_path / "data", n=4, corrupt={2})
    samples = ImageCaptionPreprocessor(16, center_crop=True)(load(folder, tmp_path))
    with caplog.at_level(logging.WARNING, logger="scfm_diffusers.training.data"):
        items = list(samples)
    assert len(items) == 3
    assert [item.caption for item in items] == ["caption 0", "caption 1", "caption 3"]
    assert len(samples.skipped) == 1 and samples.skipped[0].source.endswith("img_2.png")
    assert "img_2.png" in caplog.text
    list(samples)  # a second pass recounts rather than accumulates
    assert len(samples.skipped) == 1


def test_all_corrupt_is_a_clear_error(tmp_path):
    folder = write_image_folder(tmp_path / "data", n=2, corrupt={0, 1})
    samples = ImageCaptionPreprocessor(16)(load(folder, tmp_path))
    with pytest.raises(ValueError, match="All 2 images .* unusable"):
        list(samples)


def test_in_memory_dataset_with_bytes_and_caption_lists():
    buffer = io.BytesIO()
    Image.new("RGB", (20, 20), (0, 128, 255)).save(buffer, format="PNG")
    dataset = datasets.Dataset.from_dict(
        {
            "image": [{"bytes": buffer.getvalue(), "path": None}, {"bytes": b"junk", "path": None}],
            "text": [["a", "b"], ["c"]],
        }
    ).cast_column("image", datasets.Image())
    samples = ImageCaptionPreprocessor(8)(dataset)
    items = list(samples)
    assert len(items) == 1 and items[0].caption in {"a", "b"}
    assert samples.skipped[0].source == "row 1"


def test_a_row_looks_the_same_whatever_order_it_is_read_in(tmp_path):
    """Crops, flips and caption choices are seeded per row: the sharded cache relies on it."""
    folder = write_image_folder(tmp_path / "data", n=5, size=(50, 30))
    samples = ImageCaptionPreprocessor(16, random_flip=True, seed=7)(load(folder, tmp_path))
    forward = list(samples)
    for index in (4, 1, 3):
        assert torch.equal(samples.sample(index).pixel_values, forward[index].pixel_values)
    assert [item.index for item in forward] == [0, 1, 2, 3, 4]
    crops = {tuple(item.pixel_values[0, 0, :4].tolist()) for item in forward}
    assert len(crops) > 1, "rows must not all share one crop"
    other_seed = ImageCaptionPreprocessor(16, random_flip=True, seed=8)(load(folder, tmp_path))
    assert any(not torch.equal(a.pixel_values, b.pixel_values) for a, b in zip(forward, other_seed))


def test_caption_lists_draw_per_row_without_decoding_images():
    dataset = datasets.Dataset.from_dict({"image": ["/does/not/exist.png"] * 40, "text": [["a", "b", "c"]] * 40})
    samples = ImageCaptionPreprocessor(8, seed=0)(dataset)
    captions = samples.captions()  # would fail if it opened the (missing) images
    assert captions == samples.captions() and set(captions) == {"a", "b", "c"}
    assert isinstance(samples.sample(0), SkippedImage)


def test_max_train_samples_shuffles_with_the_seed_first(tmp_path):
    folder = write_image_folder(tmp_path / "data", n=12, size=(8, 8))
    picked = {seed: load(folder, tmp_path, max_train_samples=4, seed=seed)["text"] for seed in (0, 0, 1)}
    assert len(picked[0]) == 4 and picked[0] != [f"caption {i}" for i in range(4)]
    assert picked[0] == load(folder, tmp_path, max_train_samples=4, seed=0)["text"]
    assert picked[1] != picked[0]


def test_streamed_webdataset_batches_come_from_one_bucket(tmp_path):
    from scfm_diffusers.training.buckets import make_buckets

    shard = write_webdataset(tmp_path / "wds", [(96, 48), (48, 96), (96, 50), (20, 20), (48, 96), (100, 48)])
    dataset = load_image_caption_dataset(
        dataset_name="webdataset", data_files=shard, image_column="png", caption_column="txt", streaming=True
    )
    assert isinstance(dataset, datasets.IterableDataset)
    preprocessor = ImageCaptionPreprocessor(
        64, center_crop=True, image_column="png", caption_column="txt", buckets=make_buckets(64)
    )
    stream = StreamingBatches(dataset, preprocessor, batch_size=2)
    batches = list(stream)
    assert stream.num_skipped == 1  # the 20×20 image is smaller than every bucket
    assert [b["captions"] for b in batches] == [["caption 0", "caption 2"], ["caption 1", "caption 4"]]
    assert batches[0]["pixel_values"].shape[2:] != batches[1]["pixel_values"].shape[2:]
    assert batches[-1]["num_rows"] == 5
    # Resuming skips the rows already read.
    rest = list(StreamingBatches(dataset, preprocessor, batch_size=2, skip=2))
    assert [b["captions"] for b in rest] == [["caption 2", "caption 5"]]  # row 4 waits alone for a portrait mate


# --- prompts and teacher data --------------------------------------------------------------------------


def test_read_prompts_skips_comments_and_blanks(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# my prompts\n a red cube \n\n#skip\nblue sky\n   \n")
    assert read_prompts(path) == ["a red cube", "blue sky"]
    path.write_text("# only a comment\n\n")
    with pytest.raises(ValueError, match="no prompts"):
        read_prompts(path)
    with pytest.raises(FileNotFoundError):
        read_prompts(tmp_path / "missing.txt")


def test_teacher_images_are_written_loaded_and_cached(pipe, tmp_path):
    out = tmp_path / "teacher"
    settings = {"height": 32, "width": 32, "num_inference_steps": 2, "batch_size": 2, "show_progress": False}
    settings["pipeline_kwargs"] = {"max_sequence_length": 16}  # short T5 input keeps the test fast
    prompts = ["a red cube", "a blue sphere", "a green cone"]
    assert generate_teacher_images(pipe, prompts, out, images_per_prompt=2, **settings) == out
    files = sorted(out.glob("*.png"))
    assert len(files) == 6
    dataset = load(out, tmp_path)
    assert len(dataset) == 6 and sorted(dataset["text"]) == sorted(p for p in prompts for _ in range(2))
    assert dataset[0]["image"].size == (32, 32)
    mtimes = {f.name: f.stat().st_mtime_ns for f in files}

    generate_teacher_images(pipe, prompts, out, images_per_prompt=2, **settings)  # same settings: nothing redone
    assert {f.name: f.stat().st_mtime_ns for f in out.glob("*.png")} == mtimes

    # Per-image seeds do not depend on batching: image 3 is the same in batches of 4 as in batches of 2.
    regrouped = generate_teacher_images(
        pipe, prompts, tmp_path / "regrouped", images_per_prompt=2, **{**settings, "batch_size": 4}
    )
    assert np.array_equal(np.asarray(Image.open(regrouped / "000003.png")), np.asarray(Image.open(out / "000003.png")))

    generate_teacher_images(pipe, prompts, out, images_per_prompt=2, **{**settings, "num_inference_steps": 3})
    assert all(f.stat().st_mtime_ns != mtimes[f.name] for f in out.glob("*.png"))
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert {entry["num_inference_steps"] for entry in manifest.values()} == {3}

    # Each PNG carries its own settings, so a run that died before writing the manifest resumes from the files.
    (out / MANIFEST_FILE).unlink()
    assert json.loads(Image.open(out / "000001.png").text[PNG_SETTINGS_KEY])["seed"] == 1
    mtimes = {f.name: f.stat().st_mtime_ns for f in out.glob("*.png")}
    (out / "000002.png").unlink()
    generate_teacher_images(pipe, prompts, out, images_per_prompt=2, **{**settings, "num_inference_steps": 3})
    redone = {f.name for f in out.glob("*.png") if f.stat().st_mtime_ns != mtimes.get(f.name)}
    assert redone == {"000002.png"}

    # Fewer prompts: the surplus images are removed; the kept ones are not redone.
    before = {f.name: f.stat().st_mtime_ns for f in out.glob("*.png")}
    generate_teacher_images(pipe, prompts[:2], out, images_per_prompt=2, **{**settings, "num_inference_steps": 3})
    after = {f.name: f.stat().st_mtime_ns for f in out.glob("*.png")}
    assert after == {name: before[name] for name in after} and len(after) == 4
    assert len(load(out, tmp_path)) == 4


def test_broken_teacher_images_are_regenerated_even_when_the_manifest_lists_them(pipe, tmp_path, caplog):
    out = tmp_path / "teacher"
    settings = {"height": 32, "width": 32, "num_inference_steps": 2, "batch_size": 4, "show_progress": False}
    settings["pipeline_kwargs"] = {"max_sequence_length": 16}
    prompts = ["a red cube", "a blue sphere"]
    generate_teacher_images(pipe, prompts, out, images_per_prompt=2, **settings)
    assert (out / MANIFEST_FILE).is_file()  # a finished run: its manifest lists every image
    originals = {f.name: np.asarray(Image.open(f)) for f in out.glob("*.png")}
    data = (out / "000002.png").read_bytes()
    (out / "000001.png").write_bytes(b"")  # zero bytes
    (out / "000002.png").write_bytes(data[: len(data) // 2])  # truncated
    flipped = bytearray((out / "000003.png").read_bytes())
    flipped[len(flipped) * 3 // 4] ^= 0x01  # same length, one bit flipped (a chunk's CRC fails)
    (out / "000003.png").write_bytes(bytes(flipped))
    mtimes = {f.name: f.stat().st_mtime_ns for f in out.glob("*.png")}

    with caplog.at_level(logging.WARNING, logger="scfm_diffusers.training.teacher_data"):
        generate_teacher_images(pipe, prompts, out, images_per_prompt=2, **settings)
    assert "3 teacher image(s)" in caplog.text and "000001.png, 000002.png, 000003.png" in caplog.text
    redone = {f.name for f in out.glob("*.png") if f.stat().st_mtime_ns != mtimes[f.name]}
    assert redone == {"000001.png", "000002.png", "000003.png"}
    for name, pixels in originals.items():  # regenerated from the same seeds: the same images
        assert np.array_equal(np.asarray(Image.open(out / name)), pixels), name
