"""The video data side: real clips written with PyAV (frame index coded in the pixels), a tiny real Wan VAE."""

import argparse
import json
import logging
import subprocess
import sys
import textwrap

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from scfm_diffusers.training.cache import CorruptCacheError, LatentCache, build_latent_cache
from scfm_diffusers.training.config import parse_args
from scfm_diffusers.training.data import (
    SkippedImage,
    StreamingBatches,
    folder_media_kind,
    load_image_caption_dataset,
    row_generator,
)
from scfm_diffusers.training.prepare import _trains_on_clips
from scfm_diffusers.training.video import (
    ClipInfo,
    ClipTooShortError,
    VideoCaptionPreprocessor,
    load_video_caption_dataset,
    probe_clip,
    read_clip,
)

av = pytest.importorskip("av")

FPS, FRAMES, WIDTH, HEIGHT = 8, 24, 40, 32


def _encoder(*names: str) -> str | None:
    for name in names:
        try:
            av.codec.Codec(name, "w")
            return name
        except (av.FFmpegError, ValueError):
            continue
    return None


CODECS = {  # container suffix -> an encoder this PyAV wheel has
    ".mp4": _encoder("libx264", "libopenh264", "mpeg4"),
    ".webm": _encoder("libvpx-vp9", "libvpx"),
    ".mkv": _encoder("ffv1"),  # lossless: exact pixel values
}


def write_clip(path, frames, fps=FPS):
    """Encode RGB uint8 ``frames`` (each ``(H, W, 3)``) into ``path``; its suffix picks the codec."""
    codec = CODECS[path.suffix]
    if codec is None:
        pytest.skip(f"this PyAV has no {path.suffix} encoder")
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "bgr0" if codec == "ffv1" else "yuv420p"
        if codec != "ffv1":
            stream.codec_context.gop_size = 4  # key frames every 4 frames: a window start really seeks
            stream.bit_rate = 4_000_000
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def gray_frames(n=FRAMES, size=(HEIGHT, WIDTH)):
    """Frame i is flat gray 10·i (robust to lossy codecs)."""
    return [np.full((*size, 3), 10 * i, np.uint8) for i in range(n)]


def pattern_frames(n=FRAMES):
    """Frame i: red 10·i everywhere, green 6·column, blue 7·row (the crop shows in green and blue)."""
    frames = []
    for i in range(n):
        frame = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
        frame[..., 0] = 10 * i
        frame[..., 1] = 6 * np.arange(WIDTH)[None, :]
        frame[..., 2] = 7 * np.arange(HEIGHT)[:, None]
        frames.append(frame)
    return frames


def frame_indices(pixels):
    """The source frame of each output frame of a ``(3, F, H, W)`` clip of :func:`gray_frames` (red channel)."""
    return [round(v) for v in ((pixels[0].mean((1, 2)) + 1) * 127.5 / 10).tolist()]


def to_uint8(pixels):
    return ((pixels + 1) * 127.5).round().to(torch.uint8)


# --- decoding ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".mp4", ".webm", ".mkv"])
def test_probe_reads_frames_rate_size_and_duration(tmp_path, suffix):
    clip = write_clip(tmp_path / f"clip{suffix}", gray_frames())  # WebM / Matroska store no frame count
    assert probe_clip(clip) == ClipInfo(frames=24, fps=8.0, width=40, height=32, duration=3.0)


@pytest.mark.parametrize("suffix", [".mp4", ".webm", ".mkv"])
def test_fps_resampling_picks_the_nearest_frame_of_each_target_time(tmp_path, suffix):
    clip = write_clip(tmp_path / f"clip{suffix}", gray_frames())

    def picks(num_frames, fps=None, **kwargs):
        pixels = read_clip(clip, num_frames=num_frames, fps=fps, height=16, width=16, **kwargs)
        assert pixels.shape == (3, num_frames, 16, 16) and pixels.dtype == torch.float32
        assert pixels.min() >= -1 and pixels.max() <= 1
        return frame_indices(pixels)

    assert picks(24) == list(range(24))  # the clip's own rate: consecutive frames, the whole clip
    assert picks(12, fps=4) == list(range(0, 24, 2))  # half the rate: every other frame
    assert picks(7, fps=6) == [0, 1, 3, 4, 5, 7, 8]  # k/6 s -> nearest of i/8 s
    assert picks(9, fps=16) == [0, 0, 1, 1, 2, 2, 3, 3, 4]  # above the clip's rate: ties go to the earlier frame
    assert picks(5, fps=4, start=1.0) == [8, 10, 12, 14, 16]  # seeks to the key frame before 1 s
    assert picks(8, start="center") == list(range(8, 16))  # 2 s of slack: starts at 1 s
    assert picks(12, fps=4, start="center") == list(range(0, 24, 2))  # exactly fits: no slack
    random = [picks(6, fps=4, start="random", generator=torch.Generator().manual_seed(s)) for s in range(6)]
    assert all(np.all(np.diff(r) == 2) and r[-1] <= 23 for r in random)
    assert len({r[0] for r in random}) > 1
    with pytest.raises(ValueError, match="outside"):
        picks(12, fps=4, start=0.5)


