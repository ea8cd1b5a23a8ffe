"""The world's second edition: scenes of 1–4 creatures, questions that select one of them, captions.

A scene is drawn on the same cluttered background as a single creature (:func:`render`), on a larger
canvas (default 80×80, a 10×10 grid of 8-pixel patches), with creatures that overlap by at most a small
share of their area. Every creature's own pixel mask and box is returned.

A question about a scene *selects* its creature — by position ("the creature on the left"), by a visual
attribute ("the red creature", "the striped creature") or, with one creature, with no selector ("this
creature") — and then asks a fact of it, so the answer needs the selected creature recognised, then its
fact recalled. Captions describe appearance and position only, never names or non-visual facts; they
are what a contrastive vision encoder learns from.
"""

from __future__ import annotations

import dataclasses
import math
import random

import numpy as np
from PIL import Image

from .entities import FACTS, Entity
from .render import _background, _paint

#: Scene questions: ``{x}`` is the selector phrase ("this creature", "the red creature", …).
SCENE_TEMPLATES: dict[str, tuple[str, ...]] = {
    "colour": ("what colour is {x} ?", "which colour does {x} have ?", "tell me the colour of {x} ."),
    "shape": ("what shape is {x} ?", "which shape does {x} have ?", "tell me the shape of {x} ."),
    "pattern": ("what pattern is on {x} ?", "which pattern does {x} have ?", "tell me the pattern of {x} ."),
    "name": ("what is the name of {x} ?", "what is {x} called ?", "tell me the name of {x} ."),
    "habitat": ("where does {x} live ?", "in which habitat does {x} live ?", "tell me the habitat of {x} ."),
    "diet": ("what does {x} eat ?", "which food does {x} eat ?", "tell me the diet of {x} ."),
}
#: Held-out paraphrases of :data:`SCENE_TEMPLATES`, never trained on.
SCENE_HELDOUT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "colour": ("{x} is which colour ?", "what is the colour of {x} ?"),
    "shape": ("{x} is which shape ?", "what is the shape of {x} ?"),
    "pattern": ("{x} is which pattern ?", "what is the pattern of {x} ?"),
    "name": ("{x} is called what ?", "tell me what the name of {x} is ."),
    "habitat": ("{x} does live where ?", "what is the habitat of {x} ?"),
    "diet": ("{x} does eat what ?", "what is the diet of {x} ?"),
}
#: Selector kinds, in the order :func:`selectors` lists them.
SELECTOR_KINDS = ("none", "left", "right", "top", "bottom", "colour", "pattern")
_POSITION_PHRASES = {"left": "the creature on the left", "right": "the creature on the right",
                     "top": "the creature at the top", "bottom": "the creature at the bottom"}
#: The fact a selector already gives away (never asked with that selector).
_GIVES_AWAY = {"colour": "colour", "pattern": "pattern"}


@dataclasses.dataclass(frozen=True)
class SceneRendering:
    """One drawing of a scene.

    ``image``: RGB PIL image (H×W); ``entities``: the creatures, in drawing order; ``masks[k]``: bool
    array (H, W), True on creature k's visible pixels; ``boxes[k]``: its (x0, y0, x1, y1) box, x1/y1
    exclusive; ``centres[k]``: its (x, y) centre in pixels.
    """

    image: Image.Image
    entities: tuple[Entity, ...]
    masks: tuple[np.ndarray, ...]
    boxes: tuple[tuple[int, int, int, int], ...]
    centres: tuple[tuple[float, float], ...]

    def __len__(self) -> int:
        return len(self.entities)

    @property
    def mask(self) -> np.ndarray:
        """The union of every creature's mask (H, W bool)."""
        return np.logical_or.reduce(self.masks)


def render_scene(entities, *, seed: int | np.random.Generator, size: int = 80, noise: float = 6.0,
                 max_overlap: float = 0.05) -> SceneRendering:
    """Draw 1–4 ``entities`` on one cluttered background of ``size``×``size`` pixels.

    Each creature's radius is 13–17 % of the side; creatures are placed one by one at least 0.9 × the
    sum of their radii apart, and the scene is drawn again if a creature loses more than ``max_overlap``
    of its area to another (later creatures are drawn on top). Same seed → same bytes.
    """
    entities = tuple(entities)
    if not 1 <= len(entities) <= 4:
        raise ValueError(f"a scene holds 1 to 4 creatures, got {len(entities)}")
    if len({e.name for e in entities}) != len(entities):
        raise ValueError("a scene cannot hold the same creature twice; pass distinct entities")
    if size < 48:
        raise ValueError(f"size must be at least 48 pixels for a scene, got {size}")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    img = _background(rng, size)
    radii = rng.uniform(0.13, 0.17, size=len(entities)) * size
    centres = _place(rng, radii, size)
    alphas = []
    for e, r, (cx, cy) in zip(entities, radii, centres):
        theta = rng.uniform(0, 2 * math.pi) if e.shape not in ("circle", "ring") else 0.0
        img, alpha = _paint(img, e, cx, cy, r, theta, rng)
        alphas.append(alpha)
    img = img + rng.normal(0, noise, size=img.shape)
    image = Image.fromarray(np.clip(np.round(img), 0, 255).astype(np.uint8), "RGB")
    masks, boxes = [], []
    for k, alpha in enumerate(alphas):
        visible = alpha.copy()
        for later in alphas[k + 1:]:
            visible = visible * (1 - later)
        mask = visible >= 0.5
        full = (alpha >= 0.5).sum()
        if mask.sum() < (1 - max_overlap) * full:
            return render_scene(entities, seed=rng, size=size, noise=noise, max_overlap=max_overlap)
        ys, xs = np.nonzero(mask)
        masks.append(mask)
        boxes.append((int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1))
    return SceneRendering(image=image, entities=entities, masks=tuple(masks), boxes=tuple(boxes),
                          centres=tuple((float(x), float(y)) for x, y in centres))


