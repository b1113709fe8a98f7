"""A small kubelet: runs a rendered Deployment's container as a local process, the way the
kubelet would start it from the image, and probes it the way the kubelet would.

- argv: the image's ENTRYPOINT (from the Dockerfile) + the container's ``args``; the
  executable is looked up on the image's PATH, whose ``/app/.venv`` is this venv.
- env: the image's ``ENV``, then ``envFrom`` (ConfigMaps of the rendered objects, Secrets
  given by the test), then ``env`` (values, secretKeyRef, configMapKeyRef).
- volumes: every mount is a folder under the pod's root (``ROOT/<mountPath>``) filled from
  the ConfigMap or Secret it names (``items`` honoured) or left empty (emptyDir).
- the cluster, replaced on loopback: every declared containerPort gets a free local port;
  Service DNS names (``name``, ``name.ns``, ``name.ns.svc``, ``name.ns.svc.cluster.local``)
  with a Service port become ``127.0.0.1`` with the local port of the target container;
  ``0.0.0.0`` binds become ``127.0.0.1``; container paths move under the pod root (where
  the mounts are), image paths (``/app``) to this checkout;
  ``--port N`` of a declared port becomes the local port. JSON values are rewritten
  structurally ({"host": ..., "port": ...}).
"""

from __future__ import annotations

import contextlib
import json
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.meshtest import REPO

from .k8stest import (
    DOCKERFILE,
    Obj,
    by_name,
    containers,
    dockerfile_stages,
    exec_form,
    of_kind,
    parse_env_instruction,
    pod_spec,
)

#: PATH of the python:3.11-slim base image (the Dockerfile's ENV PATH extends it).
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SERVING = health_pb2.HealthCheckResponse.SERVING


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(frozen=True)
class Image:
    """What the runtime stage of the Dockerfile gives a container."""

    entrypoint: list[str]
    env: dict[str, str]
    workdir: str

    @classmethod
    def from_dockerfile(cls, path: Path = DOCKERFILE) -> Image:
        runtime = dockerfile_stages(path.read_text(encoding="utf-8"))[-1]
        env = {"PATH": BASE_PATH}
        for args in runtime.all("ENV"):
            for name, value in parse_env_instruction(args).items():
                env[name] = re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m.group(1), ""), value)
        (entrypoint,) = runtime.all("ENTRYPOINT")
        workdir = runtime.all("WORKDIR")[-1]
        return cls(exec_form(entrypoint), env, workdir)


#: Image paths -> this checkout (the image copies the venv to /app/.venv and services/).
IMAGE_FILES = {"/app/.venv": Path(sys.prefix), "/app": REPO}


