"""Stage 1, detect: the machine as a versioned HardwareSnapshot, from NVML or a saved JSON file.

CONTRACT (types below are shared by every later stage; add fields, do not rename).

Snapshot file format (schema_version 1; full description in docs/hardware-snapshot.md). One JSON object:

    schema_version       int, required in files; 1 is the only version this code reads
    source               str, "nvml" when detected live; load_snapshot() replaces it with the path it read
    captured_at          ISO 8601 UTC string or null
    hostname             str or null
    driver_version       NVIDIA driver, e.g. "570.124.06", or null
    cuda_driver_version  CUDA version the driver supports, "major.minor" e.g. "12.8", or null
    cpu_count            logical CPUs (os.cpu_count)
    ram_mib              host RAM in MiB
    gpus                 list, ordered by NVML index 0..n-1, each:
        index, uuid ("GPU-..."), name (NVML name string), memory_total_mib / memory_free_mib /
        memory_used_mib (NVML bytes // 2**20), compute_capability ("9.0"), pci_bus_id or null,
        processes: list of {pid, used_memory_mib, name, used_memory_known}
    nvlink_pairs         list of [low, high] GPU index pairs joined by an active NVLink (direct or NVSwitch)
    physical_indices     (optional) the nvidia-smi index of each listed GPU when the snapshot was restricted to
                         some GPUs (`model run --gpus`, CUDA_VISIBLE_DEVICES); empty = each GPU's own index
    node_ip              optional: the node's IP as the Ray cluster knows it (set by `detect --ray-address`)
    interconnect         optional list, one per GPU: {index, nvlink_links (active), pcie_gen, pcie_width}
    nodes                optional list, for a cluster (several machines in one snapshot, the first is the
                         Ray head): {name, ip, ray_node_id, hostname, driver_version, cuda_driver_version,
                         cpu_count, ram_mib, source, gpu_indices}; GPUs are numbered across the cluster,
                         node by node, and NVLink pairs never cross a node (smartrun.cluster builds these)

Unknown fields are rejected, so a typo in a hand-written snapshot is reported, not ignored.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, model_validator

from smartrun import fileio
from smartrun.errors import HardwareError, SnapshotError
from smartrun.fileio import atomic_write_text
from smartrun.frozen import Frozen

SNAPSHOT_SCHEMA_VERSION = 1
MIB = 2**20
NO_NVML_HINT = "to plan for another machine pass --hardware SNAPSHOT.json"


MAX_GPU_MIB = 2**24  # 16 TiB: two orders above any GPU; a bigger figure is a broken snapshot


class GpuProcess(Frozen):
    """A process holding memory on a GPU."""

    pid: int
    used_memory_mib: int = Field(ge=0)
    name: str | None = None
    used_memory_known: bool = True  # False when NVML could not say (used_memory_mib is then 0)


class GpuInfo(Frozen):
    """One GPU as NVML reports it. Memory figures are MiB as NVML gives them (memory.total etc.)."""

    index: int = Field(ge=0)
    uuid: str
    name: str  # NVML name string, e.g. "NVIDIA H100 80GB HBM3"
    memory_total_mib: int = Field(gt=0, le=MAX_GPU_MIB)
    memory_free_mib: int = Field(ge=0)
    memory_used_mib: int = Field(ge=0)
    compute_capability: str = Field(pattern=r"^\d+\.\d+$")  # "9.0"
    processes: tuple[GpuProcess, ...] = ()
    pci_bus_id: str | None = None

    @property
    def cc(self) -> tuple[int, int]:
        major, minor = self.compute_capability.split(".")
        return int(major), int(minor)

    @model_validator(mode="after")
    def _memory_within_total(self) -> GpuInfo:
        for field in ("memory_free_mib", "memory_used_mib"):
            if getattr(self, field) > self.memory_total_mib:
                raise ValueError(
                    f"{field} {getattr(self, field)} exceeds memory_total_mib {self.memory_total_mib}"
                )
        return self


class GpuLinks(Frozen):
    """The interconnect facts NVML gives for one GPU: active NVLink links and the current PCIe link."""

    index: int = Field(ge=0)
    nvlink_links: int = Field(default=0, ge=0)
    pcie_gen: int | None = None
    pcie_width: int | None = None


class NodeInfo(Frozen):
    """One machine of a cluster snapshot: its host facts and which of the snapshot's GPUs are its own."""

    name: str  # hostname, else IP: what messages and `ray start` lines call the node
    ip: str | None = None
    ray_node_id: str | None = None
    hostname: str | None = None
    driver_version: str | None = None
    cuda_driver_version: str | None = None
    cpu_count: int | None = None
    ram_mib: int | None = None
    source: str | None = None  # the file or Ray node it was read from
    gpu_indices: tuple[int, ...] = ()


