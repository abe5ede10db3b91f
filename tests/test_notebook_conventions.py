"""Every notebook is ready for Colab, JupyterLab and GitHub (docs/NOTEBOOK_CONVENTIONS.md).

Checked on each ``notebooks/NN_*.ipynb`` that exists: the Colab badge (first
cell) and the guarded install cell (second cell) point to
``lora_helpers.REPO_URL``; the versions cell comes third; nbval directives are
cell tags, not comments; the last section is "## Exercises"; the notebook was
executed top to bottom in one kernel; no errors, stderr, widgets or figure
reprs in the saved outputs; no editor metadata; a reasonable size. The learner's
path: the core notebooks (01-04) within the length bound (the table of every
notebook is printed), no project talk (CI, the test tool, our machines) in prose
or comments, no reads of the repository around the notebook, figures at most
10 inches wide, and a banner (profile, data, time) in every notebook that trains.
Also tests ``tools/set_repo_url.py`` on a copy of the files it rewrites.
"""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lora_helpers import REPO_URL

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
MAX_BYTES = 2 * 2**20
BADGE_IMAGE = "https://colab.research.google.com/assets/colab-badge.svg"
ALLOWED_NOTEBOOK_METADATA = {"kernelspec", "language_info"}
EDITOR_CELL_METADATA = {"colab", "id", "outputId", "executionInfo", "execution", "vscode", "pycharm"}
# A core notebook is read and run in one sitting: about 2,000 words of Markdown and 250 lines of code at most.
CORE = ("01", "02", "03", "04")
MAX_WORDS, MAX_CODE_LINES = 2000, 250
# Words about the project, not the lesson: a learner needs none of them (checked in Markdown and code comments).
PROJECT_TALK = re.compile(
    r"\bCI\b|nbval|NBVAL|test suite|conftest|\bpytest\b|2-core|two-core|tests stay|\bour machine|"
    r"output is not checked|reproducible print|profiles\.py|committed file",
    re.I,
)
# Paths of the repository around a notebook: absent where the package is pip-installed and a notebook opened alone.
REPO_READS = re.compile(r"""Path\(\s*["']\.\.["']\s*\)|["']\.\./|["']results/""")
MAX_FIGURE_INCHES = 10


def slug(url: str) -> str:
    """``OWNER/REPO`` of a GitHub URL."""
    m = re.fullmatch(r"https://github\.com/([\w.-]+/[\w.-]+?)(?:\.git)?/?", url)
    assert m, f"REPO_URL {url!r} is not https://github.com/OWNER/REPO"
    return m.group(1)


def source(cell) -> str:
    s = cell["source"]
    return "".join(s) if isinstance(s, list) else s


def load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


# ---------------------------------------------------------------- the checks (reused on a rewritten copy)


def check_badge(nb: dict, name: str, repo_url: str) -> None:
    first = nb["cells"][0]
    assert first["cell_type"] == "markdown", "the first cell must be markdown: title, Colab badge, what you learn"
    text = source(first)
    number = name[:2]
    assert re.match(rf"# {number} · \S", text), f"the first line must be the title '# {number} · ...'"
    link = f"https://colab.research.google.com/github/{slug(repo_url)}/blob/main/notebooks/{name}"
    badge = f"[![Open In Colab]({BADGE_IMAGE})]({link})"
    assert badge in text, f"the first cell lacks the Colab badge for this notebook:\n  {badge}"
    others = set(re.findall(r"colab\.research\.google\.com/github/[^)\s\"]+", text)) - {link.removeprefix("https://")}
    assert not others, f"a Colab link points elsewhere: {sorted(others)}"


