"""Sanity checks of the maps (model randomisation, completeness) on tiny random LLaVAs, and the CLI on the
embedded model: the model in use is never changed, randomisation is seeded, blocks above a map's layer
leave it alone (the oracle), and the result serialises and plots itself."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from visedit.attribution import sanity_checks
from visedit.attribution.sanity import METHODS, SanityChecks, model_copy
from visedit.cli import main
from visedit.editing import VEADConfig, VEADEditor
from visedit.hooks import hook_count
from visedit.stats import rank_correlation
from visedit.world import DatasetSpec, load_world_split


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    spec = DatasetSpec(seed=1, n_entities=8, edits_per_pair=1, image_size=32)
    return load_world_split("eval", spec, root=tmp_path_factory.mktemp("sanity_world"))[:2]


@pytest.fixture(scope="module")
def before(tiny_random, records):
    """The model in use before the checks: its state dict (copied) and its hook count after one forward
    pass (transformers adds hooks of its own in the first one)."""
    tiny_random.logits(tiny_random.inputs([(records[0].image, records[0].src)]))
    return {k: v.clone() for k, v in tiny_random.model.state_dict().items()}, hook_count(tiny_random.model)


@pytest.fixture(scope="module")
def result(tiny_random, records, before):
    editor = VEADEditor(tiny_random, VEADConfig(layer=1))  # untrained, but its IM already maps tokens to a gate
    return sanity_checks(tiny_random, records, layer=1, editor=editor, progress=False)


def test_the_model_in_use_is_bit_identical_after(tiny_random, result, before):
    state, hooks = before
    after = tiny_random.model.state_dict()
    assert set(after) == set(state)
    assert all(torch.equal(state[k], t) for k, t in after.items())
    assert hook_count(tiny_random.model) == hooks


def test_the_cascade_goes_top_down(tiny_random, result):
    L = tiny_random.n_layers
    assert result.steps == tuple(f"llm.layers.{l}" for l in reversed(range(L))) + (
        "projector", "vision.layers.1", "vision.layers.0")
    assert result.decoder_steps == L
    assert set(result.correlation) == set(METHODS) and all(len(v) == len(result.steps)
                                                          for v in result.correlation.values())


def test_blocks_above_a_maps_layer_leave_it_alone(result):
    """Oracle: attention and noise at layer 1 read nothing above it, and the gate at the output of layer 1
    nothing above it either: while only layer 2 is random, their maps are the original ones (ρ = 1)."""
    for m in ("attention", "noise", "gate"):
        assert result.correlation[m][0] == 1.0 and result.correlation_signed[m][0] == 1.0
        assert result.example[m][1] == result.example[m][0]


def test_completeness_and_verdicts(result):
    assert result.completeness["allocation"] <= 1e-4 and result.completeness["dla"] <= 1e-4
    assert result.completeness["ig_pixels"] <= 0.05 and result.completeness["ig_layer"] <= 0.05
    for m in METHODS:
        v = result.verdicts[m]
        assert v["data_randomisation"] == "not run" and v["model_randomisation"] in ("passes", "fails")
        failed = abs(result.verdict_correlation(m)) >= 0.5 or m == "gate" and abs(result.gate_im_random) >= 0.5
        assert (v["model_randomisation"] == "fails") == failed
        assert v["overall"] == ("fails" if "fails" in v.values() else "passes")
    assert result.verdicts["attention"]["completeness"] == "n/a" and result.verdicts["dla"]["completeness"] == "passes"
    assert result.data_randomisation.startswith("not run: ") and "\n" not in result.data_randomisation


def test_the_result_serialises_and_plots(result):
    data = json.loads(result.to_json())
    again = SanityChecks.from_dict(data)
    assert again.to_json() == result.to_json()
    table = result.table()
    assert list(table.index) == list(METHODS) + ["dla"] and "verdict" in table
    fig = result.plot(steps=[0, result.decoder_steps - 1])
    assert len(fig.data) == len(METHODS) * 3
    assert len(result.plot_table().data) == 1


def test_randomisation_is_seeded(tiny_random, records):
    kw = dict(methods=["allocation", "ig_layer"], layer=1, vision=False, progress=False)
    a, b = (sanity_checks(tiny_random, records[:1], seed=3, **kw) for _ in range(2))
    assert a.correlation == b.correlation and a.example == b.example
    c = sanity_checks(tiny_random, records[:1], seed=4, **kw)
    assert c.example != a.example and len(a.steps) == tiny_random.n_layers


def test_the_gate_is_skipped_with_a_reason(tiny_random, records):
    res = sanity_checks(tiny_random, records[:1], methods=["attention", "gate"], vision=False, progress=False)
    assert "gate" not in res.correlation and res.verdicts["gate"]["overall"].startswith("skipped: no trained VEAD")
    assert res.gate_im_random is None and res.layer == tiny_random.n_layers // 2


def test_a_copy_has_its_own_weights(tiny_random):
    clone = model_copy(tiny_random)
    assert clone.processor is tiny_random.processor and clone.adapter.model is clone.model
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(clone.model.parameters(), tiny_random.model.parameters()))


@pytest.mark.parametrize("kw, message", [({"methods": ["saliency"]}, r"unknown method\(s\) \['saliency'\]"),
                                         ({"methods": []}, "no methods given"),
                                         ({"threshold": 0}, r"threshold must be in \(0, 1\]"),
                                         ({"layer": 9}, "layer 9 is out of range")])
def test_bad_settings_are_one_line(tiny_random, records, kw, message):
    with pytest.raises(ValueError, match=message) as err:
        sanity_checks(tiny_random, records, progress=False, **kw)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="no records given"):
        sanity_checks(tiny_random, [], progress=False)


def test_rank_correlation_with_ties():
    assert rank_correlation([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert rank_correlation([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert rank_correlation([1, 1, 2, 2], [5, 5, 7, 7]) == pytest.approx(1.0)  # ties share their rank
    assert rank_correlation([1, 2, 3], [7, 7, 7]) == 0.0 and np.isnan(rank_correlation([7, 7, 7], [1, 2, 3]))


def test_sanity_cli_on_the_embedded_model(capsys, tmp_path):
    out = tmp_path / "sanity.json"
    assert main(["sanity", "--json", "--limit", "1", "--methods", "allocation", "attention", "--decoder-only",
                 "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text())
    assert printed["n_records"] == 1 and len(printed["steps"]) == 8 and printed["command"].startswith("python -m")
    assert printed["completeness"]["allocation"] <= 1e-4
    assert set(printed["verdicts"]) == {"allocation", "attention", "dla"}


@pytest.mark.parametrize("args, message", [(["--methods", "saliency"], "--methods: unknown saliency"),
                                           (["--limit", "0"], "--limit must be ≥ 1"),
                                           (["--methods", "noise", "--vead"], "--vead gives the gate's VEAD")])
def test_sanity_cli_bad_input_is_one_line_before_the_model_loads(capsys, monkeypatch, args, message):
    monkeypatch.setattr("visedit.models.load_vllm", lambda *a, **k: pytest.fail("model loaded before the check"))
    assert main(["sanity", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
