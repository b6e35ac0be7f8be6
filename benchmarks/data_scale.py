"""Data at scale: training RAM against data-set size, cache bytes per sample, encoding with 1 vs 2 processes.

The text side has FLUX.1-dev's shapes (T5 ``d_model`` 4096, 256 tokens per caption: 2 MiB per caption in
bf16) on an otherwise tiny Flux pipeline, so memory behaves as it would with the real model's embeddings.

    # Peak RSS of a whole 2-step run of examples/train_scfm_lora.py (caching included) per data-set size:
    python benchmarks/data_scale.py rss --sizes 200 400 800 1600
    # The same for another checkout (e.g. the previous, in-RAM cache: git worktree add /tmp/old 77ba172):
    python benchmarks/data_scale.py rss --sizes 200 400 800 --checkout /tmp/old
    # Caching throughput: 1 process (all cores) against 2 processes (one core each) on the same data:
    python benchmarks/data_scale.py encode --num_images 400
    # What verification costs: checksums of a FLUX.1-dev-shaped cache (page cache warm and cold), the reuse
    # path of build_latent_cache, the hashes compared, and the teacher PNG check at 1024²:
    python benchmarks/data_scale.py verify --num_images 400

Each run is its own subprocess; its peak RSS comes from ``wait4`` (the kernel's high-water mark of that
process). ``rss`` runs the script twice per size: the first run builds the cache (``peak_rss_mib``), the
second reuses it, so its peak is the training's alone (``peak_rss_mib_cached``). Results are printed as a
Markdown table and written as JSON (``--output``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
RESOLUTION = 32
T5_TOKENS = 256


def make_pipeline(folder: Path) -> str:
    """A tiny Flux pipeline whose T5 (and the transformer's joint_attention_dim) is 4096 wide, like FLUX.1-dev."""
    from scfm_diffusers.testing import TinyModelConfig, save_tiny_pipeline

    return save_tiny_pipeline("flux", folder, TinyModelConfig(t5_dim=4096, text_layers=1))


def make_images(folder: Path, count: int, seed: int = 0) -> Path:
    """``count`` random 40×36 PNGs with unique ~60-character captions and a metadata.jsonl."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    words = ["red", "blue", "small", "large", "cat", "dog", "house", "tree", "river", "cloud", "old", "bright"]
    lines = []
    for index in range(count):
        Image.fromarray(rng.integers(0, 256, (36, 40, 3), dtype=np.uint8)).save(folder / f"{index:06d}.png")
        caption = f"photo {index}: " + " ".join(rng.choice(words, 8))
        lines.append(json.dumps({"file_name": f"{index:06d}.png", "text": caption}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def run_measured(command: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """Run ``command``; return (peak RSS in MiB, wall seconds, log tail). Fails loudly on a non-zero exit."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - start
        log.seek(0)
        text = log.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(command[:3])} ... failed:\n{text[-4000:]}")
    return usage.ru_maxrss / 1024, seconds, text[-2000:]


