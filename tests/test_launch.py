"""launch end to end with the `vllm` stand-in: real subprocesses, real HTTP on free ports, real recovery."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from fakes import HeldClock, free_port, install_vllm_shim, process_gone

from smartrun import launch, validate, vllm_log
from smartrun.contracts import Bounds, KnobBound, Plan
from smartrun.errors import InputError, LaunchError
from smartrun.hardware import GpuInfo, HardwareSnapshot

MODEL = "/models/fake-8b"


def bounds(**extra: KnobBound) -> Bounds:
    knobs = {
        "max_model_len": KnobBound(knob="max_model_len", min=4096, max=131072),
        "gpu_memory_utilization": KnobBound(knob="gpu_memory_utilization", min=0.85, max=0.95, recovery_min=0.82),
        "max_num_seqs": KnobBound(knob="max_num_seqs", min=8, max=256),
        "enforce_eager": KnobBound(knob="enforce_eager", choices=(False, True)),
    }
    return Bounds(knobs={**knobs, **extra})


def pin(knob: str, value) -> KnobBound:
    return KnobBound(knob=knob, min=value, max=value, pinned=True, llm_may_change=False, sources=("pin",))


class Rig:
    """One test's stand-in: shim on disk, scenario, free port, a quiet launcher that keeps what it printed."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
        self.tmp = tmp_path
        self.shim = install_vllm_shim(tmp_path / "bin")
        self.port = free_port()
        self.record = tmp_path / "starts.jsonl"
        self.lines: list[str] = []
        self.events: list[str] = []
        self.monkeypatch = monkeypatch
        self.info = launch.find_vllm(str(self.shim), cache_dir=tmp_path / "cache")

    def scenario(self, **values) -> None:
        values.setdefault("record", str(self.record))
        values.setdefault("delays", {"import_s": 0.0, "load_s": 0.05, "profile_s": 0.0, "capture_s": 0.0})
        self.monkeypatch.setenv("FAKE_VLLM_SCENARIO", json.dumps(values))

    def launcher(self, **kw) -> launch.ProcessLauncher:
        kw.setdefault("startup_timeout", 20)
        return launch.ProcessLauncher(str(self.shim), port=self.port, printer=self.lines.append,
                                      progress=self.events.append, poll_interval=0.05, stop_grace=5,
                                      info=self.info, **kw)

    def plan(self, **params) -> Plan:
        return Plan(params={"max_model_len": 8192, "gpu_memory_utilization": 0.9, "max_num_seqs": 64,
                            "port": self.port, **params})

    def run(self, plan: Plan, b: Bounds, max_attempts: int = 3, **kw) -> launch.LaunchReport:
        return launch.run_with_recovery(plan, b, self.launcher(**kw), check=lambda p: validate.check(b, plan, p),
                                        max_attempts=max_attempts, on_event=lambda e: self.events.append(str(e)), model_path=MODEL)

    def started_pids(self) -> list[int]:
        rows = [json.loads(x) for x in self.record.read_text().splitlines()] if self.record.exists() else []
        return [pid for row in rows for pid in (row["pid"], row["worker_pid"]) if pid]


@pytest.fixture
def rig(tmp_path, monkeypatch) -> Rig:
    return Rig(tmp_path, monkeypatch)


def test_find_vllm_reads_version_and_flags_and_caches_them(tmp_path):
    shim = install_vllm_shim(tmp_path / "bin")
    info = launch.find_vllm(str(shim), cache_dir=tmp_path / "c")
    assert info.version == "0.33.0" and info.path == str(shim)
    assert info.flags["--max-model-len"] is True and info.flags["--enforce-eager"] is False
    assert info.flags["-tp"] is True and "--no-enforce-eager" in info.flags and "--swap-space" not in info.flags
    cache = tmp_path / "c" / launch.CACHE_FILE
    data = json.loads(cache.read_text())
    (key,) = data
    data[key]["version"] = "9.9.9"  # proves the second call reads the cache instead of running vllm
    cache.write_text(json.dumps(data))
    assert launch.find_vllm(str(shim), cache_dir=tmp_path / "c").version == "9.9.9"
    cache.write_text("{not json")
    assert launch.find_vllm(str(shim), cache_dir=tmp_path / "c").version == "0.33.0"
    os.utime(shim, ns=(time.time_ns(), time.time_ns() + 10**9))  # a new binary: new key
    assert len(json.loads(cache.read_text())) == 1
    launch.find_vllm(str(shim), cache_dir=tmp_path / "c")
    assert len(json.loads(cache.read_text())) == 2


