"""Metrics that compare a few-step sampler with its many-step teacher.

The evaluation harness (real Flux/SD3 adapters and the built-in digits demo) reports, per sampler:

* the Fréchet distance (FD) between feature statistics of two image sets: student vs. teacher
  ("FID against the teacher") and each of them vs. a reference set (ΔFD = FD(student) − FD(teacher));
* the paired error between a student sample and the teacher sample drawn from the *same* noise;
* classifier accuracy (demo: the digit a classifier reads in a class-conditional sample);
* the CLIP score between images and their prompts;
* the latency of one sampling call.

Features come from a :class:`FeatureExtractor` looked up by name in a registry
(:func:`get_feature_extractor`). ``"clip"`` and ``"inception"`` are defined here and import their
optional dependencies only when built; other modules add their own with
:func:`register_feature_extractor`. An entry may also be a ``"module:attribute"`` string, imported only when
that extractor is built, and any ``"module:attribute"`` is accepted as a name, so ``scfm-eval`` can use an
extractor without importing its module at start-up (e.g. the digits demo's classifier,
``digits_demo.digits:DigitsClassifierFeatureExtractor`` with ``examples/`` on the path).

All statistics are computed in float64.
"""

from __future__ import annotations

import importlib
import os
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "CLIPFeatureExtractor",
    "FeatureExtractor",
    "FeatureStats",
    "InceptionFeatureExtractor",
    "available_feature_extractors",
    "classifier_accuracy",
    "clip_score",
    "clip_score_from_features",
    "delta_fd",
    "extract_features",
    "feature_extractor_factory",
    "frechet_distance",
    "get_feature_extractor",
    "paired_error",
    "register_feature_extractor",
    "time_call",
    "trace_sqrt_product",
]


# ----------------------------------------------------------------------------------------------------
# Fréchet distance
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FeatureStats:
    """First and second moments of a set of feature vectors.

    Attributes:
        mean: Mean feature μ, shape ``(D,)``, float64.
        covariance: Unbiased covariance Σ = (X − μ)ᵀ(X − μ) / (N − 1), shape ``(D, D)``, float64.
        count: Number of feature vectors N the moments were estimated from (≥ 2).
    """

    mean: Tensor
    covariance: Tensor
    count: int

    def __post_init__(self) -> None:
        if self.count < 2:
            raise ValueError(
                f"FeatureStats needs at least 2 feature vectors to estimate a covariance, got N={self.count}."
            )
        if self.mean.ndim != 1:
            raise ValueError(f"mean must have shape (D,), got {tuple(self.mean.shape)}.")
        d = self.mean.shape[0]
        if tuple(self.covariance.shape) != (d, d):
            raise ValueError(f"covariance must have shape (D, D) = ({d}, {d}), got {tuple(self.covariance.shape)}.")

    @property
    def dim(self) -> int:
        """Feature dimension D."""
        return self.mean.shape[0]

    @classmethod
    def from_features(cls, features: Tensor | np.ndarray) -> FeatureStats:
        """Estimate μ and Σ from a feature matrix.

        Args:
            features: Feature vectors, shape ``(N, D)`` with N ≥ 2.

        Returns:
            The float64 statistics, on the device of ``features``.
        """
        x = torch.as_tensor(features).to(torch.float64)
        if x.ndim != 2:
            raise ValueError(f"features must have shape (N, D), got {tuple(x.shape)}.")
        n = x.shape[0]
        if n < 2:
            raise ValueError(f"FeatureStats needs at least 2 feature vectors to estimate a covariance, got N={n}.")
        mean = x.mean(dim=0)
        centered = x - mean
        covariance = centered.T @ centered / (n - 1)
        return cls(mean=mean, covariance=covariance, count=n)


def _as_stats(x: FeatureStats | Tensor | np.ndarray) -> FeatureStats:
    return x if isinstance(x, FeatureStats) else FeatureStats.from_features(x)


def _psd_sqrt(matrix: Tensor) -> Tensor:
    """Symmetric square root of a symmetric PSD matrix via ``eigh`` (negative round-off eigenvalues → 0)."""
    eigvals, eigvecs = torch.linalg.eigh(0.5 * (matrix + matrix.T))
    return (eigvecs * eigvals.clamp_min(0.0).sqrt()) @ eigvecs.T


