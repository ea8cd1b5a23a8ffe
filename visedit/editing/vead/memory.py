"""VEAD with a memory of many edits (our extension; the paper's VEAD holds one edit sample).

With ``memory: true`` every applied edit keeps its cached layer-l_e rows (an :class:`EditMemory`), and
each input row with an image attends to *one* of them, picked by a routing rule:

- ``route: nearest`` — the edit whose image is nearest in the visual-token space at l_e: the cosine
  between the mean of the input's visual tokens and the mean of the edit sample's (both VEAD-off states);
- ``route: gate`` — the edit whose influence-mapper gate opens most on the input: max_j s_j, the IM's
  score (the paper's formula, :meth:`VEAD.gate_logits`) of the input's visual tokens against each edit's
  IM keys;
- ``route: joint`` — the edit nearest in image *and* question: cos(v̄, v̄_k) + w · cos(q̄, q̄_k), where q̄ is
  the mean state at l_e of the prompt after the image (the answer left out) and w is ``route_weight``.
  Both keys are centred on the held edits' mean first: every image shares the background and every
  question the frame's words, and uncentred means are all alike (cosines near 1 at layer 0 of the
  first teaching model). The two kinds of miss the image route makes — two edits of one creature, and a
  probe about another fact of an edited creature — differ in the question, not the image. With
  ``route_layer`` both keys are read at a later layer's output; with ``route_min`` an input whose
  best score (as a mean cosine, (cos_v + w · cos_q) / (1 + w)) falls short is routed to no edit (-1).
- ``route: prompt`` — the edit whose prompt is nearest: the cosine of the input's last prompt token's state
  with the edit prompt's, both VEAD-off and read at ``route_layer`` (uncentred: at a layer after the
  question has read the image, prompts about different creatures or facts are already far apart). With
  ``route_min`` an input below it is routed to no edit, and this holds for one held edit too: the route
  then decides whether the single edit applies at all (another question about the edit image, another
  creature), which the paper's VEAD leaves to its gate alone. With ``route_scope`` both keys are first mapped
  by a learned scope (:mod:`.scope`): on raw keys the same question about the creature on the left and on
  the right lie at a cosine near 1.

The chosen edit is then applied exactly as a single edit is (so one held edit is the paper's VEAD).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch


def visual_keys(memories: Sequence) -> torch.Tensor:
    """(K, d) unit vectors: the mean visual token of each held edit (zeros for an edit without an image)."""
    return torch.nn.functional.normalize(torch.cat([m.visual for m in memories]).float(), dim=-1)


def im_keys(memories: Sequence) -> torch.Tensor:
    """(K, d) prompt keys, or (K, M, d) image keys, of the held edits."""
    return torch.cat([m.prompt_state for m in memories]).float()


def prompt_keys(memories: Sequence, space=None) -> torch.Tensor:
    """(K, d) unit vectors: the last prompt token's state of each held edit (the prompt route's keys), or
    with ``space`` (the editor's :meth:`scoped`) those keys mapped into the route's space first."""
    if any(m.prompt_key is None for m in memories):
        raise ValueError("route: prompt needs every held edit's prompt key; apply edits one request at a time "
                         "(apply / apply_batch), not with edit_each")
    keys = torch.cat([m.prompt_key for m in memories]).float()
    return torch.nn.functional.normalize(keys if space is None else space(keys), dim=-1)


def gate_scores(adapter, V: torch.Tensor, keys: torch.Tensor, *, budget: int = 20_000_000) -> torch.Tensor:
    """(R, K): for each input row (visual tokens V (R, N, d)) and each held edit (``keys`` (K, d) or
    (K, M, d)), the largest IM score max_j s_j over the row's visual tokens. Computed in chunks of edits
    so that at most ``budget`` scores are held at once."""
    R, N, d = V.shape
    h = adapter.im_heads
    v = adapter.r1(adapter.ln3(V.float())).view(R, N, h, d // h)
    q = adapter.r2(adapter.ln4(keys))
    q = q.view(keys.shape[0], 1 if keys.dim() == 2 else keys.shape[1], h, d // h)
    step = max(1, budget // max(1, R * N * q.shape[1] * h))
    out = []
    for k0 in range(0, q.shape[0], step):
        s = torch.einsum("rnhc,kmhc->rnkmh", v, q[k0:k0 + step]).mean(-1) / math.sqrt(d / h)
        out.append(s.amax(-1).amax(1))
    return torch.cat(out, 1)


class JointKeys:
    """The joint route's keys of K held edits: the centres (mean over the held edits) of their mean
    visual tokens and of their question keys, and each edit's centred unit keys (K, d)."""

    def __init__(self, visual: torch.Tensor, question: torch.Tensor):
        self.visual_centre, self.question_centre = visual.mean(0), question.mean(0)
        self.visual = torch.nn.functional.normalize(visual - self.visual_centre, dim=-1)
        self.question = torch.nn.functional.normalize(question - self.question_centre, dim=-1)

    @classmethod
    def of(cls, memories: Sequence) -> "JointKeys":
        if any(m.visual is None or m.question is None for m in memories):
            raise ValueError("route: joint needs every held edit's image and question keys; apply edits one "
                             "request at a time (apply / apply_batch), not with edit_each")
        return cls(torch.cat([m.visual for m in memories]).float(), torch.cat([m.question for m in memories]).float())

    def scores(self, V: torch.Tensor, Q: torch.Tensor, weight: float) -> torch.Tensor:
        """(R, K): cos(v̄ − c_v, v̄_k − c_v) + weight · cos(q̄ − c_q, q̄_k − c_q) for R inputs with visual
        tokens V (R, N, d) and question keys Q (R, d)."""
        v = torch.nn.functional.normalize(V.float().mean(1) - self.visual_centre, dim=-1)
        q = torch.nn.functional.normalize(Q.float() - self.question_centre, dim=-1)
        return v @ self.visual.T + weight * (q @ self.question.T)


def route(editor, V: torch.Tensor, Q: torch.Tensor | None = None) -> torch.Tensor:
    """(R,) the index of the held edit each row of visual tokens V (R, N, d) attends to (-1: none, with
    ``route_min``); ``Q`` (R, d): the rows' question keys (the joint and prompt routes only)."""
    if editor.config.route == "nearest":
        return nearest(V, editor.held_keys("visual"))
    if editor.config.route in ("joint", "prompt"):
        if Q is None:
            raise ValueError(f"route: {editor.config.route} needs the inputs' question keys")
        if editor.config.route == "prompt":  # a cosine
            scores = torch.nn.functional.normalize(editor.scoped(Q), dim=-1) @ editor.held_keys("prompt").T
        else:  # a mean of the two cosines
            w = editor.config.route_weight
            scores = editor.held_keys("joint").scores(V, Q, w) / (1 + w)
        best, chosen = scores.max(-1)
        if editor.config.route_min is not None:
            chosen = torch.where(best >= editor.config.route_min, chosen, torch.full_like(chosen, -1))
        return chosen
    return gate_scores(editor.adapter, V, editor.held_keys("im")).argmax(-1)


def nearest(V: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """(R,) for each row of visual tokens V (R, N, d), the held edit whose key (``keys`` (K, d), unit mean
    visual tokens, see :func:`visual_keys`) has the largest cosine with the row's mean visual token."""
    query = torch.nn.functional.normalize(V.float().mean(1), dim=-1)
    return (query @ keys.T).argmax(-1)


def held_bytes(memories: Sequence) -> int:
    """Bytes of the held edits' tensors."""
    return sum(t.numel() * t.element_size() for m in memories
               for t in (m.states, m.mask, m.prompt_state, m.visual, m.question, m.prompt_key) if t is not None)
