"""The router: the mesh's one entry point and the only component that dials agents."""

from mesh.router._core import HopBudget, RoutingCore
from mesh.router._engine import Router
from mesh.router._pool import AgentPool, Endpoint
from mesh.router._serve import RouterApp, with_static
from mesh.router._store import ConversationStore, MemoryStore, open_store
from mesh.router._store_redis import RedisStore
from mesh.router._store_sqlite import SqliteStore
from mesh.router._turn import TurnState

__all__ = [
    "AgentPool",
    "ConversationStore",
    "Endpoint",
    "HopBudget",
    "MemoryStore",
    "RedisStore",
    "Router",
    "RouterApp",
    "RoutingCore",
    "SqliteStore",
    "TurnState",
    "open_store",
    "with_static",
]
