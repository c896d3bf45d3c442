"""What one advisor decision costs: prompt size, reply cap, round trips and wall time.

1. Scripted endpoints (tests/fakes/llm_server.py, through the real openai client, shipped retry settings,
   --llm-timeout 10 s): one row per scenario with the HTTP calls made, round trips (exchanges), outcome and
   wall time; a slow or trickling server must cost at most the budget.
2. Prompt sizes of the propose and recover prompts for every fixture model on its usual machine: characters,
   smartrun's token estimate, the offered knobs and the reply's max_tokens.
3. With --real (needs the llm extra): llama.cpp's server with SmolLM2-135M-Instruct on 127.0.0.1 (1 thread,
   or each of --threads), and `localaistack model run --smart-run --dry-run --json` on fixture models: wall
   time, round trips, LLM time, prompt tokens as the server counted them, reply tokens against max_tokens, the
   server's prefill/generation split, finish reasons, outcome. The issue's anchors (before this work) are
   printed next to it: a ~3,000-token prompt, no max_tokens, every dry run blocked ~120 s and fell back.

    .venv/bin/python benchmarks/advisor_bench.py [--repeat N] [--real [--real-runs N] [--threads 1 2]]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from fakes.advisor_inputs import check_for, context, reply  # noqa: E402
from fakes.llm_server import FakeLLM  # noqa: E402

from smartrun import hardware, model, rules, sizing  # noqa: E402
from smartrun.advisor import (  # noqa: E402
    AdviceContext,
    LLMSettings,
    OpenAITransport,
    advise,
    initial_messages,
    offered_knobs,
    prompt_tokens,
    reply_max_tokens,
)

GOOD = reply([{"knob": "max_num_seqs", "value": 16, "reason": "throughput"}])
BAD = reply([{"knob": "gpu_memory_utilization", "value": 0.99, "reason": "more KV"}])
BUDGET_S = 10.0

SCENARIOS = {
    "good reply": ([{"content": GOOD}], {}),
    "empty reply: keeps baseline": ([{"content": reply([], "baseline fits")}], {}),
    "prose + fenced JSON": ([{"content": f"Sure:\n```json\n{GOOD}\n```"}], {}),
    "out of bounds, repaired": ([{"content": BAD}, {"content": GOOD}], {}),
    "out of bounds x3 -> baseline": ([{"content": BAD, "times": 3}], {}),
    "cut off, then good": ([{"content": GOOD[:30], "finish_reason": "length"}, {"content": GOOD}], {}),
    "429 then good": ([{"status": 429}, {"content": GOOD}], {}),
    "500 until give-up": ([{"status": 500, "times": 10}], {}),
    "slower than the budget": ([{"content": GOOD, "delay_s": 30, "times": 4}], {}),
    "trickled body (1 B/0.2 s)": ([{"content": GOOD, "trickle_s": 0.2, "times": 4}], {}),
    "401 refused": ([{"status": 401}], {}),
    "no json_schema support": ([{"content": GOOD}], {"structured": False}),
}

REAL_RUNS = [("qwen2.5-7b-instruct", "1x-h100-80gb", "stable"), ("llama-3.1-8b-instruct", "1x-a100-40gb", "throughput"),
             ("qwen2.5-72b-instruct-awq", "2x-a100-80gb-nvlink", "latency"),
             ("gemma-2-9b-it", "1x-h100-80gb", "long-context")]


def one_run(steps: list[dict], options: dict) -> tuple[int, int, str, float]:
    structured = options.pop("structured", True)
    with FakeLLM(steps, structured=structured) as llm:
        settings = LLMSettings(base_url=llm.base_url, model="fake-model", timeout_s=BUDGET_S, **options)
        ctx = context()
        started = time.perf_counter()
        advice = advise(ctx, OpenAITransport(settings), check_for(ctx.bounds, ctx.baseline))
        wall = time.perf_counter() - started
    if advice.kept_baseline:
        outcome = "kept baseline"
    else:
        outcome = advice.plan.source if not advice.fallback_reason else "baseline: " + advice.fallback_reason[:60]
    return len(llm.chat_requests), len(advice.exchanges), outcome, wall


def scripted(repeat: int) -> None:
    print(f"## scripted endpoints (--llm-timeout {BUDGET_S:g} s, {repeat} run(s) each)")
    print(f"{'scenario':30} {'HTTP':>4} {'trips':>5} {'median s':>9} {'max s':>6}  outcome")
    for name, (steps, options) in SCENARIOS.items():
        walls, calls, trips, outcome = [], 0, 0, ""
        for _ in range(repeat):
            calls, trips, outcome, wall = one_run(json.loads(json.dumps(steps)), dict(options))
            walls.append(wall)
        print(f"{name:30} {calls:>4} {trips:>5} {statistics.median(walls):>9.2f} {max(walls):>6.2f}  {outcome}")


def fixture_context(model_dir: str, machine: str, goal: str, failure: dict | None = None) -> AdviceContext:
    hw = hardware.load_snapshot(REPO / "fixtures" / "hardware" / f"{machine}.json")
    facts = model.inspect(str(REPO / "fixtures" / "models" / model_dir))
    bounds = rules.effective_bounds(facts, hw, None, {}, goal=goal)
    base, estimate = sizing.baseline(bounds, facts, hw, goal)
    return AdviceContext(hardware=hw, model=facts, bounds=bounds, baseline=base, estimate=estimate, goal=goal,
                         failure=failure)


def prompt_sizes() -> None:
    print("\n## prompt sizes (smartrun's estimate: 2.8 characters a token, SmolLM2's tokenizer on these prompts)")
    print(f"{'model / machine / goal':58} {'kind':8} {'chars':>6} {'~tokens':>7} {'max_tokens':>10}  offered knobs")
    failure = {"class": "kv_cache_too_small", "evidence": "estimated maximum model length is 6144",
               "estimated_max_model_len": 6144, "log_excerpt": ["INFO line " + "x" * 90] * 20}
    for model_dir, machine, goal in REAL_RUNS:
        for kind in ("propose", "recover"):
            ctx = fixture_context(model_dir, machine, goal, failure if kind == "recover" else None)
            messages = initial_messages(ctx, kind)
            offered = offered_knobs(ctx, kind)
            chars = sum(len(m["content"]) for m in messages)
            print(f"{model_dir + ' / ' + machine + ' / ' + goal:58} {kind:8} {chars:>6} {prompt_tokens(messages):>7} "
                  f"{reply_max_tokens(ctx.bounds, offered):>10}  {', '.join(offered)}")


def real(runs: int, threads: int) -> None:
    from llama_server import LlamaServer, missing

    why = missing()
    if why:
        print(f"\n## real LLM: skipped ({why})")
        return
    load = os.getloadavg()
    print(f"\n## real LLM: llama.cpp server (xllamacpp), SmolLM2-135M-Instruct Q4_1, {threads} thread(s), n_ctx 2048; "
          f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} on {os.cpu_count()} cores (shared machine)")
    print("before (the issue's anchors): propose prompt ~3,000 tokens, no max_tokens, each dry run blocked ~120 s "
          "and fell back to the baseline")
    print(f"{'model / machine / goal':56} {'wall s':>6} {'trips':>5} {'LLM s':>6} {'prompt tok':>10} "
          f"{'reply/max':>10} {'prefill s':>9} {'gen s':>6} {'finish':>12}  outcome")
    with tempfile.TemporaryDirectory() as tmp, LlamaServer(n_ctx=2048, threads=threads) as llm:
        for _ in range(runs):
            for model_dir, machine, goal in REAL_RUNS:
                out = Path(tmp) / "s.json"
                started = time.monotonic()
                done = subprocess.run(
                    [sys.executable, "-m", "smartrun", "model", "run", str(REPO / "fixtures" / "models" / model_dir),
                     "--smart-run", "--dry-run", "--json", "--goal", goal, "--hardware",
                     str(REPO / "fixtures" / "hardware" / f"{machine}.json"), "--llm-base-url", llm.base_url,
                     "--llm-timeout", "50", "--session-out", str(out)],
                    capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)
                wall = time.monotonic() - started
                if done.returncode != 0:
                    print(f"{model_dir:56} failed: {done.stderr.strip().splitlines()[-1:]}")
                    continue
                decision = json.loads(done.stdout)["llm"][0]
                ex = decision["exchanges"]
                outcome = ("kept baseline" if decision["kept_baseline"] else decision["source"]
                           if not decision["fallback"] else "baseline: " + decision["fallback"][:50])
                print(f"{model_dir + ' / ' + machine + ' / ' + goal:56} {wall:>6.1f} {len(ex):>5} "
                      f"{decision['spent_s']:>6.1f} {'/'.join(str(e['prompt_tokens']) for e in ex):>10} "
                      f"{'/'.join(str(e['completion_tokens']) + ':' + str(e['max_tokens']) for e in ex):>10} "
                      f"{_split(ex, 'prompt_ms'):>9} {_split(ex, 'predicted_ms'):>6} "
                      f"{','.join(str(e['finish_reason']) for e in ex):>12}  {outcome}")


def _split(exchanges: list[dict], key: str) -> str:
    """Seconds the server spent on prompts or on generating, summed over the decision (llama.cpp's timings)."""
    ms = [(e.get("server_timings") or {}).get(key) for e in exchanges]
    return f"{sum(m for m in ms if m) / 1000:.1f}" if any(ms) else "-"


def main() -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False)
    parser.add_argument("--repeat", type=int, default=3, help="runs per scripted scenario (median and max shown)")
    parser.add_argument("--real", action="store_true", help="also run dry runs against llama.cpp + SmolLM2")
    parser.add_argument("--real-runs", type=int, default=1, help="passes over the real-LLM fixtures")
    parser.add_argument("--threads", type=int, nargs="+", default=[1], help="llama.cpp threads, one table each")
    args = parser.parse_args()
    scripted(args.repeat)
    prompt_sizes()
    if args.real:
        for threads in args.threads:
            real(args.real_runs, threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
