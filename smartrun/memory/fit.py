"""The least-squares fit of the estimator's few coefficients (Coefficients/FITTED) on measured startups.

`features` is the physics side of one startup (what the formulas count for its model and flags);
the measured side (activation peak, non-torch, CUDA graphs, weights as vLLM logged them) comes from
the reference logs, which smartrun.memory.evidence reads. `fit_coefficients` turns a list of
samples (features + measurements) into Coefficients; tests check that it reproduces FITTED.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from smartrun.memory.activation import (
    FITTED,
    Coefficients,
    activation_terms,
    cudagraph_features,
    pp_buffer_bytes,
)
from smartrun.memory.budget import estimate
from smartrun.memory.types import GIB, EngineFlags, GpuSpec
from smartrun.memory.weights import dtype_name, pp_layer_ranges, weights_per_rank
from smartrun.model import ModelFacts, QuantFacts


def features(facts: ModelFacts, flags: EngineFlags, gpus: Sequence[GpuSpec], version: str = "0.19.0") -> dict[str, Any]:
    """The fitted terms' physical features for one startup (GiB), as the estimate counts them."""
    est = estimate(facts, list(gpus), flags, version)
    dtype = dtype_name(flags.dtype, facts, gpus[0].compute_capability)
    tp, pp = flags.tensor_parallel_size, flags.pipeline_parallel_size
    (sampler_fixed, forward), logits = activation_terms(
        facts, dtype, tp, est.max_num_seqs, est.max_num_batched_tokens, last=True
    )
    (_, first_forward), _ = activation_terms(facts, dtype, tp, est.max_num_seqs, est.max_num_batched_tokens, last=False)
    layers = max(len(r) for r in pp_layer_ranges(facts.num_hidden_layers, pp))
    held = facts  # as the estimate holds it: `--quantization fp8` quantizes a bf16 checkpoint online
    if flags.quantization and facts.quantization is None:
        held = facts.model_copy(update={"quantization": QuantFacts(method=flags.quantization)})
    stage_weights = weights_per_rank(held, dtype, tp, pp)[0].bytes  # rank 0 prints the load line
    per_layer, per_expert = cudagraph_features(facts, layers, tp)
    return {
        "tp": tp,
        "pp": pp,
        "sampler_fixed": sampler_fixed / GIB,
        "forward": forward / GIB,
        "logits": logits / GIB,
        "first_forward": first_forward / GIB,
        "pp_buffer": pp_buffer_bytes(facts, dtype, est.max_num_batched_tokens) / GIB,
        "graph_layer": per_layer,
        "graph_expert": per_expert,
        "w_counted": stage_weights / GIB,
    }


def least_squares(xs: list[list[float]], ys: list[float]) -> list[float]:
    """Ordinary least squares by the normal equations (a handful of unknowns; no numpy needed).

    A feature that never varies from zero (no MoE case left) gets coefficient 0.
    """
    k = len(xs[0])
    live = [j for j in range(k) if any(x[j] for x in xs)]
    a = [[sum(x[i] * x[j] for x in xs) for j in live] for i in live]
    b = [sum(x[i] * y for x, y in zip(xs, ys, strict=True)) for i in live]
    n = len(live)
    for col in range(n):  # Gauss-Jordan with partial pivoting
        pivot = max(range(col, n), key=lambda r: abs(a[r][col]))
        a[col], a[pivot], b[col], b[pivot] = a[pivot], a[col], b[pivot], b[col]
        for r in range(n):
            if r != col and a[col][col]:
                f = a[r][col] / a[col][col]
                a[r] = [v - f * w for v, w in zip(a[r], a[col], strict=True)]
                b[r] -= f * b[col]
    out = [0.0] * k
    for idx, j in enumerate(live):
        out[j] = b[idx] / a[idx][idx] if a[idx][idx] else 0.0
    return out


