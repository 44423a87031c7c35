"""What ``pip install`` gets: every package the code imports is declared, the shipped configs travel with
it, and ``python_requires`` says the lowest Python that the classifiers claim (``.ci/resolve-pins``
resolves the pins for the lowest and the highest; ``.ci/fresh-install`` installs and runs it)."""

import ast
import configparser
import importlib.metadata
import re
import sys

from tests.conftest import REPO

SETUP = configparser.ConfigParser()
SETUP.read(REPO / "setup.cfg")
SHIPPED = ["megabyte", "datamodules", "callbacks", "cli.py", "sampling.py"]


def requirement_names(text: str) -> set[str]:
    names = set()
    for line in text.splitlines():
        line = line.split("#")[0].strip()
        if line:
            names.add(re.split(r"[\s\[<>=!~;]", line, maxsplit=1)[0].lower().replace("_", "-"))
    return names


def imported_modules(tree: ast.AST) -> set[str]:
    """Top-level names of the modules imported by ``tree``, less those imported under ``try: ... except
    ImportError`` (optional speed-ups such as Triton)."""
    optional = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
            isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError") for h in node.handlers
        ):
            optional |= {id(n) for statement in node.body for n in ast.walk(statement)}
    names = set()
    for node in ast.walk(tree):
        if id(node) in optional:
            continue
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_every_imported_package_is_declared():
    files = [p for name in SHIPPED for p in ([REPO / name] if name.endswith(".py") else (REPO / name).rglob("*.py"))]
    # megabyte/kernels/ (optional speed, reached through try/except ImportError) imports Triton, which
    # comes with torch where it runs (Linux wheels); without it the kernels are left out.
    files = [p for p in files if (REPO / "megabyte" / "kernels") not in p.parents]
    modules = set().union(*(imported_modules(ast.parse(p.read_text())) for p in files))
    ours = {"megabyte", "datamodules", "callbacks", "cli", "sampling"}
    third_party = modules - ours - set(sys.stdlib_module_names)
    distributions = importlib.metadata.packages_distributions()
    declared = requirement_names(SETUP["options"]["install_requires"])
    missing = {
        m: distributions.get(m) for m in third_party
        if not {d.lower().replace("_", "-") for d in distributions.get(m, [m])} & declared
    }  # fmt: skip
    assert not missing, f"imported but not in setup.cfg's install_requires: {missing}"


def test_benchmark_only_packages_are_an_extra_of_their_own():
    extras = SETUP["options.extras_require"]
    assert "matplotlib" in requirement_names(extras["bench"])
    assert "matplotlib" not in requirement_names(SETUP["options"]["install_requires"]) | requirement_names(extras["test"])


def test_every_config_folder_is_shipped():
    folders = {p.parent.relative_to(REPO).as_posix() for p in (REPO / "configs").rglob("*.yaml")}
    shipped = {}
    for line in SETUP["options.data_files"]:
        shipped[line.removeprefix("share/megabyte-lightning/")] = SETUP["options.data_files"][line].strip()
    assert set(shipped) == folders
    assert all(pattern == f"{folder}/*.yaml" for folder, pattern in shipped.items())


def test_python_requires_is_the_lowest_python_the_classifiers_claim():
    tag = "Programming Language :: Python :: "
    claimed = [line.strip()[len(tag) :] for line in SETUP["metadata"]["classifiers"].splitlines() if line.strip().startswith(tag)]
    versions = sorted((v for v in claimed if "." in v), key=lambda v: tuple(map(int, v.split("."))))
    assert SETUP["options"]["python_requires"] == f">={versions[0]}"
    assert f"{sys.version_info.major}.{sys.version_info.minor}" in versions  # the Python the tests run on


def test_the_pins_cover_every_declared_package():
    pinned = {line.split("==")[0].lower().replace("_", "-") for line in (REPO / "constraints.txt").read_text().splitlines() if "==" in line}
    declared = requirement_names(SETUP["options"]["install_requires"])
    for extra in SETUP["options.extras_require"].values():
        declared |= requirement_names(extra)
    assert declared <= pinned, f"declared but not pinned in constraints.txt: {sorted(declared - pinned)}"
