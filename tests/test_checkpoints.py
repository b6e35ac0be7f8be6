"""Checkpoints that survive kills and refuse stale runs, and one run per output folder.

A real accelerator saves and restores a tiny Flux transformer's student LoRA and dual EMA through the real
hooks (:func:`register_checkpoint_hooks`, ``accelerator.save_state`` / ``load_state``); a kill during a save is
a hook that raises (or SIGKILLs its process) after the SCFM files are written and before accelerate's. The
script itself runs where the run record, the resume and the lock are wired through it.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from accelerate import Accelerator
from peft import LoraConfig

from scfm_diffusers.families import get_family
from scfm_diffusers.testing import tiny_pipeline
from scfm_diffusers.training import components
from scfm_diffusers.training.checkpoints import (
    checkpoint_to_resume,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    record_differences,
    register_checkpoint_hooks,
    save_checkpoint,
)
from scfm_diffusers.training.ema import DualLoraEMA, lora_parameters
from scfm_diffusers.training.lock import LOCK_FILE, acquire_lock, release_lock

TESTS = Path(__file__).resolve().parent
SCRIPT = TESTS.parent / "examples" / "train_scfm_lora.py"
RECORD = {"base_model": "tiny", "seed": 0, "objective": {"learning_rate": 1e-3, "grid": {"target_steps": [4]}}}


class Killed(Exception):
    """Stands for the process dying in the middle of a save."""


class Trainer:
    """A tiny Flux transformer with a student LoRA and dual EMA, an optimizer, and the real checkpoint hooks."""

    def __init__(self, record: dict = RECORD):
        torch.manual_seed(0)
        transformer = tiny_pipeline("flux").transformer
        lora = LoraConfig(r=2, lora_alpha=2, init_lora_weights="gaussian", target_modules=["to_q", "to_k"])
        transformer.add_adapter(lora, adapter_name="default")
        self.ema = DualLoraEMA(transformer, "default", fast_decay=0.5, slow_decay=0.9)
        self.params = lora_parameters(transformer, "default")
        self.accelerator = Accelerator()
        optimizer = torch.optim.AdamW(self.params.values(), lr=1e-2)
        self.model, self.optimizer = self.accelerator.prepare(transformer, optimizer)
        self.rng = torch.Generator().manual_seed(0)
        register_checkpoint_hooks(
            self.accelerator,
            transformer,
            self.ema,
            rng=self.rng,
            record=record,
            state={},
            write_adapter=lambda folder, lora_state_dict: None,
        )

    def step(self) -> None:
        loss = sum(((p - 1) ** 2).sum() for p in self.params.values())
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.ema.update()
        torch.rand(3, generator=self.rng)

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {
            **{f"student.{k}": p.detach().clone() for k, p in self.params.items()},
            **{k: v.clone() for k, v in self.ema.state_dict().items()},
            "rng": self.rng.get_state(),
        }

    def assert_state(self, expected: dict[str, torch.Tensor]) -> None:
        now = self.snapshot()
        assert now.keys() == expected.keys()
        for key, value in expected.items():
            assert torch.equal(now[key], value), key


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("checkpoint-"))


@pytest.fixture
def trainer():
    return Trainer()


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """4 random 40×36 PNGs with a metadata.jsonl of captions."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    rows = []
    for index in range(4):
        PIL.Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(folder / f"{index}.png")
        rows.append({"file_name": f"{index}.png", "text": f"a random picture number {index}"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


# ---------------------------------------------------------------------------------------------------------
# 1. A kill during a save keeps the previous checkpoint, even with --checkpoints_total_limit 1
# ---------------------------------------------------------------------------------------------------------
def test_a_kill_during_a_limit_1_rotation_keeps_the_previous_checkpoint(trainer, tmp_path, caplog):
    trainer.step()
    save_checkpoint(trainer.accelerator, tmp_path, 1, limit=1)
    at_step_1 = trainer.snapshot()
    trainer.step()

    def die(models, weights, folder):  # after the SCFM files, before accelerate's optimizer and RNG files
        raise Killed(folder)

    hook = trainer.accelerator.register_save_state_pre_hook(die)
    with pytest.raises(Killed):
        save_checkpoint(trainer.accelerator, tmp_path, 2, limit=1)
    hook.remove()
    assert names(tmp_path) == ["checkpoint-1", "checkpoint-2.partial"]
    assert (tmp_path / "checkpoint-2.partial" / "scfm_state.safetensors").is_file()  # killed mid-write
    with caplog.at_level(logging.INFO):
        checkpoint = checkpoint_to_resume(tmp_path, "latest")
    assert checkpoint == tmp_path / "checkpoint-1"
    assert "checkpoint-1, the newest complete checkpoint" in caplog.text
    assert load_checkpoint(trainer.accelerator, checkpoint) == 1
    trainer.assert_state(at_step_1)  # the student, both EMAs and the RNG of step 1, exactly

    # The next save replaces the partial folder, and only then rotates the old checkpoint out.
    trainer.step()
    save_checkpoint(trainer.accelerator, tmp_path, 2, limit=1)
    assert names(tmp_path) == ["checkpoint-2"]


@pytest.mark.slow
def test_a_sigkill_during_a_limit_1_rotation_keeps_the_previous_checkpoint(tmp_path):
    """The same with a real ``kill -9`` of a process in the middle of writing checkpoint-2.partial."""
    code = f"""
import os, signal, sys
sys.path.insert(0, {str(TESTS)!r})
from pathlib import Path
from test_checkpoints import Trainer
from scfm_diffusers.training.checkpoints import save_checkpoint
trainer = Trainer()
out = Path({str(tmp_path)!r})
trainer.step()
save_checkpoint(trainer.accelerator, out, 1, limit=1)
trainer.step()
trainer.accelerator.register_save_state_pre_hook(lambda *_: os.kill(os.getpid(), signal.SIGKILL))
save_checkpoint(trainer.accelerator, out, 2, limit=1)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    assert names(tmp_path) == ["checkpoint-1", "checkpoint-2.partial"]
    trainer = Trainer()
    assert load_checkpoint(trainer.accelerator, checkpoint_to_resume(tmp_path, "latest")) == 1


def test_a_checkpoint_saved_again_at_the_same_step_replaces_the_old_one(trainer, tmp_path):
    save_checkpoint(trainer.accelerator, tmp_path, 1)
    trainer.step()
    expected = trainer.snapshot()
    save_checkpoint(trainer.accelerator, tmp_path, 1)
    assert names(tmp_path) == ["checkpoint-1"]
    trainer.step()
    load_checkpoint(trainer.accelerator, tmp_path / "checkpoint-1")
    trainer.assert_state(expected)


def test_the_limit_counts_finished_checkpoints_and_never_removes_the_new_one(tmp_path):
    for name in ("checkpoint-2", "checkpoint-10", "checkpoint-12.partial", "checkpoint-notes", "checkpoint-3"):
        (tmp_path / name).mkdir()
    prune_checkpoints(tmp_path, limit=2, keep=tmp_path / "checkpoint-3")  # e.g. resumed from an older one
    assert names(tmp_path) == ["checkpoint-10", "checkpoint-12.partial", "checkpoint-3", "checkpoint-notes"]
    prune_checkpoints(tmp_path, limit=1)
    assert names(tmp_path) == ["checkpoint-10", "checkpoint-12.partial", "checkpoint-notes"]


# ---------------------------------------------------------------------------------------------------------
# 2. `latest`: the newest complete checkpoint, said which; an error when none is usable; renamed folders
# ---------------------------------------------------------------------------------------------------------
def test_latest_is_the_newest_complete_checkpoint(trainer, tmp_path, caplog):
    for step in (1, 2, 3, 4):
        trainer.step()
        save_checkpoint(trainer.accelerator, tmp_path, step)
        if step == 2:
            at_step_2 = trainer.snapshot()
    state = tmp_path / "checkpoint-4" / "scfm_state.safetensors"
    state.write_bytes(state.read_bytes()[:100])  # truncated (e.g. a copy that stopped)
    (tmp_path / "checkpoint-3" / "scfm_rng_0.pt").unlink()
    (tmp_path / "checkpoint-5.partial").mkdir()
    shutil.copytree(tmp_path / "checkpoint-1", tmp_path / "checkpoint-final")

    with caplog.at_level(logging.INFO):
        checkpoint = checkpoint_to_resume(tmp_path, "latest")
    assert checkpoint == latest_checkpoint(tmp_path) == tmp_path / "checkpoint-2"
    assert "checkpoint-2, the newest complete checkpoint" in caplog.text
    assert "checkpoint-4: scfm_state.safetensors is unreadable" in caplog.text
    assert "checkpoint-3: scfm_rng_0.pt is missing or empty" in caplog.text
    assert f"Ignoring {tmp_path / 'checkpoint-final'}: not named checkpoint-<step>" in caplog.text
    trainer.step()
    assert load_checkpoint(trainer.accelerator, checkpoint) == 2
    trainer.assert_state(at_step_2)
    with pytest.raises(ValueError, match=r"checkpoint-4 is not a usable checkpoint: scfm_state.safetensors is unread"):
        load_checkpoint(trainer.accelerator, tmp_path / "checkpoint-4")


def test_latest_errors_when_checkpoint_folders_exist_but_none_is_usable(trainer, tmp_path, caplog):
    assert checkpoint_to_resume(tmp_path, "latest") is None  # no checkpoint at all: a new run
    (tmp_path / "checkpoint-3.partial").mkdir()
    with caplog.at_level(logging.WARNING):
        assert checkpoint_to_resume(tmp_path, "latest") is None  # killed during its first save: a new run
    assert "only unfinished checkpoints (checkpoint-3.partial" in caplog.text

    save_checkpoint(trainer.accelerator, tmp_path, 2)
    (tmp_path / "checkpoint-2" / "scfm_run.json").write_text("")
    (tmp_path / "checkpoint-old").mkdir()
    with pytest.raises(ValueError) as error:
        checkpoint_to_resume(tmp_path, "latest")
    message = str(error.value)
    assert f"{tmp_path} holds checkpoint folders but none can be resumed from" in message
    assert "checkpoint-2: scfm_run.json is missing or empty" in message
    assert "checkpoint-old: not named checkpoint-<step>" in message
    assert "checkpoint-3.partial" not in message


def test_a_renamed_checkpoint_is_a_clear_error_not_an_attribute_error(trainer, tmp_path):
    final = save_checkpoint(trainer.accelerator, tmp_path, 2)
    renamed = final.rename(tmp_path / "checkpoint-final")
    with pytest.raises(ValueError, match=r"checkpoint-final: a checkpoint folder is named checkpoint-<step>.*Rename"):
        load_checkpoint(trainer.accelerator, renamed)


# ---------------------------------------------------------------------------------------------------------
# 3. The RNG file is read with weights_only=True: a crafted pickle runs no code
# ---------------------------------------------------------------------------------------------------------
class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_the_rng_file_is_loaded_without_running_pickled_code(trainer, tmp_path, monkeypatch):
    checkpoint = save_checkpoint(trainer.accelerator, tmp_path / "out", 1)
    marker = tmp_path / "code-ran"
    torch.save({"rng": _Payload(marker), "stream_rows": 0}, checkpoint / "scfm_rng_0.pt")
    # torch < 2.6 (setup.py allows 2.4) unpickled anything unless asked not to; this variable restores that default.
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_checkpoint(trainer.accelerator, checkpoint)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------------
# 4. The run record: what makes a run the same run, and the differing fields named
# ---------------------------------------------------------------------------------------------------------
def _record(train_script, base: str, data: Path, *extra: str) -> dict:
    argv = ["--pretrained_model_name_or_path", base, "--train_data_dir", str(data), "--rank", "4", *extra]
    args = train_script.parse_args(argv)
    family = get_family("flux")
    lora = LoraConfig(r=4, lora_alpha=args.lora_alpha, target_modules=["to_q", "to_k"])
    return components.run_record(args, family, lora)


def test_the_run_record_holds_seed_data_and_objective_by_content(
    train_script, saved_pipelines, image_folder, tmp_path, monkeypatch
):
    base = saved_pipelines["flux"]
    record = _record(train_script, base, image_folder)
    assert base not in json.dumps(record) and str(image_folder) not in json.dumps(record)  # no path is written

    # The same base and data through a symlink or a relative path: the same run.
    (tmp_path / "base-link").symlink_to(base)
    (tmp_path / "data-link").symlink_to(image_folder)
    monkeypatch.chdir(tmp_path)
    assert record_differences(record, _record(train_script, "base-link", Path("data-link"))) == []

    differences = record_differences(
        record,
        _record(
            train_script, base, image_folder,
            "--seed", "1", "--learning_rate", "2e-5", "--teacher_ratio", "0.5", "--slow_ema_decay", "0.99",
            "--guidance_scale", "3.5", "--train_batch_size", "2", "--max_train_samples", "4", "--resolution", "64",
        ),
    )  # fmt: skip
    assert differences == [
        "seed: 0 in the checkpoint, 1 now",
        "data.max_train_samples: null in the checkpoint, 4 now",
        "data.resolution: 512 in the checkpoint, 64 now",
        "objective.grid.teacher_ratio: 0.4 in the checkpoint, 0.5 now",
        "objective.conditioning.guidance_scale: null in the checkpoint, 3.5 now",
        "objective.slow_ema_decay: 0.999 in the checkpoint, 0.99 now",
        "objective.train_batch_size: 8 in the checkpoint, 2 now",
    ]
    assert "learning_rate" not in " ".join(differences)  # 2e-5 is the default

    # Other data: a caption changed, an image added.
    data = tmp_path / "data"
    shutil.copytree(image_folder, data)
    assert record_differences(record, _record(train_script, base, data)) == []
    metadata = data / "metadata.jsonl"
    metadata.write_text(metadata.read_text().replace("number 0", "number 9"))
    (changed,) = record_differences(record, _record(train_script, base, data))
    assert changed.startswith("data.train_data_dir: ")
    # Flags a resume may change are not part of the record.
    later = _record(train_script, base, image_folder, "--max_train_steps", "9", "--checkpointing_steps", "3")
    assert record_differences(record, later) == []


def test_record_differences_name_fields_absent_from_an_older_checkpoint():
    old = {"base_model": "tiny", "rank": 4}
    assert record_differences(old, {"base_model": "tiny", "rank": 4, "seed": 0}) == [
        "seed: absent (an older version wrote it?) in the checkpoint, 0 now"
    ]
    assert record_differences({"grid": {"steps": (3, 4)}}, {"grid": {"steps": [3, 4]}}) == []  # as JSON stores it


@pytest.mark.slow
def test_a_stale_run_is_refused_and_the_same_base_through_a_symlink_resumes(
    train_script, saved_pipelines, image_folder, tmp_path, monkeypatch
):
    out = tmp_path / "out"
    common = [
        "--train_data_dir", str(image_folder),
        "--output_dir", str(out),
        "--resolution", "32",
        "--max_sequence_length", "8",
        "--rank", "4",
        "--lora_alpha", "8",
        "--teacher_grid_size_min", "4",
        "--teacher_grid_size_max", "4",
        "--report_to", "none",
        "--train_batch_size", "2",
        "--learning_rate", "1e-3",
    ]  # fmt: skip
    base = ["--pretrained_model_name_or_path", saved_pipelines["flux"]]
    train_script.main(train_script.parse_args([*base, *common, "--max_train_steps", "1"]))

    # A checkpoint-1 left by a run with another seed and learning rate is not resumed.
    resume = ["--resume_from_checkpoint", "latest", "--max_train_steps", "2"]
    stale = train_script.parse_args([*base, *common, *resume, "--seed", "1", "--learning_rate", "2e-3"])
    with pytest.raises(ValueError) as error:
        train_script.main(stale)
    message = str(error.value)
    assert "checkpoint-1 is a checkpoint of another run" in message
    assert "seed: 0 in the checkpoint, 1 now" in message
    assert "objective.learning_rate: 0.001 in the checkpoint, 0.002 now" in message
    assert not (out / "checkpoint-2").exists()

    # The same base through a relative symlink resumes.
    (tmp_path / "link").symlink_to(saved_pipelines["flux"])
    monkeypatch.chdir(tmp_path)
    train_script.main(train_script.parse_args(["--pretrained_model_name_or_path", "link", *common, *resume]))
    assert names(out) == ["checkpoint-1", "checkpoint-2"]

    # No usable checkpoint left: `latest` refuses instead of starting again at step 0.
    for step in (1, 2):
        (out / f"checkpoint-{step}" / "scfm_state.safetensors").unlink()
    with pytest.raises(ValueError, match=r"holds checkpoint folders but none can be resumed from"):
        train_script.main(train_script.parse_args([*base, *common, *resume]))


# ---------------------------------------------------------------------------------------------------------
# 5. One run per output folder
# ---------------------------------------------------------------------------------------------------------
def _hold_lock(folder: Path) -> subprocess.Popen:
    """Another process holding ``folder``'s lock (as a second training run's main process would)."""
    code = (
        "import sys, time\nfrom scfm_diffusers.training.lock import acquire_lock\n"
        f"acquire_lock({str(folder)!r})\nprint('locked', flush=True)\ntime.sleep(300)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "locked"
    return process


def test_a_second_process_is_refused_and_a_dead_ones_lock_does_not_block(tmp_path):
    folder = tmp_path / "out"
    other = _hold_lock(folder)
    try:
        with pytest.raises(RuntimeError) as error:
            acquire_lock(folder)
        assert f"--output_dir {folder.resolve()} is in use by another training run (pid {other.pid};" in str(
            error.value
        )
    finally:
        os.kill(other.pid, signal.SIGKILL)  # as kill -9: no cleanup ran, the lock file stays
        other.wait()
    assert (folder / LOCK_FILE).read_text().strip() == str(other.pid)
    try:
        assert acquire_lock(folder) == folder.resolve() / LOCK_FILE
        assert (folder / LOCK_FILE).read_text().strip() == str(os.getpid())
        assert acquire_lock(folder)  # re-entrant within one process (main() called again)
    finally:
        release_lock(folder)
    other = _hold_lock(folder)  # released: another process takes it at once
    other.kill()
    other.wait()


def test_a_second_training_run_on_the_same_output_dir_is_refused_at_the_start(
    train_script, saved_pipelines, image_folder, tmp_path
):
    out = tmp_path / "out"
    other = _hold_lock(out)
    try:
        argv = [
            "--pretrained_model_name_or_path", saved_pipelines["flux"],
            "--train_data_dir", str(image_folder),
            "--output_dir", str(out),
            "--report_to", "none",
        ]  # fmt: skip
        start = time.perf_counter()
        with pytest.raises(
            RuntimeError, match=rf"{out.resolve()} is in use by another training run \(pid {other.pid};"
        ):
            train_script.main(train_script.parse_args(argv))
        assert time.perf_counter() - start < 10  # before the base model is loaded
    finally:
        other.kill()
        other.wait()
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]


@pytest.mark.slow
def test_every_process_of_a_ddp_run_stops_when_the_folder_is_in_use(saved_pipelines, image_folder, tmp_path):
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    env.update({"ACCELERATE_USE_CPU": "true", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    launcher = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"]
    argv = [
        "--pretrained_model_name_or_path", saved_pipelines["flux"],
        "--train_data_dir", str(image_folder),
        "--output_dir", str(out),
        "--report_to", "none",
    ]  # fmt: skip
    other = _hold_lock(out)
    try:
        result = subprocess.run(
            [str(Path(sys.executable).with_name("accelerate")), "launch", *launcher, str(SCRIPT), *argv],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        other.kill()
        other.wait()
    log = result.stdout + result.stderr
    assert result.returncode != 0
    # Both processes raise (rank 1 from the main process's broadcast), neither waits at a barrier.
    for rank in (0, 1):
        assert (
            f"[rank{rank}]: RuntimeError: --output_dir {out.resolve()} is in use by another training run (pid {other.pid};"
            in log
        ), log[-4000:]
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]
