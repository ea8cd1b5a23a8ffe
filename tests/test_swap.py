"""The image swap (visedit.attribution.swap): its shares recomputed through the model's own forward pass with
a hook (on a tiny random LLaVA and on the shipped BLIP-2 model, whose visual tokens are Q-Former queries),
its two exact ends, serialisation, and one line for each bad input."""

from __future__ import annotations

import json

import pytest
import torch

from visedit.attribution.swap import ImageSwap, image_swap
from visedit.hooks import edit_input, edit_output, live_hooks


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    from visedit.world import DatasetSpec, load_world_split

    spec = DatasetSpec(seed=1, n_entities=8, edits_per_pair=1, image_size=32)
    return load_world_split("eval", spec, root=tmp_path_factory.mktemp("w"))[:12]


def _answer_with_swap(vllm, a, b, depth: int) -> int:
    """The first answer token of (a.image, a.src) with b's visual tokens written in at ``depth`` by a hook
    on the full forward pass (an oracle independent of run_from)."""
    a_in, b_in = vllm.inputs([(a.image, a.src)]), vllm.inputs([(b.image, a.src)])
    start, stop = a_in.visual_spans[0]
    site = vllm.site(f"llm.layers.{max(depth - 1, 0)}")
    run = vllm.run(b_in, trace=[f"llm.layers.{max(depth - 1, 0)}"], trace_inputs=True)
    theirs = (run.inputs if depth == 0 else run.outputs)[f"llm.layers.{max(depth - 1, 0)}"][:, start:stop]

    def put(h):
        h = h.clone()
        h[:, start:stop] = theirs
        return h

    with (edit_input if depth == 0 else edit_output)(site, put), torch.no_grad():
        logits = vllm.logits(a_in)
    return int(logits[0, a_in.last_prompt[0]].argmax())


def _matches_the_oracle(vllm, records, swap) -> None:
    """``swap``'s shares are the ones a hooked full forward pass gives for its pairs, and its ends are exact."""
    L = vllm.n_layers
    assert len(swap.follow) == len(swap.keep) == L + 1 and swap.n == len(swap.pairs) >= 3
    assert swap.n_total == len(records) and all(i != j for i, j in swap.pairs)
    assert swap.follow[0] == 1.0 and swap.keep[0] == 0.0  # the decoder's input: the run on the partner image
    assert swap.keep[L] == 1.0 and swap.follow[L] == 0.0  # after the last layer nothing reads the visual tokens
    follow, keep = [0] * (L + 1), [0] * (L + 1)
    for i, j in swap.pairs:
        own, theirs = _answer_with_swap(vllm, records[i], records[j], L), \
            _answer_with_swap(vllm, records[i], records[j], 0)
        assert own != theirs  # a partner is an image the model answers differently on
        for k in range(L + 1):
            tok = _answer_with_swap(vllm, records[i], records[j], k)
            follow[k] += tok == theirs
            keep[k] += tok == own
    assert swap.follow == tuple(round(f / swap.n, 4) for f in follow)
    assert swap.keep == tuple(round(k / swap.n, 4) for k in keep)
    assert live_hooks(vllm.model) == 0


def test_shares_match_a_hooked_forward_pass_and_the_ends_are_exact(tiny_random, records):
    swap = image_swap(tiny_random, records, seed=3, progress=False)
    _matches_the_oracle(tiny_random, records, swap)
    assert swap.after_layer(0) == swap.follow[1] and swap.half_depth == next(
        k for k, f in enumerate(swap.follow) if f < 0.5)
    if swap.edit_layer is not None:  # the last layer whose output still decides half: the next one's does not
        assert swap.after_layer(swap.edit_layer) >= 0.5 > swap.follow[swap.edit_layer + 2]
    made = ImageSwap((1.0, 0.8, 0.6, 0.4, 0.0), (0.0, 0.1, 0.3, 0.5, 1.0), 5, 5, 0)
    assert (made.half_depth, made.edit_layer) == (3, 1)  # layer 1's output: 0.6 follow; layer 2's: 0.4
    assert ImageSwap((1.0, 0.4, 0.0), (0.0, 0.5, 1.0), 5, 5, 0).edit_layer is None
    assert image_swap(tiny_random, records, seed=3, progress=False) == swap  # the seed fixes the partners
    assert ImageSwap.from_dict(json.loads(json.dumps(swap.to_dict()))) == swap
    assert [t.name for t in swap.plot().data][:2] == ["follow the swapped image", "keep their own answer"]
    assert live_hooks(tiny_random.model) == 0


def test_the_blip2_model_s_query_tokens_swap_as_patches_do():
    """On the shipped BLIP-2 model the visual tokens are the Q-Former's 32 queries, at the decoder's input
    from its projection: the same oracle holds there."""
    from visedit.models import load_vllm
    from visedit.world import load_world_split, spread

    blip2 = load_vllm("visedit-blip2")
    records = spread(load_world_split("eval", blip2.dataset_spec), 8)
    swap = image_swap(blip2, records, progress=False)
    start, stop = blip2.inputs([(records[0].image, records[0].src)]).visual_spans[0]
    assert stop - start == 32
    _matches_the_oracle(blip2, records, swap)


def test_bad_input_is_one_line(tiny_random, records):
    import dataclasses

    for call, message in [
        (lambda: image_swap(tiny_random, records[:1], progress=False), "at least 2 records"),
        (lambda: image_swap(tiny_random, records, tries=0, progress=False), "tries must be an int >= 1"),
        (lambda: image_swap(tiny_random, [dataclasses.replace(records[0], image=None), records[1]], progress=False),
         "record 0 has no image"),
        (lambda: image_swap(tiny_random, [records[0], records[0]], progress=False),
         "no record had a partner image"),
        (lambda: ImageSwap((1.0, 0.0), (0.0, 1.0), 1, 2, 0).after_layer(1), "layer must be 0…0"),
    ]:
        with pytest.raises(ValueError, match=message) as err:
            call()
        assert "\n" not in str(err.value)
