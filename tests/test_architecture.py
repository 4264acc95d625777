"""The layout's rules, checked on the source: imports form no cycles (lazy ones included), nothing
below the CLI prints or imports the CLI, library messages name settings rather than CLI flags, and
`import restorecli` pulls in no CLI module."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "restorecli"


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Every restorecli module `name` imports, at module level or inside functions."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and _is_type_checking(block.test)
                   for n in ast.walk(block)}
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue  # `if TYPE_CHECKING:` imports are annotations, not dependencies
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            candidates = [target] + [f"{target}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        for candidate in candidates:
            if candidate in MODULES and candidate != name:
                found.add(candidate)
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _graph() -> dict[str, set[str]]:
    graph = {name: _imports(name, path) for name, path in MODULES.items()}
    for name, targets in graph.items():
        # importing a.b.c first runs a.b's __init__ (and a's): a dependency on those packages too, unless
        # the importer lives inside them (Python has started that __init__ already)
        targets |= {parent for t in list(targets) for parent in _packages_above(t) if not name.startswith(parent + ".")}
    # a package's __init__ re-exporting its own modules is not a dependency of those modules on it
    for name in graph:
        graph[name] = {t for t in graph[name] if not (name.startswith(t + ".") and MODULES[t].name == "__init__.py")}
    return graph


def _packages_above(module: str) -> list[str]:
    """The packages whose __init__ runs before `module` (restorecli itself, which every module sits in, left out)."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(2, len(parts)) if ".".join(parts[:i]) in MODULES]


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_importing_a_module_counts_as_importing_its_package():
    """stage1.run importing pipeline.memory ran pipeline/__init__ (which imports pipeline.diffbir, which
    imports stage1.run): a real cycle that an edge to the module alone did not show."""
    assert _packages_above("restorecli.pipeline.planning") == ["restorecli.pipeline"]
    assert _packages_above("restorecli.memory") == []
    assert "restorecli.pipeline" not in _graph()["restorecli.pipeline.diffbir"]


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_imports_form_no_cycles():
    assert _cycles(_graph()) == []


def test_nothing_below_the_cli_imports_the_cli():
    offenders = {name: sorted(t for t in deps if t.startswith("restorecli.cli"))
                 for name, deps in _graph().items() if not name.startswith("restorecli.cli")}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_no_library_module_prints():
    offenders = []
    for name, path in MODULES.items():
        if name.startswith("restorecli.cli"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                func = node.func
                if isinstance(func, ast.Name) and func.id == "print":
                    offenders.append(f"{name}:{node.lineno} print")
                if (isinstance(func, ast.Attribute) and func.attr == "write" and isinstance(func.value, ast.Attribute)
                        and func.value.attr in ("stdout", "stderr")):
                    offenders.append(f"{name}:{node.lineno} sys.{func.value.attr}.write")
    assert offenders == []


def _message_strings(path: Path):
    """String constants of a module that are not docstrings."""
    tree = ast.parse(path.read_text())
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node.lineno, node.value


def test_library_messages_name_settings_not_flags():
    """Below the CLI, messages say `steps`, not `--steps`: the CLI rewrites setting names into its flags,
    other callers see the names they pass. Exempt: settings/ (it declares the flags), run/ and the
    image writer, whose messages are about the output-file options (--overwrite, --format, --suffix),
    which are not settings, and webapp/, a front end like the CLI, whose page writes the `restore`
    command line of a result and says which `restore ui` flag starts it with another captioner."""
    flag = re.compile(r"(^|[\s`(])--[a-z][a-z-]+")
    offenders = []
    for name, path in MODULES.items():
        if name.startswith(("restorecli.cli", "restorecli.run", "restorecli.settings", "restorecli.images",
                            "restorecli.weights", "restorecli.webapp")):
            continue
        for line, text in _message_strings(path):
            if flag.search(text):
                offenders.append(f"{name}:{line} {text[:60]!r}")
    assert offenders == []


def test_import_restorecli_pulls_in_no_cli_module():
    code = ("import sys, restorecli; from restorecli import settings; "
            "print(sorted(m for m in sys.modules if m.startswith('restorecli.cli') or m in ('typer', 'rich')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_package_cites_no_file_outside_the_repository():
    """Docstrings cite the official source files, never the project's planning notes (which are not in
    the repository or the wheel)."""
    pattern = re.compile(r"PIPELINE\.md|DESIGN\.md|STYLE\.md|\.\./shared|reference README")
    offenders = [f"{path.relative_to(PACKAGE)}:{i + 1}" for path in sorted(PACKAGE.rglob("*"))
                 if path.suffix in (".py", ".toml") for i, line in enumerate(path.read_text().splitlines())
                 if pattern.search(line)]
    assert offenders == []


def test_benchmarks_import_only_what_the_package_has():
    """The benchmarks are not run by the tests, so a moved or renamed name would break them silently
    (it did: `restorecli.cli.options.parse_size`, `restorecli.run.files`). Every `from restorecli... import
    name` in benchmarks/ must resolve, lazy imports inside functions included."""
    import importlib

    offenders = []
    for path in sorted((PACKAGE.parents[1] / "benchmarks").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("restorecli")):
                continue
            try:
                module = importlib.import_module(node.module)
            except ImportError:
                offenders.append(f"{path.name}:{node.lineno} {node.module}")
                continue
            for alias in node.names:
                if not hasattr(module, alias.name):
                    try:
                        importlib.import_module(f"{node.module}.{alias.name}")
                    except ImportError:
                        offenders.append(f"{path.name}:{node.lineno} {node.module}.{alias.name}")
    assert offenders == []
