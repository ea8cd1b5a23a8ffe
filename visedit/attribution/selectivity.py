"""Does the noise map follow the *question*? Layer by layer, on scenes of several creatures.

For scene records (the second edition of the world: ``src`` asks about one creature, ``i_loc_q`` asks
about another creature of the same image, each with its mask), the noise-perturbation map of every layer
is scored against the mask of the creature the question asks about: the pointing game (is the hottest
window on it?) and the lift (positive influence on it ÷ its area share). The *pair* score asks, for the
same image asked about two creatures, whether both maps point at their own creature. A model that reads
its image late has unselective maps early and maps on the asked-about creature later.

A backbone whose visual tokens are Q-Former queries (no patch grid) has its maps spread onto the patches
through the Q-Former's cross-attention (:func:`~visedit.attribution.qformer.query_to_patches`) before they
are scored; its windows are single queries (``radius`` 0), as neighbours in query order are not neighbours
in the image.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from ..models import VLLM
from .qformer import query_patch_weights
from .regions import score_heatmap
from .tracing import noise_perturbation


@dataclasses.dataclass(frozen=True)
class LayerSelectivity:
    """Per-layer scores of noise maps on the queried creature. Lists are indexed by layer.

    ``pointing`` / ``lift``: mean over the records' ``src`` maps; ``pair``: share of records whose
    ``src`` and ``i_loc_q`` maps both point at their own creature; ``n``: records scored (both
    questions answered correctly); ``n_total``: records given.
    """

    pointing: list[float]
    lift: list[float]
    pair: list[float]
    n: int
    n_total: int
    radius: int

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "best_layer": self.best_layer,
                "first_quarter_max_pointing": self.first_quarter_max_pointing,
                "best_pointing": self.pointing[self.best_layer], "best_pair": self.pair[self.best_layer],
                "best_relative_depth": self.best_layer / max(1, len(self.pointing) - 1)}

    @property
    def best_layer(self) -> int:
        """The layer whose maps point at the queried creature most often (ties: the higher lift)."""
        return int(max(range(len(self.pointing)), key=lambda l: (self.pointing[l], self.lift[l])))

    @property
    def first_quarter_max_pointing(self) -> float:
        """The highest pointing game among the first quarter of the layers (l < L/4)."""
        q = int(np.ceil(len(self.pointing) / 4))
        return float(max(self.pointing[:q]))

    def plot(self):
        from ..viz.figures import selectivity_figure

        return selectivity_figure(self)


def _layer_heatmaps(vllm: VLLM, image, question: str, influence) -> list[np.ndarray]:
    """Every layer's noise map of ``influence`` on the patch grid: the map itself on a grid, or spread
    from the query tokens through the Q-Former's cross-attention (refused in one line by other backbones)."""
    if influence.grid is not None:
        return [influence.heatmap(l) for l in influence.layers]
    weights = query_patch_weights(vllm, image, question).astype(float)
    return [np.einsum("q,qrc->rc", row, weights) for row in influence.array()]


def layer_selectivity(vllm: VLLM, records: Sequence, *, radius: int | None = None, n: int = 10, seed: int = 0,
                      only_correct: bool = True, progress: bool = True) -> LayerSelectivity:
    """Score noise maps of every layer on scene records (with ``i_loc_q`` and an ``i_loc`` mask).

    With ``only_correct`` a record counts only if the model answers both its questions correctly
    (``pred`` and ``i_loc_a``, exact match). ``radius``: the windows' radius on the patch grid (default 1;
    query tokens: 0, each query alone)."""
    from tqdm.auto import tqdm

    records = list(records)
    if not records:
        raise ValueError("no records given: pass scene records (make them with DatasetSpec(edition=2))")
    missing = [i for i, r in enumerate(records) if "i_loc_q" not in r.extra or "i_loc_mask" not in r.extra]
    if missing:
        raise ValueError(f"record(s) {missing[:5]} have no in-image probe (i_loc_q, i_loc_mask): layer "
                         "selectivity needs scene records of the world's second edition")
    if radius is None:
        radius = 1 if vllm.inputs([(records[0].image, records[0].src)]).layout(0).map_grid is not None else 0
    point, lift, pair = [], [], []
    for rec in tqdm(records, desc="selectivity", disable=not progress):
        q2, a2 = rec.extra["i_loc_q"], rec.extra["i_loc_a"]
        if only_correct and not (vllm.score(rec.image, rec.src, rec.pred).exact
                                 and vllm.score(rec.image, q2, a2).exact):
            continue
        m1, m2 = rec.mask("image"), rec.mask("i_loc")
        a = noise_perturbation(vllm, rec.image, rec.src, radius=radius, n=n, seed=seed)
        b = noise_perturbation(vllm, rec.image, q2, radius=radius, n=n, seed=seed)
        s1 = [score_heatmap(h, m1) for h in _layer_heatmaps(vllm, rec.image, rec.src, a)]
        s2 = [score_heatmap(h, m2) for h in _layer_heatmaps(vllm, rec.image, q2, b)]
        point.append([s.pointing_game for s in s1])
        lift.append([s.lift for s in s1])
        pair.append([float(x.pointing_game and y.pointing_game) for x, y in zip(s1, s2)])
    if not point:
        raise ValueError("no record was answered correctly on both of its questions; pass only_correct=False")

    def mean(rows):
        return [round(float(v), 4) for v in np.mean(np.asarray(rows), axis=0)]

    return LayerSelectivity(pointing=mean(point), lift=mean(lift), pair=mean(pair), n=len(point),
                            n_total=len(records), radius=radius)
