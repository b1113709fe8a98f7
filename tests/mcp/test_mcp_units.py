"""MCP pieces without servers: config validation, names, schemas, result rendering."""

from __future__ import annotations

from typing import Any

import mcp_types
import pytest

from mesh.config import config_from_dict
from mesh.errors import ConfigError
from mesh.mcp import render_result, schema_problem, tool_name
from mesh.mcp._serve import routable


def _agent(servers: list[dict[str, Any]]) -> dict[str, Any]:
    return {"agents": {"a": {"description": "x", "mcp_servers": servers}}}


@pytest.mark.parametrize(
    ("servers", "message"),
    [
        ([{"name": "s"}], "exactly one of stdio, sse, streamable_http"),
        (
            [{"name": "s", "stdio": {"command": "x"}, "sse": {"url": "http://127.0.0.1:1/sse"}}],
            "exactly one of stdio, sse, streamable_http",
        ),
        ([{"name": "s", "stdio": {"command": "x"}, "audience": "r"}], "audience applies to HTTP"),
        ([{"name": "s", "sse": {"url": "ftp://x"}}], "agents.a.mcp_servers.0.sse.url"),
        (
            [{"name": "s", "stdio": {"command": "x"}}, {"name": "s", "stdio": {"command": "y"}}],
            "MCP server names must be unique",
        ),
        ([{"name": "Bad Name", "stdio": {"command": "x"}}], "agents.a.mcp_servers.0.name"),
    ],
)
def test_bad_mcp_config_is_one_clear_error(servers: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_dict(_agent(servers), source="mesh.yaml")
    assert message in str(caught.value)
    assert str(caught.value).startswith("mesh.yaml: ")


def test_good_mcp_config() -> None:
    config = config_from_dict(
        _agent(
            [
                {"name": "g", "stdio": {"command": "python", "args": ["-m", "g"]}},
                {"name": "h", "streamable_http": {"url": "https://h/mcp"}, "audience": "https://h"},
            ]
        )
    )
    servers = config.agents["a"].mcp_servers
    assert [s.transport for s in servers] == ["stdio", "streamable_http"]
    assert servers[0].cache_tools and not servers[0].required


def test_tool_names_are_model_safe() -> None:
    assert tool_name("files/read.v2") == "files_read_v2"
    assert len(tool_name("x" * 100)) == 64


@pytest.mark.parametrize(
    ("schema", "problem"),
    [
        ({"type": "object", "properties": {"a": {"type": "string"}}}, None),
        ({}, None),
        ([], "not an object"),
        ({"type": "string"}, "not 'object'"),
        ({"type": "object", "properties": {"a": {"type": 5}}}, "not a valid JSON schema"),
    ],
)
def test_schema_problems(schema: object, problem: str | None) -> None:
    found = schema_problem(schema)
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found


def test_results_render_for_the_model() -> None:
    text = mcp_types.TextContent(type="text", text="hello")
    image = mcp_types.ImageContent(type="image", data="aGVsbG8=", mime_type="image/png")
    outcome = render_result(mcp_types.CallToolResult(content=[text, image]), 1024, "t")
    assert outcome.content == "hello\n[image image/png, 6 bytes]" and not outcome.is_error
    structured = mcp_types.CallToolResult(content=[], structured_content={"n": 1})
    assert render_result(structured, 1024, "t").content == '{"n": 1}'
    failed = mcp_types.CallToolResult(content=[text], is_error=True)
    assert render_result(failed, 1024, "t").is_error
    big = mcp_types.CallToolResult(content=[mcp_types.TextContent(type="text", text="x" * 2000)])
    refused = render_result(big, 1024, "t")
    assert refused.is_error and "1024-byte limit" in refused.content


def test_mesh_mcp_offers_every_agent_and_sequence() -> None:
    config = config_from_dict(
        {
            "agents": {"a": {"description": "first"}, "b": {"description": "second"}},
            "router": {"sequences": {"ab": {"steps": ["a", "b"]}}},
        }
    )
    assert routable(config) == {"a": "first", "b": "second", "ab": "sequence of a, b"}
