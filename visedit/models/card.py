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
from ..world.scene import SCENE_HELDOUT_TEMPLATES, SCENE_TEMPLATES, askable, render_scene
from .vllm import VLLM

#: Seed stream of model-card renderings (10–14; training uses 20 and 30, datasets 0–9).
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
    #: Scene models only: accuracy on multi-creature scenes whose question selects one creature (the
    #: selected creature's answer), overall and per selector kind.
    selector_accuracy: float | None = None
    per_selector: dict[str, float] | None = None

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if self.selector_accuracy is None:
            del d["selector_accuracy"], d["per_selector"]
        return d

    def passes(self) -> dict[str, bool]:
        """The shipped model's quality bar, item by item."""
        checks = {"visual_accuracy ≥ 0.95": self.visual_accuracy >= 0.95,
                  "every fact ≥ 0.90": all(v["visual"] >= 0.90 for v in self.per_fact.values()),
                  "paraphrase_accuracy ≥ 0.90": self.paraphrase_accuracy >= 0.90,
                  "text_accuracy ≥ 0.98": self.text_accuracy >= 0.98,
                  "swap_accuracy ≤ 0.10": self.swap_accuracy <= 0.10}
        if self.selector_accuracy is not None:
            checks["selector_accuracy ≥ 0.90"] = self.selector_accuracy >= 0.90
        return checks

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


def _accuracy(vllm: VLLM, items: list[tuple], batch_size: int, progress: bool, desc: str,
              share_prefix: bool = True) -> list[bool]:
    from tqdm.auto import tqdm

    out: list[bool] = []
    for start in tqdm(range(0, len(items), batch_size), desc=desc, disable=not progress):
        out += [s.exact for s in vllm.score_batch(items[start:start + batch_size], add_eos=True,
                                                  share_prefix=share_prefix)]
    return out


def model_card(vllm: VLLM, world: World | None = None, *, seed: int = 0, renders: int = 1,
               entities: Iterable[int] | None = None, batch_size: int = 64, progress: bool = True,
               share_prefix: bool = True) -> ModelCard:
    """Measure ``vllm`` on fresh renderings of ``world`` (default: the embedded model's world).

    For every entity (or the given entity indices) and fact: each training template and each held-out
    template, on ``renders`` new renderings; every text-only question; and the image-swap test (the
    question asked about another entity's image whose answer differs — the original answer should
    *not* come out). A scene model (``vllm.info["edition"] == 2``) sees each creature alone in a scene
    and is asked with the scene templates ("… this creature …"); it is also asked, in a scene of 2–4
    creatures per entity and rendering, every fact of that creature through a selector that picks it out
    (``selector_accuracy``).

    ``share_prefix``: the questions about one image share its forward pass up to the end of the visual
    tokens (:meth:`VLLM.score_batch`); the card is the same either way (``python -m visedit bench card``).
    """
    world = world or make_world(vllm.info.get("world_seed", 0), vllm.info.get("n_entities", 70))
    idx = list(range(len(world))) if entities is None else list(entities)
    rng = random.Random(seed)
    scenes = vllm.info.get("edition", 1) == 2
    size = vllm.info.get("image_size", 80)
    train_t, heldout_t = (_scene_tables() if scenes else (TRAIN_TEMPLATES, HELDOUT_TEMPLATES))

    def draw(entity, key):
        if scenes:
            return render_scene([entity], seed=np.random.default_rng(key), size=size).image
        return render(entity, seed=np.random.default_rng(key)).image

    visual, para, swap, text, selected = [], [], [], [], []
    for i in idx:
        entity = world.entities[i]
        for r in range(renders):
            image = draw(entity, [seed, CARD_STREAM, i, r])
            for fact in FACTS:
                for q in train_t[fact]:
                    visual.append((fact, (image, q, entity.fact(fact))))
                    other = rng.choice([e for e in world.entities if e.fact(fact) != entity.fact(fact)])
                    j = world.entities.index(other)
                    other_img = draw(other, [seed, CARD_STREAM + 1, i, j, r])
                    swap.append((fact, (other_img, q, entity.fact(fact))))
                for q in heldout_t[fact]:
                    para.append((fact, (image, q, entity.fact(fact))))
            if scenes:
                selected += _selector_items(world, entity, rng, np.random.default_rng([seed, CARD_STREAM + 4, i, r]),
                                            size)
        for fact, templates in TEXT_TEMPLATES.items():
            for t in range(len(templates)):
                text.append((fact, (None, text_question(entity, fact, t), entity.fact(fact))))
    results = {name: _accuracy(vllm, [it for _, it in group], batch_size, progress, name, share_prefix)
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
    n = {k: len(v) for k, v in results.items()}
    sel_acc = per_sel = None
    if scenes:
        ok = _accuracy(vllm, [it for _, it in selected], batch_size, progress, "selector", share_prefix)
        sel_acc = mean(ok)
        per_sel = {kind: mean([o for o, (k, _) in zip(ok, selected) if k == kind])
                   for kind in sorted({k for k, _ in selected})}
        n["selector"] = len(ok)
    return ModelCard(visual_accuracy=mean(results["visual"]), paraphrase_accuracy=mean(results["paraphrase"]),
                     text_accuracy=mean(results["text"]), swap_accuracy=mean(results["swap"]), per_fact=per_fact,
                     n=n, seed=seed, selector_accuracy=sel_acc, per_selector=per_sel)


def _scene_tables():
    """The scene templates with no selector ("this creature"), for a creature alone in its picture."""
    return ({f: tuple(t.format(x="this creature") for t in ts) for f, ts in SCENE_TEMPLATES.items()},
            {f: tuple(t.format(x="this creature") for t in ts) for f, ts in SCENE_HELDOUT_TEMPLATES.items()})


def _selector_items(world: World, entity, rng: random.Random, np_rng: np.random.Generator, size: int) -> list:
    """(selector kind, item) for every fact of ``entity`` asked in a scene with 1–3 other creatures."""
    others = rng.sample([e for e in world.entities if e is not entity], rng.randint(1, 3))
    ents = [entity] + others
    rng.shuffle(ents)
    scene = render_scene(ents, seed=np_rng, size=size)
    k = ents.index(entity)
    items = []
    for fact in FACTS:
        options = askable(scene, k, fact)
        if not options:
            continue
        kind = rng.choice(sorted(options))
        q = rng.choice(SCENE_TEMPLATES[fact]).format(x=options[kind])
        items.append((kind, (scene.image, q, entity.fact(fact))))
    return items


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
