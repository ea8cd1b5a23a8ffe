"""E-IC, the caption task: the world's caption edits (deterministic, both editions), which task a record of
an MMEdit file belongs to, and the protocol on caption records (whole-caption targets, exact match)."""

from __future__ import annotations

import json

import pytest

from visedit.editing import get_editor
from visedit.evaluation import probes, score_edit
from visedit.evaluation.protocol import answer_budget
from visedit.world import (CAPTION_PROMPT, DatasetSpec, MalformedRecordError, load_mmedit, load_world_split,
                           make_edit_dataset)

# seed 0: entity names come from the same world as the tiny model's vocabulary
SPEC = DatasetSpec(seed=0, n_entities=10, edits_per_pair=1, image_size=32, task="caption")


@pytest.fixture(scope="module")
def captions(tmp_path_factory):
    return load_world_split("eval", SPEC, root=tmp_path_factory.mktemp("caption_data"))


@pytest.fixture(scope="module")
def caption_model_dir(tmp_path_factory, world):
    """A tiny random LLaVA whose word-level vocabulary also holds the caption words (the first teaching
    model's does not: E-IC is for models that can say a caption, like the second)."""
    from visedit.models import tiny

    cfg = tiny.TinyConfig(image_size=32, patch_size=8, vision_hidden=32, vision_layers=2, vision_heads=2,
                          vision_intermediate=64, hidden=48, layers=3, heads=2, intermediate=96, max_positions=128)
    original = tiny.vocabulary
    words = ["a", "an", ".", "photo", "picture", "of"]
    tiny.vocabulary = lambda w: original(w) + [x for x in words if x not in original(w)]
    try:
        processor = tiny.build_processor(world, cfg)
        model = tiny.build_model(processor.tokenizer, cfg, seed=0)
    finally:
        tiny.vocabulary = original
    path = tmp_path_factory.mktemp("caption_llava")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def caption_model(caption_model_dir):
    from visedit.models import load_vllm

    return load_vllm(caption_model_dir)


def test_caption_edits_change_one_visual_fact_of_the_caption(captions):
    assert captions and all(r.task == "caption" and r.src == CAPTION_PROMPT for r in captions)
    for r in captions:
        assert r.extra["fact"] in ("colour", "pattern", "shape")
        assert r.pred.endswith(" .") and r.alt != r.pred
        changed = [(a, b) for a, b in zip(r.pred.split(), r.alt.split()) if a != b]
        assert changed[-1][1] == r.extra["alt_value"] and len(r.pred.split()) == len(r.alt.split())


def test_caption_datasets_are_deterministic_and_scene_captions_use_the_scene(tmp_path):
    spec = DatasetSpec(seed=0, n_entities=6, edits_per_pair=1, image_size=48, edition=2, task="caption")
    a = make_edit_dataset(tmp_path / "a", spec, progress=False)
    b = make_edit_dataset(tmp_path / "b", spec, progress=False)
    assert (a / "eval.json").read_bytes() == (b / "eval.json").read_bytes()
    assert (a / "images" / "eval_00000.png").read_bytes() == (b / "images" / "eval_00000.png").read_bytes()
    recs = load_mmedit(a / "eval.json")
    r = recs[0]
    assert r.pred.count(" .") == r.extra["n_creatures"]  # one sentence per creature, with its position
    assert probes(r)["m_generality"][2] == r.extra["alt_rephrase"]
    manifest = json.loads((a / "manifest.json").read_text())
    assert manifest["task"] == "caption"
    vqa = make_edit_dataset(tmp_path / "vqa", DatasetSpec(seed=0, n_entities=6, edits_per_pair=1, image_size=32),
                            progress=False)
    assert "task" not in json.loads((vqa / "manifest.json").read_text())  # E-VQA manifests as before
    with pytest.raises(ValueError, match="task must be 'vqa'.*or 'caption'"):
        DatasetSpec(task="retrieval")


def test_load_mmedit_knows_the_task_of_a_record(captions, tmp_path):
    raw = json.loads((captions[0].image.parents[1] / "eval.json").read_text())[:2]
    (tmp_path / "images").symlink_to(captions[0].image.parent)
    bare = [{k: v for k, v in r.items() if k != "task"} for r in raw]  # as the released files are
    (tmp_path / "caption_eval_edit.json").write_text(json.dumps(bare))
    (tmp_path / "vqa_eval.json").write_text(json.dumps(bare))
    assert {r.task for r in load_mmedit(tmp_path / "caption_eval_edit.json")} == {"caption"}  # the file name
    assert {r.task for r in load_mmedit(tmp_path / "vqa_eval.json")} == {"vqa"}
    assert {r.task for r in load_mmedit(tmp_path / "vqa_eval.json", task="caption")} == {"caption"}  # overridden
    (tmp_path / "mixed.json").write_text(json.dumps([raw[0], {**bare[1], "task": "vqa"}]))
    assert [r.task for r in load_mmedit(tmp_path / "mixed.json")] == ["caption", "vqa"]  # the record's own field
    (tmp_path / "bad.json").write_text(json.dumps([{**bare[0], "task": "retrieval"}]))
    with pytest.raises(MalformedRecordError, match="bad.json record 0: task must be one of vqa, caption"):
        load_mmedit(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="task must be one of"):
        load_mmedit(tmp_path / "vqa_eval.json", task="ic")


