"""Editors and the evaluation CLI on the embedded model (integration): the `none` sanity check, the
shipped MEND, bit-identical restore on the real model."""

from __future__ import annotations

import json

import pytest
import torch

from visedit.cli import main
from visedit.editing import EditRequest, get_editor
from visedit.evaluation import evaluate
from visedit.world import load_world_split


@pytest.fixture(scope="module")
def eval_records():
    return load_world_split("eval")


def test_evaluate_none_is_the_sanity_baseline(capsys, tmp_path):
    code = main(["evaluate", "--editor", "none", "--limit", "12", "--json", "--out", str(tmp_path)])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["n"] == 12 and out["editor"] == "none"
    assert out["reliability"] <= 0.05 and out["t_generality"] <= 0.05 and out["m_generality"] <= 0.05
    assert out["t_locality"] == 1.0 and out["m_locality"] == 1.0
    assert out["exact_match"]["t_locality"] == 1.0 and out["exact_match"]["m_locality"] == 1.0
    for key in ("reliability", "t_generality", "m_generality", "t_locality", "m_locality", "edit_seconds_mean"):
        assert key in out
    assert (tmp_path / "summary.json").exists() and len((tmp_path / "edits.jsonl").read_text().splitlines()) == 12


@pytest.mark.parametrize("name", ["ft_l", "ft_v", "ike", "mend"])
def test_restore_is_bit_identical_on_the_embedded_model(embedded, eval_records, name):
    editor = get_editor(name, embedded)
    r = eval_records[0]
    inputs = embedded.inputs([(r.image, r.src, r.alt), (None, r.loc, r.loc_ans), (r.m_loc, r.m_loc_q, r.m_loc_a)])
    before = embedded.logits(inputs)
    with pytest.raises(RuntimeError, match="inside"):
        with editor.edit(EditRequest.from_record(eval_records[5])):
            raise RuntimeError("inside the block")
    assert torch.equal(embedded.logits(inputs), before)


def test_shipped_mend_edits_reliably(embedded, eval_records):
    """The shipped MEND (trained on the train split) on 16 eval edits, one of each six records."""
    summary = evaluate(get_editor("mend", embedded), eval_records[::32][:16], progress=False)
    assert summary.token["reliability"] >= 0.9 and summary.token["t_generality"] >= 0.85
    assert summary.token["t_locality"] >= 0.8 and summary.token["m_locality"] >= 0.8


def test_the_embedded_model_reads_stated_facts(embedded, eval_records):
    """Stage 3 of training (context reading): a new fact in the prompt (IKE) or written over the visual
    tokens is followed on most edits; without it the model answers from memory (reliability ≈ 0.02)."""
    from visedit.editing.vead.analysis import note_reading
    from visedit.evaluation import quick_scores

    sample = eval_records[::42][:12]
    ike = quick_scores(get_editor("ike", embedded), sample)
    assert ike["reliability"] >= 0.7 and ike["t_generality"] >= 0.7 and ike["t_locality"] == 1.0
    notes = note_reading(embedded, sample)
    assert notes.reliability >= 0.5 and notes.m_generality >= 0.5
