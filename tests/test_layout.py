"""The package's shape: no import cycle (in-function imports count too) and no module over MAX_LINES."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "smartrun"
MAX_LINES = 600
EXEMPT = ("memory",)  # the estimator package's parts may be longer (one formula family each)


def _modules(root: Path = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (a package is its __init__)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The module an imported name lives in (`smartrun.memory.estimate` -> `smartrun.memory`)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the package modules it imports anywhere in its body (module level, functions, classes)."""
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package, up level - 1
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*parts, *([node.module] if node.module else [])])
                # `from smartrun import cluster` imports the module smartrun.cluster
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                found = _resolve(target, modules)
                if found is not None and found != name:
                    graph[name].add(found)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_in_smartrun_counting_in_function_imports():
    modules = _modules()
    assert len(modules) > 50 and "smartrun.rules" in modules
    graph = import_graph(modules)
    assert "smartrun.argv" in graph["smartrun.secrets"]  # a module-level import is an edge
    assert "smartrun.ray_cluster" in graph["smartrun.cli.hardware_cmd"]  # and so is one inside a function
    assert cycles(graph) == []


def test_the_cycle_check_finds_a_cycle_through_an_in_function_import(tmp_path):
    pkg = tmp_path / "demo"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from demo import b\n")
    (pkg / "b.py").write_text("def f():\n    from demo.c import g\n    return g\n")
    (pkg / "c.py").write_text("import os\n\ndef g():\n    from demo import a\n    return a\n")
    (pkg / "d.py").write_text("from . import a\n")
    graph = import_graph(_modules(pkg))
    assert graph["demo.d"] == {"demo.a"}
    assert cycles(graph) == [["demo.a", "demo.b", "demo.c"]]


def test_no_module_is_over_600_lines_outside_the_estimator_package():
    sizes = {path.relative_to(PACKAGE.parent).as_posix(): len(path.read_text().splitlines())
             for name, path in _modules().items() if name.split(".")[1:2] != list(EXEMPT)}
    assert "smartrun/rules.py" in sizes and not any(name.startswith("smartrun/memory/") for name in sizes)
    over = {name: lines for name, lines in sizes.items() if lines > MAX_LINES}
    assert over == {}, f"split these along a seam: {over}"


def _readme_module_map() -> str:
    """The right-hand column of the README's module map (the code block that starts with `detect hardware`)."""
    readme = (PACKAGE.parent / "README.md").read_text()
    block = readme[readme.index("```\ndetect hardware") + 4:]
    block = block[: block.index("```")]
    return " ".join(line[54:] for line in block.splitlines())


def test_the_readme_module_map_names_only_modules_that_exist():
    text = _readme_module_map()
    named: set[Path] = set()
    for package, members in re.findall(r"(?:smartrun/)?([\w/]+/) \(([^)]*)\)", text):
        named |= {PACKAGE / package / f"{member.strip()}.py" for member in members.split(",")}
    text = re.sub(r"\([^)]*\)", "", text)
    named |= {PACKAGE / path for path in re.findall(r"(?:smartrun/)?([\w/]+\.py|\w+/)", text)}
    assert {PACKAGE / "memory" / "budget.py", PACKAGE / "rules.py", PACKAGE / "pipeline/"} <= named
    missing = sorted(str(path.relative_to(PACKAGE.parent)) for path in named if not path.exists())
    assert missing == [], f"the README's module map names what is not there: {missing}"


def _top_level_names(tree: ast.Module) -> set[str]:
    """Names a module defines itself (def, class, assignment, also under if/try), not the ones it imports."""
    names: set[str] = set()
    for node in tree.body:
        for sub in ast.walk(node) if isinstance(node, (ast.If, ast.Try)) else (node,):
            if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(sub.name)
            elif isinstance(sub, ast.Assign):
                names |= {n.id for target in sub.targets for n in ast.walk(target) if isinstance(n, ast.Name)}
            elif isinstance(sub, ast.AnnAssign) and isinstance(sub.target, ast.Name):
                names.add(sub.target.id)
    return names


def _public_api(tree: ast.Module) -> set[str]:
    """A package's `__all__`: what it re-exports on purpose."""
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            return set(ast.literal_eval(node.value))
    return set()


def reexported_imports(modules: dict[str, Path], files: list[Path]) -> list[str]:
    """`from smartrun.X import Y` in `files` where X neither defines Y, nor is a package listing it in
    `__all__`, nor has a submodule Y: a name reached through a module that only imported it."""
    trees = {name: ast.parse(path.read_text()) for name, path in modules.items()}
    found = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.ImportFrom) or node.level or node.module not in trees:
                continue
            own = _top_level_names(trees[node.module]) | _public_api(trees[node.module])
            for alias in node.names:
                if alias.name not in own and f"{node.module}.{alias.name}" not in modules:
                    found.append(f"{path.name}:{node.lineno}: {alias.name} from {node.module}")
    return found


def test_every_name_is_imported_from_the_module_that_defines_it():
    root = PACKAGE.parent
    files = [p for folder in ("smartrun", "tests", "benchmarks") for p in sorted((root / folder).rglob("*.py"))]
    assert reexported_imports(_modules(), files) == []


