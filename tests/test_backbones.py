"""Every supported architecture, proven on a tiny random checkpoint built from a config and saved to a
temporary folder (``visedit.models.zoo``): answers, module contributions (DLA sums to the logit), the
per-token allocation oracle, batched noise perturbation against the reference loop, restoration tracing,
integrated gradients, every editor's bit-identical restore, and a 3-edit evaluation. What an
architecture cannot do is refused in one line that names the feature and the backbone."""

from __future__ import annotations

import dataclasses

from pathlib import Path

import numpy as np
import pytest
import torch

from visedit.attribution import (attention_map, attention_sources, integrated_gradients, module_contributions,
                                 noise_perturbation, pixel_ig_refusal, region_scores, restoration_tracing,
                                 sanity_checks, token_allocation)
from visedit.editing import (EditRequest, IKEConfig, InContextEditor, MENDConfig, MENDEditor, VEADConfig,
                             VEADEditor, get_editor)
from visedit.evaluation import evaluate
from visedit.hooks import hook_count
from visedit.models import load_vllm
from visedit.models.zoo import KINDS, NUM_QUERY_TOKENS, SUPPORT, build_checkpoint, support_markdown
from visedit.world import DatasetSpec, image_question, load_world_split, render

SPEC = DatasetSpec(seed=0, n_entities=10, edits_per_pair=1, image_size=32)
#: The grid that maps are drawn on (LLaVA-NeXT: its base image's, ahead of the tiles' 4×4 grid).
GRID = {"llava": (4, 4), "llava-mistral": (4, 4), "llava-qwen2": (4, 4), "blip2-opt": None, "blip2-llama": None,
        "instructblip": None, "qwen2-vl": (2, 2), "qwen2.5-vl": (2, 2), "llava-next": (2, 2),
        "llava-onevision": (2, 2)}
#: Where the visual tokens lie on several grids, so no single grid holds them all.
SEVERAL_GRIDS = {"llava-next", "llava-onevision"}
#: Where integrated gradients on pixels are refused (no grid, or pixel values that are not one image).
NO_PIXEL_IG = {"blip2-opt", "blip2-llama", "instructblip", "qwen2-vl", "qwen2.5-vl", "llava-next", "llava-onevision"}


def refused(vllm, feature: str, call) -> None:
    """``call()`` raises one line naming ``feature`` and the backbone."""
    with pytest.raises(ValueError) as err:
        call()
    message = str(err.value)
    assert feature in message and vllm.backbone in message and "\n" not in message, message


@pytest.fixture(scope="module", params=list(KINDS))
def vllm(request, tmp_path_factory, world):
    folder = build_checkpoint(request.param, tmp_path_factory.mktemp(request.param), world=world)
    v = load_vllm(folder)
    v.kind = request.param
    return v


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    return load_world_split("train", SPEC, root=tmp_path_factory.mktemp("backbone_data"))


@pytest.fixture(scope="module")
def shot(world):
    return render(world.entities[5], seed=3, size=32).image


def test_answers_and_visual_layout(vllm, shot):
    assert isinstance(vllm.answer(shot, image_question("colour"), max_new_tokens=3), str)
    assert isinstance(vllm.answer(None, "what colour is a lomi ?", max_new_tokens=2), str)
    inputs = vllm.inputs([(shot, image_question("colour")), (None, "what is a lomi ?")])
    start, stop = inputs.visual_spans[0]
    layout = inputs.layout(0)
    assert inputs.layout(1) is None and layout.n_tokens == stop - start
    assert layout.grid == (None if vllm.kind in SEVERAL_GRIDS else GRID[vllm.kind])
    assert layout.map_grid == GRID[vllm.kind]
    if layout.map_grid is None:
        assert stop - start == NUM_QUERY_TOKENS
    assert vllm.d_model == 48


#: Where score_batch(share_prefix=True) runs each image's head once (the rest run the plain pass).
PREFIX_CACHE = {"llava", "llava-mistral", "llava-qwen2", "llava-next", "llava-onevision"}


