"""Precomputed explorers (work in a static page): every slider step and dropdown option shows exactly
its own map on its own image, and the maps drawn are the maps given."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from visedit import viz


def _images():
    rng = np.random.default_rng(0)
    imgs = {o: Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for o in ("a", "b")}
    masks = {o: np.zeros((64, 64), bool) for o in ("a", "b")}
    masks["a"][8:24, 8:24] = True
    return imgs, masks


def test_map_explorer_shows_one_map_per_step_and_option():
    rng = np.random.default_rng(1)
    maps = {(o, l): rng.uniform(0, 1, (8, 8)) for o in ("a", "b") for l in (0, 1, 2)}
    imgs, masks = _images()
    fig = viz.map_explorer(maps, images=imgs, masks=masks, slider="layer", dropdown="example")
    kinds = [t.type for t in fig.data]
    assert kinds == ["image", "heatmap", "heatmap", "heatmap"] * 2
    # the traces drawn are the maps given (to 5 decimals), each token's cell spanning its 8-pixel patch
    for k, key in enumerate(maps):
        trace = fig.data[1 + k + k // 3]
        np.testing.assert_allclose(np.asarray(trace.z), maps[key], atol=5e-6)
        assert (trace.x0, trace.dx, trace.y0, trace.dy) == (3.5, 8.0, 3.5, 8.0)
    # initial view: option a's image and its first map
    assert [bool(t.visible) for t in fig.data] == [True, True, False, False] + [False] * 4
    steps = fig.layout.sliders[0].steps
    assert [s.label for s in steps] == ["0", "1", "2"]
    assert steps[2].args[0]["visible"] == [True, False, False, True] + [False] * 4
    buttons = fig.layout.updatemenus[0].buttons
    assert [b.label for b in buttons] == ["example: a", "example: b"]
    visible_b, layout_b = buttons[1].args
    assert visible_b["visible"] == [False] * 4 + [True, True, False, False]
    assert layout_b["sliders"][0]["steps"][1]["args"][0]["visible"] == [False] * 4 + [True, False, True, False]
    # one colour scale for every map
    assert {(t.zmin, t.zmax) for t in fig.data if t.type == "heatmap"} == {(0, max(m.max() for m in maps.values()))}


def test_map_explorer_without_images_or_dropdown():
    fig = viz.map_explorer({("only", s): np.full((2, 3), s + 1.0) for s in range(2)}, diverging=True)
    assert [t.type for t in fig.data] == ["heatmap", "heatmap"] and not fig.layout.updatemenus
    assert fig.data[0].zmin == -2 and fig.data[0].zmax == 2
    with pytest.raises(ValueError, match="at least one map"):
        viz.map_explorer({})


def test_table_explorer_switches_tables():
    tables = {"x": pd.DataFrame({"q": ["a", "b"], "before": [1, 2]}), "y": pd.DataFrame({"q": ["c"], "before": [3]})}
    fig = viz.table_explorer(tables)
    assert [bool(t.visible) for t in fig.data] == [True, False]
    assert list(fig.data[1].cells.values[0]) == ["c"]
    assert fig.layout.updatemenus[0].buttons[1].args[0]["visible"] == [False, True]


def test_grids_carry_what_reflowing_needs():
    """Each panel of a gallery or heatmap grid is named with the annotation that titles it (none for an
    empty title), in row-major order, so the book's script can move panel and title together."""
    imgs = [Image.new("RGB", (16, 16)) for _ in range(7)]
    meta = viz.gallery(imgs, [f"a<br>{k}" for k in range(7)], cols=3, size=100).layout.meta["visedit_reflow"]
    assert meta == {"n": 7, "cols": 3, "cell": 100, "titles": list(range(7)), "lines": 2}
    fig = viz.heatmap_grid([np.ones((2, 2))] * 5, ["a", "", "c", "d", "e"], cols=4)
    meta = fig.layout.meta["visedit_reflow"]
    assert meta["titles"] == [0, -1, 1, 2, 3] and meta["lines"] == 1
    assert [fig.layout.annotations[i].text for i in meta["titles"] if i >= 0] == ["a", "c", "d", "e"]


def _seq(T, rel, mloc, unrelated_mloc=None, retention=()):
    from types import SimpleNamespace

    final = SimpleNamespace(token={"reliability": rel, "m_generality": rel, "m_locality": mloc},
                            exact={"reliability": rel, "m_generality": rel, "m_locality": mloc})
    unrelated = ({"m_locality": {"token": unrelated_mloc, "exact": unrelated_mloc, "n": 3, "left_out": 1}}
                 if unrelated_mloc is not None else {})
    return SimpleNamespace(T=T, final=final, unrelated=unrelated, retention=list(retention), every=2)


def test_many_edits_figure_draws_each_metric_against_t_with_unrelated_locality():
    from visedit.viz.figures import many_edits_figure, retention_figure

    runs = {"A": [_seq(10, 0.5, 0.9, unrelated_mloc=0.95), _seq(1, 1.0, 1.0)], "B": [_seq(1, 0.2, 0.3)]}
    fig = many_edits_figure(runs)
    a = [t for t in fig.data if t.name == "A"]
    assert len(a) == 3 and list(a[0].x) == [1, 10] and list(a[0].y) == [1.0, 0.5]  # sorted by T
    assert list(a[2].y) == [1.0, 0.95]  # M-Locality on the unrelated probes when the run has them
    assert [t.showlegend for t in a] == [True, False, False] and fig.layout.xaxis.type == "log"
    with pytest.raises(ValueError, match="no runs given"):
        many_edits_figure({})
    rows = [{"after": 2, "token": {"reliability": 0.9}, "exact": {"reliability": 0.8}},
            {"after": 4, "token": {"reliability": 0.6}, "exact": {"reliability": 0.5}}]
    fig = retention_figure({"A": _seq(4, 0.6, 1.0, retention=rows)}, score="exact")
    assert list(fig.data[0].x) == [2, 4] and list(fig.data[0].y) == [0.8, 0.5]
    with pytest.raises(ValueError, match="B: the run has no retention checks"):
        retention_figure({"B": _seq(1, 1.0, 1.0)})


def test_training_curve_draws_one_panel_per_stage_of_a_recipe_record():
    log = [{"stage": s, "step": k, "loss": 1.0 / k} for s in ("encoder", "language", "align", "instruct")
           for k in (100, 200)]
    fig = viz.training_curve({"log": log})
    assert [t.name for t in fig.data] == ["encoder", "language", "align", "instruct"]
    assert all(list(t.x) == [100, 200] for t in fig.data)
    assert fig.layout.annotations[0].text.startswith("1. encoder")
    plain = viz.training_curve({"log": [{"step": 10, "loss": 2.0}, {"step": 20, "loss": 1.0}]})
    assert len(plain.data) == 1 and list(plain.data[0].y) == [2.0, 1.0]
