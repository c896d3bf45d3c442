"""Stage 4, bound: effective hard bounds (each limit with its sources); the baseline plan is sized in sizing.py.

effective bounds = vLLM's domain ∩ bounds file (global, per-model, per-GPU, goal preset)
                   ∩ hardware ∩ model ∩ estimate ∩ user pins.
Limits only: the guide's per-goal preferences live in smartrun/data/policy.toml (smartrun.policy).
A pin outside the built-in default bounds (safety margins, not limits) is kept with one warning line;
a pin outside a real limit (the user's bounds file, vLLM's domain, hardware, model, estimate) is a
PinConflictError naming both (unless force); an empty intersection is an InfeasibleError naming the
sources that clash, and when nothing fits it lists what would (smartrun.no_fit).

Choices made here: the utilization cap from free memory is taken over the GPUs of the largest
allowed tensor-parallel size (so every in-bound utilization is safe at every in-bound tp); the
max_model_len cap from the estimator is taken at the most generous in-bound plan (top utilization
and tp, fewest sequences), and combinations beyond it are left to fit_check; kv_cache_dtype is kept
to what the estimator budgets unless the user pins another; vLLM's per-model dtype rule (no float16
for gemma2/gemma3/...) may take float32 beyond the built-in choices, never beyond a user's file.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from smartrun import bounds as bounds_mod
from smartrun import cluster_plan
from smartrun.contracts import GOALS, Bounds, KnobBound
from smartrun.errors import InfeasibleError, InputError, PinConflictError
from smartrun.fit import EstimateFn, default_estimate, estimate_plan, gpu_specs, shortfall
from smartrun.gpus import (
    FLOAT16_REFUSED,
    MIN_CC,
    choose_dtype,
    describe_gpus,
    min_cc,
    select_gpus,
    tp_divides,
)
from smartrun.hardware import HardwareSnapshot
from smartrun.knobs import AUTO_MAX_MODEL_LEN, CATALOGUE, TUNING_KNOBS, Knob, pin_text
from smartrun.memory import EngineFlags, plan_safe_max_model_len
from smartrun.model import ModelFacts
from smartrun.no_fit import suggestions_text

BUSY_MARGIN = 0.02  # utilization kept back when other processes hold GPU memory
SHARED_GPU_RANGE = 0.08  # width of the built-in utilization range (0.85-0.93) kept when a shared GPU lowers it
BUSY_USED_MIB = 1024  # "other processes hold memory": listed processes, or more than this used
BUDGETED_KV_DTYPES = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2")  # what the estimator budgets and CUDA supports


@dataclass
class _Acc:
    """One knob's bound while it is being narrowed, with the source of each side."""

    knob: Knob
    min: Any = None
    max: Any = None
    choices: list[Any] | None = None
    min_src: str | None = None
    max_src: str | None = None
    choice_srcs: list[str] = field(default_factory=list)
    choice_sets: dict[str, list[Any]] = field(default_factory=dict)  # what each choice source allowed
    notes: list[str] = field(default_factory=list)
    pinned: bool = False
    recovery_min: Any = None
    recovery_choices: tuple[Any, ...] = ()
    recovery_source: str | None = None

    def contains(self, value: Any) -> bool:
        if self.choices is not None and value not in self.choices:
            return False
        if self.min is not None and value < self.min:
            return False
        return not (self.max is not None and value > self.max)

    def describe(self) -> str:
        return _bound_of(self).describe()

    def sources(self) -> list[str]:
        return list(dict.fromkeys(s for s in (*self.choice_srcs, self.min_src, self.max_src) if s))

    def _fail(self, source: str, wanted: str, against: list[str | None], note: str) -> None:
        others = ", ".join(dict.fromkeys(s for s in against if s)) or "vllm"
        why = f" ({note})" if note else ""
        raise InfeasibleError(f"{self.knob.name}: {source} requires {wanted}{why}, but {others} allows "
                              f"{self.describe()}; no value satisfies both")

    def narrow(self, source: str, note: str = "", *, lo: Any = None, hi: Any = None,
               choices: Sequence[Any] | None = None) -> None:
        if note:
            self.notes.append(f"{source}: {note}")
        if choices is not None:
            kept = [c for c in (choices if self.choices is None else self.choices) if c in choices]
            kept = [c for c in kept if self.contains(c)] if self.choices is None else kept
            if not kept:
                self._fail(source, f"one of {list(choices)}", [*self.choice_srcs, self.min_src, self.max_src], note)
            if self.choices is None or kept != self.choices:
                self.choice_srcs.append(source)
                self.choice_sets[source] = list(choices)
            self.choices = kept
        if lo is not None and (self.min is None or lo > self.min):
            if (self.max is not None and lo > self.max) or (self.choices and all(c < lo for c in self.choices)):
                self._fail(source, f">= {lo}", [self.max_src, *self.choice_srcs], note)
            self.min, self.min_src = lo, source
        if hi is not None and (self.max is None or hi < self.max):
            if (self.min is not None and hi < self.min) or (self.choices and all(c > hi for c in self.choices)):
                self._fail(source, f"<= {hi}", [self.min_src, *self.choice_srcs], note)
            self.max, self.max_src = hi, source
        if self.choices is not None and self.knob.type in ("int", "float"):
            self.choices = [c for c in self.choices if self.contains(c)]

    def culprit(self, value: Any) -> str:
        """The source whose limit excludes `value`."""
        if self.choices is not None and value not in self.choices:
            excluding = [s for s in self.choice_srcs if value not in self.choice_sets.get(s, [value])]
            return ", ".join(excluding or self.choice_srcs) or "vllm"
        if self.min is not None and value < self.min:
            return self.min_src or "vllm"
        return self.max_src or "vllm"

    def pin(self, value: Any) -> None:
        self.pinned = True
        self.choices, self.min, self.max = [value], None, None
        self.choice_srcs, self.min_src, self.max_src = ["pin"], None, None