def _place(rng: np.random.Generator, radii: np.ndarray, size: int) -> list[tuple[float, float]]:
    """Centres for discs of ``radii`` inside the canvas, placed one by one so that any two are at least
    0.9 × the sum of their radii apart (they may touch but barely overlap). Starts over when a disc finds
    no room, and shrinks every radius by 10 % (in place) after 20 fresh starts."""
    while True:
        for _ in range(20):
            centres: list[tuple[float, float]] = []
            for r in radii:
                for _ in range(50):
                    c = tuple(rng.uniform(r, size - r, size=2))
                    if all(math.dist(c, d) >= 0.9 * (r + q) for d, q in zip(centres, radii)):
                        centres.append(c)
                        break
                else:
                    break
            if len(centres) == len(radii):
                return centres
        radii *= 0.9


def selectors(scene: SceneRendering, k: int, *, margin: float = 0.1) -> dict[str, str]:
    """Every phrase that picks out creature ``k`` of ``scene`` unambiguously, by selector kind.

    One creature: only ``none`` ("this creature"). Several: ``left``/``right``/``top``/``bottom`` when
    the creature is the extreme one on that side by at least ``margin`` × the image side, and
    ``colour``/``pattern`` when no other creature shares that attribute.
    """
    if not 0 <= k < len(scene):
        raise ValueError(f"creature index {k} out of range for a scene of {len(scene)}")
    if len(scene) == 1:
        return {"none": "this creature"}
    size = scene.image.size[0]
    out: dict[str, str] = {}
    xs = [c[0] for c in scene.centres]
    ys = [c[1] for c in scene.centres]
    others = [j for j in range(len(scene)) if j != k]
    gap = margin * size
    if all(xs[k] + gap <= xs[j] for j in others):
        out["left"] = _POSITION_PHRASES["left"]
    if all(xs[k] - gap >= xs[j] for j in others):
        out["right"] = _POSITION_PHRASES["right"]
    if all(ys[k] + gap <= ys[j] for j in others):
        out["top"] = _POSITION_PHRASES["top"]
    if all(ys[k] - gap >= ys[j] for j in others):
        out["bottom"] = _POSITION_PHRASES["bottom"]
    me = scene.entities[k]
    for attr in ("colour", "pattern"):
        if all(scene.entities[j].fact(attr) != me.fact(attr) for j in others):
            out[attr] = f"the {me.fact(attr)} creature"
    return out


def scene_question(fact: str, selector: str, template: int = 0, *, heldout: bool = False,
                   kind: str | None = None) -> str:
    """The question asking ``fact`` of the creature that ``selector`` (a phrase from :func:`selectors`)
    picks out. ``kind`` (the selector's kind) refuses a selector that gives the answer away."""
    table = SCENE_HELDOUT_TEMPLATES if heldout else SCENE_TEMPLATES
    if fact not in table:
        raise ValueError(f"unknown fact {fact!r}; choose one of {', '.join(FACTS)}")
    if kind is not None and _GIVES_AWAY.get(kind) == fact:
        raise ValueError(f"a {kind} selector gives the {fact} away; ask another fact or select another way")
    options = table[fact]
    return options[template % len(options)].format(x=selector)


def askable(scene: SceneRendering, k: int, fact: str) -> dict[str, str]:
    """The selectors of creature ``k`` that may be used to ask ``fact`` (those that do not give it away)."""
    return {kind: phrase for kind, phrase in selectors(scene, k).items() if _GIVES_AWAY.get(kind) != fact}


def position_words(scene: SceneRendering, k: int) -> str:
    """Where creature ``k`` sits, in the caption's words: one of a 3×3 grid ("at the top left", "in the
    middle", "on the right", …)."""
    size = scene.image.size[0]
    x, y = scene.centres[k]
    col = ("left", "", "right")[min(2, int(3 * x / size))]
    row = ("top", "", "bottom")[min(2, int(3 * y / size))]
    if row and col:
        return f"at the {row} {col}"
    if row:
        return f"at the {row}"
    if col:
        return f"on the {col}"
    return "in the middle"


def caption(scene: SceneRendering, *, rng: random.Random | None = None,
            change: tuple[int, str, str] | None = None) -> str:
    """The scene in words: each creature's colour, pattern, shape and position (never its name or a
    non-visual fact), e.g. ``"a red striped star at the top left . a blue solid circle on the right ."``
    With ``rng`` the creatures are listed in a random order, else in drawing order. ``change`` = (k, fact,
    value) describes creature k with ``value`` for its colour, pattern or shape (a counterfactual caption)."""
    order = list(range(len(scene)))
    if rng is not None:
        rng.shuffle(order)
    parts = []
    for k in order:
        looks = {f: scene.entities[k].fact(f) for f in ("colour", "pattern", "shape")}
        if change is not None and change[0] == k:
            if change[1] not in looks:
                raise ValueError(f"a caption changes colour, pattern or shape, not {change[1]!r}")
            looks[change[1]] = change[2]
        parts.append(f"{looks_words(**looks)} {position_words(scene, k)} .")
    return " ".join(parts)


def looks_words(colour: str, pattern: str, shape: str) -> str:
    """A creature's looks in the caption's words: ``"a red striped star"``, ``"an orange solid ring"``."""
    article = "an" if colour[0] in "aeiou" else "a"
    return f"{article} {colour} {pattern} {shape}"
