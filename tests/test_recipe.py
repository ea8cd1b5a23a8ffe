"""The second teaching model's recipe: BPE tokenizer, training frame, stages, resume, CLI and model card."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from visedit.models import load_vllm
from visedit.models.recipe import (RECIPES, RecipeConfig, _Batcher, build_bpe_tokenizer, build_recipe_model,
                                   build_recipe_processor, recipe_config, scene_turns, train_recipe)
from visedit.world import make_world, render_scene
from visedit.world.scene import SCENE_TEMPLATES

#: A recipe small enough to run every stage in seconds (the real sizes are the defaults).
MICRO = dict(n_entities=12, vocab_size=400, vision_hidden=32, vision_layers=2, vision_heads=2, vision_intermediate=64,
             hidden=32, layers=2, heads=2, intermediate=64, max_positions=256, encoder_steps=3, encoder_batch=6,
             language_steps=3, language_batch=4, align_steps=2, align_batch=2, steps=3, batch_images=2, batch_text=1,
             qa_per_image=2, warmup=2, threads=1)


@pytest.fixture(scope="module")
def micro_world():
    return make_world(0, 12)


@pytest.fixture(scope="module")
def micro_processor(micro_world):
    return build_recipe_processor(micro_world, recipe_config("llava", **MICRO))


def test_bpe_tokenizer_encodes_any_text_and_round_trips(micro_world):
    tok = build_bpe_tokenizer(micro_world, 400)
    for text in ("where does the bloomax live ?", "Qu'est-ce que c'est? Ünïcode 🙂 7B", "The answer is: 42",
                 "What is the man in the picture holding?"):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids
        assert tok.decode(ids) == text
    assert tok(" desert")["input_ids"][0] == tok.bos_token_id
    assert build_bpe_tokenizer(micro_world, 400).get_vocab() == tok.get_vocab(), "deterministic"


def test_training_sequences_are_the_ids_the_model_is_read_with(micro_world, micro_processor):
    """The training frame is exactly what VLLM.inputs builds (oracle: the processor itself)."""
    from visedit.models.vllm import VLLM

    cfg = recipe_config("llava", **MICRO)
    vllm = VLLM(build_recipe_model(micro_processor.tokenizer, cfg), micro_processor)
    batcher = _Batcher(micro_processor, micro_world, cfg)
    scene = render_scene(micro_world.entities[:3], seed=1)
    (q, a), = scene_turns(scene, random.Random(0), 1)
    inp = vllm.inputs([(scene.image, q, a)])
    ids, labels = batcher.sequence([(q, a)], True)
    assert inp.tensors["input_ids"][0].tolist() == ids[:-1]  # the end token follows the answer in training
    answer = [i for i, l in zip(ids, labels) if l != -100]
    assert answer == list(inp.target_ids[0]) + [micro_processor.tokenizer.eos_token_id]
    q = f"what does the {micro_world.entities[0].name} eat ?"
    inp = vllm.inputs([(None, q, "fish")])
    assert inp.tensors["input_ids"][0].tolist() == batcher.sequence([(q, "fish")], False)[0][:-1]


def test_scene_turns_ask_the_selected_creature(micro_world):
    rng = random.Random(3)
    for seed in range(20):
        scene = render_scene(micro_world.entities[seed % 9: seed % 9 + 1 + seed % 4], seed=seed)
        for q, a in scene_turns(scene, rng, 4):
            assert a in {e.fact(f) for e in scene.entities for f in ("colour", "shape", "pattern", "name", "habitat",
                                                                       "diet")}
            assert "{x}" not in q


def test_selector_last_questions_end_with_the_creature_they_ask_about(micro_world):
    from visedit.models.recipe import selector_last_templates

    last = selector_last_templates()
    assert set(last) == set(SCENE_TEMPLATES) and all(last.values())
    for fact, templates in last.items():
        assert set(templates) <= set(SCENE_TEMPLATES[fact])
        for t in templates:
            assert t.rstrip(" ?.").endswith("{x}") and t.index("{x}") > 0
    rng = random.Random(3)
    for seed in range(12):
        scene = render_scene(micro_world.entities[seed % 9: seed % 9 + 2], seed=seed)
        for q, a in scene_turns(scene, rng, 4, templates=last):
            assert any(q.startswith(t.split("{x}")[0]) and q.endswith(t.split("{x}")[1])
                       for ts in last.values() for t in ts), q
    # the default is every training template, drawn as before
    scene = render_scene(micro_world.entities[:3], seed=5)
    assert scene_turns(scene, random.Random(1), 6) == scene_turns(scene, random.Random(1), 6, templates=SCENE_TEMPLATES)
    with pytest.raises(ValueError, match="selector_position must be 'any' or 'last'"):
        RecipeConfig(selector_position="first")


def test_the_selector_last_recipe_asks_only_those_questions(tmp_path, monkeypatch):
    import visedit.models.recipe as recipe

    seen, real = [], recipe.scene_turns
    monkeypatch.setattr(recipe, "scene_turns", lambda *a, templates=None, **k: seen.append(templates) or real(
        *a, templates=templates, **k))
    train_recipe(tmp_path / "m", recipe_config("selector-last", **MICRO), progress=False, log_every=0)
    assert seen and all(t == recipe.selector_last_templates() for t in seen)


def test_a_scene_where_no_creature_can_be_picked_out_is_described(micro_world):
    """Two creatures of the same colour and pattern, side by side within the position margin: no selector
    picks either out, so the scene is described (the loop that draws a creature to ask about would never end)."""
    import dataclasses

    from visedit.models.recipe import DESCRIBE
    from visedit.world import selectors

    ents = micro_world.entities
    a, b = next((x, y) for x in ents for y in ents if x is not y and x.colour == y.colour and x.pattern == y.pattern)
    scene = render_scene([a, b], seed=0)
    scene = dataclasses.replace(scene, centres=((40.0, 40.0), (43.0, 42.0)))
    assert not selectors(scene, 0) and not selectors(scene, 1)
    turns = scene_turns(scene, random.Random(0), 4)
    assert len(turns) == 1 and turns[0][0] == DESCRIBE and a.shape in turns[0][1] and b.shape in turns[0][1]


def test_recipes_change_one_ingredient_each():
    base = recipe_config("llava")
    assert base.layers >= 12 and base.frozen_encoder and base.max_creatures == 4 and base.n_visual >= 100
    for name, change in RECIPES.items():
        cfg = recipe_config(name)
        diff = {k for k in change if getattr(cfg, k) != getattr(base, k)}
        assert diff == set(change), name
    study = recipe_config("joint-encoder", budget="study")
    assert study.encoder_steps == 0 and study.steps < base.steps
    with pytest.raises(ValueError, match="unknown recipe"):
        recipe_config("llama")
    with pytest.raises(ValueError, match="frozen encoder needs"):
        RecipeConfig(encoder_steps=0)
    with pytest.raises(ValueError, match="must be an int"):
        RecipeConfig(layers=12.5)
    with pytest.raises(ValueError, match="at least 10 patches"):
        RecipeConfig(image_size=64)


def test_the_study_script_trains_every_study_recipe_at_the_study_budget(tmp_path):
    import os

    root = Path(__file__).parents[1]
    out = subprocess.run(["bash", "notebooks/results/study.sh"], cwd=root, capture_output=True, text=True, check=True,
                         env={**os.environ, "DRY": "1", "WORK": str(tmp_path)}).stdout.splitlines()
    for name in set(RECIPES) - {"blip2"}:  # BLIP-2 is another architecture, not an ingredient of the study
        report = f"notebooks/results/study/study-{name}.json"
        assert any(line.split()[1].rstrip(":") == report for line in out), name
        trains = [line for line in out if f"--recipe {name} --budget study" in line]
        assert trains or any(line.startswith(f"done    {report}") for line in out), name


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("recipe") / "m"
    record = train_recipe(out, recipe_config("llava", **MICRO), progress=False, log_every=0)
    return out, record


def test_a_recipe_run_writes_a_loadable_scene_model(micro_run):
    out, record = micro_run
    assert set(record["seconds"]) == {"encoder", "language", "align", "instruct"}
    assert not (out.parent / "m.ckpt").exists() or json.loads((out / "training.json").read_text())
    vllm = load_vllm(out)
    assert vllm.info == {"edition": 2, "recipe": "llava", "world_seed": 0, "n_entities": 12, "image_size": 80}
    assert vllm.dataset_spec.edition == 2 and vllm.dataset_spec.image_size == 80
    assert next(iter(_weights(out).values())).dtype == torch.float16, "half precision on disk"
    scene = render_scene(make_world(0, 12).entities[:2], seed=0)
    assert isinstance(vllm.answer(scene.image, "what does the creature on the left eat ?"), str)


def test_the_frozen_encoder_does_not_change_after_its_stage(tmp_path):
    """With a frozen encoder the tower's weights leave stage 1 and are never touched again."""
    cfg = recipe_config("llava", **MICRO)
    train_recipe(tmp_path / "a", cfg, progress=False, log_every=0, stop_after=cfg.encoder_steps)
    state = torch.load(tmp_path / "a.ckpt", weights_only=False)
    assert state["stage"] == "language" and state["step"] == 0
    tower = {k: v for k, v in state["modules"]["model"].items() if "vision_tower" in k}
    train_recipe(tmp_path / "a", cfg, progress=False, log_every=0)
    final = load_vllm(tmp_path / "a").model.state_dict()
    assert tower
    for k, v in tower.items():
        assert torch.equal(final[k], v.to(torch.float16).float()), k


