"""The bounds file: hard limits a person checks into the deployment repo (TOML, version 1).

    version = 1
    [knobs.gpu_memory_utilization]     # a range (min and/or max)
    min = 0.85
    max = 0.93
    oom_floor = 0.82                   # the recovery ladder (only) may go down to here after an OOM
    [knobs.dtype]                      # a set of values
    choices = ["bfloat16", "float16"]
    last_resort = ["float32"]          # values the recovery ladder (only) may use
    [knobs.enforce_eager]              # a fixed value
    fixed = false
    [[models]]                         # per-model override: repo id, glob or model dir name
    match = "Qwen/*"
    knobs.max_model_len = { max = 32768 }
    [[gpus]]                           # per-GPU override: NVML name glob
    match = "*RTX 4090*"
    knobs.gpu_memory_utilization = { max = 0.90 }
    [goals.throughput.knobs.max_num_seqs]   # goal preset
    min = 8
    max = 16

Any knob table may also carry `why = "..."`, shown with the limit. Semantics: model and GPU
overrides *replace* the keys they set (in file order; matching is case-insensitive glob against the
repo id, the model directory name or its path; a [[gpus]] entry applies when any GPU of the machine
matches); a goal preset *narrows* (it is intersected, it never widens). `oom_floor` and
`last_resort` are room only the recovery ladder may use (Proposal.source == "recovery"). Flags
that take several values (api_key, served_model_name, ...) cannot be bounded. Every limit knows
its file and line.
Found by `--bounds FILE`, else `smartrun.toml` from the current directory upward, else the
built-in default shipped in the package (smartrun/data/default_bounds.toml).
"""

from __future__ import annotations

import difflib
import fnmatch
import math
import re
from pathlib import Path
from typing import Any

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from smartrun import fileio
from smartrun.contracts import GOALS
from smartrun.errors import BoundsError
from smartrun.frozen import Frozen
from smartrun.knobs import CATALOGUE, Knob

FILE_NAME = "smartrun.toml"
BUILTIN_PATH = Path(__file__).parent / "data" / "default_bounds.toml"
BUILTIN_NAME = "builtin"
LIMIT_KEYS = ("min", "max", "choices", "fixed", "oom_floor", "last_resort", "why")
TOP_KEYS = ("version", "description", "knobs", "models", "gpus", "goals")


class Limit(Frozen):
    """One knob's limit from one table of the file; `lines[key]` is the line each key was written on."""

    knob: str
    min: float | int | None = None
    max: float | int | None = None
    choices: tuple[Any, ...] | None = None
    fixed: Any = None
    has_fixed: bool = False
    oom_floor: float | int | None = None
    last_resort: tuple[Any, ...] = ()
    why: str | None = None
    file: str = ""
    lines: dict[str, int] = {}

    def source(self, key: str | None = None) -> str:
        """`bounds:<file>:<line>` of one key (or of the table when the key has no line)."""
        line = self.lines.get(key or "", self.lines.get("", 0))
        return f"bounds:{self.file}:{line}"


class Override(Frozen):
    """A [[models]] or [[gpus]] entry: limits that apply when `match` matches."""

    match: str
    knobs: dict[str, Limit] = {}
    line: int = 0

    def matches(self, *names: str | None) -> bool:
        pattern = self.match.lower()
        return any(name and fnmatch.fnmatchcase(name.lower(), pattern) for name in names)


class BoundsFile(Frozen):
    path: str  # as shown in sources: "builtin" or the path the user gave
    version: int = 1
    description: str | None = None
    knobs: dict[str, Limit] = {}
    models: tuple[Override, ...] = ()
    gpus: tuple[Override, ...] = ()
    goals: dict[str, dict[str, Limit]] = {}

    def ineffective(self) -> list[str]:
        """One line per limit on a security knob (host, port, trust-remote-code...). Bounds narrow what the rules
        and the LLM may choose; only the user sets these, so such a limit does little. Said out loud, so
        nobody believes a bounds file locks down a security setting."""
        tables = [self.knobs, *(o.knobs for o in (*self.models, *self.gpus)), *self.goals.values()]
        out = []
        for table in tables:
            for name, limit in table.items():
                k = CATALOGUE.get(name)
                if k is not None and k.security:
                    out.append(f"{limit.source()}: {name} is a security setting: only your own flags set it, "
                               "never the rules or the LLM, so this limit does not lock it down (at most it refuses a pin "
                               "typed before `--`; flags after `--`, --host and --port pass by it)")
        return out

    def summary(self) -> str:
        return (f"{len(self.knobs)} knobs, {len(self.models)} model overrides, {len(self.gpus)} GPU overrides, "
                f"{len(self.goals)} goal presets")