def test_shared_prefix_scores_are_the_plain_scores(vllm, world, shot, monkeypatch):
    from visedit.hooks import edit_output
    from visedit.models.vllm import VLLM

    other = render(world.entities[6], seed=4, size=32).image
    items = [(img, image_question(f), world.entities[k].fact(f)) for img, k in ((shot, 5), (other, 6))
             for f in ("colour", "habitat", "diet")] + [(shot, "what colour is this ?", world.entities[5].colour)]
    plain = vllm.score_batch(items, add_eos=True)
    taken = []
    real = VLLM._shared_prefix
    monkeypatch.setattr(VLLM, "_shared_prefix", lambda self, inputs: taken.append(real(self, inputs)) or taken[-1])
    shared = vllm.score_batch(items, add_eos=True, share_prefix=True)
    assert vllm.adapter.prefix_cache == (vllm.kind in PREFIX_CACHE)
    assert (taken[-1] is not None) == (vllm.kind in PREFIX_CACHE)
    for a, b in zip(plain, shared):
        assert a.argmax_ids == b.argmax_ids and a.target_ids == b.target_ids
        assert np.allclose(a.logprobs, b.logprobs, atol=1e-5), (a, b)
    # a live hook that edits the visual tokens sees the whole prompt: the plain pass runs under it
    with edit_output(vllm.adapter.layers()[0], lambda h: h * 1.5):
        edited = vllm.score_batch(items, add_eos=True, share_prefix=True)
        assert taken[-1] is None
        assert [s.logprobs for s in edited] == [s.logprobs for s in vllm.score_batch(items, add_eos=True)]
    assert [s.logprobs for s in edited] != [s.logprobs for s in plain]
    # text-only items have no image to share: the plain pass
    text = [(None, "what is a lomi ?", world.entities[0].habitat)] * 2
    assert [s.logprobs for s in vllm.score_batch(text, share_prefix=True)] == [
        s.logprobs for s in vllm.score_batch(text)] and taken[-1] is None


def test_dla_sums_to_the_logit(vllm, shot):
    mc = module_contributions(vllm, shot, image_question("colour"))
    assert len(mc.attn) == len(mc.dla_mlp) == vllm.n_layers
    assert mc.dla_total == pytest.approx(mc.logit, abs=1e-4)
    assert max(abs(c) for c in mc.attn + mc.mlp) <= 1.0 + 1e-6


def test_attention_sources_split_every_layer_exactly(vllm, shot):
    """One pass splits each layer's attention output into visual and text sources; their sum plus the
    bias is the module's direct logit attribution, for every layer (the oracle), on every backbone."""
    src = attention_sources(vllm, shot, image_question("habitat"))
    mc = module_contributions(vllm, shot, image_question("habitat"))
    total = np.add(np.add(src["visual"], src["text"]), src["bias"])
    np.testing.assert_allclose(total, src["module"], atol=1e-4)
    np.testing.assert_allclose(src["module"], mc.dla_attn, atol=1e-4)
    al = token_allocation(vllm, shot, image_question("habitat"), layer=1)
    assert src["visual"][1] == pytest.approx(sum(al.visual), abs=1e-4)


@pytest.mark.parametrize("layer", [0, -1])
def test_allocation_oracle(vllm, shot, layer):
    al = token_allocation(vllm, shot, image_question("habitat"), layer=layer)
    assert al.max_error <= 1e-4
    assert sum(al.visual) + al.text + al.bias == pytest.approx(al.module_projection, abs=1e-4)
    if GRID[vllm.kind] is None:
        with pytest.raises(ValueError, match="patch grid"):
            al.heatmap()
        refused(vllm, "attention_map", lambda: attention_map(vllm, shot, image_question("habitat"), layer=layer))
    else:
        assert al.heatmap().shape == GRID[vllm.kind]
        assert attention_map(vllm, shot, image_question("habitat"), layer=layer).shape == GRID[vllm.kind]


def test_noise_perturbation_batched_equals_the_loop(vllm, shot):
    q = image_question("habitat")
    grids = vllm.inputs([(shot, q)]).layout(0).grids or ((1, NUM_QUERY_TOKENS),)
    radius = 1 if max(max(g) for g in grids) >= 3 else 0  # a 3×3 window needs a grid at least 3 wide
    loop = noise_perturbation(vllm, shot, q, radius=radius, n=3, seed=3, engine="loop")
    fast = noise_perturbation(vllm, shot, q, radius=radius, n=3, seed=3, chunk_size=5)
    assert np.abs(loop.array() - fast.array()).max() <= 1e-5 and fast.array().max() > 0


def test_restoration_of_everything_at_layer_0_recovers_the_clean_run(vllm, shot):
    n_vis = vllm.inputs([(shot, "x")]).layout(0).n_tokens
    r = restoration_tracing(vllm, shot, image_question("name"), layers=[0, 1], n=2,
                            regions=torch.ones(1, n_vis, dtype=torch.bool))
    assert r.values[0][0] == pytest.approx(r.clean, abs=1e-6)