def test_caption_records_are_scored_on_the_whole_caption(caption_model, tiny_random, captions):
    r = captions[0]
    n_tokens = len(caption_model.encode_target(r.alt))
    assert n_tokens > 1 and answer_budget(caption_model, r) >= n_tokens + 4
    with pytest.raises(ValueError, match="cannot encode"):
        tiny_random.encode_target(r.alt)  # the first model's words: no "a"
    result = score_edit(get_editor("none", caption_model), r)
    score = caption_model.score(r.image, r.src, r.alt)
    assert result.token["reliability"] == pytest.approx(score.token_accuracy)  # every caption token counts
    assert result.token["t_locality"] == result.exact["m_locality"] == 1.0
    answer = caption_model.answer(r.image, r.src, max_new_tokens=answer_budget(caption_model, r))
    assert result.answers["reliability"] == answer
    assert result.exact["reliability"] == float(answer == r.alt)


def test_cli_task_option_reads_a_file_as_captions_and_makes_the_caption_set(caption_model_dir, caption_model,
                                                                           captions, tmp_path, capsys):
    from visedit.cli import main

    raw = json.loads((captions[0].image.parents[1] / "eval.json").read_text())[:2]
    (tmp_path / "images").symlink_to(captions[0].image.parent)
    (tmp_path / "edits.json").write_text(json.dumps([{k: v for k, v in r.items() if k != "task"} for r in raw]))
    args = ["evaluate", "--editor", "none", "--model", str(caption_model_dir), "--data", str(tmp_path / "edits.json"),
            "--limit", "1", "--json", "--fresh"]
    assert main([*args, "--task", "caption", "--out", str(tmp_path / "ic")]) == 0
    out = json.loads(capsys.readouterr().out)
    r = load_mmedit(tmp_path / "edits.json", task="caption")[0]
    assert out["n"] == 1 and out["reliability"] == pytest.approx(caption_model.score(r.image, r.src, r.alt).token_accuracy,
                                                                  abs=1e-4)
    # without --task the file's rule reads it as questions: the same edit scored with the question frame
    assert main([*args, "--out", str(tmp_path / "vqa")]) == 0
    as_vqa = json.loads(capsys.readouterr().out)
    assert as_vqa["n"] == 1 and as_vqa["settings"]["records"] != out["settings"]["records"]
    with pytest.raises(SystemExit):
        main([*args, "--task", "ic"])
    assert "invalid choice: 'ic'" in capsys.readouterr().err
    # make-dataset --task caption writes E-IC records
    assert main(["make-dataset", "--task", "caption", "--out", str(tmp_path / "made")]) == 0
    made = load_mmedit(tmp_path / "made" / "eval.json")
    assert made and {m.task for m in made} == {"caption"} and all(m.src == CAPTION_PROMPT for m in made)


def test_train_vead_on_captions_places_vead_by_the_models_questions(caption_model_dir, monkeypatch, tmp_path):
    """l_e is chosen from the attribution profile on the model's questions (E-VQA records), not on the
    caption records VEAD trains on (whole captions are rarely answered exactly, so no record would count)."""
    import visedit.editing.vead as vead_module
    from visedit import cli

    seen = {}

    def rule(vllm, records, **kw):
        seen["tasks"] = {r.task for r in records}
        return 0

    def train(vllm, records, config, **kw):
        seen["trained_on"] = {r.task for r in records}
        seen["layer"] = config.layer
        return None, {"wall_seconds": 0.0, "best_val_mean": 0.0}

    monkeypatch.setattr(vead_module, "choose_edit_layer", rule)
    monkeypatch.setattr(vead_module, "train_vead", train)
    monkeypatch.setattr("visedit.models.vllm.VLLM.dataset_spec",
                        property(lambda self: DatasetSpec(seed=0, n_entities=10, edits_per_pair=1, image_size=32)))
    assert cli.main(["train-vead", "--model", str(caption_model_dir), "--task", "caption", "--limit", "4",
                     "--out", str(tmp_path / "v")]) == 0
    assert seen == {"tasks": {"vqa"}, "trained_on": {"caption"}, "layer": 0}
