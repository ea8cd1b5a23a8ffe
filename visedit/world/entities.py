"""Entities of the synthetic visual-knowledge world.

Every entity is a made-up creature with three *visual* attributes (shape, colour, pattern), which the
renderer draws, and two *non-visual* facts (habitat, diet), which can only be answered by recognising
the entity first. Its name is a fact of the same kind: no single visual attribute gives it away,
because entities are chosen so that every (shape, colour, pattern) triple is unique while each single
attribute value is shared by many entities.
"""

from __future__ import annotations

import dataclasses
import random

SHAPES = ("circle", "square", "triangle", "star", "ring", "moon", "cross", "arrow")
COLOURS = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "purple": (140, 50, 190),
    "pink": (250, 120, 190),
    "cyan": (40, 210, 220),
}
PATTERNS = ("solid", "striped", "dotted", "checkered")
HABITATS = ("coral reef", "pine forest", "desert", "swamp", "tundra", "cave", "meadow", "river")
DIETS = ("seeds", "fish", "insects", "leaves", "fruit", "moss")

#: Fact name -> the set of possible answers. ``name`` is filled per world.
VISUAL_FACTS = ("colour", "shape", "pattern")
NONVISUAL_FACTS = ("name", "habitat", "diet")
FACTS = VISUAL_FACTS + NONVISUAL_FACTS

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "sh", "bl", "gr", "tr")
_VOWELS = ("a", "e", "i", "o", "u", "oo", "ai")
_CODAS = ("", "n", "k", "x", "m", "sh", "r")


@dataclasses.dataclass(frozen=True)
class Entity:
    """One creature of the world: a name, visual attributes and non-visual facts."""

    name: str
    shape: str
    colour: str
    pattern: str
    habitat: str
    diet: str

    def fact(self, fact: str) -> str:
        """The answer to ``fact`` (one of :data:`FACTS`) for this entity."""
        if fact not in FACTS:
            raise ValueError(f"unknown fact {fact!r}; choose one of {', '.join(FACTS)}")
        return getattr(self, fact)

    def looks_shared(self, other: "Entity") -> int:
        """How many of the visual attributes (shape, colour, pattern) ``other`` shares with this entity: 3
        for itself, at most 2 for another entity of one world (its triples are unique)."""
        return sum(self.fact(f) == other.fact(f) for f in VISUAL_FACTS)


@dataclasses.dataclass(frozen=True)
class World:
    """A seeded set of entities. ``answers(fact)`` lists every answer a fact can take."""

    seed: int
    entities: tuple[Entity, ...]

    def __len__(self) -> int:
        return len(self.entities)

    def by_name(self, name: str) -> Entity:
        for entity in self.entities:
            if entity.name == name:
                return entity
        raise KeyError(f"no entity named {name!r} in this world (it has {len(self)} entities)")

    def to_frame(self):
        """The entities as a pandas DataFrame (one row per entity)."""
        import pandas as pd

        return pd.DataFrame([dataclasses.asdict(e) for e in self.entities])

    def answers(self, fact: str) -> tuple[str, ...]:
        fixed = {"colour": tuple(COLOURS), "shape": SHAPES, "pattern": PATTERNS,
                 "habitat": HABITATS, "diet": DIETS}
        if fact == "name":
            return tuple(e.name for e in self.entities)
        if fact not in fixed:
            raise ValueError(f"unknown fact {fact!r}; choose one of {', '.join(FACTS)}")
        return fixed[fact]


def _names(rng: random.Random, n: int) -> list[str]:
    names: set[str] = set()
    while len(names) < n:
        word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(2)) + rng.choice(_CODAS)
        if 4 <= len(word) <= 8:
            names.add(word)
    return sorted(names)


def make_world(seed: int = 0, n_entities: int = 70) -> World:
    """Build the world: ``n_entities`` creatures with unique (shape, colour, pattern) triples.

    Habitat and diet are drawn independently of appearance, so they can only be recalled after the
    entity is recognised. Same seed → same world.
    """
    n_max = len(SHAPES) * len(COLOURS) * len(PATTERNS)
    if not 2 <= n_entities <= n_max:
        raise ValueError(f"n_entities must be between 2 and {n_max}, got {n_entities}")
    rng = random.Random(seed)
    triples = [(s, c, p) for s in SHAPES for c in COLOURS for p in PATTERNS]
    rng.shuffle(triples)
    # Balance: walk the shuffled triples and keep each value's count near n/len(values).
    chosen: list[tuple[str, str, str]] = []
    counts: dict[str, int] = {}
    for cap in range(1, n_entities + 1):
        for t in triples:
            if len(chosen) == n_entities:
                break
            if t in chosen:
                continue
            if all(counts.get(v, 0) < cap * n_entities / len(vals) for v, vals in
                   zip(t, (SHAPES, COLOURS, PATTERNS))):
                chosen.append(t)
                for v in t:
                    counts[v] = counts.get(v, 0) + 1
        if len(chosen) == n_entities:
            break
    names = _names(rng, n_entities)
    rng.shuffle(names)
    entities = tuple(
        Entity(name=names[i], shape=s, colour=c, pattern=p,
               habitat=HABITATS[rng.randrange(len(HABITATS))], diet=DIETS[rng.randrange(len(DIETS))])
        for i, (s, c, p) in enumerate(chosen)
    )
    return World(seed=seed, entities=entities)
