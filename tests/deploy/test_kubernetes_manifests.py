"""deploy/kubernetes: every manifest, as written and as each kustomization renders it.

- Core resources (ConfigMap, Service) and the pod templates inside the RayCluster are checked
  against the strict OpenAPI schemas of Kubernetes 1.30 up to the newest kubernetes-validate
  knows; the RayCluster against KubeRay's CRD (data/kuberay), the ServiceMonitor against the
  small schema in data/prometheus-operator.
- Then what the schemas cannot see: the GPU worker groups ask Kubernetes and Ray for the same
  GPUs, the head's own `ray start` repeats its rayStartParams, the Services and probes point at
  ports the head declares, the ServiceMonitor scrapes the HTTP Service, each overlay has its
  layout, the NetworkPolicies admit only the RayCluster's own pods to Ray's ports and anyone to
  the API ports, the Ray dashboard listens on loopback. Ports against the server's defaults and
  the serve command itself: test_commands.py.
- Every check is also shown rejecting a broken copy, so a passing run means something.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from deploy_helpers import (DOCS, KUBERNETES, KUSTOMIZATIONS, OVERLAYS, by_kind, container_port, container_shell,
                            gpus_needed, head_container, kustomize, largest_group, load_docs, one, program_argvs,
                            ray_start_flags, selects)

CORE_KINDS = {"ConfigMap", "Service", "NetworkPolicy"}
EXPECTED_KINDS = {"RayCluster": 1, "ConfigMap": 1, "Service": 2, "ServiceMonitor": 1, "NetworkPolicy": 2}
#: The layout each overlay promises (prefill groups, decode groups).
LAYOUTS = {"base": (1, 1), "small": (1, 1), "large": (2, 2)}
GPU = "nvidia.com/gpu"


def source_files() -> list[Path]:
    """Every manifest file as written (kustomization files and JSON patches excluded)."""
    files = sorted(KUBERNETES.rglob("*.yaml"))
    return [f for f in files if f.name != "kustomization.yaml"
            and all(isinstance(doc, dict) for doc in yaml.safe_load_all(f.read_text()))]


def pod_templates(cluster: dict[str, Any]) -> dict[str, dict[str, Any]]:
    spec = cluster["spec"]
    found = {"head": spec["headGroupSpec"]["template"]}
    found.update({f"worker group {g['groupName']}": g["template"] for g in spec.get("workerGroupSpecs", [])})
    return found


def as_pod_template(template: dict[str, Any]) -> dict[str, Any]:
    """A pod template wrapped as a core v1 PodTemplate, so Kubernetes' own schema checks it."""
    return {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"}, "template": template}


# --- rendering -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_each_kustomization_renders_the_whole_deployment(rendered, name):
    kinds = {kind: len(by_kind(rendered[name], kind)) for kind in EXPECTED_KINDS}
    assert kinds == EXPECTED_KINDS
    names = [(d["kind"], d["metadata"]["name"]) for d in rendered[name]]
    assert len(names) == len(set(names)), f"duplicate resources: {names}"


@pytest.mark.parametrize("name", OVERLAYS)
def test_overlays_label_every_resource_with_their_layout(rendered, name):
    for doc in rendered[name]:
        assert doc["metadata"]["labels"].get("splitserve.io/layout") == name, doc["metadata"]["name"]


def test_every_manifest_file_is_used_by_a_kustomization():
    base = yaml.safe_load((KUBERNETES / "base" / "kustomization.yaml").read_text())
    listed = {KUBERNETES / "base" / r for r in base["resources"]}
    for folder in (KUBERNETES / "overlays" / o for o in OVERLAYS):
        overlay = yaml.safe_load((folder / "kustomization.yaml").read_text())
        listed |= {folder / p["path"] for p in overlay.get("patches", [])}
    for path in KUBERNETES.rglob("*.yaml"):
        if path.name != "kustomization.yaml":
            assert path in listed, f"{path.relative_to(KUBERNETES)} is not referenced by any kustomization"


# --- schemas ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_core_resources_are_valid_kubernetes(rendered, k8s_errors, name):
    for doc in rendered[name]:
        if doc["kind"] in CORE_KINDS:
            assert k8s_errors(doc) == [], f"{doc['kind']} {doc['metadata']['name']}"


@pytest.mark.parametrize("path", source_files(), ids=lambda p: str(p.relative_to(KUBERNETES)))
def test_source_files_are_valid_on_their_own(path, k8s_errors, raycluster_errors, servicemonitor_errors):
    """The files as written (what `kubectl apply -f` would send), besides what kustomize makes."""
    for doc in load_docs(path):
        if doc["kind"] in CORE_KINDS and "overlays" not in path.parts:  # overlay patches are partial
            assert k8s_errors(doc) == []
        elif doc["kind"] == "RayCluster":
            assert raycluster_errors(doc) == []
        elif doc["kind"] == "ServiceMonitor":
            assert servicemonitor_errors(doc) == []


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_raycluster_is_valid_for_kuberay(rendered, raycluster_errors, name):
    assert raycluster_errors(one(rendered[name], "RayCluster")) == []


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_pod_templates_are_valid_kubernetes(rendered, k8s_errors, name):
    """KubeRay's CRD embeds the pod schema, but an older copy of it; Kubernetes' own is stricter
    about e.g. resource quantities and probe fields."""
    for role, template in pod_templates(one(rendered[name], "RayCluster")).items():
        assert k8s_errors(as_pod_template(template)) == [], role


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_servicemonitor_is_valid(rendered, servicemonitor_errors, name):
    assert servicemonitor_errors(one(rendered[name], "ServiceMonitor")) == []


# --- what the schemas cannot see -------------------------------------------------------------------

def gpu_problems(cluster: dict[str, Any]) -> list[str]:
    """Where a RayCluster's GPU requests disagree (Kubernetes vs Ray, head vs workers)."""
    problems = [] if cluster["spec"]["workerGroupSpecs"] else ["no worker group"]
    for group in cluster["spec"]["workerGroupSpecs"]:
        name, container = group["groupName"], group["template"]["spec"]["containers"][0]
        limits, requests = container["resources"].get("limits", {}), container["resources"].get("requests", {})
        gpus = int(limits.get(GPU, 0))
        if gpus < 1 or int(requests.get(GPU, gpus)) != gpus:
            problems.append(f"{name}: {GPU} limit {gpus}, request {requests.get(GPU)} (must be equal, >= 1)")
        if int(group["rayStartParams"].get("num-gpus", -1)) != gpus:
            problems.append(f"{name}: rayStartParams num-gpus {group['rayStartParams'].get('num-gpus')} != {gpus}")
        # A fixed layout: the autoscaler is off, so the replicas are all there ever is.
        if not group["minReplicas"] == group["replicas"] == group["maxReplicas"]:
            problems.append(f"{name}: replicas, minReplicas and maxReplicas differ")
        if not any(t.get("key") == GPU for t in group["template"]["spec"].get("tolerations", [])):
            problems.append(f"{name}: no toleration for the {GPU} taint GPU nodes commonly have")
    head = cluster["spec"]["headGroupSpec"]
    if GPU in head_container(cluster)["resources"].get("limits", {}) or head["rayStartParams"].get("num-gpus") != "0":
        problems.append("the head must not take GPUs (num-gpus 0, no GPU limit)")
    return problems


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_gpu_workers_ask_kubernetes_and_ray_for_the_same_gpus(rendered, name):
    cluster = one(rendered[name], "RayCluster")
    assert gpu_problems(cluster) == []
    assert cluster["spec"].get("enableInTreeAutoscaling") is False


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_kuberay_generates_the_workers_ray_start(rendered, name):
    """Their own command would be the image's entrypoint (`splitserve serve`), not a Ray worker."""
    for group in one(rendered[name], "RayCluster")["spec"]["workerGroupSpecs"]:
        container = group["template"]["spec"]["containers"][0]
        assert "command" not in container and "args" not in container
        assert "ray.io/overwrite-container-cmd" not in group["template"].get("metadata", {}).get("annotations", {})


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_the_layout_fits_the_gpu_workers(rendered, name, serve_config_in):
    cluster, cfg = one(rendered[name], "RayCluster"), serve_config_in(rendered[name])
    per_pod = [int(g["template"]["spec"]["containers"][0]["resources"]["limits"][GPU])
               for g in cluster["spec"]["workerGroupSpecs"] for _ in range(g["replicas"])]
    assert gpus_needed(cfg) <= sum(per_pod), f"{gpus_needed(cfg)} GPUs needed, {sum(per_pod)} in the workers"
    assert largest_group(cfg) <= max(per_pod), "a tp > 1 group must fit on one pod's GPUs"


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_the_head_starts_ray_with_its_ray_start_params(rendered, name):
    cluster = one(rendered[name], "RayCluster")
    head_spec = cluster["spec"]["headGroupSpec"]
    container = head_container(cluster)
    annotations = head_spec["template"].get("metadata", {}).get("annotations", {})
    assert annotations.get("ray.io/overwrite-container-cmd") == "true", "KubeRay would replace the command"
    starts = [argv for argv in program_argvs(container_shell(container), "ray") if argv[:1] == ["start"]]
    assert len(starts) == 1, container_shell(container)
    flags = ray_start_flags(starts[0])
    assert flags.pop("head") == "true" and "block" not in flags, "the server must start after ray start returns"
    assert flags == head_spec["rayStartParams"]
    if "metrics-export-port" in flags:
        assert container_port(container, "metrics") == int(flags["metrics-export-port"])


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_services_reach_the_head_on_declared_ports(rendered, name):
    cluster = one(rendered[name], "RayCluster")
    container = head_container(cluster)
    # The labels KubeRay puts on the head pod it creates.
    head_labels = {"ray.io/cluster": cluster["metadata"]["name"], "ray.io/node-type": "head",
                   **cluster["spec"]["headGroupSpec"]["template"]["metadata"].get("labels", {})}
    for service in by_kind(rendered[name], "Service"):
        assert selects(service["spec"]["selector"], head_labels), service["metadata"]["name"]
        assert service["spec"]["selector"].get("ray.io/node-type") == "head", "workers do not serve"
        for port in service["spec"]["ports"]:
            assert container_port(container, port["targetPort"]) == port["port"], port


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_probes_ask_the_server_for_health(rendered, name):
    container = head_container(one(rendered[name], "RayCluster"))
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        if probe == "startupProbe" and probe not in container:
            continue
        get = container[probe]["httpGet"]
        assert get["path"] == ("/live" if probe == "livenessProbe" else "/ready"), probe
        assert container_port(container, get["port"]) == container_port(container, "http"), probe


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_servicemonitor_scrapes_the_http_service(rendered, name):
    monitor = one(rendered[name], "ServiceMonitor")
    services = [s for s in by_kind(rendered[name], "Service")
                if selects(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])]
    assert [s["metadata"]["name"] for s in services] == ["splitserve-http"]
    port_names = {p["name"] for p in services[0]["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in port_names and endpoint["path"] == "/metrics"


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_each_layout_has_its_groups_and_workers(rendered, name, serve_config_in):
    cfg = serve_config_in(rendered[name])
    assert (cfg.prefill.count, cfg.decode.count) == LAYOUTS[name]
    assert cfg.mode == "disaggregated" and cfg.device == "cuda"


# --- who may connect: the NetworkPolicies ----------------------------------------------------------
# A small model of NetworkPolicy ingress (policies add up; a pod no policy selects is open to all;
# a rule admits a connection when its ports and its peers both match, a missing list matching
# everything), run against the pods KubeRay makes from the rendered RayCluster.

#: Where connections come from: the RayCluster's pods (filled in per rendering), another pod of
#: this namespace, a pod of another namespace, an address outside the cluster.
OUTSIDERS = {
    "pod in this namespace": {"pod": {"app": "intruder"}, "namespace": {"kubernetes.io/metadata.name": "ml"}},
    "pod in another namespace": {"pod": {"app": "intruder"}, "namespace": {"kubernetes.io/metadata.name": "other"}},
    "outside the cluster": {"ip": "203.0.113.7"},
}
#: Ray's ports: GCS, dashboard, client server, metrics export, dashboard agent, runtime env agent,
#: and some of the random ones (node and object managers, worker processes: 10002-19999 by default).
RAY_PORTS = (6379, 8265, 10001, 8080, 52365, 40513, 8076, 8077, 10002, 15000, 19999, 45678)
NAMESPACE = {"kubernetes.io/metadata.name": "ml"}


def kuberay_pods(cluster: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """One pod per group as KubeRay creates it: its labels (KubeRay's and the template's) and its
    named container ports."""
    name, spec = cluster["metadata"]["name"], cluster["spec"]
    groups = [("head", "headgroup", spec["headGroupSpec"]["template"])]
    groups += [("worker", g["groupName"], g["template"]) for g in spec["workerGroupSpecs"]]
    pods = {}
    for node_type, group, template in groups:
        labels = {"ray.io/cluster": name, "ray.io/node-type": node_type, "ray.io/group": group,
                  "ray.io/is-ray-node": "yes", **template.get("metadata", {}).get("labels", {})}
        ports = {p["name"]: p["containerPort"] for c in template["spec"]["containers"] for p in c.get("ports", [])
                 if "name" in p}
        pods[f"{node_type} {group}"] = {"labels": labels, "ports": ports}
    return pods


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, f"the model reads matchLabels only: {selector}"
    return selects(selector.get("matchLabels", {}), labels)


def _peer_matches(peer: dict[str, Any], source: dict[str, Any]) -> bool:
    if "ipBlock" in peer:
        import ipaddress

        ip = source.get("ip")
        block = peer["ipBlock"]
        return ip is not None and ipaddress.ip_address(ip) in ipaddress.ip_network(block["cidr"]) \
            and not any(ipaddress.ip_address(ip) in ipaddress.ip_network(e) for e in block.get("except", []))
    if "pod" not in source:
        return False  # pod and namespace selectors match pods only
    if "namespaceSelector" in peer:
        if not _selects(peer["namespaceSelector"], source["namespace"]):
            return False
    elif source["namespace"] != NAMESPACE:
        return False  # a podSelector alone means this namespace
    return "podSelector" not in peer or _selects(peer["podSelector"], source["pod"])


def _port_matches(rule_port: dict[str, Any], port: int, named: dict[str, int]) -> bool:
    if rule_port.get("protocol", "TCP") != "TCP":
        return False
    if "port" not in rule_port:
        return True
    first = rule_port["port"] if isinstance(rule_port["port"], int) else named.get(rule_port["port"])
    return first is not None and first <= port <= rule_port.get("endPort", first)


def admits(policies: list[dict[str, Any]], pod: dict[str, Any], port: int, source: dict[str, Any]) -> bool:
    """Whether a TCP connection from ``source`` to ``port`` of ``pod`` gets in."""
    selecting = [p for p in policies if _selects(p["spec"]["podSelector"], pod["labels"])
                 and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])]
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy["spec"].get("ingress", []):
            ports_ok = not rule.get("ports") or any(_port_matches(p, port, pod["ports"]) for p in rule["ports"])
            from_ok = not rule.get("from") or any(_peer_matches(peer, source) for peer in rule["from"])
            if ports_ok and from_ok:
                return True
    return False


def exposure_problems(docs: list[dict[str, Any]]) -> list[str]:
    """Where the rendered NetworkPolicies let a connection in that they must not, or keep one out
    that the deployment needs."""
    cluster = one(docs, "RayCluster")
    policies = by_kind(docs, "NetworkPolicy")
    pods = kuberay_pods(cluster)
    api = {container_port(head_container(cluster), name) for name in ("grpc", "http")}
    members = {f"RayCluster pod ({name})": {"pod": pod["labels"], "namespace": NAMESPACE} for name, pod in pods.items()}
    problems = []
    for name, pod in pods.items():
        for port in sorted(set(RAY_PORTS) | set(pod["ports"].values())):
            is_api = name == "head headgroup" and port in api
            for source_name, source in members.items():
                if not admits(policies, pod, port, source):
                    problems.append(f"{name}:{port} refuses {source_name}")
            for source_name, source in OUTSIDERS.items():
                if admits(policies, pod, port, source) != is_api:
                    problems.append(f"{name}:{port} {'refuses' if is_api else 'admits'} {source_name}")
    return problems


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_each_kustomization_has_the_network_policies(rendered, name):
    names = sorted(p["metadata"]["name"] for p in by_kind(rendered[name], "NetworkPolicy"))
    assert names == ["splitserve-api", "splitserve-ray-cluster"]


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_ray_ports_admit_only_the_rayclusters_pods_and_the_api_everyone(rendered, name):
    assert exposure_problems(rendered[name]) == []


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_network_policies_select_the_rayclusters_pods(rendered, name):
    """By the labels KubeRay gives the pods of *this* RayCluster: a renamed cluster must not
    leave its pods open or its peers refused."""
    cluster_name = one(rendered[name], "RayCluster")["metadata"]["name"]
    for policy in by_kind(rendered[name], "NetworkPolicy"):
        assert policy["spec"]["podSelector"]["matchLabels"]["ray.io/cluster"] == cluster_name
        for rule in policy["spec"]["ingress"]:
            for peer in rule.get("from", []):
                assert peer["podSelector"]["matchLabels"] == {"ray.io/cluster": cluster_name}, peer


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_the_ray_dashboard_listens_on_loopback_only(rendered, name):
    cluster = one(rendered[name], "RayCluster")
    assert cluster["spec"]["headGroupSpec"]["rayStartParams"].get("dashboard-host") == "127.0.0.1"
    [start] = [argv for argv in program_argvs(container_shell(head_container(cluster)), "ray") if argv[:1] == ["start"]]
    assert ray_start_flags(start).get("dashboard-host") == "127.0.0.1"  # KubeRay's default would be 0.0.0.0


# --- the checks reject what they should -------------------------------------------------------------

def test_a_broken_raycluster_is_rejected(rendered, raycluster_errors):
    broken = copy.deepcopy(one(rendered["base"], "RayCluster"))
    broken["spec"]["workerGroupSpecs"][0]["replicas"] = "two"
    broken["spec"]["headGroupSpec"]["rayStartParam"] = broken["spec"]["headGroupSpec"].pop("rayStartParams")
    del broken["spec"]["workerGroupSpecs"][0]["groupName"]
    errors = "\n".join(raycluster_errors(broken))
    assert "spec/workerGroupSpecs/0/replicas" in errors
    assert "rayStartParam" in errors and "groupName" in errors
    assert raycluster_errors({**broken, "apiVersion": "ray.io/v2"})[0].startswith("apiVersion/kind")


def _head_template(rendered: dict[str, Any]) -> dict[str, Any]:
    return copy.deepcopy(one(rendered["base"], "RayCluster")["spec"]["headGroupSpec"]["template"])


POD_BREAKS = {
    "containers/0/ports/0/containerPort": lambda c: c["ports"][0].update(containerPort="gcs"),
    "paht": lambda c: c["readinessProbe"]["httpGet"].update(paht="/ready"),
    "containers/0/volumeMounts/0": lambda c: c["volumeMounts"][0].pop("mountPath"),
}


@pytest.mark.parametrize("where", POD_BREAKS)
def test_a_broken_pod_template_is_rejected(rendered, k8s_errors, where):
    template = _head_template(rendered)
    POD_BREAKS[where](template["spec"]["containers"][0])
    errors = k8s_errors(as_pod_template(template))
    assert errors and all(where in e for e in errors), errors


SERVICE_BREAKS = {
    "spec/ports/0/port": lambda s: s["spec"]["ports"][0].update(port="grpc"),
    "selectr": lambda s: s["spec"].update(selectr=s["spec"].pop("selector")),
    "metadata/labels/app.kubernetes.io/name": lambda s: s["metadata"]["labels"].update({"app.kubernetes.io/name": 1}),
}


@pytest.mark.parametrize("where", SERVICE_BREAKS)
def test_a_broken_service_is_rejected(rendered, k8s_errors, where):
    service = copy.deepcopy(one(rendered["base"], "Service", "splitserve-grpc"))
    SERVICE_BREAKS[where](service)
    errors = k8s_errors(service)
    assert errors and all(where in e for e in errors), errors


def test_a_broken_servicemonitor_is_rejected(rendered, servicemonitor_errors):
    monitor = copy.deepcopy(one(rendered["base"], "ServiceMonitor"))
    monitor["spec"]["endpoints"][0]["interval"] = "15 seconds"
    monitor["spec"]["endpoints"][0]["pathh"] = "/metrics"
    errors = "\n".join(servicemonitor_errors(monitor))
    assert "spec/endpoints/0/interval" in errors and "pathh" in errors
    assert servicemonitor_errors({**monitor, "spec": {"selector": {}}}), "no endpoints, empty selector"


def test_a_broken_overlay_fails_to_render(kubectl, tmp_path):
    tree = tmp_path / "kubernetes"
    shutil.copytree(KUBERNETES, tree)
    patch = tree / "overlays" / "small" / "workers.yaml"
    patch.write_text(patch.read_text().replace("/spec/workerGroupSpecs/0/", "/spec/workerGroupSpecs/5/"))
    with pytest.raises(RuntimeError, match="kustomize"):
        kustomize(kubectl, tree / "overlays" / "small")


def test_a_gpu_mismatch_is_caught(rendered):
    cluster = copy.deepcopy(one(rendered["small"], "RayCluster"))
    cluster["spec"]["workerGroupSpecs"][0]["rayStartParams"]["num-gpus"] = "2"
    cluster["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["requests"][GPU] = "2"
    problems = "\n".join(gpu_problems(cluster))
    assert "num-gpus 2 != 1" in problems and "request 2" in problems


def _api_policy_open_to_all(docs):
    del one(docs, "NetworkPolicy", "splitserve-api")["spec"]["ingress"][0]["ports"]


def _cluster_policy_gone(docs):
    docs.remove(one(docs, "NetworkPolicy", "splitserve-ray-cluster"))


def _cluster_policy_admits_namespace(docs):
    one(docs, "NetworkPolicy", "splitserve-ray-cluster")["spec"]["ingress"][0]["from"] = [{"podSelector": {}}]


def _api_policy_closed(docs):
    one(docs, "NetworkPolicy", "splitserve-api")["spec"]["ingress"][0]["from"] = [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "nowhere"}}}]