def test_region_scores_need_one_grid_for_every_token(vllm, records):
    if vllm.inputs([(records[0].image, records[0].src)]).layout(0).grid is not None:
        pytest.skip("one grid holds every visual token: region scores run (chapter 4 scores them)")
    refused(vllm, "region scores", lambda: region_scores(vllm, records[:1], progress=False))


def test_integrated_gradients(vllm, shot):
    res = integrated_gradients(vllm, shot, image_question("name"), layer=1, n_steps=32)
    assert res.relative_delta <= 0.05
    reason = pixel_ig_refusal(vllm, shot, image_question("name"))
    if vllm.kind in NO_PIXEL_IG:
        refused(vllm, "pixels", lambda: integrated_gradients(vllm, shot, image_question("name"), n_steps=4))
        with pytest.raises(ValueError) as err:
            integrated_gradients(vllm, shot, image_question("name"), n_steps=4)
        assert reason == str(err.value), "the refusal the contributions command records is the one IG raises"
    else:
        assert reason is None
        assert integrated_gradients(vllm, shot, image_question("name"), n_steps=32).relative_delta <= 0.05


def _editor(name, vllm, records):
    torch.manual_seed(0)
    if name == "mend":
        editor = MENDEditor(vllm, MENDConfig(layers=(-1,), rank=8, edit_lr=1e-2))
        for net in editor.networks.nets.values():
            torch.nn.init.normal_(net.up.weight, std=0.1)
        return editor
    if name == "ike":
        return InContextEditor(vllm, IKEConfig(n_demos=2), demos=records)
    if name == "vead":
        editor = VEADEditor(vllm, VEADConfig(layer=1))
        torch.nn.init.normal_(editor.adapter.w_end.weight, std=0.5)
        return editor
    return get_editor(name, vllm, **({"layer": -1, "max_steps": 3} if name == "ft_l" else {"max_steps": 3}))


def test_cascade_goes_top_down_and_randomises_a_copy(vllm, records):
    names = [name for name, _, _ in vllm.adapter.cascade()]
    L = vllm.n_layers
    assert names[:L] == [f"llm.layers.{l}" for l in reversed(range(L))]
    assert "projector" in names and any(n.startswith("vision.layers.") for n in names)
    state = {k: v.clone() for k, v in vllm.model.state_dict().items()}
    res = sanity_checks(vllm, records[:1], methods=["allocation", "ig_layer"], layer=1, progress=False)
    assert all(torch.equal(state[k], t) for k, t in vllm.model.state_dict().items())
    assert list(res.steps) == names and res.completeness["allocation"] <= 1e-4


@pytest.mark.parametrize("name", ["ft_l", "ft_v", "ike", "mend", "vead"])
def test_every_editor_restores_bit_identically(vllm, records, name):
    editor = _editor(name, vllm, records)
    r = records[0]
    probe = vllm.inputs([(r.image, r.src, r.alt), (None, r.loc, r.loc_ans), (r.m_loc, r.m_loc_q, r.m_loc_a)])
    before, hooks = vllm.logits(probe), hook_count(vllm.model)
    item = [(records[1].image, records[1].src, records[1].alt)]
    clean = vllm.score_batch(item)[0].logprob
    with editor.edit(EditRequest.from_record(records[1])):
        assert editor.score_batch(item)[0].logprob != clean, f"{name} did not change anything"
    assert torch.equal(vllm.logits(probe), before)
    assert hook_count(vllm.model) == hooks
    assert not any(p.requires_grad for p in vllm.model.parameters())


