"""The `splitserve` command lines the deployment files run, checked by the real CLI.

Each ``splitserve ...`` invocation found in the `ray up` start commands, the RayCluster head's
command, the image's ENTRYPOINT + CMD and docs/deploy.md is parsed by
`splitserve.cluster.cli.build_parser`; a ``serve`` command's ``--config`` file (through the
`ray up` file_mounts, or the ConfigMap mounted in the head pod) is loaded with
`serve_config_from_args`, as `splitserve serve` would, and must serve on the server's default
ports, reachable from outside its machine, on the Ray cluster it was started in. The ports must
then agree everywhere else they are written.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from deploy_helpers import (DOCKERFILE, DOCS, KUSTOMIZATIONS, RAY_UP_CONFIGS, REPO, SERVE_CONFIGS, by_kind,
                            container_port, dockerfile_instructions, exec_form, gpus_needed, head_container,
                            largest_group, one, remote_to_local, serve_config_of, splitserve_argvs)
from splitserve.cluster.cli import build_parser
from splitserve.cluster.serve_config import DEFAULT_GRPC_PORT, DEFAULT_HTTP_PORT, config_from_dict

DEFAULT_PORTS = {"grpc": DEFAULT_GRPC_PORT, "http": DEFAULT_HTTP_PORT}


def load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def head_serve_argv(config: dict[str, Any]) -> list[str]:
    """The one ``splitserve serve`` command of a `ray up` config (on the head, after Ray)."""
    found = [argv for cmd in config["head_start_ray_commands"] for argv in splitserve_argvs(cmd)]
    assert len(found) == 1 and found[0][0] == "serve", found
    return found[0]


def ray_up_serve_config(path: Path) -> tuple[list[str], Any]:
    config = load(path)
    argv = head_serve_argv(config)
    remote = build_parser().parse_args(argv).config
    return argv, serve_config_of(argv, remote_to_local(remote, config["file_mounts"], REPO))


def assert_serves_the_cluster(cfg: Any) -> None:
    """What every deployment's server needs: default ports, reachable, on the existing Ray."""
    assert (cfg.server.grpc_port, cfg.server.http_port) == (DEFAULT_GRPC_PORT, DEFAULT_HTTP_PORT)
    assert cfg.server.host == "0.0.0.0", "bound to loopback, the server is unreachable from other machines"
    assert cfg.ray.address == "auto", "the server must join the cluster, not start an embedded Ray"
    assert cfg.device == "cuda"


# --- ray up ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", RAY_UP_CONFIGS, ids=lambda p: p.name)
def test_ray_up_head_serves_a_config_it_ships(path: Path):
    argv, cfg = ray_up_serve_config(path)
    assert_serves_the_cluster(cfg)
    assert "--address" in argv and argv[argv.index("--address") + 1] == "auto"


def test_aws_groups_fit_the_gpu_nodes_kept_up():
    path = next(p for p in RAY_UP_CONFIGS if p.name == "aws-gpu.yaml")
    _, cfg = ray_up_serve_config(path)
    config = load(path)
    types = {name: t for name, t in config["available_node_types"].items() if name != config["head_node_type"]}
    kept_up = sum(t.get("min_workers", 0) * t["resources"].get("GPU", 0) for t in types.values())
    assert gpus_needed(cfg) <= kept_up, "the shipped layout should start without waiting for new nodes"
    assert largest_group(cfg) <= max(t["resources"].get("GPU", 0) for t in types.values())


def test_local_groups_fit_the_workers():
    path = next(p for p in RAY_UP_CONFIGS if p.name == "local.yaml")
    _, cfg = ray_up_serve_config(path)
    # The local provider cannot know GPUs in advance; the file asks for at least one per worker.
    assert gpus_needed(cfg) <= len(load(path)["provider"]["worker_ips"])


@pytest.mark.parametrize("path", SERVE_CONFIGS, ids=lambda p: p.name)
def test_every_serve_config_parses_and_is_used(path: Path):
    assert_serves_the_cluster(config_from_dict(load(path)))
    used_by = [c.name for c in RAY_UP_CONFIGS if path.name in " ".join(load(c)["head_start_ray_commands"])]
    assert used_by, f"{path.name} is not served by any ray up config"


