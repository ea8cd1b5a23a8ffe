"""How one edit is scored: the five metrics' probes and the single-edit protocol, both scores.

This is the part of the MMEdit protocol that editors' trainers validate with (:func:`quick_scores`);
:mod:`visedit.evaluation` runs it over datasets (resumable runs, summaries, tables) and re-exports it.
See :mod:`visedit.evaluation.protocol` for the table of metrics.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import numpy as np

from .base import EditRequest, Editor

METRICS = ("reliability", "t_generality", "m_generality", "t_locality", "m_locality")


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


@dataclasses.dataclass(frozen=True)
class EditResult:
    """One edit's scores: ``token`` and ``exact`` map each metric to a number in [0, 1]."""

    index: int
    token: dict
    exact: dict
    edit_seconds: float
    answers: dict  # post-edit greedy answers per metric, and pre-edit answers of the locality probes
    total_seconds: float = 0.0  # the whole protocol for this edit (pre-edit record, edit, scoring)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "EditResult":
        return cls(**d)


def probes(record) -> dict[str, tuple]:
    """The (image, question, target) probe of each metric for an MMEdit record."""
    return {"reliability": (record.image, record.src, record.alt),
            "t_generality": (record.image, record.rephrase, record.alt),
            "m_generality": (record.image_rephrase, record.src, record.alt),
            "t_locality": (None, record.loc, record.loc_ans),
            "m_locality": (record.m_loc, record.m_loc_q, record.m_loc_a)}


def score_edit(editor: Editor, record, *, index: int = 0, exact: bool = True) -> EditResult:
    """Run the single-edit protocol on one record and score all five metrics both ways (``exact=False``:
    token accuracy only — no greedy generation, for validation loops; ``exact`` is then empty)."""
    begin = time.perf_counter()
    editor.restore()
    p = probes(record)
    local = ["t_locality", "m_locality"]
    pre_scores = dict(zip(local, editor.score_batch([p[m] for m in local])))
    pre_answers = dict(zip(local, editor.answer_batch([p[m][:2] for m in local]))) if exact else {}
    start = time.perf_counter()
    editor.apply(EditRequest.from_record(record))
    seconds = time.perf_counter() - start
    try:
        post_scores = dict(zip(METRICS, editor.score_batch([p[m] for m in METRICS])))
        post_answers = dict(zip(METRICS, editor.answer_batch([p[m][:2] for m in METRICS]))) if exact else {}
    finally:
        editor.restore()
    token, matches = {}, {}
    for m in METRICS:
        if m in local:
            pre, post = pre_scores[m].argmax_ids, post_scores[m].argmax_ids
            token[m] = sum(a == b for a, b in zip(pre, post)) / len(pre)
        else:
            token[m] = post_scores[m].token_accuracy
        if exact:
            wanted = pre_answers[m] if m in local else record.alt
            matches[m] = float(_norm(post_answers[m]) == _norm(wanted))
    answers = {**post_answers, **{f"{m}_pre": a for m, a in pre_answers.items()}}
    return EditResult(index, token, matches, round(seconds, 6), answers, round(time.perf_counter() - begin, 6))


def quick_scores(editor: Editor, records: Sequence) -> dict[str, float]:
    """Mean token-accuracy metrics (and their mean) over ``records``, without writing anything."""
    rows = [score_edit(editor, r, index=i, exact=False).token for i, r in enumerate(records)]
    out = {m: float(np.mean([r[m] for r in rows])) for m in METRICS}
    out["mean"] = float(np.mean(list(out.values())))
    return out
