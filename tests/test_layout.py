"""The architecture, checked from the source (docs/adding_a_method.md): a method is one row of the table, the
library rooms of `full/` take typed configs and import no command-line code, imports go one way, files stay short.

Each detector is also run on a small broken snippet, so a check that could not fail would show here."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from minipref.methods import METHODS

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("minipref", "full", "toy")
LIBRARY_ROOMS = ("full/data", "full/run", "full/models", "full/online", "full/eval")
TABLE_FILES = {"minipref/methods.py", "toy/methods.py", "full/lab/methods.py"}  # where method names are data
MAX_LINES = 350


def python_files(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts)


def relative(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def method_name_comparisons(source: str, names) -> list[int]:
    """Lines that compare something with a method name: `x == "dpo"`, `x != "kto"`, `x in ("sft", ...)`."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Compare):
            continue
        for op, right in zip(node.ops, node.comparators):
            sides = [node.left, right]
            if isinstance(op, (ast.In, ast.NotIn)) and isinstance(right, (ast.Tuple, ast.List, ast.Set)):
                sides = [node.left, *right.elts]
            elif not isinstance(op, (ast.Eq, ast.NotEq)):
                continue
            if any(isinstance(s, ast.Constant) and s.value in names for s in sides):
                lines.append(node.lineno)
    return lines


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def top_level_imports(path: Path) -> set[str]:
    """Modules imported when ``path`` is imported: statements outside functions (an `if TYPE_CHECKING:` block
    counts: a circle of type hints is still a circle to a reader)."""
    tree, found = ast.parse(path.read_text()), set()
    package = module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else module_name(path)

    def visit(node):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle found by a depth-first search (one per back edge)."""
    cycles, state, stack = [], {}, []

    def walk(node):
        state[node], stack[len(stack):] = "open", [node]
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                walk(nxt)
        state[node] = "done"
        stack.pop()

    for node in sorted(graph):
        if node not in state:
            walk(node)
    return cycles


def project_import_graph() -> dict[str, set[str]]:
    files = python_files(*PACKAGES)
    modules = {module_name(p) for p in files}
    return {module_name(p): {m for m in top_level_imports(p) if m in modules and m != module_name(p)} for p in files}


# ---------------------------------------------------------------------------------------------------------------


def test_no_file_outside_the_tables_compares_a_method_name():
    names = set(METHODS)
    found = {relative(p): lines for p in python_files("full", "toy")
             if relative(p) not in TABLE_FILES and (lines := method_name_comparisons(p.read_text(), names))}
    assert not found, f"method names compared outside the table (file: lines): {found}"
    # the detector itself, on what it must catch and what it must not
    assert method_name_comparisons('if args.method == "dpo":\n    pass', names) == [1]
    assert method_name_comparisons('ok = method in ("sft", "csft")', names) == [1]
    assert method_name_comparisons('if kind == "pairs":\n    pass', names) == []


def test_the_library_rooms_import_no_command_line_code_and_take_no_args():
    problems = []
    for path in python_files(*LIBRARY_ROOMS):
        imports = top_level_imports(path) | {
            alias.name for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Import)
            for alias in node.names} | {
            node.module or "" for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.ImportFrom)}
        bad = sorted(m for m in imports if m == "argparse" or m == "full.cli" or m.startswith("full.cli."))
        problems += [f"{relative(path)} imports {m}" for m in bad]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if any(a.arg == "args" for a in node.args.args + node.args.kwonlyargs):
                    problems.append(f"{relative(path)}:{node.lineno} {node.name}(args, ...)")
    assert not problems, "; ".join(problems)


def test_there_is_no_import_circle():
    cycles = import_cycles(project_import_graph())
    assert not cycles, " | ".join(" -> ".join(c) for c in cycles)
    # the detector finds a circle of three
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


@pytest.mark.parametrize("folder", ["full", "toy", "minipref"])
def test_no_file_is_over_350_lines(folder):
    long = {relative(p): n for p in python_files(folder) if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines: {long}"
