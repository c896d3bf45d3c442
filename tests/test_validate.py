"""The validator: accepts a whole proposal inside the bounds, or rejects it naming the bound; never clamps."""

from __future__ import annotations

from typing import Any

from hypothesis import event, given, settings
from hypothesis import strategies as st

from smartrun.contracts import Bounds, Change, KnobBound, Plan, Proposal
from smartrun.knobs import CATALOGUE
from smartrun.validate import check, format_rejections


def _bounds() -> Bounds:
    return Bounds(
        knobs={
            "gpu_memory_utilization": KnobBound(knob="gpu_memory_utilization", min=0.85, max=0.93,
                                                sources=("bounds:smartrun.toml:3",), recovery_min=0.82),
            "max_model_len": KnobBound(knob="max_model_len", min=2048, max=32768, sources=("model", "estimate")),
            "max_num_seqs": KnobBound(knob="max_num_seqs", min=8, max=8, pinned=True, llm_may_change=False,
                                      sources=("pin",)),
            "dtype": KnobBound(knob="dtype", choices=("bfloat16", "float16"), sources=("vllm", "hardware"),
                               recovery_choices=("float32",)),
            "tensor_parallel_size": KnobBound(knob="tensor_parallel_size", choices=(1, 2), sources=("hardware",)),
            "enforce_eager": KnobBound(knob="enforce_eager", choices=(False, True), sources=("vllm",)),
        },
        gpu_count=2,
    )


BASE = Plan(params={"gpu_memory_utilization": 0.88, "max_model_len": 4096, "max_num_seqs": 8, "dtype": "bfloat16",
                    "tensor_parallel_size": 1, "enforce_eager": False, "port": 8000},
            provenance={"max_model_len": "goal:stable template"})


def _propose(source="llm", **changes: Any) -> Proposal:
    return Proposal(changes=tuple(Change(knob=k, value=v, reason=f"try {k}") for k, v in changes.items()),
                    source=source, reason="because")


def test_accepts_in_bounds_changes_and_keeps_the_rest_of_the_base():
    verdict = check(_bounds(), BASE, _propose(max_model_len=8192, gpu_memory_utilization=0.9, enforce_eager=True))
    assert verdict.accepted and not verdict.rejections
    assert verdict.plan.params == {**BASE.params, "max_model_len": 8192, "gpu_memory_utilization": 0.9,
                                   "enforce_eager": True}
    assert verdict.plan.source == "llm"
    assert verdict.plan.provenance["max_model_len"] == "llm: try max_model_len"
    assert "port" in verdict.plan.params


def test_out_of_bounds_is_rejected_with_bound_and_source_not_clamped():
    verdict = check(_bounds(), BASE, _propose(gpu_memory_utilization=0.97))
    assert verdict.plan is None
    (rej,) = verdict.rejections
    assert (rej.knob, rej.value, rej.bound, rej.source) == (
        "gpu_memory_utilization", 0.97, "0.85 <= x <= 0.93", "bounds:smartrun.toml:3")


def test_every_bad_change_is_reported_at_once():
    verdict = check(_bounds(), BASE, _propose(max_model_len="8192", gpu_memory_utilization="0.9x", bogus=1,
                                              max_num_seqs=16, port=80, dtype="bf16", enforce_eager=1))
    reasons = {r.knob: (r.source, r.reason) for r in verdict.rejections}
    assert set(reasons) == {"max_model_len", "gpu_memory_utilization", "bogus", "max_num_seqs", "port", "dtype",
                            "enforce_eager"}
    assert reasons["max_model_len"][0] == "catalogue" and "str" in reasons["max_model_len"][1]
    assert reasons["bogus"][1] == "unknown knob 'bogus'"
    assert reasons["max_num_seqs"][0] == "pin"
    assert reasons["port"][0] == "catalogue" and "user only" in reasons["port"][1]
    assert reasons["dtype"][0] == "vllm"
    assert len(format_rejections(verdict.rejections)) == 7


