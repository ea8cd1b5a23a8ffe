"""Does the influence mapper look where the answer comes from? Its gate against the object mask and
against the noise-perturbation map of the layers after l_e."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from ..base import EditRequest


@dataclasses.dataclass(frozen=True)
class GateAgreement:
    """Per record: the gate's pointing game and lift against the object mask, the same for the noise
    map, their Spearman correlation, and the mean gate on the edit image vs on an unrelated image."""

    rows: tuple[dict, ...]

    def means(self) -> dict[str, float]:
        keys = [k for k in self.rows[0] if k != "index"]
        return {k: round(float(np.mean([r[k] for r in self.rows])), 4) for k in keys}

    def to_dict(self) -> dict:
        return {"n": len(self.rows), "means": self.means(), "rows": list(self.rows)}

    def table(self):
        import pandas as pd

        return pd.Series(self.means(), name=f"mean over {len(self.rows)} edits").to_frame()


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    if ra.std() == 0 or rb.std() == 0:
        return 0.0
    return float(np.corrcoef(ra, rb)[0, 1])


def gate_agreement(editor, records: Sequence, *, radius: int = 0, n: int = 4) -> GateAgreement:
    """Score the IM gate of ``editor`` (a :class:`VEADEditor`) on each record's own edit."""
    from ...attribution import noise_perturbation, score_heatmap

    vllm = editor.vllm
    layers = list(range(editor.layer + 1, vllm.n_layers)) or [editor.layer]
    rows = []
    for i, rec in enumerate(records):
        with editor.edit(EditRequest.from_record(rec)):
            gate = editor.gate(rec.image, rec.src)
            other = editor.gate(rec.m_loc, rec.m_loc_q)
        noise = noise_perturbation(vllm, rec.image, rec.src, layers=layers, radius=radius, n=n).array().mean(0)
        noise = noise.reshape(gate.shape)
        mask = rec.mask("image")
        g, z = score_heatmap(gate, mask), score_heatmap(noise, mask)
        rows.append({"index": i, "gate_pointing": g.pointing_game, "gate_lift": round(g.lift, 4),
                     "noise_pointing": z.pointing_game, "noise_lift": round(z.lift, 4),
                     "gate_noise_spearman": round(_spearman(gate.ravel(), noise.ravel()), 4),
                     "gate_mean_edit_image": round(float(gate.mean()), 4),
                     "gate_mean_unrelated_image": round(float(other.mean()), 4)})
    return GateAgreement(tuple(rows))
