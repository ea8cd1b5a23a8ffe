"""hooks.py: every context manager removes exactly its own handles, also when the block raises."""

from __future__ import annotations

import pytest
import torch

from visedit.hooks import StopForward, Trace, edit_input, edit_output, hook_count, live_hooks, stop_after
from visedit.world import image_question, render


@pytest.fixture()
def batch(tiny_random, world):
    img = render(world.entities[0], seed=0, size=32).image
    return tiny_random.inputs([(img, image_question("colour"), "red")])


def test_trace_records_and_patching_clean_outputs_is_identity(tiny_random, batch):
    v = tiny_random
    sites = {f"llm.layers.{l}": v.site(f"llm.layers.{l}") for l in range(v.n_layers)}
    clean = v.logits(batch)
    with Trace(sites, inputs=True) as tr:
        v.logits(batch)
    assert set(tr.outputs) == set(sites) and tr.outputs["llm.layers.0"].shape[:2] == batch.tensors["input_ids"].shape
    # oracle: replacing every layer's output by its recorded clean output reproduces the clean logits
    with contextlib_all([edit_output(m, lambda out, _n=n: tr.outputs[_n]) for n, m in sites.items()]):
        patched = v.logits(batch)
    assert torch.equal(patched, clean)
    # the input of layer l+1 is the output of layer l
    assert torch.equal(tr.inputs["llm.layers.1"], tr.outputs["llm.layers.0"])


def contextlib_all(cms):
    import contextlib

    stack = contextlib.ExitStack()
    for cm in cms:
        stack.enter_context(cm)
    return stack


def test_edit_input_changes_the_output(tiny_random, batch):
    v = tiny_random
    clean = v.logits(batch)
    with edit_input(v.site("llm.layers.1.mlp"), lambda x: x * 0):
        changed = v.logits(batch)
    assert not torch.equal(clean, changed)
    assert torch.equal(v.logits(batch), clean)


def test_hooks_are_removed_after_errors_and_nesting(tiny_random, batch):
    v = tiny_random
    v.logits(batch)  # let transformers register whatever hooks it registers on first use
    before = hook_count(v.model)
    assert before > 0 and live_hooks(v.model) == 0  # transformers' own hooks are not ours
    with pytest.raises(RuntimeError, match="injected"):
        with Trace({"a": v.site("llm.layers.0")}, inputs=True):
            with edit_output(v.site("llm.layers.1"), lambda x: x):
                assert hook_count(v.model) == before + 3
                assert live_hooks(v.model) == 3 and live_hooks(v.site("llm.layers.1")) == 1
                raise RuntimeError("injected")
    assert hook_count(v.model) == before and live_hooks(v.model) == 0

    def boom(x):
        raise RuntimeError("injected inside a hook")

    with pytest.raises(RuntimeError, match="inside a hook"):
        with edit_output(v.site("llm.layers.0.attn"), boom):
            v.logits(batch)
    assert hook_count(v.model) == before and live_hooks(v.model) == 0


def test_stop_after_ends_the_pass_early(tiny_random, batch):
    v = tiny_random
    with Trace({"l0": v.site("llm.layers.0"), "l2": v.site("llm.layers.2")}) as tr, stop_after(v.site("llm.layers.0")):
        v.model(**batch.tensors)
    assert "l0" in tr.outputs and "l2" not in tr.outputs
    assert StopForward.__name__ == "StopForward"
