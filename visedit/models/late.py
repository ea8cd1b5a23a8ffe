"""Late-decision tuning: fine-tune a trained scene model so that its answer keeps following its image tokens up
to depth K (``python -m visedit train-late``).

A model made LLaVA's way copies what it needs from its image tokens into the question's tokens within its
first layers; after that, swapping in another image's token states changes almost nothing (chapter 8's image
swap). This tuning asks for the opposite with an interchange-intervention loss (Geiger et al., 2022). Each
step draws two batches of scenes, a and b, and asks a's questions about both. b runs alone; then a's prompt
runs with b's image-token states put in at depth k (the output of layer k − 1, k drawn from 1…K), and the
distribution over the answer's first token must match b's own run (KL). The plain answer loss on a keeps
the model answering. The vision tower stays frozen; the projector and the decoder train.

Every step draws its scenes from seeds of its own index, so a run is reproduced exactly by the same
settings on the same number of threads.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..config import StrictConfig
from ..fit import Every, fit
from ..hooks import edit_output
from ..io import atomic_path
from ..world import make_world
from .recipe import draw_scenes, scene_turns

#: Seed stream of the tuning's draws (apart from the recipes' streams).
LATE_STREAM = 40
#: Parameters under these module names belong to a vision tower and stay frozen.
TOWER_NAMES = ("vision_tower", "vision_model")


@dataclasses.dataclass(frozen=True)
class LateConfig(StrictConfig):
    """Settings of :func:`train_late`. ``depth``: the deepest swap (K; swaps at depths 1…K)."""

    depth: int = 7
    steps: int = 1200
    batch: int = 12
    lr: float = 2e-4
    seed: int = 0
    log_every: int = 25
    threads: int = 1

    def __post_init__(self) -> None:
        for key in ("depth", "steps", "log_every", "threads"):
            if getattr(self, key) < 1:
                raise ValueError(f"LateConfig.{key} must be at least 1, got {getattr(self, key)}")
        if self.batch < 2:
            raise ValueError(f"LateConfig.batch must be at least 2 (the loss compares scenes), got {self.batch}")
        if not self.lr > 0:
            raise ValueError(f"LateConfig.lr must be positive, got {self.lr}")


def _trainable(vllm) -> list[torch.nn.Parameter]:
    """Everything but the vision tower, switched to train (the tower's parameters stay frozen)."""
    params, frozen = [], 0
    for name, p in vllm.model.named_parameters():
        tower = any(part in name.split(".") for part in TOWER_NAMES)
        p.requires_grad_(not tower)
        frozen += tower
        if not tower:
            params.append(p)
    if not frozen:
        raise ValueError(f"train-late keeps the vision tower frozen, but {vllm.name} has no module named "
                         f"{' or '.join(TOWER_NAMES)}; tune a LLaVA- or BLIP-2-style model")
    return params


def interchange_kl(vllm, inputs, donor, depth: int, span: tuple[int, int]) -> torch.Tensor:
    """KL(donor's answer ‖ ``inputs``' answer with the donor's image-token states put in at ``depth``): the
    distributions over the first answer token, the donor's own run as the (gradient-free) target, averaged
    over the batch. ``inputs`` and ``donor``: prompts of one size with the images at ``span``; ``depth`` k:
    the swap replaces the output of layer k − 1."""
    rows, last = torch.arange(len(inputs.last_prompt)), torch.tensor(inputs.last_prompt)
    site = f"llm.layers.{depth - 1}"
    with torch.no_grad():
        run = vllm.run(donor, trace=[site])
        target = F.softmax(run.logits[rows, last].float(), -1)
        theirs = run.outputs[site][:, span[0]:span[1]]

    def put(h: torch.Tensor) -> torch.Tensor:
        h = h.clone()
        h[:, span[0]:span[1]] = theirs
        return h

    with edit_output(vllm.site(site), put):
        swapped = vllm.model(**inputs.tensors, use_cache=False).logits.float()[rows, last]
    return F.kl_div(F.log_softmax(swapped, -1), target, reduction="batchmean")


def train_late(out: str | os.PathLike, model="visedit-llava", cfg: LateConfig = LateConfig(), *,
               progress: bool = True) -> dict:
    """Tune a copy of ``model`` (a :class:`~visedit.models.VLLM`, left unchanged, or what
    :func:`~visedit.models.load_vllm` takes; a model trained on scenes) with :class:`LateConfig` and write it
    to ``out`` (atomically, float16 like the recipes' models, with ``training.json``). Returns the training
    record."""
    from .vllm import VLLM, load_vllm

    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} already exists; pass a new --out folder (or delete that one)")
    torch.set_num_threads(cfg.threads)
    vllm = copy.deepcopy(model) if isinstance(model, VLLM) else load_vllm(model)  # a model passed in stays as it is
    if vllm.info.get("edition", 1) != 2:
        raise ValueError(f"train-late tunes a model trained on scenes (visedit.json edition 2, e.g. visedit-llava); "
                         f"{vllm.name} is not one")
    if not cfg.depth < vllm.n_layers:
        raise ValueError(f"LateConfig.depth must be below the model's {vllm.n_layers} layers (swaps go in at "
                         f"depths 1…depth), got {cfg.depth}")
    source, fingerprint = vllm.name, vllm.fingerprint
    world = make_world(vllm.info.get("world_seed", 0), n_entities=vllm.info.get("n_entities", 70))
    size = vllm.info.get("image_size", 80)
    params = _trainable(vllm)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    model_ = vllm.model

    def loss_at(step: int):
        rng, py = np.random.default_rng([cfg.seed, LATE_STREAM, step]), random.Random(f"late-{cfg.seed}-{step}")
        a_sc, b_sc = (draw_scenes(world, rng, cfg.batch, size=size) for _ in range(2))
        qa = [scene_turns(s, py, 1)[0] for s in a_sc]
        a_in = vllm.inputs([(s.image, q, a) for s, (q, a) in zip(a_sc, qa)], add_eos=True)
        prompt = vllm.inputs([(s.image, q) for s, (q, _) in zip(a_sc, qa)])
        b_in = vllm.inputs([(s.image, q) for s, (q, _) in zip(b_sc, qa)])
        span = a_in.visual_spans[0]
        if any(sp != span for sp in a_in.visual_spans + b_in.visual_spans) or a_in.last_prompt != b_in.last_prompt:
            raise ValueError(f"train-late needs every image to take the same positions; {source} places images of "
                             "one size at different positions")
        logits = model_(**a_in.tensors, use_cache=False).logits.float()
        ce = [F.cross_entropy(logits[b, torch.tensor(a_in.target_positions[b]) - 1],
                              torch.tensor(a_in.target_ids[b], device=logits.device), reduction="sum")
              for b in range(cfg.batch)]
        lm = torch.stack(ce).sum() / sum(len(t) for t in a_in.target_ids)
        k = int(rng.integers(1, cfg.depth + 1))
        kl = interchange_kl(vllm, prompt, b_in, k, span)
        return lm + kl, {"loss": lm.item(), "kl": kl.item()}

    record = {"config": dataclasses.asdict(cfg), "source": source, "source_fingerprint": fingerprint, "log": []}

    def log(state) -> None:
        record["log"].append({"step": state.step, "loss": round(state.running, 4), "kl": round(state.parts["kl"], 4)})

    t0 = time.time()
    state = fit(loss_at, opt, cfg.steps, clip_params=params, max_norm=1.0, desc="late-decision tuning",
                callbacks=[Every(cfg.log_every, log, at_end=True)], progress=progress)
    record.update(loss=round(state.running, 4), wall_seconds=round(time.time() - t0, 1), threads=cfg.threads,
                  device=str(vllm.device))
    for p in model_.parameters():
        p.requires_grad_(False)
    model_.eval()
    info = {**vllm.info, "tuned": {"from": source, "fingerprint": fingerprint, "late_depth": cfg.depth}}
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        model_.to("cpu", torch.float16).save_pretrained(tmp)
        vllm.processor.save_pretrained(tmp)
        (tmp / "training.json").write_text(json.dumps(record, indent=1) + "\n")
        (tmp / "visedit.json").write_text(json.dumps(info, indent=1) + "\n")
    return record
