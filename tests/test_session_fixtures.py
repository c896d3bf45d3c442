"""The recorded fixture sessions: each replays clean; an edited reply diverges with exit 5; show/list work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import FIXTURES

from smartrun.cli import main
from smartrun.session import load_record

SESSIONS = sorted((FIXTURES / "sessions").glob("*.json"))
REQUIRED = {"llm-accepted", "llm-repaired", "llm-unreachable-fallback", "strict-failure", "oom-recovered",
            "kv-too-small-recovered", "multi-gpu-tp", "cache-hit"}


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("SMARTRUN_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)


def test_every_required_scenario_is_recorded():
    assert {p.stem for p in SESSIONS} >= REQUIRED


@pytest.mark.parametrize("path", SESSIONS, ids=[p.stem for p in SESSIONS])
def test_fixture_replays_clean(path, capsys):
    assert main(["session", "replay", str(path)]) == 0
    out = capsys.readouterr().out
    assert "decisions match" in out
    assert "sk-fixtureFAKEKEY" not in path.read_text()


def _edit_first_reply(record: dict) -> None:
    exchange = next(ex for ex in record["llm_exchanges"] if ex.get("reply"))
    content = json.loads(exchange["reply"]["content"])
    content["changes"][0]["value"] = content["changes"][0]["value"] + 1
    exchange["reply"]["content"] = json.dumps(content)


def test_edited_reply_in_a_copy_diverges_with_exit_5(tmp_path, capsys):
    record = json.loads((FIXTURES / "sessions" / "llm-accepted.json").read_text())
    _edit_first_reply(record)
    copy = tmp_path / "edited.json"
    copy.write_text(json.dumps(record))
    assert main(["session", "replay", str(copy)]) == 5
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("localaistack: replay diverged at decision")
    assert "advice" in err[0]


def test_edited_launch_outcome_diverges(tmp_path):
    record = json.loads((FIXTURES / "sessions" / "oom-recovered.json").read_text())
    assert len(record["launch_attempts"]) >= 2
    record["launch_attempts"][0] = record["launch_attempts"][-1]  # pretend the first start was healthy
    copy = tmp_path / "edited.json"
    copy.write_text(json.dumps(record))
    assert main(["session", "replay", str(copy)]) == 5


def test_show_prints_a_timeline_of_a_recovered_launch(capsys):
    assert main(["session", "show", str(FIXTURES / "sessions" / "oom-recovered.json")]) == 0
    out = capsys.readouterr().out
    assert "launch   #1" in out and "launch   #2" in out and "outcome " in out
    assert load_record(FIXTURES / "sessions" / "oom-recovered.json").launch_attempts[-1].healthy


def test_list_shows_recent_sessions(tmp_path, capsys, monkeypatch):
    sessions = tmp_path / "home" / "sessions"
    sessions.mkdir(parents=True)
    for p in SESSIONS[:3]:
        (sessions / p.name).write_text(p.read_text())
    assert main(["session", "list", "--all"]) == 0
    out = capsys.readouterr().out
    assert all(p.name in out for p in SESSIONS[:3])


def test_list_hides_dry_runs_unless_all(tmp_path, capsys):
    sessions = tmp_path / "home" / "sessions"
    sessions.mkdir(parents=True)
    for p in SESSIONS:
        (sessions / p.name).write_text(p.read_text())
    dry = {p.name for p in SESSIONS if load_record(p).request.dry_run}
    launched = {p.name for p in SESSIONS} - dry
    assert dry and launched
    assert main(["session", "list", "--json"]) == 0
    listed = {Path(row["path"]).name for row in json.loads(capsys.readouterr().out)["sessions"]}
    assert listed == launched
    assert main(["session", "list", "--all", "--json"]) == 0
    assert {Path(row["path"]).name for row in json.loads(capsys.readouterr().out)["sessions"]} == dry | launched
    assert main(["session", "list", "--limit", "1"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and Path(out[0].split()[-1]).name in launched


def test_hand_broken_record_part_is_one_line_exit_2(tmp_path, capsys):
    record = json.loads((FIXTURES / "sessions" / "oom-recovered.json").read_text())
    record["launch_attempts"][0]["attempt"]["outcome"] = "exploded"
    copy = tmp_path / "broken.json"
    copy.write_text(json.dumps(record))
    assert main(["session", "replay", str(copy)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "invalid session record at launch_attempts.0.attempt.outcome" in err[0]
