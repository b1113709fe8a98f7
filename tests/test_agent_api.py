"""The Python API for agents: in-process turns, hooks, the Runner's handoffs, and the
same agent served as a mesh agent that answers through a real router."""

from __future__ import annotations

import asyncio
import signal
import sys
import textwrap
from pathlib import Path

import pytest

from mesh.agent import Agent, Final, Handoff, Runner, TurnInput
from mesh.client import AgentClient, create_channel
from mesh.config import load_config
from mesh.errors import AgentNotFound, ConfigError, HandoffCycle, HopBudgetExceeded

from .meshtest import MESH_YAML, REPO, mesh_config, offline_agent, serve_router

INVOICES = {"INV-1001": "42.00 EUR, paid on 2 November"}


def billing_agent(seen: list[str]) -> Agent:
    """An agent whose offline model calls its decorated tool for invoice questions."""
    agent = Agent(
        "billing",
        description="Invoices and refunds.",
        instructions="You answer questions about invoices.",
        options={
            "rules": [
                {
                    "contains": ["invoice"],
                    "tool": "lookup_invoice",
                    "arguments": {"invoice_id": "INV-1001"},
                }
            ]
        },
    )

    @agent.tool
    def lookup_invoice(invoice_id: str) -> str:
        """Look up an invoice.

        Args:
            invoice_id: The invoice number, like INV-1001.
        """
        seen.append(invoice_id)
        return f"{invoice_id}: {INVOICES.get(invoice_id, 'unknown')}"

    return agent


async def test_in_process_turn_calls_the_decorated_tool() -> None:
    seen: list[str] = []
    agent = billing_agent(seen)
    try:
        result = await agent.chat("Where is my invoice?")
        assert seen == ["INV-1001"]  # the tool ran, with the model's arguments
        assert (
            result.text == "billing found: lookup_invoice: INV-1001: 42.00 EUR, paid on 2 November"
        )
        assert [c.call.name for c in result.tool_calls] == ["lookup_invoice"]
        assert [r.content for r in result.tool_results] == [
            "INV-1001: 42.00 EUR, paid on 2 November"
        ]
        assert result.agent == "billing" and result.path == ["billing"]
        assert [(m.role, m.content) for m in result.history] == [
            ("user", "Where is my invoice?"),
            ("assistant", result.text),
        ]
        # The conversation goes on from the returned history.
        again = await agent.chat("thanks", history=result.history)
        assert again.text == "billing heard: thanks"
        assert len(again.history) == 4
    finally:
        await agent.aclose()


async def test_tool_schema_comes_from_type_hints_and_docstring() -> None:
    agent = billing_agent([])
    runtime = agent.build()
    [spec] = [s for s in runtime.tool_specs(TurnInput("c", "m")) if s.name == "lookup_invoice"]
    assert spec.description == "Look up an invoice."
    assert spec.parameters["properties"]["invoice_id"] == {
        "type": "string",
        "description": "The invoice number, like INV-1001.",
    }
    assert spec.parameters["required"] == ["invoice_id"]


def test_a_final_names_a_stop_reason_the_wire_knows() -> None:
    from mesh.convert import STOP_TO_PB
    from mesh.turns import STOP_REASONS
    from mesh.v1 import types_pb2

    named = set(types_pb2.StopReason.values()) - {types_pb2.STOP_REASON_UNSPECIFIED}
    assert set(STOP_TO_PB) == set(STOP_REASONS) and set(STOP_TO_PB.values()) == named
    with pytest.raises(ValueError, match="'refused' is not one of end_turn"):
        Final("no", 0, 0, "refused")  # would reach the client as STOP_REASON_UNSPECIFIED


