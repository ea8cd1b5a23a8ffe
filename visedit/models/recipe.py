"""The second teaching model, made LLaVA's way, and the recipes of the study of why models read late.

``python -m visedit train-tiny --recipe llava --out DIR`` trains, all seeded and resumable:

0. *Tokenizer*: a byte-level BPE trained on the world's text, so that any text encodes.
1. *Contrastive vision pre-training* (CLIP-style): a CLIP vision tower and a small text encoder learn to
   match scenes of 1–4 creatures with captions that describe appearance and position (never names or
   non-visual facts), with one hard-negative caption per scene (one attribute or position changed), and
   — the region term — each creature's patch states (pooled over its mask, at the layer the decoder
   reads) with the phrase of its looks among all 256 ("a red striped star"), as region-level CLIP
   variants do. Without it the tower's patch states carry a creature's colour and pattern but not its
   shape (a linear probe reads shape for 53 % of creatures after 1500 steps; with it, 76 %). And — the
   position term — each patch state names its own row and column through two linear heads: without it
   the region term washes position out of the patches (a linear probe reads a creature patch's column for
   16 % of patches at the layer the decoder reads, 56 % at the tower's input), and a decoder reading
   them in a row-major sequence answered "the creature on the left/right" at chance while "top/bottom"
   (whole rows apart in the sequence) held at 0.96–1.0.
   The tower is then **frozen**; the text encoder is thrown away.
2. *Language pre-training*: the decoder alone learns the world's text — questions about named creatures
   (their looks, habitat and diet, and which creature has which looks) and captions — as a language
   model knows its world before it sees an image.
3. *Alignment*: only the projector trains, to caption scenes through the frozen decoder.
4. *Visual instruction tuning*: projector and decoder train on question–answer turns about scenes whose
   questions select one creature ("the creature on the left", "the red creature", or "this creature"),
   mixed with text-only questions. The encoder stays frozen. No stage teaches the decoder to read words
   written over its visual tokens.

The study's recipes change one ingredient each: ``joint-encoder`` (no contrastive stage; the tower trains
with the decoder in stages 3–4), ``one-creature`` (every scene holds one creature), ``shallow`` (8
decoder layers), ``deep-narrow`` (20 decoder layers of width 128, about as many weights) and
``masked-encoder`` (the frozen encoder learns from a masked-patch objective, pixels only, instead of
captions). ``study`` budgets are the same recipes at a reduced number of steps.

``blip2`` changes the bridge: a BLIP-2 made the same way (MiniGPT-4's design: frozen ViT → Q-Former with
32 learned queries → a linear projection → a Llama decoder). Its vision encoder is the second teaching
model's frozen CLIP tower, up to its penultimate layer, converted exactly into BLIP-2's layout
(:mod:`visedit.models.blip2`): taken from a finished LLaVA-recipe folder or checkpoint
(``encoder_from=``), or trained by the same contrastive stage (same seeds, same weights as the ``llava``
recipe's). Its decoder starts from the ``llava`` recipe's initial weights and learns the same text in the
same frame, so after stage 2 it *is* that recipe's decoder. Stage 3 trains the Q-Former, its queries,
BLIP-2's LayerNorm on the encoder's output (``ln_vision``) and the projection on captions; stage 4 those
and the decoder on the same questions. Only the bridge differs between the two models.

A checkpoint (``<out>.ckpt``) is written every ``checkpoint_every`` steps and at every stage's end; a run
started again with the same settings resumes from it and ends with the same weights as one never
stopped.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..config import StrictConfig
from ..fit import Every, FitState, fit, warmup_cosine
from ..io import atomic_path
from ..world import FACTS, World, make_world
from ..world.entities import COLOURS, PATTERNS, SHAPES
from ..world.questions import TEXT_TEMPLATES
from ..world.scene import SCENE_TEMPLATES, askable, caption, position_words, render_scene, selectors
from .backbones import PromptFrame
from .tiny import TinyConfig, build_model, build_processor
from .train import collate

#: Seed stream of the recipe's training renderings (datasets use 0–9, model cards 10–13, the first model 20).
RECIPE_STREAM = 30
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "<image>")
#: The conversation frame (LLaVA-1.5's; the same string :class:`~visedit.models.vllm.VLLM` formats).
FRAME = "USER: {image}{question} ASSISTANT:"
DESCRIBE = "describe the picture ."
#: Text-only questions the second edition adds to the first's (``{name}`` / ``{looks}`` filled in).
EXTRA_TEXT_TEMPLATES = {
    "pattern": ("what pattern is on the {name} ?",),
    "looks": ("what does the {name} look like ?",),
    "name": ("what is the name of the {looks} ?", "which creature is the {looks} ?"),
}
STAGES = ("encoder", "language", "align", "instruct")
#: How the image reaches the decoder: LLaVA's projector over every patch, or BLIP-2's Q-Former queries.
ARCHITECTURES = ("llava", "blip2")


@dataclasses.dataclass(frozen=True)
class RecipeConfig(StrictConfig):
    """Everything a recipe run needs: world, model size, stage budgets. No paths or devices."""

    name: str = "llava"
    architecture: str = "llava"
    seed: int = 0
    world_seed: int = 0
    n_entities: int = 70
    # scenes
    image_size: int = 80
    patch_size: int = 8
    max_creatures: int = 4
    # model
    vocab_size: int = 800
    vision_hidden: int = 128
    vision_layers: int = 6
    vision_heads: int = 4
    vision_intermediate: int = 512
    hidden: int = 192
    layers: int = 12
    heads: int = 4
    intermediate: int = 512
    max_positions: int = 512
    # the Q-Former (architecture blip2): 32 queries, as BLIP-2's; every layer cross-attends to the encoder
    num_query_tokens: int = 32
    qformer_hidden: int = 128
    qformer_layers: int = 2
    qformer_heads: int = 4
    qformer_intermediate: int = 512
    # stage 1: contrastive encoder (0 steps: no contrastive stage, the tower trains jointly instead)
    frozen_encoder: bool = True
    #: what the frozen encoder learns from: "contrastive" (CLIP's: scenes against their captions) or
    #: "masked" (a masked-patch objective: a ``mask_ratio`` share of each scene's patches is blanked and
    #: the tower predicts their pixels, normalised per patch as MAE's, from its states at the layer the
    #: decoder reads; no text)
    encoder_objective: str = "contrastive"
    mask_ratio: float = 0.5
    encoder_steps: int = 5000
    encoder_batch: int = 64
    encoder_lr: float = 1e-3
    #: hard-negative captions per scene: "any" (one, its change drawn) or "each" (one per kind of change)
    negatives: str = "any"
    #: weight of the region term: each creature's patches (at the layer the decoder reads, pooled over its
    #: mask) matched against every appearance phrase the world's words make (0: the scene term only)
    region_weight: float = 1.0
    #: weight of the position term: each patch state (at the layer the decoder reads) names its own row and
    #: column through two linear heads, so that the frozen patches keep where they are, as CLIP's do (0: off)
    position_weight: float = 1.0
    # stage 2: language pre-training
    language_steps: int = 1500
    language_batch: int = 32
    language_lr: float = 1e-3
    # stage 3: alignment (projector only; with a joint encoder, projector and tower)
    align_steps: int = 600
    align_batch: int = 32
    align_lr: float = 2e-3
    # stage 4: instruction tuning
    steps: int = 4000
    batch_images: int = 24
    batch_text: int = 8
    qa_per_image: int = 3
    #: where an instruction question names its creature: "any" (every training template) or "last" (only
    #: the templates that end with the selector — "tell me the diet of the striped creature ." — so the
    #: fact word always comes before the creature it is asked of)
    selector_position: str = "any"
    lr: float = 5e-4
    warmup: int = 100
    weight_decay: float = 0.01
    bf16: bool = True
    #: the attention kernel while training: "eager" (matmul and softmax; on a CPU at these sizes the fused
    #: "sdpa" kernel's backward pass is the slowest part of a step: eager trains the tower twice as fast and
    #: an instruction step a third faster) or "sdpa" (what runs made before this setting used)
    attention: str = "eager"
    threads: int = 1  # one thread: on 2 cores two runs side by side each go as fast as one 2-thread run

    def __post_init__(self) -> None:
        ints = [f.name for f in dataclasses.fields(self) if f.type in ("int", int)]
        for name in ints:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"RecipeConfig.{name} must be an int, got {value!r}")
            floor = 0 if name.endswith("_steps") or name in ("seed", "world_seed", "warmup") else 1
            if value < floor:
                raise ValueError(f"RecipeConfig.{name} must be ≥ {floor}, got {value}")
        if self.image_size % self.patch_size or self.image_size // self.patch_size < 10:
            raise ValueError(f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size}) "
                             "with at least 10 patches a side")
        if self.attention not in ("eager", "sdpa"):
            raise ValueError(f"RecipeConfig.attention must be 'eager' or 'sdpa', got {self.attention!r}")
        if self.encoder_objective not in ("contrastive", "masked"):
            raise ValueError(f"RecipeConfig.encoder_objective must be 'contrastive' or 'masked', got "
                             f"{self.encoder_objective!r}")
        if self.encoder_objective == "masked" and not self.frozen_encoder:
            raise ValueError("encoder_objective: masked is the objective of a frozen encoder's own stage; set "
                             "frozen_encoder: true")
        if self.encoder_objective == "masked" and self.region_weight:
            raise ValueError("the region term matches patches against caption phrases, which a masked-patch "
                             "encoder does not read; set region_weight: 0")
        if not 0 < self.mask_ratio < 1:
            raise ValueError(f"RecipeConfig.mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if self.negatives not in ("any", "each"):
            raise ValueError(f"RecipeConfig.negatives must be 'any' or 'each', got {self.negatives!r}")
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {self.architecture!r}; choose one of {', '.join(ARCHITECTURES)}")
        if self.architecture == "blip2" and not self.frozen_encoder:
            raise ValueError("the blip2 architecture reads a frozen encoder: set frozen_encoder: true")
        if self.architecture == "blip2" and self.vision_layers < 2:
            raise ValueError("the blip2 architecture reads the encoder's penultimate layer: vision_layers must be ≥ 2")
        if self.qformer_hidden % self.qformer_heads:
            raise ValueError(f"qformer_hidden ({self.qformer_hidden}) must be divisible by qformer_heads "
                             f"({self.qformer_heads})")
        if not 1 <= self.max_creatures <= 4:
            raise ValueError(f"max_creatures must be 1…4, got {self.max_creatures}")
        if self.frozen_encoder and self.encoder_steps == 0:
            raise ValueError("a frozen encoder needs encoder_steps > 0 (set frozen_encoder: false to train it "
                             "jointly with the decoder)")
        if self.selector_position not in ("any", "last"):
            raise ValueError(f"RecipeConfig.selector_position must be 'any' or 'last', got {self.selector_position!r}")
        if not 1 <= self.qa_per_image <= 6:
            raise ValueError(f"qa_per_image must be 1…6, got {self.qa_per_image}")
        for name in ("region_weight", "position_weight"):
            if not 0 <= getattr(self, name) <= 10:
                raise ValueError(f"RecipeConfig.{name} must be in [0, 10], got {getattr(self, name)}")
        for name in ("encoder_lr", "language_lr", "align_lr", "lr"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"RecipeConfig.{name} must be in (0, 1), got {getattr(self, name)}")

    @property
    def n_visual(self) -> int:
        """Visual tokens per image: a patch grid (LLaVA) or the Q-Former's queries (BLIP-2)."""
        if self.architecture == "blip2":
            return self.num_query_tokens
        return (self.image_size // self.patch_size) ** 2


#: Settings added after runs were made with the recipe, and the value that reproduces those runs.
ADDED_SINCE = {"position_weight": 0.0, "attention": "sdpa"}
#: The named recipes: the second teaching model and the study's one-ingredient changes.
RECIPES: dict[str, dict] = {
    "llava": {},
    # no contrastive stage, so no position term (0 keeps the run's weights exactly as they were made)
    "joint-encoder": {"frozen_encoder": False, "encoder_steps": 0, "position_weight": 0.0},
    "one-creature": {"max_creatures": 1},
    "shallow": {"layers": 8},
    # further ingredients: a deeper, narrower decoder (about as many weights), and a frozen encoder that
    # learns from a masked-patch objective instead of captions (no text, so no region term)
    "deep-narrow": {"layers": 20, "hidden": 128, "intermediate": 384},
    "masked-encoder": {"encoder_objective": "masked", "region_weight": 0.0},
    # and questions that name their creature last, after the fact word
    "selector-last": {"selector_position": "last"},
    # a fresh Q-Former needs more alignment than a projector (a guess, not tuned; lr halved for a transformer)
    "blip2": {"architecture": "blip2", "align_steps": 1500, "align_lr": 1e-3},
}
#: The study's reduced budget (≤ 1 h on 2 cores), applied on top of a recipe with ``--budget study``.
STUDY_BUDGET = {"encoder_steps": 1500, "language_steps": 800, "align_steps": 300, "steps": 1200}


def recipe_config(name: str, *, budget: str = "full", **overrides) -> RecipeConfig:
    """The :class:`RecipeConfig` of recipe ``name`` (see :data:`RECIPES`) at ``budget`` ("full" or
    "study"), with ``overrides`` on top."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
    if budget not in ("full", "study"):
        raise ValueError(f"budget must be 'full' or 'study', got {budget!r}")
    values = {"name": name, **RECIPES[name]}
    if budget == "study":
        values.update({k: v for k, v in STUDY_BUDGET.items() if not (k == "encoder_steps" and values.get(k) == 0)})
    values.update(overrides)
    return RecipeConfig.from_dict(values)


# --------------------------------------------------------------------------------------------- text
def _looks(e) -> str:
    return f"{e.colour} {e.pattern} {e.shape}"


def text_turns(world: World, rng: random.Random, n: int) -> list[tuple[str, str]]:
    """``n`` text-only (question, answer) turns about named creatures of ``world``."""
    turns = []
    for _ in range(n):
        e = rng.choice(world.entities)
        kind = rng.choice(("habitat", "diet", "colour", "shape", "pattern", "looks", "name", "habitat", "diet"))
        if kind in TEXT_TEMPLATES:
            turns.append((rng.choice(TEXT_TEMPLATES[kind]).format(name=e.name), e.fact(kind)))
        elif kind == "pattern":
            turns.append((rng.choice(EXTRA_TEXT_TEMPLATES["pattern"]).format(name=e.name), e.pattern))
        elif kind == "looks":
            turns.append((EXTRA_TEXT_TEMPLATES["looks"][0].format(name=e.name), _looks(e)))
        else:
            turns.append((rng.choice(EXTRA_TEXT_TEMPLATES["name"]).format(looks=_looks(e)), e.name))
    return turns


def corpus(world: World, *, n_scenes: int = 400, seed: int = 0) -> list[str]:
    """The world's text, on which the byte-level BPE is trained: the frame, every template with every
    selector, every answer and name, text questions and captions of ``n_scenes`` random scenes."""
    rng = random.Random(seed)
    lines = [FRAME.format(image="", question=DESCRIBE), "The answer is:", " ".join(SPECIAL_TOKENS)]
    phrases = ["this creature", "the creature on the left", "the creature on the right", "the creature at the top",
               "the creature at the bottom"] + [f"the {c} creature" for c in COLOURS] + [f"the {p} creature"
                                                                                         for p in PATTERNS]
    from ..world.questions import HELDOUT_TEMPLATES, TRAIN_TEMPLATES
    from ..world.scene import SCENE_HELDOUT_TEMPLATES

    for table in (SCENE_TEMPLATES, SCENE_HELDOUT_TEMPLATES):
        for fact, templates in table.items():
            for t in templates:
                lines += [FRAME.format(image="", question=t.format(x=x)) for x in phrases]
    for table in (TRAIN_TEMPLATES, HELDOUT_TEMPLATES):
        lines += [t for ts in table.values() for t in ts]
    for f in FACTS:
        lines += [" " + a for a in world.answers(f)]
    for q, a in text_turns(world, rng, 4000):
        lines.append(FRAME.format(image="", question=q) + " " + a)
    for k in range(n_scenes):
        ents = rng.sample(world.entities, rng.randint(1, 4))
        lines.append(caption(render_scene(ents, seed=np.random.default_rng([seed, 99, k])), rng=rng))
    return lines


def build_bpe_tokenizer(world: World, vocab_size: int = 640, *, seed: int = 0, trained: str | None = None):
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on :func:`corpus` (deterministic; any text
    encodes, byte by byte if need be). Adds ``<s>`` in front of every encoded text. ``trained``: the JSON
    of a tokenizer trained before (a checkpoint keeps it), used as it is."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    text = trained or _trained_bpe(world, vocab_size, seed)
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(text), bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>", extra_special_tokens={"image_token": "<image>"},
                                   padding_side="right")


@functools.lru_cache(maxsize=4)
def _trained_bpe(world: World, vocab_size: int, seed: int) -> str:
    """The trained BPE as JSON (cached: training renders the corpus' scenes, which takes seconds)."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer

    tok = Tokenizer(BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(world, seed=seed), trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)])
    return tok.to_str()


