"""Static figures shared by the chapters (plotly; seaborn for the evaluation results). Figures take
results and arrays; nothing here imports the rest of visedit, so every layer may draw with them."""

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
    return reflowing(fig, len(images), cols=cols, cell=size)


def reflowing(fig, n: int, *, cols: int, cell: int):
    """Mark a row-major grid of ``n`` panels (made by ``make_subplots`` with one title per panel) as one
    that reflows: in the book, ``visedit-figures.js`` gives it as many columns as its width holds (at
    most ``cols``, each at least 0.8 × ``cell`` px wide), moving each panel's axes and title and setting
    the height to match, again whenever the width changes. A 6-wide gallery becomes 3 wide on a phone
    instead of shrinking to thumbnails. Elsewhere (a live notebook) the figure draws as built."""
    titles = []
    for k in range(n):
        x = fig.layout[f"xaxis{k + 1 if k else ''}"].domain
        y = fig.layout[f"yaxis{k + 1 if k else ''}"].domain
        at = [i for i, a in enumerate(fig.layout.annotations)
              if abs(a.x - (x[0] + x[1]) / 2) < 1e-9 and abs(a.y - y[1]) < 1e-9]
        titles.append(at[0] if at else -1)
    lines = max([1] + [fig.layout.annotations[i].text.count("<br>") + 1 for i in titles if i >= 0])
    fig.update_layout(meta={"visedit_reflow": {"n": int(n), "cols": int(cols), "cell": int(cell), "titles": titles,
                                               "lines": lines}})
    return fig


STAGE_TITLES = {"encoder": "1. encoder (contrastive, alone)", "language": "2. decoder on text",
                "align": "3. alignment (projector only)", "instruct": "4. instruction tuning"}


def training_curve(record: dict):
    """Loss over training steps from a ``training.json`` record: one line for the first model's record, one
    panel per stage for a recipe model's (whose log entries name their ``stage``)."""
    import plotly.graph_objects as go

    log = record["log"]
    stages = list(dict.fromkeys(r["stage"] for r in log if "stage" in r))
    if stages:
        from plotly.subplots import make_subplots

        fig = make_subplots(rows=1, cols=len(stages), subplot_titles=[STAGE_TITLES.get(s, s) for s in stages],
                            horizontal_spacing=0.06)
        for k, stage in enumerate(stages):
            rows = [r for r in log if r.get("stage") == stage]
            fig.add_trace(go.Scatter(x=[r["step"] for r in rows], y=[r["loss"] for r in rows], mode="lines",
                                     name=stage, showlegend=False), row=1, col=k + 1)
            fig.update_xaxes(title_text="step", row=1, col=k + 1)
            fig.update_yaxes(type="log", row=1, col=k + 1)
        fig.update_yaxes(title_text="training loss", row=1, col=1)
        fig.update_layout(height=300, margin=dict(l=40, r=10, t=40, b=40))
        return fig
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
    return reflowing(fig, len(heatmaps), cols=cols, cell=size)


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


def image_swap_figure(swap, *, edits: dict[int, float] | None = None, title: str | None = None):
    """After how many layers the answer no longer follows a swapped image (an
    :class:`~visedit.attribution.swap.ImageSwap`): the shares that follow the partner image and that keep
    their own answer, against the number of layers run before the swap. ``edits`` (layer → a score, e.g. a
    VEAD sweep's reliability at the output of that layer) is drawn at the depth where that editor writes."""
    import plotly.graph_objects as go

    depth = list(range(len(swap.follow)))
    fig = go.Figure([go.Scatter(x=depth, y=list(swap.follow), name="follow the swapped image", mode="lines+markers"),
                     go.Scatter(x=depth, y=list(swap.keep), name="keep their own answer", mode="lines+markers")])
    if edits:
        layers = sorted(edits)
        fig.add_trace(go.Scatter(x=[l + 1 for l in layers], y=[edits[l] for l in layers], mode="markers",
                                 marker=dict(symbol="diamond", size=10), name="editor at the output of layer k − 1"))
    fig.update_layout(title=title or f"Swapping the image after k layers (n = {swap.n} pairs)", height=360,
                      xaxis_title="layers run on the record's own image before the swap (k)",
                      yaxis_title="share of answers", yaxis_range=[0, 1.02], legend=dict(orientation="h", y=-0.3))
    return fig


