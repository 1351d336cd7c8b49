"""The package import graph flows one way: cli -> (pipeline, analysis, results) -> engine -> (models, data) -> ops,
everything may use the leaves (config, errors, registry, config_dir). Every import counts, function-local ones
included: a lazy import that goes back up is still a cycle waiting to happen."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "dyconv_repro"
LEVEL = {"cli": 5, "pipeline": 4, "analysis": 4, "results": 4, "engine": 3, "models": 2, "data": 2, "ops": 1,
         "config": 0, "errors": 0, "registry": 0, "config_dir": 0}


def _imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            out.extend((node.lineno, a.name) for a in node.names)
    return out


def package_edges() -> dict[tuple[str, str], list[str]]:
    """{(from package, to package): ["file:line module", ...]} over every dyconv_repro import."""
    edges = defaultdict(list)
    for f in sorted(PKG.rglob("*.py")):
        rel = f.relative_to(PKG)
        src = rel.parts[0].removesuffix(".py")
        if src not in LEVEL:
            continue
        for line, module in _imports(f):
            parts = module.split(".")
            if parts[0] != "dyconv_repro" or len(parts) < 2 or parts[1] == src:
                continue
            edges[(src, parts[1])].append(f"{rel}:{line} {module}")
    return edges


def test_every_package_has_a_level():
    packages = {p.name.removesuffix(".py") for p in PKG.iterdir()
                if (p.is_dir() and (p / "__init__.py").is_file()) or (p.suffix == ".py" and p.name != "__init__.py")}
    assert packages - set(LEVEL) == set(), "give the new package a level in LEVEL"


def test_no_import_goes_back_up():
    edges = package_edges()
    back = [w for (a, b), where in edges.items() if LEVEL.get(b, 0) > LEVEL[a] for w in where]
    cycles = [w for (a, b), where in edges.items()
              if a != b and LEVEL.get(b, 0) == LEVEL[a] and (b, a) in edges for w in where]
    assert not back, "imports against the flow cli -> pipeline/analysis/results -> engine -> models -> ops:\n" + \
        "\n".join(back)
    assert not cycles, "sibling packages importing each other:\n" + "\n".join(cycles)


def test_the_checker_sees_function_local_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from dyconv_repro.cli.common import user_errors_exit\n")
    assert _imports(f) == [(2, "dyconv_repro.cli.common")]