def _bound_of(acc: _Acc) -> KnobBound:
    k = acc.knob
    numeric = k.type in ("int", "float")
    choices = tuple(acc.choices) if acc.choices is not None else None
    lo, hi = acc.min, acc.max
    if acc.pinned and numeric and acc.choices:
        choices, lo, hi = None, acc.choices[0], acc.choices[0]
    return KnobBound(
        knob=k.name, min=None if choices is not None else lo, max=None if choices is not None else hi,
        choices=choices, pinned=acc.pinned, llm_may_change=k.llm_may_change and not acc.pinned,
        sources=tuple(acc.sources()), notes=tuple(acc.notes),
        recovery_min=acc.recovery_min if acc.recovery_min is not None and (lo is None or acc.recovery_min < lo)
        else None,
        recovery_choices=tuple(c for c in acc.recovery_choices if choices is None or c not in choices),
        recovery_source=acc.recovery_source,
    )


def _domain(k: Knob) -> _Acc:
    acc = _Acc(knob=k)
    if k.type == "bool":
        acc.choices, acc.choice_srcs = [False, True], ["vllm"]
    elif k.choices is not None:
        acc.choices, acc.choice_srcs = list(k.choices), ["vllm"]
    else:
        if k.min is not None and not k.min_exclusive:
            acc.min, acc.min_src = k.min, "vllm"
        if k.max is not None:
            acc.max, acc.max_src = k.max, "vllm"
    return acc


def _apply_limit(acc: _Acc, limit: bounds_mod.Limit, extra_note: str = "") -> None:
    why = " ".join(x for x in (limit.why or "", extra_note) if x)
    numeric = acc.knob.type in ("int", "float")
    if limit.has_fixed:
        if numeric:
            acc.narrow(limit.source("fixed"), why, lo=limit.fixed, hi=limit.fixed)
        else:
            acc.narrow(limit.source("fixed"), why, choices=[limit.fixed])
        return
    if limit.choices is not None:
        acc.narrow(limit.source("choices"), why, choices=list(limit.choices))
        why = ""
    if limit.min is not None:
        acc.narrow(limit.source("min"), why, lo=limit.min)
        why = ""
    if limit.max is not None:
        acc.narrow(limit.source("max"), why, hi=limit.max)
    if limit.oom_floor is not None:
        acc.recovery_min, acc.recovery_source = limit.oom_floor, limit.source("oom_floor")
    if limit.last_resort:
        acc.recovery_choices, acc.recovery_source = limit.last_resort, limit.source("last_resort")


