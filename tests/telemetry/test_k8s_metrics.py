"""The metrics port in Kubernetes (prod overlay), and the HTTP endpoint it points at."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.k8s.k8stest import Obj, config_map, containers, of_kind, render
from tests.meshtest import MESH_YAML, Proc, write_config
from tests.telemetry.test_traces import small_mesh


def _mesh_workloads(objects: list[Obj], kind: str) -> list[Obj]:
    return [
        o
        for o in of_kind(objects, kind)
        if o["metadata"]["labels"].get("app.kubernetes.io/component") in ("router", "agent")
    ]


def test_prod_declares_scrapes_and_allows_the_metrics_port() -> None:
    objects = render("prod")
    env = config_map(objects, "mesh-env")["data"]
    port = int(env["MESH_SERVER__METRICS_PORT"])
    assert env["OTEL_TRACES_EXPORTER"] == "otlp" and env["OTEL_EXPORTER_OTLP_ENDPOINT"]
    deployments = _mesh_workloads(objects, "Deployment")
    assert len(deployments) == 6  # the router and five agents
    for deployment in deployments:
        (container,) = containers(deployment)
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["metrics"] == port
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert annotations == {
            "prometheus.io/scrape": "true",
            "prometheus.io/port": str(port),
            "prometheus.io/path": "/metrics",
        }
    services = _mesh_workloads(objects, "Service")
    assert len(services) == 7  # router, router-headless, five agents
    for service in services:
        named = {p["name"]: p for p in service["spec"]["ports"]}
        assert named["metrics"]["port"] == port and named["metrics"]["targetPort"] == "metrics"
    (monitor,) = of_kind(objects, "ServiceMonitor")
    (selector,) = monitor["spec"]["selector"]["matchExpressions"]
    selected = [
        s for s in services if s["metadata"]["labels"][selector["key"]] in selector["values"]
    ]
    assert selected == services
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
    policies = {p["metadata"]["name"]: p for p in of_kind(objects, "NetworkPolicy")}
    scrape = policies["allow-metrics-scrape"]["spec"]["ingress"][0]["ports"]
    assert scrape == [{"protocol": "TCP", "port": "metrics"}]


def test_base_exports_nothing_by_default() -> None:
    env = config_map(render("dev"), "mesh-env")["data"]
    assert env["OTEL_TRACES_EXPORTER"] == "none"
    assert "OTEL_EXPORTER_OTLP_ENDPOINT" not in env
    assert "MESH_SERVER__METRICS_PORT" not in env  # dev pods share one loopback in tests


def test_metrics_port_serves_metrics_and_http_probes(
    tmp_path: Path,
) -> None:
    config = write_config(tmp_path, small_mesh(auth=False))
    env = {"MESH_SERVER__METRICS_PORT": "0", "PYTHONPATH": str(MESH_YAML.parent)}
    agent = Proc(["agent", "orders", "--config", str(config), "--port", "0"], env)
    try:
        agent.wait_line("agent orders: ")
        base = f"http://{agent.wait_line('metrics: ')}"
        with httpx.Client(timeout=5) as http:
            assert http.get(f"{base}/healthz").status_code == 200
            assert http.get(f"{base}/readyz").status_code == 200
            metrics = http.get(f"{base}/metrics")
            assert metrics.status_code == 200
            assert metrics.headers["content-type"].startswith("text/plain")
            assert 'mesh_open_streams{service="agent orders"} 0.0' in metrics.text
            assert http.get(f"{base}/nope").status_code == 404
            assert http.post(f"{base}/metrics").status_code == 405
    finally:
        assert agent.stop() == 0, "".join(agent.stderr)
