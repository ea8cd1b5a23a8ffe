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

import numbers
import re
from typing import Callable

import torch
from torch import nn

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


class BackboneAdapter:
    """Maps canonical site names to modules. Subclasses fill :meth:`_sites` and the visual-token facts."""

    def __init__(self, model: nn.Module):
        self.model = model

    # --- to implement per architecture --------------------------------------------------------------
    def layers(self) -> nn.ModuleList:
        raise NotImplementedError

    def _fixed_sites(self) -> dict[str, nn.Module]:
        raise NotImplementedError

    def _layer_sites(self, layer: nn.Module) -> dict[str, nn.Module]:
        raise NotImplementedError

    @property
    def image_token_id(self) -> int:
        raise NotImplementedError

    def visual_grid(self, n_tokens: int) -> tuple[int, int] | None:
        """(rows, cols) of the patch grid for ``n_tokens`` visual tokens, or None if not spatial."""
        raise NotImplementedError

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

    def vision_layers(self) -> list[nn.Module]:
        """The vision-encoder blocks whose output reaches the LLM, in order (fine-tuning the vision side)."""
        raise NotImplementedError(f"{type(self).__name__} does not list its vision layers yet")

    def site_names(self) -> list[str]:
        names = list(self._fixed_sites())
        for l in range(self.n_layers):
            names += [f"llm.layers.{l}", f"llm.layers.{l}.attn", f"llm.layers.{l}.mlp"]
        return names


def _llava_class():
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration


