"""Training VEAD on the train split (``python -m visedit train-vead``).

The paper's speed trick: the frozen model's states at the output of l_e are computed once per training
input and cached, so every step runs only layers l_e+1 … L (and the LM head at the answer positions).
Per record four inputs are cached — the edit itself (reliability), the rephrased question (T-Gen), the
re-rendered image (M-Gen) and another creature's image and question (M-Loc, with the frozen model's
answer distribution for the KL term). The influence mapper's targets come from the batched
noise-perturbation engine (single tokens, σ = ``sigma``) on the attention outputs of the layers after l_e,
for each input's *own* image and question (the release computed the image-rephrase target on the wrong
image; we do not).

Loss = w_rel·CE(edit) + w_gen·[CE(T-Gen) + CE(M-Gen)] + w_loc·KL(pre ‖ post on M-Loc)
       + w_im·(L_a + L_up + L_down),
L_a = −Σ_j c_j log softmax(s)_j and L_up = −mean log σ(s_j) on edit/generality inputs (``im_up:
influence``: a binary cross-entropy towards 1 where c_j is above the mean, 0 elsewhere),
L_down = −mean log(1 − σ(s_j)) on locality inputs, over ``sampled_tokens`` random visual tokens.
With ``hard_loc`` = P > 0 each record gets a fifth input, a hard negative: of P random other records'
edit inputs (another entity), the one whose visual tokens the current gate opens on most (mean σ(s)). Its
KL (against the frozen model's log-probs on its own edit answer positions) joins the locality term and its
gate joins L_down. A look-alike creature is where the gate — each token's best match among the edit
image's tokens — opens by mistake; the record's own M-Loc creature is random and rarely one.
With ``w_iloc`` > 0 each record gets one more cached input, its in-image locality probe (the edit image,
another creature of it asked about), and w_iloc·KL(pre ‖ post) on it joins the loss. Its visual tokens are
the edit input's own, so it adds no IM loss: the gate it sees is the edit's. With ``im_layer`` the IM's
keys are cached from the same pass at that later layer's output (VEAD off), where the editor reads them.

Seeded (batches and token samples are a function of (seed, step)), resumable (a checkpoint beside the
output folder every ``val_every`` steps), validated on a held-out part of the train split.
"""

from __future__ import annotations

import dataclasses
import os
import random
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ...fit import Every, FitState, fit
from ...models.backbones import unembed
from ..base import holdout_split, pair_key
from .editor import VEADEditor, answer_rows
from .module import VEAD, VEADConfig

ROLES = ("edit", "t_gen", "m_gen", "m_loc")


@dataclasses.dataclass
class CachedRecord:
    """One training record, VEAD off: states at l_e (4, S, d) for ROLES, their masks (row 0's is the
    edit memory's: with ``eos`` it leaves out the end token, as an applied edit does), target
    positions/ids per role, the edit's last prompt position, IM targets (3, N) for the first three
    roles, and the frozen model's log-probs at M-Loc's answer positions; with ``hard_loc``, also at the
    edit row's target positions (for when it is another record's hard negative) and the record's entity
    (``group``: ``extra["entity"]``, else the image path); with ``memory_reads: answer``, the new answer's
    token embeddings (n, d) — the edit memory, the end token left out as an applied edit leaves it."""

    states: torch.Tensor
    mask: torch.Tensor
    span: tuple[int, int]
    positions: tuple[tuple[int, ...], ...]
    target_ids: tuple[tuple[int, ...], ...]
    last_prompt: int
    im_target: torch.Tensor
    loc_logprobs: torch.Tensor
    edit_logprobs: torch.Tensor | None = None
    group: str = ""
    answer: torch.Tensor | None = None
    iloc_logprobs: torch.Tensor | None = None
    im_key: torch.Tensor | None = None

    def keys(self, config: VEADConfig) -> torch.Tensor:
        """The IM's keys of this record's edit (1, d) or (1, N, d): read at l_e from its edit row, or the
        ones cached at ``im_layer``."""
        if self.im_key is not None:
            return self.im_key[None]
        return config.im_keys(self.states[:1], [self.last_prompt], self.span)