def swaps_and_sweeps_figure(models: dict, *, title: str = "Where the answer stops following the image, and "
                            "where the editor works best"):
    """Several models' image swaps beside their editor sweeps: per model (``name → dict(swap=ImageSwap,
    edits={layer: score}, rule=layer or None)``) the share of answers that follow a swapped image after k
    layers (line), each sweep row drawn at the depth where its editor writes (k = layer + 1, diamonds, same
    colour; none without ``edits``), and the rule's layer as a dotted line there."""
    import plotly.graph_objects as go
    from plotly.colors import DEFAULT_PLOTLY_COLORS as colours

    fig = go.Figure()
    for i, (name, m) in enumerate(models.items()):
        colour, swap = colours[i % len(colours)], m["swap"]
        fig.add_trace(go.Scatter(x=list(range(len(swap.follow))), y=list(swap.follow), mode="lines+markers",
                                 line=dict(color=colour), name=f"{name}: follow the swapped image"))
        edits = m.get("edits") or {}
        layers = sorted(edits)
        if layers:
            fig.add_trace(go.Scatter(x=[l + 1 for l in layers], y=[edits[l] for l in layers], mode="markers",
                                     marker=dict(symbol="diamond", size=11, color=colour),
                                     name=f"{name}: editor at the output of layer k − 1"))
        if m.get("rule") is not None:
            fig.add_vline(x=m["rule"] + 1, line=dict(color=colour, dash="dot"))
    fig.update_layout(title=title, height=400, yaxis_range=[0, 1.02], legend=dict(orientation="h", y=-0.3),
                      xaxis_title="layers run before the swap or the edit (k); dotted: the paper's rule",
                      yaxis_title="share of answers / editor score")
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


def depth_profiles_figure(profiles: dict[str, Sequence[float]], *, title: str = "Where each model's attention "
                          "writes its answer", yaxis: str = "attention contribution"):
    """Per-layer profiles of several models against relative depth (layer ÷ (L − 1)), so that models of
    different depths line up (``profiles``: name → one value per layer)."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for name, values in profiles.items():
        L = len(values)
        fig.add_trace(go.Scatter(x=[l / max(L - 1, 1) for l in range(L)], y=list(values), mode="lines+markers",
                                 name=name))
    fig.update_layout(xaxis_title="relative depth (layer ÷ (L − 1))", yaxis_title=yaxis, height=380, title=title,
                      legend=dict(orientation="h", y=-0.25))
    return fig


#: The metrics a layer sweep is drawn with (the others stay in its table).
SWEEP_METRICS = ("reliability", "m_generality", "m_locality", "mean")


def plot_results(summaries: Sequence, *, score: str = "token"):
    """Seaborn bar chart: metric × editor with the bootstrap intervals. Returns the matplotlib figure."""
    import matplotlib.pyplot as plt
    import pandas as pd
    import seaborn as sns

    rows = []
    for s in summaries:
        values, ci = getattr(s, score), getattr(s, score + "_ci")
        for m in values:  # the five metrics, in the protocol's order
            rows.append({"editor": s.editor, "metric": m, "value": values[m], "lo": ci[m][0], "hi": ci[m][1]})
    df = pd.DataFrame(rows)
    fig, ax = plt.subplots(figsize=(9, 3.6))
    sns.barplot(df, x="metric", y="value", hue="editor", ax=ax, errorbar=None)
    for bar_group, (_, sub) in zip(ax.containers, df.groupby("editor", sort=False)):
        xs = [b.get_x() + b.get_width() / 2 for b in bar_group]
        ax.errorbar(xs, sub["value"], yerr=[sub["value"] - sub["lo"], sub["hi"] - sub["value"]], fmt="none",
                    ecolor="black", elinewidth=0.8, capsize=2)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("token accuracy" if score == "token" else "exact match")
    ax.legend(ncol=len(summaries), fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    fig.tight_layout()
    plt.close(fig)
    return fig


def plot_layer_sweep(rows: Sequence[dict], profile=None):
    """The layer sweep of an editor that sits at one layer (``sweep-vead`` rows: ``layer``, ``at`` and the
    token-accuracy metrics; rows of different IMs or memories are told apart by line style), drawn against a
    :class:`~visedit.attribution.ContributionProfile` (attention and MLP contribution per layer) when given.
    Rows at the output of layer l are drawn at the input of l + 1 (the same stream). Returns the matplotlib
    figure."""
    import matplotlib.pyplot as plt
    import pandas as pd
    import seaborn as sns

    if not rows:
        raise ValueError("no sweep rows given: pass the JSON rows written by `python -m visedit sweep-vead`")
    def variant(r: dict) -> str:
        im = ("no IM" if not r.get("use_im", True) else "IM reads the edit image"
              if r.get("im_reads") == "image" else "IM reads the prompt")
        answer = r.get("settings", {}).get("config", {}).get("memory_reads") == "answer"
        return im + (", memory: the new answer" if answer else "")

    df = pd.DataFrame([{"into layer": r["layer"] + (0 if r.get("at", "output") == "input" else 1), "IM": variant(r),
                        **{m: r[m] for m in SWEEP_METRICS}} for r in rows])
    long = df.melt(id_vars=["into layer", "IM"], value_vars=list(SWEEP_METRICS),
                   var_name="metric", value_name="token accuracy")
    panels = 2 if profile is not None else 1
    fig, axes = plt.subplots(panels, 1, figsize=(10, 3.0 * panels), sharex=True, squeeze=False)
    ax = axes[0, 0]
    sns.lineplot(long, x="into layer", y="token accuracy", hue="metric", style="IM", markers=True, ax=ax)
    ax.set_ylim(0, 1.05)
    ax.set_title("editor trained at the stream entering layer l")
    ax.legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the lines, not on them
    if profile is not None:
        attn, mlp = list(profile.mean["attn"]), list(profile.mean["mlp"])
        contrib = pd.DataFrame({"layer": list(range(len(attn))) + list(range(len(mlp))),
                                "module": ["attention"] * len(attn) + ["MLP"] * len(mlp),
                                "contribution": attn + mlp})
        ax2 = axes[1, 0]
        sns.barplot(contrib, x="layer", y="contribution", hue="module", ax=ax2, native_scale=True)
        ax2.set_title(f"contribution of each layer's modules to the answer (paper formula, {profile.n} records)")
        ax2.set_xlabel("layer l")
        ax2.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    plt.close(fig)
    return fig


def layer_bars(series: dict[str, Sequence[float]], *, low=None, high=None, method: str = "paper", title: str = ""):
    """Grouped bar chart of per-layer values (attention vs MLP), with error bars when given."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for name, values in series.items():
        err = None
        if low is not None and high is not None:
            err = dict(type="data", symmetric=False, array=np.subtract(high[name], values),
                       arrayminus=np.subtract(values, low[name]))
        fig.add_bar(name=name, x=list(range(len(values))), y=list(values), error_y=err)
    fig.update_layout(barmode="group", xaxis_title="LLM layer", height=340, title=title,
                      yaxis_title="contribution" if method == "paper" else "direct logit attribution",
                      margin=dict(l=50, r=10, t=40, b=40))
    return fig