class HardwareSnapshot(Frozen):
    """The whole machine. `source` is "nvml" when detected live, else where it was loaded from."""

    schema_version: int = SNAPSHOT_SCHEMA_VERSION
    source: str = "nvml"
    captured_at: str | None = None  # ISO 8601 UTC
    hostname: str | None = None
    driver_version: str | None = None
    cuda_driver_version: str | None = None  # "12.4"
    cpu_count: int = Field(ge=1)
    ram_mib: int = Field(ge=0)
    gpus: tuple[GpuInfo, ...] = ()
    # GPU index pairs (low, high) with an active NVLink
    nvlink_pairs: tuple[tuple[int, int], ...] = Field(default=())
    # Set by `restrict`: gpus[i] is the GPU nvidia-smi numbers physical_indices[i] (vLLM sees it as cuda:i)
    physical_indices: tuple[int, ...] = ()
    node_ip: str | None = None
    interconnect: tuple[GpuLinks, ...] = ()
    nodes: tuple[NodeInfo, ...] = ()  # empty for one machine; for a cluster, node 0 is the Ray head

    def nvlinked(self, a: int, b: int) -> bool:
        return (min(a, b), max(a, b)) in self.nvlink_pairs

    @model_validator(mode="after")
    def _indices_consistent(self) -> HardwareSnapshot:
        """Later stages index gpus by position, so index must equal position; pairs must name real GPUs."""
        for position, gpu in enumerate(self.gpus):
            if gpu.index != position:
                raise ValueError(
                    f"gpus[{position}] has index {gpu.index}; GPUs must be listed in index order 0..n-1"
                )
        for low, high in self.nvlink_pairs:
            if not 0 <= low < high < len(self.gpus):
                raise ValueError(f"nvlink pair [{low}, {high}] must be [low, high] indices of listed GPUs")
        if self.physical_indices and (len(self.physical_indices) != len(self.gpus)
                                      or len(set(self.physical_indices)) != len(self.physical_indices)):
            raise ValueError("physical_indices must name one distinct index per listed GPU")
        if self.nodes:
            listed = [i for node in self.nodes for i in node.gpu_indices]
            if listed != list(range(len(self.gpus))):
                raise ValueError("nodes must list every GPU once, node by node in index order (0..n-1)")
            node_of = {i: n for n, node in enumerate(self.nodes) for i in node.gpu_indices}
            for low, high in self.nvlink_pairs:
                if node_of[low] != node_of[high]:
                    raise ValueError(f"nvlink pair [{low}, {high}] joins two nodes; NVLink stays inside a node")
        return self


def physical_index(snapshot: HardwareSnapshot, index: int) -> int:
    """The nvidia-smi index (what CUDA_VISIBLE_DEVICES takes, in PCI bus order) of gpus[index]."""
    return snapshot.physical_indices[index] if snapshot.physical_indices else index


def parse_gpu_list(text: str, what: str) -> tuple[str, ...]:
    """`0,2` or `GPU-8f2c...,GPU-11aa...` -> entries; InputError (naming `what`) for an empty or bad list."""
    entries = tuple(part.strip() for part in text.split(","))
    if not text.strip() or any(not e for e in entries):
        raise SnapshotError(f"{what}={text!r}: expected GPU indices or UUIDs separated by commas, e.g. 0,2")
    for entry in entries:
        if entry.upper().startswith("MIG-"):
            raise SnapshotError(f"{what}={text!r}: MIG instances are not supported; name whole GPUs")
        if not (entry.isdigit() or entry.upper().startswith("GPU-")):
            raise SnapshotError(f"{what}={text!r}: {entry!r} is neither a GPU index nor a GPU UUID")
    return entries


