"""The `ray up` configs of cluster/configs, checked offline by the installed Ray's own code.

`ray up` runs, before it touches a cloud: `prepare_config` (for the local provider
`prepare_local`: checks head_ip/worker_ips and makes the single node type; for every provider
`fillout_defaults` with the provider's defaults, `merge_setup_commands`, per-type worker counts),
then `validate_config` (ray-schema.json, head_node_type among the node types, the sum of
min_workers within max_workers). Only the provider's `bootstrap_config` (AWS: IAM role, key
pair, subnets through boto3) needs credentials, so it is the one step left out here.
"""

from __future__ import annotations

import copy
import re
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement

from deploy_helpers import (CLUSTER_CONFIGS, DOCKERFILE, PYPROJECT, RAY_UP_CONFIGS, SERVE_CONFIGS, KUSTOMIZATIONS,
                            dockerfile_instructions, is_ray_up_config, load_docs, one, program_argvs, ray_start_flags)

RAY_PIN = re.compile(r"\bray(?:\[[\w,]+\])?==([0-9][0-9A-Za-z.]*)")


def load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def prepared(config: dict[str, Any]) -> dict[str, Any]:
    """What `ray up` makes of a config before it calls the cloud: prepared and validated."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(copy.deepcopy(config))
    validate_config(config)
    return config


def all_commands(config: dict[str, Any]) -> list[str]:
    keys = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
            "head_start_ray_commands", "worker_start_ray_commands")
    return [cmd for key in keys for cmd in config.get(key) or []]


def test_the_folder_holds_both_kinds_of_config():
    assert {p.name for p in RAY_UP_CONFIGS} >= {"aws-gpu.yaml", "local.yaml"}
    for path in SERVE_CONFIGS:  # the rest must be serve configs (checked in test_commands.py)
        assert "groups" in load(path) or "mode" in load(path), f"{path.name}: neither a ray up nor a serve config"
    assert sorted(RAY_UP_CONFIGS + SERVE_CONFIGS) == CLUSTER_CONFIGS


@pytest.mark.parametrize("path", RAY_UP_CONFIGS, ids=lambda p: p.name)
def test_ray_accepts_the_config(path: Path):
    config = prepared(load(path))
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    # The defaults must not have added a worker type of their own next to ours.
    if load(path)["provider"]["type"] != "local":
        assert set(types) == set(load(path)["available_node_types"])


def test_aws_config_has_a_cpu_head_and_gpu_worker_types():
    config = prepared(load(next(p for p in RAY_UP_CONFIGS if p.name == "aws-gpu.yaml")))
    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "the head runs the router and front doors only"
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    assert workers and all(t["resources"].get("GPU", 0) >= 1 for t in workers.values())
    for name, t in workers.items():
        raw = load(next(p for p in RAY_UP_CONFIGS if p.name == "aws-gpu.yaml"))["available_node_types"][name]
        assert "min_workers" in raw and "max_workers" in raw, f"{name}: set min/max workers explicitly"
        assert 0 <= t["min_workers"] <= t["max_workers"] <= config["max_workers"]
    assert sum(t["max_workers"] for t in workers.values()) <= config["max_workers"]


def test_local_config_lists_its_machines():
    raw = load(next(p for p in RAY_UP_CONFIGS if p.name == "local.yaml"))
    provider = raw["provider"]
    assert provider["type"] == "local" and provider["head_ip"]
    assert provider["worker_ips"] and provider["head_ip"] not in provider["worker_ips"]
    [node_type] = prepared(raw)["available_node_types"].values()
    assert node_type["min_workers"] == node_type["max_workers"] == len(provider["worker_ips"])


@pytest.mark.parametrize("path", RAY_UP_CONFIGS, ids=lambda p: p.name)
def test_setup_installs_splitserve_and_the_pinned_ray_on_every_node(path: Path):
    config = prepared(load(path))
    for role in ("head", "worker"):
        setup = " ; ".join(config[f"{role}_setup_commands"])
        assert RAY_PIN.search(setup), f"{role} nodes: no pinned ray install"
        assert re.search(r"install\b.*\bsplitserve", setup), f"{role} nodes: splitserve is not installed"
    # The wheel the nodes install comes from file_mounts, so the mount must be the one named.
    wheel_dirs = {remote for remote in config["file_mounts"] if "dist" in remote}
    assert wheel_dirs and any(d in " ".join(config["setup_commands"]) for d in wheel_dirs)


@pytest.mark.parametrize("path", RAY_UP_CONFIGS, ids=lambda p: p.name)
def test_start_commands_start_ray_and_the_head_serves(path: Path):
    config = load(path)
    head = [program_argvs(cmd, "ray") for cmd in config["head_start_ray_commands"]]
    starts = [ray_start_flags(argv) for argvs in head for argv in argvs if argv[:1] == ["start"]]
    assert len(starts) == 1 and starts[0].get("head") == "true"
    assert starts[0].get("autoscaling-config") == "~/ray_bootstrap_config.yaml"
    assert "block" not in starts[0], "--block would keep the head's start commands from going on to serve"
    workers = [ray_start_flags(argv) for cmd in config["worker_start_ray_commands"]
               for argv in program_argvs(cmd, "ray") if argv[:1] == ["start"]]
    assert len(workers) == 1 and workers[0]["address"] == f"$RAY_HEAD_IP:{starts[0].get('port', '6379')}"
    # The server is started after Ray, on the head only (its arguments: test_commands.py).
    serve_at = [i for i, cmd in enumerate(config["head_start_ray_commands"]) if "splitserve serve" in cmd]
    start_at = [i for i, cmd in enumerate(config["head_start_ray_commands"]) if "ray start" in cmd]
    assert serve_at and min(serve_at) > max(start_at)
    assert not any("splitserve serve" in cmd for cmd in config["worker_start_ray_commands"])


def test_ray_is_pinned_to_one_version_everywhere():
    """`ray up` refuses (or misbehaves) when the laptop's Ray and the cluster's differ, and
    KubeRay starts the version the image has: every place must name the same one."""
    pins: dict[str, set[str]] = {}
    for path in RAY_UP_CONFIGS:
        pins[path.name] = {m for cmd in all_commands(load(path)) for m in RAY_PIN.findall(cmd)}
    runs = [rest for word, rest in dockerfile_instructions(DOCKERFILE.read_text()) if word == "RUN"]
    pins["Dockerfile"] = {m for run in runs for m in RAY_PIN.findall(run)}
    cluster = one(load_docs(KUSTOMIZATIONS["base"] / "raycluster.yaml"), "RayCluster")
    pins["raycluster.yaml rayVersion"] = {cluster["spec"]["rayVersion"]}
    assert all(len(found) == 1 for found in pins.values()), pins
    versions = {v for found in pins.values() for v in found}
    assert len(versions) == 1, f"Ray versions differ: {pins}"
    # ... and the package itself accepts that version.
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    [ray_req] = [Requirement(r) for r in project["dependencies"] if Requirement(r).name == "ray"]
    assert ray_req.specifier.contains(versions.pop()), f"pyproject requires {ray_req}"


# --- the checks reject what they should ------------------------------------------------------

def test_a_misspelt_key_is_rejected():
    broken = load(next(p for p in RAY_UP_CONFIGS if p.name == "aws-gpu.yaml"))
    broken["setup_command"] = broken.pop("setup_commands")
    with pytest.raises(jsonschema.ValidationError, match="setup_command"):
        prepared(broken)


def test_min_workers_beyond_max_workers_is_rejected():
    broken = load(next(p for p in RAY_UP_CONFIGS if p.name == "aws-gpu.yaml"))
    broken["available_node_types"]["gpu_1x"]["min_workers"] = broken["max_workers"] + 1
    with pytest.raises(ValueError, match="max_workers"):
        prepared(broken)


def test_an_unknown_head_node_type_is_rejected():
    broken = load(next(p for p in RAY_UP_CONFIGS if p.name == "aws-gpu.yaml"))
    broken["head_node_type"] = "no-such-type"
    with pytest.raises(ValueError, match="head_node_type"):
        prepared(broken)


def test_a_serve_config_is_not_taken_for_a_ray_up_config():
    assert not any(is_ray_up_config(load(path)) for path in SERVE_CONFIGS)
