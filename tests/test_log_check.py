"""The suite-wide log check itself must be able to fail."""

from tests.conftest import leaked


def test_leak_detector_finds_tokens_and_scrubbed_lines() -> None:
    token = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlLXNpZ25hdHVyZQ"
    lines = [f"INFO calling with {token}", "INFO Bearer [redacted]", "INFO all fine"]
    assert leaked(lines) == lines[:2]
