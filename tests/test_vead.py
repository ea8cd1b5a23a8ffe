"""VEAD on a tiny random LLaVA: where it acts (visual slice only, image inputs only, multi-token
passes only), one edit per row, the gate, the cached training path against the real model, training
determinism and resuming, and hook hygiene."""

from __future__ import annotations

import copy
import dataclasses
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from visedit.editing import EditRequest, VEAD, VEADConfig, VEADEditor, get_editor, train_vead
from visedit.editing.base import target_loss
from visedit.editing.vead import train as vead_train
from visedit.hooks import hook_count, live_hooks
from visedit.world import DatasetSpec, load_world_split

# seed 0: entity names come from the same world as the tiny model's vocabulary
SPEC = DatasetSpec(seed=0, n_entities=10, edits_per_pair=1, image_size=32)


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    return load_world_split("train", SPEC, root=tmp_path_factory.mktemp("vead_data"))


@pytest.fixture()
def editor(tiny_random):
    torch.manual_seed(0)
    ed = VEADEditor(tiny_random, VEADConfig(layer=1))
    torch.nn.init.normal_(ed.adapter.w_end.weight, std=0.5)
    return ed


def test_untrained_vead_is_the_identity(tiny_random, records):
    ed = VEADEditor(tiny_random, VEADConfig(layer=1))
    r = records[0]
    x = tiny_random.inputs([(r.image, r.src, r.alt)])
    before = tiny_random.logits(x)
    with ed.edit(EditRequest.from_record(records[1])):
        assert torch.equal(tiny_random.logits(x), before)


def test_vead_touches_only_image_inputs_after_the_visual_slice(tiny_random, records, editor):
    r = records[0]
    x = tiny_random.inputs([(r.image, r.src, r.alt), (None, r.loc, r.loc_ans)])
    start, stop = x.visual_spans[0]
    before = tiny_random.logits(x)
    with editor.edit(EditRequest.from_record(records[1])):
        after = tiny_random.logits(x)
    assert torch.equal(after[1], before[1])  # text-only row: untouched, bit for bit
    assert torch.equal(after[0, :start], before[0, :start])  # positions before the image: untouched
    assert not torch.allclose(after[0, stop:], before[0, stop:])


def test_vead_is_off_on_single_token_steps(tiny_random, records, editor):
    ids = torch.tensor([[tiny_random.adapter.image_token_id]])
    with editor.edit(EditRequest.from_record(records[1])):
        editor._top.kwargs["model"] = {"input_ids": ids}
        assert editor._visual_rows(1) is None


def test_one_edit_per_row_matches_single_edits(tiny_random, records, editor):
    reqs = [EditRequest.from_record(records[1]), EditRequest.from_record(records[2])]
    probes = [(records[3].image, records[3].src, records[3].alt), (records[4].image, records[4].rephrase, records[4].alt)]
    with editor.edit_each(reqs):
        both = tiny_random.score_batch(probes)
    single = []
    for req, probe in zip(reqs, probes):
        with editor.edit(req):
            single.append(tiny_random.score_batch([probe])[0])
    for a, b in zip(both, single):
        assert np.allclose(a.logprobs, b.logprobs, atol=1e-5)
    with editor.edit_each(reqs), pytest.raises(ValueError, match="2 edits are applied, one per row"):
        tiny_random.score_batch(probes[:1])


def test_gate_is_a_probability_map(tiny_random, records, editor):
    with editor.edit(EditRequest.from_record(records[1])):
        gate = editor.gate(records[3].image, records[3].src)
        with pytest.raises(ValueError, match="needs an image"):
            editor.gate(None, records[3].loc)
    assert gate.shape == tiny_random.adapter.visual_grid(gate.size)
    assert ((gate > 0) & (gate < 1)).all()
    with pytest.raises(RuntimeError, match="needs an applied edit"):
        editor.gate(records[3].image, records[3].src)
    ablated = VEADEditor(tiny_random, VEADConfig(layer=1, use_im=False))
    with ablated.edit(EditRequest.from_record(records[1])):
        assert (ablated.gate(records[3].image, records[3].src) == 1).all()


@pytest.mark.parametrize("at", ["output", "input"])
def test_cached_training_path_reproduces_the_model(tiny_random, records, at):
    config = VEADConfig(layer=1, at=at, w_im=0.0)
    cache = vead_train.Cache(tiny_random, 1, config)
    batch = [cache.record(r) for r in records[:3]]
    vead = VEAD(**config.resolved(tiny_random.model.config.text_config.hidden_size))
    _, parts = vead_train.step_loss(vead, cache, batch, config, np.random.default_rng(0))
    rel = np.mean([float(target_loss(tiny_random, tiny_random.inputs([(r.image, r.src, r.alt)]))) for r in records[:3]])
    assert parts["rel"] == pytest.approx(rel, rel=1e-5)
    assert abs(parts["loc"]) < 1e-6  # identity VEAD: the locality KL is zero
    assert all(r.im_target.numel() == 0 for r in batch)  # w_im = 0: no perturbation targets computed
    assert vead_train.Cache(tiny_random, 1, VEADConfig(layer=1, at=at)).record(records[0]).im_target.shape == (3, 16)


@pytest.mark.parametrize("im_reads", ["prompt", "image"])
def test_hard_negative_is_the_other_entity_the_gate_opens_on_most(tiny_random, records, im_reads):
    """``hard_loc``: each record's fifth row is, of the sampled pool, the record of another entity whose
    edit image the gate opens on most (oracle: brute force over the pool); at the identity its KL is zero
    (the cached log-probs are the frozen model's on that row), and the loss grows by nothing else."""
    config = VEADConfig(layer=1, im_reads=im_reads, hard_loc=len(records))  # the pool: every record
    cache = vead_train.Cache(tiny_random, 1, config)
    pool = [cache.record(r) for r in records[:8]]
    assert {c.group for c in pool} == {r.extra["entity"] for r in records[:8]}
    torch.manual_seed(0)
    vead = VEAD(**config.resolved(tiny_random.model.config.text_config.hidden_size))
    batch = pool[:3]
    chosen = vead_train.hard_negatives(vead, batch, pool, config, np.random.default_rng(0))
    start, stop = batch[0].span
    for r, neg in zip(batch, chosen):
        keys = config.im_keys(r.states[:1], [r.last_prompt], (start, stop))
        with torch.no_grad():
            opens = {id(c): float(torch.sigmoid(vead.gate_logits(c.states[:1, start:stop], keys)).mean())
                     for c in pool if c.group != r.group}
        assert neg.group != r.group and opens[id(neg)] == pytest.approx(max(opens.values()), abs=1e-6)
    _, parts = vead_train.step_loss(vead, cache, batch, config, np.random.default_rng(0), pool=pool)
    _, plain = vead_train.step_loss(vead, cache, batch, dataclasses.replace(config, hard_loc=0),
                                    np.random.default_rng(0))
    assert abs(parts["loc"]) < 1e-6 and parts["rel"] == plain["rel"] and parts["gen"] == plain["gen"]
    assert parts["im"] != plain["im"]  # the negative's gate joins L_down
    with pytest.raises(ValueError, match="more than one entity"):
        vead_train.hard_negatives(vead, batch[:1], batch[:1], config, np.random.default_rng(0))
    with pytest.raises(ValueError, match="hard_loc"):
        VEADConfig(hard_loc=-1)


