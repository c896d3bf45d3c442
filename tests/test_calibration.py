"""Calibration from the user's own startups: learning rules, the estimator hook, storage, the pipeline and the CLI.

The end-to-end test plays a machine whose vLLM (the stand-in) holds non-KV memory no log line names.
"""

from __future__ import annotations

import json

import pytest
from conftest import FIXTURES
from fakes import hidden_memory

from smartrun import calibration, hardware, memory, pipeline
from smartrun.calibration import Figures, Observation, Store, learn
from smartrun.cli import main
from smartrun.memory import Correction
from smartrun.session import load_record
from smartrun.vllm_log import StartupFacts

MACHINE = "0123456789abcdef"


@pytest.fixture(autouse=True)
def _cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no smartrun.toml found upward


def _seen(residual: float, total: float = 79.19, **measured) -> Observation:
    est = Figures(weights_gib=15.0, activation_gib=1.0, non_torch_gib=0.26, cudagraph_gib=0.9, kv_cache_gib=50.0,
                  kv_cache_tokens=400000)
    got = Figures(kv_cache_gib=50.0 - residual, kv_cache_tokens=int(400000 * (50.0 - residual) / 50.0), **measured)
    return Observation(at="2026-12-06T00:00:00Z", model="m", gpu_total_gib=total, estimated=est, measured=got,
                       residual_gib=residual)


# ---------------------------------------------------------------------------------------------- learning


def test_an_over_prediction_shrinks_the_estimate_at_once():
    c = learn([_seen(1.5)], MACHINE, "0.33.0")
    assert c.rule == "shrink" and c.non_kv_gib == 1.5 and c.startups == 1
    assert c.describe().startswith("calibrated from 1 startup on this machine (vLLM 0.33.0): non-KV +1.50 GiB")


def test_the_largest_recent_shortfall_wins_over_any_surplus():
    c = learn([_seen(-2.0), _seen(-1.0), _seen(0.4), _seen(-3.0)], MACHINE, "0.33.0")
    assert c.rule == "shrink" and c.non_kv_gib == 0.4 and c.residuals_gib == (-2.0, -1.0, 0.4, -3.0)


def test_the_estimate_grows_only_after_startups_agree():
    one = learn([_seen(-1.0)], MACHINE, "0.33.0")
    assert one.rule == "hold" and one.non_kv_gib == 0.0 and "grows only when 2 startups agree" in one.describe()
    agreeing = learn([_seen(-1.0), _seen(-1.2)], MACHINE, "0.33.0")
    assert agreeing.rule == "grow" and agreeing.non_kv_gib == -1.0  # the smallest surplus both support
    assert "non-KV -1.00 GiB per GPU" in agreeing.describe()
    disagreeing = learn([_seen(-0.2), _seen(-1.5)], MACHINE, "0.33.0")
    assert disagreeing.rule == "hold" and disagreeing.non_kv_gib == 0.0


def test_only_the_recent_startups_count():
    old_shortfall = [_seen(2.0)] + [_seen(-0.5)] * calibration.RECENT
    c = learn(old_shortfall, MACHINE, "0.33.0")
    assert c.rule == "grow" and c.non_kv_gib == -0.5 and c.startups == calibration.RECENT


def test_a_correction_is_bounded_and_says_so():
    shrink = learn([_seen(40.0)], MACHINE, "0.33.0")
    assert shrink.clamped and shrink.non_kv_gib == pytest.approx(calibration.MAX_SHRINK * 79.19, abs=1e-3)
    assert "clamped" in shrink.describe()
    grow = learn([_seen(-30.0), _seen(-30.1)], MACHINE, "0.33.0")
    assert grow.clamped and grow.non_kv_gib == pytest.approx(-calibration.MAX_GROW * 79.19, abs=1e-3)
    assert learn([], MACHINE, "0.33.0") is None


