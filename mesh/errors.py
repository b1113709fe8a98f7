"""One table maps the mesh's errors to gRPC status codes, in both directions.

Servers raise :class:`MeshError` subclasses from transport-neutral code; the gRPC
adapters turn them into a status with a ``google.rpc.ErrorInfo`` detail (and a
``BadRequest`` field violation where a field is at fault). Clients turn an
``AioRpcError`` back into the same exception type with :func:`from_rpc_error`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import cast

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

DOMAIN = "grpc-agent-mesh"
STATUS_DETAILS_KEY = "grpc-status-details-bin"


class MeshError(Exception):
    """Base of every error the mesh reports over gRPC."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    """The status code (a class default; a relayed :class:`RemoteError` sets its own)."""
    reason: str = "INTERNAL"
    """The ``google.rpc.ErrorInfo`` reason ("" for a bare status relayed from a peer)."""

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.metadata: dict[str, str] = dict(metadata or {})

    def to_status(self) -> status_pb2.Status:
        """The ``google.rpc.Status`` for this error, with its details."""
        details: list[any_pb2.Any] = []
        if self.reason:
            info = error_details_pb2.ErrorInfo(reason=self.reason, domain=DOMAIN)
            info.metadata.update(self.metadata)
            packed = any_pb2.Any()
            packed.Pack(info)
            details.append(packed)
        if self.field:
            bad = error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=self.field, description=self.message
                    )
                ]
            )
            packed_bad = any_pb2.Any()
            packed_bad.Pack(bad)
            details.append(packed_bad)
        return status_pb2.Status(code=self.code.value[0], message=self.message, details=details)

    def trailing_metadata(self) -> tuple[tuple[str, bytes], ...]:
        """Trailers that carry the rich status to the client."""
        return ((STATUS_DETAILS_KEY, self.to_status().SerializeToString()),)


class InvalidArgument(MeshError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_ARGUMENT"


class NotFound(MeshError):
    code = grpc.StatusCode.NOT_FOUND
    reason = "NOT_FOUND"


class AgentNotFound(NotFound):
    reason = "AGENT_NOT_FOUND"


class HopBudgetExceeded(MeshError):
    """A turn tried to take more handoffs than its budget allows."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "HOP_BUDGET_EXCEEDED"


class HandoffCycle(MeshError):
    """A CONSULT stack would contain the same agent twice."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "HANDOFF_CYCLE"


class HandoffNotAllowed(MeshError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "HANDOFF_NOT_ALLOWED"


class HistoryNotKept(MeshError):
    """A turn named kept history (``Turn.kept``) that its stream does not keep."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "HISTORY_NOT_KEPT"


class Unauthenticated(MeshError):
    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "UNAUTHENTICATED"


class PermissionDenied(MeshError):
    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "PERMISSION_DENIED"


class Unavailable(MeshError):
    code = grpc.StatusCode.UNAVAILABLE
    reason = "UNAVAILABLE"


class Draining(Unavailable):
    reason = "DRAINING"


class DeadlineExceeded(MeshError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    reason = "DEADLINE_EXCEEDED"


class IdleTimeout(DeadlineExceeded):
    """A stream carried no request for longer than the server allows."""

    reason = "IDLE_TIMEOUT"


class ResourceExhausted(MeshError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "RESOURCE_EXHAUSTED"


class Cancelled(MeshError):
    code = grpc.StatusCode.CANCELLED
    reason = "CANCELLED"


class ProviderError(MeshError):
    """A model provider failed; subclasses say how."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = "PROVIDER_ERROR"


class ProviderAuthError(ProviderError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "PROVIDER_AUTH_FAILED"


class ProviderRateLimited(ProviderError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "PROVIDER_RATE_LIMITED"


class ContextTooLong(ProviderError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "CONTEXT_TOO_LONG"


class ProviderUnavailable(ProviderError):
    code = grpc.StatusCode.UNAVAILABLE
    reason = "PROVIDER_UNAVAILABLE"


class ConfigError(Exception):
    """A configuration file or setting is invalid; the message names the field."""


_ALL: Sequence[type[MeshError]] = (
    InvalidArgument,
    NotFound,
    AgentNotFound,
    HopBudgetExceeded,
    HandoffCycle,
    HandoffNotAllowed,
    HistoryNotKept,
    Unauthenticated,
    PermissionDenied,
    Unavailable,
    Draining,
    DeadlineExceeded,
    IdleTimeout,
    ResourceExhausted,
    Cancelled,
    ProviderError,
    ProviderAuthError,
    ProviderRateLimited,
    ContextTooLong,
    ProviderUnavailable,
)
#: reason -> exception type (the client direction of the table).
BY_REASON: dict[str, type[MeshError]] = {cls.reason: cls for cls in reversed(_ALL)}


class RemoteError(MeshError):
    """A status from a peer that is not one of the mesh's own errors.

    It keeps the peer's code and reason, so a relay passes them on unchanged: a bare
    FAILED_PRECONDITION stays a bare FAILED_PRECONDITION, never a mesh reason.
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        reason: str = "",
        *,
        field: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message, field=field, metadata=metadata)
        self.code = code
        self.reason = reason
        self.remote_code = code
        self.remote_reason = reason

    @property
    def status_code(self) -> grpc.StatusCode:
        return self.remote_code


def status_of(err: BaseException) -> grpc.StatusCode:
    """The gRPC status code an exception maps to."""
    if isinstance(err, MeshError):
        return err.code
    return grpc.StatusCode.INTERNAL


def decode_details(
    trailing: Sequence[tuple[str, str | bytes]] | None,
) -> tuple[str, dict[str, str], str | None]:
    """Read (reason, metadata, field) from a status's trailing metadata."""
    for key, value in trailing or ():
        if key != STATUS_DETAILS_KEY or not isinstance(value, bytes):
            continue
        status = status_pb2.Status()
        try:
            status.ParseFromString(value)
        except Exception:  # noqa: BLE001 - a peer's garbage is not our crash
            return "", {}, None
        reason, meta, field = "", {}, None
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason, meta = info.reason, dict(info.metadata)
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                if bad.field_violations:
                    field = bad.field_violations[0].field
        return reason, meta, field
    return "", {}, None


def from_status(
    code: grpc.StatusCode,
    message: str,
    trailing: Sequence[tuple[str, str | bytes]] | None = None,
) -> MeshError:
    """Map a received status back to the exception the server raised."""
    reason, meta, field = decode_details(trailing)
    cls = BY_REASON.get(reason)
    if cls is not None and cls.code == code:
        return cls(message, field=field, metadata=meta)
    return RemoteError(code, message, reason, field=field, metadata=meta)


def from_rpc_error(err: grpc.RpcError) -> MeshError:
    """Map a client-side ``RpcError`` (sync or aio) back to a :class:`MeshError`."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else str(err)
    trailing = err.trailing_metadata() if hasattr(err, "trailing_metadata") else None
    pairs = cast(Sequence[tuple[str, str | bytes]], tuple(trailing or ()))
    return from_status(code, details or "", pairs)


# Keep google.rpc.Code importable for callers that want the numeric table.
CODES = code_pb2
