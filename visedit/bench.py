"""Benchmarks behind ``python -m visedit bench tracing`` / ``scale`` / ``card``. (The method comparison behind
``regions``, :func:`region_scores`, lives in :mod:`visedit.attribution.regions`; it is re-exported here.)"""

from __future__ import annotations

import math
import statistics
import time
from typing import Sequence
from pathlib import Path

import numpy as np

from .attribution.regions import region_scores  # noqa: F401 (re-exported)


def _reset_peak(device: str = "cpu") -> None:
    """Start a peak-memory measurement. On a GPU: torch's peak counter. On the CPU: the process's
    high-water mark (Linux), after handing freed heap pages back to the system (glibc's ``malloc_trim``):
    without that, memory the allocator keeps from earlier work is reused unseen and later peaks read 0."""
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _status_mb(key: str) -> float:
    """A memory line of /proc/self/status (``VmHWM``, ``VmRSS``) in MB; NaN where there is none."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _peak_mb(device: str = "cpu") -> float:
    """Peak memory so far (MB): allocated by torch on a GPU; the resident high-water mark on the CPU."""
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2**20
    return _status_mb("VmHWM")


def _current_mb(device: str = "cpu") -> float:
    """Memory in use now (MB): torch's allocation on a GPU; the resident set on the CPU."""
    if str(device).startswith("cuda"):
        import torch

        return torch.cuda.memory_allocated(device) / 2**20
    return _status_mb("VmRSS")


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
        base = _current_mb()
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


def bench_card(vllm, *, entities: int = 10, renders: int = 1, seed: int = 7) -> dict:
    """Time the model card on the first ``entities`` creatures with the questions about one image sharing
    its forward pass (``share_prefix``) against one full pass per question; the two cards must agree."""
    from .models.card import model_card

    if entities < 1 or renders < 1:
        raise ValueError(f"entities and renders must be ≥ 1, got {entities} and {renders}")
    cards, out = {}, {}
    for name, share in (("plain", False), ("shared", True)):
        t0 = time.perf_counter()
        cards[name] = model_card(vllm, seed=seed, renders=renders, entities=range(entities), progress=False,
                                 share_prefix=share).to_dict()
        out[f"{name}_seconds"] = round(time.perf_counter() - t0, 2)
    out["speedup"] = round(out["plain_seconds"] / out["shared_seconds"], 2)
    out["cards_agree"] = cards["plain"] == cards["shared"]
    out.update(entities=entities, renders=renders, seed=seed, questions=sum(cards["shared"]["n"].values()))
    return out


# ------------------------------------------------------------------------------------------- bench scale
#: LLaVA-1.5's visual grid is 24×24 = 576 tokens and its decoder has 32 layers; these are the points of
#: the scaling curves (64, 144, 576 tokens; 8, 16, 32 layers).
SCALE_TOKENS = (64, 144, 576)
SCALE_LAYERS = (8, 16, 32)
SCALE_EDITORS = ("ft_l", "ft_v", "ike", "mend", "vead")


def scale_model(tokens: int, layers: int, *, hidden: int = 128, seed: int = 0, device: str = "cpu"):
    """A random-weight LLaVA with LLaVA-1.5's shape scaled to this machine: a √tokens × √tokens visual
    grid (patch 2 px, a one-layer 32-wide tower), ``layers`` decoder layers of width ``hidden``, the
    first world's tokenizer. Nothing is downloaded or trained."""
    from .models import load_vllm
    from .models.tiny import TinyConfig, build_model, build_processor
    from .world import make_world

    side = math.isqrt(tokens)
    if side * side != tokens:
        raise ValueError(f"tokens must be a square number (a grid), got {tokens}")
    cfg = TinyConfig(image_size=2 * side, patch_size=2, vision_hidden=32, vision_layers=1, vision_heads=2,
                     vision_intermediate=64, hidden=hidden, layers=layers, heads=4, intermediate=2 * hidden,
                     max_positions=tokens + 1024)
    processor = build_processor(make_world(0), cfg)
    model = build_model(processor.tokenizer, cfg, seed=seed)
    import tempfile

    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # saving a temporary model is not progress worth a bar
    try:
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            processor.save_pretrained(tmp)
            return load_vllm(tmp, device=device)
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def _timed(fn, device: str = "cpu") -> tuple[float, float, object]:
    """(seconds, peak memory above what was in use at the start in MB, result) of one call."""
    _reset_peak(device)
    base = _current_mb(device)
    t0 = time.perf_counter()
    out = fn()
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)
    return time.perf_counter() - t0, max(_peak_mb(device) - base, 0.0), out


