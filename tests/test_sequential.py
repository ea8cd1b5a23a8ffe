"""The sequential (lifelong) protocol on a tiny random LLaVA: T = 1 is the single-edit protocol, the edit
order is seeded and recorded, an interrupted run resumes to what an unbroken one writes, batches and
retention checks, and the `evaluate --sequential` CLI."""

from __future__ import annotations

import json

import pytest

from visedit.cli import main
from visedit.editing import get_editor
from visedit.evaluation import SequentialSummary, edit_order, evaluate_sequential, score_edit
from visedit.world import DatasetSpec, load_world_split

# seed 0: entity names come from the same world as the tiny model's vocabulary
SPEC = DatasetSpec(seed=0, n_entities=10, edits_per_pair=1, image_size=32)


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    return load_world_split("eval", SPEC, root=tmp_path_factory.mktemp("seq_data"))


def _ft_l(vllm):
    return get_editor("ft_l", vllm, layer=-1, max_steps=2, stop_loss=0.0)


def _rows(path, drop=("seconds", "edit_seconds", "total_seconds")):
    return [{k: v for k, v in json.loads(line).items() if k not in drop} for line in path.read_text().splitlines()]


def test_one_sequential_edit_is_the_single_edit_protocol(tiny_random, records, tmp_path):
    editor = _ft_l(tiny_random)
    summary = evaluate_sequential(editor, records[:5], T=1, seed=3, out=tmp_path, progress=False)
    k = summary.order[0]
    single = score_edit(editor, records[k], index=k)
    row = json.loads((tmp_path / "edits.jsonl").read_text())
    assert row["index"] == k and row["token"] == single.token and row["exact"] == single.exact
    assert row["answers"] == single.answers
    assert not editor.applied


def test_the_edit_order_is_seeded_recorded_and_a_prefix_at_larger_t(tiny_random, records, tmp_path):
    assert edit_order(20, 5, 0) == edit_order(20, 5, 0) != edit_order(20, 5, 1)
    assert edit_order(20, 12, 0)[:5] == edit_order(20, 5, 0)
    assert sorted(edit_order(20, 20, 4)) == list(range(20))
    summary = evaluate_sequential(get_editor("none", tiny_random), records[:8], T=4, every=2, seed=7, out=tmp_path,
                                  progress=False)
    assert summary.order == edit_order(8, 4, 7) == json.loads((tmp_path / "run.json").read_text())["order"]
    assert [r["index"] for r in _rows(tmp_path / "edits.jsonl")] == summary.order
    assert summary.final.token["t_locality"] == summary.final.token["m_locality"] == 1.0  # nothing edited
    assert [r["after"] for r in summary.retention] == [2, 4]
    assert SequentialSummary.load(tmp_path / "summary.json") == summary
    assert summary.retention_frame().shape == (2, 5)
    with pytest.raises(ValueError, match="only 8 records"):
        edit_order(8, 9, 0)


def test_resume_after_kill_equals_an_unbroken_run(tiny_random, records, tmp_path, monkeypatch):
    recs = records[:6]
    kw = dict(T=5, every=2, seed=1, progress=False)
    full = evaluate_sequential(_ft_l(tiny_random), recs, out=tmp_path / "full", **kw)
    editor = _ft_l(tiny_random)
    calls = {"n": 0}
    original = type(editor)._apply

    def dies_at_fourth(self, request):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        original(self, request)

    monkeypatch.setattr(type(editor), "_apply", dies_at_fourth)
    with pytest.raises(KeyboardInterrupt):
        evaluate_sequential(editor, recs, out=tmp_path / "cut", **kw)
    monkeypatch.setattr(type(editor), "_apply", original)
    assert not editor.applied and len((tmp_path / "cut" / "steps.jsonl").read_text().splitlines()) == 3
    with open(tmp_path / "cut" / "steps.jsonl", "a") as f:
        f.write('{"step": 3, "edi')  # a line half-written when the process died
    resumed = evaluate_sequential(editor, recs, out=tmp_path / "cut", **kw)
    for name in ("steps.jsonl", "edits.jsonl"):
        assert _rows(tmp_path / "cut" / name) == _rows(tmp_path / "full" / name)
    assert resumed.final.token == full.final.token and resumed.retention == full.retention
    with pytest.raises(ValueError, match="differs in T"):
        evaluate_sequential(editor, recs, out=tmp_path / "cut", **{**kw, "T": 4})


