"""The model card: how well a VLLM knows the world, measured on fresh renderings.

An answer counts as correct when greedy decoding produces exactly the answer and then stops; we
compute it in one teacher-forced pass (every answer token *and* the end token are the argmax), which
is the same thing and batches well.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Iterable

import numpy as np

from ..world import FACTS, HELDOUT_TEMPLATES, TEXT_TEMPLATES, TRAIN_TEMPLATES, World, make_world, render, text_question
from .vllm import VLLM

#: Seed stream of model-card renderings (training uses 20, datasets 0–9).
CARD_STREAM = 10


@dataclasses.dataclass(frozen=True)
class ModelCard:
    """Accuracies of a model on the world. Serialises with :meth:`to_dict`; plots with :meth:`plot`."""

    visual_accuracy: float
    paraphrase_accuracy: float
    text_accuracy: float
    swap_accuracy: float
    per_fact: dict[str, dict[str, float]]
    n: dict[str, int]
    seed: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def passes(self) -> dict[str, bool]:
        """The shipped model's quality bar, item by item."""
        return {"visual_accuracy ≥ 0.95": self.visual_accuracy >= 0.95,
                "every fact ≥ 0.90": all(v["visual"] >= 0.90 for v in self.per_fact.values()),
                "paraphrase_accuracy ≥ 0.90": self.paraphrase_accuracy >= 0.90,
                "text_accuracy ≥ 0.98": self.text_accuracy >= 0.98,
                "swap_accuracy ≤ 0.10": self.swap_accuracy <= 0.10}

    def table(self):
        """Per-fact accuracies as a pandas DataFrame (rows: facts; columns: question kinds)."""
        import pandas as pd

        return pd.DataFrame(self.per_fact).T.round(3)

    def plot(self):
        """Plotly bar chart of per-fact accuracy by question kind."""
        import plotly.graph_objects as go

        facts = list(self.per_fact)
        fig = go.Figure()
        for kind in ("visual", "paraphrase", "swap"):
            fig.add_bar(name=kind, x=facts, y=[self.per_fact[f][kind] for f in facts])
        fig.update_layout(barmode="group", yaxis_title="accuracy", yaxis_range=[0, 1.02], height=360,
                          title="Tiny model: accuracy per fact (swap = answer kept after swapping the image)")
        return fig


def _accuracy(vllm: VLLM, items: list[tuple], batch_size: int, progress: bool, desc: str) -> list[bool]:
    from tqdm.auto import tqdm

    out: list[bool] = []
    for start in tqdm(range(0, len(items), batch_size), desc=desc, disable=not progress):
        out += [s.exact for s in vllm.score_batch(items[start:start + batch_size], add_eos=True)]
    return out


def model_card(vllm: VLLM, world: World | None = None, *, seed: int = 0, renders: int = 1,
               entities: Iterable[int] | None = None, batch_size: int = 64, progress: bool = True) -> ModelCard:
    """Measure ``vllm`` on fresh renderings of ``world`` (default: the embedded model's world).

    For every entity (or the given entity indices) and fact: each training template and each held-out
    template, on ``renders`` new renderings; every text-only question; and the image-swap test (the
    question asked about another entity's image whose answer differs — the original answer should
    *not* come out).
    """
    world = world or make_world(0)
    idx = list(range(len(world))) if entities is None else list(entities)
    rng = random.Random(seed)
    visual, para, swap, text = [], [], [], []
    for i in idx:
        entity = world.entities[i]
        for r in range(renders):
            image = render(entity, seed=np.random.default_rng([seed, CARD_STREAM, i, r])).image
            for fact in FACTS:
                for q in TRAIN_TEMPLATES[fact]:
                    visual.append((fact, (image, q, entity.fact(fact))))
                    other = rng.choice([e for e in world.entities if e.fact(fact) != entity.fact(fact)])
                    j = world.entities.index(other)
                    other_img = render(other, seed=np.random.default_rng([seed, CARD_STREAM + 1, i, j, r])).image
                    swap.append((fact, (other_img, q, entity.fact(fact))))
                for q in HELDOUT_TEMPLATES[fact]:
                    para.append((fact, (image, q, entity.fact(fact))))
        for fact, templates in TEXT_TEMPLATES.items():
            for t in range(len(templates)):
                text.append((fact, (None, text_question(entity, fact, t), entity.fact(fact))))
    results = {name: _accuracy(vllm, [it for _, it in group], batch_size, progress, name)
               for name, group in (("visual", visual), ("paraphrase", para), ("swap", swap), ("text", text))}
    facts = {name: [f for f, _ in group] for name, group in
             (("visual", visual), ("paraphrase", para), ("swap", swap), ("text", text))}

    def mean(xs):
        return round(float(np.mean(xs)), 4) if len(xs) else float("nan")

    per_fact = {}
    for fact in FACTS:
        per_fact[fact] = {kind: mean([ok for ok, f in zip(results[kind], facts[kind]) if f == fact])
                          for kind in ("visual", "paraphrase", "swap")}
        if fact in TEXT_TEMPLATES:
            per_fact[fact]["text"] = mean([ok for ok, f in zip(results["text"], facts["text"]) if f == fact])
    return ModelCard(visual_accuracy=mean(results["visual"]), paraphrase_accuracy=mean(results["paraphrase"]),
                     text_accuracy=mean(results["text"]), swap_accuracy=mean(results["swap"]), per_fact=per_fact,
                     n={k: len(v) for k, v in results.items()}, seed=seed)


def swap_examples(vllm: VLLM, world: World | None = None, *, n: int = 6, fact: str = "habitat",
                  seed: int = 0):
    """The image-swap experiment on ``n`` examples, as a DataFrame.

    For entity A: the answer about A's image, then the same question about entity B's image (B chosen
    with a different answer). A model that reads the image follows B; one that guesses does not.
    """
    import pandas as pd

    world = world or make_world(0)
    rng = random.Random(seed)
    rows = []
    for i in rng.sample(range(len(world)), n):
        a = world.entities[i]
        b = rng.choice([e for e in world.entities if e.fact(fact) != a.fact(fact)])
        q = TRAIN_TEMPLATES[fact][0]
        img_a = render(a, seed=np.random.default_rng([seed, CARD_STREAM + 2, i])).image
        img_b = render(b, seed=np.random.default_rng([seed, CARD_STREAM + 3, i])).image
        ans_a, ans_b = vllm.answer_batch([(img_a, q), (img_b, q)])
        rows.append({"entity A": a.name, f"A's {fact}": a.fact(fact), "answer on A's image": ans_a,
                     "swapped in": b.name, f"B's {fact}": b.fact(fact), "answer on B's image": ans_b})
    return pd.DataFrame(rows)
