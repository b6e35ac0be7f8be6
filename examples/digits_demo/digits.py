"""The built-in demo: a small text-to-image Flux teacher pre-trained on scikit-learn's digits.

A worked example of flow-matching pre-training that runs offline on two CPU cores in a few minutes:

1. **Data** — ``sklearn.datasets.load_digits()`` (1797 8×8 images, labels 0–9), upsampled to 16×16
   (bilinear), grey replicated to RGB in [-1, 1], each with the prompt ``"a handwritten digit seven"``
   etc.; a fixed, stratified train/eval split.
2. **VAE** — a one-block diffusers :class:`~diffusers.AutoencoderKL` (no spatial downsampling,
   1 latent channel; Flux packs 2×2 latents into 4 channels, so a 16×16 image is 64 tokens), trained
   briefly for reconstruction + a small KL; its ``shift_factor``/``scaling_factor`` are set from the
   latent mean/std so that scaled latents have unit variance.
3. **Teacher** — a real :class:`~diffusers.FluxPipeline` from
   :func:`scfm_diffusers.testing.tiny_flux_pipeline` (random, frozen text encoders: the ten prompt
   embeddings differ, which is all the conditioning needs), its transformer trained with plain
   rectified flow on cached latents and prompt embeddings, saved with ``save_pretrained``.
4. **Classifier** — a small CNN on 16×16 images in [0, 1], registered as the feature extractor
   ``"digits-classifier"`` (penultimate features for Fréchet distances, ``logits`` for prompt adherence).

Time convention (diffusers): σ ∈ [0, 1], σ = 1 is pure noise, ``x_σ = (1 − σ)·x0 + σ·ε``, velocity
``v = ε − x0``; sampling runs σ from 1 down to 0. The Flux transformer takes ``timestep=σ``.

Sampling the saved teacher with the stock pipeline (pass the same ``max_sequence_length`` it was
trained with, stored in ``scfm_digits_teacher.json``; :data:`DIGITS_MAX_SEQUENCE_LENGTH` by default)::

    pipe = FluxPipeline.from_pretrained(path)
    images = pipe(digit_prompt(7), height=16, width=16, num_inference_steps=32,
                  max_sequence_length=DIGITS_MAX_SEQUENCE_LENGTH, output_type="pt").images

Distilling it with ``examples/train_scfm_lora.py --pretrained_model_name_or_path PATH`` likewise needs
``--max_sequence_length 32`` (that script's default is 256: unseen padding tokens would shift the prompt).

Reproduce the numbers of the demo (trains, or reuses, everything under ``DIR``)::

    PYTHONPATH=examples python -m digits_demo.digits DIR
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scfm_diffusers.evaluation.metrics import (
    classifier_accuracy,
    extract_features,
    frechet_distance,
    register_feature_extractor,
)

__all__ = [
    "DIGITS_CLASSIFIER_NAME",
    "DIGITS_MAX_SEQUENCE_LENGTH",
    "DIGIT_WORDS",
    "DigitsClassifier",
    "DigitsClassifierConfig",
    "DigitsClassifierFeatureExtractor",
    "DigitsSplit",
    "DigitsTeacherConfig",
    "DigitsTrainingBatch",
    "default_cache_dir",
    "digit_prompt",
    "digits_split",
    "flow_matching_loss",
    "load_digits_classifier",
    "load_digits_images",
    "measure_teacher",
    "sample_digits",
    "sample_sigmas",
    "train_digits_classifier",
    "train_digits_teacher",
]

#: The words used in the prompts, indexed by label.
DIGIT_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

#: T5 length the teacher is trained with (the longest prompt is 27 character tokens incl. ``</s>``).
#: Flux does not mask padding, so sampling must pass the same ``max_sequence_length``.
DIGITS_MAX_SEQUENCE_LENGTH = 32

#: Name under which the digit classifier is registered as a feature extractor.
DIGITS_CLASSIFIER_NAME = "digits-classifier"

IMAGE_SIZE = 16
TEACHER_SETTINGS_FILE = "scfm_digits_teacher.json"
CLASSIFIER_WEIGHTS_FILE = "digits_classifier.pt"
CLASSIFIER_SETTINGS_FILE = "digits_classifier.json"


def default_cache_dir() -> Path:
    """Directory for cached demo artefacts: ``$SCFM_DIGITS_CACHE`` or ``~/.cache/scfm_diffusers/digits``."""
    return Path(os.environ.get("SCFM_DIGITS_CACHE", Path.home() / ".cache" / "scfm_diffusers" / "digits"))


def _log(progress: bool, message: str) -> None:
    if progress:
        print(message, flush=True)


# ----------------------------------------------------------------------------------------------------
# 1. Data
# ----------------------------------------------------------------------------------------------------
def digit_prompt(label: int) -> str:
    """The prompt of a digit label, e.g. ``digit_prompt(7) == "a handwritten digit seven"``."""
    if not 0 <= int(label) <= 9:
        raise ValueError(f"label must be in 0..9, got {label}.")
    return f"a handwritten digit {DIGIT_WORDS[int(label)]}"


def load_digits_images(size: int = IMAGE_SIZE) -> tuple[Tensor, Tensor]:
    """All 1797 scikit-learn digits as RGB images in [-1, 1].

    Args:
        size: Output side length; the 8×8 originals are resized bilinearly.

    Returns:
        ``(images, labels)``: float32 ``(1797, 3, size, size)`` (grey replicated to 3 channels) and
        int64 ``(1797,)``.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    grey = torch.from_numpy(digits.images).float().unsqueeze(1) / 16.0  # pixel values are 0..16
    grey = F.interpolate(grey, size=(size, size), mode="bilinear", align_corners=False).clamp(0.0, 1.0)
    images = (grey * 2.0 - 1.0).expand(-1, 3, -1, -1).contiguous()
    return images, torch.from_numpy(digits.target).long()


