"""The MMEdit protocol: five metrics per edit, each scored two ways, and the single-edit loop.

Metrics (per edit; the edit is ``image`` + ``src`` → ``alt``):

==============  =========================================  ==========================================
metric          probe                                      token accuracy (paper) / exact match
==============  =========================================  ==========================================
reliability     ``image`` + ``src``                        argmax = ``alt`` tokens / answer = ``alt``
t_generality    ``image`` + ``rephrase``                   same
m_generality    ``image_rephrase`` + ``src``               same
t_locality      no image + ``loc`` (teacher-forced on      argmax = pre-edit argmax at the same
                ``loc_ans``)                               positions / answer = pre-edit answer
m_locality      ``m_loc`` + ``m_loc_q`` (on ``m_loc_a``)   same
==============  =========================================  ==========================================

Scene records of the world's second edition carry two more locality probes, scored like ``m_locality``
when present (they are reported beside the five and left out of the five-metric mean):

==============  =========================================  ==========================================
i_locality      ``image`` + ``i_loc_q`` (on ``i_loc_a``):  argmax = pre-edit argmax / answer = pre-edit
                another creature of the edited image       answer
la_locality     ``la_loc`` + ``la_loc_q`` (on              same
                ``la_loc_a``): a look-alike creature
==============  =========================================  ==========================================

Caption records (E-IC, ``record.task == "caption"``) are scored the same way with the caption prompt as
the question ("a photo of") and the whole caption as the target: token accuracy over every caption
token, as MMEdit does, and exact match of a greedy caption given room for the whole caption
(:func:`answer_budget`).

Single-edit protocol: restore → record pre-edit locality predictions → apply one edit (timed) →
score → restore. :func:`evaluate` runs it over records, appending one JSON line per edit (flushed and
synced), so an interrupted run resumes where it stopped; the summary is written atomically.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from ..editing.base import Editor
from ..editing.scoring import (METRICS, REGION_METRICS, EditResult, answer_budget, pre_edit, probes,  # noqa: F401
                               quick_scores, score_applied, score_edit)  # (re-exported)
from ..io import write_json
from ..stats import bootstrap_ci
from ..viz.figures import plot_layer_sweep, plot_results  # noqa: F401 (re-exported)

IMAGE_FIELDS = ("image", "image_rephrase", "m_loc")
TARGET_FIELDS = ("alt", "loc_ans", "m_loc_a")


def _listing(problems: Sequence[str], most: int = 20) -> str:
    shown = ", ".join(problems[:most])
    return shown + (f" and {len(problems) - most} more" if len(problems) > most else "")


def check_records(records: Sequence, vllm=None, *, image_root_hint: str = "load_mmedit(..., image_root=)") -> None:
    """Refuse, before anything runs, records whose image files are missing or — with ``vllm`` — whose
    answers (``alt``, ``loc_ans``, ``m_loc_a``) the model's tokenizer cannot encode. One line names every
    bad record by index and field (the first 20 of them, and how many more)."""
    missing = [f"record {i} {field} ({getattr(r, field)})" for i, r in enumerate(records) for field in IMAGE_FIELDS
               if not Path(getattr(r, field)).is_file()]
    missing += [f"record {i} la_loc ({r.extra['la_loc']})" for i, r in enumerate(records)
                if "la_loc" in (getattr(r, "extra", {}) or {}) and not Path(r.extra["la_loc"]).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} image file(s) not found: {_listing(missing)} — check the paths "
                                f"and the image root ({image_root_hint})")
    if vllm is None:
        return
    bad = []
    for i, r in enumerate(records):
        for field in TARGET_FIELDS:
            try:
                vllm.encode_target(getattr(r, field))
            except ValueError:
                bad.append(f"record {i} {field} ({getattr(r, field)!r})")
    if bad:
        raise ValueError(f"the model's tokenizer cannot encode {len(bad)} answer(s): {_listing(bad)} — use a model "
                         "whose vocabulary covers them, or leave those records out")


@dataclasses.dataclass(frozen=True)
class EvalSummary:
    """Means over edits with 95 % bootstrap intervals, both scores; plus timing."""

    editor: str
    n: int
    token: dict
    token_ci: dict
    exact: dict
    exact_ci: dict
    edit_seconds_mean: float
    settings: dict
    run_seconds: float = 0.0
    forward_seconds: float = 0.0  # one full forward pass of the model on an edit input (median of 5)

    @property
    def mean(self) -> float:
        """Mean of the five token-accuracy metrics (the single number editors are ranked by)."""
        return float(np.mean([self.token[m] for m in METRICS]))

    @property
    def exact_mean(self) -> float:
        """Mean of the five exact-match metrics (reported beside :attr:`mean`)."""
        return float(np.mean([self.exact[m] for m in METRICS]))

    def to_dict(self) -> dict:
        """The ``evaluate --json`` schema: token accuracies at the top level (the five, then any region
        probes), exact match beside them."""
        return {"editor": self.editor, "n": self.n, **dict(self.token),
                "mean": round(self.mean, 4), "exact_match": dict(self.exact),
                "exact_match_mean": round(self.exact_mean, 4),
                "intervals": {"token": self.token_ci, "exact_match": self.exact_ci},
                "edit_seconds_mean": self.edit_seconds_mean, "forward_seconds": self.forward_seconds,
                "run_seconds": self.run_seconds,
                "settings": self.settings}

    @classmethod
    def from_dict(cls, d: dict) -> "EvalSummary":
        return cls(d["editor"], d["n"], {m: d[m] for m in METRICS + REGION_METRICS if m in d}, d["intervals"]["token"],
                   d["exact_match"],
                   d["intervals"]["exact_match"], d["edit_seconds_mean"], d.get("settings", {}),
                   d.get("run_seconds", 0.0), d.get("forward_seconds", 0.0))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "EvalSummary":
        return cls.from_dict(json.loads(Path(path).read_text()))

    @classmethod
    def from_results(cls, editor: str, results: Sequence[EditResult], settings: dict | None = None,
                     *, seed: int = 0) -> "EvalSummary":
        if not results:
            raise ValueError("no edit results to summarise")
        out = {}
        metrics = METRICS + tuple(m for m in REGION_METRICS if all(m in r.token for r in results))
        for kind in ("token", "exact"):
            arr = np.array([[getattr(r, kind)[m] for m in metrics] for r in results])
            mean, lo, hi = bootstrap_ci(arr, seed=seed)
            out[kind] = {m: round(float(v), 4) for m, v in zip(metrics, mean)}
            out[kind + "_ci"] = {m: [round(float(a), 4), round(float(b), 4)] for m, a, b in zip(metrics, lo, hi)}
        secs = round(float(np.mean([r.edit_seconds for r in results])), 4)
        run = round(float(sum(r.total_seconds for r in results)), 1)
        return cls(editor, len(results), out["token"], out["token_ci"], out["exact"], out["exact_ci"], secs,
                   dict(settings or {}), run)

    def table(self):
        """A two-row DataFrame (token accuracy, exact match) × the five metrics."""
        import pandas as pd

        return pd.DataFrame({"token accuracy": self.token, "exact match": self.exact}).T[list(self.token)]


def forward_seconds(vllm, record, *, repeats: int = 5) -> float:
    """Median wall time of one full forward pass on ``record``'s edit input (image + question + answer)."""
    inputs = vllm.inputs([(record.image, record.src, record.alt)])
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        vllm.logits(inputs)
        times.append(time.perf_counter() - start)
    return round(float(np.median(times)), 6)