def check_install_cell(nb: dict, repo_url: str) -> None:
    cell = nb["cells"][1]
    assert cell["cell_type"] == "code", "the second cell must be the (code) Colab install cell"
    lines = [line for line in source(cell).splitlines() if line.strip() and not line.strip().startswith("#")]
    assert "import sys" in lines, "the install cell must `import sys`"
    guard = [i for i, line in enumerate(lines) if line.strip() == 'if "google.colab" in sys.modules:']
    assert guard, 'the install cell must be guarded by `if "google.colab" in sys.modules:`'
    pips = [line for line in lines[guard[0] + 1 :] if "pip install" in line]
    assert pips and all(line.startswith((" ", "\t")) for line in pips), "the pip install must be inside the guard"
    assert not any("pip install" in line for line in lines[: guard[0]]), "no install outside the guard"
    assert any(f"git+{repo_url}" in line and line.strip().startswith("%pip") for line in pips), (
        f"the install cell must `%pip install` from git+{repo_url}"
    )
    assert not cell.get("outputs"), "the install cell prints nothing outside Colab"
    assert 'find_spec("lora_helpers")' in source(cell) and "raise SystemExit(" in source(cell), (
        "the install cell skips pip when lora_helpers is importable and stops with one clear message if it is not"
    )


def check_versions_cell(nb: dict) -> None:
    cell = nb["cells"][2]
    text = source(cell)
    assert cell["cell_type"] == "code" and "print_versions()" in text, "the third cell prints the versions"
    assert "nbval-ignore-output" in cell.get("metadata", {}).get("tags", []), (
        "the versions cell carries the cell tag nbval-ignore-output (installed versions are the reader's)"
    )


