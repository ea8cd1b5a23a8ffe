"""Name the book's repository in its one place, ``_config.yml``'s ``repository.url``, and carry it into the
first code cell of every notebook (the cell that installs visedit when a chapter runs outside the repository,
e.g. in Colab, which opens the notebook from the repository and cannot read ``_config.yml``).

    python book/_ext/set_repository.py https://github.com/ORG/visedit     # or: make repository URL=…
    python book/_ext/set_repository.py --check                            # exit 1 if a notebook disagrees

Writes each file whole (a temporary file renamed over it), so an interrupted run leaves no half-written file.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "_config.yml"
URL_LINE = re.compile(r"^(repository:\s*\n\s+url:\s*)(\S+)", re.M)
MARK = "# Outside the repository (Colab, a bare Binder)? Install visedit first; here this does nothing."


def install_cell_source(url: str) -> list[str]:
    return [MARK + "\n",
            "import importlib.util, subprocess, sys\n",
            "if importlib.util.find_spec(\"visedit\") is None:\n",
            f"    subprocess.run([sys.executable, \"-m\", \"pip\", \"install\", \"-q\", \"visedit[book] @ git+{url}\"], check=True)"]


def configured_url() -> str:
    m = URL_LINE.search(CONFIG.read_text())
    if m is None:
        raise SystemExit(f"{CONFIG}: no `repository:` block with a `url:` line; add one (see the comment above it)")
    return m.group(2)


def notebooks() -> list[Path]:
    return sorted((ROOT / "notebooks").glob("*.ipynb"))


def _write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def with_install_cell(nb: dict, url: str) -> dict:
    """``nb`` with its install cell as the first code cell (replaced when present, inserted when not); the
    book does not show it (tag ``remove-cell``)."""
    cell = {"cell_type": "code", "execution_count": None, "id": "install-visedit",
            "metadata": {"tags": ["remove-cell"]}, "outputs": [], "source": install_cell_source(url)}
    cells = [c for c in nb["cells"] if not "".join(c.get("source", [])).startswith(MARK)]
    first = next((i for i, c in enumerate(cells) if c["cell_type"] == "code"), len(cells))
    return nb | {"cells": cells[:first] + [cell] + cells[first:]}


def first_code_source(nb: dict) -> list[str] | None:
    return next((c["source"] for c in nb["cells"] if c["cell_type"] == "code"), None)


def main(argv: list[str]) -> int:
    if argv == ["--check"]:
        url = configured_url()
        stale = [p.name for p in notebooks() if first_code_source(json.loads(p.read_text())) != install_cell_source(url)]
        if stale:
            print(f"{len(stale)} notebook(s) do not install from {url}: {', '.join(stale)}; "
                  f"run `python book/_ext/set_repository.py {url}`")
            return 1
        return 0
    if len(argv) != 1 or not re.fullmatch(r"https://\S+", argv[0]):
        print("usage: python book/_ext/set_repository.py https://github.com/ORG/REPO   (or --check)")
        return 2
    url = argv[0].rstrip("/")
    _write(CONFIG, URL_LINE.sub(lambda m: m.group(1) + url, CONFIG.read_text(), count=1))
    written = 0
    for path in notebooks():
        nb = json.loads(path.read_text())
        if first_code_source(nb) == install_cell_source(url):
            continue  # already right: an executed notebook keeps its outputs and execution counts
        _write(path, json.dumps(with_install_cell(nb, url), indent=1, ensure_ascii=False) + "\n")
        written += 1
    print(f"repository.url = {url}; install cell written in {written} notebook(s), {len(notebooks()) - written} "
          "already right")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