def trace_sqrt_product(sigma1: Tensor, sigma2: Tensor) -> float:
    r"""Compute :math:`\operatorname{tr}\big((\Sigma_1\Sigma_2)^{1/2}\big)` for symmetric PSD Σ1, Σ2.

    Σ1Σ2 is not symmetric, but it is similar to the symmetric PSD matrix
    :math:`M = \Sigma_1^{1/2}\Sigma_2\Sigma_1^{1/2}`, so both have the same non-negative eigenvalues λᵢ and

    .. math:: \operatorname{tr}\big((\Sigma_1\Sigma_2)^{1/2}\big) = \sum_i \sqrt{\lambda_i(M)}.

    Two symmetric eigendecompositions in float64 avoid the complex round-off of a general ``sqrtm``.

    Args:
        sigma1: Covariance, shape ``(D, D)``.
        sigma2: Covariance, shape ``(D, D)``.

    Returns:
        The trace as a Python float.
    """
    s1 = _psd_sqrt(sigma1.to(torch.float64))
    m = s1 @ sigma2.to(device=s1.device, dtype=torch.float64) @ s1
    eigvals = torch.linalg.eigvalsh(0.5 * (m + m.T))
    return eigvals.clamp_min(0.0).sqrt().sum().item()


def frechet_distance(a: FeatureStats | Tensor | np.ndarray, b: FeatureStats | Tensor | np.ndarray) -> float:
    r"""Fréchet distance between the Gaussians fitted to two feature sets.

    .. math::
        \mathrm{FD} = \lVert\mu_1 - \mu_2\rVert^2
        + \operatorname{tr}\big(\Sigma_1 + \Sigma_2 - 2(\Sigma_1\Sigma_2)^{1/2}\big)

    With Inception features this is FID; with CLIP or classifier features it is FD-CLIP / FD-classifier.
    The value is symmetric in ``a`` and ``b`` and 0 for identical sets (up to round-off, so it can be a
    tiny negative number).

    Args:
        a: Statistics, or a feature matrix of shape ``(N1, D)`` with N1 ≥ 2.
        b: Statistics, or a feature matrix of shape ``(N2, D)`` with N2 ≥ 2.

    Returns:
        The distance as a Python float.

    Raises:
        ValueError: If the feature dimensions differ or a set has fewer than 2 vectors.
    """
    sa, sb = _as_stats(a), _as_stats(b)
    if sa.dim != sb.dim:
        raise ValueError(
            f"Feature dimensions differ: {sa.dim} vs {sb.dim}; both sets must use the same feature extractor."
        )
    mu1, sigma1 = sa.mean.to(torch.float64), sa.covariance.to(torch.float64)
    mu2 = sb.mean.to(device=mu1.device, dtype=torch.float64)
    sigma2 = sb.covariance.to(device=mu1.device, dtype=torch.float64)
    mean_term = (mu1 - mu2).square().sum().item()
    trace_term = torch.trace(sigma1).item() + torch.trace(sigma2).item() - 2.0 * trace_sqrt_product(sigma1, sigma2)
    return mean_term + trace_term


def delta_fd(fd_student: float, fd_teacher: float) -> float:
    """ΔFD = FD(student, reference) − FD(teacher, reference); negative means the student is closer."""
    return float(fd_student) - float(fd_teacher)


# ----------------------------------------------------------------------------------------------------
# Paired error and accuracy
# ----------------------------------------------------------------------------------------------------
def paired_error(samples: Tensor, references: Tensor) -> dict[str, Any]:
    r"""Mean squared error between each sample and the reference drawn from the same noise.

    For pair i with D elements, :math:`e_i = \frac{1}{D}\sum_j (x_{ij} - y_{ij})^2`.

    Args:
        samples: Student samples, shape ``(N, ...)``.
        references: Teacher (many-step) samples from the same initial noise, same shape as ``samples``.

    Returns:
        ``{"mse": mean_i e_i, "mse_std": std_i e_i (unbiased; 0 when N = 1), "rmse": sqrt(mse),
        "per_pair_mse": Tensor (N,) float64}``.

    Raises:
        ValueError: If the shapes differ or there is no batch dimension / no pair.
    """
    if samples.shape != references.shape:
        raise ValueError(
            f"samples and references must have the same shape, got {tuple(samples.shape)} and {tuple(references.shape)}."
        )
    if samples.ndim < 1 or samples.shape[0] == 0:
        raise ValueError(f"Expected a batch of shape (N, ...) with N >= 1, got {tuple(samples.shape)}.")
    diff = samples.to(torch.float64) - references.to(device=samples.device, dtype=torch.float64)
    per_pair = diff.reshape(diff.shape[0], -1).square().mean(dim=1)
    mse = per_pair.mean().item()
    mse_std = per_pair.std().item() if per_pair.numel() > 1 else 0.0
    return {"mse": mse, "mse_std": mse_std, "rmse": mse**0.5, "per_pair_mse": per_pair}