NETPOL_BREAKS = {
    "head headgroup:6379 admits outside the cluster": _api_policy_open_to_all,
    "worker gpu:10002 admits pod in another namespace": _cluster_policy_gone,
    "head headgroup:10001 admits pod in this namespace": _cluster_policy_admits_namespace,
    "head headgroup:8000 refuses outside the cluster": _api_policy_closed,
}


@pytest.mark.parametrize("expected", NETPOL_BREAKS)
def test_network_exposure_is_caught(rendered, expected):
    docs = copy.deepcopy(rendered["base"])
    NETPOL_BREAKS[expected](docs)
    problems = exposure_problems(docs)
    assert any(expected in p for p in problems), problems


def test_a_broken_network_policy_is_rejected(rendered, k8s_errors):
    policy = copy.deepcopy(one(rendered["base"], "NetworkPolicy", "splitserve-api"))
    policy["spec"]["ingress"][0]["ports"][0]["protocl"] = "TCP"
    errors = k8s_errors(policy)
    assert errors and all("spec/ingress/0/ports/0" in e for e in errors), errors


def test_the_documented_api_restriction_admits_only_the_namespaces_it_names(kubectl, tmp_path):
    """The NetworkPolicy patch docs/deploy.md shows, added to an overlay: the API ports then take
    only the namespaces it names, and Ray's ports stay as closed as before."""
    import re

    [block] = [b for b in re.findall(r"```yaml\n(.*?)```", DOCS.read_text(), flags=re.S) if "splitserve-api" in b]
    tree = tmp_path / "kubernetes"
    shutil.copytree(KUBERNETES, tree)
    overlay = tree / "overlays" / "small"
    (overlay / "api-sources.yaml").write_text(block)
    kustomization = yaml.safe_load((overlay / "kustomization.yaml").read_text())
    kustomization["patches"].append({"path": "api-sources.yaml"})
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    docs = kustomize(kubectl, overlay)
    policies, head = by_kind(docs, "NetworkPolicy"), kuberay_pods(one(docs, "RayCluster"))["head headgroup"]
    ingress = {"pod": {"app": "ingress-nginx"}, "namespace": {"kubernetes.io/metadata.name": "ingress-nginx"}}
    assert admits(policies, head, 8000, ingress) and admits(policies, head, 50051, ingress)
    assert not admits(policies, head, 6379, ingress) and not admits(policies, head, 10001, ingress)
    for source in OUTSIDERS.values():
        assert not admits(policies, head, 8000, source)
    problems = exposure_problems(docs)
    assert problems and all("refuses" in p and (":8000 " in p or ":50051 " in p) for p in problems), problems
