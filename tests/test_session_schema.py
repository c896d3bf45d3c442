"""The session record holds the stage models: loads with pydantic alone, round-trips, migrates schema 1.

Real records only: the recorded fixture sessions (schema 2, and the same scenarios as recorded under schema 1
in fixtures/sessions/schema-1/) and records written by a real `model run --dry-run`.
"""

from __future__ import annotations

import json

import pytest
from conftest import FIXTURES

from smartrun import pipeline
from smartrun.cli import main
from smartrun.contracts import Bounds, Plan
from smartrun.errors import InputError
from smartrun.hardware import HardwareSnapshot
from smartrun.launch import LaunchAttempt
from smartrun.memory import Correction, MemoryEstimate
from smartrun.model import ModelFacts
from smartrun.plan_cache import CacheEntry
from smartrun.request import RunRequest
from smartrun.session import (
    SCHEMA_VERSION,
    LaunchAttemptRecord,
    SessionRecord,
    dump_record,
    load_record,
    migrate,
    to_jsonable,
)
from smartrun.tune.report import TuningReport

SESSIONS = sorted((FIXTURES / "sessions").glob("*.json"))
SCHEMA_1 = sorted((FIXTURES / "sessions" / "schema-1").glob("*.json"))
MODEL = str(FIXTURES / "models" / "qwen2.5-7b-instruct")
H100 = str(FIXTURES / "hardware" / "1x-h100-80gb.json")
STAGE_MODELS = {"request": RunRequest, "hardware": HardwareSnapshot, "model": ModelFacts, "bounds": Bounds,
                "baseline": Plan, "baseline_estimate": MemoryEstimate, "final_plan": Plan, "estimate": MemoryEstimate,
                "tuning": TuningReport}


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("SMARTRUN_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)


def test_both_schemas_are_kept_as_fixtures():
    assert SESSIONS and SCHEMA_1
    assert {json.loads(p.read_text())["schema_version"] for p in SESSIONS} == {SCHEMA_VERSION} == {2}
    assert {json.loads(p.read_text())["schema_version"] for p in SCHEMA_1} == {1}
    assert {p.name for p in SCHEMA_1} == {p.name for p in SESSIONS}  # the same scenarios, recorded by each


def _check_typed(record: SessionRecord) -> None:
    """Every stage's result is its own model, not a dict."""
    for name, model in STAGE_MODELS.items():
        part = getattr(record, name)
        assert part is None or isinstance(part, model), (name, type(part))
    assert record.request is not None and record.hardware is not None and record.bounds is not None
    for entry in record.launch_attempts:
        assert isinstance(entry.attempt, LaunchAttempt)
    assert record.cache.entry is None or isinstance(record.cache.entry, CacheEntry)
    assert record.calibration.used is None or isinstance(record.calibration.used, Correction)


@pytest.mark.parametrize("path", SESSIONS + SCHEMA_1, ids=[f"{p.parent.name}/{p.stem}" for p in SESSIONS + SCHEMA_1])
def test_a_record_loads_with_pydantic_alone_round_trips_and_replays(path):
    record = SessionRecord.model_validate_json(path.read_text())  # no hand re-validation: pydantic alone
    assert record == load_record(path) and record.schema_version == SCHEMA_VERSION
    _check_typed(record)
    again = SessionRecord.model_validate_json(dump_record(record))
    assert again == record
    out = pipeline.replay(again)  # raises ReplayDivergence on the first decision that differs
    assert [d.step for d in out.replayed.decisions] == [d.step for d in record.decisions]
    assert (out.error is not None) == (record.outcome.status == "error")


@pytest.mark.parametrize("path", SCHEMA_1, ids=[p.stem for p in SCHEMA_1])
def test_schema_1_is_migrated_keeping_every_part(path):
    old = json.loads(path.read_text())
    record = load_record(path)
    assert [d.model_dump() for d in record.decisions] == old["decisions"]
    assert record.bounds is not None and record.bounds.goal == old["request"]["goal"]
    assert to_jsonable(record.bounds.to_json()) == old["bounds"]  # limits and the sources of each, as recorded
    assert len(record.launch_attempts) == len(old["launch_attempts"])
    for new, was in zip(record.launch_attempts, old["launch_attempts"], strict=True):
        assert (new.number, new.phase, new.healthy) == (was["number"], was["phase"], was["healthy"])
        assert (new.argv, new.env, new.outcome) == (was["argv"], was["env"], was["outcome"])
        assert list(new.attempt.log_excerpt) == was["log_excerpt"] and new.attempt.duration_s == was["duration_s"]
    assert len(record.advice) == len(old["advice"])
    for new_advice, was in zip(record.advice, old["advice"], strict=True):
        assert to_jsonable(new_advice.proposal) == was["proposal"]
        assert to_jsonable(new_advice.rejections) == was["rejections"]
        assert to_jsonable(new_advice.steps) == was.get("detail", {}).get("exchanges", [])
        assert new_advice.spent_s == was.get("detail", {}).get("spent_s")
    written = json.loads(dump_record(record))
    assert written["schema_version"] == SCHEMA_VERSION
    for entry in written["launch_attempts"]:  # stored once: in the attempt
        assert set(entry) == {"number", "phase", "healthy", "attempt"}
    for entry in written["advice"]:  # stored once: in the steps
        assert not {"proposal", "rejections", "detail"} & set(entry)


def test_migrate_leaves_its_input_alone_and_other_schemas_as_they_are():
    old = json.loads((FIXTURES / "sessions" / "schema-1" / "oom-recovered.json").read_text())
    before = json.dumps(old, sort_keys=True)
    assert migrate(old)["schema_version"] == SCHEMA_VERSION
    assert json.dumps(old, sort_keys=True) == before
    current = json.loads((FIXTURES / "sessions" / "oom-recovered.json").read_text())
    assert migrate(current) is current


def test_a_schema_1_attempt_recorded_empty_is_rebuilt_from_what_was_recorded_beside_it():
    old = {"schema_version": 1, "launch_attempts": [
        {"number": 1, "phase": "launch", "argv": ["vllm", "serve", "m"], "env": {"CUDA_VISIBLE_DEVICES": "0"},
         "outcome": "oom_cuda_graph", "healthy": False, "log_excerpt": ["CUDA out of memory"], "duration_s": 2.5,
         "attempt": {}},
        {"number": 2, "argv": ["vllm", "serve", "m"], "outcome": "ready", "healthy": True}]}
    failed, ready = (LaunchAttemptRecord.model_validate(a) for a in migrate(old)["launch_attempts"])
    assert failed.outcome == "oom_cuda_graph" and failed.attempt.outcome == "failed"
    assert failed.env == {"CUDA_VISIBLE_DEVICES": "0"} and failed.attempt.log_excerpt == ("CUDA out of memory",)
    assert failed.attempt.duration_s == 2.5 and failed.attempt.number == 1
    assert ready.outcome == "ready" and ready.healthy and ready.attempt.failure_class is None


@pytest.mark.parametrize(("edit", "words"), [
    (lambda d: d.update(schema_version=3), "schema_version 3 is not supported (this smartrun reads 1 and 2)"),
    (lambda d: d.update(bounds={"max_model_len": "wide"}), "invalid session record at bounds"),
    (lambda d: d["launch_attempts"][0].update(attempt={"outcome": "exploded"}),
     "invalid session record at launch_attempts.0.attempt.outcome"),
])
def test_a_broken_schema_1_record_is_one_input_error_naming_the_part(tmp_path, edit, words):
    data = json.loads((FIXTURES / "sessions" / "schema-1" / "oom-recovered.json").read_text())
    edit(data)
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(data))
    with pytest.raises(InputError) as err:
        load_record(path)
    assert words in err.value.message and "\n" not in err.value.message


