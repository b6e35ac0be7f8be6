"""Contracts of the digits demo: data, a few-step teacher that saves/loads as a stock Flux pipeline, caching,
and the registered classifier; and that the library does not know the demo. Step counts are tiny: these tests
check plumbing, not quality."""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import time
from pathlib import Path

import pytest
import torch
from diffusers import FluxPipeline
from digits_demo.digits import (
    DIGIT_WORDS,
    DIGITS_CLASSIFIER_NAME,
    DigitsClassifierConfig,
    DigitsClassifierFeatureExtractor,
    DigitsTeacherConfig,
    DigitsTrainingBatch,
    digit_prompt,
    digits_split,
    load_digits_images,
    sample_digits,
    sample_sigmas,
    train_digits_classifier,
    train_digits_teacher,
)

from scfm_diffusers.evaluation.metrics import (
    available_feature_extractors,
    feature_extractor_factory,
    get_feature_extractor,
)

TINY_TEACHER = DigitsTeacherConfig(
    num_layers=1, num_single_layers=1, num_attention_heads=2, vae_channels=4, vae_steps=2, warmup_steps=1
)


def test_digit_prompts():
    assert len(DIGIT_WORDS) == 10
    assert digit_prompt(7) == "a handwritten digit seven"
    assert len({digit_prompt(label) for label in range(10)}) == 10
    with pytest.raises(ValueError):
        digit_prompt(10)


def test_digits_images_are_grey_rgb_in_range():
    images, labels = load_digits_images()
    assert images.shape == (1797, 3, 16, 16) and images.dtype == torch.float32
    assert labels.shape == (1797,) and set(labels.tolist()) == set(range(10))
    assert images.min() >= -1.0 and images.max() <= 1.0
    assert torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 0], images[:, 2])


def test_split_is_fixed_stratified_and_disjoint():
    a, b = digits_split(seed=0), digits_split(seed=0)
    assert a.train_images.shape == (1437, 3, 16, 16) and a.eval_images.shape == (360, 3, 16, 16)
    assert torch.equal(a.eval_images, b.eval_images) and torch.equal(a.train_labels, b.train_labels)
    # Stratified: every class keeps its share (the classes hold 174–183 images, so 35–37 each).
    assert all(35 <= count <= 37 for count in torch.bincount(a.eval_labels, minlength=10).tolist())
    # No eval image appears in the training split.
    train = {tuple(x.flatten().tolist()) for x in a.train_images[:, 0]}
    assert not any(tuple(x.flatten().tolist()) in train for x in a.eval_images[:20, 0])
    assert not torch.equal(digits_split(seed=1).eval_labels, a.eval_labels)


@pytest.mark.parametrize("method", ["uniform", "logit_normal"])
def test_sample_sigmas(method):
    sigmas = sample_sigmas(1000, method, torch.Generator().manual_seed(0))
    assert sigmas.shape == (1000,) and sigmas.min() > 0.0 and sigmas.max() < 1.0
    with pytest.raises(ValueError):
        sample_sigmas(4, "cosine")


def test_config_validation():
    with pytest.raises(ValueError, match="sigma_sampling"):
        DigitsTeacherConfig(sigma_sampling="cosine")
    with pytest.raises(ValueError, match="axes_dims_rope"):
        DigitsTeacherConfig(attention_head_dim=32)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    calls: list[DigitsTrainingBatch] = []

    def hook(transformer, batch):
        calls.append(batch)
        return 0.0 * batch.prediction.sum()

    path = tmp_path_factory.mktemp("digits") / "teacher"
    result = train_digits_teacher(path, steps=2, batch_size=4, config=TINY_TEACHER, extra_loss=hook, progress=False)
    return Path(result), hook, calls


def test_teacher_trains_and_calls_the_extra_loss_hook(teacher):
    path, _, calls = teacher
    assert [batch.step for batch in calls] == [0, 1]
    batch = calls[0]
    assert batch.latents.shape == batch.prediction.shape == batch.target.shape == (4, 64, 4)
    assert batch.sigmas.shape == (4,) and batch.prompt_embeds.shape[:2] == (4, TINY_TEACHER.max_sequence_length)
    torch.testing.assert_close(batch.target, batch.noise - batch.latents)
    s = batch.sigmas[:, None, None]
    torch.testing.assert_close(batch.noisy_latents, (1 - s) * batch.latents + s * batch.noise)
    record = json.loads((path / "scfm_digits_teacher.json").read_text())
    assert record["finished"] and record["settings"]["steps"] == 2


def test_saved_teacher_loads_as_a_stock_flux_pipeline(teacher):
    path, _, _ = teacher
    pipe = FluxPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae.config.latent_channels == 1 and not pipe.transformer.config.guidance_embeds
    # The VAE scaling was set from the latent statistics (not the builder's placeholder values).
    assert pipe.vae.config.scaling_factor != 1.5035
    images = sample_digits(pipe, [3, 7], num_inference_steps=2)
    assert images.shape == (2, 3, 16, 16) and images.min() >= 0.0 and images.max() <= 1.0
    again = sample_digits(pipe, [3, 7], num_inference_steps=2)
    torch.testing.assert_close(images, again)


