"""Per-visual-token allocation: the attention output at T, split exactly over source positions.

At layer l, attn_out[T] = Σ_h Σ_j a_h[T, j] · v_j^h · W_O^h (+ bias). Projecting each source's term on
the direct-logit direction of y* (final-norm scale from the full residual stream × unembedding row)
gives how much each visual token, read at this layer, adds to the answer's logit.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from ..hooks import Trace
from ..models import VLLM


_NO_VISUAL = "this input has no visual tokens: pass an image (attribution over visual tokens needs one)"


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
    """Mixin for results holding one value per visual token (``visual``) and a ``grid``."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def heatmap(self) -> np.ndarray:
        """(rows, cols) array on the patch grid, or a (1, N_v) strip without a grid."""
        values = np.asarray(self.visual)
        return values.reshape(self.grid) if self.grid else values[None, :]


@dataclasses.dataclass(frozen=True)
class TokenAllocation(VisualTokenMap):
    """Allocation of one layer's attention output to source positions.

    ``visual``: (N_v,) contribution of each visual token; ``grid``: (rows, cols) or None for
    query-token backbones; ``text``: contribution of all non-visual positions together;
    ``module_projection``: the attention output's own projection; ``max_error``: |Σ terms + bias −
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

    def plot(self, image=None, mask=None, *, title: str | None = None):
        from ..viz import heatmap_overlay

        return heatmap_overlay(self.heatmap(), image=image, mask=mask,
                               title=title or f"Allocation at layer {self.layer} → '{self.target}'")


@torch.no_grad()
def token_allocation(vllm: VLLM, image, question: str, *, layer: int, target: str | None = None) -> TokenAllocation:
    """Exact allocation of layer ``layer``'s attention output at T to each visual token."""
    layer = vllm.adapter.check_layer(layer)
    inputs, start, stop, T = prepare(vllm, image, question)
    attn = vllm.site(f"llm.layers.{layer}.attn")
    with Trace({"attn": attn, "norm": vllm.site("llm.norm")}, inputs=True) as tr:
        logits = vllm.logits(inputs)[0, T]
    y = int(logits.argmax()) if target is None else vllm.encode_target(target)[0]
    terms = vllm.adapter.attention_terms(layer, tr.inputs["attn"], tr.kwargs["attn"], T)  # (H, T+1, d)
    direction = vllm.adapter.final_norm_scale(tr.inputs["norm"][0, T]).float() * vllm.site("lm_head").weight[y].float()
    per_source = (terms.float() @ direction).sum(0)  # (T+1,)
    bias = vllm.adapter.attention_output_bias(layer)
    bias_proj = float(bias.float() @ direction) if bias is not None else 0.0
    module_proj = float(tr.outputs["attn"][0, T].float() @ direction)
    error = abs(float(per_source.sum()) + bias_proj - module_proj)
    visual = per_source[start:stop]
    return TokenAllocation(layer=layer, target=vllm.tokenizer.decode([y]).strip(),
                           visual=tuple(visual.tolist()), grid=vllm.adapter.visual_grid(stop - start),
                           text=float(per_source.sum() - visual.sum()), bias=bias_proj,
                           module_projection=module_proj, max_error=error)


@torch.no_grad()
def attention_map(vllm: VLLM, image, question: str, *, layer: int) -> np.ndarray:
    """Raw attention weights from the last prompt token to each visual token at ``layer``, averaged
    over heads: a (rows, cols) heatmap (or a 1×N strip)."""
    layer = vllm.adapter.check_layer(layer)
    inputs, start, stop, T = prepare(vllm, image, question)
    with Trace({"attn": vllm.site(f"llm.layers.{layer}.attn")}, inputs=True) as tr:
        vllm.logits(inputs)
    weights = vllm.adapter.attention_weights(layer, tr.inputs["attn"], tr.kwargs["attn"], T).mean(0)
    values = weights[start:stop].float().numpy()
    grid = vllm.adapter.visual_grid(stop - start)
    return values.reshape(grid) if grid else values[None, :]
