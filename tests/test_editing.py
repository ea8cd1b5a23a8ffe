"""The editor protocol on a tiny random LLaVA: bit-identical restore for every editor (also after
exceptions and after 50 stacked edits), no hooks left behind, config errors, MEND training/save/load
determinism."""

from __future__ import annotations

import pytest
import torch

from visedit.editing import (EditRequest, FTLConfig, IKEConfig, InContextEditor, MENDConfig, MENDEditor,
                             VEADConfig, VEADEditor, editor_names, get_editor, train_mend)
from visedit.editing.base import Editor
from visedit.hooks import hook_count
from visedit.world import DatasetSpec, load_world_split

# seed 0: entity names come from the same world as the tiny model's vocabulary
SPEC = DatasetSpec(seed=0, n_entities=10, edits_per_pair=1, image_size=32)


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    root = tmp_path_factory.mktemp("edit_data")
    return load_world_split("train", SPEC, root=root)


def _build(name: str, vllm, records) -> Editor:
    if name == "mend":
        torch.manual_seed(0)
        editor = MENDEditor(vllm, MENDConfig(layers=(-1,), rank=8, edit_lr=1e-2))
        for net in editor.networks.nets.values():  # make the editor move weights visibly
            torch.nn.init.normal_(net.up.weight, std=0.1)
        return editor
    if name == "ike":
        return InContextEditor(vllm, IKEConfig(n_demos=2), demos=records)
    if name == "vead":
        torch.manual_seed(0)
        editor = VEADEditor(vllm, VEADConfig(layer=1))
        torch.nn.init.normal_(editor.adapter.w_end.weight, std=0.5)  # an untrained VEAD is the identity
        return editor
    return get_editor(name, vllm, **({"layer": -1} if name == "ft_l" else {}))


def _probe_logits(vllm, records):
    r = records[0]
    items = [(r.image, r.src, r.alt), (None, r.loc, r.loc_ans), (r.m_loc, r.m_loc_q, r.m_loc_a)]
    return vllm.logits(vllm.inputs(items))


def test_every_editor_is_covered():
    assert editor_names() == ["ft_l", "ft_v", "ike", "mend", "none", "vead"]


@pytest.mark.parametrize("name", ["none", "ft_l", "ft_v", "ike", "mend", "vead"])
def test_restore_is_bit_identical(tiny_random, records, name):
    editor = _build(name, tiny_random, records)
    before = _probe_logits(tiny_random, records)
    hooks = hook_count(tiny_random.model)
    request = EditRequest.from_record(records[1])
    item = [(records[1].image, records[1].src, records[1].alt)]
    clean_score = tiny_random.score_batch(item)[0].logprob
    with editor.edit(request):
        edited_score = editor.score_batch(item)[0].logprob
        assert editor.applied
    if name != "none":
        assert edited_score != clean_score, f"{name} did not change anything"
    assert not editor.applied
    assert torch.equal(_probe_logits(tiny_random, records), before)
    assert hook_count(tiny_random.model) == hooks
    assert not any(p.requires_grad for p in tiny_random.model.parameters())


@pytest.mark.parametrize("name", ["ft_l", "ft_v", "ike", "mend", "none", "vead"])
def test_restore_after_exception_inside_block(tiny_random, records, name):
    editor = _build(name, tiny_random, records)
    before = _probe_logits(tiny_random, records)
    with pytest.raises(KeyError):
        with editor.edit(EditRequest.from_record(records[2])):
            raise KeyError("boom")
    assert torch.equal(_probe_logits(tiny_random, records), before)
    assert not editor.applied


@pytest.mark.parametrize("name", ["ft_l", "ft_v", "mend", "vead"])
def test_restore_after_exception_inside_apply(tiny_random, records, name, monkeypatch):
    editor = _build(name, tiny_random, records)
    before = _probe_logits(tiny_random, records)
    original = type(editor)._apply

    def failing(self, request):
        original(self, request)  # weights are changed by now …
        raise RuntimeError("injected failure")  # … and then the edit fails

    monkeypatch.setattr(type(editor), "_apply", failing)
    with pytest.raises(RuntimeError, match="injected"):
        editor.apply(EditRequest.from_record(records[3]))
    assert not editor.applied
    assert torch.equal(_probe_logits(tiny_random, records), before)


