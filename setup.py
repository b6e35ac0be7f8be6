"""Packaging for scfm-diffusers: few-step flow matching (SCFM) for diffusers."""

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "torch>=2.4",
    "diffusers>=0.36",
    "transformers>=4.48",
    "peft>=0.17",
    "accelerate>=1.0",
    "huggingface-hub>=0.34",
    "safetensors>=0.4",
    "sentencepiece>=0.2",
    "numpy",
    "pillow",
    "tqdm",
]

EXTRAS = {
    "train": ["datasets>=3.0", "bitsandbytes>=0.45", "tensorboard", "scikit-learn", "matplotlib"],
    "deepspeed": ["deepspeed>=0.16"],
    # Quantized base (QLoRA-style): bitsandbytes nf4 / int8 on CUDA, torchao int8 / fp8 weight-only (CPU too).
    "quantization": ["bitsandbytes>=0.45", "torchao>=0.15"],
    "xformers": ["xformers"],
    "test": ["pytest>=8", "pytest-xdist", "ruff>=0.6"],
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
