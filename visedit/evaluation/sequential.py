"""Sequential ("lifelong") and batch editing: T edits applied one step after another without restoring.

Protocol (:func:`evaluate_sequential`):

1. the edit order: the first T records of one seeded permutation of ``records`` (so runs at several T
   with the same seed edit the same records first), recorded in ``run.json``;
2. before any edit, every edited record's locality probes are read (as the single-edit protocol does);
3. the edits are applied in steps of ``batch`` (:meth:`Editor.apply_batch`), never restored in between;
   each step's wall time and the bytes the editor holds (:meth:`Editor.held_bytes`) are recorded;
   with ``every`` = K, after every K edits the *first* K edited records are scored again (retention);
4. after the last step every edited record is scored (the five metrics and any region probes, token
   accuracy and exact match): reliability and generality against its new answer, the localities
   against the pre-edit readings — after all T edits;
   after many edits some locality probes ask about a fact the run itself edited (another record's edit
   of the same creature and fact), whose answer *should* change; ``unrelated`` scores each locality
   only on the probes whose (creature, fact) no edit of the run changed, with the count left out (for
   records that name their probes' subjects, as the world's do; real MMEdit files leave out none);
5. the editor is restored.

With ``out`` (a folder): ``run.json`` (settings, the edit order), ``steps.jsonl`` (one line per step,
with its retention scores) and ``edits.jsonl`` (one line per edited record, step 4), synced as they are
written, and ``summary.json`` (atomic). An interrupted run resumes: the finished steps are applied
again without scoring (editors are deterministic, so the model is where it was), then the run goes on.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import random
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from ..editing.base import EditRequest, Editor
from ..io import write_json
from .protocol import (METRICS, EditResult, EvalSummary, _fingerprint, _read_done, _rewrite, append_line,
                       check_records, discard_run, open_run, pre_edit, score_applied)


def edit_order(n: int, T: int, seed: int) -> list[int]:
    """The indices of the T records to edit, in edit order: the first T of a permutation of ``range(n)``
    seeded by ``seed`` (a prefix of the order at any larger T)."""
    if not isinstance(T, int) or isinstance(T, bool) or T < 1:
        raise ValueError(f"T (the number of sequential edits) must be a positive int, got {T!r}")
    if T > n:
        raise ValueError(f"T = {T} sequential edits but only {n} records: pass T ≤ {n} or more records")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order[:T]


@dataclasses.dataclass(frozen=True)
class SequentialSummary:
    """A sequential run: the final scores of every edited record (an :class:`EvalSummary` over them),
    the retention rows (``after``: edits applied so far; ``token`` / ``exact``: the first ``every`` edits'
    mean scores then), and the cost: seconds per edit and the bytes the editor held after each step."""

    editor: str
    T: int
    batch: int
    every: int | None
    seed: int
    order: list
    final: EvalSummary
    retention: list
    edit_seconds_mean: float
    held_bytes: list  # after each step
    run_seconds: float = 0.0
    #: each locality on the probes about a (creature, fact) that no edit of the run changed:
    #: {metric: {"token", "exact", "n", "left_out"}} (see :func:`unrelated_locality`)
    unrelated: dict = dataclasses.field(default_factory=dict)

    @property
    def mean(self) -> float:
        """The five-metric token-accuracy mean of the edited records after all T edits."""
        return self.final.mean

    def to_dict(self) -> dict:
        return {"editor": self.editor, "T": self.T, "batch": self.batch, "every": self.every, "seed": self.seed,
                "order": list(self.order), "final": self.final.to_dict(), "mean": round(self.mean, 4),
                "retention": list(self.retention), "edit_seconds_mean": self.edit_seconds_mean,
                "held_bytes": list(self.held_bytes), "held_bytes_final": self.held_bytes[-1],
                "run_seconds": self.run_seconds, "unrelated": dict(self.unrelated)}

    @classmethod
    def from_dict(cls, d: dict) -> "SequentialSummary":
        return cls(d["editor"], d["T"], d["batch"], d["every"], d["seed"], list(d["order"]),
                   EvalSummary.from_dict(d["final"]), list(d["retention"]), d["edit_seconds_mean"],
                   list(d["held_bytes"]), d.get("run_seconds", 0.0), dict(d.get("unrelated", {})))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SequentialSummary":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def retention_frame(self, *, score: str = "token"):
        """One row per retention check: edits applied so far, then the first edits' five metrics."""
        import pandas as pd

        if score not in ("token", "exact"):
            raise ValueError(f"score must be 'token' or 'exact', got {score!r}")
        return pd.DataFrame([{"after": r["after"], **r[score]} for r in self.retention]).set_index("after")

    def plot(self, *, metric: str = "reliability", score: str = "token"):
        """The retention curve: ``metric`` of the first edits against the number of edits applied (plotly;
        :func:`visedit.viz.figures.retention_figure` draws several runs in one figure)."""
        from ..viz.figures import retention_figure

        return retention_figure({self.editor: self}, metric=metric, score=score)