def test_protocol_misuse_is_reported(tiny_random, records):
    editor = get_editor("ft_l", tiny_random, layer=-1, max_steps=1)
    editor.apply(EditRequest.from_record(records[0]))
    editor.apply(EditRequest.from_record(records[1]))  # edits stack
    assert len(editor.requests) == 2 and editor.request == EditRequest.from_record(records[1])
    with pytest.raises(RuntimeError, match="already applied.*restore"):
        with editor.edit(EditRequest.from_record(records[2])):  # the block would restore both
            pass
    assert len(editor.requests) == 2
    editor.restore()
    editor.restore()  # idempotent
    with pytest.raises(ValueError, match="target is empty"):
        EditRequest(records[0].image, "what shape is this creature ?", " ")
    with pytest.raises(TypeError, match="EditRequest"):
        editor.apply(("image", "q", "a"))


def test_config_errors_name_the_problem(tiny_random):
    with pytest.raises(ValueError, match="unknown FTLConfig key.*'layr'.*valid keys"):
        FTLConfig.from_dict({"layr": 2})
    with pytest.raises(ValueError, match="unknown editor 'rome'; choose one of ft_l, ft_v, ike, mend, none, vead"):
        get_editor("rome", tiny_random)
    with pytest.raises(ValueError, match="out of range"):
        get_editor("ft_l", tiny_random, layer=17)
    with pytest.raises(ValueError, match="vision_layers=9"):
        get_editor("ft_v", tiny_random, vision_layers=9)
    with pytest.raises(ValueError, match="lr must be > 0"):
        get_editor("ft_v", tiny_random, lr=0)


def test_ft_l_changes_only_its_layer(tiny_random, records):
    editor = get_editor("ft_l", tiny_random, layer=1, max_steps=3, stop_loss=0.0)
    before = {n: p.clone() for n, p in tiny_random.model.named_parameters()}
    editor.apply(EditRequest.from_record(records[0]))
    changed = {n for n, p in tiny_random.model.named_parameters() if not torch.equal(p, before[n])}
    editor.restore()
    assert changed and all(".layers.1.mlp." in n for n in changed)
    assert editor.steps_taken == 3


def test_ike_puts_the_fact_in_context(tiny_random, records):
    editor = InContextEditor(tiny_random, IKEConfig(n_demos=3, seed=1), demos=records)
    request = EditRequest.from_record(records[0])
    with editor.edit(request):
        context = editor.context()
    assert context.endswith(f"USER: {request.prompt} ASSISTANT: {request.target}")
    assert context.count("USER:") == 2 * 3 + 1
    item = [(records[1].image, records[1].src, records[1].alt)]
    assert editor.score_batch(item) == tiny_random.score_batch(item)  # no context once restored
    with pytest.raises(ValueError, match="needs 50 demonstration records"):
        InContextEditor(tiny_random, IKEConfig(n_demos=50), demos=records)


