"""Issue 16: what an operator meets in the first hour - served names, output, --json errors, GPU choice,
the startup heartbeat - through the real CLI and the `vllm` stand-in (a real subprocess)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from conftest import FIXTURES, REPO
from fakes import HeldClock, free_port, install_vllm_shim

from smartrun import launch, pipeline
from smartrun.cli import main
from smartrun.contracts import Plan
from smartrun.pipeline import launching
from smartrun.session import load_record

SMALL = FIXTURES / "models" / "qwen2.5-0.5b-instruct"
L4 = str(FIXTURES / "hardware" / "1x-l4.json")
H100 = str(FIXTURES / "hardware" / "1x-h100-80gb.json")
FOUR_H100 = str(FIXTURES / "hardware" / "4x-h100-80gb-nvlink.json")
TWO_3090 = str(FIXTURES / "hardware" / "2x-rtx3090-pcie.json")
REPO_ID = "Qwen/Qwen2.5-0.5B-Instruct"
FAST = {"delays": {"import_s": 0.0, "load_s": 0.05, "profile_s": 0.0, "capture_s": 0.0}}


@pytest.fixture
def hub(tmp_path, monkeypatch) -> Path:
    """A Hugging Face cache holding REPO_ID (a copy of the small fixture), as `huggingface-cli download` leaves it."""
    root = tmp_path / "hf-hub"
    repo = root / ("models--" + REPO_ID.replace("/", "--"))
    shutil.copytree(SMALL, repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return repo / "snapshots" / "0123abcd"


def _json_run(capsys, *args: str) -> tuple[int, dict, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, json.loads(out), err


# ---------------------------------------------------------------------------- served model name


def test_a_repo_id_is_served_under_that_id_unless_the_user_names_it(hub, capsys):
    code, data, _ = _json_run(capsys, "model", "run", REPO_ID, "--dry-run", "--json", "--hardware", L4)
    assert code == 0
    argv = data["argv"]
    assert argv[2] == str(hub.absolute())  # vLLM loads the snapshot (nothing is downloaded) ...
    assert argv[argv.index("--served-model-name") + 1] == REPO_ID  # ... and serves it under the id clients know
    code, data, _ = _json_run(capsys, "model", "run", REPO_ID, "--dry-run", "--json", "--hardware", L4,
                              "--served-model-name", "qwen-small")
    assert data["argv"].count("--served-model-name") == 1
    assert data["argv"][data["argv"].index("--served-model-name") + 1] == "qwen-small"
    code, data, _ = _json_run(capsys, "model", "run", str(SMALL), "--dry-run", "--json", "--hardware", L4)
    assert "--served-model-name" not in data["argv"]  # a directory is served the way vLLM names it


def test_a_launched_repo_id_answers_under_its_id_and_readiness_waited_for_that_name(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_VLLM_SCENARIO", json.dumps({**FAST, "gpu_total_gib": 22.03, "gpu_name": "NVIDIA L4",
                                                          "cc": "8.9", "weights_gib": 0.93, "num_heads": 14,
                                                          "kv_bytes_per_token": 12288}))
    shim = install_vllm_shim(tmp_path / "bin")
    request = pipeline.RunRequest(model=REPO_ID, hardware_path=L4, port=free_port(), vllm_bin=str(shim),
                                  startup_timeout=30)
    sources = pipeline.live_sources(request, env={})
    servers = []
    sources.supervise = False
    launcher = sources.launcher

    def keep(*args):  # keep the server up after ready, to ask it as a client would
        inner = launcher(*args)
        start = inner.start

        def start_and_ask(plan, argv, env):
            attempt, server = start(plan, argv, env)
            if server is not None:
                url = f"{server.base_url}/v1/completions"
                servers.append((httpx.post(url, json={"model": REPO_ID, "prompt": "hi", "max_tokens": 1},
                                           trust_env=False).status_code,
                                httpx.post(url, json={"model": str(hub), "prompt": "hi", "max_tokens": 1},
                                           trust_env=False).status_code))
            return attempt, server
        inner.start = start_and_ask
        return inner

    sources.launcher = keep
    result = pipeline.run(request, sources, session_out=tmp_path / "s.json")
    assert result.record.outcome.status == "ok", result.record.outcome
    assert servers == [(200, 404)]  # the id works; the snapshot path (what vLLM would list) does not
    assert "--served-model-name" in result.record.launch_attempts[-1].argv


def test_readiness_refuses_a_server_that_does_not_list_the_served_name(tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_VLLM_SCENARIO", json.dumps({**FAST, "list_names": ["something-else"]}))
    shim = install_vllm_shim(tmp_path / "bin")
    port = free_port()
    starter = launch.ProcessLauncher(str(shim), port=port, printer=lambda _: None, progress=lambda _: None,
                                     poll_interval=0.05, stop_grace=5, startup_timeout=20)
    argv = [str(shim), "serve", "/models/m", "--served-model-name", "org/model", "--port", str(port)]
    attempt, server = starter.start(Plan(params={}), argv, {})
    assert server is None and attempt.outcome == "failed"
    assert "lists something-else, not the served name org/model" in attempt.evidence


def test_the_tuners_probe_asks_for_the_served_name():
    request = pipeline.RunRequest(model=REPO_ID, tune=True, tune_options={"probe": {"model": None}, "rounds": 2})
    asked = launching.probe_served_name(request, ("--host", "127.0.0.1", "--served-model-name", REPO_ID))
    assert asked.tune_options["probe"]["model"] == REPO_ID and asked.tune_options["rounds"] == 2
    mine = request.model_copy(update={"tune_options": {"probe": {"model": "mine"}}})
    assert launching.probe_served_name(mine, ("--served-model-name", REPO_ID)) is mine


# ---------------------------------------------------------------------------- output


def _cli(*args: str, env: dict | None = None, cwd: Path | None = None, merged: bool = False):
    return subprocess.run([sys.executable, "-m", "smartrun", *args], capture_output=not merged, text=True,
                          timeout=120, cwd=cwd, env={**os.environ, **(env or {})},
                          stdout=subprocess.PIPE if merged else None, stderr=subprocess.STDOUT if merged else None)


def test_warnings_come_before_the_result_and_the_record_path_ends_stderr_on_its_own_line(tmp_path):
    proc = _cli("model", "run", str(SMALL), "--smart-run", "--dry-run", "--hardware", L4, merged=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout
    lines = proc.stdout.splitlines()
    command = next(i for i, line in enumerate(lines) if line.startswith("vllm serve "))
    warnings = [i for i, line in enumerate(lines) if line.startswith("warning: ")]
    assert warnings and max(warnings) < command
    assert re.fullmatch(r"session record: \S+\.json", lines[-1]) and proc.stdout.endswith("\n")
    assert len(lines) - command <= 8  # the command and a short summary, not 34 lines


def test_every_json_error_is_one_object_on_stdout(tmp_path, monkeypatch):
    env = {"SMARTRUN_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin"}
    cases = [
        (["model", "run", "/no/such/model", "--dry-run", "--json", "--hardware", L4], 2, True),
        (["model", "run", str(SMALL), "--dry-run", "--json", "--smart-run", "--smart-run-strict", "--hardware", L4],
         3, True),
        (["model", "run", str(SMALL), "--json", "--goal", "fastest"], 2, False),  # a usage error
        (["session", "replay", "nope.json", "--json"], 2, False),
        (["hardware", "show", "nope.json", "--json"], 2, False),
        (["model", "inspect", "/no/such/model", "--json"], 2, False),
    ]
    for args, code, recorded in cases:
        proc = _cli(*args, env=env, cwd=tmp_path)
        assert proc.returncode == code, (args, proc.stderr)
        data = json.loads(proc.stdout)  # exactly one JSON object, nothing else on stdout
        assert data["exit"] == code and data["error"], args
        assert ("session_record" in data) == recorded, args
        if recorded:
            assert load_record(data["session_record"]).outcome.exit_code == code
        assert "Traceback" not in proc.stderr


def test_hardware_detect_json_answers_in_json_without_a_gpu(tmp_path):
    proc = _cli("hardware", "detect", "--json", cwd=tmp_path)
    if proc.returncode == 0:  # a machine with a GPU: the snapshot itself
        assert "gpus" in json.loads(proc.stdout)
        return
    data = json.loads(proc.stdout)
    assert data["exit"] == proc.returncode == 2 and "NVIDIA" in data["error"]


# ---------------------------------------------------------------------------- GPUs


def test_gpus_restricts_planning_to_the_named_gpus(capsys, tmp_path):
    out = tmp_path / "s.json"
    code, data, _ = _json_run(capsys, "model", "run", str(SMALL), "--dry-run", "--json", "--hardware", FOUR_H100,
                              "--gpus", "3,1", "--tensor-parallel-size", "2", "--session-out", str(out))
    assert code == 0
    record = load_record(out)
    assert next(d for d in record.decisions if d.step == "gpus").value["visible"] == [1, 3]
    assert len(record.hardware.gpus) == 4  # the record keeps the machine as detected; replay restricts again
    code, data, _ = _json_run(capsys, "model", "run", str(SMALL), "--dry-run", "--json", "--hardware", FOUR_H100,
                              "--gpus", "2", "--tensor-parallel-size", "2")
    assert code == 2 and "tensor_parallel_size must be one of [1]" in data["error"]  # one GPU allowed
    assert main(["session", "replay", str(out)]) == 0


@pytest.mark.parametrize(("args", "env", "words"), [
    (["--gpus", "7"], None, "--gpus 7: 7 names no GPU of this machine (GPUs 0,1,2,3"),
    (["--gpus", "1,1"], None, "GPU 1 is named twice"),
    (["--gpus", "0,x"], None, "'x' is neither a GPU index nor a GPU UUID"),
    (["--gpus", "0,2"], "0,1", "--gpus 0,2 (inside CUDA_VISIBLE_DEVICES=0,1): 2 names no GPU of this machine (GPUs 0,1"),
    ([], "", "hides every GPU"),
    ([], "MIG-3f2a", "MIG instances are not supported"),
])
def test_bad_gpu_choices_are_one_line_exit_2(args, env, words, tmp_path, monkeypatch, capsys):
    if env is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", env)
    code = main(["model", "run", str(SMALL), "--hardware", FOUR_H100, "--vllm-bin", "/bin/true", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and words in err[-1], err


def test_cuda_visible_devices_and_gpus_pick_what_the_launch_sets(tmp_path, monkeypatch):
    """A launch on a 4-GPU machine with CUDA_VISIBLE_DEVICES=1,2,3 and --gpus 2,3: TP 2 runs on GPUs 2,3, the
    launch sets CUDA_VISIBLE_DEVICES=2,3 (nvidia-smi numbering, PCI bus order) and the summary says so."""
    monkeypatch.setenv("FAKE_VLLM_SCENARIO", json.dumps({**FAST, "gpus": 2, "weights_gib": 0.93, "num_heads": 14,
                                                          "kv_bytes_per_token": 12288}))
    shim = install_vllm_shim(tmp_path / "bin")
    request = pipeline.RunRequest(model=str(SMALL), hardware_path=FOUR_H100, port=free_port(), vllm_bin=str(shim),
                                  startup_timeout=30, user_args=("--tensor-parallel-size", "2"), gpus="2,3",
                                  visible_devices="1,2,3")
    sources = pipeline.live_sources(request, env={})
    sources.supervise = False
    result = pipeline.run(request, sources, session_out=tmp_path / "s.json")
    assert result.record.outcome.status == "ok"
    assert result.record.launch_attempts[-1].env["CUDA_VISIBLE_DEVICES"] == "2,3"
    from smartrun.cli.run_cmd import summary_lines

    gpus_line = next(line for line in summary_lines(result) if line.strip().startswith("GPUs"))
    assert "2,3 (allowed 2,3)" in gpus_line and "tensor parallel 2" in gpus_line


def test_no_nvlink_warning_only_when_the_plan_splits_layers(capsys):
    code, data, _ = _json_run(capsys, "model", "run", str(SMALL), "--dry-run", "--json", "--hardware", TWO_3090)
    assert code == 0 and data["params"]["tensor_parallel_size"] == 1
    assert not any("NVLink" in w for w in data["warnings"])
    code, data, _ = _json_run(capsys, "model", "run", str(SMALL), "--dry-run", "--json", "--hardware", TWO_3090,
                              "--tensor-parallel-size", "2")
    assert code == 0 and data["params"]["disable_custom_all_reduce"] is True
    assert any("no NVLink between GPUs 0, 1: tensor parallel 2" in w for w in data["warnings"])


# ---------------------------------------------------------------------------- heartbeat


def test_a_heartbeat_names_phase_elapsed_time_and_vllms_last_line_while_it_loads(tmp_path, monkeypatch):
    # the stand-in sits in "loading weights" for ten minutes; the clock starts once it says so, then 2 s pass by
    # the launcher's own polls: a beat every 0.3 s of them, then the startup deadline
    monkeypatch.setenv("FAKE_VLLM_SCENARIO", json.dumps({"delays": {"import_s": 0.0, "load_s": 600, "profile_s": 0.0,
                                                                    "capture_s": 0.0}}))
    shim = install_vllm_shim(tmp_path / "bin")
    port = free_port()
    events: list[str] = []
    clock = HeldClock(lambda: "loading weights" in events)
    starter = launch.ProcessLauncher(str(shim), port=port, printer=lambda _: None, progress=events.append,
                                     poll_interval=0.05, stop_grace=5, startup_timeout=2, heartbeat_s=0.3,
                                     clock=clock)
    argv = [str(shim), "serve", "/models/m", "--port", str(port)]
    attempt, server = starter.start(Plan(params={}), argv, {})
    assert server is None and attempt.failure_class == "startup_timeout"
    beats = [e for e in events if e.startswith("still starting")]
    assert [re.sub(r"\(loading weights, (\d+) s .*", r"\1", b) for b in beats] == \
        ["still starting 0", "still starting 1", "still starting 1", "still starting 1", "still starting 2",
         "still starting 2"], beats  # at 0.3, 0.6, ..., 1.8 s: the elapsed time rounded to whole seconds
    assert all(re.fullmatch(r"still starting \(loading weights, \d s of at most 2 s\); vLLM last said: .*Starting "
                            r"to load model /models/m\.\.\.", b) for b in beats), beats
    assert launch.HEARTBEAT_S <= 15  # plus one readiness poll (<= 4.5 s): a line at least every 15 s


# ---------------------------------------------------------------------------- LocalAIStack's flags


def test_localaistack_vllm_flags_are_pins_under_vllms_own_names(capsys):
    """The issue's check: `--vllm-max-model-len 8192 --dry-run --json` shows max_model_len 8192 as a pin."""
    code, data, _ = _json_run(capsys, "model", "run", str(SMALL), "--smart-run", "--vllm-max-model-len", "8192",
                              "--vllm-gpu-memory-utilization=0.9", "--vllm-trust-remote-code", "--dry-run",
                              "--json", "--hardware", H100)
    assert code == 0
    assert data["params"]["max_model_len"] == 8192 and data["provenance"]["max_model_len"] == "pin"
    assert data["bounds"]["max_model_len"]["pinned"] is True
    assert data["params"]["gpu_memory_utilization"] == 0.9 and data["bounds"]["gpu_memory_utilization"]["pinned"]
    assert data["params"]["trust_remote_code"] is True
    argv = data["argv"]
    assert not any(a.startswith("--vllm-") for a in argv)  # vLLM gets its own flags
    assert argv[argv.index("--max-model-len") + 1] == "8192" and "--trust-remote-code" in argv
    assert argv[argv.index("--gpu-memory-utilization") + 1] == "0.9"


