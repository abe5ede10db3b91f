"""Strip what a notebook should not carry into git: Colab/VS Code metadata and
execution timestamps. Outputs stay: they are what nbval compares against.

    python tools/clean_notebook.py notebooks/*.ipynb
"""
import json
import sys

KEEP_NOTEBOOK_META = {"kernelspec", "language_info"}

for path in sys.argv[1:]:
    with open(path, encoding="utf-8") as f:
        nb = json.load(f)
    nb["metadata"] = {k: v for k, v in nb.get("metadata", {}).items() if k in KEEP_NOTEBOOK_META}
    nb["metadata"]["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    for cell in nb["cells"]:
        meta = cell.get("metadata", {})
        for key in ("execution", "colab", "id", "outputId", "scrolled", "collapsed"):
            meta.pop(key, None)
        cell["metadata"] = meta
    with open(path, "w", encoding="utf-8") as f:
        json.dump(nb, f, indent=1, ensure_ascii=False)
        f.write("\n")
