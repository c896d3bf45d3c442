"""Cluster hardware and placement across the nodes of a Ray cluster.

A cluster is one HardwareSnapshot whose `nodes` say which GPUs belong to which machine (node 0 is the
Ray head, where `vllm serve` runs). GPUs are numbered across the cluster node by node, so the
estimator's stage i (GPUs [i*tp, (i+1)*tp)) lands on the node that holds those GPUs, exactly as vLLM's
Ray executor gives ranks node by node.

Placement rules (vLLM's multi-node guidance): tensor parallelism stays inside a node (it all-reduces
every layer), pipeline parallelism goes across nodes (it sends one hidden state per step), and whole
replicas that fit inside one node are served as data-parallel ranks (vLLM's Ray DP backend places each
rank inside one node). Nodes must be alike: the estimator budgets every stage on the tightest GPU.

Ray is optional (`pip install 'smartrun[ray]'`) and imported only by `detect_cluster` and `live_nodes`.
"""

from __future__ import annotations

import math
import shlex
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from smartrun import hardware
from smartrun.contracts import Plan
from smartrun.errors import ClusterError, InfeasibleError, InputError, SmartRunError, SnapshotError
from smartrun.frozen import Frozen
from smartrun.hardware import GpuInfo, HardwareSnapshot, NodeInfo
from smartrun.model import ModelFacts

RAY_HINT = "install it with `pip install 'smartrun[ray]'` (the same Ray version as on the cluster)"
DEFAULT_RAY_PORT = 6379
MAX_NODES_SUGGESTED = 64  # the smallest-cluster search stops here


# --------------------------------------------------------------------------- building cluster snapshots


def is_cluster(hw: HardwareSnapshot) -> bool:
    """More than one node: the plan may use pipeline stages across nodes and the Ray executor."""
    return len(hw.nodes) > 1


def combine(snapshots: Sequence[HardwareSnapshot]) -> HardwareSnapshot:
    """One cluster snapshot from one snapshot per node (the first is the head); GPUs renumbered node by node."""
    if not snapshots:
        raise SnapshotError("no node snapshot given")
    if len(snapshots) == 1 and not snapshots[0].nodes:
        return snapshots[0]
    parts = [node for snap in snapshots for node in split(snap)]  # a saved cluster can be one of them
    gpus: list[GpuInfo] = []
    pairs: list[tuple[int, int]] = []
    links = []
    nodes: list[NodeInfo] = []
    for node_snap, info in parts:
        offset = len(gpus)
        gpus += [g.model_copy(update={"index": g.index + offset}) for g in node_snap.gpus]
        pairs += [(a + offset, b + offset) for a, b in node_snap.nvlink_pairs]
        links += [link.model_copy(update={"index": link.index + offset}) for link in node_snap.interconnect]
        nodes.append(info.model_copy(update={"gpu_indices": tuple(range(offset, len(gpus)))}))
    names = [n.name for n in nodes]
    for i, name in enumerate(names):  # a name must say which node; two copies of one file would not
        if names.count(name) > 1:
            nodes[i] = nodes[i].model_copy(update={"name": f"{name}#{i}"})
    head = parts[0][0]
    return HardwareSnapshot(
        source=" + ".join(dict.fromkeys(s.source for s in snapshots)), captured_at=head.captured_at,
        hostname=head.hostname, driver_version=head.driver_version, cuda_driver_version=head.cuda_driver_version,
        cpu_count=head.cpu_count, ram_mib=head.ram_mib, gpus=tuple(gpus), nvlink_pairs=tuple(pairs),
        node_ip=head.node_ip, interconnect=tuple(links), nodes=tuple(nodes),
    )


