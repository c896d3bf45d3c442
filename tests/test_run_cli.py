"""`localaistack model run` through the real CLI: dry-run text and JSON, fallback, bad inputs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import FIXTURES, REPO

from smartrun.cli import main
from smartrun.session import load_record

MODEL = str(FIXTURES / "models" / "qwen2.5-7b-instruct")
H100 = str(FIXTURES / "hardware" / "1x-h100-80gb.json")
FOUR_H100 = str(FIXTURES / "hardware" / "4x-h100-80gb-nvlink.json")
NO_LLM_ENV = ("SMARTRUN_LLM_BASE_URL", "SMARTRUN_LLM_MODEL", "OPENAI_BASE_URL", "SMARTRUN_LLM_API_KEY",
              "OPENAI_API_KEY")


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """No real home, no LLM from the environment, no user config, cwd without a smartrun.toml."""
    monkeypatch.setenv("SMARTRUN_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    for name in NO_LLM_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_dry_run_text_is_the_command_then_a_short_summary(capsys, tmp_path):
    out_file = tmp_path / "s.json"
    code = main(["model", "run", MODEL, "--dry-run", "--hardware", H100, "--max-model-len", "8192",
                 "--session-out", str(out_file)])
    out, err = capsys.readouterr()
    assert code == 0
    lines = out.strip().splitlines()
    assert lines[0].startswith("vllm serve ") and "--max-model-len 8192" in lines[0]  # what a person copies
    assert "--host 127.0.0.1 --port 8000" in lines[0]
    labels = [line.split()[0] for line in lines[1:]]
    assert labels == ["context", "concurrency", "GPUs", "memory", "plan"]
    assert "8,192 tokens per request  <- pin" in lines[1]
    assert "<- " in lines[2] and "NVIDIA H100 80GB HBM3" in lines[3] and "KV cache" in lines[4]
    assert "== effective bounds" not in out and "== decisions" not in out  # those are --explain's
    assert "warning: no vLLM version known" in err and err.rstrip().endswith(f"session record: {out_file}")
    record = load_record(out_file)
    assert record.outcome.status == "dry-run" and record.final_plan.params["max_model_len"] == 8192
    assert [d.step for d in record.decisions][:4] == ["hardware", "model", "pins", "bounds"]


def test_dry_run_json_is_one_object_of_the_documented_shape(capsys):
    code = main(["model", "run", MODEL, "--dry-run", "--json", "--hardware", H100, "--", "--seed", "7"])
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert {"source", "params", "argv", "bounds", "rejected", "estimate"} <= set(data)
    assert data["source"] == "static" and data["rejected"] == []
    assert data["argv"][:3] == ["vllm", "serve", MODEL] and data["argv"][-2:] == ["--seed", "7"]
    mml = data["bounds"]["max_model_len"]
    assert "sources" in mml and ("max" in mml or "choices" in mml)
    assert data["params"]["max_model_len"] == data["estimate"]["max_model_len"]
    assert data["session"] and load_record(data["session"]).outcome.status == "dry-run"


def test_smart_run_without_llm_says_so_once_and_uses_the_baseline(capsys):
    code = main(["model", "run", MODEL, "--smart-run", "--smart-run-debug", "--dry-run", "--hardware", H100])
    captured = capsys.readouterr()
    assert code == 0
    assert captured.err.count("no LLM configured") == 1
    assert "  plan         source=static" in captured.out
    assert "source=static reason=no LLM configured" in captured.out


def test_explain_prints_sources_and_provenance(capsys):
    code = main(["model", "run", MODEL, "--dry-run", "--explain", "--hardware", FOUR_H100, "--goal", "throughput"])
    out = capsys.readouterr().out
    assert code == 0
    assert out.startswith("vllm serve ")
    for part in ("== hardware", "== model", "Qwen2ForCausalLM", "== effective bounds (with sources)",
                 "== baseline (source=static)", "== plan (source=static)", "== provenance (per knob)",
                 "== decisions (in order; what replay compares)", "== rejected (0)", "== estimate"):
        assert part in out, part
    decisions = out[out.index("== decisions"):].splitlines()
    bounds_line = next(line for line in decisions if ". bounds " in line)
    assert not bounds_line.rstrip().endswith("...")  # never truncated: the whole bounds decision is there
    json.loads(bounds_line.split(" bounds", 1)[1].strip().rsplit("  <- ", 1)[0])


def test_api_key_is_redacted_from_record_and_output(capsys, tmp_path):
    secret = "sk-smartrunFAKE-0c4f2d9e8a7b"
    out_file = tmp_path / "s.json"
    code = main(["model", "run", MODEL, "--dry-run", "--hardware", H100, "--api-key", secret,
                 "--session-out", str(out_file)])
    captured = capsys.readouterr()
    assert code == 0
    assert secret not in out_file.read_text()
    assert secret not in captured.out


def _cli(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "smartrun", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=60)


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["model", "run", "/nonexistent/model-dir", "--dry-run", "--hardware", H100], "/nonexistent/model-dir"),
        (["model", "run", MODEL, "--dry-run", "--hardware", "BADSNAP"], "bad-snapshot.json"),
        (["model", "run", MODEL, "--dry-run", "--hardware", H100, "--max-model-len", "lots"], "--max-model-len"),
        (["model", "run", MODEL, "--dry-run", "--hardware", H100, "--bounds", "missing.toml"], "missing.toml"),
        (["session", "replay", "nope.json"], "nope.json"),
        (["model", "run", MODEL, "--hardware", H100], "vllm not found"),
    ],
)
def test_bad_input_is_one_line_exit_2_no_traceback_no_half_file(tmp_path, args, words):
    bad = tmp_path / "bad-snapshot.json"
    bad.write_text('{"schema_version": 1, "gpus": [')
    args = [str(bad) if a == "BADSNAP" else a for a in args]
    env_home = tmp_path / "home"
    proc = subprocess.run([sys.executable, "-m", "smartrun", *args], capture_output=True, text=True,
                          cwd=tmp_path, timeout=60,
                          env={"SMARTRUN_HOME": str(env_home), "PATH": "/usr/bin:/bin",
                               "XDG_CONFIG_HOME": str(tmp_path / "cfg"), "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if not line.startswith("session record: ")]
    assert len(lines) == 1 and lines[0].startswith("localaistack: ") and words in lines[0]
    assert "Traceback" not in proc.stderr
    leftovers = [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []
    for record in (env_home / "sessions").glob("*.json") if (env_home / "sessions").is_dir() else []:
        assert load_record(record).outcome.exit_code == 2  # a complete record of the failed run


def _saved_entry(model: str = "qwen2.5-7b-instruct"):
    from smartrun.plan_cache import CacheEntry, CacheKey

    key = CacheKey(model=model, hardware_fingerprint="hw", bounds_sha256="b" * 64, vllm_version="0.33.0")
    return CacheEntry(key=key, model_path=f"/models/{model}", params={"max_num_seqs": 3},
                      saved_at="2026-01-01T00:00:00Z")


def test_smart_run_cache_list_and_rm(capsys):
    from smartrun.plan_cache import SavedParams

    cache = SavedParams()
    cache.store(_saved_entry())
    cache.store(_saved_entry("llama-3.1-8b-instruct"))
    (cache.directory / "junk.json").write_text("{nope")
    assert main(["model", "smart-run-cache", "list"]) == 0
    captured = capsys.readouterr()
    assert "qwen2.5-7b-instruct" in captured.out and "llama-3.1-8b-instruct" in captured.out
    assert "corrupt smart-run cache entry skipped" in captured.err and "junk.json" in captured.err
    assert main(["model", "smart-run-cache", "list", "qwen2.5-7b-instruct", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [e["key"]["model"] for e in data["entries"]] == ["qwen2.5-7b-instruct"]
    assert main(["model", "smart-run-cache", "rm", "/models/qwen2.5-7b-instruct"]) == 0
    assert "removed 1" in capsys.readouterr().out
    assert [e.key.model for _, e in SavedParams().entries()] == ["llama-3.1-8b-instruct"]


def test_debug_line_for_a_cache_hit(capsys):
    from smartrun.plan_cache import CacheEntry, SavedParams

    args = ["model", "run", MODEL, "--smart-run", "--dry-run", "--json", "--hardware", H100]
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out)
    key = load_record(first["session"]).cache.key
    SavedParams().store(CacheEntry(key=key, params={**first["params"], "max_num_seqs": 2},
                                   saved_at="2026-01-01T00:00:00Z"))
    assert main(["model", "run", MODEL, "--smart-run", "--smart-run-debug", "--dry-run", "--hardware", H100]) == 0
    out = capsys.readouterr().out
    assert "debug: source=cache" in out and "  plan         source=cache" in out and "--max-num-seqs 2" in out
    assert main(["model", "run", MODEL, "--smart-run", "--smart-run-refresh", "--dry-run", "--hardware", H100]) == 0
    assert "  plan         source=static" in capsys.readouterr().out


def test_host_and_port_after_double_dash_are_not_doubled(capsys):
    assert main(["model", "run", MODEL, "--dry-run", "--json", "--hardware", H100, "--", "--port", "9001"]) == 0
    argv = json.loads(capsys.readouterr().out)["argv"]
    assert argv.count("--port") == 1 and argv[argv.index("--port") + 1] == "9001"
    assert argv[argv.index("--host") + 1] == "127.0.0.1"


def test_strict_without_an_llm_fails_with_exit_3(capsys):
    code = main(["model", "run", MODEL, "--smart-run", "--smart-run-strict", "--dry-run", "--hardware", H100])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 3 and err[-1] == ("localaistack: --smart-run-strict: no LLM configured (set --llm-base-url or "
                                     "SMARTRUN_LLM_BASE_URL)")
    assert not any("Traceback" in line for line in err)


def test_request_command_line_parses_back_to_the_same_request(monkeypatch):
    """smartrun's options are declared once (smartrun.request.OPTIONS): argparse, the request and the recorded
    command line all come from it, so a request's command line parses back to that request."""
    from smartrun.cli import build_parser
    from smartrun.cli.run_cmd import request_from_args
    from smartrun.pipeline import RunRequest

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    request = RunRequest(model="m", smart_run=True, debug=True, dry_run=True, goal="latency", force=True,
                         host="0.0.0.0", port=9000, vllm_version="0.19.0", startup_timeout=30.0, max_attempts=2,
                         hardware_path="a.json", more_hardware=("b.json",), ray_address="h:6379", bounds_path="b.toml",
                         llm_base_url="http://x/v1", llm_model="q", llm_timeout=5.0, gpus="0,1",
                         user_args=("--max-model-len", "8k"), extra_args=("--seed", "1"))
    args, extra = build_parser().parse_known_args(request.command_line()[1:])
    args.extra = extra
    assert request_from_args(args) == request


