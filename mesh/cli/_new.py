"""``mesh new agent NAME``: scaffold an agent in a mesh file.

Writes three things and touches nothing else:

- the agent's block under ``agents:`` in the mesh file (offline model, one rule that
  calls its tool; switch ``provider:`` to a real model later);
- ``<mesh file folder>/NAME/tools.py``: one typed tool;
- a test that starts the agent and a router in-process and calls the tool through
  the router: ``tests/test_agent_NAME.py`` when a ``tests`` folder sits beside the
  mesh file's folder (as in this repo), else ``NAME/test_NAME.py``.
"""

from __future__ import annotations

import argparse
import os
import re
import textwrap
from pathlib import Path

from mesh.cli._common import EXIT_USAGE, CommandError, add_config
from mesh.config import NAME_RE, load_config, resolve_config_path

BLOCK = """\
  {name}:
    description: Keeps short notes for the user (scaffolded by `mesh new agent {name}`).
    instructions: You keep the user's notes. Use your tools.
    port: {port}
    tools: [{module}.tools:save_note]
    skills:
      - {{name: notes, description: Saves a note}}
    provider:
      kind: offline
      model: offline-1
      rules:
        - {{contains: [note, remember], tool: save_note, arguments: {{text: "buy milk"}}}}
      default_reply: "{name} here. Ask me to remember something. You said: {{message}}"
      after_tools: "{name} saved it: {{results}}"

"""

TOOLS = '''\
"""Tools of the {name} agent: plain typed functions (the schema comes from the hints)."""

from __future__ import annotations

_NOTES: list[str] = []


def save_note(text: str) -> dict[str, object]:
    """Save a note for the user.

    Args:
        text: What to remember.
    """
    _NOTES.append(text)
    return {{"saved": text, "notes": len(_NOTES)}}
'''

TEST = '''\
"""The {name} agent answers through the router and calls its tool (made by `mesh new`)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from mesh.agent._serve import build_agent_server
from mesh.cli import without_auth
from mesh.client import AgentClient, create_channel
from mesh.config import load_config
from mesh.router import MemoryStore, RouterApp, with_static

MESH_FILE = Path(__file__).resolve().parent / "{config}"


def test_{ident}_calls_its_tool_through_the_router() -> None:
    asyncio.run(_calls_its_tool())


async def _calls_its_tool() -> None:
    """Start the agent and a router on free ports; ask the router for {name}."""
    config = without_auth(load_config(MESH_FILE))
    server, runtime = build_agent_server(config, "{name}")
    port = await server.start("127.0.0.1", 0)
    app = RouterApp(with_static(config, {{"{name}": [f"127.0.0.1:{{port}}"]}}), store=MemoryStore())
    router_port = await app.start("127.0.0.1", 0)
    try:
        assert await app.pool.wait_healthy("{name}", 10)
        async with create_channel(f"127.0.0.1:{{router_port}}") as channel:
            client = AgentClient(channel, router=True)
            result = await client.chat("remember this note", agent="{name}", timeout=30)
        results = [e.tool_result for e in result.events if e.WhichOneof("kind") == "tool_result"]
        assert [r.name for r in results] == ["save_note"]
        assert not results[0].is_error and "buy milk" in results[0].content
        assert result.final is not None and result.final.agent == "{name}"
    finally:
        await app.stop()
        await server.stop(0)
        await runtime.provider.aclose()
'''


def _insert_block(text: str, block: str) -> str:
    """``text`` with ``block`` at the end of the top-level ``agents:`` mapping."""
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if re.match(r"^agents:\s*(#.*)?$", line)), None)
    if start is None:
        return text.rstrip("\n") + "\n\nagents:\n" + block
    end = len(lines)
    for i in range(start + 1, len(lines)):
        if re.match(r"^[^\s#]", lines[i]):
            end = i
            break
    while end > start + 1 and not lines[end - 1].strip():
        end -= 1
    return "".join(lines[:end]) + "\n" + block + "".join(lines[end:]).lstrip("\n")


def scaffold_agent(config_path: Path, name: str) -> list[Path]:
    """Write the agent's block, tools module and test; returns the files written."""
    if not re.fullmatch(NAME_RE, name) or "_" in name or name.endswith("-"):
        raise CommandError(
            f"agent name {name!r}: use lowercase letters, digits and '-', starting with a"
            " letter (Kubernetes names its Service after it; its tools' module gets '_')",
            EXIT_USAGE,
        )
    module = name.replace("-", "_")  # its tools' package: a Python module name
    config = load_config(config_path)
    if name in config.agents:
        raise CommandError(f"agent {name!r} already exists in {config_path}", EXIT_USAGE)
    base = config.base_dir
    package = base / module
    if package.exists():
        raise CommandError(f"{package} already exists: pick another name", EXIT_USAGE)
    tests = base.parent / "tests"
    test = tests / f"test_agent_{module}.py" if tests.is_dir() else package / f"test_{module}.py"
    ports = [a.port for a in config.agents.values() if a.port]
    port = max(ports) + 1 if ports else 0
    original = config_path.read_text(encoding="utf-8")
    config_path.write_text(
        _insert_block(original, BLOCK.format(name=name, port=port, module=module)), encoding="utf-8"
    )
    try:
        load_config(config_path)
    except Exception:
        config_path.write_text(original, encoding="utf-8")
        raise
    package.mkdir()
    (package / "__init__.py").write_text("", encoding="utf-8")
    (package / "tools.py").write_text(TOOLS.format(name=name), encoding="utf-8")
    relative = os.path.relpath(config_path.resolve(), test.parent.resolve())
    test.write_text(TEST.format(name=name, ident=module, config=relative), encoding="utf-8")
    return [config_path, package / "tools.py", test]


def cmd_new(args: argparse.Namespace) -> int:
    config_path = resolve_config_path(args.config)
    written = scaffold_agent(config_path, args.name)
    print(f"new agent {args.name}:")
    for path in written:
        print(f"  {path}")
    test = written[-1]
    print(
        textwrap.dedent(
            f"""\
            next:
              .venv/bin/pytest -q {test}      # the agent calls its tool through the router
              make run                        # it starts with the others; then:
              .venv/bin/mesh chat --agent {args.name} 'remember this note'"""
        )
    )
    return 0


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("new", help="scaffold something new (`mesh new agent NAME`)")
    kinds = p.add_subparsers(dest="kind", required=True, metavar="KIND")
    agent = kinds.add_parser(
        "agent", help="an agent: its mesh file block, a tools module and a test"
    )
    agent.add_argument(
        "name", help="the agent's name (lowercase letters, digits, '-'; its tools' module uses '_')"
    )
    add_config(agent)
    agent.set_defaults(func=cmd_new)


__all__ = ["add_parsers", "scaffold_agent"]
