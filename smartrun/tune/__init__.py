"""Stable first, then faster: measure the healthy server, step inside the bounds, keep what helps.

A round is: propose one step (the LLM with the measurements and the history, or the guide's throughput
ladder when no LLM is set) -> the validator -> restart the server with it -> probe. The best
configuration that meets the SLO (p95 latency) is kept; a failed restart falls back to the best known
configuration so the user is never left without a server. The report (a frozen TuningReport) goes to
the session record and, for the chosen plan, to the saved-parameters cache.

The loop knows nothing about how servers start: the pipeline hands it `restart(plan) -> (ok, server)`,
a `check(proposal, base) -> Verdict` (validate.check over the bounds) and, optionally, a probe function;
the benchmark drives the same loop with the stand-in's perf model in-process.
"""

from __future__ import annotations

from smartrun.tune.hook import api_key_of, llm_proposer, tune_after_launch
from smartrun.tune.ladder import rules_step
from smartrun.tune.loop import _default_probe, run_tuning
from smartrun.tune.options import TUNE_OPTIONS, add_arguments, settings_from_args
from smartrun.tune.report import LADDER, UTIL_STEP, TuneRound, TuneSettings, TuneState, short

__all__ = [
    "LADDER",
    "TUNE_OPTIONS",
    "UTIL_STEP",
    "TuneRound",
    "TuneSettings",
    "TuneState",
    "_default_probe",
    "add_arguments",
    "api_key_of",
    "llm_proposer",
    "rules_step",
    "run_tuning",
    "settings_from_args",
    "short",
    "tune_after_launch",
]
