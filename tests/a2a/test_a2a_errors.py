"""The one table between the mesh's errors and A2A's, both directions."""

from __future__ import annotations

import grpc
import httpx
import pytest
from a2a.client.errors import A2AClientError, A2AClientTimeoutError
from a2a.types import TaskState
from a2a.utils.errors import (
    InternalError,
    InvalidParamsError,
    TaskNotFoundError,
    UnsupportedOperationError,
)

from mesh.a2a._errors import (
    HTTP_STATUS,
    a2a_code,
    error_for_state,
    from_a2a_error,
    task_state_for,
    to_a2a_error,
)
from mesh.errors import (
    AgentNotFound,
    Cancelled,
    HopBudgetExceeded,
    InvalidArgument,
    MeshError,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)


@pytest.mark.parametrize(
    ("err", "a2a_type", "code", "state"),
    [
        (InvalidArgument("bad"), InvalidParamsError, -32602, TaskState.TASK_STATE_REJECTED),
        (AgentNotFound("no such agent"), InvalidParamsError, -32602, TaskState.TASK_STATE_FAILED),
        (HopBudgetExceeded("spent"), InternalError, -32603, TaskState.TASK_STATE_FAILED),
        (Unavailable("down"), InternalError, -32603, TaskState.TASK_STATE_FAILED),
        (Cancelled("stop"), InternalError, -32603, TaskState.TASK_STATE_CANCELED),
        (Unauthenticated("expired"), InternalError, -32603, TaskState.TASK_STATE_AUTH_REQUIRED),
        (PermissionDenied("no"), InternalError, -32603, TaskState.TASK_STATE_REJECTED),
    ],
)
def test_mesh_to_a2a(err: MeshError, a2a_type: type, code: int, state: int) -> None:
    mapped = to_a2a_error(err)
    assert type(mapped) is a2a_type
    assert mapped.data == {"reason": err.reason, "code": err.code.name}
    assert a2a_code(err) == code
    assert task_state_for(err) == state


def test_refusals_are_http_statuses() -> None:
    assert HTTP_STATUS[Unauthenticated("x").code] == 401
    assert HTTP_STATUS[PermissionDenied("x").code] == 403


def _http_error(status: int) -> A2AClientError:
    request = httpx.Request("POST", "http://127.0.0.1:1/")
    response = httpx.Response(status, request=request)
    try:
        raise A2AClientError(f"HTTP Error {status}") from httpx.HTTPStatusError(
            "refused", request=request, response=response
        )
    except A2AClientError as err:
        return err


@pytest.mark.parametrize(
    ("err", "code"),
    [
        (_http_error(401), grpc.StatusCode.UNAUTHENTICATED),
        (_http_error(403), grpc.StatusCode.PERMISSION_DENIED),
        (_http_error(404), grpc.StatusCode.NOT_FOUND),
        (_http_error(502), grpc.StatusCode.UNAVAILABLE),
        (TaskNotFoundError(), grpc.StatusCode.NOT_FOUND),
        (InvalidParamsError(), grpc.StatusCode.INVALID_ARGUMENT),
        (UnsupportedOperationError(), grpc.StatusCode.UNIMPLEMENTED),
        (A2AClientTimeoutError("slow"), grpc.StatusCode.DEADLINE_EXCEEDED),
        (A2AClientError("Network communication error"), grpc.StatusCode.UNAVAILABLE),
        (RuntimeError("?"), grpc.StatusCode.UNAVAILABLE),
    ],
)
def test_a2a_to_mesh(err: BaseException, code: grpc.StatusCode) -> None:
    mapped = from_a2a_error(err, "partner")
    assert mapped.code == code
    assert "partner" in mapped.message


@pytest.mark.parametrize(
    ("state", "code"),
    [
        (TaskState.TASK_STATE_FAILED, grpc.StatusCode.UNAVAILABLE),
        (TaskState.TASK_STATE_REJECTED, grpc.StatusCode.PERMISSION_DENIED),
        (TaskState.TASK_STATE_CANCELED, grpc.StatusCode.CANCELLED),
        (TaskState.TASK_STATE_AUTH_REQUIRED, grpc.StatusCode.UNAUTHENTICATED),
        (TaskState.TASK_STATE_INPUT_REQUIRED, grpc.StatusCode.FAILED_PRECONDITION),
    ],
)
def test_remote_task_states(state: int, code: grpc.StatusCode) -> None:
    err = error_for_state(state, "partner", "why")  # type: ignore[arg-type]  # enum ints
    assert err is not None and err.code == code and err.message.endswith(": why")
    assert error_for_state(TaskState.TASK_STATE_COMPLETED, "partner", "") is None


def test_the_sdk_call_state_never_shows_the_token() -> None:
    """The SDK logs a call's state at DEBUG: the edge keeps the token out of its repr."""
    from starlette.requests import Request

    from mesh.a2a._auth import _CallContexts, bearer_of

    token = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl"
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/",
        "headers": [(b"authorization", f"Bearer {token}".encode()), (b"a2a-version", b"1.0")],
        "mesh_token": token,
        "mesh_subject": "alice",
    }
    context = _CallContexts().build(Request(scope))
    assert token not in repr(context) and token not in str(context.state)
    assert bearer_of(context.state) == token
    assert context.state["headers"] == {"a2a-version": "1.0"}
    assert context.user.user_name == "alice"
