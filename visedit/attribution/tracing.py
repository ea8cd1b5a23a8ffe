"""Noise-perturbation tracing of visual tokens (the paper's analysis B), batched and as a reference loop.

For layer l and every window of visual tokens (radius R on the patch grid, clipped at the borders; on
each of LLaVA-NeXT's two grids, a newline token alone; a 1-D window for query-token backbones), add
Gaussian noise N(0, σ²) to the window's hidden states at the input of layer l's attention module, in
n noisy copies, re-run that module and score mean(1 − cos(attn_out_noisy[T], attn_out_clean[T])).

Noise convention (shared by both engines, so they agree to float precision): for each layer one noise
field z (n copies × all visual tokens × d) is drawn from the seed; window w uses z on its own tokens
and nothing elsewhere. Within a window the noise is i.i.d. N(0, σ²), exactly as in the paper; across
windows the draws are shared (common random numbers), which makes neighbouring windows comparable.

* ``engine="loop"`` — the paper's way: one call of the real attention module per window (n copies).
* ``engine="batched"`` — exact and fast: the attention module is linear in its input up to the
  softmax, so the engine projects the noise field once per layer (k, v, RoPE), then scores *all*
  windows in chunks of ``chunk_size`` windows, recomputing only the last-token row of attention.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
import torch

from ..models import VLLM
from ..models.backbones import VisualLayout, slice_kwargs
from .allocation import on_grid, prepare


@dataclasses.dataclass(frozen=True)
class InfluenceMap:
    """Influence of every visual-token window, per layer. ``values[i][t]``: layer ``layers[i]``, window
    centred on visual token t. ``grid``: (rows, cols) or None (1-D strip); ``cells``: the visual tokens on
    ``grid`` when it holds only some (LLaVA-NeXT's base image), else None."""

    layers: tuple[int, ...]
    values: tuple[tuple[float, ...], ...]
    grid: tuple[int, int] | None
    radius: int
    sigma: float
    n: int
    seed: int
    engine: str
    cells: tuple[int, ...] | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def array(self) -> np.ndarray:
        """(layers, N_v) array."""
        return np.asarray(self.values)

    def heatmap(self, layer: int) -> np.ndarray:
        if layer not in self.layers:
            raise ValueError(f"layer {layer} was not traced; traced layers: {list(self.layers)}")
        row = self.array()[self.layers.index(layer)]
        return on_grid(row, self.grid, "a noise-perturbation heatmap", self.cells)

    def plot(self, image=None, mask=None, *, layer: int | None = None, title: str | None = None):
        from ..viz import heatmap_overlay

        layer = self.layers[-1] if layer is None else layer
        return heatmap_overlay(self.heatmap(layer), image=image, mask=mask, diverging=False,
                               title=title or f"Noise perturbation, layer {layer} (σ={self.sigma}, R={self.radius})")


def windows(n_tokens: int, grid: tuple[int, int] | None, radius: int) -> torch.Tensor:
    """(N_v, N_v) bool membership: row t marks the tokens of the window centred on token t."""
    if radius < 0:
        raise ValueError(f"radius must be ≥ 0, got {radius}")
    if grid is None:
        idx = torch.arange(n_tokens)
        if 2 * radius + 1 > n_tokens:
            raise ValueError(f"window of radius {radius} ({2 * radius + 1} tokens) is larger than the "
                             f"{n_tokens} visual tokens; choose radius ≤ {(n_tokens - 1) // 2}")
        return (idx[:, None] - idx[None, :]).abs() <= radius
    _check_radius(grid, radius)
    return _grid_windows(grid, radius)


def _check_radius(grid: tuple[int, int], radius: int) -> None:
    rows, cols = grid
    if radius < 0:
        raise ValueError(f"radius must be ≥ 0, got {radius}")
    if 2 * radius + 1 > max(rows, cols):
        raise ValueError(f"window of radius {radius} ({2 * radius + 1}×{2 * radius + 1}) is larger than the "
                         f"{rows}×{cols} grid; choose radius ≤ {(max(rows, cols) - 1) // 2}")


def _grid_windows(grid: tuple[int, int], radius: int) -> torch.Tensor:
    rows, cols = grid
    r = torch.arange(rows).repeat_interleave(cols)
    c = torch.arange(cols).repeat(rows)
    return ((r[:, None] - r[None, :]).abs() <= radius) & ((c[:, None] - c[None, :]).abs() <= radius)


def layout_windows(layout: VisualLayout, radius: int) -> torch.Tensor:
    """(N_v, N_v) bool membership of the windows of ``layout``'s tokens: :func:`windows` on its one grid
    or in token order; with several grids (LLaVA-NeXT), windows on each grid (clipped at its borders)
    and every token on no grid (a newline token) a window of its own."""
    if layout.grid is not None or not layout.grids:
        return windows(layout.n_tokens, layout.grid, radius)
    _check_radius(max(layout.grids, key=max), radius)  # the window must fit the largest grid
    member = torch.eye(layout.n_tokens, dtype=torch.bool)
    for part, grid in enumerate(layout.grids):
        idx = torch.as_tensor(layout.cells(part).ravel())
        member[idx[:, None], idx[None, :]] = _grid_windows(grid, radius)
    return member


def noise_field(seed: int, layer: int, n: int, n_tokens: int, d: int, sigma: float, *,
                device: str | torch.device = "cpu") -> torch.Tensor:
    """The seeded noise field of one layer: (n, N_v, d), i.i.d. N(0, σ²), drawn on ``device`` (the device
    of the layer it perturbs) by a generator there. The same seed gives the same field on every device of
    a type (every CUDA GPU draws the same numbers), and another field on the CPU than on a GPU."""
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(int(seed) * 1_000_003 + int(layer))
    return torch.randn((n, n_tokens, d), generator=g, device=device) * sigma


def _check(sigma: float, n: int, layers: Sequence[int], chunk_size: int) -> None:
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    if n < 1:
        raise ValueError(f"n (noisy copies) must be ≥ 1, got {n}")
    if len(layers) == 0:
        raise ValueError("layers is empty: pass at least one LLM layer index")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be ≥ 1, got {chunk_size}")


def _available_bytes(device: torch.device | str = "cpu") -> int:
    """Memory free for the sweep: the GPU's free memory for a CUDA tensor, else the host's available memory."""
    if torch.device(device).type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def sweep_bytes(chunk_size: int, n: int, seq: int, d: int, heads: int, head_dim: int | None = None) -> int:
    """Working memory of one batched step of the noise sweep (an upper estimate, in bytes, float32): for
    each of ``chunk_size`` windows × ``n`` noisy copies, the last token's attention scores over the
    ``seq``-token prefix in each of ``heads`` heads (scores, their change, their softmax and up to three
    temporaries of that size: measured on the CPU, a step holds 3.4–5 of them), the heads' outputs (two of ``heads`` × ``head_dim``; default ``d // heads``) and the merged
    output (two of width ``d``). It grows with the chunk, never with the number of windows or layers."""
    head_dim = d // heads if head_dim is None else head_dim
    return 4 * chunk_size * n * (6 * heads * seq + 2 * heads * head_dim + 2 * d)


@torch.no_grad()
def noise_perturbation(vllm: VLLM, image, question: str, *, layers: Sequence[int] | None = None, radius: int = 3,
                       sigma: float = 0.7, n: int = 10, seed: int = 0, engine: str = "batched",
                       chunk_size: int = 64, cache_device: str | torch.device | None = None,
                       progress: bool = False) -> InfluenceMap:
    """Influence map (layers × visual-token windows) of noise on attention inputs. See the module doc.

    Each layer's noise is drawn on the device that layer runs on (:func:`noise_field`). ``cache_device``
    (e.g. ``"cpu"``): keep the clean pass's record of every traced layer there; each layer's is moved
    back to its device when it is scored."""
    from tqdm.auto import tqdm

    layers = list(range(vllm.n_layers)) if layers is None else [vllm.adapter.check_layer(l) for l in layers]
    _check(sigma, n, layers, chunk_size)
    if engine not in ("batched", "loop"):
        raise ValueError(f"engine must be 'batched' or 'loop', got {engine!r}")
    inputs, start, stop, T = prepare(vllm, image, question)
    n_vis = stop - start
    layout = inputs.layout(0)  # windows on the grid(s), or 1-D windows in token order without one
    member = layout_windows(layout, radius)
    sites = {l: f"llm.layers.{l}.attn" for l in layers}
    tr = vllm.run(inputs, trace=list(sites.values()), trace_inputs=True, cache_device=cache_device)
    out = []
    for l in tqdm(layers, desc="noise perturbation", disable=not progress):
        at = vllm.device_of(sites[l])
        x, kwargs = tr.inputs[sites[l]][:, : T + 1].to(at), tr.kwargs[sites[l]]
        clean = tr.outputs[sites[l]][0, T].to(at)
        z = noise_field(seed, l, n, n_vis, x.shape[-1], sigma, device=at).to(x)
        if engine == "loop":
            vals = _loop(vllm.site(sites[l]), x, kwargs, clean, z, member, start, T)
        else:
            vals = _batched(vllm, l, x, kwargs, clean, z, member, start, T, chunk_size)
        out.append(tuple(float(v) for v in vals))
    return InfluenceMap(layers=tuple(layers), values=tuple(out), grid=layout.map_grid, radius=radius, sigma=sigma,
                        n=n, seed=seed, engine=engine, cells=layout.map_cells)


def _loop(attn, x, kwargs, clean, z, member, start, T) -> torch.Tensor:
    """Reference: one call of the real attention module per window."""
    kw = slice_kwargs(kwargs, x.shape[1])
    n = z.shape[0]
    vals = torch.empty(member.shape[0])
    for w in range(member.shape[0]):
        noisy = x.repeat(n, 1, 1)
        idx = member[w].nonzero()[:, 0]
        noisy[:, start + idx] += z[:, idx]
        o = attn(hidden_states=noisy, **kw)[0][:, T]
        vals[w] = (1 - torch.nn.functional.cosine_similarity(o, clean[None], dim=-1)).mean()
    return vals


def _batched(vllm, layer, x, kwargs, clean, z, member, start, T, chunk_size) -> torch.Tensor:
    """All windows of one layer, ``chunk_size`` windows per step, last-token row only."""
    st = vllm.adapter.attention_state(layer, x, kwargs, T)
    heads, head_dim = st["q"].shape
    need = sweep_bytes(min(chunk_size, member.shape[0]), z.shape[0], T + 1, x.shape[-1], heads, head_dim)
    if need > _available_bytes(x.device):
        raise MemoryError(f"chunk_size={chunk_size} needs about {need / 2**30:.1f} GiB, more than is "
                          "available; pass a smaller chunk_size")
    dk, dv = vllm.adapter.attention_delta(st, z, start)  # (n, H, N_v, hd) each
    e = torch.einsum("hk,nhjk->nhj", st["q"], dk) * st["scaling"]  # score change per copy, head, visual token
    vals = []
    m_all = member.to(device=x.device, dtype=x.dtype)
    for c0 in range(0, member.shape[0], chunk_size):
        m = m_all[c0: c0 + chunk_size]  # (W, N_v)
        scores = st["scores"][None, None].expand(m.shape[0], z.shape[0], -1, -1).clone()  # (W, n, H, T+1)
        scores[..., start: start + m.shape[1]] += m[:, None, None, :] * e[None]
        p = scores.softmax(-1)
        heads = torch.einsum("wnhj,hjk->wnhk", p, st["v"])
        heads = heads + torch.einsum("wnhj,wj,nhjk->wnhk", p[..., start: start + m.shape[1]], m, dv)
        o = vllm.adapter.attention_merge(layer, heads)  # (W, n, d)
        vals.append((1 - torch.nn.functional.cosine_similarity(o, clean[None, None], dim=-1)).mean(1))
    return torch.cat(vals)


# ------------------------------------------------------------------------------------ restoration tracing
@dataclasses.dataclass(frozen=True)
class RestorationMap:
    """ROME-style restoration: ``values[i][t]`` = probability of y* when the clean hidden states of the
    window centred on visual token t are restored at the *input* of layer ``layers[i]``, with every
    visual token corrupted at the LLM input. ``clean`` / ``corrupted``: p(y*) without noise / with
    noise and nothing restored."""

    layers: tuple[int, ...]
    values: tuple[tuple[float, ...], ...]
    grid: tuple[int, int] | None
    clean: float
    corrupted: float
    target: str
    radius: int
    sigma: float
    n: int
    seed: int
    cells: tuple[int, ...] | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def array(self) -> np.ndarray:
        return np.asarray(self.values)

    def effect(self) -> np.ndarray:
        """(layers, N_v) share of the lost probability that restoring the window brings back."""
        lost = self.clean - self.corrupted
        return (self.array() - self.corrupted) / (lost if abs(lost) > 1e-12 else 1.0)

    def heatmap(self, layer: int) -> np.ndarray:
        if layer not in self.layers:
            raise ValueError(f"layer {layer} was not traced; traced layers: {list(self.layers)}")
        row = self.effect()[self.layers.index(layer)]
        return on_grid(row, self.grid, "a restoration heatmap", self.cells)

    def plot(self, image=None, mask=None, *, layer: int | None = None, title: str | None = None):
        from ..viz import heatmap_overlay

        layer = self.layers[0] if layer is None else layer
        return heatmap_overlay(self.heatmap(layer), image=image, mask=mask,
                               title=title or f"Restoration at the input of layer {layer} → '{self.target}'")


@torch.no_grad()
def restoration_tracing(vllm: VLLM, image, question: str, *, layers: Sequence[int] | None = None, radius: int = 1,
                        sigma: float | None = None, n: int = 5, seed: int = 0, chunk_size: int = 16,
                        target: str | None = None, regions: torch.Tensor | None = None,
                        cache_device: str | torch.device | None = None, progress: bool = False) -> RestorationMap:
    """Corrupt all visual tokens at the LLM input (noise σ, default 3× the std of the clean visual
    embeddings, as in ROME), then restore one window's clean hidden state at the input of one layer and
    run the rest of the model. The clean run and the corrupted run are each computed once; every
    (layer, window) cell re-runs only the layers from the restored one on.

    ``regions``: optional (W, N_v) bool tensor of custom regions to restore instead of the windows
    (e.g. the object's patches, or everything). ``cache_device`` (e.g. ``"cpu"``): keep the clean and
    corrupted residual streams of every layer there (n + 1 streams per layer) instead of beside their
    layers; each layer's are moved back when it runs.
    """
    from tqdm.auto import tqdm

    layers = list(range(vllm.n_layers)) if layers is None else [vllm.adapter.check_layer(l) for l in layers]
    _check(1.0 if sigma is None else sigma, n, layers, chunk_size)
    inputs, start, stop, T = prepare(vllm, image, question)
    n_vis = stop - start
    layout = inputs.layout(0)
    member = layout_windows(layout, radius) if regions is None else torch.as_tensor(regions, dtype=torch.bool)
    if member.ndim != 2 or member.shape[1] != n_vis:
        raise ValueError(f"regions must be a (W, {n_vis}) bool tensor, got shape {tuple(member.shape)}")
    blocks = [f"llm.layers.{l}" for l in range(vllm.n_layers)]
    clean_tr = vllm.run(inputs, trace=blocks, trace_inputs=True, cache_device=cache_device)
    keep_at = (lambda t: t.to(cache_device)) if cache_device is not None else (lambda t: t)  # noqa: E731
    logits = clean_tr.logits[0, T]
    y = int(logits.argmax()) if target is None else vllm.encode_target(target)[0]
    x0 = clean_tr.inputs[blocks[0]][:, : T + 1].to(vllm.device_of(blocks[0]))
    sigma = float(3 * x0[0, start:stop].std()) if sigma is None else sigma
    z = noise_field(seed, -1, n, n_vis, x0.shape[-1], sigma, device=vllm.device_of(blocks[0])).to(x0)
    corrupted_in = x0.repeat(n, 1, 1)
    corrupted_in[:, start:stop] += z
    head = lambda h: vllm.site("lm_head")(vllm.site("llm.norm")(h[:, T])).float().softmax(-1)[:, y]  # noqa: E731
    # the corrupted run, once, recording the residual stream at the input of every layer
    corrupted = [keep_at(corrupted_in)]
    h = corrupted_in
    for l in range(vllm.n_layers):
        h = _one_layer(vllm, l, h.to(vllm.device_of(blocks[l])), clean_tr.kwargs[blocks[l]])
        corrupted.append(keep_at(h))
    p_clean = float(head(clean_tr.outputs[blocks[-1]][:, : T + 1].to(vllm.device_of("llm.norm")))[0])
    p_corrupted = float(head(corrupted[-1].to(vllm.device_of("llm.norm"))).mean())
    out = []
    for l in tqdm(layers, desc="restoration", disable=not progress):
        at = vllm.device_of(blocks[l])  # the restored streams run from layer l on: build them on its device
        clean_l = clean_tr.inputs[blocks[l]][:, : T + 1].to(at)
        corrupted_l = corrupted[l].to(at)
        vals = []
        for c0 in range(0, member.shape[0], chunk_size):
            m = member[c0: c0 + chunk_size].to(at)  # (W, N_v)
            h = corrupted_l[None].expand(m.shape[0], -1, -1, -1).clone()  # (W, n, S, d)
            vis = h[:, :, start:stop]
            keep = m[:, None, :, None]
            h[:, :, start:stop] = torch.where(keep, clean_l[0, start:stop][None, None], vis)
            final = vllm.adapter.run_from(l, h.flatten(0, 1), clean_tr.kwargs[blocks[l]])
            vals.append(head(final).view(m.shape[0], n).mean(1))
        out.append(tuple(float(v) for v in torch.cat(vals)))
    return RestorationMap(layers=tuple(layers), values=tuple(out), grid=layout.map_grid, clean=p_clean,
                          corrupted=p_corrupted, target=vllm.tokenizer.decode([y]).strip(), radius=radius,
                          sigma=sigma, n=n, seed=seed, cells=layout.map_cells)


def _one_layer(vllm, l, h, kwargs):
    block = vllm.site(f"llm.layers.{l}")
    out = block(h, **slice_kwargs(kwargs, h.shape[1]))
    return out[0] if isinstance(out, tuple) else out
