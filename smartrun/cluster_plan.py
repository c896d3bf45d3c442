"""Planning over a cluster's nodes (vLLM's multi-node guidance).

Tensor parallelism stays inside a node (it all-reduces every layer), pipeline parallelism goes across
nodes (it sends one hidden state per step), and whole replicas that fit inside one node are served as
data-parallel ranks (vLLM's Ray DP backend places each rank inside one node). Nodes must be alike: the
estimator budgets every stage on the tightest GPU.

- `narrow_bounds`: the bounds rule for a cluster (tp inside a node, pp from the fewest nodes that hold it);
- `placement`: which node holds which stage, with each stage's memory;
- `refusal`: a no-fit message naming the smallest cluster that would hold the model;
- `finish_plan`: the Ray executor or Ray data-parallel backend a plan across nodes needs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from smartrun import memory
from smartrun.cluster import (
    differences,
    gpus_per_node,
    is_cluster,
    node_of_gpu,
    select_gpus,
    split,
)
from smartrun.contracts import Plan
from smartrun.errors import InfeasibleError, InputError, SmartRunError
from smartrun.fit import flags_from_params
from smartrun.frozen import Frozen
from smartrun.gpus import tp_divides
from smartrun.hardware import HardwareSnapshot
from smartrun.model import ModelFacts

MAX_NODES_SUGGESTED = 64  # the smallest-cluster search stops here


class StagePlacement(Frozen):
    """Where one pipeline stage runs and what its memory looks like there."""

    stage: int
    node: str
    node_index: int
    gpus: tuple[int, ...]  # GPU indices inside that node
    layers: tuple[int, int]
    first: bool
    last: bool
    weights_gib: float
    activation_gib: float
    kv_cache_gib: float
    requested_gib: float
    num_gpu_blocks: int
    fits: bool


class ClusterPlacement(Frozen):
    """The plan's layout over the cluster: TP inside a node, PP stages across nodes, DP replicas."""

    nodes: int  # nodes in the cluster
    nodes_used: int  # nodes one replica uses
    gpus_per_node: int
    tensor_parallel_size: int
    pipeline_parallel_size: int
    replicas: int  # copies that fit on the cluster (data parallel when one fits in a node)
    data_parallel_size: int  # what the plan launches (1 unless vLLM can place the replicas)
    executor: str  # "ray" when stages span nodes
    stages: tuple[StagePlacement, ...]
    notes: tuple[str, ...] = ()


def placement(facts: ModelFacts, hw: HardwareSnapshot, params: dict[str, Any],
              vllm_version: str | None = None, calibration: Any = None) -> ClusterPlacement:
    """Which node holds which stage, with each stage's memory from the one estimator."""
    flags = flags_from_params(params)
    tp, pp = flags.tensor_parallel_size, flags.pipeline_parallel_size
    gpus = select_gpus(hw, tp * pp)
    _, stages = memory.stage_memory(facts, [memory.GpuSpec.from_gpu(g) for g in gpus], flags, vllm_version,
                                    calibration)
    per_node = gpus_per_node(hw)
    out = []
    for st in stages:
        chosen = [gpus[i] for i in st.gpus]
        node_index = node_of_gpu(hw, chosen[0].index)
        first_of_node = hw.nodes[node_index].gpu_indices[0] if hw.nodes else 0
        out.append(StagePlacement(
            stage=st.stage, node=hw.nodes[node_index].name if hw.nodes else (hw.hostname or "this machine"),
            node_index=node_index, gpus=tuple(g.index - first_of_node for g in chosen), layers=st.layers,
            first=st.first, last=st.last, weights_gib=st.weights_gib, activation_gib=st.activation_gib,
            kv_cache_gib=st.kv_cache_gib, requested_gib=st.requested_gib, num_gpu_blocks=st.num_gpu_blocks,
            fits=st.fits))
    used = len({s.node_index for s in out})
    node_count = max(1, len(hw.nodes))
    replicas = node_count // used if tp * pp >= per_node else node_count * (per_node // (tp * pp))
    dp = int(params.get("data_parallel_size") or 1)
    notes = []
    if replicas > dp and tp * pp > per_node:
        notes.append(f"{replicas - dp} more replica(s) would fit on the other nodes; vLLM's Ray data-parallel "
                     f"backend keeps each replica inside one node, so start them as separate servers")
    elif replicas > dp:
        notes.append(f"{replicas} replicas of tp {tp} x pp {pp} fit the cluster; the plan runs {dp}")
    return ClusterPlacement(nodes=node_count, nodes_used=used, gpus_per_node=per_node, tensor_parallel_size=tp,
                            pipeline_parallel_size=pp, replicas=replicas, data_parallel_size=dp,
                            executor=str(params.get("distributed_executor_backend") or "mp (inside one node)"),
                            stages=tuple(out), notes=tuple(notes))


