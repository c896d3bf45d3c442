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
    path = Path(re.search(r"^session record: (.+)$", out, re.M).group(1))
    assert path.parent == sessions_dir() and load_record(path).outcome["exit_code"] == 3


def test_a_record_that_cannot_be_written_is_not_named(capsys):
    sessions_dir().parent.mkdir(parents=True, exist_ok=True)
    sessions_dir().write_text("")  # a file where the folder should be
    assert main(["model", "run", MODEL, "--hardware", L4, "--dry-run", "--vllm-version", "0.33.0"]) == 0
    out, err = capsys.readouterr()
    assert "session record:" not in out
    assert "session record not written" in err and "is not a directory" in err
