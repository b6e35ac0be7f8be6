"""Contracts of the evaluation metrics, pinned with tiny float64 inputs and closed forms."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from scfm_diffusers.evaluation import metrics
from scfm_diffusers.evaluation.metrics import (
    CLIPFeatureExtractor,
    FeatureExtractor,
    FeatureStats,
    available_feature_extractors,
    classifier_accuracy,
    clip_score,
    clip_score_from_features,
    delta_fd,
    extract_features,
    frechet_distance,
    get_feature_extractor,
    paired_error,
    register_feature_extractor,
    time_call,
    trace_sqrt_product,
)


def _random_spd(d: int, generator: torch.Generator) -> torch.Tensor:
    a = torch.randn(d, d, generator=generator, dtype=torch.float64)
    return a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64)


def _closed_form_fd(mu1, sigma1, mu2, sigma2) -> float:
    """Reference FD through scipy's general sqrtm (an independent implementation)."""
    scipy_linalg = pytest.importorskip("scipy.linalg")
    covmean = scipy_linalg.sqrtm(sigma1.numpy() @ sigma2.numpy()).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1.numpy() + sigma2.numpy() - 2 * covmean))


# ----------------------------------------------------------------------------------------------------
# FeatureStats and Fréchet distance
# ----------------------------------------------------------------------------------------------------
def test_feature_stats_matches_numpy():
    x = torch.randn(50, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    stats = FeatureStats.from_features(x)
    assert stats.count == 50 and stats.dim == 4
    torch.testing.assert_close(stats.mean, x.mean(0))
    torch.testing.assert_close(stats.covariance, torch.from_numpy(np.cov(x.numpy(), rowvar=False)))


def test_fd_of_identical_sets_is_zero():
    x = torch.randn(200, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert abs(frechet_distance(x, x)) < 1e-8
    assert abs(frechet_distance(FeatureStats.from_features(x), x.numpy())) < 1e-8


def test_fd_diagonal_closed_form():
    mu1 = torch.tensor([0.0, 1.0, -2.0], dtype=torch.float64)
    mu2 = torch.tensor([0.5, 1.0, 1.0], dtype=torch.float64)
    var1 = torch.tensor([1.0, 4.0, 0.25], dtype=torch.float64)
    var2 = torch.tensor([9.0, 1.0, 0.25], dtype=torch.float64)
    a = FeatureStats(mu1, torch.diag(var1), count=10)
    b = FeatureStats(mu2, torch.diag(var2), count=10)
    expected = ((mu1 - mu2) ** 2).sum().item() + ((var1.sqrt() - var2.sqrt()) ** 2).sum().item()
    assert expected == pytest.approx(0.25 + 9.0 + 4.0 + 1.0)
    assert frechet_distance(a, b) == pytest.approx(expected, abs=1e-10)


def test_fd_full_covariance_closed_form_and_symmetry():
    g = torch.Generator().manual_seed(2)
    mu1, mu2 = torch.randn(5, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
    sigma1, sigma2 = _random_spd(5, g), _random_spd(5, g)
    a, b = FeatureStats(mu1, sigma1, count=100), FeatureStats(mu2, sigma2, count=100)
    expected = _closed_form_fd(mu1, sigma1, mu2, sigma2)
    assert frechet_distance(a, b) == pytest.approx(expected, abs=1e-9)
    assert frechet_distance(b, a) == pytest.approx(frechet_distance(a, b), abs=1e-10)


def test_fd_from_samples_approaches_gaussian_closed_form():
    g = torch.Generator().manual_seed(3)
    sigma1, sigma2 = _random_spd(3, g), _random_spd(3, g)
    mu1 = torch.zeros(3, dtype=torch.float64)
    mu2 = torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64)
    n = 200_000
    x1 = mu1 + torch.randn(n, 3, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(sigma1).T
    x2 = mu2 + torch.randn(n, 3, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(sigma2).T
    expected = _closed_form_fd(mu1, sigma1, mu2, sigma2)
    assert frechet_distance(x1, x2) == pytest.approx(expected, rel=2e-2, abs=2e-2)


def test_trace_sqrt_product_commuting_case():
    # For commuting Σ1 = Σ2 = Σ, tr((Σ Σ)^{1/2}) = tr(Σ).
    sigma = _random_spd(6, torch.Generator().manual_seed(4))
    assert trace_sqrt_product(sigma, sigma) == pytest.approx(torch.trace(sigma).item(), abs=1e-10)


def test_fd_is_invariant_to_a_shared_rotation_and_shift():
    g = torch.Generator().manual_seed(5)
    x1 = torch.randn(100, 4, generator=g, dtype=torch.float64)
    x2 = 2 * torch.randn(100, 4, generator=g, dtype=torch.float64) + 1
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=torch.float64))
    shift = torch.randn(4, generator=g, dtype=torch.float64)
    assert frechet_distance(x1 @ q + shift, x2 @ q + shift) == pytest.approx(frechet_distance(x1, x2), rel=1e-9)


def test_fd_errors():
    with pytest.raises(ValueError, match="Feature dimensions differ: 3 vs 4"):
        frechet_distance(torch.randn(10, 3), torch.randn(10, 4))
    with pytest.raises(ValueError, match="at least 2 feature vectors.*N=1"):
        frechet_distance(torch.randn(1, 3), torch.randn(10, 3))
    with pytest.raises(ValueError, match=r"shape \(N, D\)"):
        FeatureStats.from_features(torch.randn(10))
    with pytest.raises(ValueError, match="covariance must have shape"):
        FeatureStats(torch.zeros(3), torch.eye(2), count=5)


def test_delta_fd():
    assert delta_fd(2.58, 2.42) == pytest.approx(0.16)
    assert delta_fd(4.0, 5.0) < 0


# ----------------------------------------------------------------------------------------------------
# Paired error and accuracy
# ----------------------------------------------------------------------------------------------------
def test_paired_error_on_constructed_inputs():
    references = torch.zeros(3, 1, 2, 2, dtype=torch.float64)
    # Per-pair MSE: 0, 1, 4 (constant offsets 0, 1, 2 over every pixel).
    samples = references + torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64).view(3, 1, 1, 1)
    result = paired_error(samples, references)
    torch.testing.assert_close(result["per_pair_mse"], torch.tensor([0.0, 1.0, 4.0], dtype=torch.float64))
    assert result["mse"] == pytest.approx(5 / 3)
    assert result["mse_std"] == pytest.approx(np.std([0.0, 1.0, 4.0], ddof=1))
    assert result["rmse"] == pytest.approx(math.sqrt(5 / 3))
    assert paired_error(samples[:1], references[:1])["mse_std"] == 0.0


def test_paired_error_identical_is_zero_and_shape_errors():
    x = torch.rand(4, 3, 8, 8)
    assert paired_error(x, x.clone())["mse"] == 0.0
    with pytest.raises(ValueError, match="same shape"):
        paired_error(torch.zeros(4, 3, 8, 8), torch.zeros(4, 3, 8, 7))
    with pytest.raises(ValueError, match="N >= 1"):
        paired_error(torch.zeros(0, 3), torch.zeros(0, 3))


def test_classifier_accuracy():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [0.0, 0.0, 1.0], [5.0, 0.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 2])
    assert classifier_accuracy(logits, labels) == pytest.approx(0.5)
    with pytest.raises(ValueError, match=r"labels must have shape \(N,\) = \(4,\)"):
        classifier_accuracy(logits, labels[:3])
    with pytest.raises(ValueError, match=r"logits must have shape \(N, K\)"):
        classifier_accuracy(labels.float(), labels)


