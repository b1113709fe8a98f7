"""The edge's agent cards: one per agent and sequence, skills from the agent's Info (once
the router has described it), the mesh issuer's security schemes."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from a2a.types import (
    AgentCapabilities,
    AgentCard,
    AgentInterface,
    AgentSkill,
    ClientCredentialsOAuthFlow,
    OAuth2SecurityScheme,
    OAuthFlows,
    OpenIdConnectSecurityScheme,
    SecurityRequirement,
    SecurityScheme,
    StringList,
)
from a2a.utils.constants import TransportProtocol

from mesh.a2a._auth import A2A_SERVICE, SCHEME
from mesh.config import MeshConfig
from mesh.errors import MeshError
from mesh.v1 import types_pb2
from mesh.version import __version__

if TYPE_CHECKING:
    from mesh.a2a._executor import RouterLink

log = logging.getLogger("mesh.a2a")


def routable(config: MeshConfig) -> dict[str, str]:
    """name -> description of every agent and sequence the router can route to."""
    out = {name: agent.description for name, agent in config.agents.items()}
    for name, seq in config.router.sequences.items():
        out[name] = seq.description or f"sequence of {', '.join(seq.steps)}"
    return out


# -- cards -------------------------------------------------------------------------------


class CardBook:
    """The agent cards, with skills from each agent's Info once the router described it."""

    def __init__(self, config: MeshConfig, base_url: str, link: RouterLink) -> None:
        self.config = config
        self.base_url = base_url.rstrip("/")
        self.link = link
        self.infos: dict[str, types_pb2.AgentInfo] = {}
        self.token_url = ""
        self.grpc_address = ""
        """host:port of the gRPC binding ("" when the edge serves JSON-RPC only)."""
        self.issuer = ""

    async def describe(self, name: str, token: str | None) -> None:
        if name in self.infos or name not in self.config.agents:
            return
        info = await self.link.describe(name, token)
        if info is not None and info.name:
            self.infos[name] = info

    async def discover_issuer(self) -> None:
        if not self.config.auth.enabled:
            return
        import httpx

        from mesh.auth.jwks import discover
        from mesh.auth.runtime import resolve_issuer, ssl_context

        self.issuer = resolve_issuer(self.config)
        verify = ssl_context(self.config)  # a missing CA file is one ConfigError line
        try:
            async with httpx.AsyncClient(verify=verify, timeout=5.0, trust_env=False) as http:
                self.token_url = await discover(http, self.issuer, "token_endpoint")
        except (MeshError, httpx.HTTPError) as err:
            log.info("A2A cards: no token endpoint from %s (%s)", self.issuer, err)

    def url(self, name: str) -> str:
        return f"{self.base_url}/agents/{name}/" if name else f"{self.base_url}/"

    def card(self, name: str) -> AgentCard:
        about = routable(self.config)
        if name:
            description = about.get(name, "")
        else:
            description = f"The {self.config.name} mesh: routes each message to its agents"
        skills = self._skills(name, description)
        card = AgentCard(
            name=name or self.config.name,
            description=description or name,
            version=__version__,
            supported_interfaces=[
                AgentInterface(
                    url=self.url(name),
                    protocol_binding=TransportProtocol.JSONRPC.value,
                    protocol_version="1.0",
                )
            ],
            capabilities=AgentCapabilities(streaming=True, push_notifications=False),
            default_input_modes=["text/plain"],
            default_output_modes=["text/plain"],
            skills=skills,
        )
        if self.grpc_address:
            card.supported_interfaces.append(
                AgentInterface(
                    url=self.grpc_address,
                    protocol_binding=TransportProtocol.GRPC.value,
                    tenant=name,
                    protocol_version="1.0",
                )
            )
        if self.config.auth.enabled:
            self._security(card)
        return card

    def _skills(self, name: str, description: str) -> list[AgentSkill]:
        names = [name] if name else sorted(routable(self.config))
        out: list[AgentSkill] = []
        for agent in names:
            info = self.infos.get(agent)
            configured = self.config.agents.get(agent)
            pairs: list[tuple[str, str]]
            if info is not None and info.skills:
                pairs = [(s.name, s.description) for s in info.skills]
            elif configured is not None and configured.skills:
                pairs = [(s.name, s.description) for s in configured.skills]
            else:
                pairs = [(agent, routable(self.config).get(agent, description))]
            for skill, about in pairs:
                out.append(
                    AgentSkill(
                        id=f"{agent}.{skill}" if not name else skill,
                        name=skill,
                        description=about or skill,
                        tags=[agent],
                    )
                )
        return out

    def _security(self, card: AgentCard) -> None:
        audience = self.config.auth.audience_for(A2A_SERVICE)
        about = f"a bearer JWT from the mesh's issuer with audience {audience}"
        if self.issuer:
            card.security_schemes[SCHEME].CopyFrom(
                SecurityScheme(
                    open_id_connect_security_scheme=OpenIdConnectSecurityScheme(
                        description=about,
                        open_id_connect_url=self.issuer.rstrip("/")
                        + "/.well-known/openid-configuration",
                    )
                )
            )
        if self.token_url:
            scopes = {s: f"the mesh's {s} scope" for s in self.config.auth.sts.default_scopes}
            flow = ClientCredentialsOAuthFlow(
                token_url=self.token_url, scopes=scopes or {"mesh.chat": "talk to the mesh"}
            )
            card.security_schemes[f"{SCHEME}-oauth2"].CopyFrom(
                SecurityScheme(
                    oauth2_security_scheme=OAuth2SecurityScheme(
                        description=about, flows=OAuthFlows(client_credentials=flow)
                    )
                )
            )
        for scheme in card.security_schemes:
            card.security_requirements.append(
                SecurityRequirement(schemes={scheme: StringList(list=[])})
            )
