"""The LLM's step and the hook the pipeline calls after a healthy launch."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from smartrun.argv import serve_args, values_of
from smartrun.clock import SYSTEM, Clock
from smartrun.contracts import Bounds, LaunchEvent, Plan, Proposal
from smartrun.errors import SmartRunError
from smartrun.knobs import CATALOGUE
from smartrun.tune.ladder import rules_step
from smartrun.tune.loop import _default_probe, run_tuning
from smartrun.tune.report import (
    LADDER,
    Check,
    ProbeFn,
    Proposer,
    Restart,
    TuneSettings,
    TuneState,
    TuningOutcome,
)


def llm_proposer(transport: Any, *, goal: str = "throughput", facts: dict[str, Any] | None = None,
                 fallback: Proposer = rules_step, patience: int = 2,
                 on_exchange: Callable[[dict[str, Any]], None] | None = None) -> Proposer:
    """A proposer that asks the LLM (advisor Transport + parse_reply) for the next step.

    The LLM sees the bounds, the best plan, every round's measurements and the SLO. It ends tuning with an
    empty change list; the loop also ends after `patience` rounds in a row that gained under min_gain.
    When the LLM fails or proposes only knobs it may not touch, the rules take that round (said so).
    """
    from smartrun import advisor

    def propose(state: TuneState) -> Proposal | None:
        recent = [r for r in state.rounds[1:]][-patience:]
        if len(recent) == patience and all((r.gain or 0.0) < state.settings.min_gain for r in recent):
            return None
        messages = tune_messages(state, goal=goal, facts=facts or {})
        exchange: dict[str, Any] = {"kind": "tune", "round": len(state.rounds), "messages": messages}
        try:
            reply = transport.complete(messages, advisor.reply_schema(state.bounds),
                                       max_tokens=advisor.reply_max_tokens(state.bounds))
            exchange["reply"] = reply.content
            proposal, ignored = advisor.screen(advisor.parse_reply(reply.content, advisor.reply_model(state.bounds)),
                                               state.bounds)
            exchange["ignored"] = list(ignored)
        except SmartRunError as err:
            exchange["error"] = err.message
            proposal = None
        if on_exchange:
            on_exchange(exchange)
        if proposal is None or (not proposal.changes and exchange.get("ignored")):
            step = fallback(state)
            if step is None:
                return None
            why = exchange.get("error") or "only off-limits knobs proposed"
            return step.model_copy(update={"reason": f"{step.reason} (LLM: {why})"})
        if not proposal.changes:
            return None  # the LLM says tuning is done
        return proposal.model_copy(update={"source": "llm"})

    return propose


def tune_messages(state: TuneState, *, goal: str, facts: dict[str, Any]) -> list[dict[str, str]]:
    """The tune prompt pair rendered with the bounds, the best plan and the measured rounds."""
    from smartrun import advisor

    rounds = [{
        "round": r.index, "source": r.source, "changes": r.changes, "params": {k: r.params.get(k) for k in LADDER},
        "tokens_per_s": _round(r.tokens_per_s), "p95_ms": _round(r.p95_ms),
        "ttft_p95_ms": _round(r.result.ttft_p95_ms) if r.result else None,
        "errors": r.result.errors if r.result else None, "failure": r.failure, "kept": r.kept,
    } for r in state.rounds]
    bounds = {name: b.to_json() for name, b in state.bounds.knobs.items() if name in advisor.open_knobs(state.bounds)}
    best = {k: v for k, v in state.best.params.items() if not _secret(k)}  # no API key in a prompt
    data = {
        "goal": goal, "bounds": bounds, "best": best, "best_round": state.best_round,
        "rounds": rounds, "slo_p95_ms": state.settings.slo_p95_ms, "min_gain": state.settings.min_gain,
        "rounds_left": state.settings.rounds - (len(state.rounds) - 1), "load": state.settings.probe.model_dump(),
        "facts": facts, "gpu_count": state.bounds.gpu_count, "schema": advisor.reply_schema(state.bounds),
    }
    return [
        {"role": "system", "content": advisor.render("tune_system.md.j2", **data)},
        {"role": "user", "content": advisor.render("tune_user.md.j2", **data)},
    ]


def _secret(knob: str) -> bool:
    entry = CATALOGUE.get(knob)
    return entry is not None and entry.security


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def make_restart(launcher: Any, bounds: Bounds, server: Any, *, model_path: str,
                 passthrough: tuple[str, ...] = (), on_event: Callable[[LaunchEvent], None] | None = None) -> Restart:
    """restart(plan) over launch.run_with_recovery with one attempt: stops the running server, starts `plan`.

    One attempt, no recovery ladder: a configuration that does not start is the tuner's answer, not a
    problem to repair (the tuner falls back to its best known plan instead).
    """
    from smartrun import launch

    current = {"server": server}

    def restart(plan: Plan) -> tuple[bool, Any]:
        running = current["server"]
        if running is not None:
            running.stop()
            current["server"] = None
        try:
            report = launch.run_with_recovery(plan, bounds, launcher, check=lambda proposal: None, max_attempts=1,
                                              on_event=on_event or (lambda line: None), model_path=model_path,
                                              passthrough=passthrough)
        except SmartRunError as err:
            attempts = getattr(getattr(err, "report", None), "attempts", ()) or ()
            last = attempts[-1] if attempts else None
            if last is not None and getattr(last, "failure_class", None):
                return False, f"{last.failure_class}: {(last.evidence or '')[:120]}"
            return False, err.message
        current["server"] = report.server
        return True, report.server

    return restart


def _plan_api_key(plan: Plan) -> str | None:
    """A pinned --api-key travels in the plan (catalogue knob api_key, a tuple of keys)."""
    key = plan.params.get("api_key")
    if isinstance(key, (list, tuple)):
        key = key[0] if key else None
    return str(key) if key else None


def api_key_of(argv: tuple[str, ...] | list[str]) -> str | None:
    """The first key of vLLM's --api-key (any spelling, several keys) the probe must send, or None."""
    keys = values_of(argv, "api_key")
    return keys[0] if keys else None


