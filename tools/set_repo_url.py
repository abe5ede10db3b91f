"""Point the series at another GitHub repository (for a fork): the Colab badges,
the install cells and ``lora_helpers.REPO_URL``.

    python tools/set_repo_url.py https://github.com/YOU/lora-from-scratch
    python tools/set_repo_url.py https://github.com/YOU/lora-from-scratch --branch dev --dry-run

It reads the current URL from ``lora_helpers/__init__.py`` and replaces it, as
text, in that file, in every ``notebooks/*.ipynb`` (badge and install cell),
in ``README.md``, ``docs/*.md`` and ``pyproject.toml``. Files keep their
formatting byte for byte apart from the URLs, so the notebooks' saved outputs
(and nbval's checks) are untouched. ``--root`` works on another checkout.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

INIT = Path("lora_helpers") / "__init__.py"
REPO_URL_LINE = re.compile(r'^REPO_URL = "(?P<url>[^"]*)"$', flags=re.MULTILINE)
GITHUB_URL = re.compile(r"https://github\.com/(?P<slug>[\w.-]+/[\w.-]+?)(?:\.git)?/?")
# the branch part of a Colab badge link: .../github/OWNER/REPO/blob/BRANCH/notebooks/...
BADGE_BRANCH = r"(colab\.research\.google\.com/github/{slug}/blob/)[^/\s)\"]+(/)"


def parse_github_url(url: str) -> str:
    """``OWNER/REPO`` of ``https://github.com/OWNER/REPO`` (a trailing ``.git`` or ``/`` is dropped)."""
    m = GITHUB_URL.fullmatch(url.strip())
    if not m:
        raise ValueError(f"expected a GitHub repository URL like https://github.com/OWNER/REPO, got {url!r}")
    return m.group("slug")


def files_to_update(root: Path) -> list[Path]:
    candidates = [root / INIT, root / "README.md", root / "pyproject.toml"]
    candidates += sorted((root / "notebooks").glob("*.ipynb")) + sorted((root / "docs").glob("*.md"))
    return [p for p in candidates if p.is_file()]


def rewrite(text: str, old: str, new: str, branch: str | None = None) -> str:
    """``text`` with every link to the repository ``old`` (``OWNER/REPO``) pointing to ``new`` instead."""
    end = r"(?![\w-])"  # do not touch a longer name that starts the same: OWNER/REPO-other
    text = re.sub(rf"https://github\.com/{re.escape(old)}{end}", f"https://github.com/{new}", text)
    text = re.sub(
        rf"colab\.research\.google\.com/github/{re.escape(old)}{end}", f"colab.research.google.com/github/{new}", text
    )
    if branch:
        text = re.sub(BADGE_BRANCH.format(slug=re.escape(new)), rf"\g<1>{branch}\g<2>", text)
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url", help="the new repository, https://github.com/OWNER/REPO")
    parser.add_argument("--branch", help="also point the Colab badges at this branch (default: keep theirs)")
    parser.add_argument(
        "--root",
        default=Path(__file__).resolve().parent.parent,
        type=Path,
        help="the checkout to update (default: this one)",
    )
    parser.add_argument("--dry-run", action="store_true", help="only list the files that would change")
    args = parser.parse_args(argv)

    try:
        new = parse_github_url(args.url)
    except ValueError as err:
        parser.error(str(err))
    init = args.root / INIT
    m = REPO_URL_LINE.search(init.read_bytes().decode("utf-8"))
    if not m:
        print(f'error: no line REPO_URL = "..." in {init}', file=sys.stderr)
        return 2
    old = parse_github_url(m.group("url"))
    changed = []
    for path in files_to_update(args.root):
        text = path.read_bytes().decode("utf-8")  # bytes: line endings stay as they are
        updated = rewrite(text, old, new, args.branch)
        if path == init:  # the canonical form, whatever the argument's spelling
            updated = REPO_URL_LINE.sub(f'REPO_URL = "https://github.com/{new}"', updated)
        if updated != text:
            changed.append(path)
            if not args.dry_run:
                path.write_bytes(updated.encode("utf-8"))
    verb = "would change" if args.dry_run else "changed"
    print(f"https://github.com/{old} -> https://github.com/{new}: {verb} {len(changed)} file(s)")
    for path in changed:
        print(f"  {path.relative_to(args.root)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
