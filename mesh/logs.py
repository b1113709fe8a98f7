"""Logging for every service: one line per record on stderr, tokens scrubbed.

Nothing should ever log a token: values a caller controls are bounded and sanitized
before they are logged (:func:`safe_text`), and grpc's own "Invalid encoding" record,
which quotes a raw metadata value, is rewritten at its logger. The scrub here is the
second line of defence: every record our handler emits, traceback and stack included,
has anything shaped like a JWT, a piece of one, or a bearer credential replaced.
Dotted names (module paths, qualified function names) are told from pieces of tokens by
their word structure, and kept.
"""

from __future__ import annotations

import itertools
import logging
import os
import re

#: A JWT from its header on, however it was cut (``eyJ`` is ``{"`` in base64url), where
#: a word starts, also after an escaped line break (not the ``eyJ`` inside
#: ``PrivateKeyJWT``; a piece cut out of a token's middle is caught as a run, below).
_JWT = re.compile(r"(?:(?<![A-Za-z0-9_-])|(?<=\\[nrt]))eyJ[A-Za-z0-9_-]{4,}(?:\.[A-Za-z0-9_-]*)*")
#: A run of base64url characters, with any dotted continuation: a module path, a
#: qualified name, or a token (or a piece of one). :func:`_token_like` tells which.
_RUN = re.compile(r"(?<![A-Za-z0-9_-])(?=[A-Za-z0-9_.-]{16})[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*")
#: What may stand between two pieces of one token that something cut: a byte that is
#: not UTF-8 (as decoded or as ``safe_text`` shows it), a line break (also as JSON's
#: ``\n``), quotes; not a space, which in a log line separates words.
_CUT = r"(?:[^A-Za-z0-9_.\-\[\] \t]|\\n){1,4}"
_BESIDE = re.compile(
    rf"(?<=\[redacted\]){_CUT}(?P<after>[A-Za-z0-9_-]{{8,}})"
    rf"|(?<![A-Za-z0-9_.-])(?P<before>[A-Za-z0-9_-]{{8,}}){_CUT}(?=\[redacted\])"
)
_BEARER = re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=\\-]{8,}")
_UNSAFE = re.compile(r"[^\x20-\x7e]")
#: Words of an identifier: ``CamelCase`` humps, ``ALLCAPS`` runs, lower-case words, numbers.
_WORD = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|[0-9]+")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_VOWELS = frozenset("aeiouy")
#: grpc's loggers that quote raw metadata values.
GRPC_LOGGERS = ("grpc._cython.cygrpc",)


def _words_per_char(segment: str) -> float:
    """Identifiers are made of words (about one per 5-7 characters); random base64url
    breaks into a "word" every other character."""
    alnum = sum(c.isalnum() for c in segment)
    return len(_WORD.findall(segment)) / max(alnum, 1)


def _identifier(segment: str, *, beside_token: bool = False) -> bool:
    """A name a program would log (``default_request_handler``, ``JsonRpcTransport``,
    ``a2a_v0_3_pb2_grpc``), not a piece of a token.

    ``beside_token``: the piece stands right beside a redacted token across a cut. The
    rest of a cut token looks like a name far more often than a free-standing run does
    (one cut signature tail in a few hundred passes the plain test), so capitals then
    need long words, each with a vowel, as real names have."""
    if not _IDENTIFIER.fullmatch(segment):
        return False  # a leading digit or a '-': base64url, not a Python name
    if len(segment) >= 80:
        return _words_per_char(segment) < 0.25  # only long words make a name this long
    if not any(c.isupper() for c in segment):
        return True  # snake_case; random base64url of 16+ characters has capitals
    if not beside_token:
        return _words_per_char(segment) < 0.3
    return _words_per_char(segment) < 0.25 and all(
        set(word.lower()) & _VOWELS
        for word in _WORD.findall(segment)
        if len(word) >= 4 and not word.isupper()
    )


def _random(segment: str) -> bool:
    """Mixed-case letters and digits in no word structure: key or signature material."""
    return (
        not _identifier(segment)
        and any(c.isupper() for c in segment)
        and any(c.islower() for c in segment)
        and any(c.isdigit() for c in segment)
    )


