"""The shape of the codebase, measured (an AST walk): is the training loop small, and do library modules stay clear
of the command drivers?

    python tools/shape.py            # prints the figures; exit 1 when a limit is broken

Limits (issue "A codebase and a manual a newcomer can hold in their head"):
  * the training loop's modules (train.py, callbacks.py, recovery.py, health.py): the largest class ≤ 150 lines, the
    longest function or method ≤ 40 lines;
  * no module of jemtorch/ imports a command driver (evaluate, robustness, cli) except cli.py and __main__.py.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "jemtorch"
LOOP = ("train.py", "callbacks.py", "recovery.py", "health.py")
DRIVERS = {"evaluate", "robustness", "cli"}
ALLOWED = {"cli.py", "__main__.py", "evaluate.py", "robustness.py"}  # drivers may use each other (eval shows attacks)
MAX_CLASS, MAX_FUNCTION = 150, 40


def spans(tree: ast.AST, kinds) -> list[tuple[str, int]]:
    """(name, lines) of every node of ``kinds``, decorators included."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, kinds):
            start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
            out.append((node.name, node.end_lineno - start + 1))
    return out


def driver_imports(path: Path) -> list[str]:
    """The command-driver modules ``path`` imports (relative imports inside jemtorch, or absolute ones)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            mod = (node.module or "").split(".")
            names = [a.name for a in node.names]
            top = mod[1] if mod[0] == "jemtorch" and len(mod) > 1 else mod[0] if node.level else None
            hits = {top} & DRIVERS if top else {n for n in names if n in DRIVERS and (node.level or mod == ["jemtorch"])}
            found += sorted(hits)
        elif isinstance(node, ast.Import):
            found += [a.name.split(".")[1] for a in node.names if a.name.startswith("jemtorch.")
                      and a.name.split(".")[1] in DRIVERS]
    return found


def measure() -> dict:
    classes, functions = [], []
    for name in LOOP:
        tree = ast.parse((ROOT / name).read_text())
        classes += [(f"{name}:{n}", k) for n, k in spans(tree, ast.ClassDef)]
        functions += [(f"{name}:{n}", k) for n, k in spans(tree, (ast.FunctionDef, ast.AsyncFunctionDef))]
    imports = {p.name: driver_imports(p) for p in sorted(ROOT.rglob("*.py")) if p.name not in ALLOWED}
    return {"largest_class": max(classes, key=lambda c: c[1]), "longest_function": max(functions, key=lambda f: f[1]),
            "driver_imports": {k: v for k, v in imports.items() if v}}


def main() -> int:
    m = measure()
    (cname, clines), (fname, flines) = m["largest_class"], m["longest_function"]
    print(f"largest class of the training loop: {cname}, {clines} lines (limit {MAX_CLASS})")
    print(f"longest function or method of the training loop: {fname}, {flines} lines (limit {MAX_FUNCTION})")
    print("library modules importing a command driver: " + (", ".join(f"{k} -> {v}" for k, v in
                                                                      m["driver_imports"].items()) or "none"))
    return 0 if clines <= MAX_CLASS and flines <= MAX_FUNCTION and not m["driver_imports"] else 1


if __name__ == "__main__":
    sys.exit(main())