@pytest.mark.parametrize(("flags", "expected"), [
    (["--vllm_max_model_len=4096"], {"max_model_len": 4096}),  # `_` spelling, like every vLLM flag
    (["--vllm-trust-remote-code=false"], {"trust_remote_code": False}),  # LocalAIStack's own parser takes =bool
    (["--vllm-trust-remote-code=true", "--no-vllm-trust-remote-code"], {"trust_remote_code": False}),  # last wins
    (["--vllm-max-model-len", "32k"], {"max_model_len": 32000}),
])
def test_localaistack_aliases_read_every_spelling(flags, expected, capsys):
    code, data, _ = _json_run(capsys, "model", "run", str(SMALL), "--dry-run", "--json", "--hardware", H100, *flags)
    assert code == 0
    for knob, value in expected.items():
        assert data["params"][knob] == value and data["provenance"][knob] == "pin"


def test_localaistack_smart_run_flags_work_with_aliases_and_the_llm_cannot_move_the_pin(capsys):
    from fakes.llm_server import FakeLLM

    proposal = {"changes": [{"knob": "max_model_len", "value": 16384, "reason": "longer"},
                            {"knob": "max_num_seqs", "value": 6, "reason": "a few more"}], "reason": "try"}
    with FakeLLM([{"content": json.dumps(proposal)}] * 3) as llm:
        code = main(["model", "run", str(SMALL), "--smart-run", "--smart-run-debug", "--smart-run-refresh",
                     "--vllm-max-model-len", "8192", "--dry-run", "--hardware", H100, "--llm-base-url",
                     llm.base_url, "--llm-model", "fake-model", "--llm-timeout", "10"])
    out = capsys.readouterr().out
    assert code == 0
    assert "--max-model-len 8192" in out.splitlines()[0] and "debug: source=" in out
    assert "8,192 tokens per request  <- pin" in out


