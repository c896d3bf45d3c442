"""What the LLM is shown: screening of proposed knobs, the advice context, prompts rendered from templates."""

from __future__ import annotations

import json
import math
from functools import lru_cache
from typing import Any

from smartrun.advisor.settings import LOG_EXCERPT_CHARS, PROMPTS_DIR, AdviceKind
from smartrun.advisor.transport import LLMReply
from smartrun.contracts import Bounds, Change, KnobBound, Plan, Proposal, Rejection
from smartrun.frozen import Frozen
from smartrun.hardware import HardwareSnapshot
from smartrun.knobs import CATALOGUE
from smartrun.memory import MemoryEstimate
from smartrun.model import ModelFacts


@lru_cache(maxsize=1)
def _flag_names() -> dict[str, str]:
    """vLLM flag spellings and aliases -> catalogue name (`--max-model-len`, `-tp`)."""
    names: dict[str, str] = {}
    for knob in CATALOGUE.values():
        for spelling in (knob.flag, *knob.aliases):
            names[spelling] = knob.name
    return names


def knob_name(raw: str) -> str:
    """The catalogue name an LLM meant: accepts `max_model_len`, `--max-model-len`, `-tp`."""
    raw = str(raw).strip()
    if raw in _flag_names():
        return _flag_names()[raw]
    return raw.lstrip("-").replace("-", "_").lower()


def _off_limits(name: str, bounds: Bounds) -> str | None:
    """Why the LLM may not set this knob, or None when it may."""
    knob = CATALOGUE.get(name)
    if knob is not None and knob.security:
        return "security setting: only the user sets it"
    if knob is not None and not knob.llm_may_change:
        return "user-only knob"
    bound = bounds.knobs.get(name)
    if bound is None:
        return "unknown knob" if knob is None else "not among the tunable knobs"
    if bound.pinned:
        return f"pinned by the user to {_show(bound.choices[0] if bound.choices else bound.min)}"
    if not bound.llm_may_change:
        return f"not open to the LLM ({', '.join(bound.sources) or 'bounds'})"
    if _single_value(bound):
        return f"fixed by {', '.join(bound.sources) or 'the bounds'} ({_allowed(bound)})"
    return None


def _single_value(bound: KnobBound) -> bool:
    if bound.choices is not None:
        return len(bound.choices) == 1
    return bound.min is not None and bound.min == bound.max


def screen(proposal: Proposal, bounds: Bounds) -> tuple[Proposal, tuple[str, ...]]:
    """Keep the changes the LLM may make; the rest is returned as readable `ignored` lines."""
    kept: dict[str, Change] = {}
    ignored: list[str] = []
    for change in proposal.changes:
        name = knob_name(change.knob)
        why = _off_limits(name, bounds)
        if why:
            ignored.append(f"{change.knob}={_show(change.value)}: {why}")
            continue
        if name in kept:
            ignored.append(f"{change.knob}={_show(kept[name].value)}: superseded by a later change")
        kept[name] = Change(knob=name, value=change.value, reason=change.reason)
    return Proposal(changes=tuple(kept.values()), reason=proposal.reason, source="llm"), tuple(ignored)


def _show(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, default=str)[:80]


def _allowed(bound: KnobBound) -> str:
    if bound.choices is not None:
        return "one of " + ", ".join(_show(c) for c in bound.choices)
    low = "" if bound.min is None else f"{bound.min} <= "
    high = "" if bound.max is None else f" <= {bound.max}"
    return f"{low}x{high}" if (low or high) else "any"




class AdviceContext(Frozen):
    """Everything the LLM is told. Built by the pipeline; the advisor never reads files itself."""

    hardware: HardwareSnapshot
    model: ModelFacts
    bounds: Bounds
    baseline: Plan
    estimate: MemoryEstimate | None = None
    goal: str = "stable"
    attempts: tuple[dict, ...] = ()  # earlier launches: params, failure class, short log excerpt
    failure: dict | None = None  # recover only: class, evidence, vLLM's estimated max len, log excerpt


