"""Cluster snapshots and plans across nodes, offline: snapshot files of 2x8 H100 and 4x8 A100 clusters,
the 405B-class fixture model, the one estimator per stage, the CLI as a user types it."""

from __future__ import annotations

import json

import pytest
from conftest import FIXTURES, REPO
from pydantic import ValidationError

from smartrun import cluster, cluster_plan, hardware, ray_cluster, recovery
from smartrun.cli import main
from smartrun.contracts import Bounds, KnobBound
from smartrun.hardware import HardwareSnapshot, load_snapshot
from smartrun.model import inspect
from smartrun.vllm_log import classify_failure

CLUSTERS = FIXTURES / "hardware" / "clusters"
H100_NODES = [str(CLUSTERS / f"2x8-h100-node{i}.json") for i in range(2)]
A100_NODES = [str(CLUSTERS / f"4x8-a100-node{i}.json") for i in range(4)]
BIG = str(FIXTURES / "models" / "llama-3.1-405b-instruct")
QWEN72 = str(FIXTURES / "models" / "qwen2.5-72b-instruct")
FAKE_VLLM = REPO / "tests" / "fakes" / "fake_vllm.py"


def _hw(*args: str) -> list[str]:
    return [x for path in args for x in ("--hardware", path)]


def _dry_run(capsys, model: str, nodes: list[str], *extra: str) -> tuple[int, dict | None, str]:
    code = main(["model", "run", model, *_hw(*nodes), "--dry-run", "--json", "--vllm-version", "0.19.0", *extra])
    out, err = capsys.readouterr()
    return code, json.loads(out), err


# --------------------------------------------------------------------------- snapshots


def test_node_files_combine_into_the_saved_cluster_file():
    combined = cluster.combine([load_snapshot(p) for p in H100_NODES])
    saved = load_snapshot(CLUSTERS / "2x8-h100.json")
    assert combined.gpus == saved.gpus and combined.nodes[1].gpu_indices == tuple(range(8, 16))
    assert [n.name for n in combined.nodes] == ["2x8-h100-node0", "2x8-h100-node1"]
    assert [n.ip for n in combined.nodes] == ["10.0.0.1", "10.0.0.2"]
    assert hardware.fingerprint(combined) == hardware.fingerprint(saved)
    assert combined.nvlinked(0, 7) and not combined.nvlinked(7, 8)  # NVLink stays inside a node
    node1, info = cluster.split(saved)[1]
    assert node1.gpus == load_snapshot(H100_NODES[1]).gpus and info.name == "2x8-h100-node1"


def test_a_cluster_is_not_the_same_machine_as_its_gpus_on_one_node():
    saved = load_snapshot(CLUSTERS / "2x8-h100.json")
    flat = saved.model_copy(update={"nodes": ()})
    assert hardware.fingerprint(flat) != hardware.fingerprint(saved)


def test_cluster_snapshot_rejects_nvlink_across_nodes_and_unlisted_gpus():
    data = json.loads((CLUSTERS / "2x8-h100.json").read_text())
    with pytest.raises(ValidationError, match="joins two nodes"):
        HardwareSnapshot.model_validate({**data, "nvlink_pairs": [[7, 8]]})
    data["nodes"][1]["gpu_indices"] = data["nodes"][1]["gpu_indices"][:-1]
    with pytest.raises(ValidationError, match="every GPU once"):
        HardwareSnapshot.model_validate(data)


