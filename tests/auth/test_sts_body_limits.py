"""The token service's body limits, against a real ``mesh sts`` over HTTPS on loopback: a
client that sends a body that is too large reads the 413 (it is not cut off by a
reset), a malformed length gets one clear line, and the server keeps serving."""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import ssl
import urllib.parse
from pathlib import Path
from typing import Any

import pytest

from mesh.auth import sts_http
from mesh.auth.sts import TokenService
from mesh.config import MeshConfig
from tests.auth.conftest import ROUTER_SECRET, ROUTER_SECRET_ENV, mesh_dict
from tests.auth.test_cli import _write_config, sts_process

TOKEN_PATH = "/mesh/oauth2/v2.0/token"
FORM = "application/x-www-form-urlencoded"


def _post(port: int, ca: Path, body: bytes) -> tuple[int, dict[str, Any], str | None]:
    """One POST with http.client on a new connection, the whole body sent: the status,
    the JSON answer and the Connection header."""
    context = ssl.create_default_context(cafile=str(ca))
    conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=30, context=context)
    try:
        conn.request("POST", TOKEN_PATH, body=body, headers={"Content-Type": FORM})
        response = conn.getresponse()
        return response.status, json.loads(response.read()), response.getheader("Connection")
    finally:
        conn.close()


def _raw(port: int, ca: Path, head: bytes) -> bytes:
    """Request headers written as given (http.client refuses bad ones); everything the
    server answers until it closes the connection."""
    context = ssl.create_default_context(cafile=str(ca))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=30) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        tls.sendall(head)
        received = b""
        while chunk := tls.recv(65536):
            received += chunk
        return received


def _answer(received: bytes) -> tuple[int, dict[str, Any]]:
    head, _, body = received.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)


def _token_request(config: MeshConfig) -> bytes:
    """The router's client-credentials request (its secret is in the environment of the
    ``mesh sts`` started after ``monkeypatch.setenv``)."""
    form = {"grant_type": "client_credentials", "client_id": config.auth.client_id_for("router")}
    form["client_secret"] = ROUTER_SECRET
    return urllib.parse.urlencode(form).encode()


def _head(*headers: str) -> bytes:
    lines = [f"POST {TOKEN_PATH} HTTP/1.1", "Host: 127.0.0.1", f"Content-Type: {FORM}", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def test_a_body_too_large_is_answered_413_and_the_server_keeps_serving(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, config: MeshConfig
) -> None:
    monkeypatch.setenv(ROUTER_SECRET_ENV, ROUTER_SECRET)  # the token service's environment
    file = _write_config(tmp_path / "mesh.yaml", mesh_dict(tmp_path / "data"))
    async with sts_process(file) as sts:
        ca = tmp_path / "data" / "sts" / "tls" / "ca.pem"
        big = b"grant_type=client_credentials&pad=" + b"x" * (2 * 1024 * 1024)
        for _ in range(2):  # a second time too: the first one left nothing behind
            status, answer, connection = await asyncio.to_thread(_post, sts.port, ca, big)
            assert status == 413
            assert answer == {"error": "invalid_request", "error_description": "body too large"}
            assert connection == "close"
        status, answer, _ = await asyncio.to_thread(_post, sts.port, ca, _token_request(config))
        assert status == 200 and answer["token_type"] == "Bearer" and answer["access_token"]
    assert sts.code == 0
    assert "Traceback" not in sts.err and "pad=" not in sts.err


#: Request headers that frame a body badly, and the answer each gets.
BAD_FRAMING = [
    ("Content-Length: 1000000000000", 413, "body too large"),
    ("Content-Length: 99999999999999999999999999999999", 413, "body too large"),
    ("Content-Length: -5", 400, "invalid Content-Length"),
    ("Content-Length: 12abc", 400, "invalid Content-Length"),
    ("Content-Length: 5_0", 400, "invalid Content-Length"),
    ("Content-Length: 5\r\nContent-Length: 6", 400, "invalid Content-Length"),
    ("Transfer-Encoding: chunked", 411, "send the body with a Content-Length"),
    # Told before it sends the body: no "100 Continue" first (_answer reads the first).
    ("Content-Length: 2097152\r\nExpect: 100-continue", 413, "body too large"),
]


async def test_a_bad_length_is_one_clear_answer_and_the_server_keeps_serving(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, config: MeshConfig
) -> None:
    monkeypatch.setenv(ROUTER_SECRET_ENV, ROUTER_SECRET)
    file = _write_config(tmp_path / "mesh.yaml", mesh_dict(tmp_path / "data"))
    async with sts_process(file) as sts:
        ca = tmp_path / "data" / "sts" / "tls" / "ca.pem"
        for header, status, description in BAD_FRAMING:
            received = await asyncio.to_thread(_raw, sts.port, ca, _head(header))
            error = {"error": "invalid_request", "error_description": description}
            assert _answer(received) == (status, error), header
            assert b"\r\nConnection: close\r\n" in received, header
        ok, answer, _ = await asyncio.to_thread(_post, sts.port, ca, _token_request(config))
        assert ok == 200 and answer["access_token"]
    assert sts.code == 0
    assert "Traceback" not in sts.err


async def test_a_post_elsewhere_reads_its_body_and_the_connection_still_serves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, config: MeshConfig
) -> None:
    """A 404 for a POST with a body, then a token request on the same connection: the
    body was read, not taken for the next request."""
    monkeypatch.setenv(ROUTER_SECRET_ENV, ROUTER_SECRET)
    file = _write_config(tmp_path / "mesh.yaml", mesh_dict(tmp_path / "data"))
    async with sts_process(file) as sts:
        ca = tmp_path / "data" / "sts" / "tls" / "ca.pem"
        assert await asyncio.to_thread(_two_on_one_connection, sts.port, ca, config) == [404, 200]
    assert sts.code == 0


def _two_on_one_connection(port: int, ca: Path, config: MeshConfig) -> list[int]:
    context = ssl.create_default_context(cafile=str(ca))
    conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=30, context=context)
    statuses = []
    try:
        for path, body in (("/elsewhere", b"GET /x HTTP/1.1\r\n\r\n"), (TOKEN_PATH, None)):
            conn.request(
                "POST", path, body=body or _token_request(config), headers={"Content-Type": FORM}
            )
            response = conn.getresponse()
            response.read()
            statuses.append(response.status)
            assert response.getheader("Connection") != "close"
        return statuses
    finally:
        conn.close()


@pytest.mark.parametrize(
    ("length", "status", "description"),
    [
        (100, 408, "the body took more than 0.5 s"),
        (200_000, 413, "body too large"),  # dropped until the time ran out: 413 anyway
    ],
)
async def test_a_body_that_stops_arriving_is_answered_within_the_time_bound(
    sts: TokenService,
    monkeypatch: pytest.MonkeyPatch,
    length: int,
    status: int,
    description: str,
) -> None:
    """The embedded service in this process, its body time bound shortened: a client that
    sends part of its body and then nothing (connection open) gets an answer, and the
    connection is closed; the thread is not held."""
    monkeypatch.setattr(sts_http, "_BODY_SECONDS", 0.5)
    head = _head(f"Content-Length: {length}") + b"grant_type=client_credentials"
    received = await asyncio.to_thread(_raw, sts.port, sts.ca_file, head)
    assert _answer(received) == (
        status,
        {"error": "invalid_request", "error_description": description},
    )
