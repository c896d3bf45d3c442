"""The decision: propose, validate, repair at most max_repairs times, else keep the baseline; and its report."""

from __future__ import annotations

import json
from collections.abc import Callable

from smartrun.advisor.prompts import (
    Advice,
    AdviceContext,
    LLMExchange,
    _Budget,
    _repair_turn,
    _show,
    initial_messages,
    offered_knobs,
    prompt_tokens,
    screen,
)
from smartrun.advisor.reply import parse_reply, reply_max_tokens, reply_model, reply_schema
from smartrun.advisor.settings import DEFAULT_BUDGET_S, AdviceKind, ReplyParseError
from smartrun.advisor.transport import Transport, _is_json
from smartrun.contracts import Plan, Proposal, Verdict
from smartrun.errors import AdvisorError, SmartRunError


def _one_exchange(kind: AdviceKind, messages: list[dict], transport: Transport, context: AdviceContext,
                  check: Callable[[Proposal], Verdict], budget: _Budget) -> tuple[LLMExchange, Plan | None]:
    """Ask once (schema and max_tokens from the reply model), screen the reply, run the rest through `check`."""
    bounds, offered = context.bounds, offered_knobs(context, kind)
    max_tokens = reply_max_tokens(bounds, offered)
    sent = tuple(dict(m) for m in messages)
    asked = {"kind": kind, "messages": sent, "max_tokens": max_tokens, "prompt_tokens_est": prompt_tokens(sent)}
    reply = transport.complete(messages, reply_schema(bounds, offered), max_tokens=max_tokens, budget_s=budget.left())
    budget.charge(reply)
    try:
        if reply.finish_reason == "length" and not _is_json(reply.content.strip()):
            raise ReplyParseError(f"LLM reply was cut off at max_tokens={max_tokens} (finish_reason=length)")
        proposal = parse_reply(reply.content, reply_model(bounds, offered))
    except ReplyParseError as err:
        return LLMExchange(**asked, reply=reply, error=err.message), None
    usable, ignored = screen(proposal, bounds)
    if not proposal.changes:
        return LLMExchange(**asked, reply=reply, proposal=usable, accepted=True, kept_baseline=True), None
    if not usable.changes:
        error = "nothing in the reply may be changed by the LLM"
        return LLMExchange(**asked, reply=reply, error=error, proposal=usable, ignored=ignored), None
    try:
        verdict = check(usable)
    except SmartRunError as err:  # e.g. the estimator cannot budget the proposed combination
        error = f"proposal could not be checked: {err.message}"
        return LLMExchange(**asked, reply=reply, error=error, proposal=usable, ignored=ignored), None
    same = verdict.plan is not None and verdict.plan.params == context.baseline.params
    exchange = LLMExchange(**asked, reply=reply, proposal=usable, ignored=ignored, rejections=verdict.rejections,
                           accepted=verdict.accepted, kept_baseline=same)
    if not verdict.accepted or verdict.plan is None or same:
        return exchange, None
    reason = usable.reason or "LLM proposal"
    return exchange, verdict.plan.model_copy(update={"source": "llm", "reason": reason})


def rejection_text(exchange: LLMExchange) -> str:
    """Why the advisor did not use an exchange's reply, in one line (for repairs, records, fallbacks)."""
    if exchange.error:
        return exchange.error
    broken = "; ".join(f"{r.knob}={_show(r.value)} outside {r.bound} ({r.source})" for r in exchange.rejections)
    return f"rejected by the bounds: {broken}"


def _totals(exchanges: list[LLMExchange]) -> tuple[float, tuple[int, int]]:
    replies = [e.reply for e in exchanges if e.reply is not None]
    latency = round(sum(r.latency_s for r in replies), 3)
    return latency, (sum(r.prompt_tokens for r in replies), sum(r.completion_tokens for r in replies))


def _judged(transport: Transport, exchange: LLMExchange) -> None:
    """Tell a recording transport what became of its last reply (why it was not used), for the record."""
    note = getattr(transport, "judged", None)
    if callable(note):
        note(exchange)


def static_advice(baseline: Plan, reason: str) -> Advice:
    """The baseline, with the reason the LLM was not used (no LLM configured, cache hit elsewhere...)."""
    return Advice(plan=baseline, fallback_reason=reason)


def kept_reason(reason: str) -> str:
    """How a plan the LLM left as it was is explained: "the LLM kept the baseline: <its reason>"."""
    reason = " ".join(str(reason or "").split())
    return "the LLM kept the baseline" + (f": {reason}" if reason else "")


