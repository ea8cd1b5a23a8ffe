"""Backbone adapters: one per transformers architecture class, registered by class.

An adapter maps canonical site names to the modules of one architecture and knows where its visual
tokens sit. Callers never look at a model's class or name; they ask the adapter.

Canonical sites (``L`` = number of LLM layers):

====================  =====================================================
``llm.embed``          token embedding
``llm.layers.{l}``     decoder layer ``l`` (0 ≤ l < L); its output is the residual stream after l
``llm.layers.{l}.attn``  self-attention of layer ``l`` (output = the attention module's output)
``llm.layers.{l}.mlp``   MLP of layer ``l``
``llm.norm``           final norm before the head
``lm_head``            unembedding
``vision_tower``       vision encoder
``projector``          multimodal projector
====================  =====================================================
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from typing import Callable

import numpy as np
import torch
from torch import nn

from .devices import onloaded

_REGISTRY: dict[type, type["BackboneAdapter"]] = {}


def register_backbone(model_class: type) -> Callable[[type["BackboneAdapter"]], type["BackboneAdapter"]]:
    """Class decorator: use the decorated adapter for models that are instances of ``model_class``."""

    def wrap(adapter: type[BackboneAdapter]) -> type[BackboneAdapter]:
        _REGISTRY[model_class] = adapter
        return adapter

    return wrap


def adapter_for(model: nn.Module) -> "BackboneAdapter":
    """The registered adapter for ``model``'s architecture class (nearest class in its MRO)."""
    for cls in type(model).__mro__:
        if cls in _REGISTRY:
            return _REGISTRY[cls](model)
    known = ", ".join(sorted(c.__name__ for c in _REGISTRY))
    raise ValueError(f"unknown backbone {type(model).__name__}: no adapter registered for it (known: {known}). "
                     "Add one with @visedit.models.register_backbone(YourModelClass).")


@dataclasses.dataclass(frozen=True)
class PromptFrame:
    """A backbone's conversation frame, used for every prompt (:meth:`VLLM.format_prompt`) and every
    in-context demonstration (IKE), so the two can never disagree.

    ``template`` holds ``{image}`` (``image`` with the image token as ``{token}``, or nothing) and
    ``{question}``.
    With ``image_in_text=False`` the processor places the image tokens itself (BLIP-2's query tokens go
    before the text) and ``{image}`` is always empty.
    """

    template: str = "USER: {image}{question} ASSISTANT:"
    image: str = "{token}\n"
    image_in_text: bool = True

    def prompt(self, question: str, image_token: str | None = None) -> str:
        """``question`` in the frame; ``image_token`` (or None for a text-only prompt) where the image goes."""
        image = self.image.format(token=image_token) if image_token is not None and self.image_in_text else ""
        return self.template.format(image=image, question=question.strip())

    def turn(self, question: str, answer: str) -> str:
        """One text-only exchange: the framed question followed by its answer (IKE's demonstrations)."""
        return f"{self.prompt(question)} {answer.strip()}"


@dataclasses.dataclass(frozen=True)
class VisualLayout:
    """Where one item's ``n_tokens`` visual tokens come from in the image.

    ``grids``: the (rows, cols) patch grid of each image part, in token order — one grid (LLaVA), one
    grid per input whose size depends on the image (Qwen2-VL), several grids (LLaVA-NeXT's base image and
    tiles) — or empty when the tokens have no spatial arrangement (BLIP-2's learned query tokens).
    ``newlines``: per grid, True when a newline token closes each of its rows (LLaVA-NeXT's tiles), so
    that grid takes rows × (cols + 1) tokens; empty means none anywhere. The parts cover every token.
    """

    n_tokens: int
    grids: tuple[tuple[int, int], ...] = ()
    newlines: tuple[bool, ...] = ()

    def __post_init__(self) -> None:
        if self.newlines and len(self.newlines) != len(self.grids):
            raise ValueError(f"newlines has {len(self.newlines)} flags for {len(self.grids)} grids: give one per grid")
        covered = sum(rows * (cols + nl) for (rows, cols), nl in zip(self.grids, self._newlines()))
        if self.grids and covered != self.n_tokens:
            raise ValueError(f"the grids {self.grids} cover {covered} tokens, not the {self.n_tokens} visual tokens")

    def _newlines(self) -> tuple[bool, ...]:
        return self.newlines or (False,) * len(self.grids)

    @property
    def grid(self) -> tuple[int, int] | None:
        """The single patch grid covering every visual token, or None (no grid, or several)."""
        if len(self.grids) == 1 and not any(self.newlines):
            return tuple(self.grids[0])
        return None

    @property
    def map_grid(self) -> tuple[int, int] | None:
        """The grid that maps are drawn on: the only grid, or the first (LLaVA-NeXT's base image, which
        shows the whole image); None without a grid."""
        return tuple(self.grids[0]) if self.grids else None

    @property
    def map_cells(self) -> tuple[int, ...] | None:
        """The visual tokens of :attr:`map_grid`'s cells in row-major order when that grid does not hold
        every token (None when it does, or without a grid)."""
        if not self.grids or self.grid is not None:
            return None
        return tuple(int(i) for i in self.cells(0).ravel())

    def cells(self, part: int) -> np.ndarray:
        """(rows, cols) index of the visual token at each cell of grid ``part`` (newline tokens skipped)."""
        offset = 0
        for (rows, cols), nl in zip(self.grids[:part], self._newlines()):
            offset += rows * (cols + nl)
        rows, cols = self.grids[part]
        return offset + np.arange(rows)[:, None] * (cols + self._newlines()[part]) + np.arange(cols)[None, :]

    def describe(self) -> str:
        if not self.grids:
            return f"{self.n_tokens} visual tokens with no patch grid (query tokens)"
        if len(self.grids) > 1:
            shapes = " and ".join(f"{r}×{c}" for r, c in self.grids)
            extra = ", a newline token closing each row of the last" if self.newlines and self.newlines[-1] else ""
            return f"{self.n_tokens} visual tokens on {len(self.grids)} patch grids ({shapes}{extra})"
        return f"{self.n_tokens} visual tokens on a {self.grids[0][0]}×{self.grids[0][1]} grid"

    def require_grid(self, feature: str, backbone: str) -> tuple[int, int]:
        """The single grid, or a one-line refusal naming ``feature`` and ``backbone``."""
        if self.grid is None:
            raise ValueError(f"{feature} needs one patch grid, but {backbone} gives {self.describe()}: "
                             "use the per-token values (.visual) instead")
        return self.grid

    def require_map(self, feature: str, backbone: str) -> tuple[int, int]:
        """:attr:`map_grid`, or a one-line refusal naming ``feature`` and ``backbone`` without a grid."""
        if self.map_grid is None:
            raise ValueError(f"{feature} needs a patch grid, but {backbone} gives {self.describe()}: "
                             "use the per-token values instead")
        return self.map_grid

    def on_map(self, values: np.ndarray) -> np.ndarray:
        """Per-token ``values`` (n_tokens,) as a (rows, cols) map on :attr:`map_grid` (see :meth:`require_map`)."""
        values = np.asarray(values)
        return (values if self.map_cells is None else values[list(self.map_cells)]).reshape(self.map_grid)


