"""``mesh chat`` asks the person at the terminal before a tool marked
``approval: required`` runs: a real ``mesh up`` and a real chat on a pseudo-terminal."""

from __future__ import annotations

from pathlib import Path

from .meshtest import QUICK_DRAIN, chat_terminal, offline_agent, start_mesh, write_config

TOOLS = '''
from pathlib import Path


def issue_refund(invoice_id: str) -> str:
    """Issue a refund (needs the user's approval).

    Args:
        invoice_id: The invoice number.
    """
    with (Path(__file__).parent / "ran.txt").open("a") as log:
        log.write(invoice_id + "\\n")
    return f"refunded {invoice_id}"
'''


def _mesh_file(tmp_path: Path) -> Path:
    (tmp_path / "payer_tools.py").write_text(TOOLS)
    front = {
        **offline_agent(rules=[{"contains": "refund", "handoff": "payer"}]),
        "handoffs": [{"target": "payer", "return": "return_to_caller"}],
    }
    front["provider"]["rules"].insert(0, {"matches": "^payer:", "reply": "front: done"})
    rules = [
        {"contains": "INV-7", "tool": "issue_refund", "arguments": {"invoice_id": "INV-7"}},
        {"contains": "INV-8", "tool": "issue_refund", "arguments": {"invoice_id": "INV-8"}},
    ]
    payer = {
        **offline_agent(rules=rules, after_tools="payer: {results}"),
        "tools": ["payer_tools:issue_refund"],
        "tool_policies": {"issue_refund": {"approval": "required"}},
    }
    return write_config(
        tmp_path,
        {
            "agents": {"front": front, "payer": payer},
            "router": {"default_agent": "front"},
            "auth": {"enabled": False},
        },
    )


def test_chat_asks_at_the_terminal_and_sends_the_answer(tmp_path: Path) -> None:
    config = _mesh_file(tmp_path)
    mesh, router, env = start_mesh(config, tmp_path / "data", QUICK_DRAIN)
    try:
        with chat_terminal(config, router, env) as term:
            term.expect(r"you> ")
            term.send("refund INV-7 please\n")
            term.expect(r"payer \(path front > payer\) wants to run issue_refund")
            term.expect(r'\{"invoice_id": "INV-7"\}')
            term.expect(r"approve\? \[y/N\]")
            term.send("y\n")
            term.expect(r"approved")
            term.expect(r"\[front\] front: done")
            term.expect(r"you> ")
            term.send("refund INV-8 too\n")
            term.expect(r"wants to run issue_refund")
            term.send("n\n")
            term.expect(r"denied")
            term.expect(r"did not approve running issue_refund: denied at the terminal")
            term.expect(r"you> ")
            term.send("/quit\n")
            assert term.wait() == 0
    finally:
        assert mesh.stop() == 0
    assert (tmp_path / "ran.txt").read_text() == "INV-7\n"  # the denied call never ran
    assert "Traceback" not in "".join(mesh.stderr)
