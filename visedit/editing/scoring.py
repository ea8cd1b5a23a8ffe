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
#: Region probes of scene records (extra fields), scored when a record has them.
REGION_METRICS = ("i_locality", "la_locality")
_REGION_FIELDS = {"i_locality": ("i_loc_q", "i_loc_a"), "la_locality": ("la_loc", "la_loc_q", "la_loc_a")}


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
    """The (image, question, target) probe of each metric for an MMEdit record (the five, then the region
    probes the record carries). Caption records (E-IC) are probed the same way: the question is the caption
    prompt (``src``, "a photo of"; ``rephrase``) and the target the whole caption; M-Generality's target is
    the fresh rendering's own counterfactual caption where the record has one (``alt_rephrase``)."""
    extra = getattr(record, "extra", {}) or {}
    out = {"reliability": (record.image, record.src, record.alt),
           "t_generality": (record.image, record.rephrase, record.alt),
           "m_generality": (record.image_rephrase, record.src, extra.get("alt_rephrase", record.alt)),
           "t_locality": (None, record.loc, record.loc_ans),
           "m_locality": (record.m_loc, record.m_loc_q, record.m_loc_a)}
    if all(k in extra for k in _REGION_FIELDS["i_locality"]):
        out["i_locality"] = (record.image, extra["i_loc_q"], extra["i_loc_a"])
    if all(k in extra for k in _REGION_FIELDS["la_locality"]):
        out["la_locality"] = (extra["la_loc"], extra["la_loc_q"], extra["la_loc_a"])
    return out


def answer_budget(vllm, record) -> int:
    """How many tokens greedy answers may run to for ``record``'s exact match: 8 for a question (E-VQA), the
    longest caption target's length + 4 for a caption record (E-IC: the whole caption must be generated)."""
    if getattr(record, "task", "vqa") != "caption":
        return 8
    return max(8, max(len(vllm.encode_target(t)) for _, _, t in probes(record).values()) + 4)


def _locality(metric: str) -> bool:
    return metric in ("t_locality", "m_locality") or metric in REGION_METRICS


def score_edit(editor: Editor, record, *, index: int = 0, exact: bool = True) -> EditResult:
    """Run the single-edit protocol on one record and score all five metrics both ways (``exact=False``:
    token accuracy only — no greedy generation, for validation loops; ``exact`` is then empty)."""
    begin = time.perf_counter()
    editor.restore()
    pre = pre_edit(editor, record, exact=exact)
    start = time.perf_counter()
    editor.apply(EditRequest.from_record(record))
    seconds = time.perf_counter() - start
    try:
        result = score_applied(editor, record, pre, index=index, exact=exact, edit_seconds=seconds)
    finally:
        editor.restore()
    return dataclasses.replace(result, total_seconds=round(time.perf_counter() - begin, 6))


def pre_edit(editor: Editor, record, *, exact: bool = True) -> tuple[dict, dict]:
    """What the locality probes of ``record`` read before the edit, through ``editor`` as it is now:
    (teacher-forced scores, greedy answers — empty unless ``exact``) by metric."""
    p = probes(record)
    local = [m for m in p if _locality(m)]
    scores = dict(zip(local, editor.score_batch([p[m] for m in local])))
    answers = dict(zip(local, editor.answer_batch([p[m][:2] for m in local],
                                                  max_new_tokens=answer_budget(editor.vllm, record)))) if exact else {}
    return scores, answers


def score_applied(editor: Editor, record, pre: tuple[dict, dict], *, index: int = 0, exact: bool = True,
                  edit_seconds: float = 0.0) -> EditResult:
    """Score ``record``'s probes through the editor with its edits applied, against ``pre``
    (:func:`pre_edit`, read before any edit): reliability and generality against ``alt``, localities
    against the pre-edit readings."""
    p = probes(record)
    metrics = list(p)
    pre_scores, pre_answers = pre
    post_scores = dict(zip(metrics, editor.score_batch([p[m] for m in metrics])))
    budget = answer_budget(editor.vllm, record)
    post_answers = dict(zip(metrics, editor.answer_batch([p[m][:2] for m in metrics], max_new_tokens=budget))
                        ) if exact else {}
    token, matches = {}, {}
    for m in metrics:
        if m in pre_scores:
            before, after = pre_scores[m].argmax_ids, post_scores[m].argmax_ids
            token[m] = sum(a == b for a, b in zip(before, after)) / len(before)
        else:
            token[m] = post_scores[m].token_accuracy
        if exact:
            wanted = pre_answers[m] if m in pre_scores else p[m][2]
            matches[m] = float(_norm(post_answers[m]) == _norm(wanted))
    answers = {**post_answers, **{f"{m}_pre": a for m, a in pre_answers.items()}}
    return EditResult(index, token, matches, round(edit_seconds, 6), answers)


def quick_scores(editor: Editor, records: Sequence) -> dict[str, float]:
    """Mean token-accuracy metrics (and their mean) over ``records``, without writing anything."""
    rows = [score_edit(editor, r, index=i, exact=False).token for i, r in enumerate(records)]
    out = {m: float(np.mean([r[m] for r in rows])) for m in METRICS}
    out["mean"] = float(np.mean(list(out.values())))
    return out
