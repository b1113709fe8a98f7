"""Agents written in Python: the same config, runtime and server the mesh file gives.

An :class:`Agent` is a mesh-file agent block written as code. It validates into
the same :class:`~mesh.config.AgentConfig` inside a :class:`~mesh.config.MeshConfig`
(:meth:`Agent.mesh_config`), and is built by the same functions ``mesh agent``
uses (:func:`mesh.agent._serve.build_runtime` and ``build_agent_server``); its
decorated tools and turn hooks are attached to the runtime those build, the way
MCP tools are. Nothing here runs a turn itself::

    from mesh.agent.api import Agent

    billing = Agent(
        "billing",
        description="Invoices and refunds.",
        instructions="You answer questions about invoices.",
        provider="offline",
        options={"rules": [{"contains": ["invoice"], "tool": "lookup_invoice",
                            "arguments": {"invoice_id": "INV-1"}}]},
    )

    @billing.tool
    def lookup_invoice(invoice_id: str) -> str:
        \"\"\"Look up an invoice.

        Args:
            invoice_id: The invoice number, like INV-1001.
        \"\"\"
        return f"{invoice_id}: 42.00 EUR, paid"

    result = await billing.chat("where is my invoice?")   # in-process, for tests
    billing.run(port=50070)                                 # a mesh agent, as `mesh agent` serves

:class:`Runner` runs turns in-process over several agents and follows their
TRANSFER and CONSULT handoffs with the mesh's hop budget and cycle rule (routes
and sequences are the router's: serve the agents for those).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, overload

from mesh.agent._runner import AgentEvent, Runner, RunResult
from mesh.agent._runtime import AfterTurn, AgentRuntime, BeforeTurn, TurnInput
from mesh.config import HandoffConfig, MeshConfig, config_from_dict
from mesh.errors import ConfigError
from mesh.providers.base import ChatMessage, Provider
from mesh.tools import FunctionTool

if TYPE_CHECKING:
    from mesh.server import MeshServer

#: A handoff target with its modes, description and passed context keys.
Handoff = HandoffConfig

F = TypeVar("F", bound=Callable[..., Any])

_DEFAULT_MODELS = {"offline": "offline-1"}


class Agent:
    """One agent defined in code (see the module docstring).

    ``provider`` is the provider kind (``offline``, ``anthropic``, ``openai``,
    ``gemini``...), ``model`` its model (``offline-1`` for the offline model) and
    ``options`` the rest of the provider block exactly as in the mesh file (keys
    come from the environment through ``api_key_env``, never from code).
    ``handoffs`` are agent names (TRANSFER) or :class:`Handoff` entries; ``tools``
    are functions (or ``@agent.tool``) and mesh-file references (``"module:function"``).
    Everything else is the mesh file's agent block (``limits``, ``skills``...).
    """

    def __init__(
        self,
        name: str,
        *,
        description: str = "",
        instructions: str = "",
        provider: str = "offline",
        model: str | None = None,
        options: Mapping[str, Any] | None = None,
        handoffs: Sequence[str | Handoff] = (),
        tools: Sequence[Callable[..., Any] | str] = (),
        **settings: Any,
    ) -> None:
        self.name = name
        self.description = description or f"the {name} agent"
        self.instructions = instructions
        self.provider_kind = provider
        model = model or _DEFAULT_MODELS.get(provider)
        if not model:
            raise ConfigError(f"agent {name}: provider {provider!r} needs a model")
        self.model = model
        self.options = dict(options or {})
        self.handoffs = [Handoff(target=h) if isinstance(h, str) else h for h in handoffs]
        self.settings = dict(settings)
        """More fields of the agent block (``limits``, ``skills``, ``can_end_conversation``...)."""
        self.tools: dict[str, FunctionTool] = {}
        self.before: list[BeforeTurn] = []
        self.after: list[AfterTurn] = []
        self._runner: Runner | None = None
        self.base: MeshConfig | None = None
        """The mesh config this agent joins when none is given (see :meth:`from_config`)."""
        refs = [t for t in tools if isinstance(t, str)]
        if refs:
            self.settings["tools"] = refs  # the mesh file's `module:function` references
        for func in tools:
            if not isinstance(func, str):
                self.tool(func)

    @classmethod
    def from_config(cls, config: MeshConfig, name: str) -> Agent:
        """The agent ``name`` of a mesh file, to add Python tools and hooks to.

        Its block is kept whole (its ``tools:`` references are still loaded from the
        file's folder), and ``config`` is the mesh it joins by default.
        """
        block = config.agent(name).model_dump(exclude={"name"})
        provider = dict(block.pop("provider"))
        agent = cls(
            name,
            description=block.pop("description"),
            instructions=block.pop("instructions"),
            provider=provider.pop("kind"),
            model=provider.pop("model"),
            options=provider,
            handoffs=[Handoff(**h) for h in block.pop("handoffs")],
            **block,
        )
        agent.base = config
        return agent

    def __repr__(self) -> str:
        return f"Agent({self.name!r}, provider={self.provider_kind!r}, model={self.model!r})"

    # -- definition ------------------------------------------------------------------

    @overload
    def tool(self, func: F, /) -> F: ...
    @overload
    def tool(self, /, *, name: str | None = None) -> Callable[[F], F]: ...

    def tool(self, func: Callable[..., Any] | None = None, /, *, name: str | None = None) -> Any:
        """Register a typed function (sync or async) as a tool; its schema comes from
        the type hints, its description from the docstring (``Args:`` per argument)."""

        def register(f: Callable[..., Any]) -> Callable[..., Any]:
            made = FunctionTool(f, name=name)
            if made.name in self.tools:
                raise ConfigError(f"agent {self.name}: tool {made.name!r} is declared twice")
            self.tools[made.name] = made
            return f

        return register(func) if func is not None else register

    def before_turn(self, hook: BeforeTurn) -> BeforeTurn:
        """Run ``hook(turn)`` before each turn: return None (go on), a changed
        :class:`TurnInput`, or a :class:`Final` to answer without the model."""
        self.before.append(hook)
        return hook

    def after_turn(self, hook: AfterTurn) -> AfterTurn:
        """Run ``hook(turn, final)`` on each turn's Final: return None or a new Final."""
        self.after.append(hook)
        return hook

    def block(self) -> dict[str, Any]:
        """This agent as a mesh-file ``agents:`` entry (tools are attached, not listed)."""
        return {
            **self.settings,
            "description": self.description,
            "instructions": self.instructions,
            "provider": {"kind": self.provider_kind, "model": self.model, **self.options},
            "handoffs": [h.model_dump() for h in self.handoffs],
        }

    def mesh_config(self, *peers: Agent, base: MeshConfig | None = None, **mesh: Any) -> MeshConfig:
        """A validated mesh config holding this agent and ``peers``.

        ``base`` (e.g. :func:`mesh.config.load_config` of a mesh file) contributes its
        agents, router, server and auth settings, and the agents here are added to it
        (or replace its agents of the same name). Handoff targets that are in neither
        get a placeholder entry so the config validates; a turn cannot reach them
        in-process. ``mesh`` sets top-level fields (``max_hops``, ``router``...).
        """
        raw: dict[str, Any] = {}
        source = "<python>"
        base = base or self.base
        if base is not None:
            raw = base.model_dump(mode="json", exclude={"source"})
            source = base.source or source
        agents: dict[str, Any] = dict(raw.get("agents") or {})
        for agent in (self, *peers):
            agents[agent.name] = agent.block()
        for agent in (self, *peers):
            for handoff in agent.handoffs:
                agents.setdefault(handoff.target, {"description": f"the {handoff.target} agent"})
        raw.update(mesh)
        raw["agents"] = agents
        return config_from_dict(raw, source=source)

    # -- building (the mesh file's path) -----------------------------------------------

    def attach(self, runtime: AgentRuntime) -> AgentRuntime:
        """Add this agent's tools and hooks to a runtime built from its config."""
        offered = {spec.name for spec in runtime.tool_specs(TurnInput("", ""))}
        clash = sorted(set(self.tools) & offered)
        if clash:
            raise ConfigError(f"agent {self.name}: tool names already taken: {clash}")
        runtime.tools.update(self.tools)
        runtime.hooks.before.extend(self.before)
        runtime.hooks.after.extend(self.after)
        return runtime

    def build(
        self, config: MeshConfig | None = None, *, provider: Provider | None = None
    ) -> AgentRuntime:
        """The agent's runtime, built as ``mesh agent`` builds one (``build_runtime``)."""
        from mesh.agent._serve import build_runtime

        config = config or self.mesh_config()
        return self.attach(build_runtime(config, self.name, provider=provider))

    def server(
        self, config: MeshConfig | None = None, *, provider: Provider | None = None
    ) -> tuple[MeshServer, AgentRuntime]:
        """A ready-to-start gRPC server for the agent (``build_agent_server``): the same
        servicer, interceptors (auth included), health and reflection as ``mesh agent``."""
        from mesh.agent._serve import build_agent_server

        config = config or self.mesh_config()
        server, runtime = build_agent_server(config, self.name, provider=provider)
        self.attach(runtime)
        return server, runtime

    # -- running ---------------------------------------------------------------------

    async def chat(
        self,
        message: str,
        *,
        history: Sequence[ChatMessage] = (),
        context: Mapping[str, str] | None = None,
        conversation_id: str = "",
    ) -> RunResult:
        """One turn in-process (no server, no router): the answer and every event."""
        if self._runner is None:
            self._runner = Runner(self)
        return await self._runner.run(
            message, history=history, context=context, conversation_id=conversation_id
        )

    async def serve(
        self,
        *,
        host: str | None = None,
        port: int | None = None,
        config: MeshConfig | None = None,
        register: str | None = None,
        advertise: str | None = None,
    ) -> None:
        """Serve as a mesh agent until SIGTERM/SIGINT (then drain), like ``mesh agent``.

        Prints ``agent NAME: HOST:PORT`` once listening. ``register`` is a router
        address to announce this agent to (``advertise``: the address it should dial);
        ``registered: ROUTER`` is printed when the router has listed it.
        """
        config = config or self.mesh_config()
        server, runtime = self.server(config)
        host = host or config.server.host
        bound = await server.start(host, config.agent(self.name).port if port is None else port)
        server.install_signal_handlers()
        address = f"{host}:{bound}"
        print(f"agent {self.name}: {address}", flush=True)
        registration: asyncio.Future[None] | None = None
        if register:
            registration = asyncio.ensure_future(
                _register(config, self.name, register, advertise or address)
            )
        try:
            await server.wait()
        finally:
            if registration is not None:
                registration.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await registration
            await runtime.provider.aclose()

    def run(self, **serve: Any) -> int:
        """:meth:`serve` on the mesh's event loop, for a script's ``__main__``."""
        from mesh import loop

        loop.run(self.serve(**serve))
        return 0

    async def aclose(self) -> None:
        """Close the in-process runner's providers."""
        if self._runner is not None:
            await self._runner.aclose()
            self._runner = None


async def _register(config: MeshConfig, name: str, router: str, address: str) -> None:
    from mesh.agent._register import register_forever

    interceptors: list[Any] = []
    credentials = None
    if config.auth.enabled:
        from mesh.auth import interceptors as auth

        audience = config.auth.audience_for("router")
        interceptors = auth.service_interceptors(config, audience, service=name)
        credentials = auth.channel_credentials(config)
    await register_forever(
        router,
        name,
        address,
        interceptors=interceptors,
        credentials=credentials,
        on_accept=lambda: print(f"registered: {router}", flush=True),
    )


__all__ = ["Agent", "AgentEvent", "Handoff", "RunResult", "Runner"]