def placement_nodes(hw: HardwareSnapshot, params: dict[str, Any]) -> int:
    """How many nodes the plan uses (every replica)."""
    tp = int(params.get("tensor_parallel_size") or 1)
    pp = int(params.get("pipeline_parallel_size") or 1)
    dp = int(params.get("data_parallel_size") or 1)
    return max(1, math.ceil(tp * pp * dp / gpus_per_node(hw)))


def placement_lines(p: ClusterPlacement) -> list[str]:
    """The placement for the text summary, one stage per line."""
    lines = [f"{p.nodes_used} of {p.nodes} node(s) x {p.gpus_per_node} GPUs per replica: tp {p.tensor_parallel_size} "
             f"inside a node, pp {p.pipeline_parallel_size} across nodes, executor {p.executor}; {p.replicas} "
             f"replica(s) fit, the plan runs {p.data_parallel_size}"]
    for s in p.stages:
        role = "+".join(r for r, on in (("embeddings", s.first), ("lm head", s.last)) if on)
        lines.append(f"stage {s.stage} on {s.node} GPUs {','.join(map(str, s.gpus))}: layers {s.layers[0]}-"
                     f"{s.layers[1]}{f' ({role})' if role else ''}, weights {s.weights_gib:.2f} GiB, activation "
                     f"{s.activation_gib:.2f} GiB, KV cache {s.kv_cache_gib:.2f} GiB of {s.requested_gib:.2f} GiB "
                     f"requested, fits={s.fits}")
    return lines + [f"note: {n}" for n in p.notes]


def parallel_layouts(facts: ModelFacts, hw: HardwareSnapshot) -> tuple[int, list[int]]:
    """(tp, pp choices) a cluster allows: tp the largest size that divides the node's GPUs and the model's heads
    (inside a node, never across), pp whole nodes' worth of stages (stages per node x nodes)."""
    problems = differences(hw)
    if problems:
        raise InfeasibleError("cluster nodes differ: " + "; ".join(problems) + "; smartrun plans pipeline "
                              "stages across alike nodes only (pass the alike nodes' snapshots)")
    per_node = gpus_per_node(hw)
    fitting = [t for t in range(per_node, 0, -1) if per_node % t == 0 and tp_divides(facts, t)]
    if not fitting:
        raise InfeasibleError(f"no tensor parallel size divides both the {per_node} GPUs per node and "
                              f"{facts.num_attention_heads} attention heads ({facts.num_kv_heads} KV heads)")
    tp = fitting[0]
    per = per_node // tp
    pps = [per * k for k in range(1, len(hw.nodes) + 1) if per * k <= facts.num_hidden_layers]
    return tp, pps


def smallest_cluster(facts: ModelFacts, node: HardwareSnapshot, params: dict[str, Any],
                     vllm_version: str | None = None, limit: int = MAX_NODES_SUGGESTED) -> tuple[int, int, int] | None:
    """(nodes, tp, pp) of the fewest nodes like `node` (its head) whose largest fitting context reaches
    params["max_model_len"] at these settings; None up to `limit` nodes."""
    base = split(node)[0][0]
    per_node = len(base.gpus)
    fitting = [t for t in range(per_node, 0, -1) if per_node % t == 0 and tp_divides(facts, t)]
    if not fitting:
        return None
    tp = fitting[0]
    per = per_node // tp
    need = int(params.get("max_model_len") or 1)
    for k in range(1, limit + 1):
        pp = per * k
        if pp > facts.num_hidden_layers:
            return None
        flags = flags_from_params({**params, "max_model_len": None, "tensor_parallel_size": tp,
                                         "pipeline_parallel_size": pp})
        specs = [memory.GpuSpec.from_gpu(g) for g in base.gpus] * k
        try:
            if memory.plan_safe_max_model_len(memory.estimate(facts, specs, flags, vllm_version)) >= need:
                return k, tp, pp
        except SmartRunError:  # a setting the estimator refuses at this size: try the next
            continue
    return None


