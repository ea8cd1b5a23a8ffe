"""Tiny random checkpoints of every architecture visedit supports, built from configs (no download).

``build_checkpoint(kind, folder)`` writes a folder that :func:`~visedit.models.load_vllm` loads like a
real checkpoint: the tests run every technique on each, and they let a reader try an architecture offline.
The weights are random; only the plumbing (shapes, sites, exactness oracles) is meaningful.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from .tiny import TinyConfig, build_model, build_processor, build_tokenizer, text_config

#: The tiny shapes (seconds per technique on a CPU).
SMALL = TinyConfig(image_size=32, patch_size=8, vision_hidden=32, vision_layers=2, vision_heads=2,
                   vision_intermediate=64, hidden=48, layers=3, heads=2, intermediate=96, max_positions=128)
#: kind → (architecture class, decoder, what it stands for)
KINDS = {
    "llava": ("LlavaForConditionalGeneration", "llama", "LLaVA-1.5 (Vicuna / Llama decoder)"),
    "llava-mistral": ("LlavaForConditionalGeneration", "mistral", "LLaVA with a Mistral decoder (GQA)"),
    "llava-qwen2": ("LlavaForConditionalGeneration", "qwen2", "LLaVA with a Qwen2 decoder (q/k/v biases)"),
    "blip2-opt": ("Blip2ForConditionalGeneration", "opt", "BLIP-2 OPT (the paper's second backbone)"),
    "blip2-llama": ("Blip2ForConditionalGeneration", "llama",
                    "BLIP-2 with a Llama decoder: MiniGPT-4's design (ViT + Q-Former + linear → Vicuna)"),
    "instructblip": ("InstructBlipForConditionalGeneration", "llama",
                     "InstructBLIP (Vicuna / Llama decoder; the Q-Former reads the instruction)"),
    "qwen2-vl": ("Qwen2VLForConditionalGeneration", "qwen2", "Qwen2-VL (M-RoPE, a grid per input, GQA)"),
    "qwen2.5-vl": ("Qwen2_5_VLForConditionalGeneration", "qwen2", "Qwen2.5-VL (Qwen2-VL with a windowed ViT)"),
    "llava-next": ("LlavaNextForConditionalGeneration", "llama",
                   "LLaVA-NeXT / LLaVA-1.6 (anyres: a base image and tiles, a newline token after each row)"),
    "llava-onevision": ("LlavaOnevisionForConditionalGeneration", "qwen2",
                        "LLaVA-OneVision (SigLIP tower, anyres_max tiles shrunk to a budget, Qwen2 decoder)"),
}
NUM_QUERY_TOKENS = 8


@dataclasses.dataclass(frozen=True)
class Support:
    """One architecture's row of the support table. ``kinds``: the tiny checkpoints (:data:`KINDS`) on
    which the tests prove the row, and where its class names come from; an architecture with none is not
    supported yet and names its ``classes`` itself. ``refused``: the features refused in one line that
    names the feature and the backbone, each with its reason."""

    backbone: str
    kinds: tuple[str, ...]
    decoder: str
    visual_tokens: str
    supported: str
    refused: str
    classes: tuple[str, ...] = ()
    #: Spread over devices by ``load_vllm(…, device_map=…)`` (accelerate), as ``tests/test_devices.py`` checks it.
    multi_gpu: str = "yes (tested split with disk offload, on a CPU)"

    def class_names(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(KINDS[k][0] for k in self.kinds)) or self.classes


_BLIP2 = "BLIP-2 OPT"
#: The support table, one row per architecture (README.md holds the same table; a test keeps them equal).
SUPPORT = (
    Support("LLaVA-1.5 (the book's)", ("llava",), "Llama / Vicuna", "one patch grid", "everything", "—"),
    Support("LLaVA with Mistral or Qwen2", ("llava-mistral", "llava-qwen2"), "Mistral (GQA), Qwen2 (q/k/v biases)",
            "one patch grid", "everything", "—"),
    Support("BLIP-2 OPT (the paper's)", ("blip2-opt",), "OPT", "query tokens, no grid",
            "answers, contributions (paper, DLA), allocation, noise perturbation (1-D windows in token order; "
            "batched and loop), restoration, IG on a layer's visual tokens, maps spread onto the patches through "
            "the Q-Former (`query_to_patches`, layer selectivity), every editor (VEAD's gate per token: "
            "`token_gate`), `evaluate`",
            "IG on pixels, heatmaps, `attention_map`, region scores, VEAD's gate map (the query tokens have no grid)"),
    Support("BLIP-2 with a Llama decoder (MiniGPT-4's design: ViT + Q-Former + linear → Vicuna)", ("blip2-llama",),
            "Llama", "query tokens, no grid", f"as {_BLIP2}", f"as {_BLIP2}"),
    Support("Qwen2-VL, Qwen2.5-VL", ("qwen2-vl", "qwen2.5-vl"), "Qwen2 with M-RoPE",
            "one grid per input (`image_grid_thw`, merged 2×2)", "everything but pixel IG",
            "IG on pixels (its pixel values are flattened patches)"),
    Support("InstructBLIP", ("instructblip",), "Vicuna / Llama, or OPT (Flan-T5 is refused: not a decoder-only LM)",
            "query tokens that also read the instruction, no grid", f"as {_BLIP2}", f"as {_BLIP2}"),
    Support("LLaVA-NeXT / LLaVA-1.6", ("llava-next",), "Llama family (Vicuna, Mistral)",
            "the base image's grid, then the tiles' grid with a newline token closing each row (`image_sizes`)",
            "everything else: heatmaps, `attention_map` and VEAD's gate map on the base image's grid; noise and "
            "restoration windows on each grid", "IG on pixels (its pixel values are the base image and its tiles), "
            "region scores (they need one grid holding every visual token)"),
    Support("LLaVA-OneVision", ("llava-onevision",), "Qwen2",
            "as LLaVA-NeXT, the tiles' grid shrunk to `anyres_max_K` base images (`vision_aspect_ratio`); "
            "SigLIP, no class token", "as LLaVA-NeXT (its processor's video part needs torchvision: without it "
            "the image-only processor is used)", "as LLaVA-NeXT / LLaVA-1.6"),
)
SUPPORT_COLUMNS = ("Backbone", "class", "decoder", "visual tokens", "supported",
                   "refused (one line naming feature and backbone)", "multi-GPU (`device_map`)")


def support_table() -> list[dict[str, str]]:
    """The support table's rows, one per architecture, as {column: text} (columns: :data:`SUPPORT_COLUMNS`)."""
    return [dict(zip(SUPPORT_COLUMNS, (row.backbone, ", ".join(f"`{c}`" for c in row.class_names()), row.decoder,
                                       row.visual_tokens, row.supported, row.refused, row.multi_gpu)))
            for row in SUPPORT]


