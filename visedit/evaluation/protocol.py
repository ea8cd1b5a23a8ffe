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

from ..editing.base import EditRequest, Editor
from ..io import write_json
from ..stats import bootstrap_ci

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


def quick_scores(editor: Editor, records: Sequence) -> dict[str, float]:
    """Mean token-accuracy metrics (and their mean) over ``records``, without writing anything."""
    rows = [score_edit(editor, r, index=i, exact=False).token for i, r in enumerate(records)]
    out = {m: float(np.mean([r[m] for r in rows])) for m in METRICS}
    out["mean"] = float(np.mean(list(out.values())))
    return out


def _fingerprint(records: Sequence) -> str:
    h = hashlib.sha256()
    for r in records:
        h.update(f"{r.src}|{r.alt}|{Path(r.image).name}|{r.loc}|{Path(r.m_loc).name}\n".encode())
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
    """A − B in the five-metric token mean, paired by edit: its mean, 95 % bootstrap interval, and on how
    many edits A is better or worse."""

    a: str
    b: str
    n: int
    mean: float
    lo: float
    hi: float
    better: int
    worse: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        return (f"{self.a} − {self.b}, five-metric mean, paired by edit: {self.mean:+.4f} (95 % bootstrap "
                f"interval {self.lo:+.4f} to {self.hi:+.4f}); {self.a} better on {self.better} edits, "
                f"worse on {self.worse}")


def paired_difference(a: str | os.PathLike, b: str | os.PathLike, *, names: tuple[str, str] | None = None,
                      n_boot: int = 2000, seed: int = 0) -> PairedDifference:
    """Compare two evaluation runs (folders written by ``evaluate --out``) edit by edit: A − B in each edit's
    mean over the five token metrics, with a percentile bootstrap interval over edits. Both runs must
    hold the same edits in the same order. ``names`` labels A and B (default: the folders' names)."""
    ra, rb = load_results(a), load_results(b)
    if [r.index for r in ra] != [r.index for r in rb]:
        raise ValueError(f"{a} and {b} do not hold the same edits in the same order: evaluate both editors "
                         f"on the same records")
    diff = np.array([np.mean([x.token[m] for m in METRICS]) - np.mean([y.token[m] for m in METRICS])
                     for x, y in zip(ra, rb)])
    mean, lo, hi = bootstrap_ci(diff, n_boot=n_boot, seed=seed)
    name_a, name_b = names or (Path(a).name, Path(b).name)
    return PairedDifference(name_a, name_b, len(diff), round(float(mean), 6), round(float(lo), 6),
                            round(float(hi), 6), int((diff > 0).sum()), int((diff < 0).sum()))


def evaluate(editor: Editor, records: Sequence, *, out: str | os.PathLike | None = None, resume: bool = True,
             progress: bool = True) -> EvalSummary:
    """Run the single-edit protocol over ``records``.

    With ``out`` (a folder): ``run.json`` (what is evaluated: editor, settings, records and the model's name
    and ``fingerprint``), ``edits.jsonl`` (one line per edit, synced
    as it is written) and ``summary.json`` (atomic). A folder holding an interrupted run with the same
    settings is resumed; one holding a different run is an error (pass another ``out`` or
    ``resume=False`` to start over). Records are checked first (:func:`check_records`); a run that fails or
    is interrupted before its first edit leaves no ``run.json`` behind.
    """
    from tqdm.auto import tqdm

    if len(records) == 0:
        raise ValueError("no records to evaluate: pass at least one MMEdit record")
    check_records(records, editor.vllm)
    settings = {"editor": editor.name, "config": json.loads(json.dumps(dataclasses.asdict(editor.config))),
                "model": editor.vllm.name, "model_fingerprint": editor.vllm.fingerprint, "n": len(records),
                "records": _fingerprint(records)}
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
        for i in tqdm(range(len(done), len(records)), desc=f"evaluate {editor.name}", disable=not progress,
                      initial=len(done), total=len(records)):
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
    summary = dataclasses.replace(summary, forward_seconds=forward_seconds(editor.vllm, records[0]))
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
    """One row per editor, the five metrics and their mean (``score``: ``"token"`` or ``"exact"``)."""
    import pandas as pd

    if score not in ("token", "exact"):
        raise ValueError(f"score must be 'token' or 'exact', got {score!r}")
    rows = []
    for s in summaries:
        values = getattr(s, score)
        rows.append({"editor": s.editor, "n": s.n, **{m: values[m] for m in METRICS},
                     "mean": round(s.mean if score == "token" else s.exact_mean, 4),
                     "edit s": s.edit_seconds_mean})
    return pd.DataFrame(rows).set_index("editor")


