"""Packaging for scfm-diffusers: few-step flow matching (SCFM) for diffusers."""

import re
from pathlib import Path

from setuptools import find_packages, setup

REPOSITORY = "https://github.com/scfm-diffusers/scfm-diffusers"
# README.md's relative links (docs/benchmarks.md, the demo image) work on GitHub but not on PyPI: the long
# description points them at the repository instead, files at blob/main and images at the raw files.
BLOB_URL = f"{REPOSITORY}/blob/main/"
RAW_URL = "https://raw.githubusercontent.com/scfm-diffusers/scfm-diffusers/main/"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".svg", ".webp")
# The target of [text](target) or ![alt](target), of a reference definition [id]: target, of src= / href=.
_LINK_TARGET = re.compile(r"(\]\(\s*|^\[[^\]]+\]:\s*|\b(?:src|href)=\")([^)\s\"]+)", re.MULTILINE)


def absolute_links(markdown: str) -> str:
    """Point relative links and images of a Markdown text at GitHub (fenced code blocks are left alone)."""

    def rewrite(match: re.Match) -> str:
        prefix, target = match.groups()
        if re.match(r"[a-z][a-z0-9+.-]*:|[#/]", target, re.IGNORECASE):  # a URL, an anchor or a site path
            return match.group(0)
        path = target.removeprefix("./")
        base = RAW_URL if path.split("#")[0].lower().endswith(IMAGE_SUFFIXES) else BLOB_URL
        return prefix + base + path

    blocks = re.split(r"(^```.*?^```)", markdown, flags=re.MULTILINE | re.DOTALL)
    return "".join(block if block.startswith("```") else _LINK_TARGET.sub(rewrite, block) for block in blocks)


# Floors are the oldest versions the package and its tests work with: `make test-floor` installs exactly these
# (constraints-floor.txt, kept equal by tests/test_version_floors.py) and runs the fast tests. docs/versions.md
# says what each floor is needed for. torch's floor is the exception: the floor venv uses torch 2.13.0.
INSTALL_REQUIRES = [
    "torch>=2.4",
    "diffusers>=0.40.0",
    "transformers>=5.0.0",
    "peft>=0.19.0",
    "accelerate>=1.15.0",
    "huggingface-hub>=1.32.0",
    "safetensors>=0.8.0",
    "sentencepiece>=0.2.0",
    "numpy",
    "pillow",
    "tqdm",
]

EXTRAS = {
    # xxhash: the cache's shard checksums (datasets depends on it too).
    "train": ["datasets>=3.0.0", "bitsandbytes>=0.50.0", "tensorboard", "scikit-learn", "matplotlib", "xxhash"],
    "deepspeed": ["deepspeed>=0.16"],
    # Video families (Wan): clips decoded with PyAV; validation and scfm-eval videos written with diffusers'
    # export_to_video (imageio + its ffmpeg binary).
    "video": ["av>=14.0.0", "imageio>=2.30.0", "imageio-ffmpeg>=0.5.0"],
    # scfm-eval's quality_vs_steps.png (matplotlib). scfm-eval runs without it.
    "eval": ["matplotlib"],
    # Quantized base (QLoRA-style): bitsandbytes nf4 / int8 on CUDA, torchao int8 / fp8 weight-only (CPU too).
    "quantization": ["bitsandbytes>=0.50.0", "torchao>=0.18.0"],
    "xformers": ["xformers"],
    # prodigyopt and wandb: the training script's --optimizer prodigy and wandb image logging are tested too.
    "test": ["pytest>=8.0.0", "pytest-xdist", "ruff>=0.13.0", "prodigyopt", "wandb"],
    # The documentation site (`make docs`): mkdocs.yml, the API reference from the docstrings (mkdocstrings).
    "docs": [
        "mkdocs>=1.6",
        "mkdocs-material>=9.6",
        "mkdocstrings[python]>=1.0",
        "mkdocstrings-python>=2.0",
        "griffe-sphinx>=0.3",
    ],
}
EXTRAS["dev"] = sorted({req for name in ("train", "test", "quantization", "video") for req in EXTRAS[name]})

setup(
    name="scfm-diffusers",
    version="0.1.0",
    description="SCFM: shortcut a pre-trained flow-matching image or video model into a 3-8 step LoRA, diffusers style.",
    long_description=absolute_links((Path(__file__).parent / "README.md").read_text(encoding="utf-8")),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    project_urls={
        "Homepage": REPOSITORY,
        "Documentation": "https://scfm-diffusers.github.io/scfm-diffusers",
        "Source": REPOSITORY,
        "Issues": f"{REPOSITORY}/issues",
    },
    package_dir={"": "src"},
    packages=find_packages("src"),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={
        "console_scripts": [
            "scfm-eval=scfm_diffusers.evaluation.cli:main",
            "scfm-export-comfyui=scfm_diffusers.comfyui:main",
        ]
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "License :: OSI Approved :: Apache Software License",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
