"""Bad input: random and mutated messages, random metadata and tokens, oversized calls.

The servers (a router and an agent, plus an authenticated pair with its token
service) are real processes shared by the module; the client is grpc.aio on a
loop in a background thread, so hypothesis can drive it from plain functions.
Every call must end with a defined status (never INTERNAL or UNKNOWN), and the
servers must still answer afterwards.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
import subprocess
import sys
import threading
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from mesh.client import channel_options, turn_request
from mesh.v1 import agent_pb2, router_pb2, types_pb2
from tests.meshtest import Proc, offline_agent, start_agent, write_config

from .helpers import start_router

T = TypeVar("T")
BAD = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
MAX_MESSAGE = 64 * 1024
MAX_METADATA = 4096
EXAMPLES = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
    ],
)


class LoopThread:
    """An event loop in a thread; grpc.aio channels live on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.channels: dict[str, grpc.aio.Channel] = {}

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def channel(self, address: str) -> grpc.aio.Channel:
        if address not in self.channels:

            async def make() -> grpc.aio.Channel:
                return grpc.aio.insecure_channel(address, options=channel_options())

            self.channels[address] = self.run(make())
        return self.channels[address]

    def close(self) -> None:
        for channel in self.channels.values():
            self.run(channel.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@dataclass
class Mesh:
    client: LoopThread
    router: str
    agent: str
    auth_router: str
    auth_agent: str
    token: str
    procs: list[Proc]
    slow: str = ""
    """An agent whose every turn takes 0.3 s (the router routes ``agent: slow`` to it)."""


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    from mesh.auth.sts import mint_user_token
    from mesh.config import load_config

    tmp = tmp_path_factory.mktemp("bad-input")
    agents = {
        "a": offline_agent(chunk_chars=64),
        "front": {
            **offline_agent(rules=[{"contains": "pass", "handoff": "a"}]),
            "handoffs": [{"target": "a"}],
        },
        "slow": offline_agent(delay_ms=300, chunk_chars=1000),
    }
    server = {"max_message_bytes": MAX_MESSAGE, "max_metadata_bytes": MAX_METADATA}
    plain = write_config(
        tmp,
        {
            "data_dir": str(tmp / "plain"),
            "server": server,
            "router": {"default_agent": "front", "store": {"kind": "memory"}},
            "agents": agents,
        },
        "plain.yaml",
    )
    secured = write_config(
        tmp,
        {
            "data_dir": str(tmp / "auth"),
            "router": {"default_agent": "a", "store": {"kind": "memory"}},
            "agents": {"a": offline_agent()},
            "auth": {"enabled": True, "sts": {"port": 0}},
        },
        "auth.yaml",
    )
    procs: list[Proc] = []
    sts = subprocess.Popen(
        [sys.executable, "-m", "tests.reliability._sts", str(secured)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    client = LoopThread()
    try:
        assert sts.stdout is not None and sts.stdout.readline().startswith("sts: ")
        a, a_addr = start_agent(plain, "a")
        front, front_addr = start_agent(plain, "front")
        slow, slow_addr = start_agent(plain, "slow")
        router, r_addr = start_router(
            plain, {"a": [a_addr], "front": [front_addr], "slow": [slow_addr]}
        )
        sa, sa_addr = start_agent(secured, "a")
        sr, sr_addr = start_router(secured, {"a": [sa_addr]})
        procs += [a, front, slow, router, sa, sr]
        token = mint_user_token(load_config(secured), "fuzzer")
        yield Mesh(client, r_addr, a_addr, sr_addr, sa_addr, token, procs, slow_addr)
    finally:
        client.close()
        for proc in procs:
            proc.stop()
        sts.kill()
        sts.wait()


# -- raw calls ------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    payload: bytes
    replies: bool
    """The server answers this request with events ending in a final or error."""


async def _bidi(
    channel: grpc.aio.Channel,
    method: str,
    steps: list[Step],
    metadata: tuple[tuple[str, str | bytes], ...] = (),
    timeout: float = 20,
) -> grpc.StatusCode:
    """Write the steps one by one; after each, read its answer before writing more
    (grpc/grpc#36066: a write racing an abort can surface as INTERNAL)."""
    call: Any = channel.stream_stream(method)(metadata=metadata, timeout=timeout)
    try:
        for step in steps:
            await call.write(step.payload)
            if not step.replies:
                break
            while True:
                raw = await call.read()
                if raw is grpc.aio.EOF:
                    return grpc.StatusCode(await call.code())
                event = types_pb2.ChatEvent.FromString(raw)
                if event.WhichOneof("kind") in ("final", "error"):
                    break
        await call.done_writing()
        while await call.read() is not grpc.aio.EOF:
            pass
        code: grpc.StatusCode = await call.code()
        return code
    except grpc.aio.AioRpcError as err:
        return err.code()
    except asyncio.InvalidStateError:  # the call already ended: its status says how
        return grpc.StatusCode(await call.code())
    finally:
        call.cancel()


async def _status_unwritten(
    channel: grpc.aio.Channel, method: str, metadata: tuple[tuple[str, str | bytes], ...]
) -> grpc.StatusCode:
    """The status of a stream the server refuses before reading it, read without writing
    (writing first races the refusal: grpc/grpc#36066)."""
    call: Any = channel.stream_stream(method)(metadata=metadata, timeout=20)
    try:
        code: grpc.StatusCode = await call.code()
        return code
    finally:
        call.cancel()


async def _unary(
    channel: grpc.aio.Channel,
    method: str,
    payload: bytes,
    metadata: tuple[tuple[str, str | bytes], ...] = (),
) -> grpc.StatusCode:
    try:
        call: Any = channel.unary_unary(method)
        await call(payload, metadata=metadata, timeout=20)
    except grpc.aio.AioRpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def _assert_alive(mesh: Mesh) -> None:
    """Every server still runs and answers a real turn."""
    for proc in mesh.procs:
        assert proc.popen.poll() is None, "".join(proc.stderr)[-2000:]

    async def check() -> None:
        for address in (mesh.router, mesh.agent):
            channel = mesh.client.channel(address)
            health: Any = health_pb2_grpc.HealthStub(channel)
            reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        method = "/mesh.v1.RouterService/Chat"
        steps = [Step(turn_request("still there?").SerializeToString(), True)]
        assert await _bidi(mesh.client.channel(mesh.router), method, steps) == grpc.StatusCode.OK

    mesh.client.run(check())


# -- strategies -----------------------------------------------------------------------

texts = st.text(st.characters(blacklist_categories=["Cs"]), max_size=40)
names = st.one_of(st.sampled_from(["", "a", "front", "nobody"]), texts)
roles = st.integers(min_value=0, max_value=9)
messages = st.builds(
    types_pb2.Message, role=roles, content=texts, agent=names, tool_call_id=texts, name=texts
)
turns = st.builds(
    types_pb2.Turn,
    conversation_id=st.one_of(st.just(""), texts),
    message=st.one_of(st.sampled_from(["hi", "pass it on", " ", ""]), texts),
    history=st.lists(messages, max_size=3),
    context=st.dictionaries(texts, texts, max_size=3),
    agent=names,
    turn_id=texts,
)
consults = st.builds(
    types_pb2.ConsultResult, call_id=texts, agent=names, content=texts, is_error=st.booleans()
)
cancels = st.builds(types_pb2.Cancel, reason=texts)
chat_requests = st.one_of(
    st.builds(types_pb2.ChatRequest, turn=turns),
    st.builds(types_pb2.ChatRequest, consult_result=consults),
    st.builds(types_pb2.ChatRequest, cancel=cancels),
)
handoff_turns = st.builds(
    types_pb2.HandoffTurn,
    conversation_id=texts,
    source_agent=names,
    mode=st.integers(min_value=0, max_value=6),
    reason=texts,
    message=st.one_of(st.just("hi"), texts),
    history=st.lists(messages, max_size=3),
    context=st.dictionaries(texts, texts, max_size=3),
    hop_path=st.lists(names, max_size=4),
    turn_id=texts,
    hops_remaining=st.integers(min_value=0, max_value=2**32 - 1),
)
handoff_requests = st.one_of(
    st.builds(agent_pb2.HandoffRequest, handoff=handoff_turns),
    st.builds(agent_pb2.HandoffRequest, consult_result=consults),
    st.builds(agent_pb2.HandoffRequest, cancel=cancels),
)


def _steps(requests: list[Any]) -> list[Step]:
    """Requests up to the first that gets no answer; a Handoff stream carries one turn
    and then ends, so nothing is written after its first ``handoff``."""
    steps = []
    for request in requests:
        kind = request.WhichOneof("kind")
        replies = kind in ("turn", "handoff")
        steps.append(Step(request.SerializeToString(), replies))
        if not replies or kind == "handoff":
            break
    return steps


# -- well-formed but arbitrary messages -------------------------------------------------


@EXAMPLES
@given(requests=st.lists(chat_requests, min_size=1, max_size=3))
def test_random_chat_requests_end_with_a_defined_status(mesh: Mesh, requests: list[Any]) -> None:
    steps = _steps(requests)
    for address, method in (
        (mesh.router, "/mesh.v1.RouterService/Chat"),
        (mesh.agent, "/mesh.v1.AgentService/Chat"),
    ):
        code = mesh.client.run(_bidi(mesh.client.channel(address), method, steps))
        assert code not in BAD, (method, code, requests)


@EXAMPLES
@given(requests=st.lists(handoff_requests, min_size=1, max_size=2))
def test_random_handoff_requests_end_with_a_defined_status(mesh: Mesh, requests: list[Any]) -> None:
    code = mesh.client.run(
        _bidi(mesh.client.channel(mesh.agent), "/mesh.v1.AgentService/Handoff", _steps(requests))
    )
    assert code not in BAD, (code, requests)


def _header_safe(value: str) -> bool:
    return all(0x20 <= ord(c) <= 0x7E for c in value)


@EXAMPLES
@given(conversation_id=texts.filter(lambda t: t.strip() and not _header_safe(t)))
def test_any_conversation_id_ends_with_a_defined_status(mesh: Mesh, conversation_id: str) -> None:
    steps = [Step(turn_request("hi", conversation_id=conversation_id).SerializeToString(), True)]
    code = mesh.client.run(
        _bidi(mesh.client.channel(mesh.router), "/mesh.v1.RouterService/Chat", steps)
    )
    assert code not in BAD, (code, conversation_id)


def _mutate(data: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    out = bytearray(data)
    for position, value in edits:
        if out:
            out[position % len(out)] = value
    return bytes(out[:cut] if cut is not None else out)


VALID = [
    turn_request("hello there", conversation_id="c1", context={"k": "v"}).SerializeToString(),
    turn_request("pass it on", agent="front").SerializeToString(),
    types_pb2.ChatRequest(
        consult_result=types_pb2.ConsultResult(call_id="x", content="y")
    ).SerializeToString(),
]
edits = st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), min_size=1, max_size=4)
cuts = st.one_of(st.none(), st.integers(0, 60))


@EXAMPLES
@given(base=st.sampled_from(VALID), edits=edits, cut=cuts)
def test_mutated_messages_that_still_parse_end_with_a_defined_status(
    mesh: Mesh, base: bytes, edits: list[tuple[int, int]], cut: int | None
) -> None:
    data = _mutate(base, edits, cut)
    request = types_pb2.ChatRequest()
    try:
        request.ParseFromString(data)
        parsed = True
    except DecodeError:
        parsed = False
    assume(parsed)
    steps = [Step(data, request.WhichOneof("kind") == "turn")]
    for address, method in (
        (mesh.router, "/mesh.v1.RouterService/Chat"),
        (mesh.agent, "/mesh.v1.AgentService/Chat"),
    ):
        code = mesh.client.run(_bidi(mesh.client.channel(address), method, steps))
        assert code not in BAD, (method, code, data)


UNPARSEABLE = st.one_of(
    st.binary(min_size=1, max_size=64),
    st.builds(_mutate, st.sampled_from(VALID), edits, cuts),
)
METHODS = [
    ("router", "/mesh.v1.RouterService/Chat", True),
    ("router", "/mesh.v1.RouterService/ListAgents", False),
    ("router", "/mesh.v1.RouterService/DescribeAgent", False),
    ("router", "/mesh.v1.RouterService/Register", True),
    ("agent", "/mesh.v1.AgentService/Chat", True),
    ("agent", "/mesh.v1.AgentService/Handoff", True),
    ("agent", "/mesh.v1.AgentService/Info", False),
]


def _parses(method: str, data: bytes) -> bool:
    types: dict[str, Any] = {
        "Chat": types_pb2.ChatRequest,
        "Handoff": agent_pb2.HandoffRequest,
        "Info": agent_pb2.InfoRequest,
    }

    types.update(
        ListAgents=router_pb2.ListAgentsRequest,
        DescribeAgent=router_pb2.DescribeAgentRequest,
        Register=router_pb2.RegisterRequest,
    )
    try:
        types[method.rsplit("/", 1)[1]].FromString(data)
    except DecodeError:
        return False
    return True


@EXAMPLES
@given(data=UNPARSEABLE, target=st.sampled_from(METHODS))
def test_undecodable_bytes_end_with_a_defined_status(
    mesh: Mesh, data: bytes, target: tuple[str, str, bool]
) -> None:
    where, method, streaming = target
    assume(not _parses(method, data))
    channel = mesh.client.channel(mesh.router if where == "router" else mesh.agent)
    if streaming:
        code = mesh.client.run(_bidi(channel, method, [Step(data, False)]))
    else:
        code = mesh.client.run(_unary(channel, method, data))
    assert code not in BAD, (method, code, data)


# -- metadata and tokens ----------------------------------------------------------------

header_values = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=80)
header_keys = st.one_of(
    st.sampled_from(
        [
            "x-mesh-hop-path",
            "x-mesh-conversation-id",
            "x-request-id",
            "traceparent",
            "authorization",
            "x-mesh-deadline",
        ]
    ),
    st.from_regex(r"x-[a-z0-9_.-]{1,20}", fullmatch=True),
)
metadata_lists = st.lists(st.tuples(header_keys, header_values), max_size=5)


_AGENT_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")


def _hop_path_refused(metadata: list[tuple[str, str]]) -> bool:
    """Whether the servers' call-context interceptor refuses this hop path header."""
    values = [v for k, v in metadata if k == "x-mesh-hop-path"]
    if not values:
        return False
    path = [p.strip() for p in values[-1].split(",") if p.strip()]
    return len(path) > 100 or not all(_AGENT_NAME.match(p) for p in path)


@EXAMPLES
@given(metadata=metadata_lists, binary=st.binary(max_size=64))
def test_random_metadata_ends_with_a_defined_status(
    mesh: Mesh, metadata: list[tuple[str, str]], binary: bytes
) -> None:
    md: tuple[tuple[str, str | bytes], ...] = (*metadata, ("x-fuzz-bin", binary))
    steps = [Step(turn_request("hi").SerializeToString(), True)]
    refused = _hop_path_refused(metadata)
    for address, method in (
        (mesh.router, "/mesh.v1.RouterService/Chat"),
        (mesh.agent, "/mesh.v1.AgentService/Chat"),
        (mesh.agent, "/mesh.v1.AgentService/Handoff"),
    ):
        channel = mesh.client.channel(address)
        if refused:
            code = mesh.client.run(_status_unwritten(channel, method, md))
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (method, code, metadata)
        else:
            code = mesh.client.run(_bidi(channel, method, steps, md))
            assert code not in BAD, (method, code, metadata)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


jwt_like = st.builds(
    lambda header, claims, sig: ".".join(
        [_b64(json.dumps(header).encode()), _b64(json.dumps(claims).encode()), _b64(sig)]
    ),
    st.fixed_dictionaries(
        {"alg": st.sampled_from(["none", "HS256", "RS256", "ES256", "PS512", ""])},
        optional={"kid": texts, "typ": texts},
    ),
    st.dictionaries(
        st.sampled_from(["iss", "aud", "sub", "exp", "nbf", "iat", "scp", "act"]),
        st.one_of(texts, st.integers(-(2**40), 2**40), st.none()),
    ),
    st.binary(max_size=80),
)
tokens = st.one_of(header_values, jwt_like)


@EXAMPLES
@given(token=tokens, scheme=st.sampled_from(["Bearer ", "bearer ", "Basic ", ""]))
def test_random_tokens_are_unauthenticated(mesh: Mesh, token: str, scheme: str) -> None:
    md: tuple[tuple[str, str | bytes], ...] = (("authorization", scheme + token),)
    for address, method in (
        (mesh.auth_router, "/mesh.v1.RouterService/Chat"),
        (mesh.auth_agent, "/mesh.v1.AgentService/Chat"),
    ):
        code = mesh.client.run(_status_unwritten(mesh.client.channel(address), method, md))
        assert code == grpc.StatusCode.UNAUTHENTICATED, (method, code, token)
    for address, method in (
        (mesh.auth_router, "/mesh.v1.RouterService/ListAgents"),
        (mesh.auth_agent, "/mesh.v1.AgentService/Info"),
    ):
        assert mesh.client.run(_unary(mesh.client.channel(address), method, b"", md)) == (
            grpc.StatusCode.UNAUTHENTICATED
        )


def _decoded(token: str) -> list[bytes]:
    return [base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)) for part in token.split(".")]


