"""Whose a conversation and a stream are: the user a call acts for, as a store key."""

from __future__ import annotations

import hashlib

from mesh.context import Principal


def user_key(principal: Principal | None) -> str:
    """The user a call acts for, as a short stable key ("" without auth): the token's
    issuer and ``oid`` (Entra's user id across apps) or ``sub``, hashed. Delegated
    tokens keep the user's subject, so the A2A edge and tools calling the router for
    the user count as that user."""
    if principal is None:
        return ""
    user = str(principal.claims.get("oid") or principal.subject)
    return hashlib.blake2b(f"{principal.issuer}|{user}".encode(), digest_size=12).hexdigest()


def conversation_key(conversation_id: str, principal: Principal | None) -> str:
    """Where a caller's conversation lives in the store.

    With auth, a conversation belongs to the user whose token started it: the key is
    scoped to that user (:func:`user_key`), so another user naming the same id gets a
    conversation of their own and never reads or extends this one. Without auth there
    is no user: the key is the id.
    """
    user = user_key(principal)
    return f"{user}/{conversation_id}" if user else conversation_id