def cascade_maps(maps: Sequence[Sequence[Sequence[float]]], rows: Sequence[str], titles: Sequence[str], *,
                 grid: tuple[int, int] | None, size: int = 64):
    """Maps as a model is randomised step by step: ``maps[i][j]`` is method ``rows[i]``'s map (N_v values)
    at step ``titles[j]``. Each panel shows |map| scaled to its own maximum, on the patch grid (a 1×N_v
    strip without one): what survives randomisation is the ranking of tokens, not the scale."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    n_rows, n_cols = len(maps), len(titles)
    fig = make_subplots(rows=n_rows, cols=n_cols, column_titles=list(titles), row_titles=list(rows),
                        horizontal_spacing=0.005, vertical_spacing=0.012)
    for i, per_step in enumerate(maps):
        for j, values in enumerate(per_step):
            h = np.abs(np.asarray(values, dtype=float))
            h = h / (h.max() or 1.0)
            h = h.reshape(grid) if grid is not None else h[None]
            fig.add_trace(go.Heatmap(z=h, zmin=0, zmax=1, colorscale="Viridis", showscale=i == 0 and j == 0,
                                     colorbar=dict(title="|map| ÷ max", len=0.5)), row=i + 1, col=j + 1)
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False, autorange="reversed")
    fig.update_annotations(font_size=10)
    fig.update_layout(height=n_rows * size + 70, width=n_cols * size + 160, margin=dict(l=5, r=90, t=40, b=5))
    return fig


#: Colours of the verdicts in :func:`verdict_table` (0 fails, 1 passes, 0.5 not run or no claim).
_VERDICT_LEVEL = {"fails": 0.0, "passes": 1.0}


def verdict_table(rows: Sequence[str], columns: Sequence[str], verdicts: Sequence[Sequence[str]],
                  values: Sequence[Sequence[float | None]] | None = None, *, title: str = ""):
    """A methods × tests table as a heatmap: green where a test passes, red where it fails, grey where it
    was not run or does not apply; each cell says the verdict and, when given, its number."""
    import plotly.graph_objects as go

    z = [[_VERDICT_LEVEL.get(v, 0.5) for v in row] for row in verdicts]
    text = []
    for i, row in enumerate(verdicts):
        cells = []
        for j, v in enumerate(row):
            x = None if values is None else values[i][j]
            number = "" if x is None or x != x else f"<br>{x:.2f}" if abs(x) >= 0.01 else f"<br>{x:.0e}"
            cells.append(f"{v}{number}")
        text.append(cells)
    fig = go.Figure(go.Heatmap(z=z, x=list(columns), y=list(rows), zmin=0, zmax=1, showscale=False, text=text,
                               texttemplate="%{text}", hoverinfo="skip", xgap=2, ygap=2,
                               colorscale=[[0, "#e4937b"], [0.5, "#d9d9d9"], [1, "#8cc68c"]]))
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(title=title, height=60 + 42 * len(rows), margin=dict(l=10, r=10, t=50, b=10))
    return fig


def map_explorer(maps: dict, *, images: dict | None = None, masks: dict | None = None, slider: str = "layer",
                 dropdown: str = "example", title: str = "", diverging: bool = False, size: int = 360):
    """A precomputed explorer that works in a static page: heatmaps over visual tokens, one per
    (option, step) of ``maps`` (a dict keyed by (dropdown option, slider step), insertion-ordered), drawn
    on the option's image from ``images`` with its mask from ``masks`` outlined. A dropdown picks the
    option, a slider the step (e.g. example × layer); every map is in the page, nothing is recomputed.
    One colour scale for the whole figure."""
    import plotly.graph_objects as go

    if not maps:
        raise ValueError("map_explorer needs at least one map")
    options = list(dict.fromkeys(o for o, _ in maps))
    steps = {o: [s for (p, s) in maps if p == o] for o in options}
    vmax = max(float(np.abs(np.asarray(m, dtype=float)).max()) for m in maps.values()) or 1.0
    scale = dict(colorscale="RdBu_r", zmin=-vmax, zmax=vmax) if diverging else dict(colorscale="Viridis", zmin=0,
                                                                                    zmax=vmax)
    fig = go.Figure()
    owner = []  # (option, step or None for the image) of each trace
    for o in options:
        base = None
        if images is not None and images.get(o) is not None:
            base = outline(images[o], masks[o]) if masks is not None and masks.get(o) is not None else \
                np.asarray(images[o].convert("RGB"))
            fig.add_trace(go.Image(z=base, hoverinfo="skip", visible=o == options[0]))
            owner.append((o, None))
        for s in steps[o]:
            h = np.asarray(maps[(o, s)], dtype=float)
            place = {}
            if base is not None and h.shape[0] > 1:  # each token's cell spans its patch of the image (no upsampling:
                H, W = base.shape[:2]                # the page carries the map itself)
                sy, sx = H / h.shape[0], W / h.shape[1]
                place = dict(x0=sx / 2 - 0.5, dx=sx, y0=sy / 2 - 0.5, dy=sy)
            fig.add_trace(go.Heatmap(z=np.round(h, 5), opacity=0.6 if base is not None else 1.0, showscale=True, **place,
                                     visible=(o, s) == (options[0], steps[options[0]][0]),
                                     hovertemplate=f"{slider} {s}: %{{z:.3f}}<extra></extra>", **scale))
            owner.append((o, s))

    def visible(o, s):
        return [p == o and (q is None or q == s) for p, q in owner]

    def slider_of(o):
        return dict(active=0, currentvalue=dict(prefix=f"{slider}: "), pad=dict(t=30),
                    steps=[dict(label=str(s), method="restyle", args=[{"visible": visible(o, s)}]) for s in steps[o]])

    fig.update_layout(sliders=[slider_of(options[0])])
    if len(options) > 1:
        fig.update_layout(updatemenus=[dict(
            type="dropdown", x=0, xanchor="left", y=1.0, yanchor="bottom", showactive=True,
            buttons=[dict(label=f"{dropdown}: {o}", method="update",
                          args=[{"visible": visible(o, steps[o][0])}, {"sliders": [slider_of(o)]}]) for o in options])])
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False, autorange="reversed", scaleanchor="x")
    fig.update_layout(title=dict(text=title, y=0.98), height=size + 150, margin=dict(l=5, r=5, t=80, b=10))
    return fig


def table_explorer(tables: dict, *, dropdown: str = "edit", title: str = ""):
    """A precomputed explorer of tables: one ``pandas.DataFrame`` per option of ``tables``, a dropdown
    to pick which is shown. Works in a static page."""
    import plotly.graph_objects as go

    if not tables:
        raise ValueError("table_explorer needs at least one table")
    options = list(tables)
    fig = go.Figure()
    for k, o in enumerate(options):
        df = tables[o]
        fig.add_trace(go.Table(header=dict(values=[f"<b>{c}</b>" for c in df.columns], align="left"),
                               cells=dict(values=[df[c].astype(str).tolist() for c in df.columns], align="left"),
                               visible=k == 0))
    if len(options) > 1:
        fig.update_layout(updatemenus=[dict(
            type="dropdown", x=0, xanchor="left", y=1.0, yanchor="bottom", showactive=True,
            buttons=[dict(label=f"{dropdown}: {o}", method="update", args=[{"visible": [j == k for j in range(len(options))]}])
                     for k, o in enumerate(options)])])
    n = max(len(t) for t in tables.values())
    fig.update_layout(title=dict(text=title, y=0.98), height=140 + 32 * n, margin=dict(l=5, r=5, t=80, b=5))
    return fig


#: The metrics the many-edits figure draws (M-Locality on the probes about facts no edit changed).
MANY_EDITS_METRICS = ("reliability", "m_generality", "m_locality")


def _many_edits_value(summary, metric: str, score: str):
    unrelated = (getattr(summary, "unrelated", None) or {}).get(metric)
    if unrelated is not None and unrelated.get(score) is not None:
        return unrelated[score]
    return getattr(summary.final, score)[metric]


def many_edits_figure(runs: dict, *, metrics: Sequence[str] = MANY_EDITS_METRICS, score: str = "token"):
    """Many edits: each metric after T sequential edits against T (log scale), one line per editor.
    ``runs``: label → sequential summaries (``T``, ``final`` and ``unrelated``, see
    :class:`~visedit.evaluation.SequentialSummary`) at several T. A locality is drawn on the probes about
    facts that no edit of the run changed. Returns the plotly figure."""
    from plotly.subplots import make_subplots
    import plotly.graph_objects as go

    if not runs:
        raise ValueError("no runs given: pass {label: [SequentialSummary, …]} from `evaluate --sequential T`")
    fig = make_subplots(rows=1, cols=len(metrics), subplot_titles=[m.replace("_", "-") for m in metrics],
                        shared_yaxes=True, horizontal_spacing=0.04)
    palette = ("#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3")
    for k, (label, summaries) in enumerate(runs.items()):
        ordered = sorted(summaries, key=lambda s: s.T)
        for col, metric in enumerate(metrics, start=1):
            fig.add_trace(go.Scatter(x=[s.T for s in ordered], y=[_many_edits_value(s, metric, score) for s in ordered],
                                     mode="lines+markers", name=label, legendgroup=label, showlegend=col == 1,
                                     line=dict(color=palette[k % len(palette)])), row=1, col=col)
    fig.update_xaxes(type="log", title_text="edits applied (T)")
    fig.update_yaxes(range=[0, 1.05])
    fig.update_yaxes(title_text="token accuracy" if score == "token" else "exact match", col=1)
    fig.update_layout(height=360, title="After T edits in a row, without restoring",
                      legend=dict(orientation="h", y=-0.3))
    return fig


def retention_figure(runs: dict, *, metric: str = "reliability", score: str = "token"):
    """Retention: ``metric`` of the *first* edits of a run, scored again as more edits are applied, one line
    per editor (``runs``: label → a sequential summary with retention checks, ``every`` > 0). Returns the
    plotly figure."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for label, summary in runs.items():
        if not summary.retention:
            raise ValueError(f"{label}: the run has no retention checks; run it with --every K")
        fig.add_trace(go.Scatter(x=[r["after"] for r in summary.retention],
                                 y=[r[score][metric] for r in summary.retention], mode="lines+markers", name=label))
    first = {s.every for s in runs.values()}
    fig.update_layout(height=340, xaxis_title="edits applied", yaxis_range=[0, 1.05],
                      yaxis_title=f"{metric.replace('_', '-')} of the first {'/'.join(map(str, sorted(first)))} edits",
                      title="Do the first edits survive the later ones?", legend=dict(orientation="h", y=-0.3))
    return fig
