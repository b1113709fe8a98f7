"""The Dockerfile, checked as far as this machine allows (no container engine runs here):
it installs from uv.lock as `make setup` does, runs as a numeric non-root user, keeps build
tools out of the final stage, has no HEALTHCHECK, and its ENTRYPOINT serves every command
the manifests use."""

from __future__ import annotations

import fnmatch
import re
import shlex
import subprocess

from tests.meshtest import REPO, tool_path

from .k8stest import (
    DOCKERFILE,
    OVERLAYS,
    Stage,
    all_containers,
    dockerfile_stages,
    exec_form,
    parse_env_instruction,
    render,
)

MAKEFILE = REPO / "Makefile"
#: What a server image leaves out of `make setup`'s install, and why:
#: the dev dependency group (linters, test tools) and the `llama` extra
#: (llama-cpp-python builds from source with a C/C++ toolchain; see the Dockerfile).
DROPPED_FROM_MAKE = {"--extra llama"}
ADDED_FOR_IMAGE = {"--no-dev", "--no-editable", "--no-install-project"}
BUILD_TOOLS = re.compile(
    r"\b(gcc|g\+\+|clang|cmake|make|build-essential|ninja|cargo|rustc|uv)\b|apt-get\s+install"
)


def stages() -> list[Stage]:
    return dockerfile_stages(DOCKERFILE.read_text(encoding="utf-8"))


def _flags(command: str) -> set[str]:
    """``uv sync`` flags of a command, ``--extra X`` kept as one item."""
    words = shlex.split(command)
    words = words[words.index("sync") + 1 :]
    flags: set[str] = set()
    i = 0
    while i < len(words) and words[i] not in ("&&", ";", "|"):
        if words[i] in ("--extra", "--group") and i + 1 < len(words):
            flags.add(f"{words[i]} {words[i + 1]}")
            i += 2
            continue
        flags.add(words[i])
        i += 1
    return flags


def make_sync_flags() -> set[str]:
    text = MAKEFILE.read_text(encoding="utf-8")
    match = re.search(r"^SYNC\s*:=\s*\$\(UV\)\s+(sync .*)$", text, re.M)
    assert match, "the Makefile has no `SYNC := $(UV) sync ...` line"
    return _flags(match.group(1))


def image_sync_commands() -> list[str]:
    commands: list[str] = []
    for stage in stages():
        for run in stage.all("RUN"):
            commands += [part for part in re.split(r"&&|;", run) if re.search(r"\buv sync\b", part)]
    return commands


def test_installs_from_the_lockfile_exactly_as_make_does() -> None:
    make = make_sync_flags()
    assert "--frozen" in make
    commands = image_sync_commands()
    assert len(commands) == 2, commands  # dependencies layer, then the project
    for command in commands:
        flags = _flags(command)
        # Same lockfile, never re-resolved; the only differences are the ones named above.
        assert "--frozen" in flags and "--locked" not in flags and "--upgrade" not in flags
        assert make - flags == DROPPED_FROM_MAKE, (make, flags)
        assert flags - make <= ADDED_FOR_IMAGE, (make, flags)
        assert not any(f.startswith(("--extra", "--all-extras", "--group")) for f in flags)
    build = next(s for s in stages() if any("uv sync" in r for r in s.all("RUN")))
    copies = " ".join(build.all("COPY"))
    assert re.search(r"\buv\.lock\b", copies) and "pyproject.toml" in copies
    # The lockfile is copied before the first sync (the dependencies layer uses it).
    order = [kw + " " + args for kw, args in build.instructions]
    lock = next(i for i, line in enumerate(order) if line.startswith("COPY") and "uv.lock" in line)
    first_sync = next(i for i, line in enumerate(order) if "uv sync" in line)
    assert lock < first_sync


def test_the_makefile_exports_the_portable_llama_build() -> None:
    """The relation above leaves llama out; make's only other install knob is CMAKE_ARGS,
    which only matters to that extra."""
    text = MAKEFILE.read_text(encoding="utf-8")
    assert "CMAKE_ARGS" in text and "--extra llama" in text


def test_runs_as_a_numeric_non_root_user() -> None:
    runtime = stages()[-1]
    users = runtime.all("USER")
    assert users, "the final stage sets no USER"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) > 0, f"USER {users[-1]} must be a numeric non-root UID"
    assert not gid or (gid.isdigit() and int(gid) > 0)
    for deployment, container in all_containers(render("base")):
        pod = deployment["spec"]["template"]["spec"]["securityContext"]
        assert pod["runAsUser"] == int(uid) and pod["runAsNonRoot"] is True, container["name"]


def test_no_build_tools_in_the_final_stage() -> None:
    all_stages = stages()
    assert len(all_stages) >= 2, "multi-stage: build, then runtime"
    runtime = all_stages[-1]
    build_names = {s.name for s in all_stages[:-1]}
    for keyword, args in runtime.instructions:
        if keyword == "RUN":
            assert not BUILD_TOOLS.search(args), f"final stage runs build tooling: {args}"
        if keyword == "COPY" and "--from=" in args:
            source = re.search(r"--from=(\S+)", args)
            assert source is not None
            assert source.group(1) in build_names, args
            assert "/app/.venv" in args, f"only the built venv comes from the build: {args}"
    assert runtime.base == all_stages[1].base, "runtime and build share the Python base"
    assert "slim" in runtime.base and not runtime.base.endswith(":latest")


def test_no_healthcheck() -> None:
    for stage in stages():
        assert not stage.all("HEALTHCHECK"), "Kubernetes probes do the health checking"


def _mesh_commands() -> set[str]:
    done = subprocess.run(
        [tool_path("mesh"), "--help"], capture_output=True, text=True, timeout=60, check=True
    )
    block = done.stdout.split("positional arguments:", 1)[1].split("options:", 1)[0]
    return {m.group(1) for m in re.finditer(r"^\s{4}(\w[\w-]*)\s", block, re.M)}


def test_entrypoint_serves_every_command_the_manifests_use() -> None:
    runtime = stages()[-1]
    (entrypoint,) = runtime.all("ENTRYPOINT")
    assert exec_form(entrypoint) == ["mesh"]
    env: dict[str, str] = {}
    for args in runtime.all("ENV"):
        env.update(parse_env_instruction(args))
    assert env["PATH"].split(":")[0] == "/app/.venv/bin", "mesh comes from the image's venv"
    used: set[str] = set()
    for overlay in OVERLAYS:
        for _, container in all_containers(render(overlay)):
            assert "command" not in container, "manifests pass args; the ENTRYPOINT is mesh"
            used.add(container["args"][0])
    assert used == {"router", "agent", "sts"}
    missing = used - _mesh_commands()
    assert not missing, f"`mesh --help` lacks {sorted(missing)} (the manifests run them)"


def test_dockerignore_keeps_what_the_build_copies() -> None:
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]

    def ignored(path: str) -> bool:
        result = False
        for pattern in patterns:
            negate = pattern.startswith("!")
            body = pattern.lstrip("!").rstrip("/")
            if fnmatch.fnmatch(path, body) or path.startswith(body + "/"):
                result = not negate
        return result

    for stage in stages():
        for args in stage.all("COPY"):
            if "--from=" in args:
                continue
            *sources, _dest = shlex.split(args)
            for source in sources:
                assert not ignored(source), f".dockerignore drops {source}"
    for path in (".venv", ".git", "tests", ".mesh", "k8s"):
        assert ignored(path), f".dockerignore should drop {path}"
