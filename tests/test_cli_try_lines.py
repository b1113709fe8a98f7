"""Every ``try:`` line ``mesh up`` prints runs as printed, in a fresh shell in the repo
whose PATH holds only the system directories; and ``mesh new agent`` scaffolds an agent
whose generated test passes."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from .meshtest import MESH_YAML, REPO, Proc, start_mesh

SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin"


def test_every_try_line_runs_from_a_fresh_shell(tmp_path: Path) -> None:
    # The same command line as `make run`, from the repo root.
    mesh, router, env = start_mesh(MESH_YAML, tmp_path / "data")
    try:
        mesh.wait_line("mesh up: running", timeout=60)
        lines = [
            line.removeprefix("try: ").strip() for line in mesh.stdout if line.startswith("try: ")
        ]
        assert len(lines) == 4, lines
        assert not any(line.startswith(("mesh ", "grpcurl ")) for line in lines)
        assert all(router in line for line in lines if "token" not in line)
        results = []
        # A fresh shell: the system PATH, the user's HOME, and only the variables that
        # point at this test's mesh (its data dir and ports) instead of the defaults.
        shell_env = {"PATH": SYSTEM_PATH, "HOME": str(tmp_path), **env}
        exports = ""
        for line in lines:
            script = exports + line
            exports += line + "\n" if line.startswith("export ") else ""
            done = subprocess.run(
                ["/bin/bash", "--noprofile", "--norc", "-e", "-c", script],
                cwd=REPO,
                env=shell_env,
                capture_output=True,
                text=True,
                timeout=90,
                check=False,
            )
            assert done.returncode == 0, (line, done.stdout, done.stderr)
            results.append(done.stdout)
        chat, _export, listing, grpc_chat = results
        assert chat.startswith("[triage] ") and "billing" in chat
        assert "mesh.v1.RouterService" in listing
        assert '"Hello!' in grpc_chat or "Hello!" in grpc_chat
    finally:
        mesh.stop()


def _generated_test_passes(repo: Path, generated: Path) -> None:
    """The test `mesh new agent` wrote, run by pytest in the scaffolded repo."""
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(generated)],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "PYTHONPATH": ""},
    )
    assert run.returncode == 0 and "1 passed" in run.stdout, run.stdout + run.stderr


def test_new_agent_scaffold_and_its_test(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(MESH_YAML.parent, repo / "services", ignore=shutil.ignore_patterns(".mesh"))
    (repo / "tests").mkdir()
    mesh_file = repo / "services" / "mesh.yaml"
    before = mesh_file.read_text()
    new = Proc(["new", "agent", "notes", "--config", "services/mesh.yaml"], cwd=repo)
    assert new.popen.wait(timeout=60) == 0, "".join(new.stderr)
    new.lines.get(timeout=10)
    # Only an added block: every line of the file is still there, in order.
    after = mesh_file.read_text()
    assert after.startswith(before.split("\nrouter:")[0].rstrip())
    assert "\n  notes:\n" in after and after.endswith(before[before.index("\nrouter:") :])
    assert (repo / "services" / "notes" / "tools.py").exists()
    generated = repo / "tests" / "test_agent_notes.py"
    assert generated.exists()
    _generated_test_passes(repo, generated)
    # The new agent also answers with the rest of the mesh, through `mesh up`.
    mesh, router, env = start_mesh(mesh_file, tmp_path / "data", {"MESH_AGENTS__NOTES__PORT": "0"})
    try:
        chat = Proc(
            [
                *("chat", "--config", str(mesh_file), "--router", router),
                *("--agent", "notes", "remember the milk"),
            ],
            env,
        )
        assert chat.popen.wait(timeout=60) == 0, "".join(chat.stderr)
        chat.lines.get(timeout=10)
        assert "".join(chat.stdout).startswith("[notes] ")
        assert "buy milk" in "".join(chat.stdout)
    finally:
        mesh.stop()
    # A second scaffold of the same name is refused in one line.
    again = Proc(["new", "agent", "notes", "--config", str(mesh_file)])
    assert again.popen.wait(timeout=60) == 2
    again.lines.get(timeout=10)
    assert "already exists" in "".join(again.stderr)


def _readme_commands() -> list[str]:
    """The shell commands of the README's Start and grpcurl sections, as written
    (continuation lines joined; `make` lines and other sections left out)."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    start = text.index("\n## Start")
    end = text.index("\n### One agent on its own")
    commands: list[str] = []
    for block in re.findall(r"```sh\n(.*?)```", text[start:end], re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip() and not line.startswith("make "):
                commands.append(line)
    return commands


def test_every_readme_command_runs_as_written(tmp_path: Path) -> None:
    commands = _readme_commands()
    assert len(commands) >= 10, commands
    mesh, router, env = start_mesh(MESH_YAML, tmp_path / "data")
    try:
        billing = next(
            line.split(": ", 1)[1].strip()
            for line in mesh.stdout
            if line.startswith("agent billing: ")
        )
        shell_env = {
            "PATH": SYSTEM_PATH,
            "HOME": str(tmp_path),
            **env,
            "MESH_ROUTER__PORT": router.rpartition(":")[2],
        }
        exports = ""
        for command in commands:
            # The README's fixed ports are this test's free ones.
            line = command.replace("127.0.0.1:50050", router).replace("127.0.0.1:50062", billing)
            script = exports + line
            exports += line + "\n" if line.startswith("export ") else ""
            done = subprocess.run(
                ["/bin/bash", "--noprofile", "--norc", "-e", "-o", "pipefail", "-c", script],
                cwd=REPO,
                env=shell_env,
                capture_output=True,
                text=True,
                timeout=90,
                check=False,
            )
            assert done.returncode == 0, (command, done.stdout, done.stderr)
            assert "Traceback" not in done.stderr, (command, done.stderr)
    finally:
        mesh.stop()


def test_new_agent_with_a_two_word_name_deploys(tmp_path: Path) -> None:
    """`mesh new agent release-notes`: its tools are the module release_notes, its
    generated test passes, and `mesh k8s` accepts it (Kubernetes names allow '-' only)."""
    repo = tmp_path / "repo"
    shutil.copytree(MESH_YAML.parent, repo / "services", ignore=shutil.ignore_patterns(".mesh"))
    (repo / "tests").mkdir()
    new = Proc(["new", "agent", "release-notes", "--config", "services/mesh.yaml"], cwd=repo)
    assert new.popen.wait(timeout=60) == 0, "".join(new.stderr)
    assert (repo / "services" / "release_notes" / "tools.py").exists()
    generated = repo / "tests" / "test_agent_release_notes.py"
    _generated_test_passes(repo, generated)
    shutil.copytree(REPO / "k8s", repo / "k8s")
    k8s = Proc(["k8s", "--config", "services/mesh.yaml", "--out", "k8s"], cwd=repo)
    assert k8s.popen.wait(timeout=60) == 0, "".join(k8s.stderr)
    manifest = (repo / "k8s" / "base" / "agents" / "release-notes.yaml").read_text()
    assert 'args: ["agent", "release-notes", "--port"' in manifest
    assert (
        "release-notes.mesh.svc.cluster.local"
        in (repo / "k8s" / "base" / "discovery.env").read_text()
    )
