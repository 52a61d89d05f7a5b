#!/usr/bin/env python3
"""Print the longest functions of the project (lines and parameters), longest first.

    python scripts/longest_functions.py [--top 10] [paths ...]

Default paths: pipeline jobs airflow_dags. Lines count from the ``def`` line to
the function's last line (docstring and comments included); nested functions
are listed on their own and inside their parent.
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def functions(path: Path):
    """(qualified name, lines, parameters) of every function in one file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))

    def walk(node, prefix: str):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                args = child.args
                params = [a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs)
                          if a.arg not in ("self", "cls")]
                params += [a.arg for a in (args.vararg, args.kwarg) if a is not None]
                yield name, child.end_lineno - child.lineno + 1, len(params)
                yield from walk(child, name + ".")
            elif isinstance(child, ast.ClassDef):
                yield from walk(child, f"{prefix}{child.name}.")

    yield from walk(tree, "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", default=["pipeline", "jobs", "airflow_dags"])
    parser.add_argument("--top", type=int, default=10)
    args = parser.parse_args()
    rows = []
    for base in args.paths:
        base_path = ROOT / base
        files = [base_path] if base_path.is_file() else sorted(base_path.rglob("*.py"))
        for file in files:
            rel = file.relative_to(ROOT)
            rows += [(lines, params, f"{rel}:{name}") for name, lines, params in functions(file)]
    rows.sort(key=lambda r: (-r[0], r[2]))
    print(f"{'lines':>5} {'params':>6}  function")
    for lines, params, name in rows[: args.top]:
        print(f"{lines:>5} {params:>6}  {name}")


if __name__ == "__main__":
    main()
