"""The repository layout: top-level folders mapped into the pipeproof namespace (docs/architecture.md)."""

from __future__ import annotations

import subprocess
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def test_git_tracks_no_symlink() -> None:
    listed = subprocess.run(["git", "ls-files", "-s"], cwd=REPO, capture_output=True, text=True, check=True)
    links = [line for line in listed.stdout.splitlines() if line.startswith("120000")]
    assert links == []


def test_every_package_folder_is_listed_and_mapped() -> None:
    setup = PYPROJECT["tool"]["setuptools"]
    mapping: dict[str, str] = setup["package-dir"]
    listed = set(setup["packages"])
    found: set[str] = set()
    for package, folder in mapping.items():
        root = REPO / folder
        for init in root.rglob("__init__.py"):
            rel = init.parent.relative_to(root)
            found.add(".".join((package, *rel.parts)) if rel.parts else package)
    assert found <= listed, f"packages missing from pyproject: {sorted(found - listed)}"
    for package in listed:
        parent = max((p for p in mapping if package == p or package.startswith(p + ".")), key=len)
        rest = package.removeprefix(parent).strip(".")
        folder = REPO / mapping[parent] / Path(*(rest.split(".") if rest else ()))
        assert folder.is_dir(), f"{package} maps to a missing folder {folder}"


def test_mypy_reads_the_editable_tree_of_this_version() -> None:
    version = PYPROJECT["project"]["version"]
    assert PYPROJECT["tool"]["mypy"]["mypy_path"].endswith(f"__editable__.pipeproof-{version}-py3-none-any")
