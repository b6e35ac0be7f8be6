"""Shared fixtures: tiny real Flux / SD3 pipelines (built offline) and their saved folders."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # without it a Hub id takes ~28 s to fail
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402
from peft import LoraConfig  # noqa: E402

from scfm_diffusers.testing import save_tiny_pipeline, tiny_pipeline  # noqa: E402

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


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
