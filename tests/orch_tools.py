"""Tools and an evaluation function for the orchestration tests (imported by the
in-process agents as ``tests.orch_tools:...``; what ran is recorded here)."""

from __future__ import annotations

import asyncio

RAN: list[str] = []
"""Invoice ids ``issue_refund`` actually ran for, in order."""


async def issue_refund(invoice_id: str) -> str:
    """Issue a refund for an invoice (needs the user's approval).

    Args:
        invoice_id: The invoice number.
    """
    await asyncio.sleep(0)
    RAN.append(invoice_id)
    return f"refunded {invoice_id}"


def length_score(answer: str, request: str, criteria: str) -> tuple[float, str]:
    """Scores drafts by their number: Draft 1 is weak, Draft 2 and later pass."""
    if answer.startswith("Draft 1"):
        return 0.5, f"too thin for {request!r} ({criteria})"
    return 1.0, "good"
