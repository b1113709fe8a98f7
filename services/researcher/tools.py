"""Research tools (demo data)."""

from __future__ import annotations

import asyncio

_NOTES = {
    "grpc": "gRPC runs over HTTP/2; bidirectional streams carry many messages per call.",
    "kubernetes": "Kubernetes probes can speak gRPC health natively since 1.24.",
}


async def search_notes(topic: str) -> str:
    """Search the team's notes for a topic.

    Args:
        topic: A single keyword, like grpc or kubernetes.
    """
    await asyncio.sleep(0)
    return _NOTES.get(topic.lower(), f"nothing on {topic}")
