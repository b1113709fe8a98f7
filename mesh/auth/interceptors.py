"""The auth interceptors, by their former module name.

Server side: :mod:`mesh.auth.server_auth`; client side: :mod:`mesh.auth.client_auth`;
TLS for the gRPC hops: :mod:`mesh.auth.tls`. Import from those; this facade keeps
``mesh.auth.interceptors`` working for existing code.
"""

from __future__ import annotations

from mesh.auth.client_auth import (
    HopAuth,
    client_interceptors,
    hop_interceptors,
    service_interceptors,
)
from mesh.auth.server_auth import (
    AGENT_USER_METHODS,
    HEALTH_PREFIX,
    REFLECTION_PREFIX,
    AuthServerInterceptor,
    CallerPolicy,
    bearer_token,
    caller_policy,
    current_deadline,
    current_traceparent,
    make_validator,
    server_interceptors,
)
from mesh.auth.tls import channel_credentials, server_credentials

__all__ = [
    "AGENT_USER_METHODS",
    "HEALTH_PREFIX",
    "REFLECTION_PREFIX",
    "AuthServerInterceptor",
    "CallerPolicy",
    "HopAuth",
    "bearer_token",
    "caller_policy",
    "channel_credentials",
    "client_interceptors",
    "current_deadline",
    "current_traceparent",
    "hop_interceptors",
    "make_validator",
    "server_credentials",
    "server_interceptors",
    "service_interceptors",
]
