"""The embedded STS's grants: client authentication and the three token grants.

- ``client_credentials``: a service's own app token, only for an audience its policy
  lists (:mod:`mesh.auth.policy`), carrying its app roles.
- Entra-style on-behalf-of (``urn:ietf:params:oauth:grant-type:jwt-bearer`` with
  ``requested_token_use=on_behalf_of``) and RFC 8693 token exchange: a user's token for
  exactly one next-hop audience the client may reach, recording the chain as nested
  ``act`` claims, with only the requested scopes (a subset of the user's) and a hop
  budget (``mesh_hops``) that can only shrink.

Clients authenticate with their own secret (body or HTTP Basic) or a ``private_key_jwt``
assertion (RFC 7523: short-lived, ``aud`` the token endpoint, each ``jti`` once). Every
client-authentication failure gets the same answer, so client ids cannot be enumerated.
Nothing here does I/O beyond reading the key file; the HTTP layer calls it in threads.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any, Protocol

from mesh.auth.jwt import (
    HOPS_CLAIM,
    TokenProfile,
    TokenValidator,
    is_app_only,
    scopes_of,
    unverified_claims,
)
from mesh.auth.policy import ClientPolicy, policies
from mesh.auth.sts_clients import (
    ASSERTION_TYPE,
    CLIENT_AUTH_FAILED,
    ClientAuthenticator,
    OAuthError,
)
from mesh.auth.sts_keys import ACCESS_TOKEN_TYP, KeyStore, LocalKeys, mint
from mesh.config import MeshConfig
from mesh.errors import MeshError, PermissionDenied, Unauthenticated

log = logging.getLogger("mesh.auth.sts")

GRANT_CLIENT_CREDENTIALS = "client_credentials"
GRANT_JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
GRANT_TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"  # noqa: S105
TOKEN_TYPE_ACCESS = "urn:ietf:params:oauth:token-type:access_token"  # noqa: S105
TOKEN_TYPE_JWT = "urn:ietf:params:oauth:token-type:jwt"  # noqa: S105
RESERVED_SCOPES = frozenset({"openid", "profile", "offline_access", "email"})
#: User claims carried from a subject token into the exchanged token.
#: Extension parameter: the token the previous agent held (chain and hop ceiling).
PREVIOUS_TOKEN = "mesh_previous_token"  # noqa: S105 - a parameter name
CARRIED_CLAIMS = ("scp", "amr", "name", "preferred_username", "oid", "tid", "email")


class Endpoints(Protocol):
    """Where the STS is reachable (known once it is listening)."""

    @property
    def issuer(self) -> str: ...

    @property
    def token_endpoint(self) -> str: ...


def _nest_act(previous: object, actor: str) -> dict[str, Any]:
    act: dict[str, Any] = {"sub": actor}
    if isinstance(previous, dict):
        act["act"] = previous
    return act


class Grants:
    """Authenticates clients and serves the token grants (raises OAuthError)."""

    def __init__(self, config: MeshConfig, keys: KeyStore, endpoints: Endpoints) -> None:
        self.config = config
        self.keys = keys
        self.endpoints = endpoints
        self.clients = ClientAuthenticator(config, endpoints)
        self.policies: dict[str, ClientPolicy] = policies(config)
        self._local_keys = LocalKeys(keys)
        self._audiences = {a for p in self.policies.values() for a in p.delegated | p.app}
        self._audiences |= {config.auth.audience_for(s) for s in ["router", *config.agents]}

    def handle(self, form: Mapping[str, str], authorization: str | None) -> dict[str, Any]:
        """Serve one token request (form fields already parsed)."""
        grant = form.get("grant_type", "")
        client_id = self.clients.authenticate(form, authorization)
        policy = self.policies[client_id]
        if grant == GRANT_CLIENT_CREDENTIALS:
            return self._client_credentials(policy, form)
        if grant == GRANT_JWT_BEARER:
            if form.get("requested_token_use") != "on_behalf_of":
                raise OAuthError("invalid_request", "requested_token_use must be on_behalf_of")
            return self._on_behalf_of(policy, form)
        if grant == GRANT_TOKEN_EXCHANGE:
            return self._token_exchange(policy, form)
        raise OAuthError("unsupported_grant_type", "grant_type not supported")

    # -- helpers -----------------------------------------------------------------------------

    def _validate(self, token: str, audience: str, what: str) -> dict[str, Any]:
        validator = TokenValidator(
            issuer=self.endpoints.issuer,
            audience=audience,
            keys=_NoAsyncKeys(),
            algorithms=("RS256",),
            leeway_s=self.config.auth.leeway_s,
            max_token_bytes=self.config.auth.max_token_bytes,
            profile=TokenProfile(typ=ACCESS_TOKEN_TYP),
        )
        try:
            return validator.validate_sync(token, self._local_keys)
        except MeshError as err:
            raise OAuthError("invalid_grant", f"{what}: {err.message}") from None

    def _target(self, form: Mapping[str, str]) -> tuple[str, set[str]]:
        """(audience, requested permissions) from ``audience``/``resource``/``scope``."""
        audience = form.get("audience") or form.get("resource") or ""
        perms: set[str] = set()
        resources: set[str] = set()
        for item in form.get("scope", "").split():
            if item in RESERVED_SCOPES:
                continue
            if "/" in item:
                resource, _, perm = item.rpartition("/")
                resources.add(resource)
                if perm != ".default":
                    perms.add(perm)
            else:
                perms.add(item)
        if not audience:
            if len(resources) != 1:
                raise OAuthError("invalid_scope", "request exactly one resource (<aud>/.default)")
            audience = resources.pop()
        return audience, perms

    @staticmethod
    def _allowed(policy: ClientPolicy, audience: str, *, delegated: bool) -> None:
        try:
            policy.check(audience, delegated=delegated)
        except PermissionDenied as err:
            raise OAuthError("invalid_target", err.message) from None

    @staticmethod
    def _delegated_scopes(subject: Mapping[str, Any], perms: set[str]) -> list[str]:
        have = set(scopes_of({"scp": subject.get("scp"), "scope": subject.get("scope")}))
        if perms:
            missing = perms - have
            if missing:
                raise OAuthError(
                    "invalid_scope", "subject token lacks: " + " ".join(sorted(missing))
                )
            return sorted(perms)
        return sorted(have)

    @staticmethod
    def _hops(subject: Mapping[str, Any], form: Mapping[str, str]) -> int | None:
        """The hop budget of the new token: requested, never above the subject's."""
        held = subject.get(HOPS_CLAIM)
        held = held if isinstance(held, int) and not isinstance(held, bool) else None
        raw = form.get(HOPS_CLAIM)
        if raw is None:
            return held
        if not raw.isdigit() or len(raw) > 4:
            raise OAuthError("invalid_request", f"{HOPS_CLAIM} must be a non-negative integer")
        wanted = int(raw)
        if held is not None and wanted > held:
            raise OAuthError("invalid_grant", f"{HOPS_CLAIM} cannot grow ({wanted} > {held})")
        return wanted

    def _step_up(self, subject: Mapping[str, Any], audience: str) -> None:
        if audience not in self.config.auth.sts.step_up_audiences:
            return
        amr = subject.get("amr")
        if isinstance(amr, list) and "mfa" in amr:
            return
        challenge = json.dumps({"access_token": {"amr": {"essential": True, "values": ["mfa"]}}})
        raise OAuthError(
            "interaction_required",
            "AADSTS50076: multi-factor authentication is required for this audience",
            extra={"suberror": "basic_action", "claims": challenge},
        )

    def issue(
        self, *, sub: str, audience: str, client_id: str, claims: Mapping[str, Any] | None = None
    ) -> tuple[str, int]:
        ttl = self.config.auth.sts.token_ttl_s
        extra = {"azp": client_id, **(claims or {})}
        token = mint(
            self.config,
            sub=sub,
            audience=audience,
            ttl_s=ttl,
            issuer=self.endpoints.issuer,
            extra=extra,
            store=self.keys,
        )
        return token, ttl

    # -- grants ------------------------------------------------------------------------------

    def _delegate(
        self,
        policy: ClientPolicy,
        subject: dict[str, Any],
        form: Mapping[str, str],
        *,
        holder: str = "",
        chain: Mapping[str, Any] | None = None,
    ) -> tuple[str, int, list[str], str]:
        """A token for the user of ``subject``; the ``act`` chain and the hop ceiling come
        from ``chain`` (the token the previous agent held) when given."""
        if is_app_only(subject):
            raise OAuthError("invalid_grant", "app-only tokens cannot be exchanged for a user")
        audience, perms = self._target(form)
        self._allowed(policy, audience, delegated=True)
        scopes = self._delegated_scopes(subject, perms)
        basis = subject if chain is None else chain
        hops = self._hops(basis, form)
        self._step_up(subject, audience)
        claims = {k: subject[k] for k in CARRIED_CLAIMS if k in subject}
        claims["scp"] = " ".join(scopes)
        if hops is not None:
            claims[HOPS_CLAIM] = hops
        previous = basis.get("act")
        if holder:
            # The previous token was issued to another service (``holder``) that acted on
            # it; it stays in the chain between the earlier actors and this client.
            previous = _nest_act(previous, holder)
        claims["act"] = _nest_act(previous, policy.client_id)
        claims["idtyp"] = "user"
        token, ttl = self.issue(
            sub=str(subject["sub"]), audience=audience, client_id=policy.client_id, claims=claims
        )
        return token, ttl, scopes, audience

    def _previous(
        self, policy: ClientPolicy, subject: Mapping[str, Any], token: str
    ) -> tuple[dict[str, Any], str]:
        """``mesh_previous_token``: the token the agent handing over held, for the same user,
        acted on by this client. It extends the chain; the scopes still come from the
        user's own token, so narrowing at one hop does not starve the next."""
        chain, holder = self._held_by_another(policy, token, "mesh_previous_token")
        if chain.get("sub") != subject.get("sub"):
            raise OAuthError("invalid_grant", "mesh_previous_token is for another user")
        return chain, holder

    def _on_behalf_of(self, policy: ClientPolicy, form: Mapping[str, str]) -> dict[str, Any]:
        own = self.config.auth.audience_for(policy.service)
        subject = self._validate(form.get("assertion", ""), own, "assertion")
        token, ttl, scopes, audience = self._delegate(policy, subject, form)
        return {
            "token_type": "Bearer",
            "access_token": token,
            "expires_in": ttl,
            "ext_expires_in": ttl,
            "scope": " ".join(f"{audience}/{s}" for s in scopes) or f"{audience}/.default",
        }

    def _exchangeable_subject(self, policy: ClientPolicy, token: str) -> tuple[dict[str, Any], str]:
        """The subject token's claims, and the service it was issued to when not this client.

        A client may exchange a token meant for itself, or one issued to another service
        with this client as its current actor: the router re-exchanging the token it
        obtained for agent A when A hands the turn to B, so that B's token records
        ``router > A > router`` rather than losing A.
        """
        own = self.config.auth.audience_for(policy.service)
        try:
            return self._validate(token, own, "subject_token"), ""
        except OAuthError as first:
            try:
                return self._held_by_another(policy, token, "subject_token")
            except OAuthError:
                raise first from None

    def _held_by_another(
        self, policy: ClientPolicy, token: str, what: str
    ) -> tuple[dict[str, Any], str]:
        """A token issued to another service of the mesh whose current actor is this client."""
        try:
            audience = unverified_claims(token).get("aud")
        except MeshError as err:
            raise OAuthError("invalid_grant", f"{what}: {err.message}") from None
        if not isinstance(audience, str) or audience not in self._audiences:
            raise OAuthError("invalid_grant", f"{what}: not a token of this mesh")
        claims = self._validate(token, audience, what)
        act = claims.get("act")
        if not isinstance(act, dict) or act.get("sub") != policy.client_id:
            raise OAuthError(
                "invalid_grant", f"{what} was neither issued to nor acted on by the client"
            )
        return claims, audience

    def _token_exchange(self, policy: ClientPolicy, form: Mapping[str, str]) -> dict[str, Any]:
        if form.get("subject_token_type") not in (TOKEN_TYPE_ACCESS, TOKEN_TYPE_JWT):
            raise OAuthError("invalid_request", "unsupported subject_token_type")
        subject, holder = self._exchangeable_subject(policy, form.get("subject_token", ""))
        actor_token = form.get("actor_token")
        if actor_token is not None:
            if form.get("actor_token_type") not in (TOKEN_TYPE_ACCESS, TOKEN_TYPE_JWT):
                raise OAuthError("invalid_request", "unsupported actor_token_type")
            actor = self._validate(actor_token, self.endpoints.issuer, "actor_token")
            if actor.get("sub") != policy.client_id:
                raise OAuthError("invalid_grant", "actor_token does not name the client")
        chain: dict[str, Any] | None = None
        previous = form.get(PREVIOUS_TOKEN)
        if previous is not None:
            chain, holder = self._previous(policy, subject, previous)
        token, ttl, scopes, _ = self._delegate(policy, subject, form, holder=holder, chain=chain)
        return {
            "token_type": "Bearer",
            "access_token": token,
            "issued_token_type": TOKEN_TYPE_ACCESS,
            "expires_in": ttl,
            "scope": " ".join(scopes),
        }

    def _client_credentials(self, policy: ClientPolicy, form: Mapping[str, str]) -> dict[str, Any]:
        if form.get("audience") or form.get("resource") or form.get("scope"):
            audience, _ = self._target(form)
            self._allowed(policy, audience, delegated=False)
        else:
            audience = self.endpoints.issuer  # only the STS itself accepts it (actor token)
        token, ttl = self.issue(
            sub=policy.client_id,
            audience=audience,
            client_id=policy.client_id,
            claims={"idtyp": "app", "roles": list(policy.roles)},
        )
        return {
            "token_type": "Bearer",
            "access_token": token,
            "expires_in": ttl,
            "ext_expires_in": ttl,
        }


class _NoAsyncKeys:
    """The STS validates synchronously (:meth:`TokenValidator.validate_sync`)."""

    async def key_for(self, kid: str) -> Mapping[str, Any]:
        raise Unauthenticated("token signed with an unknown key (kid)")


__all__ = [
    "ASSERTION_TYPE",
    "CLIENT_AUTH_FAILED",
    "GRANT_CLIENT_CREDENTIALS",
    "GRANT_JWT_BEARER",
    "GRANT_TOKEN_EXCHANGE",
    "TOKEN_TYPE_ACCESS",
    "TOKEN_TYPE_JWT",
    "Grants",
    "OAuthError",
]
