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

    def __post_init__(self) -> None:
        if not isinstance(self.n_demos, int) or self.n_demos < 0:
            raise ValueError(f"n_demos must be an int ≥ 0, got {self.n_demos!r}")


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

            demos = load_world_split("train")
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

    def _apply(self, request: EditRequest) -> None:
        self.vllm.encode_target(request.target)  # refuse what the model cannot say, as the other editors do
        # the edit lives in context(); nothing to change

    def context(self) -> str:
        """The demonstrations, then the new fact of every applied edit, oldest first (stacked edits all
        stay in context, so many of them outgrow the model's positions: IKE's limit in sequential editing)."""
        facts = " ".join(self.vllm.frame.turn(r.prompt, r.target) for r in self.requests)
        return f"{self.demonstrations} {facts}".strip()
