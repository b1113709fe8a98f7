"""Helpers shared by the provider tests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

from mesh.providers.base import (
    ChatMessage,
    ModelEvent,
    ModelRequest,
    Provider,
    Stop,
    TextDelta,
    ToolCall,
    ToolCallRequest,
    ToolSpec,
    UsageReport,
)

WEATHER = ToolSpec(
    name="get_weather",
    description="Current weather in a city.",
    parameters={
        "type": "object",
        "properties": {"city": {"type": "string", "description": "City name"}},
        "required": ["city"],
    },
)
TRANSFER_BILLING = ToolSpec(
    name="transfer_to_billing",
    description="Hand the conversation to the billing agent.",
    parameters={
        "type": "object",
        "properties": {
            "reason": {"type": "string"},
            "message": {"type": "string"},
        },
        "required": ["reason"],
    },
)


def ask(text: str, *, tools: Sequence[ToolSpec] = (), conversation: str = "") -> ModelRequest:
    return ModelRequest(
        system="You are a helpful agent.",
        messages=[ChatMessage(role="user", content=text)],
        tools=tools,
        conversation_id=conversation,
        agent="helper",
    )


def with_tool_result(
    first: ModelRequest, call: ToolCallRequest, result: str, *, text: str = ""
) -> ModelRequest:
    """The follow-up request after the model called ``call`` and the tool answered."""
    return ModelRequest(
        system=first.system,
        messages=[
            *first.messages,
            ChatMessage(role="assistant", content=text, tool_calls=(call,)),
            ChatMessage(role="tool", content=result, tool_call_id=call.id, name=call.name),
        ],
        tools=first.tools,
        conversation_id=first.conversation_id,
        agent=first.agent,
    )


async def collect(stream: AsyncIterator[ModelEvent]) -> list[ModelEvent]:
    return [event async for event in stream]


def text_of(events: Sequence[ModelEvent]) -> str:
    return "".join(e.text for e in events if isinstance(e, TextDelta))


def deltas(events: Sequence[ModelEvent]) -> list[str]:
    return [e.text for e in events if isinstance(e, TextDelta)]


def calls_of(events: Sequence[ModelEvent]) -> list[ToolCallRequest]:
    return [e.call for e in events if isinstance(e, ToolCall)]


def stop_of(events: Sequence[ModelEvent]) -> str:
    assert isinstance(events[-1], Stop), events
    return events[-1].reason


def usage_of(events: Sequence[ModelEvent]) -> UsageReport:
    found = [e for e in events if isinstance(e, UsageReport)]
    assert len(found) == 1, events
    return found[0]


async def start_and_cancel(provider: Provider, request: ModelRequest) -> list[ModelEvent]:
    """Consume in a task until the first event, then cancel the task."""
    seen: list[ModelEvent] = []
    first = asyncio.Event()

    async def consume() -> None:
        async for event in provider.stream(request):
            seen.append(event)
            first.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first.wait(), 5.0)
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=5.0)
    assert task in done, "the stream did not stop on cancel"
    assert task.cancelled()
    return seen