def allowed_gpus(snapshot: HardwareSnapshot, gpus: str | None, visible: str | None) -> HardwareSnapshot:
    """The machine restricted to the GPUs the user allows: CUDA_VISIBLE_DEVICES when set (None: unset), then
    `--gpus` inside it. Both in nvidia-smi's numbering (PCI bus order, which the launch makes CUDA use too)."""
    if visible is not None and visible.strip() in ("", "-1"):
        raise SnapshotError(f"CUDA_VISIBLE_DEVICES={visible!r} hides every GPU; unset it or name GPUs (e.g. 0,1)")
    if visible is not None:
        snapshot = restrict(snapshot, parse_gpu_list(visible, "CUDA_VISIBLE_DEVICES"),
                            f"CUDA_VISIBLE_DEVICES={visible}")
    if gpus is not None:
        inside = f" (inside CUDA_VISIBLE_DEVICES={visible})" if visible is not None else ""
        snapshot = restrict(snapshot, parse_gpu_list(gpus, "--gpus"), f"--gpus {gpus}{inside}")
    return snapshot


def restrict(snapshot: HardwareSnapshot, entries: tuple[str, ...], what: str) -> HardwareSnapshot:
    """Only the GPUs named (nvidia-smi indices, or UUIDs or their unique prefixes), renumbered 0..k-1 in PCI bus
    order the way CUDA numbers them under CUDA_VISIBLE_DEVICES; `physical_indices` remembers the real indices."""
    by_physical = {physical_index(snapshot, g.index): g for g in snapshot.gpus}
    chosen: list[int] = []
    for entry in entries:
        if entry.isdigit():
            found = [int(entry)] if int(entry) in by_physical else []
        else:
            found = [i for i, g in by_physical.items() if g.uuid.lower().startswith(entry.lower())]
        if len(found) != 1:
            have = ",".join(str(i) for i in sorted(by_physical)) or "none"
            why = "matches several GPUs" if found else "names no GPU"
            raise SnapshotError(f"{what}: {entry} {why} of this machine (GPUs {have}, as nvidia-smi numbers them)")
        if found[0] in chosen:
            raise SnapshotError(f"{what}: GPU {found[0]} is named twice")
        chosen.append(found[0])
    chosen.sort()  # CUDA_DEVICE_ORDER=PCI_BUS_ID: CUDA numbers visible GPUs in bus order, whatever order is given
    old = {physical: by_physical[physical].index for physical in chosen}
    new_of = {old[physical]: position for position, physical in enumerate(chosen)}
    gpus = tuple(by_physical[p].model_copy(update={"index": new_of[old[p]]}) for p in chosen)
    pairs = tuple(sorted((new_of[a], new_of[b]) for a, b in snapshot.nvlink_pairs if a in new_of and b in new_of))
    return snapshot.model_copy(update={"gpus": gpus, "nvlink_pairs": pairs, "physical_indices": tuple(chosen)})


# --------------------------------------------------------------------------- detect (NVML)


def detect() -> HardwareSnapshot:
    """Read the live machine through NVML (lazy import of pynvml). Raises HardwareError without NVML."""
    try:
        import pynvml
    except ImportError as err:
        raise HardwareError(f"no NVIDIA driver found (cannot import pynvml: {err}); {NO_NVML_HINT}") from err
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as err:
        raise HardwareError(f"no NVIDIA driver found (NVML: {err}); {NO_NVML_HINT}") from err
    try:
        return _read_machine(pynvml)
    except pynvml.NVMLError as err:
        raise HardwareError(f"NVML failed while reading the GPUs: {err}; {NO_NVML_HINT}") from err
    except ValidationError as err:
        raise HardwareError(f"NVML reported values smartrun cannot use: {_first_problem(err)}") from err
    finally:
        with contextlib.suppress(pynvml.NVMLError):
            pynvml.nvmlShutdown()


