"""Settings of the ``auth:`` block of ``mesh.yaml``.

Local runs (the embedded token service, the defaults spelled out)::

    auth:
      enabled: true
      exchanger: embedded          # embedded | entra | rfc8693
      issuer: ""                   # "" = the embedded STS: https://<sts.host>:<sts.port>
      leeway_s: 30
      max_token_bytes: 8192
      jwks_refresh_window_s: 30
      allow_unauthenticated_reflection: false
      audiences: {}                # service -> audience; default mesh-router / mesh-agent-<name>
      clients:                     # service -> credentials; default: the STS's dev secret
        router: {secret_env: MESH_ROUTER_CLIENT_SECRET}
        billing: {certificate: certs/billing.pem, private_key: certs/billing-key.pem}
      sts: {host: 127.0.0.1, port: 50040, tenant: mesh, token_ttl_s: 3600}
      tls: {enabled: false, client_auth: false}   # dev certs from the STS's CA when on

Microsoft Entra ID::

    auth:
      enabled: true
      exchanger: entra
      issuer: https://login.microsoftonline.com/<tenant-id>/v2.0
      audiences: {router: api://mesh-router, triage: api://mesh-triage}
      clients:
        router: {client_id: <app id>, secret_env: MESH_ROUTER_CLIENT_SECRET}
      entra: {authority: https://login.microsoftonline.com/<tenant-id>}

Keycloak-style RFC 8693::

    auth:
      enabled: true
      exchanger: rfc8693
      issuer: https://keycloak.example/realms/mesh
      clients: {router: {client_id: mesh-router, secret_env: MESH_ROUTER_CLIENT_SECRET}}

Secrets never live in the file: a client names the environment variable that holds
its secret (``secret_env``) or points at a certificate and private key on disk.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

ExchangerKind = Literal["embedded", "entra", "rfc8693"]
Algorithm = Literal["RS256", "ES256"]


def _default_algorithms() -> list[Algorithm]:
    return ["RS256", "ES256"]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ClientConfig(_Frozen):
    """How one service authenticates itself to the identity provider."""

    client_id: str = ""
    """The service's client (application) id; default: the service's own audience."""
    secret_env: str = ""
    """Environment variable holding the client secret (never the secret itself)."""
    certificate: str = ""
    """PEM certificate path (certificate credentials; the STS verifies assertions with it)."""
    private_key: str = ""
    """PEM private key path matching ``certificate`` (the service side only)."""
    thumbprint: str = ""
    """SHA-1 thumbprint (hex) of ``certificate``; computed from the certificate when empty."""
    audiences: list[str] | None = None
    """Services or audiences it may get delegated (user) tokens for; None: the router
    may reach every agent, an agent nothing (add its MCP resources and A2A peers)."""
    app_audiences: list[str] | None = None
    """Services or audiences it may get its own (client-credentials) tokens for; None:
    the router every agent (for Info), an agent the router (to register)."""
    roles: list[str] | None = None
    """App roles in its client-credentials tokens; None: ``router.discovery.register_role``
    for an agent (so it can register), nothing for the router."""

    @model_validator(mode="after")
    def _key_needs_cert(self) -> ClientConfig:
        if self.private_key and not self.certificate:
            raise ValueError("private_key needs certificate")
        return self


class EntraConfig(_Frozen):
    """Microsoft Entra ID on-behalf-of through msal."""

    authority: str = ""
    """``https://login.microsoftonline.com/<tenant>``; empty: the embedded STS's tenant URL."""
    validate_authority: bool = True
    """Let msal check the authority against Microsoft's instance discovery (off for the STS)."""
    scope_template: str = "{audience}/.default"
    """How the next hop's audience becomes an OBO scope."""


class Rfc8693Config(_Frozen):
    """RFC 8693 token exchange (Keycloak-style identity providers)."""

    token_url: str = ""
    """Token endpoint; empty: read from the issuer's OpenID discovery document."""
    send_actor_token: bool = True
    """Send the service's own client-credentials token as ``actor_token`` (nested ``act``)."""
    actor_audience: str = ""
    """``audience`` requested for the actor token; empty: none (the issuer decides)."""


class StsConfig(_Frozen):
    """The embedded token service (``mesh sts``) for local runs and tests."""

    host: str = "127.0.0.1"
    """Address to bind; loopback unless you mean it."""
    port: int = Field(default=50040, ge=0, le=65535)
    """Port (0: any free port; the bound URL is printed and written to the data dir)."""
    tenant: str = Field(default="mesh", pattern=r"^[A-Za-z0-9._-]{1,64}$")
    """Tenant path segment of the Entra-shaped endpoints (msal needs one)."""
    token_ttl_s: int = Field(default=3600, ge=10, le=86400)
    """Lifetime of the tokens it issues."""
    default_scopes: list[str] = Field(default_factory=lambda: ["mesh.chat"])
    """Scopes ``mesh token`` puts in a user token when ``--scope`` is not given."""
    step_up_audiences: list[str] = Field(default_factory=list)
    """Audiences whose exchange requires ``amr`` to contain ``mfa`` (else a claims challenge)."""


class TlsConfig(_Frozen):
    """TLS for the gRPC hops (off by default: loopback runs use plaintext gRPC).

    With ``enabled`` and no files, every service uses a certificate for
    127.0.0.1/localhost (+ ``hosts``) issued by the dev CA under ``<data_dir>/sts/tls``.
    """

    enabled: bool = False
    """Serve and dial gRPC over TLS."""
    cert_file: str = ""
    """PEM certificate chain of this service (also its client certificate for mTLS)."""
    key_file: str = ""
    """PEM private key of ``cert_file``."""
    ca_file: str = ""
    """CA bundle that peers' certificates must chain to."""
    client_auth: bool = False
    """mTLS: servers require a client certificate from ``ca_file``; clients present theirs."""
    hosts: list[str] = Field(default_factory=list)
    """Extra DNS names/IPs for the dev certificate (e.g. Kubernetes Service names)."""

    @model_validator(mode="after")
    def _pairs(self) -> TlsConfig:
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("cert_file and key_file go together")
        return self


