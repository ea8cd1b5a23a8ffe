"""Captum integrated gradients on visual tokens: on their hidden states at an LLM layer, or on pixels.

Both attribute the logit of y* at the last prompt token T. The layer variant integrates along the
straight path from a baseline to the clean visual-token states at the *output* of layer l (the rest of
the sequence stays clean); the pixel variant integrates over ``pixel_values`` and sums attributions
inside each patch. Both report Captum's convergence delta, relative to f(input) − f(baseline).

Convergence by construction: with a ``tolerance`` the path integral starts at ``n_steps`` Gauss–Legendre
nodes and doubles them until the relative delta is within the tolerance, up to ``max_steps``; the result
says how many steps it took and whether it converged, and a bound that is hit warns in one line.

Baselines in token space must keep the image-placeholder ids, or the image disappears from the input:
:func:`token_baseline` is the one place that rule lives.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import torch

from ..hooks import edit_output
from ..models import VLLM
from .allocation import VisualTokenMap, prepare


def _pixel_grid(vllm: VLLM, inputs) -> tuple[int, int]:
    """The patch grid pixel IG sums onto, or a one-line refusal for a backbone without one."""
    shape = tuple(inputs.tensors["pixel_values"].shape)
    if len(shape) != 4:
        raise vllm.adapter.unsupported("integrated gradients on pixels", f"its pixel values {shape} are not one "
                                       "image per item (B, 3, H, W); attribute a layer's visual tokens (layer=…)")
    return inputs.layout(0).require_grid("integrated gradients on pixels (summed per patch)", vllm.backbone)


def pixel_ig_refusal(vllm: VLLM, image, question: str) -> str | None:
    """Why :func:`integrated_gradients` on pixels (``layer=None``) is refused for ``vllm``, in one line, or
    None when it runs (e.g. query tokens or flattened patches have no one image grid to sum onto)."""
    try:
        _pixel_grid(vllm, prepare(vllm, image, question)[0])
    except ValueError as err:
        return str(err)
    return None


def token_baseline(input_ids: torch.Tensor, image_token_id: int, fill_id: int, *,
                   keep: tuple[int, ...] = ()) -> torch.Tensor:
    """Baseline ids for token-space attribution: every token becomes ``fill_id`` except the image
    placeholders (and ids in ``keep``, e.g. BOS), which stay, so the baseline still holds the image."""
    keep_mask = input_ids == image_token_id
    for k in keep:
        keep_mask |= input_ids == k
    return torch.where(keep_mask, input_ids, torch.full_like(input_ids, fill_id))


@dataclasses.dataclass(frozen=True)
class IGResult(VisualTokenMap):
    """Integrated-gradients attribution over visual tokens.

    ``visual``: (N_v,) attribution per visual token (summed over hidden units, or over the patch's
    pixels and channels); ``delta``: Captum's convergence delta, |Σ attributions − (f(input) −
    f(baseline))|; ``relative_delta``: delta / |f(input) − f(baseline)|; ``n_steps``: the integration
    steps of the returned attribution; ``converged``: relative_delta ≤ ``tolerance`` (True when no
    tolerance was asked for).
    """

    where: str
    target: str
    visual: tuple[float, ...]
    grid: tuple[int, int] | None
    delta: float
    relative_delta: float
    output_difference: float
    n_steps: int
    cells: tuple[int, ...] | None = None
    converged: bool = True
    tolerance: float | None = None

    def plot(self, image=None, mask=None, *, title: str | None = None):
        from ..viz import heatmap_overlay

        return heatmap_overlay(self.heatmap(), image=image, mask=mask,
                               title=title or f"Integrated gradients ({self.where}) → '{self.target}'")


def converge(ig, x: torch.Tensor, base: torch.Tensor, diff: float, *, n_steps: int, tolerance: float | None,
             max_steps: int, internal_batch_size: int | None = None):
    """Captum's ``ig.attribute`` from ``base`` to ``x`` (one input, Gauss–Legendre) with ``n_steps``, doubled
    while the relative completeness delta exceeds ``tolerance`` (at most ``max_steps``; None: once).
    ``diff`` = f(x) − f(base). Returns (attributions, steps, delta, relative delta, converged)."""
    steps = n_steps
    while True:
        with torch.enable_grad():
            attr = ig.attribute(x, baselines=base, n_steps=steps, method="gausslegendre",
                                internal_batch_size=internal_batch_size)
        delta = abs(float(attr.sum()) - diff)  # Captum's convergence delta for one input
        relative = delta / max(abs(diff), 1e-12)
        converged = tolerance is None or relative <= tolerance
        if converged or steps >= max_steps:
            return attr, steps, delta, relative, converged
        steps = min(2 * steps, max_steps)


class IGConvergenceWarning(UserWarning):
    """Integrated gradients hit ``max_steps`` before the relative delta fell within the tolerance."""


def integrated_gradients(vllm: VLLM, image, question: str, *, layer: int | None = None, target: str | None = None,
                         n_steps: int = 64, tolerance: float | None = 0.05, max_steps: int = 1024,
                         internal_batch_size: int = 16, baseline: str = "mean") -> IGResult:
    """Integrated gradients of y*'s logit at T w.r.t. the visual tokens.

    ``layer=None`` → on the input pixels (baseline: the all-zero normalised image, i.e. the processor's
    mean colour; ``baseline`` is ignored); ``layer=l`` → on the visual-token hidden states at the output
    of LLM layer l. Layer baselines: ``"mean"`` (default) replaces every visual token by the mean visual
    token — an image with no spatial information; ``"zeros"`` is the textbook choice but sits where
    the next RMSNorm divides by ≈ 0, so the path integral converges badly (large deltas).

    Steps: start with ``n_steps`` and, while the relative delta exceeds ``tolerance``, double them (at
    most ``max_steps``); if the bound is reached first, the last attribution is returned with
    ``converged=False`` and an :class:`IGConvergenceWarning`. ``tolerance=None``: exactly ``n_steps``.
    """
    from captum.attr import IntegratedGradients

    if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 2:
        raise ValueError(f"n_steps must be an int ≥ 2, got {n_steps!r}")
    if tolerance is not None and not tolerance > 0:
        raise ValueError(f"tolerance must be > 0 (a relative delta, e.g. 0.05) or None for a fixed n_steps, "
                         f"got {tolerance!r}")
    if tolerance is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int)
                                  or max_steps < n_steps):
        raise ValueError(f"max_steps must be an int ≥ n_steps ({n_steps}), got {max_steps!r}")
    if baseline not in ("zeros", "mean"):
        raise ValueError(f"baseline must be 'zeros' or 'mean', got {baseline!r}")
    inputs, start, stop, T = prepare(vllm, image, question)
    layout = inputs.layout(0)
    grid, cells = layout.map_grid, layout.map_cells
    if layer is None:
        grid, cells = _pixel_grid(vllm, inputs), None
    with torch.no_grad():
        logits = vllm.logits(inputs)[0, T]
    y = int(logits.argmax()) if target is None else vllm.encode_target(target)[0]

    if layer is None:
        pixels = inputs.tensors["pixel_values"]

        def forward(px: torch.Tensor) -> torch.Tensor:
            return vllm.run(vllm.repeat(inputs, px.shape[0]) | {"pixel_values": px}, grad=True).logits[:, T, y]

        x, base = pixels, torch.zeros_like(pixels)
        where = "pixels"
    else:
        layer = vllm.adapter.check_layer(layer)
        name = f"llm.layers.{layer}"
        x = vllm.run(inputs, trace=[name]).outputs[name][:, start:stop].clone()
        base = torch.zeros_like(x) if baseline == "zeros" else x.mean(1, keepdim=True).expand_as(x).clone()
        current: dict[str, torch.Tensor] = {}

        def patch(h: torch.Tensor) -> torch.Tensor:
            h = h.clone()
            h[:, start:stop] = current["v"]
            return h

        def forward(v: torch.Tensor) -> torch.Tensor:
            current["v"] = v
            with edit_output(vllm.site(name), patch):
                return vllm.run(vllm.repeat(inputs, v.shape[0]), grad=True).logits[:, T, y]

        where = f"layer {layer}"

    with torch.no_grad():
        diff = float(forward(x) - forward(base))
    attr, steps, d, relative, converged = converge(IntegratedGradients(forward), x, base, diff, n_steps=n_steps,
                                                   tolerance=tolerance, max_steps=max_steps,
                                                   internal_batch_size=internal_batch_size)
    if not converged:
        hint = (", or attribute a layer's visual tokens (layer=…)" if layer is None
                else ", or use baseline='mean'" if baseline == "zeros" else "")
        warnings.warn(f"integrated gradients on {where} stopped at max_steps={max_steps} with relative delta "
                      f"{relative:.3f} > tolerance {tolerance}: raise max_steps or the tolerance{hint}",
                      IGConvergenceWarning, stacklevel=2)
    if layer is None:
        per_pixel = attr[0].sum(0)  # (H, W)
        rows, cols = grid
        ph, pw = per_pixel.shape[0] // rows, per_pixel.shape[1] // cols
        visual = per_pixel[: rows * ph, : cols * pw].reshape(rows, ph, cols, pw).sum((1, 3)).flatten()
    else:
        visual = attr[0].sum(-1)
    return IGResult(where=where, target=vllm.tokenizer.decode([y]).strip(), visual=tuple(visual.float().tolist()),
                    grid=grid, cells=cells, delta=d, relative_delta=relative, output_difference=diff,
                    n_steps=steps, converged=converged, tolerance=tolerance)