def test_a_stopped_run_resumes_to_the_same_weights(micro_run, tmp_path):
    """Stopped at any step — mid-stage, at a stage's end — and resumed, a run ends bit-identical to one
    never stopped."""
    out, _ = micro_run
    cfg = recipe_config("llava", **MICRO)
    target = tmp_path / "r"
    for chunk in (2, 2, 3, 1, 2):
        record = train_recipe(target, cfg, progress=False, log_every=0, stop_after=chunk)
        assert record.get("stopped") and not target.exists()
    resumed = train_recipe(target, cfg, progress=False, log_every=0)
    a, b = _weights(out), _weights(target)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    unbroken = micro_run[1]
    for stage in ("encoder", "language", "align", "instruct"):
        assert resumed[f"{stage}_loss"] == unbroken[f"{stage}_loss"] and resumed[f"{stage}_running"] == unbroken[
            f"{stage}_running"]


def test_an_encoder_folder_stands_in_for_the_encoder_stage(micro_run, tmp_path):
    """The encoder stage alone writes the frozen tower (float32, named by its digest); the same folder comes
    from a full run's checkpoint past that stage; a run reading it skips the stage and ends bit-identical
    to the run that trained it. A folder whose weights are not the ones it names, or of other settings,
    is refused in one line, and so are the options a run cannot combine."""
    import shutil

    from visedit.models.recipe import load_encoder, tower_digest

    out, unbroken = micro_run
    cfg = recipe_config("llava", **MICRO)
    record = train_recipe(tmp_path / "enc", cfg, progress=False, log_every=0, encoder_only=True)
    assert set(record["seconds"]) == {"encoder"} and not (tmp_path / "enc" / "visedit.json").exists()
    info = json.loads((tmp_path / "enc" / "encoder.json").read_text())
    tower = load_encoder(tmp_path / "enc", cfg)
    assert info["digest"] == tower_digest(tower) and all(v.dtype == torch.float32 for v in tower.values())
    # a full run stopped in its language stage: its checkpoint gives the same encoder folder
    train_recipe(tmp_path / "full", cfg, progress=False, log_every=0, stop_after=cfg.encoder_steps + 2)
    shutil.copy(tmp_path / "full.ckpt", tmp_path / "copy.ckpt")
    copied = train_recipe(tmp_path / "copy", cfg, progress=False, log_every=0, encoder_only=True)
    assert json.loads((tmp_path / "copy" / "encoder.json").read_text())["digest"] == info["digest"]
    assert {e["stage"] for e in copied["log"]} <= {"encoder"} or not copied["log"]
    assert set(json.loads((tmp_path / "copy" / "training.json").read_text())["seconds"]) == {"encoder"}
    # reading it: no encoder stage, and every weight of the finished model as the unbroken run's
    read = train_recipe(tmp_path / "m", cfg, progress=False, log_every=0, encoder_from=tmp_path / "enc")
    assert "encoder" not in read["seconds"] and read["encoder_from"]["digest"] == info["digest"]
    a, b = _weights(out), _weights(tmp_path / "m")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert read["instruct_loss"] == unbroken["instruct_loss"]
    # refusals
    shutil.copytree(tmp_path / "enc", tmp_path / "bad")
    (tmp_path / "bad" / "encoder.json").write_text(json.dumps({**info, "digest": "0" * 16}))
    cases = [(lambda: load_encoder(tmp_path / "bad", cfg), "not the ones encoder.json names"),
             (lambda: load_encoder(tmp_path / "enc", recipe_config("llava", **{**MICRO, "vision_layers": 3})),
              "other settings: vision_layers 2 \\(this run: 3\\)"),
             (lambda: train_recipe(tmp_path / "x", cfg, encoder_only=True, encoder_from=tmp_path / "enc"),
              "pass one of them"),
             (lambda: train_recipe(tmp_path / "y", recipe_config("blip2", **MICRO), encoder_only=True),
              "reads one with encoder_from")]
    for call, message in cases:
        with pytest.raises(ValueError, match=message) as err:
            call()
        assert "\n" not in str(err.value)


