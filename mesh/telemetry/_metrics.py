"""The mesh's metrics, exposed in the Prometheus format on the metrics port.

Names follow the OpenTelemetry conventions as Prometheus spells them (dots become
underscores, the unit is a suffix, counters end in ``_total``):
``gen_ai.client.token.usage`` is ``gen_ai_client_token_usage``,
``gen_ai.client.operation.duration`` (s) is
``gen_ai_client_operation_duration_seconds``. Recording is a dictionary lookup and
an add: cheap enough to stay on whether or not anything scrapes.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

_DURATION = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_FAST = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
# The buckets the GenAI conventions advise for gen_ai.client.token.usage.
_TOKENS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304)

turns = Counter(
    "mesh_turns",
    "Turns finished, by the agent that answered and the outcome.",
    ["service", "agent", "outcome"],
)
turn_duration = Histogram(
    "mesh_turn_duration_seconds",
    "Time from a turn's start to its final event.",
    ["service", "agent"],
    buckets=_DURATION,
)
time_to_first_delta = Histogram(
    "mesh_turn_time_to_first_delta_seconds",
    "Time from a turn's start to its first text delta.",
    ["service", "agent"],
    buckets=_DURATION,
)
token_usage = Histogram(
    "gen_ai_client_token_usage",
    "Tokens used per model call (gen_ai.client.token.usage).",
    [
        "gen_ai_operation_name",
        "gen_ai_provider_name",
        "gen_ai_request_model",
        "gen_ai_token_type",
        "gen_ai_agent_name",
    ],
    buckets=_TOKENS,
)
model_tokens = Counter(
    "mesh_model_tokens",
    "Model tokens by agent, model and direction (input/output).",
    ["agent", "model", "gen_ai_token_type"],
)
operation_duration = Histogram(
    "gen_ai_client_operation_duration_seconds",
    "Duration of model calls (gen_ai.client.operation.duration).",
    ["gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model", "error_type"],
    buckets=_DURATION,
)
tool_duration = Histogram(
    "gen_ai_execute_tool_duration_seconds",
    "Duration of tool calls.",
    ["gen_ai_tool_name", "error_type"],
    buckets=_DURATION,
)
handoffs = Counter(
    "mesh_handoffs", "Handoffs the router carried, by mode.", ["mode", "source", "target"]
)
refusals = Counter(
    "mesh_handoff_refusals",
    "Handoffs refused by the hop budget or the CONSULT cycle rule.",
    ["reason"],
)
agent_streams = Counter(
    "mesh_agent_streams",
    "Agent streams the router used for a turn: new or reused.",
    ["agent", "kind"],
)
history_messages = Counter(
    "mesh_history_messages",
    "History messages of Chat turns the router gave an agent: sent, or kept by the agent "
    "on that stream from an earlier turn.",
    ["agent", "source"],
)
token_exchanges = Counter(
    "mesh_token_exchanges",
    "On-behalf-of token exchanges, by result (exchanged, cache_hit).",
    ["audience", "result"],
)
jwks_fetches = Counter("mesh_jwks_fetches", "JWKS documents fetched, by outcome.", ["outcome"])
auth_refusals = Counter(
    "mesh_auth_refusals",
    "Calls refused by token validation or the caller policy, by service and status code.",
    ["service", "code"],
)
store_commit = Histogram(
    "mesh_store_commit_duration_seconds",
    "Time to store a finished turn (the router's view).",
    ["store"],
    buckets=_FAST,
)
open_streams = Gauge("mesh_open_streams", "Work streams (Chat/Handoff) open now.", ["service"])
mcp_tool_calls = Counter(
    "mesh_mcp_tool_calls",
    "Tool calls (ask_<agent>) that mesh mcp answered, by the agent asked and the outcome.",
    ["agent", "outcome"],
)
mcp_tool_call_duration = Histogram(
    "mesh_mcp_tool_call_duration_seconds",
    "Time mesh mcp took to answer a tool call (the turn through the router).",
    ["agent"],
    buckets=_DURATION,
)


class _ReplicaHealth(Collector):
    """``mesh_replica_healthy``: 1 per healthy agent replica the routers know, else 0."""

    def __init__(self) -> None:
        self.sources: weakref.WeakSet[Any] = weakref.WeakSet()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "mesh_replica_healthy",
            "Agent replicas by health (1 healthy, 0 not).",
            labels=["agent", "address"],
        )
        for pool in list(self.sources):
            for agent, endpoints in getattr(pool, "endpoints", {}).items():
                for endpoint in endpoints.values():
                    family.add_metric([agent, endpoint.address], 1.0 if endpoint.healthy else 0.0)
        yield family


replica_health = _ReplicaHealth()
REGISTRY.register(replica_health)


def watch_pool(pool: Any) -> None:
    """Report the replicas of a router's agent pool in ``mesh_replica_healthy``."""
    replica_health.sources.add(pool)


def watch_streams(service: str, active: Callable[[], int]) -> None:
    """Report a server's open work streams in ``mesh_open_streams``."""
    open_streams.labels(service).set_function(lambda: float(active()))


def names() -> Iterable[str]:
    """Every metric family the mesh defines (for docs and tests)."""
    return [
        "mesh_turns_total",
        "mesh_turn_duration_seconds",
        "mesh_turn_time_to_first_delta_seconds",
        "gen_ai_client_token_usage",
        "mesh_model_tokens_total",
        "gen_ai_client_operation_duration_seconds",
        "gen_ai_execute_tool_duration_seconds",
        "mesh_handoffs_total",
        "mesh_handoff_refusals_total",
        "mesh_agent_streams_total",
        "mesh_history_messages_total",
        "mesh_token_exchanges_total",
        "mesh_jwks_fetches_total",
        "mesh_auth_refusals_total",
        "mesh_store_commit_duration_seconds",
        "mesh_open_streams",
        "mesh_replica_healthy",
        "mesh_mcp_tool_calls_total",
        "mesh_mcp_tool_call_duration_seconds",
    ]
