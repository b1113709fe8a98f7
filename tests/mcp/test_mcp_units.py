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


_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
_PARENT = f"00-{_ID}-00f067aa0ba902b7-01"


@pytest.mark.parametrize(
    ("value", "kept"),
    [
        (_PARENT, _PARENT),
        (f" {_PARENT} ", _PARENT),  # optional blanks around a header value
        (
            f"cc-{_ID}-00f067aa0ba902b7-09-more",
            f"cc-{_ID}-00f067aa0ba902b7-09-more",
        ),  # later version
        (f"00-{_ID}-00f067aa0ba902b7-01-more", None),  # version 00 has exactly four fields
        (f"ff-{_ID}-00f067aa0ba902b7-01", None),  # version ff is invalid
        (f"00-{_ID.upper()}-00f067aa0ba902b7-01", None),  # lowercase hex only
        (f"00-{'0' * 32}-00f067aa0ba902b7-01", None),  # all-zero trace id
        (f"00-{_ID}-{'0' * 16}-01", None),  # all-zero parent id
        (f"00-{_ID}-00f067aa0ba902b7", None),
        (f"00-{_ID}-00f067aa0ba902b7-01\nx", None),
        ("garbage", None),
        ("", None),
        (123, None),
        (None, None),
    ],
)
def test_traceparent_is_kept_only_when_well_formed(value: object, kept: str | None) -> None:
    from mesh.trace_context import traceparent

    assert traceparent(value) == kept


@pytest.mark.parametrize(
    ("value", "kept"),
    [
        ("vendor=abc", "vendor=abc"),
        ("a=1 , b@sys=x y,,", "a=1,b@sys=x y"),  # blanks around members go, empty ones too
        ("Vendor=abc", None),  # keys are lowercase
        ("a=1,a=2", None),  # a key at most once
        ("a=", None),
        ("a=b=c", None),
        (",".join(f"k{n}=v" for n in range(33)), None),  # 32 members at most
        ("", None),
        (["a=1"], None),
    ],
)
def test_tracestate_is_kept_only_when_well_formed(value: object, kept: str | None) -> None:
    from mesh.trace_context import tracestate

    assert tracestate(value) == kept


@pytest.mark.parametrize(
    ("value", "kept"),
    [
        ("tenant=acme", "tenant=acme"),
        ("a = 1 ; p ; q = 2 , b=%20x", "a=1;p;q=2,b=%20x"),
        ("a=b c", None),  # a blank inside a value must be percent-encoded
        ("tenant", None),  # a member needs a value
        ("a=1,,b=2", None),
        ("a=" + "x" * 600, None),  # longer than the router keeps
        ("", None),
    ],
)
def test_baggage_is_kept_only_when_well_formed(value: object, kept: str | None) -> None:
    from mesh.trace_context import baggage

    assert baggage(value) == kept


def test_meta_wins_over_headers_and_a_malformed_source_falls_through() -> None:
    from mesh.trace_context import incoming

    other = f"00-{'a' * 32}-{'b' * 16}-01"
    headers = {"traceparent": other, "tracestate": "h=1", "baggage": "h=1"}
    meta = {"traceparent": _PARENT, "tracestate": "m=1", "baggage": "m=1"}
    assert incoming(meta, headers) == meta
    assert incoming({"traceparent": "bad", "tracestate": "m=1"}, headers) == headers
    assert incoming({"baggage": "m=1"}, {"traceparent": other}) == {
        "traceparent": other,
        "baggage": "m=1",
    }
    assert incoming({"traceparent": _PARENT, "tracestate": "BAD"}, None) == {"traceparent": _PARENT}
    assert incoming(None, None) == {}


def test_a_listing_loses_only_its_malformed_tools() -> None:
    from mesh.mcp._listing import tool_problem

    result: dict[str, Any] = {"tools": []}
    good = {"name": "echo", "inputSchema": {"type": "object"}}
    assert tool_problem(result, good, "2025-11-25") is None
    bad = {"name": "x", "inputSchema": {"type": "object", "properties": "oops"}}
    assert tool_problem(result, bad, "2025-11-25") == (
        "its entry breaks the MCP schema at inputSchema.properties: "
        "Input should be a valid dictionary"
    )
    assert tool_problem(result, {"inputSchema": {"type": "object"}}, "2025-11-25") == (
        "its entry breaks the MCP schema at name: Field required"
    )
