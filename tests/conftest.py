"""Shared fixtures: tiny real Flux / SD3 pipelines (built offline) and their saved folders."""

import importlib.util
import io
import os
import sys
import tarfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))  # the demo's package: import digits_demo
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # without it a Hub id takes ~28 s to fail
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from peft import LoraConfig  # noqa: E402
from PIL import Image  # noqa: E402

from scfm_diffusers.testing import save_tiny_pipeline, tiny_pipeline  # noqa: E402

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TRAIN_SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "train_scfm_lora.py"


@pytest.fixture(scope="session")
def train_script():
    """The example script as a module (it is not a package)."""
    spec = importlib.util.spec_from_file_location("train_scfm_lora", TRAIN_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script is executed
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def saved_pipelines(tmp_path_factory):
    """Folders of saved tiny pipelines, one per family: {"flux": path, "sd3": path}."""
    root = tmp_path_factory.mktemp("pipelines")
    return {family: save_tiny_pipeline(family, root / family) for family in ("flux", "sd3")}


@pytest.fixture(params=["flux", "sd3"])
def family(request):
    return request.param


def add_trained_lora(transformer, *, rank=4, alpha=8, seed=0, adapter_name="default"):
    """Add a LoRA with alpha != rank and non-zero B (as after training), so it changes outputs."""
    transformer.add_adapter(
        LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=LORA_TARGETS),
        adapter_name=adapter_name,
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if "lora_B" in name and adapter_name in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return transformer


def generate(pipe, prompt="a cat", seed=0, **kwargs):
    kwargs.setdefault("height", 32)
    kwargs.setdefault("width", 32)
    return pipe(prompt, output_type="pt", generator=torch.Generator().manual_seed(seed), **kwargs).images


@pytest.fixture
def fresh_pipeline():
    return tiny_pipeline


def write_webdataset(folder, sizes, seed=0):
    """A WebDataset .tar shard (png + txt per key, captions "caption <i>"), as diffusers' LCM _wds scripts read."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    with tarfile.open(folder / "shard-000.tar", "w") as tar:
        for index, (width, height) in enumerate(sizes):
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, format="PNG")
            for suffix, data in (("png", buffer.getvalue()), ("txt", f"caption {index}".encode())):
                info = tarfile.TarInfo(f"{index:05d}.{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(folder / "shard-000.tar")
