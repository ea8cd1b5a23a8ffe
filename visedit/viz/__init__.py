"""Figures (plotly / seaborn) and ipywidgets explorers. Functions return figures; they never show them."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from plotly.io._base_renderers import MimetypeRenderer

from .explorers import answer_explorer, edit_playground, interactive, static_mode
from .figures import gallery, heatmap_grid, heatmap_overlay, map_explorer, outline, table_explorer, training_curve

__all__ = ["notebook_setup", "interactive", "static_mode", "answer_explorer", "edit_playground", "gallery", "heatmap_grid", "heatmap_overlay", "map_explorer", "outline", "table_explorer", "training_curve"]


def notebook_setup() -> str:
    """Pick the plotly renderer for the current use and return its name.

    Building the book (``VISEDIT_BOOK=1``, set by ``make book``): ``visedit_book``, which writes each
    figure's div and script only, without plotly.js or plotly's CDN MathJax; the book serves one shared
    ``_static/plotly.min.js`` and its own MathJax (``book/_ext/visedit_offline.py``), so the site loads
    nothing from another host. Otherwise figures load plotly.js from its CDN (``notebook_connected``),
    which keeps committed notebooks small. Offline live sessions: ``plotly.io.renderers.default =
    "notebook"`` inlines plotly.js once per notebook.
    """
    import os

    import plotly.io as pio

    if os.environ.get("VISEDIT_BOOK"):
        if "visedit_book" not in pio.renderers:
            pio.renderers["visedit_book"] = _BookRenderer()
        pio.renderers.default = "visedit_book"
    else:
        pio.renderers.default = "notebook_connected"
    return pio.renderers.default


class _BookRenderer(MimetypeRenderer):
    """One figure for the book: a placeholder div and the figure as JSON (no plotly.js, no MathJax).

    The book's ``_static/visedit-figures.js`` draws each figure with the site's shared plotly.js when it
    comes near the screen, so a chapter's text is readable before its figures are drawn. The figure fills
    its column: a fixed layout width is dropped (it overflowed the text column and a phone's screen).
    """

    def to_mimebundle(self, fig_dict):
        import json
        import uuid

        import plotly.io as pio

        spec = json.loads(pio.to_json(fig_dict, validate=False))
        spec["layout"] = {k: v for k, v in spec.get("layout", {}).items() if k != "width"} | {"autosize": True}
        spec["config"] = {"responsive": True}
        height = spec["layout"].get("height", 525)
        fig_id = str(uuid.uuid4())
        payload = json.dumps(spec, separators=(",", ":")).replace("</", "<\\/")
        html = (f'<div id="{fig_id}" class="plotly-graph-div" data-visedit-figure style="height:{height}px; width:100%;">'
                f'</div><script type="application/json" data-visedit-figure="{fig_id}">{payload}</script>')
        return {"text/html": html}
