"""Return strategies: what happens once a TRANSFER's target has answered.

``bubble_up`` and ``end_conversation`` leave the turn with the target (the latter
ends the conversation after it answered); ``continue_chain`` lets the target's
answer feed the sequence's next step (the engine's loop does that);
``return_to_caller`` hands control back to the agent that handed off, with the
target's answer as its message, after the target (and whoever it transferred to)
finished, with a hop that counts like any other. Agents waiting for control to
come back form a stack: a TRANSFER to one of them is a cycle.
"""

from __future__ import annotations

from mesh.providers.base import ChatMessage
from mesh.router._turn import Hops, Outcome, TurnState
from mesh.v1 import types_pb2

TRANSFER = types_pb2.HANDOFF_MODE_TRANSFER


async def follow(
    router: Hops, state: TurnState, outcome: Outcome, user: ChatMessage, waiting: list[str]
) -> Outcome:
    """Follow TRANSFERs from ``outcome`` by their return strategies until one answers.

    ``waiting`` holds the agents waiting for control to come back
    (``return_to_caller``), innermost last: handing the turn to one of them is a
    cycle, refused like a CONSULT cycle.
    """
    ending = False
    while outcome.transfer is not None and not outcome.ended:
        caller = outcome.agent
        target = outcome.transfer.target
        router.core.check_return_cycle(waiting, caller, target)
        strategy = router.core.return_strategy(caller, target)
        answered = await router.transfer(state, outcome, user)
        if strategy != "return_to_caller":
            outcome = answered
            outcome.strategy = strategy
            ending = ending or strategy == "end_conversation"
            continue
        answered = await follow(router, state, answered, user, [*waiting, caller])
        if answered.ended:
            return answered
        outcome = await give_back(router, state, answered, caller, user, outcome)
    if ending:
        outcome.ended = True
    return outcome


async def give_back(
    router: Hops,
    state: TurnState,
    answered: Outcome,
    caller: str,
    user: ChatMessage,
    before: Outcome,
) -> Outcome:
    """Give control back to ``caller`` with the target's answer (``return_to_caller``)."""
    assert answered.final is not None and before.final is not None
    source = answered.agent
    to = caller
    router.core.take_handoff(state.budget, source, to, None)
    reason = f"{source} answered and returned control (return_to_caller)"
    state.emit(
        types_pb2.ChatEvent(
            agent=source,
            handoff=types_pb2.HandoffEvent(
                target=to,
                mode=TRANSFER,
                reason=reason,
                return_strategy=types_pb2.RETURN_STRATEGY_RETURN_TO_CALLER,
            ),
        )
    )
    history = [*state.history, user]
    if before.final.content:
        history.append(ChatMessage("assistant", before.final.content, agent=to))
    message = answered.final.content or f"{source} gave no answer"
    outcome = await router.hand_over(state, source, to, reason, message, history)
    outcome.strategy = "return_to_caller"
    return outcome