async def test_hooks_change_the_turn_answer_without_the_model_and_edit_the_final() -> None:
    agent = Agent("echo", description="Echoes.")
    seen_by_after: list[str] = []

    @agent.before_turn
    def redact(turn: TurnInput) -> TurnInput | Final | None:
        if "password" in turn.message:
            return Final("I cannot help with passwords.", 0, 0, "end_turn")
        if turn.context.get("lang") == "fr":
            return TurnInput(turn.conversation_id, f"[fr] {turn.message}", turn.history)
        return None

    @agent.after_turn
    async def sign(turn: TurnInput, final: Final) -> Final:
        seen_by_after.append(turn.message)
        return Final(
            final.content + " -- echo", final.input_tokens, final.output_tokens, "end_turn"
        )

    try:
        plain = await agent.chat("hello")
        assert plain.text == "echo heard: hello -- echo"
        french = await agent.chat("bonjour", context={"lang": "fr"})
        assert french.text == "echo heard: [fr] bonjour -- echo"  # the model saw the new message
        refused = await agent.chat("my password is hunter2")
        assert refused.text == "I cannot help with passwords."
        assert refused.final.input_tokens == 0  # no model call
        assert seen_by_after == ["hello", "[fr] bonjour"]
    finally:
        await agent.aclose()


def test_the_api_and_the_mesh_file_give_the_same_agent_config() -> None:
    agent = Agent(
        "billing",
        description="Invoices and refunds.",
        instructions="Be brief.",
        provider="gemini",
        model="gemini-2.5-flash",
        options={"api_key_env": "TEAM_GEMINI_KEY", "temperature": 0.2},
        handoffs=["orders", Handoff(target="triage", modes=["consult"], pass_context=["dept"])],
        limits={"max_tool_rounds": 3},
    )
    from_file = mesh_config(
        {
            "billing": {
                "description": "Invoices and refunds.",
                "instructions": "Be brief.",
                "provider": {
                    "kind": "gemini",
                    "model": "gemini-2.5-flash",
                    "api_key_env": "TEAM_GEMINI_KEY",
                    "temperature": 0.2,
                },
                "handoffs": [
                    {"target": "orders"},
                    {"target": "triage", "modes": ["consult"], "pass_context": ["dept"]},
                ],
                "limits": {"max_tool_rounds": 3},
            },
            "orders": offline_agent("the orders agent"),
            "triage": offline_agent("the triage agent"),
        }
    )
    assert agent.mesh_config().agents["billing"] == from_file.agents["billing"]


async def test_a_mesh_file_agent_gets_python_hooks_and_keeps_its_file_tools() -> None:
    config = load_config(MESH_YAML)
    billing = Agent.from_config(config, "billing")
    assert billing.mesh_config().agents["billing"] == config.agents["billing"]
    asked: list[str] = []

    @billing.before_turn
    def audit(turn: TurnInput) -> None:
        asked.append(turn.message)

    @billing.tool
    def escalate(reason: str) -> str:
        """Open a ticket for a person."""
        return f"ticket opened: {reason}"

    try:
        result = await billing.chat("Can I get a refund?")
    finally:
        await billing.aclose()
    # refund_status comes from services/billing/tools.py, as the mesh file says
    assert [c.call.name for c in result.tool_calls] == ["refund_status"]
    assert "a refund of 42.00 EUR can be issued" in result.text
    assert asked == ["Can I get a refund?"]
    runtime = billing.build()
    names = {spec.name for spec in runtime.tool_specs(TurnInput("c", "m"))}
    assert {"lookup_invoice", "refund_status", "escalate", "transfer_to_triage"} <= names


def test_bad_definitions_fail_with_one_clear_line() -> None:
    with pytest.raises(ConfigError, match="needs a model"):
        Agent("writer", provider="anthropic")
    with pytest.raises(ConfigError, match=r"agents\.writer\.provider.*temprature"):
        Agent("writer", options={"temprature": 1}).mesh_config()
    agent = Agent("writer", handoffs=["editor"])

    @agent.tool
    def transfer_to_editor(reason: str) -> str:
        return reason

    with pytest.raises(ConfigError, match="transfer_to_editor"):
        agent.build()


