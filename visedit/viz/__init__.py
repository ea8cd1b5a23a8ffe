"""Figures (plotly / seaborn) and ipywidgets explorers. Functions return figures; they never show them."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .explorers import answer_explorer, edit_playground, interactive, static_mode
from .figures import gallery, heatmap_grid, heatmap_overlay, outline, training_curve

__all__ = ["notebook_setup", "interactive", "static_mode", "answer_explorer", "edit_playground", "gallery", "heatmap_grid", "heatmap_overlay", "outline", "training_curve"]


def notebook_setup() -> str:
    """Pick the plotly renderer for the current use and return its name.

    Building the book (``VISEDIT_BOOK=1``, set by ``make book``) inlines plotly.js so the static HTML
    works offline; otherwise figures load plotly.js from its CDN (``notebook_connected``), which keeps
    committed notebooks small. Offline live sessions: set ``VISEDIT_BOOK=1`` before starting Jupyter.
    """
    import os

    import plotly.io as pio

    pio.renderers.default = "notebook" if os.environ.get("VISEDIT_BOOK") else "notebook_connected"
    return pio.renderers.default
