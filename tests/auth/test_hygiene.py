"""Log scrubbing against split tokens and tracebacks, the STS's broken connections, and one
dev certificate per service (issue 12, items 7 and 10)."""

from __future__ import annotations

import asyncio
import io
import logging
import socket
import ssl
import sys
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from mesh.auth.interceptors import channel_credentials, server_credentials, server_interceptors
from mesh.auth.sts import TokenService, mint_user_token
from mesh.config import MeshConfig
from mesh.logs import ScrubFilter, ScrubFormatter
from tests.auth.conftest import (
    CAPTURE,
    bearer,
    mesh_dict,
    seen,
    serve,
    with_auth,
)
from tests.auth.test_cli import _write_config, sts_process

GRPCURL = str(Path(sys.executable).with_name("grpcurl"))
PROTOS = Path(__file__).resolve().parents[2] / "protos"


def _pieces(token: str) -> list[str]:
    """Every 16-character slice of the token's payload and signature."""
    _, payload, signature = token.split(".")
    return [part[i : i + 16] for part in (payload, signature) for i in range(0, len(part) - 16, 8)]


async def _grpcurl(addr: str, *headers: bytes) -> int:
    # The contract from the .proto files, not from reflection: the bad headers must reach
    # the Info call itself (the call-context interceptor refuses them on reflection too).
    args: list[str | bytes] = [GRPCURL, "-plaintext", "-max-time", "10"]
    args += ["-import-path", str(PROTOS), "-proto", "mesh/v1/agent.proto"]
    for header in headers:
        args += ["-H", header]
    proc = await asyncio.create_subprocess_exec(
        *args,
        "-d",
        "{}",
        addr,
        "mesh.v1.AgentService/Info",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    await asyncio.wait_for(proc.communicate(), timeout=30)
    return proc.returncode or 0


async def test_a_token_split_by_a_non_utf8_byte_never_reaches_the_log(
    config: MeshConfig, sts: TokenService
) -> None:
    """grpcurl sends a valid token cut by 0xE9, in authorization and in the hop-path
    header; grpc and the audit line both see it, neither writes any piece of it."""
    cfg = with_auth(config, allow_unauthenticated_reflection=True)
    token = mint_user_token(cfg, "alice")
    head, payload, signature = token.split(".")
    split = f"{head}.{payload[:40]}".encode() + b"\xe9" + f"{payload[40:]}.{signature}".encode()
    start = len(CAPTURE.lines)
    async with serve(server_interceptors(cfg, "router")) as addr:
        assert await _grpcurl(addr, b"authorization: Bearer " + split) != 0
        hop = b"x-mesh-hop-path: triage," + split
        assert await _grpcurl(addr, hop, b"authorization: Bearer not-a-token") != 0
        assert await _grpcurl(addr, b"x-mesh-hop-path: triage," + token.encode()) != 0
        assert (await seen(addr, bearer(token))).subject == "alice"  # still up
    lines = CAPTURE.lines[start:]
    assert any("invalid metadata encoding" in line for line in lines)  # grpc saw it
    assert any('"hop_path":["triage","[withheld]"]' in line for line in lines)  # audit too
    leaks = [piece for piece in _pieces(token) for line in lines if piece in line]
    assert not leaks


def test_the_scrub_covers_tracebacks_pieces_and_stacks() -> None:
    token = "eyJhbGciOiJSUzI1NiJ9." + "eyJzdWIiOiJhbGljZSJ9" * 4 + "." + "s1gnature_" * 30
    head, payload, signature = token.split(".")
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(ScrubFormatter("%(levelname)s %(message)s"))
    handler.addFilter(ScrubFilter())
    logger = logging.getLogger("tests.scrub")
    logger.propagate = False  # the suite-wide leak check must not see the bait
    logger.addHandler(handler)
    try:
        try:
            raise ValueError(f"bad token {token}")
        except ValueError:
            logger.exception("failed for %s", f"{payload[:30]}\xe9{payload[30:]}.{signature}")
        logger.warning("header only %s", f"{head}.{payload[:10]}", stack_info=True)
        logger.info("Authorization: Bearer %s", "opaque-secret-value-1234")
    finally:
        logger.removeHandler(handler)
    text = out.getvalue()
    assert "Traceback" in text  # the traceback is kept, scrubbed
    for piece in [*_pieces(token), "opaque-secret-value"]:
        assert piece not in text, piece


async def test_sts_broken_connections_print_no_traceback(tmp_path: Path) -> None:
    file = _write_config(tmp_path / "mesh.yaml", mesh_dict(tmp_path / "data"))
    async with sts_process(file) as sts:
        ca = tmp_path / "data" / "sts" / "tls" / "ca.pem"
        await asyncio.to_thread(_hang_up_mid_request, sts.port, ca)
        await asyncio.to_thread(_hang_up_mid_request, sts.port, ca)
    assert sts.code == 0
    assert "Traceback" not in sts.err and "client_secret" not in sts.err


def _hang_up_mid_request(port: int, ca: Path) -> None:
    """A token request cut off mid-body, with a reset instead of a clean close."""
    context = ssl.create_default_context(cafile=str(ca))
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    tls = context.wrap_socket(raw, server_hostname="127.0.0.1")
    tls.sendall(
        b"POST /mesh/oauth2/v2.0/token HTTP/1.1\r\nHost: x\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 5000\r\n\r\n"
        b"grant_type=client_credentials&client_secret=abc"
    )
    tls.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    tls.close()


@pytest.mark.parametrize("client_auth", [False, True])
async def test_one_dev_certificate_per_service(
    config: MeshConfig, sts: TokenService, client_auth: bool
) -> None:
    cfg = config.model_copy(
        update={
            "auth": config.auth.model_copy(
                update={
                    "tls": config.auth.tls.model_copy(
                        update={"enabled": True, "client_auth": client_auth}
                    )
                }
            )
        }
    )
    tls_dir = Path(cfg.data_dir) / "sts" / "tls"
    server_creds, creds = server_credentials(cfg, "b"), channel_credentials(cfg, "router")
    assert server_creds is not None and creds is not None
    async with serve([], credentials=server_creds) as addr:  # TLS only, no token checks
        names = {}
        for name in ("b", "router", "sts"):
            cert = x509.load_pem_x509_certificate((tls_dir / f"{name}.pem").read_bytes())
            names[name] = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            assert name in san.get_values_for_type(x509.DNSName)
        assert names == {"b": "mesh b", "router": "mesh router", "sts": "mesh sts"}
        for target, ok in (("b", True), ("router", False), ("sts", False)):
            options = [("grpc.ssl_target_name_override", target)]
            try:
                got = await seen(addr, credentials=creds, options=options)
                assert not got.authenticated  # this server checks no tokens
                outcome = "served"
            except grpc.aio.AioRpcError as err:
                outcome = err.code().name
            assert outcome == ("served" if ok else "UNAVAILABLE"), target