def test_the_same_crop_and_flip_for_every_frame_of_a_clip(tmp_path):
    clip = write_clip(tmp_path / "pattern.mkv", pattern_frames())  # lossless: exact values
    # 40×32 frames into 24 wide × 32 high: no resize, the crop's left offset is 0..16 and shows in green (6·x).
    centre = to_uint8(read_clip(clip, num_frames=6, height=32, width=24, center_crop=True))
    assert torch.equal(centre[1, 0, 0], torch.tensor([6 * (8 + x) for x in range(24)], dtype=torch.uint8))
    assert torch.equal(centre[0, :, 0, 0], torch.tensor([10 * i for i in range(6)], dtype=torch.uint8))

    lefts, flips = set(), set()
    for seed in range(12):
        pixels = to_uint8(
            read_clip(
                clip,
                num_frames=6,
                height=32,
                width=24,
                center_crop=False,
                start="random",
                random_flip=True,
                generator=torch.Generator().manual_seed(seed),
            )
        )
        assert all(torch.equal(pixels[1:, f], pixels[1:, 0]) for f in range(6))  # one box, one flip, all frames
        green = pixels[1, 0, 0].long()
        flipped = bool(green[0] > green[-1])
        unflipped = green.flip(0) if flipped else green
        left = int(unflipped[0]) // 6
        assert torch.equal(unflipped, (torch.arange(24) + left) * 6)  # a plain crop of the frame
        flips.add(flipped)
        lefts.add(left)
    assert len(lefts) > 2 and flips == {True, False}
    assert all(0 <= left <= 16 for left in lefts)


def test_a_clip_too_short_names_the_file_its_frames_and_the_fix(tmp_path):
    clip = write_clip(tmp_path / "short.mp4", gray_frames())
    with pytest.raises(ClipTooShortError) as info:
        read_clip(clip, num_frames=13, fps=4, height=16, width=16)
    message = str(info.value)
    for part in (
        str(clip),
        "24 frames at 8 fps (3.00 s)",
        "13 frames at 4 fps",
        "need 25",
        "--num_frames",
        "--video_fps",
    ):
        assert part in message
    assert read_clip(clip, num_frames=12, fps=4, height=16, width=16).shape[1] == 12  # 12 fit exactly

    # In a data set the clip is skipped and counted, like a broken image.
    skipped = VideoCaptionPreprocessor(16, num_frames=13, fps=4).process(str(clip), "a caption", 7)
    assert isinstance(skipped, SkippedImage) and skipped.reason == "too short" and skipped.index == 7
    assert skipped.source == str(clip) and "need 25" in skipped.error


def test_decoding_needs_pyav_and_says_how_to_install_it(tmp_path, monkeypatch):
    clip = write_clip(tmp_path / "clip.mkv", gray_frames(4))
    monkeypatch.setitem(sys.modules, "av", None)  # as if it were not installed
    with pytest.raises(ImportError, match=r'pip install "scfm-diffusers\[video\]"'):
        read_clip(clip, num_frames=2, height=8, width=8)


MEMORY_PROBE = textwrap.dedent(
    """
    import gc, json, sys
    import av, torch
    from scfm_diffusers.training.video import read_clip

    def status_mib(field):  # this process's own figures (ru_maxrss would include the parent's peak: exec keeps it)
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) / 1024 for line in status if line.startswith(field))

    def peak_growth(decode):
        gc.collect()
        with open("/proc/self/clear_refs", "w") as clear:  # the peak (VmHWM) restarts from the current RSS
            clear.write("5")
        before = status_mib("VmRSS:")
        decode()
        return status_mib("VmHWM:") - before

    def window(path):
        return read_clip(path, num_frames=9, height=64, width=64, start="center")

    def every_frame(path):  # what a decoder that keeps the whole clip holds
        with av.open(path) as container:
            return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]

    short, long = sys.argv[1:3]
    window(short)  # warm up: libraries, codec, allocator
    growth = {
        "short": peak_growth(lambda: window(short)),
        "long": peak_growth(lambda: window(long)),
        "all": peak_growth(lambda: every_frame(long)),  # last: it frees more than the others could reuse
    }
    print(json.dumps(growth))
    """
)