def test_the_plan_safe_band_narrows_to_the_machines_own_and_one_startup_only_lowers_the_plan():
    profile_band = int(0.5 * 2**30)
    small = learn([_seen(0.1)], MACHINE, "0.33.0")
    assert small.margin_bytes(profile_band) == profile_band - int(0.1 * 2**30)  # correction + band: no growth
    large = learn([_seen(2.0)], MACHINE, "0.33.0")
    assert large.margin_bytes(profile_band) == int(large.band_gib * 2**30) < profile_band  # never refused all
    surplus = learn([_seen(-1.0)], MACHINE, "0.33.0")
    assert surplus.margin_bytes(profile_band) == profile_band  # one surplus: nothing grows
    two = learn([_seen(1.0), _seen(1.02)], MACHINE, "0.33.0")
    assert two.band_gib == pytest.approx(calibration.BAND_FLOOR_GIB * (1 + 2 / 2**0.5), abs=1e-3)
    assert two.margin_bytes(profile_band) == int(two.band_gib * 2**30) < profile_band
    assert two.model_copy(update={"band_gib": None}).margin_bytes(profile_band) == profile_band  # older records
    spread = learn([_seen(1.0), _seen(-1.0)], MACHINE, "0.33.0")
    assert spread.margin_bytes(profile_band) == profile_band  # never wider than the profile's band
    flags = {"gpu_memory_utilization": 0.93, "max_model_len": 4096}
    plain = hidden_memory.estimate(flags)
    for one in (small, large, surplus):
        calibrated = hidden_memory.estimate(flags, calibration=one)
        assert memory.plan_safe_kv_tokens(calibrated) <= memory.plan_safe_kv_tokens(plain)
    calibrated = hidden_memory.estimate(flags, calibration=two)
    assert calibrated.margin_gib < plain.margin_gib and "2 startups on this machine" in calibrated.uncertainty


def test_printed_terms_explain_the_correction():
    seen = _seen(1.0, weights_gib=15.0, non_torch_gib=1.16)  # a 0.19-style log prints non-torch
    c = learn([seen], MACHINE, "0.19.0")
    assert c.terms_gib == {"weights": 0.0, "non_torch": 0.9, "unprinted": 0.1}
    assert "non-torch +0.90, not printed by vLLM +0.10" in c.describe()


# ---------------------------------------------------------------------------------------------- the hook


def test_the_estimate_takes_the_correction_as_an_argument():
    plain = hidden_memory.estimate({"gpu_memory_utilization": 0.93, "max_model_len": 4096, "max_num_seqs": 8})
    again = hidden_memory.estimate({"gpu_memory_utilization": 0.93, "max_model_len": 4096, "max_num_seqs": 8})
    assert plain == again and plain.calibration is None
    c = learn([_seen(2.0, total=22.04)], MACHINE, "0.33.0")
    calibrated = hidden_memory.estimate({"gpu_memory_utilization": 0.93, "max_model_len": 4096, "max_num_seqs": 8},
                                        calibration=c)
    assert calibrated.calibration == c
    assert calibrated.kv_cache_gib == pytest.approx(plain.kv_cache_gib - 2.0, abs=0.011)
    assert calibrated.weights_gib == plain.weights_gib and calibrated.kv_cache_tokens < plain.kv_cache_tokens
    too_much = learn([_seen(5.0, total=22.04)], MACHINE, "0.33.0")
    refused = hidden_memory.estimate({"gpu_memory_utilization": 0.88, "max_model_len": 4096}, calibration=too_much)
    assert not refused.fits and "calibration 5.0 GiB" in refused.reason


