"""Bounds load back from their JSON (the model's own, and the shorter `to_json()`), provenance included."""

from __future__ import annotations

import json

import pytest
from conftest import FIXTURES

from smartrun import pipeline
from smartrun.contracts import Bounds
from smartrun.knobs import REDACTED

MODEL = str(FIXTURES / "models" / "qwen2.5-7b-instruct")
H100 = str(FIXTURES / "hardware" / "1x-h100-80gb.json")
BOUNDS = FIXTURES / "bounds" / "example-serving.toml"
SERVED_KEY = "served-key-3f9a7c1e5b2d"


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("SMARTRUN_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)


def _bounds(*user_args: str, goal: str = "stable") -> Bounds:
    """The effective bounds `model run --dry-run` plans with: real model, snapshot, bounds file and pins."""
    request = pipeline.RunRequest(model=MODEL, hardware_path=H100, vllm_version="0.33.0", bounds_path=str(BOUNDS),
                                  user_args=user_args, dry_run=True, goal=goal)
    result = pipeline.run(request, pipeline.live_sources(request, env={}), write=False)
    assert isinstance(result.bounds, Bounds)
    return result.bounds


def test_bounds_round_trip_through_their_model_json_with_every_source():
    bounds = _bounds("--max-model-len", "8192", "--dtype", "float16", goal="throughput")
    loaded = Bounds.model_validate_json(bounds.model_dump_json())
    assert loaded == bounds
    sources = {name: b.sources for name, b in loaded.knobs.items()}
    assert "pin" in sources["max_model_len"] and "pin" in sources["dtype"]
    assert any(s.startswith(f"bounds:{BOUNDS}:") for s in sources["gpu_memory_utilization"])
    assert loaded.goal == "throughput" and loaded.knobs["max_model_len"].pinned
    assert any(b.notes for b in loaded.knobs.values())  # the why of each limit comes back too


def test_bounds_load_back_from_to_json_with_each_limit_and_its_sources():
    bounds = _bounds("--max-model-len", "8192")
    data = json.loads(json.dumps(bounds.to_json()))  # as --json prints it and schema-1 records hold it
    loaded = Bounds.from_json(data, bounds.goal)
    assert loaded.to_json() == bounds.to_json()
    for name, bound in bounds.knobs.items():
        back = loaded.knobs[name]
        assert back.knob == name and back.sources == bound.sources and back.pinned == bound.pinned
        assert (back.min, back.max, back.choices) == (bound.min, bound.max, bound.choices), name
        assert (back.recovery_min, back.recovery_choices) == (bound.recovery_min, bound.recovery_choices), name
        assert back.llm_may_change == bound.llm_may_change
        assert back.describe() == bound.describe()


def test_a_pinned_secret_never_leaves_in_the_bounds_json():
    bounds = _bounds("--api-key", SERVED_KEY)
    assert bounds.knobs["api_key"].choices == ((SERVED_KEY,),)  # in memory: the validator compares with it
    text = bounds.model_dump_json()
    assert SERVED_KEY not in text and SERVED_KEY not in json.dumps(bounds.to_json())
    loaded = Bounds.model_validate_json(text)
    assert loaded.knobs["api_key"].choices == (REDACTED,) and loaded.knobs["api_key"].describe() == "pinned (secret)"
    assert Bounds.from_json(bounds.to_json(), bounds.goal).knobs["api_key"].choices == (REDACTED,)