class AuthConfig(BaseModel):
    """How every service authenticates callers and exchanges tokens for the next hop."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = False
    """Validate a bearer JWT on every call (health is always exempt)."""
    exchanger: ExchangerKind = "embedded"
    """How a service gets a token for the next hop: embedded STS, Entra OBO or RFC 8693."""
    issuer: str = ""
    """Expected ``iss`` (exact); empty: the embedded STS at ``https://<sts.host>:<sts.port>``."""
    jwks_url: str = ""
    """Where signing keys are fetched; empty: ``jwks_uri`` of the issuer's discovery document."""
    ca_file: str = ""
    """CA bundle for HTTPS to the identity provider; empty: the STS's dev CA (embedded)
    or the system store."""
    audiences: dict[str, str] = Field(default_factory=dict)
    """service ("router" or an agent name) -> audience, overriding the defaults."""
    clients: dict[str, ClientConfig] = Field(default_factory=dict)
    """service -> its client credentials (extra keys register extra STS clients)."""
    algorithms: list[Algorithm] = Field(default_factory=lambda: _default_algorithms(), min_length=1)
    """Signature algorithms accepted; the token's own ``alg`` header is never trusted."""
    leeway_s: float = Field(default=30.0, ge=0, le=300)
    """Clock skew tolerated on ``exp``, ``nbf`` and ``iat``."""
    max_token_bytes: int = Field(default=8192, ge=256, le=65536)
    """Tokens longer than this are refused before parsing."""
    jwks_refresh_window_s: float = Field(default=30.0, ge=0)
    """An unknown ``kid`` refetches the JWKS at most once per this window."""
    jwks_max_age_s: float = Field(default=3600.0, gt=0)
    """A JWKS older than this is refetched on the next validation."""
    http_timeout_s: float = Field(default=5.0, gt=0, le=120)
    """Timeout of every call to the identity provider (discovery, JWKS, token endpoint)."""
    exchange_skew_s: float = Field(default=60.0, ge=0)
    """Cached exchanged tokens are dropped this long before they expire."""
    exchange_cache_size: int = Field(default=4096, ge=1)
    """Exchanged tokens kept in memory per process."""
    allow_unauthenticated_reflection: bool = False
    """Serve ``grpc.reflection`` without a token (grpcurl ``list`` without ``-H``)."""
    service_callers: dict[str, list[str]] = Field(default_factory=dict)
    """agent -> services whose own (app) tokens may call its Chat/Handoff; everyone
    else needs a user's token delegated through the router."""
    delegates: list[str] = Field(default_factory=lambda: ["router"])
    """Services whose delegated user tokens agents accept on Chat/Handoff (the actor)."""
    scopes: dict[str, list[str]] = Field(default_factory=dict)
    """agent -> the user's scopes it needs; its hop token carries only these (those the
    user has). Not listed: the agent's ``required_scopes``, else the user's scopes."""
    access_token_typ: str | None = None
    """JOSE ``typ`` every access token must carry (RFC 9068 ``at+jwt``); None: ``at+jwt``
    with the embedded STS, unchecked for other issuers (Entra v2 sets none); "": never."""
    require_scope_claim: bool = True
    """Access tokens must carry ``scp``/``scope`` or ``roles`` (ID tokens carry neither)."""
    assertion_max_lifetime_s: float = Field(default=600.0, gt=0, le=3600)
    """Longest ``private_key_jwt`` client assertion the embedded STS accepts (RFC 7523)."""
    entra: EntraConfig = Field(default_factory=EntraConfig)
    """Settings of the ``entra`` exchanger."""
    rfc8693: Rfc8693Config = Field(default_factory=Rfc8693Config)
    """Settings of the ``rfc8693`` exchanger."""
    sts: StsConfig = Field(default_factory=StsConfig)
    """The embedded token service."""
    tls: TlsConfig = Field(default_factory=TlsConfig)
    """TLS (optionally mutual) for the gRPC hops."""

    @field_validator("issuer", "jwks_url")
    @classmethod
    def _https(cls, value: str) -> str:
        if value and not value.startswith(("https://", "http://")):
            raise ValueError("must be an http(s) URL")
        return value

    def audience_for(self, service: str) -> str:
        """The audience of ``service`` ("router" or an agent name)."""
        if service in self.audiences:
            return self.audiences[service]
        return "mesh-router" if service == "router" else f"mesh-agent-{service}"

    def client_for(self, service: str) -> ClientConfig:
        """The client settings of ``service`` (empty settings when not configured)."""
        return self.clients.get(service, ClientConfig())

    @property
    def token_typ(self) -> str:
        """The ``typ`` access tokens must carry ("" when unchecked)."""
        if self.access_token_typ is not None:
            return self.access_token_typ
        return "at+jwt" if self.exchanger == "embedded" else ""

    def client_id_for(self, service: str) -> str:
        """The client id ``service`` authenticates as (default: its audience)."""
        return self.client_for(service).client_id or self.audience_for(service)

    @property
    def default_sts_url(self) -> str:
        """The embedded STS's URL as configured (unknown when ``sts.port`` is 0)."""
        host = "127.0.0.1" if self.sts.host in ("0.0.0.0", "") else self.sts.host
        return f"https://{host}:{self.sts.port}"