def test_a_tuning_request_command_line_parses_back_to_the_same_request(monkeypatch):
    """The --tune options travel in the recorded command line too, and read back as the same settings."""
    from smartrun.cli import build_parser
    from smartrun.cli.run_cmd import request_from_args
    from smartrun.pipeline import RunRequest
    from smartrun.probe import ProbeSettings
    from smartrun.tune import TuneSettings

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    settings = TuneSettings(rounds=2, slo_p95_ms=400.0, vs_defaults=True,
                            probe=ProbeSettings(concurrency=4, duration_s=1.5, max_requests=50))
    request = RunRequest(model="m", tune=True, tune_options=settings.model_dump(mode="json"))
    line = request.command_line()
    assert {"--tune", "--tune-rounds", "--slo-p95-ms", "--tune-vs-defaults", "--probe-concurrency"} <= set(line)
    args, extra = build_parser().parse_known_args(line[1:])
    args.extra = extra
    assert request_from_args(args) == request
    plain = RunRequest(model="m", tune=True, tune_options=TuneSettings().model_dump(mode="json"))
    assert plain.command_line() == ["localaistack", "model", "run", "m", "--tune"]


def test_bounds_show_plans_with_model_runs_own_options():
    """`bounds show` takes its planning options from model run's one table (request.OPTIONS), so the same
    flags read into the same request fields in both commands."""
    from smartrun.cli import build_parser
    from smartrun.cli.bounds_cmd import PLANNING_OPTIONS
    from smartrun.request import RunRequest

    argv = ["--hardware", "a.json", "--hardware", "b.json", "--gpus", "0,1", "--bounds", "b.toml", "--goal",
            "latency", "--force", "--vllm-version", "0.19.0"]
    show, _ = build_parser().parse_known_args(["bounds", "show", "m", *argv])
    run, _ = build_parser().parse_known_args(["model", "run", "m", *argv])
    fields = RunRequest.fields_from_args(show, only=PLANNING_OPTIONS)
    assert fields == {k: v for k, v in RunRequest.fields_from_args(run).items() if k in fields}
    assert fields == {"hardware_path": "a.json", "more_hardware": ("b.json",), "gpus": "0,1",
                      "bounds_path": "b.toml", "goal": "latency", "force": True, "vllm_version": "0.19.0"}
    defaults, _ = build_parser().parse_known_args(["bounds", "show", "m"])
    assert RunRequest(model="m", **RunRequest.fields_from_args(defaults, only=PLANNING_OPTIONS)) == RunRequest(model="m")
