"""The log scrub (mesh.logs): dotted names (module paths, qualified function names, as the
a2a-sdk's DEBUG tracing writes them) pass as they are; tokens are caught whole, in pieces,
split across lines, inside JSON, and when their segments look like identifiers."""

from __future__ import annotations

import io
import json
import logging
import pkgutil
import secrets
from collections.abc import Iterator

import a2a
import pytest
from a2a.utils.telemetry import trace_class, trace_function
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from mesh.auth.jwt import sign
from mesh.logs import ScrubFilter, ScrubFormatter, safe_text, scrub
from mesh.telemetry import JsonFormatter

IDENTIFIER_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")


def _pem(alg: str) -> str:
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey = (
        ec.generate_private_key(ec.SECP256R1())
        if alg == "ES256"
        else rsa.generate_private_key(public_exponent=65537, key_size=2048)
    )
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def _token(pem: str, alg: str, **claims: object) -> str:
    base = {
        "iss": "https://127.0.0.1:8443/mesh",
        "aud": "mesh-agent-billing",
        "sub": "alice",
        "exp": 1_900_000_000,
        "scp": "chat",
        "jti": secrets.token_urlsafe(16),
    }
    return sign({**base, **claims}, pem, kid=secrets.token_urlsafe(12), alg=alg)


@pytest.fixture(scope="module")
def tokens() -> list[str]:
    """Real compact JWS of the algorithms the mesh signs with."""
    return [_token(_pem(alg), alg) for alg in ("ES256", "RS256") for _ in range(3)]


@pytest.fixture(scope="module")
def identifier_looking_token() -> str:
    """A real ES256 token each of whose segments is a valid Python identifier (no '-',
    no leading digit): the shape of a dotted name, which must still be caught."""
    pem = _pem("ES256")
    for n in range(400):
        token = _token(pem, "ES256", n=n)
        if all(set(part) <= IDENTIFIER_CHARS and part[0].isalpha() for part in token.split(".")):
            return token
    raise AssertionError("no identifier-shaped token in 400 signatures")


def _pieces(token: str) -> list[str]:
    """Every 16-character slice of the token's payload and signature (8 apart)."""
    _, payload, signature = token.split(".")
    return [p[i : i + 16] for p in (payload, signature) for i in range(0, len(p) - 15, 8)]


def _leaks(token: str, text: str) -> list[str]:
    return [piece for piece in _pieces(token) if piece in text]


# -- names pass ------------------------------------------------------------------------


@pytest.fixture
def debug_log() -> Iterator[io.StringIO]:
    """The a2a-sdk's tracing logger at DEBUG through the mesh's scrubbing handler."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(ScrubFormatter("%(levelname)s %(name)s %(message)s"))
    handler.addFilter(ScrubFilter())
    logger = logging.getLogger("a2a.utils.telemetry")
    old_level, old_propagate = logger.level, logger.propagate
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    logger.addHandler(handler)
    try:
        yield out
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        logger.propagate = old_propagate


class DefaultRequestHandlerForScrubbing:
    """A class with the long qualified method names the a2a-sdk traces."""

    async def on_message_send_stream_with_push_notification_config(self) -> None:
        return None

    def _check_jsonrpc_response_and_raise(self) -> None:
        return None


def test_a2a_sdk_debug_tracing_lines_pass_unredacted(debug_log: io.StringIO) -> None:
    """The SDK's own tracer writes its DEBUG lines ('Start tracing for <module>.<Class>.
    <method>', ...) as it decorates; the scrub leaves every one of them as it is."""
    traced = trace_class()(DefaultRequestHandlerForScrubbing)

    def build_request_context_from_message_params() -> None:
        return None

    trace_function(build_request_context_from_message_params)
    lines = debug_log.getvalue().splitlines()
    qualified = f"{__name__}.DefaultRequestHandlerForScrubbing"
    assert any(f"{qualified}.on_message_send_stream_with_push" in line for line in lines), lines
    assert any(f"{qualified}._check_jsonrpc_response_and_raise" in line for line in lines)
    assert any(f"{__name__}.build_request_context_from_message_params" in line for line in lines)
    assert traced is DefaultRequestHandlerForScrubbing
    assert not [line for line in lines if "[redacted]" in line]


def test_module_paths_and_qualified_names_pass() -> None:
    """Every module of the a2a-sdk, and names of the shapes the SDK and the mesh log."""
    modules = [m.name for m in pkgutil.walk_packages(a2a.__path__, "a2a.")]
    assert len(modules) > 50
    names = [
        *modules,
        "a.b.c_d",
        "a2a.compat.v0_3.a2a_v0_3_pb2_grpc.A2AServiceServicer.SendStreamingMessage",
        "a2a.server.request_handlers.default_request_handler.DefaultRequestHandler"
        ".on_message_send_stream",
        "a2a.client.transports.jsonrpc.JsonRpcTransport._check_jsonrpc_response",
        "mcp.client.auth.extensions.client_credentials.PrivateKeyJWTOAuthProvider",
        "mesh.router._servicer.RouterServicer.DescribeAgent",
        "grpc._cython.cygrpc.AioServer._serve_forever_with_cancellation",
        "google.genai._api_client.BaseApiClient._request_streamed_unauthenticated",
        "anthropic.types.beta.beta_managed_agents_self_hosted_resources_unsupported"
        "_deployment_paused_reason_error_object",
        "generativelanguage.googleapis.com",
    ]
    changed = [name for name in names if scrub(name) != name]
    assert not changed
    line = f"DEBUG Start tracing for {names[3]}, is_async_func True"
    assert scrub(line) == line
    assert safe_text("default_request_handler.DefaultRequestHandler", 128) != "[withheld]"


