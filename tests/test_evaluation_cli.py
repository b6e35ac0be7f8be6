"""The ``scfm-eval`` command: exit codes, stdout/stderr, lazy imports, and a run from a wheel without extras."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from scfm_diffusers.evaluation.cli import main, parse_args
from scfm_diffusers.evaluation.metrics import feature_extractor_factory
from scfm_diffusers.testing import save_tiny_pipeline

ROOT = Path(__file__).resolve().parents[1]
#: What the `train` extra brings and scfm-eval must do without.
TRAIN_ONLY = ("datasets", "matplotlib", "sklearn")


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# a comment\na cat\n\na dog\n")
    return path


def _stderr_lines(captured) -> list[str]:
    return [line for line in captured.err.splitlines() if line.strip()]


def test_help_exits_0_and_lists_the_extractors(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "--base_model" in out and "clip" in out and "module:factory" in out


def test_the_demo_classifier_is_a_module_factory(prompts_file):
    # The library's registry does not name the digits demo; scfm-eval reaches its classifier as module:attribute
    # (examples/ is on the tests' path, as PYTHONPATH=examples puts it on the command's).
    name = "digits_demo.digits:DigitsClassifierFeatureExtractor"
    args = parse_args(["--base_model", "m", "--prompts_file", str(prompts_file), "--feature_extractor", name])
    factory = feature_extractor_factory(args.feature_extractor)
    assert (factory.__module__, factory.__name__) == ("digits_demo.digits", "DigitsClassifierFeatureExtractor")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--prompts_file", "missing.txt"], "--prompts_file 'missing.txt' is not a file"),
        (["--feature_extractor", "nope"], "unknown --feature_extractor 'nope'; known: clip, "),
        (["--steps", "0"], "must be >= 1"),
        (["--num_images", "1", "--feature_extractor", "clip"], "--num_images must be >= 2"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_usage_errors_exit_2_with_one_error_line(capsys, tmp_path, prompts_file, argv, message):
    # A repeated option takes its last value.
    assert main(["--base_model", str(tmp_path), "--prompts_file", str(prompts_file), *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    errors = [line for line in _stderr_lines(captured) if not line.startswith(("usage:", " "))]
    assert len(errors) == 1 and errors[0].startswith("scfm-eval: error: ") and message in errors[0]


def test_a_failure_exits_1_with_one_error_line(capsys, tmp_path, prompts_file):
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n")
    assert main(["--base_model", str(tmp_path), "--prompts_file", str(empty)]) == 1
    lines = _stderr_lines(capsys.readouterr())
    assert lines == [f"scfm-eval: error: ValueError: Prompt file {str(empty)!r} holds no prompts (one per line; "
                     "'#' starts a comment)."]  # fmt: skip
    assert main(["--base_model", str(tmp_path / "no_model"), "--prompts_file", str(prompts_file)]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and "Traceback" not in captured.err
    assert _stderr_lines(captured)[-1].startswith("scfm-eval: error: ")


# ----------------------------------------------------------------------------------------------------
# A wheel in a fresh venv, without extras
# ----------------------------------------------------------------------------------------------------
def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _dependency_view(requirements: list[str], site_packages: Path, view: Path) -> list[str]:
    """Symlink into ``view`` the files of exactly the distributions ``requirements`` need, transitively.

    The distributions are those installed in ``site_packages`` (this venv); requirements are read with no
    extra unless one is asked for, as ``pip install`` would resolve them. Returns the distribution names.
    """
    installed = {
        _normalize(d.metadata["Name"]): d for d in importlib.metadata.distributions(path=[str(site_packages)])
    }
    seen: set[tuple[str, str]] = set()
    todo = [(Requirement(r), "") for r in requirements]
    while todo:
        requirement, extra = todo.pop()
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": extra}):
            continue
        name = _normalize(requirement.name)
        assert name in installed, f"{requirement} is required but not installed in {site_packages}"
        for wanted in [""] + sorted(requirement.extras):
            if (name, wanted) not in seen:
                seen.add((name, wanted))
                todo += [(Requirement(r), wanted) for r in installed[name].requires or []]
    view.mkdir()
    for name in sorted({name for name, _ in seen}):
        files = installed[name].files
        assert files is not None, f"{name} has no RECORD: cannot tell which files are its own"
        for top in {f.parts[0] for f in files if f.parts[0] not in ("..", "__pycache__")}:
            if not (view / top).exists() and not top.endswith(".pth"):
                (view / top).symlink_to(site_packages / top)
    return sorted({name for name, _ in seen})


def _source_copy(destination: Path) -> Path:
    """The package's source as git sees the working tree (so that the build writes nothing into it)."""
    listing = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "setup.py", "pyproject.toml", "README.md",
         "LICENSE", "MANIFEST.in", "src"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    for relative in listing:
        if (ROOT / relative).is_file():
            (destination / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / relative, destination / relative)
    return destination