def _items(record, iloc: bool = False):
    items = [(record.image, record.src, record.alt), (record.image, record.rephrase, record.alt),
             (record.image_rephrase, record.src, record.alt), (record.m_loc, record.m_loc_q, record.m_loc_a)]
    if iloc:
        extra = getattr(record, "extra", None) or {}
        if "i_loc_q" not in extra or "i_loc_a" not in extra:
            raise ValueError("VEADConfig.w_iloc > 0 needs records with an in-image locality probe "
                             "(extra['i_loc_q'] and ['i_loc_a']: the world's second edition); set w_iloc: 0")
        items.append((record.image, extra["i_loc_q"], extra["i_loc_a"]))
    return items


class Cache:
    """Cached layer-l_e states of training records, and the layer kwargs to run the rest of the model."""

    def __init__(self, vllm, layer: int, config: VEADConfig):
        self.vllm, self.layer, self.config = vllm, layer, config
        L = vllm.n_layers
        self.at_input = config.at == "input"
        self.first = config.first_layer_after(layer)  # the first layer that runs after the cached states
        after = list(range(self.first, L)) or [layer]
        if config.it_layers is not None:
            after = after[: config.it_layers]
        self.im_layers = after
        self.im_layer = None if config.im_layer is None else vllm.adapter.check_layer(config.im_layer)
        self._kwargs = None
        self._longest: tuple[int, tuple] | None = None  # (length, item): the longest input cached so far

    def record(self, record) -> CachedRecord:
        vllm = self.vllm
        items = _items(record, self.config.w_iloc > 0)
        inputs = vllm.inputs(items, add_eos=self.config.eos)
        lengths = inputs.tensors["attention_mask"].sum(1).tolist()
        k = max(range(len(items)), key=lambda i: lengths[i])
        if self._longest is None or lengths[k] > self._longest[0]:
            self._longest = (int(lengths[k]), items[k])
        block = f"llm.layers.{self.layer}"
        late = None if self.im_layer is None else f"llm.layers.{self.im_layer}"
        trace = [block] + ([late] if late is not None and late != block else [])
        run = vllm.run(inputs, trace=trace, trace_inputs=self.at_input,
                       trace_outputs=not self.at_input or late is not None)
        logits = run.logits
        states = (run.inputs if self.at_input else run.outputs)[block].float()
        span = inputs.visual_spans[0]
        im_key = None
        if late is not None:  # the IM's keys at im_layer's output, VEAD off (as the editor reads them)
            im_key = self.config.im_keys(run.outputs[late][:1].float(), [inputs.last_prompt[0]], span)[0]
        if any(s != span for s in inputs.visual_spans):
            raise ValueError("VEAD training needs the same visual-token span in every input of a record")
        loc_pos = torch.tensor(inputs.target_positions[3]) - 1
        loc_logprobs = logits[3, loc_pos].log_softmax(-1)
        edit_logprobs = None
        if self.config.hard_loc:
            edit_logprobs = logits[0, torch.tensor(inputs.target_positions[0]) - 1].log_softmax(-1)
        iloc_logprobs = None
        if self.config.w_iloc > 0:
            iloc_logprobs = logits[4, torch.tensor(inputs.target_positions[4]) - 1].log_softmax(-1)
        from ...attribution import noise_perturbation

        targets = []
        for image, question, _ in _items(record)[:3] if self.config.use_im and self.config.w_im > 0 else []:
            influence = noise_perturbation(vllm, image, question, layers=self.im_layers, radius=0,
                                           sigma=self.config.sigma, n=self.config.noise_copies).array().mean(0)
            c = np.clip(influence, 0, None)
            targets.append(c / c.sum() if c.sum() > 0 else np.full_like(c, 1 / len(c)))
        # without the influence mapper's losses its targets are never read: skip the three perturbation runs
        im_target = torch.tensor(np.stack(targets)).float() if targets else torch.zeros(0)
        mask = inputs.tensors["attention_mask"].bool()
        if self.config.eos:  # the edit row is also the memory: image + prompt + answer, as an applied edit
            mask[0, inputs.target_positions[0][-1]] = False  # remembers it — without the end token
        answer = None
        if self.config.memory_reads == "answer":
            ids = inputs.target_ids[0][:-1] if self.config.eos else inputs.target_ids[0]
            answer = answer_rows(vllm, [ids], states.device)[0][0]
        return CachedRecord(states, mask, span, inputs.target_positions,
                            inputs.target_ids, inputs.last_prompt[0], im_target, loc_logprobs,
                            edit_logprobs, group=str(record.extra.get("entity", record.image)), answer=answer,
                            iloc_logprobs=iloc_logprobs, im_key=im_key)

    def kwargs(self, length: int) -> dict:
        """Keyword arguments of the layers after l_e for right-padded inputs of ``length`` tokens: those of
        a pass of the longest cached input (its image laid out like every training input's, so that
        positions that depend on the image — Qwen2-VL's — are the inputs' own, and a model that needs its
        pixels — BLIP-2 — gets them), cut to ``length``; before any record is cached, a text-only pass."""
        if self._kwargs is None or self._kwargs[0] < length:
            nxt = f"llm.layers.{min(self.first, self.vllm.n_layers - 1)}"
            if self._longest is not None and self._longest[0] >= length:
                tensors = self.vllm.inputs([self._longest[1]], add_eos=self.config.eos).tensors
                width = self._longest[0]
            else:
                width = max(length, 256)
                ids = torch.full((1, width), self.vllm.tokenizer.bos_token_id, device=self.vllm.device)
                tensors = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
            run = self.vllm.run(tensors, trace=[nxt], trace_inputs=True, trace_outputs=False, stop_after=nxt)
            self._kwargs = (width, run.kwargs[nxt])
        from ...models.backbones import slice_kwargs

        return slice_kwargs(self._kwargs[1], length)