class BackboneAdapter:
    """The backbone contract: everything architecture-specific lives behind these methods, so
    attribution and editing see only a :class:`~visedit.models.VLLM` and its :class:`Inputs`.

    Per architecture (subclass): the module map (:meth:`layers`, :meth:`_fixed_sites`,
    :meth:`_layer_sites`), :attr:`image_token_id`, :attr:`frame`, :meth:`visual_layout`, and — through a
    decoder mixin (:class:`LlamaFamilyMath`, :class:`OPTMath`) — the decoder math: :meth:`attention_state`,
    :meth:`attention_delta`, :meth:`attention_merge`, :meth:`attention_terms`, :meth:`attention_weights`,
    :meth:`attention_output_bias`, :meth:`logit_direction`. What an architecture cannot do raises a
    one-line ``ValueError`` naming the feature and the backbone (:meth:`unsupported`).
    """

    #: The conversation frame of prompts and in-context demonstrations.
    frame: PromptFrame = PromptFrame()
    #: The architecture's name in messages and in the support table.
    label: str = ""
    #: True where the decoder can run a prompt's shared head (through the end of its visual tokens) once
    #: and its tails from the key/value cache with positions that continue plainly (not Qwen2-VL's
    #: multimodal rotary positions, not a Q-Former model's query embeddings): ``score_batch(share_prefix=True)``.
    prefix_cache: bool = False

    def __init__(self, model: nn.Module):
        self.model = model

    def unsupported(self, feature: str, why: str = "") -> ValueError:
        """The one-line refusal for a feature this backbone does not support."""
        name = self.label or type(self).__name__
        return ValueError(f"{feature} is not supported for {name}{': ' + why if why else ''}")

    # --- the module map (per architecture) -----------------------------------------------------------
    def layers(self) -> nn.ModuleList:
        raise NotImplementedError

    def _fixed_sites(self) -> dict[str, nn.Module]:
        raise NotImplementedError

    def _layer_sites(self, layer: nn.Module) -> dict[str, nn.Module]:
        raise NotImplementedError

    @property
    def image_token_id(self) -> int:
        raise NotImplementedError

    @property
    def text_config(self):
        return getattr(self.model.config, "text_config", self.model.config)

    @property
    def d_model(self) -> int:
        """Width of the LLM's residual stream."""
        return int(self.text_config.hidden_size)

    # --- inputs (per architecture where the processor's output differs) ------------------------------
    def visual_grid(self, n_tokens: int) -> tuple[int, int] | None:
        """(rows, cols) of the fixed patch grid for ``n_tokens`` visual tokens, or None."""
        return None

    def visual_layout(self, encoding: dict, n_tokens: int) -> VisualLayout:
        """The layout of one item's visual tokens, from its processor output ``encoding``."""
        grid = self.visual_grid(n_tokens)
        return VisualLayout(n_tokens, (grid,) if grid else ())

    def image_tensors(self, encoding: dict) -> dict[str, torch.Tensor]:
        """The processor's tensors of one item other than the text ones (pixels and their extras)."""
        return {k: v for k, v in encoding.items() if k not in ("input_ids", "attention_mask")
                and isinstance(v, torch.Tensor) and not self.is_sequence_tensor(k)}

    def is_sequence_tensor(self, key: str) -> bool:
        """True for a processor tensor laid out like ``input_ids`` (padded and grown with the text)."""
        return key in ("mm_token_type_ids", "token_type_ids")

    def collate_images(self, per_item: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The image tensors of the items that have an image, joined into one batch (concatenated on
        the first dimension, which is how transformers batches them)."""
        keys = per_item[0] if per_item else {}
        return {k: torch.cat([item[k] for item in per_item]) for k in keys}

    def repeat_images(self, tensors: dict[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
        """Image tensors of a one-item batch, for ``n`` copies of that item."""
        return {k: v.expand(n, *v.shape[1:]) for k, v in tensors.items()}

    # --- the decoder math (per decoder family, through a mixin) --------------------------------------
    def attention_state(self, layer: int, hidden: torch.Tensor, kwargs: dict, query: int) -> dict:
        raise self.unsupported("exact attention decomposition")

    def attention_delta(self, state: dict, z: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise self.unsupported("the batched noise-perturbation engine", "use engine='loop'")

    def attention_merge(self, layer: int, heads: torch.Tensor) -> torch.Tensor:
        raise self.unsupported("the batched noise-perturbation engine", "use engine='loop'")

    def attention_output_bias(self, layer: int) -> torch.Tensor | None:
        raise self.unsupported("per-token allocation")

    def attention_weights(self, layer: int, hidden: torch.Tensor, kwargs: dict, query: int) -> torch.Tensor:
        """Attention weights (heads, query+1) of position ``query`` over positions 0…query at ``layer``,
        recomputed from the module's input ``hidden`` (1, S, d) and keyword arguments."""
        return self.attention_state(layer, hidden, kwargs, query)["scores"].softmax(-1)

    def attention_terms(self, layer: int, hidden: torch.Tensor, kwargs: dict, query: int) -> torch.Tensor:
        """Exact per-head, per-source decomposition of layer ``layer``'s attention output at ``query``.

        ``hidden``: the attention module's input (1, S, d); ``kwargs``: its keyword arguments. Returns
        (heads, query+1, d): term[h, j] = a[h, query, j]·v_j^h·W_O^h. Their sum over heads and sources,
        plus :meth:`attention_output_bias`, is the module's output at ``query``.
        """
        st = self.attention_state(layer, hidden, kwargs, query)
        with onloaded(self.output_projection(layer)):
            w = self.output_projection(layer).weight
            w_o = w.view(w.shape[0], -1, st["v"].shape[-1])  # (d, H, hd)
            per_head = torch.einsum("hjk,dhk->hjd", st["v"], w_o.to(st["v"].device))  # value_j of head h via W_O^h
        return st["scores"].softmax(-1)[:, :, None] * per_head

    def output_projection(self, layer: int) -> nn.Linear:
        raise self.unsupported("per-token allocation")

    def logit_direction(self, resid: torch.Tensor, token: int) -> tuple[torch.Tensor, float]:
        """Direct logit attribution through the final norm at the residual ``resid`` (d,): a direction u
        (d,) and a constant c with logit(token) = resid·u + c, so that any part r_i of the residual
        stream (Σ r_i = resid) contributes r_i·u — exactly."""
        raise self.unsupported("direct logit attribution")

    def vision_layers(self) -> list[nn.Module]:
        """The vision-encoder blocks whose output reaches the LLM, in order (fine-tuning the vision side)."""
        raise self.unsupported("fine-tuning the vision encoder (FT-V)")

    def query_patch_weights(self, inputs) -> tuple[torch.Tensor, tuple[int, int]]:
        """Where each visual token read the image, for visual tokens that are learned queries (a
        Q-Former's): weights (B_img, n_tokens, rows·cols), each row summing to 1, and the patch grid."""
        raise self.unsupported("mapping query tokens onto patches", "its visual tokens are not Q-Former queries")

    def cascade(self) -> list[tuple[str, nn.Module, float]]:
        """The model's blocks from the top down, for cascading randomisation (Adebayo et al., 2018): decoder
        layers L−1…0, the bridge to the LLM (``projector``; BLIP-2's ``qformer`` after it), then the
        vision blocks whose output reaches the LLM, last first (none where :meth:`vision_layers` is
        refused). Each as (name, module, the std of its part's initialiser). The head, the final norm
        and the embeddings are not in it."""
        text_std = float(getattr(self.text_config, "initializer_range", 0.02))
        vision_config = getattr(self.model.config, "vision_config", None)
        vision_std = float(getattr(vision_config, "initializer_range", text_std))
        bridge_std = float(getattr(self.model.config, "initializer_range", text_std))
        out = [(f"llm.layers.{l}", block, text_std) for l, block in reversed(list(enumerate(self.layers())))]
        fixed = self._fixed_sites()
        out += [(name, fixed[name], bridge_std) for name in ("projector", "qformer") if name in fixed]
        try:
            vision = self.vision_layers()
        except ValueError:
            vision = []
        out += [(f"vision.layers.{k}", block, vision_std) for k, block in reversed(list(enumerate(vision)))]
        return out

    def run_from(self, layer: int, hidden: torch.Tensor, kwargs: dict, *, until: int | None = None) -> torch.Tensor:
        """Run decoder layers ``layer``…L−1 (or …``until``) on ``hidden`` (B, S, d), the residual stream at
        the *input* of ``layer``, with that layer's recorded keyword arguments; returns the residual after
        the last layer run (B, S, d)."""
        kw = slice_kwargs(kwargs, hidden.shape[1])
        stop = None if until is None else self.check_layer(until) + 1
        for block in self.layers()[self.check_layer(layer):stop]:
            out = block(hidden, **kw)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    # --- shared ---------------------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return len(self.layers())

    def check_layer(self, layer: int) -> int:
        """Return ``layer`` if it indexes an LLM layer; negative values count from the end."""
        n = self.n_layers
        if isinstance(layer, bool) or not isinstance(layer, numbers.Integral):
            raise ValueError(f"layer must be an int, got {layer!r} ({type(layer).__name__}): this model has {n} "
                             f"LLM layers (0…{n - 1}, or negative from the end)")
        if not -n <= layer < n:
            raise ValueError(f"layer {layer!r} is out of range: this model has {n} LLM layers (0…{n - 1})")
        return int(layer) % n

    def site(self, name: str) -> nn.Module:
        """The module behind a canonical site name (see the module docstring)."""
        match = re.fullmatch(r"llm\.layers\.(-?\d+)(?:\.(attn|mlp))?", name)
        if match:
            layer = self.layers()[self.check_layer(int(match.group(1)))]
            return layer if match.group(2) is None else self._layer_sites(layer)[match.group(2)]
        fixed = self._fixed_sites()
        if name in fixed:
            return fixed[name]
        raise ValueError(f"unknown site {name!r}; sites are {', '.join(fixed)}, llm.layers.{{l}}, "
                         "llm.layers.{l}.attn, llm.layers.{l}.mlp")

    def site_names(self) -> list[str]:
        names = list(self._fixed_sites())
        for l in range(self.n_layers):
            names += [f"llm.layers.{l}", f"llm.layers.{l}.attn", f"llm.layers.{l}.mlp"]
        return names


def _kv_delta(attn: nn.Module, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Change of the keys and values (n, H_kv, N, hd) when ``z`` (n, N, d) is added to the input of the
    attention module ``attn``: the projections are linear, so their biases cancel."""
    n, N, hd = z.shape[0], z.shape[1], attn.head_dim
    with onloaded(attn.k_proj, attn.v_proj):  # weights accelerate offloads are read here, not called
        dk = (z @ attn.k_proj.weight.to(z.device).T).view(n, N, -1, hd).transpose(1, 2)
        dv = (z @ attn.v_proj.weight.to(z.device).T).view(n, N, -1, hd).transpose(1, 2)
    return dk, dv


class _AttentionOutput:
    """The output side shared by the decoder mixins: the attention module of a layer and its output
    projection (named ``o_proj`` or ``out_proj``)."""

    _out_proj = "o_proj"

    def _attn(self, layer: int) -> nn.Module:
        return self.layers()[self.check_layer(layer)].self_attn

    def output_projection(self, layer: int) -> nn.Linear:
        return getattr(self._attn(layer), self._out_proj)

    def attention_merge(self, layer: int, heads: torch.Tensor) -> torch.Tensor:
        """Per-head outputs (..., H, hd) → the attention module's output (..., d) (output projection)."""
        return self.output_projection(layer)(heads.flatten(-2))

    def attention_output_bias(self, layer: int) -> torch.Tensor | None:
        """The bias added after the attention heads are summed (None when there is none)."""
        proj = self.output_projection(layer)
        if proj.bias is None:
            return None
        with onloaded(proj):
            return proj.bias.detach().clone()


class LlamaFamilyMath(_AttentionOutput):
    """Decoder math of the Llama family (Llama, Vicuna, Mistral, Qwen2): q/k/v/o projections (biases
    allowed), grouped-query attention, rotary positions passed as ``position_embeddings``, RMSNorm.
    Mixed into an adapter that provides ``layers()`` and ``_final_norm()``."""

    def _rotate(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        return apply_rotary_pos_emb(q, k, cos, sin)

    def attention_state(self, layer: int, hidden: torch.Tensor, kwargs: dict, query: int) -> dict:
        """Clean last-row attention state of layer ``layer`` for ``hidden`` (1, ≥query+1, d).

        Returns q (H, hd) at ``query``, v (H, query+1, hd), scores (H, query+1) = q·k/√hd, the scaling,
        and the rotary tables, for :meth:`attention_delta` and :meth:`attention_merge`.
        """
        attn = self._attn(layer)
        hd, S = attn.head_dim, query + 1
        x = hidden[:, :S]
        q = attn.q_proj(x).view(1, S, -1, hd).transpose(1, 2)
        k = attn.k_proj(x).view(1, S, -1, hd).transpose(1, 2)
        v = attn.v_proj(x).view(1, S, -1, hd).transpose(1, 2)
        cos, sin = (t[..., :S, :] for t in kwargs["position_embeddings"])
        q, k = self._rotate(q, k, cos, sin)
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1)[0], v.repeat_interleave(rep, 1)[0]
        qT = q[0, :, -1]
        return {"q": qT, "v": v, "scores": torch.einsum("hk,hjk->hj", qT, k) * attn.scaling,
                "scaling": attn.scaling, "cos": cos, "sin": sin, "rep": rep, "attn": attn}

    def attention_delta(self, state: dict, z: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Change of the (roped) keys and of the values when ``z`` (n, N, d) is added to the module input
        at positions start…start+N. k and v projections are linear, so biases cancel. Returns two
        (n, H, N, hd) tensors."""
        rep, N = state["rep"], z.shape[1]
        dk, dv = _kv_delta(state["attn"], z)
        cos, sin = state["cos"][..., start:start + N, :], state["sin"][..., start:start + N, :]
        _, dk = self._rotate(dk, dk, cos, sin)
        return dk.repeat_interleave(rep, 1), dv.repeat_interleave(rep, 1)

    def final_norm_scale(self, resid: torch.Tensor) -> torch.Tensor:
        """The final RMSNorm as a per-position linear map: norm(x) = scale ⊙ x at this residual ``resid``."""
        norm = self._final_norm()
        eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
        rms = resid.float().pow(2).mean(-1, keepdim=True).add(eps).rsqrt()
        with onloaded(norm):
            return norm.weight.to(rms.device) * rms

    def logit_direction(self, resid: torch.Tensor, token: int) -> tuple[torch.Tensor, float]:
        """RMSNorm is linear at a fixed residual: u = scale ⊙ W_U[token], c = the head's bias (if any).
        The direction is on ``resid``'s device."""
        head = self.site("lm_head")
        with onloaded(head):
            direction = self.final_norm_scale(resid).float() * head.weight[token].float().to(resid.device)
            return direction, float(head.bias[token]) if getattr(head, "bias", None) is not None else 0.0


class OPTMath(_AttentionOutput):
    """Decoder math of OPT (BLIP-2 OPT): learned absolute positions added before the first layer,
    q/k/v/out projections with biases, no rotary tables, pre-LayerNorm blocks and a final LayerNorm.
    LayerNorm is affine at a fixed residual, so direct logit attribution stays exact (the norm's bias
    becomes a constant). Mixed into an adapter that provides ``layers()`` and ``_final_norm()``."""

    _out_proj = "out_proj"

    def attention_state(self, layer: int, hidden: torch.Tensor, kwargs: dict, query: int) -> dict:
        attn = self._attn(layer)
        hd, S = attn.head_dim, query + 1
        x = hidden[:, :S]
        q = attn.q_proj(x[:, -1]).view(-1, hd)  # (H, hd)
        k = attn.k_proj(x).view(S, -1, hd).transpose(0, 1)
        v = attn.v_proj(x).view(S, -1, hd).transpose(0, 1)
        return {"q": q, "v": v, "scores": torch.einsum("hk,hjk->hj", q, k) * attn.scaling,
                "scaling": attn.scaling, "rep": 1, "attn": attn}

    def attention_delta(self, state: dict, z: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        return _kv_delta(state["attn"], z)

    def logit_direction(self, resid: torch.Tensor, token: int) -> tuple[torch.Tensor, float]:
        """LayerNorm(x) = w ⊙ (x − mean x)/σ + b with σ fixed by ``resid``: u = P(w ⊙ W_U[token])/σ where P
        removes the mean (P is symmetric, so r·u = P(r)·(w ⊙ W_U)/σ), c = b·W_U[token] (+ the head's bias)."""
        norm, head = self._final_norm(), self.site("lm_head")
        x = resid.float()
        sigma = (x.var(-1, unbiased=False) + norm.eps).sqrt()
        with onloaded(norm, head):
            w_u = head.weight[token].float().to(x.device)
            u = norm.weight.float().to(x.device) * w_u / sigma
            c = float(norm.bias.float().to(x.device) @ w_u) if norm.bias is not None else 0.0
            if getattr(head, "bias", None) is not None:
                c += float(head.bias[token])
        return u - u.mean(), c


def _llava_class():
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration


class _VisionLanguageModel(LlamaFamilyMath, BackboneAdapter):
    """The transformers layout of LLaVA-style models: ``model.model.language_model`` (a Llama-family
    decoder), ``model.lm_head``, image tokens in the text at ``config.image_token_id``. Subclasses name
    the vision side (:meth:`_vision_sites`)."""

    def _lm(self) -> nn.Module:
        return self.model.model.language_model

    def _final_norm(self) -> nn.Module:
        return self._lm().norm

    def layers(self) -> nn.ModuleList:
        return self._lm().layers

    def _vision_sites(self) -> dict[str, nn.Module]:
        raise NotImplementedError

    def _fixed_sites(self) -> dict[str, nn.Module]:
        return {"llm.embed": self._lm().embed_tokens, "llm.norm": self._lm().norm, "lm_head": self.model.lm_head,
                **self._vision_sites()}

    def _layer_sites(self, layer: nn.Module) -> dict[str, nn.Module]:
        return {"attn": layer.self_attn, "mlp": layer.mlp}

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)


@register_backbone(_llava_class())
class LlavaAdapter(_VisionLanguageModel):
    """LLaVA (``LlavaForConditionalGeneration``): CLIP-style tower → projector → a Llama-family LLM
    (Llama / Vicuna, Mistral, Qwen2)."""

    label = "LLaVA"
    prefix_cache = True

    def _vision_sites(self) -> dict[str, nn.Module]:
        return {"vision_tower": self.model.model.vision_tower, "projector": self.model.model.multi_modal_projector}

    def vision_layers(self) -> list[nn.Module]:
        """The vision-tower blocks whose output reaches the projector (up to ``vision_feature_layer``)."""
        layers = list(self.model.model.vision_tower.encoder.layers)
        feature_layer = self.model.config.vision_feature_layer
        if not isinstance(feature_layer, int):  # a list of layers: everything up to the deepest is used
            feature_layer = max(feature_layer, key=lambda l: l % (len(layers) + 1))
        # hidden_states[0] is the embedding output, so hidden_states[k] is the output of block k-1
        stop = feature_layer % (len(layers) + 1)
        return layers[:stop]

    def visual_grid(self, n_tokens: int) -> tuple[int, int] | None:
        vc = self.model.config.vision_config
        size = vc.image_size if isinstance(vc.image_size, (tuple, list)) else (vc.image_size, vc.image_size)
        patch = vc.patch_size
        grid = (size[0] // patch, size[1] // patch)
        return grid if grid[0] * grid[1] == n_tokens else None


def _llava_next_class():
    from transformers import LlavaNextForConditionalGeneration

    return LlavaNextForConditionalGeneration


@register_backbone(_llava_next_class())
class LlavaNextAdapter(LlavaAdapter):
    """LLaVA-NeXT / LLaVA-1.6 (``LlavaNextForConditionalGeneration``), "anyres": the image is read twice,
    resized to the vision tower's resolution (the base image) and, at the best of the configured
    ``image_grid_pinpoints`` resolutions, cut into tiles of that size. Its visual tokens are the base
    image's patch grid, then the tiles' patches as one grid with the padding removed and a learned
    newline token closing each row. Maps are drawn on the base grid, which shows the whole image; the
    pixel values are the base image and its tiles (B, 1 + tiles, 3, H, W), not one image."""

    label = "LLaVA-NeXT"

    def visual_layout(self, encoding: dict, n_tokens: int) -> VisualLayout:
        """The base grid, then the unpadded grid of the tiles (with its newline tokens), computed as the
        model packs them from the original image size (``image_sizes``) and the pinpoints."""
        from transformers.image_processing_utils import select_best_resolution
        from transformers.models.llava_next.modeling_llava_next import unpad_image

        vision = self.model.config.vision_config
        side = vision.image_size // vision.patch_size  # patches along a side of the base image and of a tile
        size = [int(x) for x in encoding["image_sizes"][0]]  # (H, W) of the original image
        height, width = select_best_resolution(size, self.model.config.image_grid_pinpoints)
        padded = torch.empty(0, height // vision.image_size * side, width // vision.image_size * side)
        rows, cols = unpad_image(padded, size).shape[1:]
        if side * side + rows * (cols + 1) != n_tokens:  # a tower that keeps its CLS token ("full"): no grid
            return VisualLayout(n_tokens)
        return VisualLayout(n_tokens, ((side, side), (rows, cols)), (False, True))

    def collate_images(self, per_item: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Each item's base image and tiles, padded with blank tiles to the most tiles in the batch (as
        the processor batches them: the model reads as many tiles as each item's ``image_sizes`` gives)."""
        most = max((item["pixel_values"].shape[1] for item in per_item), default=0)
        padded = []
        for item in per_item:  # (1, tiles + 1, 3, H, W): pad the second dimension at its end
            blank = most - item["pixel_values"].shape[1]
            padded.append({**item, "pixel_values": torch.nn.functional.pad(item["pixel_values"], (0,) * 7 + (blank,))})
        return super().collate_images(padded)


def _llava_onevision_class():
    from transformers import LlavaOnevisionForConditionalGeneration

    return LlavaOnevisionForConditionalGeneration


def onevision_tile_grid(config, size) -> tuple[int, int]:
    """(rows, cols) of LLaVA-OneVision's packed tile grid for an image of ``size`` (H, W), as the model
    packs it: the tiles' patches at the best of ``image_grid_pinpoints`` with the padding removed (as
    LLaVA-NeXT), then shrunk by bilinear interpolation when they hold more than ``anyres_max_K`` base
    images' worth of patches by over 10 % (``vision_aspect_ratio``)."""
    from transformers.image_processing_utils import select_best_resolution
    from transformers.models.llava_onevision.modeling_llava_onevision import unpad_image

    vision = config.vision_config
    side = vision.image_size // vision.patch_size
    height, width = select_best_resolution([int(x) for x in size], config.image_grid_pinpoints)
    padded = torch.empty(0, height // vision.image_size * side, width // vision.image_size * side)
    rows, cols = unpad_image(padded, [int(x) for x in size]).shape[1:]
    most = int(config.vision_aspect_ratio.strip("anyres_max_"))  # the model's own parse of "anyres_max_9"
    ratio = math.sqrt(rows * cols / (most * side ** 2))
    if ratio > 1.1:
        rows, cols = int(rows // ratio), int(cols // ratio)
    return rows, cols


def onevision_token_counts(config, encoding: dict) -> list[int]:
    """Visual tokens of each image of an image-processor output (``image_sizes``) in LLaVA-OneVision: the
    base image's grid, then the tile grid of :func:`onevision_tile_grid` with a newline token per row."""
    side = config.vision_config.image_size // config.vision_config.patch_size
    counts = []
    for size in encoding["image_sizes"]:
        rows, cols = onevision_tile_grid(config, size)
        counts.append(side * side + rows * (cols + 1))
    return counts


@register_backbone(_llava_onevision_class())
class LlavaOnevisionAdapter(LlavaNextAdapter):
    """LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``): a SigLIP tower (no class token), a
    projector and a Qwen2 decoder, read in Qwen's chat frame. Its "anyres_max_K" layout is LLaVA-NeXT's —
    the base image's grid, then the unpadded tile grid with a newline token closing each row — except
    that a tile grid holding more than K base images' worth of patches is shrunk (bilinear) to that
    budget. Maps are drawn on the base grid, as for LLaVA-NeXT."""

    label = "LLaVA-OneVision"
    frame = PromptFrame("<|im_start|>user {image}{question}<|im_end|>\n<|im_start|>assistant\n")

    def visual_layout(self, encoding: dict, n_tokens: int) -> VisualLayout:
        """The base grid, then the (possibly shrunk) tile grid with its newline tokens; no grid when the
        count differs (an image read without tiles ends with one newline token)."""
        vision = self.model.config.vision_config
        side = vision.image_size // vision.patch_size
        rows, cols = onevision_tile_grid(self.model.config, encoding["image_sizes"][0])
        if side * side + rows * (cols + 1) != n_tokens:
            return VisualLayout(n_tokens)
        return VisualLayout(n_tokens, ((side, side), (rows, cols)), (False, True))

    def image_tensors(self, encoding: dict) -> dict[str, torch.Tensor]:
        """Pixels and ``image_sizes``; ``batch_num_images`` is left out (one image per item: the model then
        reads every image with its tiles, as it does for a single image)."""
        return {k: v for k, v in super().image_tensors(encoding).items() if k != "batch_num_images"}


def _blip2_class():
    from transformers import Blip2ForConditionalGeneration

    return Blip2ForConditionalGeneration


def _qwen2_vl_class():
    from transformers import Qwen2VLForConditionalGeneration

    return Qwen2VLForConditionalGeneration


@register_backbone(_qwen2_vl_class())
class Qwen2VLAdapter(_VisionLanguageModel):
    """Qwen2-VL (``Qwen2VLForConditionalGeneration``): a ViT with 2-D rotary positions whose 2×2 patch
    groups are merged into one visual token each, → a Qwen2 decoder with multimodal rotary positions
    (M-RoPE). Images keep their aspect ratio, so each input has its own grid (``image_grid_thw``). The
    rotary tables reach the attention already recomposed per position, so the Llama-family math holds;
    pixel values are flattened patches, so integrated gradients on pixels are refused."""

    label = "Qwen2-VL"
    frame = PromptFrame("<|im_start|>user\n{image}{question}<|im_end|>\n<|im_start|>assistant\n",
                        image="<|vision_start|>{token}<|vision_end|>")

    def _vision_sites(self) -> dict[str, nn.Module]:
        return {"vision_tower": self.model.model.visual, "projector": self.model.model.visual.merger}

    def vision_layers(self) -> list[nn.Module]:
        return list(self.model.model.visual.blocks)

    def visual_layout(self, encoding: dict, n_tokens: int) -> VisualLayout:
        t, h, w = (int(x) for x in encoding["image_grid_thw"][0])
        merge = self.model.config.vision_config.spatial_merge_size
        return VisualLayout(n_tokens, ((h // merge, w // merge),) if t == 1 else ())

    def repeat_images(self, tensors: dict[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
        """Flattened patches and grids of one image, for ``n`` copies (concatenated, as Qwen2-VL batches)."""
        return {k: v.repeat(n, *([1] * (v.dim() - 1))) for k, v in tensors.items()}


def _qwen2_5_vl_class():
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration


@register_backbone(_qwen2_5_vl_class())
class Qwen25VLAdapter(Qwen2VLAdapter):
    """Qwen2.5-VL shares Qwen2-VL's layout and decoder; its ViT attends within windows (and SwiGLU MLPs)."""

    label = "Qwen2.5-VL"


def _decoder_math(language_model: nn.Module) -> type:
    """The decoder-math mixin for a causal LM, chosen by its architecture class."""
    from transformers import (LlamaForCausalLM, MistralForCausalLM, OPTForCausalLM, Qwen2ForCausalLM)

    for cls, math in ((OPTForCausalLM, OPTMath), (LlamaForCausalLM, LlamaFamilyMath),
                      (MistralForCausalLM, LlamaFamilyMath), (Qwen2ForCausalLM, LlamaFamilyMath)):
        if isinstance(language_model, cls):
            return math
    raise ValueError(f"no decoder math for {type(language_model).__name__}: visedit knows OPT and the Llama family "
                     "(Llama, Mistral, Qwen2)")


@register_backbone(_blip2_class())
class Blip2Adapter(BackboneAdapter):
    """BLIP-2 (``Blip2ForConditionalGeneration``): a frozen ViT → Q-Former (learned query tokens) → a
    linear projection → a decoder LLM. With an OPT decoder it is the paper's BLIP-2 OPT; with a Llama
    (Vicuna) decoder it is MiniGPT-4's design. The visual tokens are the projected query tokens, placed
    by the processor before the text: they have no patch grid, so grid-needing features refuse.

    The MLP site of an OPT layer is its ``fc2`` (whose output is what the MLP adds to the residual; FT-L
    and MEND tune ``fc2`` there); a Llama layer's is its ``mlp``.
    """

    frame = PromptFrame("Question: {question} Answer:", image_in_text=False)

    #: decoder math → the concrete adapter, for the class registered on the architecture
    variants: dict = {}

    def __new__(cls, model):
        if "variants" in cls.__dict__:
            cls = cls.variants[_decoder_math(model.language_model)]
        return super().__new__(cls)

    def _decoder(self) -> nn.Module:
        lm = self.model.language_model.model
        return lm.decoder if hasattr(lm, "decoder") else lm

    def layers(self) -> nn.ModuleList:
        return self._decoder().layers

    def _final_norm(self) -> nn.Module:
        dec = self._decoder()
        return dec.final_layer_norm if hasattr(dec, "final_layer_norm") else dec.norm

    def _fixed_sites(self) -> dict[str, nn.Module]:
        return {"llm.embed": self._decoder().embed_tokens, "llm.norm": self._final_norm(),
                "lm_head": self.model.language_model.lm_head, "vision_tower": self.model.vision_model,
                "qformer": self.model.qformer, "projector": self.model.language_projection}

    def _layer_sites(self, layer: nn.Module) -> dict[str, nn.Module]:
        return {"attn": layer.self_attn, "mlp": layer.fc2 if hasattr(layer, "fc2") else layer.mlp}

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    def vision_layers(self) -> list[nn.Module]:
        """Every ViT block (the Q-Former reads the ViT's last layer)."""
        return list(self.model.vision_model.encoder.layers)

    @torch.no_grad()
    def query_patch_weights(self, inputs) -> tuple[torch.Tensor, tuple[int, int]]:
        """The Q-Former's cross-attention from each query token to the encoder's patches, averaged over
        heads and over the layers that cross-attend: W (B_img, Q, rows·cols) and (rows, cols).

        Each cross-attention is recomputed from its recorded inputs as the module computes it,
        softmax_j(q·k_j/√d) over the encoder's class token and patches (any attention implementation;
        ``sdpa`` returns no weights). The class token's column is then dropped and each row renormalised
        over the patches, so its share goes to the patches in proportion to their own and every row sums
        to 1. The forward pass stops after the Q-Former."""
        from ..hooks import Trace, stop_after

        layers = [layer for layer in self.model.qformer.encoder.layer if layer.has_cross_attention]
        sites = {f"cross.{i}": layer.crossattention.attention for i, layer in enumerate(layers)}
        tensors = inputs.tensors if hasattr(inputs, "tensors") else inputs
        if "pixel_values" not in tensors or (hasattr(inputs, "visual_spans") and all(
                span is None for span in inputs.visual_spans)):
            raise ValueError(f"mapping query tokens onto patches needs an image; these {self.label} inputs have none")
        with Trace(sites, inputs=True, outputs=False) as trace, stop_after(self.model.qformer):
            self.model(**tensors, use_cache=False)
        per_layer = []
        for name, attn in sites.items():
            h, kw = trace.inputs[name], trace.kwargs[name]
            image = kw["encoder_hidden_states"]
            hd = attn.attention_head_size
            q = attn.query(h).view(*h.shape[:2], -1, hd).transpose(1, 2)
            k = attn.key(image.to(h.dtype)).view(*image.shape[:2], -1, hd).transpose(1, 2)
            scores = (q @ k.transpose(-1, -2)).float() * attn.scaling  # (B, H, Q, 1 + patches)
            mask = kw.get("encoder_attention_mask")
            if isinstance(mask, torch.Tensor):
                scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
            per_layer.append(scores.softmax(-1).mean(1))
        weights = torch.stack(per_layer).mean(0)
        vision = self.model.config.vision_config
        side = vision.image_size // vision.patch_size
        if weights.shape[-1] != 1 + side * side:
            raise self.unsupported("mapping query tokens onto patches", f"the encoder gives {weights.shape[-1]} tokens, "
                                   f"not a class token and a {side}×{side} grid")
        patches = weights[..., 1:]
        return patches / patches.sum(-1, keepdim=True), (side, side)

    def collate_images(self, per_item: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """BLIP-2's forward needs pixels even for a text-only batch: a blank image, which no token reads."""
        if per_item:
            return super().collate_images(per_item)
        size = self.model.config.vision_config.image_size
        return {"pixel_values": torch.zeros(1, 3, size, size)}


class Blip2OPTAdapter(OPTMath, Blip2Adapter):
    label = "BLIP-2 (OPT)"


class Blip2LlamaAdapter(LlamaFamilyMath, Blip2Adapter):
    label = "BLIP-2 with a Llama decoder (MiniGPT-4's design)"


Blip2Adapter.variants = {OPTMath: Blip2OPTAdapter, LlamaFamilyMath: Blip2LlamaAdapter}


def _instructblip_class():
    from transformers import InstructBlipForConditionalGeneration

    return InstructBlipForConditionalGeneration


@register_backbone(_instructblip_class())
class InstructBlipAdapter(Blip2Adapter):
    """InstructBLIP (``InstructBlipForConditionalGeneration``): BLIP-2 whose Q-Former also reads the
    instruction (``qformer_input_ids``, padded per batch here), so the query tokens depend on the question."""

    def collate_images(self, per_item: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        if not per_item:  # a text-only batch: a blank image and a one-token instruction that no token reads
            pad = int(self.model.config.qformer_config.pad_token_id or 0)
            return {**super().collate_images(per_item), "qformer_input_ids": torch.tensor([[pad]]),
                    "qformer_attention_mask": torch.ones(1, 1, dtype=torch.long)}
        width = max(item["qformer_input_ids"].shape[1] for item in per_item)
        padded = []
        for item in per_item:
            extra = width - item["qformer_input_ids"].shape[1]
            padded.append({**item, "qformer_input_ids": torch.nn.functional.pad(item["qformer_input_ids"], (0, extra)),
                           "qformer_attention_mask": torch.nn.functional.pad(item["qformer_attention_mask"], (0, extra))})
        return super().collate_images(padded)


class InstructBlipOPTAdapter(OPTMath, InstructBlipAdapter):
    label = "InstructBLIP (OPT)"


class InstructBlipLlamaAdapter(LlamaFamilyMath, InstructBlipAdapter):
    label = "InstructBLIP (Vicuna / Llama)"


InstructBlipAdapter.variants = {OPTMath: InstructBlipOPTAdapter, LlamaFamilyMath: InstructBlipLlamaAdapter}


def slice_kwargs(kwargs: dict, length: int) -> dict:
    """Keyword arguments recorded from a layer or attention call, cut to the first ``length`` positions
    and stripped of caches (so a module can be re-run on a batch of edited copies)."""
    kw = dict(kwargs)
    if "position_embeddings" in kw and kw["position_embeddings"] is not None:
        cos, sin = kw["position_embeddings"]  # (B, S, hd), or (3, B, S, hd) for M-RoPE
        kw["position_embeddings"] = (cos[..., :length, :], sin[..., :length, :])
    mask = kw.get("attention_mask")
    if isinstance(mask, torch.Tensor):
        kw["attention_mask"] = mask[..., :length, :length]
    if isinstance(kw.get("position_ids"), torch.Tensor):
        kw["position_ids"] = kw["position_ids"][..., :length]
    for key in ("hidden_states", "cache", "past_key_values", "past_key_value", "use_cache", "cache_position"):
        kw.pop(key, None)
    return kw


def unembed(adapter: BackboneAdapter, hidden: torch.Tensor) -> torch.Tensor:
    """Logit lens: ``lm_head(final_norm(hidden))``; shape (..., d) → (..., vocab)."""
    return adapter.site("lm_head")(adapter.site("llm.norm")(hidden))