def test_decoding_memory_does_not_grow_with_the_clip(tmp_path):
    """Peak RSS growth: a 600-frame clip costs what a 60-frame one does, while holding its decoded frames would
    take 600 × 256² × 3 bytes = 112 MiB (measured too, so the probe is seen to work). In a fresh process, whose
    allocator holds no freed memory that could hide an allocation."""
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
    except OSError:
        pytest.skip("needs Linux's /proc/self/clear_refs to measure a peak")
    codec = _encoder("libx264", "mpeg4")
    if codec is None:
        pytest.skip("no H.264 / MPEG-4 encoder")
    y, x = np.mgrid[:256, :256]
    paths = []
    for count in (60, 600):
        paths.append(tmp_path / f"{count}.mp4")
        with av.open(str(paths[-1]), "w") as container:
            stream = container.add_stream(codec, rate=24)
            stream.width = stream.height = 256
            stream.pix_fmt = "yuv420p"
            if codec == "libx264":
                stream.options = {"preset": "ultrafast"}
            for i in range(count):
                frame = np.stack([(x + 3 * i) % 256, (y + 5 * i) % 256, np.full_like(x, 7 * i % 256)], -1)
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame.astype(np.uint8), format="rgb24")))
            container.mux(stream.encode())

    run = subprocess.run([sys.executable, "-c", MEMORY_PROBE, *map(str, paths)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    growth = json.loads(run.stdout.strip().splitlines()[-1])
    all_frames_mib = 600 * 256 * 256 * 3 / 2**20
    assert growth["all"] > 0.7 * all_frames_mib, growth  # the probe sees frames that are held
    assert growth["long"] < growth["short"] + 0.15 * all_frames_mib, growth


# --- data sets, preprocessing, cache, stream -------------------------------------------------------------


def write_clip_folder(folder):
    """Three usable clips (mp4, webm, mkv), one too short, one broken; captions "clip <i>"."""
    folder.mkdir(parents=True, exist_ok=True)
    write_clip(folder / "0.mp4", gray_frames())
    write_clip(folder / "1.webm", gray_frames()[::-1])
    write_clip(folder / "2.mkv", pattern_frames())
    write_clip(folder / "3.mp4", gray_frames(4))  # 0.5 s: too short for 5 frames at 4 fps
    (folder / "4.mkv").write_bytes(b"not a video")
    names = ["0.mp4", "1.webm", "2.mkv", "3.mp4", "4.mkv"]
    rows = [{"file_name": name, "text": f"clip {i}"} for i, name in enumerate(names)]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


@pytest.fixture(scope="module")
def vae():
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    return AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    ).eval()


class WanEncoders:
    """The tiny Wan VAE, normalised as Wan does: (z − latents_mean) · (1 / latents_std); records its inputs."""

    def __init__(self, vae):
        self.vae, self.pixels = vae, []
        shape = (1, -1, 1, 1, 1)
        self.mean = torch.tensor(vae.config.latents_mean).view(shape)
        self.inv_std = 1 / torch.tensor(vae.config.latents_std).view(shape)

    def images(self, pixels, generators):
        assert pixels.ndim == 5 and pixels.shape[1] == 3  # (B, 3, F, H, W)
        self.pixels.append(pixels.clone())
        with torch.no_grad():  # one clip at a time: each row's latent does not depend on its batch
            z = torch.cat([self.vae.encode(p[None]).latent_dist.sample(g) for p, g in zip(pixels, generators)])
        return (z - self.mean) * self.inv_std

    @staticmethod
    def prompts(captions):
        return {"prompt_embeds": torch.stack([torch.full((4, 8), float(sum(map(ord, c)))) for c in captions])}


def build(samples, directory, encoders, **kwargs):
    return build_latent_cache(
        samples,
        directory,
        settings={"model": "tiny-wan", "num_frames": samples.preprocessor.num_frames, "video_fps": 4},
        encode_images=encoders.images,
        encode_prompts=encoders.prompts,
        **{"batch_size": 2, "shard_size": 2, "dtype": torch.float32, "show_progress": False, **kwargs},
    )


def test_a_clip_folder_is_cached_like_images_and_rows_equal_a_direct_encode(vae, tmp_path, caplog):
    folder = write_clip_folder(tmp_path / "clips")
    assert folder_media_kind(folder) == "video"
    dataset = load_video_caption_dataset(train_data_dir=folder)
    assert len(dataset) == 5 and dataset.column_names == ["video", "text"]
    samples = VideoCaptionPreprocessor(16, num_frames=5, fps=4, random_flip=True, seed=3)(dataset)
    encoders = WanEncoders(vae)
    with caplog.at_level(logging.WARNING):
        cache = build(samples, tmp_path / "cache", encoders)

    # The short and the broken clip are skipped, named and counted; the others are cached as (C, F', h, w).
    assert len(cache) == 3 and [cache.caption(i) for i in range(3)] == ["clip 0", "clip 1", "clip 2"]
    skipped = {s["source"].rsplit("/", 1)[-1]: s["reason"] for s in cache.index["skipped"]}
    assert skipped == {"3.mp4": "too short", "4.mkv": "unreadable"}
    assert "3.mp4" in caplog.text and "4.mkv" in caplog.text
    assert cache.skipped_summary().startswith("Skipped 2 of 5 clips (1 too short, 1 unreadable)")
    assert all(batch.shape[0] <= 2 for batch in encoders.pixels)  # one batch of decoded clips at a time
    for row in range(3):
        sample = samples.sample(row)
        assert sample.pixel_values.shape == (3, 5, 16, 16)
        direct = encoders.images(sample.pixel_values[None], [row_generator(3, row, 2)])[0]
        assert cache[row]["latents"].shape == (16, 2, 2, 2)  # Wan: (5 − 1) / 4 + 1 latent frames, 16 / 8 px
        torch.testing.assert_close(cache[row]["latents"], direct, rtol=0, atol=0)
    batch = LatentCache.collate([cache[0], cache[2]])
    assert batch["latents"].shape == (2, 16, 2, 2, 2) and batch["prompt_embeds"].shape == (2, 4, 8)


def test_a_reopened_video_cache_verifies_its_shards_and_a_corrupted_one_is_rebuilt(vae, tmp_path, caplog):
    folder = write_clip_folder(tmp_path / "clips")
    samples = VideoCaptionPreprocessor(16, num_frames=5, fps=4, seed=3)(
        load_video_caption_dataset(train_data_dir=folder)
    )
    first = build(samples, tmp_path / "cache", WanEncoders(vae))
    latents = [first[i]["latents"] for i in range(len(first))]
    reopened = LatentCache(tmp_path / "cache")  # every shard's checksum checked
    assert all(torch.equal(latents[i], reopened[i]["latents"]) for i in range(len(first)))

    shard = tmp_path / "cache" / "images-00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(CorruptCacheError, match=r"images-00000.safetensors is broken: its bytes changed"):
        LatentCache(tmp_path / "cache")
    encoders = WanEncoders(vae)
    with caplog.at_level(logging.WARNING, logger="scfm_diffusers.training.cache"):
        healed = build(samples, tmp_path / "cache", encoders)
    assert "failed verification" in caplog.text and len(encoders.pixels) == 1  # that shard alone, re-encoded
    assert all(torch.equal(latents[i], healed[i]["latents"]) for i in range(len(first)))


def test_streaming_yields_the_pixels_the_cache_encodes(vae, tmp_path):
    folder = write_clip_folder(tmp_path / "clips")
    preprocessor = VideoCaptionPreprocessor(16, num_frames=5, fps=4, random_flip=True, seed=3)
    encoders = WanEncoders(vae)
    build(preprocessor(load_video_caption_dataset(train_data_dir=folder)), tmp_path / "cache", encoders)
    cached = torch.cat(encoders.pixels)

    stream = StreamingBatches(
        load_video_caption_dataset(train_data_dir=folder, streaming=True), preprocessor, batch_size=1
    )
    batches = list(stream)
    assert [b["captions"] for b in batches] == [["clip 0"], ["clip 1"], ["clip 2"]]
    assert stream.num_skipped == 2 and batches[-1]["num_rows"] == 3
    assert torch.equal(torch.cat([b["pixel_values"] for b in batches]), cached)

    # The same through --dataset_name: the local clip folder (WebM included), streamed.
    named = StreamingBatches(
        load_video_caption_dataset(dataset_name=str(folder), streaming=True), preprocessor, batch_size=3
    )
    (batch,) = list(named)
    assert batch["pixel_values"].shape == (3, 3, 5, 16, 16) and torch.equal(batch["pixel_values"], cached)


def test_a_video_column_of_paths_or_bytes_and_a_parquet_data_set_give_the_folder_pixels(tmp_path):
    folder = write_clip_folder(tmp_path / "clips")
    names, captions = ["0.mp4", "1.webm", "2.mkv"], ["clip 0", "clip 1", "clip 2"]
    preprocessor = VideoCaptionPreprocessor(16, num_frames=5, fps=4, seed=1)
    expected = [s.pixel_values for s in list(preprocessor(load_video_caption_dataset(train_data_dir=folder)))[:3]]

    paths = datasets.Dataset.from_dict({"video": [str(folder / n) for n in names], "text": captions})
    blobs = datasets.Dataset.from_dict({"clip": [(folder / n).read_bytes() for n in names], "text": captions})
    blobs.to_parquet(str(tmp_path / "clips.parquet"))
    parquet = load_video_caption_dataset(
        dataset_name="parquet",
        data_files=str(tmp_path / "clips.parquet"),
        video_column="clip",
        cache_dir=tmp_path / "hf",
    )
    by_bytes = VideoCaptionPreprocessor(16, num_frames=5, fps=4, seed=1, video_column="clip")
    for dataset, chosen in ((paths, preprocessor), (blobs, by_bytes), (parquet, by_bytes)):
        pixels = [s.pixel_values for s in chosen(dataset)]
        assert len(pixels) == 3 and all(torch.equal(a, b) for a, b in zip(pixels, expected))
    with pytest.raises(ValueError, match="Set --video_column"):
        load_video_caption_dataset(
            dataset_name="parquet", data_files=str(tmp_path / "clips.parquet"), cache_dir=tmp_path / "hf"
        )


def test_folders_hold_one_kind_and_the_wrong_loader_says_what_to_do(tmp_path):
    clips = write_clip_folder(tmp_path / "clips")
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (8, 8)).save(images / "0.png")
    (images / "metadata.jsonl").write_text(json.dumps({"file_name": "0.png", "text": "x"}) + "\n")

    assert folder_media_kind(images) == "image" and folder_media_kind(tmp_path / "clips" / "missing") is None
    with pytest.raises(ValueError, match="holds video clips: give --num_frames"):
        load_image_caption_dataset(train_data_dir=clips)
    with pytest.raises(ValueError, match="holds images.*without --num_frames"):
        load_video_caption_dataset(train_data_dir=images)
    (images / "stray.mov").write_bytes(b"")
    with pytest.raises(ValueError, match="both images .*0.png.* and video clips .*stray.mov"):
        folder_media_kind(images)
    (clips / "metadata.jsonl").unlink()
    with pytest.raises(ValueError, match='metadata.jsonl.*"file_name": "0001.mp4"'):
        load_video_caption_dataset(train_data_dir=clips)