@pytest.mark.slow
def test_console_script_from_a_wheel_without_extras(tmp_path):
    """`pip install scfm-diffusers` (no extras) gives a working `scfm-eval`.

    The wheel is built from the working tree and installed into a fresh venv with ``--no-deps``; its
    dependencies (install_requires, resolved transitively without extras) come from this venv's
    site-packages through a folder of symlinks named in a ``.pth`` file, so `datasets`, `matplotlib` and
    scikit-learn are really absent there and nothing is downloaded. ``pip check`` in the fresh venv proves
    the view holds everything the wheel requires.
    """
    python = sys.executable
    source = _source_copy(tmp_path / "source")
    subprocess.run([python, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "wheels"), str(source)], check=True, capture_output=True)  # fmt: skip
    (wheel,) = (tmp_path / "wheels").glob("scfm_diffusers-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([python, "-m", "venv", "--without-pip", str(venv)], check=True)
    fresh_python = venv / "bin" / "python"
    pip = [python, "-m", "pip", "--python", str(fresh_python)]
    subprocess.run([*pip, "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True, capture_output=True)
    fresh_site = Path(
        subprocess.run([fresh_python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                       check=True, capture_output=True, text=True).stdout.strip()
    )  # fmt: skip
    (dist_info,) = fresh_site.glob("scfm_diffusers-*.dist-info")
    requirements = importlib.metadata.Distribution.at(dist_info).requires or []
    names = _dependency_view(requirements, Path(sysconfig.get_paths()["purelib"]), tmp_path / "deps")
    assert {"torch", "diffusers", "transformers", "peft"} <= set(names)
    assert not {"datasets", "matplotlib", "scikit-learn"} & set(names)
    (fresh_site / "scfm_dependencies.pth").write_text(str(tmp_path / "deps") + "\n")
    check = subprocess.run([*pip, "check"], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", PYTHONDONTWRITEBYTECODE="1")
    # The wheel is what runs, the train-only packages are absent, the wheel holds no demo module (the demo lives in
    # examples/digits_demo/), and parsing a module:factory imports neither it nor the training data module.
    probe = f"""
import importlib.util, json, sys
import scfm_diffusers
from scfm_diffusers.evaluation import cli
cli.parse_args(["--base_model", "m", "--prompts_file", "p.txt", "--feature_extractor",
                "digits_demo.digits:DigitsClassifierFeatureExtractor"])
print(json.dumps([scfm_diffusers.__file__, [m for m in {TRAIN_ONLY!r} if importlib.util.find_spec(m)],
                  sorted({{"digits_demo", "digits_demo.digits", "scfm_diffusers.training.data"}} & set(sys.modules)),
                  [m for m in ("scfm_diffusers.evaluation.demo", "scfm_diffusers.evaluation.digits")
                   if importlib.util.find_spec(m)]]))
"""
    (tmp_path / "p.txt").write_text("a cat\na dog\n")
    found = subprocess.run([fresh_python, "-c", probe], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert found.returncode == 0, found.stderr
    origin, present, imported, demo_modules = json.loads(found.stdout.splitlines()[-1])
    assert origin.startswith(str(fresh_site)) and present == [] and imported == [] and demo_modules == []

    scfm_eval = str(venv / "bin" / "scfm-eval")
    help_run = subprocess.run([scfm_eval, "--help"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert help_run.returncode == 0, help_run.stderr
    assert "--base_model" in help_run.stdout

    model = save_tiny_pipeline("flux", tmp_path / "flux")
    out = tmp_path / "out"
    result = subprocess.run(
        [scfm_eval, "--base_model", model, "--prompts_file", "p.txt", "--num_images", "2", "--steps", "2",
         "--teacher_steps", "4", "--height", "32", "--width", "32", "--max_sequence_length", "16",
         "--latency_repeats", "1", "--device", "cpu", "--output_dir", str(out)],
        capture_output=True, text=True, env=env, cwd=tmp_path,
    )  # fmt: skip
    print(result.stdout, result.stderr, sep="\n")  # shown by pytest when the test fails, or with -s
    assert result.returncode == 0, result.stderr
    payload = json.loads((out / "results.json").read_text())
    assert [(r["method"], r["num_inference_steps"]) for r in payload["rows"]] == [("teacher", 4), ("teacher Euler", 2)]
    assert (out / "results.md").is_file() and (out / "grid.png").is_file()
    assert not (out / "quality_vs_steps.png").exists()  # no matplotlib: skipped, and said so
    # stdout: the table only.
    table = result.stdout.strip().splitlines()
    assert table[0].startswith("| method | steps |") and table[1].startswith("|---|") and len(table) == 4
    # stderr: log lines only (ours carry "scfm-eval:"), one of them about the skipped plot.
    assert "Traceback" not in result.stderr and "error" not in result.stderr.lower()
    assert "Warning:" not in result.stderr  # e.g. no FutureWarning for a deprecated argument
    ours = [line for line in result.stderr.splitlines() if " scfm-eval: " in line]
    assert any('pip install "scfm-diffusers[eval]"' in line for line in ours)
    assert any("Wrote " in line for line in ours)