def test_the_prompt_ends_where_the_frame_says_and_the_joint_route_reads_it(vllm, records):
    """Each backbone's frame and tokenizer: question_end finds the prompt's end in rows that go on with an
    answer (oracle: Inputs.last_prompt), and VEAD's memory routed by image and question edits and restores."""
    items = [(r.image, r.src, r.alt) for r in records[:2]] + [(None, records[2].loc, records[2].loc_ans)]
    inputs = vllm.inputs(items)
    assert vllm.answer_marker
    for b in range(len(items)):
        length = int(inputs.tensors["attention_mask"][b].sum())
        assert vllm.question_end(inputs.tensors["input_ids"][b], length) == inputs.last_prompt[b] + 1
    editor = _editor("vead", vllm, records)
    editor.config = dataclasses.replace(editor.config, memory=True, route="joint")
    probe = [(records[1].image, records[1].src, records[1].alt), (records[3].image, records[3].src, records[3].alt)]
    before, clean = vllm.logits(vllm.inputs(probe)), vllm.score_batch(probe)
    editor.apply_batch([EditRequest.from_record(r) for r in records[1:3]])
    edited = editor.score_batch(probe)
    assert len(editor.bank) == 2 and editor.last_route.shape == (2,)
    assert edited[0].logprob != clean[0].logprob, "the routed edit changed nothing"
    editor.restore()
    assert torch.equal(vllm.logits(vllm.inputs(probe)), before)
    # question keys read at the last layer, run on with the pass's own positions and masks (M-RoPE too):
    # the same bank's keys equal those of a plain traced pass, and edits restore
    last = vllm.n_layers - 1
    editor.config = dataclasses.replace(editor.config, route_layer=last)
    editor.apply_batch([EditRequest.from_record(r) for r in records[1:3]])
    inputs = vllm.inputs([(r.image, r.src, r.alt) for r in records[1:3]])
    with editor._off():
        run = vllm.run(inputs, trace=[f"llm.layers.{last}"])
    for b, m in enumerate(editor.bank):
        v0, v1 = inputs.visual_spans[b]
        q = run.outputs[f"llm.layers.{last}"][b, v1:inputs.last_prompt[b] + 1].mean(0)
        assert torch.allclose(m.question[0].float(), q.float(), atol=1e-4)
        assert torch.allclose(m.visual[0].float(), run.outputs[f"llm.layers.{last}"][b, v0:v1].mean(0).float(), atol=1e-4)
    assert editor.score_batch(probe)[0].logprob != clean[0].logprob and editor.last_route.shape == (2,)
    editor.restore()
    assert torch.equal(vllm.logits(vllm.inputs(probe)), before)


def test_vead_training_runs_the_layers_after_l_e_as_the_model_does(vllm, records):
    """VEAD's training runs the layers after l_e on cached states with the keyword arguments of a real
    input's pass (positions that depend on the image, as Qwen2-VL's, and a model that needs its pixels, as
    BLIP-2): oracle, the model's own logits at every unpadded position; and a few steps train."""
    from visedit.editing import train_vead
    from visedit.editing.vead.train import Cache, _items
    from visedit.models.backbones import unembed

    config = VEADConfig(layer=1, use_im=False, steps=2, batch=2, val_every=2, val_edits=2)
    cache = Cache(vllm, 1, config)
    rec = cache.record(records[0])
    with torch.no_grad():
        hidden = vllm.adapter.run_from(cache.first, rec.states, cache.kwargs(rec.states.shape[1]))
        got = unembed(vllm.adapter, hidden).float()
        inputs = vllm.inputs(_items(records[0]))
        want = vllm.logits(inputs)
    mask = inputs.tensors["attention_mask"].bool()
    assert torch.allclose(got[mask], want[mask], atol=1e-4), float((got[mask] - want[mask]).abs().max())
    editor, info = train_vead(vllm, records[:6], config, progress=False)
    assert info["best_val_mean"] >= 0 and editor.layer == 1


def test_vead_gate_needs_a_grid(vllm, records, shot):
    """The gate map needs a grid; the gate per visual token exists on every backbone, and on a grid the map
    is that gate laid out on it."""
    editor = _editor("vead", vllm, records)
    with editor.edit(EditRequest.from_record(records[1])):
        tokens = editor.token_gate(shot, image_question("colour"))
        n_visual = vllm.inputs([(shot, image_question("colour"))]).layout(0).n_tokens
        assert tokens.shape == (n_visual,) and ((tokens > 0) & (tokens < 1)).all()
        if GRID[vllm.kind] is None:
            refused(vllm, "gate map", lambda: editor.gate(shot, image_question("colour")))
        else:
            layout = vllm.inputs([(shot, image_question("colour"))]).layout(0)
            gate = editor.gate(shot, image_question("colour"))
            assert gate.shape == GRID[vllm.kind] and np.array_equal(gate, layout.on_map(tokens))


def test_a_three_edit_evaluation(vllm, records):
    summary = evaluate(get_editor("ft_l", vllm, layer=-1, max_steps=2), records[:3], progress=False)
    assert summary.n == 3 and set(summary.token) == set(summary.exact)
    assert all(0 <= v <= 1 for v in summary.token.values())


