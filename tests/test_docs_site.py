"""The documentation site, the license and the PyPI page.

`make docs` builds mkdocs.yml with ``--strict``; here the same build runs into a temporary folder, and a copy
with a broken link shows that ``--strict`` catches it. setup.py is run with a stand-in ``setuptools``, to
read the long description and the metadata it would publish.
"""

import html
import importlib.util
import os
import re
import runpy
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
REPOSITORY = "https://github.com/scfm-diffusers/scfm-diffusers"
BLOB = f"{REPOSITORY}/blob/main/"
RAW = "https://raw.githubusercontent.com/scfm-diffusers/scfm-diffusers/main/"
DOCS_PACKAGES = ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python", "griffe_sphinx")
# Link targets of Markdown links and images, reference definitions and HTML src / href attributes.
LINK_TARGET = re.compile(r"(?:\]\(\s*|^\[[^\]]+\]:\s*|\b(?:src|href)=\")([^)\s\"]+)", re.MULTILINE)


def needs_docs_packages():
    missing = [name for name in DOCS_PACKAGES if importlib.util.find_spec(name.split(".")[0]) is None]
    if missing:
        pytest.skip(f"the docs extra is not installed (missing {', '.join(missing)}): pip install -e '.[docs]'")


def mkdocs_build(config: Path, site_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "--config-file",
            str(config),
            "--site-dir",
            str(site_dir),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},  # no banner from Material
    )


def nav_pages(nav) -> list[str]:
    """Every page path in an mkdocs nav (nested sections included)."""
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, list):
        return [page for item in nav for page in nav_pages(item)]
    if isinstance(nav, dict):
        return [page for value in nav.values() for page in nav_pages(value)]
    raise TypeError(f"unexpected nav entry {nav!r}")


def setup_kwargs() -> tuple[dict, dict]:
    """Run setup.py with a stand-in ``setuptools``; return (the keyword arguments of ``setup()``, its globals)."""
    captured = {}
    stand_in = types.ModuleType("setuptools")
    stand_in.setup = lambda **kwargs: captured.update(kwargs)
    stand_in.find_packages = lambda *args, **kwargs: []
    real = sys.modules.get("setuptools")
    sys.modules["setuptools"] = stand_in
    try:
        namespace = runpy.run_path(str(ROOT / "setup.py"))
    finally:
        if real is None:
            del sys.modules["setuptools"]
        else:
            sys.modules["setuptools"] = real
    return captured, namespace


def link_targets(markdown: str) -> list[str]:
    """Link targets outside fenced code blocks."""
    prose = re.sub(r"^```.*?^```", "", markdown, flags=re.MULTILINE | re.DOTALL)
    return LINK_TARGET.findall(prose)


def test_every_docs_page_is_in_the_nav():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    listed = nav_pages(config["nav"])
    pages = sorted(str(path.relative_to(ROOT / "docs")) for path in (ROOT / "docs").rglob("*.md"))
    assert sorted(set(listed)) == pages, "mkdocs.yml's nav lists exactly the pages in docs/"
    assert len(listed) == len(set(listed)), "no page is listed twice"
    assert listed[0] == "index.md"
    assert config["theme"]["name"] == "material"
    assert config["validation"]["nav"]["omitted_files"] == "warn", "--strict fails on a page left out of the nav"


def test_index_links_every_other_page():
    index = (ROOT / "docs" / "index.md").read_text(encoding="utf-8")
    linked = {target.split("#")[0] for target in link_targets(index)}
    pages = {path.name for path in (ROOT / "docs").glob("*.md")} - {"index.md"}
    assert pages <= linked, f"docs/index.md does not link {sorted(pages - linked)}"


def test_license_is_apache_2():
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text, "the full license text, not a notice"
    kwargs, _ = setup_kwargs()
    assert kwargs["license"] == "Apache-2.0"


def test_long_description_has_only_absolute_links():
    kwargs, _ = setup_kwargs()
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "](docs/benchmarks.md)" in readme, "README.md itself keeps relative links (readable on GitHub)"
    targets = link_targets(kwargs["long_description"])
    assert targets, "the long description has links"
    relative = [t for t in targets if not re.match(r"https?://|#", t)]
    assert not relative, f"relative links left in the long description (broken on PyPI): {relative}"
    for target in targets:
        for base in (BLOB, RAW):
            if target.startswith(base):
                path = target.removeprefix(base).split("#")[0]
                assert (ROOT / path).exists(), f"{target} points at a file the repository does not have"
    assert f"]({RAW}docs/images/demo_grid.png)" in kwargs["long_description"], "images point at the raw file"
    assert kwargs["long_description_content_type"] == "text/markdown"


