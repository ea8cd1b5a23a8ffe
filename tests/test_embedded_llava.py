"""Integration: the second teaching model (visedit-llava) meets its model card on renderings it has never
seen, and the committed reports of it hold the section-3 figures it was built to show where they hold."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from visedit.models import load_vllm
from visedit.models.card import model_card
from visedit.models.vllm import EMBEDDED_MODELS

ROOT = Path(__file__).parents[1]
STUDY = ROOT / "notebooks" / "results" / "study"


@pytest.fixture(scope="module")
def second():
    return load_vllm("visedit-llava")


@pytest.fixture(scope="module")
def heldout_card(second):
    # seed 7: renderings, swap partners and selector scenes that neither training nor the book's card uses,
    # one rendering per creature (70 images, 1,260 image questions, every creature in a selector scene)
    return model_card(second, seed=7, progress=False)


def _committed_run(second, folder: Path, editor, rows: slice):
    """A committed 504-edit run in ``folder``: one line per eval edit in order, the ``rows`` sample of them
    recomputed live by ``editor`` (exactly equal), and the summary the lines' mean. Returns (lines, summary)."""
    from visedit.editing.scoring import REGION_METRICS
    from visedit.evaluation import METRICS, EvalSummary, score_edit
    from visedit.world import load_world_split

    lines = [json.loads(line) for line in (folder / "edits.jsonl").read_text().splitlines()]
    records = load_world_split("eval", second.dataset_spec)
    assert [r["index"] for r in lines] == list(range(len(records)))
    for row in lines[rows]:
        live = score_edit(editor, records[row["index"]])
        assert live.token == row["token"] and live.exact == row["exact"], row["index"]
    full = EvalSummary.load(folder / "summary.json")
    for m in METRICS + REGION_METRICS:
        assert full.token[m] == pytest.approx(sum(r["token"][m] for r in lines) / len(lines), abs=1e-4), m
    return lines, full


def test_card_thresholds_hold_on_a_heldout_sample(heldout_card):
    """The first model's four bars, on the second model's held-out sample."""
    card = heldout_card
    assert card.n["visual"] == 70 * 6 * 3 and card.n["paraphrase"] == 70 * 6 * 2 and card.n["selector"] >= 350
    assert card.visual_accuracy >= 0.95
    assert all(v["visual"] >= 0.90 for v in card.per_fact.values()), card.per_fact
    assert card.paraphrase_accuracy >= 0.90
    assert card.text_accuracy >= 0.98
    assert card.swap_accuracy <= 0.10


def test_selector_floor_and_where_it_falls_short(heldout_card):
    """Selector accuracy: the bar was 0.90 and the shipped model does not reach it (0.856 on this sample,
    0.823 on the book's). What it reaches, less a margin for float differences between machines, guards
    against regressions; and the shortfall is where chapter 8 says it is: questions that select by left or
    right (0.42, 0.52), while top, bottom, colour and pattern are each above 0.90."""
    card = heldout_card
    assert card.selector_accuracy >= 0.84
    per = card.per_selector
    assert min(per[k] for k in ("top", "bottom", "colour", "pattern")) >= 0.90, per
    assert max(per["left"], per["right"]) <= 0.6, per


def test_the_shipped_model_is_small_half_precision_and_records_its_training(second):
    folder = EMBEDDED_MODELS["visedit-llava"]
    assert sum(p.stat().st_size for p in folder.iterdir()) <= 30 * 2**20
    assert not list(folder.glob("*.ckpt"))
    assert json.loads((folder / "config.json").read_text())["dtype"] == "float16"  # half precision on disk
    record = json.loads((folder / "training.json").read_text())
    assert record["config"]["name"] == "llava" and record["config"]["frozen_encoder"]
    assert record["config"]["layers"] >= 12 and second.n_layers == record["config"]["layers"]
    assert set(record["seconds"]) == {"encoder", "language", "align", "instruct"}
    assert "stopped" not in record