def launch_inputs(request: Any, facts: Any) -> tuple[str, tuple[str, ...]]:
    """(model path, passthrough args) as the pipeline builds them, for a hook call that did not pass them."""
    _, passthrough = serve_args(getattr(request, "user_args", ()) or (), getattr(request, "extra_args", ()) or (),
                                host=getattr(request, "host", None), port=getattr(request, "port", None))
    return str(getattr(facts, "path", None) or getattr(request, "model", "")), passthrough


def tune_after_launch(*, request: Any, plan: Plan, bounds: Bounds, server: Any, restart: Restart | None = None,
                      launcher: Any = None, check: Check | None = None, settings: TuneSettings | None = None,
                      transport: Any = None, facts: Any = None, on_event: Callable[[str, str], None] | None = None,
                      probe: ProbeFn | None = None, model_path: str | None = None,
                      passthrough: tuple[str, ...] | None = None, clock: Clock = SYSTEM,
                      **_: Any) -> TuningOutcome | dict[str, Any]:
    """The pipeline's --tune hook: tune the healthy `server`, return the outcome (report + running server).

    Needs `restart` (or a `launcher` to build one with make_restart, with the pipeline's `model_path` and
    `passthrough`; without them they are rebuilt from the request the way the pipeline builds them);
    settings come from `settings`, else from `request.tune_options` (TuneSettings fields), else the defaults.
    """
    emit = on_event or (lambda kind, text: print(text))
    if restart is None and launcher is None:
        emit("warning", "--tune: no way to restart the server was handed to the tuner; skipped")
        return {"skipped": "no restart callable"}
    if settings is None:
        options = getattr(request, "tune_options", None) or {}
        settings = TuneSettings(**options) if options else TuneSettings()
    if getattr(request, "goal", None) == "latency" and settings.slo_p95_ms is None:
        emit("warning", "--tune raises tokens/s; with --goal latency set --slo-p95-ms to cap the p95 latency")
    derived_path, derived_passthrough = launch_inputs(request, facts)
    passthrough = derived_passthrough if passthrough is None else tuple(passthrough)
    if restart is None:
        restart = make_restart(launcher, bounds, server, model_path=model_path or derived_path,
                               passthrough=passthrough, on_event=lambda line: emit("launch", str(line)))
    probe = probe or _default_probe(settings, api_key=_plan_api_key(plan) or api_key_of(passthrough), clock=clock)
    propose: Proposer | None = None
    exchanges: list[dict[str, Any]] = []
    if transport is not None and getattr(request, "smart_run", False):
        model = {"name": getattr(facts, "name", None), "architecture": getattr(facts, "architecture", None)}
        propose = llm_proposer(transport, goal=getattr(request, "goal", "throughput"), facts=model,
                               on_exchange=exchanges.append)
    outcome = run_tuning(plan, bounds, server, restart, settings, check=check, probe=probe, propose=propose,
                         say=lambda line: emit("tune", line))
    if exchanges:
        report = outcome.report.model_copy(update={"llm_exchanges": tuple(exchanges)})
        outcome = TuningOutcome(report=report, server=outcome.server)
    return outcome
