"""What redaction costs on hostile text, against the pattern it replaced, side by side.

The issue's anchors: one long vLLM log line (tens of MiB of letters) froze smartrun at 100% CPU, and an
80k-character LLM reply cost 70 s of CPU, because the URL-credentials pattern rescanned a run of letters
from every position (quadratic). Prints CPU seconds of `secrets.redact_text` (linear patterns) and of the
old pattern on the same inputs, growing in size; the old one is only run up to --old-max characters.
Also the log reader: a 40 MiB line through launch's capped reader (what reaches any regex is 16 KiB).

    .venv/bin/python benchmarks/redaction.py [--old-max 80000]
"""

from __future__ import annotations

import argparse
import io
import re
import time

from smartrun.launch import _capped_lines
from smartrun.secrets import redact_text

OLD_URL = re.compile(r"(?P<keep>[A-Za-z][A-Za-z0-9+.-]*://)[^/\s@:]+:[^/\s@]+(?=@)")  # the pattern replaced


def cpu(fn, *args) -> float:
    started = time.process_time()
    fn(*args)
    return time.process_time() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old-max", type=int, default=80_000, help="largest input given to the old pattern")
    args = parser.parse_args()
    shapes = {"letters": lambda n: "a" * n, "a:b:": lambda n: "ab:" * (n // 3), "Bearer": lambda n: "Bearer " * (n // 7)}
    print(f"{'input':<10} {'chars':>10} {'new s':>8} {'old s':>8}")
    for name, make in shapes.items():
        for n in (10_000, 20_000, 40_000, 80_000, 1_000_000, 10_000_000):
            text = make(n)
            new = cpu(redact_text, text, ["secret-value"])
            old = cpu(lambda t: OLD_URL.sub(lambda m: m.group("keep") + "x", t), text) if n <= args.old_max else None
            print(f"{name:<10} {n:>10,} {new:>8.3f} {'-' if old is None else f'{old:.3f}':>8}")
    giant = io.StringIO("A" * (40 << 20) + "\nnext line\n")
    started = time.perf_counter()
    lines = list(_capped_lines(giant))
    print(f"\n40 MiB log line through the capped reader: {time.perf_counter() - started:.2f} s, "
          f"kept {len(lines[0]):,} characters, then {lines[1]!r}")


if __name__ == "__main__":
    main()
