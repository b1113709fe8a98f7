"""Billing tools (demo data; a real deployment calls its billing system here)."""

from __future__ import annotations

import asyncio

_INVOICES = {
    "INV-1001": {"amount": "42.00", "currency": "EUR", "status": "paid"},
    "INV-1002": {"amount": "17.50", "currency": "EUR", "status": "open"},
}


async def lookup_invoice(invoice_id: str) -> dict[str, str]:
    """Look up an invoice by its id.

    Args:
        invoice_id: The invoice number, like INV-1001.
    """
    await asyncio.sleep(0)
    invoice = _INVOICES.get(invoice_id.upper())
    if invoice is None:
        raise KeyError(f"no invoice {invoice_id}")
    return {"invoice_id": invoice_id.upper(), **invoice}


async def refund_status(invoice_id: str) -> str:
    """Say whether a refund for an invoice is possible.

    Args:
        invoice_id: The invoice number, like INV-1001.
    """
    await asyncio.sleep(0)
    invoice = _INVOICES.get(invoice_id.upper())
    if invoice is None:
        return f"no invoice {invoice_id}"
    if invoice["status"] == "paid":
        amount = f"{invoice['amount']} {invoice['currency']}"
        return f"{invoice_id} is paid; a refund of {amount} can be issued"
    return f"{invoice_id} is still open; nothing to refund"