def _pad(tensors: Sequence[torch.Tensor], width: int) -> torch.Tensor:
    return torch.stack([F.pad(t, (0, 0) * (t.dim() - 1) + (0, width - t.shape[0])) for t in tensors])


def hard_negatives(vead: VEAD, batch: Sequence[CachedRecord], pool: Sequence[CachedRecord],
                   config: VEADConfig, rng: np.random.Generator) -> list[CachedRecord]:
    """For each record of ``batch``: of ``config.hard_loc`` random records of ``pool`` that show another
    entity, the one whose edit image the gate (keyed by the record's own edit) opens on most."""
    start, stop = batch[0].span
    chosen = []
    with torch.no_grad():
        for r in batch:
            idx = rng.choice(len(pool), size=min(config.hard_loc, len(pool)), replace=False)
            cands = [pool[i] for i in idx if pool[i].group != r.group]
            if not cands:
                cands = [c for c in pool if c.group != r.group][:1]
            if not cands:
                raise ValueError("hard_loc needs training records of more than one entity "
                                 "(records are grouped by extra['entity'], else by image path)")
            keys = r.keys(config)
            V = torch.stack([c.states[0, start:stop] for c in cands])
            opens = torch.sigmoid(vead.gate_logits(V, keys)).mean(-1)
            chosen.append(cands[int(opens.argmax())])
    return chosen