def _hardware_rules(accs: dict[str, _Acc], facts: ModelFacts, hw: HardwareSnapshot, warnings: list[str]) -> None:
    n = len(hw.gpus)
    cc = min_cc(hw.gpus)
    accs["tensor_parallel_size"].narrow("hardware", f"{n} usable GPU(s)", choices=list(range(1, n + 1)))
    divisors = [t for t in range(1, n + 1) if tp_divides(facts, t)]
    accs["tensor_parallel_size"].narrow(
        "model", f"must divide {facts.num_attention_heads} attention heads ({facts.num_kv_heads} KV heads)",
        choices=divisors)
    accs["pipeline_parallel_size"].narrow("hardware", f"{n} usable GPU(s)", hi=n)
    accs["data_parallel_size"].narrow("hardware", f"{n} usable GPU(s); each replica needs tp x pp of them", hi=n)
    if cc < (8, 0):
        accs["dtype"].narrow("hardware", f"bfloat16 needs compute capability >= 8.0; this GPU has {cc[0]}.{cc[1]}",
                             choices=[c for c in accs["dtype"].choices or [] if c != "bfloat16"])
        accs["dtype"].recovery_choices = tuple(c for c in accs["dtype"].recovery_choices if c != "bfloat16")
    kv = accs["kv_cache_dtype"]
    if kv.choices and (cc < (8, 9) or cc < (10, 0)):
        keep = [c for c in kv.choices if not (c.startswith("fp8") and cc < (8, 9))
                and not (c.startswith("nvfp4") and cc < (10, 0))]
        if keep != kv.choices:
            removed = [c for c in kv.choices if c not in keep]
            kv.narrow("hardware", f"no {', '.join(removed)} KV cache on compute capability {cc[0]}.{cc[1]} "
                                  f"(fp8 needs >= 8.9, nvfp4 >= 10.0)", choices=keep)
    if facts.quantization and facts.quantization.method in MIN_CC and cc < MIN_CC[facts.quantization.method]:
        need = MIN_CC[facts.quantization.method]
        raise InfeasibleError(f"{facts.name} is {facts.quantization.method}-quantized, which vLLM runs on compute "
                              f"capability >= {need[0]}.{need[1]}; {describe_gpus(hw.gpus)} has {cc[0]}.{cc[1]}")
    # no-NVLink: warned by the pipeline only when the chosen plan really splits layers over such GPUs


def _util_cap(acc: _Acc, hw: HardwareSnapshot, count: int, builtin_file: bool, warnings: list[str]) -> None:
    """vLLM refuses to start unless util x total is free: cap util by the free share, less a margin when busy.

    A person's bounds file is never relaxed; the shipped default is only the guide's advice, so on a GPU that
    other processes share, its lower limit gives way to what is really free (with a warning saying so).
    """
    gpus = select_gpus(hw, count)
    tight = min(gpus, key=lambda g: g.memory_free_mib / g.memory_total_mib)
    busy = any(g.processes or g.memory_used_mib > BUSY_USED_MIB for g in gpus)
    share = tight.memory_free_mib / tight.memory_total_mib - (BUSY_MARGIN if busy else 0.0)
    cap = int(share * 100) / 100
    held = f"; other processes hold {tight.memory_used_mib / 1024:.1f} GiB, margin {BUSY_MARGIN}" if busy else ""
    if builtin_file and acc.min is not None and cap < acc.min and acc.min_src and acc.min_src.startswith("bounds:"):
        warnings.append(f"hardware: GPU {tight.index} has only {tight.memory_free_mib / 1024:.1f} GiB free{held}; "
                        f"the built-in lower limit {acc.min} for gpu_memory_utilization ({acc.min_src}) gives way "
                        f"to {cap} (a bounds file you write is never relaxed)")
        floor = round(max(cap - SHARED_GPU_RANGE, 0.05), 2)
        acc.notes.append(f"hardware: built-in range lowered to {floor}-{cap}: the GPU is shared")
        acc.min, acc.min_src = floor, "hardware"
        if acc.recovery_min is not None and acc.recovery_min > cap:
            acc.recovery_min = None
    acc.narrow("hardware", f"GPU {tight.index} has {tight.memory_free_mib / 1024:.1f} of "
                           f"{tight.memory_total_mib / 1024:.1f} GiB free{held}; vLLM needs util x total free",
               hi=cap)


