"""IKE — in-context knowledge editing (Zheng et al., 2023), adapted as MMEdit adapts it.

No weight changes: while an edit is applied, every prompt is preceded by demonstrations drawn from
the *train* split and by the new fact itself, all written in the model's own conversation frame::

    user : <demo question> assistant : <new answer> user : <probe> assistant : <answer>   (× k)
    user : <edit question> assistant : <edit target>                                  (the new fact, × edits)
    USER: <image> <question> ASSISTANT:                                               (the query)

Each demonstration pairs a training edit (its question and counterfactual answer) with one probe:
the same question (*copy*), its paraphrase with the new answer (*update*), or an unrelated text
question with its true answer (*retain*), in turn. The frame is the backbone's own
(:attr:`VLLM.frame`, owned by its adapter), the same one every prompt is put in. Demonstrations are text-only: one image per prompt.

Many stacked edits outgrow the model's positions. With ``overflow="window"`` (default) each call keeps
the demonstrations and the *newest* facts that fit beside its longest item (and, when answering, the
tokens it may generate); older facts fall out of context, so IKE forgets its first edits in sequential
editing — its known limit, shown rather than hidden (``dropped`` counts them on the last call).
``overflow="error"`` refuses instead, in one line.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Sequence

from ..config import StrictConfig
from .base import EditRequest, Editor, register_editor


@dataclasses.dataclass(frozen=True)
class IKEConfig(StrictConfig):
    """``n_demos`` demonstrations, drawn once with ``seed`` from the train split."""

    n_demos: int = 4
    seed: int = 0
    overflow: str = "window"

    def __post_init__(self) -> None:
        if not isinstance(self.n_demos, int) or self.n_demos < 0:
            raise ValueError(f"n_demos must be an int ≥ 0, got {self.n_demos!r}")
        if self.overflow not in ("window", "error"):
            raise ValueError(f"IKEConfig.overflow must be 'window' or 'error', got {self.overflow!r}")


@register_editor
class InContextEditor(Editor):
    """IKE: edit by prompting. ``demos``: MMEdit records to draw demonstrations from (default: the
    world's train split)."""

    name = "ike"
    config_class = IKEConfig

    def __init__(self, vllm, config=None, *, demos: Sequence | None = None):
        super().__init__(vllm, config)
        if demos is None and self.config.n_demos:
            from ..world import load_world_split

            demos = load_world_split("train", vllm.dataset_spec)
        pool = list(demos or [])
        if len(pool) < self.config.n_demos:
            raise ValueError(f"IKE needs {self.config.n_demos} demonstration records, got {len(pool)}")
        rng = random.Random(self.config.seed)
        chosen = rng.sample(pool, self.config.n_demos)
        lines = []
        for k, rec in enumerate(chosen):
            probe = [(rec.src, rec.alt), (rec.rephrase, rec.alt), (rec.loc, rec.loc_ans)][k % 3]
            lines.append(vllm.frame.turn(rec.src, rec.alt) + " " + vllm.frame.turn(*probe))
        self.demonstrations = " ".join(lines)
        #: applied facts left out of the context on the last call (they no longer fit the model's positions)
        self.dropped = 0

    def _apply(self, request: EditRequest) -> None:
        self.vllm.encode_target(request.target)  # refuse what the model cannot say, as the other editors do
        # the edit lives in context(); nothing to change

    def context(self, facts: int | None = None) -> str:
        """The demonstrations, then the new fact of every applied edit, oldest first (``facts``: only the
        newest ``facts`` of them)."""
        kept = self.requests if facts is None else self.requests[len(self.requests) - facts:] if facts else []
        return f"{self.demonstrations} {' '.join(self.vllm.frame.turn(r.prompt, r.target) for r in kept)}".strip()

    def _fitting_context(self, items, *, add_eos: bool = False, new_tokens: int = 0) -> str:
        """The context for ``items``: every applied fact when they fit the model's positions, else (window)
        the newest that do, else (error) a one-line refusal."""
        limit = self.vllm.max_positions
        self.dropped = 0
        if limit is None:
            return self.context()
        plain = [(it[0], it[1]) + tuple(it[2:3]) for it in items]

        def fits(k: int) -> bool:  # the processor has the last word on lengths
            try:
                inputs = self.vllm.inputs(plain, add_eos=add_eos, context=self.context(k))
            except ValueError:
                return False
            return int(inputs.tensors["attention_mask"].sum(1).max()) + new_tokens <= limit

        if fits(len(self.requests)):  # the common case: one extra pass, no estimate
            return self.context()
        # estimate from the tokenizer's counts, then settle on the processor's
        longest = int(self.vllm.inputs(plain, add_eos=add_eos).tensors["attention_mask"].sum(1).max())
        budget = limit - longest - new_tokens

        def size(text: str) -> int:
            return len(self.vllm.tokenizer(text, add_special_tokens=False)["input_ids"])

        used, n = size(self.demonstrations), 0
        for r in reversed(self.requests):
            used += size(self.vllm.frame.turn(r.prompt, r.target))
            if used > budget:
                break
            n += 1
        n = min(n, len(self.requests) - 1)
        if fits(n):
            while n < len(self.requests) and fits(n + 1):
                n += 1
        else:
            while n > 0 and not fits(n):
                n -= 1
        if n < len(self.requests) and self.config.overflow == "error":
            raise ValueError(f"ike: {len(self.requests)} applied edits need more than the model's {limit} positions "
                             f"(only the newest {n} fit); restore some edits or use IKEConfig(overflow='window')")
        self.dropped = len(self.requests) - n
        return self.context(n)

    def score_batch(self, items, **kw):
        if not self.applied:
            return super().score_batch(items, **kw)
        ctx = self._fitting_context(items, add_eos=kw.get("add_eos", False))
        return self.vllm.score_batch(items, context=ctx, **kw)

    def answer_batch(self, items, **kw):
        if not self.applied:
            return super().answer_batch(items, **kw)
        ctx = self._fitting_context(items, new_tokens=kw.get("max_new_tokens", 8))
        return self.vllm.answer_batch(items, context=ctx, **kw)
