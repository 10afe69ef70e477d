"""The package's shape: the layers import only downwards, `mapping` stays pure Python, and the
top-level folders are importable only as ``splitserve.<name>``.

The contracts are pyproject.toml's ``[tool.importlinter]``, run by `lint-imports` on the
installed package. It reads files, not running imports: the editable install must be the
link tree of `make install` (mode strict), and hold every module of the source folders, which
`test_the_installed_tree_holds_every_module` checks first (else the contracts would pass on
whatever part of the package the tree holds).
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import grimp

REPO = Path(__file__).resolve().parents[1]
PACKAGE_DIR = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
REINSTALL = "run `make install` (the editable install links each module: one added since needs a reinstall)"


def source_modules() -> set[str]:
    """Every module of the folders pyproject.toml installs, by its installed name."""
    names = set()
    for package, folder in PACKAGE_DIR.items():
        for path in (REPO / folder).rglob("*.py"):
            parts = path.relative_to(REPO / folder).with_suffix("").parts
            if "__pycache__" in parts:
                continue
            names.add(".".join((package, *parts[:-1])) if parts[-1] == "__init__" else ".".join((package, *parts)))
    return names


def test_the_installed_tree_holds_every_module():
    graph = grimp.build_graph("splitserve", cache_dir=None)
    missing = source_modules() - graph.modules
    assert not missing, f"lint-imports cannot see {sorted(missing)}: {REINSTALL}"


def test_import_contracts_hold():
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(lint), "--config", str(REPO / "pyproject.toml"), "--no-cache"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 kept, 0 broken" in done.stdout, done.stdout


BARE_IMPORTS = """
import importlib, sys
for folder in sys.argv[1:]:
    try:
        importlib.import_module(folder)
    except ImportError as err:
        print(folder, err)
    else:
        print(folder, "imported")
"""


def test_a_folder_under_its_bare_name_is_refused():
    """From the repository root each folder is on sys.path under its own name; importing it so
    would load second copies of its modules (classes unequal to splitserve.<name>'s)."""
    folders = {package: folder for package, folder in PACKAGE_DIR.items() if "/" not in folder}
    done = subprocess.run([sys.executable, "-c", BARE_IMPORTS, *folders.values()], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    said = dict(line.split(" ", 1) for line in done.stdout.splitlines())
    for package, folder in folders.items():
        assert said[folder].startswith(f"import {package}, not {folder}:"), (folder, said[folder])
