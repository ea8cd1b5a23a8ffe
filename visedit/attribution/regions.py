"""Region selection: from any heatmap over visual tokens to a set of tokens, and scores against the
world's ground-truth object mask (pointing game, lift, deletion/insertion curves with the model)."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from ..hooks import edit_input
from ..models import VLLM
from .allocation import prepare


def select_region(heatmap: np.ndarray, *, top_k: int | None = None, threshold: float | None = None,
                  mass: float | None = None) -> np.ndarray:
    """Bool array shaped like ``heatmap``: the selected visual tokens. Give exactly one rule:
    ``top_k`` tokens with the largest values; tokens with value ≥ ``threshold`` × max; or the smallest set
    of tokens whose positive values cover ``mass`` (0–1) of the positive total."""
    h = np.asarray(heatmap, dtype=float)
    rules = [r for r in (top_k, threshold, mass) if r is not None]
    if len(rules) != 1:
        raise ValueError("give exactly one of top_k=, threshold= or mass=")
    flat = h.ravel()
    order = np.argsort(-flat, kind="stable")
    sel = np.zeros(flat.shape, dtype=bool)
    if top_k is not None:
        if not 1 <= top_k <= flat.size:
            raise ValueError(f"top_k must be in 1…{flat.size}, got {top_k}")
        sel[order[:top_k]] = True
    elif threshold is not None:
        if not 0 <= threshold <= 1:
            raise ValueError(f"threshold is a share of the maximum, in [0, 1]; got {threshold}")
        sel = flat >= threshold * flat.max()
    else:
        if not 0 < mass <= 1:
            raise ValueError(f"mass must be in (0, 1], got {mass}")
        pos = np.clip(flat[order], 0, None)
        total = pos.sum()
        if total <= 0:
            sel[order[0]] = True
        else:
            k = int(np.searchsorted(np.cumsum(pos) / total, mass - 1e-12) + 1)
            sel[order[:k]] = True
    return sel.reshape(h.shape)


def patch_coverage(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """(rows, cols) share of each patch's pixels that lie on the object (mask: H×W bool)."""
    rows, cols = grid
    H, W = mask.shape
    if H % rows or W % cols:
        raise ValueError(f"mask of {H}×{W} pixels does not split into a {rows}×{cols} patch grid")
    return mask.reshape(rows, H // rows, cols, W // cols).mean((1, 3))


@dataclasses.dataclass(frozen=True)
class RegionScore:
    """How well a heatmap points at the object. ``pointing_game``: 1 if the hottest token is on the
    object; ``lift``: positive mass on the object ÷ the object's area share (1 = chance);
    ``deletion_auc`` (lower is better) / ``insertion_auc`` (higher is better): p(y*) as visual tokens
    are removed / added in heatmap order, averaged over the curve; both None without a model."""

    pointing_game: float
    lift: float
    deletion_auc: float | None = None
    insertion_auc: float | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def score_heatmap(heatmap: np.ndarray, mask: np.ndarray, *, vllm: VLLM | None = None, image=None,
                  question: str | None = None, steps: int = 16) -> RegionScore:
    """Score ``heatmap`` (rows, cols) against the pixel ``mask``; with ``vllm``, ``image`` and
    ``question`` also the deletion and insertion AUCs."""
    h = np.asarray(heatmap, dtype=float)
    cover = patch_coverage(np.asarray(mask, dtype=bool), h.shape)
    hottest = np.unravel_index(np.argmax(h), h.shape)
    pointing = float(cover[hottest] > 0)
    pos = np.clip(h, 0, None)
    area = float(np.asarray(mask).mean())
    lift = float((pos * cover).sum() / pos.sum() / area) if pos.sum() > 0 and area > 0 else 0.0
    if vllm is None:
        return RegionScore(pointing, lift)
    deletion, insertion = deletion_insertion(vllm, image, question, h.ravel(), steps=steps)
    return RegionScore(pointing, lift, float(np.mean(deletion)), float(np.mean(insertion)))


@torch.no_grad()
def deletion_insertion(vllm: VLLM, image, question: str, order_values: np.ndarray, *, steps: int = 16):
    """p(y*) while visual tokens are replaced by their mean at the LLM input in decreasing order of
    ``order_values`` (deletion), and while they are put back in that order into an all-mean image
    (insertion). Returns two arrays of ``steps + 1`` probabilities (0 … all tokens)."""
    inputs, start, stop, T = prepare(vllm, image, question)
    n_vis = stop - start
    if len(order_values) != n_vis:
        raise ValueError(f"heatmap has {len(order_values)} values but the input has {n_vis} visual tokens")
    y = int(vllm.logits(inputs)[0, T].argmax())
    order = torch.as_tensor(np.argsort(-np.asarray(order_values), kind="stable").copy())
    counts = np.linspace(0, n_vis, steps + 1).round().astype(int)
    keep_del = torch.ones(len(counts), n_vis, dtype=torch.bool)
    for i, k in enumerate(counts):
        keep_del[i, order[:k]] = False
    keep_ins = ~keep_del
    keep = torch.cat([keep_del, keep_ins])  # (2·(steps+1), N_v)

    def blank(x: torch.Tensor) -> torch.Tensor:
        vis = x[:, start:stop]
        mean = vis.mean(1, keepdim=True)
        x = x.clone()
        x[:, start:stop] = torch.where(keep[:, :, None].to(x.device), vis, mean)
        return x

    with edit_input(vllm.site("llm.layers.0"), blank):
        probs = vllm.run(vllm.repeat(inputs, len(keep))).logits[:, T].softmax(-1)[:, y]
    probs = probs.cpu().numpy()
    return probs[: len(counts)], probs[len(counts):]


def _mask(record) -> np.ndarray:
    return record.mask()


def region_scores(vllm, records, *, steps: int = 8, progress: bool = True) -> dict:
    """Every heatmap method on the given records: pointing game and lift at every layer, the best
    layer per method (by lift), and deletion/insertion AUCs at that layer."""
    from tqdm.auto import tqdm

    from .allocation import attention_map, token_allocation
    from .gradients import integrated_gradients
    from .tracing import noise_perturbation, restoration_tracing

    if not records:
        raise ValueError("no records to score: pass a non-empty list")
    if vllm.inputs([(records[0].image, records[0].src)]).layout(0).grid is None:
        raise vllm.adapter.unsupported("region scores", "they delete visual tokens in the order of every method's "
                                       "heatmap, pixel gradients included, which needs one patch grid holding "
                                       "every visual token")
    L = vllm.n_layers
    heatmaps: dict[str, list[dict]] = {m: [] for m in ("noise", "restoration", "allocation", "attention",
                                                       "ig_layer", "ig_pixels")}
    for rec in tqdm(records, desc="heatmaps", disable=not progress):
        noise = noise_perturbation(vllm, rec.image, rec.src, radius=1)
        rest = restoration_tracing(vllm, rec.image, rec.src, radius=1, n=3)
        heatmaps["noise"].append({l: noise.heatmap(l) for l in range(L)})
        heatmaps["restoration"].append({l: rest.heatmap(l) for l in range(L)})
        heatmaps["allocation"].append({l: token_allocation(vllm, rec.image, rec.src, layer=l).heatmap()
                                       for l in range(L)})
        heatmaps["attention"].append({l: attention_map(vllm, rec.image, rec.src, layer=l) for l in range(L)})
        # a fixed 24 steps (tolerance=None): converging every map would multiply this loop's cost, and the
        # ranking of tokens settles before the sum does (on the first model, the 24-step pixel maps of six
        # records rank tokens as the converged ones do, Spearman 0.94–1.0, at relative deltas up to 0.47)
        ig = dict(n_steps=24, tolerance=None)
        heatmaps["ig_layer"].append({l: integrated_gradients(vllm, rec.image, rec.src, layer=l, **ig).heatmap()
                                     for l in range(0, L, max(1, L // 4))})
        heatmaps["ig_pixels"].append({-1: integrated_gradients(vllm, rec.image, rec.src, **ig).heatmap()})
    result: dict = {}
    for method, per_record in heatmaps.items():
        layers = list(per_record[0])
        lift = {l: float(np.mean([score_heatmap(h[l], _mask(r)).lift for h, r in zip(per_record, records)]))
                for l in layers}
        best = max(layers, key=lambda l: lift[l])
        scores = [score_heatmap(h[best], _mask(r), vllm=vllm, image=r.image, question=r.src, steps=steps)
                  for h, r in zip(per_record, records)]
        result[method] = {"pointing_game": round(float(np.mean([s.pointing_game for s in scores])), 4),
                          "lift": round(float(np.mean([s.lift for s in scores])), 4),
                          "deletion_auc": round(float(np.mean([s.deletion_auc for s in scores])), 4),
                          "insertion_auc": round(float(np.mean([s.insertion_auc for s in scores])), 4),
                          "n": len(scores), "best_layer": None if best == -1 else int(best),
                          "lift_by_layer": {str(l): round(v, 4) for l, v in lift.items()}}
    result["best_layer"] = {m: v["best_layer"] for m, v in result.items() if isinstance(v, dict)}
    return result
