"""The world's second edition: scenes of several creatures, selecting questions, captions, scene edits."""

from __future__ import annotations

import hashlib
import json
import random

import numpy as np
import pytest

from visedit.world import (FACTS, SCENE_HELDOUT_TEMPLATES, SCENE_TEMPLATES, DatasetSpec, askable, caption, load_mmedit,
                           make_edit_dataset, make_world, render, render_scene, scene_question, selectors)
from visedit.world.entities import COLOURS, DIETS, HABITATS
from visedit.world.scene import position_words

SCENE_SMALL = DatasetSpec(seed=3, n_entities=12, edits_per_pair=1, image_size=80, edition=2)


def _scenes(world, n=40, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        ents = [world.entities[j] for j in rng.choice(len(world), 1 + i % 4, replace=False)]
        out.append(render_scene(ents, seed=int(rng.integers(1 << 30))))
    return out


def test_scene_is_deterministic_and_every_creature_has_its_own_mask(world):
    ents = world.entities[:3]
    a, b = render_scene(ents, seed=5), render_scene(ents, seed=5)
    assert a.image.tobytes() == b.image.tobytes() and a.image.size == (80, 80)
    assert render_scene(ents, seed=6).image.tobytes() != a.image.tobytes()
    for scene in _scenes(world):
        assert len(scene.masks) == len(scene.entities) == len(scene.boxes) == len(scene)
        total = np.zeros(scene.masks[0].shape, int)
        for k, m in enumerate(scene.masks):
            x0, y0, x1, y1 = scene.boxes[k]
            ys, xs = np.nonzero(m)
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x0, y0, x1, y1)
            assert m.sum() > 60, "every creature stays visible"
            total += m
        assert total.max() <= 1, "visible masks are disjoint"


def test_scene_pixels_carry_each_creature_colour(world):
    scene = _scenes(world, 8)[7]
    arr = np.asarray(scene.image, dtype=float)
    for e, m in zip(scene.entities, scene.masks):
        pix = arr[m]
        bright = pix[pix.sum(1) >= np.percentile(pix.sum(1), 60)].mean(0)
        assert np.abs(bright - np.asarray(COLOURS[e.colour])).max() < 45


def test_scene_refuses_bad_inputs(world):
    with pytest.raises(ValueError, match="1 to 4"):
        render_scene(world.entities[:5], seed=0)
    with pytest.raises(ValueError, match="same creature twice"):
        render_scene([world.entities[0]] * 2, seed=0)
    with pytest.raises(ValueError, match="at least 48"):
        render_scene(world.entities[:2], seed=0, size=32)


def test_selectors_pick_out_exactly_their_creature(world):
    for scene in _scenes(world, 60, seed=1):
        for k in range(len(scene)):
            sel = selectors(scene, k)
            if len(scene) == 1:
                assert sel == {"none": "this creature"}
                continue
            xs = [c[0] for c in scene.centres]
            ys = [c[1] for c in scene.centres]
            oracle = {"left": min(range(len(scene)), key=lambda j: xs[j]),
                      "right": max(range(len(scene)), key=lambda j: xs[j]),
                      "top": min(range(len(scene)), key=lambda j: ys[j]),
                      "bottom": max(range(len(scene)), key=lambda j: ys[j])}
            for kind in ("left", "right", "top", "bottom"):
                if kind in sel:
                    assert oracle[kind] == k
            for attr in ("colour", "pattern"):
                shared = sum(e.fact(attr) == scene.entities[k].fact(attr) for e in scene.entities)
                assert (attr in sel) == (shared == 1)
                if attr in sel:
                    assert sel[attr] == f"the {scene.entities[k].fact(attr)} creature"


def test_a_selector_never_gives_the_answer_away(world):
    for scene in _scenes(world, 30, seed=2):
        for k in range(len(scene)):
            assert "colour" not in askable(scene, k, "colour")
            assert "pattern" not in askable(scene, k, "pattern")
    with pytest.raises(ValueError, match="gives the colour away"):
        scene_question("colour", "the red creature", kind="colour")
    assert scene_question("diet", "the creature on the left") == "what does the creature on the left eat ?"
    assert scene_question("diet", "this creature", heldout=True) == SCENE_HELDOUT_TEMPLATES["diet"][0].format(
        x="this creature")
    assert set(SCENE_TEMPLATES) == set(SCENE_HELDOUT_TEMPLATES) == set(FACTS)