def test_shell_text_and_lossy_numbers_are_rejected_integral_floats_accepted():
    assert not check(_bounds(), BASE, _propose(max_model_len="4096; rm -rf ~")).accepted
    assert not check(_bounds(), BASE, _propose(max_model_len=4096.5)).accepted
    assert not check(_bounds(), BASE, _propose(max_model_len=True)).accepted
    assert not check(_bounds(), BASE, _propose(gpu_memory_utilization=float("nan"))).accepted
    verdict = check(_bounds(), BASE, _propose(max_model_len=8192.0))
    assert verdict.plan.params["max_model_len"] == 8192 and type(verdict.plan.params["max_model_len"]) is int


def test_repeating_a_pinned_value_is_a_no_op_not_a_rejection():
    verdict = check(_bounds(), BASE, _propose(max_num_seqs=8, port=8000))
    assert verdict.accepted and verdict.plan.params == BASE.params


def test_recovery_may_use_the_oom_floor_and_last_resort_others_may_not():
    floor = _propose(source="recovery", gpu_memory_utilization=0.82, dtype="float32")
    assert check(_bounds(), BASE, floor).accepted
    assert not check(_bounds(), BASE, _propose(gpu_memory_utilization=0.82)).accepted
    assert not check(_bounds(), BASE, _propose(dtype="float32")).accepted
    assert not check(_bounds(), BASE, _propose(source="recovery", gpu_memory_utilization=0.81)).accepted


def test_fit_check_rejects_combinations_that_will_not_start():
    def fit(params):
        return "KV cache too small" if params["max_model_len"] > 16384 else None

    assert check(_bounds(), BASE, _propose(max_model_len=16384), fit).accepted
    verdict = check(_bounds(), BASE, _propose(max_model_len=32768), fit)
    (rej,) = verdict.rejections
    assert rej.source == "estimate" and rej.reason == "KV cache too small" and rej.knob == "max_model_len"


def test_world_size_beyond_the_gpus_is_rejected():
    bounds = _bounds().model_copy(update={"gpu_count": 1})
    verdict = check(bounds, BASE, _propose(tensor_parallel_size=2))
    assert verdict.rejections[0].source == "estimate" and "usable GPUs" in verdict.rejections[0].reason


def test_a_knob_without_an_effective_bound_is_not_changed():
    """Found by the property test once it drew accepted changes: an unbounded tuning knob was taken as is."""
    b = Bounds(knobs={"max_num_seqs": KnobBound(knob="max_num_seqs", min=1, max=8, sources=("vllm",))})
    base = Plan(params={"max_num_seqs": 4})
    verdict = check(b, base, Proposal(changes=(Change(knob="max_model_len", value=1),), source="llm"))
    assert not verdict.accepted and verdict.rejections[0].knob == "max_model_len"
    assert "no effective bound" in verdict.rejections[0].reason


def test_a_knob_proposed_twice_is_rejected():
    proposal = Proposal(changes=(Change(knob="max_model_len", value=4096), Change(knob="max_model_len", value=8192)))
    assert not check(_bounds(), BASE, proposal).accepted


# Property tests: arbitrary bounds and arbitrary JSON-like proposals.

_json = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
_knob_names = st.sampled_from([*CATALOGUE, "bogus", "max-model-len", ""])