def test_find_vllm_bad_paths(tmp_path, monkeypatch):
    with pytest.raises(InputError, match=r"--vllm-bin .*nope: not an executable file"):
        launch.find_vllm(str(tmp_path / "nope"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(InputError, match="vllm not found on PATH"):
        launch.find_vllm(None)


def test_adapt_argv_drops_and_translates_unknown_flags():
    info = launch.VllmInfo(path="/x/vllm", version="0.33.0",
                           flags={"--max-model-len": True, "--enforce-eager": False, "--optimization-level": True,
                                  "--no-enable-prefix-caching": False, "--port": True})
    argv = ["vllm", "serve", "/m", "--max-model-len", "4096", "--swap-space", "4", "-O2", "--port=9000",
            "--disable-prefix-caching", "--max_model_len", "2048", "--bogus"]
    out, warnings = launch.adapt_argv(argv, info)
    assert out == ["vllm", "serve", "/m", "--max-model-len", "4096", "-O2", "--port=9000",
                   "--no-enable-prefix-caching", "--max_model_len", "2048"]
    assert warnings == ["vllm 0.33.0 does not accept --swap-space 4 (removed in 0.18): dropped",
                        "vllm 0.33.0 does not know --disable-prefix-caching: translated to --no-enable-prefix-caching",
                        "vllm 0.33.0 does not accept --bogus: dropped"]
    old = launch.VllmInfo(path="v", version="0.11.0", flags={"--enforce-eager": False, "-O": True})
    out, warnings = launch.adapt_argv(["vllm", "serve", "/m", "--optimization-level", "0"], old)
    assert out == ["vllm", "serve", "/m", "--enforce-eager"] and "-O0 translated to --enforce-eager" in warnings[0]
    out, warnings = launch.adapt_argv(["vllm", "serve", "/m", "-O3"], old)
    assert out == ["vllm", "serve", "/m"] and "before 0.12 -O meant --compilation-config" in warnings[0]


def gpu(index: int, free: int) -> GpuInfo:
    return GpuInfo(index=index, uuid=f"GPU-{index}", name="NVIDIA H100 80GB HBM3", memory_total_mib=81559,
                   memory_free_mib=free, memory_used_mib=81559 - free, compute_capability="9.0")


def test_gpu_env_from_a_snapshot_picks_the_nvlinked_pair_and_says_so():
    hw = HardwareSnapshot(source="fixtures/hardware/4xh100.json", cpu_count=8, ram_mib=1 << 20,
                          gpus=(gpu(0, 80000), gpu(1, 1000), gpu(2, 79000), gpu(3, 78000)), nvlink_pairs=((2, 3),))
    env, warnings = launch.gpu_env(hw, {"tensor_parallel_size": 2})
    assert env == {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": "2,3"}
    assert warnings == ["the plan was made for the machine in the snapshot fixtures/hardware/4xh100.json; "
                        "CUDA_VISIBLE_DEVICES=2,3 comes from its GPU indices"]
    env, warnings = launch.gpu_env(hw.model_copy(update={"source": "nvml"}), {})
    assert env["CUDA_VISIBLE_DEVICES"] == "0" and warnings == []
    assert launch.gpu_env(None, {}) == ({}, [])


def test_healthy_start_streams_the_log_reads_facts_and_serves(rig):
    rig.scenario()
    plan = rig.plan()
    report = rig.run(plan, bounds())
    try:
        assert report.ok and report.plan == plan and len(report.attempts) == 1
        attempt = report.attempts[0]
        assert attempt.outcome == "ready" and attempt.served_max_model_len == 8192
        assert attempt.facts.version == "0.33.0" and attempt.facts.weights_gib == 15.0
        assert attempt.facts.kv_cache_tokens > 8192 and attempt.facts.ready
        phases = [e for e in rig.events if e in launch.PHASE_WORDS.values()]
        assert phases == ["loading weights", "weights loaded", "profiling memory", "KV cache allocated",
                          "capturing CUDA graphs", "ready"]
        assert any("Application startup complete." in x for x in rig.lines)
        assert report.command_line == f"{rig.shim} serve {MODEL} --max-model-len 8192 --gpu-memory-utilization 0.9 " \
                                      f"--max-num-seqs 64 --port {rig.port}"
        assert rig.events[-1] == f"to rerun by hand: {report.command_line}"
        reply = httpx.post(f"{report.server.base_url}/v1/completions", json={"prompt": "hi", "max_tokens": 2},
                           trust_env=False)
        assert reply.json()["choices"][0]["text"] == "ok ok"
    finally:
        report.server.stop()
    assert all(process_gone(pid) for pid in rig.started_pids())
    assert report.server.failure is None


def test_recovers_from_an_oom_while_capturing_graphs(rig):
    rig.scenario(graph_actual_gib=5.0)  # needs 5 GiB outside the util share: 0.95 leaves 3.5, 0.91 leaves 6.6
    report = rig.run(rig.plan(gpu_memory_utilization=0.95), bounds())
    report.server.stop()
    first, second = report.attempts
    assert (first.outcome, first.failure_class) == ("failed", "oom_cuda_graph")
    assert "CUDA out of memory" in first.evidence
    assert second.outcome == "ready" and report.plan.params["gpu_memory_utilization"] == 0.91
    assert "OOM after KV allocation, rung 1" in report.plan.provenance["gpu_memory_utilization"]
    assert report.plan.source == "recovery"


def test_the_api_key_is_never_printed_kept_or_reported(rig):
    """vLLM echoes its args ("non-default args: {... api_key ...}"), and attempt lines showed the argv."""
    secret = "sk-test-SECRET-5150"
    rig.scenario(graph_actual_gib=5.0)
    report = rig.run(rig.plan(gpu_memory_utilization=0.95, api_key=(secret,)), bounds())
    report.server.stop()
    assert [a.outcome for a in report.attempts] == ["failed", "ready"]
    assert any("non-default args" in line and "***REDACTED***" in line for line in rig.lines)
    shown = "\n".join([*rig.lines, *rig.events, report.command_line, report.summary,
                       *(line for a in report.attempts for line in a.log_excerpt),
                       *(a.evidence or "" for a in report.attempts)])
    assert secret not in shown and "--api-key" in shown


def test_recovers_from_kv_too_small_with_vllms_estimate(rig):
    rig.scenario(kv_bytes_per_token=1 << 20, derived_max_model_len=131072)
    report = rig.run(rig.plan(max_model_len=131072), bounds())
    report.server.stop()
    first, second = report.attempts
    assert first.failure_class == "kv_cache_too_small" and first.estimated_max_model_len > 4096
    assert second.params["max_model_len"] == first.estimated_max_model_len
    assert second.served_max_model_len == first.estimated_max_model_len


def test_recovers_from_a_cuda_graph_error_via_eager_mode(rig):
    rig.scenario(faults={"cudagraph_error": True})
    report = rig.run(rig.plan(), bounds())
    report.server.stop()
    assert [a.failure_class for a in report.attempts] == ["compile_error", None]
    assert report.plan.params["enforce_eager"] is True
    assert "--enforce-eager" in report.argv


def test_gives_up_after_the_attempt_limit_with_a_summary(rig):
    rig.scenario(graph_actual_gib=20.0)  # would need util <= ~0.74; the ladder may not go below 0.82
    with pytest.raises(LaunchError) as err:
        rig.run(rig.plan(gpu_memory_utilization=0.95), bounds(), max_attempts=3)
    assert err.value.exit_code == 4
    msg = err.value.message
    assert msg.startswith("vllm serve did not become healthy after 3 attempt(s): #1 oom_cuda_graph: ")
    assert "#3 oom_cuda_graph" in msg and "Attempt limit reached" in msg
    utils = [a.params["gpu_memory_utilization"] for a in err.value.report.attempts]
    assert utils == [0.95, 0.91, 0.87]
    assert all(process_gone(pid) for pid in rig.started_pids())


def test_refuses_to_relax_a_pin(rig):
    rig.scenario(kv_bytes_per_token=1 << 20, derived_max_model_len=131072)
    b = bounds(max_model_len=pin("max_model_len", 131072), gpu_memory_utilization=pin("gpu_memory_utilization", 0.9))
    with pytest.raises(LaunchError) as err:
        rig.run(rig.plan(max_model_len=131072), b)
    (only,) = err.value.report.attempts
    est = only.estimated_max_model_len
    assert f"Stopped: pinned --max-model-len 131072 does not fit: vLLM estimates at most {est}; unpin it or set it " \
           f"to <= {est}" in err.value.message


def test_port_in_use_is_not_retried(rig):
    holder = socket.socket()
    holder.bind(("127.0.0.1", rig.port))
    holder.listen()
    try:
        rig.scenario()
        with pytest.raises(LaunchError, match="pick another --port") as err:
            rig.run(rig.plan(), bounds())
    finally:
        holder.close()
    (only,) = err.value.report.attempts
    assert only.failure_class == "port_in_use" and rig.started_pids() == []


def test_stand_in_own_bind_failure_is_classified(rig):
    holder = socket.socket()
    holder.bind(("127.0.0.1", rig.port))
    holder.listen()
    rig.scenario()
    try:
        done = subprocess.run([str(rig.shim), "serve", MODEL, "--port", str(rig.port)], capture_output=True,
                              text=True, timeout=30)
    finally:
        holder.close()
    assert vllm_log.classify_failure(done.stdout, done.returncode).klass == "port_in_use"


def test_a_child_that_dies_after_ready_is_reported(rig):
    rig.scenario(faults={"die_after_ready_s": 0.3}, worker=True)
    report = rig.run(rig.plan(), bounds())
    assert report.ok
    assert report.server.wait(timeout=20) == 1
    assert report.server.failure.klass == "died_after_ready"
    assert "illegal memory access" in report.server.failure.evidence
    assert all(process_gone(pid) for pid in rig.started_pids())


def test_a_stand_in_that_never_becomes_ready_times_out(rig):
    rig.scenario(faults={"never_ready": True}, worker=True)
    # the clock starts once the leader and its worker run; from then on 1.5 s pass only by the launcher's polls
    clock = HeldClock(lambda: len(rig.started_pids()) == 2)
    with pytest.raises(LaunchError, match=r"startup_timeout: not ready after 1\.5 s") as err:
        rig.run(rig.plan(), bounds(), max_attempts=2, startup_timeout=1.5, clock=clock)
    (attempt,) = err.value.report.attempts  # a timeout is not retried: a longer --startup-timeout is the fix
    assert attempt.duration_s == pytest.approx(1.5, abs=0.051)  # the first poll past the deadline
    assert attempt.duration_s == round(sum(clock.slept), 3)  # timed by the launcher's polls, not the machine
    assert len(rig.started_pids()) == 2  # the leader and its worker
    assert all(process_gone(pid) for pid in rig.started_pids())


DRIVER = """
import json, sys
from smartrun import launch, validate
from smartrun.contracts import Plan
from smartrun.contracts import Bounds
shim, port, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
plan = Plan(params={"max_model_len": 4096, "port": port})
b = Bounds(knobs={})
launcher = launch.ProcessLauncher(shim, poll_interval=0.05, stop_grace=5, printer=lambda l: None,
                                  progress=lambda t: print("PHASE", t, flush=True))
try:
    report = launch.run_with_recovery(plan, b, launcher, check=lambda p: validate.check(b, plan, p),
                                      model_path="/m", on_event=lambda e: print("EVENT", e, flush=True))
    print("READY", flush=True)
    report.server.wait()
except KeyboardInterrupt:
    print("INTERRUPTED", flush=True)
    sys.exit(130)
"""


@pytest.mark.parametrize(("mode", "sig", "wait_for"), [
    ("loading", signal.SIGINT, "PHASE loading weights"),
    ("serving", signal.SIGTERM, "READY"),
])
def test_interrupt_stops_the_whole_child_group(rig, tmp_path, mode, sig, wait_for):
    faults = {"never_ready": True} if mode == "loading" else {}
    rig.scenario(faults=faults, worker=True)
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    # a backgrounded CI job may start us with SIGINT ignored; the driver gets Ctrl+C as a user at a terminal has it
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, str(rig.shim), str(rig.port), mode],
                              stdout=subprocess.PIPE, text=True, env=env,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 60
        for line in driver.stdout:
            if line.startswith(wait_for) or time.monotonic() > deadline:
                break
        pids = rig.started_pids()
        assert len(pids) == 2 and not any(process_gone(p) for p in pids)
        driver.send_signal(sig)
        rest, _ = driver.communicate(timeout=30)
        assert driver.returncode == 130 and "INTERRUPTED" in rest
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    assert all(process_gone(pid) for pid in pids)


def test_attempts_round_trip_through_json_for_session_replay(rig):
    rig.scenario(faults={"cudagraph_error": True})
    report = rig.run(rig.plan(), bounds())
    report.server.stop()
    for attempt in report.attempts:
        again = launch.LaunchAttempt.model_validate(json.loads(attempt.model_dump_json()))
        assert again == attempt
    assert report.attempts[0].failure.klass == "compile_error"
    warnings = [e for e in rig.events if e.startswith("warning:")]
    assert len(warnings) == len(set(warnings))


def test_readiness_works_behind_an_api_key_and_dot_keys_pass(rig):
    rig.scenario()
    plan = rig.plan()
    launcher = rig.launcher()
    argv, env, _ = launcher.prepare(plan, ["vllm", "serve", MODEL, "--port", str(rig.port), "--api-key", "s3cret",
                                           "-cc.cudagraph_mode=NONE"])
    assert argv[-1] == "-cc.cudagraph_mode=NONE" and argv[0] == str(rig.shim)
    attempt, server = launcher.start(plan, argv[:-1], env)
    try:
        assert attempt.outcome == "ready"
        assert httpx.get(f"{server.base_url}/v1/models", trust_env=False).status_code == 401
    finally:
        server.stop()


def test_advisor_recover_first_then_the_ladder_all_through_the_validator(rig):
    from smartrun.contracts import Change, Proposal

    rig.scenario(faults={"cudagraph_error": True})
    asked = []

    def out_of_bounds(plan, attempts, failure):
        asked.append((failure.klass, len(attempts), attempts[-1].log_excerpt[-1]))
        return Proposal(changes=(Change(knob="gpu_memory_utilization", value=0.5, reason="llm guess"),))

    report = launch.run_with_recovery(rig.plan(), bounds(), rig.launcher(), model_path=MODEL,
                                      check=lambda p: validate.check(bounds(), rig.plan(), p),
                                      advisor_recover=out_of_bounds, on_event=lambda e: rig.events.append(str(e)))
    report.server.stop()
    assert asked == [("compile_error", 1, asked[0][2])] and "Engine core initialization failed" in asked[0][2]
    assert any(e.startswith("llm proposal rejected by the bounds: gpu_memory_utilization=0.5") for e in rig.events)
    assert report.plan.source == "recovery" and report.plan.params["enforce_eager"] is True

    def eager(plan, attempts, failure):
        return plan.with_changes({"enforce_eager": True}, "llm", {"enforce_eager": "graphs crash: run eager"})

    report = launch.run_with_recovery(rig.plan(), bounds(), rig.launcher(), model_path=MODEL,
                                      check=lambda p: validate.check(bounds(), rig.plan(), p),
                                      advisor_recover=eager, on_event=lambda e: rig.events.append(str(e)))
    report.server.stop()
    assert report.plan.source == "llm" and "graphs crash: run eager" in report.plan.provenance["enforce_eager"]


@pytest.mark.parametrize("seconds", [-1, 0, float("nan"), float("inf")])
def test_a_nonsense_startup_timeout_is_bad_input_not_an_instant_timeout(seconds):
    with pytest.raises(InputError, match=r"^--startup-timeout .*: must be a positive number of seconds$"):
        launch.ProcessLauncher("vllm", startup_timeout=seconds)