def plot_results(summaries: Sequence[EvalSummary], *, score: str = "token"):
    """Seaborn bar chart: metric × editor with the bootstrap intervals. Returns the matplotlib figure."""
    import matplotlib.pyplot as plt
    import pandas as pd
    import seaborn as sns

    rows = []
    for s in summaries:
        values, ci = getattr(s, score), getattr(s, score + "_ci")
        for m in METRICS:
            rows.append({"editor": s.editor, "metric": m, "value": values[m], "lo": ci[m][0], "hi": ci[m][1]})
    df = pd.DataFrame(rows)
    fig, ax = plt.subplots(figsize=(9, 3.6))
    sns.barplot(df, x="metric", y="value", hue="editor", ax=ax, errorbar=None)
    for bar_group, (_, sub) in zip(ax.containers, df.groupby("editor", sort=False)):
        xs = [b.get_x() + b.get_width() / 2 for b in bar_group]
        ax.errorbar(xs, sub["value"], yerr=[sub["value"] - sub["lo"], sub["hi"] - sub["value"]], fmt="none",
                    ecolor="black", elinewidth=0.8, capsize=2)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("token accuracy" if score == "token" else "exact match")
    ax.legend(ncol=len(summaries), fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    fig.tight_layout()
    plt.close(fig)
    return fig


def plot_layer_sweep(rows: Sequence[dict], profile=None):
    """The layer sweep of an editor that sits at one layer (``sweep-vead`` rows: ``layer``, ``at`` and the
    token-accuracy metrics), drawn against a :class:`~visedit.attribution.ContributionProfile` (attention
    and MLP contribution per layer) when given. Rows at the output of layer l are drawn at the input of
    l + 1 (the same stream). Returns the matplotlib figure."""
    import matplotlib.pyplot as plt
    import pandas as pd
    import seaborn as sns

    if not rows:
        raise ValueError("no sweep rows given: pass the JSON rows written by `python -m visedit sweep-vead`")
    df = pd.DataFrame([{"into layer": r["layer"] + (0 if r.get("at", "output") == "input" else 1),
                        "IM": ("no IM" if not r.get("use_im", True) else "IM reads the edit image"
                               if r.get("im_reads") == "image" else "IM reads the prompt"),
                        **{m: r[m] for m in (*METRICS, "mean")}} for r in rows])
    long = df.melt(id_vars=["into layer", "IM"], value_vars=["reliability", "m_generality", "m_locality", "mean"],
                   var_name="metric", value_name="token accuracy")
    panels = 2 if profile is not None else 1
    fig, axes = plt.subplots(panels, 1, figsize=(8, 3.0 * panels), sharex=True, squeeze=False)
    ax = axes[0, 0]
    sns.lineplot(long, x="into layer", y="token accuracy", hue="metric", style="IM", markers=True, ax=ax)
    ax.set_ylim(0, 1.05)
    ax.set_title("editor trained at the stream entering layer l")
    ax.legend(fontsize=7, ncol=2, frameon=False)
    if profile is not None:
        attn, mlp = list(profile.mean["attn"]), list(profile.mean["mlp"])
        contrib = pd.DataFrame({"layer": list(range(len(attn))) + list(range(len(mlp))),
                                "module": ["attention"] * len(attn) + ["MLP"] * len(mlp),
                                "contribution": attn + mlp})
        ax2 = axes[1, 0]
        sns.barplot(contrib, x="layer", y="contribution", hue="module", ax=ax2, native_scale=True)
        ax2.set_title(f"contribution of each layer's modules to the answer (paper formula, {profile.n} records)")
        ax2.set_xlabel("layer l")
        ax2.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    plt.close(fig)
    return fig