def distinct(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One sample per distinct measured configuration: the same model and flags logged many
    times (Llama-3.1-8B 19x, Qwen2.5-7B 14x) would otherwise outweigh every other family."""
    seen: dict[tuple[Any, ...], dict[str, Any]] = {}
    for s in samples:
        key = tuple(v for k, v in sorted(s.items()) if k not in ("id", "w_real", "w_counted"))
        seen.setdefault(key, s)
    return list(seen.values())


def fit_coefficients(samples: list[dict[str, Any]]) -> Coefficients:
    """Least squares of each fitted term over its physical features (GiB).

    - activation = max(sampler_fixed + c x logit elements, forward): c fitted on the PP=1 cases
      whose sampler phase wins (the set is re-chosen until it settles);
    - PP buffers: (first-stage activation - its forward phase) / (mnbt x hidden) over the PP cases
      (their logs print the first stage, which runs no sampler); 0 when there are none;
    - non-torch: mean of the single-GPU cases, mean of the PP-only cases (the single-GPU value
      when there are none, which errs high), a + b x tp over the TP >= 2 cases;
    - CUDA graphs: a + b x layer feature + c x expert feature;
    - weight-load slack: mean of ("Model loading took" / counted bytes - 1).
    """
    base = FITTED
    samples = distinct(samples)
    act = [s for s in samples if s["act"] and s["pp"] == 1 and s["logits"]]
    extra = base.sampler_extra_bytes
    for _ in range(20):
        wins = [s for s in act if s["sampler_fixed"] + extra * s["logits"] >= s["forward"]]
        if not wins:
            break
        new = least_squares([[s["logits"]] for s in wins], [s["act"] - s["sampler_fixed"] for s in wins])[0]
        if abs(new - extra) < 1e-9:
            break
        extra = new
    pp_rows = [s for s in samples if s["act"] and s["pp"] > 1]  # the first stage's log line
    pp_buffers = (
        least_squares([[s["pp_buffer"]] for s in pp_rows], [s["act"] - s["first_forward"] for s in pp_rows])[0]
        if pp_rows
        else 0.0
    )
    single = [s["non_torch"] for s in samples if s["non_torch"] is not None and s["tp"] == 1 and s["pp"] == 1]
    pp_only = [s["non_torch"] for s in samples if s["non_torch"] is not None and s["tp"] == 1 and s["pp"] > 1]
    tp_rows = [s for s in samples if s["non_torch"] is not None and s["tp"] >= 2]
    nt_single = statistics.mean(single) if single else base.non_torch_single
    tp_base, tp_slope = base.non_torch_tp_base, base.non_torch_tp_slope
    if len({s["tp"] for s in tp_rows}) >= 2:
        tp_base, tp_slope = least_squares([[1.0, s["tp"]] for s in tp_rows], [s["non_torch"] for s in tp_rows])
    elif tp_rows:
        tp_base, tp_slope = statistics.mean(s["non_torch"] for s in tp_rows) - tp_slope * tp_rows[0]["tp"], tp_slope
    loads = [s["w_real"] / s["w_counted"] - 1 for s in samples if s["w_real"] and s["w_counted"]]
    graphs = [s for s in samples if s["graph"] is not None]
    g_base, g_layer, g_expert = least_squares(
        [[1.0, s["graph_layer"], s["graph_expert"]] for s in graphs], [s["graph"] for s in graphs]
    )
    return Coefficients(
        sampler_extra_bytes=round(extra, 2),
        pp_hidden_buffers=round(pp_buffers, 2),
        non_torch_single=round(nt_single, 3),
        non_torch_pp_only=round(statistics.mean(pp_only), 3) if pp_only else round(nt_single, 3),
        non_torch_tp_base=round(tp_base, 3),
        non_torch_tp_slope=round(tp_slope, 4),
        graph_base=round(g_base, 3),
        graph_per_layer=round(g_layer, 4),
        graph_per_expert=round(g_expert, 4),
        weight_load_slack=round(statistics.mean(loads), 4) if loads else base.weight_load_slack,
    )