@dataclass
class Pod:
    """One running container."""

    name: str
    deployment: Obj
    container: Obj
    root: Path
    ports: dict[int, int]
    env: dict[str, str]
    argv: list[str]
    cwd: Path
    popen: subprocess.Popen[str] | None = None
    stdout: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)
    lines: queue.Queue[str | None] = field(default_factory=queue.Queue)

    @property
    def grace(self) -> int:
        grace: int = pod_spec(self.deployment).get("terminationGracePeriodSeconds", 30)
        return grace

    def start(self) -> None:
        self.popen = subprocess.Popen(
            self.argv,
            env=self.env,
            cwd=self.cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        threading.Thread(target=self._pump, args=(self.popen.stdout, True), daemon=True).start()
        threading.Thread(target=self._pump, args=(self.popen.stderr, False), daemon=True).start()

    def _pump(self, stream: Any, out: bool) -> None:
        for line in stream:
            (self.stdout if out else self.stderr).append(line)
            if out:
                self.lines.put(line.rstrip("\n"))
        if out:
            self.lines.put(None)

    def wait_line(self, prefix: str, timeout: float = 30.0) -> str:
        while True:
            try:
                line = self.lines.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(
                    f"{self.name}: no {prefix!r} within {timeout}s; stderr:\n{self.logs()}"
                ) from None
            if line is None:
                code = self.popen.wait() if self.popen else None
                raise AssertionError(
                    f"{self.name}: exited {code} before {prefix!r}; stderr:\n{self.logs()}"
                )
            if line.startswith(prefix):
                return line[len(prefix) :].strip()

    def logs(self) -> str:
        return "".join(self.stderr[-60:])

    def signal(self, sig: int = signal.SIGTERM) -> None:
        assert self.popen is not None
        if self.popen.poll() is None:
            self.popen.send_signal(sig)

    def kill(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()

    def probe_port(self, probe: Obj) -> int:
        action = probe.get("grpc") or probe.get("httpGet") or {}
        return self.ports[int(action["port"])]


class Cluster:
    """Rendered objects + Secrets -> pods on loopback."""

    def __init__(
        self,
        objects: list[Obj],
        root: Path,
        secrets: Mapping[str, Mapping[str, bytes]],
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        self.objects = objects
        self.root = root
        self.secrets = secrets
        self.extra_env = dict(extra_env or {})
        self.image = Image.from_dockerfile()
        self.deployments = by_name(objects, "Deployment")
        self.config_maps = by_name(objects, "ConfigMap")
        self.ports: dict[tuple[str, int], int] = {}
        for name, deployment in self.deployments.items():
            for container in containers(deployment):
                for port in container.get("ports", []):
                    self.ports[(name, int(port["containerPort"]))] = free_port()
        self.addresses = self._service_addresses()
        self.pods: dict[str, Pod] = {}

    # -- the cluster's names, on loopback ------------------------------------------------

    def _service_addresses(self) -> dict[tuple[str, int], int]:
        out: dict[tuple[str, int], int] = {}
        for service in of_kind(self.objects, "Service"):
            selector: dict[str, str] = service["spec"]["selector"]
            matches = [
                (name, d)
                for name, d in self.deployments.items()
                if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
            ]
            assert len(matches) == 1, f"Service {service['metadata']['name']} selects {matches}"
            name, deployment = matches[0]
            (container,) = containers(deployment)
            named = {p.get("name"): int(p["containerPort"]) for p in container["ports"]}
            svc, ns = service["metadata"]["name"], service["metadata"]["namespace"]
            for port in service["spec"]["ports"]:
                target = port.get("targetPort", port["port"])
                number = named[target] if isinstance(target, str) else int(target)
                for host in (
                    svc,
                    f"{svc}.{ns}",
                    f"{svc}.{ns}.svc",
                    f"{svc}.{ns}.svc.cluster.local",
                ):
                    out[(host, int(port["port"]))] = self.ports[(name, number)]
        return out

    def _rewrite_json(self, value: Any, mounts: list[str], root: Path) -> Any:
        if isinstance(value, dict):
            host, port = value.get("host"), value.get("port")
            if isinstance(host, str) and isinstance(port, int) and (host, port) in self.addresses:
                value = {**value, "host": "127.0.0.1", "port": self.addresses[(host, port)]}
            return {k: self._rewrite_json(v, mounts, root) for k, v in value.items()}
        if isinstance(value, list):
            return [self._rewrite_json(v, mounts, root) for v in value]
        if isinstance(value, str):
            return self.rewrite(value, mounts, root)
        return value

    def rewrite(self, value: str, mounts: list[str], root: Path) -> str:
        if value == "0.0.0.0":
            return "127.0.0.1"
        if value[:1] in "[{":
            with contextlib.suppress(ValueError):
                data = json.loads(value)
                return json.dumps(self._rewrite_json(data, mounts, root), separators=(",", ":"))
        if value.startswith("/"):
            return ":".join(self._path(part, mounts, root) for part in value.split(":"))

        def address(match: re.Match[str]) -> str:
            local = self.addresses.get((match.group(1), int(match.group(2))))
            return f"127.0.0.1:{local}" if local else match.group(0)

        return re.sub(r"(?<![\w.-])([a-z0-9][a-z0-9.-]*):(\d+)\b", address, value)

    @staticmethod
    def _path(path: str, mounts: list[str], root: Path) -> str:
        if any(path == m or path.startswith(m.rstrip("/") + "/") for m in mounts):
            return str(root) + path  # a volume, laid out under the pod root
        for image_path, local in IMAGE_FILES.items():
            if path == image_path or path.startswith(image_path + "/"):
                return str(local) + path[len(image_path) :]
        # Anything else is the container's own (read-only) root filesystem, never the host's.
        return str(root) + path

    # -- volumes and environment -------------------------------------------------------------

    def _secret(self, name: str, optional: bool) -> Mapping[str, bytes] | None:
        if name not in self.secrets:
            assert optional, f"Secret {name} does not exist (the pod would not start)"
            return None
        return self.secrets[name]

    def _mount(self, pod: Obj, container: Obj, root: Path) -> list[str]:
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        paths: list[str] = []
        for mount in sorted(container.get("volumeMounts", []), key=lambda m: len(m["mountPath"])):
            assert "subPath" not in mount, "subPath mounts are not simulated"
            target = root / mount["mountPath"].lstrip("/")
            target.mkdir(parents=True, exist_ok=True)
            volume = volumes[mount["name"]]
            files: Mapping[str, bytes] = {}
            items: list[Obj] = []
            if "configMap" in volume:
                data = self.config_maps[volume["configMap"]["name"]].get("data", {})
                files = {k: v.encode() for k, v in data.items()}
                items = volume["configMap"].get("items", [])
            elif "secret" in volume:
                found = self._secret(
                    volume["secret"]["secretName"], volume["secret"].get("optional", False)
                )
                files = found or {}
                items = volume["secret"].get("items", [])
            else:
                assert "emptyDir" in volume, f"volume {mount['name']}: unsupported source"
            chosen = {i["key"]: i["path"] for i in items} if items else {k: k for k in files}
            for key, rel in chosen.items():
                (target / rel).parent.mkdir(parents=True, exist_ok=True)
                (target / rel).write_bytes(files[key])
            paths.append(mount["mountPath"])
        return sorted(paths, key=len, reverse=True)

    def _env(self, container: Obj) -> dict[str, str]:
        env = dict(self.image.env)
        for source in container.get("envFrom", []):
            if "configMapRef" in source:
                env.update(self.config_maps[source["configMapRef"]["name"]].get("data", {}))
            elif "secretRef" in source:
                ref = source["secretRef"]
                found = self._secret(ref["name"], ref.get("optional", False))
                env.update({k: v.decode() for k, v in (found or {}).items()})
        for entry in container.get("env", []):
            if "value" in entry:
                env[entry["name"]] = entry["value"]
                continue
            source = entry["valueFrom"]
            if "secretKeyRef" in source:
                ref = source["secretKeyRef"]
                found = self._secret(ref["name"], ref.get("optional", False))
                if found is not None and ref["key"] in found:
                    env[entry["name"]] = found[ref["key"]].decode()
                else:
                    assert ref.get("optional"), f"Secret {ref['name']} has no key {ref['key']}"
            elif "configMapKeyRef" in source:
                ref = source["configMapKeyRef"]
                env[entry["name"]] = self.config_maps[ref["name"]]["data"][ref["key"]]
            else:
                raise AssertionError(f"env {entry['name']}: unsupported valueFrom {source}")
        return env

    def pod(self, name: str) -> Pod:
        """Prepare (not start) the pod of Deployment ``name``."""
        deployment = self.deployments[name]
        (container,) = containers(deployment)
        root = self.root / name
        mounts = self._mount(pod_spec(deployment), container, root)
        env = {**self._env(container), **self.extra_env}
        env = {k: self.rewrite(v, mounts, root) for k, v in env.items()}
        env["HOSTNAME"] = f"{name}-0"
        declared = {int(p["containerPort"]) for p in container.get("ports", [])}
        args: list[str] = []
        for i, arg in enumerate(container.get("args", [])):
            if i and container["args"][i - 1] == "--port" and int(arg) in declared:
                args.append(str(self.ports[(name, int(arg))]))
            else:
                args.append(self.rewrite(arg, mounts, root))
        command = container.get("command") or self.image.entrypoint
        executable = shutil.which(command[0], path=env["PATH"])
        assert executable, f"{command[0]} is not on the image's PATH {env['PATH']}"
        local_ports = {port: self.ports[(name, port)] for port in declared}
        cwd = Path(self._path(self.image.workdir, mounts, root))
        return Pod(
            name,
            deployment,
            container,
            root,
            local_ports,
            env,
            [executable, *command[1:], *args],
            cwd,
        )

    def start(self, name: str) -> Pod:
        pod = self.pod(name)
        pod.start()
        self.pods[name] = pod
        return pod

    def exec(self, name: str, argv: list[str]) -> str:
        """``kubectl exec deploy/NAME -- ARGV``: the container's env, files and PATH."""
        pod = self.pods[name]
        executable = shutil.which(argv[0], path=pod.env["PATH"])
        assert executable, argv[0]
        done = subprocess.run(
            [executable, *argv[1:]],
            env=pod.env,
            cwd=pod.cwd,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, f"exec {argv} in {name}: {done.stderr}"
        return done.stdout

    def stop_all(self) -> None:
        for pod in self.pods.values():
            with contextlib.suppress(AssertionError):
                pod.signal(signal.SIGTERM)
        for pod in self.pods.values():
            if pod.popen is None:
                continue
            try:
                pod.popen.wait(timeout=pod.grace)
            except subprocess.TimeoutExpired:
                pod.kill()


# -- probes, as the kubelet runs them -------------------------------------------------------


async def grpc_check(port: int, service: str, timeout: float, *, wait: bool = False) -> int:
    """grpc.health.v1.Health/Check, plaintext (the kubelet's gRPC prober); the status, or -1
    when the call fails."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub: Any = health_pb2_grpc.HealthStub(channel)  # the stubs' types lack Check
        try:
            response = await stub.Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout, wait_for_ready=wait
            )
        except grpc.aio.AioRpcError:
            return -1
        status: int = response.status
        return status


async def http_get(port: int, action: Obj, timeout: float) -> int:
    """The kubelet's HTTPS probe (it does not verify the certificate); the status or -1."""
    url = f"{action.get('scheme', 'HTTP').lower()}://127.0.0.1:{port}{action.get('path', '/')}"
    async with httpx.AsyncClient(verify=False, timeout=timeout, trust_env=False) as client:  # noqa: S501
        try:
            response = await client.get(url)
        except httpx.HTTPError:
            return -1
        return response.status_code


async def probe(pod: Pod, kind: str) -> bool:
    """One run of the container's ``kind`` probe; startup probes get their whole budget
    (periodSeconds x failureThreshold) to connect."""
    spec: Obj = pod.container[kind]
    timeout = float(spec.get("timeoutSeconds", 1))
    wait = kind == "startupProbe"
    if wait:
        timeout = float(spec.get("periodSeconds", 10) * spec.get("failureThreshold", 3))
    port = pod.probe_port(spec)
    if "grpc" in spec:
        status = await grpc_check(port, spec["grpc"].get("service", ""), timeout, wait=wait)
        return status == SERVING
    code = await http_get(port, spec["httpGet"], timeout)
    return 200 <= code < 400


__all__ = ["Cluster", "Image", "Pod", "free_port", "grpc_check", "http_get", "probe"]