def test_observe_pairs_printed_figures_with_the_uncalibrated_estimate():
    est = hidden_memory.estimate({"gpu_memory_utilization": 0.9, "max_model_len": 4096})
    printed = StartupFacts(weights_gib=14.99, available_kv_cache_gib=1.2, kv_cache_tokens=9808,
                           cudagraph_estimate_gib=0.91)
    seen = calibration.observe(est, printed, model="llama", params={"max_model_len": 4096, "host": "x"}, at="t")
    by_tokens = est.kv_cache_gib * (1 - 9808 / est.kv_cache_tokens)  # tokens: exact to a block, the tightest rank
    by_tokens += est.kv_bytes_per_token * est.block_size / 2**30  # both sides floor to blocks: one block leaned safe
    assert seen.residual_gib == pytest.approx(by_tokens, abs=1e-3) and seen.params == {"max_model_len": 4096}
    assert seen.measured.kv_cache_gib == 1.2  # as printed
    gib_only = calibration.observe(est, StartupFacts(available_kv_cache_gib=1.2), model="m", params={}, at="t")
    assert gib_only.residual_gib == pytest.approx(est.kv_cache_gib - 1.2, abs=1e-3)
    assert seen.measured.weights_gib == 14.99 and seen.estimated.cudagraph_gib == est.cudagraph_gib
    tokens_only = calibration.observe(est, StartupFacts(kv_cache_tokens=est.kv_cache_tokens // 2), model="m",
                                      params={}, at="t")
    assert tokens_only.measured.kv_cache_gib == pytest.approx(est.kv_cache_gib / 2, abs=0.01)
    assert calibration.observe(est, StartupFacts(weights_gib=14.99), model="m", params={}, at="t") is None


# ---------------------------------------------------------------------------------------------- storage


def test_store_keeps_the_newest_observations_atomically(tmp_path):
    store = Store(tmp_path / "cal")
    assert store.correction(MACHINE, "0.33.0") is None
    path = store.add(MACHINE, "0.33.0", ["NVIDIA L4"], [_seen(0.1 * i) for i in range(calibration.MAX_KEPT + 3)])
    data = store.load(MACHINE, "0.33.0")
    assert len(data.observations) == calibration.MAX_KEPT and data.observations[-1].residual_gib == pytest.approx(2.2)
    assert path.name == f"{MACHINE}-0.33.0.json" and not list(path.parent.glob(".*.tmp"))
    assert store.correction(MACHINE, "0.33.1") is None  # another vLLM version learns on its own


def test_a_corrupt_file_is_ignored_with_a_warning_and_replaced(tmp_path):
    store = Store(tmp_path / "cal")
    path = store.add(MACHINE, "0.33.0", ["NVIDIA L4"], [_seen(1.0)])
    path.write_text("{not json")
    assert store.correction(MACHINE, "0.33.0") is None
    assert len(store.problems) == 1 and "unreadable calibration file ignored" in store.problems[0]
    store.add(MACHINE, "0.33.0", ["NVIDIA L4"], [_seen(0.5)])
    assert store.correction(MACHINE, "0.33.0").non_kv_gib == 0.5
    (tmp_path / "cal" / "x.json").write_text('{"schema_version": 1, "machine": 3}')
    assert len(store.entries()) == 1 and len(store.problems) == 1


def test_a_data_dir_that_is_a_file_is_one_line_error(tmp_path):
    (tmp_path / "cal").write_text("")
    with pytest.raises(calibration.CalibrationError, match="not a directory"):
        Store(tmp_path / "cal").correction(MACHINE, "0.33.0")


# ---------------------------------------------------------------------------------------------- end to end


def test_two_launches_calibrate_a_third_configuration_within_2_percent_and_plans_stop_over_asking(tmp_path, capsys):
    """Done-when of issue 18, against the stand-in with 2.5 GiB of hidden non-KV memory on an L4."""
    hidden = 2.5
    third = {"gpu_memory_utilization": 0.93, "max_model_len": 4096, "max_num_seqs": 8}
    third_args = ("--gpu-memory-utilization", "0.93", "--max-model-len", "4096", "--max-num-seqs", "8")

    first = hidden_memory.launch(hidden, goal="long-context")  # uncalibrated: over-asks, vLLM refuses it
    outcomes = [a.outcome for a in first.record.launch_attempts]
    assert outcomes == ["kv_cache_too_small", "ready"], outcomes
    assert first.record.calibration.used is None and first.record.calibration.stored
    measured = first.record.calibration.observations[0].measured
    assert measured.kv_cache_gib == pytest.approx(first.estimate.kv_cache_gib - hidden, abs=0.02)

    second = hidden_memory.launch(hidden, goal="stable", session=tmp_path / "second.json")
    assert [a.outcome for a in second.record.launch_attempts] == ["ready"]
    assert second.record.calibration.used.startups == 1  # the first startup already shrank the estimate

    correction = Store().correction(second.record.calibration.used.machine, "0.33.0")
    assert correction.startups == 2 and correction.non_kv_gib == pytest.approx(hidden, abs=0.02)
    truth = hidden_memory.measured_tokens(hidden_memory.launch(hidden, args=third_args))
    before = hidden_memory.estimate(third).kv_cache_tokens
    after = hidden_memory.estimate(third, calibration=correction).kv_cache_tokens
    assert abs(before - truth) / truth > 0.5  # the hidden memory is invisible to the plain estimate
    assert abs(after - truth) / truth <= 0.02, (before, after, truth)

    again = hidden_memory.launch(hidden, goal="long-context", session=tmp_path / "again.json")
    assert [a.outcome for a in again.record.launch_attempts] == ["ready"]  # first try: no over-asking
    assert again.plan.params["max_model_len"] <= hidden_memory.measured_tokens(again)
    assert again.estimate.kv_cache_tokens <= hidden_memory.measured_tokens(again)
    assert memory.plan_safe_kv_tokens(again.estimate) <= hidden_memory.measured_tokens(again)
    counted_on = memory.plan_safe_kv_tokens(memory.MemoryEstimate.model_validate(first.record.baseline_estimate))
    assert counted_on > first.record.launch_attempts[0].attempt.estimated_max_model_len  # before: not there
    step = next(d for d in again.record.decisions if d.step == "calibration")
    assert step.provenance.startswith("calibrated from 3 startups on this machine")
    assert first.estimate.kv_cache_tokens > hidden_memory.measured_tokens(first)  # before: it promised more

    assert main(["session", "show", str(tmp_path / "again.json")]) == 0
    assert "calib    calibrated from 3 startups on this machine" in capsys.readouterr().out

    # replay uses the correction the record planned with, whatever was learned since
    assert main(["calibration", "reset"]) == 0
    assert pipeline.replay(load_record(tmp_path / "again.json")).divergence is None
    assert main(["session", "replay", str(tmp_path / "again.json")]) == 0


def test_a_surplus_grows_the_estimate_only_after_two_agreeing_startups():
    """The other direction: this machine's vLLM leaves 0.6 GiB more KV cache than estimated."""
    third = {"gpu_memory_utilization": 0.93, "max_model_len": 4096, "max_num_seqs": 8}
    first = hidden_memory.launch(-0.6, goal="stable")
    machine = calibration.key(first.hardware, "0.33.0")[0]
    held = Store().correction(machine, "0.33.0")
    assert held.rule == "hold" and held.non_kv_gib == 0.0  # one startup: the estimate does not grow yet
    second = hidden_memory.launch(-0.6, args=("--gpu-memory-utilization", "0.90", "--max-model-len", "8192"))
    assert second.record.calibration.used.rule == "hold"
    grown = Store().correction(machine, "0.33.0")
    assert grown.rule == "grow" and grown.non_kv_gib == pytest.approx(-0.6, abs=0.02)
    truth = hidden_memory.measured_tokens(hidden_memory.launch(-0.6, args=(
        "--gpu-memory-utilization", "0.93", "--max-model-len", "4096", "--max-num-seqs", "8")))
    after = hidden_memory.estimate(third, calibration=grown).kv_cache_tokens
    assert hidden_memory.estimate(third).kv_cache_tokens < truth and abs(after - truth) / truth <= 0.02


def test_a_replayed_record_from_before_calibration_stays_uncalibrated(tmp_path):
    record = load_record(FIXTURES / "sessions" / "kv-too-small-recovered.json")
    assert record.calibration.used is None
    snapshot = hardware.HardwareSnapshot.model_validate(record.hardware)
    Store().add(*calibration.key(snapshot, record.vllm.version), ["GPU"], [_seen(5.0)])
    assert calibration.for_machine(snapshot, record.vllm.version)[0].non_kv_gib == 5.0
    out = pipeline.replay(record)
    assert out.divergence is None and out.replayed.calibration.used is None
    assert not any(d.step == "calibration" for d in out.replayed.decisions)


def test_an_edited_recorded_correction_is_a_one_line_error(tmp_path, capsys):
    record = json.loads((FIXTURES / "sessions" / "cache-hit.json").read_text())
    record["calibration"] = {"used": {"machine": MACHINE, "non_kv_gib": "lots"}}
    copy = tmp_path / "edited.json"
    copy.write_text(json.dumps(record))
    assert main(["session", "replay", str(copy)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "invalid session record at calibration.used" in err[0]


# ---------------------------------------------------------------------------------------------- CLI


def _machine_of(path) -> str:
    from smartrun import hardware

    return hardware.fingerprint(hardware.load_snapshot(str(path)))


def test_model_estimate_says_calibrated_from_n_startups(capsys):
    machine = _machine_of(hidden_memory.L4)
    Store().add(machine, "0.33.0", ["NVIDIA L4"], [_seen(2.0, total=22.04), _seen(1.0, total=22.04)])
    base = ["model", "estimate", str(hidden_memory.MODEL), "--hardware", str(hidden_memory.L4), "--vllm-version",
            "0.33.0", "--max-model-len", "4096"]
    assert main(base) == 0
    out = capsys.readouterr().out
    assert "calibrated from 2 startups on this machine (vLLM 0.33.0): non-KV +2.00 GiB per GPU" in out
    assert main([*base, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["calibration"]["non_kv_gib"] == 2.0 and data["calibration"]["startups"] == 2
    assert main([*base, "--no-calibration", "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert plain["calibration"] is None and plain["kv_cache_gib"] == pytest.approx(data["kv_cache_gib"] + 2, abs=0.02)
    assert main([*base, "--vllm-version", "0.19.0", "--json"]) == 0  # learned for 0.33.0 only
    assert json.loads(capsys.readouterr().out)["calibration"] is None


def test_dry_run_explain_names_the_correction(capsys, tmp_path):
    Store().add(_machine_of(hidden_memory.L4), "0.33.0", ["NVIDIA L4"], [_seen(1.0, total=22.04)])
    code = main(["model", "run", str(hidden_memory.MODEL), "--dry-run", "--explain", "--hardware",
                 str(hidden_memory.L4), "--vllm-version", "0.33.0", "--session-out", str(tmp_path / "s.json")])
    out = capsys.readouterr().out
    assert code == 0
    assert "calibration" in out and "<- calibrated from 1 startup on this machine" in out
    assert "  calibrated from 1 startup on this machine (vLLM 0.33.0): non-KV +1.00 GiB per GPU" in out
    record = load_record(tmp_path / "s.json")
    assert Correction.model_validate(record.calibration.used).non_kv_gib == 1.0
    assert record.estimate.calibration.non_kv_gib == 1.0


def test_calibration_show_and_reset(capsys):
    store = Store()
    store.add(MACHINE, "0.33.0", ["NVIDIA L4"], [_seen(1.0)])
    store.add("fedcba9876543210", "0.19.0", ["NVIDIA H100 80GB HBM3"], [_seen(-1.0), _seen(-1.1)])
    assert main(["calibration", "show"]) == 0
    out = capsys.readouterr().out
    assert f"machine {MACHINE} (1x NVIDIA L4), vLLM 0.33.0, 1 startup(s) kept" in out
    assert "calibrated from 2 startups on this machine (vLLM 0.19.0): non-KV -1.00 GiB per GPU" in out
    assert main(["calibration", "show", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {c["machine"] for c in data["calibrations"]} == {MACHINE, "fedcba9876543210"}
    assert data["problems"] == []
    assert all(c["correction"]["startups"] >= 1 and c["observations"] for c in data["calibrations"])
    assert main(["calibration", "reset", "--vllm-version", "0.19.0", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["removed"]) == 1
    assert main(["calibration", "reset"]) == 0
    assert "removed 1 calibration file(s)" in capsys.readouterr().out
    assert main(["calibration", "show"]) == 0
    assert "no calibration data" in capsys.readouterr().out


@pytest.mark.parametrize("args, words", [
    (["calibration", "reset", "--machine", "not-a-fingerprint"], "16-hex-digit hardware fingerprint"),
    (["calibration", "reset", "--vllm-version", "latest"], "expected a version like"),
    (["calibration", "frobnicate"], "invalid choice"),
    (["calibration"], "required"),
])
def test_bad_calibration_input_is_one_line_exit_2(args, words, capsys):
    try:
        code = main(args)
    except SystemExit as exit_:  # argparse's usage errors
        code = exit_.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0] and "Traceback" not in err[0]


def test_bad_input_under_json_is_one_json_object(capsys):
    assert main(["calibration", "reset", "--machine", "xyz", "--json"]) == 2
    captured = capsys.readouterr()
    assert json.loads(captured.out) == {"error": captured.err.strip().removeprefix("localaistack: "), "exit": 2}


def test_corrupt_calibration_data_warns_in_one_line_and_never_fails_a_run(capsys, tmp_path):
    path = Store().add(_machine_of(hidden_memory.L4), "0.33.0", ["NVIDIA L4"], [_seen(1.0, total=22.04)])
    path.write_text("[1, 2")
    assert main(["calibration", "show"]) == 0
    captured = capsys.readouterr()
    assert "no calibration data" in captured.out
    assert captured.err.count("\n") == 1 and "unreadable calibration file ignored" in captured.err
    code = main(["model", "run", str(hidden_memory.MODEL), "--dry-run", "--hardware", str(hidden_memory.L4),
                 "--vllm-version", "0.33.0", "--session-out", str(tmp_path / "s.json")])
    assert code == 0 and "unreadable calibration file ignored" in capsys.readouterr().err
    assert load_record(tmp_path / "s.json").calibration.used is None
    path.unlink()
    path.parent.rmdir()
    path.parent.write_text("")  # the data dir is a file
    assert main(["calibration", "show"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a directory" in err[0]


def test_reset_that_cannot_remove_a_file_is_one_error_naming_it(tmp_path):
    """A path the reset cannot delete (here a folder named like a record) stops it with one error naming it."""
    (tmp_path / "a.json").write_text("{}")
    (tmp_path / "b.json").mkdir()
    with pytest.raises(calibration.CalibrationError, match=r"b\.json: cannot remove"):
        Store(tmp_path).reset()
