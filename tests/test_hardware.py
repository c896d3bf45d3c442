"""Stage 1 (detect): NVML detection through a fake pynvml, snapshot files, fingerprint, CLI."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
from fakes.fake_nvml import fake_nvml

from smartrun import hardware
from smartrun.cli import main
from smartrun.errors import HardwareError, SnapshotError
from smartrun.hardware import GpuInfo, HardwareSnapshot, fingerprint, load_snapshot, save_snapshot

REPO = Path(__file__).resolve().parent.parent
HW = REPO / "fixtures" / "hardware"
FIXTURES = sorted(HW.glob("*.json"))
MIB = 2**20
# Fields a live detection fills from the host, not from NVML: excluded from round-trip comparison.
HOST_FIELDS = {"source", "captured_at", "hostname", "cpu_count", "ram_mib", "interconnect"}  # interconnect: fixtures predate it


# --------------------------------------------------------------------------- a fake pynvml


def install(monkeypatch, nvml) -> ModuleType:
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    return nvml


def nvml_view(snapshot: HardwareSnapshot) -> dict:
    return snapshot.model_dump(exclude=HOST_FIELDS)


def fixture(name: str) -> HardwareSnapshot:
    return load_snapshot(HW / name)


# --------------------------------------------------------------------------- fixtures are true to gpus.json


def test_fixture_set_is_complete():
    expected = {
        "1x-h100-80gb",
        "1x-a100-40gb",
        "2x-a100-80gb-nvlink",
        "1x-l4",
        "1x-rtx4090",
        "2x-rtx3090-pcie",
        "1x-t4",
        "1x-v100-16gb",
        "1x-h100-80gb-20gib-busy",
        "4x-h100-80gb-nvlink",
        "1x-h200",
    }
    assert {p.stem for p in FIXTURES} >= expected


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.stem)
def test_fixture_matches_gpu_table(path):
    table = {g["nvml_name"]: g for g in json.loads((REPO / "smartrun" / "data" / "gpus.json").read_text())}
    snap = load_snapshot(path)
    count = int(path.stem.split("x-")[0])
    assert len(snap.gpus) == count
    for gpu in snap.gpus:
        known = table[gpu.name]
        assert gpu.memory_total_mib == known["memory_total_mib"]
        assert gpu.compute_capability == known["compute_capability"]
        assert gpu.memory_used_mib == gpu.memory_total_mib - gpu.memory_free_mib
        assert 0 < gpu.memory_used_mib - sum(p.used_memory_mib for p in gpu.processes) < 1024
        assert gpu.uuid.startswith("GPU-")
    assert snap.driver_version == "570.124.06" and snap.cuda_driver_version == "12.8"
    all_pairs = {(a, b) for a in range(count) for b in range(a + 1, count)}
    assert set(snap.nvlink_pairs) == (all_pairs if "nvlink" in path.stem else set())


def test_busy_fixture_has_a_20gib_process():
    gpu = fixture("1x-h100-80gb-20gib-busy.json").gpus[0]
    idle = fixture("1x-h100-80gb.json").gpus[0]
    assert [(p.name, p.used_memory_mib) for p in gpu.processes] == [("python3", 20480)]
    assert idle.memory_free_mib - gpu.memory_free_mib == 20480


# --------------------------------------------------------------------------- detect()


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.stem)
def test_detect_round_trips_each_fixture(monkeypatch, path):
    snap = load_snapshot(path)
    nvml = install(monkeypatch, fake_nvml(snap))
    live = hardware.detect()
    assert nvml_view(live) == nvml_view(snap)
    assert live.source == "nvml" and live.captured_at.endswith("+00:00")
    assert live.cpu_count == os.cpu_count() and live.ram_mib > 0
    assert nvml.calls[-1] == "nvmlShutdown"


def test_detect_finds_nvswitch_pairs(monkeypatch):
    snap = fixture("4x-h100-80gb-nvlink.json")
    install(monkeypatch, fake_nvml(snap.model_copy(update={"nvlink_pairs": ()}), nvswitch=True))
    assert hardware.detect().nvlink_pairs == snap.nvlink_pairs


def test_detect_keeps_what_nvml_knows_when_fields_are_unsupported(monkeypatch):
    snap = fixture("1x-h100-80gb-20gib-busy.json")
    unsupported = frozenset(
        {
            "nvmlDeviceGetComputeRunningProcesses",
            "nvmlDeviceGetGraphicsRunningProcesses",
            "nvmlDeviceGetNvLinkState",
            "nvmlSystemGetDriverVersion",
            "nvmlSystemGetCudaDriverVersion_v2",
        }
    )
    install(monkeypatch, fake_nvml(snap, unsupported=unsupported))
    live = hardware.detect()
    gpu = live.gpus[0]
    assert gpu.processes == () and live.nvlink_pairs == ()
    assert live.driver_version is None and live.cuda_driver_version is None
    assert (gpu.name, gpu.memory_free_mib, gpu.compute_capability) == ("NVIDIA H100 80GB HBM3", 60552, "9.0")


def test_detect_without_pci_info_drops_nvlink_but_not_gpus(monkeypatch):
    snap = fixture("2x-a100-80gb-nvlink.json")
    install(monkeypatch, fake_nvml(snap, unsupported=frozenset({"nvmlDeviceGetPciInfo"})))
    live = hardware.detect()
    assert [g.pci_bus_id for g in live.gpus] == [None, None]
    assert len(live.gpus) == 2 and live.nvlink_pairs == ()


def test_detect_process_memory_unknown_and_duplicates(monkeypatch):
    snap = fixture("1x-h100-80gb-20gib-busy.json")
    nvml = install(monkeypatch, fake_nvml(snap))
    # Windows/WDDM: usedGpuMemory None; and the same pid listed as compute and graphics.
    nvml.nvmlDeviceGetComputeRunningProcesses = lambda h: [SimpleNamespace(pid=7, usedGpuMemory=9 * MIB)]
    nvml.nvmlDeviceGetGraphicsRunningProcesses = lambda h: [
        SimpleNamespace(pid=7, usedGpuMemory=None),
        SimpleNamespace(pid=3, usedGpuMemory=None),
    ]
    procs = hardware.detect().gpus[0].processes
    assert [(p.pid, p.used_memory_mib, p.used_memory_known, p.name) for p in procs] == [
        (3, 0, False, None),
        (7, 9, True, None),
    ]


def test_detect_without_pynvml_module(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    with pytest.raises(HardwareError, match=r"^no NVIDIA driver found .*--hardware SNAPSHOT\.json$") as err:
        hardware.detect()
    assert "\n" not in err.value.message


@pytest.mark.parametrize("cause", ["DriverNotLoaded", "LibraryNotFound"])
def test_detect_when_nvml_init_fails(monkeypatch, cause):
    install(monkeypatch, fake_nvml(fixture("1x-l4.json"), init_error=cause))
    text = {"DriverNotLoaded": "Driver Not Loaded", "LibraryNotFound": "NVML Shared Library Not Found"}[cause]
    with pytest.raises(HardwareError) as err:
        hardware.detect()
    assert (
        err.value.message
        == f"no NVIDIA driver found (NVML: {text}); to plan for another machine pass --hardware SNAPSHOT.json"
    )


def test_detect_with_no_gpus_shuts_nvml_down(monkeypatch):
    nvml = install(monkeypatch, fake_nvml(fixture("1x-l4.json").model_copy(update={"gpus": ()})))
    with pytest.raises(HardwareError, match="no NVIDIA GPU"):
        hardware.detect()
    assert nvml.calls[-1] == "nvmlShutdown"


def test_detect_nvml_failure_mid_read_is_one_line_and_shuts_down(monkeypatch):
    nvml = install(monkeypatch, fake_nvml(fixture("1x-l4.json"), fail="nvmlDeviceGetMemoryInfo"))
    with pytest.raises(HardwareError, match="GPU is lost"):
        hardware.detect()
    assert nvml.calls[-1] == "nvmlShutdown"


def test_cuda_version_text():
    assert [hardware.cuda_version_text(v) for v in (12040, 12080, 11080, 13000)] == [
        "12.4",
        "12.8",
        "11.8",
        "13.0",
    ]


# --------------------------------------------------------------------------- snapshot files


def test_load_records_where_it_came_from(tmp_path):
    target = tmp_path / "m.json"
    target.write_bytes((HW / "1x-t4.json").read_bytes())
    assert load_snapshot(target).source == str(target)


def test_save_then_load_round_trips_atomically(tmp_path):
    snap = fixture("4x-h100-80gb-nvlink.json")
    target = tmp_path / "saved.json"
    save_snapshot(snap, target)
    assert os.listdir(tmp_path) == ["saved.json"]
    again = load_snapshot(target)
    assert again.model_dump(exclude={"source"}) == snap.model_dump(exclude={"source"})


def test_save_refuses_invalid_snapshot_and_keeps_existing_file(tmp_path):
    target = tmp_path / "keep.json"
    target.write_text("precious")
    good = fixture("1x-l4.json")
    bad_gpu = GpuInfo.model_construct(**{**good.gpus[0].model_dump(), "memory_free_mib": 10**9})
    bad = HardwareSnapshot.model_construct(**{**good.model_dump(), "gpus": (bad_gpu,)})
    with pytest.raises(SnapshotError, match=r"keep\.json: not saved, gpus\.0: .*exceeds memory_total_mib"):
        save_snapshot(bad, target)
    assert target.read_text() == "precious"
    assert os.listdir(tmp_path) == ["keep.json"]


def test_save_into_missing_directory(tmp_path):
    with pytest.raises(SnapshotError, match=r"no/such/dir/x\.json: cannot write"):
        save_snapshot(fixture("1x-l4.json"), tmp_path / "no" / "such" / "dir" / "x.json")


def test_save_onto_a_directory_leaves_no_temp_file(tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(SnapshotError, match=r"taken: cannot write"):
        save_snapshot(fixture("1x-l4.json"), tmp_path / "taken")
    assert os.listdir(tmp_path) == ["taken"] and os.listdir(tmp_path / "taken") == []


def _valid() -> dict:
    return json.loads((HW / "2x-a100-80gb-nvlink.json").read_text())


def _edit(**changes) -> str:
    data = _valid()
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        node = data
        for part in parents:
            node = node[int(part)] if part.isdigit() else node[part]
        node[int(leaf) if leaf.isdigit() else leaf] = value
    return json.dumps(data)


BAD_SNAPSHOTS = {
    "truncated": (json.dumps(_valid())[:200], "invalid JSON at line 1"),
    "empty": ("", "invalid JSON at line 1 column 1"),
    "deep": ("[" * 200_000, "nested too deeply"),  # once a RecursionError traceback
    "not-an-object": ("[1, 2]", "expected a JSON object, got list"),
    "no-version": (
        json.dumps({k: v for k, v in _valid().items() if k != "schema_version"}),
        "schema_version missing",
    ),
    "future-version": (_edit(schema_version=2), "unsupported schema_version 2"),
    "bad-total": (
        _edit(gpus__0__memory_total_mib="lots"),
        "gpus.0.memory_total_mib: Input should be a valid integer",
    ),
    "bad-cc": (
        _edit(gpus__1__compute_capability="sm90"),
        "gpus.1.compute_capability: String should match pattern",
    ),
    "free-over-total": (
        _edit(gpus__0__memory_free_mib=90000),
        "memory_free_mib 90000 exceeds memory_total_mib 81920",
    ),
    "unknown-field": (_edit(gpu_count=2), "gpu_count: Extra inputs are not permitted"),
    "absurd-total": (_edit(gpus__0__memory_total_mib=10**30), "memory_total_mib: Input should be less than"),
    "missing-cpus": (
        json.dumps({k: v for k, v in _valid().items() if k != "cpu_count"}),
        "cpu_count: Field required",
    ),
    "pair-out-of-range": (_edit(nvlink_pairs=[[0, 2]]), "nvlink pair [0, 2] must be"),
    "index-order": (_edit(gpus__1__index=5), "gpus[1] has index 5"),
}


@pytest.mark.parametrize("case", sorted(BAD_SNAPSHOTS))
def test_bad_snapshot_is_one_line_naming_the_file(tmp_path, capsys, case):
    text, problem = BAD_SNAPSHOTS[case]
    path = tmp_path / f"{case}.json"
    path.write_text(text)
    assert main(["hardware", "show", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"localaistack: hardware snapshot {path}: ") and err.count("\n") == 1
    assert problem in err


def test_missing_snapshot_file(tmp_path, capsys):
    assert main(["hardware", "show", str(tmp_path / "gone.json")]) == 2
    assert (
        capsys.readouterr().err == f"localaistack: hardware snapshot {tmp_path / 'gone.json'}: no such file\n"
    )


# --------------------------------------------------------------------------- fingerprint


def test_fingerprint_is_sha256_of_the_plan_relevant_facts():
    snap = fixture("2x-a100-80gb-nvlink.json")
    canonical = {"count": 2, "gpus": [["NVIDIA A100-SXM4-80GB", 81920, "8.0"]] * 2, "nvlink_pairs": [[0, 1]]}
    blob = json.dumps(canonical, sort_keys=True, separators=(",", ":"))
    assert fingerprint(snap) == hashlib.sha256(blob.encode()).hexdigest()[:16]


def test_fingerprint_ignores_load_and_host_but_not_topology():
    idle, busy = fixture("1x-h100-80gb.json"), fixture("1x-h100-80gb-20gib-busy.json")
    assert fingerprint(idle) == fingerprint(busy)
    prints = {fingerprint(fixture(p.name)) for p in FIXTURES}
    assert len(prints) == len(FIXTURES) - 1  # only the busy twin shares a print
    linked = fixture("2x-a100-80gb-nvlink.json")
    assert fingerprint(linked) != fingerprint(linked.model_copy(update={"nvlink_pairs": ()}))


# --------------------------------------------------------------------------- CLI


def test_cli_detect_prints_summary_and_saves(monkeypatch, tmp_path, capsys):
    install(monkeypatch, fake_nvml(fixture("2x-a100-80gb-nvlink.json")))
    target = tmp_path / "here.json"
    assert main(["hardware", "detect", "--save", str(target)]) == 0
    out = capsys.readouterr().out
    assert out.count("NVIDIA A100-SXM4-80GB") == 2 and "NVLink pairs: 0-1" in out
    assert "driver 570.124.06, CUDA 12.8" in out and f"saved to {target}" in out
    assert load_snapshot(target).nvlink_pairs == ((0, 1),)


def test_cli_detect_json(monkeypatch, capsys):
    install(monkeypatch, fake_nvml(fixture("1x-h100-80gb-20gib-busy.json")))
    assert main(["hardware", "detect", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["schema_version"] == 1 and data["source"] == "nvml"
    assert data["gpus"][0]["processes"][0] == {
        "pid": 31337,
        "used_memory_mib": 20480,
        "name": "python3",
        "used_memory_known": True,
    }


def test_cli_detect_without_nvml_leaves_save_target_alone(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    target = tmp_path / "old.json"
    target.write_text("old")
    assert main(["hardware", "detect", "--save", str(target)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("localaistack: no NVIDIA driver found") and err.count("\n") == 1
    assert target.read_text() == "old"


def test_cli_show_summary(capsys):
    assert main(["hardware", "show", str(HW / "1x-h100-80gb-20gib-busy.json")]) == 0
    out = capsys.readouterr().out
    assert (
        "31337 python3 (20480 MiB)" in out
        and "NVLink pairs: none" in out
        and "26 CPUs, 231917 MiB RAM" in out
    )


def test_cli_show_json_is_a_loadable_snapshot(tmp_path, capsys):
    assert main(["hardware", "show", "--json", str(HW / "1x-t4.json")]) == 0
    copy = tmp_path / "copy.json"
    copy.write_text(capsys.readouterr().out)
    assert load_snapshot(copy).gpus == fixture("1x-t4.json").gpus


def _nvml_works_here() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        return True
    except Exception:
        return False


def test_real_subprocess_detect_on_this_machine():
    """No mocks: the installed CLI against this machine's real NVML (or its absence)."""
    done = subprocess.run(
        [sys.executable, "-m", "smartrun", "hardware", "detect"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert "Traceback" not in done.stderr
    if _nvml_works_here():
        assert done.returncode == 0 and "NVLink pairs:" in done.stdout
    else:
        assert done.returncode == 2 and done.stdout == ""
        assert done.stderr.startswith("localaistack: no NVIDIA driver found") and done.stderr.count("\n") == 1
