"""One agent on its own, from a directory other than the repo root: with auth on as the
mesh ships (the token's audience comes from the agent itself), without a token
service (one clear line), and in the ``--no-auth`` development mode."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from .meshtest import MESH_YAML, Proc


def _mesh(cwd: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mesh", *args],
        cwd=cwd,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _elsewhere(tmp_path: Path) -> Path:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    return elsewhere


def test_one_agent_with_auth_from_another_directory(tmp_path: Path) -> None:
    elsewhere = _elsewhere(tmp_path)
    env = {"MESH_DATA_DIR": str(tmp_path / "data"), "MESH_AUTH__STS__PORT": "0"}
    config = ["--config", str(MESH_YAML)]
    # Without the token service: one line naming it and what to do.
    missing = _mesh(elsewhere, env, "agent", "billing", *config, "--port", "0")
    assert missing.returncode == 1
    assert "Traceback" not in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1, missing.stderr
    assert "auth is on and the token service is not running" in missing.stderr
    assert f"mesh sts --config {MESH_YAML}" in missing.stderr and "--no-auth" in missing.stderr

    sts = Proc(["sts", *config], env, cwd=elsewhere)
    try:
        sts.wait_line("sts: ")
        agent = Proc(["agent", "billing", *config, "--port", "0"], env, cwd=elsewhere)
        try:
            address = agent.wait_line("agent billing: ")
            chat = _mesh(elsewhere, env, "chat", *config, "--target", address, "show my invoice")
            assert chat.returncode == 0, chat.stderr
            assert chat.stdout.startswith("[billing] ")
            assert "INV-1001" in chat.stdout
            info = _mesh(elsewhere, env, "info", *config, "--target", address)
            assert info.returncode == 0, info.stderr
            assert json.loads(info.stdout)["name"] == "billing"
        finally:
            assert agent.stop() == 0
    finally:
        sts.stop()
    assert not (elsewhere / ".mesh").exists()
    assert "UNAUTHENTICATED" not in "".join(agent.stderr)


def test_no_auth_development_mode(tmp_path: Path) -> None:
    elsewhere = _elsewhere(tmp_path)
    env = {"MESH_DATA_DIR": str(tmp_path / "data")}
    config = ["--config", str(MESH_YAML), "--no-auth"]
    agent = Proc(["agent", "orders", *config, "--port", "0"], env, cwd=elsewhere)
    try:
        address = agent.wait_line("agent orders: ")
        chat = _mesh(elsewhere, env, "chat", *config, "--target", address, "track my order")
        assert chat.returncode == 0, chat.stderr
        assert chat.stdout.startswith("[orders] ")
        assert "development mode, auth is OFF" in chat.stderr
    finally:
        agent.stop()
    assert "development mode, auth is OFF" in "".join(agent.stderr)


def test_mesh_file_paths_resolve_against_its_folder(tmp_path: Path) -> None:
    """`mesh up` run in the repo, `mesh chat --config <repo>/services/mesh.yaml` run
    elsewhere: both use the data dir beside the mesh file; nothing lands in the cwd."""
    repo = tmp_path / "repo"
    shutil.copytree(MESH_YAML.parent, repo / "services", ignore=shutil.ignore_patterns(".mesh"))
    mesh_file = repo / "services" / "mesh.yaml"
    elsewhere = _elsewhere(tmp_path)
    env = {
        "MESH_AUTH__STS__PORT": "0",
        "MESH_SERVER__GRACE_PERIOD_S": "3",
        **{f"MESH_AGENTS__{a}__PORT": "0" for a in ("TRIAGE", "BILLING", "ORDERS")},
        **{f"MESH_AGENTS__{a}__PORT": "0" for a in ("RESEARCHER", "WRITER")},
    }
    up = Proc(["up", "--config", "services/mesh.yaml", "--router-port", "0"], env, cwd=repo)
    try:
        router = up.wait_line("router: ", timeout=90)
        chat = _mesh(elsewhere, env, "chat", "--config", str(mesh_file), "--router", router, "hi")
        assert chat.returncode == 0, chat.stderr
        assert chat.stdout.startswith("[triage] Hello!")
    finally:
        up.stop()
    assert not (elsewhere / ".mesh").exists()
    assert not (repo / ".mesh").exists()
    assert (repo / "services" / ".mesh" / "sts").is_dir()
