"""Figures (plotly / seaborn) and ipywidgets explorers. Functions return figures; they never show them."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .explorers import answer_explorer
from .figures import gallery, heatmap_overlay, outline, training_curve

__all__ = ["answer_explorer", "gallery", "heatmap_overlay", "outline", "training_curve"]