@register_backbone(_llava_class())
class LlavaAdapter(BackboneAdapter):
    """LLaVA (``LlavaForConditionalGeneration``): CLIP-style tower → projector → decoder-only LLM."""

    def _lm(self) -> nn.Module:
        return self.model.model.language_model

    def layers(self) -> nn.ModuleList:
        return self._lm().layers

    def _fixed_sites(self) -> dict[str, nn.Module]:
        return {"llm.embed": self._lm().embed_tokens, "llm.norm": self._lm().norm, "lm_head": self.model.lm_head,
                "vision_tower": self.model.model.vision_tower, "projector": self.model.model.multi_modal_projector}

    def _layer_sites(self, layer: nn.Module) -> dict[str, nn.Module]:
        return {"attn": layer.self_attn, "mlp": layer.mlp}

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    def vision_layers(self) -> list[nn.Module]:
        """The vision-tower blocks whose output reaches the projector (up to ``vision_feature_layer``)."""
        layers = list(self.model.model.vision_tower.encoder.layers)
        feature_layer = self.model.config.vision_feature_layer
        if not isinstance(feature_layer, int):  # a list of layers: everything up to the deepest is used
            feature_layer = max(feature_layer, key=lambda l: l % (len(layers) + 1))
        # hidden_states[0] is the embedding output, so hidden_states[k] is the output of block k-1
        stop = feature_layer % (len(layers) + 1)
        return layers[:stop]

    def attention_weights(self, layer: int, hidden: torch.Tensor, kwargs: dict, query: int) -> torch.Tensor:
        """Attention weights (heads, query+1) of position ``query`` over positions 0…query at ``layer``,
        recomputed from the module's input ``hidden`` (1, S, d) and keyword arguments."""
        st = self.attention_state(layer, hidden, kwargs, query)
        return st["scores"].softmax(-1)

    def attention_terms(self, layer: int, hidden: torch.Tensor, kwargs: dict, query: int) -> torch.Tensor:
        """Exact per-head, per-source decomposition of layer ``layer``'s attention output at ``query``.

        ``hidden``: the attention module's input (1, S, d); ``kwargs``: its keyword arguments (with
        ``position_embeddings``). Returns (heads, query+1, d): term[h, j] = a[h, query, j]·v_j^h·W_O^h.
        Their sum over heads and sources, plus ``o_proj.bias`` if any, is the module's output at ``query``.
        """
        st = self.attention_state(layer, hidden, kwargs, query)
        attn = st["attn"]
        w_o = attn.o_proj.weight.view(attn.o_proj.weight.shape[0], -1, attn.head_dim)  # (d, H, hd)
        per_head = torch.einsum("hjk,dhk->hjd", st["v"], w_o)  # value_j of head h through W_O^h
        return st["scores"].softmax(-1)[:, :, None] * per_head

    def attention_state(self, layer: int, hidden: torch.Tensor, kwargs: dict, query: int) -> dict:
        """Clean last-row attention state of layer ``layer`` for ``hidden`` (1, ≥query+1, d).

        Returns q (H, hd) at ``query``, v (H, query+1, hd), scores (H, query+1) = q·k/√hd, the scaling,
        and the rotary tables, for :meth:`attention_delta` and :meth:`attention_merge`.
        """
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        attn = self.layers()[self.check_layer(layer)].self_attn
        hd, S = attn.head_dim, query + 1
        x = hidden[:, :S]
        q = attn.q_proj(x).view(1, S, -1, hd).transpose(1, 2)
        k = attn.k_proj(x).view(1, S, -1, hd).transpose(1, 2)
        v = attn.v_proj(x).view(1, S, -1, hd).transpose(1, 2)
        cos, sin = (t[:, :S] for t in kwargs["position_embeddings"])
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1)[0], v.repeat_interleave(rep, 1)[0]
        qT = q[0, :, -1]
        return {"q": qT, "v": v, "scores": torch.einsum("hk,hjk->hj", qT, k) * attn.scaling,
                "scaling": attn.scaling, "cos": cos, "sin": sin, "rep": rep, "attn": attn}

    def attention_delta(self, state: dict, z: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Change of the (roped) keys and of the values when ``z`` (n, N, d) is added to the module input
        at positions start…start+N. k and v projections are linear, so biases cancel. Returns two
        (n, H, N, hd) tensors."""
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        attn, rep = state["attn"], state["rep"]
        hd, n, N = attn.head_dim, z.shape[0], z.shape[1]
        dk = (z @ attn.k_proj.weight.T).view(n, N, -1, hd).transpose(1, 2)
        dv = (z @ attn.v_proj.weight.T).view(n, N, -1, hd).transpose(1, 2)
        cos, sin = state["cos"][:, start:start + N], state["sin"][:, start:start + N]
        _, dk = apply_rotary_pos_emb(dk, dk, cos, sin)
        return dk.repeat_interleave(rep, 1), dv.repeat_interleave(rep, 1)

    def attention_merge(self, layer: int, heads: torch.Tensor) -> torch.Tensor:
        """Per-head outputs (..., H, hd) → the attention module's output (..., d) (output projection)."""
        attn = self.layers()[self.check_layer(layer)].self_attn
        return attn.o_proj(heads.flatten(-2))

    def run_from(self, layer: int, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """Run decoder layers ``layer``…L−1 on ``hidden`` (B, S, d), the residual stream at the *input* of
        ``layer``, with that layer's recorded keyword arguments; returns the final residual (B, S, d)."""
        kw = slice_kwargs(kwargs, hidden.shape[1])
        for block in self.layers()[self.check_layer(layer):]:
            out = block(hidden, **kw)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    def attention_output_bias(self, layer: int) -> torch.Tensor | None:
        """The bias added after the attention heads are summed (None when there is none)."""
        return self.layers()[self.check_layer(layer)].self_attn.o_proj.bias

    def final_norm_scale(self, resid: torch.Tensor) -> torch.Tensor:
        """The final RMSNorm as a per-position linear map: norm(x) = scale ⊙ x at this residual ``resid``."""
        norm = self._lm().norm
        eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
        rms = resid.float().pow(2).mean(-1, keepdim=True).add(eps).rsqrt()
        return norm.weight * rms

    def visual_grid(self, n_tokens: int) -> tuple[int, int] | None:
        vc = self.model.config.vision_config
        size = vc.image_size if isinstance(vc.image_size, (tuple, list)) else (vc.image_size, vc.image_size)
        patch = vc.patch_size
        grid = (size[0] // patch, size[1] // patch)
        return grid if grid[0] * grid[1] == n_tokens else None


def slice_kwargs(kwargs: dict, length: int) -> dict:
    """Keyword arguments recorded from a layer or attention call, cut to the first ``length`` positions
    and stripped of caches (so a module can be re-run on a batch of edited copies)."""
    kw = dict(kwargs)
    if "position_embeddings" in kw and kw["position_embeddings"] is not None:
        cos, sin = kw["position_embeddings"]
        kw["position_embeddings"] = (cos[:, :length], sin[:, :length])
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
