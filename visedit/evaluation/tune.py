"""Choosing an editor's hyperparameters on the *train* split (never on eval): a small grid search."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Mapping, Sequence

from .protocol import METRICS, quick_scores


@dataclasses.dataclass(frozen=True)
class TuneResult:
    """Every grid point's mean token-accuracy metrics; ``best`` maximises the mean of the five."""

    editor: str
    n: int
    rows: tuple[dict, ...]

    @property
    def best(self) -> dict:
        return max(self.rows, key=lambda r: r["mean"])["settings"]

    def to_dict(self) -> dict:
        return {"editor": self.editor, "n": self.n, "best": self.best, "rows": list(self.rows)}

    def table(self):
        import pandas as pd

        return pd.DataFrame([{**r["settings"], **{m: r[m] for m in (*METRICS, "mean")}} for r in self.rows])


def tune(name: str, vllm, records: Sequence, grid: Mapping[str, Sequence], *, progress: bool = True) -> TuneResult:
    """Score editor ``name`` at every combination of ``grid`` (setting → values) on ``records``.

    Pass train-split records: the eval split is for reporting only.
    """
    from tqdm.auto import tqdm

    from ..editing import get_editor

    if not grid or not all(isinstance(v, (list, tuple)) and v for v in grid.values()):
        raise ValueError("grid must map each setting to a non-empty list of values, e.g. {'lr': [1e-3, 1e-4]}")
    keys = list(grid)
    rows = []
    for values in tqdm(list(itertools.product(*(grid[k] for k in keys))), desc=f"tune {name}", disable=not progress):
        settings = dict(zip(keys, values))
        scores = quick_scores(get_editor(name, vllm, **settings), records)
        rows.append({"settings": settings, **{k: round(v, 4) for k, v in scores.items()}})
    return TuneResult(name, len(records), tuple(rows))