def classifier_accuracy(logits: Tensor, labels: Tensor) -> float:
    """Fraction of rows whose arg-max class equals the label.

    Args:
        logits: Class scores, shape ``(N, K)``.
        labels: Integer labels, shape ``(N,)``.

    Returns:
        Accuracy in [0, 1].
    """
    if logits.ndim != 2:
        raise ValueError(f"logits must have shape (N, K), got {tuple(logits.shape)}.")
    if labels.shape != (logits.shape[0],):
        raise ValueError(f"labels must have shape (N,) = ({logits.shape[0]},), got {tuple(labels.shape)}.")
    if logits.shape[0] == 0:
        raise ValueError("Cannot compute an accuracy over 0 samples.")
    predictions = logits.argmax(dim=1)
    return (predictions == labels.to(predictions.device)).double().mean().item()


# ----------------------------------------------------------------------------------------------------
# Feature extractors and their registry
# ----------------------------------------------------------------------------------------------------
@runtime_checkable
class FeatureExtractor(Protocol):
    """Maps images ``(B, C, H, W)`` float in [0, 1] to features ``(B, D)``; ``name`` labels reports."""

    name: str

    def __call__(self, images: Tensor) -> Tensor: ...


#: name -> factory, or "module:attribute" of a factory defined in a module imported only when it is built.
_FEATURE_EXTRACTORS: dict[str, Callable[..., FeatureExtractor] | str] = {}


def register_feature_extractor(
    name: str, *, overwrite: bool = False
) -> Callable[[Callable[..., FeatureExtractor]], Callable[..., FeatureExtractor]]:
    """Decorator that registers a feature-extractor factory (a class or a function) under ``name``.

    The factory is called as ``factory(**kwargs)`` by :func:`get_feature_extractor`; heavy imports and
    weight loading belong inside it, so that registering costs nothing. A lazy ``"module:attribute"`` entry
    is a placeholder that any registration under its name replaces (its module registering itself when imported).

    Example:
        >>> @register_feature_extractor("my-features")
        ... class MyFeatures:
        ...     name = "my-features"
        ...     def __call__(self, images): return images.flatten(1)
    """

    def decorator(factory: Callable[..., FeatureExtractor]) -> Callable[..., FeatureExtractor]:
        existing = _FEATURE_EXTRACTORS.get(name)
        if existing is not None and not isinstance(existing, str) and existing is not factory and not overwrite:
            raise ValueError(f"A feature extractor named {name!r} is already registered; pass overwrite=True.")
        _FEATURE_EXTRACTORS[name] = factory
        return factory

    return decorator


def available_feature_extractors() -> list[str]:
    """Sorted names of the registered feature extractors (lazy entries included, nothing is imported)."""
    return sorted(_FEATURE_EXTRACTORS)


def feature_extractor_factory(name: str) -> Callable[..., FeatureExtractor]:
    """The factory registered under ``name``, or the one ``name`` points to as ``"module:attribute"``.

    A lazy entry's module is imported here, once.

    Raises:
        ValueError: If ``name`` is neither registered nor of the form ``"module:attribute"``; the message
            lists the known names.
        ImportError: If the module of a ``"module:attribute"`` cannot be imported or lacks the attribute.
    """
    factory = _FEATURE_EXTRACTORS.get(name, name if ":" in name else None)
    if factory is None:
        known = ", ".join(repr(n) for n in available_feature_extractors())
        raise ValueError(
            f"Unknown feature extractor {name!r}; known: {known}, or any 'module:attribute' of a factory."
        )
    if isinstance(factory, str):
        module_name, _, attribute = factory.partition(":")
        try:
            resolved = getattr(importlib.import_module(module_name), attribute)
        except AttributeError as error:
            raise ImportError(f"Feature extractor {name!r}: module {module_name!r} has no {attribute!r}.") from error
        if name in _FEATURE_EXTRACTORS:
            _FEATURE_EXTRACTORS[name] = resolved
        factory = resolved
    return factory


def get_feature_extractor(name: str, **kwargs: Any) -> FeatureExtractor:
    """Build the feature extractor registered under ``name`` (or at ``"module:attribute"``) with ``kwargs``.

    Raises:
        ValueError: If ``name`` is unknown; the message lists the known names.
        ImportError: If a lazy entry's module cannot be imported.
    """
    return feature_extractor_factory(name)(**kwargs)