def _read_machine(nvml: Any) -> HardwareSnapshot:
    count = nvml.nvmlDeviceGetCount()
    if count == 0:
        raise HardwareError(f"NVML found no NVIDIA GPU on this machine; {NO_NVML_HINT}")
    handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
    gpus = [_read_gpu(nvml, i, h) for i, h in enumerate(handles)]
    return HardwareSnapshot(
        source="nvml",
        captured_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        hostname=socket.gethostname(),
        driver_version=_optional(nvml, lambda: _text(nvml.nvmlSystemGetDriverVersion())),
        cuda_driver_version=_optional(
            nvml, lambda: cuda_version_text(nvml.nvmlSystemGetCudaDriverVersion_v2())
        ),
        cpu_count=os.cpu_count() or 1,
        ram_mib=_host_ram_mib(),
        gpus=tuple(gpus),
        nvlink_pairs=_nvlink_pairs(nvml, handles, gpus),
        interconnect=tuple(_links(nvml, i, h) for i, h in enumerate(handles)),
    )


def _links(nvml: Any, index: int, handle: Any) -> GpuLinks:
    """Active NVLink links and the PCIe link in use: what NVML says about how this GPU talks to others."""
    active = 0
    for link in range(getattr(nvml, "NVML_NVLINK_MAX_LINKS", 0)):
        try:
            if nvml.nvmlDeviceGetNvLinkState(handle, link) == nvml.NVML_FEATURE_ENABLED:
                active += 1
        except nvml.NVMLError_NotSupported:
            break
        except nvml.NVMLError:
            continue
    return GpuLinks(
        index=index,
        nvlink_links=active,
        pcie_gen=_optional(nvml, lambda: int(nvml.nvmlDeviceGetCurrPcieLinkGeneration(handle))),
        pcie_width=_optional(nvml, lambda: int(nvml.nvmlDeviceGetCurrPcieLinkWidth(handle))),
    )


def _read_gpu(nvml: Any, index: int, handle: Any) -> GpuInfo:
    memory = nvml.nvmlDeviceGetMemoryInfo(handle)
    major, minor = nvml.nvmlDeviceGetCudaComputeCapability(handle)
    return GpuInfo(
        index=index,
        uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
        name=_text(nvml.nvmlDeviceGetName(handle)),
        memory_total_mib=memory.total // MIB,
        memory_free_mib=memory.free // MIB,
        memory_used_mib=memory.used // MIB,
        compute_capability=f"{major}.{minor}",
        processes=_processes(nvml, handle),
        pci_bus_id=_optional(nvml, lambda: _text(nvml.nvmlDeviceGetPciInfo(handle).busId)),
    )


def _processes(nvml: Any, handle: Any) -> tuple[GpuProcess, ...]:
    """Compute and graphics processes, one entry per pid (a process can appear in both lists)."""
    by_pid: dict[int, GpuProcess] = {}
    for query in (nvml.nvmlDeviceGetComputeRunningProcesses, nvml.nvmlDeviceGetGraphicsRunningProcesses):
        for proc in _optional(nvml, lambda q=query: q(handle)) or ():
            used = getattr(proc, "usedGpuMemory", None)
            entry = GpuProcess(
                pid=proc.pid,
                used_memory_mib=0 if used is None else used // MIB,
                name=_optional(nvml, lambda p=proc.pid: _text(nvml.nvmlSystemGetProcessName(p))) or None,
                used_memory_known=used is not None,
            )
            known = by_pid.get(entry.pid)
            if known is None or entry.used_memory_mib > known.used_memory_mib:
                by_pid[entry.pid] = entry
    return tuple(by_pid[pid] for pid in sorted(by_pid))


