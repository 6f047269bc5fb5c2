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


# -- import circles that were opened ------------------------------------------------------------------------------
def project_imports(module: str) -> set[str]:
    """The project modules `module` imports, directly or through other project modules (function-level imports too)."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        base = ROOT.joinpath(*name.split("."))
        path = base.with_suffix(".py") if base.with_suffix(".py").is_file() else base / "__init__.py"
        for _, target in imports(path.read_text()):
            if target.startswith(("pipeline.", "crowd.", "challenge.")) and is_module(target) and target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def test_task_kinds_do_not_import_push():
    """crowd.push builds on crowd.kinds (KINDS, the column lists, request_id); kinds once imported push back, a
    circle that only worked through function-level imports. kinds must reach push by no path."""
    assert "crowd.kinds" in {t for _, t in imports((ROOT / "crowd" / "push.py").read_text())}
    assert "crowd.push" not in project_imports("crowd.kinds")
    # the check sees an import hidden in a function
    assert "crowd.push" in {t for _, t in imports("def f():\n    from crowd.push import push\n")}


# -- screenshots: the browser tests write them under test-artifacts/, never into the tracked docs/ ---------------
SHOT_CALLS = {"save_screenshot", "get_screenshot_as_file"}
COPY_CALLS = {"copy", "copy2", "copyfile", "move"}


def screenshot_destinations(source: str) -> list[tuple[int, ast.expr]]:
    """(line, destination) of every screenshot a test module saves and every picture (.png) it copies with shutil."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        if node.func.attr in SHOT_CALLS and node.args:
            out.append((node.lineno, node.args[0]))
        elif (node.func.attr in COPY_CALLS and isinstance(node.func.value, ast.Name) and node.func.value.id == "shutil"
              and len(node.args) >= 2 and ".png" in ast.unparse(node)):
            out.append((node.lineno, node.args[1]))
    return out


def artifact_names(source: str) -> set[str]:
    """Names a module binds (anywhere) to something built from the `artifacts_dir` fixture, e.g. `docs =
    artifacts_dir / "docs"` or `shots = artifacts_dir` (a parameter of the same name, as `shots=shots` passes it on,
    counts too)."""
    tree = ast.parse(source)
    names = {"artifacts_dir"}
    while True:
        before = len(names)
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign | ast.AnnAssign | ast.NamedExpr) and node.value is not None:
                uses = {n.id for n in ast.walk(node.value) if isinstance(n, ast.Name)}
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if uses & names:
                    names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
        if len(names) == before:
            return names


def bad_destinations(source: str) -> list[str]:
    """Screenshot or copy destinations not under artifacts_dir (or reaching out of it with `.parent` or ROOT)."""
    names = artifact_names(source)
    bad = []
    for line, dest in screenshot_destinations(source):
        used = {n.id for n in ast.walk(dest) if isinstance(n, ast.Name)}
        escapes = "ROOT" in used or any(isinstance(n, ast.Attribute) and n.attr == "parent" for n in ast.walk(dest))
        if not used & names or escapes:
            bad.append(f"{line}: {ast.unparse(dest)}")
    return bad


def makefile_screenshots() -> tuple[list[str], list[str]]:
    """The `make screenshots` target: (the test modules it runs, its recipe lines)."""
    text = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    modules = next(line for line in text.splitlines() if line.startswith("SCREENSHOT_TESTS")).split(":=", 1)[1].split()
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("screenshots:"))
    recipe = []
    for line in lines[start + 1:]:
        if not line.startswith("\t"):
            break
        recipe.append(line.strip().lstrip("@"))
    return modules, recipe


def test_browser_tests_write_screenshots_to_the_artifacts_folder_and_only_make_screenshots_fills_docs():
    """No browser runs here: every screenshot a test module saves, and every file it copies, goes under the
    `artifacts_dir` fixture (test-artifacts/, git-ignored; the README's pictures under test-artifacts/docs/). Only
    `make screenshots` writes the tracked docs/: it runs the browser tests, then copies test-artifacts/docs/*.png."""
    import conftest

    assert conftest.ARTIFACTS == ROOT / "test-artifacts"
    assert "test-artifacts/" in (ROOT / ".gitignore").read_text().split()
    sources = {p.name: p.read_text() for p in sorted((ROOT / "tests").glob("*.py"))}
    writers = {name for name, src in sources.items() if screenshot_destinations(src)}
    assert {"test_browser_crowd.py", "test_release_report.py", "test_det_browser.py"} <= writers  # the check sees them
    bad = {name: found for name, src in sources.items() if (found := bad_destinations(src))}
    assert bad == {}
    # a test saving into the tracked docs/ (or next to test-artifacts) is caught
    assert bad_destinations('def test_x(browser):\n    browser.save_screenshot(str(ROOT / "docs" / "a.png"))\n')
    assert bad_destinations("def test_x(browser, artifacts_dir):\n"
                            "    browser.save_screenshot(str(artifacts_dir.parent / 'docs' / 'a.png'))\n")
    assert bad_destinations("import shutil\n\ndef test_x(artifacts_dir):\n"
                            "    shutil.copy(artifacts_dir / 'a.png', 'docs/a.png')\n")

    modules, recipe = makefile_screenshots()
    assert recipe[-1] == "cp -v test-artifacts/docs/*.png docs/"
    assert all(line.split()[:4] == ["$(PY)", "-m", "pytest", "-q"] for line in recipe[:-1])
    # every module that renders a README picture (into artifacts_dir / "docs") is one `make screenshots` runs
    renders = {name for name, src in sources.items() if '"docs"' in src and name in writers}
    assert renders <= {Path(m).name for m in modules}, renders - {Path(m).name for m in modules}
    # and every picture the README shows is one of them renders
    import re

    pictures = set(re.findall(r"\(docs/([\w.-]+\.png)\)", (ROOT / "README.md").read_text()))
    assert pictures
    made = {p for p in pictures for m in modules if f'"{p}"' in (ROOT / m).read_text()}
    assert pictures == made, pictures - made


def test_only_conftest_starts_the_session_label_studio():
    """The one Label Studio of a session is conftest.py's `labelstudio` fixture. A module that imports that fixture,
    or calls start_session_labelstudio itself, would start one server per module (conftest.py's
    pytest_sessionfinish also fails a run that started more than one)."""
    found = []
    for path in sorted((ROOT / "tests").glob("*.py")):
        if path.name in ("conftest.py", "fixtures_labelstudio.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module in ("conftest", "fixtures_labelstudio"):
                found += [f"{path.name}:{node.lineno} imports {a.name}" for a in node.names
                          if a.name in ("labelstudio", "start_session_labelstudio", "*")]
            elif isinstance(node, ast.Name | ast.Attribute) and (getattr(node, "id", None) or
                                                                 getattr(node, "attr", None)) == "start_session_labelstudio":
                found.append(f"{path.name}:{node.lineno} uses start_session_labelstudio")
    assert found == []
