"""Sphinx extension of the visedit book: a site that loads nothing from another host.

- MathJax 3 is served from ``_static/mathjax`` (copied from the ``sphinx-mathjax-offline`` package:
  the ``tex-chtml`` component, its TeX extensions, CHTML fonts, menu and assistive-MML modules;
  not the 4 MB speech rule engine or the other combined builds), so formulas render offline.
- plotly.js is one shared file, ``_static/plotly.min.js`` (plotly's own copy), loaded only by pages
  that hold a plotly figure, deferred. Figures are written by the ``visedit_book`` renderer
  (:func:`visedit.viz.notebook_setup` under ``VISEDIT_BOOK=1``) as a div and the figure's JSON, without
  plotly.js or plotly's CDN MathJax; ``visedit-figures.js`` draws each when it comes near the screen.
- sphinx-thebe's inline configuration script, registered twice, is written once (a second
  ``const THEBE_JS_URL`` is a console error); source maps and translation catalogues are not copied,
  and the download button's notebooks come without outputs.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

MATHJAX_PARTS = ("tex-chtml.js", "input/tex/extensions", "output/chtml", "ui", "a11y")


def mathjax_source() -> Path:
    spec = importlib.util.find_spec("sphinx-mathjax-offline")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the book needs the package sphinx-mathjax-offline: pip install -e '.[book]'")
    return Path(list(spec.submodule_search_locations)[0]) / "static" / "mathjax"


def plotly_source() -> Path:
    import plotly

    return Path(plotly.__file__).parent / "package_data" / "plotly.min.js"


def copy_assets(app, exc) -> None:
    if app.builder.format != "html":
        return
    static = Path(app.outdir) / "_static"
    src = mathjax_source()
    for part in MATHJAX_PARTS:
        target = static / "mathjax" / part
        target.parent.mkdir(parents=True, exist_ok=True)
        if (src / part).is_dir():
            shutil.copytree(src / part, target, dirs_exist_ok=True)
        else:
            shutil.copy2(src / part, target)
    shutil.copy2(plotly_source(), static / "plotly.min.js")
    shutil.copy2(Path(__file__).with_name("visedit-figures.js"), static / "visedit-figures.js")
    shutil.copy2(Path(__file__).with_name("visedit.css"), static / "visedit.css")
    # What no reader's browser ever fetches: the themes' source maps (3.4 MB) and their translation
    # catalogues (read at build time, copied along with the theme's static files).
    # The download button's notebooks, without outputs: a reader downloads a chapter to run it, and its
    # outputs (3.6 MB of figure JSON and images) are on the page already.
    for notebook in (Path(app.outdir) / "_sources").rglob("*.ipynb"):
        content = json.loads(notebook.read_text())
        for cell in content["cells"]:
            if cell["cell_type"] == "code":
                cell["outputs"], cell["execution_count"] = [], None
        notebook.write_text(json.dumps(content, indent=1, ensure_ascii=False) + "\n")
    for source_map in static.rglob("*.map"):
        source_map.unlink()
    shutil.rmtree(static / "locales", ignore_errors=True)


def add_plotly(app, pagename, templatename, context, doctree) -> None:
    if "plotly-graph-div" in context.get("body", ""):
        app.add_js_file("plotly.min.js", priority=200, defer="defer")
        app.add_js_file("visedit-figures.js", priority=201, defer="defer")


def drop_duplicate_scripts(app, pagename, templatename, context, doctree) -> None:
    """sphinx-thebe registers its inline ``const THEBE_JS_URL = …`` twice: the second one is a console error."""
    seen, kept = set(), []
    for js in context.get("script_files", []):
        key = (getattr(js, "filename", js) or "", tuple(sorted(getattr(js, "attributes", {}).items())))
        if key not in seen:
            seen.add(key)
            kept.append(js)
    context["script_files"] = kept


def setup(app):
    app.add_css_file("visedit.css")
    app.connect("html-page-context", add_plotly)
    app.connect("html-page-context", drop_duplicate_scripts, priority=900)
    app.connect("build-finished", copy_assets)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
