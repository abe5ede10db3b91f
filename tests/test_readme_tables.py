"""The README's result tables are written from the committed runs (tools/readme_tables.py), never by hand."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _tool():
    spec = importlib.util.spec_from_file_location("readme_tables", ROOT / "tools" / "readme_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_tables_match_the_committed_runs():
    tool = _tool()
    text = tool.README.read_text(encoding="utf-8")
    names = [m.group("name") for m in tool.BLOCK.finditer(text)]
    assert {"compare-quick", "compare-cpu", "study-quick", "bench-cpu"} <= set(names), names
    assert tool.render(text) == text, "README.md is stale: run python tools/readme_tables.py"


def test_a_hand_edited_number_is_caught():
    tool = _tool()
    text = tool.README.read_text(encoding="utf-8")
    start = text.index("<!-- begin: compare-quick -->")
    edited = text[:start] + text[start:].replace("| reference |", "| reference! |", 1)
    assert edited != text and tool.render(edited) != edited