def test_the_committed_reports_are_of_the_shipped_model():
    rep = json.loads((STUDY / "llava.json").read_text())
    assert rep["command"] == "python -m visedit reading --model visedit-llava --out notebooks/results/study/llava.json"
    assert rep["info"]["recipe"] == "llava" and rep["n_layers"] == 12
    contrib = json.loads((STUDY / "llava-contributions.json").read_text())
    regions = json.loads((STUDY / "llava-regions.json").read_text())
    assert "--model visedit-llava" in contrib["command"] and "--model visedit-llava" in regions["command"]
    # the two commands measure what the reading report measures, on the same model
    assert contrib["attention_peak_relative_depth"] == pytest.approx(rep["attention_peak_relative_depth"], abs=0.2)
    # the rule places l_e just before the late block of high-contribution layers: in the middle third or later
    assert 4 <= contrib["choose_edit_layer"] < 12


def test_the_committed_vead_run_is_what_the_shipped_vead_scores(second):
    """The second model's shipped VEAD (trained by reproduce.sh at the rule's l_e) and its committed run on
    the 504 eval edits (chapter 6): 8 edits spread over the split, recomputed here, give exactly the committed
    per-edit lines (the protocol is deterministic), the summary is the mean of those lines, text-only inputs
    are never touched and an edit costs at most two forward passes. (The run's scores are reported in
    chapters 6 and 7; measured: reliability 0.515, M-Locality 0.765, in-image locality 0.517.)"""
    from visedit.editing import choose_edit_layer, get_editor, trained_dir
    from visedit.world import load_world_split

    folder = Path(__file__).resolve().parents[1] / "notebooks" / "results" / "visedit-llava" / "evaluate" / "vead"
    editor = get_editor("vead", second)
    card = json.loads((trained_dir("vead", "visedit-llava") / "vead.json").read_text())
    assert editor.layer == card["layer"] == choose_edit_layer(second, load_world_split("train", second.dataset_spec))
    rows, full = _committed_run(second, folder, editor, slice(None, 8 * 63, 63))
    assert len(rows) >= 500
    assert full.token["t_locality"] == 1.0 and full.edit_seconds_mean <= 2 * full.forward_seconds


def test_the_adapter_at_the_sweeps_best_layer_and_its_committed_run(second):
    """Beside the rule's VEAD, reproduce.sh trains the same preset at the full budget on the layer where the
    answer-memory sweep edits best and evaluates it on the 504 eval edits (chapter 6). Its layer is that
    sweep row's, 4 edits recomputed here give exactly the committed per-edit lines, and the summary is their
    mean. (Measured: reliability 0.850, mean 0.855, in-image locality 0.448, against 0.515, 0.668 and 0.517
    at the rule's layer 7 — the issue's targets, reliability 0.95 and in-image locality 0.95, are not met.)"""
    from visedit.editing import get_editor, trained_dir
    from visedit.evaluation import EvalSummary

    results = Path(__file__).resolve().parents[1] / "notebooks" / "results" / "visedit-llava"
    rows = [json.loads(p.read_text()) for p in (results / "sweep").glob("answer-layer*.json")]
    best = max(rows, key=lambda r: r["mean"])["layer"]
    weights = trained_dir("vead", "visedit-llava").parent / f"vead-layer{best}"
    editor = get_editor("vead", second, weights=weights)
    assert editor.layer == best == 2
    _, full = _committed_run(second, results / "evaluate" / f"vead-layer{best}", editor, slice(None, 4 * 126, 126))
    rule = EvalSummary.load(results / "evaluate" / "vead" / "summary.json")
    assert full.mean > rule.mean  # the layer where the sweep edits best also edits better at the full budget