@dataclass(frozen=True)
class DigitsSplit:
    """A fixed train/eval split; images are RGB in [-1, 1], shape ``(N, 3, 16, 16)``."""

    train_images: Tensor
    train_labels: Tensor
    eval_images: Tensor
    eval_labels: Tensor


def digits_split(seed: int = 0, eval_fraction: float = 0.2, size: int = IMAGE_SIZE) -> DigitsSplit:
    """Split the digits into train/eval, stratified by label, deterministically from ``seed``.

    With the defaults: 1437 train and 360 eval images (35–37 per class).
    """
    from sklearn.model_selection import train_test_split

    images, labels = load_digits_images(size)
    train_idx, eval_idx = train_test_split(
        np.arange(len(labels)), test_size=eval_fraction, random_state=seed, stratify=labels.numpy()
    )
    train_idx, eval_idx = torch.from_numpy(np.sort(train_idx)), torch.from_numpy(np.sort(eval_idx))
    return DigitsSplit(images[train_idx], labels[train_idx], images[eval_idx], labels[eval_idx])


# ----------------------------------------------------------------------------------------------------
# 2. Settings
# ----------------------------------------------------------------------------------------------------
@dataclass
class DigitsTeacherConfig:
    """Everything that defines a trained digits teacher; a cached teacher is reused only if all match.

    Attributes:
        num_layers: Dual-stream Flux blocks.
        num_single_layers: Single-stream Flux blocks.
        attention_head_dim: Per-head width (= ``sum(axes_dims_rope)``).
        num_attention_heads: Heads (inner width = heads × head dim).
        axes_dims_rope: Flux rotary dimensions per axis.
        text_dim: Width of the (random, frozen) text encoders.
        learning_rate: Peak AdamW learning rate (linear warm-up, cosine decay to 0).
        warmup_steps: Linear warm-up steps.
        weight_decay: AdamW weight decay.
        grad_clip: Gradient-norm clip.
        sigma_sampling: ``"uniform"`` (default: every σ the few-step grids visit, up to σ≈1, is trained
            equally) or ``"logit_normal"`` (SD3's N(0, 1) in logit space, concentrated around σ = 0.5).
        max_sequence_length: T5 length of the cached prompt embeddings (sampling must use the same).
        vae_channels: Channels of the one-block VAE.
        vae_steps: VAE training steps (batch 64).
        vae_learning_rate: VAE Adam learning rate.
        vae_kl_weight: Weight of the KL term (per element) in the VAE loss.
        eval_fraction: Share of the digits held out for evaluation.
    """

    num_layers: int = 2
    num_single_layers: int = 2
    attention_head_dim: int = 16
    num_attention_heads: int = 4
    axes_dims_rope: tuple[int, int, int] = (4, 4, 8)
    text_dim: int = 32
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    sigma_sampling: str = "uniform"
    max_sequence_length: int = DIGITS_MAX_SEQUENCE_LENGTH
    vae_channels: int = 8
    vae_steps: int = 200
    vae_learning_rate: float = 2e-3
    vae_kl_weight: float = 1e-4
    eval_fraction: float = 0.2

    def __post_init__(self) -> None:
        self.axes_dims_rope = tuple(self.axes_dims_rope)
        if self.sigma_sampling not in ("uniform", "logit_normal"):
            raise ValueError(f"sigma_sampling must be 'uniform' or 'logit_normal', got {self.sigma_sampling!r}.")
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ValueError(
                f"sum(axes_dims_rope)={sum(self.axes_dims_rope)} must equal attention_head_dim={self.attention_head_dim}."
            )


