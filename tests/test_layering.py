"""The package's shape: the layers import only downwards, `mapping` stays pure Python, and the
top-level folders are importable only as ``splitserve.<name>``.

The contracts are pyproject.toml's ``[tool.importlinter]``, run by `lint-imports` on the
installed package. It reads files, not running imports: the editable install must be the
link tree of `make install` (mode strict), and hold every module of the source folders, which
`test_the_installed_tree_holds_every_module` checks first (else the contracts would pass on
whatever part of the package the tree holds).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import grimp
import pytest

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


# Run from the repository root, where every folder is on sys.path under its own name.
BARE_IMPORTS = """
import importlib, sys
folders = dict(arg.split("=") for arg in sys.argv[1:])
for folder, package in folders.items():
    try:
        importlib.import_module(folder + ".no_such_module")
    except ImportError as err:
        print("submodule", folder, err)
    try:
        bare = importlib.import_module(folder)
        print("file", folder, getattr(bare, "__file__", None))
        bare.anything
    except (ImportError, AttributeError) as err:
        print("attribute", folder, err)
    copies = [m for m in sys.modules if m == folder + "." or m.startswith(folder + ".")]
    print("copies", folder, copies)
from transformers import LlamaConfig  # imports Hugging Face's `kernels` by that name when installed
print("transformers", "import", "ok")
"""


@pytest.mark.parametrize("symlinked", [False, True])
def test_a_folder_under_its_bare_name_is_refused_or_left_to_its_namesake(tmp_path, symlinked):
    """A folder imported by its own name would load second copies of its modules (classes
    unequal to splitserve.<name>'s). Where another distribution installs a package of that
    name (Hugging Face's `kernels`, which transformers imports), the bare name is that package;
    otherwise a submodule's import, or any use of the bare package, raises and says how, and
    the bare import itself loads nothing and does not raise (a library's probe finds nothing).
    Either way none of the folder's modules load, and transformers imports from the root;
    also with the root on sys.path a second time under another spelling (a symlink)."""
    folders = {folder: package for package, folder in PACKAGE_DIR.items()}
    env = dict(os.environ)
    if symlinked:
        (tmp_path / "repo").symlink_to(REPO)
        env["PYTHONPATH"] = str(tmp_path / "repo")
    done = subprocess.run([sys.executable, "-c", BARE_IMPORTS, *(f"{f}={p}" for f, p in folders.items())],
                          cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    said = {tuple(line.split(" ", 2)[:2]): line.split(" ", 2)[2] for line in done.stdout.splitlines()}
    for folder, package in folders.items():
        if ("file", folder) in said and Path(said["file", folder]).parent != REPO / folder:
            continue  # another distribution's package of that name (its own errors)
        how = f"import {package}, not {folder}:"
        assert how in said["submodule", folder], said["submodule", folder]
        assert how in said["attribute", folder], said["attribute", folder]
        assert said["copies", folder] == "[]", (folder, said["copies", folder])
    assert said["transformers", "import"] == "ok"
