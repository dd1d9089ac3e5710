"""The house rule of who may import whom, checked on the code's own import statements.

    pipeline/ (torch, no Ray) <- cluster/ (no torch at import) <- deployments/ (Ray Serve) <- bench/

An arrow the other way is a design bug: move the shared piece down, or load by import path string as Serve
does (`cluster/config` names the app as "deployments.app:build_app_from_args"; `imagine bench` is found the
same way). Product files stay readable: none over MAX_LINES lines.
"""
import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("pipeline", "cluster", "deployments", "bench")
# package -> top-level modules it must never import (anywhere in a file)
FORBIDDEN = {
    "pipeline": {"ray", "cluster", "deployments", "bench", "boto3", "fastapi", "prometheus_client", "redis", "celery"},
    "cluster": {"deployments", "bench"},
    "deployments": {"bench"},
    "bench": set(),
}
# package -> modules it must not import when its modules are imported (module level), e.g. the CLI starts fast
NOT_AT_IMPORT = {"cluster": {"torch", "ray", "diffusers", "open_clip"}}
MAX_LINES = 420


def python_files(package: str) -> list[Path]:
    return sorted(p for p in (REPO / package).rglob("*.py") if "results" not in p.parts)


def imports(path: Path, module_level_only: bool = False) -> set[str]:
    """Top-level names of what a file imports (relative imports resolved to their package)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    nodes = tree.body if module_level_only else ast.walk(tree)
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: within the file's own package
                out.add(path.relative_to(REPO).parts[0])
            elif node.module:
                out.add(node.module.split(".")[0])
    return out


@pytest.mark.parametrize("package", LAYERS)
def test_no_import_runs_back_up(package):
    bad = {str(p.relative_to(REPO)): sorted(imports(p) & FORBIDDEN[package]) for p in python_files(package)}
    bad = {k: v for k, v in bad.items() if v}
    assert not bad, f"{package}/ may not import {sorted(FORBIDDEN[package])}: {bad}"


@pytest.mark.parametrize("package", sorted(NOT_AT_IMPORT))
def test_heavy_modules_load_lazily(package):
    bad = {str(p.relative_to(REPO)): sorted(imports(p, module_level_only=True) & NOT_AT_IMPORT[package])
           for p in python_files(package)}
    bad = {k: v for k, v in bad.items() if v}
    assert not bad, f"{package}/ imports these at module level (import them where they are used): {bad}"


def test_the_checker_sees_relative_and_nested_imports(tmp_path, monkeypatch):
    f = REPO / "pipeline" / "x.py"  # only parsed, never written: ast reads the text we give it
    monkeypatch.setattr(Path, "read_text", lambda self: "from . import a\ndef f():\n    import ray\n")
    assert imports(f) == {"pipeline", "ray"} and imports(f, module_level_only=True) == {"pipeline"}


def test_no_product_file_is_too_long():
    long = {str(p.relative_to(REPO)): n for package in LAYERS for p in python_files(package)
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these by concern (at most {MAX_LINES} lines): {long}"
