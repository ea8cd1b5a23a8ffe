"""Where does a model read its image? One report per model, for the study of which ingredient makes a
vision-language model read its image late (``python -m visedit reading --model NAME --json``).

The report joins three measurements made elsewhere in the library: the model card (does it know the
world?), the attention-contribution profile on correctly answered eval records (where is the answer
written: the peak's relative depth and the first third's share), the same profile split by source (what
each layer's attention takes from the visual tokens and what from the text: the paper's contribution
scores the whole attention output, whichever it read), and — for scene models — the layer selectivity of
noise maps (which layer's maps point at the creature the question asks about).
"""

from __future__ import annotations

import dataclasses

from .attribution import contribution_profile, source_profile
from .attribution.selectivity import layer_selectivity
from .models import VLLM
from .models.card import model_card
from .world import load_world_split, spread


@dataclasses.dataclass(frozen=True)
class ReadingReport:
    """One model's answers to "where does it read its image?". ``selectivity`` is None for a model
    trained on one creature per image (it has no scene to select from)."""

    model: str
    info: dict
    n_layers: int
    card: dict
    attention: list[float]
    mlp: list[float]
    attention_peak: int
    attention_peak_relative_depth: float
    early_share: float
    n_profile: int
    selectivity: dict | None
    #: per layer, what the attention output takes from the visual tokens / from the text (direct logit
    #: attribution, exact), on the same records; None in reports made before it was measured
    visual_attention: list[float] | None = None
    text_attention: list[float] | None = None
    visual_peak_relative_depth: float | None = None
    visual_early_share: float | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ReadingReport":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def reading_report(vllm: VLLM, *, n_profile: int = 96, n_selectivity: int = 48, card_entities: int | None = None,
                   progress: bool = True) -> ReadingReport:
    """Measure ``vllm``: its model card (``card_entities`` first entities, default all), its attention
    profile on ``n_profile`` eval records spread over the split (correct answers only), and for scene
    models the layer selectivity on ``n_selectivity`` eval records."""
    if n_profile < 1 or n_selectivity < 1:
        raise ValueError("n_profile and n_selectivity must be ≥ 1")
    spec = vllm.dataset_spec
    card = model_card(vllm, entities=None if card_entities is None else range(card_entities), progress=progress)
    records = load_world_split("eval", spec, progress=progress)
    profile = contribution_profile(vllm, spread(records, n_profile), only_correct=True, progress=progress)
    sources = source_profile(vllm, spread(records, n_profile), only_correct=True, progress=progress)
    selectivity = None
    if spec.edition == 2:
        selectivity = layer_selectivity(vllm, spread(records, n_selectivity), progress=progress).to_dict()
    return ReadingReport(model=vllm.name, info=dict(vllm.info), n_layers=vllm.n_layers,
                         card={**card.to_dict(), "passes": card.passes()}, attention=profile.mean["attn"],
                         mlp=profile.mean["mlp"], attention_peak=profile.peak("attn"),
                         attention_peak_relative_depth=round(profile.relative_peak_depth("attn"), 4),
                         early_share=round(profile.early_share("attn"), 4), n_profile=profile.n,
                         selectivity=selectivity, visual_attention=sources.mean["visual"],
                         text_attention=sources.mean["text"],
                         visual_peak_relative_depth=round(sources.relative_peak_depth("visual"), 4),
                         visual_early_share=round(sources.early_share("visual"), 4))
