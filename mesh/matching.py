"""Text conditions shared by CONDITIONAL routes and the offline model's rules."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, field_validator


class TextCondition(BaseModel):
    """Words or a regular expression to look for in a message (case-insensitive)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    contains: list[str] = Field(default_factory=list)
    """Any of these words or phrases."""
    matches: str | None = None
    """A regular expression, searched."""

    @field_validator("contains", mode="before")
    @classmethod
    def _one_or_many(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value

    @field_validator("matches")
    @classmethod
    def _regex(cls, value: str | None) -> str | None:
        if value is not None:
            re.compile(value)
        return value

    def contains_any(self, text: str) -> bool:
        lowered = text.lower()
        return any(word.lower() in lowered for word in self.contains)

    def matches_pattern(self, text: str) -> bool:
        return self.matches is not None and re.search(self.matches, text, re.I) is not None