def _nvlink_pairs(nvml: Any, handles: list[Any], gpus: list[GpuInfo]) -> tuple[tuple[int, int], ...]:
    """Pairs with an active link: a link whose far end is another GPU joins those two; GPUs that
    reach an NVSwitch all join each other (on NVSwitch machines the far end is the switch)."""
    index_by_bus = {_bus_key(g.pci_bus_id): g.index for g in gpus if g.pci_bus_id}
    switch_type = getattr(nvml, "NVML_NVLINK_DEVICE_TYPE_SWITCH", 2)
    pairs: set[tuple[int, int]] = set()
    on_switch: set[int] = set()
    for index, handle in enumerate(handles):
        for link in range(nvml.NVML_NVLINK_MAX_LINKS):
            try:
                if nvml.nvmlDeviceGetNvLinkState(handle, link) != nvml.NVML_FEATURE_ENABLED:
                    continue
                remote_bus = _bus_key(_text(nvml.nvmlDeviceGetNvLinkRemotePciInfo(handle, link).busId))
            except nvml.NVMLError_NotSupported:
                break  # this GPU has no NVLink at all
            except nvml.NVMLError:
                continue  # link number beyond this GPU's links, or unreadable: skip it
            peer = index_by_bus.get(remote_bus)
            if peer is not None and peer != index:
                pairs.add((min(index, peer), max(index, peer)))
            elif (
                peer is None
                and _optional(nvml, lambda h=handle, n=link: nvml.nvmlDeviceGetNvLinkRemoteDeviceType(h, n))
                == switch_type
            ):
                on_switch.add(index)
    switched = sorted(on_switch)
    pairs.update((a, b) for i, a in enumerate(switched) for b in switched[i + 1 :])
    return tuple(sorted(pairs))


def _optional(nvml: Any, read: Any) -> Any:
    """A field NVML may not support on this GPU/driver: None instead of failing the whole detection."""
    try:
        return read()
    except (nvml.NVMLError, AttributeError):
        return None


def _text(value: str | bytes) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _bus_key(bus_id: str | None) -> tuple[int, ...] | None:
    """NVML writes bus ids with 4 or 8 domain digits and any case; compare them as numbers."""
    if not bus_id:
        return None
    try:
        domain, bus, rest = bus_id.strip().split(":")
        device, function = rest.split(".")
        return tuple(int(part, 16) for part in (domain, bus, device, function))
    except ValueError:
        return None


def cuda_version_text(version: int) -> str:
    """NVML encodes CUDA 12.4 as 12040."""
    return f"{version // 1000}.{(version % 1000) // 10}"


def _host_ram_mib() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // MIB
    except (ValueError, OSError, AttributeError):
        return 0


# --------------------------------------------------------------------------- snapshot files


def load_snapshot(path: str | Path) -> HardwareSnapshot:
    """Load a snapshot file; SnapshotError names the file and what is wrong.

    The returned snapshot's `source` is the path it was read from (whatever the file says), so
    a plan or session record tells a planned-for machine from the live one.
    """
    path = Path(path)
    try:
        text = fileio.read_text(path, error=SnapshotError)  # a FIFO or /dev/zero: one error, no hang
    except SnapshotError as err:
        raise SnapshotError(f"hardware snapshot {err.message}") from None
    try:
        data = fileio.loads_json(text)
    except json.JSONDecodeError as err:
        raise SnapshotError(
            f"hardware snapshot {path}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}"
        ) from err
    except RecursionError:
        raise SnapshotError(f"hardware snapshot {path}: invalid JSON: nested too deeply") from None
    except ValueError as err:
        raise SnapshotError(f"hardware snapshot {path}: invalid JSON: {err}") from None
    if not isinstance(data, dict):
        raise SnapshotError(f"hardware snapshot {path}: expected a JSON object, got {type(data).__name__}")
    if "schema_version" not in data:
        raise SnapshotError(
            f"hardware snapshot {path}: schema_version missing (this smartrun reads {SNAPSHOT_SCHEMA_VERSION})"
        )
    if data["schema_version"] != SNAPSHOT_SCHEMA_VERSION:
        raise SnapshotError(
            f"hardware snapshot {path}: unsupported schema_version {data['schema_version']!r} "
            f"(this smartrun reads {SNAPSHOT_SCHEMA_VERSION})"
        )
    try:
        return HardwareSnapshot.model_validate({**data, "source": str(path)})
    except ValidationError as err:
        raise SnapshotError(f"hardware snapshot {path}: {_first_problem(err)}") from err