def support_markdown() -> str:
    """The support table as Markdown (as README.md shows it)."""
    lines = ["| " + " | ".join(SUPPORT_COLUMNS) + " |", "|" + "---|" * len(SUPPORT_COLUMNS)]
    lines += ["| " + " | ".join(row.values()) + " |" for row in support_table()]
    return "\n".join(lines)


def build_checkpoint(kind: str, folder: str | os.PathLike, *, seed: int = 0, world=None) -> Path:
    """Write a tiny random checkpoint of ``kind`` (see :data:`KINDS`) to ``folder``; returns the folder."""
    import torch

    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}: use one of {', '.join(KINDS)}")
    from ..world import make_world

    world = world or make_world(0)
    folder = Path(folder)
    arch, decoder, _ = KINDS[kind]
    tokenizer = build_tokenizer(world)
    kv_heads = 1 if decoder == "mistral" else None
    if arch == "LlavaForConditionalGeneration":
        processor = build_processor(world, SMALL, tokenizer=tokenizer)
        model = build_model(tokenizer, SMALL, seed=seed, decoder=decoder, kv_heads=kv_heads)
    elif arch == "LlavaNextForConditionalGeneration":
        processor, model = _llava_next(tokenizer, seed)
    elif arch == "LlavaOnevisionForConditionalGeneration":
        processor, model = _llava_onevision(tokenizer, seed)
    elif arch.startswith("Qwen2"):
        processor, model = _qwen2_vl(tokenizer, seed, version=kind)
    else:
        processor, model = _blip2(tokenizer, seed, decoder=decoder, instruct=arch.startswith("InstructBlip"))
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def _blip2(tokenizer, seed: int, *, decoder: str, instruct: bool):
    """Tiny BLIP-2 or InstructBLIP: a 2-block ViT, a 1-layer Q-Former with 8 query tokens, a linear
    projection into the decoder."""
    import torch
    import transformers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.clip import CLIPImageProcessorPil

    prefix = "InstructBlip" if instruct else "Blip2"
    parts = {name: getattr(transformers, prefix + name) for name in
             ("Config", "ForConditionalGeneration", "Processor", "QFormerConfig", "VisionConfig")}
    # the processor adds its own image token (an AddedToken) to a tokenizer that has none
    plain = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, bos_token="<s>",
                                    eos_token="</s>", unk_token="<unk>", pad_token="<pad>", padding_side="right")
    size = SMALL.image_size
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    extra = {"qformer_tokenizer": PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer,
                                                          pad_token="<pad>", padding_side="right")} if instruct else {}
    processor = parts["Processor"](image_processor=image_processor, tokenizer=plain, num_query_tokens=NUM_QUERY_TOKENS,
                                   **extra)
    vision = parts["VisionConfig"](hidden_size=SMALL.vision_hidden, intermediate_size=SMALL.vision_intermediate,
                                   num_hidden_layers=SMALL.vision_layers, num_attention_heads=SMALL.vision_heads,
                                   image_size=size, patch_size=SMALL.patch_size)
    words = dict(vocab_size=len(plain), pad_token_id=plain.pad_token_id) if instruct else {}
    qformer = parts["QFormerConfig"](hidden_size=SMALL.vision_hidden, num_hidden_layers=1,
                                     num_attention_heads=SMALL.vision_heads, intermediate_size=SMALL.vision_intermediate,
                                     encoder_hidden_size=SMALL.vision_hidden, **words)
    text = text_config(plain, SMALL, decoder=decoder)
    config = parts["Config"](vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), text_config=text.to_dict(),
                             num_query_tokens=NUM_QUERY_TOKENS, image_token_index=plain.convert_tokens_to_ids("<image>"))
    torch.manual_seed(seed)
    model = parts["ForConditionalGeneration"](config)
    with torch.no_grad():  # fresh query tokens are all zeros: every visual token would be the same
        model.query_tokens.normal_(std=1.0)
    return processor, model


