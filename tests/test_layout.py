"""The layout the README and docs/architecture.md describe, checked: no import cycles, core/ imports
neither backends/, loaders/, cli/ nor torch/numba, and files and functions stay small."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "backends", "loaders", "cli", "tools")
MAX_FILE_LINES = 400
MAX_FUNC_LINES = 80


def _modules() -> dict[str, Path]:
    mods = {p.stem: p for p in ROOT.glob("*.py")}
    for pkg in PACKAGES:
        for p in (ROOT / pkg).rglob("*.py"):
            rel = p.relative_to(ROOT).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            mods[".".join(parts)] = p
    return mods


def _imports(name: str, path: Path, mods: dict) -> set[str]:
    """Project modules imported by `name`, anywhere in the file (a lazy import inside a function
    is still a dependency: no cycle through one either)."""
    tree = ast.parse(path.read_text())
    pkg = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.ImportFrom):
            if n.level:
                base = pkg[: len(pkg) - n.level + 1]
                target = ".".join(base + ([n.module] if n.module else []))
            elif n.module and n.module.startswith("lstream."):
                target = n.module[len("lstream."):]
            else:
                continue
            cands = [target] + [f"{target}.{a.name}" for a in n.names]
            out |= {c for c in cands if c in mods}
        elif isinstance(n, ast.Import):
            out |= {a.name[len("lstream."):] for a in n.names if a.name[len("lstream."):] in mods}
    # a package is always imported before its submodules: importing a parent is no cycle
    return {m for m in out if m != name and not name.startswith(m + ".")}


def test_no_import_cycles():
    mods = _modules()
    graph = {m: _imports(m, p, mods) for m, p in mods.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_core_is_the_bottom_floor():
    """core/ imports nothing above it and neither torch nor numba, anywhere in a file."""
    for p in (ROOT / "core").rglob("*.py"):
        pkg = list(p.relative_to(ROOT).parent.parts)
        for n in ast.walk(ast.parse(p.read_text())):
            names = []
            if isinstance(n, ast.ImportFrom):
                if n.level:
                    names.append(".".join(pkg[: len(pkg) - n.level + 1] + ([n.module] if n.module else [])))
                else:
                    names.append((n.module or "").removeprefix("lstream."))
            elif isinstance(n, ast.Import):
                names += [a.name.removeprefix("lstream.") for a in n.names]
            for name in names:
                top = name.split(".")[0]
                assert top not in ("torch", "numba", "triton", "backends", "loaders", "cli", "api", ""), \
                    f"{p.relative_to(ROOT)} imports {name}"


def _reason_at_top(text: str) -> bool:
    head = "\n".join(text.splitlines()[:15]).lower()
    return "over 400 lines" in head or "longer than 400 lines" in head


def test_files_and_functions_are_small():
    long_files, long_funcs = [], []
    for p in _modules().values():
        text = p.read_text()
        n = len(text.splitlines())
        if n > MAX_FILE_LINES and not _reason_at_top(text):
            long_files.append(f"{p.relative_to(ROOT)} ({n} lines)")
        for f in ast.walk(ast.parse(text)):
            if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)):
                size = f.end_lineno - f.lineno + 1
                # generated-kernel builders (LLVM IR / numba generators) may be longer: they say so
                doc = (ast.get_docstring(f) or "").lower()
                if size > MAX_FUNC_LINES and "generated" not in doc:
                    long_funcs.append(f"{p.relative_to(ROOT)}:{f.lineno} {f.name} ({size} lines)")
    assert not long_files, long_files
    assert not long_funcs, long_funcs