def save_snapshot(snapshot: HardwareSnapshot, path: str | Path) -> None:
    """Write atomically (temp file + rename) so no half-written snapshot is left."""
    path = Path(path)
    try:  # re-check: a model_construct()ed snapshot skipped validation and must not reach disk
        checked = HardwareSnapshot.model_validate(snapshot.model_dump())
    except ValidationError as err:
        raise SnapshotError(f"hardware snapshot {path}: not saved, {_first_problem(err)}") from err
    try:
        atomic_write_text(path, checked.model_dump_json(indent=2) + "\n")
    except OSError as err:
        raise SnapshotError(f"hardware snapshot {path}: cannot write: {err}") from err


def fingerprint(snapshot: HardwareSnapshot) -> str:
    """Stable short hash of what matters for a plan: GPU names, totals, count, cc, NVLink (not free memory)."""
    canonical = {
        "count": len(snapshot.gpus),
        "gpus": [[g.name, g.memory_total_mib, g.compute_capability] for g in snapshot.gpus],
        "nvlink_pairs": [list(p) for p in sorted(snapshot.nvlink_pairs)],
    }
    if snapshot.nodes:  # a cluster: the same GPUs split over other nodes is another plan
        canonical["nodes"] = [len(node.gpu_indices) for node in snapshot.nodes]
    blob = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _first_problem(err: ValidationError) -> str:
    """pydantic's first error as `field.path: message`, plus how many more there are."""
    problems = err.errors()
    first = problems[0]
    where = ".".join(str(part) for part in first["loc"]) or "snapshot"
    more = (
        f" (and {len(problems) - 1} more problem{'s' if len(problems) > 2 else ''})"
        if len(problems) > 1
        else ""
    )
    return f"{where}: {first['msg']}{more}"


# --------------------------------------------------------------------------- human summary


def summary(snapshot: HardwareSnapshot) -> str:
    """A readable table of one machine's snapshot (cluster.summary shows a cluster node by node)."""
    rows = [("#", "name", "total MiB", "free MiB", "used MiB", "cc", "processes")]
    for g in snapshot.gpus:
        procs = ", ".join(_process_text(p) for p in g.processes) or "-"
        rows.append(
            (
                str(physical_index(snapshot, g.index)),
                g.name,
                str(g.memory_total_mib),
                str(g.memory_free_mib),
                str(g.memory_used_mib),
                g.compute_capability,
                procs,
            )
        )
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    numeric = {0, 2, 3, 4}
    lines = [
        "  ".join(
            cell.rjust(w) if c in numeric else cell.ljust(w)
            for c, (cell, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in rows
    ]
    pairs = " ".join(f"{physical_index(snapshot, a)}-{physical_index(snapshot, b)}"
                     for a, b in snapshot.nvlink_pairs) or "none"
    if snapshot.physical_indices:
        lines.append(f"only GPUs {','.join(map(str, snapshot.physical_indices))} (nvidia-smi numbering); "
                     f"vLLM sees them as cuda:0..{len(snapshot.gpus) - 1}")
    lines += [
        f"NVLink pairs: {pairs}",
        f"driver {snapshot.driver_version or '?'}, CUDA {snapshot.cuda_driver_version or '?'}",
        f"host: {snapshot.cpu_count} CPUs, {snapshot.ram_mib} MiB RAM"
        + (f", {snapshot.hostname}" if snapshot.hostname else ""),
        f"source: {snapshot.source}"
        + (f", captured {snapshot.captured_at}" if snapshot.captured_at else "")
        + f", fingerprint {fingerprint(snapshot)}",
    ]
    return "\n".join(lines)


def _process_text(proc: GpuProcess) -> str:
    memory = f"{proc.used_memory_mib} MiB" if proc.used_memory_known else "? MiB"
    return f"{proc.pid}" + (f" {proc.name}" if proc.name else "") + f" ({memory})"