@dataclass
class DigitsTrainingBatch:
    """One flow-matching batch of the teacher's training loop, as handed to an ``extra_loss`` hook.

    Shapes: B = batch size, L = 64 packed latent tokens, C = 4 packed channels, T = text length.

    Attributes:
        step: Optimizer step index (0-based).
        latents: Clean packed latents x0, ``(B, L, C)``.
        noise: ε, ``(B, L, C)``.
        sigmas: σ per sample, ``(B,)``.
        noisy_latents: ``x_σ = (1 − σ)·x0 + σ·ε``, ``(B, L, C)``.
        target: Flow-matching target ``v = ε − x0``, ``(B, L, C)``.
        prediction: Transformer output at ``(x_σ, σ)``, ``(B, L, C)`` (carries gradient).
        labels: Digit labels, ``(B,)``.
        prompt_embeds: T5 embeddings, ``(B, T, D)``.
        pooled_prompt_embeds: CLIP pooled embeddings, ``(B, D)``.
        text_ids: ``(T, 3)`` zeros.
        latent_image_ids: ``(L, 3)`` Flux position ids.
    """

    step: int
    latents: Tensor
    noise: Tensor
    sigmas: Tensor
    noisy_latents: Tensor
    target: Tensor
    prediction: Tensor
    labels: Tensor
    prompt_embeds: Tensor
    pooled_prompt_embeds: Tensor
    text_ids: Tensor
    latent_image_ids: Tensor


# ----------------------------------------------------------------------------------------------------
# 3. Flow matching
# ----------------------------------------------------------------------------------------------------
def sample_sigmas(batch_size: int, method: str, generator: torch.Generator | None = None) -> Tensor:
    """Training σ ∈ (0, 1): ``"uniform"`` U(0, 1), or ``"logit_normal"`` sigmoid(N(0, 1)). Shape ``(B,)``."""
    if method == "uniform":
        return torch.rand(batch_size, generator=generator)
    if method == "logit_normal":
        return torch.sigmoid(torch.randn(batch_size, generator=generator))
    raise ValueError(f"Unknown sigma sampling {method!r}.")


def flow_matching_loss(prediction: Tensor, latents: Tensor, noise: Tensor) -> Tensor:
    """Rectified-flow loss ``mean((v_θ(x_σ, σ) − (ε − x0))²)`` over all elements."""
    return (prediction.float() - (noise - latents).float()).square().mean()