def check_no_nbval_comments(nb: dict) -> None:
    """nbval directives are cell tags (nbval-ignore-output, nbval-skip ...): the learner reads the code."""
    marked = [i for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code" and "# NBVAL_" in source(c)]
    assert not marked, f"code cells {marked} carry '# NBVAL_...' comments: use the cell tags instead"


def check_ends_with_exercises(nb: dict) -> None:
    """The last section is '## Exercises': tasks that use what the notebook built, with hints or solutions."""
    headings = [
        (i, line)
        for i, c in enumerate(nb["cells"])
        if c["cell_type"] == "markdown"
        for line in source(c).splitlines()
        if line.startswith("## ")
    ]
    assert headings, "the notebook has no sections"
    index, last = headings[-1]
    assert last.strip().lower().startswith("## exercises"), f"the last section is {last.strip()!r}, not '## Exercises'"
    text = "\n".join(source(c) for c in nb["cells"][index:])
    tasks = re.findall(r"^\s*(?:\*\*|#+\s*)?\d+\.\s", text, flags=re.M)  # "1. ", "**1. ", "### 1. "
    assert len(tasks) >= 3, f"the Exercises section has {len(tasks)} numbered tasks; give 3-5"
    assert "<details>" in text or "solutions/" in text, (
        "give the solutions: collapsed <details>, or a solutions notebook"
    )


def check_executed_in_order(nb: dict) -> None:
    counts = [
        (i, c.get("execution_count"))
        for i, c in enumerate(nb["cells"])
        if c["cell_type"] == "code" and source(c).strip()
    ]
    missing = [i for i, n in counts if n is None]
    assert not missing, (
        f"code cells {missing} were not executed (nbval does not compare them): run tools/execute_notebooks.sh"
    )
    numbers = [n for _, n in counts]
    assert numbers and numbers[0] == 1, f"execution must start at 1 in a fresh kernel, found {numbers[:1]}"
    back = [(counts[k][0], numbers[k - 1], numbers[k]) for k in range(1, len(numbers)) if numbers[k] <= numbers[k - 1]]
    assert not back, f"cells executed out of order (cell, previous count, count): {back[:5]}"


def check_outputs(nb: dict) -> None:
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "code":
            continue
        intended = "raises-exception" in cell.get("metadata", {}).get("tags", [])
        for out in cell.get("outputs", []):
            kind = out["output_type"]
            if kind == "error":
                assert intended, f"cell {i} saved an error: {out.get('ename')}: {out.get('evalue')}"
            if kind == "stream":
                assert out.get("name") != "stderr", (
                    f"cell {i} wrote to stderr (a warning or a progress bar): {''.join(out.get('text', ''))[:200]!r}"
                )
            if kind in ("execute_result", "display_data"):
                data = out.get("data", {})
                text = "".join(data.get("text/plain", ""))
                # a figure shown by plt.show() carries a "<Figure size ...>" text next to its image: fine.
                # Alone, or a matplotlib object as a cell's value, it is noise.
                assert "application/vnd.jupyter.widget-view+json" not in data, (
                    f"cell {i} saved a widget (a progress bar?): without widget state GitHub shows an error there"
                )
                noise = (
                    text.startswith("<Figure size") and not any(k.startswith("image/") for k in data)
                ) or text.lstrip("[").startswith("<matplotlib.")
                assert not noise, f"cell {i} prints {text[:60]!r}: end plotting cells with plt.show()"


def check_metadata(nb: dict) -> None:
    extra = set(nb.get("metadata", {})) - ALLOWED_NOTEBOOK_METADATA
    assert not extra, f"notebook metadata {sorted(extra)} (Colab/VS Code?): run tools/clean_notebook.py"
    assert nb["metadata"].get("kernelspec", {}).get("name") == "python3", "kernelspec must be python3"
    for i, cell in enumerate(nb["cells"]):
        bad = set(cell.get("metadata", {})) & EDITOR_CELL_METADATA
        assert not bad, f"cell {i} carries editor metadata {sorted(bad)}: run tools/clean_notebook.py"


def size(nb: dict) -> tuple[int, int]:
    """(words of Markdown, non-blank lines of code)."""
    words = sum(len(source(c).split()) for c in nb["cells"] if c["cell_type"] == "markdown")
    lines = sum(1 for c in nb["cells"] if c["cell_type"] == "code" for line in source(c).splitlines() if line.strip())
    return words, lines


def check_length(nb: dict, name: str) -> None:
    words, lines = size(nb)
    if name[:2] in CORE:
        assert words <= MAX_WORDS and lines <= MAX_CODE_LINES, (
            f"{name}: {words} words, {lines} code lines; a core notebook stays within {MAX_WORDS} / {MAX_CODE_LINES}"
        )


def check_no_project_talk(nb: dict) -> None:
    """Markdown and code comments speak to the learner: nothing about CI, the test tool or our machines."""
    found = []
    for i, cell in enumerate(nb["cells"]):
        text = source(cell) if cell["cell_type"] == "markdown" else "\n".join(re.findall(r"#.*", source(cell)))
        found += [(i, m.group(0)) for m in PROJECT_TALK.finditer(text)]
    assert not found, f"project talk in a lesson (cell, words): {found[:8]}"


def check_no_repository_reads(nb: dict) -> None:
    """Where the package is pip-installed and the notebook opened alone (Colab), no repository is around it."""
    found = [
        (i, m.group(0))
        for i, c in enumerate(nb["cells"])
        if c["cell_type"] == "code"
        for m in REPO_READS.finditer(source(c))
    ]
    assert not found, f"code reads the repository around the notebook (cell, path): {found}; use committed_run()"


def check_figure_widths(nb: dict) -> None:
    """JupyterLab shows a figure about 10 inches wide: a wider one shrinks and its labels become unreadable."""
    wide = [
        (i, float(w))
        for i, c in enumerate(nb["cells"])
        if c["cell_type"] == "code"
        for w in re.findall(r"figsize=\(\s*([\d.]+)\s*,", source(c))
        if float(w) > MAX_FIGURE_INCHES
    ]
    assert not wide, f"figures wider than {MAX_FIGURE_INCHES} inches (cell, width): {wide}"


def check_banner(nb: dict, name: str) -> None:
    """A notebook that trains on IMDb says first what it will run and how long it takes here (banner.print_banner)."""
    code = "\n".join(source(c) for c in nb["cells"] if c["cell_type"] == "code")
    if "get_profile(" in code:
        assert "print_banner(" in code, f"{name} uses a profile but prints no banner (lora_helpers.print_banner)"


# ---------------------------------------------------------------- the notebooks as they are

if not NOTEBOOKS:
    pytest.skip("no notebooks yet", allow_module_level=True)

by_name = pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])


