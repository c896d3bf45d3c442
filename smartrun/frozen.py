"""The base of every model passed between stages: immutable, no unknown fields.

A module of its own so that the knob catalogue (which the contracts read) can use it too.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Frozen(BaseModel):
    """Base for data passed between stages: immutable, no unknown fields."""

    model_config = ConfigDict(frozen=True, extra="forbid")