def test_the_shipped_encoder_is_the_llava_recipes_frozen_tower():
    """visedit/models/embedded_encoder: the llava recipe's tower after its 5000 contrastive steps, as
    `train-tiny --recipe llava --encoder-only` writes it; it loads for the recipe (digest checked by
    load_encoder) and is refused for a recipe of other tower sizes."""
    from visedit.models.recipe import EMBEDDED_ENCODER, load_encoder, tower_digest

    info = json.loads((EMBEDDED_ENCODER / "encoder.json").read_text())
    assert info["recipe"] == "llava" and info["encoder_steps"] == recipe_config("llava").encoder_steps
    weights = load_encoder(EMBEDDED_ENCODER, recipe_config("llava"))
    assert tower_digest(weights) == info["digest"]
    assert all(v.dtype == torch.float32 for v in weights.values())
    with pytest.raises(ValueError, match="other settings"):
        load_encoder(EMBEDDED_ENCODER, recipe_config("llava", vision_layers=4))
    training = json.loads((EMBEDDED_ENCODER / "training.json").read_text())
    assert [e["stage"] for e in training["log"]] == ["encoder"] * len(training["log"])


def test_a_checkpoint_of_other_settings_is_refused(tmp_path):
    cfg = recipe_config("llava", **MICRO)
    train_recipe(tmp_path / "x", cfg, progress=False, log_every=0, stop_after=1)
    with pytest.raises(ValueError, match="other settings"):
        train_recipe(tmp_path / "x", recipe_config("llava", **{**MICRO, "steps": 4}), progress=False)