@pytest.mark.parametrize("at", ["output", "input"])
def test_eos_training_scores_the_end_token_and_remembers_what_an_edit_remembers(tiny_random, records, editor, at):
    """``eos``: the edit's cross-entropy covers the end-of-sequence token (oracle: the model's own loss on
    the answer + end token), and the memory VEAD reads in training is exactly what an applied edit keeps
    (image + prompt + answer, no end token)."""
    config = VEADConfig(layer=1, at=at, w_im=0.0, eos=True)
    cache = vead_train.Cache(tiny_random, 1, config)
    batch = [cache.record(r) for r in records[:3]]
    eos = tiny_random.tokenizer.eos_token_id
    assert all(r.target_ids[k][-1] == eos for r in batch for k in range(4))
    vead = VEAD(**config.resolved(tiny_random.model.config.text_config.hidden_size))
    _, parts = vead_train.step_loss(vead, cache, batch, config, np.random.default_rng(0))
    rel = np.mean([float(target_loss(tiny_random, tiny_random.inputs([(r.image, r.src, r.alt)], add_eos=True)))
                   for r in records[:3]])
    assert parts["rel"] == pytest.approx(rel, rel=1e-5)
    assert abs(parts["loc"]) < 1e-6  # identity VEAD: the locality KL is zero, end token included
    applied = VEADEditor(tiny_random, config, adapter=editor.adapter)
    for r, cached in zip(records[:3], batch):
        memory = applied.remember(EditRequest.from_record(r))
        assert int(cached.mask[0].sum()) == int(memory.mask[0].sum())
        assert torch.allclose(cached.states[0][cached.mask[0]], memory.states[0][memory.mask[0]], atol=1e-5)


def test_the_input_of_a_layer_is_the_output_of_the_one_before(tiny_random, records, editor):
    """Oracle: VEAD at the input of layer 1 is VEAD at the output of layer 0 with the same weights — in the
    editor (hooks) and in the cached training path; at the input of layer 0 it edits the projector's output."""
    at_input = VEADEditor(tiny_random, VEADConfig(layer=1, at="input"), adapter=editor.adapter)
    at_output = VEADEditor(tiny_random, VEADConfig(layer=0), adapter=editor.adapter)
    r, req = records[0], EditRequest.from_record(records[1])
    x = tiny_random.inputs([(r.image, r.src, r.alt), (None, r.loc, r.loc_ans)])
    before = tiny_random.logits(x)
    with at_input.edit(req):
        a = tiny_random.logits(x)
    with at_output.edit(req):
        b = tiny_random.logits(x)
    assert torch.allclose(a, b, atol=1e-5) and not torch.allclose(a[0], before[0])
    assert torch.equal(a[1], before[1])  # text-only row untouched
    losses = []
    for ed in (at_input, at_output):
        cache = vead_train.Cache(tiny_random, ed.layer, dataclasses.replace(ed.config, w_im=0.0))
        batch = [cache.record(rec) for rec in records[:2]]
        losses.append(vead_train.step_loss(ed.adapter, cache, batch, cache.config, np.random.default_rng(0))[1])
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
    first = VEADEditor(tiny_random, VEADConfig(layer=0, at="input"), adapter=editor.adapter)
    start, stop = x.visual_spans[0]
    with first.edit(req):
        c = tiny_random.logits(x)
    assert torch.equal(c[0, :start], before[0, :start]) and not torch.allclose(c[0, stop:], a[0, stop:])