# --- line numbers: tomllib gives none, so scan the text for table headers and keys -----------------

_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\[\]]+?)\s*\]\]?\s*(?:#.*)?$")
_KEY = re.compile(r"""^\s*((?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*')(?:\s*\.\s*(?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*'))*)\s*=""")
_INLINE_KEY = re.compile(r"([A-Za-z0-9_-]+)\s*=")


def _dotted(key: str) -> list[str]:
    return [part.strip().strip("\"'") for part in re.split(r"\.(?=(?:[^\"']*[\"'][^\"']*[\"'])*[^\"']*$)", key)]


def line_index(text: str) -> dict[str, int]:
    """Map dotted paths ("knobs.dtype.choices", "models[1].knobs.max_model_len.max") to 1-based lines."""
    lines: dict[str, int] = {}
    arrays: dict[str, int] = {}
    table: list[str] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        header = _HEADER.match(raw)
        if header:
            path = _dotted(header.group(2))
            if header.group(1) == "[[":
                name = ".".join(path)
                arrays[name] = arrays.get(name, -1) + 1
                path = [f"{name}[{arrays[name]}]"]
            elif path[0] in arrays:
                path = [f"{path[0]}[{arrays[path[0]]}]", *path[1:]]
            table = path
            lines.setdefault(".".join(table), number)
            continue
        key = _KEY.match(raw)
        if not key:
            continue
        full = ".".join([*table, *_dotted(key.group(1))])
        lines.setdefault(full, number)
        rest = raw[key.end():]
        if rest.lstrip().startswith("{"):
            for inner in _INLINE_KEY.findall(rest):
                lines.setdefault(f"{full}.{inner}", number)
    return lines


def _line(index: dict[str, int], path: str) -> int:
    """The line of `path`, else of the first key inside it, else of its nearest enclosing table, else 1."""
    if path in index:
        return index[path]
    inside = [line for key, line in index.items() if key.startswith(path + ".")]
    if inside:
        return min(inside)
    while path:
        if path in index:
            return index[path]
        path = path.rpartition(".")[0]
    return 1


# --- checking ------------------------------------------------------------------------------------


class _Problems:
    def __init__(self, index: dict[str, int]):
        self.index = index
        self.found: list[tuple[int, str]] = []

    def add(self, path: str, message: str) -> None:
        self.found.append((_line(self.index, path), message))


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _typed_ok(k: Knob, value: Any) -> bool:
    """A value written for this knob has the knob's type (ints for int knobs, no strings for numbers)."""
    if k.type == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if k.type == "float":
        return _number(value) and math.isfinite(value)
    if k.type == "bool":
        return isinstance(value, bool)
    return isinstance(value, str)


def _canonical(k: Knob, value: Any) -> Any:
    return k.synonyms.get(value, value) if isinstance(value, str) else value


def _check_value(k: Knob, value: Any, where: str, what: str, out: _Problems) -> bool:
    if not _typed_ok(k, value):
        kind = {"int": "an integer", "float": "a number", "bool": "true or false"}.get(k.type, "a string")
        out.add(where, f"{k.name}.{what}: {value!r} is not {kind}")
        return False
    if not k.in_domain(_canonical(k, value)):
        out.add(where, f"{k.name}.{what}: {value!r} is outside vLLM's domain {k.domain_text()}")
        return False
    return True


def _check_limit_table(name: str, table: Any, path: str, out: _Problems) -> None:
    """One [knobs.X] table (or inline table): known keys, right types, inside vLLM's domain, consistent."""
    k = CATALOGUE.get(name)
    if k is None:
        close = difflib.get_close_matches(name, list(CATALOGUE), n=1)
        out.add(path, f"unknown knob {name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        return
    if not isinstance(table, dict):
        out.add(path, f"{name}: expected a table with min/max, choices or fixed, got {table!r}")
        return
    if k.nargs != "one":
        what = "an optional value" if k.nargs == "?" else "several values"
        out.add(path, f"{name}: takes {what} and cannot be bounded in a bounds file")
        return
    for key in table:
        if key not in LIMIT_KEYS:
            out.add(f"{path}.{key}", f"{name}: unknown key {key!r} (known: {', '.join(LIMIT_KEYS)})")
    numeric = k.type in ("int", "float")
    for key in ("min", "max", "oom_floor"):
        if key in table:
            if not numeric:
                out.add(f"{path}.{key}", f"{name}.{key}: a {k.type} knob takes choices or fixed, not {key}")
            else:
                _check_value(k, table[key], f"{path}.{key}", key, out)
    values_ok: dict[str, bool] = {}
    for key in ("choices", "last_resort"):
        if key in table:
            values = table[key]
            if not isinstance(values, list) or not values:
                out.add(f"{path}.{key}", f"{name}.{key}: expected a non-empty list")
                values_ok[key] = False
                continue
            values_ok[key] = all(_check_value(k, v, f"{path}.{key}", key, out) for v in values)
    if "fixed" in table:
        values_ok["fixed"] = _check_value(k, table["fixed"], f"{path}.fixed", "fixed", out)
    if "why" in table and not isinstance(table["why"], str):
        out.add(f"{path}.why", f"{name}.why: expected a string")
    _check_consistency(name, table, path, values_ok, out)


def _ok_number(table: dict, key: str) -> Any:
    value = table.get(key)
    return value if _number(value) else None


def _check_consistency(name: str, table: dict, path: str, values_ok: dict[str, bool], out: _Problems) -> None:
    lo, hi, floor = _ok_number(table, "min"), _ok_number(table, "max"), _ok_number(table, "oom_floor")
    if lo is not None and hi is not None and lo > hi:
        out.add(f"{path}.max", f"{name}: min {lo} > max {hi}")
    if floor is not None and lo is not None and floor > lo:
        out.add(f"{path}.oom_floor", f"{name}: oom_floor {floor} is above min {lo}")
    if floor is not None and lo is None:
        out.add(f"{path}.oom_floor", f"{name}: oom_floor needs a min to sit below")
    if "choices" in table and ("min" in table or "max" in table):
        out.add(f"{path}.choices", f"{name}: use either choices or min/max, not both")
    if "fixed" in table and values_ok.get("fixed"):
        fixed = table["fixed"]
        if _number(fixed) and ((lo is not None and fixed < lo) or (hi is not None and fixed > hi)):
            out.add(f"{path}.fixed", f"{name}: fixed {fixed} lies outside min/max")
        if values_ok.get("choices") and fixed not in table["choices"]:
            out.add(f"{path}.fixed", f"{name}: fixed {fixed!r} is not among choices")


def _check_knobs(knobs: Any, path: str, out: _Problems) -> None:
    if not isinstance(knobs, dict):
        out.add(path, f"{path}: expected a table of knobs")
        return
    for name, table in knobs.items():
        _check_limit_table(name, table, f"{path}.{name}", out)


def _check_overrides(data: dict, kind: str, out: _Problems) -> None:
    entries = data.get(kind, [])
    if not isinstance(entries, list):
        out.add(kind, f"{kind}: expected [[{kind}]] entries")
        return
    for i, entry in enumerate(entries):
        path = f"{kind}[{i}]"
        if not isinstance(entry, dict):
            out.add(path, f"{path}: expected a table")
            continue
        if not isinstance(entry.get("match"), str) or not entry.get("match"):
            out.add(path, f"[[{kind}]] entry {i + 1}: needs match = \"<glob>\"")
        for key in entry:
            if key not in ("match", "knobs", "why"):
                out.add(f"{path}.{key}", f"[[{kind}]]: unknown key {key!r} (known: match, knobs, why)")
        _check_knobs(entry.get("knobs", {}), f"{path}.knobs", out)


def _disjoint(a: dict, b: dict) -> bool:
    """Two limit tables of one knob that no value satisfies together (ranges or sets)."""
    def values(t: dict) -> list | None:
        if "fixed" in t:
            return [t["fixed"]]
        return t.get("choices") if isinstance(t.get("choices"), list) else None

    va, vb = values(a), values(b)
    if va is not None and vb is not None:
        return not set(map(repr, va)) & set(map(repr, vb))
    lo = max((x for x in (_ok_number(a, "min"), _ok_number(b, "min")) if x is not None), default=None)
    hi = min((x for x in (_ok_number(a, "max"), _ok_number(b, "max")) if x is not None), default=None)
    if va is not None or vb is not None:
        vals = [v for v in (va or vb or []) if _number(v)]
        return bool(vals) and all((lo is not None and v < lo) or (hi is not None and v > hi) for v in vals)
    return lo is not None and hi is not None and lo > hi


def _check_goals(data: dict, out: _Problems) -> None:
    goals = data.get("goals", {})
    if not isinstance(goals, dict):
        out.add("goals", "goals: expected [goals.<goal>.knobs.<knob>] tables")
        return
    for goal, table in goals.items():
        path = f"goals.{goal}"
        if goal not in GOALS:
            out.add(path, f"unknown goal {goal!r} (known: {', '.join(GOALS)})")
            continue
        if not isinstance(table, dict):
            out.add(path, f"{path}: expected a table")
            continue
        for key in table:
            if key != "knobs":
                out.add(f"{path}.{key}", f"goals.{goal}: unknown key {key!r} (known: knobs)")
        knobs = table.get("knobs", {})
        _check_knobs(knobs, f"{path}.knobs", out)
        global_knobs: dict = data["knobs"] if isinstance(data.get("knobs"), dict) else {}
        for name, limit in (knobs.items() if isinstance(knobs, dict) else ()):
            other = global_knobs.get(name)
            if isinstance(limit, dict) and isinstance(other, dict) and _disjoint(limit, other):
                out.add(f"{path}.knobs.{name}",
                        f"goals.{goal}: {name} limit is disjoint from the global [knobs.{name}] "
                        f"(line {_line(out.index, 'knobs.' + name)})")


def _syntax_line(err: Exception) -> int:
    found = re.search(r"line (\d+)", str(err))
    return int(found.group(1)) if found else 0


def _problems_in_text(text: str) -> tuple[list[tuple[int, str]], dict | None]:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        return [(_syntax_line(err), f"TOML syntax error: {err}")], None
    except RecursionError:
        return [(1, "TOML syntax error: arrays or tables nested too deeply")], None
    except ValueError as err:  # an integer over 4300 digits
        return [(1, f"not a number smartrun accepts: {err}")], None
    out = _Problems(line_index(text))
    if data.get("version") != 1:
        out.add("version", f"version must be 1 (got {data.get('version')!r})" if "version" in data
                else "missing version = 1")
    for key in data:
        if key not in TOP_KEYS:
            out.add(key, f"unknown top-level key {key!r} (known: {', '.join(TOP_KEYS)})")
    if "description" in data and not isinstance(data["description"], str):
        out.add("description", f"description must be a string, got {data['description']!r}")
    _check_knobs(data.get("knobs", {}), "knobs", out)
    _check_overrides(data, "models", out)
    _check_overrides(data, "gpus", out)
    _check_goals(data, out)
    return sorted(out.found, key=lambda p: p[0]), data


def read_text(path: Path) -> str:
    """A bounds file's text; one BoundsError line naming the file when it is missing, unreadable, not a
    regular file (a FIFO would hang the read) or too large."""
    if not path.exists() and not path.is_symlink():
        raise BoundsError(f"{path}: bounds file not found")
    try:
        return fileio.read_text(path, 4 * 1024 * 1024, BoundsError)
    except BoundsError as err:
        raise BoundsError(f"{err.message} (bounds file)") from None


def problems(path: str | Path) -> list[tuple[int, str]]:
    """Every problem in the file as (line, message), in line order; [] when the file is good."""
    return _problems_in_text(read_text(Path(path)))[0]


# --- loading -------------------------------------------------------------------------------------


def _limit(name: str, table: dict, path: str, index: dict[str, int], file: str) -> Limit:
    lines = {key: _line(index, f"{path}.{key}") for key in table}
    lines[""] = _line(index, path)
    k = CATALOGUE[name]
    canon = [_canonical(k, v) for v in table.get("choices", [])]
    return Limit(
        knob=name, min=table.get("min"), max=table.get("max"),
        choices=tuple(canon) if "choices" in table else None,
        fixed=_canonical(k, table.get("fixed")), has_fixed="fixed" in table, oom_floor=table.get("oom_floor"),
        last_resort=tuple(_canonical(k, v) for v in table.get("last_resort", [])), why=table.get("why"),
        file=file, lines=lines,
    )


def _limits(knobs: dict, path: str, index: dict[str, int], file: str) -> dict[str, Limit]:
    return {name: _limit(name, table, f"{path}.{name}", index, file) for name, table in knobs.items()}


def load_text(text: str, file: str) -> BoundsFile:
    """Parse and check; BoundsError "<file>:<line>: <problem>" for the first problem."""
    found, data = _problems_in_text(text)
    if found:
        line, message = found[0]
        more = f" (and {len(found) - 1} more problem(s))" if len(found) > 1 else ""
        raise BoundsError(f"{file}:{line}: {message}{more}")
    assert data is not None
    index = line_index(text)

    def overrides(kind: str) -> tuple[Override, ...]:
        return tuple(
            Override(match=entry["match"], line=_line(index, f"{kind}[{i}]"),
                     knobs=_limits(entry.get("knobs", {}), f"{kind}[{i}].knobs", index, file))
            for i, entry in enumerate(data.get(kind, []))
        )

    return BoundsFile(
        path=file, version=data["version"], description=data.get("description"),
        knobs=_limits(data.get("knobs", {}), "knobs", index, file),
        models=overrides("models"), gpus=overrides("gpus"),
        goals={goal: _limits(t.get("knobs", {}), f"goals.{goal}.knobs", index, file)
               for goal, t in data.get("goals", {}).items()},
    )


def load(path: str | Path) -> BoundsFile:
    """Load a bounds file the user named; sources read `bounds:<path as given>:<line>`."""
    return load_text(read_text(Path(path)), str(path))


def builtin() -> BoundsFile:
    """The default shipped in the package: safety margins only (the guide's preferences are in policy.toml)."""
    return load_text(read_text(BUILTIN_PATH), BUILTIN_NAME)


def find(start_dir: str | Path | None = None) -> Path | None:
    """`smartrun.toml` in start_dir (default: cwd) or the nearest parent directory, else None."""
    here = Path(start_dir or Path.cwd()).resolve()
    for directory in (here, *here.parents):
        candidate = directory / FILE_NAME
        if candidate.is_file():
            return candidate
    return None


def resolve(explicit: str | Path | None = None, start_dir: str | Path | None = None) -> BoundsFile:
    """`--bounds FILE`, else smartrun.toml from cwd upward, else the built-in default."""
    if explicit is not None:
        if not Path(explicit).exists():
            raise BoundsError(f"{explicit}: bounds file not found")
        return load(explicit)
    found = find(start_dir)
    return load(found) if found is not None else builtin()


def layered(bounds_file: BoundsFile, model_names: tuple[str | None, ...], gpu_names: tuple[str, ...],
            ) -> dict[str, Limit]:
    """Global limits with the matching per-model, then per-GPU overrides applied (keys replaced)."""
    result = dict(bounds_file.knobs)
    for override in bounds_file.models:
        if override.matches(*model_names):
            result = _replace(result, override.knobs)
    for override in bounds_file.gpus:
        if override.matches(*gpu_names):
            result = _replace(result, override.knobs)
    return result


def _replace(base: dict[str, Limit], new: dict[str, Limit]) -> dict[str, Limit]:
    out = dict(base)
    for name, limit in new.items():
        old = out.get(name)
        if old is None:
            out[name] = limit
            continue
        update: dict[str, Any] = {}
        lines = dict(old.lines)
        for key in limit.lines:
            if key and key != "why":
                update[key if key != "fixed" else "fixed"] = getattr(limit, key)
                lines[key] = limit.lines[key]
        if limit.has_fixed:
            update["has_fixed"] = True
        if "choices" in update or "fixed" in update:  # a set replaces a range and vice versa
            update.setdefault("min", None)
            update.setdefault("max", None)
        if "min" in update or "max" in update:
            update.setdefault("choices", None)
            if not limit.has_fixed:
                update["has_fixed"] = False
        lines[""] = limit.lines.get("", 0)
        out[name] = old.model_copy(update={**update, "lines": lines, "why": limit.why or old.why})
    return out