def test_llava_next_layout_is_how_the_model_packs_its_tokens(world, tmp_path):
    """The base image's 2×2 grid comes first (the projected patches of the base image), then the tiles'
    4×4 grid with the learned newline token closing each row; a wide image gets fewer tiles, and a batch
    mixing a square image, a wide one and no image reads each item as it reads it alone."""
    vllm = load_vllm(build_checkpoint("llava-next", tmp_path, world=world))
    square = render(world.entities[5], seed=3, size=32).image
    wide = square.resize((32, 16))
    inputs = vllm.inputs([(square, "what colour is it ?")])
    layout, (start, stop) = inputs.layout(0), inputs.visual_spans[0]
    assert layout.grids == ((2, 2), (4, 4)) and layout.n_tokens == 2 * 2 + 4 * 5
    run = vllm.run(inputs, trace=["llm.layers.0", "projector"], trace_inputs=True)
    embeds, projected = run.inputs["llm.layers.0"][0, start:stop], run.outputs["projector"]
    assert torch.equal(embeds[layout.cells(0).ravel()], projected[0])
    on_grid = set(layout.cells(0).ravel()) | set(layout.cells(1).ravel())
    newline = vllm.model.model.image_newline
    assert all(torch.equal(embeds[t], newline) == (t not in on_grid) for t in range(layout.n_tokens))
    assert vllm.inputs([(wide, "what colour is it ?")]).layout(0).grids == ((2, 2), (2, 4))
    items = [(square, "what colour is it ?", "red"), (wide, "what colour is it ?", "red"),
             (None, "what is a lomi ?", "red")]
    batch = vllm.score_batch(items)
    for item, scored in zip(items, batch):
        assert scored.logprob == pytest.approx(vllm.score_batch([item])[0].logprob, abs=1e-5)


def test_llava_onevision_layout_is_how_the_model_packs_its_tokens(world, tmp_path):
    """The base image's 2×2 grid, then the tiles' grid with a newline token closing each row: a square
    image's 4×4 tile grid is over the tiny budget (two base images of patches, by more than 10 %) and is
    shrunk to 2×2, a wide image's 2×4 is not; the processor's token count is the model's (it raises on a
    mismatch), and a batch reads each item as it reads it alone."""
    vllm = load_vllm(build_checkpoint("llava-onevision", tmp_path, world=world))
    square = render(world.entities[5], seed=3, size=32).image
    wide, tall = square.resize((32, 16)), square.resize((16, 32))
    inputs = vllm.inputs([(square, "what colour is it ?")])
    layout, (start, stop) = inputs.layout(0), inputs.visual_spans[0]
    assert layout.grids == ((2, 2), (2, 2)) and layout.n_tokens == stop - start == 2 * 2 + 2 * 3
    run = vllm.run(inputs, trace=["llm.layers.0", "projector"], trace_inputs=True)
    embeds, projected = run.inputs["llm.layers.0"][0, start:stop], run.outputs["projector"]
    assert torch.equal(embeds[layout.cells(0).ravel()], projected[0])  # SigLIP: no class token to drop
    on_grid = set(layout.cells(0).ravel()) | set(layout.cells(1).ravel())
    newline = vllm.model.model.image_newline
    assert all(torch.equal(embeds[t], newline) == (t not in on_grid) for t in range(layout.n_tokens))
    assert vllm.inputs([(wide, "what colour is it ?")]).layout(0).grids == ((2, 2), (2, 4))
    assert vllm.inputs([(tall, "what colour is it ?")]).layout(0).grids == ((2, 2), (4, 2))
    items = [(square, "what colour is it ?", "red"), (wide, "what colour is it ?", "red"),
             (None, "what is a lomi ?", "red")]
    batch = vllm.score_batch(items)
    for item, scored in zip(items, batch):
        assert scored.logprob == pytest.approx(vllm.score_batch([item])[0].logprob, abs=1e-5)


def test_the_support_table_is_the_readme_s_and_says_what_these_tests_check():
    assert support_markdown() in (Path(__file__).parents[1] / "README.md").read_text()
    assert sorted(k for row in SUPPORT for k in row.kinds) == sorted(KINDS)
    for row in SUPPORT:
        refusals = row.refused  # "as BLIP-2 OPT": that row's
        if refusals.startswith("as "):
            refusals = next(r.refused for r in SUPPORT if r.backbone.startswith(refusals[3:]))
        if row.kinds:
            assert ("IG on pixels" in refusals) == any(k in NO_PIXEL_IG for k in row.kinds), row.backbone
            assert ("`attention_map`" in refusals) == any(GRID[k] is None for k in row.kinds), row.backbone
            assert ("region scores" in refusals) == any(k in SEVERAL_GRIDS or GRID[k] is None for k in row.kinds)
