"""Attribution II on tiny random LLaVAs: batched vs loop, restoration oracle, region selection and scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from visedit.attribution import (attention_map, deletion_insertion, layout_windows, noise_perturbation,
                                 patch_coverage, restoration_tracing, score_heatmap, select_region, windows)
from visedit.hooks import hook_count
from visedit.models import VisualLayout
from visedit.world import image_question, render


@pytest.fixture(scope="module")
def shot(world):
    return render(world.entities[5], seed=3, size=32)


@pytest.mark.parametrize("radius", [0, 1])
def test_batched_engine_equals_the_reference_loop(tiny_random, shot, radius):
    q = image_question("habitat")
    loop = noise_perturbation(tiny_random, shot.image, q, radius=radius, n=4, seed=3, engine="loop")
    fast = noise_perturbation(tiny_random, shot.image, q, radius=radius, n=4, seed=3, chunk_size=5)
    assert np.abs(loop.array() - fast.array()).max() <= 1e-5
    assert fast.array().shape == (tiny_random.n_layers, 16) and (fast.array() >= 0).all()
    assert fast.array().max() > 0
    again = noise_perturbation(tiny_random, shot.image, q, radius=radius, n=4, seed=3, chunk_size=16)
    assert np.abs(again.array() - fast.array()).max() <= 1e-6  # seeded; chunking changes only float rounding
    other = noise_perturbation(tiny_random, shot.image, q, radius=radius, n=4, seed=4)
    assert not np.array_equal(other.array(), fast.array())


def test_windows_are_clipped_squares():
    m = windows(16, (4, 4), 1)
    assert m.shape == (16, 16) and m[0].sum() == 4 and m[5].sum() == 9
    assert windows(8, None, 2)[0].sum() == 3


def test_windows_on_several_grids_stay_on_their_grid():
    """LLaVA-NeXT: a 2×2 base grid, then a 4×4 grid of tiles whose rows each end in a newline token."""
    layout = VisualLayout(24, ((2, 2), (4, 4)), (False, True))
    m = layout_windows(layout, 1)
    base, tiles = layout.cells(0).ravel(), layout.cells(1).ravel()
    assert list(base) == [0, 1, 2, 3] and list(layout.cells(1)[1]) == [9, 10, 11, 12]
    assert m[0].sum() == 4 and not m[0, 4:].any()  # the whole base grid, nothing of the tiles
    assert m[tiles[5]].sum() == 9 and m[tiles[5]][tiles].sum() == 9
    newlines = sorted(set(range(24)) - set(base) - set(tiles))
    assert newlines == [8, 13, 18, 23] and all(m[t].sum() == 1 for t in newlines)
    with pytest.raises(ValueError, match="radius"):
        layout_windows(layout, 2)


def test_restoring_everything_at_layer_0_recovers_the_clean_output(tiny_random, shot):
    everything = torch.ones(1, 16, dtype=torch.bool)
    r = restoration_tracing(tiny_random, shot.image, image_question("name"), layers=[0, 1],
                            regions=everything, n=3)
    assert r.values[0][0] == pytest.approx(r.clean, abs=1e-6)
    assert r.corrupted != pytest.approx(r.clean, abs=1e-9)
    grid = restoration_tracing(tiny_random, shot.image, image_question("name"), n=2, chunk_size=7)
    assert grid.array().shape == (tiny_random.n_layers, 16) and grid.heatmap(1).shape == (4, 4)


def test_tracing_leaves_no_hooks(tiny_random, shot):
    tiny_random.logits(tiny_random.inputs([(shot.image, image_question("diet"))]))  # transformers' own hooks
    before = hook_count(tiny_random.model)
    noise_perturbation(tiny_random, shot.image, image_question("diet"), radius=1, n=2)
    restoration_tracing(tiny_random, shot.image, image_question("diet"), n=2, layers=[2])
    deletion_insertion(tiny_random, shot.image, image_question("diet"), np.arange(16.0), steps=4)
    assert hook_count(tiny_random.model) == before


@pytest.mark.parametrize("kwargs,message", [
    (dict(radius=2), "larger than the 4×4 grid"),
    (dict(radius=1, sigma=0), "sigma must be > 0"),
    (dict(radius=1, n=0), r"n \(noisy copies\) must be ≥ 1"),
    (dict(radius=1, layers=[]), "layers is empty"),
    (dict(radius=1, layers=[9]), "layer 9 is out of range"),
])
def test_bad_tracing_input(tiny_random, shot, kwargs, message):
    with pytest.raises((ValueError, MemoryError), match=message):
        noise_perturbation(tiny_random, shot.image, image_question("colour"), **kwargs)


def test_a_chunk_larger_than_the_windows_takes_them_all_at_once(tiny_random, shot):
    q = image_question("colour")
    one_step = noise_perturbation(tiny_random, shot.image, q, radius=1, n=3, seed=2, chunk_size=10**9)
    small = noise_perturbation(tiny_random, shot.image, q, radius=1, n=3, seed=2, chunk_size=3)
    np.testing.assert_allclose(one_step.array(), small.array(), atol=1e-6)


def test_a_chunk_that_does_not_fit_is_refused_in_one_line(tiny_random, shot, monkeypatch):
    from visedit.attribution import tracing

    monkeypatch.setattr(tracing, "_available_bytes", lambda device="cpu": 1000)
    with pytest.raises(MemoryError, match=r"^chunk_size=16 needs about 0\.0 GiB, more than is available; pass a smaller"):
        noise_perturbation(tiny_random, shot.image, image_question("colour"), radius=1, n=3, chunk_size=16)


def test_no_visual_tokens(tiny_random):
    with pytest.raises(ValueError, match="no visual tokens"):
        noise_perturbation(tiny_random, None, "where does the mablok live ?")


def test_region_selection_rules():
    h = np.array([[0.5, 0.1], [0.3, 0.1]])
    assert select_region(h, top_k=2).tolist() == [[True, False], [True, False]]
    assert select_region(h, threshold=0.5).tolist() == [[True, False], [True, False]]
    assert select_region(h, mass=0.5).sum() == 1 and select_region(h, mass=0.9).sum() == 3
    with pytest.raises(ValueError, match="exactly one"):
        select_region(h)
    with pytest.raises(ValueError, match="top_k must be in 1…4"):
        select_region(h, top_k=9)


def test_scores_have_oracles(tiny_random, shot):
    cover = patch_coverage(shot.mask, (4, 4))
    perfect = score_heatmap(cover, shot.mask)
    assert perfect.pointing_game == 1.0 and perfect.lift > 1.5
    anti = score_heatmap(1 - cover, shot.mask)
    assert anti.lift < perfect.lift
    uniform = score_heatmap(np.ones((4, 4)), shot.mask)
    assert uniform.lift == pytest.approx(1.0, abs=1e-9)  # a uniform map scores chance
    q = image_question("colour")
    deletion, insertion = deletion_insertion(tiny_random, shot.image, q, cover.ravel(), steps=4)
    clean = tiny_random.logits(tiny_random.inputs([(shot.image, q)]))[0, -1].softmax(-1).max().item()
    assert deletion[0] == pytest.approx(clean, abs=1e-5) and insertion[-1] == pytest.approx(clean, abs=1e-5)
    assert deletion[-1] == pytest.approx(insertion[0], abs=1e-6)  # both: every token blanked
    full = score_heatmap(cover, shot.mask, vllm=tiny_random, image=shot.image, question=q, steps=4)
    assert 0 <= full.deletion_auc <= 1 and 0 <= full.insertion_auc <= 1


def test_attention_map_is_a_distribution_share(tiny_random, shot):
    a = attention_map(tiny_random, shot.image, image_question("shape"), layer=1)
    assert a.shape == (4, 4) and (a >= 0).all() and a.sum() <= 1 + 1e-6


def test_no_hook_survives_an_exception_inside_tracing(tiny_random, shot, monkeypatch):
    tiny_random.logits(tiny_random.inputs([(shot.image, image_question("colour"))]))  # transformers' own hooks
    before = hook_count(tiny_random.model)

    def boom(*args, **kwargs):
        raise RuntimeError("injected")

    monkeypatch.setattr(tiny_random.adapter, "attention_state", boom)
    with pytest.raises(RuntimeError, match="injected"):
        noise_perturbation(tiny_random, shot.image, image_question("colour"), radius=1)
    monkeypatch.setattr(tiny_random.adapter, "run_from", boom)
    with pytest.raises(RuntimeError, match="injected"):
        restoration_tracing(tiny_random, shot.image, image_question("colour"), n=2)
    monkeypatch.undo()
    assert hook_count(tiny_random.model) == before
