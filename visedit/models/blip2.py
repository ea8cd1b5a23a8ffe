"""BLIP-2 whose vision encoder is a LLaVA-style model's CLIP tower, converted exactly.

``Blip2VisionModel`` lays out a ViT differently from ``CLIPVisionModel``: q, k and v are one fused
``qkv`` projection (its bias holds the three parts, the key's included), the patch convolution has a
bias (zero here), the class and position embeddings are plain parameters — all of which convert
exactly — and there is no LayerNorm between the embeddings and the first block, where CLIP has its
``pre_layrnorm``. That one cannot be converted: every Blip2 block adds to its residual stream a function
of layer-normalised (scale-free) inputs, so no choice of weights turns the embeddings e into LN(e) (the
difference LN(e) − e would have to be computed from inputs that have lost e's scale).

So :class:`Blip2PreNormForConditionalGeneration` is ``Blip2ForConditionalGeneration`` whose vision
embeddings end with that LayerNorm (``vision_model.embeddings.pre_layernorm``) and nothing else changed:
the converted tower computes what the CLIP tower computes (``tests/test_blip2_recipe.py`` compares them),
the backbone adapter is BLIP-2's (chosen by class), and the class is registered with transformers' Auto
classes under the model type ``visedit-blip-2`` (:func:`register`, which :func:`~visedit.models.load_vllm`
calls), so that transformers without visedit refuses such a folder instead of silently dropping the
LayerNorm.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import Blip2Config, Blip2ForConditionalGeneration
from transformers.models.blip_2.modeling_blip_2 import Blip2VisionEmbeddings

#: The model type of a BLIP-2 with CLIP's pre-LayerNorm in ``config.json``.
MODEL_TYPE = "visedit-blip-2"


class Blip2PreNormConfig(Blip2Config):
    """``Blip2Config`` of a model whose vision embeddings end with a LayerNorm (CLIP's ``pre_layrnorm``)."""

    model_type = MODEL_TYPE


class PreNormVisionEmbeddings(Blip2VisionEmbeddings):
    """BLIP-2's vision embeddings followed by a LayerNorm, as CLIP's tower has them."""

    def __init__(self, config):
        super().__init__(config)
        self.pre_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        return self.pre_layernorm(super().forward(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding))


class Blip2PreNormForConditionalGeneration(Blip2ForConditionalGeneration):
    """``Blip2ForConditionalGeneration`` with :class:`PreNormVisionEmbeddings` (see the module docstring)."""

    config: Blip2PreNormConfig
    config_class = Blip2PreNormConfig

    def __init__(self, config: Blip2PreNormConfig):
        super().__init__(config)
        embeddings = PreNormVisionEmbeddings(config.vision_config)
        embeddings.apply(self._init_weights)
        self.vision_model.embeddings = embeddings


def register() -> None:
    """Make ``AutoConfig`` / ``AutoModelForImageTextToText`` know :data:`MODEL_TYPE` (idempotent)."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    AutoConfig.register(MODEL_TYPE, Blip2PreNormConfig, exist_ok=True)
    AutoModelForImageTextToText.register(Blip2PreNormConfig, Blip2PreNormForConditionalGeneration, exist_ok=True)


@torch.no_grad()
def convert_clip_tower(clip, vision: nn.Module) -> None:
    """Copy the weights of ``clip`` (a ``CLIPVisionModel``) into ``vision`` (the ``vision_model`` of a
    :class:`Blip2PreNormForConditionalGeneration`), in place. ``vision`` may hold fewer blocks than
    ``clip`` (BLIP-2 and LLaVA-1.5 read the penultimate layer): it gets the first ones. Its
    ``post_layernorm`` gets CLIP's only when it holds every block; otherwise that LayerNorm is BLIP-2's
    ``ln_vision``, which trains with the Q-Former, and is left as it is."""
    src = getattr(clip, "vision_model", clip)  # transformers 5 flattened CLIPVisionModel
    blocks = vision.encoder.layers
    width = src.embeddings.patch_embedding.out_channels
    if len(blocks) > len(src.encoder.layers) or width != vision.config.hidden_size:
        raise ValueError(f"cannot convert a CLIP tower of {len(src.encoder.layers)} blocks of width {width} into a "
                         f"BLIP-2 tower of {len(blocks)} blocks of width {vision.config.hidden_size}")
    emb = vision.embeddings
    emb.patch_embedding.weight.copy_(src.embeddings.patch_embedding.weight)
    emb.patch_embedding.bias.zero_()
    emb.class_embedding.copy_(src.embeddings.class_embedding.view_as(emb.class_embedding))
    emb.position_embedding.copy_(src.embeddings.position_embedding.weight.view_as(emb.position_embedding))
    emb.pre_layernorm.load_state_dict(src.pre_layrnorm.state_dict())
    for block, source in zip(blocks, src.encoder.layers):
        attn, clip_attn = block.self_attn, source.self_attn
        projections = (clip_attn.q_proj, clip_attn.k_proj, clip_attn.v_proj)
        attn.qkv.weight.copy_(torch.cat([p.weight for p in projections]))
        attn.qkv.bias.copy_(torch.cat([p.bias for p in projections]))
        attn.projection.load_state_dict(clip_attn.out_proj.state_dict())
        for name in ("layer_norm1", "layer_norm2"):
            getattr(block, name).load_state_dict(getattr(source, name).state_dict())
        block.mlp.load_state_dict(source.mlp.state_dict())
    if len(blocks) == len(src.encoder.layers):
        vision.post_layernorm.load_state_dict(src.post_layernorm.state_dict())


def vision_config_of(clip_config, *, layers: int | None = None) -> dict:
    """The ``Blip2VisionConfig`` (as a dict) of a tower converted from a CLIP tower of ``clip_config``:
    same widths, activation and LayerNorm epsilon; ``layers`` blocks (default: all)."""
    return dict(hidden_size=clip_config.hidden_size, intermediate_size=clip_config.intermediate_size,
                num_hidden_layers=clip_config.num_hidden_layers if layers is None else layers,
                num_attention_heads=clip_config.num_attention_heads, image_size=clip_config.image_size,
                patch_size=clip_config.patch_size, hidden_act=clip_config.hidden_act,
                layer_norm_eps=clip_config.layer_norm_eps, qkv_bias=True, attention_dropout=0.0)