def step_loss(vead: VEAD, cache: Cache, batch: Sequence[CachedRecord], config: VEADConfig,
              rng: np.random.Generator, pool: Sequence[CachedRecord] | None = None) -> tuple[torch.Tensor, dict]:
    """VEAD's training loss on a batch of cached records (differentiable w.r.t. ``vead``). With
    ``config.hard_loc`` each record's hard negative is mined from ``pool`` (default: the batch)."""
    vllm = cache.vllm
    negatives = hard_negatives(vead, batch, pool or batch, config, rng) if config.hard_loc else []
    iloc = config.w_iloc > 0
    n_own = len(ROLES) + iloc  # rows per record: its four roles, its in-image probe, then its hard negative
    n_rows = n_own + bool(negatives)
    rows, row_masks = [], []
    for i, r in enumerate(batch):
        rows += list(r.states) + ([negatives[i].states[0]] if negatives else [])
        row_masks += list(r.mask[:, :, None].float()) + ([negatives[i].mask[0, :, None].float()] if negatives else [])
    width = max(t.shape[0] for t in rows)
    states = _pad(rows, width)  # (rows, S, d)
    mask = _pad(row_masks, width)[..., 0].bool()
    edit_rows = torch.arange(len(batch)).repeat_interleave(n_rows) * n_rows
    if config.memory_reads == "answer":  # each record's new answer, as token embeddings, for all its rows
        answers = [r.answer for r in batch]
        lengths = torch.tensor([a.shape[0] for a in answers], device=states.device)
        per = edit_rows // n_rows
        memory = _pad(answers, int(lengths.max()))[per]
        memory_mask = (torch.arange(int(lengths.max()), device=states.device)[None] < lengths[:, None])[per]
    else:
        memory, memory_mask = states[edit_rows], mask[edit_rows]
    start, stop = batch[0].span
    # the IM's keys: each record's edit row's (every record of a batch has the same span), or cached at im_layer
    prompt = torch.cat([r.keys(config) for r in batch]).repeat_interleave(n_rows, 0)
    new_visual, s = vead(states[:, start:stop], memory, memory_mask, prompt)
    hidden = torch.cat([states[:, :start], new_visual, states[:, stop:]], 1)
    if cache.first < vllm.n_layers:
        hidden = vllm.adapter.run_from(cache.first, hidden, cache.kwargs(width))

    def kl(row: int, positions: Sequence[int], pre: torch.Tensor) -> torch.Tensor:  # KL(pre ‖ post)
        post = unembed(vllm.adapter, hidden[row, torch.tensor(positions) - 1]).float().log_softmax(-1)
        return (pre.exp() * (pre - post)).sum(-1).mean()

    losses = {"rel": [], "gen": [], "loc": [], "iloc": []}
    for i, r in enumerate(batch):
        for k, role in enumerate(ROLES):
            if role == "m_loc":
                losses["loc"].append(kl(i * n_rows + k, r.positions[k], r.loc_logprobs))
            else:
                pos = torch.tensor(r.positions[k]) - 1
                logits = unembed(vllm.adapter, hidden[i * n_rows + k, pos]).float()
                ce = F.cross_entropy(logits, torch.tensor(r.target_ids[k], device=logits.device))
                losses["rel" if role == "edit" else "gen"].append(ce)
        if iloc:
            losses["iloc"].append(kl(i * n_rows + len(ROLES), r.positions[len(ROLES)], r.iloc_logprobs))
        if negatives:
            neg = negatives[i]
            losses["loc"].append(kl(i * n_rows + n_own, neg.positions[0], neg.edit_logprobs))
    l_rel = torch.stack(losses["rel"]).mean()
    l_gen = torch.stack(losses["gen"]).mean() * 2  # CE(T-Gen) + CE(M-Gen), averaged over the batch
    l_loc = torch.stack(losses["loc"]).mean()
    total = config.w_rel * l_rel + config.w_gen * l_gen + config.w_loc * l_loc
    parts = {"rel": float(l_rel.detach()), "gen": float(l_gen.detach()), "loc": float(l_loc.detach())}
    if iloc:
        l_iloc = torch.stack(losses["iloc"]).mean()
        total = total + config.w_iloc * l_iloc
        parts["iloc"] = float(l_iloc.detach())
    if config.use_im and config.w_im > 0:
        n_vis = stop - start
        k = min(config.sampled_tokens, n_vis)
        l_a, l_up, l_down = [], [], []
        for i, r in enumerate(batch):
            for j in range(n_rows):
                if iloc and j == len(ROLES):  # the in-image probe: the edit's own visual tokens and gate
                    continue
                idx = torch.from_numpy(rng.choice(n_vis, size=k, replace=False))
                row = s[i * n_rows + j, idx.to(s.device)]
                if j < 3:
                    c = r.im_target[j, idx].to(row.device)
                    c = c / c.sum() if c.sum() > 0 else torch.full_like(c, 1 / k)
                    l_a.append(-(c * row.log_softmax(-1)).sum())
                    if config.im_up == "all":
                        l_up.append(-F.logsigmoid(row).mean())
                    else:  # open where the influence is above the mean (targets sum to 1 over the tokens)
                        above = (r.im_target[j, idx] * n_vis > 1).float().to(row.device)
                        l_up.append(F.binary_cross_entropy_with_logits(row, above))
                else:  # M-Loc and the hard negative
                    l_down.append(-F.logsigmoid(-row).mean())
        l_im = torch.stack(l_a).mean() + torch.stack(l_up).mean() + torch.stack(l_down).mean()
        total = total + config.w_im * l_im
        parts["im"] = float(l_im.detach())
    return total, parts


