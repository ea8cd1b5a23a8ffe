"""The model interface on tiny random LLaVAs built from configs and saved like real checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from visedit.models import VLLM, adapter_for, load_vllm, register_backbone, unembed
from visedit.models.tiny import TinyConfig
from visedit.models.train import TrainConfig, _Batcher
from visedit.world import image_question, render, text_question


def test_real_loading_path_answers_through_the_interface(tiny_random, world):
    v = tiny_random
    assert v.n_layers == 3
    img = render(world.entities[0], seed=0, size=32).image
    inputs = v.inputs([(img, image_question("colour"), "red"), (None, text_question(world.entities[1], "diet"), "fish")])
    assert len(inputs) == 2
    start, stop = inputs.visual_spans[0]
    assert stop - start == 16 and inputs.visual_spans[1] is None
    assert v.adapter.visual_grid(stop - start) == (4, 4)
    ids = inputs.tensors["input_ids"]
    assert (ids[0, start:stop] == v.adapter.image_token_id).all()
    assert inputs.target_positions[0] == (inputs.last_prompt[0] + 1,)
    assert ids[0, inputs.target_positions[0][0]] == v.tokenizer.convert_tokens_to_ids("red")
    answers = v.answer_batch([(img, image_question("shape")), (None, "where does the mablok live ?")], max_new_tokens=3)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    score = v.score(img, image_question("colour"), "coral reef")
    assert len(score.target_ids) == 2 and score.logprob < 0 and 0 <= score.token_accuracy <= 1


def test_batch_padding_does_not_change_scores(tiny_random, world):
    img = render(world.entities[2], seed=1, size=32).image
    alone = tiny_random.score(img, image_question("diet"), "fish")
    batched = tiny_random.score_batch([(img, image_question("diet"), "fish"),
                                       (None, text_question(world.entities[0], "habitat"), "pine forest")])[0]
    assert alone.logprobs == pytest.approx(batched.logprobs, abs=1e-5)


def test_sites_resolve_by_canonical_name(tiny_random):
    v = tiny_random
    lm = v.model.model.language_model
    assert v.site("llm.layers.1") is lm.layers[1]
    assert v.site("llm.layers.-1.mlp") is lm.layers[2].mlp
    assert v.site("llm.layers.0.attn") is lm.layers[0].self_attn
    assert v.site("llm.norm") is lm.norm and v.site("lm_head") is v.model.lm_head
    assert v.site("projector") is v.model.model.multi_modal_projector
    assert len(v.adapter.site_names()) == 5 + 3 * 3
    hidden = torch.randn(2, lm.config.hidden_size)
    assert torch.allclose(unembed(v.adapter, hidden), v.model.lm_head(lm.norm(hidden)))


def test_layer_out_of_range(tiny_random):
    with pytest.raises(ValueError, match="layer 3 is out of range: this model has 3 LLM layers"):
        tiny_random.site("llm.layers.3")
    with pytest.raises(ValueError, match="unknown site 'decoder'"):
        tiny_random.site("decoder")


def test_bad_prompts_and_targets(tiny_random, world):
    img = render(world.entities[0], seed=0, size=32).image
    with pytest.raises(ValueError, match="prompt is empty"):
        tiny_random.answer(img, "   ")
    with pytest.raises(ValueError, match="contains the image token '<image>' but no image"):
        tiny_random.answer(None, "<image>\nwhat colour is this creature ?")
    with pytest.raises(ValueError, match="cannot encode the target 'volcano'"):
        tiny_random.score(img, image_question("habitat"), "volcano")
    with pytest.raises(FileNotFoundError, match="image file not found"):
        tiny_random.answer("/no/such/image.png", image_question("colour"))


def test_unknown_checkpoint_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint folder at"):
        load_vllm(str(tmp_path / "missing" / "ckpt"))
    with pytest.raises(FileNotFoundError, match="cannot load a checkpoint from 'nobody/no-such-model'"):
        load_vllm("nobody/no-such-model")  # hub-id shaped, not downloaded: no network access is attempted
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="cannot load a checkpoint from"):
        load_vllm(tmp_path / "empty")


def test_unknown_backbone_is_named():
    class Mystery(nn.Module):
        pass

    with pytest.raises(ValueError, match="unknown backbone Mystery: no adapter registered"):
        adapter_for(Mystery())


def test_registry_picks_adapter_by_class_not_name():
    class Base(nn.Module):
        pass

    @register_backbone(Base)
    class BaseAdapter:  # noqa: D401 - test double
        def __init__(self, model):
            self.model = model

    class NamedLikeLlava(Base):  # a name substring must not matter, the class does
        pass

    assert isinstance(adapter_for(NamedLikeLlava()), BaseAdapter)


def test_training_sequences_match_inference_inputs(tiny_random, world):
    """The trainer builds ids by hand; they must equal what the interface builds for the same turn."""
    v = tiny_random
    b = _Batcher(v.processor, world, n_visual=16)
    img = render(world.entities[0], seed=0, size=32).image
    q = image_question("pattern", 2)
    ids, labels = b.sequence([(q, "striped")], with_image=True)
    inputs = v.inputs([(img, q, "striped")], add_eos=True)
    assert inputs.tensors["input_ids"][0].tolist() == ids
    assert [i for i, l in enumerate(labels) if l != -100] == list(inputs.target_positions[0])
    text_ids, _ = b.sequence([(text_question(world.entities[4], "diet"), "moss")], with_image=False)
    t_inputs = v.inputs([(None, text_question(world.entities[4], "diet"), "moss")], add_eos=True)
    assert t_inputs.tensors["input_ids"][0].tolist() == text_ids


def test_training_is_seeded_and_atomic(tmp_path):
    from visedit.models.train import train_tiny
    from tests.conftest import SMALL

    cfg = TrainConfig(vision_steps=2, vision_batch=4, steps=3, batch_images=2, batch_text=2, warmup=2,
                      n_entities=12, context_steps=2, context_batch=6)
    a = train_tiny(tmp_path / "a", cfg, SMALL, progress=False, log_every=0)
    train_tiny(tmp_path / "b", cfg, SMALL, progress=False, log_every=0)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]
    assert json.loads((tmp_path / "a" / "training.json").read_text())["final_loss"] == a["final_loss"]
    v = load_vllm(tmp_path / "a")
    assert isinstance(v, VLLM) and v.n_layers == SMALL.layers
    assert "context_loss" in a and a["train_config"]["context_steps"] == 2


def test_stage_three_from_a_stage_two_folder_equals_a_run_from_scratch(tmp_path):
    """``start_from`` (stage 3 only, on a stage-2 model) reproduces a full run byte for byte."""
    import dataclasses

    from visedit.models.train import train_tiny
    from tests.conftest import SMALL

    full = TrainConfig(vision_steps=2, vision_batch=4, steps=3, batch_images=2, batch_text=2, warmup=2,
                       n_entities=12, context_steps=3, context_batch=8)
    train_tiny(tmp_path / "full", full, SMALL, progress=False, log_every=0)
    train_tiny(tmp_path / "stage2", dataclasses.replace(full, context_steps=0), SMALL, progress=False, log_every=0)
    record = train_tiny(tmp_path / "stage3", full, SMALL, progress=False, log_every=0, start_from=tmp_path / "stage2")
    weights = [(tmp_path / n / "model.safetensors").read_bytes() for n in ("full", "stage2", "stage3")]
    assert weights[0] == weights[2] and weights[0] != weights[1]
    assert record["stage2_seconds"] > 0 and record["wall_seconds"] >= record["stage2_seconds"]
    with pytest.raises(ValueError, match=r"other stage-1/2 settings \(\['steps'\]\)"):
        train_tiny(tmp_path / "x", dataclasses.replace(full, steps=4), SMALL, start_from=tmp_path / "stage2")
    with pytest.raises(ValueError, match="already went through stage 3"):
        train_tiny(tmp_path / "x", full, SMALL, start_from=tmp_path / "full")
    with pytest.raises(ValueError, match="no readable training.json"):
        train_tiny(tmp_path / "x", full, SMALL, start_from=tmp_path / "nowhere")
    assert not (tmp_path / "x").exists()


def test_context_sequences_state_a_fact_and_answer_from_it(world):
    """Stage 3's data: the answer is the stated value when the statement is about the asked fact, the
    creature's own fact otherwise; only the answer is labelled; notes are question + value words."""
    import random

    from visedit.models.tiny import build_processor
    from visedit.world import FACTS

    b = _Batcher(build_processor(world, TinyConfig(image_size=32, patch_size=8)), world, 16)
    rng, e = random.Random(3), world.entities[0]
    inv = {i: w for w, i in b.tok.get_vocab().items()}
    seen = set()
    for _ in range(400):
        ids, labels, note = b.context_sequence(e, rng)
        answer = " ".join(inv[i] for i, l in zip(ids, labels) if l != -100 and i != b.eos)
        assert labels[-1] == b.eos and all(l == -100 for l in labels[: len(ids) - len(b.words(answer)) - 1])
        text = " ".join(inv[i] for i in ids if i != b.img)
        asked = next(f for f in FACTS if any(q in text for q in _train_questions(f)))
        if note is not None:
            seen.add("note")
            assert ids.count(b.img) == 16
            note_text = " ".join(inv[i] for i in note)
            stated = next(f for f in FACTS if any(note_text.startswith(q) for q in _train_questions(f)))
            value = note_text[len(next(q for q in _train_questions(stated) if note_text.startswith(q))):]
            value = value.strip().lstrip("?.").strip()
        elif " is " in text and "the " in text and " of this creature is " in text:
            seen.add("statement")
            stated, value = text.split(" of this creature is ")[0].split("the ")[-1], None
            value = text.split(" of this creature is ")[1].split(" .")[0]
        else:
            seen.add("turn")
            continue
        expected = value if stated == asked else e.fact(asked)
        assert answer == expected, (text, note)
    assert seen == {"note", "statement", "turn"}


