"""Question templates.

Image questions ask about "this creature" in the picture; the model must look at the image to answer.
Each fact has training templates and held-out paraphrase templates that are never trained on (they
re-use words the model has seen, in new sentences). Text-only questions name the entity and need no
image; they are the text-locality probes.
"""

from __future__ import annotations

from .entities import FACTS, Entity

TRAIN_TEMPLATES: dict[str, tuple[str, ...]] = {
    "colour": ("what colour is this creature ?", "which colour does the creature in the picture have ?",
               "tell me the colour of this creature ."),
    "shape": ("what shape is this creature ?", "which shape does the creature in the picture have ?",
              "tell me the shape of this creature ."),
    "pattern": ("what pattern is on this creature ?", "which pattern does the creature in the picture have ?",
                "tell me the pattern of this creature ."),
    "name": ("what is the name of this creature ?", "which creature is in the picture ?",
             "tell me the name of this creature ."),
    "habitat": ("where does this creature live ?", "in which habitat does the creature in the picture live ?",
                "tell me the habitat of this creature ."),
    "diet": ("what does this creature eat ?", "which food does the creature in the picture eat ?",
             "tell me the diet of this creature ."),
}

HELDOUT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "colour": ("the creature in the picture is which colour ?", "what is the colour of the creature ?"),
    "shape": ("the creature in the picture is which shape ?", "what is the shape of the creature ?"),
    "pattern": ("the creature in the picture is which pattern ?", "what is the pattern of the creature ?"),
    "name": ("what is the name of the creature in the picture ?", "tell me what the name of the creature is ."),
    "habitat": ("the creature in the picture does live where ?", "what is the habitat of the creature ?"),
    "diet": ("the creature in the picture does eat what ?", "what is the diet of the creature ?"),
}

#: Text-only questions: ``{name}`` is replaced by the entity's name. Answerable without an image.
TEXT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "habitat": ("where does the {name} live ?", "tell me the habitat of the {name} ."),
    "diet": ("what does the {name} eat ?", "tell me the diet of the {name} ."),
    "colour": ("what colour is the {name} ?",),
    "shape": ("what shape is the {name} ?",),
}

TEXT_FACTS = tuple(TEXT_TEMPLATES)


def image_question(fact: str, template: int = 0, *, heldout: bool = False) -> str:
    """Question text for an image question about ``fact``."""
    table = HELDOUT_TEMPLATES if heldout else TRAIN_TEMPLATES
    if fact not in table:
        raise ValueError(f"unknown fact {fact!r}; choose one of {', '.join(FACTS)}")
    return table[fact][template % len(table[fact])]


def text_question(entity: Entity, fact: str, template: int = 0) -> str:
    """Text-only question about ``entity``'s ``fact`` (no image needed)."""
    if fact not in TEXT_TEMPLATES:
        raise ValueError(f"no text-only question for fact {fact!r}; choose one of {', '.join(TEXT_FACTS)}")
    options = TEXT_TEMPLATES[fact]
    return options[template % len(options)].format(name=entity.name)