def base_env(threads: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    return env


def rss(args: argparse.Namespace) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(dir=args.work_dir) as work:
        work = Path(work)
        pipeline = make_pipeline(work / "pipeline")
        for size in args.sizes:
            data = make_images(work / f"data_{size}", size)
            out = work / f"out_{size}"
            script = (args.checkout or REPO) / "examples" / "train_scfm_lora.py"
            command = [
                sys.executable, str(script),
                "--pretrained_model_name_or_path", pipeline,
                "--train_data_dir", str(data),
                "--output_dir", str(out),
                "--resolution", str(RESOLUTION),
                "--max_sequence_length", str(T5_TOKENS),
                "--train_batch_size", "8",
                "--max_train_steps", "2",
                "--checkpointing_steps", "1000",
                "--rank", "4", "--lora_alpha", "4",
                "--teacher_grid_size_min", "4", "--teacher_grid_size_max", "4",
                "--report_to", "none",
            ]  # fmt: skip
            env = base_env(2)
            if args.checkout:  # that checkout's package, not the installed one
                env["PYTHONPATH"] = str(args.checkout / "src")
            peak, seconds, _ = run_measured(command, env)
            peak_cached, _, _ = run_measured(command, env)
            cache_bytes = sum(p.stat().st_size for p in (out / "cache").rglob("*") if p.is_file())
            rows.append(
                {
                    "samples": size,
                    "peak_rss_mib": round(peak, 1),
                    "peak_rss_mib_cached": round(peak_cached, 1),
                    "cache_mib_per_sample": round(cache_bytes / size / 2**20, 3),
                    "seconds": round(seconds, 1),
                    "code": str(args.checkout or "this checkout"),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
            if not args.keep:
                subprocess.run(["rm", "-rf", str(data), str(out)], check=True)
    return rows


def encode(args: argparse.Namespace) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(dir=args.work_dir) as work:
        work = Path(work)
        pipeline = make_pipeline(work / "pipeline")
        data = make_images(work / "data", args.num_images)
        setups = [("1 process × 2 threads", 1, 2), ("1 process × 1 thread", 1, 1), ("2 processes × 1 thread", 2, 1)]
        for label, processes, threads in setups:
            cache = work / f"cache_{processes}_{threads}"
            launcher = ["--cpu", "--num_processes", "1"]
            env = base_env(threads)
            if processes > 1:
                launcher = ["--multi_gpu", "--num_processes", str(processes)]
                env["ACCELERATE_USE_CPU"] = "true"
            command = [ACCELERATE, "launch", *launcher, "--num_machines", "1", "--mixed_precision", "no"]
            command += [__file__, "_encode_worker", "--pipeline", pipeline, "--data", str(data), "--cache", str(cache)]
            _, _, log = run_measured(command, env)
            result = json.loads(next(line for line in log.splitlines() if line.startswith("{")))
            rows.append({"setup": label, **result})
            print(json.dumps(rows[-1]), flush=True)
    base = rows[0]["images_per_second"]
    for row in rows:
        row["speedup_vs_1_process"] = round(row["images_per_second"] / base, 2)
    return rows


def encode_worker(args: argparse.Namespace) -> None:
    """Run inside `accelerate launch`: build the cache of --data with this launch's processes; time it."""
    import torch
    from accelerate import PartialState
    from diffusers import FluxPipeline

    from scfm_diffusers.families import get_family
    from scfm_diffusers.training.cache import build_latent_cache
    from scfm_diffusers.training.data import ImageCaptionPreprocessor, load_image_caption_dataset

    state = PartialState()
    pipe = FluxPipeline.from_pretrained(args.pipeline)
    family = get_family("flux")
    with state.main_process_first():
        dataset = load_image_caption_dataset(train_data_dir=args.data)
    samples = ImageCaptionPreprocessor(RESOLUTION, center_crop=True)(dataset)
    state.wait_for_everyone()
    start = time.perf_counter()
    cache = build_latent_cache(
        samples,
        args.cache,
        settings={"benchmark": True},
        encode_images=lambda pixels, generators: family.encode_images(pipe.vae, pixels, generator=generators),
        encode_prompts=lambda prompts: family.encode_prompts(pipe, prompts, T5_TOKENS),
        batch_size=8,
        shard_size=32,
        dtype=torch.bfloat16,
        show_progress=False,
    )
    seconds = time.perf_counter() - start
    if state.is_main_process:
        rate = round(len(cache) / seconds, 1)
        print(json.dumps({"images": len(cache), "seconds": round(seconds, 2), "images_per_second": rate}))


def _drop_page_cache(files: list[Path]) -> None:
    """Evict ``files`` from the page cache (posix_fadvise DONTNEED; no root needed), so the next read is cold."""
    os.sync()
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def _timed(function, repeat: int = 1) -> float:
    """Best wall time of ``repeat`` calls of ``function``."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best


def verify(args: argparse.Namespace) -> list[dict]:
    import hashlib

    import PIL.Image
    import PIL.PngImagePlugin
    import torch
    import xxhash
    from diffusers import FluxPipeline

    from scfm_diffusers.families import get_family
    from scfm_diffusers.training.cache import LatentCache, build_latent_cache, components_fingerprint, file_checksum
    from scfm_diffusers.training.data import ImageCaptionPreprocessor, load_image_caption_dataset
    from scfm_diffusers.training.teacher_data import PNG_SETTINGS_KEY, _settings_of_png

    torch.set_num_threads(2)
    rows = []
    with tempfile.TemporaryDirectory(dir=args.work_dir) as work:
        work = Path(work)
        pipe = FluxPipeline.from_pretrained(make_pipeline(work / "pipeline"))
        family = get_family("flux")
        dataset = load_image_caption_dataset(train_data_dir=make_images(work / "data", args.num_images))
        samples = ImageCaptionPreprocessor(RESOLUTION, center_crop=True)(dataset)
        directory = work / "cache"

        def build():
            return build_latent_cache(
                samples,
                directory,
                settings={"benchmark": True},
                encode_images=lambda pixels, generators: family.encode_images(pipe.vae, pixels, generator=generators),
                encode_prompts=lambda prompts: family.encode_prompts(pipe, prompts, T5_TOKENS),
                batch_size=8,
                shard_size=32,
                show_progress=False,
            )

        build_seconds = _timed(build)
        files = sorted(directory.glob("*.safetensors"))
        gib = sum(f.stat().st_size for f in files) / 2**30

        def row(what: str, seconds: float, note: str = "") -> None:
            rows.append({"what": what, "seconds": round(seconds, 3), "GiB/s": round(gib / seconds, 2), "note": note})
            print(json.dumps(rows[-1]), flush=True)

        rows.append({"what": f"build ({args.num_images} images, {len(files)} files)", "seconds": round(build_seconds, 1),
                     "GiB/s": "", "note": f"{gib:.3f} GiB of shards; checksums computed while writing"})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
        buffer = bytearray(8 * 2**20)

        def digest_all(make) -> None:  # as file_checksum does it: 8 MiB chunks into one buffer
            for file in files:
                digest = make()
                with open(file, "rb", buffering=0) as handle:
                    while count := handle.readinto(buffer):
                        digest.update(memoryview(buffer)[:count])

        for name, make in (("sha256", hashlib.sha256), ("blake2b", hashlib.blake2b), ("xxh3_128", xxhash.xxh3_128)):
            row(f"hash every shard: {name} (page cache warm)", _timed(lambda make=make: digest_all(make), 3))
        row(
            "file_checksum of every shard (warm)",
            _timed(lambda: [file_checksum(f) for f in files], 3),
            "= cost added to a build",
        )
        row("LatentCache(verify=False): sizes only", _timed(lambda: LatentCache(directory, verify=False), 3))
        row("LatentCache(verify=True), warm", _timed(lambda: LatentCache(directory), 3))
        cold = []
        for _ in range(3):
            _drop_page_cache(files)
            cold.append(_timed(lambda: LatentCache(directory)))
        row("LatentCache(verify=True), cold (fadvise DONTNEED)", min(cold), "disk-bound")
        row("build_latent_cache on the finished cache (warm)", _timed(build, 3), "verify + open: every run's cost")

        # components_fingerprint reads every file of the VAE and text encoders (FLUX.1-dev: 9.9 GB); here a
        # folder holding --weights_gib of random weights bytes stands for them.
        base = work / "base"
        (base / "text_encoder_2").mkdir(parents=True)
        (base / "model_index.json").write_text(json.dumps({"text_encoder_2": ["transformers", "T5EncoderModel"]}))
        weights = base / "text_encoder_2" / "model.safetensors"
        with open(weights, "wb") as handle:
            for _ in range(int(args.weights_gib * 4)):
                handle.write(os.urandom(2**28))
        weights_gib = weights.stat().st_size / 2**30
        for label, cold_read in (("warm", False), ("cold (fadvise DONTNEED)", True)):
            times = []
            for _ in range(3):
                if cold_read:
                    _drop_page_cache([weights])
                times.append(_timed(lambda: components_fingerprint(base)))
            rows.append({"what": f"components_fingerprint of {weights_gib:.1f} GiB of weights, {label}",
                         "seconds": round(min(times), 3), "GiB/s": round(weights_gib / min(times), 2), "note": ""})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)

        # The teacher image check: PIL's verify (chunk CRCs, no decoding) against decoding, 1024² PNGs.
        rng = np.random.default_rng(0)
        info = PIL.PngImagePlugin.PngInfo()
        info.add_text(PNG_SETTINGS_KEY, json.dumps({"prompt": "x", "seed": 0}))
        pngs = []
        for index in range(args.num_pngs):
            ramp = np.linspace(0, 255, 1024)[None, :, None] + rng.normal(0, 20, (1024, 1024, 3))
            pngs.append(work / f"teacher_{index}.png")
            PIL.Image.fromarray(ramp.clip(0, 255).astype(np.uint8)).save(pngs[-1], pnginfo=info)
        check = _timed(lambda: [_settings_of_png(p) for p in pngs], 3) / len(pngs)
        decode = _timed(lambda: [PIL.Image.open(p).load() for p in pngs], 3) / len(pngs)
        rows.append({"what": "teacher PNG check, per 1024² image", "seconds": round(check, 4), "GiB/s": "",
                     "note": f"decoding it instead: {decode:.4f} s"})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_rss = sub.add_parser("rss", help="peak RSS of a short training run against data-set size")
    p_rss.add_argument("--sizes", type=int, nargs="+", default=[200, 400, 800, 1600])
    p_rss.add_argument("--checkout", type=Path, default=None, help="measure another checkout's script and package")
    p_rss.add_argument("--keep", action="store_true", help="keep the data and output folders")
    p_enc = sub.add_parser("encode", help="caching throughput with 1 and 2 processes")
    p_enc.add_argument("--num_images", type=int, default=400)
    for p in (p_rss, p_enc):
        p.add_argument("--work_dir", default=None, help="where temporary data goes (needs ~2.2 MiB per sample)")
        p.add_argument("--output", type=Path, default=None, help="write the rows as JSON here")
    p_ver = sub.add_parser("verify", help="what checking the cache's checksums costs (and the teacher PNG check)")
    p_ver.add_argument("--num_images", type=int, default=400)
    p_ver.add_argument("--num_pngs", type=int, default=20)
    p_ver.add_argument("--weights_gib", type=float, default=2.0, help="size of the weights hashed by content")
    p_ver.add_argument("--work_dir", default=None)
    p_ver.add_argument("--output", type=Path, default=None)
    p_worker = sub.add_parser("_encode_worker")
    p_worker.add_argument("--pipeline", required=True)
    p_worker.add_argument("--data", required=True)
    p_worker.add_argument("--cache", required=True)
    args = parser.parse_args()

    if args.command == "_encode_worker":
        encode_worker(args)
        return
    rows = {"rss": rss, "encode": encode, "verify": verify}[args.command](args)
    keys = list(rows[0])
    print("\n| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(str(row[k]) for k in keys) + " |")
    if args.output:
        args.output.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