def _pin(acc: _Acc, value: Any, typed: str, force: bool, warnings: list[str]) -> None:
    k = acc.knob
    if not k.in_domain(value):
        raise InputError(f"{typed}: outside vLLM's domain {k.domain_text()}")
    if k.name == "max_model_len" and value == AUTO_MAX_MODEL_LEN:
        acc.notes.append("pin: auto, vLLM fits the context to memory at startup")
        acc.pin(value)
        return
    if not acc.contains(value):
        culprit = acc.culprit(value)
        message = f"pin {typed} conflicts with {culprit}: {k.name} must be {acc.describe()}"
        if not force:
            raise PinConflictError(f"{message} (pass --force to let the pin win)")
        warnings.append(f"{message}; --force: the pin wins")
        acc.notes.append(f"pin: forced over {culprit} ({acc.describe()})")
    acc.notes.append(f"pin: {typed}")
    acc.pin(value)


def _passed_builtin(k: Knob, value: Any, typed: str, limits: list[tuple[bounds_mod.Limit, str]]) -> list[str]:
    """A pin outside a built-in (default) bound is kept: one warning line naming the bound it passes."""
    out = []
    for limit, note in limits:
        acc = _domain(k)
        try:
            _apply_limit(acc, limit, note)
        except InfeasibleError:
            continue
        if not acc.contains(value):
            where = ", ".join(s for s in acc.sources() if s != "vllm")
            out.append(f"pin {typed} passes the built-in bound {k.name} {acc.describe()} ({where}); "
                       f"kept because you typed it")
    return out


def _model_dtype_rule(acc: _Acc, facts: ModelFacts, builtin: bool) -> None:
    """vLLM refuses float16 for some model types (numerical instability): bfloat16 or float32 instead.

    The built-in bounds allow float32 only as a last resort; for these models it is the only way vLLM runs them
    on GPUs without bfloat16, so float32 is allowed there. A bounds file you write is never widened.
    """
    if facts.model_type not in FLOAT16_REFUSED or acc.choices is None or "float16" not in acc.choices:
        return
    why = f"vLLM refuses float16 for {facts.model_type} models (numerical instability); use bfloat16 or float32"
    keep = [c for c in acc.choices if c != "float16"]
    if not keep and builtin:
        acc.notes.append(f"model: {why}; float32 allowed beyond the built-in choices")
        acc.choices, acc.choice_srcs = ["float32"], ["model"]
        acc.choice_sets = {"model": ["float32"]}
        return
    acc.narrow("model", why, choices=[c for c in ("auto", "bfloat16", "float32") if c in (acc.knob.choices or ())])


def _estimate_flags(accs: dict[str, _Acc], pins: dict[str, Any], facts: ModelFacts, hw: HardwareSnapshot,
                    ) -> EngineFlags:
    """The most generous plan inside the bounds so far: the top utilization and tp, fewest sequences."""
    def top(name: str) -> Any:
        acc = accs[name]
        return acc.choices[-1] if acc.choices else acc.max

    def low(name: str) -> Any:
        acc = accs[name]
        return acc.choices[0] if acc.choices else acc.min

    dtype = pins.get("dtype") or choose_dtype(accs["dtype"].choices, facts, hw.gpus)[0]
    kv_choices = accs["kv_cache_dtype"].choices or ["auto"]
    kv = pins.get("kv_cache_dtype") or ("auto" if "auto" in kv_choices else kv_choices[0])
    pp = low("pipeline_parallel_size") or 1
    tps = [t for t in (accs["tensor_parallel_size"].choices or [1]) if t * pp <= len(hw.gpus)] or [1]
    return EngineFlags(
        tensor_parallel_size=max(tps), pipeline_parallel_size=pp,
        gpu_memory_utilization=top("gpu_memory_utilization"), max_num_seqs=low("max_num_seqs"),
        max_num_batched_tokens=pins.get("max_num_batched_tokens"), dtype=dtype, kv_cache_dtype=kv,
        enforce_eager=bool(pins.get("enforce_eager", False)), optimization_level=pins.get("optimization_level"),
        quantization=pins.get("quantization"),
    )