def _fingerprint(records: Sequence) -> str:
    h = hashlib.sha256()
    for r in records:
        # a caption record also names its task (scored in another frame); E-VQA records hash as they always did
        task = "|caption" if getattr(r, "task", "vqa") == "caption" else ""
        h.update(f"{r.src}|{r.alt}|{Path(r.image).name}|{r.loc}|{Path(r.m_loc).name}{task}\n".encode())
    return h.hexdigest()[:16]


def _read_done(path: Path) -> list[EditResult]:
    """Rows already written; a truncated last line (a run killed mid-write) is dropped."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(EditResult.from_dict(json.loads(line)))
        except (json.JSONDecodeError, TypeError, KeyError):
            break
    return rows


def load_results(folder: str | os.PathLike) -> list[EditResult]:
    """The per-edit results (``edits.jsonl``) that ``evaluate(..., out=folder)`` wrote, in edit order."""
    path = Path(folder) / "edits.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: pass a folder written by `python -m visedit evaluate --out`")
    return [EditResult.from_dict(json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


@dataclasses.dataclass(frozen=True)
class PairedDifference:
    """A − B in the five-metric token mean (or in one ``metric``), paired by edit: its mean, 95 % bootstrap
    interval, and on how many edits A is better or worse."""

    a: str
    b: str
    n: int
    mean: float
    lo: float
    hi: float
    better: int
    worse: int
    metric: str = "mean"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        what = "five-metric mean" if self.metric == "mean" else self.metric
        return (f"{self.a} − {self.b}, {what}, paired by edit: {self.mean:+.4f} (95 % bootstrap "
                f"interval {self.lo:+.4f} to {self.hi:+.4f}); {self.a} better on {self.better} edits, "
                f"worse on {self.worse}")


def paired_difference(a: str | os.PathLike, b: str | os.PathLike, *, names: tuple[str, str] | None = None,
                      metric: str = "mean", n_boot: int = 2000, seed: int = 0) -> PairedDifference:
    """Compare two evaluation runs (folders written by ``evaluate --out``) edit by edit: A − B in each edit's
    mean over the five token metrics (``metric="mean"``) or in one token metric (e.g. ``"i_locality"``),
    with a percentile bootstrap interval over edits. Both runs must hold the same edits in the same order.
    ``names`` labels A and B (default: the folders' names)."""
    ra, rb = load_results(a), load_results(b)
    if [r.index for r in ra] != [r.index for r in rb]:
        raise ValueError(f"{a} and {b} do not hold the same edits in the same order: evaluate both editors "
                         f"on the same records")
    if metric != "mean":
        known = METRICS + REGION_METRICS
        if metric not in known:
            raise ValueError(f"unknown metric {metric!r}: use 'mean' (the five-metric mean) or one of {known}")
        if not all(metric in r.token for r in ra + rb):
            raise ValueError(f"{metric} is not scored in both runs (records of the world's second edition have "
                             f"it); compare by 'mean' instead")

    def score(r) -> float:
        return float(np.mean([r.token[m] for m in METRICS])) if metric == "mean" else float(r.token[metric])

    diff = np.array([score(x) - score(y) for x, y in zip(ra, rb)])
    mean, lo, hi = bootstrap_ci(diff, n_boot=n_boot, seed=seed)
    name_a, name_b = names or (Path(a).name, Path(b).name)
    return PairedDifference(name_a, name_b, len(diff), round(float(mean), 6), round(float(lo), 6),
                            round(float(hi), 6), int((diff > 0).sum()), int((diff < 0).sum()), metric)


def evaluate(editor: Editor, records: Sequence, *, out: str | os.PathLike | None = None, resume: bool = True,
             progress: bool = True, shard: tuple[int, int] | None = None) -> EvalSummary:
    """Run the single-edit protocol over ``records``.

    With ``out`` (a folder): ``run.json`` (what is evaluated: editor, settings, records and the model's name
    and ``fingerprint``), ``edits.jsonl`` (one line per edit, synced
    as it is written) and ``summary.json`` (atomic). A folder holding an interrupted run with the same
    settings is resumed; one holding a different run is an error (pass another ``out`` or
    ``resume=False`` to start over). Records are checked first (:func:`check_records`); a run that fails or
    is interrupted before its first edit leaves no ``run.json`` behind.

    ``shard=(i, k)``: this process takes every k-th edit (i, i + k, …; rows keep their index among all the
    records) and writes its run to ``out/shard-i-of-k/``; :func:`~visedit.evaluation.merge_shards` makes
    one run of the k shards (see :mod:`visedit.evaluation.shards`). The summary returned is the shard's.
    """
    from tqdm.auto import tqdm

    from .shards import shard_folder, shard_indices

    if len(records) == 0:
        raise ValueError("no records to evaluate: pass at least one MMEdit record")
    indices = list(range(len(records))) if shard is None else shard_indices(len(records), shard)
    check_records(records, editor.vllm)
    settings = {"editor": editor.name, "config": json.loads(json.dumps(dataclasses.asdict(editor.config))),
                "model": editor.vllm.name, "model_fingerprint": editor.vllm.fingerprint, "n": len(records),
                "records": _fingerprint(records)}
    if shard is not None:
        settings["shard"] = "{}/{}".format(*shard)
        out = shard_folder(out, shard) if out is not None else None
    done: list[EditResult] = []
    jsonl = None
    new_folder = new_run = False
    if out is not None:
        out = Path(out)
        new_folder, new_run = open_run(out, settings, editor, resume=resume)
        jsonl = out / "edits.jsonl"
        done = [] if new_run else _read_done(jsonl)
        _rewrite(jsonl, done)  # drops a truncated last line, if any
    results = list(done)
    handle = open(jsonl, "a") if jsonl is not None else None
    try:
        for i in tqdm(indices[len(done):], desc=f"evaluate {editor.name}" + (" (shard {}/{})".format(*shard)
                      if shard is not None else ""), disable=not progress, initial=len(done), total=len(indices)):
            result = score_edit(editor, records[i], index=i)
            results.append(result)
            if handle is not None:
                append_line(handle, result.to_dict())
    except BaseException:
        if new_run and not results:  # a run that failed before its first edit leaves nothing behind
            handle.close()
            discard_run(out, new_folder, ["edits.jsonl"])
        raise
    finally:
        if handle is not None:
            handle.close()
    summary = EvalSummary.from_results(editor.name, results, settings)
    summary = dataclasses.replace(summary, forward_seconds=forward_seconds(editor.vllm, records[indices[0]]))
    if out is not None:
        write_json(out / "summary.json", summary.to_dict())
    return summary


def open_run(out: Path, settings: dict, editor: Editor, *, resume: bool) -> tuple[bool, bool]:
    """Make the results folder ``out`` and write ``run.json``; returns (the folder is new, the run is new).
    A folder holding another run is refused (settings added to the editor's config since that run was
    written count as equal while they hold their defaults)."""
    new_folder = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    run_file = out / "run.json"
    new_run = not (resume and run_file.exists())
    if not new_run:
        previous = json.loads(run_file.read_text())
        defaults = dataclasses.asdict(type(editor.config)())
        if isinstance(previous.get("config"), dict) and isinstance(settings.get("config"), dict):
            previous["config"] = {**{k: v for k, v in defaults.items() if k not in previous["config"]
                                     and settings["config"].get(k) == v}, **previous["config"]}
        if previous != settings:
            differs = sorted(k for k in settings.keys() | previous.keys() if previous.get(k) != settings.get(k))
            raise ValueError(f"{out} holds a different evaluation run ({previous.get('editor')}, "
                             f"n={previous.get('n')}; differs in {', '.join(differs)}): pass another output "
                             f"folder or resume=False / --fresh")
    write_json(run_file, settings)
    return new_folder, new_run


def discard_run(out: Path, new_folder: bool, files: Sequence[str]) -> None:
    """Remove what a run that failed before its first edit wrote: ``run.json`` and ``files`` (and the
    folder, if the run made it and it is now empty)."""
    for name in ("run.json", *files):
        (out / name).unlink(missing_ok=True)
    if new_folder and not any(out.iterdir()):
        out.rmdir()


def append_line(handle, row: dict) -> None:
    """Append one JSON line and make it durable (flushed and synced)."""
    handle.write(json.dumps(row, sort_keys=True) + "\n")
    handle.flush()
    os.fsync(handle.fileno())


def _rewrite(path: Path, rows: Sequence[EditResult]) -> None:
    from ..io import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(r.to_dict(), sort_keys=True) + "\n" for r in rows))


def results_table(summaries: Sequence[EvalSummary], *, score: str = "token"):
    """One row per editor, the five metrics and their mean (``score``: ``"token"`` or ``"exact"``), then the
    region probes (in-image and look-alike locality, outside the mean) when every run scored them."""
    import pandas as pd

    if score not in ("token", "exact"):
        raise ValueError(f"score must be 'token' or 'exact', got {score!r}")
    region = [m for m in REGION_METRICS if all(m in getattr(s, score) for s in summaries)]
    rows = []
    for s in summaries:
        values = getattr(s, score)
        rows.append({"editor": s.editor, "n": s.n, **{m: values[m] for m in METRICS},
                     "mean": round(s.mean if score == "token" else s.exact_mean, 4),
                     **{m: values[m] for m in region}, "edit s": s.edit_seconds_mean})
    return pd.DataFrame(rows).set_index("editor")
