"""Stage 6, validate: bounds + a proposal -> an accepted Plan, or the list of rejections. Never clamps.

CONTRACT. TODO(helper-bounds): check().
"""

from __future__ import annotations

from smartrun.plan import Frozen, Plan, Rejection


class Verdict(Frozen):
    plan: Plan | None  # None when anything was rejected
    rejections: tuple[Rejection, ...] = ()

    @property
    def accepted(self) -> bool:
        return self.plan is not None