def _editor(name: str, vllm):
    from .editing import MENDConfig, MENDEditor, VEADConfig, VEADEditor, get_editor

    if name == "mend":  # untrained editor networks: the cost of an edit, not its quality
        return MENDEditor(vllm, MENDConfig(layers=(-1,), rank=8))
    if name == "vead":
        return VEADEditor(vllm, VEADConfig(layer=vllm.n_layers // 2))
    return get_editor(name, vllm, **({"layer": vllm.n_layers // 2} if name == "ft_l" else {}))


def _measure(vllm, record, *, loop: int, chunk_size: int, n: int, editors: Sequence[str],
             device: str = "cpu") -> dict:
    import functools

    from .attribution import integrated_gradients, module_contributions, noise_perturbation, restoration_tracing
    from .editing.scoring import score_edit

    timed = functools.partial(_timed, device=device)
    image, question = record.image, record.src
    row: dict = {"tokens": None, "layers": vllm.n_layers}
    vllm.answer(image, question, max_new_tokens=1)  # warm-up
    inputs = vllm.inputs([(image, question)])
    row["tokens"] = inputs.layouts[0].n_tokens
    row["prefix_tokens"] = int(inputs.last_prompt[0]) + 1  # what each noisy copy carries through the attention
    s, m, _ = timed(lambda: vllm.logits(inputs))
    row["forward"] = {"seconds": s, "peak_mb": m}
    s, m, _ = timed(lambda: module_contributions(vllm, image, question))
    row["contributions"] = {"seconds": s, "peak_mb": m}
    kw = dict(radius=1, sigma=0.7, n=n, seed=0, chunk_size=chunk_size)
    s, m, batched = timed(lambda: noise_perturbation(vllm, image, question, engine="batched", **kw))
    row["noise_sweep"] = {"seconds": s, "peak_mb": m, "windows": len(batched.values[0])}
    if loop:  # both engines on the same first `loop` layers (every window): the loop's cost is per layer
        some = list(range(min(loop, vllm.n_layers)))
        s_b, _, part = timed(lambda: noise_perturbation(vllm, image, question, engine="batched", layers=some, **kw))
        s, m, ref = timed(lambda: noise_perturbation(vllm, image, question, engine="loop", layers=some, **kw))
        row["noise_sweep_loop"] = {"seconds": s, "peak_mb": m, "layers": len(some), "batched_seconds": s_b}
        row["noise_speedup"] = s / s_b
        row["noise_max_abs_diff"] = float(np.abs(ref.array() - part.array()).max())
    s, m, _ = timed(lambda: restoration_tracing(vllm, image, question, layers=[0]))
    row["restoration"] = {"seconds": s, "peak_mb": m}
    s, m, ig = timed(lambda: integrated_gradients(vllm, image, question, layer=0, n_steps=32, tolerance=None))
    row["ig"] = {"seconds": s, "peak_mb": m, "steps": 32}
    for name in editors:
        editor = _editor(name, vllm)
        s, m, _ = timed(lambda: score_edit(editor, record, exact=False))
        editor.restore()
        row[f"edit_{name}"] = {"seconds": s, "peak_mb": m}
    return row


def _exponent(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Slope of log y against log x (least squares): y ∝ x^slope."""
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def bench_scale(*, tokens: Sequence[int] = SCALE_TOKENS, layers: Sequence[int] = SCALE_LAYERS, hidden: int = 128,
                n: int = 10, chunk_size: int = 64, chunk_sizes: Sequence[int] = (16, 64, 256),
                editors: Sequence[str] = SCALE_EDITORS, loop: int = 4, device: str = "cpu",
                progress: bool = True) -> dict:
    """Seconds and peak memory of every analysis and editor on random-weight models of LLaVA-1.5's shape,
    scaled: along the visual tokens (at the fewest layers), along the layers (at the most tokens), the
    batched noise sweep against the paper's loop at the largest model (both engines on its first ``loop``
    layers, every window; 0: no loop), the sweep's memory at several chunk sizes, and each measure's growth
    exponent (time ∝ tokens^a, ∝ layers^b)."""
    from tqdm.auto import tqdm

    from .world import load_world_split

    tokens, layers = sorted(set(tokens)), sorted(set(layers))
    if not isinstance(loop, int) or isinstance(loop, bool) or loop < 0:
        raise ValueError(f"loop is a number of layers (0: no loop), got {loop!r}")
    if len(tokens) < 2 or len(layers) < 2:
        raise ValueError("bench scale needs at least two token counts and two layer counts to fit a growth exponent")
    odd = [t for t in tokens if math.isqrt(t) ** 2 != t]
    if odd:
        raise ValueError(f"tokens must be square numbers (a grid), got {', '.join(map(str, odd))}")
    bad = sorted(set(editors) - set(SCALE_EDITORS))
    if bad:
        raise ValueError(f"unknown editor(s) {', '.join(bad)}; choose from {', '.join(SCALE_EDITORS)}")
    record = load_world_split("eval")[0]
    points = [(t, layers[0]) for t in tokens] + [(tokens[-1], l) for l in layers[1:]]
    rows = []
    for t, l in tqdm(points, desc="bench scale", disable=not progress):
        vllm = scale_model(t, l, hidden=hidden, device=device)
        largest = (t, l) == (tokens[-1], layers[-1])
        rows.append(_measure(vllm, record, loop=loop if largest else 0, chunk_size=chunk_size, n=n, editors=editors,
                             device=device))
    big = scale_model(tokens[-1], layers[-1], hidden=hidden, device=device)
    from .attribution import noise_perturbation
    from .attribution.tracing import sweep_bytes

    heads = int(big.adapter.text_config.num_attention_heads)
    memory = {}
    for c in chunk_sizes:
        s, m, _ = _timed(lambda: noise_perturbation(big, record.image, record.src, layers=[0], radius=1, n=n,
                                                    chunk_size=c), device=device)
        memory[c] = {"seconds": s, "peak_mb": m,
                     "estimate_mb": sweep_bytes(c, n, rows[-1]["prefix_tokens"], big.d_model, heads) / 2**20}
    measures = [k for k, v in rows[0].items() if isinstance(v, dict)]
    by_tokens = [r for r in rows if r["layers"] == layers[0]]
    by_layers = [r for r in rows if r["tokens"] == by_tokens[-1]["tokens"]]
    growth = {k: {"tokens": _exponent([r["tokens"] for r in by_tokens], [r[k]["seconds"] for r in by_tokens]),
                  "layers": _exponent([r["layers"] for r in by_layers], [r[k]["seconds"] for r in by_layers])}
              for k in measures}
    head = next(r for r in rows if "noise_speedup" in r) if loop else None
    return {"device": device, "hidden": hidden, "n": n, "chunk_size": chunk_size, "rows": rows,
            "sweep_memory_by_chunk": memory, "growth_exponents": growth,
            "noise_speedup": head["noise_speedup"] if head else None,
            "noise_max_abs_diff": head["noise_max_abs_diff"] if head else None,
            "targets": {"noise_speedup ≥ 20": bool(head and head["noise_speedup"] >= 20),
                        "noise_max_abs_diff ≤ 1e-5": bool(head and head["noise_max_abs_diff"] <= 1e-5)}}
