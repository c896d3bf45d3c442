"""CLI: `session show|list|replay` and `model smart-run-cache list|rm`. TODO(owner-session)."""

from __future__ import annotations


def register(subparsers) -> None:
    """Add `session ...` commands."""


def register_cache(model_subparsers) -> None:
    """Add `model smart-run-cache ...` commands."""
