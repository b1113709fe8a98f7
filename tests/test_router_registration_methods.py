"""The router registers ``mesh.v1.RouterService`` by hand (:func:`add_router_service`, for
its bytes-passthrough Chat serializer). Its method table must stay the generated one:
same names, same streaming kinds, same message types, so an RPC added to the proto
cannot be silently missing from (or mistyped in) the router."""

from __future__ import annotations

from typing import Any, cast

import grpc
from google.protobuf import symbol_database
from google.protobuf.message import Message

from mesh.router._servicer import RouterServicer, add_router_service
from mesh.v1 import router_pb2, router_pb2_grpc

SERVICE = router_pb2.DESCRIPTOR.services_by_name["RouterService"]


class _Registrations:
    """Takes what a registration function hands a server: its generic handlers (and the
    registered-method table the generated code also passes)."""

    def __init__(self) -> None:
        self.generic: list[grpc.GenericRpcHandler] = []
        self.registered: dict[str, dict[str, grpc.RpcMethodHandler[Any, Any]]] = {}

    def add_generic_rpc_handlers(self, handlers: tuple[grpc.GenericRpcHandler, ...]) -> None:
        self.generic.extend(handlers)

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        self.registered[service] = handlers

    def lookup(self, method: str) -> grpc.RpcMethodHandler[Any, Any] | None:
        """What the server would run for ``/mesh.v1.RouterService/<method>``."""
        details = cast(grpc.HandlerCallDetails, _Call(f"/{SERVICE.full_name}/{method}"))
        for handler in self.generic:
            found = handler.service(details)
            if found is not None:
                return found
        return None

    def method_names(self) -> set[str]:
        """Every method name the generic handlers answer for (their tables' keys)."""
        names: set[str] = set()
        for handler in self.generic:
            table: dict[str, object] = vars(handler)["_method_handlers"]
            names |= {key.rsplit("/", 1)[1] for key in table}
        return names


class _Call:
    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata: tuple[tuple[str, str], ...] = ()


def _router() -> _Registrations:
    servicer = RouterServicer.__new__(RouterServicer)  # only its bound methods are used
    out = _Registrations()
    add_router_service(servicer, cast(grpc.aio.Server, out))
    return out


def _generated() -> _Registrations:
    out = _Registrations()
    servicer = RouterServicer.__new__(RouterServicer)
    router_pb2_grpc.add_RouterServiceServicer_to_server(servicer, cast(grpc.aio.Server, out))
    return out


def _message(full_name: str) -> Message:
    cls: type[Message] = symbol_database.Default().GetSymbol(full_name)
    return cls()


def test_generated_registration_matches_the_proto() -> None:
    """The reference side of the comparison is itself the proto's service."""
    generated = _generated()
    proto = {m.name for m in SERVICE.methods}
    assert set(generated.registered[SERVICE.full_name]) == proto
    assert generated.method_names() == proto


def test_router_registers_every_rpc_of_the_generated_service() -> None:
    router, generated = _router(), _generated()
    assert router.method_names() == generated.method_names()
    assert router.method_names() == set(generated.registered[SERVICE.full_name])


def test_router_methods_have_the_generated_streaming_kinds_and_types() -> None:
    router, generated = _router(), _generated()
    for method in SERVICE.methods:
        ours, theirs = router.lookup(method.name), generated.lookup(method.name)
        assert ours is not None, f"the router does not serve {method.name}"
        assert theirs is not None
        kinds = (ours.request_streaming, ours.response_streaming)
        assert kinds == (theirs.request_streaming, theirs.response_streaming), method.name
        assert kinds == (method.client_streaming, method.server_streaming), method.name
        # The same wire types: a request of the proto's input type parses to that type,
        # and a response of its output type serializes to the same bytes.
        request = _message(method.input_type.full_name)
        assert ours.request_deserializer is not None and ours.response_serializer is not None
        parsed = ours.request_deserializer(request.SerializeToString())
        assert type(parsed) is type(request), method.name
        response = _message(method.output_type.full_name)
        assert ours.response_serializer(response) == response.SerializeToString(), method.name


def test_a_missing_rpc_would_be_seen() -> None:
    """The comparison fails when the router's table lacks an RPC of the proto."""
    router = _router()
    table: dict[str, object] = vars(router.generic[0])["_method_handlers"]
    table.pop(f"/{SERVICE.full_name}/DescribeAgent")
    assert router.method_names() != _generated().method_names()
    assert router.lookup("DescribeAgent") is None
