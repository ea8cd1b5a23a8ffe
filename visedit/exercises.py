"""Checks for the book's implement-it-yourself exercises.

Each chapter asks the reader to write one small piece of the method — a patch grid's coverage, the
contribution formula, one noise window, the lift of a heatmap, the influence mapper's gate, token
accuracy, a rank correlation, the early share of a contribution profile — and hands the function to a
check here::

    from visedit import exercises
    def window(grid, token, radius): ...
    exercises.check_window(window)      # prints "right — …" or "wrong — … (why)"

A check runs the reader's function on seeded cases, including the edge cases where mistakes hide,
compares it with the library's own computation, and says in one line what is right or, when it is
wrong, on which case and — where the mistake is a common one — why. It returns a :class:`Check`
(``bool(check)`` is whether it passed) and never raises on the reader's behalf.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np
import torch

__all__ = ["Check", "check_patch_coverage", "check_contribution", "check_window", "check_lift", "check_gate",
           "check_token_accuracy", "check_rank_correlation", "check_early_share", "check_route", "reference"]


@dataclasses.dataclass(frozen=True)
class Check:
    """The verdict on one exercise: ``ok`` and one line that says why."""

    exercise: str
    ok: bool
    message: str

    def __bool__(self) -> bool:
        return self.ok

    def __str__(self) -> str:
        return f"{self.exercise}: {'right' if self.ok else 'wrong'} — {self.message}"

    __repr__ = __str__

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _as_array(value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().double().numpy()
    return np.asarray(value, dtype=float)


def _call(exercise: str, fn: Callable, *args):
    """(result, None) or (None, Check) when the reader's function is not callable, raises or returns None."""
    if not callable(fn):
        return None, Check(exercise, False, f"expected a function, got {type(fn).__name__}; pass the function itself "
                                            "(no parentheses)")
    try:
        out = fn(*args)
    except NotImplementedError:
        return None, Check(exercise, False, "not written yet: the function raises NotImplementedError; complete its body")
    except Exception as err:  # the reader's code: report, never raise
        return None, Check(exercise, False, f"the function raised {type(err).__name__}: {err}")
    if out is None:
        return None, Check(exercise, False, "not written yet: the function returns None; complete its body")
    return out, None


def _compare(exercise: str, got, want: np.ndarray, case: str, *, atol: float = 1e-6,
             diagnoses: tuple[tuple[np.ndarray, str], ...] = ()) -> Check | None:
    """None when ``got`` equals ``want``; otherwise the verdict, naming a known mistake when ``got``
    equals one of ``diagnoses``' wrong answers."""
    try:
        got = _as_array(got)
    except (TypeError, ValueError):
        return Check(exercise, False, f"on {case} the function returned {type(got).__name__}, not an array of numbers")
    if got.shape != want.shape:
        if got.size == want.size:
            got = got.reshape(want.shape)
        else:
            return Check(exercise, False, f"on {case} the result has shape {tuple(got.shape)}; expected "
                                          f"{tuple(want.shape)}")
    if np.allclose(got, want, atol=atol, rtol=1e-5):
        return None
    for wrong, why in diagnoses:
        if wrong.shape == want.shape and np.allclose(got, wrong, atol=atol, rtol=1e-5):
            return Check(exercise, False, f"on {case}: {why}")
    k = int(np.argmax(np.abs(got - want).ravel()))
    return Check(exercise, False, f"on {case} entry {np.unravel_index(k, want.shape)} is {got.ravel()[k]:.6g}, "
                                  f"expected {want.ravel()[k]:.6g}")