def _lr_factor(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _train_vae(vae: nn.Module, images: Tensor, config: DigitsTeacherConfig, seed: int, progress: bool) -> Tensor:
    """Train ``vae`` in place on ``images`` ([-1, 1]); set its shift/scale; return scaled latent means."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(vae.parameters(), lr=config.vae_learning_rate)
    vae.train()
    for step in range(config.vae_steps):
        x = images[torch.randint(len(images), (64,), generator=generator)]
        posterior = vae.encode(x).latent_dist
        # Reparameterized sample with our generator (the posterior's own sampler would use the global RNG).
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        reconstruction = vae.decode(z).sample
        kl = 0.5 * (posterior.mean.square() + posterior.var - 1.0 - posterior.logvar).mean()
        loss = F.mse_loss(reconstruction, x) + config.vae_kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == config.vae_steps - 1:
            _log(progress, f"vae step {step}: loss {loss.item():.4f} (kl {kl.item():.3f})")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        latents = torch.cat([vae.encode(batch).latent_dist.mean for batch in images.split(256)])
    mean, std = latents.mean().item(), latents.std().item()
    # The pipeline decodes ``z / scaling_factor + shift_factor``, so the model works on (z − shift)·scale.
    vae.register_to_config(shift_factor=mean, scaling_factor=1.0 / std)
    return (latents - mean) / std


def _settings(config: DigitsTeacherConfig, steps: int, batch_size: int, seed: int, extra_loss: Any) -> dict:
    settings = asdict(config)
    settings["axes_dims_rope"] = list(config.axes_dims_rope)
    settings.update(steps=steps, batch_size=batch_size, seed=seed)
    # A callable cannot be compared across runs; its qualified name marks the cache as a different teacher.
    settings["extra_loss"] = None if extra_loss is None else getattr(extra_loss, "__qualname__", repr(extra_loss))
    return settings


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def train_digits_teacher(
    output_dir: str | os.PathLike[str],
    *,
    steps: int = 1000,
    batch_size: int = 64,
    seed: int = 0,
    config: DigitsTeacherConfig | None = None,
    extra_loss: Callable[[nn.Module, DigitsTrainingBatch], Tensor] | None = None,
    progress: bool = True,
) -> str:
    """Pre-train the digits teacher with rectified flow and ``save_pretrained`` it to ``output_dir``.

    The loss is ``mean((v_θ(x_σ, σ, c) − (ε − x0))²)`` with ``x_σ = (1 − σ)·x0 + σ·ε`` on cached,
    scaled VAE latents x0 and cached prompt embeddings c, σ drawn by ``config.sigma_sampling``. AdamW with
    linear warm-up and cosine decay. ``output_dir`` then holds a standard Flux pipeline folder
    (``FluxPipeline.from_pretrained(output_dir)``; also the ``--pretrained_model_name_or_path`` of the
    distillation script) plus ``scfm_digits_teacher.json`` with the settings and training statistics.

    If ``output_dir`` already holds a finished teacher trained with the same settings, nothing is trained
    and the path is returned at once.

    Args:
        output_dir: Where to save the pipeline.
        steps: Optimizer steps of the transformer.
        batch_size: Batch size.
        seed: Seed of the data split, model initialisation, noise and σ.
        config: Model and optimisation settings; defaults to :class:`DigitsTeacherConfig`.
        extra_loss: Optional hook for an extra loss term (e.g. folding SCFM into pre-training):
            called as ``extra_loss(transformer, batch)`` with a :class:`DigitsTrainingBatch` after the
            flow-matching forward pass; its scalar result is added to the loss. Its ``__qualname__`` is
            part of the cache key.
        progress: Print progress.

    Returns:
        ``output_dir`` as a string.
    """
    from diffusers import FluxPipeline

    from scfm_diffusers.testing import TinyModelConfig, tiny_flux_pipeline

    config = config or DigitsTeacherConfig()
    output_dir = Path(output_dir)
    settings = _settings(config, steps, batch_size, seed, extra_loss)
    cached = _read_json(output_dir / TEACHER_SETTINGS_FILE)
    if cached and cached.get("finished") and cached.get("settings") == settings:
        _log(progress, f"Reusing the digits teacher in {output_dir} (same settings).")
        return str(output_dir)

    start = time.perf_counter()
    split = digits_split(seed, config.eval_fraction)
    pipe = tiny_flux_pipeline(
        TinyModelConfig(
            num_layers=config.num_layers,
            num_single_layers=config.num_single_layers,
            attention_head_dim=config.attention_head_dim,
            num_attention_heads=config.num_attention_heads,
            axes_dims_rope=config.axes_dims_rope,
            text_dim=config.text_dim,
            vae_channels=config.vae_channels,
            latent_channels=1,
            guidance_embeds=False,
            seed=seed,
        )
    )
    for module in (pipe.text_encoder, pipe.text_encoder_2):
        module.requires_grad_(False)

    # VAE, then cache the packed latents of the training split: (N, 64, 4).
    vae_start = time.perf_counter()
    latents = _train_vae(pipe.vae, split.train_images, config, seed, progress)
    vae_seconds = time.perf_counter() - vae_start
    n, channels, height, width = latents.shape
    latents = FluxPipeline._pack_latents(latents, n, channels, height, width)
    latent_image_ids = FluxPipeline._prepare_latent_image_ids(1, height // 2, width // 2, "cpu", torch.float32)

    # Prompt embeddings of the ten digits, (10, T, D) and (10, D); a batch indexes them by label.
    with torch.no_grad():
        prompt_embeds, pooled_embeds, text_ids = pipe.encode_prompt(
            [digit_prompt(label) for label in range(10)], max_sequence_length=config.max_sequence_length
        )

    transformer = pipe.transformer
    transformer.train()
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, config.warmup_steps, steps))
    train_start, train_cpu_start, running, losses = time.perf_counter(), time.process_time(), None, []
    for step in range(steps):
        index = torch.randint(n, (batch_size,), generator=generator)
        x0, labels = latents[index], split.train_labels[index]
        noise = torch.randn(x0.shape, generator=generator)
        sigmas = sample_sigmas(batch_size, config.sigma_sampling, generator)
        noisy = (1.0 - sigmas[:, None, None]) * x0 + sigmas[:, None, None] * noise
        prediction = transformer(
            hidden_states=noisy,
            timestep=sigmas,
            guidance=None,
            pooled_projections=pooled_embeds[labels],
            encoder_hidden_states=prompt_embeds[labels],
            txt_ids=text_ids,
            img_ids=latent_image_ids,
            return_dict=False,
        )[0]
        loss = flow_matching_loss(prediction, x0, noise)
        if extra_loss is not None:
            batch = DigitsTrainingBatch(
                step, x0, noise, sigmas, noisy, noise - x0, prediction, labels,
                prompt_embeds[labels], pooled_embeds[labels], text_ids, latent_image_ids,
            )  # fmt: skip
            loss = loss + extra_loss(transformer, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), config.grad_clip)
        optimizer.step()
        scheduler.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        losses.append(loss.item())
        if step % 250 == 0 or step == steps - 1:
            rate = (time.perf_counter() - train_start) / (step + 1)
            _log(progress, f"teacher step {step}: loss {loss.item():.4f} (smoothed {running:.4f}), {rate:.3f} s/step")
    transformer.eval().requires_grad_(False)
    train_seconds = time.perf_counter() - train_start
    train_cpu_seconds = time.process_time() - train_cpu_start

    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / TEACHER_SETTINGS_FILE).unlink(missing_ok=True)  # an interrupted save is not "finished"
    pipe.save_pretrained(output_dir)
    record = {
        "finished": True,
        "settings": settings,
        "transformer_parameters": sum(p.numel() for p in transformer.parameters()),
        "vae_seconds": round(vae_seconds, 2),
        "teacher_seconds": round(train_seconds, 2),
        # CPU time of this process (all threads): a check on wall times taken on a shared machine.
        "teacher_cpu_seconds": round(train_cpu_seconds, 2),
        "total_seconds": round(time.perf_counter() - start, 2),
        "final_loss_last_100": float(np.mean(losses[-100:])) if losses else None,
        "vae_shift_factor": pipe.vae.config.shift_factor,
        "vae_scaling_factor": pipe.vae.config.scaling_factor,
    }
    (output_dir / TEACHER_SETTINGS_FILE).write_text(json.dumps(record, indent=2))
    _log(progress, f"Saved the digits teacher to {output_dir} ({record['total_seconds']} s).")
    return str(output_dir)


# ----------------------------------------------------------------------------------------------------
# 4. Classifier
# ----------------------------------------------------------------------------------------------------
class DigitsClassifier(nn.Module):
    """A small CNN for 16×16 digits: images ``(B, 3, 16, 16)`` in [0, 1] → logits ``(B, 10)``.

    Args:
        feature_dim: Width D of the penultimate layer (the features used for Fréchet distances).
    """

    def __init__(self, feature_dim: int = 64) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 8×8
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 4×4
            nn.Flatten(), nn.Linear(64 * 4 * 4, feature_dim), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Linear(feature_dim, 10)

    def features(self, images: Tensor) -> Tensor:
        """Penultimate features ``(B, D)`` of images ``(B, 3, 16, 16)`` in [0, 1]."""
        return self.body(images * 2.0 - 1.0)

    def forward(self, images: Tensor) -> Tensor:
        """Logits ``(B, 10)`` of images ``(B, 3, 16, 16)`` in [0, 1]."""
        return self.head(self.features(images))


@dataclass
class DigitsClassifierConfig:
    """Settings of the digit classifier; a cached classifier is reused only if all match.

    Attributes:
        epochs: Passes over the training split.
        batch_size: Batch size.
        learning_rate: Adam learning rate.
        feature_dim: Penultimate width D.
        max_shift: Random translation augmentation, in pixels (makes it robust to generated digits).
        noise_std: Std of Gaussian pixel noise augmentation (images in [0, 1]).
        eval_fraction: Share held out (the same split as the teacher's with the same seed).
        seed: Seed of the split, initialisation and batches.
    """

    epochs: int = 10
    batch_size: int = 64
    learning_rate: float = 2e-3
    feature_dim: int = 64
    max_shift: int = 1
    noise_std: float = 0.05
    eval_fraction: float = 0.2
    seed: int = 0


def _augment(images: Tensor, max_shift: int, noise_std: float, generator: torch.Generator) -> Tensor:
    if max_shift > 0:
        padded = F.pad(images, (max_shift,) * 4)
        dy, dx = torch.randint(0, 2 * max_shift + 1, (2,), generator=generator).tolist()
        images = padded[..., dy : dy + images.shape[-2], dx : dx + images.shape[-1]]
    if noise_std > 0:
        images = images + noise_std * torch.randn(images.shape, generator=generator)
    return images.clamp(0.0, 1.0)


def train_digits_classifier(
    output_dir: str | os.PathLike[str] | None = None,
    *,
    config: DigitsClassifierConfig | None = None,
    progress: bool = True,
) -> str:
    """Train the digit classifier on the train split and save it; reuse a cached one with the same settings.

    Writes ``digits_classifier.pt`` (state dict) and ``digits_classifier.json`` (settings, test accuracy,
    training time) into ``output_dir`` (default: ``default_cache_dir() / "classifier"``).

    Returns:
        ``output_dir`` as a string.
    """
    config = config or DigitsClassifierConfig()
    output_dir = Path(output_dir) if output_dir is not None else default_cache_dir() / "classifier"
    settings = asdict(config)
    cached = _read_json(output_dir / CLASSIFIER_SETTINGS_FILE)
    if cached and cached.get("settings") == settings and (output_dir / CLASSIFIER_WEIGHTS_FILE).exists():
        _log(progress, f"Reusing the digit classifier in {output_dir} (test accuracy {cached['test_accuracy']:.3f}).")
        return str(output_dir)

    start = time.perf_counter()
    split = digits_split(config.seed, config.eval_fraction)
    train_images, eval_images = (split.train_images + 1) / 2, (split.eval_images + 1) / 2
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    model = DigitsClassifier(config.feature_dim)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    steps_per_epoch = math.ceil(len(train_images) / config.batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.epochs * steps_per_epoch)
    model.train()
    for epoch in range(config.epochs):
        order = torch.randperm(len(train_images), generator=generator)
        for index in order.split(config.batch_size):
            x = _augment(train_images[index], config.max_shift, config.noise_std, generator)
            loss = F.cross_entropy(model(x), split.train_labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        _log(progress, f"classifier epoch {epoch}: loss {loss.item():.4f}")
    model.eval().requires_grad_(False)
    with torch.no_grad():
        accuracy = classifier_accuracy(model(eval_images), split.eval_labels)
    output_dir.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), output_dir / CLASSIFIER_WEIGHTS_FILE)
    record = {"settings": settings, "test_accuracy": accuracy, "train_seconds": round(time.perf_counter() - start, 2)}
    (output_dir / CLASSIFIER_SETTINGS_FILE).write_text(json.dumps(record, indent=2))
    _log(progress, f"Digit classifier: test accuracy {accuracy:.4f}, {record['train_seconds']} s.")
    return str(output_dir)


def load_digits_classifier(path: str | os.PathLike[str]) -> DigitsClassifier:
    """Load a classifier saved by :func:`train_digits_classifier` (eval mode, frozen)."""
    path = Path(path)
    record = _read_json(path / CLASSIFIER_SETTINGS_FILE)
    if record is None or not (path / CLASSIFIER_WEIGHTS_FILE).exists():
        raise OSError(f"No digit classifier in {path}; train one with train_digits_classifier({str(path)!r}).")
    model = DigitsClassifier(record["settings"]["feature_dim"])
    model.load_state_dict(torch.load(path / CLASSIFIER_WEIGHTS_FILE, map_location="cpu", weights_only=True))
    return model.eval().requires_grad_(False)


@register_feature_extractor(DIGITS_CLASSIFIER_NAME)
class DigitsClassifierFeatureExtractor:
    """The digit classifier as a feature extractor: penultimate features for Fréchet distances.

    Args:
        path: Folder of a saved classifier; default ``default_cache_dir() / "classifier"``.
        device: Device to run on (default CPU: the model is tiny).
        train_if_missing: If no classifier is saved at ``path``, train one (≈ 10–30 s on 2 CPU cores).
        config: Settings used when training.
    """

    name = DIGITS_CLASSIFIER_NAME

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        device: str | torch.device | None = None,
        train_if_missing: bool = True,
        config: DigitsClassifierConfig | None = None,
    ) -> None:
        path = Path(path) if path is not None else default_cache_dir() / "classifier"
        if train_if_missing:
            train_digits_classifier(path, config=config, progress=False)
        self.path = str(path)
        self.device = torch.device(device or "cpu")
        self.model = load_digits_classifier(path).to(self.device)

    def _prepare(self, images: Tensor) -> Tensor:
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images must have shape (B, 1 or 3, H, W), got {tuple(images.shape)}.")
        x = images.to(self.device, torch.float32).expand(-1, 3, -1, -1)
        if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
            x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True, align_corners=False)
        return x.clamp(0.0, 1.0)

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        """Penultimate features ``(B, D)`` of images ``(B, 3, H, W)`` in [0, 1] (resized to 16×16 if needed)."""
        return self.model.features(self._prepare(images))

    @torch.no_grad()
    def logits(self, images: Tensor) -> Tensor:
        """Class logits ``(B, 10)``, e.g. for the prompt-adherence accuracy."""
        return self.model(self._prepare(images))


# ----------------------------------------------------------------------------------------------------
# 5. Measurement
# ----------------------------------------------------------------------------------------------------
def sample_digits(
    pipe: Any,
    labels: Sequence[int] | Tensor,
    *,
    num_inference_steps: int,
    seed: int = 0,
    batch_size: int = 250,
    max_sequence_length: int = DIGITS_MAX_SEQUENCE_LENGTH,
    **kwargs: Any,
) -> Tensor:
    """Sample one 16×16 image per label with a (stock or subclassed) Flux pipeline.

    Args:
        pipe: The pipeline; its current scheduler is used.
        labels: Digit labels; the prompt of each is :func:`digit_prompt`.
        num_inference_steps: Sampling steps.
        seed: Seed of the initial noise (the same seed gives the same noise for any step count).
        batch_size: Images per pipeline call.
        max_sequence_length: T5 length; must match the teacher's training.
        **kwargs: Passed on to the pipeline call.

    Returns:
        Images ``(N, 3, 16, 16)`` in [0, 1].
    """
    labels = [int(label) for label in labels]
    generator = torch.Generator().manual_seed(seed)
    images = []
    for start in range(0, len(labels), batch_size):
        prompts = [digit_prompt(label) for label in labels[start : start + batch_size]]
        output = pipe(
            prompts,
            height=IMAGE_SIZE,
            width=IMAGE_SIZE,
            num_inference_steps=num_inference_steps,
            max_sequence_length=max_sequence_length,
            generator=generator,
            output_type="pt",
            **kwargs,
        )
        images.append(output.images.float().cpu())
    return torch.cat(images)


def measure_teacher(
    teacher_path: str | os.PathLike[str],
    classifier_path: str | os.PathLike[str] | None = None,
    *,
    steps: Sequence[int] = (32, 3),
    shifts: Sequence[float | None] = (None, 1.0),
    per_class: int = 50,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Accuracy and Fréchet distance of the teacher's samples for several step counts and shifts.

    Each setting samples ``per_class`` images of every digit with the stock pipeline (same noise for all
    settings), and reports the classifier's accuracy on the prompted label and the Fréchet distance of
    classifier features against the held-out real digits. ``shift=None`` is the pipeline's own scheduler
    (Flux dynamic shift, μ from the 64-token sequence length); a number replaces it by a fixed-shift
    :class:`~diffusers.FlowMatchEulerDiscreteScheduler`.

    Returns:
        ``{"mu": μ of the dynamic shift, "real_fd": FD(train real, eval real), "results": [{"steps",
        "shift", "accuracy", "fd", "seconds"}, ...]}``.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    from scfm_diffusers.sigmas import resolution_mu

    teacher_path = Path(teacher_path)
    record = _read_json(teacher_path / TEACHER_SETTINGS_FILE) or {}
    teacher_settings = record.get("settings", {})
    max_sequence_length = teacher_settings.get("max_sequence_length", DIGITS_MAX_SEQUENCE_LENGTH)
    pipe = FluxPipeline.from_pretrained(teacher_path)
    pipe.set_progress_bar_config(disable=True)
    stock_scheduler = pipe.scheduler
    extractor = DigitsClassifierFeatureExtractor(classifier_path)
    split = digits_split(teacher_settings.get("seed", 0), teacher_settings.get("eval_fraction", 0.2))
    real_eval = extract_features(extractor, (split.eval_images + 1) / 2)
    real_train = extract_features(extractor, (split.train_images + 1) / 2)
    mu = resolution_mu((IMAGE_SIZE // 2) ** 2)
    labels = torch.arange(10).repeat_interleave(per_class)
    results = []
    for shift in shifts:
        pipe.scheduler = (
            stock_scheduler
            if shift is None
            else FlowMatchEulerDiscreteScheduler(shift=shift, use_dynamic_shifting=False)
        )
        for num_steps in steps:
            start = time.perf_counter()
            images = sample_digits(
                pipe, labels, num_inference_steps=num_steps, seed=seed, max_sequence_length=max_sequence_length
            )
            seconds = time.perf_counter() - start
            accuracy = classifier_accuracy(extractor.logits(images), labels)
            fd = frechet_distance(extract_features(extractor, images), real_eval)
            result = {
                "steps": num_steps,
                "shift": f"dynamic (mu={mu:.4f}, e^mu={math.exp(mu):.3f})" if shift is None else shift,
                "accuracy": accuracy,
                "fd": fd,
                "seconds": round(seconds, 2),
            }
            results.append(result)
            _log(progress, json.dumps(result))
    pipe.scheduler = stock_scheduler
    return {"mu": mu, "real_fd": frechet_distance(real_train, real_eval), "results": results}


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Train (or reuse) the digits teacher and classifier; measure them.")
    parser.add_argument("output_dir", help="Folder for the teacher (subfolder teacher/) and classifier (classifier/).")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--per_class", type=int, default=50)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (1 is fastest on a busy machine).")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    root = Path(args.output_dir)
    classifier = train_digits_classifier(root / "classifier")
    teacher = train_digits_teacher(root / "teacher", steps=args.steps, seed=args.seed)
    print(json.dumps(_read_json(Path(teacher) / TEACHER_SETTINGS_FILE), indent=2))
    report = measure_teacher(teacher, classifier, per_class=args.per_class, seed=args.seed)
    print(json.dumps(report, indent=2))
