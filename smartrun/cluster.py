"""A cluster's hardware: one HardwareSnapshot whose `nodes` say which GPUs belong to which machine.

Node 0 is the Ray head, where `vllm serve` runs. GPUs are numbered across the cluster node by node, so
the estimator's stage i (GPUs [i*tp, (i+1)*tp)) lands on the node that holds those GPUs, exactly as
vLLM's Ray executor gives ranks node by node. Planning over the nodes is smartrun.cluster_plan; the
live cluster (Ray) is smartrun.ray_cluster.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from smartrun import hardware
from smartrun.errors import InfeasibleError, SnapshotError
from smartrun.hardware import GpuInfo, HardwareSnapshot, NodeInfo


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