def test_hardware_show_prints_each_node_with_its_ip_and_interconnect(capsys):
    assert main(["hardware", "show", *H100_NODES]) == 0
    out = capsys.readouterr().out
    assert out.startswith("cluster: 2 node(s), 16 GPUs")
    assert "== node 0: 2x8-h100-node0 (head) (ip 10.0.0.1)" in out and "== node 1: 2x8-h100-node1 (ip 10.0.0.2)" in out
    assert "interconnect: GPU 0,1,2,3,4,5,6,7: 18 NVLink links, PCIe gen5 x16" in out
    assert main(["hardware", "show", str(CLUSTERS / "4x8-a100.json"), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["nodes"]) == 4


# --------------------------------------------------------------------------- plans across nodes


def test_405b_on_two_h100_nodes_plans_tp_in_node_pp_across_with_ray(capsys):
    code, out, err = _dry_run(capsys, BIG, H100_NODES)
    assert code == 0, err
    params = out["params"]
    assert params["tensor_parallel_size"] == 8 and params["pipeline_parallel_size"] == 2
    assert params["distributed_executor_backend"] == "ray"
    assert out["argv"][out["argv"].index("--distributed-executor-backend") + 1] == "ray"
    placement = out["placement"]
    assert [s["node"] for s in placement["stages"]] == ["2x8-h100-node0", "2x8-h100-node1"]
    assert [s["layers"] for s in placement["stages"]] == [[0, 62], [63, 125]]
    assert all(s["fits"] and s["gpus"] == list(range(8)) for s in placement["stages"])
    assert placement["stages"][0]["first"] and placement["stages"][1]["last"]
    assert all(40 < s["weights_gib"] < 50 for s in placement["stages"])  # 756 GiB / 16 GPUs
    assert out["estimate"]["fits"] and out["bounds"]["tensor_parallel_size"]["choices"] == [8]
    assert "cluster" in out["bounds"]["pipeline_parallel_size"]["sources"]
    assert "cluster:" in out["provenance"]["distributed_executor_backend"]


def test_405b_on_one_node_refuses_with_the_reason_and_the_smallest_cluster(capsys):
    code, out, err = _dry_run(capsys, BIG, H100_NODES[:1])
    assert code == 2 and out["exit"] == 2 and err.strip().splitlines()[-1] == f"localaistack: {out['error']}"
    assert "needs 94.7 GiB of weights per GPU at tp 8; 8x NVIDIA H100 80GB HBM3 offers 73.7 GiB" in out["error"]
    assert ("the smallest cluster that fits is 2 nodes of 8x NVIDIA H100 80GB HBM3 (tp 8 inside each node, pp 2 "
            "across nodes, --distributed-executor-backend ray" in out["error"])


def test_405b_on_a100_40gb_takes_the_fewest_nodes_that_hold_it(capsys):
    code, out, err = _dry_run(capsys, BIG, A100_NODES, "--goal", "stable")
    assert code == 0, err
    assert (out["params"]["tensor_parallel_size"], out["params"]["pipeline_parallel_size"]) == (8, 3)
    placement = out["placement"]
    assert placement["nodes_used"] == 3 and [s["node_index"] for s in placement["stages"]] == [0, 1, 2]
    assert all(s["fits"] for s in placement["stages"])
    code, _, err = _dry_run(capsys, BIG, A100_NODES[:2])
    assert code == 2 and "smallest cluster that fits is 3 nodes of 8x NVIDIA A100-SXM4-40GB" in err


def test_a_model_that_fits_one_node_gets_one_replica_per_node_through_ray_dp(capsys):
    code, out, err = _dry_run(capsys, QWEN72, A100_NODES)
    assert code == 0, err
    params = out["params"]
    assert (params["tensor_parallel_size"], params["pipeline_parallel_size"], params["data_parallel_size"]) == (8, 1, 4)
    assert params["data_parallel_backend"] == "ray" and "distributed_executor_backend" not in params
    assert "cluster:" in out["provenance"]["data_parallel_backend"]
    assert out["placement"]["replicas"] == 4 and out["placement"]["nodes_used"] == 1


def test_replicas_that_span_nodes_are_not_data_parallel(capsys):
    code, out, err = _dry_run(capsys, BIG, A100_NODES)
    assert code == 0, err
    assert out["params"].get("data_parallel_size", 1) == 1
    assert out["bounds"]["data_parallel_size"]["max"] == 1 and "cluster" in out["bounds"]["data_parallel_size"]["sources"]


def test_heterogeneous_nodes_are_refused_with_what_differs(capsys):
    code, _, err = _dry_run(capsys, BIG, [H100_NODES[0], A100_NODES[0]])
    assert code == 2
    assert "cluster nodes differ: node 4x8-a100-node0 has NVIDIA A100-SXM4-40GB (40960 MiB)" in err


def test_tp_across_nodes_is_a_pin_conflict(capsys):
    code, _, err = _dry_run(capsys, BIG, H100_NODES, "-tp", "16")
    assert code == 2 and "pin --tensor-parallel-size 16 conflicts with cluster: tensor_parallel_size must be one of [8]" in err


def test_a_bounds_file_bounds_pipeline_parallel_size_on_a_cluster(tmp_path, capsys):
    bounds = tmp_path / "smartrun.toml"
    bounds.write_text('version = 1\n[knobs.pipeline_parallel_size]\nmax = 2\nwhy = "two racks at most"\n')
    code, _, err = _dry_run(capsys, BIG, A100_NODES, "--bounds", str(bounds))
    assert code == 2
    assert f"pipeline_parallel_size is bounded to <= 2 by bounds:{bounds}:3" in err
    assert "it fits on 3 of these 4 nodes (tp 8, pp 3) where the bounds allow that" in err
    code, out, err = _dry_run(capsys, BIG, H100_NODES, "--bounds", str(bounds))
    assert code == 0 and out["params"]["pipeline_parallel_size"] == 2


def test_one_machine_plans_as_before_without_pipeline_stages_or_ray(capsys):
    code, out, err = _dry_run(capsys, QWEN72, [str(FIXTURES / "hardware" / "4x-h100-80gb-nvlink.json")])
    assert code == 0, err
    assert out["params"]["pipeline_parallel_size"] == 1 and "distributed_executor_backend" not in out["params"]
    assert "placement" not in out and "cluster" not in out["bounds"]["tensor_parallel_size"]["sources"]


def test_text_summary_names_the_node_of_each_stage(capsys):
    code = main(["model", "run", BIG, *_hw(*H100_NODES), "--dry-run", "--vllm-version", "0.19.0"])
    out = capsys.readouterr().out
    assert code == 0 and "nodes        2 of 2 node(s) x 8 GPUs per replica: tp 8 inside a node, pp 2 across nodes" in out
    assert "stage 0 on 2x8-h100-node0 GPUs 0,1,2,3,4,5,6,7: layers 0-62 (embeddings)" in out
    assert "stage 1 on 2x8-h100-node1 GPUs 0,1,2,3,4,5,6,7: layers 63-125 (lm head)" in out
    assert "(16 on 2 nodes): NVIDIA H100 80GB HBM3, NVLink inside each node" in out


def test_launch_of_a_plan_across_nodes_needs_ray_address_and_prints_ray_start(capsys):
    code = main(["model", "run", BIG, *_hw(*H100_NODES), "--vllm-bin", str(FAKE_VLLM), "--port", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("localaistack: the plan spans 2 nodes and starts on a Ray cluster: pass "
                                            "--ray-address HEAD:PORT")
    assert "on 2x8-h100-node0 (head): ray start --head --port=6379 --num-gpus=8" in err[-1]
    assert "on 2x8-h100-node1: ray start --address=10.0.0.1:6379 --num-gpus=8" in err[-1]


# --------------------------------------------------------------------------- failures and recovery


@pytest.mark.parametrize(("line", "klass"), [
    ("ConnectionError: Could not find any running Ray instance. Please specify the one to connect to by setting "
     "`--address` flag or `RAY_ADDRESS` environment variable.", "ray_not_running"),
    ("ValueError: Cannot provide a placement group of placement_group_specs=[{'GPU': 1.0}] within 1800 seconds. "
     "See `ray status` to make sure the cluster has enough resources.", "ray_placement_group_timeout"),
    ("(raylet) The node with node id: 5ad7 and address: 10.0.0.2 and node name: 10.0.0.2 has been marked dead "
     "because the detector has missed too many heartbeats from it.", "ray_node_died"),
    ("ValueError: Ray does not allocate any GPUs on the driver node. Consider adjusting the Ray placement group or "
     "running the driver on a GPU node.", "ray_node_died"),
    ("RuntimeError: NCCL error: unhandled system error (run with NCCL_DEBUG=INFO for details)", "nccl_error"),
])
def test_ray_and_nccl_failures_are_classified_from_their_own_wording(line, klass):
    failure = classify_failure([line, "RuntimeError: Engine core initialization failed."], 1)
    assert failure is not None and failure.klass == klass
    if klass.startswith("ray_"):
        step = recovery.next_step(failure, _plan(), _cluster_bounds())
        assert isinstance(step, recovery.Stop) and "ray" in step.hint.lower()


def _plan():
    from smartrun.contracts import Plan

    return Plan(params={"tensor_parallel_size": 8, "pipeline_parallel_size": 2, "gpu_memory_utilization": 0.9,
                        "max_model_len": 4096})


def _cluster_bounds(pp_pinned: bool = True) -> Bounds:
    return Bounds(knobs={
        "tensor_parallel_size": KnobBound(knob="tensor_parallel_size", choices=(8,), sources=("cluster",)),
        "pipeline_parallel_size": KnobBound(knob="pipeline_parallel_size", min=2, max=2, pinned=pp_pinned,
                                            llm_may_change=False, sources=("pin",)),
        "gpu_memory_utilization": KnobBound(knob="gpu_memory_utilization", min=0.85, max=0.93),
        "max_model_len": KnobBound(knob="max_model_len", min=2048, max=8192),
    })


def test_recovery_never_moves_a_stage_across_the_pinned_node_boundary():
    failure = classify_failure(["Starting to load model", "torch.OutOfMemoryError: CUDA out of memory."], 1)
    assert failure is not None and failure.klass == "oom_loading"
    proposals, stop = recovery.candidates(failure, _plan(), _cluster_bounds())
    touched = {c.knob for p in proposals for c in p.changes}
    assert not touched & {"tensor_parallel_size", "pipeline_parallel_size"}
    assert isinstance(stop, recovery.Stop)


def test_smallest_cluster_search_uses_the_one_estimator():
    facts = inspect(BIG)
    node = load_snapshot(H100_NODES[0])
    assert cluster_plan.smallest_cluster(facts, node, {"max_model_len": 4096, "gpu_memory_utilization": 0.9},
                                    "0.19.0") == (2, 8, 2)
    a100 = load_snapshot(A100_NODES[0])  # less memory: more nodes
    tight = {"max_model_len": 2048, "gpu_memory_utilization": 0.93, "max_num_seqs": 1}
    assert cluster_plan.smallest_cluster(facts, a100, tight, "0.19.0")[0] == 3
    assert cluster_plan.smallest_cluster(facts, a100, {**tight, "gpu_memory_utilization": 0.85}, "0.19.0")[0] == 4


def test_ray_start_lines_for_each_node():
    hw = load_snapshot(CLUSTERS / "4x8-a100.json")
    lines = ray_cluster.ray_start_commands(hw, 3)
    assert lines == ["on 4x8-a100-node0 (head): ray start --head --port=6379 --num-gpus=8",
                     "on 4x8-a100-node1: ray start --address=10.0.0.1:6379 --num-gpus=8",
                     "on 4x8-a100-node2: ray start --address=10.0.0.1:6379 --num-gpus=8"]


def test_ray_address_must_be_host_and_port(capsys):
    assert main(["hardware", "detect", "--ray-address", "nowhere"]) == 2
    assert "expected HOST:PORT of the Ray head" in capsys.readouterr().err


def test_nodes_is_bounded_like_any_knob(tmp_path, capsys):
    bounds = tmp_path / "smartrun.toml"
    bounds.write_text('version = 1\n[knobs.nodes]\nmax = 2\nwhy = "half the cluster"\n')
    code, out, err = _dry_run(capsys, BIG, A100_NODES, "--bounds", str(bounds))
    assert code == 2 and f"(nodes is bounded to <= 2 by bounds:{bounds}:3)" in out["error"]
    assert "it fits on 3 of these 4 nodes (tp 8, pp 3) where the bounds allow that" in out["error"]
    code, out, err = _dry_run(capsys, QWEN72, A100_NODES, "--bounds", str(bounds))
    assert code == 0, err
    assert out["params"]["data_parallel_size"] == 2 and out["bounds"]["nodes"]["max"] == 2


def test_a_nodes_pin_sets_how_many_nodes_the_plan_uses_and_never_reaches_vllm(capsys):
    code, out, err = _dry_run(capsys, QWEN72, A100_NODES, "--nodes", "3")
    assert code == 0, err
    assert out["params"]["data_parallel_size"] == 3 and out["params"]["nodes"] == 3
    assert "--nodes" not in out["argv"]
    code, out, err = _dry_run(capsys, BIG, A100_NODES, "--nodes", "4")
    assert code == 0 and out["params"]["pipeline_parallel_size"] == 4 and out["placement"]["nodes_used"] == 4


def test_bounds_show_takes_one_snapshot_per_node(capsys):
    code = main(["bounds", "show", BIG, *_hw(*H100_NODES), "--vllm-version", "0.19.0", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["params"]["pipeline_parallel_size"] == 2
    assert out["params"]["distributed_executor_backend"] == "ray" and "ray" in out["argv"]


def test_a_cluster_dry_run_record_replays(tmp_path, capsys):
    session = tmp_path / "cluster.json"
    code = main(["model", "run", BIG, *_hw(*H100_NODES), "--dry-run", "--vllm-version", "0.19.0",
                 "--session-out", str(session)])
    assert code == 0
    record = json.loads(session.read_text())
    assert len(record["hardware"]["nodes"]) == 2 and record["request"]["more_hardware"] == [H100_NODES[1]]
    capsys.readouterr()
    assert main(["session", "replay", str(session)]) == 0


def test_tp_that_does_not_divide_the_heads_is_refused_with_the_reason(capsys):
    code, out, _ = _dry_run(capsys, BIG, H100_NODES, "-tp", "3")
    assert code == 2 and "pin --tensor-parallel-size 3 conflicts with model, cluster" in out["error"]
    assert "tensor_parallel_size must be one of [8]" in out["error"]


def test_detect_without_the_ray_extra_says_how_to_install_it(monkeypatch, capsys):
    import socket
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with socket.socket() as head:  # something listens at the address, as a Ray head would
        head.bind(("127.0.0.1", 0))
        head.listen()
        port = head.getsockname()[1]
        assert main(["hardware", "detect", "--ray-address", f"127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Ray is not installed" in err[0] and "pip install 'smartrun[ray]'" in err[0]