def tiny_config(cfg: RecipeConfig) -> TinyConfig:
    """The model-size part of a recipe, as the first model's :class:`TinyConfig`."""
    return TinyConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(TinyConfig)})


def build_recipe_processor(world: World, cfg: RecipeConfig, *, tokenizer_json: str | None = None):
    """``LlavaProcessor`` = the world's BPE tokenizer (or the one ``tokenizer_json`` holds) + the PIL CLIP
    image processor at ``cfg.image_size``."""
    return build_processor(world, tiny_config(cfg), tokenizer=build_bpe_tokenizer(
        world, cfg.vocab_size, seed=cfg.world_seed, trained=tokenizer_json))


def build_recipe_model(tokenizer, cfg: RecipeConfig):
    """A freshly initialised ``LlavaForConditionalGeneration`` of ``cfg``'s size (seeded). The decoder
    reads the tower's penultimate layer, as LLaVA-1.5 does."""
    return build_model(tokenizer, tiny_config(cfg), seed=cfg.seed, vision_feature_layer=-2)


def build_blip2_recipe_processor(world: World, cfg: RecipeConfig, *, tokenizer_json: str | None = None):
    """``Blip2Processor`` = :func:`build_recipe_processor`'s BPE tokenizer and image processor; it puts
    ``cfg.num_query_tokens`` image tokens before the text."""
    return _blip2_processor(build_recipe_processor(world, cfg, tokenizer_json=tokenizer_json), cfg)