def _mean_scores(results: Sequence[EditResult], kind: str) -> dict:
    metrics = METRICS + tuple(m for m in getattr(results[0], kind) if m not in METRICS and
                              all(m in getattr(r, kind) for r in results))
    return {m: round(float(np.mean([getattr(r, kind)[m] for r in results])), 4) for m in metrics}


#: which record fields name the creature and the fact each locality probe asks about
PROBE_SUBJECTS = {"t_locality": ("loc_entity", "loc_fact"), "m_locality": ("m_loc_entity", "m_loc_fact"),
                  "i_locality": ("i_loc_entity", "i_loc_fact"), "la_locality": ("la_loc_entity", "la_loc_fact")}


def edited_facts(records: Sequence) -> set:
    """The (creature, fact) pairs that ``records``' edits change (records that do not name them: none)."""
    return {(r.extra["entity"], r.extra["fact"]) for r in records if "entity" in r.extra and "fact" in r.extra}


def unrelated_locality(results: Sequence[EditResult], records: Sequence, edited: set) -> dict:
    """Each locality metric of ``results`` (scored on ``records``, in order) on the probes whose (creature,
    fact) is not in ``edited``: ``{metric: {"token", "exact", "n", "left_out"}}``; a metric with every probe
    left out has ``None`` scores."""
    out = {}
    for metric, (who, what) in PROBE_SUBJECTS.items():
        if not results or metric not in results[0].token:
            continue
        keep = [r for r, rec in zip(results, records) if (rec.extra.get(who), rec.extra.get(what)) not in edited]
        scores = {kind: (round(float(np.mean([getattr(r, kind)[metric] for r in keep])), 4) if keep else None)
                  for kind in ("token", "exact")}
        out[metric] = {**scores, "n": len(keep), "left_out": len(results) - len(keep)}
    return out


def _read_lines(path: Path) -> list[dict]:
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return rows