@torch.no_grad()
def extract_features(
    extractor: Callable[[Tensor], Tensor], images: Tensor | Iterable[Tensor], *, batch_size: int = 64
) -> Tensor:
    """Run ``extractor`` over a tensor ``(N, C, H, W)`` in batches, or over an iterable of batches.

    Returns:
        Features ``(N, D)`` as float64 on the CPU.
    """
    batches = images.split(batch_size) if isinstance(images, Tensor) else images
    return torch.cat([extractor(batch).to("cpu", torch.float64) for batch in batches])


def _to_rgb(images: Tensor) -> Tensor:
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must have shape (B, 1 or 3, H, W), got {tuple(images.shape)}.")
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def _looks_local(path: str) -> bool:
    return os.path.isabs(path) or path.startswith((".", "~")) or os.path.exists(path)


# OpenAI CLIP preprocessing constants (CLIPImageProcessor defaults).
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@register_feature_extractor("clip")
class CLIPFeatureExtractor:
    """CLIP image embeddings (``CLIPModel.get_image_features``), e.g. for FD-CLIP and the CLIP score.

    Preprocessing follows ``CLIPImageProcessor`` in torch: bicubic resize of the short side to the
    model's image size, center crop, normalization with the OpenAI mean/std. Grayscale is repeated to RGB.
    The model (and, on first text use, its tokenizer) is loaded when the extractor is built.

    Args:
        model_path: Local directory or Hub id of a ``transformers`` CLIP checkpoint.
        device: Device to run on (default: CUDA if available, else CPU).
        dtype: Model dtype.
        normalize: If True, return L2-normalized embeddings.

    Raises:
        ImportError: If ``transformers`` is not installed.
        OSError: If the checkpoint cannot be found or loaded (e.g. offline and not cached).
    """

    name = "clip"

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        normalize: bool = False,
    ) -> None:
        try:
            from transformers import CLIPModel
        except ImportError as error:
            raise ImportError(
                "The 'clip' feature extractor needs `transformers`: pip install -c constraints.txt transformers"
            ) from error
        self.model_path = str(model_path)
        if _looks_local(self.model_path) and not os.path.isdir(os.path.expanduser(self.model_path)):
            raise OSError(f"CLIP model directory {self.model_path!r} does not exist.")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = dtype
        self.normalize = normalize
        try:
            # No dtype kwarg: its name changed across transformers versions (torch_dtype → dtype).
            model = CLIPModel.from_pretrained(os.path.expanduser(self.model_path))
        except OSError as error:
            raise OSError(
                f"Could not load a CLIP model from {self.model_path!r}: pass a local directory holding a "
                "`transformers` CLIPModel checkpoint, or a Hub id (downloading needs network access; with "
                "HF_HUB_OFFLINE=1 only files already in the Hugging Face cache are found)."
            ) from error
        self.model = model.to(self.device, dtype).eval().requires_grad_(False)
        self.image_size: int = self.model.config.vision_config.image_size
        self._tokenizer: Any = None

    def preprocess(self, images: Tensor) -> Tensor:
        """``(B, C, H, W)`` in [0, 1] → normalized ``(B, 3, S, S)`` pixel values, S = model image size."""
        x = _to_rgb(images).to(self.device, torch.float32)
        h, w = x.shape[-2:]
        scale = self.image_size / min(h, w)
        size = (max(self.image_size, round(h * scale)), max(self.image_size, round(w * scale)))
        x = torch.nn.functional.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)
        top, left = (size[0] - self.image_size) // 2, (size[1] - self.image_size) // 2
        x = x[..., top : top + self.image_size, left : left + self.image_size].clamp(0.0, 1.0)
        mean = torch.tensor(_CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(_CLIP_STD, device=x.device).view(1, 3, 1, 1)
        return ((x - mean) / std).to(self.dtype)

    @staticmethod
    def _embeds(output: Any) -> Tensor:
        # transformers < 5 returns the projected embeddings, >= 5 an output whose pooler_output holds them.
        return output if isinstance(output, Tensor) else output.pooler_output

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        """Image embeddings, shape ``(B, D)`` float32."""
        features = self._embeds(self.model.get_image_features(pixel_values=self.preprocess(images))).float()
        return torch.nn.functional.normalize(features, dim=-1) if self.normalize else features

    @torch.no_grad()
    def text_features(self, prompts: Sequence[str]) -> Tensor:
        """Text embeddings for ``prompts``, shape ``(len(prompts), D)`` float32 (truncated to 77 tokens)."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(os.path.expanduser(self.model_path))
        tokens = self._tokenizer(list(prompts), padding=True, truncation=True, max_length=77, return_tensors="pt").to(
            self.device
        )
        features = self.model.get_text_features(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
        return self._embeds(features).float()


@register_feature_extractor("inception")
class InceptionFeatureExtractor:
    """FID's Inception-v3 pool features (2048-D) through ``torchmetrics`` (which needs ``torch-fidelity``).

    Neither package is a dependency of this project; install them to use this extractor. The network
    weights are downloaded by ``torch-fidelity`` on first use.

    Args:
        device: Device to run on (default: CUDA if available, else CPU).

    Raises:
        ImportError: If ``torchmetrics`` or ``torch-fidelity`` is missing.
    """

    name = "inception"

    def __init__(self, *, device: str | torch.device | None = None) -> None:
        try:
            import torch_fidelity  # noqa: F401
            from torchmetrics.image.fid import NoTrainInceptionV3
        except ImportError as error:
            raise ImportError(
                "The 'inception' feature extractor needs `torchmetrics` and `torch-fidelity`: "
                "pip install -c constraints.txt torchmetrics torch-fidelity. "
                "Alternatively use the 'clip' extractor (FD-CLIP)."
            ) from error
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"]).to(self.device).eval()

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        """Pool features, shape ``(B, 2048)``; images are quantized to uint8 as FID expects."""
        x = (_to_rgb(images).clamp(0.0, 1.0) * 255.0).round().to(self.device, torch.uint8)
        return self.model(x).reshape(x.shape[0], -1).float()


# ----------------------------------------------------------------------------------------------------
# CLIP score
# ----------------------------------------------------------------------------------------------------
def clip_score_from_features(image_features: Tensor, text_features: Tensor) -> float:
    r"""CLIP score :math:`100 \cdot \operatorname{mean}_i \max(\cos(f^{img}_i, f^{txt}_i), 0)` (as in torchmetrics).

    Args:
        image_features: Image embeddings, shape ``(N, D)``.
        text_features: Embeddings of the matching prompts, shape ``(N, D)``.
    """
    if image_features.shape != text_features.shape or image_features.ndim != 2:
        raise ValueError(
            "image_features and text_features must both have shape (N, D), got "
            f"{tuple(image_features.shape)} and {tuple(text_features.shape)}."
        )
    cos = torch.nn.functional.cosine_similarity(
        image_features.double(), text_features.double().to(image_features.device)
    )
    return 100.0 * cos.clamp_min(0.0).mean().item()


def clip_score(
    images: Tensor,
    prompts: Sequence[str],
    model_path: str | os.PathLike[str] | CLIPFeatureExtractor,
    *,
    batch_size: int = 32,
) -> float:
    """CLIP score of ``images`` ``(N, C, H, W)`` in [0, 1] against their ``prompts`` (N strings).

    ``model_path`` may be an already built :class:`CLIPFeatureExtractor` to avoid reloading the model.
    Raises the same errors as :class:`CLIPFeatureExtractor` when the model is unavailable.
    """
    if len(prompts) != images.shape[0]:
        raise ValueError(f"Got {images.shape[0]} images but {len(prompts)} prompts.")
    clip = model_path if isinstance(model_path, CLIPFeatureExtractor) else CLIPFeatureExtractor(model_path)
    image_features = extract_features(clip, images, batch_size=batch_size)
    text_features = torch.cat(
        [clip.text_features(prompts[i : i + batch_size]).cpu() for i in range(0, len(prompts), batch_size)]
    )
    return clip_score_from_features(image_features, text_features)


# ----------------------------------------------------------------------------------------------------
# Latency
# ----------------------------------------------------------------------------------------------------
def time_call(fn: Callable[[], Any], *, warmup: int = 1, repeats: int = 3) -> dict[str, Any]:
    """Wall-clock latency of ``fn()``: ``warmup`` untimed calls, then the median of ``repeats`` timed calls.

    When CUDA has been initialized, the device is synchronized before starting and stopping each timer
    so that queued kernels are counted.

    Returns:
        ``{"median_s": float, "all": list[float]}`` in seconds.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"Need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}.")

    def sync() -> None:
        # Checked on every call: fn itself may be what initializes CUDA.
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "all": times}