def test_training_is_seeded_resumable_and_round_trips(tiny_random, records, tmp_path, monkeypatch):
    config = VEADConfig(layer=1, steps=6, batch=2, val_every=3, val_edits=2, sampled_tokens=4, seed=2,
                        decay_share=0.5)  # the schedule is a function of the step: a resumed run follows it
    reference, info = train_vead(tiny_random, records, config, progress=False)
    assert [h["step"] for h in info["history"]] == [3, 6]

    calls = {"n": 0}
    original = vead_train.step_loss

    def dies_at_step_five(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return original(*args, **kw)

    monkeypatch.setattr(vead_train, "step_loss", dies_at_step_five)
    with pytest.raises(KeyboardInterrupt):
        train_vead(tiny_random, records, config, out=tmp_path / "vead", progress=False)
    assert not (tmp_path / "vead").exists()  # nothing half-written under the final name
    monkeypatch.setattr(vead_train, "step_loss", original)
    resumed, resumed_info = train_vead(tiny_random, records, config, out=tmp_path / "vead", progress=False)
    assert resumed_info["history"] == info["history"]  # the resumed steps repeat the reference's losses
    for k, v in reference.adapter.state_dict().items():
        assert torch.equal(resumed.adapter.state_dict()[k], v), k
    loaded = get_editor("vead", tiny_random, weights=str(tmp_path / "vead"))
    assert loaded.layer == 1 and loaded.config == config
    for k, v in reference.adapter.state_dict().items():
        assert torch.equal(loaded.adapter.state_dict()[k], v), k


def test_learning_rate_is_constant_then_decays_linearly(tiny_random, records, monkeypatch):
    config = VEADConfig(layer=1, steps=10, batch=2, val_every=10, val_edits=2, sampled_tokens=4, lr=1e-2,
                        decay_share=0.4)
    expected = [1e-2] * 6 + [1e-2 * k / 4 for k in (4, 3, 2, 1)]
    assert [config.lr_at(step) for step in range(10)] == pytest.approx(expected)
    assert VEADConfig(lr=1e-2, steps=10).lr_at(9) == 1e-2  # decay_share 0: constant, as in the release
    seen = []
    step = torch.optim.Adam.step

    def recording(self, *args, **kw):
        seen.append(self.param_groups[0]["lr"])
        return step(self, *args, **kw)

    monkeypatch.setattr(torch.optim.Adam, "step", recording)
    train_vead(tiny_random, records, config, progress=False)
    assert seen == pytest.approx(expected)  # what Adam used at each step
    with pytest.raises(ValueError, match="decay_share must be in"):
        VEADConfig(decay_share=1.0)


def test_holdout_by_group_keeps_pairs_apart(records):
    import random

    from visedit.editing.base import holdout_split, pair_key

    records = list(records) * 2  # every pair twice: a plain shuffle would split most pairs
    train, val = holdout_split(records, 0.3, 1000, random.Random(0), group=pair_key)
    assert len(train) + len(val) == len(records) and len(val) >= round(0.3 * len(records))
    plain = holdout_split(records, 0.3, 1000, random.Random(0))
    assert {pair_key(r) for r in plain[0]} & {pair_key(r) for r in plain[1]}
    assert not {pair_key(r) for r in train} & {pair_key(r) for r in val}  # no (entity, fact) pair on both sides
    again = holdout_split(records, 0.3, 1000, random.Random(0), group=pair_key)
    assert [r.src for r in again[1]] == [r.src for r in val]  # seeded


def test_no_hook_survives(tiny_random, records, editor):
    hooks = hook_count(tiny_random.model)
    with pytest.raises(ZeroDivisionError):
        with editor.edit(EditRequest.from_record(records[1])):
            assert hook_count(tiny_random.model) > hooks
            1 / 0
    assert hook_count(tiny_random.model) == hooks


def test_vead_config_errors(tiny_random):
    with pytest.raises(ValueError, match="unknown VEADConfig key"):
        VEADConfig.from_dict({"lyer": 3})
    assert VEADConfig.from_dict({"lr": "1e-3", "w_loc": 5}).lr == 1e-3  # YAML reads 1e-3 as a string
    assert isinstance(VEADConfig.from_dict({"w_loc": 5}).w_loc, float)
    with pytest.raises(ValueError, match="lr must be a number"):
        VEADConfig.from_dict({"lr": "fast"})
    with pytest.raises(ValueError, match="layer is not set"):
        VEADEditor(tiny_random, VEADConfig())
    with pytest.raises(ValueError, match="out of range"):
        VEADEditor(tiny_random, VEADConfig(layer=9))
    with pytest.raises(ValueError, match="at must be 'output' or 'input'"):
        VEADConfig(layer=0, at="middle")
    with pytest.raises(ValueError, match="im_reads must be 'prompt' or 'image'"):
        VEADConfig(layer=0, im_reads="text")
    with pytest.raises(FileNotFoundError, match="train-vead"):
        get_editor("vead", tiny_random, weights="/nonexistent/vead")


def test_edit_layer_is_just_before_the_high_contribution_block():
    from visedit.editing.vead.editor import edit_layer_from_profile, high_block

    # a late block 8-10 behind a lone spike at layer 2 (the second model's train profile, rounded): the
    # smoothed peak is the block's, l_e the output of layer 7 (the bare argmax would say layer 1)
    profile = [0.070, 0.056, 0.197, 0.025, 0.070, 0.097, 0.075, 0.040, 0.117, 0.118, 0.118, 0.034]
    assert high_block(profile) == (8, 10)
    assert edit_layer_from_profile(profile) == 7
    assert edit_layer_from_profile(profile, at="input") == 8
    assert edit_layer_from_profile(profile, window=1) == 1  # no smoothing: the spike alone
    # a model that reads most from layer 0: the block starts there, and "just before" it is clipped at 0
    assert high_block([0.34, 0.25, 0.24, 0.19, 0.17, 0.22, 0.20, 0.25]) == (0, 2)
    assert edit_layer_from_profile([0.34, 0.25, 0.24, 0.19, 0.17, 0.22, 0.20, 0.25]) == 0
    # the paper's shape: nothing for 18 of 32 layers, then the block
    assert edit_layer_from_profile([0.01] * 18 + [0.3] * 14) == 17
    # a flat profile is one block: l_e is the first layer
    assert high_block([0.1] * 6) == (0, 5)
    for bad in ([], [0.1, float("nan")], [[0.1, 0.2]]):
        with pytest.raises(ValueError, match="one finite value per layer"):
            high_block(bad)
    with pytest.raises(ValueError, match="positive odd number"):
        high_block(profile, window=2)
    with pytest.raises(ValueError, match="at must be 'output' or 'input'"):
        edit_layer_from_profile(profile, at="middle")


def test_vead_of_another_model_is_refused(tiny_random, embedded, records, tmp_path):
    VEADEditor(tiny_random, VEADConfig(layer=1)).save(tmp_path / "vead")
    with pytest.raises(ValueError, match="trained for another model"):
        get_editor("vead", embedded, weights=str(tmp_path / "vead"))


def test_sweep_cli_trains_and_evaluates_each_layer(tiny_random_dir, tmp_path, capsys):
    import json

    from visedit.cli import main

    config = tmp_path / "vead.yaml"
    config.write_text("val_every: 1\nval_edits: 1\nbatch: 2\nsampled_tokens: 4\n")
    code = main(["sweep-vead", "--layers", "0", "2", "--limit", "4", "--steps", "2", "--eval-limit", "2",
                 "--model", str(tiny_random_dir), "--config", str(config), "--out", str(tmp_path / "sweep"), "--json",
                 "--at", "output"])
    rows = json.loads(capsys.readouterr().out)
    assert code == 0 and [r["layer"] for r in rows] == [0, 2] and {r["at"] for r in rows} == {"output"}
    assert all(r["t_locality"] == 1.0 for r in rows)  # VEAD never touches text-only inputs
    assert (tmp_path / "sweep" / "layer2.json").exists() and (tmp_path / "sweep" / "layer0" / "vead.safetensors").exists()
    code = main(["sweep-vead", "--layers", "1", "--limit", "4", "--steps", "2", "--eval-limit", "2", "--model",
                 str(tiny_random_dir), "--config", str(config), "--out", str(tmp_path / "sweep"), "--json",
                 "--at", "input", "--im-reads", "image", "--width", "16", "--decay-share", "0.5",
                 "--set", "w_loc=2", "--set", "hard_loc=2"])
    rows = json.loads(capsys.readouterr().out)
    assert code == 0 and rows[0]["im_reads"] == "image" and rows[0]["width"] == 16
    assert rows[0]["decay_share"] == 0.5
    # a width other than the release's d/4, a decaying learning rate, hard negatives and every --set are named
    row = json.loads((tmp_path / "sweep" / "in1-im-image-w16-decay0.5-hard2-w_loc2.json").read_text())
    assert row["settings"]["config"]["w_loc"] == 2.0 and row["settings"]["config"]["hard_loc"] == 2
    for bad, message in (("w_lco=2", "unknown VEADConfig key"), ("w_loc", "--set takes KEY=VALUE")):
        code = main(["sweep-vead", "--layers", "1", "--limit", "4", "--steps", "2", "--model", str(tiny_random_dir),
                     "--config", str(config), "--out", str(tmp_path / "bad"), "--set", bad])
        assert code == 2 and message in capsys.readouterr().err
    first = json.loads((tmp_path / "sweep" / "layer0.json").read_text())
    assert first["width"] == 12 and first["decay_share"] == 0.0  # d = 48: the release's d/4, a constant lr


def test_reachability_bounds_visual_slice_edits(tiny_random, records):
    from visedit.editing.vead.analysis import reachability

    result = reachability(tiny_random, records[:2], layers=[0, 2], steps=30)
    assert result.layers == (0, 2) and len(result.loss[0]) == 2
    base = [float(target_loss(tiny_random, tiny_random.inputs([(r.image, r.src, r.alt)]))) for r in records[:2]]
    assert all(l < b for l, b in zip(result.loss[0], base))  # optimising the visual slice lowers the edit loss
    assert set(result.reached()) == {0, 2}


def test_reachability_cli_reports_each_layer_and_refuses_a_bad_one(tiny_random_dir, tmp_path, capsys):
    import json

    from visedit.cli import main

    out = tmp_path / "reach.json"
    code = main(["reachability", "--model", str(tiny_random_dir), "--layers", "0", "2", "--limit", "2", "--steps", "3",
                 "--json", "--out", str(out)])
    printed = json.loads(capsys.readouterr().out)
    assert code == 0 and printed == json.loads(out.read_text())
    assert printed["layers"] == [0, 2] and printed["n"] == 2 and len(printed["loss"][0]) == 2
    assert set(printed["reached"]) == {"0", "2"} and printed["command"].startswith("python -m visedit reachability")
    assert main(["reachability", "--model", str(tiny_random_dir), "--layers", "9"]) == 2
    assert "out of range" in capsys.readouterr().err
    assert main(["reachability", "--model", str(tiny_random_dir), "--steps", "0"]) == 2
    assert "steps must be an int >= 1" in capsys.readouterr().err


def test_note_reading_writes_notes_and_cleans_up(tiny_random, records):
    from visedit.editing.vead.analysis import note_reading

    tiny_random.answer_batch([(records[0].image, records[0].src)])  # transformers adds its own hooks once
    base = hook_count(tiny_random.model)
    result = note_reading(tiny_random, records[:3], start=2)
    assert result.n == 3 and result.start == 2
    for key in ("reliability", "t_generality", "m_generality", "m_locality"):
        assert round(getattr(result, key) * 3, 6) in (0, 1, 2, 3)  # a share of 3 edits
    assert hook_count(tiny_random.model) == base
    with pytest.raises(ValueError, match="does not fit at visual token 15 of 16"):
        note_reading(tiny_random, records[:1], start=15)
    assert hook_count(tiny_random.model) == base


def test_written_words_reads_the_change_as_words(tiny_random, records, editor):
    from visedit.editing.vead.analysis import written_words

    at_input = VEADEditor(tiny_random, VEADConfig(layer=0, at="input"), adapter=editor.adapter)
    hooks = hook_count(tiny_random.model)
    with pytest.raises(RuntimeError, match="needs an applied edit"):
        written_words(at_input, records[3].image, records[3].src)
    with at_input.edit(EditRequest.from_record(records[1])):
        result = written_words(at_input, records[3].image, records[3].src)
        delta = at_input.last_visual[1][0] - at_input.last_visual[0][0]
        with pytest.raises(ValueError, match="needs an image"):
            written_words(at_input, None, records[3].loc)
    assert hook_count(tiny_random.model) == hooks
    n = delta.shape[0]
    assert len(result.words) == len(result.cosine) == len(result.change) == n
    # oracle: the word of token 0 is the argmax of the cosine with every input embedding
    embed = tiny_random.model.get_input_embeddings().weight.detach().float()
    cos = torch.nn.functional.cosine_similarity(delta[0][None], embed, dim=-1)
    assert result.words[0] == tiny_random.tokenizer.decode([int(cos.argmax())]).strip()
    assert result.cosine[0] == pytest.approx(float(cos.max()), abs=1e-4)
    assert all(c > 0 for c in result.change) and sum(k for _, k in result.top(3, share=1.0)) <= n


def test_im_reading_the_edit_image_takes_each_tokens_best_match(tiny_random, records):
    """Oracle: with K keys the gate logit of a token is the max of its K single-key logits (the paper's
    formula, one key = p); the editor and the cached training path hand the IM the edit sample's visual
    tokens, and the two paths agree on the loss."""
    torch.manual_seed(0)
    config = VEADConfig(layer=1, im_reads="image", w_im=0.0)
    ed = VEADEditor(tiny_random, config)
    torch.nn.init.normal_(ed.adapter.w_end.weight, std=0.5)
    V, keys = torch.randn(2, 5, 48), torch.randn(2, 3, 48)
    single = torch.stack([ed.adapter.gate_logits(V, keys[:, k]) for k in range(3)], -1)
    assert torch.allclose(ed.adapter.gate_logits(V, keys), single.amax(-1), atol=1e-6)
    assert torch.allclose(ed.adapter.gate_logits(V, keys[:, :1]), single[..., 0], atol=1e-6)
    req = EditRequest.from_record(records[1])
    states, inputs = ed.layer_states([(req.image, req.prompt, req.target)])
    start, stop = inputs.visual_spans[0]
    with ed.edit(req):
        assert torch.equal(ed.memory.prompt_state, states[:, start:stop])
        with pytest.raises(ValueError, match="needs every edit sample to have an image"):
            ed._im_keys(*ed.layer_states([(None, req.prompt, req.target)]))
    with ed.edit(req), torch.no_grad():  # the cached path edits the record's own inputs: compare there
        own = float(target_loss(tiny_random, tiny_random.inputs([(req.image, req.prompt, req.target)])))
    cache = vead_train.Cache(tiny_random, 1, config)
    _, parts = vead_train.step_loss(ed.adapter, cache, [cache.record(records[1])], config, np.random.default_rng(0))
    assert parts["rel"] == pytest.approx(own, rel=1e-4)
    with torch.no_grad():
        plain = float(target_loss(tiny_random, tiny_random.inputs([(req.image, req.prompt, req.target)])))
    assert plain != pytest.approx(own, rel=1e-3)  # the edit changed the loss


def test_answer_memory_reads_the_new_answers_embeddings_in_both_paths(tiny_random, records):
    """``memory_reads: answer``: the edit memory is the new answer's input embeddings (oracle: the embedding
    table), so without the IM two edits with the same answer rewrite alike whatever their image and prompt;
    the editor and the cached training path agree on the loss, also with the end token (left out of the
    memory in both)."""
    torch.manual_seed(0)
    ed = VEADEditor(tiny_random, VEADConfig(layer=1, memory_reads="answer", use_im=False))
    torch.nn.init.normal_(ed.adapter.w_end.weight, std=0.5)
    req = EditRequest.from_record(records[1])
    ids = tiny_random.encode_target(req.target)
    embed = tiny_random.model.get_input_embeddings().weight.detach().float()
    x = tiny_random.inputs([(records[3].image, records[3].src)])
    with ed.edit(req):
        assert torch.equal(ed.memory.states[0], embed[torch.tensor(ids)]) and bool(ed.memory.mask.all())
        first = tiny_random.logits(x)
    assert records[5].image != req.image and records[5].src != req.prompt
    with ed.edit(EditRequest(records[5].image, records[5].src, req.target)):
        assert torch.equal(tiny_random.logits(x), first)
    for eos in (False, True):
        config = dataclasses.replace(ed.config, w_im=0.0, eos=eos)
        ed_eos = VEADEditor(tiny_random, config, adapter=ed.adapter)
        with ed_eos.edit(req), torch.no_grad():
            own = float(target_loss(tiny_random, tiny_random.inputs([(req.image, req.prompt, req.target)],
                                                                     add_eos=eos)))
        cache = vead_train.Cache(tiny_random, 1, config)
        cached = cache.record(records[1])
        assert torch.equal(cached.answer, embed[torch.tensor(ids)])
        _, parts = vead_train.step_loss(ed.adapter, cache, [cached], config, np.random.default_rng(0))
        assert parts["rel"] == pytest.approx(own, rel=1e-4)
    with pytest.raises(ValueError, match="memory_reads must be 'sample' or 'answer'"):
        VEADConfig(memory_reads="answers")


def test_shipped_vead_was_trained_with_the_preset():
    """`python -m visedit train-vead` trains with the preset: the shipped adapter's card must say it was
    trained with exactly those settings, or the command does not reproduce it."""
    import json

    from visedit.editing import load_preset
    from visedit.editing.vead.editor import TRAINED_DIR

    card = json.loads((TRAINED_DIR / "vead.json").read_text())
    preset = load_preset("vead")
    preset.pop("weights", None)
    # read as a config: a setting added after the card was written takes its default (the old behaviour)
    assert VEADConfig.from_dict(card["config"]) == VEADConfig.from_dict(preset)


def _count_steps(monkeypatch) -> dict:
    """Wrap the training step: ``calls["n"]`` counts steps; while ``calls["die"]`` the fifth raises
    KeyboardInterrupt (after the step-3 checkpoint)."""
    original, calls = vead_train.step_loss, {"n": 0, "die": False}

    def counting(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 5 and calls["die"]:
            raise KeyboardInterrupt
        return original(*args, **kw)

    monkeypatch.setattr(vead_train, "step_loss", counting)
    return calls


def test_a_checkpoint_left_by_another_model_is_not_resumed(tiny_random, tiny_random_retrained, records, tmp_path,
                                                           monkeypatch):
    config = VEADConfig(layer=1, steps=6, batch=2, val_every=3, val_edits=2, sampled_tokens=4, seed=2)
    calls = _count_steps(monkeypatch)
    calls["die"] = True
    with pytest.raises(KeyboardInterrupt):  # leaves the step-3 checkpoint beside the output folder
        train_vead(tiny_random, records, config, out=tmp_path / "vead", progress=False)
    other = tiny_random_retrained
    assert copy.deepcopy(tiny_random).fingerprint == tiny_random.fingerprint != other.fingerprint
    calls.update(n=0, die=False)
    train_vead(other, records, config, out=tmp_path / "vead", progress=False)
    assert calls["n"] == 6  # all six steps ran on the other model: nothing was resumed


def test_a_checkpoint_written_before_a_setting_existed_resumes_as_its_default(tiny_random, records, tmp_path,
                                                                              monkeypatch):
    """A run interrupted under an older VEADConfig (no ``hard_loc`` key) resumes: the missing setting counts
    as its default. A checkpoint whose setting differs is not resumed."""
    config = VEADConfig(layer=1, steps=6, batch=2, val_every=3, val_edits=2, sampled_tokens=4, seed=2)
    calls = _count_steps(monkeypatch)
    ckpt = vead_train._checkpoint_path(tmp_path / "vead")
    for saved_hard_loc, expected_steps in ((None, 3), (4, 6)):
        calls.update(n=0, die=True)
        with pytest.raises(KeyboardInterrupt):  # leaves the step-3 checkpoint beside the output folder
            train_vead(tiny_random, records, config, out=tmp_path / "vead", progress=False)
        saved = torch.load(ckpt, weights_only=False)
        if saved_hard_loc is None:
            del saved["config"]["hard_loc"]
        else:
            saved["config"]["hard_loc"] = saved_hard_loc
        torch.save(saved, ckpt)
        calls.update(n=0, die=False)
        train_vead(tiny_random, records, config, out=tmp_path / "vead", progress=False)
        assert calls["n"] == expected_steps
        shutil.rmtree(tmp_path / "vead")


def _with_memory(editor, **kw):
    return VEADEditor(editor.vllm, VEADConfig(layer=1, memory=True, **kw), adapter=editor.adapter)


def test_two_edits_held_at_once_each_answer_on_their_own_input(tiny_random, records, editor):
    reqs = [EditRequest.from_record(records[1]), EditRequest.from_record(records[2])]
    probes = [(r.image, r.prompt, r.target) for r in reqs]
    single = []
    for req, probe in zip(reqs, probes):
        with editor.edit(req):
            single.append(tiny_random.score_batch([probe])[0].logprobs)
    held = _with_memory(editor)
    for req in reqs:
        held.apply(req)
    assert len(held.bank) == 2
    both = [tiny_random.score_batch([p])[0].logprobs for p in probes] + [
        s.logprobs for s in tiny_random.score_batch(probes)]  # one at a time, then both in one batch
    assert held.last_route.tolist() == [0, 1]  # each row routed to its own edit: the nearest image
    held.restore()
    for got, want in zip(both, single + single):
        assert np.allclose(got, want, atol=1e-5)
    # the paper's VEAD holds one edit: the second replaces the first
    editor.apply(reqs[0])
    editor.apply(reqs[1])
    assert len(editor.bank) == 1 and len(editor.requests) == 2
    assert tiny_random.score_batch([probes[0]])[0].logprobs != single[0]
    editor.restore()


def test_one_held_edit_is_the_paper_vead_bit_for_bit(tiny_random, records, editor):
    probe = [(records[3].image, records[3].src, records[3].alt)]
    with editor.edit(EditRequest.from_record(records[1])):
        paper = tiny_random.logits(tiny_random.inputs(probe))
    for route in ("nearest", "gate", "joint"):
        with _with_memory(editor, route=route).edit(EditRequest.from_record(records[1])):
            assert torch.equal(tiny_random.logits(tiny_random.inputs(probe)), paper)


def test_gate_routing_picks_the_edit_the_gate_opens_on_most(tiny_random, records, editor):
    held = _with_memory(editor, route="gate")
    held.apply_batch([EditRequest.from_record(r) for r in records[1:4]])  # one step, three memories
    assert len(held.bank) == 3 and held.bank[0].states.shape[1] <= held.layer_states(
        [(records[1].image, records[1].src, records[1].alt)])[0].shape[1]
    tiny_random.score_batch([(records[4].image, records[4].src, records[4].alt)])
    V = held.last_visual[0]
    from visedit.editing.vead.memory import gate_scores

    scores = torch.stack([held.adapter.gate_logits(V.float(), m.prompt_state.float()).amax(-1) for m in held.bank], -1)
    assert torch.allclose(gate_scores(held.adapter, V, held.held_keys("im")), scores, atol=1e-5)
    assert held.last_route.item() == scores.argmax(-1).item()
    held.restore()
    with pytest.raises(ValueError, match="route must be 'nearest', 'gate', 'joint' or 'prompt'"):
        VEADConfig(route="random")


def test_the_question_ends_where_the_prompt_does_whatever_follows(tiny_random, records):
    """answer_marker is what the frame puts after the question; question_end finds the prompt's end in a
    row that goes on with an answer (or padding), the oracle being Inputs.last_prompt."""
    marker = tiny_random.answer_marker
    assert marker and tiny_random.tokenizer.decode(list(marker)).replace(" ", "").lower() == "assistant:"
    items = [(records[0].image, records[0].src, records[0].alt), (records[1].image, records[1].rephrase, f"{records[1].pred} {records[2].alt}"),
             (None, records[2].loc, records[2].loc_ans)]
    inputs = tiny_random.inputs(items)
    ids, mask = inputs.tensors["input_ids"], inputs.tensors["attention_mask"]
    for b in range(len(items)):
        assert tiny_random.question_end(ids[b], int(mask[b].sum())) == inputs.last_prompt[b] + 1
    assert tiny_random.question_end(ids[0], 3) == 3  # no marker in reach: the whole length


def test_joint_routing_reads_image_and_question_and_never_the_answer(tiny_random, records, editor):
    """The joint route picks argmax_k cos(v̄ − c_v, v̄_k − c_v) + w · cos(q̄ − c_q, q̄_k − c_q) with keys
    centred on the held edits (oracle from each probe's own l_e states), and the answer being scored does
    not move it."""
    from visedit.editing.vead.memory import JointKeys

    held = _with_memory(editor, route="joint", route_weight=2.0)
    held.apply_batch([EditRequest.from_record(r) for r in records[1:4]])
    probes = [(records[1].image_rephrase, records[1].src), (records[2].image, records[2].rephrase),
              (records[4].image, records[4].src)]
    keys = JointKeys.of(held.bank)
    with held._off():
        states, inputs = held.layer_states(probes)
    V = torch.stack([states[b, slice(*inputs.visual_spans[b])] for b in range(3)])
    Q = torch.cat([held._question_key(states[b:b + 1], inputs.visual_spans[b], inputs.last_prompt[b]) for b in range(3)])
    want = keys.scores(V, Q, 2.0).argmax(-1)
    manual = [int(np.argmax([
        float(F.cosine_similarity(V[b].mean(0) - keys.visual_centre, m.visual[0] - keys.visual_centre, dim=0))
        + 2.0 * float(F.cosine_similarity(Q[b] - keys.question_centre, m.question[0] - keys.question_centre, dim=0))
        for m in held.bank])) for b in range(3)]
    assert want.tolist() == manual and len(set(manual)) > 1  # not one edit for all
    r = records
    for targets in ((r[0].alt,) * 3, (f"{r[1].pred} {r[2].alt} {r[3].alt}", r[3].pred, f"{r[4].alt} {r[0].pred}")):
        tiny_random.score_batch([p + (t,) for p, t in zip(probes, targets)])
        assert held.last_route.tolist() == manual
    held.restore()
    with pytest.raises(ValueError, match="route_weight must be a number >= 0"):
        VEADConfig(route="joint", route_weight=-1)


def test_joint_route_reads_questions_at_a_later_layer_and_defers_below_route_min(tiny_random, records, editor):
    """route_layer: the image and question keys are the mean VEAD-off visual and question states at that
    layer's output (oracle: a plain traced pass); route_min: an input whose best route score, as a mean cosine, falls short is left
    unedited — bit for bit the unedited model's — while the edits' own prompts (score 1) are still edited."""
    last = tiny_random.n_layers - 1
    held = _with_memory(editor, route="joint", route_layer=last, route_min=0.99)
    reqs = [EditRequest.from_record(r) for r in records[1:4]]
    from_end = _with_memory(editor, route="joint", route_layer=-1)  # -1: the last layer
    from_end.apply(reqs[0])
    first_key = from_end.bank[0].question
    from_end.restore()
    for req in reqs:
        held.apply(req)
    assert torch.equal(first_key, held.bank[0].question)
    site = f"llm.layers.{last}"
    for req, m in zip(reqs, held.bank):
        inputs = tiny_random.inputs([(req.image, req.prompt, req.target)])
        with held._off():
            run = tiny_random.run(inputs, trace=[site])
        v0, start = inputs.visual_spans[0]
        assert torch.allclose(m.question[0], run.outputs[site][0, start:inputs.last_prompt[0] + 1].mean(0).float(),
                              atol=1e-5)
        assert torch.allclose(m.visual[0].float(), run.outputs[site][0, v0:start].mean(0).float(), atol=1e-5)
    probe = [(records[5].image, records[5].src, records[5].alt)]
    own = [(r.image, r.prompt, r.target) for r in reqs]
    edited_own = [s.logprobs for s in tiny_random.score_batch(own)]
    assert held.last_route.tolist() == [0, 1, 2]
    got = tiny_random.logits(tiny_random.inputs(probe))
    assert held.last_route.tolist() == [-1]
    held.restore()
    assert torch.equal(got, tiny_random.logits(tiny_random.inputs(probe)))
    assert edited_own != [s.logprobs for s in tiny_random.score_batch(own)]
    # one line for each bad setting
    with pytest.raises(ValueError, match="route_min must be a cosine in"):
        VEADConfig(route="joint", route_min=2)
    with pytest.raises(ValueError, match="route_layer is a setting of the joint and prompt routes"):
        VEADConfig(route="nearest", route_layer=1)
    early = _with_memory(editor, route="joint", route_layer=0)  # VEAD at layer 1's output: layers 2… follow
    with pytest.raises(ValueError, match=r"route_layer 0 must be a layer after VEAD's \(2…"):
        early.apply(reqs[0])
    assert early.bank == [] and live_hooks(tiny_random.model) == 0


def test_each_embedded_model_has_its_own_presets_and_trained_folder(tmp_path):
    """The second teaching model reads its own VEAD preset (the paper's placement: a chosen layer's
    output, the prompt state for the IM); a model without its own preset, or a checkpoint folder, gets
    the first model's; trained editors live in a folder per model; an explicit file wins."""
    from visedit.editing import load_preset, trained_dir
    from visedit.editing.base import PRESET_DIR, TRAINED_ROOT
    from visedit.editing.vead.editor import TRAINED_DIR

    first = load_preset("vead")
    assert load_preset("vead", model="visedit-tiny") == first == load_preset("vead", model=str(tmp_path))
    second = load_preset("vead", model="visedit-llava")
    assert second != first and second["layer"] is None and second["at"] == "output"
    assert second["im_reads"] == "prompt"
    assert VEADConfig.from_dict(second).layer is None  # checked like any preset
    assert load_preset("mend", model="visedit-llava") == load_preset("mend")  # no own preset: the default
    assert load_preset("ft_l", model="visedit-llava")["layer"] == 9 != load_preset("ft_l")["layer"]  # its own
    own = tmp_path / "mine.yaml"
    own.write_text("w_loc: 2.0\n")
    assert load_preset("vead", own, model="visedit-llava") == {"w_loc": 2.0}
    assert trained_dir("vead") == TRAINED_DIR == TRAINED_ROOT / "vead" == trained_dir("vead", "visedit-tiny")
    assert trained_dir("mend", "visedit-llava") == TRAINED_ROOT / "visedit-llava" / "mend"
    assert (PRESET_DIR / "visedit-llava" / "vead.yaml").exists()


def test_a_loaded_vead_takes_its_apply_settings_from_the_preset(tiny_random, records, editor, tmp_path):
    """memory and route say how edits are applied, not trained: a preset (or evaluate --set) turns the memory
    on for a trained VEAD, whose other settings stay the folder's own."""
    from visedit.editing import get_editor

    editor.save(tmp_path / "v")
    loaded = get_editor("vead", tiny_random, weights=str(tmp_path / "v"), memory=True, route="gate")
    assert loaded.config.memory and loaded.config.route == "gate" and loaded.layer == editor.layer
    assert dataclasses.replace(loaded.config, memory=False, route="nearest") == editor.config
    reqs = [EditRequest.from_record(r) for r in records[1:3]]
    for req in reqs:
        loaded.apply(req)
    assert len(loaded.bank) == 2  # both edits held
    loaded.restore()
    plain = get_editor("vead", tiny_random, weights=str(tmp_path / "v"))
    assert not plain.config.memory


def test_in_image_locality_term_is_the_kl_on_the_edit_image_asked_about_another_creature(tiny_random,
                                                                                        tmp_path):
    """``w_iloc``: each cached record gets a fifth row, the edit image asked about another of its creatures;
    its visual tokens are the edit row's (the image comes before any question), its pre-edit log-probs are
    the frozen model's (oracle: a plain pass), and its loss is the KL (pre ‖ post) the editor's own edited
    pass gives; it is 0 for an untrained VEAD. A record without the probe is refused in one line."""
    recs = load_world_split("train", DatasetSpec(seed=0, n_entities=6, edits_per_pair=1, image_size=48,
                                                 edition=2), root=tmp_path)
    rec = recs[0]
    config = VEADConfig(layer=1, w_iloc=2.0, w_im=0.0)
    cache = vead_train.Cache(tiny_random, 1, config)
    cached = cache.record(rec)
    probe = (rec.image, rec.extra["i_loc_q"], rec.extra["i_loc_a"])
    assert cached.states.shape[0] == 5
    start, stop = cached.span
    assert torch.equal(cached.states[4, start:stop], cached.states[0, start:stop])
    x = tiny_random.inputs([probe])
    pre = tiny_random.logits(x)[0, torch.tensor(x.target_positions[0]) - 1].float().log_softmax(-1)
    assert torch.allclose(cached.iloc_logprobs, pre, atol=1e-5)
    torch.manual_seed(0)
    ed = VEADEditor(tiny_random, config)
    _, parts = vead_train.step_loss(ed.adapter, cache, [cached], config, np.random.default_rng(0))
    assert parts["iloc"] == pytest.approx(0.0, abs=1e-6)
    torch.nn.init.normal_(ed.adapter.w_end.weight, std=0.5)
    total, parts = vead_train.step_loss(ed.adapter, cache, [cached], config, np.random.default_rng(0))
    with ed.edit(EditRequest.from_record(rec)), torch.no_grad():
        post = tiny_random.logits(x)[0, torch.tensor(x.target_positions[0]) - 1].float().log_softmax(-1)
    own = float((pre.exp() * (pre - post)).sum(-1).mean())
    assert own > 1e-3 and parts["iloc"] == pytest.approx(own, rel=1e-3)
    assert float(total.detach()) == pytest.approx(parts["rel"] + parts["gen"] + parts["loc"] + 2.0 * parts["iloc"],
                                                  rel=1e-5)
    # with a hard negative after it (a sixth row) the in-image term is the same
    hard = dataclasses.replace(config, hard_loc=2)
    hard_cache = vead_train.Cache(tiny_random, 1, hard)
    other = hard_cache.record(next(r for r in recs if r.extra["entity"] != rec.extra["entity"]))
    own_row = hard_cache.record(rec)
    _, with_neg = vead_train.step_loss(ed.adapter, hard_cache, [own_row], hard, np.random.default_rng(0),
                                       pool=[own_row, other])
    assert with_neg["iloc"] == pytest.approx(parts["iloc"], rel=1e-4) and with_neg["loc"] != parts["loc"]
    with pytest.raises(ValueError, match=r"w_iloc > 0 needs records with an in-image locality probe"):
        cache.record(load_world_split("train", SPEC, root=tmp_path / "first")[0])
    with pytest.raises(ValueError, match="w_iloc must be a number >= 0"):
        VEADConfig(w_iloc=-1)


def test_im_layer_reads_the_edit_prompts_state_at_a_later_layer_in_both_paths(tiny_random, records):
    """``im_layer``: the IM's key is the edit sample's last-prompt state at that layer's output with VEAD off
    (oracle: a plain traced pass), in the editor and in the cached training path, which then agree on the
    loss; a layer VEAD's rewrite does not reach is refused in one line."""
    last = tiny_random.n_layers - 1
    torch.manual_seed(0)
    ed = VEADEditor(tiny_random, VEADConfig(layer=0, im_layer=-1, w_im=0.0))
    torch.nn.init.normal_(ed.adapter.w_end.weight, std=0.5)
    req = EditRequest.from_record(records[1])
    x = tiny_random.inputs([(req.image, req.prompt, req.target)])
    site = f"llm.layers.{last}"
    oracle = tiny_random.run(x, trace=[site]).outputs[site][0, x.last_prompt[0]].float()
    at_le = tiny_random.run(x, trace=["llm.layers.0"]).outputs["llm.layers.0"][0, x.last_prompt[0]].float()
    assert not torch.allclose(oracle, at_le, atol=1e-3)
    with ed.edit(req), torch.no_grad():
        assert torch.allclose(ed.memory.prompt_state[0], oracle, atol=1e-4)
        own = float(target_loss(tiny_random, x))
        late_gate = ed.last_gate_logits.clone()
    cache = vead_train.Cache(tiny_random, 0, ed.config)
    cached = cache.record(records[1])
    assert torch.allclose(cached.im_key, oracle, atol=1e-4)
    _, parts = vead_train.step_loss(ed.adapter, cache, [cached], ed.config, np.random.default_rng(0))
    assert parts["rel"] == pytest.approx(own, rel=1e-4)
    plain = VEADEditor(tiny_random, VEADConfig(layer=0, w_im=0.0), adapter=ed.adapter)
    with plain.edit(req), torch.no_grad():
        target_loss(tiny_random, x)
        assert (plain.last_gate_logits - late_gate).abs().max() > 1e-2  # the key is not l_e's
    with pytest.raises(ValueError, match=r"im_layer 0 must be a layer after VEAD's \(1…"):
        VEADEditor(tiny_random, VEADConfig(layer=0, im_layer=0))
    with pytest.raises(ValueError, match="im_layer must be a layer index"):
        VEADConfig(im_layer="last")


@pytest.mark.parametrize("option, size", [("slots", 4), ("token_mlp", 32)])
def test_per_token_rewrites_give_each_token_its_own_direction_and_round_trip(tiny_random, records, tmp_path,
                                                                             option, size):
    """``slots`` and ``token_mlp``: with a one-token answer as the memory, the paper's cross-attention adds
    one direction to every visual token (the change divided by the gate has rank 1); with K slots, or an MLP
    of each token and what it read, each token gets its own change (rank > 1). The editor and the cached
    training path agree on the loss, and a saved VEAD loads with its sizes and edits identically."""
    req = next(EditRequest.from_record(r) for r in records if len(tiny_random.encode_target(r.alt)) == 1)
    x = tiny_random.inputs([(req.image, req.prompt)])
    ranks = {}
    for value in (0, size):
        torch.manual_seed(0)
        config = VEADConfig(layer=1, memory_reads="answer", w_im=0.0, **{option: value})
        ed = VEADEditor(tiny_random, config)
        torch.nn.init.normal_(ed.adapter.w_end.weight, std=0.5)
        with ed.edit(req), torch.no_grad():
            tiny_random.logits(x)
            V, new = ed.last_visual
            gate = torch.sigmoid(ed.last_gate_logits)
            change = ((new - V.float()) / gate[..., None])[0]
            edited = tiny_random.logits(x)
            own = float(target_loss(tiny_random, tiny_random.inputs([(req.image, req.prompt, req.target)])))
        sv = torch.linalg.svdvals(change)
        ranks[value] = int((sv > 1e-4 * sv[0]).sum())
        cache = vead_train.Cache(tiny_random, 1, config)
        rec = next(r for r in records if r.alt == req.target and r.src == req.prompt and r.image == req.image)
        _, parts = vead_train.step_loss(ed.adapter, cache, [cache.record(rec)], config, np.random.default_rng(0))
        assert parts["rel"] == pytest.approx(own, rel=1e-4)
    assert ranks[0] == 1 and ranks[size] > 1
    assert ed.adapter.sizes[option] == size
    ed.save(tmp_path / option)
    loaded = VEADEditor.load(tiny_random, tmp_path / option)
    assert getattr(loaded.config, option) == size and loaded.adapter.sizes == ed.adapter.sizes
    for name, tensor in ed.adapter.state_dict().items():
        assert torch.equal(loaded.adapter.state_dict()[name], tensor), name
    with loaded.edit(req), torch.no_grad():
        assert torch.equal(tiny_random.logits(x), edited)
    assert option not in VEADEditor(tiny_random, VEADConfig(layer=1)).adapter.sizes  # old cards unchanged
    with pytest.raises(ValueError, match=f"{option} must be an int >= 0"):
        VEADConfig(**{option: -2})


def test_im_up_influence_opens_the_gate_where_the_influence_is_above_the_mean(tiny_random, records):
    """``im_up: influence`` replaces L_up's "open everywhere" by a binary cross-entropy towards 1 on tokens
    whose influence target is above the mean and 0 elsewhere (oracle: the terms recomputed from the gate
    logits by hand, every visual token sampled); L_a and L_down are unchanged."""
    torch.manual_seed(0)
    base = VEADConfig(layer=1, w_rel=0.0, w_gen=0.0, w_loc=0.0, w_im=1.0, sampled_tokens=10_000, noise_copies=1)
    ed = VEADEditor(tiny_random, base)
    for prm in ed.adapter.influence_mapper().parameters():
        torch.nn.init.normal_(prm, std=0.3)
    cache = vead_train.Cache(tiny_random, 1, base)
    cached = cache.record(records[2])
    start, stop = cached.span
    n = stop - start
    keys = cached.keys(base)
    with torch.no_grad():
        s = ed.adapter.gate_logits(cached.states[:, start:stop], keys.expand(4, *keys.shape[1:]))
    above = (cached.im_target * n > 1).float()
    assert 0 < above.sum() < above.numel()
    up_all = torch.stack([-F.logsigmoid(s[j]).mean() for j in range(3)]).mean()
    up_infl = torch.stack([F.binary_cross_entropy_with_logits(s[j], above[j]) for j in range(3)]).mean()
    parts = {}
    for mode in ("all", "influence"):
        config = dataclasses.replace(base, im_up=mode)
        _, parts[mode] = vead_train.step_loss(ed.adapter, cache, [cached], config, np.random.default_rng(0))
    assert parts["influence"]["im"] - parts["all"]["im"] == pytest.approx(float(up_infl - up_all), abs=1e-5)
    with pytest.raises(ValueError, match="im_up must be 'all' or 'influence'"):
        VEADConfig(im_up="some")


def test_prompt_route_scopes_one_edit_to_prompts_near_its_own(tiny_random, records, editor):
    """route: prompt keys each edit by its last prompt token's VEAD-off state at route_layer (oracle: a
    plain traced pass); with route_min a *single* held edit is applied only where the input's prompt key
    reaches it — an input below is bit for bit the unedited model's — while the edit's own prompt
    (cosine 1) is edited; with several held edits each input takes the one nearest by that cosine."""
    last = tiny_random.n_layers - 1
    site = f"llm.layers.{last}"
    req = EditRequest.from_record(records[1])
    scoped = VEADEditor(tiny_random, VEADConfig(layer=1, route="prompt", route_layer=last, route_min=0.999),
                        adapter=editor.adapter)
    own = tiny_random.inputs([(req.image, req.prompt, req.target)])
    other = tiny_random.inputs([(records[1].image, records[3].src, records[3].alt)])
    before_own, before_other = tiny_random.logits(own), tiny_random.logits(other)
    with torch.no_grad():
        run = tiny_random.run(own, trace=[site])
    with scoped.edit(req):
        assert torch.allclose(scoped.memory.prompt_key[0], run.outputs[site][0, own.last_prompt[0]].float(), atol=1e-5)
        edited_own = tiny_random.logits(own)
        assert scoped.last_route.tolist() == [0]
        assert torch.equal(tiny_random.logits(other), before_other)  # another question: left alone
        assert scoped.last_route.tolist() == [-1]
    assert not torch.allclose(edited_own, before_own)
    # several held edits: argmax of the cosine between prompt keys (oracle from traced passes)
    held = _with_memory(editor, route="prompt", route_layer=last)
    reqs = [EditRequest.from_record(r) for r in records[1:4]]
    held.apply_batch(reqs)
    probes = [(records[2].image, records[2].src, records[2].alt),
              (records[3].image, records[3].rephrase, records[3].alt),
              (records[1].image_rephrase, records[1].src, records[1].alt)]
    x = tiny_random.inputs(probes)
    with held._off(), torch.no_grad():
        states = tiny_random.run(x, trace=[site]).outputs[site]
    keys = torch.stack([m.prompt_key[0] for m in held.bank])
    want = [int(F.cosine_similarity(states[b, x.last_prompt[b]].float()[None], keys.float()).argmax())
            for b in range(3)]
    tiny_random.score_batch(probes)
    assert held.last_route.tolist() == want
    held.restore()
    with pytest.raises(ValueError, match="route_min is a setting of the joint and prompt routes"):
        VEADConfig(route="gate", route_min=0.5)


def test_refine_fits_the_memory_to_the_edit_sample_and_restores_exactly(tiny_random, records, editor):
    """refine_steps: the edit's memory rows are fitted by Adam to the edit sample's new-answer loss (oracle:
    the teacher-forced loss of the edited model, lower than the unrefined edit's), VEAD's and the model's
    weights untouched and without gradients left on them; the loss threshold stops it early; restore is
    bit for bit; bad settings are refused in one line."""
    from visedit.editing.base import target_loss

    req = EditRequest.from_record(records[1])
    x = tiny_random.inputs([(req.image, req.prompt, req.target)])
    before = tiny_random.logits(x)
    weights = {k: v.clone() for k, v in editor.adapter.state_dict().items()}
    with torch.no_grad(), editor.edit(req):
        plain = float(target_loss(tiny_random, x))
    refined = VEADEditor(tiny_random, dataclasses.replace(editor.config, refine_steps=20, refine_lr=0.1,
                                                          refine_loss=1e-6), adapter=editor.adapter)
    with torch.no_grad(), refined.edit(req):
        fitted = float(target_loss(tiny_random, x))
        rows = refined.memory.states.clone()
    assert fitted < plain - 0.1
    assert not torch.equal(rows, answer_or_states(editor, req))
    assert all(torch.equal(weights[k], v) for k, v in editor.adapter.state_dict().items())
    assert all(p.grad is None for p in list(editor.adapter.parameters()) + list(tiny_random.model.parameters()))
    assert torch.equal(tiny_random.logits(x), before)
    memory = editor.remember(req)
    loose = VEADEditor(tiny_random, dataclasses.replace(editor.config, refine_steps=20, refine_loss=1e6),
                       adapter=editor.adapter)
    assert loose.refine(memory, req) == 0 and torch.equal(memory.states, answer_or_states(editor, req))
    with pytest.raises(ValueError, match="edit_each applies unrefined edits; with refine_steps apply edits one"):
        with loose.edit_each([req]):
            pass
    assert live_hooks(tiny_random.model) == 0
    for bad, msg in (({"refine_steps": -1}, "refine_steps must be an int >= 0"),
                     ({"refine_lr": 0}, "refine_lr must be a number > 0"),
                     ({"refine_loss": "a"}, "refine_loss must be a number > 0")):
        with pytest.raises(ValueError, match=msg):
            VEADConfig(**bad)


def answer_or_states(editor, req):
    """The unrefined memory rows of ``req`` (what the editor's cross-attention reads)."""
    return editor.remember(req).states


def test_route_cosines_are_the_prompt_keys_cosines_with_the_edits(tiny_random, records, editor, tmp_path):
    """route_cosines: per record and probe, cos(prompt key of the probe, prompt key of the edit input), the
    keys being last-prompt-token states at route_layer (oracle: traced passes); the table's edited share
    counts the cosines at or above route_min; records without the second edition's probes and a VEAD
    without the prompt route are refused in one line."""
    from visedit.editing.vead.analysis import route_cosines

    recs = load_world_split("train", DatasetSpec(seed=0, n_entities=6, edits_per_pair=1, image_size=48,
                                                 edition=2), root=tmp_path)[:3]
    last = tiny_random.n_layers - 1
    scoped = VEADEditor(tiny_random, VEADConfig(layer=1, route="prompt", route_layer=last, route_min=0.5),
                        adapter=editor.adapter)
    got = route_cosines(scoped, recs)
    site = f"llm.layers.{last}"

    def key(image, question):
        x = tiny_random.inputs([(image, question)])
        with torch.no_grad():
            return tiny_random.run(x, trace=[site]).outputs[site][0, x.last_prompt[0]].float()

    for row, r in zip(got.rows, recs):
        own = key(r.image, r.src)
        for probe, (image, q) in {"t_generality": (r.image, r.rephrase), "i_locality": (r.image, r.extra["i_loc_q"]),
                                  "m_locality": (r.m_loc, r.m_loc_q)}.items():
            assert row[probe] == pytest.approx(float(F.cosine_similarity(own, key(image, q), dim=0)), abs=2e-4)
    table = got.table()
    share = np.mean([row["m_locality"] >= 0.5 for row in got.rows])
    assert table.loc["m_locality", "edited share"] == pytest.approx(share)
    with pytest.raises(ValueError, match="have no in-image or look-alike probe"):
        route_cosines(scoped, records[:2])
    with pytest.raises(ValueError, match="reads the prompt route's keys; this VEAD has route: 'nearest'"):
        route_cosines(editor, recs)


def test_a_fitted_scope_maps_the_prompt_keys_the_route_compares(tiny_random, editor, tmp_path):
    """fit_scope: the keys it fits on are the traced last-prompt-token states at its layer (oracle), the
    hinge loss falls, the same seed gives the same scope bit for bit, and it is written atomically; with
    route_scope the route compares P (k − c) (oracle: the saved centre and map) — route_cosines and the
    held keys alike; a missing scope, one fitted at another layer and a scope without the prompt route
    are refused in one line."""
    from visedit.editing.vead.analysis import route_cosines
    from visedit.editing.vead.scope import ScopeConfig, fit_scope, probe_keys

    recs = load_world_split("train", DatasetSpec(seed=0, n_entities=6, edits_per_pair=1, image_size=48,
                                                 edition=2), root=tmp_path / "data")[:6]
    last = tiny_random.n_layers - 1
    site = f"llm.layers.{last}"

    def key(image, question):
        x = tiny_random.inputs([(image, question)])
        with torch.no_grad():
            return tiny_random.run(x, trace=[site]).outputs[site][0, x.last_prompt[0]].float()

    keys = probe_keys(tiny_random, recs[:2], layer=last, batch=4, progress=False)
    assert torch.allclose(keys["i_locality"][1], key(recs[1].image, recs[1].extra["i_loc_q"]), atol=1e-5)
    assert torch.allclose(keys["m_generality"][0], key(recs[0].image_rephrase, recs[0].src), atol=1e-5)
    config = ScopeConfig(layer=last, dim=8, steps=40, lr=1e-2, batch=4, skip=1)
    scope, info = fit_scope(tiny_random, recs, config, out=tmp_path / "scope", progress=False)
    assert info["records"] == 5 and info["loss"] < info["first_loss"]
    again, _ = fit_scope(tiny_random, recs, config, progress=False)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in scope.state_dict().items())
    assert sorted(p.name for p in (tmp_path / "scope").iterdir()) == ["scope.json", "scope.safetensors"]
    scoped = VEADEditor(tiny_random, VEADConfig(layer=1, route="prompt", route_layer=last, route_min=0.5,
                                                route_scope=str(tmp_path / "scope")), adapter=editor.adapter)
    k = key(recs[2].image, recs[2].src)
    w, c = scope.proj.weight.detach(), scope.centre
    want = (k - c) @ w.T
    assert torch.allclose(scoped.prompt_key(recs[2].image, recs[2].src), want, atol=1e-4)
    row = route_cosines(scoped, recs[2:3]).rows[0]
    other = (key(recs[2].image, recs[2].extra["i_loc_q"]) - c) @ w.T
    assert row["i_locality"] == pytest.approx(float(F.cosine_similarity(want, other, dim=0)), abs=2e-4)
    with scoped.edit(EditRequest.from_record(recs[2])):
        assert torch.allclose(scoped.held_keys("prompt")[0], F.normalize(want, dim=0), atol=1e-4)
    assert live_hooks(tiny_random.model) == 0
    for cfg, err, msg in (
            (dict(route_scope=str(tmp_path / "none")), FileNotFoundError, "is neither a folder with scope.safetensors"),
            (dict(route_scope=str(tmp_path / "scope"), route_layer=last - 1), ValueError,
             f"was fitted on keys at layer {last}, but the route reads layer {last - 1}: set route_layer={last}")):
        bad = VEADEditor(tiny_random, VEADConfig(layer=0, route="prompt", **{"route_layer": last, **cfg}),
                         adapter=editor.adapter)
        with pytest.raises(err, match=msg):
            bad.scope()
    with pytest.raises(ValueError, match="route_scope is a setting of the prompt route at a later layer"):
        VEADConfig(route="joint", route_layer=last, route_scope="x")
    for bad, msg in (({"dim": 0}, "dim must be a positive int"), ({"neg_margin": 0.9}, "margins must satisfy"),
                     ({"skip": -1}, "skip must be an int >= 0")):
        with pytest.raises(ValueError, match=msg):
            ScopeConfig(layer=1, **bad)
    with pytest.raises(ValueError, match="needs at least 2 train records after the first 5"):
        fit_scope(tiny_random, recs, dataclasses.replace(config, skip=5), progress=False)
