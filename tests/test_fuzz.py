"""Fuzz test: random prompts, images (sizes and modes), layers, targets and malformed records thrown at the
public verbs. Each call gives a result or a ValueError / FileNotFoundError with a one-line message — never
another exception — and leaves the model's weights, hook count and ``requires_grad`` flags as they were.
Bounded (40 examples, derandomized: the same examples on every run) and fast on a tiny random model."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from visedit.attribution import token_allocation
from visedit.editing import EditRequest, VEADConfig, VEADEditor, get_editor
from visedit.evaluation import evaluate
from visedit.hooks import hook_count
from visedit.world import DatasetSpec, load_mmedit, load_world_split

SPEC = DatasetSpec(seed=0, n_entities=10, edits_per_pair=1, image_size=32)
WORDS = ["what", "colour", "shape", "is", "this", "creature", "?", "red", "star", "<image>", "zebrafish", "", " ",
         "\n", "ü", "ASSISTANT:", "red " * 80]
MODES = ["1", "L", "P", "RGB", "RGBA", "LA", "I", "F", "CMYK", "YCbCr", "HSV", "LAB"]


@pytest.fixture(scope="module")
def setup(tiny_random, tmp_path_factory):
    vllm = tiny_random
    records = load_world_split("eval", SPEC, root=tmp_path_factory.mktemp("fuzz_data"))
    vllm.answer(records[0].image, records[0].src)  # warm-up: transformers adds its own capture hooks lazily
    vead = VEADEditor(vllm, VEADConfig(layer=1))
    torch.nn.init.normal_(vead.adapter.w_end.weight, std=0.5)
    editors = {"none": get_editor("none", vllm), "ft_l": get_editor("ft_l", vllm, layer=-1, max_steps=2),
               "ft_v": get_editor("ft_v", vllm, max_steps=2), "ike": get_editor("ike", vllm), "vead": vead}
    return vllm, records, editors


def _state(vllm):
    return ({n: p.detach().clone() for n, p in vllm.model.named_parameters()}, hook_count(vllm.model),
            {n: p.requires_grad for n, p in vllm.model.named_parameters()})


@st.composite
def images(draw):
    kind = draw(st.sampled_from(["pil", "pil", "pil", "none", "missing", "array", "junk"]))
    if kind == "none":
        return None
    if kind == "missing":
        return "/nonexistent/image.png"
    if kind == "junk":
        return draw(st.sampled_from([42, 1.5, b"png", ["a.png"], np.zeros((3, 3), dtype=np.float64)]))
    w, h = draw(st.integers(1, 300)), draw(st.integers(1, 300))
    if kind == "array":
        return np.full((h, w, 3), draw(st.integers(0, 255)), dtype=np.uint8)
    return Image.new("RGB", (w, h), tuple(draw(st.lists(st.integers(0, 255), min_size=3, max_size=3)))).convert(
        draw(st.sampled_from(MODES)))


texts = st.one_of(st.sampled_from(["what colour is this creature ?", "what shape is this creature ?"]),
                  st.text(max_size=30), st.lists(st.sampled_from(WORDS), max_size=8).map(" ".join))
targets = st.one_of(st.sampled_from(["red", "star"]), texts)
layers = st.one_of(st.integers(-6, 6), st.floats(allow_nan=True), st.sampled_from(["2", True, None, [1]]))


@st.composite
def malformed_records(draw, record):
    rows = [json.loads(json.dumps({k: str(v) for k, v in vars(record).items() if k != "extra"}))]
    for _ in range(draw(st.integers(0, 3))):
        field = draw(st.sampled_from(sorted(rows[0]) + ["extra_field"]))
        change = draw(st.sampled_from(["drop", "value"]))
        if change == "drop":
            rows[0].pop(field, None)
        else:
            rows[0][field] = draw(st.one_of(targets, st.integers(), st.none(), st.lists(targets, max_size=2)))
    return draw(st.sampled_from([rows, rows[0], [rows[0], 3], "text"]))


@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_public_verbs_give_a_result_or_one_line(setup, data):
    vllm, records, editors = setup
    before = _state(vllm)
    verb = data.draw(st.sampled_from(["answer", "score", "edit", "edit", "allocation", "records"]), label="verb")
    try:
        if verb == "answer":
            vllm.answer(data.draw(images()), data.draw(texts))
        elif verb == "score":
            vllm.score(data.draw(images()), data.draw(texts), data.draw(targets))
        elif verb == "edit":
            editor = editors[data.draw(st.sampled_from(sorted(editors)), label="editor")]
            request = EditRequest(data.draw(images()), data.draw(texts), data.draw(targets))
            with editor.edit(request):
                editor.answer_batch([(records[0].image, records[0].src)])
        elif verb == "allocation":
            token_allocation(vllm, data.draw(images()), data.draw(texts), layer=data.draw(layers))
        else:
            with tempfile.TemporaryDirectory() as tmp:
                file = Path(tmp) / "evqa.json"
                file.write_text(json.dumps(data.draw(malformed_records(records[0]))))
                evaluate(editors["none"], load_mmedit(file, image_root="/"), progress=False)
    except (ValueError, FileNotFoundError) as err:
        message = str(err)
        assert message.strip() and "\n" not in message, repr(message)
    weights, hooks, flags = _state(vllm)
    assert hooks == before[1], "a hook was left behind"
    assert flags == before[2], "requires_grad flags changed"
    assert all(torch.equal(weights[n], before[0][n]) for n in weights), "weights changed"
