"""CLI commands of this group. TODO(owner): register the real commands."""

from __future__ import annotations


def register(subparsers) -> None:
    """Add this module's commands to `subparsers`."""
