"""Every overlay (and the base) renders with the venv's kubectl, and
``kubernetes-validate --strict`` accepts every rendered object."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.meshtest import tool_path

from .k8stest import (
    COMPONENTS,
    K8S_MESH_YAML,
    K8S_VERSION,
    OVERLAYS,
    parse,
    rendered_text,
    run_kustomize,
)


def validate_strict(path: Path) -> None:
    done = subprocess.run(
        [tool_path("kubernetes-validate"), "--strict", "--quiet", "-k", K8S_VERSION, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, f"kubernetes-validate --strict {path}:\n{done.stdout}{done.stderr}"


def test_kubectl_is_the_venv_one() -> None:
    done = subprocess.run(
        [tool_path("kubectl"), "version", "--client", "-o", "json"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert '"kustomizeVersion"' in done.stdout


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_renders_and_validates_strictly(overlay: str, tmp_path: Path) -> None:
    text = rendered_text(overlay)
    objects = parse(text)
    assert objects, f"{overlay} rendered nothing"
    assert all(
        o["metadata"].get("namespace") == "mesh" for o in objects if o["kind"] != "Namespace"
    )
    out = tmp_path / f"{overlay}.yaml"
    out.write_text(text, encoding="utf-8")
    validate_strict(out)


def test_strict_validation_rejects_a_typo(tmp_path: Path) -> None:
    """The check can fail: an unknown field (what --strict is for) is refused."""
    text = rendered_text("dev").replace("readOnlyRootFilesystem:", "readOnlyRootFileSystem:", 1)
    out = tmp_path / "typo.yaml"
    out.write_text(text, encoding="utf-8")
    with pytest.raises(AssertionError, match="readOnlyRootFileSystem"):
        validate_strict(out)


def test_prod_with_grpc_tls_component_renders_and_validates(tmp_path: Path) -> None:
    """The gRPC TLS component (not yet enabled in prod; see docs/kubernetes.md) composes
    with the prod overlay and mounts the certificates from a Secret."""
    root = tmp_path / "prod-tls"
    root.mkdir()
    prod = os.path.relpath(OVERLAYS["prod"], root)
    tls = os.path.relpath(COMPONENTS["grpc-tls"], root)
    (root / "kustomization.yaml").write_text(
        f"resources: [{prod}]\ncomponents: [{tls}]\n", encoding="utf-8"
    )
    text = run_kustomize(root)
    out = tmp_path / "prod-tls.yaml"
    out.write_text(text, encoding="utf-8")
    validate_strict(out)
    objects = parse(text)
    for deployment in (o for o in objects if o["kind"] == "Deployment"):
        volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
        assert volumes["grpc-tls"]["secret"]["secretName"] == "mesh-grpc-tls"


def test_mesh_config_map_carries_the_deployments_mesh_file() -> None:
    """kustomize reads files only below the kustomization, so the deployment has its own
    mesh file, k8s/base/mesh.yaml (`make k8s` copies services/mesh.yaml there and
    regenerates; tests/k8s/test_generate.py checks the generated files are not stale).
    Every overlay's ConfigMap carries exactly that file."""
    for overlay in OVERLAYS:
        maps = [
            o
            for o in parse(rendered_text(overlay))
            if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("mesh-config-")
        ]
        assert len(maps) == 1
        assert maps[0]["data"]["mesh.yaml"] == K8S_MESH_YAML.read_text(encoding="utf-8")
