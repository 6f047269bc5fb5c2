"""The layering rule (ARCHITECTURE.md, "Layers"): base <- stages <- crowd <- the application face.

Every import in every module, including imports inside functions, is checked: a module may import its own layer
and the layers below it, never one above. Broken by, e.g., a stage taking UserError from pipeline.cli or calling
crowd/ to reach Label Studio.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASE = {"pipeline.config", "pipeline.errors", "pipeline.store", "pipeline.schemas", "pipeline.faults",
        "pipeline.services", "pipeline.store_cli"}
STAGES = {"pipeline.vocabulary", "pipeline.sources", "pipeline.ingest", "pipeline.qc", "pipeline.boxes",
          "pipeline.release", "pipeline.evaluate", "pipeline.presence"}
APP = {"pipeline.cli", "pipeline.config_cli", "pipeline.dagtools", "pipeline.demo", "pipeline.demo_corpus", "pipeline.demo_det", "pipeline.airflow_local",
       "pipeline.celery_stack",
       "dags",
       "challenge"}  # challenge/: the evaluation server, a face over the release and evaluate stages
LAYERS = {"base": 0, "stage": 1, "crowd": 2, "app": 3}


def layer_of(module: str) -> str | None:
    """The layer of a project module (None for third-party modules and the package roots)."""
    for names, layer in ((BASE, "base"), (STAGES, "stage"), (APP, "app")):
        if any(module == n or module.startswith(n + ".") for n in names):
            return layer
    if module == "crowd" or module.startswith("crowd."):
        return "crowd"
    if module.startswith("pipeline."):
        raise AssertionError(f"{module} is in no layer: add it to tests/test_layers.py and ARCHITECTURE.md")
    return None


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def is_module(name: str) -> bool:
    base = ROOT.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def imports(source: str) -> list[tuple[int, str]]:
    """(line, module) of every import, top-level or inside a function; `from pkg import mod` names pkg.mod."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
            out += [(node.lineno, f"{node.module}.{a.name}") for a in node.names if is_module(f"{node.module}.{a.name}")]
    return out


def violations(module: str, source: str) -> list[str]:
    mine = layer_of(module)
    if mine is None:
        return []
    found = []
    for line, target in imports(source):
        theirs = layer_of(target) if target.startswith(("pipeline.", "crowd", "challenge")) else None
        if theirs is not None and LAYERS[theirs] > LAYERS[mine]:
            found.append(f"{module}:{line} ({mine}) imports {target} ({theirs})")
    return sorted(set(found))


def project_files() -> list[Path]:
    return sorted(p for d in ("pipeline", "crowd", "dags", "challenge") for p in (ROOT / d).rglob("*.py"))


def test_no_module_imports_a_layer_above_its_own():
    found = [v for p in project_files() for v in violations(module_name(p), p.read_text())]
    assert found == []


def test_the_check_catches_an_upward_import():
    # A stage that takes UserError from the CLI, and one that reaches into crowd/ from inside a function.
    source = "from pipeline.cli import main\n\ndef f():\n    import crowd.boxes\n"
    found = violations("pipeline.qc.stage", source)
    assert any("imports pipeline.cli" in v for v in found) and any("imports crowd.boxes" in v for v in found)
    assert violations("pipeline.demo", source) == []  # the application face may import everything
    assert violations("crowd.push", "from pipeline.dagtools import fail_fast\n") != []
    assert violations("pipeline.release.build", "from challenge.service import open_service\n") != []


def test_every_project_module_has_a_layer():
    for path in project_files():
        layer_of(module_name(path))  # raises for a pipeline module in no layer
