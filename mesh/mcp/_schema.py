"""MCP tool names, input schemas and results, made safe for the model."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping

import mcp_types
from jsonschema import Draft202012Validator, SchemaError

from mesh.tools import ToolOutcome

log = logging.getLogger("mesh.mcp")


_TOOL_NAME_RE = re.compile(r"[^A-Za-z0-9_-]")


def tool_name(raw: str) -> str:
    """A model-safe tool name (``[A-Za-z0-9_-]``, at most 64 characters)."""
    return _TOOL_NAME_RE.sub("_", raw)[:64] or "tool"


def schema_problem(schema: object) -> str | None:
    """Why ``schema`` cannot be an arguments schema, or None when it can."""
    if not isinstance(schema, Mapping):
        return f"inputSchema is a {type(schema).__name__}, not an object"
    if schema.get("type", "object") != "object":
        return f"inputSchema has type {schema.get('type')!r}, not 'object'"
    try:
        Draft202012Validator.check_schema(dict(schema))
    except SchemaError as err:
        return f"inputSchema is not a valid JSON schema: {err.message}"
    return None


def render_result(result: mcp_types.CallToolResult, limit: int, label: str) -> ToolOutcome:
    """The model's view of a tools/call result; oversized results are refused."""
    parts: list[str] = []
    size = 0
    for block in result.content:
        if isinstance(block, mcp_types.TextContent):
            parts.append(block.text)
            size += len(block.text.encode())
        elif isinstance(block, mcp_types.ImageContent | mcp_types.AudioContent):
            size += len(block.data)
            parts.append(f"[{block.type} {block.mime_type}, {len(block.data) * 3 // 4} bytes]")
        elif isinstance(block, mcp_types.EmbeddedResource):
            res = block.resource
            text = getattr(res, "text", None)
            if isinstance(text, str):
                parts.append(text)
                size += len(text.encode())
            else:
                blob = str(getattr(res, "blob", ""))
                size += len(blob)
                parts.append(f"[resource {res.uri}, {len(blob) * 3 // 4} bytes]")
        elif isinstance(block, mcp_types.ResourceLink):
            parts.append(f"[resource {block.uri}]")
        if size > limit:
            break
    if not parts and result.structured_content is not None:
        text = json.dumps(result.structured_content, default=str)
        size += len(text.encode())
        parts.append(text)
    if size > limit:
        return ToolOutcome(
            f"{label} returned a result over the {limit}-byte limit (max_result_bytes); refused",
            True,
        )
    return ToolOutcome("\n".join(parts), bool(result.is_error))