def _estimate_rule(accs: dict[str, _Acc], pins: dict[str, Any], facts: ModelFacts, hw: HardwareSnapshot,
                   vllm_version: str | None, estimate_fn: EstimateFn, goal: str, warnings: list[str]) -> None:
    acc = accs["max_model_len"]
    flags = _estimate_flags(accs, pins, facts, hw)
    gpus = select_gpus(hw, flags.tensor_parallel_size * flags.pipeline_parallel_size)
    est = estimate_fn(facts, gpu_specs(gpus), flags, vllm_version)
    largest = plan_safe_max_model_len(est)
    floor = acc.min or 1
    if largest < floor <= est.largest_max_model_len:  # only the point estimate fits: try it, and say so
        warnings.append(f"estimate: {facts.name} fits {describe_gpus(gpus)} only at the estimate's point value "
                        f"({est.largest_max_model_len} tokens of context); the low end of its band holds "
                        f"{largest}: vLLM may refuse the first start, and recovery then steps down")
        largest = est.largest_max_model_len
    if largest < floor:
        so_far = Bounds(knobs={name: _bound_of(a) for name, a in accs.items()}, goal=goal, gpu_count=len(hw.gpus))
        hint = suggestions_text(so_far, facts, hw, goal, vllm_version, estimate_fn,
                                {**flags.model_dump(exclude_none=True), **pins})
        if flags.dtype == "float32" and facts.model_type in FLOAT16_REFUSED:
            hint = f" (float32: vLLM refuses float16 for {facts.model_type} and the GPU has no bfloat16){hint}"
        if largest <= 0:
            at_min = estimate_fn(facts, gpu_specs(gpus), flags.model_copy(update={"max_model_len": floor}),
                                 vllm_version)
            raise InfeasibleError(shortfall(facts, gpus, flags, at_min) + hint)
        raise InfeasibleError(
            f"{facts.name} on {describe_gpus(gpus)}: the largest max_model_len that fits at tp "
            f"{flags.tensor_parallel_size}, utilization {flags.gpu_memory_utilization} is {largest}, below the "
            f"minimum {acc.min} from {acc.min_src}{hint}")
    acc.narrow("estimate", f"largest max_model_len that fits at tp {flags.tensor_parallel_size}, utilization "
                           f"{flags.gpu_memory_utilization} is {largest}", hi=largest)


