"""session.py on its own: redaction, atomic record files, loading errors, decision comparison, the cache."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest

from smartrun.cli.timeline import timeline
from smartrun.errors import InputError, ReplayDivergence
from smartrun.knobs import REDACTED
from smartrun.plan_cache import CacheEntry, CacheKey, SavedParams
from smartrun.secrets import redact_argv, redact_env, redact_text, secret_values
from smartrun.session import (
    Decision,
    SessionRecord,
    check_replay,
    default_session_path,
    first_divergence,
    list_sessions,
    load_record,
    write_record,
)

FAKE_KEY = "sk-smartrunTEST-7f3a9c2e1b"


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("SMARTRUN_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _record(**kw) -> SessionRecord:
    return SessionRecord(tool_version="0.1.0", started_at="2026-01-01T00:00:00.000Z", **kw)


def test_redact_argv_hides_secret_flag_values_in_both_spellings():
    argv = ["--api-key", "hunter2secret", "--api-key=othersecret", "--port", "8000", "--hf-token", "tok12345"]
    assert redact_argv(argv) == ["--api-key", REDACTED, f"--api-key={REDACTED}", "--port", "8000",
                                 "--hf-token", REDACTED]


def test_redact_text_hides_headers_and_key_shaped_tokens():
    text = f'Authorization: Bearer {FAKE_KEY} and "Authorization": "Bearer abcdefgh12345" hf_abcdefghijkl'
    out = redact_text(text)
    assert FAKE_KEY not in out and "abcdefgh12345" not in out and "hf_abcdefghijkl" not in out
    assert out.count(REDACTED) == 3
    assert redact_text("plain value 0.9", ["0.9x-not-here"]) == "plain value 0.9"
    assert redact_text("http://bob:s3cret@llm.local:8080/v1") == f"http://{REDACTED}@llm.local:8080/v1"


def test_secret_values_and_env_redaction():
    assert secret_values(["--api-key", "abcd1234", "--api-key=efgh5678"], {"OPENAI_API_KEY": FAKE_KEY,
                                                                           "PATH": "/bin"}) == (
        "abcd1234", "efgh5678", FAKE_KEY)
    assert redact_env({"CUDA_VISIBLE_DEVICES": "0,1", "HF_TOKEN": "x"}) == {"CUDA_VISIBLE_DEVICES": "0,1",
                                                                          "HF_TOKEN": REDACTED}


def test_record_written_atomically_with_secrets_removed(tmp_path):
    rec = _record(command_line=["localaistack", "model", "run", "m"],
                  llm_exchanges=[{"messages": [{"role": "user", "content": f"key is {FAKE_KEY[3:]}"}]}])
    path = write_record(rec, tmp_path / "s" / "one.json", secrets=[FAKE_KEY[3:]])
    text = path.read_text()
    assert FAKE_KEY[3:] not in text and REDACTED in text
    assert [p.name for p in path.parent.iterdir()] == ["one.json"]  # no temp file left behind
    assert load_record(path).command_line == rec.command_line


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (None, "no such session record"),
        ("{not json", "not JSON"),
        ("[1, 2]", "JSON object"),
        ('{"schema_version": 99}', "schema_version 99"),
        ('{"schema_version": 1, "tool_version": "x"}', "invalid session record at started_at"),
    ],
)
def test_load_record_bad_files_name_the_file(tmp_path, content, words):
    path = tmp_path / "bad.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(InputError) as err:
        load_record(path)
    assert str(path) in err.value.message and words in err.value.message


def test_first_divergence_names_step_value_and_length():
    a = [Decision(step="hardware", value="abc"), Decision(step="plan", value={"x": [1, 2]}, provenance="p")]
    assert first_divergence(a, [Decision(step="hardware", value="abc"),
                                Decision(step="plan", value={"x": (1, 2)}, provenance="p")]) is None
    assert "decision 2 (plan): recorded" in first_divergence(a, [a[0], Decision(step="plan", value={"x": [1]},
                                                                                  provenance="p")])
    assert "recorded step 'plan', replay reached 'argv'" in first_divergence(a, [a[0], Decision(step="argv")])
    assert "replay stopped before it" in first_divergence(a, a[:1])
    assert "past the end" in first_divergence(a[:1], a)
    assert "provenance" in first_divergence(a, [a[0], Decision(step="plan", value={"x": [1, 2]}, provenance="q")])
    with pytest.raises(ReplayDivergence) as err:
        check_replay(a, a[:1])
    assert err.value.exit_code == 5


def test_default_path_and_list_newest_first(home):
    t1 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    t2 = datetime(2026, 1, 2, tzinfo=timezone.utc)
    p1 = write_record(_record(request={"model": "a"}), default_session_path(t1, "Qwen/Qwen2.5-7B"))
    p2 = write_record(_record(request={"model": "b"}), default_session_path(t2, "b"))
    (p1.parent / "garbage.json").write_text("{")
    assert p1.parent == home / "sessions" and "Qwen--Qwen2.5-7B" in p1.name
    rows = list_sessions()
    names = [p.name for p, _ in rows]
    assert names.index(p2.name) < names.index(p1.name)
    assert any(isinstance(r, str) and "not JSON" in r for _, r in rows)


def test_timeline_mentions_each_part():
    rec = _record(decisions=[Decision(step="plan", value={"a": 1}, provenance="pin")],
                  launch_attempts=[{"number": 1, "attempt": {
                      "argv": ["vllm", "serve"], "outcome": "failed", "failure_class": "cuda_oom",
                      "log_excerpt": ["torch.OutOfMemoryError: CUDA out of memory."]}}],
                  outcome={"status": "ok", "exit_code": 0})
    text = "\n".join(timeline(rec))
    assert "launch   #1 cuda_oom" in text and "CUDA out of memory" in text and "outcome  ok" in text


def _entry(model="qwen", fp="hw1", **kw) -> CacheEntry:
    key = CacheKey(model=model, hardware_fingerprint=fp, bounds_sha256="b" * 64, vllm_version="0.33.0")
    return CacheEntry(key=key, model_path=f"/models/{model}", params={"max_model_len": 8192},
                      saved_at="2026-01-01T00:00:00Z", **kw)


def test_cache_store_lookup_list_rm(home):
    cache = SavedParams()
    a, b = _entry(), _entry(model="llama")
    cache.store(a)
    cache.store(b)
    assert cache.lookup(a.key) == a
    assert cache.lookup(a.key.model_copy(update={"vllm_version": "0.19.0"})) is None  # other key: a miss
    assert [e.key.model for _, e in cache.entries("qwen")] == ["qwen"]
    assert [e.key.model for _, e in cache.entries("/models/llama")] == ["llama"]
    assert len(cache.remove("qwen")) == 1
    assert cache.lookup(a.key) is None and cache.lookup(b.key) == b
    assert not list((home / "smart-run-cache").glob("*.tmp"))


def test_corrupt_cache_entry_is_reported_and_skipped(home):
    cache = SavedParams()
    a = _entry()
    path = cache.store(a)
    path.write_text('{"schema_version": 1, "key": ')
    assert cache.lookup(a.key) is None
    assert len(cache.problems) == 1 and str(path) in cache.problems[0] and "corrupt" in cache.problems[0]
    cache.store(_entry(model="other"))
    assert [e.key.model for _, e in cache.entries()] == ["other"]
    assert len(cache.problems) == 1


def test_record_json_round_trip_keeps_schema_alias(tmp_path):
    rec = _record(llm_exchanges=[{"kind": "propose", "schema": {"type": "object"}, "messages": []}])
    path = write_record(rec, tmp_path / "r.json")
    assert json.loads(path.read_text())["llm_exchanges"][0]["schema"] == {"type": "object"}
    assert load_record(path).llm_exchanges[0].schema_ == {"type": "object"}


def test_redaction_keeps_json_valid_for_odd_secrets(tmp_path):
    odd = 'ab"cd\\\\1234efgh'
    rec = _record(warnings=[f"key {odd} here", "true"], outcome={"status": "ok", "exit_code": 0})
    path = write_record(rec, tmp_path / "odd.json", secrets=[odd, "true"])
    loaded = load_record(path)  # still valid JSON, types intact
    assert loaded.warnings[0] == f"key {REDACTED} here" and loaded.outcome.exit_code == 0
    assert secret_values([], {"SOME_TOKEN": "1", "HF_TOKEN": "hf_longenoughvalue"}) == ("hf_longenoughvalue",)


def test_a_record_nested_too_deeply_is_one_input_error(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000)
    with pytest.raises(InputError, match="nested too deeply"):
        load_record(path)


def test_a_sessions_path_that_is_a_file_is_reported_not_listed_as_empty(home):
    home.mkdir(parents=True)
    (home / "sessions").write_text("")
    with pytest.raises(InputError, match="not a directory"):
        list_sessions()
    with pytest.raises(InputError, match="is not a directory"):  # and the record write names the folder
        write_record(_record(), home / "sessions" / "x.json")


def test_a_cache_path_that_is_a_file_is_a_problem_not_silence(home):
    home.mkdir(parents=True)
    (home / "smart-run-cache").write_text("")
    cache = SavedParams()
    assert cache.entries() == [] and "not a directory" in cache.problems[0]