# -- tokens are caught -----------------------------------------------------------------


def test_whole_tokens_in_text_json_and_quotes(tokens: list[str]) -> None:
    for token in tokens:
        for text in (
            f"calling with {token} now",
            json.dumps({"access_token": token, "token_type": "Bearer"}),
            f"token='{token}'",
            f'header "{token}"',
            f"x-mesh-hop-path: triage,{token}",
        ):
            cleaned = scrub(text)
            assert "[redacted]" in cleaned and not _leaks(token, cleaned), text[:40]


def test_tokens_split_across_lines_or_by_a_bad_byte(tokens: list[str]) -> None:
    """Cut once anywhere (a line break, JSON's escaped one, a byte that is not UTF-8 as
    decoded or as safe_text shows it): no 16-character piece of it survives."""
    for token in tokens:
        for cut in ("\n", "\\n", '"\n"', "\xe9", "?"):
            for at in range(1, len(token), 7):
                text = f"failed for {token[:at]}{cut}{token[at:]} in handler"
                assert not _leaks(token, scrub(text)), (cut, at)


def test_token_pieces_without_the_header(tokens: list[str]) -> None:
    for token in tokens:
        _, payload, signature = token.split(".")
        for start in range(0, len(payload) - 16, 5):
            text = f"bad value {payload[start:]}.{signature}"
            assert not _leaks(token, scrub(text)), start
        assert not _leaks(token, scrub(f"signature {signature}"))


def test_a_jwt_whose_segments_look_like_identifiers(identifier_looking_token: str) -> None:
    """Dotted like a module path, each part a valid Python name: still a token."""
    token = identifier_looking_token
    assert all(part.isidentifier() for part in token.split("."))
    for text in (token, f"Start tracing for {token}", json.dumps({"t": token})):
        assert not _leaks(token, scrub(text))
    _, payload, signature = token.split(".")
    assert not _leaks(token, scrub(f"{payload}.{signature}"))
    for at in range(1, len(token), 5):
        assert not _leaks(token, scrub(f"{token[:at]}\n{token[at:]}")), at
    assert safe_text(token, 4096) == "[withheld]"


def test_the_wordy_tail_of_a_cut_signature() -> None:
    """Found by a full run: a signature cut by a line break whose 31-character tail
    reads like a CamelCase name (7 "words"). Beside a redacted piece, capitals need
    long words with vowels; real names there still pass."""
    head = "hWz59zE_glADO7J7DUozI7i7Vg8zucLHBPcRpPrtaodiH0dj3baS64O"
    tail = "ZdzbmpIikdwlxsGIjPEIORpfjSJHZKA"
    assert scrub(f"{head}\n{tail}") == "[redacted]\n[redacted]"
    assert scrub(f"{head}\nDefaultRequestHandler") == "[redacted]\nDefaultRequestHandler"


def test_bearer_values_and_secrets() -> None:
    secret = secrets.token_urlsafe(32)  # a dev client secret's shape
    for text, hidden in (
        ("Authorization: Bearer opaque-secret-value-1234", "opaque-secret-value"),
        ("authorization: bearer abc.def.ghi_jkl", "abc.def.ghi_jkl"),
        (f"client_secret={secret}", secret),
        (json.dumps({"client_secret": secret}), secret),
    ):
        assert hidden not in scrub(text), text


def test_the_mesh_handlers_scrub_tokens_and_keep_names(tokens: list[str]) -> None:
    """Through both of the mesh's formatters (text and JSON), traceback included."""
    token = tokens[0]
    name = "a2a.server.request_handlers.default_request_handler.DefaultRequestHandler"
    for formatter in (ScrubFormatter("%(levelname)s %(name)s %(message)s"), JsonFormatter()):
        out = io.StringIO()
        handler = logging.StreamHandler(out)
        handler.setFormatter(formatter)
        handler.addFilter(ScrubFilter())
        logger = logging.getLogger("tests.scrub.handlers")
        logger.propagate = False  # the suite-wide leak check must not see the bait
        logger.addHandler(handler)
        try:
            try:
                raise ValueError(f"bad token {token}")
            except ValueError:
                logger.exception("in %s for %s", name, token[:50] + "\n" + token[50:])
        finally:
            logger.removeHandler(handler)
        text = out.getvalue()
        assert name in text and "Traceback" in text and "ValueError" in text
        assert not _leaks(token, text)
