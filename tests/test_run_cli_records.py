"""`model run` names its session record also when the run fails, and never names one it could not write."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import FIXTURES

from smartrun.cli import main
from smartrun.session import load_record, sessions_dir

MODEL = str(FIXTURES / "models" / "qwen2.5-0.5b-instruct")
L4 = str(FIXTURES / "hardware" / "1x-l4.json")


def test_a_failed_run_still_names_its_record(capsys):
    code = main(["model", "run", MODEL, "--hardware", L4, "--dry-run", "--smart-run", "--smart-run-strict"])
    out, err = capsys.readouterr()
    assert code == 3
    assert err.strip().splitlines()[-1].startswith("localaistack: --smart-run-strict")
    assert "session record:" not in out  # stdout holds the result only; the record is named on stderr
    path = Path(re.search(r"^session record: (.+)$", err, re.M).group(1))
    assert path.parent == sessions_dir() and load_record(path).outcome.exit_code == 3


def test_a_record_that_cannot_be_written_is_not_named(capsys):
    sessions_dir().parent.mkdir(parents=True, exist_ok=True)
    sessions_dir().write_text("")  # a file where the folder should be
    assert main(["model", "run", MODEL, "--hardware", L4, "--dry-run", "--vllm-version", "0.33.0"]) == 0
    out, err = capsys.readouterr()
    assert "session record:" not in out + err.replace("session record not written", "")
    assert "session record not written" in err and "is not a directory" in err


def test_a_saved_entry_edited_to_carry_security_flags_is_used_without_them_and_warned_about(capsys):
    import json

    from smartrun.plan_cache import CacheEntry, SavedParams

    args = ["model", "run", MODEL, "--smart-run", "--dry-run", "--json", "--hardware", L4, "--vllm-version", "0.33.0"]
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out)
    key = load_record(first["session"]).cache.key
    tampered = {**first["params"], "max_num_seqs": 2, "host": "0.0.0.0", "trust_remote_code": True}
    SavedParams().store(CacheEntry(key=key, params=tampered, saved_at="2026-01-01T00:00:00Z"))
    assert main(args) == 0
    out, err = capsys.readouterr()
    plan = json.loads(out)
    assert plan["source"] == "cache" and plan["params"]["max_num_seqs"] == 2
    assert "--trust-remote-code" not in plan["argv"] and plan["argv"][plan["argv"].index("--host") + 1] == "127.0.0.1"
    assert "security settings that are never saved, ignored: host, trust_remote_code" in err


def test_a_start_that_never_gets_ready_is_exit_4_naming_vllms_last_line_not_our_stop(tmp_path):
    import json
    import os
    import socket
    import subprocess
    import sys

    from conftest import REPO

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "FAKE_VLLM_SCENARIO": json.dumps({"faults": {"never_ready": True}})}
    proc = subprocess.run(
        [sys.executable, "-m", "smartrun", "model", "run", MODEL, "--hardware", L4, "--port", str(port),
         "--vllm-bin", str(REPO / "tests" / "fakes" / "fake_vllm.py"), "--startup-timeout", "1", "--max-attempts", "1"],
        capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    assert proc.returncode == 4, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("localaistack: ") and "startup_timeout" in last and "last line: " in last
    assert "Shutting down" not in last  # the stop we sent is not vLLM's last word
    path = Path(re.search(r"^session record: (.+)$", proc.stderr, re.M).group(1))
    assert load_record(path).outcome.exit_code == 4