# ----------------------------------------------------------------------------------------------- references
class reference:
    """The library's answers, written out plainly (each equals the function the library uses)."""

    @staticmethod
    def route(V: np.ndarray, keys: np.ndarray) -> np.ndarray:
        from .editing.vead.memory import nearest

        unit = torch.nn.functional.normalize(torch.as_tensor(keys, dtype=torch.float64), dim=-1).float()  # visual_keys
        return nearest(torch.as_tensor(V, dtype=torch.float64), unit).numpy()

    @staticmethod
    def patch_coverage(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
        from .attribution.regions import patch_coverage
        return patch_coverage(mask, grid)

    @staticmethod
    def contribution(v: np.ndarray, p: np.ndarray, alpha: float) -> np.ndarray:
        from .attribution.contributions import paper_score
        return paper_score(torch.as_tensor(v, dtype=torch.float64), torch.as_tensor(p, dtype=torch.float64),
                           alpha).numpy()

    @staticmethod
    def window(grid: tuple[int, int], token: int, radius: int) -> np.ndarray:
        from .attribution.tracing import windows
        rows, cols = grid
        return windows(rows * cols, grid, radius)[token].numpy().reshape(grid)

    @staticmethod
    def lift(heatmap: np.ndarray, mask: np.ndarray) -> float:
        from .attribution.regions import score_heatmap
        return score_heatmap(heatmap, mask).lift

    @staticmethod
    def gate(v: np.ndarray, q: np.ndarray, heads: int) -> np.ndarray:
        v, q = np.asarray(v, float), np.asarray(q, float)
        N, d = v.shape
        per_head = (v.reshape(N, heads, d // heads) * q.reshape(1, heads, d // heads)).sum(-1)
        return 1 / (1 + np.exp(-per_head.mean(-1) / math.sqrt(d / heads)))

    @staticmethod
    def token_accuracy(logits: np.ndarray, ids: np.ndarray, n_target: int) -> float:
        logits, ids = np.asarray(logits), np.asarray(ids)
        L = len(ids)
        return float((logits[L - n_target - 1: L - 1].argmax(-1) == ids[L - n_target:]).mean())

    @staticmethod
    def early_share(per_layer: np.ndarray) -> float:
        from .attribution.contributions import early_share
        return early_share(per_layer)

    @staticmethod
    def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
        from .stats import rank_correlation
        return rank_correlation(a, b)


# ----------------------------------------------------------------------------------------------- checks
def check_patch_coverage(fn: Callable) -> Check:
    """Chapter 1. ``fn(mask, grid)``: mask an H×W bool array, grid (rows, cols) → (rows, cols) array of
    the share of each patch's pixels on the object."""
    name = "patch coverage"
    rng = np.random.default_rng(1)
    cases = []
    mask = np.zeros((80, 80), bool)
    mask[12:30, 44:70] = True
    cases.append((mask, (10, 10), "a 80×80 mask with one rectangle on a 10×10 grid"))
    mask = rng.random((48, 96)) < 0.3
    cases.append((mask, (6, 12), "a 48×96 random mask on a 6×12 grid (more columns than rows)"))
    for mask, grid, case in cases:
        got, bad = _call(name, fn, mask.copy(), grid)
        if bad is not None:
            return bad
        want = reference.patch_coverage(mask, grid)
        rows, cols = grid
        counts = want * (mask.shape[0] // rows) * (mask.shape[1] // cols)
        swapped = mask.reshape(rows, mask.shape[0] // rows, cols, -1).mean((1, 3)).T.copy()
        wrong = _compare(name, got, want, case, diagnoses=(
            (counts, "these are pixel counts; divide by the pixels in a patch to get shares in [0, 1]"),
            (swapped, "rows and columns are swapped: the first axis of the grid is rows (y)")))
        if wrong is not None:
            return wrong
    return Check(name, True, "every patch's share matches, on a square and on a wide grid")


def check_contribution(fn: Callable) -> Check:
    """Chapter 2. ``fn(v, p, alpha)``: v the logit-lens value of the predicted token for every
    (layer, module), p its probability → the paper's score ``c = sign(v)·(|v|/M)^(1−α)·p^α``, ``M = max |v|``."""
    name = "contribution formula"
    rng = np.random.default_rng(2)
    v = rng.normal(0, 3, size=(8, 2))
    p = rng.uniform(0, 1, size=(8, 2))
    for alpha in (0.5, 0.0, 1.0, 0.25):
        case = f"8 layers × 2 modules with α = {alpha}"
        got, bad = _call(name, fn, v.copy(), p.copy(), alpha)
        if bad is not None:
            return bad
        want = reference.contribution(v, p, alpha)
        M = np.abs(v).max()
        wrong = _compare(name, got, want, case, diagnoses=(
            (np.abs(want), "the sign of v is lost: c takes sign(v), so modules that push the answer down score < 0"),
            (np.sign(v) * (np.abs(v) / M) ** alpha * p ** (1 - alpha),
             "the exponents are swapped: |v|/M takes 1 − α and p takes α"),
            (np.sign(v) * (np.abs(v) / np.abs(v).max(0, keepdims=True)) ** (1 - alpha) * p ** alpha,
             "M is the largest |v| over all layers *and* modules, not per module"),
            (np.sign(v) * np.abs(v) ** (1 - alpha) * p ** alpha, "|v| is not divided by M")))
        if wrong is not None and not (alpha == 0.5 and "swapped" in wrong.message):
            return wrong
    return Check(name, True, "c matches for α = 0, 0.25, 0.5 and 1, with negative values")


def check_window(fn: Callable) -> Check:
    """Chapter 3. ``fn(grid, token, radius)``: the (rows, cols) bool mask of the noise window centred on
    visual token ``token`` (row-major), (2·radius+1)² tokens clipped at the grid's borders."""
    name = "noise window"
    cases = [((10, 10), 55, 1, "token 55 of a 10×10 grid, radius 1 (inside)"),
             ((10, 10), 0, 1, "token 0 (the top-left corner) of a 10×10 grid, radius 1"),
             ((10, 10), 49, 2, "token 49 (row 4, column 9: the right border) of a 10×10 grid, radius 2"),
             ((4, 6), 13, 1, "token 13 of a 4×6 grid (4 rows, 6 columns), radius 1"),
             ((24, 24), 300, 0, "token 300 of LLaVA-1.5's 24×24 grid, radius 0")]
    for grid, token, radius, case in cases:
        got, bad = _call(name, fn, grid, token, radius)
        if bad is not None:
            return bad
        want = reference.window(grid, token, radius).astype(float)
        rows, cols = grid
        wrapped = np.zeros(rows * cols)
        r, c = divmod(token, cols)
        for dr in range(-radius, radius + 1):
            for dc in range(-radius, radius + 1):
                wrapped[((r + dr) * cols + (c + dc)) % (rows * cols)] = 1
        swapped = np.zeros(grid)
        c2, r2 = divmod(token, rows)
        if r2 < rows and c2 < cols:
            swapped[max(r2 - radius, 0): r2 + radius + 1, max(c2 - radius, 0): c2 + radius + 1] = 1
        half = np.zeros(grid)
        half[max(r - radius, 0): r + radius, max(c - radius, 0): c + radius] = 1
        if isinstance(got, torch.Tensor):
            got = got.float()
        elif isinstance(got, np.ndarray) and got.dtype == bool:
            got = got.astype(float)
        wrong = _compare(name, got, want, case, diagnoses=(
            (wrapped.reshape(grid), "the window wraps around the border; clip it at the grid's edges instead"),
            (swapped, "token t sits at row t // cols and column t % cols (row-major), not t // rows"),
            (half, "a window of radius r spans 2r + 1 tokens a side: slice up to r + 1 past the centre")))
        if wrong is not None:
            return wrong
    return Check(name, True, "every window matches, inside, at a corner, at a border, on a wide grid and at radius 0")


def check_lift(fn: Callable) -> Check:
    """Chapter 4. ``fn(heatmap, mask)``: heatmap (rows, cols), mask H×W bool → the lift: the share of
    the heatmap's positive mass on the object (patches weighted by coverage) ÷ the object's area share."""
    name = "lift"
    rng = np.random.default_rng(4)
    mask = np.zeros((80, 80), bool)
    mask[20:44, 8:36] = True
    heatmaps = [("a random signed heatmap", rng.normal(size=(10, 10))),
                ("a heatmap hot on the object", reference.patch_coverage(mask, (10, 10)) * 3 + rng.normal(0, 0.1, (10, 10))),
                ("a non-negative heatmap", rng.uniform(0, 1, (10, 10)))]
    for case, h in heatmaps:
        got, bad = _call(name, fn, h.copy(), mask.copy())
        if bad is not None:
            return bad
        want = np.array(reference.lift(h, mask))
        cover = reference.patch_coverage(mask, (10, 10))
        area = mask.mean()
        unclipped = np.array((h * cover).sum() / h.sum() / area)
        share = np.array(np.clip(h, 0, None).dot(cover.ravel()).sum() / np.clip(h, 0, None).sum()
                         if h.ndim == 1 else (np.clip(h, 0, None) * cover).sum() / np.clip(h, 0, None).sum())
        wrong = _compare(name, got, want, case, diagnoses=(
            (unclipped, "negative values were kept; the lift counts only positive mass (clip at 0)"),
            (share, "this is the share of mass on the object; divide by the object's area share (lift 1 = chance)")))
        if wrong is not None:
            return wrong
    return Check(name, True, "the lift matches on a signed, an object-centred and a non-negative heatmap")


def check_gate(fn: Callable) -> Check:
    """Chapter 5. ``fn(v, q, heads)``: v (N, d) visual states and q (d,) the prompt state, both already
    through the influence mapper's MLPs → (N,) gate values sigmoid(mean over heads of vₕ·qₕ / √(d/h))."""
    name = "influence-mapper gate"
    rng = np.random.default_rng(5)
    for N, d, heads in ((100, 32, 4), (7, 12, 3), (5, 8, 1)):
        v, q = rng.normal(size=(N, d)), rng.normal(size=d)
        case = f"{N} tokens, d = {d}, {heads} head{'s' if heads > 1 else ''}"
        got, bad = _call(name, fn, v.copy(), q.copy(), heads)
        if bad is not None:
            return bad
        want = reference.gate(v, q, heads)
        per_head = (v.reshape(N, heads, -1) * q.reshape(1, heads, -1)).sum(-1)
        sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
        wrong = _compare(name, got, want, case, diagnoses=(
            (per_head.mean(-1) / math.sqrt(d / heads), "these are the logits s; the gate is sigmoid(s), in (0, 1)"),
            (sig(per_head.mean(-1)), "the score is scaled by 1/√(d/h), as in attention"),
            (sig(per_head.sum(-1) / math.sqrt(d / heads)), "the heads' scores are averaged, not summed"),
            (sig(v @ q / math.sqrt(d)), "the score is computed per head (d/h dimensions each) and averaged over heads")))
        if wrong is not None and not (heads == 1 and "per head" in wrong.message):
            return wrong
    return Check(name, True, "the gate matches for 4, 3 and 1 heads")


def check_token_accuracy(fn: Callable) -> Check:
    """Chapter 6. ``fn(logits, ids, n_target)``: logits (L, V) of a teacher-forced sequence ``ids`` (L,)
    whose last ``n_target`` tokens are the target → the share of target tokens the model's argmax
    predicts (the logit at position t predicts token t + 1)."""
    name = "token accuracy"
    rng = np.random.default_rng(6)
    for L, V, n, case in ((12, 20, 3, "a 12-token sequence with a 3-token target"),
                          (9, 30, 1, "a one-token target"), (15, 25, 5, "a 5-token target")):
        ids = rng.integers(0, V, L)
        logits = rng.normal(size=(L, V))
        # the model gets some target tokens right, at the right (shifted) positions only
        for t in range(L - n, L):
            if rng.random() < 0.6:
                logits[t - 1, ids[t]] += 10
            if rng.random() < 0.5:  # and a weaker pull on the target's own position (what an unshifted read sees)
                logits[t, ids[t]] += 5
        got, bad = _call(name, fn, logits.copy(), ids.copy(), n)
        if bad is not None:
            return bad
        want = np.array(reference.token_accuracy(logits, ids, n))
        unshifted = np.array(float((logits[L - n:].argmax(-1) == ids[L - n:]).mean()))
        exact = np.array(float(want == 1.0))
        diagnoses = [(unshifted, "the logit at position t predicts token t + 1: compare logits[L−n−1 : L−1] with "
                                 "ids[L−n:]")]
        if 0 < want < 1:
            diagnoses.append((exact, "this is exact match (all tokens right or nothing); token accuracy is the share "
                                     "of tokens right"))
        wrong = _compare(name, got, want, case, diagnoses=tuple(diagnoses))
        if wrong is not None:
            return wrong
    return Check(name, True, "token accuracy matches on targets of 1, 3 and 5 tokens")


def check_rank_correlation(fn: Callable) -> Check:
    """Chapter 7. ``fn(a, b)``: Spearman's rank correlation of two maps (any shape, same size): Pearson's
    correlation of their ranks, tied values sharing their average rank."""
    name = "rank correlation"
    rng = np.random.default_rng(7)
    a = rng.normal(size=(10, 10))
    cases = [("two unrelated maps", a, rng.normal(size=(10, 10))),
             ("a map and a monotone transform of it", a, np.exp(3 * a)),
             ("maps with ties (many zeros)", np.clip(a, 0, None), np.clip(a + rng.normal(0, 0.5, a.shape), 0, None))]
    for case, x, y in cases:
        got, bad = _call(name, fn, x.copy(), y.copy())
        if bad is not None:
            return bad
        want = np.array(reference.rank_correlation(x, y))
        pearson = np.array(np.corrcoef(x.ravel(), y.ravel())[0, 1])
        ordinal = np.array(np.corrcoef(np.argsort(np.argsort(x.ravel(), kind="stable")),
                                       np.argsort(np.argsort(y.ravel(), kind="stable")))[0, 1])
        wrong = _compare(name, got, want, case, diagnoses=(
            (pearson, "this is Pearson's correlation of the values; rank them first"),
            (ordinal, "tied values must share their average rank (ranks of ties are averaged)")))
        if wrong is not None:
            return wrong
    return Check(name, True, "the rank correlation matches, with a monotone transform (ρ = 1) and with ties")


def check_early_share(fn: Callable) -> Check:
    """Chapter 8. ``fn(per_layer)``: one mean contribution per layer → the first third of the layers'
    (l < L/3, i.e. ⌈L/3⌉ layers) share of the total positive contribution (negative layers count as 0)."""
    name = "early share"
    rng = np.random.default_rng(8)
    cases = [("12 layers, some negative", rng.normal(0.2, 0.5, 12)),
             ("8 layers (8/3 is not whole: the first 3 count)", rng.uniform(0, 1, 8)),
             ("7 layers, a negative early layer", np.array([-0.4, 0.9, 0.1, 0.3, 0.2, 0.5, 0.6])),
             ("a profile with no positive layer", -rng.uniform(0.1, 1, 6))]
    for case, v in cases:
        got, bad = _call(name, fn, v.copy())
        if bad is not None:
            return bad
        want = np.array(reference.early_share(v))
        pos = np.clip(v, 0, None)
        k = math.ceil(len(v) / 3)
        diagnoses = []
        if pos.sum() > 0:
            diagnoses.append((np.array(pos[: len(v) // 3].sum() / pos.sum()), "the first third of L layers is the "
                              "⌈L/3⌉ layers l < L/3; rounding down drops one when L is not a multiple of 3"))
        if v.sum() != 0:
            diagnoses.append((np.array(v[:k].sum() / v.sum()), "negative layers were kept; count only positive "
                              "contributions (clip at 0) in both the part and the total"))
        wrong = _compare(name, got, want, case, diagnoses=tuple(diagnoses))
        if wrong is not None:
            return wrong
    return Check(name, True, "the early share matches on 12, 8 and 7 layers, with negative layers and with none "
                             "positive (0)")


def check_route(fn: Callable) -> Check:
    """Chapter 9. ``fn(V, keys)``: visual tokens V (R, N, d) of R inputs and the mean visual token of each of K
    held edits, ``keys`` (K, d) → (R,) the index of the edit each input is routed to: the largest cosine
    between the input's mean visual token and the edit's key."""
    name = "nearest route"
    rng = np.random.default_rng(9)
    keys = rng.normal(size=(5, 8))
    keys[3] *= 10.0  # a long key: a dot product prefers it
    V = rng.normal(size=(6, 4, 8))
    V[0] = keys[1] + 0.05 * rng.normal(size=(4, 8))  # plainly nearest to edit 1
    unit = keys / np.linalg.norm(keys, axis=-1, keepdims=True)
    V[1] = unit[2] + 0.9 * unit[3] + 0.02 * rng.normal(size=(4, 8))  # nearest to edit 2; the long key 3 wins a dot
    cases = [("six inputs, five edits, one key ten times longer", V, keys),
             ("one input, one edit", V[:1], keys[:1])]
    for case, v, k in cases:
        got, bad = _call(name, fn, v.copy(), k.copy())
        if bad is not None:
            return bad
        want = reference.route(v, k).astype(float)
        dot = (v.mean(1) @ k.T).argmax(-1).astype(float)
        tokens = np.array([np.argmax((v[r] / np.linalg.norm(v[r], axis=-1, keepdims=True)
                                      @ (k / np.linalg.norm(k, axis=-1, keepdims=True)).T).max(0))
                           for r in range(len(v))], dtype=float)
        wrong = _compare(name, got, want, case, diagnoses=(
            (dot, "this is the largest dot product; normalise the mean token and the keys (cosine), or long keys win"),
            (tokens, "this routes by the single best-matching token; compare the mean of the input's visual tokens")))
        if wrong is not None:
            return wrong
    return Check(name, True, "every input goes to the edit with the most similar mean visual token (cosine), "
                             "long keys included")
