"""The kubelet's view of the dev overlay, simulated on loopback (see kubelet.py).

Every Deployment's container starts from the image's ENTRYPOINT + the manifest's args and
env, with its ConfigMap and Secret volumes laid out as the manifest mounts them. The
Secrets are the ones docs/kubernetes.md tells the user to create, made by running those
very commands (``kubectl create secret ... --dry-run=client``). Then, as the kubelet
would: the startup, readiness and liveness probes succeed on the declared port with the
declared service name; after SIGTERM readiness fails at once while an open stream still
completes; the process exits 0 within terminationGracePeriodSeconds.

One knob is not the manifest's: the offline model is slowed (``delay_ms``/``chunk_chars``
through the environment) so that a turn is still streaming when SIGTERM arrives.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mesh.auth.config import AuthConfig
from mesh.auth.jwt import unverified_claims
from mesh.client import turn_request
from mesh.v1 import agent_pb2_grpc, router_pb2_grpc, types_pb2
from tests.meshtest import tool_path

from .k8stest import DOCS, mesh_agents, render
from .kubelet import Cluster, Pod, probe

AGENTS = list(mesh_agents())
DEPLOYMENTS = ["sts", *AGENTS, "router"]
READY_LINE = {"sts": "sts: ", "router": "router: "}
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVING = health_pb2.HealthCheckResponse.SERVING


def documented_commands() -> list[str]:
    """The dev set-up commands of docs/kubernetes.md that make the two Secrets."""
    text = DOCS.read_text(encoding="utf-8")
    lines = [line.strip() for line in text.splitlines()]
    wanted = [
        line
        for line in lines
        if line.startswith("uv run python -c")
        or re.match(r"kubectl -n mesh create secret generic mesh-dev-", line)
    ]
    assert len(wanted) == 3, f"expected the CA command and two secrets in the docs: {wanted}"
    return wanted


def run_documented(workdir: Path) -> dict[str, dict[str, bytes]]:
    """Run the docs' commands (kubectl with --dry-run=client) and return the Secrets."""
    secrets: dict[str, dict[str, bytes]] = {}
    for line in documented_commands():
        if line.startswith("uv run python"):
            command = line.replace("uv run python", f"'{sys.executable}'", 1)
        else:
            command = line.replace("kubectl", f"'{tool_path('kubectl')}'", 1)
            command += " --dry-run=client -o json"
        done = subprocess.run(
            ["bash", "-c", command],
            cwd=workdir,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, f"{line}\n{done.stderr}"
        if done.stdout.strip():
            secret = json.loads(done.stdout)
            secrets[secret["metadata"]["name"]] = {
                key: base64.b64decode(value) for key, value in secret["data"].items()
            }
    return secrets


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    work = tmp_path_factory.mktemp("kubelet")
    secrets = run_documented(work)
    slow = {}
    for name in AGENTS:
        slow[f"MESH_AGENTS__{name.upper()}__PROVIDER__DELAY_MS"] = "25"
        slow[f"MESH_AGENTS__{name.upper()}__PROVIDER__CHUNK_CHARS"] = "2"
    dev = Cluster(render("dev"), work / "pods", secrets, slow)
    try:
        for name in DEPLOYMENTS:
            dev.start(name)
        for name in DEPLOYMENTS:
            dev.pods[name].wait_line(READY_LINE.get(name, f"agent {name}: "), timeout=60)
        yield dev
    finally:
        dev.stop_all()


@pytest.mark.parametrize("name", DEPLOYMENTS)
async def test_startup_readiness_and_liveness_succeed(cluster: Cluster, name: str) -> None:
    pod = cluster.pods[name]
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert await probe(pod, kind), f"{name}: {kind} failed\n{pod.logs()}"


def test_sts_serves_the_secret_certificate_for_its_service_name(cluster: Cluster) -> None:
    """The STS reuses the mounted dev CA and certificate (it writes nothing into the
    read-only Secret mount), and other pods can verify it under the Service's DNS name."""
    pod = cluster.pods["sts"]
    tls_dir = pod.root / "data" / "sts" / "tls"
    for key, value in cluster.secrets["mesh-dev-sts-tls"].items():
        assert (tls_dir / key).read_bytes() == value, f"the STS rewrote {key}"
    agent_root = cluster.pods[AGENTS[0]].root
    context = ssl.create_default_context(cafile=str(agent_root / "etc/mesh/sts-ca/ca.pem"))
    (port,) = pod.ports.values()
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="sts.mesh.svc.cluster.local") as tls,
    ):
        assert tls.version() is not None


