"""Data at scale: training RAM against data-set size, cache bytes per sample, encoding with 1 vs 2 processes.

The text side has FLUX.1-dev's shapes (T5 ``d_model`` 4096, 256 tokens per caption: 2 MiB per caption in
bf16) on an otherwise tiny Flux pipeline, so memory behaves as it would with the real model's embeddings.

    # Peak RSS of a whole 2-step run of examples/train_scfm_lora.py (caching included) per data-set size:
    python benchmarks/data_scale.py rss --sizes 200 400 800 1600
    # The same for another checkout (e.g. the previous, in-RAM cache: git worktree add /tmp/old 77ba172):
    python benchmarks/data_scale.py rss --sizes 200 400 800 --checkout /tmp/old
    # Caching throughput: 1 process (all cores) against 2 processes (one core each) on the same data:
    python benchmarks/data_scale.py encode --num_images 400

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
    p_worker = sub.add_parser("_encode_worker")
    p_worker.add_argument("--pipeline", required=True)
    p_worker.add_argument("--data", required=True)
    p_worker.add_argument("--cache", required=True)
    args = parser.parse_args()

    if args.command == "_encode_worker":
        encode_worker(args)
        return
    rows = rss(args) if args.command == "rss" else encode(args)
    keys = list(rows[0])
    print("\n| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(str(row[k]) for k in keys) + " |")
    if args.output:
        args.output.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