def test_a_launch_hands_vllm_its_own_flag_for_an_alias(tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_VLLM_SCENARIO", json.dumps(FAST))  # the stand-in refuses flags vLLM does not know
    shim = install_vllm_shim(tmp_path / "bin")
    request = pipeline.RunRequest(model=str(SMALL), hardware_path=H100, port=free_port(), vllm_bin=str(shim),
                                  startup_timeout=30, user_args=("--vllm-max-model-len", "8192"))
    pipeline.check_vllm_flags(request)
    sources = pipeline.live_sources(request, env={})
    sources.supervise = False
    result = pipeline.run(request, sources, session_out=tmp_path / "s.json")
    attempt = result.record.launch_attempts[-1]
    assert attempt.healthy and attempt.attempt.served_max_model_len == 8192


# ---------------------------------------------------------------------------- typos


@pytest.mark.parametrize(("flags", "words"), [
    (["--max-num-seq", "8"], "--max-num-seq: not a flag of vLLM 0.33.0 (the flag list shipped with smartrun; no "
                             "vllm installed); did you mean --max-num-seqs?"),
    (["--bogus-flag", "3"], "--bogus-flag: not a flag of vLLM 0.33.0"),
    (["--llm-modle", "x"], "--llm-modle: not a flag of vLLM 0.33.0 (the flag list shipped with smartrun; no vllm "
                           "installed); did you mean --llm-model?"),
    (["--vllm-max-num-seqs", "8"], "did you mean --max-num-seqs? (the --vllm-* flags read are "
                                   "--vllm-gpu-memory-utilization, --vllm-max-model-len, --vllm-trust-remote-code)"),
    (["--ctx-size", "8192"], "LocalAIStack's --ctx-size is not a vLLM flag: did you mean --max-model-len?"),
    (["--max-num-seqs", "8", "extra"], "unexpected argument 'extra'"),
])
def test_a_typo_is_refused_with_the_nearest_flag_exit_2(flags, words, tmp_path):
    env = {"SMARTRUN_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin"}
    proc = _cli("model", "run", str(SMALL), "--dry-run", "--hardware", H100, *flags, env=env, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("localaistack: ") and words in lines[0], lines
    assert not (tmp_path / "home" / "sessions").exists()  # refused before anything ran
    proc = _cli("model", "run", str(SMALL), "--dry-run", "--json", "--hardware", H100, *flags, env=env, cwd=tmp_path)
    data = json.loads(proc.stdout)
    assert proc.returncode == data["exit"] == 2 and words in data["error"] and "session_record" not in data


def test_flags_vllm_accepts_pass_through_and_after_dashdash_nothing_is_checked(capsys):
    code, data, _ = _json_run(capsys, "model", "run", str(SMALL), "--dry-run", "--json", "--hardware", H100,
                              "--seed", "7", "--lora-modules", "a=/x", "b=/y", "--enable-lora", "--",
                              "--flag-of-a-newer-vllm", "1")
    assert code == 0
    assert data["argv"][-8:] == ["--seed", "7", "--lora-modules", "a=/x", "b=/y", "--enable-lora",
                                 "--flag-of-a-newer-vllm", "1"]


def test_the_installed_vllms_flag_list_is_the_one_checked(tmp_path, capsys):
    """A vLLM that knows --new-flag accepts it; without vLLM the shipped 0.33 list refuses it."""
    script = tmp_path / "vllm"
    help_text = "options:\n  --max-model-len MAX_MODEL_LEN\n  --new-flag NEW_FLAG\n  --port PORT\n"
    script.write_text("#!/bin/sh\nif [ \"$1\" = --version ]; then echo 0.34.0; exit 0; fi\n"
                      f"cat <<'EOF'\n{help_text}EOF\n")
    script.chmod(0o755)
    code, data, _ = _json_run(capsys, "model", "run", str(SMALL), "--dry-run", "--json", "--hardware", H100,
                              "--vllm-bin", str(script), "--new-flag", "1")
    assert code == 0 and data["argv"][-2:] == ["--new-flag", "1"]
    code, data, _ = _json_run(capsys, "model", "run", str(SMALL), "--dry-run", "--json", "--hardware", H100,
                              "--vllm-bin", str(script), "--max-num-seq", "8")
    assert code == 2 and f"not a flag of vllm 0.34.0 ({script})" in data["error"]
    code, data, _ = _json_run(capsys, "model", "run", str(SMALL), "--dry-run", "--json", "--hardware", H100,
                              "--new-flag", "1")
    assert code == 2 and "--new-flag: not a flag of vLLM 0.33.0" in data["error"]


def test_smart_run_strict_without_smart_run_is_refused_as_localaistack_does(capsys):
    assert main(["model", "run", str(SMALL), "--smart-run-strict", "--dry-run", "--hardware", H100]) == 2
    assert "--smart-run-strict: only used with --smart-run" in capsys.readouterr().err


def test_every_command_with_json_prints_exactly_one_object(capsys, tmp_path):
    fixture = str(FIXTURES / "sessions" / "llm-accepted.json")
    commands = [
        ["model", "run", str(SMALL), "--dry-run", "--hardware", L4],
        ["model", "inspect", str(SMALL)],
        ["model", "estimate", str(SMALL), "--hardware", L4],
        ["hardware", "show", L4],
        ["bounds", "check"],
        ["bounds", "show", str(SMALL), "--hardware", L4],
        ["session", "list"],
        ["session", "show", fixture],
        ["session", "replay", fixture],
        ["model", "smart-run-cache", "list"],
        ["model", "smart-run-cache", "rm", "nothing-saved"],
        ["calibration", "show"],
    ]
    for args in commands:
        code = main([*args, "--json"])
        out = capsys.readouterr().out
        assert code == 0, args
        assert isinstance(json.loads(out), dict), args


def test_a_launch_under_json_prints_one_object_also_when_the_server_dies(tmp_path):
    scenario = {**FAST, "faults": {"die_after_ready_s": 1.0}}
    env = {"SMARTRUN_HOME": str(tmp_path / "home"), "FAKE_VLLM_SCENARIO": json.dumps(scenario)}
    proc = _cli("model", "run", str(SMALL), "--json", "--hardware", H100, "--vllm-bin",
                str(REPO / "tests" / "fakes" / "fake_vllm.py"), "--port", str(free_port()), "--startup-timeout", "30",
                "--vllm-max-model-len", "8192", env=env, cwd=tmp_path)
    assert proc.returncode == 4, proc.stderr
    data = json.loads(proc.stdout)  # vLLM's log and our progress went to stderr
    assert data["exit"] == 4 and "died after it was ready" in data["error"]
    assert data["params"]["max_model_len"] == 8192 and data["provenance"]["max_model_len"] == "pin"
    assert load_record(data["session_record"]).outcome.status == "died"
    assert "Starting to load model" in proc.stderr and proc.stderr.rstrip().splitlines()[-2].startswith(
        "session record: ")


def test_bounds_show_plans_for_the_same_gpus_as_model_run(capsys):
    seven_b = str(FIXTURES / "models" / "qwen2.5-7b-instruct")  # 28 heads: tp 1, 2 or 4 on four GPUs
    assert main(["bounds", "show", seven_b, "--hardware", FOUR_H100, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["bounds"]["tensor_parallel_size"]["choices"] == [1, 2, 4]
    assert main(["bounds", "show", seven_b, "--hardware", FOUR_H100, "--gpus", "1,2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["bounds"]["tensor_parallel_size"]["choices"] == [1, 2]