def test_captions_describe_looks_and_places_never_names_or_facts(world):
    names = {e.name for e in world.entities}
    for scene in _scenes(world, 30, seed=3):
        text = caption(scene, rng=random.Random(0))
        assert text.count(" .") == len(scene)
        words = set(text.replace(".", " ").split())
        assert not words & names
        assert not words & {w for h in HABITATS + DIETS for w in h.split()}
        for k, e in enumerate(scene.entities):
            assert f"{e.colour} {e.pattern} {e.shape} {position_words(scene, k)}" in text


def test_first_edition_rendering_is_unchanged(world):
    """The scene renderer shares the painter with the first edition, which must stay byte-identical."""
    digest = hashlib.md5(b"".join(render(e, seed=i).image.tobytes() for i, e in enumerate(world.entities[:20])))
    assert digest.hexdigest() == "30d2f7e92baf8a904c57d00895e83a1a"


@pytest.fixture(scope="module")
def scene_dataset(tmp_path_factory):
    return make_edit_dataset(tmp_path_factory.mktemp("scenes") / "d", SCENE_SMALL, progress=False)


def test_scene_dataset_is_valid_mmedit_with_region_probes(scene_dataset):
    world = make_world(3, 12)
    for split in ("train", "eval"):
        raw = json.loads((scene_dataset / f"{split}.json").read_text())
        records = load_mmedit(scene_dataset / f"{split}.json")
        assert len(records) == len(raw) > 0
        for r, rec in zip(raw, records):
            entity = world.by_name(r["entity"])
            assert r["pred"] == entity.fact(r["fact"]) and r["alt"] != r["pred"]
            assert 2 <= r["n_creatures"] <= 4 and r["edition"] == 2
            assert r["i_loc_entity"] != r["entity"]
            assert r["i_loc_a"] == world.by_name(r["i_loc_entity"]).fact(r["i_loc_fact"])
            assert r["m_loc_entity"] != r["entity"]
            # each probe names what it asks: its answer is that creature's fact
            assert r["m_loc_a"] == world.by_name(r["m_loc_entity"]).fact(r["m_loc_fact"])
            assert r["loc_ans"] == world.by_name(r["loc_entity"]).fact(r["loc_fact"])
            assert r["la_loc_fact"] == r["fact"]
            twin = world.by_name(r["la_loc_entity"])
            assert twin.name != entity.name and entity.looks_shared(twin) == r["la_loc_shared"]
            assert r["la_loc_a"] == twin.fact(r["fact"])
            assert r["rephrase"] != r["src"]
            # the masks of the two creatures asked about in one image do not overlap
            assert not (rec.mask("image") & rec.mask("i_loc")).any()
            assert rec.mask("la_loc").any() and rec.extra["la_loc"].exists()


def test_scene_dataset_prefers_look_alikes_sharing_two_attributes(scene_dataset):
    world = make_world(3, 12)
    raw = json.loads((scene_dataset / "train.json").read_text())
    for r in raw:
        entity = world.by_name(r["entity"])
        best = max(entity.looks_shared(e) for e in world.entities if e is not entity)
        assert r["la_loc_shared"] == best


def test_scene_dataset_is_byte_identical_for_the_same_seed(tmp_path, scene_dataset):
    from test_world import _digest as digest

    again = make_edit_dataset(tmp_path / "again", SCENE_SMALL, progress=False)
    assert digest(again) == digest(scene_dataset)


def test_dataset_spec_refuses_a_bad_edition():
    with pytest.raises(ValueError, match="edition must be 1"):
        DatasetSpec(edition=3)
    with pytest.raises(ValueError, match="image_size ≥ 48"):
        DatasetSpec(edition=2, image_size=32)