def test_the_reexport_check_finds_a_name_reached_through_another_module(tmp_path):
    pkg = tmp_path / "smartrun"
    pkg.mkdir()
    (pkg / "__init__.py").write_text('from smartrun.a import A\n__all__ = ["A"]\n')
    (pkg / "a.py").write_text("A = 1\n")
    (pkg / "b.py").write_text("from smartrun.a import A\n\ndef f():\n    return A\n")
    user = tmp_path / "user.py"
    user.write_text("from smartrun import A, a\nfrom smartrun.a import A\nfrom smartrun.b import A, f\n")
    assert reexported_imports(_modules(pkg), [user]) == ["user.py:3: A from smartrun.b"]


LOADERS = {"spec_from_file_location", "run_path", "SourceFileLoader", "import_module", "__import__"}


def benchmark_imports(files: list[Path]) -> list[str]:
    """Places in `files` that import code from benchmarks/ (an import statement, or importlib/runpy
    pointed at it): what tests need belongs in the package, and a benchmark only prints."""
    found = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in LOADERS:
                names = ["benchmarks"] if "benchmarks" in ast.unparse(node) else []
            else:
                continue
            if any(name.split(".")[0] == "benchmarks" for name in names):
                found.append(f"{path.name}:{node.lineno}")
    return found


def test_no_test_imports_a_benchmark():
    files = sorted((PACKAGE.parent / "tests").rglob("*.py"))
    assert len(files) > 20 and benchmark_imports(files) == []


def test_the_benchmark_import_check_finds_each_way_in(tmp_path):
    user = tmp_path / "test_user.py"
    user.write_text(
        "import importlib.util, runpy, subprocess\n"
        "import benchmarks.estimator_accuracy\n"
        "from benchmarks import cli_cold_start\n"
        'spec = importlib.util.spec_from_file_location("b", ROOT / "benchmarks" / "b.py")\n'
        'runpy.run_path("benchmarks/b.py")\n'
        'subprocess.run(["python", "benchmarks/b.py"])\n'  # running it as a user does is fine
        'importlib.util.spec_from_file_location("m", "fixtures/models/make_fixtures.py")\n'
    )
    assert benchmark_imports([user]) == ["test_user.py:2", "test_user.py:3", "test_user.py:4", "test_user.py:5"]


# Imported inside functions on purpose, anywhere in smartrun: heavy or optional packages most commands never
# need, kept off every command's start-up (cost from `python -X importtime -c 'import X'` on the 2-core box).
LAZY = {
    "openai": "about 300 ms; only when an LLM is asked",
    "httpx": "about 50 ms; /health polling, the probe, the advisor's transport",
    "jinja2": "about 28 ms; the prompt templates, only when an LLM is asked",
    "asyncio": "about 27 ms; the probe's concurrent requests",
    "tenacity": "about 17 ms; the advisor's retries",
    "ray": "the optional `ray` extra: multi-node only",
    "pynvml": "NVML, only for live detection (tests swap it through sys.modules)",
}
# Besides those, a module that `localaistack --help` loads (the CLI, its command modules, what they
# register options from) may import inside a function what `--help` does not load: a command's stage
# modules (pipeline, session, calibration, cluster, ...), loaded only when that command runs. Anywhere
# else an in-function import only hides a dependency: it goes to the top of the module.
STARTUP_PROBE = (
    "import contextlib, io, sys, smartrun.cli as cli\n"
    "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
    "    cli.main(['--help'])\n"
    "print('\\n'.join(sorted(sys.modules)))\n"
)


def startup_modules() -> set[str]:
    """Every module loaded by `localaistack --help`, in a fresh interpreter."""
    done = subprocess.run([sys.executable, "-c", STARTUP_PROBE], capture_output=True, text=True, timeout=120,
                          cwd=PACKAGE.parent, check=True)
    return set(done.stdout.split())


def in_function_imports(modules: dict[str, Path]) -> list[tuple[str, int, str]]:
    """(module, line, imported module) for each import inside a function."""
    found = set()
    for name, path in modules.items():
        for func in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(func):
                if isinstance(node, ast.Import):
                    found |= {(name, node.lineno, alias.name) for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    found |= {(name, node.lineno, f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}"
                               in modules else node.module) for alias in node.names}
    return sorted(found)


def needless_lazy_imports(modules: dict[str, Path], startup: set[str]) -> list[str]:
    """In-function imports that are neither of a LAZY package nor keep a module off the CLI's start-up."""
    return [
        f"{importer}:{line}: {target}"
        for importer, line, target in in_function_imports(modules)
        if target.split(".")[0] not in LAZY and not (importer in startup and target not in startup)
    ]


def test_in_function_imports_are_lazy_on_purpose():
    modules, startup = _modules(), startup_modules()
    assert {"smartrun.cli", "smartrun.cli.run_cmd"} <= startup and "smartrun.pipeline" not in startup
    assert needless_lazy_imports(modules, startup) == []
    assert sorted(set(LAZY) & startup) == []  # the lazy packages stay off the start-up
    assert "smartrun.pipeline" in {target for _, _, target in in_function_imports(modules)}  # model run's stages


def test_the_lazy_import_check_finds_an_import_that_hides_a_dependency(tmp_path):
    pkg = tmp_path / "demo"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "cli.py").write_text("def run():\n    from demo import stage\n    import httpx\n    from demo import util\n")
    (pkg / "stage.py").write_text("def f():\n    from demo.util import g\n    import openai\n    return g\n")
    (pkg / "util.py").write_text("def g():\n    import os\n    return os\n")
    startup = {"demo", "demo.cli", "demo.util", "os"}  # os: loaded by every interpreter
    assert needless_lazy_imports(_modules(pkg), startup) == [
        "demo.cli:4: demo.util", "demo.stage:2: demo.util", "demo.util:2: os"]