class LLMExchange(Frozen):
    """One round trip, as recorded: what was sent, what came back, and what became of it."""

    kind: AdviceKind
    messages: tuple[dict, ...]
    reply: LLMReply | None = None
    error: str | None = None
    proposal: Proposal | None = None
    ignored: tuple[str, ...] = ()
    rejections: tuple[Rejection, ...] = ()
    accepted: bool = False
    kept_baseline: bool = False  # the LLM answered with no change: the baseline stands, with its reason
    max_tokens: int | None = None  # what the request allowed (sized to the reply schema)
    prompt_tokens_est: int = 0  # the prompt's size in tokens, estimated before sending


class Advice(Frozen):
    """The advisor's outcome: the plan to use and the full story of how it was reached."""

    plan: Plan
    exchanges: tuple[LLMExchange, ...] = ()
    fallback_reason: str | None = None
    latency_s: float = 0.0
    tokens: tuple[int, int] = (0, 0)  # prompt, completion
    kept_baseline: bool = False  # the LLM's accepted answer changed nothing: plan is the baseline, with its reason
    budget_s: float | None = None  # --llm-timeout: the whole decision's budget
    spent_s: float = 0.0  # what the exchanges took of it


def _json_block(value: Any) -> str:
    """Indented JSON with backticks escaped, so file text cannot close the prompt's code fence."""
    return json.dumps(value, indent=2, ensure_ascii=False, default=str).replace("`", "\\u0060")


@lru_cache(maxsize=1)
def _templates() -> Any:
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(PROMPTS_DIR)),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["json"] = _json_block
    env.filters["show"] = _show
    env.filters["compact"] = lambda value: json.dumps(value, separators=(",", ":"), ensure_ascii=False,
                                                      default=str).replace("`", "\\u0060")
    return env


def render(template: str, **data: Any) -> str:
    return _templates().get_template(template).render(**data)


def _open_rows(context: AdviceContext, offered: list[str]) -> dict[str, dict[str, Any]]:
    """The knobs the LLM may change: value now, range or choices, where the limits come from."""
    rows: dict[str, dict[str, Any]] = {}
    for name in offered:
        bound = context.bounds.knobs[name]
        row: dict[str, Any] = {"now": context.baseline.params.get(name)}
        if bound.choices is not None:
            row["one_of"] = list(bound.choices)
        else:
            row.update({k: v for k, v in (("min", bound.min), ("max", bound.max)) if v is not None})
        rows[name] = row
    return rows


def _fixed_values(context: AdviceContext, offered: list[str]) -> dict[str, Any]:
    """Knobs the LLM may not change now, with the value they keep (None = vLLM's default: left out)."""
    shut = sorted(set(context.bounds.knobs) - set(offered))
    return {name: context.baseline.params[name] for name in shut if context.baseline.params.get(name) is not None}


def _hardware_data(hw: HardwareSnapshot) -> dict[str, Any]:
    """GPUs grouped by kind: one line of numbers however many GPUs there are."""
    groups: dict[tuple, dict[str, Any]] = {}
    for g in hw.gpus:
        key = (g.name, g.memory_total_mib, g.compute_capability)
        entry = groups.setdefault(key, {"count": 0, "name": g.name, "memory_gib": round(g.memory_total_mib / 1024, 1),
                                        "free_gib": round(g.memory_free_mib / 1024, 1),
                                        "compute_capability": g.compute_capability})
        entry["count"] += 1
        entry["free_gib"] = min(entry["free_gib"], round(g.memory_free_mib / 1024, 1))
    data: dict[str, Any] = {"gpus": list(groups.values())}
    if hw.nvlink_pairs:
        data["nvlink_pairs"] = len(hw.nvlink_pairs)
    return data


