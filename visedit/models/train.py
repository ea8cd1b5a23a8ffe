"""Training the embedded tiny VLLM from scratch on the world (``python -m visedit train-tiny``).

Three stages, all seeded:

1. *Dense vision pre-training*: the vision tower learns, for every patch, whether it shows the object
   and, if so, the object's colour, shape and pattern (shape recognition is the slowest skill to learn).
2. *Visual instruction tuning* (all weights): sequences of several question–answer turns about one
   rendered image, mixed with text-only sequences of questions about named entities. The loss is
   cross-entropy on answer tokens (and the end-of-answer token), plus ``aux_weight`` × the dense
   patch loss of stage 1 on the same images, so the vision tower keeps improving.
3. *Context reading* (all weights, ``context_steps`` at ``context_lr``, no auxiliary loss): the stage-2
   mixture plus ``context_batch`` sequences that state a fact in the prompt — inside the image turn
   ("the habitat of this creature is desert ."), before the image, or as an earlier question–answer
   turn, the frame in-context editing uses. When the stated fact is the one asked about, the answer is the stated value (usually a
   counterfactual); when it is about another fact, the answer is the creature's own. In some sequences
   the statement is a *note* — the words of a question and its answer written over a few of the visual
   tokens (the projector's output), the tiny model's stand-in for text shown in an image. Large language
   models read facts from their context and from what an image shows; a model trained only on question
   answering does neither, and then in-context editing, and any editor that writes into the visual
   tokens, has no reader to talk to.

Training images come from a seed stream that neither the edit dataset nor the model card uses.
"""

from __future__ import annotations

import dataclasses
import json
from functools import partial
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..config import StrictConfig
from ..fit import Every, FitState, fit, warmup_cosine
from ..hooks import Trace, edit_output
from ..io import atomic_path
from ..world import FACTS, TEXT_FACTS, TRAIN_TEMPLATES, World, make_world, render, text_question
from ..world.entities import COLOURS, PATTERNS, SHAPES
from .tiny import TinyConfig, build_model, build_processor

#: Offset that keeps training renderings disjoint from dataset (0–9) and model-card (10) streams.
TRAIN_STREAM = 20


@dataclasses.dataclass(frozen=True)
class TrainConfig(StrictConfig):
    """How the tiny model is trained. ``steps`` × ``batch_images`` images are rendered on the fly."""

    seed: int = 0
    world_seed: int = 0
    n_entities: int = 70
    vision_steps: int = 4000
    vision_batch: int = 64
    vision_lr: float = 2e-3
    aux_weight: float = 0.5
    steps: int = 2600
    batch_images: int = 24
    batch_text: int = 8
    qa_per_image: int = 3
    qa_per_text: int = 4
    lr: float = 5e-4
    warmup: int = 100
    context_steps: int = 600
    context_batch: int = 16
    context_lr: float = 2e-4
    weight_decay: float = 0.01
    bf16: bool = True
    threads: int = 2

    def __post_init__(self) -> None:
        if self.qa_per_image < 1 or self.qa_per_image > len(FACTS):
            raise ValueError(f"qa_per_image must be in 1…{len(FACTS)}, got {self.qa_per_image}")
        if self.context_steps < 0:
            raise ValueError(f"TrainConfig.context_steps must be ≥ 0, got {self.context_steps}")
        for name in ("steps", "batch_images", "batch_text", "qa_per_text", "threads", "context_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be ≥ 1, got {getattr(self, name)}")
        for name in ("lr", "context_lr"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"{name} must be in (0, 1), got {getattr(self, name)}")


