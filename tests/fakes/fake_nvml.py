"""A pynvml stand-in that answers from a HardwareSnapshot the way the real bindings do (NVML is the one
thing the tests mock). `fake_nvml(snapshot)` builds the module; tests/fakes/nvml_module/pynvml.py is the
same module as a file, for processes the tests do not import into (Ray workers)."""

from __future__ import annotations

from types import ModuleType, SimpleNamespace

from smartrun.hardware import HardwareSnapshot

MIB = 2**20


def fake_nvml(
    snapshot: HardwareSnapshot,
    *,
    unsupported: frozenset[str] = frozenset(),
    nvswitch: bool = False,
    init_error: str | None = None,
    fail: str | None = None,
) -> ModuleType:
    """A pynvml stand-in that answers from `snapshot` the way the real bindings do.

    `unsupported` names functions that raise NVMLError_NotSupported; `fail` one that raises GpuIsLost;
    `nvswitch` wires every GPU's links to NVSwitches instead of to each other.
    """
    nvml = ModuleType("pynvml")
    nvml.calls = []

    class NVMLError(Exception):
        text = "Unknown Error"

        def __str__(self) -> str:
            return self.text

    def error(name: str, text: str) -> type:
        cls = type(f"NVMLError_{name}", (NVMLError,), {"text": text})
        setattr(nvml, cls.__name__, cls)
        return cls

    nvml.NVMLError = NVMLError
    not_supported = error("NotSupported", "Not Supported")
    invalid = error("InvalidArgument", "Invalid Argument")
    lost = error("GpuIsLost", "GPU is lost")
    not_found = error("NotFound", "Not Found")
    init_errors = {
        "DriverNotLoaded": error("DriverNotLoaded", "Driver Not Loaded"),
        "LibraryNotFound": error("LibraryNotFound", "NVML Shared Library Not Found"),
    }
    nvml.NVML_NVLINK_MAX_LINKS = 18
    nvml.NVML_FEATURE_ENABLED = 1
    nvml.NVML_NVLINK_DEVICE_TYPE_GPU = 0
    nvml.NVML_NVLINK_DEVICE_TYPE_SWITCH = 2
    gpus = snapshot.gpus
    links = {g.index: [] for g in gpus}  # link number -> remote bus id, per GPU
    for a, b in snapshot.nvlink_pairs:
        # NVML may print the peer's bus id with a short, lower-case domain: detect() must still match it.
        links[a] += [_odd_bus_id(gpus[b].pci_bus_id)] * 2
        links[b] += [_odd_bus_id(gpus[a].pci_bus_id)] * 2
    if nvswitch:
        links = {g.index: [f"00000000:{0xC1 + s:02X}:00.0" for s in range(4)] for g in gpus}

    def api(fn):
        def call(*args):
            nvml.calls.append(fn.__name__)
            if fn.__name__ in unsupported:
                raise not_supported()
            if fn.__name__ == fail:
                raise lost()
            return fn(*args)

        call.__name__ = fn.__name__
        setattr(nvml, fn.__name__, call)
        return call

    @api
    def nvmlInit():
        if init_error:
            raise init_errors[init_error]()

    @api
    def nvmlShutdown():
        pass

    @api
    def nvmlDeviceGetCount():
        return len(gpus)

    @api
    def nvmlDeviceGetHandleByIndex(i):
        return SimpleNamespace(gpu=gpus[i])

    @api
    def nvmlDeviceGetName(h):
        return h.gpu.name.encode()  # older bindings return bytes

    @api
    def nvmlDeviceGetUUID(h):
        return h.gpu.uuid

    @api
    def nvmlDeviceGetMemoryInfo(h):
        g = h.gpu
        return SimpleNamespace(
            total=g.memory_total_mib * MIB,
            free=g.memory_free_mib * MIB + MIB - 1,  # NVML bytes are not whole MiB
            used=g.memory_used_mib * MIB + MIB // 2,
        )

    @api
    def nvmlDeviceGetCudaComputeCapability(h):
        return h.gpu.cc

    @api
    def nvmlDeviceGetPciInfo(h):
        return SimpleNamespace(busId=h.gpu.pci_bus_id.encode())

    @api
    def nvmlDeviceGetComputeRunningProcesses(h):
        return [
            SimpleNamespace(pid=p.pid, usedGpuMemory=p.used_memory_mib * MIB if p.used_memory_known else None)
            for p in h.gpu.processes
        ]

    @api
    def nvmlDeviceGetGraphicsRunningProcesses(h):
        return []

    @api
    def nvmlSystemGetProcessName(pid):
        for g in gpus:
            for p in g.processes:
                if p.pid == pid and p.name:
                    return p.name
        raise not_found()

    @api
    def nvmlDeviceGetNvLinkState(h, link):
        if not links[h.gpu.index] and not nvswitch:
            raise not_supported()  # PCIe-only GPU
        if link >= 12:
            raise invalid()  # beyond this GPU's link count
        return int(link < len(links[h.gpu.index]))

    @api
    def nvmlDeviceGetNvLinkRemotePciInfo(h, link):
        return SimpleNamespace(busId=links[h.gpu.index][link].encode())

    @api
    def nvmlDeviceGetNvLinkRemoteDeviceType(h, link):
        return nvml.NVML_NVLINK_DEVICE_TYPE_SWITCH if nvswitch else nvml.NVML_NVLINK_DEVICE_TYPE_GPU

    @api
    def nvmlSystemGetDriverVersion():
        return snapshot.driver_version

    @api
    def nvmlSystemGetCudaDriverVersion_v2():
        major, minor = snapshot.cuda_driver_version.split(".")
        return int(major) * 1000 + int(minor) * 10

    return nvml


def _odd_bus_id(bus_id: str) -> str:
    """The same bus id as NVML's remote-PCI query may print it: 4-digit domain, lower case."""
    return bus_id.replace("00000000:", "0000:").lower()