# ----------------------------------------------------------------------------------------------------
# Registry and extractors
# ----------------------------------------------------------------------------------------------------
def test_registry_other_modules_can_register_and_unknown_name_lists_known(monkeypatch):
    monkeypatch.setattr(metrics, "_FEATURE_EXTRACTORS", dict(metrics._FEATURE_EXTRACTORS))  # undone after the test

    @register_feature_extractor("test-flatten")
    class Flatten:
        name = "test-flatten"

        def __init__(self, scale: float = 1.0) -> None:
            self.scale = scale

        def __call__(self, images: torch.Tensor) -> torch.Tensor:
            return self.scale * images.flatten(1)

    extractor = get_feature_extractor("test-flatten", scale=2.0)
    assert isinstance(extractor, FeatureExtractor)
    assert {"clip", "inception", "test-flatten"} <= set(available_feature_extractors())
    features = extract_features(extractor, torch.ones(5, 1, 2, 2), batch_size=2)
    assert features.shape == (5, 4) and features.dtype == torch.float64 and bool((features == 2).all())

    with pytest.raises(ValueError, match="already registered"):
        register_feature_extractor("test-flatten")(lambda: Flatten())
    with pytest.raises(ValueError, match=r"Unknown feature extractor 'nope'; known: 'clip', ") as error:
        get_feature_extractor("nope")
    assert all(repr(name) in str(error.value) for name in ("clip", "inception", "test-flatten"))


