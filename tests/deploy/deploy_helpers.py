"""Plain helpers of the deployment tests: where the files are, rendering kustomizations, reading
CRD schemas, Dockerfiles and shell command lines. Fixtures built on them are in conftest.py.

Why these exist rather than a library call:

- `program_argvs` finds the ``splitserve ...`` (or ``ray ...``) invocations inside the shell
  lines of the ``ray up`` configs and the container commands (after ``&&``, inside a ``tmux`` or
  ``bash -c`` string, with redirections around), so each one can be parsed by the real CLI
  parser or compared with the flags it must agree with.
- `dockerfile_instructions` reads exactly what the tests need from deploy/Dockerfile
  (instructions with continuations joined, ``ARG`` defaults substituted); no Docker engine runs
  on the CI machine, so the image itself is not built here.
- `crd_json_schema` turns a CRD's OpenAPI v3 schema into strict JSON Schema: ``nullable``
  becomes a ``null`` type, and objects with listed properties refuse unknown ones (as the API
  server's strict field validation does) unless marked ``x-kubernetes-preserve-unknown-fields``.
  CEL rules (``x-kubernetes-validations``) cannot be evaluated offline, so fields guarded by them
  are refused outright: a manifest setting one needs another check first.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
KUBERNETES = REPO / "deploy" / "kubernetes"
DOCKERFILE = REPO / "deploy" / "Dockerfile"
DOCKERIGNORE = REPO / "deploy" / "Dockerfile.dockerignore"
DOCS = REPO / "docs" / "deploy.md"
DASHBOARD = REPO / "deploy" / "grafana" / "splitserve-dashboard.json"
PYPROJECT = REPO / "pyproject.toml"
#: Every YAML file of cluster/configs: each is a `ray up` config or a serve config it names.
CLUSTER_CONFIGS = sorted((REPO / "cluster" / "configs").glob("*.yaml"))
OVERLAYS = ("small", "large")
#: Every kustomization shipped, by name: the base (a working small deployment) and the overlays.
KUSTOMIZATIONS = {"base": KUBERNETES / "base", **{name: KUBERNETES / "overlays" / name for name in OVERLAYS}}
DATA = Path(__file__).parent / "data"
CRD_FILE = DATA / "kuberay" / "ray.io_rayclusters.yaml"
SERVICEMONITOR_SCHEMA = DATA / "prometheus-operator" / "servicemonitor.schema.json"


def is_ray_up_config(doc: Any) -> bool:
    """A `ray up` config names its node provider; a serve config never has that key."""
    return isinstance(doc, dict) and "provider" in doc


RAY_UP_CONFIGS = [path for path in CLUSTER_CONFIGS if is_ray_up_config(yaml.safe_load(path.read_text()))]
SERVE_CONFIGS = [path for path in CLUSTER_CONFIGS if path not in RAY_UP_CONFIGS]


# --- Kubernetes ----------------------------------------------------------------------------------

def find_kubectl() -> str | None:
    """``kubectl`` from this interpreter's environment (the test extra), else from PATH."""
    beside = Path(sys.executable).parent / "kubectl"
    return str(beside) if beside.is_file() else shutil.which("kubectl")


