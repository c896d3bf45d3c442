"""The planning stages: hardware, model, pins, bounds, baseline, saved parameters, advisor, argv."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from smartrun import (
    advisor,
    calibration,
    cluster,
    cluster_plan,
    fit,
    hardware,
    knobs,
    memory,
    ray_cluster,
    rules,
    sizing,
    validate,
)
from smartrun import argv as argv_mod
from smartrun import hardware as hw_mod
from smartrun.contracts import Change, Plan, Proposal
from smartrun.errors import AdvisorError, ClusterError, InfeasibleError, InputError, SmartRunError
from smartrun.fit import flags_from_params
from smartrun.gpus import select_gpus
from smartrun.hardware import HardwareSnapshot
from smartrun.knobs import CATALOGUE
from smartrun.memory import Correction
from smartrun.model import ModelFacts
from smartrun.pipeline.context import Recorder, RunContext, RunResult, Sources
from smartrun.pipeline.recording import RecordingTransport
from smartrun.plan_cache import CacheKey
from smartrun.request import RunRequest
from smartrun.secrets import redact_argv
from smartrun.session import (
    AdviceRecord,
    AdviceStep,
    BoundsFileRecord,
    CacheRecord,
    RecordError,
    VllmRecord,
    to_jsonable,
)


def plan_stages(ctx: RunContext) -> None:
    """Everything up to the argv: hardware, model, pins, bounds file, effective bounds, baseline, saved
    parameters and the advisor (with --smart-run), then the argv and the estimate of the chosen plan.

    `model run --dry-run` stops here; `bounds show` is this with the request its options make.
    """

    request, sources, rec, result = ctx.request, ctx.sources, ctx.rec, ctx.result
    record = rec.record
    if request.tune and request.dry_run:  # else --tune in a dry run is ignored without a word
        rec.warn("--tune: a dry run starts no server, so nothing is tuned")
    hw = sources.hardware()
    record.hardware = hw
    rec.decide("hardware", hw_mod.fingerprint(hw), hw.source)
    hw = _visible_gpus(request, hw, rec)
    result.hardware = hw

    facts = record.model = sources.model(request.model)
    rec.decide("model", {"name": facts.name, "architecture": facts.architecture,
                         "weight_bytes": facts.weight_bytes}, facts.weight_bytes_source or "config")

    _refuse_planned_knobs_after_dashdash(request.extra_args)
    pins, passthrough = argv_mod.serve_args(request.user_args, request.extra_args, host=request.host, port=request.port)
    passthrough = (*passthrough, *_served_name_args(request, facts, pins, passthrough))
    ctx.pins, ctx.passthrough = pins, tuple(passthrough)
    rec.decide("pins", pins, "user")

    bounds_in = sources.bounds()
    record.bounds_file = BoundsFileRecord(path=bounds_in.path, text=bounds_in.text, sha256=bounds_in.sha256,
                                          builtin=bounds_in.builtin)
    if bounds_in.path and not request.bounds_path and not sources.replaying:  # found by searching upward
        ctx.on_event("bounds", f"bounds file in force: {bounds_in.path} (smartrun.toml found from {Path.cwd()}; "
                               "--bounds FILE picks another)")
    for line in getattr(bounds_in.loaded, "ineffective", lambda: [])():
        rec.warn(line)
    version, vllm_bin = sources.vllm()
    ctx.version = version
    record.vllm = VllmRecord(version=version, bin=vllm_bin)
    if version is None:
        rec.warn("no vLLM version known (vllm not found, no --vllm-version): planning with the estimator's "
                 "default profile")

    correction = _calibration(sources, rec, hw, version)
    estimate_fn = calibration.estimator(correction)
    try:
        bounds = rules.effective_bounds(facts, hw, bounds_in.loaded, pins, request.goal, vllm_version=version,
                                        force=request.force, estimate_fn=estimate_fn)
    except InfeasibleError as err:  # a model too big for these nodes: say how many would hold it
        raise InfeasibleError(cluster_plan.refusal(err.message, facts, hw, pins, version)) from err
    record.bounds = bounds
    for warning in bounds.warnings:
        rec.warn(warning)
    rec.decide("bounds", bounds.to_json(), bounds_in.path or "builtin")

    try:
        baseline, base_estimate = sizing.baseline(bounds, facts, hw, request.goal, vllm_version=version,
                                                 estimate_fn=estimate_fn)
    except InfeasibleError as err:
        raise InfeasibleError(cluster_plan.refusal(err.message, facts, hw, pins, version)) from err
    baseline = record.baseline = cluster_plan.finish_plan(baseline, hw, pins)
    record.baseline_estimate = base_estimate
    rec.decide("baseline", baseline.params, provenance_line(baseline))

    ctx.fit = fit.fit_check(facts, hw, version, estimate_fn=estimate_fn)
    plan = baseline
    ctx.key = result.cache_key = CacheKey(
        model=facts.name, hardware_fingerprint=hw_mod.fingerprint(hw), bounds_sha256=bounds_in.sha256,
        vllm_version=version, goal=request.goal)
    if request.smart_run:
        plan = _from_cache(ctx)
        if plan.source != "cache":
            plan = _advise(ctx)
    record.final_plan = plan
    rec.decide("plan", {"source": plan.source, "params": plan.params}, provenance_line(plan))
    _warn_without_nvlink(plan, hw, rec)

    ctx.model_path = facts.path or request.model
    argv = knobs.build_argv(ctx.model_path, plan.params, ctx.passthrough)
    record.final_argv = redact_argv(argv)
    record.estimate = estimate_for(plan, facts, hw, version, correction)
    if cluster.is_cluster(hw):  # which node holds which stage, with each stage's memory
        result.placement = cluster_plan.placement(facts, hw, plan.params, version, correction)
    rec.decide("argv", result.argv, plan.source)


def _visible_gpus(request: RunRequest, hw: HardwareSnapshot, rec: Recorder) -> HardwareSnapshot:
    """The machine restricted to the GPUs the user allows (--gpus, CUDA_VISIBLE_DEVICES: hardware.allowed_gpus).

    A dry run against a --hardware snapshot plans for the machine it describes, so this machine's
    CUDA_VISIBLE_DEVICES does not apply there (said once). vLLM then sees the allowed GPUs as cuda:0.. and
    the launch sets CUDA_VISIBLE_DEVICES to the ones the plan uses.
    """

    visible = request.visible_devices
    if len(hw.nodes) > 1:  # a cluster: Ray gives each worker its GPU on its node; whole nodes are planned
        if request.gpus is not None:
            raise InputError(f"--gpus {request.gpus}: a plan across nodes uses whole nodes; pass the snapshots of "
                             f"the nodes to use instead")
        if visible is not None:
            rec.warn(f"CUDA_VISIBLE_DEVICES={visible} of this machine ignored: the plan spans a cluster's nodes")
        return hw
    if visible is not None and request.dry_run and request.hardware_path:
        rec.warn(f"CUDA_VISIBLE_DEVICES={visible} of this machine ignored: the dry run plans for "
                 f"{request.hardware_path} (use --gpus to restrict it)")
        visible = None
    hw = hardware.allowed_gpus(hw, request.gpus, visible)
    if hw.physical_indices:
        source = "--gpus" if request.gpus is not None else "CUDA_VISIBLE_DEVICES"
        rec.decide("gpus", {"visible": list(hw.physical_indices), "fingerprint": hardware.fingerprint(hw)}, source)
    return hw


def check_cluster(request: RunRequest, hw: HardwareSnapshot, plan: Plan) -> None:
    """Before a launch: a plan across nodes needs a Ray cluster that is up and holds it."""

    spans = cluster.is_cluster(hw) and cluster_plan.placement_nodes(hw, plan.params) > 1
    if request.ray_address:
        ray_cluster.check_live(hw, plan.params, request.ray_address)
    elif spans:
        starts = "; ".join(ray_cluster.ray_start_commands(hw, cluster_plan.placement_nodes(hw, plan.params)))
        raise ClusterError(f"the plan spans {cluster_plan.placement_nodes(hw, plan.params)} nodes and starts on a Ray "
                           f"cluster: pass --ray-address HEAD:PORT (to bring the cluster up run: {starts})")


def _refuse_planned_knobs_after_dashdash(extra_args: tuple[str, ...]) -> None:
    """A knob smartrun plans, typed after `--`, would silently override the plan in vLLM (the last flag wins),
    so the plan, its estimate and its bounds would describe another launch. Typed before `--` it is a pin."""
    if not extra_args:
        return

    planned = [name for name in argv_mod.parse_user_args(list(extra_args)).pins if name in knobs.TUNING_KNOBS]
    if planned:
        flags = ", ".join(knobs.CATALOGUE[name].flag for name in planned)
        raise InputError(f"{flags} after `--` would override the plan; put it before `--` to pin it")


def _warn_without_nvlink(plan: Plan, hw: HardwareSnapshot, rec: Recorder) -> None:
    """Tensor parallelism over GPUs without NVLink is slow (and vLLM's custom all-reduce unsafe): say so, but
    only when the plan really splits layers (tp > 1); at tp 1 there is no all-reduce to speak of."""

    tp, pp = (int(plan.params.get(k) or 1) for k in ("tensor_parallel_size", "pipeline_parallel_size"))
    if tp < 2:
        return
    try:
        gpus = select_gpus(hw, tp * pp)
    except SmartRunError:
        return
    groups = [gpus[i:i + tp] for i in range(0, len(gpus), tp)]  # the all-reduce runs inside each stage's TP group
    if all(hw.nvlinked(a.index, b.index) for g in groups for i, a in enumerate(g) for b in g[i + 1:]):
        return
    names = ", ".join(str(hardware.physical_index(hw, g.index)) for g in gpus)
    all_reduce = " vLLM's custom all-reduce is disabled." if plan.params.get("disable_custom_all_reduce") else ""
    rec.warn(f"no NVLink between GPUs {names}: tensor parallel {tp} runs its all-reduce over PCIe (slower).{all_reduce}")


def _served_name_args(request: RunRequest, facts: ModelFacts, pins: dict[str, Any],
                      passthrough: tuple[str, ...]) -> tuple[str, ...]:
    """`--served-model-name REPO` when MODEL was given as a Hugging Face repo id, so clients ask for the model by
    the name they know (vLLM would list the cache snapshot's path) - unless the user named it."""
    given_as_repo_id = "/" in request.model and facts.name == request.model  # model.inspect names a cached repo so
    named = "served_model_name" in pins or argv_mod.has(argv_mod.tokenize(passthrough), "served_model_name")
    return ("--served-model-name", request.model) if given_as_repo_id and not named else ()


def provenance_line(plan: Plan) -> str:
    return "; ".join(f"{k}: {v}" for k, v in sorted(plan.provenance.items()))


def estimate_for(plan: Plan, facts: ModelFacts, hw: HardwareSnapshot, version: str | None,
                  correction: Correction | None = None) -> Any:
    """The estimator's numbers for the chosen plan, on the GPUs the rules would pick."""

    flags = flags_from_params(plan.params)
    n = max(1, flags.tensor_parallel_size * flags.pipeline_parallel_size)
    gpus = [memory.GpuSpec.from_gpu(g) if not isinstance(g, memory.GpuSpec) else g
            for g in select_gpus(hw, n)]
    return memory.estimate(facts, gpus, flags, version, calibration=correction)


# ---------------------------------------------------------------------------- calibration


def _calibration(sources: Sources, rec: Recorder, hw: HardwareSnapshot, version: str | None) -> Correction | None:
    """This machine's correction (replay: the recorded one), on record and as a decision when there is one.

    Unusable calibration data is a warning, never a failed run: the plan is then made uncalibrated. A bad
    --vllm-version is the run's own error (one line), raised here rather than also warned about.
    """
    memory.resolve_version(version)
    try:
        correction = sources.calibration.correction(*calibration.key(hw, version))
    except RecordError:  # replay: a hand-edited recorded correction fails like every other recorded part
        raise
    except SmartRunError as err:
        rec.warn(f"calibration not used: {err.message}")
        correction = None
    for problem in getattr(sources.calibration, "problems", []) or []:
        rec.warn(problem)
    rec.record.calibration.used = correction
    if correction is not None:
        rec.decide("calibration", {"machine": correction.machine, "vllm_version": correction.vllm_version,
                                   "startups": correction.startups, "non_kv_gib": correction.non_kv_gib,
                                   "rule": correction.rule}, correction.describe())
    return correction


def _from_cache(ctx: RunContext) -> Plan:
    """A saved plan for this key, re-validated against today's bounds; the baseline when none is usable."""

    request, sources, rec, result = ctx.request, ctx.sources, ctx.rec, ctx.result
    bounds, baseline, fit, key = ctx.bounds, ctx.baseline, ctx.fit, ctx.key
    assert bounds is not None and baseline is not None and key is not None
    record = rec.record
    record.cache = CacheRecord(key=key, looked_up=not request.refresh)
    if request.refresh:
        record.cache.note = "ignored (--smart-run-refresh)"
        rec.decide("cache", {"looked_up": False}, "--smart-run-refresh")
        return baseline
    entry = sources.cache.lookup(key)
    for problem in getattr(sources.cache, "problems", []) or []:
        rec.warn(problem)
    if entry is None:
        rec.decide("cache", {"hit": False}, "saved-parameters")
        return baseline
    record.cache.hit = True
    record.cache.entry = entry
    saved, hidden = without_security(Plan(params=entry.params, provenance=entry.provenance))
    ignored = sorted(hidden & set(entry.params))
    if ignored:  # smartrun never saves these: the entry was edited; say so rather than drop them silently
        rec.warn(f"saved parameters for {key.model} carry security settings that are never saved, ignored: "
                 f"{', '.join(ignored)} (edited entry? `model smart-run-cache rm {key.model}` forgets it)")
    changes = tuple(Change(knob=k, value=v, reason=f"saved {entry.saved_at} ({entry.provenance.get(k, entry.source)})")
                    for k, v in sorted(saved.params.items()) if baseline.params.get(k, _MISSING) != v)
    # a plan the recovery ladder reached (e.g. utilization on the OOM floor) is proof this machine needs that
    # room: re-check it with the room the bounds grant recovery, or every run would OOM and recover again
    checked_as = "recovery" if entry.source == "recovery" else "cache"
    verdict = validate.check(bounds, baseline, Proposal(changes=changes, reason="saved parameters",
                                                        source=checked_as), fit_check=fit)
    rejected = [to_jsonable(r) for r in verdict.rejections]
    result.rejected.extend(rejected)
    if not verdict.accepted:
        record.cache.note = "saved plan no longer inside today's bounds; not used"
        rec.warn(f"saved parameters for {key.model} rejected by today's bounds: "
                 + "; ".join(f"{r['knob']}={r['value']!r} ({r['reason']})" for r in rejected))
        rec.decide("cache", {"hit": True, "accepted": False, "rejected": rejected}, "saved-parameters")
        return baseline
    assert verdict.plan is not None
    plan = Plan(params=verdict.plan.params, source="cache", provenance={
        **verdict.plan.provenance, **{c.knob: f"cache: {c.reason}" for c in changes}}, reason="saved parameters")
    record.cache.note = "saved plan re-validated against today's bounds"
    result.debug_lines.append(f'source=cache reason="saved {entry.saved_at} ({entry.source}), re-validated against '
                              f'today\'s bounds" latency=0.00s tokens=0/0')
    rec.decide("cache", {"hit": True, "accepted": True, "params": plan.params}, "saved-parameters")
    return plan


_MISSING = object()


# ---------------------------------------------------------------------------- advisor


def _advise(ctx: RunContext) -> Plan:
    """The LLM's proposal through the validator; the baseline (source=static) when no LLM is configured."""
    request, sources, rec, result = ctx.request, ctx.sources, ctx.rec, ctx.result
    bounds, baseline, fit = ctx.bounds, ctx.baseline, ctx.fit
    hw, facts = result.hardware, result.facts
    assert bounds is not None and baseline is not None and hw is not None and facts is not None
    if sources.transport is None:
        if request.strict:
            raise AdvisorError("--smart-run-strict: no LLM configured (set --llm-base-url or SMARTRUN_LLM_BASE_URL)")
        text = ("--smart-run: no LLM configured (set --llm-base-url or SMARTRUN_LLM_BASE_URL); "
                "using the baseline plan (source=static)")
        rec.warn(text)
        rec.record.advice.append(AdviceRecord(kind="propose", source="static", reason="no LLM configured",
                                              fallback="no LLM configured"))
        rec.decide("advice.propose", {"source": "static", "reason": "no LLM configured"}, "no-llm")
        result.debug_lines.append("source=static reason=no LLM configured")
        return baseline

    transport = RecordingTransport(sources.transport, rec, sources.clock.monotonic)
    transport.kind = "propose"
    context = advice_context(request, bounds, baseline, ctx.base_estimate, hw, facts, attempts=())

    def check(proposal: Proposal) -> Any:
        return validate.check(bounds, baseline, proposal, fit_check=fit)

    advice = advisor.advise(context, transport, check, kind="propose", strict=request.strict)
    return take_advice(advice, rec, result, baseline, "propose")


def _llm_view(bounds: Any, plan: Plan) -> tuple[Any, Plan]:
    """Bounds and plan without security knobs (api key, host, ...): the LLM cannot change them and must
    not see their values (a served --api-key would otherwise go into the prompt)."""
    view_plan, hidden = without_security(plan)
    view_bounds = bounds.model_copy(update={"knobs": {k: v for k, v in bounds.knobs.items() if k not in hidden}})
    return view_bounds, view_plan


def without_security(plan: Plan) -> tuple[Plan, set[str]]:
    """The plan without security knobs, and the names removed."""

    hidden = {name for name, k in CATALOGUE.items() if k.security}
    kept = Plan(params={k: v for k, v in plan.params.items() if k not in hidden}, source=plan.source,
                provenance={k: v for k, v in plan.provenance.items() if k not in hidden}, reason=plan.reason)
    return kept, hidden


def advice_context(request: RunRequest, bounds: Any, base: Plan, estimate: Any, hw: HardwareSnapshot,
                    facts: ModelFacts, attempts: tuple[Any, ...] = (), failure: dict | None = None) -> Any:
    bounds, base = _llm_view(bounds, base)
    attempts = tuple({**a, "params": _llm_view(bounds, Plan(params=a.get("params", {})))[1].params}
                     if isinstance(a, dict) else a for a in attempts)
    return advisor.AdviceContext(hardware=hw, model=facts, bounds=bounds, baseline=base, estimate=estimate,
                                 goal=request.goal, attempts=tuple(to_jsonable(a) for a in attempts),
                                 failure=to_jsonable(failure) if failure is not None else None)


def take_advice(advice: Any, rec: Recorder, result: RunResult, base: Plan, kind: str) -> Plan:
    """Record what the advisor concluded (each proposal, its validation) and return its plan."""

    plan = advice.plan if advice.plan is not None and advice.plan.source == "llm" else base  # the full base
    if advice.kept_baseline:  # the LLM's answer: no change. Said so, with its reason, not as source=llm
        plan = base.model_copy(update={"reason": advice.plan.reason})
    steps = [AdviceStep(proposal=ex.proposal, ignored=list(ex.ignored), rejections=list(ex.rejections),
                        accepted=ex.accepted, kept_baseline=ex.kept_baseline, error=ex.error,
                        max_tokens=ex.max_tokens, prompt_tokens_est=ex.prompt_tokens_est) for ex in advice.exchanges]
    fallback = advice.fallback_reason
    entry = AdviceRecord(kind=kind, source=str(plan.source), reason=str(plan.reason or fallback or ""),
                         accepted=plan.source == "llm" or advice.kept_baseline, fallback=fallback, steps=steps,
                         kept_baseline=advice.kept_baseline, latency_s=advice.latency_s, tokens=list(advice.tokens),
                         budget_s=advice.budget_s, spent_s=advice.spent_s)
    rejections = [to_jsonable(r) for r in entry.rejections]
    result.rejected.extend(rejections)
    rec.record.advice.append(entry)
    result.advice.append(advice)
    result.debug_lines.append(advisor.debug_line(advice))
    if fallback:
        rec.warn(f"LLM advice not used ({kind}): {fallback}; using the {plan.source} plan")
    rec.decide(f"advice.{kind}", {"source": plan.source, "params": plan.params, "rejected": rejections,
                                  "ignored": [i for step in steps for i in step.ignored],
                                  "fallback": fallback}, entry.reason)
    return plan