def _token_like(run: str) -> bool:
    """A dotted run is (part of) a token unless its long parts are all identifiers."""
    parts = run.split(".")
    if any(len(part) >= 80 and not _identifier(part) for part in parts):
        return True
    for left, right in itertools.pairwise(parts):
        if len(left) >= 16 and len(right) >= 16 and not (_identifier(left) and _identifier(right)):
            return True  # two long base64url pieces joined by a dot
    return any(len(part) >= 24 and _random(part) for part in parts)


def _redact_run(match: re.Match[str]) -> str:
    return "[redacted]" if _token_like(match.group()) else match.group()


def _redact_beside(match: re.Match[str]) -> str:
    """The rest of a token that a cut left next to a redacted piece."""
    piece = match.group("after") or match.group("before")
    if _identifier(piece, beside_token=True):
        return match.group()
    start, end = match.span("after" if match.group("after") else "before")
    offset = match.start()
    whole = match.group()
    return whole[: start - offset] + "[redacted]" + whole[end - offset :]


def scrub(text: str) -> str:
    """Replace token-shaped strings (whole or in pieces) with ``[redacted]``; dotted
    names (module paths, qualified function names) are left as they are."""
    text = _BEARER.sub(r"\1[redacted]", text)
    text = _RUN.sub(_redact_run, _JWT.sub("[redacted]", text))
    return _BESIDE.sub(_redact_beside, text) if "[redacted]" in text else text


def safe_text(value: object, limit: int = 64) -> str:
    """A caller-controlled value fit for a log line: printable ASCII only (others become
    ``?``), at most ``limit`` characters, and no token or piece of one."""
    text = _UNSAFE.sub("?", str(value))
    if len(text) > limit:
        text = text[:limit] + "..."
    cleaned = scrub(text)
    return "[withheld]" if cleaned != text else text


class ScrubFilter(logging.Filter):
    """Scrubs a record's message and its traceback text in place."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken record is logged as such, not raised
            message = f"unformattable record from {record.name}"
        cleaned = scrub(message)
        if cleaned != message or record.args:
            record.msg, record.args = cleaned, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = scrub(record.exc_text)
        if record.stack_info:
            record.stack_info = scrub(record.stack_info)
        return True


class ScrubFormatter(logging.Formatter):
    """Scrubs the whole formatted line (message, traceback and stack)."""

    def format(self, record: logging.LogRecord) -> str:
        return scrub(super().format(record))


class _GrpcMetadataFilter(logging.Filter):
    """grpc logs ``Invalid encoding on b'<raw metadata value>'`` with a traceback when a
    caller sends bytes that are not UTF-8: keep the event, drop the value."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and "encoding" in record.msg.lower():
            record.msg, record.args = (
                "invalid metadata encoding from a caller (value withheld)",
                None,
            )
            record.exc_info, record.exc_text, record.levelno = None, None, logging.INFO
            record.levelname = "INFO"
            return True
        return True


_GRPC_FILTER = _GrpcMetadataFilter()


def guard_library_loggers() -> None:
    """Install the filters on library loggers that may quote caller data (idempotent)."""
    for name in GRPC_LOGGERS:
        logger = logging.getLogger(name)
        if _GRPC_FILTER not in logger.filters:
            logger.addFilter(_GRPC_FILTER)


def setup_logging(level: str | None = None) -> None:
    """Configure the root logger once (level from ``MESH_LOG_LEVEL``, default INFO)."""
    guard_library_loggers()
    root = logging.getLogger()
    if any(getattr(h, "_mesh", False) for h in root.handlers):
        return
    handler = logging.StreamHandler()
    handler.setFormatter(ScrubFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    if os.environ.get("MESH_LOG_FORMAT", "text").strip().lower() == "json":
        from mesh.telemetry import JsonFormatter  # one JSON object per line, with trace ids

        handler.setFormatter(JsonFormatter())
    handler.addFilter(ScrubFilter())
    handler._mesh = True  # type: ignore[attr-defined]  # marks our handler as installed
    root.addHandler(handler)
    root.setLevel((level or os.environ.get("MESH_LOG_LEVEL", "INFO")).upper())
    # One line per HTTP request to the identity provider is noise at INFO.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # a2a-sdk's tracer logs a DEBUG line per traced function as it is defined (about 200
    # at import) and per call: noise at DEBUG, where an operator reads the mesh's own
    # lines. Its warnings and errors still show. (The scrub passes its dotted names.)
    logging.getLogger("a2a.utils.telemetry").setLevel(logging.INFO)
