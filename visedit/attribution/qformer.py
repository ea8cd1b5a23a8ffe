"""Query tokens back onto the image: a map over a Q-Former's query tokens, spread onto the patch grid through
its cross-attention (an extension the paper does not have).

BLIP-2's visual tokens are learned queries that each read the whole image, so a map over them
(per-token allocation, noise perturbation over token windows, VEAD's gate) has no place on the image.
The Q-Former says where each query looked. With W[q, p] the cross-attention from query q to patch p,
averaged over heads and over the Q-Former layers that cross-attend, the encoder's class token dropped
and each row renormalised over the patches (the adapter's ``query_patch_weights``), the rule is

    m_p = Σ_q s_q · W[q, p]

for query scores s. The map is linear in s and keeps its sum (Σ_p m_p = Σ_q s_q): each query's score goes
to the patches it attended to, in proportion. It is the one-step reading of the cross-attention, averaged
over layers — not a full rollout: the Q-Former's self-attention also mixes the queries between layers,
and a rollout through it would spread the scores further. The map is scored against the object masks
like every other map (:func:`~visedit.attribution.regions.score_heatmap`).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from ..models import VLLM


@dataclasses.dataclass(frozen=True)
class QueryPatchMap:
    """Query-token scores spread onto the image's patch grid. ``values``: (rows, cols); ``query_scores``:
    the scores per query token it was made from; ``weights``: (queries, rows, cols), where each query
    read the image (each query's slice sums to 1)."""

    values: tuple[tuple[float, ...], ...]
    query_scores: tuple[float, ...]
    weights: tuple[tuple[tuple[float, ...], ...], ...]

    @property
    def grid(self) -> tuple[int, int]:
        return len(self.values), len(self.values[0])

    def heatmap(self) -> np.ndarray:
        """(rows, cols) array, e.g. for :func:`~visedit.attribution.regions.score_heatmap`."""
        return np.asarray(self.values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def plot(self, image=None, mask=None, *, title: str | None = None):
        from ..viz import heatmap_overlay

        diverging = bool(np.min(self.query_scores) < 0)
        return heatmap_overlay(self.heatmap(), image=image, mask=mask, diverging=diverging,
                               title=title or "Query-token scores on the patches (through the Q-Former's cross-attention)")


def query_patch_weights(vllm: VLLM, image, question: str) -> np.ndarray:
    """Where each query token of ``vllm`` read ``image`` (asked ``question``): (queries, rows, cols),
    each query's slice summing to 1 (see the module docstring). Refused in one line for a backbone whose
    visual tokens are not Q-Former queries."""
    if image is None:
        raise ValueError("mapping query tokens onto patches needs an image: pass image=…")
    inputs = vllm.inputs([(image, question)])
    weights, grid = vllm.adapter.query_patch_weights(inputs)
    return weights[0].reshape(-1, *grid).cpu().numpy()


def query_to_patches(vllm: VLLM, image, question: str, token_scores: Sequence[float] | np.ndarray) -> QueryPatchMap:
    """Spread ``token_scores`` (one per query token: an allocation, a noise-perturbation influence, a gate)
    onto ``image``'s patch grid: m_p = Σ_q s_q·W[q, p] (see the module docstring)."""
    weights = query_patch_weights(vllm, image, question)
    scores = np.asarray(token_scores, dtype=float).reshape(-1)
    if scores.shape[0] != weights.shape[0]:
        raise ValueError(f"token_scores has {scores.shape[0]} values but {vllm.backbone} has {weights.shape[0]} "
                         "query tokens: pass one score per visual token")
    values = np.einsum("q,qrc->rc", scores, weights.astype(float))
    return QueryPatchMap(values=tuple(map(tuple, values.tolist())), query_scores=tuple(scores.tolist()),
                         weights=tuple(tuple(map(tuple, w)) for w in weights.astype(float).tolist()))
