"""Bad command lines and bad config files get one clear message and a non-zero exit."""

from __future__ import annotations

from pathlib import Path

from .meshtest import MESH_YAML, Proc, offline_agent, write_config


def _run(*args: str) -> tuple[int, str]:
    proc = Proc(list(args))
    code = proc.popen.wait(timeout=60)
    proc.lines.get(timeout=10)  # let the pumps drain
    return code, "".join(proc.stderr)


def test_unknown_agent_name() -> None:
    code, err = _run("agent", "nobody", "--config", str(MESH_YAML))
    assert code == 2
    assert "unknown agent 'nobody'" in err
    assert "billing" in err  # lists the known ones


def test_malformed_field_is_named(tmp_path: Path) -> None:
    agent = offline_agent()
    agent["limits"] = {"max_tool_rounds": "many"}
    config = write_config(tmp_path, {"agents": {"a": agent}})
    code, err = _run("agent", "a", "--config", str(config))
    assert code == 2
    assert str(config) in err
    assert "agents.a.limits.max_tool_rounds" in err


def test_unknown_handoff_target_is_named(tmp_path: Path) -> None:
    agent = offline_agent()
    agent["handoffs"] = [{"target": "ghost"}]
    config = write_config(tmp_path, {"agents": {"a": agent}})
    code, err = _run("agent", "a", "--config", str(config))
    assert code == 2
    assert "agents.a.handoffs: unknown target 'ghost'" in err


def test_invalid_yaml_names_line(tmp_path: Path) -> None:
    config = tmp_path / "mesh.yaml"
    config.write_text("agents:\n  a: {description: [unclosed\n")
    code, err = _run("agent", "a", "--config", str(config))
    assert code == 2
    assert f"{config}:" in err and "invalid YAML" in err


def test_missing_file(tmp_path: Path) -> None:
    code, err = _run("agent", "a", "--config", str(tmp_path / "nope.yaml"))
    assert code == 2
    assert "no such file" in err


def test_help_on_every_command() -> None:
    for command in ([], ["agent"], ["up"], ["chat"], ["info"]):
        proc = Proc([*command, "--help"])
        assert proc.popen.wait(timeout=30) == 0
        proc.lines.get(timeout=10)
        assert "usage: mesh" in "".join(proc.stdout)