def split(hw: HardwareSnapshot) -> list[tuple[HardwareSnapshot, NodeInfo]]:
    """Each node as a one-machine snapshot (GPU indices from 0), with its NodeInfo."""
    if not hw.nodes:
        info = NodeInfo(name=hw.hostname or hw.node_ip or Path(hw.source).stem, ip=hw.node_ip,
                        hostname=hw.hostname, driver_version=hw.driver_version,
                        cuda_driver_version=hw.cuda_driver_version, cpu_count=hw.cpu_count, ram_mib=hw.ram_mib,
                        source=hw.source, gpu_indices=tuple(range(len(hw.gpus))))
        return [(hw, info)]
    out = []
    for node in hw.nodes:
        first = node.gpu_indices[0] if node.gpu_indices else 0
        own = set(node.gpu_indices)
        snap = HardwareSnapshot(
            source=node.source or hw.source, captured_at=hw.captured_at, hostname=node.hostname,
            driver_version=node.driver_version, cuda_driver_version=node.cuda_driver_version,
            cpu_count=node.cpu_count or hw.cpu_count, ram_mib=node.ram_mib if node.ram_mib is not None else 0,
            gpus=tuple(hw.gpus[i].model_copy(update={"index": i - first}) for i in node.gpu_indices),
            nvlink_pairs=tuple((a - first, b - first) for a, b in hw.nvlink_pairs if a in own),
            node_ip=node.ip,
            interconnect=tuple(link.model_copy(update={"index": link.index - first})
                               for link in hw.interconnect if link.index in own),
        )
        out.append((snap, node))
    return out


def node_gpus(hw: HardwareSnapshot) -> list[list[GpuInfo]]:
    """The GPUs of each node, in node order (one list for a single machine)."""
    if not hw.nodes:
        return [list(hw.gpus)]
    return [[hw.gpus[i] for i in node.gpu_indices] for node in hw.nodes]


def gpus_per_node(hw: HardwareSnapshot) -> int:
    return min(len(g) for g in node_gpus(hw))


def node_of_gpu(hw: HardwareSnapshot, index: int) -> int:
    for n, node in enumerate(hw.nodes):
        if index in node.gpu_indices:
            return n
    return 0


def differences(hw: HardwareSnapshot) -> list[str]:
    """Why the nodes are not alike (GPU count, model or memory), one line each; [] when they are."""
    per_node = node_gpus(hw)
    head = per_node[0]
    out = []
    for n, gpus in enumerate(per_node[1:], start=1):
        name = hw.nodes[n].name
        if len(gpus) != len(head):
            out.append(f"node {name} has {len(gpus)} GPUs, the head {hw.nodes[0].name} has {len(head)}")
            continue
        kinds = sorted({(g.name, g.memory_total_mib) for g in gpus})
        head_kinds = sorted({(g.name, g.memory_total_mib) for g in head})
        if kinds != head_kinds:
            out.append(f"node {name} has {_kinds_text(kinds)}, the head {hw.nodes[0].name} has {_kinds_text(head_kinds)}")
    return out


def _kinds_text(kinds: list[tuple[str, int]]) -> str:
    return " / ".join(f"{name} ({mib} MiB)" for name, mib in kinds)


def select_gpus(hw: HardwareSnapshot, count: int) -> list[GpuInfo]:
    """The first `count` GPUs taking whole nodes in order (head first): a stage never straddles two nodes
    when tp divides the GPUs per node, and ranks fill nodes the way vLLM's Ray executor orders them."""
    gpus = [g for node in node_gpus(hw) for g in node]
    if count > len(gpus):
        raise InfeasibleError(f"{count} GPUs needed; the cluster has {len(gpus)} on {len(hw.nodes)} nodes")
    return gpus[:count]