@by_name
def test_colab_badge(path):
    check_badge(load(path), path.name, REPO_URL)


@by_name
def test_install_cell(path):
    check_install_cell(load(path), REPO_URL)


@by_name
def test_versions_cell(path):
    check_versions_cell(load(path))


@by_name
def test_nbval_directives_are_tags(path):
    check_no_nbval_comments(load(path))


@by_name
def test_ends_with_exercises(path):
    check_ends_with_exercises(load(path))


@by_name
def test_executed_top_to_bottom(path):
    check_executed_in_order(load(path))


@by_name
def test_clean_outputs(path):
    check_outputs(load(path))


@by_name
def test_no_editor_metadata(path):
    check_metadata(load(path))


def test_lengths_table(capsys):
    """The table of every notebook's length (printed with -s); the core bound is checked per notebook below."""
    rows = [f"{p.name:<44} {size(load(p))[0]:>6} {size(load(p))[1]:>6}" for p in NOTEBOOKS]
    with capsys.disabled():
        print(f"\n{'notebook':<44} {'words':>6} {'code':>6}\n" + "\n".join(rows))
    assert len(rows) == len(NOTEBOOKS)


@by_name
def test_core_length(path):
    check_length(load(path), path.name)


@by_name
def test_no_project_talk(path):
    check_no_project_talk(load(path))


@by_name
def test_no_repository_reads(path):
    check_no_repository_reads(load(path))


@by_name
def test_figure_widths(path):
    check_figure_widths(load(path))


@by_name
def test_banner(path):
    check_banner(load(path), path.name)


def test_project_talk_checks_catch_examples():
    """The checks above reject what a reviewer found in earlier versions of the lessons."""
    cell = lambda kind, text: {"cell_type": kind, "source": text, "metadata": {}, "outputs": []}  # noqa: E731
    for bad in ("so that the tests stay quick", "on the 2-core CI CPU", "this output is not checked by nbval"):
        with pytest.raises(AssertionError):
            check_no_project_talk({"cells": [cell("markdown", bad)]})
    with pytest.raises(AssertionError):
        check_no_project_talk({"cells": [cell("code", "x = 1  # pinned threads for reproducible printouts")]})
    check_no_project_talk({"cells": [cell("code", 'print("CI")  # a string is not a comment')]})
    with pytest.raises(AssertionError):
        check_no_repository_reads(
            {"cells": [cell("code", 'json.loads((Path("..") / "results" / "x.json").read_text())')]}
        )
    with pytest.raises(AssertionError):
        check_figure_widths({"cells": [cell("code", "fig, axes = plt.subplots(1, 3, figsize=(17, 4.2))")]})
    with pytest.raises(AssertionError):
        check_length({"cells": [cell("markdown", "word " * 2001)]}, "02_x.ipynb")
    check_length({"cells": [cell("markdown", "word " * 2001)]}, "05_x.ipynb")


@by_name
def test_file_size(path):
    size = path.stat().st_size
    assert size < MAX_BYTES, f"{path.name} is {size / 2**20:.1f} MB (images included); keep it under 2 MB"


# ---------------------------------------------------------------- tools/set_repo_url.py, on a copy


def _copy_checkout(tmp_path: Path) -> Path:
    root = tmp_path / "fork"
    (root / "lora_helpers").mkdir(parents=True)
    shutil.copy(ROOT / "lora_helpers" / "__init__.py", root / "lora_helpers" / "__init__.py")
    shutil.copytree(ROOT / "notebooks", root / "notebooks", ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    for name in ("README.md", "pyproject.toml"):
        if (ROOT / name).is_file():
            shutil.copy(ROOT / name, root / name)
    return root


def _set_url(root: Path, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "set_repo_url.py"), *args, "--root", str(root)],
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout


