"""An MCP server that requires a bearer token for its resource sees the user as subject,
itself as audience and the agent in the actor chain; never the agent's own token."""

from __future__ import annotations

import json
from pathlib import Path

from mcp.server.auth.settings import AuthSettings
from pydantic import AnyHttpUrl

from mesh.auth.interceptors import make_validator
from mesh.auth.runtime import resolve_issuer
from mesh.auth.sts import TokenService, mint_user_token
from mesh.client import AgentClient, create_channel
from mesh.config import config_from_dict
from mesh.context import current_token
from mesh.mcp import close_toolset, toolset_of
from tests.mcp.servers import JwtVerifier, bound_socket, notes_server, serve_http
from tests.mcp.test_mcp_tools import tool_events
from tests.meshtest import serve_agent, serve_router

#: Tokens the agent received on its incoming calls (recorded by a function tool).
INCOMING: list[str] = []


def incoming_token() -> str:
    """Record the token this agent received."""
    token = current_token.get()
    assert token
    INCOMING.append(token)
    return "recorded"


async def test_http_mcp_server_sees_a_delegated_token_for_itself(tmp_path: Path) -> None:
    sock = bound_socket()
    resource = f"http://127.0.0.1:{sock.getsockname()[1]}/mcp"
    config = config_from_dict(
        {
            "data_dir": str(tmp_path),
            "router": {"default_agent": "helper", "store": {"kind": "memory"}},
            "auth": {"enabled": True, "sts": {"port": 0}, "audiences": {"notes-mcp": resource}},
            "agents": {
                "helper": {
                    "description": "asks a protected MCP server who it is talking to",
                    "tools": ["tests.mcp.test_mcp_auth:incoming_token"],
                    "mcp_servers": [
                        {
                            "name": "notes",
                            "streamable_http": {"url": resource},
                            "audience": resource,
                        }
                    ],
                    "provider": {
                        "kind": "offline",
                        "rules": [
                            {"contains": "who", "tool": "whoami"},
                            {"contains": "mine", "tool": "incoming_token"},
                        ],
                        "after_tools": "{results}",
                    },
                }
            },
        },
        source=str(Path(__file__)),
    )
    with TokenService(config):
        verifier = JwtVerifier(make_validator(config, "notes-mcp"), resource)
        server = notes_server(
            "notes",
            auth=AuthSettings(
                issuer_url=AnyHttpUrl(resolve_issuer(config)),
                resource_server_url=AnyHttpUrl(resource),
                validate_token_resource=True,  # the server refuses tokens for another resource
            ),
            verifier=verifier,
        )
        async with serve_http(server, "streamable_http", sock):
            async with serve_agent(config, "helper") as (addr, _s, runtime, _p):
                toolset = toolset_of(runtime)
                assert toolset is not None
                try:
                    await toolset.wait_started()
                    assert "whoami" in runtime.tools, toolset.servers[0].last_error
                    async with serve_router(config, {"helper": [addr]}) as (router, _app):
                        user = mint_user_token(config, "alice", ["mesh.chat"], 600)
                        md = [("authorization", f"Bearer {user}")]
                        async with create_channel(router) as channel:
                            client = AgentClient(channel, router=True)
                            who = await client.chat("who am I?", conversation_id="c1", metadata=md)
                            await client.chat("mine", conversation_id="c1", metadata=md)
                finally:
                    await close_toolset(runtime)
    _call, result = tool_events(who.events)
    assert not result.is_error, result.content
    seen = json.loads(result.content)
    assert seen["sub"] == "alice"  # the user, not the agent
    assert seen["aud"] == resource  # a token meant for this server only
    assert seen["act"]["sub"] == config.auth.client_id_for("helper")  # the agent acts
    assert INCOMING and INCOMING[-1] not in verifier.seen  # never the agent's own token
    assert user not in verifier.seen  # nor the user's
    assert verifier.seen