# --------------------------------------------------------------------------- placement


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
    from smartrun import memory, rules

    flags = rules.flags_from_params(params)
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
    from smartrun import rules

    problems = differences(hw)
    if problems:
        raise InfeasibleError("cluster nodes differ: " + "; ".join(problems) + "; smartrun plans pipeline "
                              "stages across alike nodes only (pass the alike nodes' snapshots)")
    per_node = gpus_per_node(hw)
    fitting = [t for t in range(per_node, 0, -1) if per_node % t == 0 and rules._tp_divides(facts, t)]
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
    from smartrun import memory, rules

    base = split(node)[0][0]
    per_node = len(base.gpus)
    fitting = [t for t in range(per_node, 0, -1) if per_node % t == 0 and rules._tp_divides(facts, t)]
    if not fitting:
        return None
    tp = fitting[0]
    per = per_node // tp
    need = int(params.get("max_model_len") or 1)
    for k in range(1, limit + 1):
        pp = per * k
        if pp > facts.num_hidden_layers:
            return None
        flags = rules.flags_from_params({**params, "max_model_len": None, "tensor_parallel_size": tp,
                                         "pipeline_parallel_size": pp})
        specs = [memory.GpuSpec.from_gpu(g) for g in base.gpus] * k
        try:
            if memory.plan_safe_max_model_len(memory.estimate(facts, specs, flags, vllm_version)) >= need:
                return k, tp, pp
        except SmartRunError:  # a setting the estimator refuses at this size: try the next
            continue
    return None


# --------------------------------------------------------------------------- the rule engine's one call


def narrow_bounds(accs: dict[str, Any], facts: ModelFacts, hw: HardwareSnapshot, pins: dict[str, Any],
                  builtin_file: bool, estimate: Callable[[Any], Any], generous: Callable[[], Any],
                  vllm_version: str | None = None) -> None:
    """Bounds for a cluster (rules.effective_bounds calls this once): tp fixed inside a node, pp whole nodes'
    worth of stages from the fewest nodes that hold the model. `estimate(flags)` budgets flags on the GPUs
    the rules select; `generous()` is the most generous in-bound flags so far (top utilization, fewest seqs)."""
    from smartrun import memory

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
    nodes_acc = accs.get("nodes")
    if "nodes" in pins:  # a pin is checked against the bounds with the other pins, later; plan with it here
        from smartrun.knobs import CATALOGUE
        from smartrun.rules import _domain

        nodes_acc = _domain(CATALOGUE["nodes"])
        nodes_acc.narrow("pin", f"--nodes {pins['nodes']}", lo=pins["nodes"], hi=pins["nodes"])
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


# What the rules plan with when nothing says otherwise: the built-in bounds' top utilization, least context
# and fewest sequences (the most generous in-bound plan, as the estimate rule takes it).
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


# --------------------------------------------------------------------------- starting a cluster


def ray_start_commands(hw: HardwareSnapshot, nodes_used: int | None = None, port: int = DEFAULT_RAY_PORT) -> list[str]:
    """The `ray start` line for each node (head first) of a cluster that is not up yet."""
    nodes = list(hw.nodes) or [NodeInfo(name=hw.hostname or "head", ip=hw.node_ip,
                                        gpu_indices=tuple(range(len(hw.gpus))))]
    nodes = nodes[: nodes_used or len(nodes)]
    head = nodes[0]
    head_addr = head.ip or head.hostname or head.name
    lines = [f"on {head.name} (head): ray start --head --port={port} --num-gpus={len(head.gpu_indices)}"]
    for node in nodes[1:]:
        lines.append(f"on {node.name}: ray start --address={shlex.quote(f'{head_addr}:{port}')} "
                     f"--num-gpus={len(node.gpu_indices)}")
    return lines


# --------------------------------------------------------------------------- the live cluster (Ray)


def _ray() -> Any:
    try:
        import ray
    except ImportError as err:
        raise ClusterError(f"Ray is not installed ({err}); {RAY_HINT}") from err
    return ray


class LiveNode(Frozen):
    """One alive node as Ray's GCS state reports it."""

    node_id: str
    ip: str
    hostname: str | None = None
    gpus: int
    head: bool = False


CONNECT_TIMEOUT_S = 5.0


