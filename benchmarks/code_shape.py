"""The house's shape, measured (issue #9's figures): the longest function and the biggest module under
autocomp/, private names imported across modules, and which modules name a technique's config fields.

    python benchmarks/code_shape.py [--json]
"""

from __future__ import annotations

import argparse
import ast
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "autocomp"
LOWRANK = re.compile(r"\b(LowRankConfig|\.rank\b|get\(\"lowrank\"\))")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    functions, modules, private, lowrank = [], [], [], []
    for path in sorted(ROOT.rglob("*.py")):
        rel = str(path.relative_to(ROOT.parent))
        text = path.read_text()
        modules.append((len(text.splitlines()), rel))
        tree = ast.parse(text)
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                functions.append((node.end_lineno - node.lineno + 1, f"{rel}:{node.name}"))
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("autocomp"):
                for alias in node.names:
                    if alias.name.startswith("_"):
                        private.append(f"{rel}: from {node.module} import {alias.name}")
        if LOWRANK.search(text) and not path.name == "lowrank.py":
            lowrank.append(rel)
    functions.sort(reverse=True)
    modules.sort(reverse=True)
    out = {"longest_function": {"lines": functions[0][0], "name": functions[0][1]},
           "functions_over_80_lines": [f"{n} {name}" for n, name in functions if n > 80],
           "biggest_module": {"lines": modules[0][0], "name": modules[0][1]},
           "modules_over_600_lines": [f"{n} {name}" for n, name in modules if n > 600],
           "private_cross_module_imports": private,
           "modules_reading_the_lowrank_config": ["autocomp/compressors/lowrank.py", *lowrank]}
    if args.json:
        print(json.dumps(out))
        return
    for k, v in out.items():
        print(f"{k}: {v}")


if __name__ == "__main__":
    main()