async def test_runner_follows_transfer_and_consult() -> None:
    triage = Agent(
        "triage",
        options={
            "rules": [
                {"contains": ["refund"], "handoff": "billing", "reason": "refunds are billing's"},
                {"contains": ["status"], "handoff": "orders", "mode": "consult"},
            ]
        },
        handoffs=["billing", Handoff(target="orders", modes=["consult"])],
    )
    billing = Agent("billing", options={"default_reply": "billing refunds: {message}"})
    orders = Agent("orders", options={"default_reply": "A-17 shipped"})
    runner = Runner(triage, billing, orders)
    try:
        moved = await runner.run("I want a refund")
        assert (moved.agent, moved.path) == ("billing", ["triage", "billing"])
        assert moved.text == "billing refunds: I want a refund"
        [handoff] = moved.handoffs
        assert (handoff.target, handoff.mode, handoff.reason) == (
            "billing",
            "transfer",
            "refunds are billing's",
        )
        asked = await runner.run("order status?")
        assert (asked.agent, asked.path) == ("triage", ["triage", "orders"])
        assert asked.text == "triage found: ask_orders: A-17 shipped"
        assert {e.agent for e in asked.events} == {"triage", "orders"}
    finally:
        await runner.aclose()


async def test_runner_keeps_the_hop_budget_and_the_cycle_rule() -> None:
    def consults(target: str) -> Agent:
        me = "a" if target == "b" else "b"
        return Agent(
            me,
            options={"rules": [{"contains": ["loop"], "handoff": target, "mode": "consult"}]},
            handoffs=[Handoff(target=target, modes=["consult"])],
        )

    runner = Runner(consults("b"), consults("a"))
    with pytest.raises(HandoffCycle, match="a -> b -> a"):
        await runner.run("loop")
    await runner.aclose()

    chain = [
        Agent(n, options={"rules": [{"contains": ["go"], "handoff": t}]}, handoffs=[t])
        for n, t in (("a", "b"), ("b", "c"), ("c", "a"))
    ]
    runner = Runner(*chain, max_hops=2)
    with pytest.raises(HopBudgetExceeded, match="a -> b -> c -> a"):
        await runner.run("go")
    await runner.aclose()

    alone = Runner(
        Agent("a", options={"rules": [{"contains": ["x"], "handoff": "z"}]}, handoffs=["z"])
    )
    with pytest.raises(AgentNotFound, match="'z' is not in this runner"):
        await alone.run("x")
    await alone.aclose()


async def test_served_agent_answers_through_a_real_router() -> None:
    seen: list[str] = []
    agent = billing_agent(seen)
    marks: list[str] = []

    @agent.after_turn
    def mark(turn: TurnInput, final: Final) -> None:
        marks.append(turn.conversation_id)

    config = agent.mesh_config(router={"default_agent": "billing", "store": {"kind": "memory"}})
    server, runtime = agent.server(config)
    port = await server.start("127.0.0.1", 0)
    try:
        async with create_channel(f"127.0.0.1:{port}") as direct:
            info = await AgentClient(direct).info()
        async with serve_router(config, {"billing": [f"127.0.0.1:{port}"]}) as (router, _app):
            async with create_channel(router) as channel:
                result = await AgentClient(channel, router=True).chat(
                    "Where is my invoice?", conversation_id="api-1", timeout=30
                )
    finally:
        await server.stop(0)
        await runtime.provider.aclose()
    # Info lists the decorated tool with the schema its type hints gave
    [tool] = [t for t in info.tools if t.name == "lookup_invoice"]
    assert tool.description == "Look up an invoice."
    assert dict(tool.parameters)["required"] == ["invoice_id"]
    assert info.model.provider == "offline" and info.description == "Invoices and refunds."
    assert seen == ["INV-1001"]  # the tool ran in the served agent
    assert marks == ["api-1"]  # and the hook, with the router's conversation id
    kinds = [e.WhichOneof("kind") for e in result.events]
    assert "tool_call" in kinds and "tool_result" in kinds
    [call] = [e.tool_call for e in result.events if e.WhichOneof("kind") == "tool_call"]
    assert call.name == "lookup_invoice" and dict(call.arguments) == {"invoice_id": "INV-1001"}
    final = result.final
    assert final is not None and final.agent == "billing"
    assert list(final.final.hop_path) == ["billing"]
    assert (
        final.final.content
        == "billing found: lookup_invoice: INV-1001: 42.00 EUR, paid on 2 November"
    )


