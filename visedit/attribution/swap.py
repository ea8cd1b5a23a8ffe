"""Swapping the image mid-way: after how many layers can the visual tokens still change the answer?

For a record A (image a, question q) take a partner image b on which the model answers q differently.
Run (a, q) and (b, q); at a depth k — the input of the decoder (k = 0) or the output of layer k − 1 — put
b's visual tokens in place of a's in A's residual stream, run A's remaining layers, and read the answer's
first token at the last prompt position. Every text position keeps what it read from image a in the first
k layers; only the layers from k on see image b. So the share of answers that *follow* b at depth k is the
share the model still decides from its visual tokens after k layers, and the share that *keep* A's answer
is the share it has already taken from them. An editor that rewrites the visual tokens at the output of
layer l (VisEdit's VEAD) writes where the swap at depth l + 1 does: what a whole natural image cannot
change there, a rewrite of the visual tokens can change only by writing something no image produces.

Two values are exact: at depth 0 the swapped run *is* the run on (b, q), so every answer follows b; at
depth L (after the last layer) no layer is left to read the visual tokens, so every answer is A's. The
measure is an interchange intervention on the visual slice (activation patching); attention knockout
(Zhang et al. 2025) asks the neighbouring question of which layers' *attention* to the image matters.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Sequence

import torch

from ..models import VLLM
from ..models.backbones import unembed


@dataclasses.dataclass(frozen=True)
class ImageSwap:
    """Per depth k = 0…L (0: the decoder's input; k: the output of layer k − 1), over ``n`` pairs: the share
    of answers that ``follow`` the partner image and that ``keep`` the record's own (first answer token);
    the rest become a third token. ``n_total``: records given; ``seed``: the partner draw; ``pairs``: the
    (record, partner) indices into the records given, one per pair."""

    follow: tuple[float, ...]
    keep: tuple[float, ...]
    n: int
    n_total: int
    seed: int
    pairs: tuple[tuple[int, int], ...] = ()

    @property
    def n_layers(self) -> int:
        return len(self.follow) - 1

    def after_layer(self, layer: int) -> float:
        """The share that still follows the swapped image when the swap is at the output of ``layer``
        (where VEAD at l_e = ``layer`` writes)."""
        if not 0 <= layer < self.n_layers:
            raise ValueError(f"layer must be 0…{self.n_layers - 1} (this model's layers), got {layer!r}")
        return self.follow[layer + 1]

    @property
    def half_depth(self) -> int:
        """The first depth at which fewer than half the answers follow the swapped image: how many layers
        the model needs to take most of its answer from the image."""
        return next(k for k, f in enumerate(self.follow) if f < 0.5)

    @property
    def edit_layer(self) -> int | None:
        """A causal counterpart of the paper's rule: the last layer at whose output a swapped image still
        decides at least half the answers (``half_depth − 2``), where an editor of the visual tokens writes
        while the model still takes its answer from them; None when fewer than half follow after layer 0."""
        return self.half_depth - 2 if self.half_depth >= 2 else None

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "half_depth": self.half_depth, "edit_layer": self.edit_layer}

    @classmethod
    def from_dict(cls, d: dict) -> "ImageSwap":
        return cls(tuple(d["follow"]), tuple(d["keep"]), d["n"], d["n_total"], d["seed"],
                   tuple(tuple(p) for p in d.get("pairs", ())))

    def plot(self, **kwargs):
        from ..viz.figures import image_swap_figure

        return image_swap_figure(self, **kwargs)


def image_swap(vllm: VLLM, records: Sequence, *, seed: int = 0, tries: int = 20,
               progress: bool = True) -> ImageSwap:
    """Swap each record's visual tokens for a partner image's at every depth (see the module docstring).

    Partners are drawn from ``records`` themselves with ``seed``: for each record, up to ``tries`` other
    records whose image has as many visual tokens and on which the model's first answer token to the
    record's question differs; a record with no such partner is left out (``n`` counts the pairs)."""
    from tqdm.auto import tqdm

    records = list(records)
    if len(records) < 2:
        raise ValueError(f"an image swap needs at least 2 records (each record's partner image is another "
                         f"record's), got {len(records)}")
    if isinstance(tries, bool) or not isinstance(tries, int) or tries < 1:
        raise ValueError(f"tries must be an int >= 1, got {tries!r}")
    L = vllm.n_layers
    names = [f"llm.layers.{l}" for l in range(L)]
    rng = random.Random(seed)
    follow, keep, pairs = [0] * (L + 1), [0] * (L + 1), []
    with torch.no_grad():
        for i, rec in enumerate(tqdm(records, desc="image swap", disable=not progress)):
            a_in = vllm.inputs([(rec.image, rec.src)])
            if a_in.visual_spans[0] is None:
                raise ValueError(f"record {i} has no image: an image swap needs image records")
            start, stop = a_in.visual_spans[0]
            T = a_in.last_prompt[0]
            a_run = vllm.run(a_in, trace=names, trace_inputs=True)
            a_tok = int(a_run.logits[0, T].argmax())
            for _ in range(tries):
                j = rng.randrange(len(records) - 1)
                j += j >= i  # any record but this one
                b_in = vllm.inputs([(records[j].image, rec.src)])
                if b_in.visual_spans[0] != (start, stop) or b_in.last_prompt[0] != T:
                    continue
                b_run = vllm.run(b_in, trace=names, trace_inputs=True)
                b_tok = int(b_run.logits[0, T].argmax())
                if b_tok != a_tok:
                    break
            else:
                continue
            pairs.append((i, j))
            for k in range(L + 1):  # depth 0: layer 0's input; depth k: layer k − 1's output
                ours, theirs = (a_run.inputs, b_run.inputs) if k == 0 else (a_run.outputs, b_run.outputs)
                h = ours[names[max(k - 1, 0)]].clone()
                h[:, start:stop] = theirs[names[max(k - 1, 0)]][:, start:stop]
                if k < L:  # at k = L no layer is left to run: h is the last layer's output
                    h = vllm.adapter.run_from(k, h, a_run.kwargs[names[k]])
                tok = int(unembed(vllm.adapter, h[0, T]).argmax())
                follow[k] += tok == b_tok
                keep[k] += tok == a_tok
    n = len(pairs)
    if n == 0:
        raise ValueError(f"no record had a partner image the model answers differently on within {tries} tries: "
                         "pass more (or more varied) records, or raise tries")
    return ImageSwap(tuple(round(f / n, 4) for f in follow), tuple(round(k / n, 4) for k in keep), n,
                     len(records), seed, tuple(pairs))