def narrow_bounds(accs: dict[str, Any], nodes_acc: Any, facts: ModelFacts, hw: HardwareSnapshot,
                  pins: dict[str, Any], builtin_file: bool, estimate: Callable[[Any], Any],
                  generous: Callable[[], Any], vllm_version: str | None = None) -> None:
    """Bounds for a cluster (rules.effective_bounds calls this once): tp fixed inside a node, pp whole nodes'
    worth of stages from the fewest nodes that hold the model. `nodes_acc` bounds the nodes the plan may use
    (the bounds file's, or the --nodes pin's; None: any); `estimate(flags)` budgets flags on the GPUs the
    rules select; `generous()` is the most generous in-bound flags so far (top utilization, fewest seqs)."""
    tp, pps = parallel_layouts(facts, hw)
    per_node, n = gpus_per_node(hw), len(hw.nodes)
    tp_acc, pp_acc = accs["tensor_parallel_size"], accs["pipeline_parallel_size"]
    tp_acc.narrow("cluster", f"tensor parallelism stays inside a node: {tp} is the largest size dividing the "
                             f"{per_node} GPUs per node and the model's heads", choices=[tp])
    if builtin_file and pp_acc.max_src and pp_acc.max_src.startswith("bounds:") and (pp_acc.max or 0) < max(pps):
        pp_acc.notes.append(f"cluster: the built-in single-node limit <= {pp_acc.max} ({pp_acc.max_src}) gives way "
                            f"on a cluster of {n} nodes (a bounds file you write is never relaxed)")
        pp_acc.max, pp_acc.max_src = None, None
        pp_acc.narrow("hardware", f"{len(hw.gpus)} GPUs on {n} nodes", hi=len(hw.gpus) // tp)
    pp_acc.narrow("cluster", f"pipeline stages fill whole nodes ({per_node // tp} per node x 1..{n} nodes)",
                  choices=pps)
    if nodes_acc is not None:  # a bounds file (or a pin) bounds the nodes the plan may use
        nodes_acc.narrow("hardware", f"the cluster has {n} nodes", hi=n)
        allowed = [pp for pp in pp_acc.choices or [] if pp * tp // per_node <= (nodes_acc.max or n)]
        if not allowed:
            raise InfeasibleError(f"nodes: {nodes_acc.culprit(0)} allows {nodes_acc.describe()}, but a plan on this "
                                  f"cluster uses 1..{n} whole nodes")
        pp_acc.narrow("cluster", f"stages on {nodes_acc.describe().replace('x', 'nodes')} "
                                 f"({', '.join(nodes_acc.sources())})", choices=allowed)
    floor = accs["max_model_len"].min or 1
    best = None
    free_share = int(min(g.memory_free_mib / g.memory_total_mib for g in hw.gpus) * 100) / 100
    top_flags = generous()
    util = min(top_flags.gpu_memory_utilization or free_share, free_share)  # vLLM needs util x total free
    for pp in pp_acc.choices or []:
        flags = top_flags.model_copy(update={"tensor_parallel_size": tp, "pipeline_parallel_size": pp,
                                             "gpu_memory_utilization": util})
        est = estimate(flags)
        best = est
        if memory.plan_safe_max_model_len(est) >= floor:  # the low end of the band, as the rules plan
            pp_acc.narrow("estimate", f"the fewest nodes that hold the model: {pp * tp // per_node} of {n} "
                                      f"(tp {tp} x pp {pp}; the largest max_model_len there is "
                                      f"{memory.plan_safe_max_model_len(est)})", lo=pp)
            if tp * pp > per_node and "data_parallel_size" in accs:  # vLLM's Ray DP keeps a replica in one node
                accs["data_parallel_size"].narrow(
                    "cluster", "a replica spans nodes; vLLM's Ray data-parallel backend places each replica inside "
                               "one node, so further replicas run as separate servers", hi=1)
            _nodes_rule(accs, nodes_acc, pp_acc, tp, pp, per_node)
            return
    top = max(pp_acc.choices or [1])
    capped = f" (pipeline_parallel_size is bounded to <= {pp_acc.max} by {pp_acc.max_src})" \
        if pp_acc.max_src and pp_acc.max_src.startswith("bounds:") and top < max(pps) else ""
    if nodes_acc is not None and nodes_acc.max is not None and nodes_acc.max_src.startswith("bounds:"):
        capped += f" (nodes is bounded to <= {nodes_acc.max} by {nodes_acc.max_src})"
    why = (f"{facts.name} does not fit on {top * tp // per_node} of {n} node(s) of {per_node}x "
           f"{' / '.join(sorted({g.name for g in hw.gpus}))} at tp {tp} x pp {top}{capped}: "
           + (best.reason if best is not None and best.reason else "no KV cache left")
           + (f"; the largest max_model_len there is {memory.plan_safe_max_model_len(best)}, below the minimum "
              f"{floor}" if best is not None and 0 < memory.plan_safe_max_model_len(best) < floor else ""))
    raise InfeasibleError(refusal(why, facts, hw, pins, vllm_version, {
        "gpu_memory_utilization": util, "max_model_len": floor, "max_num_seqs": top_flags.max_num_seqs,
        "dtype": top_flags.dtype, "kv_cache_dtype": top_flags.kv_cache_dtype}))


def _nodes_rule(accs: dict[str, Any], nodes_acc: Any, pp_acc: Any, tp: int, pp: int, per_node: int) -> None:
    """`nodes` bounds every node the plan uses: replicas (one per node) when a replica fits one node, else
    the stages of the one replica."""
    if nodes_acc is None or (nodes_acc.min is None and nodes_acc.max is None):
        return
    lo, hi = nodes_acc.min, nodes_acc.max
    where = ", ".join(nodes_acc.sources())
    if tp * pp <= per_node and "data_parallel_size" in accs:
        accs["data_parallel_size"].narrow("cluster", f"one replica per node on {nodes_acc.describe()} nodes ({where})",
                                          lo=lo if lo and lo > 1 else None, hi=hi)
    elif lo is not None and lo * per_node // tp > pp:
        pp_acc.narrow("cluster", f"stages on at least {lo} nodes ({where})", lo=lo * per_node // tp)


# What a refusal plans with when nothing says otherwise: the built-in bounds' top utilization, least context
# and fewest sequences (the most generous in-bound plan, as the estimate rule takes it).
REFUSAL_DEFAULTS = {"gpu_memory_utilization": 0.93, "max_model_len": 2048, "max_num_seqs": 1}


def refusal(why: str, facts: ModelFacts, hw: HardwareSnapshot, pins: dict[str, Any],
            vllm_version: str | None = None, base: dict[str, Any] | None = None) -> str:
    """`why`, plus the smallest cluster of nodes like this one that would hold the model when more nodes
    would help: at the pins, else at `base` (default REFUSAL_DEFAULTS)."""
    if "smallest cluster that fits" in why or ("of these" in why and "nodes (tp" in why):
        return why
    params = {**REFUSAL_DEFAULTS, **{k: v for k, v in (base or {}).items() if v is not None}, **pins}
    if params["max_model_len"] <= 0:  # auto: any context that fits
        params["max_model_len"] = 1
    try:
        found = smallest_cluster(facts, hw, params, vllm_version)
    except SmartRunError:
        return why
    have = max(1, len(hw.nodes))
    if found is None or found[0] == 1:
        return why
    nodes, tp, pp = found
    if nodes <= have:
        return f"{why}; it fits on {nodes} of these {have} nodes (tp {tp}, pp {pp}) where the bounds allow that"
    node = split(hw)[0][0]
    kind = f"{len(node.gpus)}x {' / '.join(sorted({g.name for g in node.gpus}))}"
    return (f"{why}; the smallest cluster that fits is {nodes} nodes of {kind} (tp {tp} inside each node, pp {pp} "
            f"across nodes, --distributed-executor-backend ray, at max_model_len {params['max_model_len']}, "
            f"utilization {params['gpu_memory_utilization']}): pass one --hardware snapshot per node")


def finish_plan(plan: Plan, hw: HardwareSnapshot, pins: dict[str, Any]) -> Plan:
    """A plan across nodes runs on Ray: stages that span nodes with --distributed-executor-backend ray (vLLM's
    multi-node path), replicas on several nodes with --data-parallel-backend ray (one replica per node group)."""
    if not is_cluster(hw):
        return plan
    tp = int(plan.params.get("tensor_parallel_size") or 1)
    pp = int(plan.params.get("pipeline_parallel_size") or 1)
    dp = int(plan.params.get("data_parallel_size") or 1)
    per_node = gpus_per_node(hw)
    if tp * pp <= per_node < tp * pp * dp and "data_parallel_backend" not in pins:
        return plan.with_changes({"data_parallel_backend": "ray"}, plan.source, {
            "data_parallel_backend": f"cluster: {dp} replicas on {placement_nodes(hw, plan.params)} nodes; vLLM's Ray "
                                     f"data-parallel backend starts each replica on its node"})
    if tp * pp <= per_node:
        return plan
    pinned = pins.get("distributed_executor_backend")
    if pinned is not None and pinned != "ray":
        raise InputError(f"--distributed-executor-backend {pinned}: the plan spans {tp * pp // gpus_per_node(hw)} "
                         f"nodes (tp {tp} x pp {pp}); smartrun launches across nodes with ray only")
    if pinned == "ray":
        return plan
    nodes = tp * pp // gpus_per_node(hw)
    return plan.with_changes({"distributed_executor_backend": "ray"}, plan.source, {
        "distributed_executor_backend": f"cluster: {pp} pipeline stages on {nodes} nodes; vLLM runs a model across "
                                        f"nodes through Ray, started on the head"})
