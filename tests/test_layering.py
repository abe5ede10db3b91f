"""The package has two layers: a lesson core a learner reads, and a lab that runs the studies.

The core (``lora_helpers.LESSON_CORE``) imports nothing from the lab (``lora_helpers.LAB``), at module level or
inside a function, and no module imports, directly or through others, a module that imports it back.
"""

import ast
from pathlib import Path

import lora_helpers
from lora_helpers import LAB, LESSON_CORE

PACKAGE = Path(lora_helpers.__file__).parent


def imports_of(module: str) -> set[str]:
    """The package's modules that ``module`` imports anywhere in its file (relative or absolute imports)."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                found.add(node.module.split(".")[0])
            elif node.level == 1:
                found.update(alias.name for alias in node.names)
            elif node.module and node.module.startswith("lora_helpers."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("lora_helpers."))
    return found & set(LESSON_CORE + LAB)


def test_every_module_is_in_exactly_one_layer():
    modules = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")
    assert sorted(LESSON_CORE + LAB) == modules
    assert not set(LESSON_CORE) & set(LAB)


def test_the_lesson_core_imports_nothing_from_the_lab():
    upward = {m: sorted(imports_of(m) & set(LAB)) for m in LESSON_CORE}
    assert not {m: deps for m, deps in upward.items() if deps}


def test_the_import_graph_has_no_circle():
    graph = {m: imports_of(m) - {m} for m in LESSON_CORE + LAB}
    state = {}

    def visit(m, path):
        state[m] = "open"
        for dep in sorted(graph[m]):
            assert state.get(dep) != "open", "import circle: " + " -> ".join(path + [m, dep])
            if dep not in state:
                visit(dep, path + [m])
        state[m] = "done"

    for m in graph:
        if m not in state:
            visit(m, [])


def test_the_layering_check_finds_an_upward_import(tmp_path, monkeypatch):
    """The check itself: a core module that imports the lab is caught."""
    fake = tmp_path / "lora_helpers"
    fake.mkdir()
    for m in LESSON_CORE + LAB:
        (fake / f"{m}.py").write_text("")
    (fake / "lora.py").write_text("def f():\n    from .runner import run\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    assert imports_of("lora") == {"runner"}