def effective_bounds(
    facts: ModelFacts,
    hardware: HardwareSnapshot,
    bounds_file: bounds_mod.BoundsFile | None,
    pins: dict[str, Any] | None,
    goal: str = "stable",
    vllm_version: str | None = None,
    force: bool = False,
    *,
    pin_flags: dict[str, str] | None = None,
    estimate_fn: EstimateFn | None = None,
) -> Bounds:
    """vLLM's domain ∩ bounds file (global, model, GPU, goal) ∩ hardware ∩ model ∩ estimate ∩ pins.

    `pins` are typed values by knob (argv.parse_user_args(...).pins); `pin_flags` how they were typed.
    """
    if goal not in GOALS:
        raise InputError(f"--goal {goal!r}: expected one of {', '.join(GOALS)}")
    if not hardware.gpus:
        raise InfeasibleError("the hardware snapshot has no GPU")
    pins = dict(pins or {})
    unknown = sorted(set(pins) - set(CATALOGUE))
    if unknown:
        raise InputError(f"unknown pinned knob(s) {unknown}")
    file = bounds_file if bounds_file is not None else bounds_mod.builtin()
    warnings: list[str] = []
    accs = {name: _domain(CATALOGUE[name]) for name in TUNING_KNOBS}
    model_names = (facts.name, facts.path and facts.path.rstrip("/").rsplit("/", 1)[-1], facts.path)
    builtin = file.path == bounds_mod.BUILTIN_NAME
    passed: dict[str, list[tuple[bounds_mod.Limit, str]]] = {}  # built-in limits a pin may pass (with a warning)
    for name, limit in bounds_mod.layered(file, model_names, tuple(g.name for g in hardware.gpus)).items():
        accs.setdefault(name, _domain(CATALOGUE[name]))
        if builtin and name in pins:
            passed.setdefault(name, []).append((limit, ""))
            continue
        _apply_limit(accs[name], limit)
    for name, limit in file.goals.get(goal, {}).items():
        accs.setdefault(name, _domain(CATALOGUE[name]))
        if builtin and name in pins:
            passed.setdefault(name, []).append((limit, f"(goal {goal})"))
            continue
        _apply_limit(accs[name], limit, f"(goal {goal})")
    _hardware_rules(accs, facts, hardware, warnings)
    _model_dtype_rule(accs["dtype"], facts, builtin and "dtype" not in pins)
    if len(hardware.nodes) > 1:  # the one call into cross-node placement: TP inside a node, PP across nodes
        nodes = accs.get("nodes")
        if "nodes" in pins:  # a pin is checked against the bounds with the other pins, later; plan with it here
            nodes = _domain(CATALOGUE["nodes"])
            nodes.narrow("pin", f"--nodes {pins['nodes']}", lo=pins["nodes"], hi=pins["nodes"])
        cluster_plan.narrow_bounds(accs, nodes, facts, hardware, pins, builtin,
                                   lambda flags: estimate_plan(flags, facts, hardware, vllm_version,
                                                               estimate_fn or default_estimate()),
                                   lambda: _estimate_flags(accs, pins, facts, hardware), vllm_version)
    accs["max_model_len"].narrow("model", f"the model's derived maximum is {facts.derived_max_model_len}",
                                 hi=facts.derived_max_model_len)
    typed = {name: pin_text(name, value) if CATALOGUE[name].secret else (pin_flags or {}).get(name)
             or pin_text(name, value) for name, value in pins.items()}
    for name, value in pins.items():
        accs.setdefault(name, _domain(CATALOGUE[name]))
        if name not in ("max_model_len", "gpu_memory_utilization"):
            _pin(accs[name], value, typed[name], force, warnings)
    if "kv_cache_dtype" not in pins:
        accs["kv_cache_dtype"].narrow("estimate", "the KV cache dtypes smartrun budgets; an explicit bfloat16/float16 "
                                                  "must equal --dtype, which auto already does",
                                      choices=list(BUDGETED_KV_DTYPES))
    tp_top = max(accs["tensor_parallel_size"].choices or [1])
    pp_low = min(accs["pipeline_parallel_size"].choices or [accs["pipeline_parallel_size"].min or 1])
    _util_cap(accs["gpu_memory_utilization"], hardware, min(tp_top * pp_low, len(hardware.gpus)),
              file.path == bounds_mod.BUILTIN_NAME, warnings)
    if "gpu_memory_utilization" in pins:
        _pin(accs["gpu_memory_utilization"], pins["gpu_memory_utilization"], typed["gpu_memory_utilization"],
             force, warnings)
    if pins.get("max_model_len") != AUTO_MAX_MODEL_LEN:
        _estimate_rule(accs, pins, facts, hardware, vllm_version, estimate_fn or default_estimate(), goal, warnings)
    if "max_model_len" in pins:
        _pin(accs["max_model_len"], pins["max_model_len"], typed["max_model_len"], force, warnings)
    for name, limits in passed.items():
        warnings += _passed_builtin(CATALOGUE[name], pins[name], typed[name], limits)
    return Bounds(knobs={name: _bound_of(acc) for name, acc in accs.items()}, goal=goal,
                  warnings=tuple(warnings), gpu_count=len(hardware.gpus), bounds_file=file.path)


def format_bounds(bounds: Bounds, notes: bool = True) -> list[str]:
    """Every bound with its sources (and why), one knob per line: for `bounds show` and --explain."""
    lines = [f"goal {bounds.goal}; bounds file {bounds.bounds_file or 'builtin'}"]
    width = max((len(n) for n in bounds.knobs), default=10)
    for name, bound in bounds.knobs.items():
        extra = ""
        if bound.recovery_min is not None or bound.recovery_choices:
            room = bound.recovery_min if bound.recovery_min is not None else list(bound.recovery_choices)
            extra = f"  [recovery may use {room}: {bound.recovery_source}]"
        who = "" if bound.llm_may_change or bound.pinned else "  (user only)"
        lines.append(f"{name:<{width}}  {bound.describe():<32}  {', '.join(bound.sources)}{who}{extra}")
        if notes:
            lines += [f"{'':<{width}}    - {note}" for note in bound.notes]
    lines += [f"warning: {w}" for w in bounds.warnings]
    return lines
