"""The embedded tiny VLLM: a word-level tokenizer, a CLIP image processor and a small LLaVA config.

Everything here is built locally from the world; nothing is downloaded.
"""

from __future__ import annotations

import dataclasses

from ..config import StrictConfig
from ..world import HELDOUT_TEMPLATES, TEXT_TEMPLATES, TRAIN_TEMPLATES, World
from ..world.entities import COLOURS, DIETS, HABITATS, PATTERNS, SHAPES

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "<image>")
#: LLaVA-1.5's conversation frame, so the same prompt code serves the tiny model and real checkpoints.
PROMPT_WORDS = ("user", ":", "assistant", "the", "answer", "is")


@dataclasses.dataclass(frozen=True)
class TinyConfig(StrictConfig):
    """Size of the embedded model. Defaults give ≈ 4.6 M parameters (≈ 18 MB in fp32)."""

    image_size: int = 64
    patch_size: int = 8
    vision_hidden: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    vision_intermediate: int = 512
    hidden: int = 192
    layers: int = 8
    heads: int = 4
    intermediate: int = 512
    max_positions: int = 320

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"TinyConfig.{f.name} must be a positive int, got {value!r}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})")
        if self.hidden % self.heads or self.vision_hidden % self.vision_heads:
            raise ValueError("hidden sizes must be divisible by their number of heads")


def vocabulary(world: World) -> list[str]:
    """Every word the world can produce, special tokens first. Deterministic order."""
    words: set[str] = set(PROMPT_WORDS)
    texts = [t for ts in TRAIN_TEMPLATES.values() for t in ts] + [t for ts in HELDOUT_TEMPLATES.values() for t in ts]
    texts += [t.replace("{name}", "") for ts in TEXT_TEMPLATES.values() for t in ts]
    answers = list(SHAPES) + list(COLOURS) + list(PATTERNS) + list(HABITATS) + list(DIETS)
    answers += [e.name for e in world.entities]
    for text in texts + answers:
        words.update(text.lower().split())
    return list(SPECIAL_TOKENS) + sorted(words)


def build_tokenizer(world: World):
    """A word-level ``PreTrainedTokenizerFast``: lowercases, splits on whitespace and punctuation, adds BOS."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary(world))}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                       special_tokens=[("<s>", vocab["<s>"])])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", extra_special_tokens={"image_token": "<image>"},
                                   padding_side="right")


def build_processor(world: World, cfg: TinyConfig = TinyConfig(), *, tokenizer=None):
    """``LlavaProcessor`` = our tokenizer (or ``tokenizer``) + the PIL CLIP image processor at the tiny
    model's resolution."""
    from transformers import LlavaProcessor
    from transformers.models.clip import CLIPImageProcessorPil

    image_processor = CLIPImageProcessorPil(size={"shortest_edge": cfg.image_size},
                                            crop_size={"height": cfg.image_size, "width": cfg.image_size})
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer or build_tokenizer(world),
                          patch_size=cfg.patch_size, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1)


def text_config(tokenizer, cfg: TinyConfig = TinyConfig(), *, decoder: str = "llama", kv_heads: int | None = None):
    """The decoder's config: ``decoder`` is ``llama`` (the embedded models'), ``mistral``, ``qwen2`` or
    ``opt``; ``kv_heads`` < heads gives grouped-query attention (Llama family)."""
    from transformers import LlamaConfig, MistralConfig, OPTConfig, Qwen2Config

    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, hidden_size=cfg.hidden,
               num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, max_position_embeddings=cfg.max_positions)
    if decoder == "opt":
        return OPTConfig(**ids, ffn_dim=cfg.intermediate, word_embed_proj_dim=cfg.hidden)
    family = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}
    if decoder not in family:
        raise ValueError(f"unknown decoder {decoder!r}: use one of llama, mistral, qwen2, opt")
    return family[decoder](**ids, intermediate_size=cfg.intermediate, num_key_value_heads=kv_heads or cfg.heads)


def build_model(tokenizer, cfg: TinyConfig = TinyConfig(), *, seed: int = 0, vision_feature_layer: int = -1,
                decoder: str = "llama", kv_heads: int | None = None):
    """A freshly initialised tiny ``LlavaForConditionalGeneration`` (seeded). The decoder reads the vision
    tower's ``vision_feature_layer`` (−1: the last; LLaVA-1.5 reads −2, the penultimate); ``decoder`` and
    ``kv_heads``: see :func:`text_config`."""
    import torch
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=cfg.vision_hidden, intermediate_size=cfg.vision_intermediate,
                              num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.vision_heads,
                              image_size=cfg.image_size, patch_size=cfg.patch_size, projection_dim=cfg.vision_hidden)
    text = text_config(tokenizer, cfg, decoder=decoder, kv_heads=kv_heads)
    n_patches = (cfg.image_size // cfg.patch_size) ** 2
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"), image_seq_length=n_patches,
                         vision_feature_layer=vision_feature_layer, vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config)