def test_one_hard_negative_of_each_kind_per_scene(micro_world, tmp_path):
    """negatives='each': every scene gets a colour, a pattern, a shape and a position negative, each differing
    from its caption in that kind of word only; the encoder stage trains with them."""
    import numpy as np

    from visedit.models.recipe import NEGATIVE_KINDS, _hard_negative
    from visedit.world.entities import COLOURS, PATTERNS, SHAPES

    scene = render_scene(micro_world.entities[:3], seed=np.random.default_rng(1))
    from collections import Counter

    words = {"colour": set(COLOURS), "pattern": set(PATTERNS), "shape": set(SHAPES)}
    truth = {kind: Counter(e.fact(kind) for e in scene.entities) for kind in words}
    for what in NEGATIVE_KINDS:
        neg = _hard_negative(scene, random.Random(0), what).replace(" .", "").split()
        for kind in words:
            assert (Counter(w for w in neg if w in words[kind]) != truth[kind]) == (kind == what), (what, kind, neg)
    with pytest.raises(ValueError, match="negatives"):
        recipe_config("llava", negatives="all")
    record = train_recipe(tmp_path / "e", recipe_config("llava", **{**MICRO, "negatives": "each"}), progress=False,
                          log_every=0, stop_after=2)
    assert record.get("stopped")


