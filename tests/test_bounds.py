"""The bounds file: format, line numbers, problems, discovery, and the `bounds check|show` commands."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from smartrun import bounds
from smartrun.cli import main
from smartrun.errors import BoundsError

FIX = Path(__file__).resolve().parent.parent / "fixtures"
BOUNDS = FIX / "bounds"


def _write(tmp_path: Path, text: str, name: str = "smartrun.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_builtin_keeps_only_safety_margins_and_the_guide_lives_in_the_policy():
    f = bounds.builtin()
    util = f.knobs["gpu_memory_utilization"]
    assert (util.min, util.max, util.oom_floor) == (0.85, 0.93, 0.82)
    assert f.knobs["dtype"].choices == ("bfloat16", "float16") and f.knobs["dtype"].last_resort == ("float32",)
    assert (f.knobs["optimization_level"].min, f.knobs["optimization_level"].max) == (0, 2)
    assert f.knobs["cpu_offload_gb"].max == 0
    # the guide's per-goal ranges are preferences now, not caps: no goal presets, no seqs/pp/context caps
    assert f.goals == {} and not {"max_model_len", "max_num_seqs", "pipeline_parallel_size"} & set(f.knobs)
    assert util.source("min") == "bounds:builtin:10"
    assert bounds.problems(bounds.BUILTIN_PATH) == []


def test_every_limit_knows_its_line(tmp_path):
    text = (
        "# comment\n"
        "version = 1\n"
        "[knobs.gpu_memory_utilization]   # a range\n"
        "min = 0.85\n"
        "\n"
        "max = 0.93\n"
        "[[models]]\n"
        'match = "Qwen/*"\n'
        "knobs.max_model_len = { max = 32768 }\n"
        "[[models]]\n"
        'match = "x"\n'
        "[models.knobs.dtype]\n"
        'choices = ["float16"]\n'
        "[goals.throughput.knobs.max_num_seqs]\n"
        "min = 8\n"
    )
    f = bounds.load(_write(tmp_path, text))
    util = f.knobs["gpu_memory_utilization"]
    assert (util.lines["min"], util.lines["max"], util.lines[""]) == (4, 6, 3)
    assert f.models[0].knobs["max_model_len"].source("max").endswith(":9")
    assert f.models[1].knobs["dtype"].lines["choices"] == 13 and f.models[1].line == 10
    assert f.goals["throughput"]["max_num_seqs"].lines["min"] == 15


@pytest.mark.parametrize(
    ("name", "line", "needle"),
    [
        ("bad-syntax.toml", 4, "TOML syntax error"),
        ("bad-unknown-knob.toml", 3, "unknown knob 'gpu_memory_utilisation' (did you mean"),
        ("bad-min-gt-max.toml", 4, "min 8192 > max 4096"),
        ("bad-non-numeric.toml", 4, "'0.9x' is not a number"),
        ("bad-domain.toml", 3, "outside vLLM's domain"),
        ("bad-goal-disjoint.toml", 5, "disjoint from the global"),
        ("bad-unknown-key.toml", 3, "unknown key 'maximum'"),
    ],
)
def test_bad_files_report_file_line_and_problem(name, line, needle, capsys):
    path = BOUNDS / name
    problems = bounds.problems(path)
    assert problems[0][0] == line and needle in problems[0][1]
    with pytest.raises(BoundsError) as err:
        bounds.load(path)
    assert err.value.message.startswith(f"{path}:{line}: ") and "\n" not in err.value.message
    assert main(["bounds", "check", str(path)]) == 2
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{path}:{line}: ") and needle in out[0]


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[knobs.max_num_seqs]\nmax = 4\n", "missing version = 1"),
        ("version = 2\n", "version must be 1"),
        ("version = 1\ncolour = 1\n", "unknown top-level key 'colour'"),
        ("version = 1\n[knobs.max_num_seqs]\nmax = 4.5\n", "not an integer"),
        ("version = 1\n[knobs.max_num_seqs]\nmax = true\n", "not an integer"),
        ("version = 1\n[knobs.dtype]\nchoices = []\n", "non-empty list"),
        ("version = 1\n[knobs.max_model_len]\nmin = 1024\nmax = 4096\nfixed = 8192\n", "fixed 8192 lies outside"),
        ("version = 1\n[knobs.dtype]\nchoices = ['float16']\nfixed = 'bfloat16'\n", "not among choices"),
        ("version = 1\n[knobs.max_model_len]\nchoices = [1024]\nmax = 9\n", "either choices or min/max"),
        ("version = 1\n[knobs.gpu_memory_utilization]\nmin = 0.8\noom_floor = 0.9\n", "oom_floor 0.9 is above"),
        ("version = 1\n[[models]]\nknobs.max_model_len = {max = 4096}\n", "needs match"),
        ("version = 1\n[goals.fast.knobs.max_num_seqs]\nmax = 4\n", "unknown goal 'fast'"),
        ("version = 1\n[knobs.dtype]\nchoices = ['float16']\n[goals.throughput.knobs.dtype]\nfixed = 'bfloat16'\n",
         "disjoint"),
        ("version = 1\n[knobs.optimization_level]\nmax = 4\n", "outside vLLM's domain"),
        ("version = 1\n[knobs.gpu_memory_utilization]\nmin = nan\n", "not a number"),
        ("version = 1\n[knobs.api_key]\nfixed = 'k'\n", "cannot be bounded"),
        ("version = 1\na = " + "[" * 100_000, "nested too deeply"),
        ("version = 1\ndescription = 5\n", "description must be a string"),  # once a pydantic traceback  # once a RecursionError traceback
    ],
)
def test_problems_catch_contradictions_and_types(tmp_path, text, needle):
    found = bounds.problems(_write(tmp_path, text))
    assert found and any(needle in message for _, message in found), found
    assert all(line >= 1 for line, _ in found if "version" not in _)


def test_examples_check_clean_and_overrides_layer(capsys):
    for name in ("example-serving.toml", "example-latency-h100.toml"):
        assert main(["bounds", "check", str(BOUNDS / name)]) == 0
        assert capsys.readouterr().out.startswith(f"OK {BOUNDS / name}: ")
    f = bounds.load(BOUNDS / "example-serving.toml")
    plain = bounds.layered(f, ("meta-llama/Llama-3.1-8B",), ("NVIDIA H100 80GB HBM3",))
    assert plain["max_model_len"].max == 16384 and plain["gpu_memory_utilization"].max == 0.93
    qwen = bounds.layered(f, ("Qwen/Qwen2.5-7B-Instruct",), ("NVIDIA GeForce RTX 4090",))
    assert qwen["max_model_len"].max == 32768 and qwen["max_model_len"].min == 2048
    assert qwen["max_model_len"].source("max").endswith(":22")
    assert qwen["gpu_memory_utilization"].max == 0.90 and qwen["gpu_memory_utilization"].source("min").endswith(":5")


def test_find_walks_up_and_resolve_falls_back_to_builtin(tmp_path):
    deep = tmp_path / "a" / "b"
    deep.mkdir(parents=True)
    assert bounds.find(deep) is None or not str(bounds.find(deep)).startswith(str(tmp_path))
    path = _write(tmp_path / "a", "version = 1\n[knobs.max_num_seqs]\nmax = 4\n")
    assert bounds.find(deep) == path
    assert bounds.resolve(None, deep).knobs["max_num_seqs"].max == 4
    assert bounds.resolve(BOUNDS / "example-serving.toml").path == str(BOUNDS / "example-serving.toml")
    with pytest.raises(BoundsError, match="not found"):
        bounds.resolve(tmp_path / "missing.toml")


def test_check_without_file_uses_the_file_found_from_cwd(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["bounds", "check"]) == 0
    assert "OK builtin" in capsys.readouterr().out
    _write(tmp_path, "version = 1\n[knobs.max_num_seqs]\nmin = 9\nmax = 3\n")
    assert main(["bounds", "check"]) == 2
    assert "smartrun.toml:4: max_num_seqs: min 9 > max 3" in capsys.readouterr().out


def _show(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "smartrun", "bounds", "show", *args], capture_output=True,
                          text=True, timeout=60)


def test_bounds_show_prints_every_limit_with_its_source():
    model = str(FIX / "models" / "qwen2.5-7b-instruct")
    result = _show(model, "--hardware", str(FIX / "hardware" / "1x-rtx4090.json"), "--bounds",
                   str(BOUNDS / "example-serving.toml"), "--baseline", "--max-num-seqs", "6")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "gpu_memory_utilization     0.85 <= x <= 0.9 " in out
    assert f"bounds:{BOUNDS / 'example-serving.toml'}:30" in out  # the RTX 4090 override's max
    assert "max_num_seqs               pinned to 6" in out
    assert "argv: vllm serve " in out and "--max-num-seqs 6" in out


def test_bounds_show_json_and_the_builtin_on_two_machines():
    model = str(FIX / "models" / "llama-3.1-8b-instruct")
    for machine, tp, dp in (("1x-l4", 1, None), ("2x-a100-80gb-nvlink", 1, 2)):
        result = _show(model, "--hardware", str(FIX / "hardware" / f"{machine}.json"), "--json", "--goal",
                       "throughput")
        assert result.returncode == 0, result.stderr
        data = json.loads(result.stdout)
        assert data["bounds"]["max_num_seqs"]["min"] == 1 and data["bounds"]["max_num_seqs"]["sources"] == ["vllm"]
        assert data["params"]["tensor_parallel_size"] == tp and data["estimate"]["fits"]
        assert data["params"].get("data_parallel_size") == dp
        assert data["argv"][:3] == ["vllm", "serve", model]


def test_bounds_show_keeps_a_pin_past_the_builtin_band_and_refuses_one_past_the_users_file(tmp_path):
    model, l4 = str(FIX / "models" / "qwen2.5-7b-instruct"), str(FIX / "hardware" / "1x-l4.json")
    kept = _show(model, "--hardware", l4, "--json", "--gpu-memory-utilization", "0.97")
    assert kept.returncode == 0, kept.stderr
    data = json.loads(kept.stdout)
    assert data["params"]["gpu_memory_utilization"] == 0.97 and data["provenance"]["gpu_memory_utilization"] == "pin"
    assert [w for w in data["warnings"] if w.startswith("pin --gpu-memory-utilization 0.97 passes the built-in bound")]
    mine = tmp_path / "smartrun.toml"
    mine.write_text("version = 1\n[knobs.gpu_memory_utilization]\nmax = 0.93\n")
    result = _show(model, "--hardware", l4, "--bounds", str(mine), "--gpu-memory-utilization", "0.97")
    assert result.returncode == 2
    assert result.stderr.startswith(f"localaistack: pin --gpu-memory-utilization 0.97 conflicts with bounds:{mine}:3")
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1