def test_teacher_cache_skips_training(teacher):
    path, hook, _ = teacher
    stamps = {p: p.stat().st_mtime_ns for p in path.rglob("*") if p.is_file()}
    start = time.perf_counter()
    assert train_digits_teacher(path, steps=2, batch_size=4, config=TINY_TEACHER, extra_loss=hook, progress=False)
    assert time.perf_counter() - start < 1.0
    assert stamps == {p: p.stat().st_mtime_ns for p in path.rglob("*") if p.is_file()}


def test_classifier_is_registered_and_cached(tmp_path):
    assert DIGITS_CLASSIFIER_NAME in available_feature_extractors()
    config = DigitsClassifierConfig(epochs=1)
    extractor = get_feature_extractor(DIGITS_CLASSIFIER_NAME, path=tmp_path, config=config)
    assert isinstance(extractor, DigitsClassifierFeatureExtractor) and extractor.name == DIGITS_CLASSIFIER_NAME
    images = (digits_split().eval_images[:5] + 1) / 2
    features, logits = extractor(images), extractor.logits(images)
    assert features.shape == (5, config.feature_dim) and logits.shape == (5, 10)
    # Grey (B, 1, H, W) input and other sizes are accepted.
    assert extractor(images[:, :1]).shape == (5, config.feature_dim)
    assert extractor(torch.nn.functional.interpolate(images, size=32)).shape == (5, config.feature_dim)
    # scfm-eval's way in: the module:attribute of the class, which the library's registry does not name.
    name = "digits_demo.digits:DigitsClassifierFeatureExtractor"
    assert feature_extractor_factory(name) is DigitsClassifierFeatureExtractor
    torch.testing.assert_close(get_feature_extractor(name, path=tmp_path, config=config)(images), features)
    stamp = (tmp_path / "digits_classifier.pt").stat().st_mtime_ns
    start = time.perf_counter()
    train_digits_classifier(tmp_path, config=config, progress=False)
    assert time.perf_counter() - start < 1.0 and (tmp_path / "digits_classifier.pt").stat().st_mtime_ns == stamp
    record = json.loads((tmp_path / "digits_classifier.json").read_text())
    assert 0.0 <= record["test_accuracy"] <= 1.0


# ----------------------------------------------------------------------------------------------------
# The library does not know the demo: examples/digits_demo/ is a consumer of the package
# ----------------------------------------------------------------------------------------------------
SRC = Path(__file__).resolve().parents[1] / "src" / "scfm_diffusers"
#: The consumers in examples/, by module name: the library never imports them.
CONSUMERS = ("digits_demo", "train_scfm_lora")
#: A string that is a path into examples/ ("examples", "examples/train_scfm_lora.py"), not prose about it.
EXAMPLES_PATH = re.compile(r"(\.\./)*examples(/[\w./-]*)?")


def _reaches_outside(source: str, depth: int) -> list[str]:
    """What a module's code does to reach examples/: imports of its modules (also as "module:attribute" or
    ``import_module`` strings), path strings into it, and ``__file__`` climbed above the package's root,
    which is ``depth`` folders up from the module. Docstrings and messages may name examples/."""
    tree = ast.parse(source)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    found = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names = [node.value.partition(":")[0]]
            found += [f"path {node.value!r}"] if EXAMPLES_PATH.fullmatch(node.value) else []
        elif isinstance(node, ast.Name) and node.id == "__file__":
            climbs, here = 0, node
            while isinstance(parents.get(here), ast.expr):
                here, child = parents[here], here
                if isinstance(here, ast.Attribute) and here.attr == "parent":
                    climbs += 1
                elif isinstance(here, ast.Subscript) and getattr(here.value, "attr", None) == "parents":
                    climbs += here.slice.value + 1 if isinstance(here.slice, ast.Constant) else depth + 1
                elif (
                    isinstance(here, ast.Call) and getattr(here.func, "attr", None) == "dirname" and child in here.args
                ):
                    climbs += 1
            found += [f"__file__ climbed {climbs} folders (line {node.lineno})"] if climbs > depth else []
        found += [f"{name!r}: a module of examples/" for name in names if name.split(".")[0] in CONSUMERS]
    return found


def test_the_library_never_reaches_into_examples():
    # The check itself catches how the demo used to find the training script, and an import of the demo.
    old = 'from pathlib import Path\nimport digits_demo.digits\nPath(__file__).resolve().parents[3] / "examples"\n'
    assert len(_reaches_outside(old, depth=2)) == 3
    assert _reaches_outside('raise OSError("see examples/train_scfm_lora.py")\nPath(__file__).parent', depth=1) == []
    modules = sorted(SRC.rglob("*.py"))
    assert len(modules) > 20
    found = {
        str(path.relative_to(SRC)): problems
        for path in modules
        if (problems := _reaches_outside(path.read_text(encoding="utf-8"), depth=len(path.relative_to(SRC).parts)))
    }
    assert found == {}


def test_the_package_has_no_demo_module():
    assert importlib.util.find_spec("scfm_diffusers.evaluation.demo") is None
    assert importlib.util.find_spec("scfm_diffusers.evaluation.digits") is None
    assert [p for p in SRC.rglob("*.py") if p.stem in ("demo", "digits", "digits_demo")] == []
