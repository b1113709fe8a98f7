"""Order tools (demo data)."""

from __future__ import annotations

import asyncio

_ORDERS = {
    "A-17": {"status": "shipped", "carrier": "DHL", "eta": "2 days"},
    "A-18": {"status": "packing", "carrier": "", "eta": "4 days"},
}


async def track_order(order_id: str) -> dict[str, str]:
    """Track an order's shipment.

    Args:
        order_id: The order number, like A-17.
    """
    await asyncio.sleep(0)
    order = _ORDERS.get(order_id.upper())
    if order is None:
        raise KeyError(f"no order {order_id}")
    return {"order_id": order_id.upper(), **order}


async def cancel_order(order_id: str) -> str:
    """Cancel an order that has not shipped yet (needs the user's approval).

    Args:
        order_id: The order number, like A-18.
    """
    await asyncio.sleep(0)
    order = _ORDERS.get(order_id.upper())
    if order is None:
        return f"no order {order_id}"
    if order["status"] == "shipped":
        return f"{order_id.upper()} has shipped; it can no longer be cancelled"
    order["status"] = "cancelled"
    return f"{order_id.upper()} is cancelled"
