"""Benchmarks and method comparisons behind ``python -m visedit bench tracing`` and ``regions``."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np


def _reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_mb() -> float:
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def bench_tracing(vllm, record, *, repeats: int = 3, radius: int = 1, sigma: float = 0.7, n: int = 10,
                  chunk_size: int = 64) -> dict:
    """Time the batched noise-perturbation engine against the reference loop on one full sweep
    (every window × every layer) of the same input; median of ``repeats`` runs each."""
    from .attribution import noise_perturbation

    if repeats < 1:
        raise ValueError(f"repeats must be ≥ 1, got {repeats}")
    kw = dict(radius=radius, sigma=sigma, n=n, seed=0)
    out: dict = {}
    maps = {}
    for engine in ("loop", "batched"):
        noise_perturbation(vllm, record.image, record.src, layers=[0], engine=engine, **kw)  # warm-up
        times = []
        _reset_peak()
        base = _peak_mb()
        for _ in range(repeats):
            t0 = time.perf_counter()
            maps[engine] = noise_perturbation(vllm, record.image, record.src, engine=engine, chunk_size=chunk_size, **kw)
            times.append(time.perf_counter() - t0)
        out[f"{engine}_seconds"] = round(statistics.median(times), 4)
        out[f"peak_mem_mb_{engine}"] = round(max(_peak_mb() - base, 0.0), 1)
    out["speedup"] = round(out["loop_seconds"] / out["batched_seconds"], 2)
    out["max_abs_diff"] = float(np.abs(maps["loop"].array() - maps["batched"].array()).max())
    out["peak_mem_mb"] = {"loop": out.pop("peak_mem_mb_loop"), "batched": out.pop("peak_mem_mb_batched")}
    out.update(windows=len(maps["batched"].values[0]), layers=len(maps["batched"].layers), n=n, radius=radius,
               sigma=sigma, repeats=repeats)
    return out


def _mask(record) -> np.ndarray:
    return record.mask()


def region_scores(vllm, records, *, steps: int = 8, progress: bool = True) -> dict:
    """Every heatmap method on the given records: pointing game and lift at every layer, the best
    layer per method (by lift), and deletion/insertion AUCs at that layer."""
    from tqdm.auto import tqdm

    from .attribution import (attention_map, integrated_gradients, noise_perturbation, restoration_tracing,
                              score_heatmap, token_allocation)

    if not records:
        raise ValueError("no records to score: pass a non-empty list")
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
        heatmaps["ig_layer"].append({l: integrated_gradients(vllm, rec.image, rec.src, layer=l, n_steps=24).heatmap()
                                     for l in range(0, L, max(1, L // 4))})
        heatmaps["ig_pixels"].append({-1: integrated_gradients(vllm, rec.image, rec.src, n_steps=24).heatmap()})
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
