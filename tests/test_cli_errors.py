"""Usage errors are one line and exit 2, like every other bad input; planned knobs after `--` are refused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"

MODEL = str(FIXTURES / "models" / "qwen2.5-7b-instruct")
H100 = str(FIXTURES / "hardware" / "1x-h100-80gb.json")


def _run(args: list[str], tmp_path) -> subprocess.CompletedProcess:
    env = {"SMARTRUN_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-m", "smartrun", *args], capture_output=True, text=True, env=env,
                          timeout=60)


@pytest.mark.parametrize(("args", "words"), [
    (["model", "run", MODEL, "--goal", "fastest"], "invalid choice: 'fastest'"),
    (["model", "run", MODEL, "--startup-timeout", "-1"], "--startup-timeout: '-1': must be a positive"),
    (["model", "run", MODEL, "--llm-timeout", "nan"], "--llm-timeout: 'nan'"),
    (["bounds", "show"], "the following arguments are required: MODEL"),
    (["model", "estimate", MODEL], "one of the arguments --hardware --gpu is required"),
    (["hardware", "show", H100, "--bogus"], "unrecognized arguments: --bogus"),
])
def test_usage_errors_are_one_line_exit_2(args, words, tmp_path):
    proc = _run(args, tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0] and lines[0].startswith("localaistack")
    assert "usage:" not in proc.stderr and "Traceback" not in proc.stderr


def test_planned_knob_after_dashdash_is_refused_not_doubled(tmp_path):
    proc = _run(["model", "run", MODEL, "--dry-run", "--hardware", H100, "--", "--max-model-len", "8192"], tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "localaistack: --max-model-len after `--` would override the plan; put it before `--` to pin it")


def test_unknown_flags_after_dashdash_pass_through_untouched(tmp_path):
    proc = _run(["model", "run", MODEL, "--dry-run", "--json", "--hardware", H100, "--", "--some-flag", "3"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    argv = json.loads(proc.stdout)["argv"]
    assert argv[-2:] == ["--some-flag", "3"] and argv.count("--max-model-len") == 1