class _Batcher:
    """Builds token sequences directly from word ids (the word-level tokenizer is compositional)."""

    def __init__(self, processor, world: World, n_visual: int):
        self.tok = processor.tokenizer
        self.image_processor = processor.image_processor
        self.world = world
        self.n_visual = n_visual
        vocab = self.tok.get_vocab()
        self.bos, self.eos, self.pad = self.tok.bos_token_id, self.tok.eos_token_id, self.tok.pad_token_id
        self.img = vocab["<image>"]
        self._cache: dict[str, list[int]] = {}

    def words(self, text: str) -> list[int]:
        if text not in self._cache:
            self._cache[text] = self.tok(text, add_special_tokens=False)["input_ids"]
        return self._cache[text]

    def turn(self, question: str, answer: str, first_image: bool) -> tuple[list[int], list[int]]:
        ids = self.words("user :") + ([self.img] * self.n_visual if first_image else []) + self.words(question)
        ids += self.words("assistant :")
        ans = self.words(answer) + [self.eos]
        return ids + ans, [-100] * len(ids) + ans

    def sequence(self, turns: list[tuple[str, str]], with_image: bool) -> tuple[list[int], list[int]]:
        ids, labels = [self.bos], [-100]
        for k, (q, a) in enumerate(turns):
            i, l = self.turn(q, a, with_image and k == 0)
            ids += i
            labels += l
        return ids, labels

    def context_sequence(self, entity, rng: random.Random) -> tuple[list[int], list[int], list[int] | None]:
        """A stage-3 sequence: a fact stated in the prompt or written into the visual tokens, then a
        question about ``entity``'s image. Returns ids, labels and the note's word ids (or None)."""
        world, img = self.world, [self.img] * self.n_visual
        asked = rng.choice(FACTS)
        stated = asked if rng.random() < 0.6 else rng.choice([f for f in FACTS if f != asked])
        truth = entity.fact(stated)
        value = rng.choice([a for a in world.answers(stated) if a != truth]) if rng.random() < 0.85 else truth
        answer = value if stated == asked else entity.fact(asked)
        question = rng.choice(TRAIN_TEMPLATES[asked])
        frame, note = rng.choices(range(4), weights=(1, 1, 1, 2))[0], None
        if frame == 0:    # the statement inside the image turn
            ids = self.words("user :") + img + self.words(f"the {stated} of this creature is {value} . {question}")
        elif frame == 1:  # the statement before the image
            ids = self.words(f"user : the {stated} of this creature is {value} .") + img + self.words(question)
        elif frame == 2:  # an earlier turn, as in-context editing writes it
            ids = self.words(f"user : {rng.choice(TRAIN_TEMPLATES[stated])} assistant : {value} user :") + img
            ids += self.words(question)
        else:             # a question–answer note written over some of the visual tokens
            ids = self.words("user :") + img + self.words(question)
            note = self.words(f"{rng.choice(TRAIN_TEMPLATES[stated])} {value}")
        ids = [self.bos] + ids + self.words("assistant :")
        ans = self.words(answer) + [self.eos]
        return ids + ans, [-100] * len(ids) + ans, note

    def collate(self, seqs: list[tuple[list[int], list[int]]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return collate(seqs, self.pad)

    def pixels(self, images) -> torch.Tensor:
        return self.image_processor(images, return_tensors="pt")["pixel_values"]


def collate(seqs: list[tuple[list[int], list[int]]], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad (ids, labels) pairs into ``input_ids``, ``labels`` (−100 on padding) and ``attention_mask``."""
    width = max(len(s[0]) for s in seqs)
    ids = torch.full((len(seqs), width), pad)
    labels = torch.full((len(seqs), width), -100)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for b, (i, l) in enumerate(seqs):
        ids[b, : len(i)] = torch.tensor(i)
        labels[b, : len(l)] = torch.tensor(l)
        mask[b, : len(i)] = 1
    return ids, labels, mask


def _image_qa(batcher: _Batcher, ents, py_rng: random.Random, cfg: TrainConfig) -> list:
    """One sequence of ``qa_per_image`` question–answer turns per rendered entity."""
    seqs = []
    for e in ents:
        facts = py_rng.sample(FACTS, cfg.qa_per_image)
        seqs.append(batcher.sequence([(py_rng.choice(TRAIN_TEMPLATES[f]), e.fact(f)) for f in facts], True))
    return seqs


def _text_qa(batcher: _Batcher, py_rng: random.Random, cfg: TrainConfig) -> list:
    """``batch_text`` text-only sequences of ``qa_per_text`` questions about named entities."""
    seqs = []
    for _ in range(cfg.batch_text):
        turns = []
        for _ in range(cfg.qa_per_text):
            e, f = py_rng.choice(batcher.world.entities), py_rng.choice(TEXT_FACTS)
            turns.append((text_question(e, f, py_rng.randrange(2)), e.fact(f)))
        seqs.append(batcher.sequence(turns, False))
    return seqs


def _patch_targets(mask: np.ndarray, patch: int, entity) -> np.ndarray:
    """Per-patch labels (colour, shape, pattern), −100 on patches that are mostly background."""
    g = mask.shape[0] // patch
    frac = mask.reshape(g, patch, g, patch).mean((1, 3)).reshape(-1)
    obj = frac >= 0.25
    out = np.full((g * g, 4), -100, dtype=np.int64)
    out[:, 0] = obj.astype(np.int64)
    out[obj, 1] = list(COLOURS).index(entity.colour)
    out[obj, 2] = SHAPES.index(entity.shape)
    out[obj, 3] = PATTERNS.index(entity.pattern)
    return out


def train_tiny(out: str | Path, cfg: TrainConfig = TrainConfig(), tiny: TinyConfig = TinyConfig(), *,
               progress: bool = True, log_every: int = 200, snapshot_every: int = 0,
               start_from: str | Path | None = None) -> dict:
    """Train the tiny model and write it (weights, config, processor, ``training.json``) to ``out``.

    Returns the training record (config, wall time, losses). The folder appears atomically.
    ``snapshot_every`` > 0 also saves the weights so far to ``<out>.snapshot`` (for watching a long run).
    ``start_from``: a folder written by this function with the same stage-1/2 settings (e.g. with
    ``context_steps=0``); its weights are the end of stage 2, so only stage 3 runs — the result is the
    same as a run from scratch, because stage 3 depends only on those weights and its own seeds.
    """
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    world = make_world(cfg.world_seed, cfg.n_entities)
    processor = build_processor(world, tiny)
    model = build_model(processor.tokenizer, tiny, seed=cfg.seed)
    n_visual = (tiny.image_size // tiny.patch_size) ** 2
    batcher = _Batcher(processor, world, n_visual)
    py_rng = random.Random(cfg.seed)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16)
    t0 = time.time()
    record: dict = {"train_config": dataclasses.asdict(cfg), "tiny_config": dataclasses.asdict(tiny), "log": []}

    if start_from is not None:
        record = _load_stage2(model, start_from, cfg, tiny, record)
    else:
        model.train()
        # ---- stage 1: dense vision pre-training --------------------------------------------------------
        tower = model.model.vision_tower
        heads = torch.nn.ModuleList([torch.nn.Linear(tiny.vision_hidden, n) for n in (2, len(COLOURS), len(SHAPES),
                                                                                      len(PATTERNS))])
        opt = torch.optim.AdamW(list(tower.parameters()) + list(heads.parameters()), lr=cfg.vision_lr)

        def vision_step(step: int) -> torch.Tensor:
            rng = np.random.default_rng([cfg.seed, TRAIN_STREAM, 0, step])
            ents = [world.entities[i] for i in rng.integers(0, len(world), cfg.vision_batch)]
            rends = [render(e, seed=rng, size=tiny.image_size) for e in ents]
            targets = torch.from_numpy(np.stack([_patch_targets(r.mask, tiny.patch_size, e) for r, e in zip(rends, ents)]))
            with autocast:
                feats = tower(batcher.pixels([r.image for r in rends])).last_hidden_state[:, 1:]
                return sum(F.cross_entropy(h(feats).float().flatten(0, 1), targets[..., k].flatten())
                           for k, h in enumerate(heads))

        state = fit(vision_step, opt, cfg.vision_steps, desc="vision pre-training", progress=progress,
                    lr=lambda step: warmup_cosine(step, cfg.vision_steps, cfg.warmup // 2, cfg.vision_lr))
        record["vision_loss"] = round(state.loss, 4)

        # ---- stage 2: visual instruction tuning --------------------------------------------------------
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
        no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                 {"params": no_decay + list(heads.parameters()), "weight_decay": 0.0}], lr=cfg.lr,
                                betas=(0.9, 0.98))

        def instruct_step(step: int) -> tuple[torch.Tensor, dict]:
            rng = np.random.default_rng([cfg.seed, TRAIN_STREAM, 1, step])
            ents = [world.entities[i] for i in rng.integers(0, len(world), cfg.batch_images)]
            rends = [render(e, seed=rng, size=tiny.image_size) for e in ents]
            images = [r.image for r in rends]
            targets = torch.from_numpy(np.stack([_patch_targets(r.mask, tiny.patch_size, e) for r, e in zip(rends, ents)]))
            seqs = _image_qa(batcher, ents, py_rng, cfg) + _text_qa(batcher, py_rng, cfg)
            ids, labels, mask = batcher.collate(seqs)
            pixels = batcher.pixels(images)
            # text-only rows carry no image tokens; LLaVA takes pixel_values only for rows that need them
            with autocast, Trace({"enc": tower.encoder}, detach=False) as tr:
                logits = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
                feats = tr.outputs["enc"][0][:, 1:]
                aux = sum(F.cross_entropy(h(feats).float().flatten(0, 1), targets[..., k].flatten())
                          for k, h in enumerate(heads))
            loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
            return loss + cfg.aux_weight * aux, {"loss": loss.item()}  # the running loss is the answers'

        def snapshot(state: FitState) -> None:
            snap = Path(str(out) + ".snapshot")
            model.save_pretrained(snap)
            processor.save_pretrained(snap)

        state = fit(instruct_step, opt, cfg.steps, lr=lambda step: warmup_cosine(step, cfg.steps, cfg.warmup, cfg.lr),
                    clip_params=model.parameters(), max_norm=1.0, desc="instruction tuning", progress=progress,
                    callbacks=[Every(log_every, _logger(record["log"], t0, progress)), Every(snapshot_every, snapshot)])
        record["final_loss"] = round(float(state.running), 4)

    # ---- stage 3: context reading ------------------------------------------------------------------
    if cfg.context_steps:
        _context_stage(model, batcher, world, cfg, tiny, record, autocast, progress=progress,
                       log_every=log_every, t0=t0)
    record["wall_seconds"] = round(time.time() - t0 + record.get("stage2_seconds", 0.0), 1)
    record["threads"] = cfg.threads
    model.eval()
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def _load_stage2(model, folder, cfg: TrainConfig, tiny: TinyConfig, record: dict) -> dict:
    """Load the stage-2 weights of ``folder`` (checked to match ``cfg``/``tiny`` there) into ``model``."""
    from transformers import LlavaForConditionalGeneration

    folder = Path(folder)
    try:
        saved = json.loads((folder / "training.json").read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"start_from={folder} has no readable training.json ({exc}); pass a folder written by "
                         f"train-tiny") from None
    stage3 = {"context_steps", "context_batch", "context_lr"}
    mine = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in stage3}
    theirs = {k: v for k, v in saved["train_config"].items() if k not in stage3}
    if mine != theirs or saved["tiny_config"] != dataclasses.asdict(tiny):
        diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        raise ValueError(f"start_from={folder} was trained with other stage-1/2 settings ({diff or 'tiny_config'}); "
                         f"train from scratch instead")
    if saved["train_config"].get("context_steps", 0):
        raise ValueError(f"start_from={folder} already went through stage 3; pass the stage-2 model")
    model.load_state_dict(LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).state_dict())
    model.train()
    for key in ("log", "vision_loss", "final_loss"):
        record[key] = saved[key]
    record["stage2_seconds"] = saved["wall_seconds"]
    return record


def write_notes(embed, notes: dict, visual: torch.Tensor) -> torch.Tensor:
    """Projector output (images, N, d) with each note's word embeddings over visual tokens start…"""
    if not notes:
        return visual
    visual = visual.clone()
    for row, (start, ids) in notes.items():
        visual[row, start: start + len(ids)] = embed(ids).to(visual.dtype)
    return visual


def _context_stage(model, batcher: _Batcher, world: World, cfg: TrainConfig, tiny: TinyConfig, record: dict,
                   autocast, *, progress: bool, log_every: int, t0: float) -> None:
    """Stage 3: the stage-2 mixture plus context sequences, fresh AdamW, its own seeds."""
    torch.manual_seed(cfg.seed + 3)
    py_rng = random.Random(f"context-{cfg.seed}")
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.context_lr, betas=(0.9, 0.98))
    embed = model.get_input_embeddings()
    record.setdefault("context_log", [])

    def context_step(step: int) -> torch.Tensor:
        rng = np.random.default_rng([cfg.seed, TRAIN_STREAM, 3, step])
        n = cfg.batch_images + cfg.context_batch
        ents = [world.entities[i] for i in rng.integers(0, len(world), n)]
        images = [render(e, seed=rng, size=tiny.image_size).image for e in ents]
        seqs = _image_qa(batcher, ents[: cfg.batch_images], py_rng, cfg)
        notes = {}
        for k, e in enumerate(ents[cfg.batch_images:], start=cfg.batch_images):
            ids_, labels_, note = batcher.context_sequence(e, py_rng)
            seqs.append((ids_, labels_))
            if note is not None:
                notes[k] = (int(rng.integers(0, batcher.n_visual - len(note) + 1)), torch.tensor(note))
        seqs += _text_qa(batcher, py_rng, cfg)
        ids, labels, mask = batcher.collate(seqs)
        with autocast, edit_output(model.model.multi_modal_projector, partial(write_notes, embed, notes)):
            logits = model(input_ids=ids, attention_mask=mask, pixel_values=batcher.pixels(images)).logits
        return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)

    state = fit(context_step, opt, cfg.context_steps, clip_params=model.parameters(), max_norm=1.0,
                lr=lambda step: warmup_cosine(step, cfg.context_steps, cfg.warmup // 2, cfg.context_lr),
                desc="context reading", progress=progress,
                callbacks=[Every(log_every, _logger(record["context_log"], t0, progress))])
    record["context_loss"] = round(float(state.running), 4)


def _logger(log: list, t0: float, progress: bool):
    """A fit callback that appends the running loss to ``log`` (and prints it when there is no progress bar)."""
    def append(state: FitState) -> None:
        log.append({"step": state.step, "loss": round(state.running, 4), "seconds": round(time.time() - t0, 1)})
        if not progress:
            print(json.dumps(log[-1]), flush=True)
    return append
