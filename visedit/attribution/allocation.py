"""Per-visual-token allocation: the attention output at T, split exactly over source positions.

At layer l, attn_out[T] = Σ_h Σ_j a_h[T, j] · v_j^h · W_O^h (+ bias). Projecting each source's term on
the direct-logit direction of y* (final-norm scale from the full residual stream × unembedding row)
gives how much each visual token, read at this layer, adds to the answer's logit.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from ..models import VLLM
from .contributions import ContributionProfile, profile_from_rows


_NO_VISUAL = "this input has no visual tokens: pass an image (attribution over visual tokens needs one)"


def on_grid(values: np.ndarray, grid: tuple[int, int] | None, feature: str,
            cells: tuple[int, ...] | None = None) -> np.ndarray:
    """``values`` (N_v,) as a (rows, cols) heatmap — of the tokens ``cells`` when the grid holds only
    some of them (LLaVA-NeXT's base image); a one-line refusal when the visual tokens have no patch
    grid (query tokens) — never a silent 1×N strip."""
    if grid is None:
        raise ValueError(f"{feature} needs the visual tokens on a patch grid, and these {len(values)} have "
                         "none (the backbone reads the image as query tokens): use the per-token values instead")
    return (values if cells is None else values[list(cells)]).reshape(grid)


def visual_span(inputs, b: int = 0) -> tuple[int, int]:
    """(start, stop) of item ``b``'s visual tokens; a clear error when the input has none."""
    span = inputs.visual_spans[b]
    if span is None:
        raise ValueError(_NO_VISUAL)
    return span


def prepare(vllm: VLLM, image, question: str):
    """Inputs for one (image, question) with its visual span (start, stop) and last prompt position T.
    Raises a clear error when there is no image."""
    if image is None:
        raise ValueError(_NO_VISUAL)
    inputs = vllm.inputs([(image, question)])
    start, stop = visual_span(inputs)
    return inputs, start, stop, inputs.last_prompt[0]


class VisualTokenMap:
    """Mixin for results holding one value per visual token (``visual``), a ``grid`` and its ``cells``."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def heatmap(self) -> np.ndarray:
        """(rows, cols) array on the patch grid; refused without a grid (use ``visual``)."""
        return on_grid(np.asarray(self.visual), self.grid, "a heatmap", self.cells)


@dataclasses.dataclass(frozen=True)
class TokenAllocation(VisualTokenMap):
    """Allocation of one layer's attention output to source positions.

    ``visual``: (N_v,) contribution of each visual token; ``grid``: (rows, cols) or None for
    query-token backbones; ``cells``: the visual tokens on ``grid``, row-major, when it holds only some
    (LLaVA-NeXT's base image ahead of its tiles), else None; ``text``: contribution of all non-visual
    positions together; ``module_projection``: the attention output's own projection; ``max_error``: |Σ terms + bias −
    module_projection| (the oracle).
    """

    layer: int
    target: str
    visual: tuple[float, ...]
    grid: tuple[int, int] | None
    text: float
    bias: float
    module_projection: float
    max_error: float
    cells: tuple[int, ...] | None = None

    def plot(self, image=None, mask=None, *, title: str | None = None):
        from ..viz import heatmap_overlay

        return heatmap_overlay(self.heatmap(), image=image, mask=mask,
                               title=title or f"Allocation at layer {self.layer} → '{self.target}'")


@torch.no_grad()
def _split(vllm: VLLM, run, layer: int, T: int, direction: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """Layer ``layer``'s attention output at T on ``direction``: per source position (T+1,), the output
    bias's share, and the module output's own projection (their sum is the oracle)."""
    site = f"llm.layers.{layer}.attn"
    terms = vllm.adapter.attention_terms(layer, run.inputs[site], run.kwargs[site], T)  # (H, T+1, d)
    direction = direction.to(terms.device)  # on a split model the head may sit on another device
    per_source = (terms.float() @ direction).sum(0)
    bias = vllm.adapter.attention_output_bias(layer)
    bias_proj = float(bias.float().to(direction.device) @ direction) if bias is not None else 0.0
    module_proj = float(run.outputs[site][0, T].float().to(direction.device) @ direction)
    return per_source, bias_proj, module_proj


def token_allocation(vllm: VLLM, image, question: str, *, layer: int, target: str | None = None) -> TokenAllocation:
    """Exact allocation of layer ``layer``'s attention output at T to each visual token."""
    layer = vllm.adapter.check_layer(layer)
    inputs, start, stop, T = prepare(vllm, image, question)
    run = vllm.run(inputs, trace=[f"llm.layers.{layer}.attn", "llm.norm"], trace_inputs=True)
    logits = run.logits[0, T]
    y = int(logits.argmax()) if target is None else vllm.encode_target(target)[0]
    direction, _ = vllm.adapter.logit_direction(run.inputs["llm.norm"][0, T], y)
    per_source, bias_proj, module_proj = _split(vllm, run, layer, T, direction)
    error = abs(float(per_source.sum()) + bias_proj - module_proj)
    visual = per_source[start:stop]
    return TokenAllocation(layer=layer, target=vllm.tokenizer.decode([y]).strip(),
                           visual=tuple(visual.tolist()), grid=inputs.layout(0).map_grid,
                           cells=inputs.layout(0).map_cells,
                           text=float(per_source.sum() - visual.sum()), bias=bias_proj,
                           module_projection=module_proj, max_error=error)


@torch.no_grad()
def attention_map(vllm: VLLM, image, question: str, *, layer: int) -> np.ndarray:
    """Raw attention weights from the last prompt token to each visual token at ``layer``, averaged
    over heads: a (rows, cols) heatmap on the patch grid (LLaVA-NeXT: its base image's), refused when
    the visual tokens have none."""
    layer = vllm.adapter.check_layer(layer)
    inputs, start, stop, T = prepare(vllm, image, question)
    layout = inputs.layout(0)
    layout.require_map("attention_map", vllm.backbone)
    site = f"llm.layers.{layer}.attn"
    run = vllm.run(inputs, trace=[site], trace_inputs=True)
    weights = vllm.adapter.attention_weights(layer, run.inputs[site], run.kwargs[site], T).mean(0)
    return layout.on_map(weights[start:stop].float().cpu().numpy())


@torch.no_grad()
def attention_sources(vllm: VLLM, image, question: str, *, target: str | None = None) -> dict:
    """Every layer's attention output at T split exactly into what its visual-token sources and its text
    sources (every other position) add to the answer's logit (direct logit attribution), from one pass.

    Returns ``{"target_id", "visual", "text", "bias", "module"}`` with one value per layer in the last four;
    ``visual + text + bias == module`` (the attention output's own projection) up to float error."""
    inputs, start, stop, T = prepare(vllm, image, question)
    L = vllm.n_layers
    sites = [f"llm.layers.{layer}.attn" for layer in range(L)]
    run = vllm.run(inputs, trace=sites + ["llm.norm"], trace_inputs=True)
    y = int(run.logits[0, T].argmax()) if target is None else vllm.encode_target(target)[0]
    direction, _ = vllm.adapter.logit_direction(run.inputs["llm.norm"][0, T], y)
    out = {"target_id": y, "visual": [], "text": [], "bias": [], "module": []}
    for layer in range(L):
        per_source, bias, module = _split(vllm, run, layer, T, direction)
        visual = float(per_source[start:stop].sum())
        out["visual"].append(visual)
        out["text"].append(float(per_source.sum()) - visual)
        out["bias"].append(bias)
        out["module"].append(module)
    return out


def source_profile(vllm: VLLM, records, *, only_correct: bool = True, n_boot: int = 1000, seed: int = 0,
                   progress: bool = True) -> ContributionProfile:
    """:func:`attention_sources` averaged over MMEdit records (``image``, ``src``, ``pred``): a
    :class:`ContributionProfile` with keys ``visual`` and ``text`` (its ``peak("visual")``,
    ``relative_peak_depth("visual")`` and ``early_share("visual")`` ask where the image is read). The
    paper's module contribution scores the whole attention output, whichever source it read. With
    ``only_correct`` only records whose first answer token the model gets right count."""
    from tqdm.auto import tqdm

    if len(records) == 0:
        raise ValueError("no records given: pass a non-empty list of MMEdit records")
    rows = []
    for rec in tqdm(records, desc="attention sources", disable=not progress):
        src = attention_sources(vllm, rec.image, rec.src)
        if only_correct and src["target_id"] != vllm.encode_target(rec.pred)[0]:
            continue
        rows.append([src["visual"], src["text"]])
    if not rows:
        raise ValueError("no record was answered correctly; pass only_correct=False to keep them all")
    return profile_from_rows(rows, ("visual", "text"), len(records), only_correct, n_boot, seed)
