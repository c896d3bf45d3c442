"""Against a real local Ray head (started here, with 8 declared GPUs on this CPU machine): the Ray-backed
`hardware detect --ray-address` (NVML faked inside the Ray task, the only mock) and the live-cluster check.

The head is started once for this module with `ray start --head --block` in its own session, on free ports
and a temp dir, and stopped by its process group in teardown; nothing is left running. All tests here share
one xdist group, so one worker runs them (`--dist loadgroup`).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fakes import free_port
from fakes.fake_nvml import fake_nvml

from smartrun import cluster, hardware, ray_cluster
from smartrun.cli import main
from smartrun.errors import ClusterError
from smartrun.hardware import load_snapshot
from smartrun.session import load_record

ray = pytest.importorskip("ray", reason="the optional extra smartrun[ray] is not installed")

pytestmark = [pytest.mark.ray, pytest.mark.xdist_group("ray")]

HERE = Path(__file__).resolve().parent
CLUSTERS = HERE.parent / "fixtures" / "hardware" / "clusters"
NODE = CLUSTERS / "2x8-h100-node0.json"
BIG = str(HERE.parent / "fixtures" / "models" / "llama-3.1-405b-instruct")
FAKE_VLLM = HERE / "fakes" / "fake_vllm.py"
START_TIMEOUT_S = 120


def _ray_bin() -> str:
    return str(Path(sys.executable).with_name("ray"))


def _ports(*names: str) -> list[str]:
    return [f"--{name}={free_port()}" for name in names]


NODE_PORTS = ("node-manager-port", "object-manager-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
              "metrics-export-port", "runtime-env-agent-port")


class _NotUp(Exception):
    """A `ray start` that did not come up (its log tail says why)."""


def _start(argv: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    """`ray start ... --block` in its own session; returns once it says it is up (it stays in the foreground)."""
    with log.open("w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    started = time.monotonic()
    while "This command will now block" not in log.read_text():
        if proc.poll() is not None or time.monotonic() - started > START_TIMEOUT_S:
            _stop(proc)
            raise _NotUp(f"{' '.join(argv[:4])} did not come up:\n{log.read_text()[-2000:]}")
        time.sleep(0.2)
    return proc


def _start_cluster(tmp: Path, temp_dir: Path, env: dict[str, str], procs: list[subprocess.Popen]) -> str:
    """Head, then one more raylet, on ports free a moment ago; the address once Ray reports both nodes."""
    port = free_port()
    for role in ("head", "worker"):
        low = free_port()
        first = (["--head", f"--port={port}", f"--temp-dir={temp_dir}", "--include-dashboard=false"]
                 if role == "head" else [f"--address=127.0.0.1:{port}"])
        argv = [_ray_bin(), "start", *first, "--block", "--num-gpus=8", "--num-cpus=1", "--disable-usage-stats",
                *_ports(*NODE_PORTS), f"--min-worker-port={low}", f"--max-worker-port={low + 100}"]
        procs.append(_start(argv, tmp / f"ray-{role}.log", env))
    _wait_for_nodes(f"127.0.0.1:{port}", 2)
    return f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A two-node local Ray cluster (a head and one more raylet, 8 declared GPUs each) whose workers import the
    fake pynvml (answering from NODE). Yields the head's address. A start that fails (a port taken between
    choosing and binding it, on a loaded machine) is stopped and tried once more on other ports."""
    tmp = tmp_path_factory.mktemp("ray")
    env = {**os.environ, "FAKE_NVML_SNAPSHOT": str(NODE), "RAY_USAGE_STATS_ENABLED": "0",
           "PYTHONPATH": os.pathsep.join([str(HERE / "fakes" / "nvml_module"), os.environ.get("PYTHONPATH", "")])}
    procs: list[subprocess.Popen] = []
    temp_dirs: list[Path] = []
    try:
        for attempt in (1, 2):
            temp_dirs.append(Path("/tmp") / f"sr{os.getpid()}-{tmp.name[-6:]}-{attempt}")  # short socket paths
            try:
                address = _start_cluster(tmp, temp_dirs[-1], env, procs)
                break
            except _NotUp as err:
                for proc in reversed(procs):
                    _stop(proc)
                procs.clear()
                if attempt == 2:
                    pytest.fail(str(err))
        yield address
    finally:
        for proc in reversed(procs):
            _stop(proc)
        for temp_dir in temp_dirs:
            subprocess.run(["rm", "-rf", str(temp_dir)], check=False)


def _wait_for_nodes(address: str, count: int) -> None:
    started = time.monotonic()
    while len([n for n in _live_or_none(address) if n.gpus]) < count:
        if time.monotonic() - started > START_TIMEOUT_S:
            raise _NotUp(f"the local Ray cluster at {address} did not reach {count} nodes")
        time.sleep(0.5)


