"""What a user meets going through the README and the commands: the real CLI in a subprocess, real files."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys

import pytest
from conftest import FIXTURES, REPO
from fakes import free_port

from smartrun.cli.run_cmd import _memory_terms
from smartrun.memory import Correction, MemoryEstimate

MODEL = str(FIXTURES / "models" / "qwen2.5-7b-instruct")
H100 = str(FIXTURES / "hardware" / "1x-h100-80gb.json")
T4 = str(FIXTURES / "hardware" / "1x-t4.json")


def _cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "smartrun", *args], capture_output=True, text=True, timeout=120,
                          cwd=cwd, env={**os.environ, "PATH": "/usr/bin:/bin"})


def _errors(stderr: str) -> list[str]:
    """stderr without the record's path: what the user is told."""
    return [line for line in stderr.splitlines() if not line.startswith("session record: ")]


@pytest.mark.parametrize("args", [
    ["model", "run", MODEL, "--dry-run", "--hardware", H100, "--vllm-version", "x"],
    ["model", "estimate", MODEL, "--hardware", H100, "--vllm-version", "x"],
    ["bounds", "show", MODEL, "--hardware", H100, "--vllm-version", "x"],
])
def test_a_bad_vllm_version_is_said_once(args, tmp_path):
    """It was said twice: as a `calibration not used: ...` warning, then as the command's error."""
    proc = _cli(*args, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert _errors(proc.stderr) == ["localaistack: --vllm-version 'x': expected a version like 0.19.0"]


def test_a_bad_vllm_version_record_of_before_still_replays(tmp_path):
    """The version is now refused at the calibration step: no decision lies between it and where it was refused."""
    record = tmp_path / "bad.json"
    _cli("model", "run", MODEL, "--dry-run", "--hardware", H100, "--vllm-version", "x", "--session-out", str(record),
         cwd=tmp_path)
    data = json.loads(record.read_text())
    assert [d["step"] for d in data["decisions"]] == ["hardware", "model", "pins", "error"]
    replay = _cli("session", "replay", str(record), cwd=tmp_path)
    assert replay.returncode == 0 and "all 4 decisions match" in replay.stdout


@pytest.mark.parametrize("version", ["0.6.6", "0.8.4"])  # 0.8 on a T4 (cc 7.5) runs the V0 engine
def test_the_v0_sampler_row_says_the_sort_is_counted(version, tmp_path):
    """V0's measured sampler figure (36.8 B a logit) is its full top-k/top-p path with the sort; the row said
    "no sort"."""
    proc = _cli("model", "estimate", MODEL, "--hardware", T4, "--vllm-version", version, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    row = next(line for line in proc.stdout.splitlines() if line.startswith("sampler (top-k/top-p)"))
    assert "sort included (36.8 B a logit" in row and "no sort" not in row
    est = json.loads(_cli("model", "estimate", MODEL, "--hardware", T4, "--vllm-version", version, "--json",
                          cwd=tmp_path).stdout)
    assert est["profile"] == "0.6" and "sort included" in est["sampler"]


def test_a_schema_3_record_is_one_line_saying_what_this_smartrun_reads(tmp_path):
    data = json.loads((FIXTURES / "sessions" / "cache-hit.json").read_text())
    data["schema_version"] = 3
    path = tmp_path / "new.json"
    path.write_text(json.dumps(data))
    for command in ("show", "replay"):
        proc = _cli("session", command, str(path), cwd=tmp_path)
        assert proc.returncode == 2 and proc.stdout == ""
        assert _errors(proc.stderr) == [f"localaistack: {path}: schema_version 3 is not supported (this smartrun "
                                        "reads 1 and 2)"]


def _readme_console() -> list[tuple[list[str], list[str]]]:
    """The README's ```console examples: (argv, the lines it shows), `…` standing for what it leaves out."""
    text = (REPO / "README.md").read_text()
    examples: list[tuple[list[str], list[str]]] = []
    for block in re.findall(r"```console\n(.*?)```", text, re.S):
        command = ""
        for line in block.splitlines():
            if line.startswith("$ ") or command.endswith("\\"):
                command = (command[:-1] + " " + line.removeprefix("$ ").strip()) if command else line[2:]
                if not command.endswith("\\"):
                    examples.append((shlex.split(command), []))
            else:
                command = ""
                examples[-1][1].append(line)
    return examples


def test_the_readmes_console_examples_print_what_the_readme_shows(tmp_path):
    """Every shown line is printed (a line with `…` as its pieces, in order): the README's cluster example
    showed --max-num-seqs 312 where the command prints 336."""
    examples = _readme_console()
    assert examples
    for argv, shown in examples:
        assert argv[0] == "localaistack"
        proc = _cli(*argv[1:], cwd=REPO)
        printed = (proc.stdout + proc.stderr).splitlines()
        for line in shown:
            pieces = [p for p in line.split("…") if p.strip()]
            if not pieces:
                continue
            pattern = ".*".join(re.escape(p) for p in pieces)
            assert any(re.fullmatch(pattern if "…" not in line else f".*{pattern}.*", out) for out in printed), \
                (argv, line)


@pytest.mark.parametrize("args", [
    ["hardware", "show", H100],
    ["model", "run", MODEL, "--dry-run", "--explain", "--hardware", H100],
    ["session", "show", str(FIXTURES / "sessions" / "oom-recovered.json")],
])
def test_a_reader_that_goes_away_is_no_traceback(args, tmp_path):
    """`localaistack ... | head -1`: the pipe closes before (or while) the command writes. It ended in a
    BrokenPipeError traceback; now it stops quietly with the status of a command killed by SIGPIPE."""
    proc = subprocess.Popen([sys.executable, "-m", "smartrun", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path, env={**os.environ, "PATH": "/usr/bin:/bin"})
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # long before the interpreter has started and printed anything
    stderr = proc.stderr.read()
    proc.stderr.close()
    assert proc.wait(timeout=120) == 141, stderr
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr and "Exception ignored" not in stderr


@pytest.mark.parametrize("record", ["oom-recovered.json", "schema-1/oom-recovered.json"])
def test_the_timeline_gives_a_retry_only_its_own_reason(record, tmp_path):
    """The record keeps the reason of the change that made the final plan; every earlier retry of the same knob
    showed it too (0.92 -> 0.88 "because --gpu-memory-utilization 0.88 -> 0.84")."""
    proc = _cli("session", "show", str(FIXTURES / "sessions" / record), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    retries = [line for line in proc.stdout.splitlines() if line.startswith("retry ")]
    assert retries[0] == "retry    gpu_memory_utilization 0.92 -> 0.88"
    assert retries[1].startswith("retry    gpu_memory_utilization 0.88 -> 0.84  (recovery: ")
    assert retries[1].endswith("--gpu-memory-utilization 0.88 -> 0.84)") and len(retries) == 2


@pytest.mark.parametrize(("model", "hardware", "version"), [
    ("qwen2.5-7b-instruct", "1x-h100-80gb.json", "0.33.0"),  # CUDA graphs taken from the KV cache
    ("qwen2.5-7b-instruct", "1x-h100-80gb.json", "0.19.0"),  # CUDA graphs on top
    ("qwen2.5-0.5b-instruct", "1x-t4.json", "0.6.6"),
    ("qwen2.5-7b-instruct", "2x-a100-80gb-nvlink.json", "0.10.1.1"),
])
def test_the_memory_line_adds_up_to_what_vllm_is_asked_for(model, hardware, version, tmp_path):
    """`memory  U x T GiB per GPU = ...`: the terms before `;` sum to U x T. Profiles that do not take CUDA graph
    memory from the KV cache (before 0.20) summed it in as well, so the line said more than vLLM is given."""
    proc = _cli("model", "run", str(FIXTURES / "models" / model), "--dry-run", "--hardware",
                str(FIXTURES / "hardware" / hardware), "--vllm-version", version, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    line = next(x for x in proc.stdout.splitlines() if x.startswith("  memory  "))
    head, terms = line.split("<-")[0].split(" = ")
    util, total = (float(x) for x in re.findall(r"[\d.]+", head)[:2])
    parts = terms.split(";")[0]
    assert sum(float(x) for x in re.findall(r"[+-]?\d+\.\d+", parts)) == pytest.approx(util * total, abs=0.08), line
    assert ("CUDA graphs" in parts) == (version == "0.33.0"), line


def test_the_memory_line_counts_the_machines_calibration(tmp_path):
    """A calibrated plan keeps the learned non-KV memory back: the line names it, so the terms still add up."""
    fields = {name: 1.0 for name, f in MemoryEstimate.model_fields.items() if f.annotation is float}
    est = MemoryEstimate.model_construct(**{**fields, "profile": "0.19", "weights_gib": 10.0, "kv_cache_gib": 5.0,
                                            "activation_gib": 1.0, "non_torch_gib": 0.25, "cudagraph_gib": 0.5,
                                            "calibration": Correction(machine="0" * 16, vllm_version="0.19.0",
                                                                      startups=1, non_kv_gib=2.5, rule="shrink")})
    assert _memory_terms(est) == ("weights 10.00 + KV cache 5.00 + activations 1.00 + other 0.25 + calibration "
                                  "+2.50 GiB; CUDA graphs 0.50 GiB on top (not taken from the KV cache)")


def test_a_divergence_names_what_differs(tmp_path):
    """The message cut both values at 160 characters, so an edited knob deep in `plan` never showed."""
    data = json.loads((FIXTURES / "sessions" / "llm-accepted.json").read_text())
    plan = next(d for d in data["decisions"] if d["step"] == "plan")
    plan["value"]["params"]["max_num_seqs"] = 7
    argv = next(d for d in data["decisions"] if d["step"] == "argv")
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(data))
    proc = _cli("session", "replay", str(path), cwd=tmp_path)
    assert proc.returncode == 5
    assert _errors(proc.stderr) == ["localaistack: replay diverged at decision 8 (plan): recorded params.max_num_seqs "
                                    "= 7, replay decided 4"]
    plan["value"]["params"]["max_num_seqs"] = 4
    argv["value"].append("--extra")
    path.write_text(json.dumps(data))
    proc = _cli("session", "replay", str(path), cwd=tmp_path)
    assert _errors(proc.stderr) == [f"localaistack: replay diverged at decision 9 (argv): recorded "
                                    f"[{len(argv['value']) - 1}:] = [\"--extra\"], replay decided []"]


def test_a_probe_that_measured_nothing_prints_one_json_object(tmp_path):
    """`probe URL --json` printed the result of zeros and then the error object: two objects on stdout."""
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    proc = _cli("probe", url, "--json", "--model", "m", "--max-requests", "3", "--concurrency", "1", cwd=tmp_path)
    assert proc.returncode == 2
    assert json.loads(proc.stdout) == {"error": f"{url}: no request succeeded (ConnectError x3)", "exit": 2}


def test_the_uncertainty_row_of_0_12_to_0_16_says_their_sort_was_never_measured(tmp_path):
    """0.12-0.16 plan with the 0.19 profile plus the dummy sampler's sort: the row quoted only the 0.19 startups'
    accuracy, which the sort row beside it does not have."""
    for version, unmeasured in (("0.14.0", True), ("0.19.0", False)):
        est = json.loads(_cli("model", "estimate", MODEL, "--gpu", "H100", "--vllm-version", version, "--json",
                              cwd=tmp_path).stdout)
        assert ("no startup of these versions was measured" in est["uncertainty"]) == unmeasured, version
        assert ("sort counted" in est["sampler"]) == unmeasured, version


def test_a_failed_run_names_its_record_just_before_the_error(tmp_path):
    """docs/session-record.md: the record's line ends a good run's stderr and comes just before a failed one's
    error (the docs said it was the last line after a failure too)."""
    record = tmp_path / "failed.json"
    proc = _cli("model", "run", str(FIXTURES / "models" / "qwen2.5-72b-instruct"), "--dry-run", "--hardware",
                str(FIXTURES / "hardware" / "1x-l4.json"), "--vllm-version", "0.19.0", "--session-out", str(record),
                cwd=tmp_path)
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2 and lines[-2] == f"session record: {record}"
    assert lines[-1].startswith("localaistack: qwen2.5-72b-instruct needs ")
    assert json.loads(record.read_text())["outcome"]["status"] == "error"
    docs = " ".join((REPO / "docs" / "session-record.md").read_text().split())
    assert "the line just before the `localaistack: ...` error of one that failed" in docs


def test_tune_in_a_dry_run_says_nothing_is_tuned(tmp_path):
    record = tmp_path / "dry.json"
    proc = _cli("model", "run", MODEL, "--dry-run", "--tune", "--hardware", H100, "--vllm-version", "0.19.0",
                "--session-out", str(record), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert _errors(proc.stderr) == ["warning: --tune: a dry run starts no server, so nothing is tuned"]
    assert "--tune: a dry run starts no server, so nothing is tuned" in json.loads(record.read_text())["warnings"]
    replay = _cli("session", "replay", str(record), cwd=tmp_path)
    assert replay.returncode == 0, replay.stderr
    plain = _cli("model", "run", MODEL, "--dry-run", "--hardware", H100, "--vllm-version", "0.19.0", cwd=tmp_path)
    assert _errors(plain.stderr) == []
