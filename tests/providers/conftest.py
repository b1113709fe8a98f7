"""Fixtures for the provider tests: a stub HTTP server per test, and event helpers."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from .stubserver import StubServer


@pytest.fixture
async def stub() -> AsyncIterator[StubServer]:
    async with StubServer() as server:
        yield server
