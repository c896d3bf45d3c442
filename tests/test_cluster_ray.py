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
from fakes.fake_nvml import fake_nvml

from smartrun import cluster, hardware
from smartrun.cli import main
from smartrun.errors import ClusterError
from smartrun.hardware import load_snapshot

ray = pytest.importorskip("ray", reason="the optional extra smartrun[ray] is not installed")

pytestmark = [pytest.mark.ray, pytest.mark.xdist_group("ray")]

HERE = Path(__file__).resolve().parent
CLUSTERS = HERE.parent / "fixtures" / "hardware" / "clusters"
NODE = CLUSTERS / "2x8-h100-node0.json"
START_TIMEOUT_S = 90


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_bin() -> str:
    return str(Path(sys.executable).with_name("ray"))


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A Ray head with 8 declared GPUs whose workers import the fake pynvml (answering from NODE)."""
    tmp = tmp_path_factory.mktemp("ray")
    temp_dir = Path("/tmp") / f"sr{os.getpid()}-{tmp.name[-6:]}"  # Ray's socket paths must stay short
    port = _free_port()
    env = {**os.environ, "FAKE_NVML_SNAPSHOT": str(NODE), "RAY_USAGE_STATS_ENABLED": "0",
           "PYTHONPATH": os.pathsep.join([str(HERE / "fakes" / "nvml_module"), os.environ.get("PYTHONPATH", "")])}
    low = _free_port()
    argv = [_ray_bin(), "start", "--head", "--block", f"--port={port}", "--num-gpus=8", "--num-cpus=1",
            f"--temp-dir={temp_dir}", "--include-dashboard=false", "--disable-usage-stats",
            f"--node-manager-port={_free_port()}", f"--object-manager-port={_free_port()}",
            f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
            f"--metrics-export-port={_free_port()}", f"--runtime-env-agent-port={_free_port()}",
            f"--min-worker-port={low}", f"--max-worker-port={low + 200}"]
    log = (tmp / "ray-start.log").open("w")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    started = time.monotonic()
    try:
        while "This command will now block" not in (tmp / "ray-start.log").read_text():
            if proc.poll() is not None or time.monotonic() - started > START_TIMEOUT_S:
                pytest.fail(f"ray start --head failed:\n{(tmp / 'ray-start.log').read_text()[-2000:]}")
            time.sleep(0.2)
        yield f"127.0.0.1:{port}"
    finally:
        _stop(proc)
        log.close()
        subprocess.run(["rm", "-rf", str(temp_dir)], check=False)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to `ray start --block` (it stops the Ray processes it started), then SIGKILL to its process
    group for anything still there."""
    proc.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


def test_detect_reads_each_gpu_node_through_a_ray_task(ray_head, tmp_path, capsys, monkeypatch):
    out = tmp_path / "cluster.json"
    assert main(["hardware", "detect", "--ray-address", ray_head, "--save", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "cluster: 1 node(s), 8 GPUs" in printed and "NVIDIA H100 80GB HBM3" in printed
    saved = load_snapshot(out)
    assert len(saved.gpus) == 8 and len(saved.nodes) == 1
    node = saved.nodes[0]
    assert node.ray_node_id and node.ip and node.hostname == socket.gethostname()
    assert saved.node_ip == node.ip
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(load_snapshot(NODE)))
    here = hardware.detect()  # the same fake NVML read in this process: the task must have read the same
    assert saved.gpus == here.gpus and saved.nvlink_pairs == here.nvlink_pairs
    assert saved.interconnect == here.interconnect and saved.interconnect[0].nvlink_links > 0
    assert json.loads(out.read_text())["nodes"][0]["gpu_indices"] == list(range(8))


def test_live_check_refuses_a_plan_for_more_nodes_and_prints_ray_start(ray_head):
    hw = load_snapshot(CLUSTERS / "2x8-h100.json")
    with pytest.raises(ClusterError) as err:
        cluster.check_live(hw, {"tensor_parallel_size": 8, "pipeline_parallel_size": 2}, ray_head)
    message = err.value.message
    assert "the plan needs 2 node(s) with 8 GPUs each; Ray reports 1 alive node(s) with GPUs" in message
    assert "ray start --head --port=6379 --num-gpus=8" in message
    assert "on 2x8-h100-node1: ray start --address=10.0.0.1:6379 --num-gpus=8" in message


def test_live_check_accepts_a_plan_the_cluster_holds(ray_head):
    hw = load_snapshot(CLUSTERS / "2x8-h100.json")
    live = cluster.check_live(hw, {"tensor_parallel_size": 8, "pipeline_parallel_size": 1}, ray_head)
    assert len(live) == 1 and live[0].head and live[0].gpus == 8


def test_detect_names_an_address_without_a_cluster(capsys):
    port = _free_port()  # nothing listens there
    assert main(["hardware", "detect", "--ray-address", f"127.0.0.1:{port}", "--timeout", "5"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"localaistack: --ray-address 127.0.0.1:{port}: cannot connect")