def test_the_training_script_routes_clips_by_the_folder_and_checks_the_flags(tmp_path):
    clips = write_clip_folder(tmp_path / "clips")
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (8, 8)).save(images / "0.png")

    def route(folder=None, num_frames=None, dataset_name=None):
        args = argparse.Namespace(num_frames=num_frames, dataset_name=dataset_name, data_files=None)
        return _trains_on_clips(args, folder)

    assert route(clips, 5) and route(clips, 1) and route(None, 5, dataset_name=str(clips))
    assert not route(images) and not route(images, 1) and not route(None, None, "user/hub-images")
    assert route(None, 81, "user/hub-videos")  # not a folder: --num_frames > 1 means clips
    with pytest.raises(ValueError, match="holds video clips: give --num_frames"):
        route(clips)
    with pytest.raises(ValueError, match="holds images, not video clips: --num_frames 5"):
        route(images, 5)

    base = ["--pretrained_model_name_or_path", "x", "--train_data_dir", str(clips)]
    args = parse_args([*base, "--num_frames", "81", "--video_fps", "16"])
    assert (args.num_frames, args.video_fps, args.video_column) == (81, 16.0, "video")
    assert parse_args(base).num_frames is None  # image data by default
    for bad in (["--num_frames", "0"], ["--video_fps", "0"]):
        with pytest.raises(SystemExit):
            parse_args([*base, *bad])