@st.composite
def _bounds_and_base(draw):
    knobs: dict[str, KnobBound] = {}
    params: dict[str, Any] = {}
    for name in draw(st.sets(st.sampled_from(["max_model_len", "gpu_memory_utilization", "max_num_seqs",
                                              "tensor_parallel_size", "dtype", "enforce_eager",
                                              "optimization_level"]), min_size=1)):
        k = CATALOGUE[name]
        source = draw(st.sampled_from(["vllm", "hardware", "bounds:f.toml:4", "estimate"]))
        pinned = draw(st.booleans())
        if k.type == "float":
            lo = draw(st.floats(0.05, 0.95))
            hi = draw(st.floats(lo, 1.0))
            value = lo if pinned else draw(st.floats(lo, hi))
            knobs[name] = KnobBound(knob=name, min=lo, max=lo if pinned else hi, pinned=pinned,
                                    llm_may_change=not pinned, sources=(source,))
        elif k.type == "int":
            lo = draw(st.integers(k.min or 0, min(64, k.max or 64)))
            hi = draw(st.integers(lo, min(k.max or 10**5, 10**5)))
            value = lo if pinned else draw(st.integers(lo, hi))
            knobs[name] = KnobBound(knob=name, min=lo, max=lo if pinned else hi, pinned=pinned,
                                    llm_may_change=not pinned, sources=(source,))
        else:
            domain = (False, True) if k.type == "bool" else k.choices
            choices = tuple(draw(st.lists(st.sampled_from(domain), min_size=1, max_size=1 if pinned else 4,
                                          unique=True)))
            value = choices[0]
            knobs[name] = KnobBound(knob=name, choices=choices, pinned=pinned, llm_may_change=not pinned,
                                    sources=(source,))
        params[name] = value
    return Bounds(knobs=knobs), Plan(params=params)


@st.composite
def _proposals(draw, bounds: Bounds):
    changes = []
    if draw(st.booleans()):
        # plausible proposals: distinct bounded knobs, values around their bounds. Without them accepted
        # proposals were almost always empty, and "an accepted plan is inside the bounds" tested nothing.
        for name in draw(st.lists(st.sampled_from(sorted(bounds.knobs)), unique=True, min_size=1, max_size=3)):
            bound = bounds.knobs[name]
            if bound.choices is not None:
                value = draw(st.sampled_from(bound.choices))
            elif isinstance(bound.min, float):
                value = draw(st.floats(bound.min - 0.1, bound.max + 0.1))
            else:
                value = draw(st.integers(bound.min - 5, bound.max + 5))
            changes.append(Change(knob=name, value=value))
        return Proposal(changes=tuple(changes), source=draw(st.sampled_from(["llm", "cache", "replay"])))
    for _ in range(draw(st.integers(0, 4))):
        name = draw(_knob_names)
        bound = bounds.knobs.get(name)
        if bound is not None and draw(st.booleans()):
            if bound.choices is not None:
                value = draw(st.sampled_from(bound.choices) | _json)
            elif isinstance(bound.min, float):
                value = draw(st.floats(bound.min - 0.1, bound.max + 0.1) | _json)
            else:
                value = draw(st.integers(bound.min - 5, bound.max + 5) | _json)
        else:
            value = draw(_json)
        changes.append(Change(knob=name, value=value))
    return Proposal(changes=tuple(changes), source=draw(st.sampled_from(["llm", "cache", "replay"])))


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_accepted_plans_are_inside_the_bounds_and_keep_every_pin(data):
    bounds, base = data.draw(_bounds_and_base())
    proposal = data.draw(_proposals(bounds))
    verdict = check(bounds, base, proposal)
    event("accepted with changes" if verdict.accepted and verdict.plan.params != base.params else
          "accepted unchanged" if verdict.accepted else "rejected")
    if verdict.accepted:
        for name, bound in bounds.knobs.items():
            value = verdict.plan.params[name]
            assert bound.contains(value), (name, value, bound)
            assert type(value) is type(base.params[name]) or isinstance(value, float)
            if bound.pinned:
                assert value == base.params[name]
        assert set(verdict.plan.params) == set(base.params)
    else:
        assert verdict.rejections
        real_sources = {s for b in bounds.knobs.values() for s in b.sources} | {"catalogue", "vllm", "proposal",
                                                                                  "pin", "bounds"}
        for rej in verdict.rejections:
            assert rej.reason and rej.bound
            assert set(rej.source.split(", ")) <= real_sources, rej
            if rej.knob in bounds.knobs and rej.source not in ("catalogue", "vllm", "proposal"):
                assert rej.bound == bounds.knobs[rej.knob].describe()
