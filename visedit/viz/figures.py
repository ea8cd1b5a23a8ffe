"""Static plotly figures shared by the chapters."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image


def outline(image: Image.Image, mask: np.ndarray, colour=(255, 255, 255)) -> np.ndarray:
    """RGB array of ``image`` with the boundary of ``mask`` (H, W bool) drawn in ``colour``."""
    arr = np.asarray(image.convert("RGB")).copy()
    m = mask.astype(bool)
    inner = m.copy()
    inner[1:, :] &= m[:-1, :]
    inner[:-1, :] &= m[1:, :]
    inner[:, 1:] &= m[:, :-1]
    inner[:, :-1] &= m[:, 1:]
    arr[m & ~inner] = colour
    return arr


def gallery(images: Sequence[Image.Image], titles: Sequence[str], masks: Sequence[np.ndarray] | None = None, *,
            cols: int = 6, size: int = 150):
    """A grid of images (with mask outlines when ``masks`` is given) and a title under each."""
    from plotly.subplots import make_subplots
    import plotly.graph_objects as go

    rows = -(-len(images) // cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=list(titles), horizontal_spacing=0.01,
                        vertical_spacing=0.08)
    for k, img in enumerate(images):
        arr = outline(img, masks[k]) if masks is not None else np.asarray(img.convert("RGB"))
        fig.add_trace(go.Image(z=arr, hoverinfo="skip"), row=k // cols + 1, col=k % cols + 1)
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    fig.update_annotations(font_size=10)
    fig.update_layout(height=rows * size + 40, width=cols * size, margin=dict(l=5, r=5, t=30, b=5))
    return fig


def training_curve(record: dict):
    """Loss over training steps from a ``training.json`` record."""
    import plotly.graph_objects as go

    log = record["log"]
    fig = go.Figure(go.Scatter(x=[r["step"] for r in log], y=[r["loss"] for r in log], mode="lines"))
    fig.update_layout(xaxis_title="instruction-tuning step", yaxis_title="answer-token loss (smoothed)",
                      yaxis_type="log", height=300, margin=dict(l=40, r=10, t=30, b=40),
                      title="Training the tiny model")
    return fig


def heatmap_overlay(values: np.ndarray, *, image: Image.Image | None = None, mask: np.ndarray | None = None,
                    title: str = "", diverging: bool = True, size: int = 300):
    """A (rows, cols) heatmap over visual tokens, upsampled onto ``image`` with ``mask`` outlined.

    Without an image (or for a 1×N strip of query tokens) the heatmap is drawn on its own.
    """
    import plotly.graph_objects as go

    values = np.asarray(values, dtype=float)
    fig = go.Figure()
    zmax = float(np.abs(values).max()) or 1.0
    scale = dict(colorscale="RdBu_r", zmid=0.0) if diverging else dict(colorscale="Viridis", zmin=0, zmax=zmax)
    if image is not None and values.shape[0] > 1:
        arr = outline(image, mask) if mask is not None else np.asarray(image.convert("RGB"))
        h, w = arr.shape[:2]
        up = np.kron(values, np.ones((h // values.shape[0], w // values.shape[1])))
        fig.add_trace(go.Image(z=arr, hoverinfo="skip"))
        fig.add_trace(go.Heatmap(z=up, opacity=0.55, showscale=True, **scale))
        fig.update_yaxes(autorange="reversed")
    else:
        fig.add_trace(go.Heatmap(z=values, **scale))
        fig.update_yaxes(autorange="reversed")
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    fig.update_layout(title=title, width=size + 80, height=size, margin=dict(l=5, r=5, t=40, b=5))
    return fig


def heatmap_grid(heatmaps: Sequence[np.ndarray], titles: Sequence[str], *, image: Image.Image | None = None,
                 mask: np.ndarray | None = None, cols: int = 4, size: int = 170, diverging: bool = False):
    """Several heatmaps over the same image side by side (e.g. one per layer), on a shared colour scale."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    rows = -(-len(heatmaps) // cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=list(titles), horizontal_spacing=0.01,
                        vertical_spacing=0.06)
    vmax = max(float(np.abs(h).max()) for h in heatmaps) or 1.0
    base = None
    if image is not None:
        base = outline(image, mask) if mask is not None else np.asarray(image.convert("RGB"))
    for k, h in enumerate(heatmaps):
        r, c = k // cols + 1, k % cols + 1
        h = np.asarray(h, dtype=float)
        if base is not None and h.shape[0] > 1:
            H, W = base.shape[:2]
            fig.add_trace(go.Image(z=base, hoverinfo="skip"), row=r, col=c)
            h = np.kron(h, np.ones((H // h.shape[0], W // h.shape[1])))
        scale = dict(colorscale="RdBu_r", zmin=-vmax, zmax=vmax) if diverging else \
            dict(colorscale="Viridis", zmin=0, zmax=vmax)
        fig.add_trace(go.Heatmap(z=h, opacity=0.6 if base is not None else 1.0, showscale=k == 0, **scale),
                      row=r, col=c)
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False, autorange="reversed")
    fig.update_annotations(font_size=11)
    fig.update_layout(height=rows * size + 50, width=cols * size + 60, margin=dict(l=5, r=5, t=40, b=5))
    return fig


def selectivity_figure(sel, *, title: str | None = None):
    """Pointing game, lift and pair score of noise maps on the queried creature, per layer (a
    :class:`~visedit.attribution.selectivity.LayerSelectivity`)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    layers = list(range(len(sel.pointing)))
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_trace(go.Scatter(x=layers, y=sel.pointing, name="pointing game", mode="lines+markers"))
    fig.add_trace(go.Scatter(x=layers, y=sel.pair, name="both questions point right", mode="lines+markers"))
    fig.add_trace(go.Bar(x=layers, y=sel.lift, name="lift (right axis)", opacity=0.3), secondary_y=True)
    fig.update_layout(title=title or f"Noise maps on the asked-about creature (n = {sel.n})", height=360,
                      xaxis_title="layer", yaxis_range=[0, 1.02], legend=dict(orientation="h", y=-0.25))
    fig.update_yaxes(title_text="share of records", secondary_y=False)
    fig.update_yaxes(title_text="lift", secondary_y=True)
    return fig


def read_depth_figure(rows: Sequence[dict]):
    """The study's summary: for each recipe, the relative depth of the attention-contribution peak and the
    early layers' share of the contribution (``rows``: dicts with ``recipe``, ``attention_peak_relative_depth``
    and ``early_share``)."""
    import plotly.graph_objects as go

    names = [r["recipe"] for r in rows]
    fig = go.Figure([go.Bar(x=names, y=[r["attention_peak_relative_depth"] for r in rows],
                            name="attention peak ÷ (L − 1)"),
                     go.Bar(x=names, y=[r["early_share"] for r in rows], name="share of the first third")])
    fig.update_layout(barmode="group", yaxis_range=[0, 1.02], height=340,
                      title="Where does each model read its image?", legend=dict(orientation="h", y=-0.2))
    return fig