def _reachable(address: str) -> None:
    """A TCP connect to the head's GCS port first: ray.init retries an unreachable address for minutes
    and then exits the process."""
    import socket

    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(f"--ray-address {address}: expected HOST:PORT of the Ray head (e.g. 10.0.0.1:6379)")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as err:
        raise ClusterError(f"--ray-address {address}: cannot connect to a Ray cluster there ({err}); start the "
                           f"head with `ray start --head --port={port}` or check the address") from err


def _connect(ray: Any, address: str, runtime_env: dict[str, Any] | None = None) -> None:
    import logging

    if ray.is_initialized():
        return
    try:
        ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False, runtime_env=runtime_env)
    except (ConnectionError, TimeoutError, RuntimeError, ValueError, SystemExit) as err:
        raise ClusterError(f"--ray-address {address}: cannot connect to a Ray cluster there: "
                           f"{' '.join(str(err).split())[:300]}") from err


def live_nodes(address: str) -> list[LiveNode]:
    """The alive nodes and their GPUs, from Ray's cluster state (head first)."""
    _reachable(address)
    ray = _ray()
    _connect(ray, address)
    try:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
    finally:
        ray.shutdown()
    out = [LiveNode(node_id=n["NodeID"], ip=n.get("NodeManagerAddress") or "?", hostname=n.get("NodeManagerHostname"),
                    gpus=int((n.get("Resources") or {}).get("GPU", 0)),
                    head="node:__internal_head__" in (n.get("Resources") or {})) for n in nodes]
    return sorted(out, key=lambda n: (not n.head, n.ip, n.node_id))


def _node_snapshot() -> dict[str, Any]:
    """Runs on each node as a Ray task: NVML there, plus the node's IP as Ray knows it."""
    import ray

    snap = hardware.detect()
    return snap.model_copy(update={"node_ip": ray.util.get_node_ip_address()}).model_dump(mode="json")


def detect_cluster(address: str, timeout: float = 120.0) -> HardwareSnapshot:
    """One NVML snapshot per GPU node, each read by a small Ray task pinned to its node; head first."""
    _reachable(address)
    ray = _ray()
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    import smartrun

    # smartrun travels with the job (Ray's py_modules), so a node needs only what a vLLM install has: Ray,
    # pydantic and nvidia-ml-py
    _connect(ray, address, {"py_modules": [str(Path(smartrun.__file__).parent)]})
    try:
        alive = [n for n in ray.nodes() if n.get("Alive")]
        gpu_nodes = [n for n in alive if (n.get("Resources") or {}).get("GPU", 0) > 0]
        if not gpu_nodes:
            raise ClusterError(f"--ray-address {address}: the Ray cluster has {len(alive)} node(s) and none "
                               f"offers a GPU (start each GPU node with `ray start --num-gpus=N`)")
        gpu_nodes.sort(key=lambda n: ("node:__internal_head__" not in n["Resources"], n["NodeManagerAddress"]))
        task = ray.remote(num_cpus=0)(_node_snapshot)
        refs = [task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote()
                for n in gpu_nodes]
        try:
            results = ray.get(refs, timeout=timeout)
        except ray.exceptions.GetTimeoutError as err:
            raise ClusterError(f"--ray-address {address}: the NVML task did not finish on every node within "
                               f"{timeout:.0f} s") from err
        except ray.exceptions.RayTaskError as err:
            cause = err.cause if isinstance(getattr(err, "cause", None), Exception) else err
            message = getattr(cause, "message", None) or " ".join(str(cause).split())[-300:]
            raise ClusterError(f"--ray-address {address}: NVML on a node failed: {message}") from err
    finally:
        ray.shutdown()
    snaps = []
    for node, data in zip(gpu_nodes, results, strict=True):
        snap = hardware.HardwareSnapshot.model_validate(data)
        snaps.append(snap.model_copy(update={"source": f"ray:{node['NodeID'][:12]}"}))
    cluster = combine(snaps) if len(snaps) > 1 else _as_cluster(snaps[0])  # one node keeps its Ray identity
    nodes = tuple(info.model_copy(update={"ray_node_id": n["NodeID"], "ip": n["NodeManagerAddress"]})
                  for info, n in zip(cluster.nodes, gpu_nodes, strict=True))
    return cluster.model_copy(update={"nodes": nodes, "source": f"ray:{address}"})


