"""The world: entities, renderer, templates, and the MMEdit-schema dataset generator."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from visedit.world import (FACTS, HELDOUT_TEMPLATES, TEXT_TEMPLATES, TRAIN_TEMPLATES, DatasetSpec, load_mmedit,
                           make_edit_dataset, make_world, render, split_pairs)
from visedit.world.dataset import REQUIRED_FIELDS


def test_world_has_enough_unique_entities(world):
    assert len(world) >= 50
    triples = {(e.shape, e.colour, e.pattern) for e in world.entities}
    assert len(triples) == len(world), "appearance must identify the entity"
    assert len({e.name for e in world.entities}) == len(world)
    # no single visual attribute gives the name away: every value is shared by several entities
    for attr in ("shape", "colour", "pattern"):
        assert min(Counter(getattr(e, attr) for e in world.entities).values()) >= 3


def test_looks_shared_counts_equal_visual_attributes(world):
    a, b = world.entities[0], world.entities[1]
    oracle = (a.shape == b.shape) + (a.colour == b.colour) + (a.pattern == b.pattern)
    assert a.looks_shared(b) == b.looks_shared(a) == oracle
    assert all(e.looks_shared(e) == 3 for e in world.entities)
    counts = Counter(a.looks_shared(b) for a in world.entities for b in world.entities if a is not b)
    assert set(counts) <= {0, 1, 2} and counts[2] > 0  # unique triples: another entity shares at most two


def test_world_is_seeded(world):
    assert make_world(0) == world
    assert make_world(1) != world


def test_unknown_fact_is_a_clear_error(world):
    with pytest.raises(ValueError, match="unknown fact 'size'"):
        world.entities[0].fact("size")


def test_render_is_deterministic_and_masks_match(world):
    a = render(world.entities[3], seed=7)
    b = render(world.entities[3], seed=7)
    assert a.image.tobytes() == b.image.tobytes() and (a.mask == b.mask).all()
    assert render(world.entities[3], seed=8).image.tobytes() != a.image.tobytes()
    assert a.image.size == (64, 64) and a.image.mode == "RGB" and a.mask.shape == (64, 64)
    x0, y0, x1, y1 = a.box
    ys, xs = np.nonzero(a.mask)
    assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x0, y0, x1, y1)


def test_objects_cover_at_most_a_quarter_on_average(world):
    cov = [render(e, seed=i).coverage for i, e in enumerate(world.entities)]
    assert 0.03 < np.mean(cov) <= 0.25
    assert max(cov) < 0.4


def test_object_pixels_carry_the_entity_colour(world):
    from visedit.world.entities import COLOURS

    e = next(e for e in world.entities if e.pattern == "solid")
    r = render(e, seed=0)
    inside = np.asarray(r.image, dtype=float)[r.mask].mean(0)
    assert np.abs(inside - np.asarray(COLOURS[e.colour])).max() < 40


def test_templates():
    words_seen = set()
    for fact in FACTS:
        assert len(TRAIN_TEMPLATES[fact]) >= 3 and len(HELDOUT_TEMPLATES[fact]) >= 2
        assert not set(TRAIN_TEMPLATES[fact]) & set(HELDOUT_TEMPLATES[fact])
        for t in TRAIN_TEMPLATES[fact]:
            words_seen.update(t.split())
    for t in TEXT_TEMPLATES.values():
        for q in t:
            words_seen.update(q.replace("{name}", "").split())
    # held-out paraphrases reuse trained words in new sentences (no untrained word embeddings)
    for fact in FACTS:
        for t in HELDOUT_TEMPLATES[fact]:
            assert set(t.split()) <= words_seen, t


def _digest(folder: Path) -> str:
    """A digest of every file under ``folder`` (names and bytes): equal only for byte-identical trees."""
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            h.update(f.relative_to(folder).as_posix().encode())
            h.update(f.read_bytes())
    return h.hexdigest()


SMALL_SPEC = DatasetSpec(seed=3, n_entities=12, edits_per_pair=2)


def test_dataset_is_byte_identical_for_the_same_seed(tmp_path):
    a = make_edit_dataset(tmp_path / "a", SMALL_SPEC, progress=False)
    b = make_edit_dataset(tmp_path / "b", SMALL_SPEC, progress=False)
    assert _digest(a) == _digest(b)
    c = make_edit_dataset(tmp_path / "c", DatasetSpec(seed=4, n_entities=12, edits_per_pair=2), progress=False)
    assert _digest(a) != _digest(c)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folders left behind"


def test_dataset_schema_and_split(tmp_path):
    root = make_edit_dataset(tmp_path / "d", SMALL_SPEC, progress=False)
    world = make_world(3, 12)
    splits = {}
    for split in ("train", "eval"):
        raw = json.loads((root / f"{split}.json").read_text())
        records = load_mmedit(root / f"{split}.json")
        assert len(records) == len(raw) > 0
        for r in raw:
            assert set(REQUIRED_FIELDS) <= set(r)
            assert r["alt"] != r["pred"] and r["alt"] in world.answers(r["fact"])
            assert r["pred"] == world.by_name(r["entity"]).fact(r["fact"])
            assert r["rephrase"] in HELDOUT_TEMPLATES[r["fact"]]
            assert r["image"] != r["image_rephrase"]
            # the locality probes name what they ask: their answers are those creatures' facts
            assert r["loc_ans"] == world.by_name(r["loc_entity"]).fact(r["loc_fact"])
            assert r["m_loc_a"] == world.by_name(r["m_loc_entity"]).fact(r["m_loc_fact"])
            assert r["m_loc_entity"] != r["entity"]
        for rec in records:
            assert rec.image.exists() and rec.image_rephrase.exists() and rec.m_loc.exists()
        splits[split] = {(r["entity"], r["fact"]) for r in raw}
    assert not splits["train"] & splits["eval"], "train and eval must share no (entity, fact) pair"


def test_default_split_sizes(world):
    spec = DatasetSpec()
    pairs = split_pairs(world, spec.eval_share, spec.seed)
    assert len(pairs["train"]) * spec.edits_per_pair >= 2000
    assert len(pairs["eval"]) * spec.edits_per_pair >= 500


def test_spread_takes_an_even_stride():
    from visedit.world import spread

    assert spread(list(range(10)), 3) == [0, 3, 6]
    assert spread(list(range(10)), 20) == list(range(10))
    assert spread(list(range(1680)), 96) == list(range(0, 1680, 17))[:96]