def test_cli_trains_a_recipe_and_refuses_mixed_options(tmp_path):
    base = [sys.executable, "-m", "visedit", "train-tiny", "--out", str(tmp_path / "c"), "--no-progress"]
    bad = subprocess.run(base + ["--recipe", "nope"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "unknown recipe" in bad.stderr
    bad = subprocess.run(base + ["--budget", "study"], capture_output=True, text=True)
    assert bad.returncode == 2 and "add --recipe" in bad.stderr
    sets = [x for k, v in MICRO.items() for x in ("--set", f"{k}={v}")]
    ok = subprocess.run(base + ["--recipe", "shallow", "--stop-after", "2"] + sets, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["stopped"] is True and (tmp_path / "c.ckpt").exists()
    bad = subprocess.run(base + ["--encoder-only"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "add --recipe" in bad.stderr
    enc = [sys.executable, "-m", "visedit", "train-tiny", "--out", str(tmp_path / "e"), "--no-progress"]
    ok = subprocess.run(enc + ["--recipe", "llava", "--encoder-only"] + sets, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["seconds"].keys() == {"encoder"} and (tmp_path / "e" / "encoder.json").exists()


def test_model_card_of_a_scene_model_measures_selectors(micro_run):
    from visedit.models.card import model_card

    vllm = load_vllm(micro_run[0])
    card = model_card(vllm, make_world(0, 12), entities=[0, 1], progress=False)
    assert card.selector_accuracy is not None and set(card.per_selector) <= {"left", "right", "top", "bottom",
                                                                             "colour", "pattern"}
    assert card.n["selector"] >= 8 and "selector_accuracy ≥ 0.90" in card.passes()
    assert 0 <= card.selector_accuracy <= 1 and "selector_accuracy" in card.to_dict()


def test_layer_selectivity_on_scene_records(micro_run, tmp_path):
    from visedit.attribution.selectivity import layer_selectivity
    from visedit.world import DatasetSpec, load_world_split

    vllm = load_vllm(micro_run[0])
    recs = load_world_split("eval", DatasetSpec(seed=0, n_entities=12, edits_per_pair=1, image_size=80, edition=2),
                            root=tmp_path / "d")[:3]
    sel = layer_selectivity(vllm, recs, only_correct=False, n=2, progress=False)
    assert len(sel.pointing) == len(sel.lift) == len(sel.pair) == vllm.n_layers and sel.n == 3
    assert all(p <= q for p, q in zip(sel.pair, sel.pointing)), "a pair points right only if its first map does"
    d = sel.to_dict()
    assert d["best_layer"] == int(np.argmax(sel.pointing)) or sel.pointing[d["best_layer"]] == max(sel.pointing)
    first = load_world_split("eval", DatasetSpec(seed=0, n_entities=12, edits_per_pair=1, image_size=32),
                             root=tmp_path / "e")[:2]
    with pytest.raises(ValueError, match="second edition"):
        layer_selectivity(vllm, first, progress=False)


def test_profile_depth_and_early_share_oracle():
    from visedit.attribution.contributions import ContributionProfile

    attn = [0.1, 0.0, -0.2, 0.1, 0.0, 0.0, 0.3, 0.5, 0.0, 0.0, 0.0, 0.0]
    prof = ContributionProfile(mean={"attn": attn}, low={}, high={}, n=1, n_total=1, only_correct=True)
    assert prof.relative_peak_depth() == 7 / 11
    assert prof.early_share() == pytest.approx(0.2 / 1.0)  # layers 0–3 hold 0.2 of the positive 1.0


def test_reading_report_of_the_first_model(embedded):
    """The study's report on a one-creature model: card, profile, no selectivity; it serialises."""
    from visedit.study import ReadingReport, reading_report

    rep = reading_report(embedded, n_profile=8, card_entities=2, progress=False)
    assert rep.selectivity is None and rep.n_layers == embedded.n_layers == len(rep.attention)
    assert rep.attention_peak_relative_depth == round(rep.attention_peak / (rep.n_layers - 1), 4)
    assert 0 <= rep.early_share <= 1 and rep.n_profile >= 1
    assert len(rep.visual_attention) == len(rep.text_attention) == rep.n_layers
    assert 0 <= rep.visual_early_share <= 1 and 0 <= rep.visual_peak_relative_depth <= 1
    assert ReadingReport.from_dict(rep.to_dict()) == rep
    # a report written before the source split still reads
    old = {k: v for k, v in rep.to_dict().items() if not k.startswith(("visual_", "text_"))}
    assert ReadingReport.from_dict(old).visual_attention is None


def test_scene_records_are_scored_on_the_region_probes_too(micro_run, tmp_path):
    """Scene records add in-image and look-alike locality; with no edit both are exactly 1 (oracle), the
    five-metric mean is unchanged by them, and the summary round-trips."""
    from visedit.editing import get_editor
    from visedit.evaluation import evaluate
    from visedit.evaluation.protocol import METRICS, EvalSummary, probes
    from visedit.world import DatasetSpec, load_world_split

    vllm = load_vllm(micro_run[0])
    recs = load_world_split("eval", DatasetSpec(seed=0, n_entities=12, edits_per_pair=1, image_size=80, edition=2),
                            root=tmp_path / "d")[:2]
    assert list(probes(recs[0]))[5:] == ["i_locality", "la_locality"]
    summary = evaluate(get_editor("none", vllm), recs, out=tmp_path / "run", progress=False)
    assert summary.token["i_locality"] == summary.token["la_locality"] == 1.0
    assert summary.exact["i_locality"] == summary.exact["la_locality"] == 1.0
    assert summary.mean == np.mean([summary.token[m] for m in METRICS])
    assert EvalSummary.load(tmp_path / "run" / "summary.json") == summary


def test_study_figures_put_each_model_at_its_relative_depth():
    from visedit.viz.figures import depth_profiles_figure, read_depth_figure

    fig = depth_profiles_figure({"eight": [0.0] * 7 + [1.0], "twelve": [0.0] * 6 + [1.0] + [0.0] * 5})
    assert [list(t.x)[-1] for t in fig.data] == [1.0, 1.0]
    assert list(fig.data[1].x)[6] == pytest.approx(6 / 11)
    bars = read_depth_figure([{"recipe": "a", "attention_peak_relative_depth": 0.5, "early_share": 0.1}])
    assert list(bars.data[0].y) == [0.5] and list(bars.data[1].y) == [0.1]


def test_region_pool_is_the_coverage_weighted_mean_of_each_creatures_patches(micro_world):
    """Oracle: patch states equal to their own patch index give each creature the coverage-weighted mean
    index; targets name each creature's looks."""
    from visedit.attribution import patch_coverage
    from visedit.models.recipe import LOOKS, looks_phrase, region_pool

    scenes = [render_scene(micro_world.entities[:3], seed=np.random.default_rng(4)),
              render_scene(micro_world.entities[3:4], seed=np.random.default_rng(5))]
    grid = 80 // 8
    patches = torch.arange(grid * grid, dtype=torch.float64)[None, :, None].repeat(2, 1, 2)
    patches[1] *= -1  # the second scene's states differ from the first's
    pooled, target = region_pool(scenes, patches, 8)
    assert pooled.shape == (4, 2) and target.tolist() == [
        LOOKS.index(looks_phrase(e.colour, e.pattern, e.shape)) for s in scenes for e in s.entities]
    k = 0
    for i, s in enumerate(scenes):
        for mask in s.masks:
            cover = patch_coverage(mask, (grid, grid)).ravel()
            want = (cover * np.arange(grid * grid)).sum() / cover.sum() * (1 if i == 0 else -1)
            assert pooled[k, 0].item() == pytest.approx(want) and pooled[k, 1].item() == pytest.approx(want)
            k += 1
    assert len(set(LOOKS)) == len(LOOKS) == 8 * 4 * 8 and LOOKS[0] == "a red solid circle ."


def test_the_region_term_trains_the_encoder_and_zero_adds_nothing(tmp_path):
    """region_weight > 0 changes what the contrastive stage learns; 0 adds no module, so runs and
    checkpoints made before the term existed resume unchanged; out-of-range weights are refused."""
    with pytest.raises(ValueError, match="region_weight"):
        recipe_config("llava", region_weight=-1.0)
    assert recipe_config("llava").region_weight == 1.0  # the recipe's default
    cfg = recipe_config("llava", **{**MICRO, "region_weight": 0.0})
    a = train_recipe(tmp_path / "a", cfg, progress=False, log_every=0, stop_after=cfg.encoder_steps)
    b = train_recipe(tmp_path / "b", recipe_config("llava", **{**MICRO, "region_weight": 1.0}), progress=False,
                     log_every=0, stop_after=cfg.encoder_steps)
    sa, sb = (torch.load(tmp_path / f"{x}.ckpt", weights_only=False)["modules"] for x in "ab")
    assert "region.weight" not in sa["aux"] and "region.weight" in sb["aux"]
    tower = [k for k in sa["model"] if "vision_tower" in k]
    assert tower and any(not torch.equal(sa["model"][k], sb["model"][k]) for k in tower)
    assert b["encoder_loss"] > a["encoder_loss"]  # the region term adds a positive cross-entropy


def test_the_position_term_trains_the_encoder_and_old_checkpoints_resume_without_it(tmp_path):
    """position_weight > 0 adds the row and column heads and changes the tower; 0 adds nothing; a
    checkpoint written before the setting existed is read as a run without it (and a run with it refuses
    that checkpoint instead of resuming it silently)."""
    with pytest.raises(ValueError, match="position_weight"):
        recipe_config("llava", position_weight=11.0)
    assert recipe_config("llava").position_weight == 1.0
    base = {**MICRO, "region_weight": 0.0}
    cfg0 = recipe_config("llava", **{**base, "position_weight": 0.0})
    train_recipe(tmp_path / "a", cfg0, progress=False, log_every=0, stop_after=cfg0.encoder_steps)
    train_recipe(tmp_path / "b", recipe_config("llava", **base), progress=False, log_every=0,
                 stop_after=cfg0.encoder_steps)
    sa, sb = (torch.load(tmp_path / f"{x}.ckpt", weights_only=False)["modules"] for x in "ab")
    grid = cfg0.image_size // cfg0.patch_size
    assert "row.weight" not in sa["aux"] and sb["aux"]["row.weight"].shape == (grid, cfg0.vision_hidden)
    assert sb["aux"]["column.weight"].shape == (grid, cfg0.vision_hidden)
    tower = [k for k in sa["model"] if "vision_tower" in k]
    assert any(not torch.equal(sa["model"][k], sb["model"][k]) for k in tower)
    # a checkpoint from before the setting: its config has no position_weight
    state = torch.load(tmp_path / "a.ckpt", weights_only=False)
    del state["config"]["position_weight"]
    torch.save(state, tmp_path / "a.ckpt")
    train_recipe(tmp_path / "a", cfg0, progress=False, log_every=0, stop_after=1)  # resumes: no refusal
    after = torch.load(tmp_path / "a.ckpt", weights_only=False)
    assert after["config"]["position_weight"] == 0.0
    assert (after["stage"], after["step"]) != (state["stage"], state["step"])  # it went on from there
    with pytest.raises(ValueError, match="other settings"):
        train_recipe(tmp_path / "a", recipe_config("llava", **base), progress=False, log_every=0, stop_after=1)


def test_a_masked_patch_encoder_learns_from_pixels_alone(tmp_path):
    """encoder_objective: masked trains the tower (and its pixel head) on blanked patches, never the caption
    encoder; the run goes on through every stage to a loadable model; settings that cannot go with it are
    refused in one line."""
    for bad, match in (({"frozen_encoder": False, "encoder_steps": 0}, "frozen_encoder: true"),
                       ({"region_weight": 1.0}, "set region_weight: 0"), ({"mask_ratio": 1.0}, "mask_ratio")):
        with pytest.raises(ValueError, match=match):
            recipe_config("masked-encoder", **{**MICRO, **bad})
    cfg = recipe_config("masked-encoder", **MICRO)
    assert cfg.encoder_objective == "masked" and cfg.region_weight == 0
    train_recipe(tmp_path / "a", cfg, progress=False, log_every=0, stop_after=1)
    first = torch.load(tmp_path / "a.ckpt", weights_only=False)["modules"]
    record = train_recipe(tmp_path / "a", cfg, progress=False, log_every=0, stop_after=cfg.encoder_steps - 1)
    last = torch.load(tmp_path / "a.ckpt", weights_only=False)["modules"]
    p = cfg.patch_size
    assert last["aux"]["pixels.weight"].shape == (3 * p * p, cfg.vision_hidden)
    assert math.isfinite(record["encoder_loss"]) and record["encoder_loss"] > 0
    tower = [k for k in first["model"] if "vision_tower" in k]
    assert any(not torch.equal(first["model"][k], last["model"][k]) for k in tower)
    assert not any(torch.equal(first["aux"][k], last["aux"][k]) for k in ("pixels.weight", "row.weight"))
    text = [k for k in first["aux"] if k.startswith(("text.", "img."))]
    assert text and all(torch.equal(first["aux"][k], last["aux"][k]) for k in text)  # no caption read
    assert torch.equal(first["temp"]["t"], last["temp"]["t"])
    train_recipe(tmp_path / "a", cfg, progress=False, log_every=0)
    vllm = load_vllm(tmp_path / "a")
    assert vllm.info["recipe"] == "masked-encoder"
    scene = render_scene(make_world(0, 12).entities[:2], seed=0)
    assert isinstance(vllm.answer(scene.image, "what does the creature on the left eat ?"), str)


def test_commands_read_the_dataset_of_the_models_world(micro_run, tmp_path):
    """dataset_spec_of reads a model's dataset from its folder without loading it: scenes for a scene
    model, one creature per image for the first model and for a folder without visedit.json; evaluate's
    records follow --model."""
    import argparse

    from visedit.cli import _records
    from visedit.models.vllm import dataset_spec_of
    from visedit.world import DatasetSpec

    out, _ = micro_run
    assert dataset_spec_of(out) == load_vllm(out).dataset_spec and dataset_spec_of(out).edition == 2
    assert dataset_spec_of() == dataset_spec_of("visedit-tiny") == DatasetSpec()
    assert dataset_spec_of(tmp_path) == DatasetSpec()
    args = argparse.Namespace(model=str(out), data=None, image_root=None, split="eval", limit=2)
    records = _records(args, progress=False)
    from PIL import Image

    assert len(records) == 2 and Image.open(records[0].image).size == (80, 80)