def test_a_dry_run_record_holds_the_stage_models_it_planned_with(tmp_path, capsys):
    bounds = FIXTURES / "bounds" / "example-serving.toml"
    path = tmp_path / "dry.json"
    code = main(["model", "run", MODEL, "--dry-run", "--json", "--hardware", H100, "--vllm-version", "0.33.0",
                 "--bounds", str(bounds), "--max-model-len", "8192", "--session-out", str(path)])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    record = SessionRecord.model_validate_json(path.read_text())
    _check_typed(record)
    assert record.request.model == MODEL and record.request.dry_run and record.outcome.status == "dry-run"
    assert record.final_plan is not None and record.final_plan.params == printed["params"]
    assert record.final_argv == printed["argv"] and record.estimate is not None
    assert to_jsonable(record.estimate) == printed["estimate"]
    assert record.bounds is not None and to_jsonable(record.bounds.to_json()) == printed["bounds"]
    pinned = record.bounds.knobs["max_model_len"]
    assert pinned.pinned and pinned.min == pinned.max == 8192 and "pin" in pinned.sources
    assert any(s.startswith(f"bounds:{bounds}:") for b in record.bounds.knobs.values() for s in b.sources)
    assert record.bounds_file is not None and record.bounds_file.path == str(bounds)
    decision = next(d for d in record.decisions if d.step == "bounds")
    assert decision.value == to_jsonable(record.bounds.to_json())  # the decision replay compares is unchanged
    assert main(["session", "replay", str(path)]) == 0
    assert "decisions match" in capsys.readouterr().out