SCRIPT = """
import sys
from mesh.agent import Agent

notes = Agent(
    "notes",
    description="Keeps notes.",
    options={"rules": [{"contains": ["note"], "tool": "count_words",
                        "arguments": {"text": "grpc runs over http2"}}]},
)

@notes.tool
async def count_words(text: str) -> int:
    \"\"\"Count the words of a text.\"\"\"
    print(f"tool saw: {text}", file=sys.stderr, flush=True)
    return len(text.split())

if __name__ == "__main__":
    router = sys.argv[1] if len(sys.argv) > 1 else None
    sys.exit(notes.run(host="127.0.0.1", port=0, register=router))
"""


async def _read_until(stream: asyncio.StreamReader, prefix: str) -> str:
    seen: list[bytes] = []
    while line := await asyncio.wait_for(stream.readline(), 30):
        seen.append(line)
        text = line.decode()
        if text.startswith(prefix):
            return text[len(prefix) :].strip()
    raise AssertionError(f"no line {prefix!r}: {b''.join(seen).decode()}")


async def _script(tmp_path: Path, *args: str) -> asyncio.subprocess.Process:
    script = tmp_path / "notes_agent.py"
    script.write_text(textwrap.dedent(SCRIPT))
    return await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=REPO,
    )


async def _stop(proc: asyncio.subprocess.Process) -> str:
    """SIGTERM, then the exit code must be 0 and stderr clean; returns stderr."""
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
    code = await asyncio.wait_for(proc.wait(), 30)
    assert proc.stderr is not None
    stderr = (await proc.stderr.read()).decode()
    assert code == 0, stderr
    assert "WARNING" not in stderr and "Traceback" not in stderr, stderr
    return stderr


NOTES_ROUTER = {"default_agent": "notes", "store": {"kind": "memory"}}


async def test_a_script_serves_its_agent_in_its_own_process(tmp_path: Path) -> None:
    proc = await _script(tmp_path)
    assert proc.stdout is not None
    try:
        address = await _read_until(proc.stdout, "agent notes: ")
        config = mesh_config({"notes": offline_agent("Keeps notes.")}, router=NOTES_ROUTER)
        async with serve_router(config, {"notes": [address]}) as (router, _app):
            async with create_channel(router) as channel:
                result = await AgentClient(channel, router=True).chat("take a note", timeout=30)
        assert result.final is not None and result.final.agent == "notes"
        assert result.final.final.content == "notes found: count_words: 4"
    finally:
        stderr = await _stop(proc)
    assert "tool saw: grpc runs over http2" in stderr


async def test_a_served_script_registers_with_the_router(tmp_path: Path) -> None:
    config = mesh_config({"notes": offline_agent("Keeps notes.")}, router=NOTES_ROUTER)
    async with serve_router(config, {}) as (router, _app):
        proc = await _script(tmp_path, router)
        assert proc.stdout is not None
        try:
            await _read_until(proc.stdout, "agent notes: ")
            assert await _read_until(proc.stdout, "registered: ") == router
            async with create_channel(router) as channel:
                result = await AgentClient(channel, router=True).chat(
                    "take a note", agent="notes", timeout=30
                )
            assert result.final is not None and result.final.agent == "notes"
            assert result.final.final.content == "notes found: count_words: 4"
        finally:
            await _stop(proc)