def kustomize(kubectl: str, folder: Path) -> list[dict[str, Any]]:
    """The resources ``kubectl kustomize`` renders from ``folder``; a failed render raises."""
    done = subprocess.run([kubectl, "kustomize", str(folder)], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"kustomize {folder}: {done.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def load_docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc.get("kind") == kind]


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    """The single resource of ``kind`` (and ``name``, if given) in ``docs``."""
    found = [d for d in by_kind(docs, kind) if name is None or d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def head_container(cluster: dict[str, Any]) -> dict[str, Any]:
    """The Ray container of a RayCluster's head (KubeRay's rule: the first container)."""
    return cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]


def container_port(container: dict[str, Any], port: int | str) -> int:
    """The number a Service ``targetPort`` or probe ``port`` (a number or a port name) means in
    ``container``; a name the container does not declare raises KeyError."""
    if isinstance(port, int):
        return port
    named = {p["name"]: p["containerPort"] for p in container.get("ports", []) if "name" in p}
    return named[port]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    """Whether an equality selector (matchLabels, a Service's selector) matches ``labels``."""
    return all(labels.get(key) == value for key, value in selector.items())


def mounted_file(pod_spec: dict[str, Any], container: dict[str, Any], path: str,
                 docs: list[dict[str, Any]]) -> str:
    """The text a container reads at ``path`` when that file comes from a ConfigMap volume of
    the pod (the ConfigMap looked up by name in ``docs``)."""
    for mount in container.get("volumeMounts", []):
        folder = mount["mountPath"].rstrip("/") + "/"
        if not path.startswith(folder):
            continue
        [volume] = [v for v in pod_spec.get("volumes", []) if v["name"] == mount["name"]]
        assert "configMap" in volume, f"{path} is mounted from {volume}, not from a ConfigMap"
        config_map = one(docs, "ConfigMap", volume["configMap"]["name"])
        key = mount.get("subPath") or path[len(folder):]
        for item in volume["configMap"].get("items", []):
            if item["path"] == key:
                key = item["key"]
        return config_map["data"][key]
    raise AssertionError(f"no volume of the container is mounted at {path}")


def crd_json_schema(crd: dict[str, Any], version: str) -> dict[str, Any]:
    """The ``openAPIV3Schema`` of one served version of a CRD, as strict JSON Schema."""
    [entry] = [v for v in crd["spec"]["versions"] if v["name"] == version and v.get("served")]
    return _strict(copy.deepcopy(entry["schema"]["openAPIV3Schema"]))


def _strict(node: Any) -> Any:
    if not isinstance(node, dict):
        return node
    if "x-kubernetes-validations" in node:
        return False  # a CEL rule we cannot evaluate: refuse the field (see the module docstring)
    if node.pop("nullable", False) and "type" in node:
        node["type"] = [node["type"], "null"]
    if "properties" in node and "additionalProperties" not in node \
            and not node.get("x-kubernetes-preserve-unknown-fields"):
        node["additionalProperties"] = False
    for key in ("properties", "patternProperties"):
        if key in node:
            node[key] = {name: _strict(sub) for name, sub in node[key].items()}
    for key in ("items", "additionalProperties", "not"):
        if isinstance(node.get(key), dict):
            node[key] = _strict(node[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in node:
            node[key] = [_strict(sub) for sub in node[key]]
    return node


# --- serve configs -------------------------------------------------------------------------------

def gpus_needed(cfg: Any) -> int:
    """GPUs a `ServeConfig` places: one per rank of every group of its mode."""
    return sum(getattr(cfg, role).count * getattr(cfg, role).tp * getattr(cfg, role).pp for role in cfg.roles())


def largest_group(cfg: Any) -> int:
    """GPUs of the largest group that must sit on one node (tp > 1 groups are strictly packed,
    see splitserve.cluster.ray_group); 1 when every group may spread."""
    sizes = [getattr(cfg, r).tp * getattr(cfg, r).pp for r in cfg.roles() if getattr(cfg, r).tp > 1]
    return max(sizes, default=1)


def serve_config_of(argv: list[str], config_file: Path | None) -> Any:
    """The `ServeConfig` a ``splitserve serve ...`` command line starts: parsed by the real
    parser, its ``--config`` replaced by ``config_file`` (the local copy of the file the command
    names on its node or in its pod), loaded and validated by the real code."""
    from splitserve.cluster.cli import build_parser, serve_config_from_args

    args = build_parser().parse_args(argv)
    assert args.command == "serve", argv
    if config_file is not None:
        assert args.config, f"{argv} names no --config"
        args.config = str(config_file)
    return serve_config_from_args(args)


def metric_names_in(expr: str) -> set[str]:
    """The ``splitserve:`` metric names a PromQL expression (or a Grafana query) reads."""
    return set(re.findall(r"splitserve:[A-Za-z0-9_:]+", expr))


def exposed_metric_names(registry: Any) -> dict[str, str]:
    """Every series name a prometheus_client registry can expose -> its metric family's name,
    labelled metrics included before they have any sample (their names follow from the type)."""
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created"),
                "summary": ("", "_count", "_sum", "_created"), "gauge": ("",), "info": ("_info",)}
    names: dict[str, str] = {}
    for family in registry.collect():
        for suffix in suffixes.get(family.type, ("",)):
            names[family.name + suffix] = family.name
    return names


# --- shell command lines -------------------------------------------------------------------------

_FD_REDIRECT = re.compile(r"\s\d*>&\d+")  # 2>&1: the digits would otherwise read as an argument
_OPERATOR = re.compile(r"^[;&|<>()]+$")
_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
#: Words after which the next word is still the command run (``exec splitserve serve ...``).
_PREFIX_WORDS = {"exec", "nohup", "env", "command", "time", "sudo"}


def program_argvs(shell: str, program: str) -> list[list[str]]:
    """The argument lists of every invocation of ``program`` in a shell command line, nested
    shell strings (``tmux new-session "..."``, ``bash -c '...'``) included. Only a word in
    command position counts (first, after an operator, or after ``exec``/``env``/...), so
    ``tmux new-session -s splitserve "..."`` is tmux's session name, not a call."""
    lexer = shlex.shlex(_FD_REDIRECT.sub(" ", shell), posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    nested = re.compile(rf"(^|[\s;&|(/]){re.escape(program)}\s")
    found: list[list[str]] = []
    current: list[str] | None = None
    command_position = True
    for token in lexer:
        if _OPERATOR.match(token):
            if current is not None:
                found.append(current)
                current = None
            command_position = True
        elif current is not None:
            current.append(token)
        elif command_position and os.path.basename(token) == program:
            current = []
        else:
            if " " in token and nested.search(token):
                found.extend(program_argvs(token, program))
            command_position = command_position and (token in _PREFIX_WORDS or _ASSIGNMENT.match(token) is not None)
    if current is not None:
        found.append(current)
    return found


def splitserve_argvs(shell: str) -> list[list[str]]:
    """The argument lists of every ``splitserve`` invocation in a shell command line."""
    return program_argvs(shell, "splitserve")


def ray_start_flags(argv: list[str]) -> dict[str, str]:
    """``ray start`` arguments as rayStartParams spell them: ``--num-gpus=1`` and
    ``--num-gpus 1`` give ``{"num-gpus": "1"}``, a bare ``--head`` gives ``{"head": "true"}``."""
    assert argv[:1] == ["start"], f"not a `ray start` command: {argv}"
    flags: dict[str, str] = {}
    rest = argv[1:]
    while rest:
        word = rest.pop(0)
        assert word.startswith("--"), f"unexpected argument {word!r} in ray start {argv}"
        name, eq, value = word[2:].partition("=")
        if not eq:
            value = rest.pop(0) if rest and not rest[0].startswith("--") else "true"
        flags[name] = value
    return flags


def remote_to_local(path: str, file_mounts: dict[str, str], root: Path) -> Path:
    """The local file behind a path on a `ray up` node, through the config's file_mounts
    (remote -> local, local paths relative to the folder `ray up` runs in: ``root``)."""
    for remote, local in file_mounts.items():
        prefix = remote.rstrip("/") + "/"
        if path.startswith(prefix):
            return root / local / path[len(prefix):]
    raise AssertionError(f"{path} is not under any file_mounts target ({sorted(file_mounts)})")


def container_shell(container: dict[str, Any]) -> str:
    """A container's command and args as one shell line (what it runs, before env expansion)."""
    command, args = container.get("command", []), container.get("args", [])
    runs_shell = bool(command) and os.path.basename(command[0]) in ("sh", "bash") \
        and any(flag in ("-c", "-lc") for flag in command[1:])
    return " ".join(args) if runs_shell else shlex.join(command + args)


# --- Dockerfile ----------------------------------------------------------------------------------

def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuations joined, comments dropped, ``${ARG}`` and
    ``$ARG`` replaced by the ARG defaults declared above them."""
    lines: list[str] = []
    pending = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    args: dict[str, str] = {}
    out = []
    for line in lines:
        word, _, rest = line.partition(" ")
        word, rest = word.upper(), rest.strip()
        rest = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m[1] or m[2], m[0]), rest)
        if word == "ARG" and "=" in rest:
            name, _, default = rest.partition("=")
            args[name] = default
        out.append((word, rest))
    return out


def exec_form(arguments: str) -> list[str]:
    """An instruction's JSON array (exec form), as ENTRYPOINT and CMD are written here."""
    value = json.loads(arguments)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), arguments
    return value


def dockerignore_allows(patterns: list[str], path: str) -> bool:
    """Whether a path of the build context passes the ignore file: the last matching pattern wins,
    ``!`` lets a path through again, and a folder's rule covers what is inside it."""
    allowed = True
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern[1:] if negate else pattern
        body = body.strip("/")
        if any(_glob_match(body, prefix) for prefix in prefixes):
            allowed = negate
    return allowed


def _glob_match(pattern: str, path: str) -> bool:
    regex = ""
    for piece in re.split(r"(\*\*/|\*\*|\*|\?)", pattern):
        regex += {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(piece, re.escape(piece))
    return re.fullmatch(regex, path) is not None


def dockerignore_patterns(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