def test_set_repo_url_rewrites_badges_install_cells_and_repo_url(tmp_path):
    root = _copy_checkout(tmp_path)
    files = [root / "lora_helpers" / "__init__.py"] + sorted((root / "notebooks").glob("*.ipynb"))
    before = {p: p.read_bytes() for p in files + [root / n for n in ("README.md",) if (root / n).is_file()]}
    new_url = "https://github.com/someone-else/my-lora-fork"
    out = _set_url(root, new_url + ".git")  # a clone URL is accepted too
    assert "someone-else/my-lora-fork" in out

    init = (root / "lora_helpers" / "__init__.py").read_text()
    assert f'REPO_URL = "{new_url}"' in init and REPO_URL not in init
    for path in (root / "notebooks").glob("[0-9][0-9]_*.ipynb"):
        nb = load(path)
        check_badge(nb, path.name, new_url)
        check_install_cell(nb, new_url)
        # only the URLs changed: same cells, same outputs
        old = json.loads(before[path])
        assert len(nb["cells"]) == len(old["cells"])
        assert [c.get("outputs") for c in nb["cells"][2:]] == [c.get("outputs") for c in old["cells"][2:]]
    readme = root / "README.md"
    if readme.is_file() and slug(REPO_URL) in before[readme].decode():
        assert slug(REPO_URL) not in readme.read_text() and "someone-else/my-lora-fork" in readme.read_text()

    # back to the original URL: every file byte for byte as before
    _set_url(root, REPO_URL)
    assert all(p.read_bytes() == content for p, content in before.items())


def test_set_repo_url_branch_and_dry_run(tmp_path):
    root = _copy_checkout(tmp_path)
    nb_path = sorted((root / "notebooks").glob("[0-9][0-9]_*.ipynb"))[0]
    original = nb_path.read_bytes()
    out = _set_url(root, "https://github.com/a/b", "--dry-run")
    assert "would change" in out and nb_path.read_bytes() == original
    _set_url(root, "https://github.com/a/b", "--branch", "dev")
    assert f"colab.research.google.com/github/a/b/blob/dev/notebooks/{nb_path.name}" in nb_path.read_text()
    bad = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "set_repo_url.py"), "gitlab.com/a/b", "--root", str(root)],
        capture_output=True,
        text=True,
    )
    assert bad.returncode != 0 and "expected a GitHub repository URL" in bad.stderr


def run_install_cell(code: str, importable: bool, pip_works: bool, monkeypatch) -> list:
    """Run the install cell as IPython would on Colab (a fake google.colab module, %pip recorded, not run)."""
    import importlib.util
    import types

    # IPython comes with Jupyter (requirements.txt), not with the package: the lower-bound job skips this test
    TransformerManager = pytest.importorskip("IPython.core.inputtransformer2").TransformerManager

    calls = []
    installed = {"done": importable}

    class FakeShell:
        def run_line_magic(self, name, line):
            calls.append(f"%{name} {line}")
            installed["done"] = installed["done"] or pip_works

    real_find_spec = importlib.util.find_spec
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: (
            (real_find_spec(name, *a) if installed["done"] else None)
            if name == "lora_helpers"
            else real_find_spec(name, *a)
        ),
    )
    exec(TransformerManager().transform_cell(code), {"get_ipython": FakeShell})
    return calls


def test_install_cell_on_colab_installs_once_and_stops_clearly_when_pip_fails(monkeypatch):
    code = source(load(NOTEBOOKS[0])["cells"][1])
    assert run_install_cell(code, importable=True, pip_works=False, monkeypatch=monkeypatch) == []  # nothing to do
    calls = run_install_cell(code, importable=False, pip_works=True, monkeypatch=monkeypatch)
    assert len(calls) == 1 and f"git+{REPO_URL}" in calls[0]  # one install
    with pytest.raises(SystemExit, match="Replace the URL in this cell"):  # no ModuleNotFoundError later
        run_install_cell(code, importable=False, pip_works=False, monkeypatch=monkeypatch)