@EXAMPLES
@given(position=st.integers(min_value=0), char=st.sampled_from("AbZ09-_"))
def test_mutated_valid_token_is_refused(mesh: Mesh, position: int, char: str) -> None:
    index = position % len(mesh.token)
    assume(mesh.token[index] != ".")
    token = mesh.token[:index] + char + mesh.token[index + 1 :]
    md: tuple[tuple[str, str | bytes], ...] = (("authorization", f"Bearer {token}"),)
    channel = mesh.client.channel(mesh.auth_router)
    if _decoded(token) == _decoded(mesh.token):
        # Only base64 padding bits changed: the same token, still valid.
        steps = [Step(turn_request("hi").SerializeToString(), True)]
        assert mesh.client.run(_bidi(channel, "/mesh.v1.RouterService/Chat", steps, md)) == (
            grpc.StatusCode.OK
        )
    else:
        code = mesh.client.run(_status_unwritten(channel, "/mesh.v1.RouterService/Chat", md))
        assert code == grpc.StatusCode.UNAUTHENTICATED, (code, index)


def test_undecodable_bytes_with_a_valid_token_are_invalid_argument(mesh: Mesh) -> None:
    """With auth on, the auth interceptor wraps each call's handler with its caller's
    identity; the request guard sits inside it and still answers garbage from a
    caller it let in with INVALID_ARGUMENT, on a streaming and a unary method."""
    md: tuple[tuple[str, str | bytes], ...] = (("authorization", f"Bearer {mesh.token}"),)
    channel = mesh.client.channel(mesh.auth_router)
    garbage = b"\x0a\xff\xff\xff"
    steps = [Step(garbage, False)]
    for _ in range(2):  # the guard built for the first call serves the second
        chat = mesh.client.run(_bidi(channel, "/mesh.v1.RouterService/Chat", steps, md))
        assert chat == grpc.StatusCode.INVALID_ARGUMENT
        listed = mesh.client.run(_unary(channel, "/mesh.v1.RouterService/ListAgents", garbage, md))
        assert listed == grpc.StatusCode.INVALID_ARGUMENT
    ok = [Step(turn_request("hi").SerializeToString(), True)]
    assert mesh.client.run(_bidi(channel, "/mesh.v1.RouterService/Chat", ok, md)) == (
        grpc.StatusCode.OK
    )


