"""Strip what a notebook should not carry into git: Colab/VS Code metadata and
execution timestamps; give a cell without an id one (nbformat 4.5 requires it).
Outputs stay: they are what nbval compares against.

    python tools/clean_notebook.py notebooks/*.ipynb
"""

import hashlib
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
    taken = {cell["id"] for cell in nb["cells"] if "id" in cell}
    for i, cell in enumerate(nb["cells"]):
        if "id" not in cell:
            digest = hashlib.sha1(f"{i}{''.join(cell['source'])}".encode()).hexdigest()[:8]
            cell["id"] = digest if digest not in taken else f"{digest}-{i}"
            taken.add(cell["id"])
    with open(path, "w", encoding="utf-8") as f:
        json.dump(nb, f, indent=1, ensure_ascii=False)
        f.write("\n")
