"""A model spread by accelerate (``load_vllm(…, device_map=…)``) gives exactly the undispatched model's
results: a tiny random LLaVA with an explicit device map that offloads part of it to disk, so that
accelerate's own hooks sit on every module beside ours. Then the one-line refusals for bad devices."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from visedit.attribution import (integrated_gradients, module_contributions, noise_perturbation,
                                 restoration_tracing, token_allocation)
from visedit.editing import EditRequest, VEADConfig, VEADEditor, get_editor
from visedit.evaluation import evaluate
from visedit.hooks import Trace, edit_input, hook_count
from visedit.models import load_vllm
from visedit.models.zoo import KINDS, SUPPORT, build_checkpoint
from visedit.world import DatasetSpec, image_question, load_world_split, render

pytest.importorskip("accelerate")

LM = "model.language_model"
#: Resident on the CPU ("cpu") or offloaded to disk ("disk": weights on ``meta`` until the module runs).
MAP = {"model.vision_tower": "cpu", "model.multi_modal_projector": "disk", f"{LM}.embed_tokens": "cpu",
       f"{LM}.layers.0": "disk", f"{LM}.layers.1": "cpu", f"{LM}.layers.2": "disk", f"{LM}.norm": "disk",
       f"{LM}.rotary_emb": "cpu", "lm_head": "disk"}
SPEC = DatasetSpec(seed=0, n_entities=10, edits_per_pair=1, image_size=32)


@pytest.fixture(scope="module")
def split(tiny_random_dir, tmp_path_factory):
    return load_vllm(tiny_random_dir, device_map=MAP, offload_folder=tmp_path_factory.mktemp("offload"))


@pytest.fixture(scope="module")
def shot(world):
    return render(world.entities[5], seed=3, size=32)


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    return load_world_split("eval", SPEC, root=tmp_path_factory.mktemp("eval_data"))


def _max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=float) - np.asarray(b, dtype=float)).max())


def test_the_split_model_is_dispatched_and_offloaded(split, tiny_random):
    assert split.device_map == MAP and tiny_random.device_map is None
    assert split.site("llm.layers.0.attn").q_proj.weight.device.type == "meta"  # on disk until it runs
    assert split.site("llm.layers.1.attn").q_proj.weight.device.type == "cpu"
    assert hasattr(split.site("llm.layers.0"), "_hf_hook") and split.device == torch.device("cpu")
    assert split.device_of("llm.layers.2") == torch.device("cpu")
    assert split.fingerprint == tiny_random.fingerprint  # read through the offloaded weights


def test_answers_scores_and_every_site_equal_the_undispatched_model(split, tiny_random, shot):
    q = image_question("colour")
    assert split.answer_batch([(shot.image, q), (None, "what is red ?")]) == \
        tiny_random.answer_batch([(shot.image, q), (None, "what is red ?")])
    sites = [s for s in tiny_random.adapter.site_names() if s != "vision_tower"]  # its output is not a tensor
    runs = [v.run(v.inputs([(shot.image, q, "red")]), trace=sites, trace_inputs=True) for v in (tiny_random, split)]
    assert torch.equal(runs[0].logits, runs[1].logits)
    for name in sites:
        for kind in ("outputs", "inputs"):
            assert torch.equal(getattr(runs[0], kind)[name], getattr(runs[1], kind)[name]), (name, kind)
    cpu = split.run(split.inputs([(shot.image, q)]), trace=["llm.layers.2"], cache_device="cpu")
    assert cpu.outputs["llm.layers.2"].device.type == "cpu"


def test_our_hooks_run_outside_accelerates_and_compose_with_them(split, tiny_random, shot):
    """accelerate wraps ``forward``: our pre-hook runs before it loads an offloaded module's weights, our
    forward hook after it put them back on ``meta`` — and both still see and change the real tensors."""
    module = split.site("llm.layers.0.attn").q_proj
    seen = []
    with Trace({"q": module}, inputs=True) as tr, edit_input(module, lambda x: seen.append(
            module.weight.device.type) or x):
        split.logits(split.inputs([(shot.image, "what colour is this creature ?")]))
    assert seen == ["meta"] and module.weight.device.type == "meta" and tr.outputs["q"].device.type == "cpu"
    inputs = [v.inputs([(shot.image, "what colour is this creature ?")]) for v in (tiny_random, split)]
    with edit_input(tiny_random.site("llm.layers.2.mlp"), lambda x: x * 0.5):
        clean = tiny_random.logits(inputs[0])
    before = hook_count(split.model)
    with edit_input(split.site("llm.layers.2.mlp"), lambda x: x * 0.5):
        assert hook_count(split.model) == before + 1
        assert torch.equal(split.logits(inputs[1]), clean)
    assert hook_count(split.model) == before


def test_attribution_equals_the_undispatched_model(split, tiny_random, shot):
    q = image_question("habitat")
    a, b = (module_contributions(v, shot.image, q) for v in (tiny_random, split))
    assert a == b
    a, b = (token_allocation(v, shot.image, q, layer=2) for v in (tiny_random, split))
    assert a == b and b.max_error < 1e-4
    for engine in ("batched", "loop"):
        a, b = (noise_perturbation(v, shot.image, q, radius=1, n=3, seed=1, engine=engine, chunk_size=5)
                for v in (tiny_random, split))
        assert _max_diff(a.array(), b.array()) == 0, engine
    a = restoration_tracing(tiny_random, shot.image, q, n=3)
    b = restoration_tracing(split, shot.image, q, n=3, cache_device="cpu")
    assert a == b
    a, b = (integrated_gradients(v, shot.image, q, layer=1, n_steps=8) for v in (tiny_random, split))
    assert a == b


def _editor(name, vllm):
    if name == "vead":  # on layer 0, which accelerate offloads to disk
        torch.manual_seed(0)
        editor = VEADEditor(vllm, VEADConfig(layer=0))
        torch.nn.init.normal_(editor.adapter.w_end.weight, std=0.5)  # an untrained VEAD is the identity
        return editor
    return get_editor("ft_l", vllm, layer=1, max_steps=3, stop_loss=0.0)  # layer 1 is resident


@pytest.mark.parametrize("name", ["vead", "ft_l"])
def test_editors_apply_and_restore_bit_identically(split, tiny_random, records, name):
    r = records[0]
    items = [(r.image, r.src, r.alt), (None, r.loc, r.loc_ans), (r.m_loc, r.m_loc_q, r.m_loc_a)]
    clean = split.logits(split.inputs(items))
    edited = []
    for v in (tiny_random, split):
        editor = _editor(name, v)
        with editor.edit(EditRequest.from_record(records[1])):
            edited.append(v.logits(v.inputs(items)))
        assert torch.equal(v.logits(v.inputs(items)), clean)
    assert torch.equal(*edited) and not torch.equal(edited[0], clean)
    if name == "vead":
        assert _editor(name, split).adapter.w_b.weight.device == split.device_of("llm.layers.0")


def test_a_three_edit_evaluation_equals_the_undispatched_one(split, tiny_random, records, tmp_path):
    rows = []
    for tag, v in (("one", tiny_random), ("split", split)):
        evaluate(_editor("ft_l", v), records[:3], out=tmp_path / tag, progress=False)
        rows.append([{k: x for k, x in row.items() if not k.endswith("seconds")} for row in
                     map(__import__("json").loads, (tmp_path / tag / "edits.jsonl").read_text().splitlines())])
    assert rows[0] == rows[1] and len(rows[0]) == 3


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.filterwarnings("ignore:The following device_map keys do not match")  # accelerate on its own auto maps
def test_every_architecture_runs_split_by_device_map_auto(kind, tmp_path, world, shot, records):
    """``device_map="auto"`` with too little CPU memory for the model: the rest goes to disk."""
    folder = build_checkpoint(kind, tmp_path / kind, world=world)
    one = load_vllm(folder)
    size = sum(p.numel() * p.element_size() for p in one.model.parameters())
    split = load_vllm(folder, device_map="auto", max_memory={"cpu": int(0.6 * size)}, offload_folder=tmp_path / "off")
    assert set(split.device_map.values()) == {"cpu", "disk"}
    q = image_question("colour")
    assert torch.equal(*(v.logits(v.inputs([(shot.image, q, "red")])) for v in (one, split)))
    assert module_contributions(one, shot.image, q) == module_contributions(split, shot.image, q)
    a, b = (noise_perturbation(v, shot.image, q, radius=0, n=2, layers=[0, -1]) for v in (one, split))
    assert a == b
    a, b = (restoration_tracing(v, shot.image, q, radius=0, n=2, layers=[1]) for v in (one, split))
    assert a == b
    r = records[0]
    items = [(r.image, r.src, r.alt), (r.m_loc, r.m_loc_q, r.m_loc_a)]
    edited = []
    for v in (one, split):
        torch.manual_seed(0)
        editor = VEADEditor(v, VEADConfig(layer=1))
        torch.nn.init.normal_(editor.adapter.w_end.weight, std=0.5)
        clean = v.logits(v.inputs(items))
        with editor.edit(EditRequest.from_record(records[1])):
            edited.append(v.logits(v.inputs(items)))
        assert torch.equal(v.logits(v.inputs(items)), clean)
    assert torch.equal(*edited)


def test_the_support_table_claims_what_these_tests_check():
    for row in SUPPORT:
        assert (row.multi_gpu != "—") == bool(row.kinds) and all(k in KINDS for k in row.kinds), row.backbone


def test_editing_an_offloaded_layer_is_refused_in_one_line(split):
    with pytest.raises(ValueError, match="accelerate offloads .* put that module on a device in the device_map"):
        get_editor("ft_l", split, layer=0)


@pytest.mark.parametrize("kwargs, message", [
    ({"device": "gpu"}, "unknown device 'gpu'"),
    ({"device": "meta"}, "not a device visedit runs models on"),
    ({"device_map": "everywhere"}, "unknown device_map 'everywhere'"),
    ({"device_map": {"lm_head": "floppy"}}, "unknown device_map\\['lm_head'\\] 'floppy'"),
    ({"device_map": {"lm_head": "disk"}}, "pass offload_folder"),
    ({"device_map": []}, "device_map must be one of"),
    ({"device": "cpu", "device_map": "auto"}, "not both"),
    ({"offload_folder": "x"}, "only apply with device_map"),
])
def test_bad_devices_are_one_line(tiny_random_dir, kwargs, message):
    with pytest.raises(ValueError, match=message) as err:
        load_vllm(tiny_random_dir, **kwargs)
    assert "\n" not in str(err.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_one_line(tiny_random_dir):
    for kwargs in ({"device": "cuda"}, {"device_map": {"": 0}}, {"device_map": "cuda:1"}):
        with pytest.raises(ValueError, match="has none"):
            load_vllm(tiny_random_dir, **kwargs)


def test_a_device_map_that_does_not_fit_the_model_is_one_line(tiny_random_dir, tmp_path):
    for device_map, message in (({"lm_head": "cpu", f"{LM}": "disk"}, r"no device to \d+ weights .* add 'model.vision_tower'"),
                                ({**MAP, "model.lm_head": "cpu"}, "'model.lm_head', which is not a module")):
        with pytest.raises(ValueError, match=message) as err:
            load_vllm(tiny_random_dir, device_map=device_map, offload_folder=tmp_path)
        assert "\n" not in str(err.value)


def test_visedit_works_without_accelerate_and_says_what_to_install(tiny_random_dir):
    """accelerate is an optional extra: hidden from Python, visedit imports and loads a model on one device,
    and a device map is refused in one line that names the extra."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['accelerate'] = None\n"
            "from visedit.models import load_vllm\nimport visedit.attribution, visedit.editing, visedit.evaluation\n"
            f"v = load_vllm({str(tiny_random_dir)!r})\n"
            f"try:\n    load_vllm({str(tiny_random_dir)!r}, device_map='auto')\n"
            "except ValueError as err:\n    print(err)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == ("device_map needs the optional package accelerate, which is not installed: "
                           "pip install 'visedit[multi-gpu]'  (or: pip install accelerate)")
