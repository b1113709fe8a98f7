"""The Agent2Agent protocol: ``mesh a2a`` serves the mesh's agents over A2A, and remote
A2A agents (``agents.<name>.a2a: {url, audience}``) are handoff targets of the router.

Built on ``a2a-sdk`` (spec v1): the edge is its request handler over a router turn
(:mod:`mesh.a2a._edge`); the router's second agent-stream adapter uses its client
(:mod:`mesh.a2a._remote`); errors map both ways in :mod:`mesh.a2a._errors`.
"""

import logging

# a2a-sdk's tracer logs a DEBUG line per traced function as it is defined (at import)
# and called: per-function noise an operator debugging the mesh does not need (its
# warnings and errors still show). Set before the SDK is imported below.
logging.getLogger("a2a.utils.telemetry").setLevel(logging.INFO)

from mesh.a2a._edge import A2A_SERVICE, A2aEdge, build_edge, serve_edge  # noqa: E402
from mesh.a2a._errors import (  # noqa: E402
    error_for_state,
    from_a2a_error,
    task_state_for,
    to_a2a_error,
)
from mesh.a2a._remote import A2aAgents, MeshStreams  # noqa: E402

__all__ = [
    "A2A_SERVICE",
    "A2aAgents",
    "A2aEdge",
    "MeshStreams",
    "build_edge",
    "error_for_state",
    "from_a2a_error",
    "serve_edge",
    "task_state_for",
    "to_a2a_error",
]