def test_mend_training_is_seeded_and_round_trips(tiny_random, records, tmp_path):
    config = MENDConfig(layers=(-1,), rank=8, steps=4, val_every=2, val_edits=2, seed=3)
    a, info = train_mend(tiny_random, records[:6], config, out=tmp_path / "mend", progress=False)
    b, _ = train_mend(tiny_random, records[:6], config, progress=False)
    for (ka, va), (kb, vb) in zip(a.networks.state_dict().items(), b.networks.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka
    assert [h["step"] for h in info["history"]] == [2, 4]
    loaded = get_editor("mend", tiny_random, weights=str(tmp_path / "mend"))
    assert loaded.config == config
    for k, v in a.networks.state_dict().items():
        assert torch.equal(loaded.networks.state_dict()[k], v)
    request = EditRequest.from_record(records[7])
    with a.edit(request):
        la = _probe_logits(tiny_random, records)
    with loaded.edit(request):
        lb = _probe_logits(tiny_random, records)
    assert torch.equal(la, lb)


def test_mend_refuses_networks_of_another_model(tiny_random, tmp_path):
    with pytest.raises(ValueError, match="other layer shapes"):
        get_editor("mend", tiny_random)  # the shipped networks belong to the embedded model
    with pytest.raises(FileNotFoundError, match="train-mend"):
        get_editor("mend", tiny_random, weights=str(tmp_path / "nothing"))


def _edits(records, n):
    return [EditRequest.from_record(records[i % len(records)]) for i in range(n)]


@pytest.mark.parametrize("name", ["none", "ft_l", "ft_v", "ike", "mend", "vead", "vead_memory"])
def test_restore_is_bit_identical_after_50_stacked_edits(tiny_random, records, name):
    if name == "vead_memory":
        torch.manual_seed(0)
        editor = VEADEditor(tiny_random, VEADConfig(layer=1, memory=True))
        torch.nn.init.normal_(editor.adapter.w_end.weight, std=0.5)
    elif name in ("ft_l", "ft_v"):
        editor = get_editor(name, tiny_random, max_steps=2, **({"layer": -1} if name == "ft_l" else {}))
    else:
        editor = _build(name, tiny_random, records)
    before = _probe_logits(tiny_random, records)
    params_before = {n: p.detach().clone() for n, p in tiny_random.model.named_parameters()}
    hooks = hook_count(tiny_random.model)
    edits = _edits(records, 50)
    editor.apply(edits[0])
    after_one = _probe_logits(tiny_random, records) if name not in ("none", "ike") else None
    for request in edits[1:40]:
        editor.apply(request)
    editor.apply_batch(edits[40:])  # ten more at once
    assert len(editor.requests) == 50
    if after_one is not None and name != "vead":  # the paper's VEAD holds only the last edit
        assert not torch.equal(_probe_logits(tiny_random, records), after_one), f"{name}: the edits did not stack"
    if name == "vead_memory":
        assert len(editor.bank) == 50 and editor.held_bytes() > 0
    editor.restore()
    assert not editor.applied and editor.held_bytes() == 0
    assert torch.equal(_probe_logits(tiny_random, records), before)
    assert all(torch.equal(p, params_before[n]) for n, p in tiny_random.model.named_parameters())
    assert hook_count(tiny_random.model) == hooks
    assert not any(p.requires_grad for p in tiny_random.model.parameters())


@pytest.mark.parametrize("name", ["ft_l", "mend", "vead"])
def test_a_failed_stacked_edit_leaves_the_earlier_ones(tiny_random, records, name, monkeypatch):
    editor = _build(name, tiny_random, records) if name != "ft_l" else get_editor("ft_l", tiny_random, layer=-1,
                                                                                    max_steps=2)
    editor.apply(EditRequest.from_record(records[0]))
    one = _probe_logits(tiny_random, records)
    original = type(editor)._apply

    def failing(self, request):
        original(self, request)
        raise RuntimeError("injected failure")

    monkeypatch.setattr(type(editor), "_apply", failing)
    with pytest.raises(RuntimeError, match="injected"):
        editor.apply(EditRequest.from_record(records[3]))
    assert len(editor.requests) == 1
    assert torch.equal(_probe_logits(tiny_random, records), one)
    editor.restore()


def test_batch_edits_are_one_step(tiny_random, records):
    editor = get_editor("ft_l", tiny_random, layer=-1, max_steps=3, stop_loss=0.0)
    editor.apply_batch(_edits(records, 4))
    assert editor.steps_taken == 3 and len(editor.requests) == 4  # one tuning run for all four
    editor.restore()
    ike = InContextEditor(tiny_random, IKEConfig(n_demos=0), demos=records)
    ike.apply_batch(_edits(records, 2))
    assert records[0].alt in ike.context() and records[1].alt in ike.context()
    ike.restore()
    with pytest.raises(ValueError, match="at least one"):
        editor.apply_batch([])