@pytest.mark.parametrize("path", RAY_UP_CONFIGS, ids=lambda p: p.name)
def test_ray_attach_forwards_the_server_ports(path: Path):
    """The comments' `ray attach -p ...` (the laptop's way in) name the ports served."""
    forwarded = {int(p) for line in path.read_text().splitlines() if "ray attach" in line
                 for p in re.findall(r"-p\s+(\d+)", line)}
    assert forwarded == set(DEFAULT_PORTS.values())


# --- Kubernetes --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_kubernetes_head_serves_the_mounted_config(rendered, serve_config_in, name):
    assert_serves_the_cluster(serve_config_in(rendered[name]))
    # The ConfigMap's file on its own, as the brief format of splitserve.cluster.serve_config.
    config_map = one(rendered[name], "ConfigMap", "splitserve-serve-config")
    assert_serves_the_cluster(config_from_dict(yaml.safe_load(config_map["data"]["serve.yaml"])))


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_ports_agree_between_services_container_and_server(rendered, serve_config_in, name):
    cfg = serve_config_in(rendered[name])
    served = {"grpc": cfg.server.grpc_port, "http": cfg.server.http_port}
    container = head_container(one(rendered[name], "RayCluster"))
    for kind, port in served.items():
        assert container_port(container, kind) == port == DEFAULT_PORTS[kind], kind
        service = one(rendered[name], "Service", f"splitserve-{kind}")
        [service_port] = service["spec"]["ports"]
        assert service_port["port"] == port and container_port(container, service_port["targetPort"]) == port
    probes = [container[p]["httpGet"]["port"] for p in ("startupProbe", "readinessProbe", "livenessProbe")
              if p in container]
    assert probes and all(container_port(container, p) == served["http"] for p in probes)
    monitor = one(rendered[name], "ServiceMonitor")
    http_ports = {p["name"]: p["port"] for p in one(rendered[name], "Service", "splitserve-http")["spec"]["ports"]}
    assert all(http_ports[e["port"]] == served["http"] for e in monitor["spec"]["endpoints"])
    assert len(by_kind(rendered[name], "Service")) == len(served)


# --- the image ------------------------------------------------------------------------------------------

def test_image_default_command_parses():
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    [entrypoint] = [exec_form(rest) for word, rest in instructions if word == "ENTRYPOINT"]
    [cmd] = [exec_form(rest) for word, rest in instructions if word == "CMD"]
    assert entrypoint == ["splitserve"]
    args = build_parser().parse_args(cmd)
    assert args.command == "serve" and args.host == "0.0.0.0"  # reachable through `docker run -p`


# --- docs ----------------------------------------------------------------------------------------------

def doc_commands() -> list[list[str]]:
    """Every `splitserve ...` invocation in the shell blocks of docs/deploy.md."""
    blocks = re.findall(r"```(?:bash|sh|console)\n(.*?)```", DOCS.read_text(), flags=re.S)
    lines = [line.strip() for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    return [argv for line in lines if line and not line.startswith("#") for argv in splitserve_argvs(line)]


def test_docs_commands_parse():
    commands = doc_commands()
    assert {argv[0] for argv in commands} >= {"client"}, "docs/deploy.md should show a client request"
    for argv in commands:
        args = build_parser().parse_args(argv)
        if args.command == "client":
            assert args.address.rsplit(":", 1)[1] == str(DEFAULT_GRPC_PORT), argv


def test_docs_name_files_that_exist():
    text = DOCS.read_text()
    named = set(re.findall(r"\b((?:deploy|cluster/configs)/[\w./-]+\w)", text))
    assert named, "docs/deploy.md names no deployment file"
    missing = [p for p in sorted(named) if not (REPO / p).exists()]
    assert not missing, f"docs/deploy.md names files that do not exist: {missing}"


# --- the checks reject what they should ------------------------------------------------------------

def test_a_misspelt_flag_is_rejected():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--grcp-port", "50051"])


def test_a_misspelt_serve_config_key_is_rejected(tmp_path):
    broken = load(SERVE_CONFIGS[0])
    broken["server"]["grpc_prot"] = broken["server"].pop("grpc_port")
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(broken))
    with pytest.raises(ValueError, match="grpc_prot"):
        serve_config_of(["serve", "--config", "x"], path)


def test_a_layout_that_needs_more_gpus_is_caught():
    cfg = config_from_dict({"groups": {"prefill": {"count": 2, "tp": 2}, "decode": {"count": 1}}})
    assert gpus_needed(cfg) == 5 and largest_group(cfg) == 2