def _as_cluster(snap: HardwareSnapshot) -> HardwareSnapshot:
    """A one-node snapshot with its NodeInfo filled in (what `detect --ray-address` saves for one node)."""
    _, info = split(snap)[0]
    return snap.model_copy(update={"nodes": (info,)})


def check_live(hw: HardwareSnapshot, params: dict[str, Any], address: str) -> list[LiveNode]:
    """The live cluster against the plan: enough alive nodes with the planned GPUs each; ClusterError names
    what is missing and prints the `ray start` lines that would bring it up."""
    from smartrun import rules

    flags = rules.flags_from_params(params)
    needed = flags.tensor_parallel_size * flags.pipeline_parallel_size * int(params.get("data_parallel_size") or 1)
    per_node = gpus_per_node(hw)
    nodes_needed = max(1, math.ceil(needed / per_node))
    live = live_nodes(address)
    with_gpus = [n for n in live if n.gpus > 0]
    problems = []
    if not live or not live[0].head or live[0].gpus == 0:
        problems.append("the Ray head has no GPU (vllm serve runs on the head and needs GPUs there)")
    short = [n for n in with_gpus if n.gpus < per_node]
    if len(with_gpus) < nodes_needed:
        problems.append(f"the plan needs {nodes_needed} node(s) with {per_node} GPUs each; Ray reports "
                        f"{len(with_gpus)} alive node(s) with GPUs"
                        + (f" ({', '.join(f'{n.ip}: {n.gpus}' for n in with_gpus)})" if with_gpus else ""))
    elif short:
        problems.append("node(s) with fewer GPUs than planned: " + ", ".join(f"{n.ip} has {n.gpus}, planned "
                                                                          f"{per_node}" for n in short))
    if problems:
        starts = "; ".join(ray_start_commands(hw, nodes_needed))
        raise ClusterError(f"--ray-address {address}: {'; '.join(problems)}; to bring the cluster up run: {starts}")
    return live


# --------------------------------------------------------------------------- summary


def summary(hw: HardwareSnapshot) -> str:
    """The snapshot as a table: one machine's (hardware.summary), or each node's, head first."""
    if not hw.nodes:
        return hardware.summary(hw)
    lines = [f"cluster: {len(hw.nodes)} node(s), {len(hw.gpus)} GPUs, source {hw.source}, "
             f"fingerprint {hardware.fingerprint(hw)}"]
    for n, (snap, info) in enumerate(split(hw)):
        role = " (head)" if n == 0 else ""
        where = ", ".join(x for x in (f"ip {info.ip}" if info.ip else "",
                                      f"ray node {info.ray_node_id[:12]}" if info.ray_node_id else "") if x)
        lines.append(f"== node {n}: {info.name}{role}" + (f" ({where})" if where else ""))
        kinds: dict[str, list[int]] = {}
        for link in snap.interconnect:
            text = f"{link.nvlink_links} NVLink links" + (f", PCIe gen{link.pcie_gen} x{link.pcie_width}"
                                                         if link.pcie_gen else "")
            kinds.setdefault(text, []).append(link.index)
        links = "; ".join(f"GPU {','.join(map(str, gpus))}: {text}" for text, gpus in kinds.items())
        body = hardware.summary(snap).splitlines()
        lines += ["  " + line for line in body if not line.startswith("source:")]
        if links:
            lines.append(f"  interconnect: {links}")
    return "\n".join(lines)