def test_lazy_entries_import_their_module_only_when_built(monkeypatch, tmp_path):
    monkeypatch.setattr(metrics, "_FEATURE_EXTRACTORS", dict(metrics._FEATURE_EXTRACTORS))  # undone after the test
    (tmp_path / "scfm_test_lazy_features.py").write_text(
        "class Flatten:\n"
        "    name = 'flatten'\n"
        "    def __init__(self, scale=1.0):\n"
        "        self.scale = scale\n"
        "    def __call__(self, images):\n"
        "        return self.scale * images.flatten(1)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "scfm_test_lazy_features", raising=False)
    metrics._FEATURE_EXTRACTORS["test-lazy"] = "scfm_test_lazy_features:Flatten"
    assert "test-lazy" in available_feature_extractors() and "scfm_test_lazy_features" not in sys.modules
    extractor = get_feature_extractor("test-lazy", scale=3.0)
    assert "scfm_test_lazy_features" in sys.modules and extractor(torch.ones(1, 1, 2, 2)).tolist() == [[3.0] * 4]
    # Resolved once; any "module:attribute" works unregistered; a registration replaces a lazy placeholder.
    assert metrics._FEATURE_EXTRACTORS["test-lazy"] is type(extractor)
    assert type(get_feature_extractor("scfm_test_lazy_features:Flatten")) is type(extractor)
    metrics._FEATURE_EXTRACTORS["test-placeholder"] = "scfm_test_lazy_features:Flatten"
    register_feature_extractor("test-placeholder")(type(extractor))
    with pytest.raises(ImportError, match="has no 'Missing'"):
        get_feature_extractor("scfm_test_lazy_features:Missing")
    with pytest.raises(ModuleNotFoundError):
        get_feature_extractor("scfm_no_such_module:Factory")


def test_the_registry_does_not_name_the_demo():
    """In a fresh interpreter the library registers only its own extractors; the digits demo's classifier is
    reached as ``module:attribute`` (with ``examples/`` on the path) and registers itself when imported."""
    examples = Path(__file__).resolve().parents[1] / "examples"
    probe = (
        "import json\n"
        "from scfm_diffusers.evaluation import metrics\n"
        "before = metrics.available_feature_extractors()\n"
        "factory = metrics.feature_extractor_factory('digits_demo.digits:DigitsClassifierFeatureExtractor')\n"
        "print(json.dumps([before, metrics.available_feature_extractors(), factory.__module__, factory.__name__]))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(examples), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    before, after, module, name = json.loads(result.stdout.splitlines()[-1])
    assert {"clip", "inception"} <= set(before) and not [n for n in before if "digit" in n]
    assert set(after) - set(before) == {"digits-classifier"}
    assert (module, name) == ("digits_demo.digits", "DigitsClassifierFeatureExtractor")


def test_clip_missing_local_dir_gives_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="CLIP model directory .* does not exist"):
        get_feature_extractor("clip", model_path=str(tmp_path / "missing"))
    with pytest.raises(OSError, match="CLIP model"):
        clip_score(torch.rand(1, 3, 8, 8), ["a digit"], tmp_path / "missing")


def test_clip_unloadable_existing_dir_gives_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="Could not load a CLIP model"):
        CLIPFeatureExtractor(tmp_path)


@pytest.mark.skipif(
    importlib.util.find_spec("torch_fidelity") is not None and importlib.util.find_spec("torchmetrics") is not None,
    reason="torchmetrics and torch-fidelity are installed",
)
def test_inception_without_its_packages_gives_clear_error():
    with pytest.raises(ImportError, match="torch-fidelity"):
        get_feature_extractor("inception")


def test_clip_score_from_features():
    image = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    text = torch.tensor([[2.0, 0.0], [1.0, 1.0], [0.0, -1.0]])  # cos = 1, 1/√2, -1 → clamped to 0
    assert clip_score_from_features(image, text) == pytest.approx(100 * (1 + 1 / math.sqrt(2)) / 3)
    with pytest.raises(ValueError, match="same|shape"):
        clip_score_from_features(image, text[:2])


# ----------------------------------------------------------------------------------------------------
# Latency
# ----------------------------------------------------------------------------------------------------
def test_time_call_counts_warmup_and_repeats():
    calls = []
    result = time_call(lambda: calls.append(1), warmup=2, repeats=5)
    assert len(calls) == 7
    assert len(result["all"]) == 5 and all(t >= 0 for t in result["all"])
    assert result["median_s"] == sorted(result["all"])[2]
    with pytest.raises(ValueError, match="repeats"):
        time_call(lambda: None, repeats=0)


def test_clip_extractor_with_a_tiny_random_checkpoint(tmp_path, monkeypatch):
    """The image path end to end (preprocessing, transformers' output type) without downloading weights."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    vision = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = transformers.CLIPConfig(
        text_config={**vision, "vocab_size": 64},
        vision_config={**vision, "image_size": 32, "patch_size": 8},
        projection_dim=12,
    )
    transformers.CLIPModel(config).save_pretrained(tmp_path)
    extractor = get_feature_extractor("clip", model_path=str(tmp_path), device="cpu", normalize=True)
    assert extractor.preprocess(torch.rand(2, 1, 20, 28)).shape == (2, 3, 32, 32)
    features = extractor(torch.rand(3, 3, 16, 16))
    assert features.shape == (3, 12)
    torch.testing.assert_close(features.norm(dim=-1), torch.ones(3))