def test_the_scoped_refined_adapter_and_its_committed_run(second):
    """The layer-2 adapter with the prompt route and per-edit refinement (chapter 6): its settings are those
    reproduce.sh chose on 100 train edits (route_min: the smallest of 0.5-0.8 whose M-locality and in-image
    locality reach 0.95; refine_lr: the better mean), 3 edits recomputed here give exactly the committed
    per-edit lines, the summary is their mean, and the section-1 targets it meets hold on the 504 eval edits.
    (Measured: reliability 0.994 by both scores, T-gen 0.936, M-gen 0.959, M-loc 1.0; in-image locality
    0.921 — that target, 0.95, is not met — against 0.448 without the route.)"""
    from visedit.editing import get_editor, trained_dir
    from visedit.evaluation import EvalSummary

    results = ROOT / "notebooks" / "results" / "visedit-llava"
    tune = {p.name: EvalSummary.load(p / "summary.json") for p in (results / "scoped-tune").iterdir()}
    kept = {m: min(tune[f"route-min{m}"].token[k] for k in ("m_locality", "i_locality"))
            for m in ("0.5", "0.6", "0.7", "0.8")}
    route_min = next(m for m, v in kept.items() if v >= 0.95)
    lr = max(("0.05", "0.2"), key=lambda v: tune[f"refine-lr{v}"].mean)
    folder = results / "evaluate" / "vead-scoped-layer2"
    full = EvalSummary.load(folder / "summary.json")
    config = full.settings["config"]
    assert (config["route"], config["route_layer"], config["layer"]) == ("prompt", 8, 2)
    assert (str(config["route_min"]), str(config["refine_lr"]), config["refine_steps"]) == (route_min, lr, 50)
    editor = get_editor("vead", second, weights=trained_dir("vead", "visedit-llava").parent / "vead-layer2",
                        **{k: config[k] for k in ("route", "route_layer", "route_min", "refine_steps", "refine_lr")})
    _committed_run(second, folder, editor, slice(None, 3 * 168, 168))
    targets = {"reliability": 0.95, "t_generality": 0.90, "m_generality": 0.90, "t_locality": 0.99, "m_locality": 0.95}
    assert all(full.token[m] >= t for m, t in targets.items()), full.token
    assert full.exact["reliability"] >= 0.95
    unscoped = EvalSummary.load(results / "evaluate" / "vead-layer2" / "summary.json")
    assert full.token["i_locality"] > unscoped.token["i_locality"] + 0.4


def test_the_learned_scope_and_its_committed_run(second):
    """The same adapter, route and refinement with the learned scope (chapter 6): the shipped scope is the
    one fit-scope wrote (its settings and model), route_min is the train rule's (of 0.5-0.8 the best mean of
    all seven probes on 100 train edits), refine_lr the better mean, 3 edits recomputed here give exactly the
    committed per-edit lines, and on the 504 eval edits every section-1 score target holds, in-image
    locality included. (Measured: reliability 0.994 by both scores, T-gen 0.931, M-gen 0.963, M-loc 0.998,
    in-image 0.972, look-alike 0.994; 0.478 s per edit = 18.6 forward passes.)"""
    from visedit.editing import get_editor, trained_dir
    from visedit.evaluation import EvalSummary

    results = ROOT / "notebooks" / "results" / "visedit-llava"
    scope_dir = trained_dir("vead", "visedit-llava").parent / "scope-layer8"
    meta = json.loads((scope_dir / "scope.json").read_text())
    assert (meta["layer"], meta["model"], meta["config"]["skip"], meta["records"]) == (8, "visedit-llava", 100, 1916)
    assert meta["model_fingerprint"] == second.fingerprint
    tune = {p.name: EvalSummary.load(p / "summary.json") for p in (results / "scoped-tune").iterdir()}
    probes = ("reliability", "t_generality", "m_generality", "t_locality", "m_locality", "i_locality", "la_locality")
    route_min = max(("0.5", "0.6", "0.7", "0.8"),
                    key=lambda m: sum(tune[f"learned-route-min{m}"].token[k] for k in probes))
    lr = max(("0.05", "0.2"), key=lambda v: tune[f"learned-refine-lr{v}"].mean)
    folder = results / "evaluate" / "vead-learned-layer2"
    full = EvalSummary.load(folder / "summary.json")
    config = full.settings["config"]
    assert (config["route"], config["route_layer"], config["layer"]) == ("prompt", 8, 2)
    assert Path(config["route_scope"]).name == "scope-layer8"
    assert (str(config["route_min"]), str(config["refine_lr"]), config["refine_steps"]) == (route_min, lr, 50)
    settings = {k: config[k] for k in ("route", "route_layer", "route_min", "refine_steps", "refine_lr")}
    editor = get_editor("vead", second, weights=trained_dir("vead", "visedit-llava").parent / "vead-layer2",
                        route_scope=str(scope_dir), **settings)
    _committed_run(second, folder, editor, slice(1, 3 * 168, 168))
    targets = {"reliability": 0.95, "t_generality": 0.90, "m_generality": 0.90, "t_locality": 0.99, "m_locality": 0.95,
               "i_locality": 0.95}
    assert all(full.token[m] >= t for m, t in targets.items()), full.token
    assert full.exact["reliability"] >= 0.95


