"""Evaluation sharded over processes, and the merge that makes one run of the shards.

Process i of k takes every k-th edit (edits i, i + k, i + 2k, … of the records) and writes its own
resumable run to ``OUT/shard-i-of-k/`` (``run.json`` with ``"shard": "i/k"``, ``edits.jsonl``,
``summary.json``), exactly as :func:`~visedit.evaluation.evaluate` writes a whole run. The shard comes
from ``--shard i/k`` or, under ``torchrun`` / ``accelerate launch``, from the ``RANK`` and ``WORLD_SIZE``
environment variables. :func:`merge_shards` then writes ``OUT/run.json``, ``OUT/edits.jsonl`` and
``OUT/summary.json`` — the files one process would have written for the whole run (per-edit rows equal
but for their timings) — refusing in one line a missing or unfinished shard, shards of different runs,
and shards that overlap.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

_FOLDER = re.compile(r"shard-(\d+)-of-(\d+)")


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/k"`` → (i, k) with 0 ≤ i < k; a one-line error otherwise."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if match is None:
        raise ValueError(f"--shard must be i/k (this process takes edits i, i + k, …; 0 ≤ i < k), got {text!r}")
    return check_shard((int(match.group(1)), int(match.group(2))))


def check_shard(shard) -> tuple[int, int]:
    """(i, k) as ints with k ≥ 1 and 0 ≤ i < k; a one-line error otherwise."""
    try:
        i, k = (int(x) for x in shard)
    except (TypeError, ValueError):
        raise ValueError(f"shard must be (i, k) — process i of k — got {shard!r}") from None
    if k < 1 or not 0 <= i < k:
        raise ValueError(f"shard {i}/{k} is out of range: process i of k needs 0 ≤ i < k (e.g. 0/2 and 1/2)")
    return i, k


def shard_from_env(environ=os.environ) -> tuple[int, int] | None:
    """(RANK, WORLD_SIZE) as set by ``torchrun`` and ``accelerate launch``; None for a single process."""
    if "WORLD_SIZE" not in environ:
        return None
    try:
        k, i = int(environ["WORLD_SIZE"]), int(environ.get("RANK", "0"))
    except ValueError:
        raise ValueError(f"RANK={environ.get('RANK')!r} and WORLD_SIZE={environ.get('WORLD_SIZE')!r} must be "
                         "integers (as torchrun sets them)") from None
    return check_shard((i, k)) if k > 1 else None


def shard_folder(out: str | os.PathLike, shard: tuple[int, int]) -> Path:
    """Where process i of k writes its run: ``OUT/shard-i-of-k``."""
    i, k = shard
    return Path(out) / f"shard-{i}-of-{k}"


def shard_indices(n: int, shard: tuple[int, int]) -> list[int]:
    """The edits process i of k takes among ``n``: i, i + k, i + 2k, …; refused when there are none."""
    i, k = check_shard(shard)
    if i >= n:
        raise ValueError(f"shard {i}/{k} gets no edit of {n}: run at most {n} shards")
    return list(range(i, n, k))


def merge_shards(folder: str | os.PathLike):
    """Merge the shards in ``folder`` (``shard-i-of-k/`` written by ``evaluate(..., shard=(i, k))``) into
    ``run.json``, ``edits.jsonl`` and ``summary.json`` there, as one process would have written them; returns
    the :class:`~visedit.evaluation.EvalSummary`. Refused in one line: no shard, a missing or unfinished
    shard, shards of different runs (settings), shards that overlap (two ways of splitting, or an edit in
    two shards), or a folder that already holds another run."""
    from ..io import atomic_path, write_json
    from .protocol import EvalSummary, _read_done

    folder = Path(folder)
    found = {}
    for path in sorted(folder.glob("shard-*-of-*")):
        match = _FOLDER.fullmatch(path.name)
        if match and (path / "run.json").exists():
            found[int(match.group(1)), int(match.group(2))] = path
    if not found:
        raise FileNotFoundError(f"no shards in {folder}: run `python -m visedit evaluate … --shard i/k --out "
                                f"{folder}` in each of k processes first")
    splits = sorted({k for _, k in found})
    if len(splits) > 1:
        a, b = (next(f"{i}/{k}" for i, kk in sorted(found) if kk == k) for k in splits[:2])
        raise ValueError(f"the shards in {folder} overlap: some split the edits {splits[0]} ways and some "
                         f"{splits[1]} ways (shards {a} and {b}); remove the folders of the split you do not want")
    k = splits[0]
    missing = [i for i in range(k) if (i, k) not in found]
    if missing:
        raise ValueError(f"shard {missing[0]}/{k} is missing from {folder}{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}: "
                         f"run `python -m visedit evaluate … --shard {missing[0]}/{k} --out {folder}` with the same "
                         "options as the others, then merge")
    runs = {i: json.loads((found[i, k] / "run.json").read_text()) for i in range(k)}
    settings = {key: v for key, v in runs[0].items() if key != "shard"}
    for i in range(k):
        if runs[i].get("shard") != f"{i}/{k}":
            raise ValueError(f"the shards in {folder} overlap: folder shard-{i}-of-{k} holds shard "
                             f"{runs[i].get('shard')!r} of a run; remove it or run shard {i}/{k} into it again")
        other = {key: v for key, v in runs[i].items() if key != "shard"}
        if other != settings:
            differs = sorted(key for key in other.keys() | settings.keys() if other.get(key) != settings.get(key))
            raise ValueError(f"the shards in {folder} are of different runs: shard {i}/{k} differs from shard 0/{k} "
                             f"in {', '.join(differs)}; evaluate every shard with the same options (--fresh to redo one)")
    n = settings["n"]
    rows = []
    for i in range(k):
        done = _read_done(found[i, k] / "edits.jsonl")
        mine = list(range(i, n, k))
        got = [r.index for r in done]
        if got != mine[: len(got)] or len(got) > len(mine):
            stray = next(x for x in got if x not in mine) if set(got) - set(mine) else got[0]
            raise ValueError(f"the shards in {folder} overlap: shard {i}/{k} holds edit {stray}, which is not one of "
                             f"its own ({i}, {i + k}, …); evaluate it again with --fresh")
        if len(got) < len(mine):
            raise ValueError(f"shard {i}/{k} in {folder} holds {len(got)} of its {len(mine)} edits: resume it (run "
                             "its evaluate command again) before merging")
        rows += done
    rows.sort(key=lambda r: r.index)
    run_file = folder / "run.json"
    if run_file.exists() and json.loads(run_file.read_text()) != settings:
        raise ValueError(f"{folder} already holds another evaluation run (run.json): merge the shards into a "
                         "folder of their own")
    summary = EvalSummary.from_results(settings["editor"], rows, settings)
    first = found[0, k] / "summary.json"  # shard 0 timed the forward pass on edit 0, as one process does
    if first.exists():
        import dataclasses

        summary = dataclasses.replace(summary, forward_seconds=json.loads(first.read_text()).get("forward_seconds", 0.0))
    write_json(run_file, settings)
    with atomic_path(folder / "edits.jsonl") as tmp:
        tmp.write_text("".join(json.dumps(r.to_dict(), sort_keys=True) + "\n" for r in rows))
    write_json(folder / "summary.json", summary.to_dict())
    return summary