async def _flood(channel: grpc.aio.Channel, method: str, turns: list[bytes]) -> tuple[int, Any]:
    """Write every turn without reading, then read: (finals seen, the call's status)."""
    call: Any = channel.stream_stream(method)(timeout=60)
    finals = 0
    try:
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
            for turn in turns:
                await call.write(turn)
            await call.done_writing()
        with contextlib.suppress(grpc.aio.AioRpcError):
            while (raw := await call.read()) is not grpc.aio.EOF:
                finals += types_pb2.ChatEvent.FromString(raw).WhichOneof("kind") == "final"
        return finals, await call.code()
    finally:
        call.cancel()


@pytest.mark.parametrize("method", ["/mesh.v1.RouterService/Chat", "/mesh.v1.AgentService/Chat"])
def test_turns_written_ahead_without_reading_are_bounded(mesh: Mesh, method: str) -> None:
    """A client that writes turns and never reads their answers cannot make a server hold
    them all: at most 8 wait behind the one in flight, together at most the server's
    largest message; past that the stream ends RESOURCE_EXHAUSTED (the waiting turns
    still run, in order) and the server goes on serving. Every turn here takes 0.3 s,
    so the rest arrive while the first runs."""
    router = method.startswith("/mesh.v1.Router")
    channel = mesh.client.channel(mesh.router if router else mesh.slow)
    agent = "slow" if router else ""
    small = [turn_request(f"hi {n}", agent=agent).SerializeToString() for n in range(40)]
    finals, code = mesh.client.run(_flood(channel, method, small))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and 8 <= finals <= 9, (code, finals)
    third = "x" * (MAX_MESSAGE // 3)
    big = [turn_request(third + str(n), agent=agent).SerializeToString() for n in range(8)]
    finals, code = mesh.client.run(_flood(channel, method, big))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and 2 <= finals <= 3, (code, finals)
    _assert_alive(mesh)


def test_a_long_unknown_name_is_not_found_not_echoed(mesh: Mesh) -> None:
    """The router's NOT_FOUND quotes the name bounded: echoed whole, a 10,000-character
    name made the status details overflow the client's metadata limit."""

    channel = mesh.client.channel(mesh.router)

    async def describe() -> grpc.aio.AioRpcError:
        call: Any = channel.unary_unary("/mesh.v1.RouterService/DescribeAgent")
        request = router_pb2.DescribeAgentRequest(name="x" * 10_000)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(request.SerializeToString(), timeout=20)
        return caught.value

    err = mesh.client.run(describe())
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert len(err.details() or "") < 200


def test_servers_stay_up(mesh: Mesh) -> None:
    """Runs after the property tests of this module (file order)."""
    _assert_alive(mesh)
    for proc in mesh.procs:
        assert proc.popen.poll() is None


# -- oversized --------------------------------------------------------------------------


def test_oversized_message_refused_and_channel_still_works(mesh: Mesh) -> None:
    big = [Step(turn_request("x" * (MAX_MESSAGE + 1024)).SerializeToString(), True)]
    small = [Step(turn_request("hi").SerializeToString(), True)]
    for address, method in (
        (mesh.router, "/mesh.v1.RouterService/Chat"),
        (mesh.agent, "/mesh.v1.AgentService/Chat"),
    ):
        channel = mesh.client.channel(address)
        assert mesh.client.run(_bidi(channel, method, big)) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert mesh.client.run(_bidi(channel, method, small)) == grpc.StatusCode.OK


def test_oversized_metadata_refused_and_channel_still_works(mesh: Mesh) -> None:
    huge: tuple[tuple[str, str | bytes], ...] = (("x-big", "y" * 20000),)
    small = [Step(turn_request("hi").SerializeToString(), True)]
    for address, method in (
        (mesh.router, "/mesh.v1.RouterService/Chat"),
        (mesh.agent, "/mesh.v1.AgentService/Chat"),
    ):
        channel = mesh.client.channel(address)
        refused = mesh.client.run(_bidi(channel, method, small, huge))
        assert refused == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert mesh.client.run(_bidi(channel, method, small)) == grpc.StatusCode.OK


def test_metadata_over_the_configured_limit_always_refused(mesh: Mesh) -> None:
    over: tuple[tuple[str, str | bytes], ...] = (("x-big", "y" * (2 * MAX_METADATA)),)
    small = [Step(turn_request("hi").SerializeToString(), True)]
    channel = mesh.client.channel(mesh.agent)
    codes = [
        mesh.client.run(_bidi(channel, "/mesh.v1.AgentService/Chat", small, over))
        for _ in range(10)
    ]
    assert codes == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 10, codes
