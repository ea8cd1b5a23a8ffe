"""Benchmarks behind ``python -m visedit bench tracing``. (The method comparison behind ``regions``,
:func:`region_scores`, lives in :mod:`visedit.attribution.regions`; it is re-exported here.)"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np

from .attribution.regions import region_scores  # noqa: F401 (re-exported)


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