def user_token(cluster: Cluster, audience: str) -> str:
    """``kubectl -n mesh exec deploy/sts -- mesh token --sub alice [--audience A]``."""
    out = cluster.exec("sts", ["mesh", "token", "--sub", "alice", "--audience", audience])
    token = out.strip()
    assert unverified_claims(token)["aud"] == audience
    return token


async def drain_with_open_stream(
    pod: Pod, stub: Callable[[grpc.aio.Channel], Any], token: str, agent: str
) -> None:
    """SIGTERM while a turn streams: readiness NOT_SERVING at once, the turn completes,
    the process exits 0 within terminationGracePeriodSeconds."""
    readiness = pod.container["readinessProbe"]
    service = readiness["grpc"]["service"]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{pod.probe_port(readiness)}") as channel:
        health: Any = health_pb2_grpc.HealthStub(channel)  # the stubs' types lack Watch
        watch = health.Watch(health_pb2.HealthCheckRequest(service=service), timeout=60)
        first = await watch.read()
        assert isinstance(first, health_pb2.HealthCheckResponse) and first.status == SERVING

        call = stub(channel).Chat(metadata=(("authorization", f"Bearer {token}"),), timeout=60)
        await call.write(turn_request("hello"))
        await call.done_writing()  # one turn, then the stream ends by itself
        event = await call.read()
        assert isinstance(event, types_pb2.ChatEvent), event
        assert event.WhichOneof("kind") not in ("final", "error"), event

        pod.signal(signal.SIGTERM)
        changed = await watch.read()
        assert isinstance(changed, health_pb2.HealthCheckResponse)
        assert changed.status == NOT_SERVING
        assert not await probe(pod, "readinessProbe"), "readiness must fail while draining"
        watch.cancel()

        events = [event]
        while True:
            event = await call.read()
            if event is grpc.aio.EOF:
                break
            assert isinstance(event, types_pb2.ChatEvent)
            events.append(event)
        kinds = [e.WhichOneof("kind") for e in events]
        assert "error" not in kinds, events
        assert kinds[-1] == "final", kinds
        assert events[-1].agent == agent, events[-1]
        assert "".join(e.delta.text for e in events if e.WhichOneof("kind") == "delta")
        assert await call.code() == grpc.StatusCode.OK
    assert pod.popen is not None
    code = await asyncio.to_thread(pod.popen.wait, pod.grace)
    assert code == 0, pod.logs()


async def test_router_drains_with_an_open_stream_through_to_an_agent(cluster: Cluster) -> None:
    """A user token from the dev STS, the router exchanging it (RFC 8693) for triage's
    audience, triage validating it against the STS's JWKS over the dev CA."""
    audience = AuthConfig().audience_for("router")
    await drain_with_open_stream(
        cluster.pods["router"],
        router_pb2_grpc.RouterServiceStub,
        user_token(cluster, audience),
        "triage",  # router.default_agent: the turn crossed the router -> agent hop
    )


@pytest.mark.parametrize("name", AGENTS)
async def test_agent_drains_with_an_open_stream(cluster: Cluster, name: str) -> None:
    token = user_token(cluster, AuthConfig().audience_for(name))
    await drain_with_open_stream(cluster.pods[name], agent_pb2_grpc.AgentServiceStub, token, name)


async def test_sts_stops_answering_and_exits_zero_on_sigterm(cluster: Cluster) -> None:
    """The token service has no streams to drain: SIGTERM stops it at once, exit 0."""
    pod = cluster.pods["sts"]
    pod.signal(signal.SIGTERM)
    assert pod.popen is not None
    code = await asyncio.to_thread(pod.popen.wait, pod.grace)
    assert code == 0, pod.logs()
    assert not await probe(pod, "readinessProbe")