@pytest.mark.parametrize("route", ["scoped", "learned"])
def test_the_scoped_memory_keeps_500_edits(second, route):
    """The memory on the layer-2 adapter with the prompt route and refined edits (chapter 9), on raw keys and
    through the learned scope: its route_min is the train rule's (the smallest of 0.7, 0.8, 0.9 whose
    M-locality on the unrelated probes reaches 0.90 after 100 train edits), its refinement the single-edit
    run's, and after 500 eval edits it keeps reliability at >= 0.90 with its first edits held at every check;
    on raw keys M-locality on the unrelated probes is >= 0.90 too, through the learned scope it is lower and
    both generalities higher. A live run of 10 edits gives exactly the committed T = 10 run. (Measured at
    T = 500, raw keys: reliability 0.994, M-locality 0.917, T-generality 0.824, M-generality 0.762; learned
    scope, route_min 0.8: 0.994, 0.813, 0.893, 0.820.)"""
    from visedit.editing import get_editor, trained_dir
    from visedit.evaluation import EvalSummary, SequentialSummary, evaluate_sequential
    from visedit.world import load_world_split

    results = ROOT / "notebooks" / "results" / "visedit-llava"
    tag = f"vead-{route}-layer2"
    tune = {m: SequentialSummary.load(results / "sequential-tune" / f"{tag}-min{m}-T100" / "summary.json")
            for m in ("0.7", "0.8", "0.9")}
    chosen = next((m for m, s in tune.items() if s.unrelated["m_locality"]["token"] >= 0.90), "0.9")
    runs = {T: SequentialSummary.load(results / "sequential" / f"{tag}-T{T}" / "summary.json") for T in (10, 500)}
    config = runs[500].final.settings["config"]
    single = EvalSummary.load(results / "evaluate" / tag / "summary.json").settings["config"]
    assert config["memory"] and config["route"] == "prompt" and str(config["route_min"]) == chosen
    # runs from before route_scope existed do not record it; a folder may be written with or without "./"
    shared = ("layer", "route_layer", "route_scope", "refine_steps", "refine_lr")
    same = {k: (Path(config[k]) == Path(single[k]) if k == "route_scope" and config.get(k) else
                config.get(k) == single.get(k)) for k in shared}
    assert all(same.values()), same
    assert (config.get("route_scope") is None) == (route == "scoped")
    at500 = runs[500]
    assert at500.final.token["reliability"] >= 0.90
    if route == "scoped":
        assert at500.unrelated["m_locality"]["token"] >= 0.90
    else:  # the learned scope carries more edits to paraphrases and keeps fewer unrelated answers (chapter 9)
        raw = SequentialSummary.load(results / "sequential" / "vead-scoped-layer2-T500" / "summary.json")
        assert all(at500.final.token[m] > raw.final.token[m] for m in ("t_generality", "m_generality"))
        assert at500.unrelated["m_locality"]["token"] < raw.unrelated["m_locality"]["token"]
    assert len(at500.retention) == 10 and all(r["token"]["reliability"] >= 0.9 for r in at500.retention)
    keys = ("memory", "route", "route_layer", "route_min", "refine_steps", "refine_lr")
    trained = trained_dir("vead", "visedit-llava").parent
    scope = {} if route == "scoped" else {"route_scope": str(trained / "scope-layer8")}
    editor = get_editor("vead", second, weights=trained / "vead-layer2", **{k: config[k] for k in keys}, **scope)
    live = evaluate_sequential(editor, load_world_split("eval", second.dataset_spec), T=10, every=1, seed=0,
                               progress=False)
    assert live.order == runs[10].order and live.final.token == runs[10].final.token