def _model_data(m: ModelFacts) -> dict[str, Any]:
    keep = ("name", "architecture", "num_attention_heads", "num_kv_heads", "derived_max_model_len", "sliding_window",
            "torch_dtype", "is_multimodal")
    data: dict[str, Any] = {k: getattr(m, k) for k in keep if getattr(m, k) not in (None, False)}
    if m.weight_bytes:
        data["weights_gib"] = round(m.weight_bytes / 2**30, 2)
    if m.moe is not None:
        data["moe"] = {"experts": m.moe.num_experts, "per_token": m.moe.experts_per_token}
    if m.mla is not None:
        data["mla"] = True
    if m.quantization is not None:
        data["quantization"] = {k: v for k, v in (("method", m.quantization.method),
                                                  ("weight_bits", m.quantization.weight_bits)) if v is not None}
    return data


def _estimate_data(e: MemoryEstimate | None) -> dict[str, Any] | None:
    """The baseline's budget per GPU in GiB (tokens engine-wide): what decides whether a change fits."""
    if e is None:
        return None
    keep = ("total_gib", "weights_gib", "kv_cache_gib", "kv_cache_tokens", "max_concurrency", "largest_max_model_len",
            "fits", "reason")
    return {k: getattr(e, k) for k in keep if getattr(e, k) is not None}


def _excerpt(text: Any) -> str:
    """The log's tail (lines given as a list are joined), fences defused so it stays inside its block."""
    if isinstance(text, list | tuple):
        text = "\n".join(map(str, text))
    text = str(text or "")
    return text[-LOG_EXCERPT_CHARS:].replace("```", "'''")


def prompt_data(context: AdviceContext, offered: list[str] | None = None) -> dict[str, Any]:
    """The values the templates render; nothing else reaches the prompt. `facts` is one compact JSON block."""
    failure = dict(context.failure) if context.failure else None
    log_excerpt = _excerpt(failure.pop("log_excerpt", "")) if failure else ""
    facts: dict[str, Any] = {"goal": context.goal}
    if context.estimate is not None:
        facts["vllm"] = context.estimate.vllm_version
    facts.update(_hardware_data(context.hardware))
    facts["model"] = _model_data(context.model)
    if context.estimate is not None:
        facts["estimate"] = _estimate_data(context.estimate)
    offered = offered_knobs(context, "recover" if context.failure else "propose") if offered is None else offered
    facts["open"] = _open_rows(context, offered)
    facts["fixed"] = _fixed_values(context, offered)
    if context.bounds.warnings:
        facts["warnings"] = [" ".join(str(w).split())[:160] for w in context.bounds.warnings]
    if context.attempts:
        facts["attempts"] = [dict(a) for a in context.attempts]
    return {"goal": context.goal, "facts": facts, "failure": failure, "log_excerpt": log_excerpt,
            "open": list(facts["open"])}


def open_knobs(bounds: Bounds) -> list[str]:
    return sorted(name for name in bounds.knobs if _off_limits(name, bounds) is None)


MAX_OFFERED = 3  # knobs one decision offers the LLM: a short schema keeps a small model's reply short
# The guide's order of moves, per goal (propose) and per failure (recover); open knobs not named come after,
# in the guide's general order.
_GUIDE_ORDER = ("max_model_len", "gpu_memory_utilization", "tensor_parallel_size", "max_num_seqs", "dtype",
                "enforce_eager", "optimization_level", "disable_custom_all_reduce", "max_num_batched_tokens",
                "kv_cache_dtype", "enable_prefix_caching", "enable_chunked_prefill", "pipeline_parallel_size")