def test_batches_and_their_rules(tiny_random, records, tmp_path):
    editor = _ft_l(tiny_random)
    summary = evaluate_sequential(editor, records[:6], T=5, batch=2, every=2, out=tmp_path, progress=False)
    steps = _rows(tmp_path / "steps.jsonl")
    assert [len(s["edited"]) for s in steps] == [2, 2, 1] and [s["after"] for s in steps] == [2, 4, 5]
    assert [s["edited"] for s in steps] == [summary.order[:2], summary.order[2:4], summary.order[4:]]
    assert len(summary.held_bytes) == 3 and summary.held_bytes[-1] > 0  # FT-L keeps the pre-edit layer
    assert summary.final.n == 5 and summary.edit_seconds_mean > 0
    with pytest.raises(ValueError, match="multiple of batch"):
        evaluate_sequential(editor, records[:6], T=4, batch=2, every=3, progress=False)
    with pytest.raises(ValueError, match="positive int"):
        evaluate_sequential(editor, records[:6], T=0, progress=False)


def test_evaluate_cli_sequential(tiny_random_dir, records, tmp_path, capsys):
    data = tmp_path / "eval.json"
    raw = json.loads((records[0].image.parents[1] / "eval.json").read_text())[:4]
    data.write_text(json.dumps(raw))
    (tmp_path / "images").symlink_to(records[0].image.parent)
    code = main(["evaluate", "--editor", "none", "--model", str(tiny_random_dir), "--data", str(data),
                 "--sequential", "3", "--every", "1", "--seed", "2", "--out", str(tmp_path / "out"), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["T"] == 3 and out["order"] == edit_order(4, 3, 2) and len(out["retention"]) == 3
    assert main(["evaluate", "--editor", "none", "--model", str(tiny_random_dir), "--every", "2"]) == 2
    assert "only apply to --sequential" in capsys.readouterr().err


def test_ike_keeps_the_newest_facts_that_fit_and_can_refuse_instead(tiny_random):
    """Stacked IKE facts outgrow the model's positions: the window keeps the demonstrations and the newest
    facts (the oldest fall out, counted in ``dropped``); ``overflow='error'`` refuses in one line."""
    from visedit.editing import EditRequest, IKEConfig, InContextEditor
    from visedit.world import image_question, load_world_split

    recs = load_world_split("train")[:60]
    ike = InContextEditor(tiny_random, IKEConfig(n_demos=1), demos=recs)
    item = (recs[0].image, recs[0].src, recs[0].alt)
    for r in recs[:50]:
        ike.apply(EditRequest.from_record(r))
    scores = ike.score_batch([item])
    assert 0 < ike.dropped < 50 and len(scores) == 1
    kept = 50 - ike.dropped
    ctx = ike.context(kept)
    assert ctx.endswith(tiny_random.frame.turn(recs[49].src, recs[49].alt))
    assert tiny_random.frame.turn(recs[0].src, recs[0].alt) + " " not in ctx.replace(ike.demonstrations, "", 1)
    # the kept context is the longest that fits: one more fact does not
    tiny_random.inputs([item], context=ctx)
    with pytest.raises(ValueError, match="positions"):
        tiny_random.inputs([item], context=ike.context(kept + 1))
    assert len(ike.answer_batch([item[:2]], max_new_tokens=4)) == 1
    ike.restore()
    strict = InContextEditor(tiny_random, IKEConfig(n_demos=1, overflow="error"), demos=recs)
    for r in recs[:50]:
        strict.apply(EditRequest.from_record(r))
    with pytest.raises(ValueError, match="overflow='window'") as err:
        strict.score_batch([item])
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="overflow"):
        IKEConfig(overflow="drop")


def test_locality_after_many_edits_leaves_out_probes_about_an_edited_fact(tiny_random, records, tmp_path):
    """A locality probe about a (creature, fact) that another edit of the run changed should change: the
    `unrelated` scores leave such probes out and count them."""
    import dataclasses
    from types import SimpleNamespace

    from visedit.evaluation.sequential import edited_facts, unrelated_locality

    assert all({"loc_entity", "loc_fact", "m_loc_entity", "m_loc_fact"} <= set(r.extra) for r in records)
    nobody = {"loc_entity": "nobody", "loc_fact": "diet", "m_loc_entity": "nobody", "m_loc_fact": "colour"}
    recs = [dataclasses.replace(r, extra={**r.extra, **nobody}) for r in records[:6]]  # probes about no edit
    # record 1's multimodal probe asks about record 0's edited fact, record 2's text probe about record 3's
    recs[1] = dataclasses.replace(recs[1], extra={**recs[1].extra, "m_loc_entity": recs[0].extra["entity"],
                                                  "m_loc_fact": recs[0].extra["fact"]})
    recs[2] = dataclasses.replace(recs[2], extra={**recs[2].extra, "loc_entity": recs[3].extra["entity"],
                                                  "loc_fact": recs[3].extra["fact"]})
    edited = edited_facts(recs)
    assert (recs[0].extra["entity"], recs[0].extra["fact"]) in edited and len(edited) <= 6
    # an oracle on hand-made scores: the kept probes' mean
    fake = [SimpleNamespace(token={"t_locality": t, "m_locality": m}, exact={"t_locality": t, "m_locality": m})
            for t, m in ((1, 1), (1, 0), (0, 1), (1, 1), (1, 1), (0, 0))]
    got = unrelated_locality(fake, recs, edited)
    assert got["m_locality"] == {"token": 0.8, "exact": 0.8, "n": 5, "left_out": 1}  # (1+1+1+1+0)/5, not 4/6
    assert got["t_locality"] == {"token": 0.8, "exact": 0.8, "n": 5, "left_out": 1}  # (1+1+1+1+0)/5, not 4/6
    assert unrelated_locality(fake, recs, set())["m_locality"]["left_out"] == 0
    # the protocol: every edit applied, so both crafted probes are left out
    summary = evaluate_sequential(get_editor("none", tiny_random), recs, T=6, every=3, seed=0, out=tmp_path,
                                  progress=False)
    assert summary.unrelated["m_locality"]["left_out"] == 1 and summary.unrelated["m_locality"]["n"] == 5
    assert summary.unrelated["t_locality"]["left_out"] == 1 and summary.unrelated["m_locality"]["token"] == 1.0
    assert SequentialSummary.load(tmp_path / "summary.json").unrelated == summary.unrelated
    assert all("unrelated" in r for r in summary.retention)
    from visedit.evaluation.sequential import creature_breakdown

    frame = creature_breakdown(tmp_path, recs)  # the none editor: locality 1, generality 0 in every group
    assert frame.loc["m_locality"]["probes"].sum() == frame.loc["m_generality"]["probes"].sum() == 6
    assert frame.loc[("m_locality", True), "probes"] == 1  # record 1's probe: record 0's creature
    assert (frame.loc["m_locality"]["token"] == 1.0).all() and (frame.loc["m_generality"]["exact"] == 0.0).all()
    with pytest.raises(ValueError, match="do not name their creatures"):
        creature_breakdown(tmp_path, [dataclasses.replace(r, extra={}) for r in recs])


def test_a_run_draws_its_retention_curve(tiny_random, records):
    summary = evaluate_sequential(get_editor("none", tiny_random), records[:4], T=4, every=2, progress=False)
    fig = summary.plot(metric="t_locality")
    assert list(fig.data[0].x) == [2, 4] and list(fig.data[0].y) == [1.0, 1.0] and fig.data[0].name == "none"
