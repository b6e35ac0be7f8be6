"""setup.py's version floors and constraints-floor.txt (what `make test-floor` installs) name the same versions.

The floor venv proves the floors work only if it installs exactly the floors: a floor raised in setup.py but not
in constraints-floor.txt makes pip refuse to install, one lowered in setup.py alone goes untested. See
docs/versions.md.
"""

import ast
import re
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
# The floor venv runs on the one torch wheel every venv here uses (constraints.txt); torch's floor is not tested.
UNTESTED_FLOOR = {"torch"}


def setup_literals() -> dict:
    """INSTALL_REQUIRES and EXTRAS from setup.py, read without running it."""
    found = {}
    for node in ast.parse((ROOT / "setup.py").read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            if node.targets[0].id in ("INSTALL_REQUIRES", "EXTRAS"):
                found[node.targets[0].id] = ast.literal_eval(node.value)
    return found


def floor_extras() -> list[str]:
    """The extras `make test-floor` installs (FLOOR_EXTRAS in the Makefile)."""
    match = re.search(r"^FLOOR_EXTRAS\s*:=\s*(\S+)\s*$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert match, "the Makefile defines FLOOR_EXTRAS"
    return match.group(1).split(",")


def setup_floors() -> dict[str, Version]:
    """Package -> its ``>=`` floor, over install_requires and the extras the floor venv installs."""
    literals = setup_literals()
    requirements = list(literals["INSTALL_REQUIRES"])
    for extra in floor_extras():
        requirements += literals["EXTRAS"][extra]
    floors: dict[str, Version] = {}
    for text in requirements:
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        lower = [Version(spec.version) for spec in requirement.specifier if spec.operator == ">="]
        assert len(lower) <= 1, text
        if not lower:
            continue  # no floor (numpy, tensorboard, ...): nothing to keep in step
        assert floors.get(name, lower[0]) == lower[0], f"{name} has two different floors in setup.py"
        floors[name] = lower[0]
    return floors


def pins(path: Path) -> dict[str, Version]:
    """Package -> pinned version of a constraints file (every line ``name==version``)."""
    pinned = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        requirement = Requirement(line)
        (spec,) = requirement.specifier
        assert spec.operator == "==", f"{path.name}: {line!r} is not an exact pin"
        pinned[canonicalize_name(requirement.name)] = Version(spec.version)
    return pinned


def test_the_floor_extras_exist():
    assert set(floor_extras()) <= set(setup_literals()["EXTRAS"])
    assert {"train", "test", "quantization"} <= set(floor_extras())


def test_constraints_floor_pins_exactly_the_setup_floors():
    floors = setup_floors()
    pinned = pins(ROOT / "constraints-floor.txt")
    assert sorted(pinned) == sorted(floors), "the same packages in setup.py's floors and constraints-floor.txt"
    mismatched = {
        name: (str(floors[name]), str(pinned[name]))
        for name in floors
        if name not in UNTESTED_FLOOR and floors[name] != pinned[name]
    }
    assert not mismatched, f"setup.py floor != constraints-floor.txt pin: {mismatched}"


def test_torch_is_the_main_venvs_wheel_and_above_its_floor():
    torch = canonicalize_name("torch")
    assert pins(ROOT / "constraints-floor.txt")[torch] == pins(ROOT / "constraints.txt")[torch]
    assert pins(ROOT / "constraints-floor.txt")[torch] >= setup_floors()[torch]
