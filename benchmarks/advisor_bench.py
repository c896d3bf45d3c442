"""What the advisor costs and how long a flaky endpoint can hold it up, with the shipped retry settings.

Runs `advise` through the real openai client against the scripted fake server (tests/fakes/llm_server.py)
with the default OpenAITransport backoff (0.5 s base, 8 s cap, 4 attempts, 120 s total), and prints one
row per scenario: HTTP calls made, outcome, wall time; then the size of the rendered prompts.

    .venv/bin/python benchmarks/advisor_bench.py [--repeat N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from fakes.advisor_inputs import check_for, context, reply
from fakes.llm_server import FakeLLM

from smartrun.advisor import LLMSettings, OpenAITransport, advise, initial_messages

GOOD = reply([{"knob": "max_num_seqs", "value": 16, "reason": "throughput"}])
BAD = reply([{"knob": "gpu_memory_utilization", "value": 0.99, "reason": "more KV"}])

SCENARIOS = {
    "good reply": ([{"content": GOOD}], {}),
    "prose + fenced JSON": ([{"content": f"Sure:\n```json\n{GOOD}\n```"}], {}),
    "out of bounds, repaired": ([{"content": BAD}, {"content": GOOD}], {}),
    "out of bounds x3 -> baseline": ([{"content": BAD, "times": 3}], {}),
    "429 then good": ([{"status": 429}, {"content": GOOD}], {}),
    "500 until give-up": ([{"status": 500, "times": 10}], {}),
    "slower than timeout (2 s)": ([{"content": GOOD, "delay_s": 30, "times": 4}], {"timeout_s": 2.0}),
    "401 refused": ([{"status": 401}], {}),
    "no json_schema support": ([{"content": GOOD}], {"structured": False}),
}


def one_run(steps: list[dict], options: dict) -> tuple[int, str, float]:
    structured = options.pop("structured", True)
    with FakeLLM(steps, structured=structured) as llm:
        settings = LLMSettings(base_url=llm.base_url, model="fake-model", **options)
        ctx = context()
        started = time.perf_counter()
        advice = advise(ctx, OpenAITransport(settings), check_for(ctx.bounds, ctx.baseline))
        wall = time.perf_counter() - started
    outcome = advice.plan.source if not advice.fallback_reason else "baseline: " + advice.fallback_reason[:48]
    return len(llm.chat_requests), outcome, wall


def main() -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False)
    parser.add_argument("--repeat", type=int, default=3, help="runs per scenario (median and max shown)")
    args = parser.parse_args()
    print(f"{'scenario':32} {'calls':>5} {'median s':>9} {'max s':>7}  outcome")
    for name, (steps, options) in SCENARIOS.items():
        walls, calls, outcome = [], 0, ""
        for _ in range(args.repeat):
            calls, outcome, wall = one_run(json.loads(json.dumps(steps)), dict(options))
            walls.append(wall)
        print(f"{name:32} {calls:>5} {statistics.median(walls):>9.2f} {max(walls):>7.2f}  {outcome}")
    print()
    print(f"{'prompt':10} {'system chars':>12} {'user chars':>10} {'~tokens':>8}")
    ctx = context(failure={"class": "kv_cache_too_small", "evidence": "estimated maximum model length is 6144",
                           "log_excerpt": "x" * 1500})
    for kind in ("propose", "recover"):
        system, user = (m["content"] for m in initial_messages(ctx, kind))
        print(f"{kind:10} {len(system):>12} {len(user):>10} {(len(system) + len(user)) // 4:>8}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
