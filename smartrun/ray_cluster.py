"""The live cluster, through Ray: reading its nodes' GPUs, checking it against a plan, starting it.

Ray is optional (`pip install 'smartrun[ray]'`) and imported only when a live cluster is read
(`detect_cluster`, `live_nodes`, `check_live`); `ray_start_commands` only writes the lines to run.
"""

from __future__ import annotations

import logging
import math
import shlex
import socket
from pathlib import Path
from typing import Any

import smartrun
from smartrun import hardware
from smartrun.cluster import combine, gpus_per_node, split
from smartrun.errors import ClusterError
from smartrun.frozen import Frozen
from smartrun.hardware import HardwareSnapshot, NodeInfo

RAY_HINT = "install it with `pip install 'smartrun[ray]'` (the same Ray version as on the cluster)"
DEFAULT_RAY_PORT = 6379


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
    needed = math.prod(int(params.get(k) or 1) for k in ("tensor_parallel_size", "pipeline_parallel_size",
                                                          "data_parallel_size"))
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
