"""Policy over the rendered objects of every overlay: probes, hardening, resources, images,
Secrets, the agent set of services/mesh.yaml, graceful termination and DNS discovery."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest

from mesh.config import MeshConfig, load_config
from mesh.v1 import agent_pb2, router_pb2

from .k8stest import (
    DOCKERFILE,
    DOCS,
    OVERLAYS,
    Obj,
    all_containers,
    by_name,
    component,
    config_map,
    containers,
    declared_ports,
    dns_targets,
    dockerfile_stages,
    env_from_config_maps,
    mesh_agents,
    of_kind,
    plain_env,
    pod_spec,
    render,
    secret_env,
)

AGENT_SERVICE = agent_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name
ROUTER_SERVICE = router_pb2.DESCRIPTOR.services_by_name["RouterService"].full_name
#: Health service names each command's server registers ("" is the whole server).
REGISTERED = {"agent": {"", AGENT_SERVICE}, "router": {"", ROUTER_SERVICE}}
#: The embedded token service speaks HTTPS, not gRPC: its probes are HTTPS GETs.
HTTP_COMMANDS = {"sts"}
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")
ALL = sorted(OVERLAYS)


def _command(container: Obj) -> str:
    args: list[str] = container.get("args", [])
    assert args, f"container {container['name']} has no args (the mesh subcommand)"
    return args[0]


def _image_uid() -> int:
    runtime = dockerfile_stages(DOCKERFILE.read_text(encoding="utf-8"))[-1]
    user = runtime.all("USER")[-1]
    return int(user.split(":")[0])


@pytest.mark.parametrize("overlay", ALL)
def test_every_container_has_three_probes_on_a_declared_port(overlay: str) -> None:
    for deployment, container in all_containers(render(overlay)):
        where = f"{overlay}/{deployment['metadata']['name']}/{container['name']}"
        command = _command(container)
        ports = declared_ports(container)
        for kind in PROBES:
            probe = container.get(kind)
            assert probe is not None, f"{where}: no {kind}"
            if command in HTTP_COMMANDS:
                action = probe["httpGet"]
                assert action["scheme"] == "HTTPS", f"{where}: {kind} must use HTTPS"
            else:
                assert set(probe) & {"grpc", "httpGet", "tcpSocket", "exec"} == {"grpc"}, (
                    f"{where}: {kind} must be a native grpc probe"
                )
                action = probe["grpc"]
                service = action.get("service", "")
                assert service in REGISTERED[command], (
                    f"{where}: {kind} asks for {service!r}; the {command} registers "
                    f"{sorted(REGISTERED[command])}"
                )
            port = action["port"]
            assert isinstance(port, int), f"{where}: {kind} port must be a number, not {port!r}"
            assert port in ports, f"{where}: {kind} port {port} is not a containerPort {ports}"


@pytest.mark.parametrize("overlay", ALL)
def test_readiness_names_the_service_and_liveness_the_process(overlay: str) -> None:
    """Readiness and startup ask for the served API (NOT_SERVING from the first moment of a
    drain); liveness asks for the process ("") and no dependency can fail it."""
    for deployment, container in all_containers(render(overlay)):
        command = _command(container)
        if command in HTTP_COMMANDS:
            continue
        api = AGENT_SERVICE if command == "agent" else ROUTER_SERVICE
        assert container["readinessProbe"]["grpc"]["service"] == api
        assert container["startupProbe"]["grpc"]["service"] == api
        assert container["livenessProbe"]["grpc"].get("service", "") == ""
        assert container["readinessProbe"]["failureThreshold"] == 1, deployment["metadata"]


def _health_ports(objects: list[Obj]) -> dict[int, str]:
    """The plaintext health-only port the overlay turns on (server.health_port), if any,
    and the HTTP metrics port (server.metrics_port), if any."""
    ports: dict[int, str] = {}
    for env in of_kind(objects, "ConfigMap"):
        data = env.get("data", {})
        if not env["metadata"]["name"].startswith("mesh-env"):
            continue
        if value := data.get("MESH_SERVER__HEALTH_PORT"):
            ports[int(value)] = "grpc-health"
        if value := data.get("MESH_SERVER__METRICS_PORT"):
            ports[int(value)] = "metrics"
    return ports


@pytest.mark.parametrize("overlay", ALL)
def test_the_process_listens_on_the_declared_port(overlay: str) -> None:
    objects = render(overlay)
    health = _health_ports(objects)
    for deployment, container in all_containers(objects):
        args: list[str] = container["args"]
        port = int(args[args.index("--port") + 1])
        expected = {port: "grpc"} | health if args[0] != "sts" else {port: "https"}
        assert declared_ports(container) == expected, deployment["metadata"]["name"]


@pytest.mark.parametrize("overlay", ALL)
def test_non_root_read_only_no_capabilities(overlay: str) -> None:
    uid = _image_uid()
    assert uid > 0
    for deployment, container in all_containers(render(overlay)):
        where = f"{overlay}/{deployment['metadata']['name']}/{container['name']}"
        pod = pod_spec(deployment)
        pod_ctx: Obj = pod.get("securityContext", {})
        ctx: Obj = container.get("securityContext", {})
        assert ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot")) is True, where
        assert ctx.get("runAsUser", pod_ctx.get("runAsUser")) == uid, f"{where}: UID != image"
        assert ctx.get("readOnlyRootFilesystem") is True, where
        assert ctx.get("allowPrivilegeEscalation") is False, where
        assert ctx.get("privileged", False) is False, where
        assert ctx.get("capabilities", {}).get("drop") == ["ALL"], where
        assert not ctx.get("capabilities", {}).get("add"), where
        seccomp: Obj = ctx.get("seccompProfile") or pod_ctx.get("seccompProfile") or {}
        assert seccomp.get("type") == "RuntimeDefault", where
        assert pod.get("automountServiceAccountToken") is False, where
        assert pod["serviceAccountName"] == deployment["metadata"]["name"], where
        assert not pod.get("hostNetwork") and not pod.get("hostPID"), where


@pytest.mark.parametrize("overlay", ALL)
def test_writable_paths_are_volumes(overlay: str) -> None:
    """With a read-only root, the data dir and /tmp must be mounted volumes."""
    for deployment, container in all_containers(render(overlay)):
        env = {**env_from_config_maps(render(overlay), container), **plain_env(container)}
        mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
        assert "/tmp" in mounts, deployment["metadata"]["name"]
        data_dir = env["MESH_DATA_DIR"]
        needed = f"{data_dir}/sts" if _command(container) == "sts" else data_dir
        assert needed in mounts, f"{deployment['metadata']['name']}: {needed} not a volume"
        assert env["MESH_CONFIG"].startswith(
            tuple(m["mountPath"] + "/" for m in container["volumeMounts"] if m["name"] == "config")
        )


@pytest.mark.parametrize("overlay", ALL)
def test_requests_and_limits(overlay: str) -> None:
    for deployment, container in all_containers(render(overlay)):
        resources: Obj = container.get("resources", {})
        for bound in ("requests", "limits"):
            assert set(resources.get(bound, {})) >= {"cpu", "memory"}, (
                f"{deployment['metadata']['name']}: {bound} need cpu and memory"
            )


@pytest.mark.parametrize("overlay", ALL)
def test_one_pinned_image(overlay: str) -> None:
    images = {container["image"] for _, container in all_containers(render(overlay))}
    assert len(images) == 1, f"one image for every service, found {images}"
    for image in images:
        name = image.split("@", 1)[0]
        tag = name.rsplit(":", 1)[1] if ":" in name.rsplit("/", 1)[-1] else ""
        assert "@sha256:" in image or tag, f"{image}: no tag"
        assert tag != "latest", f"{image}: latest tag"


def _referenced_secrets(objects: list[Obj]) -> set[str]:
    names: set[str] = set()
    for deployment, container in all_containers(objects):
        names |= {ref["name"] for ref in secret_env(container).values()}
        names |= {s["secretRef"]["name"] for s in container.get("envFrom", []) if "secretRef" in s}
        for volume in pod_spec(deployment).get("volumes", []):
            if "secret" in volume:
                names.add(volume["secret"]["secretName"])
    return names


@pytest.mark.parametrize("overlay", ALL)
def test_no_secret_carries_a_value(overlay: str) -> None:
    objects = render(overlay)
    for secret in of_kind(objects, "Secret"):
        assert not secret.get("data") and not secret.get("stringData"), secret["metadata"]
    # Secret-looking settings come from Secrets, never from literals or ConfigMaps.
    pattern = re.compile(r"SECRET$|PASSWORD|_TOKEN$|API_KEY|REDIS_URL$")
    for deployment, container in all_containers(objects):
        literal = {**env_from_config_maps(objects, container), **plain_env(container)}
        leaked = sorted(name for name in literal if pattern.search(name))
        assert not leaked, f"{deployment['metadata']['name']}: {leaked} must come from a Secret"


@pytest.mark.parametrize("overlay", ALL)
def test_every_referenced_secret_has_a_documented_create_command(overlay: str) -> None:
    docs = DOCS.read_text(encoding="utf-8")
    for name in sorted(_referenced_secrets(render(overlay))):
        assert re.search(rf"kubectl -n mesh create secret \w+ {re.escape(name)}\b", docs), (
            f"docs/kubernetes.md has no `kubectl -n mesh create secret ... {name}`"
        )


@pytest.mark.parametrize("overlay", ALL)
def test_every_agent_has_a_deployment_and_a_service_and_nothing_else_does(overlay: str) -> None:
    objects = render(overlay)
    agents = mesh_agents()
    deployments = by_name(objects, "Deployment")
    services = by_name(objects, "Service")
    agent_deployments = {n for n, d in deployments.items() if component(d) == "agent"}
    agent_services = {n for n, s in services.items() if component(s) == "agent"}
    assert agent_deployments == set(agents)
    assert agent_services == set(agents)
    extra = {"sts"} if overlay == "dev" else set()
    assert set(deployments) == set(agents) | {"router"} | extra
    assert set(services) == set(agents) | {"router", "router-headless"} | extra
    for name, port in agents.items():
        (container,) = containers(deployments[name])
        assert container["args"][:2] == ["agent", name]
        service = services[name]
        assert service["spec"]["clusterIP"] == "None", f"{name}: the Service must be headless"
        assert service["spec"]["selector"] == {"app.kubernetes.io/name": name}
        assert deployments[name]["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]
        (service_port,) = [p for p in service["spec"]["ports"] if p["name"] != "metrics"]
        assert service_port["port"] == port and service_port["targetPort"] == "grpc"
        assert service_port["name"] == "grpc"
        assert declared_ports(container) == {port: "grpc"} | _health_ports(objects)
    assert services["router-headless"]["spec"]["clusterIP"] == "None"
    assert "clusterIP" not in services["router"]["spec"]


@pytest.mark.parametrize("overlay", ALL)
def test_router_discovers_every_agent_through_headless_dns(overlay: str) -> None:
    objects = render(overlay)
    services = by_name(objects, "Service")
    targets = dns_targets(objects)
    assert sorted(t["agent"] for t in targets) == sorted(mesh_agents())
    for target in targets:
        service = services[target["agent"]]
        namespace = service["metadata"]["namespace"]
        assert target["host"] == f"{target['agent']}.{namespace}.svc.cluster.local"
        assert target["port"] == service["spec"]["ports"][0]["port"]


def effective_config(
    objects: list[Obj], deployment: Obj, monkeypatch: pytest.MonkeyPatch, tmp: Path
) -> MeshConfig:
    """The config a container loads: the ConfigMap's mesh.yaml with the container's
    environment applied (Secret values replaced by placeholders)."""
    (container,) = containers(deployment)
    mesh_yaml = config_map(objects, "mesh-config")["data"]["mesh.yaml"]
    path = tmp / f"{deployment['metadata']['name']}.yaml"
    path.write_text(mesh_yaml, encoding="utf-8")
    for name in [n for n in os.environ if n.startswith("MESH_")]:
        monkeypatch.delenv(name)
    env: dict[str, Any] = {**env_from_config_maps(objects, container), **plain_env(container)}
    for name, ref in secret_env(container).items():
        if not ref.get("optional"):
            env[name] = "https://placeholder.invalid"
    env.pop("MESH_CONFIG")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return load_config(path)


@pytest.mark.parametrize("overlay", ALL)
def test_termination_grace_exceeds_the_drain(
    overlay: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    objects = render(overlay)
    for deployment in of_kind(objects, "Deployment"):
        config = effective_config(objects, deployment, monkeypatch, tmp_path)
        grace = pod_spec(deployment)["terminationGracePeriodSeconds"]
        assert grace > config.server.grace_period_s, deployment["metadata"]["name"]
        # Liveness cannot kill a draining pod before the drain is over.
        (container,) = containers(deployment)
        live = container["livenessProbe"]
        assert live["periodSeconds"] * live["failureThreshold"] >= config.server.grace_period_s


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_overlay_configs_load_and_turn_auth_on(
    overlay: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    objects = render(overlay)
    for deployment in of_kind(objects, "Deployment"):
        config = effective_config(objects, deployment, monkeypatch, tmp_path)
        assert config.auth.enabled, deployment["metadata"]["name"]
        assert config.server.host == "0.0.0.0"
        assert config.router.host == "0.0.0.0"
        assert str(config.data_dir) == "/data"


def test_dev_one_replica_each_embedded_sts_trusted_by_everyone(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    objects = render("dev")
    deployments = by_name(objects, "Deployment")
    assert {n: d["spec"]["replicas"] for n, d in deployments.items()} == dict.fromkeys(
        deployments, 1
    )
    sts_service = by_name(objects, "Service")["sts"]
    (sts_port,) = sts_service["spec"]["ports"]
    issuer = f"https://sts.{sts_service['metadata']['namespace']}.svc.cluster.local:" + str(
        sts_port["port"]
    )
    for name, deployment in deployments.items():
        config = effective_config(objects, deployment, monkeypatch, tmp_path)
        assert config.auth.issuer == issuer
        assert config.auth.jwks_url.startswith(issuer + "/")
        assert config.auth.rfc8693.token_url.startswith(issuer + "/")
        ca = Path(config.auth.ca_file)
        (container,) = containers(deployment)
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod_spec(deployment)["volumes"]}
        mount = mounts[str(ca.parent)]
        assert volumes[mount]["secret"]["secretName"] == "mesh-dev-sts-tls", name
    # The STS serves <data_dir>/sts/tls from the Secret (read-only); its state dir is writable.
    (sts,) = containers(deployments["sts"])
    mounts = {m["mountPath"]: m for m in sts["volumeMounts"]}
    assert mounts["/data/sts/tls"]["readOnly"] is True
    assert (
        "emptyDir"
        in {v["name"]: v for v in pod_spec(deployments["sts"])["volumes"]}[
            mounts["/data/sts"]["name"]
        ]
    )


def test_prod_replicas_autoscaling_budgets() -> None:
    objects = render("prod")
    deployments = by_name(objects, "Deployment")
    hpas = by_name(objects, "HorizontalPodAutoscaler")
    pdbs = by_name(objects, "PodDisruptionBudget")
    agents = set(mesh_agents())
    assert set(hpas) == agents
    for name, hpa in hpas.items():
        assert hpa["spec"]["scaleTargetRef"] == {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": name,
        }
        assert hpa["spec"]["minReplicas"] >= 2
        assert "replicas" not in deployments[name]["spec"], f"{name}: the HPA owns replicas"
    assert deployments["router"]["spec"]["replicas"] >= 2
    assert set(pdbs) == set(deployments)
    for name, pdb in pdbs.items():
        selector = deployments[name]["spec"]["selector"]
        assert pdb["spec"]["selector"] == selector
        assert pdb["spec"]["minAvailable"] == 1


def test_prod_identity_and_redis_from_secrets(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    objects = render("prod")
    deployments = by_name(objects, "Deployment")
    (router,) = containers(deployments["router"])
    refs = secret_env(router)
    assert refs["MESH_REDIS_URL"]["name"] == "mesh-redis"
    assert refs["MESH_ROUTER_CLIENT_SECRET"]["name"] == "mesh-identity"
    assert refs["MESH_AUTH__ISSUER"]["name"] == "mesh-identity"
    assert refs["MESH_AUTH__ENTRA__AUTHORITY"]["name"] == "mesh-identity"
    assert refs["MESH_AUTH__RFC8693__TOKEN_URL"]["name"] == "mesh-identity"
    config = effective_config(objects, deployments["router"], monkeypatch, tmp_path)
    assert config.router.store.kind == "redis"
    assert config.router.store.url_env == "MESH_REDIS_URL"
    assert config.auth.exchanger == "entra"
    assert config.auth.client_for("router").secret_env == "MESH_ROUTER_CLIENT_SECRET"
    assert not config.auth.allow_unauthenticated_reflection
    for name in mesh_agents():
        (agent,) = containers(deployments[name])
        assert secret_env(agent)["MESH_AUTH__ISSUER"]["name"] == "mesh-identity"


def _policies() -> dict[str, Obj]:
    return by_name(render("prod"), "NetworkPolicy")


def test_prod_network_policies_default_deny_then_only_the_mesh_hops() -> None:
    policies = _policies()
    deny = policies["default-deny"]["spec"]
    assert deny == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    dns = policies["allow-dns"]["spec"]
    assert dns["podSelector"] == {} and dns["policyTypes"] == ["Egress"]
    assert {p["port"] for p in dns["egress"][0]["ports"]} == {53}

    router = policies["router"]["spec"]
    assert router["podSelector"]["matchLabels"] == {"app.kubernetes.io/component": "router"}
    (ingress,) = router["ingress"]
    assert ingress["ports"] == [{"protocol": "TCP", "port": "grpc"}]  # clients -> router
    to_agents, outside = router["egress"]
    assert to_agents["to"] == [
        {"podSelector": {"matchLabels": {"app.kubernetes.io/component": "agent"}}}
    ]
    assert {p["port"] for p in outside["ports"]} == {443, 6379, 6380}  # IdP, Redis

    agents = policies["agents"]["spec"]
    (ingress,) = agents["ingress"]
    assert ingress["from"] == [
        {"podSelector": {"matchLabels": {"app.kubernetes.io/component": "router"}}}
    ]  # router -> agents only
    (egress,) = agents["egress"]
    assert egress == {"ports": [{"protocol": "TCP", "port": 443}]}  # providers only
    # Every pod of the mesh is selected by a policy that names it.
    for deployment in of_kind(render("prod"), "Deployment"):
        assert component(deployment) in ("router", "agent")


def test_no_overlay_leaves_pods_unselected_by_services() -> None:
    for overlay in ALL:
        objects = render(overlay)
        labels = [
            d["spec"]["template"]["metadata"]["labels"] for d in of_kind(objects, "Deployment")
        ]
        for service in of_kind(objects, "Service"):
            selector = service["spec"]["selector"]
            matched = [lab for lab in labels if selector.items() <= lab.items()]
            assert len(matched) == 1, f"{overlay}: Service {service['metadata']['name']}"