def _blip2_processor(base, cfg: RecipeConfig):
    from transformers import Blip2Processor, PreTrainedTokenizerFast

    # the processor adds its own image token (an AddedToken) to a tokenizer that names none: the BPE's
    # "<image>" is already in the vocabulary, so every id stays as it is
    plain = PreTrainedTokenizerFast(tokenizer_object=base.tokenizer.backend_tokenizer, bos_token="<s>",
                                    eos_token="</s>", unk_token="<unk>", pad_token="<pad>", padding_side="right")
    return Blip2Processor(image_processor=base.image_processor, tokenizer=plain, num_query_tokens=cfg.num_query_tokens)


def build_blip2_recipe_model(tokenizer, cfg: RecipeConfig):
    """A freshly initialised BLIP-2 of ``cfg``'s size (seeded): a vision tower of ``cfg.vision_layers − 1``
    blocks (it holds a CLIP tower up to its penultimate layer, which BLIP-2 and LLaVA-1.5 read), a
    Q-Former of ``cfg.num_query_tokens`` queries cross-attending to it in every layer, a linear projection
    and :func:`build_recipe_model`'s Llama decoder. A
    :class:`~visedit.models.blip2.Blip2PreNormForConditionalGeneration` (BLIP-2 with CLIP's pre-LayerNorm)."""
    from transformers import Blip2QFormerConfig, CLIPVisionConfig

    from .blip2 import Blip2PreNormConfig, Blip2PreNormForConditionalGeneration, vision_config_of
    from .tiny import text_config

    clip = CLIPVisionConfig(hidden_size=cfg.vision_hidden, intermediate_size=cfg.vision_intermediate,
                            num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.vision_heads,
                            image_size=cfg.image_size, patch_size=cfg.patch_size)
    qformer = Blip2QFormerConfig(hidden_size=cfg.qformer_hidden, num_hidden_layers=cfg.qformer_layers,
                                 num_attention_heads=cfg.qformer_heads, intermediate_size=cfg.qformer_intermediate,
                                 encoder_hidden_size=cfg.vision_hidden, cross_attention_frequency=1,
                                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    config = Blip2PreNormConfig(vision_config=vision_config_of(clip, layers=cfg.vision_layers - 1),
                                qformer_config=qformer.to_dict(), text_config=text_config(tokenizer, tiny_config(cfg)).to_dict(),
                                num_query_tokens=cfg.num_query_tokens,
                                image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    torch.manual_seed(cfg.seed)
    model = Blip2PreNormForConditionalGeneration(config)
    with torch.no_grad():  # BLIP-2's initialisation (transformers' is zeros: every query would be the same)
        model.query_tokens.normal_(std=0.02)
    return model


class _LlavaParts:
    """What the stages train, LLaVA's way: one ``LlavaForConditionalGeneration`` whose CLIP tower is
    trained by the contrastive stage, a projector as the bridge."""

    def __init__(self, processor, cfg: RecipeConfig, device, tower: dict | None = None):
        self.processor = processor
        self.model = build_recipe_model(processor.tokenizer, cfg)
        self.tower = self.model.model.vision_tower
        if tower is not None:  # a trained frozen tower (encoder_from): the contrastive stage is skipped
            self.tower.load_state_dict(tower)
        self.model.set_attn_implementation(cfg.attention)
        self.model.to(device)
        self.decoder, self.head = self.model.model.language_model, self.model.lm_head
        self.modules = {"model": self.model}

    def bridge_params(self) -> list:
        return list(self.model.model.multi_modal_projector.parameters())

    def text_logits(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, attention_mask=mask).logits

    def image_logits(self, ids: torch.Tensor, mask: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits

    def encoder_ready(self) -> None:
        """Called once the tower is final (after the contrastive stage)."""

    def train(self) -> None:
        self.model.train()


class _Blip2Parts(_LlavaParts):
    """What the stages train, BLIP-2's way. The LLaVA recipe's model is built first (same seed) for its
    initial CLIP tower — which the contrastive stage trains, or ``tower`` (a trained tower's weights)
    replaces — and its initial decoder, copied into the BLIP-2. Once the tower is final it is converted
    into the BLIP-2's vision model, which stays frozen but for ``ln_vision`` (its ``post_layernorm``)."""

    def __init__(self, processor, cfg: RecipeConfig, device, tower: dict | None = None):
        self.processor = processor
        shell = build_recipe_model(processor.tokenizer, cfg)
        self.model = build_blip2_recipe_model(processor.tokenizer, cfg)
        lm = self.model.language_model
        lm.model.load_state_dict(shell.model.language_model.state_dict())
        lm.lm_head.load_state_dict(shell.lm_head.state_dict())
        self.tower = shell.model.vision_tower
        if tower is not None:
            self.tower.load_state_dict(tower)
        shell.set_attn_implementation(cfg.attention)
        self.model.set_attn_implementation(cfg.attention)
        self.model.to(device)
        self.tower.to(device)
        self.model.vision_model.requires_grad_(False)
        self.model.vision_model.post_layernorm.requires_grad_(True)
        self.decoder, self.head = lm.model, lm.lm_head
        self.modules = {"model": self.model, "tower": self.tower}

    def bridge_params(self) -> list:
        m = self.model
        return [m.query_tokens] + [p for mod in (m.qformer, m.vision_model.post_layernorm, m.language_projection)
                                   for p in mod.parameters()]

    def text_logits(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model.language_model(input_ids=ids, attention_mask=mask).logits  # BLIP-2's forward needs pixels

    def encoder_ready(self) -> None:
        from .blip2 import convert_clip_tower

        convert_clip_tower(self.tower, self.model.vision_model)

    def train(self) -> None:
        self.model.train()
        self.tower.train()


def tower_digest(weights: dict) -> str:
    """A short sha256 of a tower's weights (names and float32 values), naming the encoder a run read."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(weights):
        h.update(name.encode())
        h.update(weights[name].detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


#: The recipe settings an encoder's weights depend on: a source must match the run in all of them.
_ENCODER_SETTINGS = ("world_seed", "n_entities", "image_size", "patch_size", "vision_hidden", "vision_layers",
                     "vision_heads", "vision_intermediate")


#: Where the second teaching model's frozen encoder ships (``train-tiny --recipe llava --encoder-only``).
EMBEDDED_ENCODER = Path(__file__).parent / "embedded_encoder"


def write_encoder(out: str | os.PathLike, tower: torch.nn.Module, cfg: RecipeConfig, record: dict) -> None:
    """Write a recipe's trained CLIP tower to the folder ``out`` (atomically): the ``CLIPVisionModel`` in
    float32 (so that a run reading it computes exactly what the run that trained it went on to compute),
    ``encoder.json`` (the settings its weights depend on and their digest) and ``training.json``."""
    weights = tower.state_dict()
    info = {"edition": 2, "recipe": cfg.name, **{k: getattr(cfg, k) for k in _ENCODER_SETTINGS},
            "encoder_steps": cfg.encoder_steps, "digest": tower_digest(weights)}
    with atomic_path(Path(out)) as tmp:
        tmp.mkdir(parents=True)
        tower.save_pretrained(tmp)
        (tmp / "encoder.json").write_text(json.dumps(info, indent=1) + "\n")
        (tmp / "training.json").write_text(json.dumps(record, indent=1) + "\n")


def load_encoder(path: str | os.PathLike, cfg: RecipeConfig) -> dict:
    """The frozen CLIP tower's weights (a ``CLIPVisionModel`` state dict) of the LLaVA recipe: an encoder
    folder (``encoder.json``, written by ``--encoder-only``), a finished model folder (``visedit.json``,
    ``model.safetensors``), or a checkpoint ``OUT.ckpt`` of a run with a frozen encoder that is past its
    encoder stage (the tower never changes after it). Refused in one line when it is none of these, when
    its world or tower size differ from ``cfg``'s, or when an encoder folder's weights are not the ones
    its ``encoder.json`` names."""
    path = Path(path)
    prefix = "model.vision_tower."
    if path.is_dir() and (path / "encoder.json").exists():
        from transformers import CLIPVisionModel

        info = json.loads((path / "encoder.json").read_text())
        have = {k: info.get(k) for k in _ENCODER_SETTINGS}
        wrong = [f"{k} {have[k]} (this run: {getattr(cfg, k)})" for k in _ENCODER_SETTINGS if have[k] != getattr(cfg, k)]
        if wrong:
            raise ValueError(f"encoder_from={path} has other settings: {', '.join(wrong)}")
        try:
            weights = CLIPVisionModel.from_pretrained(path, dtype=torch.float32).state_dict()
        except (OSError, ValueError) as err:
            raise ValueError(f"encoder_from={path}: its weights do not load ({str(err).splitlines()[0]}); rebuild "
                             "the folder with `python -m visedit train-tiny --recipe llava --encoder-only`") from None
        if tower_digest(weights) != info.get("digest"):
            raise ValueError(f"encoder_from={path}: its weights are not the ones encoder.json names (digest "
                             f"{tower_digest(weights)}, not {info.get('digest')}); rebuild the folder with "
                             "`python -m visedit train-tiny --recipe llava --encoder-only`")
        return {k: v.float() for k, v in weights.items()}
    if path.is_dir() and (path / "model.safetensors").exists():
        info = json.loads((path / "visedit.json").read_text()) if (path / "visedit.json").exists() else {}
        config = json.loads((path / "config.json").read_text())
        vision = config.get("vision_config", {})
        have = {"world_seed": info.get("world_seed"), "n_entities": info.get("n_entities"),
                "image_size": vision.get("image_size"), "patch_size": vision.get("patch_size"),
                "vision_hidden": vision.get("hidden_size"), "vision_layers": vision.get("num_hidden_layers"),
                "vision_heads": vision.get("num_attention_heads"),
                "vision_intermediate": vision.get("intermediate_size")}
        if config.get("model_type") != "llava" or info.get("edition") != 2:
            raise ValueError(f"encoder_from={path}: not a LLaVA-recipe model folder (train one with "
                             "`python -m visedit train-tiny --recipe llava`)")
        weights = None  # read once the settings are checked
    elif path.is_file():
        state = torch.load(path, map_location="cpu", weights_only=False)
        if not isinstance(state, dict) or "modules" not in state or "config" not in state:
            raise ValueError(f"encoder_from={path}: not a recipe checkpoint (OUT.ckpt) nor a model folder")
        have = {k: state["config"].get(k) for k in _ENCODER_SETTINGS}
        if state["config"].get("architecture", "llava") != "llava" or not state["config"].get("frozen_encoder"):
            raise ValueError(f"encoder_from={path}: the checkpoint of a run without a frozen CLIP encoder")
        if state["stage"] == "encoder":
            raise ValueError(f"encoder_from={path}: that run is still in its encoder stage (step {state['step']}); "
                             "its tower is final once the stage ends")
        weights = {k[len(prefix):]: v for k, v in state["modules"]["model"].items() if k.startswith(prefix)}
    else:
        raise ValueError(f"encoder_from={path}: no such encoder folder, model folder or checkpoint")
    wrong = [f"{k} {have[k]} (this run: {getattr(cfg, k)})" for k in _ENCODER_SETTINGS if have[k] != getattr(cfg, k)]
    if wrong:
        raise ValueError(f"encoder_from={path} has other settings: {', '.join(wrong)}")
    if weights is None:  # transformers reads the folder, whatever its file's key names
        from transformers import LlavaForConditionalGeneration

        weights = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).model.vision_tower.state_dict()
    return {k: v.float() for k, v in weights.items()}


class _TextEncoder(torch.nn.Module):
    """The contrastive stage's caption encoder: embeddings, 2 transformer layers, mean pooling."""

    def __init__(self, vocab: int, width: int, out: int, max_len: int = 96):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.pos = torch.nn.Parameter(torch.zeros(max_len, width))
        layer = torch.nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.body = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.proj = torch.nn.Linear(width, out)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.body(self.embed(ids) + self.pos[: ids.shape[1]], src_key_padding_mask=mask == 0)
        h = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return F.normalize(self.proj(h), dim=-1)


# --------------------------------------------------------------------------------------------- batches
class _Batcher:
    """Token sequences in the model's frame, built by the tokenizer exactly as ``VLLM.inputs`` builds them."""

    def __init__(self, processor, world: World, cfg: RecipeConfig):
        self.tok = processor.tokenizer
        self.image_processor = processor.image_processor
        self.world, self.cfg = world, cfg
        self.img = self.tok.convert_tokens_to_ids("<image>")
        self.eos, self.pad = self.tok.eos_token_id, self.tok.pad_token_id
        self._cache: dict[str, list[int]] = {}

    def ids(self, text: str) -> list[int]:
        if text not in self._cache:
            self._cache[text] = self.tok(text, add_special_tokens=False)["input_ids"]
        return self._cache[text]

    def sequence(self, turns: list[tuple[str, str]], with_image: bool) -> tuple[list[int], list[int]]:
        """``<s>USER: <image>×N\\nq1 ASSISTANT: a1</s>USER: q2 ASSISTANT: a2</s>…`` and its labels
        (answer tokens and their end token). BLIP-2's processor puts its N query tokens before everything:
        ``<image>×N<s>USER: q1 ASSISTANT: a1</s>…``."""
        ids, labels = [self.tok.bos_token_id], [-100]
        if with_image and self.cfg.architecture == "blip2":
            ids, labels = [self.img] * self.cfg.n_visual + ids, [-100] * (self.cfg.n_visual + 1)
            with_image = False  # the question is framed as a text-only one
        head, tail = FRAME.split("{image}")
        for k, (q, a) in enumerate(turns):
            if with_image and k == 0:  # the processor tokenizes around the image token: same ids
                prompt = self.ids(head) + [self.img] * self.cfg.n_visual + self.ids("\n" + tail.format(question=q))
            else:
                prompt = self.ids(FRAME.format(image="", question=q))
            ans = self.ids(" " + a) + [self.eos]
            ids += prompt + ans
            labels += [-100] * len(prompt) + ans
        return ids, labels

    def collate(self, seqs):
        return collate(seqs, self.pad)

    def pixels(self, images) -> torch.Tensor:
        return self.image_processor(images, return_tensors="pt")["pixel_values"]

    def scenes(self, rng: np.random.Generator, n: int) -> list:
        return draw_scenes(self.world, rng, n, max_creatures=self.cfg.max_creatures, size=self.cfg.image_size)


def draw_scenes(world: World, rng: np.random.Generator, n: int, *, max_creatures: int = 4, size: int = 80) -> list:
    """``n`` scenes of 1 to ``max_creatures`` distinct creatures of ``world``, drawn and rendered from ``rng``."""
    out = []
    for _ in range(n):
        k = int(rng.integers(1, max_creatures + 1))
        ents = [world.entities[i] for i in rng.choice(len(world), k, replace=False)]
        out.append(render_scene(ents, seed=rng, size=size))
    return out


def selector_last_templates() -> dict[str, tuple[str, ...]]:
    """The training templates that end with their selector (``{x} ?`` or ``{x} .``), per fact."""
    return {f: tuple(t for t in ts if t.rstrip(" ?.").endswith("{x}")) for f, ts in SCENE_TEMPLATES.items()}


def scene_turns(scene, rng: random.Random, n: int, *, templates: dict | None = None) -> list[tuple[str, str]]:
    """``n`` (question, answer) turns about creatures of ``scene``, each with a selector that picks its
    creature out and does not give the answer away (training templates only; ``templates``: a subset of
    them per fact, e.g. :func:`selector_last_templates`)."""
    templates = templates or SCENE_TEMPLATES
    if not any(selectors(scene, j) for j in range(len(scene))):
        # no creature can be picked out (same colour and pattern, none far enough to one side): the
        # scene is described instead of asked about (rare; every other scene's stream is unchanged)
        return [(DESCRIBE, caption(scene, rng=rng))]
    turns = []
    for _ in range(n):
        k = rng.randrange(len(scene))
        fact = rng.choice(FACTS)
        options = askable(scene, k, fact)
        while not options:  # e.g. a creature selectable only by its colour, asked its colour
            k, fact = rng.randrange(len(scene)), rng.choice(FACTS)
            options = askable(scene, k, fact)
        phrase = options[rng.choice(sorted(options))]
        turns.append((rng.choice(templates[fact]).format(x=phrase), scene.entities[k].fact(fact)))
    return turns


NEGATIVE_KINDS = ("colour", "pattern", "shape", "position")


def looks_phrase(colour: str, pattern: str, shape: str) -> str:
    """A creature's appearance in the captions' words, without its position: "a red striped star ."."""
    return f"{'an' if colour[0] in 'aeiou' else 'a'} {colour} {pattern} {shape} ."


#: Every appearance the world's words can describe (colour × pattern × shape), in a fixed order.
LOOKS = tuple(looks_phrase(c, p, s) for c in COLOURS for p in PATTERNS for s in SHAPES)
_LOOKS_INDEX = {phrase: k for k, phrase in enumerate(LOOKS)}


def region_pool(scenes, patches: torch.Tensor, patch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each creature's patch states pooled over its mask, and its index in :data:`LOOKS`.

    ``patches`` (B, N, d): the B scenes' patch states (no class token). A creature's vector is the mean
    of the patch states weighted by the share of each patch its mask covers. Returns (C, d) and (C,)
    for the C creatures of all scenes, scene by scene."""
    weights, rows, target = [], [], []
    for i, scene in enumerate(scenes):
        for e, mask in zip(scene.entities, scene.masks):
            H, W = mask.shape
            weights.append(mask.reshape(H // patch_size, patch_size, W // patch_size, patch_size).mean((1, 3)).ravel())
            rows.append(i)
            target.append(_LOOKS_INDEX[looks_phrase(e.colour, e.pattern, e.shape)])
    w = torch.tensor(np.stack(weights), dtype=patches.dtype, device=patches.device)
    pooled = (w[:, :, None] * patches[torch.tensor(rows, device=patches.device)]).sum(1) / w.sum(1, keepdim=True)
    return pooled, torch.tensor(target)


def _hard_negative(scene, rng: random.Random, what: str | None = None) -> str:
    """The scene's caption with one creature's colour, pattern, shape or position changed (``what``: that
    one; None: drawn)."""
    k = rng.randrange(len(scene))
    if what is None:
        what = rng.choice(NEGATIVE_KINDS)
    parts = []
    for j, e in enumerate(scene.entities):
        c, p, s, where = e.colour, e.pattern, e.shape, position_words(scene, j)
        if j == k:
            if what == "colour":
                c = rng.choice([x for x in COLOURS if x != c])
            elif what == "pattern":
                p = rng.choice([x for x in PATTERNS if x != p])
            elif what == "shape":
                s = rng.choice([x for x in SHAPES if x != s])
            else:
                where = rng.choice([x for x in ("at the top left", "at the top", "at the top right", "on the left",
                                                "in the middle", "on the right", "at the bottom left",
                                                "at the bottom", "at the bottom right") if x != where])
        article = "an" if c[0] in "aeiou" else "a"
        parts.append(f"{article} {c} {p} {s} {where} .")
    rng.shuffle(parts)
    return " ".join(parts)


# --------------------------------------------------------------------------------------------- training
def _step_rngs(cfg: RecipeConfig, stage: int, step: int) -> tuple[np.random.Generator, random.Random]:
    """Every step's data comes from its own seeds, so a resumed run draws what an unbroken one draws."""
    return (np.random.default_rng([cfg.seed, RECIPE_STREAM, stage, step]),
            random.Random(f"{cfg.seed}-{stage}-{step}"))


class _Checkpoint:
    """``<out>.ckpt``: the stage and step reached, every weight, the optimiser and the record."""

    def __init__(self, out: Path, cfg: RecipeConfig):
        self.path = Path(str(out) + ".ckpt")
        self.cfg = cfg
        self.tokenizer: str | None = None
        self.state: dict | None = None
        if self.path.exists():
            state = torch.load(self.path, map_location="cpu", weights_only=False)
            # a setting added since the checkpoint was written has the value that reproduces what the run did
            saved = ({f.name: f.default for f in dataclasses.fields(RecipeConfig)} | ADDED_SINCE
                     | state.get("config", {}))
            if saved != dataclasses.asdict(cfg):
                raise ValueError(f"{self.path} was written by a run with other settings; delete it to start over, "
                                 "or pass the settings it was written with")
            self.state = state

    def save(self, stage: str, step: int, modules: dict, opt, record: dict) -> None:
        state = {"config": dataclasses.asdict(self.cfg), "tokenizer": self.tokenizer, "stage": stage, "step": step,
                 "record": record,
                 "modules": {k: m.state_dict() for k, m in modules.items()},
                 "opt": opt.state_dict() if opt is not None else None}
        tmp = self.path.with_name(self.path.name + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.path)
        self.state = state

    def position(self) -> tuple[int, int]:
        """(stage index, first step to run) of the run so far; (0, 0) for a new run."""
        if self.state is None:
            return 0, 0
        return STAGES.index(self.state["stage"]), self.state["step"]


def train_recipe(out: str | Path, cfg: RecipeConfig = RecipeConfig(), *, progress: bool = True,
                 device: str = "cpu", checkpoint_every: int = 100, log_every: int = 100,
                 stop_after: int | None = None, encoder_from: str | os.PathLike | None = None,
                 encoder_only: bool = False) -> dict:
    """Train a recipe model and write it (weights in half precision, config, processor, ``training.json``,
    ``visedit.json``) to ``out``; resumes from ``<out>.ckpt`` when one is there. Returns the record.

    ``stop_after``: stop (with a checkpoint) after this many steps in this call, for tests and for
    splitting a run over sessions; the folder is written only when every stage is done.
    ``encoder_from``: an encoder folder, LLaVA-recipe folder or checkpoint whose frozen CLIP tower this
    model reads (see :func:`load_encoder`); the encoder stage is then skipped, and the run computes exactly
    what the run that trained that tower computed after its encoder stage. A resumed run must be given the
    same encoder. ``encoder_only``: run the encoder stage alone and write the tower to ``out`` as an
    encoder folder (:func:`write_encoder`).
    """
    out = Path(out)
    torch.set_num_threads(cfg.threads)
    if (encoder_from is not None or encoder_only) and not cfg.frozen_encoder:
        raise ValueError(f"encoder_from and encoder_only need a frozen encoder; recipe {cfg.name!r} trains its tower "
                         "with the decoder")
    if encoder_from is not None and encoder_only:
        raise ValueError("encoder_only trains the encoder that encoder_from would read: pass one of them")
    if encoder_only and cfg.architecture != "llava":
        raise ValueError(f"encoder_only writes the llava recipe's encoder; recipe {cfg.name!r} reads one with "
                         "encoder_from")
    world = make_world(cfg.world_seed, cfg.n_entities)
    ckpt = _Checkpoint(out, cfg)
    source = load_encoder(encoder_from, cfg) if encoder_from is not None else None
    source_id = {"path": str(encoder_from), "digest": tower_digest(source)} if source is not None else None
    if ckpt.state is not None and (ckpt.state["record"].get("encoder_from") or {}).get("digest") != (
            source_id or {}).get("digest"):
        was = ckpt.state["record"].get("encoder_from")
        raise ValueError(f"{ckpt.path} was written by a run that read "
                         f"{'the encoder of ' + was['path'] if was else 'the encoder it trained'}; pass "
                         f"{'encoder_from=' + repr(was['path']) if was else 'no encoder_from'} to resume it, "
                         "or delete it to start over")
    # a resumed run reads with the tokenizer it started with, whatever the corpus code has become since
    processor = build_recipe_processor(world, cfg, tokenizer_json=(ckpt.state or {}).get("tokenizer"))
    ckpt.tokenizer = processor.tokenizer.backend_tokenizer.to_str()
    if cfg.architecture == "blip2":
        parts = _Blip2Parts(_blip2_processor(processor, cfg), cfg, device, tower=source)
    else:
        parts = _LlavaParts(processor, cfg, device, tower=source)
    processor, model, tower, decoder, head = parts.processor, parts.model, parts.tower, parts.decoder, parts.head
    batcher = _Batcher(processor, world, cfg)
    torch.manual_seed(cfg.seed + 1)
    text_enc = _TextEncoder(len(processor.tokenizer), cfg.vision_hidden, cfg.vision_hidden).to(device)
    img_proj = torch.nn.Linear(cfg.vision_hidden, cfg.vision_hidden).to(device)
    log_temp = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07), device=device))
    aux = torch.nn.ModuleDict({"text": text_enc, "img": img_proj})
    if cfg.region_weight:  # only then, so that checkpoints of runs without it keep loading
        aux["region"] = torch.nn.Linear(cfg.vision_hidden, cfg.vision_hidden).to(device)
    if cfg.position_weight:
        grid = cfg.image_size // cfg.patch_size
        aux["row"] = torch.nn.Linear(cfg.vision_hidden, grid).to(device)
        aux["column"] = torch.nn.Linear(cfg.vision_hidden, grid).to(device)
    if cfg.encoder_objective == "masked":
        aux["pixels"] = torch.nn.Linear(cfg.vision_hidden, 3 * cfg.patch_size ** 2).to(device)
    start_stage, start_step = ckpt.position()
    record = ckpt.state["record"] if ckpt.state else {"config": dataclasses.asdict(cfg), "log": [], "seconds": {}}
    if source_id is not None:
        record["encoder_from"] = source_id
    if ckpt.state:
        for key, module in parts.modules.items():
            module.load_state_dict(ckpt.state["modules"][key])
        aux.load_state_dict(ckpt.state["modules"]["aux"])
        log_temp.data.fill_(ckpt.state["modules"]["temp"]["t"].item())
    autocast = torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=cfg.bf16)
    budget = {"n": stop_after}

    def params(*mods):
        return [p for m in mods for p in m.parameters()]

    def run_stage(index: int, name: str, steps: int, trainable: list, lr: float, warmup: int, step_fn) -> bool:
        """Run one stage from the checkpoint's step; False when ``stop_after`` interrupted it."""
        if index < start_stage or steps == 0:
            return True
        first = start_step if index == start_stage else 0
        decay = [p for p in trainable if p.ndim >= 2]
        rest = [p for p in trainable if p.ndim < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                 {"params": rest, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98))
        seconds = record["seconds"].get(name, 0.0)

        def log(state: FitState) -> None:
            record["log"].append({"stage": name, "step": state.step, "loss": round(state.running, 4)})
            if not progress:
                print(json.dumps(record["log"][-1]), flush=True)

        def checkpoint(state: FitState) -> None:
            record[f"{name}_running"] = state.running  # unrounded: a resumed run logs what an unbroken one logs
            record["seconds"][name] = round(seconds + state.seconds, 1)
            if state.finished:
                record[f"{name}_loss"] = round(float(state.running), 4)
            nxt = (STAGES[index + 1], 0) if state.finished and index + 1 < len(STAGES) else (name, state.step)
            if state.finished and index + 1 == len(STAGES):
                nxt = ("instruct", steps)
            ckpt.save(nxt[0], nxt[1], {**parts.modules, "aux": aux, "temp": _Temp(log_temp)},
                      None if state.finished else opt, record)

        resumed = first and ckpt.state and ckpt.state["opt"] is not None
        state = fit(step_fn, opt, steps, lr=lambda step: warmup_cosine(step, steps, warmup, lr),
                    clip_params=trainable, max_norm=1.0, start=first,
                    optimizer_state=ckpt.state["opt"] if resumed else None, running=record.get(f"{name}_running"),
                    stop_after=budget["n"], desc=name, progress=progress,
                    callbacks=[Every(log_every, log), Every(checkpoint_every, checkpoint, at_end=True)])
        if budget["n"] is not None:
            budget["n"] -= state.step - first
        return state.finished

    # ---- stage 1: contrastive vision pre-training --------------------------------------------------
    def encoder_step(step: int) -> torch.Tensor:
        rng, py = _step_rngs(cfg, 1, step)
        scenes = batcher.scenes(rng, cfg.encoder_batch)
        texts = [caption(s, rng=py) for s in scenes]
        if cfg.negatives == "any":
            texts += [_hard_negative(s, py) for s in scenes]
        else:  # "each": one hard negative per kind of change, so every batch asks for every attribute
            texts += [_hard_negative(s, py, what) for what in NEGATIVE_KINDS for s in scenes]
        enc = processor.tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
        with autocast:
            out = tower(batcher.pixels([s.image for s in scenes]).to(device),
                        output_hidden_states=cfg.region_weight > 0 or cfg.position_weight > 0)
            img = F.normalize(img_proj(out.pooler_output).float(), dim=-1)
            txt = text_enc(enc["input_ids"].to(device), enc["attention_mask"].to(device)).float()
        scale = log_temp.clamp(max=math.log(100)).exp()
        logits = scale * img @ txt.T
        target = torch.arange(len(scenes), device=device)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits[:, : len(scenes)].T, target)) / 2
        if cfg.region_weight:
            loss = loss + cfg.region_weight * region_loss(scenes, out.hidden_states[-2][:, 1:], scale)
        if cfg.position_weight:
            loss = loss + cfg.position_weight * position_loss(out.hidden_states[-2][:, 1:])
        return loss

    def masked_step(step: int) -> torch.Tensor:
        """Masked-patch pre-training: the tower sees each scene with a ``mask_ratio`` share of its patches
        blanked (0, the normalised pixels' mean) and predicts their pixels, normalised per patch, from its
        states at the layer the decoder reads (mean squared error over the blanked patches)."""
        rng, _ = _step_rngs(cfg, 1, step)
        scenes = batcher.scenes(rng, cfg.encoder_batch)
        pixels = batcher.pixels([s.image for s in scenes]).to(device)
        B, p, g = len(scenes), cfg.patch_size, cfg.image_size // cfg.patch_size
        hide = torch.from_numpy(rng.random((B, g * g)) < cfg.mask_ratio).to(device)
        keep = (~hide).view(B, 1, g, 1, g, 1).expand(B, 3, g, p, g, p).reshape(pixels.shape)
        target = pixels.view(B, 3, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(B, g * g, 3 * p * p).float()
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
        with autocast:
            out = tower(pixels * keep, output_hidden_states=True)
            patches = out.hidden_states[-2][:, 1:]
            pred = aux["pixels"](patches).float()
        loss = ((pred - target) ** 2).mean(-1)[hide].mean()
        if cfg.position_weight:
            loss = loss + cfg.position_weight * position_loss(patches)
        return loss

    looks_enc = processor.tokenizer(list(LOOKS), add_special_tokens=False, padding=True, return_tensors="pt")

    def region_loss(scenes, patches: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Each creature's pooled patch states against every appearance phrase (CLIP's zero-shot
        classifier, trained): the region term of the contrastive stage."""
        with autocast:
            pooled, target = region_pool(scenes, patches.float(), cfg.patch_size)
            reg = F.normalize(aux["region"](pooled).float(), dim=-1)
            phr = text_enc(looks_enc["input_ids"].to(device), looks_enc["attention_mask"].to(device)).float()
        return F.cross_entropy(scale * reg @ phr.T, target.to(device))

    def position_loss(patches: torch.Tensor) -> torch.Tensor:
        """Each patch state names its own row and column (the position term of the contrastive stage)."""
        grid = cfg.image_size // cfg.patch_size
        where = torch.arange(grid * grid, device=patches.device).repeat(len(patches))
        flat = patches.float().flatten(0, 1)
        with autocast:
            row, col = aux["row"](flat).float(), aux["column"](flat).float()
        return (F.cross_entropy(row, where // grid) + F.cross_entropy(col, where % grid)) / 2

    parts.train()
    if cfg.encoder_objective == "masked":  # no text: the caption encoder and temperature stay out
        heads = [aux[k] for k in ("pixels", "row", "column") if k in aux]
        encoder_params, encoder_fn = params(tower, *heads), masked_step
    else:
        encoder_params, encoder_fn = params(tower, aux) + [log_temp], encoder_step
    stages_done = run_stage(0, "encoder", 0 if source is not None else cfg.encoder_steps, encoder_params,
                            cfg.encoder_lr, cfg.warmup, encoder_fn)
    if cfg.frozen_encoder:
        tower.requires_grad_(False)
    if stages_done:
        parts.encoder_ready()
    if encoder_only:
        if not stages_done:
            record["stopped"] = True
            return record
        record.pop("stopped", None)
        # what the encoder stage did (a checkpoint past it, copied from a full run, holds later stages too)
        encoder_record = {k: v for k, v in record.items() if not k.startswith(STAGES[1:])}
        encoder_record["log"] = [e for e in record["log"] if e["stage"] == "encoder"]
        encoder_record["seconds"] = {"encoder": record["seconds"].get("encoder", 0.0)}
        write_encoder(out, tower, cfg, encoder_record)
        return record

    # ---- stage 2: language pre-training -------------------------------------------------------------
    def text_sequences(py: random.Random, n: int) -> list:
        seqs = [batcher.sequence(text_turns(world, py, 4), False) for _ in range(n)]
        return seqs

    def language_step(step: int) -> torch.Tensor:
        rng, py = _step_rngs(cfg, 2, step)
        seqs = text_sequences(py, cfg.language_batch - cfg.language_batch // 4)
        scenes = batcher.scenes(rng, cfg.language_batch // 4)  # captions as text: "describe a picture"
        seqs += [batcher.sequence([(DESCRIBE, caption(s, rng=py))], False) for s in scenes]
        ids, labels, mask = batcher.collate(seqs)
        with autocast:
            logits = parts.text_logits(ids.to(device), mask.to(device))
        return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten().to(device))

    if stages_done:
        stages_done = run_stage(1, "language", cfg.language_steps, params(decoder, head), cfg.language_lr,
                                cfg.warmup, language_step)

    # ---- stage 3: alignment --------------------------------------------------------------------------
    def image_step(stage: int, n_images: int, turns_fn, n_text: int):
        def fn(step: int) -> torch.Tensor:
            rng, py = _step_rngs(cfg, stage, step)
            scenes = batcher.scenes(rng, n_images)
            seqs = [batcher.sequence(turns_fn(s, py), True) for s in scenes] + text_sequences(py, n_text)
            ids, labels, mask = batcher.collate(seqs)
            with autocast:
                logits = parts.image_logits(ids.to(device), mask.to(device),
                                            batcher.pixels([s.image for s in scenes]).to(device))
            return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten().to(device))
        return fn

    align_params = parts.bridge_params() + ([] if cfg.frozen_encoder else params(tower))
    if stages_done:
        stages_done = run_stage(2, "align", cfg.align_steps, align_params, cfg.align_lr, cfg.warmup // 2,
                                image_step(3, cfg.align_batch, lambda s, py: [(DESCRIBE, caption(s, rng=py))], 0))

    # ---- stage 4: visual instruction tuning ------------------------------------------------------------
    asked = selector_last_templates() if cfg.selector_position == "last" else None
    instruct_params = parts.bridge_params() + params(decoder, head) + ([] if cfg.frozen_encoder else params(tower))
    if stages_done:
        stages_done = run_stage(3, "instruct", cfg.steps, instruct_params, cfg.lr, cfg.warmup,
                                image_step(4, cfg.batch_images,
                                           lambda s, py: scene_turns(s, py, cfg.qa_per_image, templates=asked),
                                           cfg.batch_text))
    if not stages_done:
        record["stopped"] = True
        return record

    record.pop("stopped", None)
    record["wall_seconds"] = round(sum(record["seconds"].values()), 1)
    record["threads"] = cfg.threads
    record["device"] = str(device)
    model.eval()
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        model.to("cpu", torch.float16).save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / "training.json").write_text(json.dumps(record, indent=1) + "\n")
        info = {"edition": 2, "recipe": cfg.name, "world_seed": cfg.world_seed, "n_entities": cfg.n_entities,
                "image_size": cfg.image_size}
        if cfg.architecture == "blip2":  # read in the LLaVA model's frame; the query tokens go before it
            info["frame"] = dataclasses.asdict(PromptFrame(FRAME, image_in_text=False))
            info["encoder"] = tower_digest(tower.state_dict())
        (tmp / "visedit.json").write_text(json.dumps(info, indent=1) + "\n")
    return record


class _Temp(torch.nn.Module):
    """Holds the contrastive temperature so it is saved with the other modules."""

    def __init__(self, t: torch.Tensor):
        super().__init__()
        self.register_buffer("t", t.detach().clone())
