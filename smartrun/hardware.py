"""Stage 1, detect: the machine as a versioned HardwareSnapshot, from NVML or a saved JSON file.

CONTRACT (types below are shared by every later stage; add fields, do not rename).
TODO(helper-hardware): detect(), load_snapshot(), save_snapshot(), fingerprint().
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from smartrun.plan import Frozen

SNAPSHOT_SCHEMA_VERSION = 1


class GpuProcess(Frozen):
    """A process holding memory on a GPU."""

    pid: int
    used_memory_mib: int
    name: str | None = None


class GpuInfo(Frozen):
    """One GPU as NVML reports it. Memory figures are MiB as NVML gives them (memory.total etc.)."""

    index: int
    uuid: str
    name: str  # NVML name string, e.g. "NVIDIA H100 80GB HBM3"
    memory_total_mib: int
    memory_free_mib: int
    memory_used_mib: int
    compute_capability: str  # "9.0"
    processes: tuple[GpuProcess, ...] = ()
    pci_bus_id: str | None = None

    @property
    def cc(self) -> tuple[int, int]:
        major, minor = self.compute_capability.split(".")
        return int(major), int(minor)


class HardwareSnapshot(Frozen):
    """The whole machine. `source` is "nvml" when detected live, else where it was loaded from."""

    schema_version: int = SNAPSHOT_SCHEMA_VERSION
    source: str = "nvml"
    captured_at: str | None = None  # ISO 8601 UTC
    hostname: str | None = None
    driver_version: str | None = None
    cuda_driver_version: str | None = None  # "12.4"
    cpu_count: int
    ram_mib: int
    gpus: tuple[GpuInfo, ...] = ()
    nvlink_pairs: tuple[tuple[int, int], ...] = Field(default=())  # GPU index pairs (low, high) with an active NVLink

    def nvlinked(self, a: int, b: int) -> bool:
        return (min(a, b), max(a, b)) in self.nvlink_pairs


def detect() -> HardwareSnapshot:
    """Read the live machine through NVML (lazy import of pynvml). Raises HardwareError without NVML."""
    raise NotImplementedError


def load_snapshot(path: str | Path) -> HardwareSnapshot:
    """Load a snapshot file; SnapshotError names the file and what is wrong."""
    raise NotImplementedError


def save_snapshot(snapshot: HardwareSnapshot, path: str | Path) -> None:
    """Write atomically (temp file + rename) so no half-written snapshot is left."""
    raise NotImplementedError


def fingerprint(snapshot: HardwareSnapshot) -> str:
    """Stable short hash of what matters for a plan: GPU names, totals, count, cc, NVLink (not free memory)."""
    raise NotImplementedError
