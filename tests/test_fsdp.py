"""FSDP2 sharding of the frozen base + LoRA student: launch checks, the accelerate configs, the whole-tensor helpers,
and two CPU processes training the same adapter as one.

accelerate never enters FSDP on CPU (``ACCELERATE_USE_CPU=true accelerate launch --use_fsdp`` runs DDP on gloo, and
``--multi_gpu --use_fsdp`` is refused), so the two-process run applies torch's ``fully_shard`` as accelerate's
TRANSFORMER_BASED_WRAP does (tests/fsdp_worker.py, under torchrun with gloo) and runs the project's own step, EMA and
checkpoint hooks on the sharded parameters. The script's accelerate FSDP2 path itself needs GPUs (docs/training.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import DistributedType
from safetensors.torch import load_file

from scfm_diffusers.training import components, distributed

TESTS = Path(__file__).resolve().parent
CONFIGS = TESTS.parent / "examples" / "configs"
WORKER = TESTS / "fsdp_worker.py"
# Each family's FSDP2 config: the diffusers transformer class whose blocks it wraps.
FSDP2_CONFIGS = {
    "fsdp2_flux.yaml": "FluxTransformer2DModel",
    "fsdp2_flux2.yaml": "Flux2Transformer2DModel",
    "fsdp2_qwenimage.yaml": "QwenImageTransformer2DModel",
    "fsdp2_wan.yaml": "WanTransformer3DModel",
}


# ---------------------------------------------------------------------------------------------------------
# 1. What the script accepts at start-up
# ---------------------------------------------------------------------------------------------------------
def test_fsdp2_is_accepted_and_fsdp1_and_a_quantized_base_are_refused():
    components.check_launch(DistributedType.FSDP, None, fsdp_version=2)
    for version in (1, None):
        with pytest.raises(NotImplementedError, match="use FSDP2 \\(fsdp_version: 2"):
            components.check_launch(DistributedType.FSDP, None, fsdp_version=version)
    for quantize in ("nf4", "int8", "torchao-int8", "torchao-fp8"):
        with pytest.raises(ValueError, match="cannot be sharded with FSDP.*drop --quantize_base.*multi_gpu.yaml"):
            components.check_launch(DistributedType.FSDP, quantize, fsdp_version=2)
    # Other launchers are unchanged: the version is not looked at.
    for ok in (DistributedType.NO, DistributedType.MULTI_GPU, DistributedType.MULTI_CPU, DistributedType.DEEPSPEED):
        components.check_launch(ok, None)
    components.check_launch(DistributedType.MULTI_GPU, "nf4")
    with pytest.raises(ValueError, match="DeepSpeed|DEEPSPEED"):
        components.check_launch(DistributedType.DEEPSPEED, "torchao-int8")


@pytest.mark.parametrize("name", sorted(FSDP2_CONFIGS))
def test_fsdp2_configs_wrap_each_block_of_their_family(name):
    import diffusers
    from accelerate.commands.config.config_args import load_config_from_file

    path = CONFIGS / name
    config = yaml.safe_load(path.read_text())
    assert load_config_from_file(str(path)).distributed_type == DistributedType.FSDP  # accelerate accepts it
    fsdp = config["fsdp_config"]
    assert config["compute_environment"] == "LOCAL_MACHINE" and config["num_processes"] == 8
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    # FULL_STATE_DICT as in diffusers' Flux.2 example; the base in bf16 (a 20B+ base in fp32 defeats the point).
    assert fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT" and config["mixed_precision"] == "bf16"
    assert not fsdp["fsdp_cpu_ram_efficient_loading"] and not fsdp["fsdp_offload_params"]
    # The wrapped classes are the transformer's blocks: exactly those diffusers keeps whole (_no_split_modules).
    classes = fsdp["fsdp_transformer_layer_cls_to_wrap"].split(",")
    transformer_class = getattr(diffusers, FSDP2_CONFIGS[name])
    assert classes == list(transformer_class._no_split_modules)
    module = sys.modules[transformer_class.__module__]
    assert all(isinstance(getattr(module, cls, None), type) for cls in classes), classes


def test_flux_config_classes_are_found_by_accelerate_in_a_real_transformer():
    from accelerate.utils.dataclasses import get_module_class_from_name

    from scfm_diffusers.testing import tiny_pipeline

    transformer = tiny_pipeline("flux").transformer
    classes = yaml.safe_load((CONFIGS / "fsdp2_flux.yaml").read_text())["fsdp_config"]
    for name in classes["fsdp_transformer_layer_cls_to_wrap"].split(","):
        assert get_module_class_from_name(transformer, name) is not None, name


# ---------------------------------------------------------------------------------------------------------
# 2. The helpers are the plain operations without sharding (one code path for DDP, DeepSpeed and FSDP)
# ---------------------------------------------------------------------------------------------------------
def test_helpers_without_sharding(tmp_path):
    accelerator = Accelerator(cpu=True)
    assert distributed.fsdp_version(accelerator) is None and not distributed.is_sharded(accelerator)
    param = torch.nn.Parameter(torch.arange(6.0).reshape(2, 3))
    assert not distributed.is_sharded_module(torch.nn.Linear(2, 2))

    copies = distributed.full_tensors({"p": param})
    assert torch.equal(copies["p"], param.detach()) and not copies["p"].requires_grad
    copies["p"].add_(1)  # a copy, never a view of the live parameter
    assert torch.equal(param.detach(), torch.arange(6.0).reshape(2, 3))

    distributed.copy_full_(param, torch.ones(2, 3))
    assert torch.equal(param.detach(), torch.ones(2, 3)) and param.requires_grad

    args = argparse.Namespace(output_dir=str(tmp_path), seed=3)
    with distributed.output_args(args, is_main_process=True) as run_args:
        assert run_args is args
    with distributed.output_args(args, is_main_process=False) as run_args:
        scratch = Path(run_args.output_dir)
        assert scratch.is_dir() and scratch != tmp_path and run_args.seed == 3
        (scratch / "validation").mkdir()
    assert not scratch.exists() and args.output_dir == str(tmp_path)


# ---------------------------------------------------------------------------------------------------------
# 3. Two CPU processes, FSDP2-sharded, train the same adapter as one process fed the same global batch
# ---------------------------------------------------------------------------------------------------------
def _run(command: list[str], timeout: int = 240) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    env.update({"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    result = subprocess.run(command, cwd=TESTS.parent, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr[-6000:]}"


@pytest.mark.slow
def test_two_process_fsdp2_training_equals_one_process(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    _run([sys.executable, str(WORKER), "reference", str(one)])
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    _run([torchrun, "--standalone", "--nproc_per_node", "2", str(WORKER), "sharded", str(two)])

    summary = {run: json.loads((run / "summary.json").read_text()) for run in (one, two)}
    # The LoRA really was sharded: every student tensor is a DTensor and rank 0 holds only part of them.
    assert summary[two]["world_size"] == 2 and summary[two]["sharded_params"] > 0
    assert 0 < summary[two]["local_numel"] < summary[two]["full_numel"]
    # Same losses and global gradient norms at every step (clipping at 0.5 bit at least once).
    for key in ("losses", "norms"):
        torch.testing.assert_close(torch.tensor(summary[two][key]), torch.tensor(summary[one][key]))
    assert max(summary[one]["norms"]) > 0.5

    # Whole tensors: student, both EMAs, the slow EMA's peft state dict and a sharded forward of the slow EMA.
    ref, sharded = load_file(one / "tensors.safetensors"), load_file(two / "tensors.safetensors")
    assert ref.keys() == sharded.keys()
    for key in ref:
        assert sharded[key].shape == ref[key].shape, key  # gathered, not a shard
        torch.testing.assert_close(sharded[key], ref[key], rtol=1e-4, atol=1e-5, msg=key)
    student_b = [v for k, v in ref.items() if k.startswith("student.") and "lora_B" in k]
    assert max(v.abs().max() for v in student_b) > 1e-3  # training moved the student (B starts at zero)
    assert any(not torch.equal(ref[f"slow.{k[8:]}"], v) for k, v in ref.items() if k.startswith("student."))

    # The checkpoint written through the real hooks holds whole tensors, and resuming puts them back exactly.
    for run in (one, two):
        resumed, trained = load_file(run / "resumed.safetensors"), load_file(run / "tensors.safetensors")
        for key, value in resumed.items():
            assert torch.equal(value, trained[key]), f"{run.name}: {key} changed by save + resume"
    state = load_file(two / "checkpoint-3" / "scfm_state.safetensors")
    ref_state = load_file(one / "checkpoint-3" / "scfm_state.safetensors")
    assert state.keys() == ref_state.keys()
    for key in state:
        torch.testing.assert_close(state[key], ref_state[key], rtol=1e-4, atol=1e-5, msg=key)
    adapter = load_file(two / "checkpoint-3" / "adapter.safetensors")
    assert adapter.keys() == load_file(one / "checkpoint-3" / "adapter.safetensors").keys()
    assert {p.name for p in (two / "checkpoint-3").glob("scfm_rng_*.pt")} == {"scfm_rng_0.pt", "scfm_rng_1.pt"}
