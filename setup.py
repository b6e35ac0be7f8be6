"""Packaging for scfm-diffusers: few-step flow matching (SCFM) for diffusers."""

from setuptools import find_packages, setup

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
    "train": ["datasets>=3.0.0", "bitsandbytes>=0.50.0", "tensorboard", "scikit-learn", "matplotlib"],
    "deepspeed": ["deepspeed>=0.16"],
    # Quantized base (QLoRA-style): bitsandbytes nf4 / int8 on CUDA, torchao int8 / fp8 weight-only (CPU too).
    "quantization": ["bitsandbytes>=0.50.0", "torchao>=0.18.0"],
    "xformers": ["xformers"],
    "test": ["pytest>=8.0.0", "pytest-xdist", "ruff>=0.13.0"],
    "docs": ["mkdocs", "mkdocs-material"],
}
EXTRAS["dev"] = sorted({req for name in ("train", "test", "quantization") for req in EXTRAS[name]})

setup(
    name="scfm-diffusers",
    version="0.1.0",
    description="SCFM: shortcut a pre-trained Flux or SD3 flow-matching model into a 3-8 step LoRA, diffusers style.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    package_dir={"": "src"},
    packages=find_packages("src"),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["scfm-eval=scfm_diffusers.evaluation.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "License :: OSI Approved :: Apache Software License",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