_GOAL_ORDER = {
    "stable": ("max_model_len", "gpu_memory_utilization", "max_num_seqs", "tensor_parallel_size"),
    "latency": ("max_num_seqs", "max_model_len", "gpu_memory_utilization", "tensor_parallel_size"),
    "throughput": ("max_num_seqs", "gpu_memory_utilization", "max_num_batched_tokens", "tensor_parallel_size",
                   "kv_cache_dtype"),
    "long-context": ("max_model_len", "gpu_memory_utilization", "kv_cache_dtype", "max_num_seqs"),
}
_FAILURE_ORDER = {
    "oom_cuda_graph": ("enforce_eager", "optimization_level", "gpu_memory_utilization"),
    "compile_error": ("enforce_eager", "optimization_level"),
    "nccl_error": ("disable_custom_all_reduce", "tensor_parallel_size"),
    "tp_not_divisible": ("tensor_parallel_size",),
    "not_enough_gpus": ("tensor_parallel_size", "pipeline_parallel_size"),
    "dtype_unsupported": ("dtype",),
    "oom_sampler": ("max_num_seqs", "gpu_memory_utilization"),
    "oom_profiling": ("max_num_batched_tokens", "max_num_seqs", "gpu_memory_utilization"),
}
_RECOVER_ORDER = ("max_model_len", "gpu_memory_utilization", "max_num_seqs", "enforce_eager")


def offered_knobs(context: AdviceContext, kind: AdviceKind) -> list[str]:
    """The open knobs this decision offers the LLM, most important first (the guide's order for the goal, or
    for the failure when recovering), at most MAX_OFFERED: the others keep their value (shown as fixed)."""
    if kind == "recover":
        klass = str((context.failure or {}).get("class", ""))
        first = (*_FAILURE_ORDER.get(klass, ()), *_RECOVER_ORDER)
    else:
        first = _GOAL_ORDER.get(context.goal, _GOAL_ORDER["stable"])
    ranked = [*first, *_GUIDE_ORDER, *open_knobs(context.bounds)]
    chosen: list[str] = []
    for name in ranked:
        if name not in chosen and _off_limits(name, context.bounds) is None and name in context.bounds.knobs:
            chosen.append(name)
    return chosen[:MAX_OFFERED]


def initial_messages(context: AdviceContext, kind: AdviceKind) -> list[dict[str, str]]:
    data = prompt_data(context, offered_knobs(context, kind))
    return [
        {"role": "system", "content": render(f"{kind}_system.md.j2", **data)},
        {"role": "user", "content": render(f"{kind}_user.md.j2", **data)},
    ]


CHARS_PER_TOKEN = 2.8  # these prompts on SmolLM2's tokenizer (benchmarks/advisor_bench.py); GPT-class ones use fewer


def prompt_tokens(messages: list[dict] | tuple[dict, ...]) -> int:
    """About how many tokens the messages take (a few per message for the chat template): the size shown
    by --explain before the server counts it."""
    return sum(math.ceil(len(str(m.get("content") or "")) / CHARS_PER_TOKEN) + 4 for m in messages)


def _repair_turn(exchange: LLMExchange, offered: list[str]) -> list[dict[str, str]]:
    """The failed answer (as parsed, or a short head of an unusable one: a cut-off reply is not pasted back
    whole) and what was wrong with it. Only the last answer is carried, so repairs do not grow the prompt."""
    cut_off = exchange.reply is not None and exchange.reply.finish_reason == "length"
    if exchange.proposal is not None:
        said = json.dumps({"changes": [c.model_dump() for c in exchange.proposal.changes],
                           "reason": exchange.proposal.reason}, ensure_ascii=False, default=str)
    else:
        head = " ".join((exchange.reply.content if exchange.reply else "").split())[:120]
        said = f"{head} ... [{'cut off' if cut_off else 'not usable'}]"
    rejections = [r.model_dump() for r in exchange.rejections]
    content = render("repair_user.md.j2", error=exchange.error, rejections=rejections, cut_off=cut_off,
                     ignored=list(exchange.ignored), open=offered)
    return [{"role": "assistant", "content": said}, {"role": "user", "content": content}]


class _Budget:
    """The whole --llm-timeout of one decision, charged with what each call took (as the transport reported
    it, so a replay charges the recorded times and decides the same)."""

    def __init__(self, total_s: float):
        self.total_s = float(total_s)
        self.spent_s = 0.0

    def charge(self, reply: LLMReply | None) -> None:
        if reply is not None:
            self.spent_s += reply.elapsed_s or reply.latency_s

    def left(self) -> float:
        return max(0.0, self.total_s - self.spent_s)
