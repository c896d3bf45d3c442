"""Old home of the plan contracts; they live in smartrun.contracts (imported from here by modules not yet moved)."""

from smartrun.contracts import Change, Plan, PlanSource, Proposal, Rejection, gpus_used
from smartrun.frozen import Frozen

__all__ = ["Change", "Frozen", "Plan", "PlanSource", "Proposal", "Rejection", "gpus_used"]