def evaluate_sequential(editor: Editor, records: Sequence, *, T: int, every: int | None = None, batch: int = 1,
                        seed: int = 0, out: str | os.PathLike | None = None, resume: bool = True,
                        progress: bool = True) -> SequentialSummary:
    """Apply T edits of ``records`` one step (of ``batch`` edits) after another without restoring, then score
    every edited record; with ``every`` = K also score the first K edits after every K (retention). See the
    module docstring for the protocol and the files written to ``out``."""
    from tqdm.auto import tqdm

    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    order = edit_order(len(records), T, seed)
    if every is not None:
        if not isinstance(every, int) or isinstance(every, bool) or not 1 <= every <= T:
            raise ValueError(f"every must be an int in 1…T = {T} (or None: no retention checks), got {every!r}")
        if every % batch:
            raise ValueError(f"every = {every} must be a multiple of batch = {batch}: retention is checked "
                             "between steps")
    edited = [records[i] for i in order]
    check_records(edited, editor.vllm)
    steps = [order[k:k + batch] for k in range(0, T, batch)]
    settings = {"editor": editor.name, "config": json.loads(json.dumps(dataclasses.asdict(editor.config))),
                "model": editor.vllm.name, "model_fingerprint": editor.vllm.fingerprint, "n": len(records),
                "records": _fingerprint(records), "protocol": "sequential", "T": T, "every": every,
                "batch": batch, "seed": seed, "order": order}
    step_rows: list[dict] = []
    final_rows: list[EditResult] = []
    files = new_folder = new_run = None
    if out is not None:
        out = Path(out)
        new_folder, new_run = open_run(out, settings, editor, resume=resume)
        files = {"steps": out / "steps.jsonl", "edits": out / "edits.jsonl"}
        step_rows = [] if new_run else _read_lines(files["steps"])[: len(steps)]
        final_rows = [] if new_run or len(step_rows) < len(steps) else _read_done(files["edits"])
        files["steps"].write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in step_rows))
        _rewrite(files["edits"], final_rows)
    begin = time.perf_counter()
    editor.restore()
    handles = {k: open(f, "a") for k, f in files.items()} if files else {}
    try:
        pre = [pre_edit(editor, r) for r in tqdm(edited, desc="pre-edit readings", disable=not progress)]
        first = edited[:every] if every else []
        for s, step in enumerate(tqdm(steps, desc=f"sequential {editor.name}", disable=not progress)):
            start = time.perf_counter()
            editor.apply_batch([EditRequest.from_record(records[i]) for i in step])
            seconds = time.perf_counter() - start
            if s < len(step_rows):
                continue  # a finished step of an interrupted run, applied again without scoring
            applied = sum(len(x) for x in steps[: s + 1])
            row = {"step": s, "edited": list(step), "after": applied, "seconds": round(seconds, 6),
                   "held_bytes": int(editor.held_bytes())}
            if every and applied % every == 0:
                scored = [score_applied(editor, r, p) for r, p in zip(first, pre)]
                so_far = edited_facts(edited[:applied])
                row["retention"] = {"token": _mean_scores(scored, "token"), "exact": _mean_scores(scored, "exact"),
                                    "unrelated": unrelated_locality(scored, first, so_far)}
            step_rows.append(row)
            if handles:
                append_line(handles["steps"], row)
        seconds_of = {i: r["seconds"] / len(r["edited"]) for r in step_rows for i in r["edited"]}
        for k in tqdm(range(len(final_rows), T), desc="score the edited records", disable=not progress,
                      initial=len(final_rows), total=T):
            result = score_applied(editor, edited[k], pre[k], index=order[k], edit_seconds=seconds_of[order[k]])
            final_rows.append(result)
            if handles:
                append_line(handles["edits"], result.to_dict())
    except BaseException:
        if new_run and not step_rows:
            for h in handles.values():
                h.close()
            discard_run(out, new_folder, ["steps.jsonl", "edits.jsonl"])
        raise
    finally:
        for h in handles.values():
            h.close()
        editor.restore()
    final = EvalSummary.from_results(editor.name, final_rows, settings)
    summary = SequentialSummary(
        editor.name, T, batch, every, seed, order, final,
        [{"after": r["after"], **r["retention"]} for r in step_rows if "retention" in r],
        round(float(np.mean(list(seconds_of.values()))), 6), [r["held_bytes"] for r in step_rows],
        round(time.perf_counter() - begin, 1), unrelated_locality(final_rows, edited, edited_facts(edited)))
    if out is not None:
        write_json(out / "summary.json", summary.to_dict())
    return summary


def creature_breakdown(out: str | os.PathLike, records: Sequence):
    """Where a run of many edits loses its scores, from its folder ``out`` (``run.json``, ``edits.jsonl``)
    and the ``records`` it ran on: M-Generality split by whether the edited creature has *another* edit in
    the run, and M-Locality by whether the probe's creature was edited in the run (any fact). One row per
    (metric, split): the probes, and their mean token accuracy and exact match. Records that do not name
    their creatures (real MMEdit files) cannot be split."""
    import pandas as pd

    out = Path(out)
    order = json.loads((out / "run.json").read_text())["order"]
    rows = _read_done(out / "edits.jsonl")
    if not rows:
        raise ValueError(f"{out} has no scored edits yet: finish the run (evaluate --sequential resumes it)")
    if any("entity" not in records[i].extra for i in order):
        raise ValueError("these records do not name their creatures (extra['entity']): a breakdown by creature "
                         "needs the world's records")
    count = collections.Counter(records[i].extra["entity"] for i in order)
    table = []
    for r in rows:
        rec = records[r.index]
        for metric, shared in (("m_generality", count[rec.extra["entity"]] > 1),
                               ("m_locality", rec.extra.get("m_loc_entity") in count)):
            table.append({"metric": metric, "creature edited elsewhere in the run": shared,
                          "token": r.token[metric], "exact": r.exact[metric]})
    frame = pd.DataFrame(table)
    return (frame.groupby(["metric", "creature edited elsewhere in the run"])
            .agg(probes=("token", "size"), token=("token", "mean"), exact=("exact", "mean")).round(3))