def advise(
    context: AdviceContext,
    transport: Transport,
    check: Callable[[Proposal], Verdict],
    *,
    kind: AdviceKind = "propose",
    strict: bool = False,
    max_repairs: int = 2,
    budget_s: float | None = None,
) -> Advice:
    """Ask the LLM for changes to `context.baseline`; repair rejected proposals; else fall back or raise.

    `check` is the only gate (the pipeline passes a closure over validate.check with the bounds and the
    base plan); under `strict`, anything short of an answer the validator accepts (an empty one keeps the
    baseline) raises AdvisorError (exit code 3). The whole decision keeps to `budget_s` (default: the
    transport's --llm-timeout): every request, retry and repair comes out of it, and a repair is only sent
    while some of it is left.
    """
    budget = _Budget(budget_s if budget_s is not None else getattr(transport, "budget_s", DEFAULT_BUDGET_S))
    first: list[dict] = initial_messages(context, kind)
    messages = first
    exchanges: list[LLMExchange] = []
    failure = "no attempt made"
    for attempt in range(1 + max(0, max_repairs)):
        if attempt and budget.left() <= 0:
            failure += f"; the --llm-timeout budget of {budget.total_s:g}s is spent"
            break
        try:
            exchange, plan = _one_exchange(kind, messages, transport, context, check, budget)
        except AdvisorError as err:  # transport gave up: retrying the conversation will not help
            budget.spent_s += float(getattr(err, "elapsed_s", 0.0) or 0.0)  # shown; nothing is decided on it
            sent = tuple(dict(m) for m in messages)
            exchange = LLMExchange(kind=kind, messages=sent, error=err.message, prompt_tokens_est=prompt_tokens(sent),
                                   max_tokens=reply_max_tokens(context.bounds, offered_knobs(context, kind)))
            exchanges.append(exchange)
            _judged(transport, exchange)
            failure = err.message
            break
        exchanges.append(exchange)
        _judged(transport, exchange)
        latency, tokens = _totals(exchanges)
        done = {"exchanges": tuple(exchanges), "latency_s": latency, "tokens": tokens, "budget_s": budget.total_s,
                "spent_s": round(budget.spent_s, 3)}
        if exchange.kept_baseline:
            why = kept_reason(exchange.proposal.reason if exchange.proposal else "")
            return Advice(plan=context.baseline.model_copy(update={"reason": why}), kept_baseline=True, **done)
        if plan is not None:
            return Advice(plan=plan, **done)
        failure = rejection_text(exchange)
        messages = [*first, *_repair_turn(exchange, offered_knobs(context, kind))]
    latency, tokens = _totals(exchanges)
    asked = sum(1 for e in exchanges if e.reply is not None)
    if exchanges and exchanges[-1].reply is None:  # the transport gave up
        reason = f"LLM not used: {failure}"
    else:
        reason = f"LLM advice not used after {asked} repl{'y' if asked == 1 else 'ies'}: {failure}"
    if strict:
        raise AdvisorError(f"--smart-run-strict: {reason}")
    return Advice(plan=context.baseline, exchanges=tuple(exchanges), fallback_reason=reason,
                  latency_s=latency, tokens=tokens, budget_s=budget.total_s, spent_s=round(budget.spent_s, 3))




def debug_line(advice: Advice) -> str:
    """`source=llm reason="..." latency=1.23s tokens=812/96` for --smart-run-debug."""
    reason = advice.fallback_reason if advice.plan.source != "llm" and not advice.kept_baseline else advice.plan.reason
    reason = " ".join(str(reason or "-").split())[:240]
    prompt, completion = advice.tokens
    return (f"source={advice.plan.source} reason={json.dumps(reason, ensure_ascii=False)} "
            f"latency={advice.latency_s:.2f}s tokens={prompt}/{completion}")


def exchange_line(number: int, ex: LLMExchange) -> str:
    """One exchange for --explain: outcome, prompt size (estimated, and as the server counted it), the reply's
    cap, length and finish reason, and its latency."""
    taken = ", ".join(f"{c.knob}={_show(c.value)}" for c in ex.proposal.changes) if ex.proposal else ""
    if ex.kept_baseline:
        status = kept_reason(ex.proposal.reason if ex.proposal else "")
    else:
        status = "accepted" if ex.accepted else "not accepted"
    size = f"prompt ~{ex.prompt_tokens_est} tokens"
    if ex.reply is not None:
        r = ex.reply
        size += (f" ({r.prompt_tokens} counted by the server), max_tokens {ex.max_tokens}, reply "
                 f"{r.completion_tokens} tokens, finish {r.finish_reason}, {r.latency_s:.2f}s")
    else:
        size += f", max_tokens {ex.max_tokens}, no reply"
    return (f"LLM {ex.kind} #{number}: {status}" + (f" [{taken}]" if taken and not ex.kept_baseline else "")
            + (f": {ex.error}" if ex.error else "") + f" ({size})")


def explain_lines(advice: Advice) -> list[str]:
    """One line per exchange and per ignored/rejected change, for --explain."""
    lines: list[str] = []
    for number, ex in enumerate(advice.exchanges, 1):
        lines.append(exchange_line(number, ex))
        lines.extend(f"  ignored {item}" for item in ex.ignored)
        lines.extend(f"  rejected {r.knob}={_show(r.value)}: {r.reason}"
                     + ("" if r.bound in r.reason else f" (allowed {r.bound}; {r.source})") for r in ex.rejections)
    if advice.budget_s:
        lines.append(f"LLM time: {advice.spent_s:.2f}s of the {advice.budget_s:g}s --llm-timeout budget, "
                     f"{len(advice.exchanges)} round trip(s)")
    lines.append(debug_line(advice))
    return lines