def _checkpoint_path(out: Path) -> Path:
    return out.with_name(f".{out.name}.checkpoint.pt")


def train_vead(vllm, records: Sequence, config: VEADConfig, *, out: str | os.PathLike | None = None,
               progress: bool = True, resume: bool = True) -> tuple[VEADEditor, dict]:
    """Train VEAD on train-split ``records``; returns the editor (best validation checkpoint) and a
    training record. With ``out``: saves there atomically, and checkpoints beside it so that an
    interrupted run resumes (same settings, records and model weights) where it stopped."""
    from tqdm.auto import tqdm

    from ..scoring import quick_scores
    from ...io import atomic_path

    if config.layer is None:
        raise ValueError("VEADConfig.layer is not set (train_vead needs l_e; see choose_edit_layer)")
    torch.manual_seed(config.seed)
    # validation holds out whole (entity, fact) pairs: the eval split's edits are of pairs never trained on
    train, val = holdout_split(records, config.val_share, config.val_edits, random.Random(config.seed),
                               group=pair_key)
    editor = VEADEditor(vllm, config)
    vead = editor.adapter
    cache = Cache(vllm, editor.layer, config)
    start_time = time.perf_counter()
    cached = [cache.record(r) for r in tqdm(train, desc=f"cache layer-{editor.layer} states", disable=not progress)]
    cache_seconds = time.perf_counter() - start_time
    optimizer = torch.optim.Adam(vead.parameters(), lr=config.lr)
    first, history, best, best_state, optimizer_state = 0, [], -1.0, None, None
    ckpt = _checkpoint_path(Path(out)) if out is not None else None
    settings, weights = dataclasses.asdict(config), vllm.fingerprint
    if ckpt is not None and resume and ckpt.exists():
        saved = torch.load(ckpt, weights_only=False)
        # a checkpoint of another run (other settings, records or model weights) is not resumed
        # (a setting added since the checkpoint was written counts as its default)
        same = {**dataclasses.asdict(VEADConfig()), **saved["config"]} == settings
        if same and saved["n_train"] == len(train) and saved.get("model") == weights:
            vead.load_state_dict(saved["vead"])
            optimizer_state = saved["optimizer"]
            first, history, best, best_state = saved["step"], saved["history"], saved["best"], saved["best_state"]

    def loss_at(step: int) -> tuple[torch.Tensor, dict]:
        vead.train()
        rng = np.random.default_rng([config.seed, step])
        batch = [cached[i] for i in rng.choice(len(cached), size=min(config.batch, len(cached)), replace=False)]
        return step_loss(vead, cache, batch, config, rng, pool=cached)

    def validate(state: FitState) -> None:
        nonlocal best, best_state
        vead.eval()
        scores = quick_scores(editor, val)
        history.append({"step": state.step, **state.parts, **{f"val_{k}": round(v, 4) for k, v in scores.items()}})
        if scores["mean"] > best:
            best = scores["mean"]
            best_state = {k: v.detach().clone() for k, v in vead.state_dict().items()}
        if ckpt is not None:
            with atomic_path(ckpt) as tmp:
                torch.save({"config": settings, "n_train": len(train), "model": weights, "vead": vead.state_dict(),
                            "optimizer": optimizer.state_dict(), "step": state.step, "history": history,
                            "best": best, "best_state": best_state}, tmp)

    fit(loss_at, optimizer, config.steps, lr=config.lr_at, start=first, optimizer_state=optimizer_state,
        callbacks=[Every(config.val_every, validate, at_end=True)], desc="train VEAD", progress=progress)
    vead.load_state_dict(best_state)
    vead.eval()
    info = {"wall_seconds": round(time.perf_counter() - start_time, 1), "cache_seconds": round(cache_seconds, 1),
            "best_val_mean": round(best, 4), "n_train": len(train), "n_val": len(val), "history": history,
            "threads": torch.get_num_threads()}
    if out is not None:
        editor.save(out, extra={"training": info})
        ckpt.unlink(missing_ok=True)
    return editor, info