def _qwen2_vl(tokenizer, seed: int, *, version: str = "qwen2-vl"):
    """Tiny Qwen2-VL or Qwen2.5-VL: 8-pixel patches merged 2×2 (a 2×2 token grid for a 32-pixel image),
    M-RoPE sections summing to half the head width; the processor is tokenizer + image processor (no
    video part)."""
    import torch
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig,
                              Qwen2VLForConditionalGeneration)
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from .processing import ImageTextProcessor

    size = SMALL.image_size
    image_processor = Qwen2VLImageProcessorPil(min_pixels=size * size, max_pixels=size * size,
                                               patch_size=SMALL.patch_size, temporal_patch_size=2, merge_size=2)
    text = text_config(tokenizer, SMALL, decoder="qwen2", kv_heads=1).to_dict()
    head = SMALL.hidden // SMALL.heads
    text["max_position_embeddings"] = 512  # its chat frame is long in a word-level vocabulary (IKE's context)
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [head // 6] * 3}
    unused = tokenizer.unk_token_id  # no video and no vision start/end tokens in the tiny vocabulary
    vision = dict(depth=1, num_heads=SMALL.vision_heads, patch_size=SMALL.patch_size, spatial_merge_size=2,
                  temporal_patch_size=2)
    if version == "qwen2-vl":
        vision |= dict(embed_dim=SMALL.vision_hidden, hidden_size=SMALL.hidden, mlp_ratio=2)
        config_class, model_class = Qwen2VLConfig, Qwen2VLForConditionalGeneration
    else:
        vision |= dict(hidden_size=SMALL.vision_hidden, out_hidden_size=SMALL.hidden,
                       intermediate_size=SMALL.vision_intermediate, window_size=2 * 2 * SMALL.patch_size,
                       fullatt_block_indexes=[0])
        config_class, model_class = Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    config = config_class(text_config=text, vision_config=vision, video_token_id=unused,
                          image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                          vision_start_token_id=unused, vision_end_token_id=unused)
    torch.manual_seed(seed)
    return ImageTextProcessor(tokenizer, image_processor), model_class(config)


#: LLaVA-NeXT's tiny resolutions: a 16-pixel base image (a 2×2 grid of 8-pixel patches) and tiles of 16
#: pixels at one of these (height, width) resolutions — a 32-pixel square image becomes 2×2 tiles, whose
#: patches form a 4×4 grid (the image's own resolution), each row closed by a newline token: 24 tokens.
LLAVA_NEXT_BASE = 16
LLAVA_NEXT_PINPOINTS = [[16, 32], [32, 16], [32, 32]]


def _llava_next(tokenizer, seed: int):
    """Tiny LLaVA-NeXT: a CLIP tower at 16 pixels, "anyres" tiles at the pinpoints above, the PIL image
    processor (no torchvision), the CLS token dropped (``vision_feature_select_strategy="default"``)."""
    import torch
    from transformers import (CLIPVisionConfig, LlavaNextConfig, LlavaNextForConditionalGeneration,
                              LlavaNextImageProcessorPil, LlavaNextProcessor)

    side = LLAVA_NEXT_BASE
    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": side},
                                                 crop_size={"height": side, "width": side},
                                                 image_grid_pinpoints=LLAVA_NEXT_PINPOINTS)
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=SMALL.patch_size,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1)
    vision = CLIPVisionConfig(hidden_size=SMALL.vision_hidden, intermediate_size=SMALL.vision_intermediate,
                              num_hidden_layers=SMALL.vision_layers, num_attention_heads=SMALL.vision_heads,
                              image_size=side, patch_size=SMALL.patch_size, projection_dim=SMALL.vision_hidden)
    config = LlavaNextConfig(vision_config=vision.to_dict(), text_config=text_config(tokenizer, SMALL).to_dict(),
                             image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                             image_grid_pinpoints=LLAVA_NEXT_PINPOINTS, vision_feature_layer=-1,
                             vision_feature_select_strategy="default", image_seq_length=(side // SMALL.patch_size) ** 2)
    torch.manual_seed(seed)
    return processor, LlavaNextForConditionalGeneration(config)


#: LLaVA-OneVision's tiny tile budget: "anyres_max_2" shrinks a square image's 4×4 tile grid (two base
#: images' worth of patches is 8; 16 is over it by more than 10 %) to 2×2, and keeps a wide image's 2×4.
LLAVA_ONEVISION_ASPECT = "anyres_max_2"


def _llava_onevision(tokenizer, seed: int):
    """Tiny LLaVA-OneVision: a SigLIP tower at 16 pixels (no class token, ``"full"`` features), LLaVA-NeXT's
    pinpoints with a budget of two base images of tile patches, a Qwen2 decoder, and the image-only
    processor (its transformers processor needs torchvision for video)."""
    import torch
    from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration,
                              LlavaOnevisionImageProcessorPil, SiglipVisionConfig)

    from .processing import ImageTextProcessor

    side = LLAVA_NEXT_BASE
    image_processor = LlavaOnevisionImageProcessorPil(size={"height": side, "width": side},
                                                      image_grid_pinpoints=LLAVA_NEXT_PINPOINTS)
    vision = SiglipVisionConfig(hidden_size=SMALL.vision_hidden, intermediate_size=SMALL.vision_intermediate,
                                num_hidden_layers=SMALL.vision_layers, num_attention_heads=SMALL.vision_heads,
                                image_size=side, patch_size=SMALL.patch_size)
    text = text_config(tokenizer, SMALL, decoder="qwen2").to_dict()
    text["max_position_embeddings"] = 512  # its chat frame is long in a word-level vocabulary (IKE's context)
    config = LlavaOnevisionConfig(vision_config=vision.to_dict(), text_config=text,
                                  image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                                  image_grid_pinpoints=LLAVA_NEXT_PINPOINTS, vision_feature_layer=-1,
                                  vision_feature_select_strategy="full", vision_aspect_ratio=LLAVA_ONEVISION_ASPECT)
    torch.manual_seed(seed)
    processor = ImageTextProcessor.for_onevision(tokenizer, image_processor, config)
    return processor, LlavaOnevisionForConditionalGeneration(config)
