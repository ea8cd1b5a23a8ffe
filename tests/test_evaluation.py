"""The MMEdit protocol: metric definitions against hand computation, resuming after a kill, real-format
files, the `evaluate` CLI and its sanity check (`--editor none`)."""

from __future__ import annotations

import json
import shutil

import pytest

from visedit.cli import main
from visedit.editing import EditRequest, get_editor
from visedit.evaluation import METRICS, EvalSummary, evaluate, probes, score_edit
from visedit.world import DatasetSpec, load_world_split

# seed 0: entity names come from the same world as the tiny model's vocabulary
SPEC = DatasetSpec(seed=0, n_entities=10, edits_per_pair=1, image_size=32)


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    return load_world_split("eval", SPEC, root=tmp_path_factory.mktemp("eval_data"))


def test_metrics_match_hand_computation(tiny_random, records):
    record = records[0]
    editor = get_editor("ft_l", tiny_random, layer=-1, max_steps=3, stop_loss=0.0)
    p = probes(record)
    pre_loc = tiny_random.score_batch([p["t_locality"], p["m_locality"]])
    pre_answer = tiny_random.answer_batch([p["m_locality"][:2]])[0]
    with editor.edit(EditRequest.from_record(record)):
        post = {m: tiny_random.score(*p[m]) for m in METRICS}
        post_answer = {m: tiny_random.answer(*p[m][:2]) for m in METRICS}
    result = score_edit(editor, record)
    alt_ids = tiny_random.encode_target(record.alt)
    by_hand = sum(a == t for a, t in zip(post["reliability"].argmax_ids, alt_ids)) / len(alt_ids)
    assert result.token["reliability"] == pytest.approx(by_hand)
    same = [a == b for a, b in zip(post["m_locality"].argmax_ids, pre_loc[1].argmax_ids)]
    assert result.token["m_locality"] == pytest.approx(sum(same) / len(same))
    assert result.exact["m_locality"] == float(post_answer["m_locality"] == pre_answer)
    assert result.exact["reliability"] == float(post_answer["reliability"] == record.alt)
    assert result.answers["m_locality_pre"] == pre_answer


def test_none_editor_is_the_identity(tiny_random, records):
    summary = evaluate(get_editor("none", tiny_random), records[:4], progress=False)
    assert summary.token["t_locality"] == summary.token["m_locality"] == 1.0
    assert summary.exact["t_locality"] == summary.exact["m_locality"] == 1.0
    assert summary.n == 4
    # the two means: over the five token accuracies / exact matches, and as the JSON writes them
    assert summary.mean == pytest.approx(sum(summary.token.values()) / 5)
    assert summary.exact_mean == pytest.approx(sum(summary.exact.values()) / 5)
    assert summary.to_dict()["exact_match_mean"] == round(summary.exact_mean, 4)


def _strip(rows):
    return [{k: v for k, v in r.items() if k not in ("edit_seconds", "total_seconds")} for r in rows]


def test_resume_after_kill_loses_nothing(tiny_random, records, tmp_path, monkeypatch):
    recs = records[:6]
    editor = get_editor("ft_l", tiny_random, layer=-1, max_steps=2)
    full = evaluate(editor, recs, out=tmp_path / "full", progress=False)
    full_rows = [json.loads(l) for l in (tmp_path / "full" / "edits.jsonl").read_text().splitlines()]

    calls = {"n": 0}
    original = type(editor)._apply

    def dies_at_fourth(self, request):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt  # what a kill looks like from inside the loop
        original(self, request)

    monkeypatch.setattr(type(editor), "_apply", dies_at_fourth)
    with pytest.raises(KeyboardInterrupt):
        evaluate(editor, recs, out=tmp_path / "cut", progress=False)
    monkeypatch.setattr(type(editor), "_apply", original)
    jsonl = tmp_path / "cut" / "edits.jsonl"
    assert len(jsonl.read_text().splitlines()) == 3
    assert not (tmp_path / "cut" / "summary.json").exists()
    with open(jsonl, "a") as f:  # and a line half-written when the process died
        f.write('{"index": 3, "token": {"reliab')
    resumed = evaluate(editor, recs, out=tmp_path / "cut", progress=False)
    rows = [json.loads(l) for l in jsonl.read_text().splitlines()]
    assert _strip(rows) == _strip(full_rows)
    assert resumed.token == full.token and resumed.exact == full.exact and resumed.n == 6
    assert EvalSummary.load(tmp_path / "cut" / "summary.json").token == full.token


