"""`session show|list|replay` and `model smart-run-cache` on hand-edited and broken input: one line, exit 2."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import FIXTURES

from smartrun.cli import main

RECORD = FIXTURES / "sessions" / "oom-recovered.json"


def _edited(tmp_path, edit) -> str:
    data = json.loads(RECORD.read_text())
    edit(data)
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(data))
    return str(path)


@pytest.mark.parametrize(
    ("command", "edit", "words"),
    [
        ("show", lambda d: d.update(hardware={"gpus": "x"}), "invalid session record at hardware"),
        ("replay", lambda d: d.update(started_at="yesterday"), "started_at 'yesterday'"),
        ("replay", lambda d: d["vllm"].update(version=5), "invalid session record at vllm.version"),
        ("replay", lambda d: d["bounds_file"].update(text=None), "bounds_file"),
        ("replay", lambda d: d["model"].update(hidden_size=-1), "edited by hand"),
        ("replay", lambda d: d.update(hardware={"gpus": []}), "invalid session record at hardware"),
    ],
)
def test_hand_edited_records_are_one_line_exit_2_naming_the_file(tmp_path, capsys, command, edit, words):
    path = _edited(tmp_path, edit)
    assert main(["session", command, path]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"localaistack: {path}") and words in err[0], err


def test_a_broken_bounds_text_replays_as_a_divergence_that_says_why(tmp_path, capsys):
    path = _edited(tmp_path, lambda d: d["bounds_file"].update(text="[[["))
    assert main(["session", "replay", path]) == 5
    err = capsys.readouterr().err
    assert "replay reached 'error' (" in err and "decision 4" in err


def test_session_list_limit_must_be_positive(capsys):
    assert main(["session", "list", "--limit", "0"]) == 2
    assert "--limit 0" in capsys.readouterr().err


def test_list_names_sessions_written_in_the_data_dir_only_and_help_says_so(tmp_path, capsys):
    from smartrun.session import sessions_dir

    sessions_dir().mkdir(parents=True)
    shutil.copy(RECORD, sessions_dir() / "20260101T000000.000000Z-x.json")
    assert main(["session", "list"]) == 0
    out = capsys.readouterr().out
    assert "20260101T000000.000000Z-x.json" in out and "qwen2.5-7b-instruct" in out
    with pytest.raises(SystemExit):
        main(["session", "list", "--help"])
    assert "--session-out" in capsys.readouterr().out
