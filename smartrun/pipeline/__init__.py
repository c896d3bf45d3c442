"""The orchestrator: composes the stages for `model run`; decides nothing a stage should decide.

Read top-down:
(what the user asked for, RunRequest, is smartrun/request.py: the session record stores it)
- context.py   Sources (the outside world), RunResult, Recorder, RunContext (one run's state)
- planning.py  plan_stages: hardware -> model -> pins -> bounds file -> effective bounds -> baseline ->
               saved parameters -> advisor -> validate -> argv (`model run --dry-run` and `bounds show`)
- launching.py launch_stages: launch with recovery -> tune -> save the plan -> calibrate -> supervise
- recording.py every LLM exchange and launch attempt on record as it happens
- run.py       run(): plan, then launch unless a dry run; the session record is written whatever happens
- live.py      composition root for a live run: NVML or snapshots, config.json, the LLM, `vllm serve`
- replay.py    composition root for replay: a record's contents served as the sources, then compared

Recording and replaying are the same `run` with different Sources, so a record cannot drift from
what the code does.
"""

from smartrun.pipeline.context import (
    BoundsInput,
    CacheSource,
    Recorder,
    RunContext,
    RunResult,
    Sources,
    context,
    new_record,
    request_secrets,
)
from smartrun.pipeline.live import calibration_store, check_vllm_flags, live_sources
from smartrun.pipeline.planning import plan_stages
from smartrun.pipeline.replay import ReplayLauncher, ReplayResult, ReplayTransport, replay, replay_sources
from smartrun.pipeline.run import run
from smartrun.request import EventSink, RunRequest

__all__ = [
    "BoundsInput", "CacheSource", "EventSink", "Recorder", "ReplayLauncher", "ReplayResult", "ReplayTransport",
    "RunContext", "RunRequest", "RunResult", "Sources", "calibration_store", "check_vllm_flags", "context",
    "live_sources", "new_record", "plan_stages", "replay", "replay_sources", "request_secrets",
    "run",
]