def _live_or_none(address: str) -> list:
    try:
        return ray_cluster.live_nodes(address)
    except ClusterError:  # the head's GCS not answering yet
        return []


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to `ray start --block` (it stops the Ray processes it started), then SIGKILL to its process
    group for anything still there."""
    proc.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


def test_detect_reads_each_gpu_node_through_a_ray_task(ray_head, tmp_path, capsys, monkeypatch):
    out = tmp_path / "cluster.json"
    assert main(["hardware", "detect", "--ray-address", ray_head, "--save", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "cluster: 2 node(s), 16 GPUs" in printed and "NVIDIA H100 80GB HBM3" in printed
    saved = load_snapshot(out)
    assert len(saved.gpus) == 16 and len(saved.nodes) == 2
    assert len({n.ray_node_id for n in saved.nodes}) == 2 and all(n.ip for n in saved.nodes)
    assert saved.nodes[0].hostname == socket.gethostname() and saved.node_ip == saved.nodes[0].ip
    assert [n.gpu_indices for n in saved.nodes] == [tuple(range(8)), tuple(range(8, 16))]
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(load_snapshot(NODE)))
    here = hardware.detect()  # the same fake NVML read in this process: each task must have read the same
    for node_snap, _ in cluster.split(saved):
        assert node_snap.gpus == here.gpus and node_snap.nvlink_pairs == here.nvlink_pairs
        assert node_snap.interconnect == here.interconnect and node_snap.interconnect[0].nvlink_links > 0
    assert json.loads(out.read_text())["nodes"][1]["gpu_indices"] == list(range(8, 16))


def test_live_check_refuses_a_plan_for_more_nodes_and_prints_ray_start(ray_head):
    hw = load_snapshot(CLUSTERS / "4x8-a100.json")
    with pytest.raises(ClusterError) as err:
        ray_cluster.check_live(hw, {"tensor_parallel_size": 8, "pipeline_parallel_size": 3}, ray_head)
    message = err.value.message
    assert "the plan needs 3 node(s) with 8 GPUs each; Ray reports 2 alive node(s) with GPUs" in message
    assert "on 4x8-a100-node0 (head): ray start --head --port=6379 --num-gpus=8" in message
    assert "on 4x8-a100-node2: ray start --address=10.0.0.1:6379 --num-gpus=8" in message


def test_live_check_accepts_a_plan_the_cluster_holds(ray_head):
    hw = load_snapshot(CLUSTERS / "2x8-h100.json")
    live = ray_cluster.check_live(hw, {"tensor_parallel_size": 8, "pipeline_parallel_size": 2}, ray_head)
    assert len(live) == 2 and live[0].head and [n.gpus for n in live] == [8, 8]


def _run(tmp_path: Path, scenario: dict, *extra: str) -> tuple[int, str, str, Path]:
    session = tmp_path / "session.json"
    env = {**os.environ, "FAKE_VLLM_SCENARIO": json.dumps(scenario), "SMARTRUN_HOME": str(tmp_path / "home")}
    args = [sys.executable, "-m", "smartrun", "model", "run", BIG, "--hardware", str(CLUSTERS / "2x8-h100.json"),
            "--vllm-bin", str(FAKE_VLLM), "--port", str(free_port()), "--startup-timeout", "60",
            "--session-out", str(session), *extra]
    done = subprocess.run(args, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=180)
    return done.returncode, done.stdout, done.stderr, session


def test_launch_on_the_live_cluster_starts_vllm_with_ray_on_the_head(ray_head, tmp_path):
    starts = tmp_path / "starts.jsonl"
    scenario = {"gpus": 8, "ray_gpus": 16, "weights_gib": 700.0, "record": str(starts),
                "faults": {"die_after_ready_s": 2.0}}
    _, out, err, session = _run(tmp_path, scenario, "--ray-address", ray_head)
    assert "is ready at" in out, out + err
    start = json.loads(starts.read_text().splitlines()[0])
    assert start["ray_address"] == ray_head  # vllm serve finds the cluster through RAY_ADDRESS
    argv = start["argv"]
    assert argv[argv.index("--distributed-executor-backend") + 1] == "ray"
    assert argv[argv.index("--pipeline-parallel-size") + 1] == "2" and argv[argv.index("--tensor-parallel-size") + 1] == "8"
    record = load_record(session)
    assert record.launch_attempts[0].healthy and record.launch_attempts[0].env["RAY_ADDRESS"] == ray_head
    assert "CUDA_VISIBLE_DEVICES" not in record.launch_attempts[0].env


def test_a_placement_group_timeout_is_classified_and_stops_with_what_to_do(ray_head, tmp_path):
    scenario = {"gpus": 8, "ray_gpus": 8, "weights_gib": 700.0}  # Ray offers one node's GPUs: no placement
    code, out, err, session = _run(tmp_path, scenario, "--ray-address", ray_head, "--max-attempts", "2")
    assert code == 4, out + err
    record = load_record(session)
    assert [a.outcome for a in record.launch_attempts] == ["ray_placement_group_timeout"]
    assert "ray status" in err


def test_a_dry_run_with_only_ray_address_plans_for_the_live_cluster(ray_head, capsys):
    code = main(["model", "run", BIG, "--ray-address", ray_head, "--dry-run", "--json", "--vllm-version", "0.19.0"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0, out
    assert (out["params"]["tensor_parallel_size"], out["params"]["pipeline_parallel_size"]) == (8, 2)
    assert [s["node_index"] for s in out["placement"]["stages"]] == [0, 1]


def test_detect_names_an_address_without_a_cluster(capsys):
    port = free_port()  # nothing listens there
    assert main(["hardware", "detect", "--ray-address", f"127.0.0.1:{port}", "--timeout", "5"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"localaistack: --ray-address 127.0.0.1:{port}: cannot connect")