def _train_questions(fact):
    from visedit.world import TRAIN_TEMPLATES

    return [q.rstrip(" ?.") for q in TRAIN_TEMPLATES[fact]]


def test_notes_are_written_over_the_visual_tokens():
    from visedit.models.train import write_notes

    embed = nn.Embedding(10, 4)
    visual = torch.zeros(2, 6, 4)
    out = write_notes(embed, {1: (2, torch.tensor([3, 5]))}, visual)
    assert torch.equal(out[0], visual[0]) and torch.equal(out[1, :2], visual[1, :2]) and torch.equal(out[1, 4:], visual[1, 4:])
    assert torch.equal(out[1, 2], embed.weight[3]) and torch.equal(out[1, 3], embed.weight[5])
    assert write_notes(embed, {}, visual) is visual and visual.abs().sum() == 0


def test_bad_config_keys_are_rejected():
    with pytest.raises(ValueError, match=r"unknown TinyConfig key\(s\) \['hiden'\]"):
        TinyConfig.from_dict({"hiden": 64})
    with pytest.raises(ValueError, match=r"unknown TrainConfig key\(s\) \['learning_rate'\]"):
        TrainConfig.from_dict({"learning_rate": 1e-3})
    with pytest.raises(ValueError, match="multiple of patch_size"):
        TinyConfig(image_size=30, patch_size=8)