def test_resume_refuses_a_different_run(tiny_random, records, tmp_path):
    evaluate(get_editor("none", tiny_random), records[:2], out=tmp_path, progress=False)
    with pytest.raises(ValueError, match="holds a different evaluation run"):
        evaluate(get_editor("none", tiny_random), records[:3], out=tmp_path, progress=False)
    fresh = evaluate(get_editor("none", tiny_random), records[:3], out=tmp_path, resume=False, progress=False)
    assert fresh.n == 3


def test_resume_refuses_a_folder_evaluated_on_other_weights(tiny_random, tiny_random_retrained, records, tmp_path):
    """Two tiny models share a name; a retrained one must not resume (and mix with) the other's edits."""
    evaluate(get_editor("none", tiny_random), records[:2], out=tmp_path, progress=False)
    other = tiny_random_retrained
    assert other.name == tiny_random.name
    with pytest.raises(ValueError, match="differs in model_fingerprint"):
        evaluate(get_editor("none", other), records[:2], out=tmp_path, progress=False)
    assert json.loads((tmp_path / "run.json").read_text())["model_fingerprint"] == tiny_random.fingerprint


def test_evaluate_cli_reads_real_evqa_files(tiny_random_dir, records, tmp_path, capsys):
    """A hand-written E-VQA record with COCO-style relative paths, evaluated through the CLI."""
    coco = tmp_path / "coco"
    r = records[0]
    paths = {"image": "val2014/COCO_val2014_000000000042.jpg",
             "image_rephrase": "val2014_image_rephrase/COCO_val2014_000000000042.png",
             "m_loc": "train2014/COCO_train2014_000000000009.jpg"}
    for field, rel in paths.items():
        (coco / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(getattr(r, field), coco / rel)
    record = {"src": r.src, "pred": [r.pred], "alt": r.alt, "rephrase": r.rephrase, **paths, "loc": r.loc,
              "loc_ans": r.loc_ans, "m_loc_q": r.m_loc_q, "m_loc_a": [r.m_loc_a]}
    data = tmp_path / "vqa_eval.json"
    data.write_text(json.dumps([record]))
    code = main(["evaluate", "--editor", "none", "--model", str(tiny_random_dir), "--data", str(data),
                 "--image-root", str(coco), "--out", str(tmp_path / "out"), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["n"] == 1 and out["t_locality"] == 1.0
    assert set(out["exact_match"]) == set(METRICS)


def test_evaluate_cli_errors(tiny_random_dir, capsys):
    assert main(["evaluate", "--editor", "none", "--model", str(tiny_random_dir), "--limit", "0"]) == 2
    assert "--limit must be ≥ 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["evaluate", "--editor", "rome"])


def test_layer_sweep_plot_puts_each_row_on_the_stream_it_edits():
    from types import SimpleNamespace

    from visedit.evaluation import METRICS, plot_layer_sweep

    def row(layer, at, use_im, value):
        return {"layer": layer, "at": at, "use_im": use_im, **{m: value for m in METRICS}, "mean": value}

    rows = [row(0, "input", False, 0.8), row(1, "input", False, 0.2), row(0, "output", True, 0.1)]
    profile = SimpleNamespace(mean={"attn": [0.5, 0.1], "mlp": [0.2, 0.05]}, n=3)
    fig = plot_layer_sweep(rows, profile)
    assert len(fig.axes) == 2
    xs = sorted({round(x, 6) for line in fig.axes[0].lines for x in line.get_xdata()})
    assert xs == [0, 1]  # the output of layer 0 is drawn where the input of layer 1 is
    heights = sorted(round(p.get_height(), 6) for p in fig.axes[1].patches if p.get_height() > 0)
    assert heights == [0.05, 0.1, 0.2, 0.5]
    assert len(plot_layer_sweep(rows).axes) == 1
    answer = {**row(0, "output", True, 0.6), "settings": {"config": {"memory_reads": "answer"}}}
    labels = {t.get_text() for t in plot_layer_sweep(rows + [answer]).axes[0].get_legend().get_texts()}
    assert {"IM reads the prompt", "IM reads the prompt, memory: the new answer", "no IM"} <= labels
    with pytest.raises(ValueError, match="no sweep rows"):
        plot_layer_sweep([])


def _write_run(folder, token_rows, indices=None):
    from visedit.evaluation import EditResult

    folder.mkdir()
    lines = [json.dumps(EditResult(i, dict(zip(METRICS, t)), {}, 0.0, {}).to_dict())
             for i, t in zip(indices or range(len(token_rows)), token_rows)]
    (folder / "edits.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_paired_difference_against_hand_computed_means(tmp_path):
    from visedit.evaluation import load_results, paired_difference

    a = _write_run(tmp_path / "a", [(1, 1, 1, 1, 1), (1, 0, 1, 1, 1), (0, 0, 0, 1, 1)])
    b = _write_run(tmp_path / "b", [(1, 1, 1, 1, 0), (1, 0, 1, 1, 1), (1, 1, 1, 1, 1)])
    d = paired_difference(a, b, n_boot=200)
    # per edit: +0.2, 0, -0.6 → mean -0.4/3; one better, one worse, one tie
    assert d.n == 3 and d.mean == pytest.approx(-0.4 / 3, abs=1e-6) and (d.better, d.worse) == (1, 1)
    assert d.lo <= d.mean <= d.hi and -0.6 - 1e-9 <= d.lo and d.hi <= 0.2 + 1e-9
    assert (d.a, d.b) == ("a", "b") and paired_difference(a, b, names=("A", "B")).a == "A"
    same = paired_difference(a, a)
    assert (same.mean, same.lo, same.hi, same.better, same.worse) == (0, 0, 0, 0, 0)
    assert [r.index for r in load_results(a)] == [0, 1, 2]
    other = _write_run(tmp_path / "c", [(1, 1, 1, 1, 1)] * 3, indices=[0, 2, 1])
    with pytest.raises(ValueError, match="same edits"):
        paired_difference(a, other)
    with pytest.raises(FileNotFoundError, match="evaluate --out"):
        load_results(tmp_path / "missing")


def test_paired_difference_in_one_metric_against_hand_computed_values(tmp_path):
    """``metric``: the paired difference in one token metric (here in-image locality) instead of the
    five-metric mean; a metric one run lacks, or an unknown name, is refused in one line."""
    from visedit.evaluation import EditResult, paired_difference

    def run(name, five, iloc):
        folder = tmp_path / name
        folder.mkdir()
        lines = [json.dumps(EditResult(i, {**dict(zip(METRICS, t)), "i_locality": v}, {}, 0.0, {}).to_dict())
                 for i, (t, v) in enumerate(zip(five, iloc))]
        (folder / "edits.jsonl").write_text("\n".join(lines) + "\n")
        return folder

    a = run("a", [(1, 1, 1, 1, 1)] * 4, [1.0, 0.5, 0.0, 1.0])
    b = run("b", [(1, 1, 1, 1, 0)] * 4, [0.0, 0.5, 1.0, 0.0])
    d = paired_difference(a, b, metric="i_locality", n_boot=200)
    # per edit: +1, 0, -1, +1 → mean 0.25; two better, one worse
    assert (d.mean, d.better, d.worse, d.metric) == (pytest.approx(0.25), 2, 1, "i_locality")
    assert "i_locality, paired by edit: +0.2500" in str(d)
    whole = paired_difference(a, b, n_boot=200)
    assert (whole.mean, whole.metric) == (pytest.approx(0.2), "mean") and "five-metric mean" in str(whole)
    with pytest.raises(ValueError, match="unknown metric 'iloc'"):
        paired_difference(a, b, metric="iloc")
    plain = _write_run(tmp_path / "c", [(1, 1, 1, 1, 1)] * 4)
    with pytest.raises(ValueError, match="i_locality is not scored in both runs"):
        paired_difference(a, plain, metric="i_locality")


def test_results_table_shows_region_probes_only_when_every_run_scored_them():
    """The table's mean stays the five MMEdit metrics; in-image and look-alike locality follow it as their
    own columns when every summary has them, and are left out when one does not."""
    from visedit.evaluation import EditResult, EvalSummary, results_table

    def summary(name, five, region):
        scores = [{**dict(zip(METRICS, t)), **r} for t, r in zip(five, region)]
        return EvalSummary.from_results(name, [EditResult(i, s, s, 0.0, {}) for i, s in enumerate(scores)])

    a = summary("a", [(1, 1, 1, 1, 0), (1, 1, 0, 1, 1)], [{"i_locality": 1.0, "la_locality": 0.5}] * 2)
    b = summary("b", [(0, 0, 0, 1, 1)] * 2, [{"i_locality": 0.0, "la_locality": 1.0}] * 2)
    table = results_table([a, b])
    assert list(table.columns) == ["n", *METRICS, "mean", "i_locality", "la_locality", "edit s"]
    assert table.loc["a", "mean"] == pytest.approx(0.8) and table.loc["b", "mean"] == pytest.approx(0.4)
    assert (table.loc["a", "i_locality"], table.loc["b", "la_locality"]) == (1.0, 1.0)
    plain = summary("c", [(1, 1, 1, 1, 1)] * 2, [{}] * 2)
    assert "i_locality" not in results_table([a, plain]).columns
    assert list(results_table([a, b], score="exact").columns) == list(table.columns)
