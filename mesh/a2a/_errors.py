"""The mesh's errors and A2A's, mapped both ways in one place.

A2A (spec v1) has a JSON-RPC error code per protocol error (task not found -32001,
not cancelable -32002, unsupported operation -32004, invalid params -32602,
internal -32603, ...), task states for how a task ended (failed, rejected,
canceled, auth-required, input-required), and leaves authentication to the
transport: HTTP 401 with a ``WWW-Authenticate`` challenge (403 for a caller
without the right), gRPC UNAUTHENTICATED / PERMISSION_DENIED.
"""

from __future__ import annotations

import grpc
import httpx
from a2a.client.errors import A2AClientError, A2AClientTimeoutError
from a2a.types import TaskState
from a2a.utils.errors import (
    JSON_RPC_ERROR_CODE_MAP,
    A2AError,
    ContentTypeNotSupportedError,
    InternalError,
    InvalidParamsError,
    InvalidRequestError,
    MethodNotFoundError,
    TaskNotCancelableError,
    TaskNotFoundError,
    UnsupportedOperationError,
)

from mesh.errors import (
    Cancelled,
    DeadlineExceeded,
    InvalidArgument,
    MeshError,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)


class RemoteFailed(MeshError):
    """A remote A2A agent ended its task failed or rejected."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = "A2A_TASK_FAILED"


class RemoteNeedsInput(MeshError):
    """A remote A2A agent asked for input mid-turn (not carried through a handoff)."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "A2A_INPUT_REQUIRED"


class RemoteUnsupported(MeshError):
    code = grpc.StatusCode.UNIMPLEMENTED
    reason = "A2A_UNSUPPORTED"


# -- mesh -> A2A -------------------------------------------------------------------------

#: The HTTP status of a refused A2A request, by the mesh error's gRPC code.
HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
}


def to_a2a_error(err: MeshError) -> A2AError:
    """The A2A protocol error for a mesh error raised while answering a request."""
    code = err.code
    data = {"reason": err.reason, "code": code.name}
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidParamsError(err.message, data)
    if code == grpc.StatusCode.NOT_FOUND:
        return InvalidParamsError(err.message, data)  # an agent, never a task
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return UnsupportedOperationError(err.message, data)
    return InternalError(err.message, data)


def a2a_code(err: MeshError) -> int:
    """The JSON-RPC error code of the A2A error for ``err``."""
    return JSON_RPC_ERROR_CODE_MAP[type(to_a2a_error(err))]


def task_state_for(err: MeshError) -> TaskState:
    """How a task ends when its turn failed with ``err``."""
    code = err.code
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return TaskState.TASK_STATE_AUTH_REQUIRED  # e.g. the token expired mid-task
    if code == grpc.StatusCode.CANCELLED:
        return TaskState.TASK_STATE_CANCELED
    if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INVALID_ARGUMENT):
        return TaskState.TASK_STATE_REJECTED
    return TaskState.TASK_STATE_FAILED


# -- A2A -> mesh -------------------------------------------------------------------------

_FROM_A2A: dict[type[A2AError], type[MeshError]] = {
    TaskNotFoundError: NotFound,
    TaskNotCancelableError: RemoteUnsupported,
    UnsupportedOperationError: RemoteUnsupported,
    ContentTypeNotSupportedError: InvalidArgument,
    InvalidParamsError: InvalidArgument,
    InvalidRequestError: InvalidArgument,
    MethodNotFoundError: RemoteUnsupported,
}

_FROM_HTTP: dict[int, type[MeshError]] = {
    401: Unauthenticated,
    403: PermissionDenied,
    404: NotFound,
}


_FROM_GRPC: dict[grpc.StatusCode, type[MeshError]] = {
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.UNIMPLEMENTED: RemoteUnsupported,
}


def from_a2a_error(err: BaseException, agent: str) -> MeshError:
    """The mesh error for what the A2A client raised talking to remote ``agent``."""
    where = f"A2A agent {agent}"
    if isinstance(err, A2AClientTimeoutError):
        return DeadlineExceeded(f"{where} timed out")
    cause = err.__cause__
    if isinstance(cause, grpc.aio.AioRpcError):  # the gRPC binding: a mesh-like status
        code: grpc.StatusCode = cause.code()
        grpc_kind = _FROM_GRPC.get(code, Unavailable)
        return grpc_kind(f"{where} refused the call: {code.name}", metadata={"agent": agent})
    if isinstance(cause, httpx.HTTPStatusError):
        status = cause.response.status_code
        kind = _FROM_HTTP.get(status, Unavailable)
        return kind(f"{where} refused the call: HTTP {status}", metadata={"agent": agent})
    for a2a_type, mesh_type in _FROM_A2A.items():
        if isinstance(err, a2a_type):
            return mesh_type(f"{where}: {err.message}", metadata={"agent": agent})
    if isinstance(err, A2AClientError | A2AError):
        return Unavailable(f"{where}: {err.message}", metadata={"agent": agent})
    return Unavailable(f"{where}: {type(err).__name__}", metadata={"agent": agent})


def error_for_state(state: TaskState, agent: str, text: str) -> MeshError | None:
    """The mesh error for a remote task that ended in ``state`` (None: completed)."""
    where = f"A2A agent {agent}"
    detail = f": {text}" if text else ""
    meta = {"agent": agent, "state": TaskState.Name(state)}
    if state == TaskState.TASK_STATE_COMPLETED:
        return None
    if state == TaskState.TASK_STATE_CANCELED:
        return Cancelled(f"{where} canceled its task{detail}", metadata=meta)
    if state == TaskState.TASK_STATE_AUTH_REQUIRED:
        return Unauthenticated(f"{where} needs other credentials{detail}", metadata=meta)
    if state == TaskState.TASK_STATE_INPUT_REQUIRED:
        return RemoteNeedsInput(f"{where} asks for input{detail}", metadata=meta)
    if state == TaskState.TASK_STATE_REJECTED:
        return PermissionDenied(f"{where} rejected the task{detail}", metadata=meta)
    return RemoteFailed(f"{where} failed{detail}", metadata=meta)