def test_absolute_links_rewrites_only_relative_targets():
    _, setup_globals = setup_kwargs()
    absolute_links = setup_globals["absolute_links"]
    text = (
        "[a](docs/x.md#part) ![i](./docs/images/a.png) [u](https://example.org/y) [t](#top)\n"
        '[![badge](badge.svg)](LICENSE)\n[ref]: docs/y.md\n<img src="docs/images/z.png">\n'
        "```python\nx = [1](docs/code.md)\n```\n"
    )
    assert absolute_links(text) == (
        f"[a]({BLOB}docs/x.md#part) ![i]({RAW}docs/images/a.png) [u](https://example.org/y) [t](#top)\n"
        f'[![badge]({RAW}badge.svg)]({BLOB}LICENSE)\n[ref]: {BLOB}docs/y.md\n<img src="{RAW}docs/images/z.png">\n'
        "```python\nx = [1](docs/code.md)\n```\n"
    )


def test_project_urls():
    kwargs, _ = setup_kwargs()
    urls = kwargs["project_urls"]
    assert {"Homepage", "Source", "Documentation", "Issues"} <= set(urls)
    assert urls["Source"] == REPOSITORY and urls["Issues"] == f"{REPOSITORY}/issues"
    assert urls["Documentation"].rstrip("/") == "https://scfm-diffusers.github.io/scfm-diffusers"
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    assert config["site_url"].rstrip("/") == urls["Documentation"].rstrip("/")
    assert config["repo_url"] == REPOSITORY


@pytest.mark.slow
def test_site_builds_strict_with_the_api_reference(tmp_path):
    needs_docs_packages()
    site = tmp_path / "site"
    result = mkdocs_build(ROOT / "mkdocs.yml", site)
    assert result.returncode == 0, result.stderr[-3000:]
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    for page in nav_pages(config["nav"]):
        built = site / ("index.html" if page == "index.md" else page.removesuffix(".md") + "/index.html")
        assert built.exists(), f"{page} was not built"
    api = (site / "api" / "index.html").read_text(encoding="utf-8")

    from scfm_diffusers import FlowMatchSCFMScheduler, push_adapter
    from scfm_diffusers.training.objective import scfm_loss

    text = html.unescape(re.sub(r"<[^>]+>", "", api))
    for documented in (FlowMatchSCFMScheduler, push_adapter, scfm_loss):
        summary = documented.__doc__.strip().splitlines()[0].replace("`", "")
        assert summary in text, f"{documented.__name__}'s docstring is not in the API page"
    for anchor in ("scfm_diffusers.FlowMatchSCFMScheduler", "scfm_diffusers.sigmas", "scfm_diffusers.families"):
        assert f'id="{anchor}"' in api
    # Doctests (``Example:`` sections) render as code, not as a paragraph of ``>>>`` text.
    assert '<span class="go">[1.0, 0.857, 0.6, 0.0]</span>' in api
    assert "<p>&gt;&gt;&gt;" not in api
    # Sphinx roles become links within the reference, literal blocks code: no reStructuredText is left.
    assert ":func:" not in api and ":class:" not in api and ".. math::" not in api and "::</p>" not in api
    assert 'href="#scfm_diffusers.calibration.calibrate_lora_scales"' in api


@pytest.mark.slow
def test_strict_build_fails_on_a_broken_link(tmp_path):
    needs_docs_packages()
    project = tmp_path / "project"
    shutil.copytree(ROOT / "docs", project / "docs")
    shutil.copy(ROOT / "mkdocs.yml", project / "mkdocs.yml")
    (project / "src").symlink_to(ROOT / "src")
    with open(project / "docs" / "troubleshooting.md", "a", encoding="utf-8") as page:
        page.write("\nSee [the scheduler](inference.md#no-such-section) and [a lost page](lost.md).\n")
    result = mkdocs_build(project / "mkdocs.yml", tmp_path / "site")
    assert result.returncode != 0
    assert "does not contain an anchor '#no-such-section'" in result.stderr
    assert "'lost.md'" in result.stderr
