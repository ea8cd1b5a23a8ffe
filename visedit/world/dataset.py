"""Edit datasets in the MMEdit (E-VQA) schema: a generator for our world and a loader for real files.

A record holds ``src`` (question), ``pred`` (the true answer), ``alt`` (the counterfactual new answer,
from the same answer set), ``rephrase`` (a held-out paraphrase), ``image`` and ``image_rephrase`` (two
renderings of the same entity), ``loc``/``loc_ans`` (a text-only question about another entity) and
``m_loc``/``m_loc_q``/``m_loc_a`` (another entity's image and a question about it). Image paths are
relative to an image root, exactly as in the released E-VQA/E-IC files, which :func:`load_mmedit`
reads unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..io import atomic_path
from .entities import FACTS, World, make_world
from .questions import TEXT_FACTS, image_question, text_question
from .render import render

REQUIRED_FIELDS = ("src", "pred", "alt", "rephrase", "image", "image_rephrase", "loc", "loc_ans",
                   "m_loc", "m_loc_q", "m_loc_a")
#: Fields that may hold a list of acceptable strings in real files (the first one is used).
_MAYBE_LIST = ("pred", "alt", "loc_ans", "m_loc_a")
DATASET_VERSION = 2  # bump when the world or renderer changes: cached datasets are rebuilt


@dataclasses.dataclass(frozen=True)
class EditRecord:
    """One edit request with its generality and locality probes (MMEdit schema).

    Image fields are absolute paths; ``extra`` keeps any other keys of the source record (our
    generator stores ``entity``, ``fact``, ``mask`` and ``mask_rephrase`` there).
    """

    src: str
    pred: str
    alt: str
    rephrase: str
    image: Path
    image_rephrase: Path
    loc: str
    loc_ans: str
    m_loc: Path
    m_loc_q: str
    m_loc_a: str
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def mask(self, which: str = "image") -> np.ndarray:
        """Ground-truth object mask (H, W bool) of ``image``, ``image_rephrase`` or ``m_loc`` (our
        generated datasets only; real E-VQA files have no masks)."""
        key = {"image": "mask", "image_rephrase": "mask_rephrase", "m_loc": "m_loc_mask"}.get(which)
        if key is None:
            raise ValueError(f"which must be 'image', 'image_rephrase' or 'm_loc', got {which!r}")
        if key not in self.extra:
            raise ValueError("this record has no object masks (only datasets made by make_edit_dataset do)")
        return np.asarray(Image.open(self.extra[key])) > 0


class MalformedRecordError(ValueError):
    """A record of an MMEdit file misses a field or holds the wrong type."""


def load_mmedit(path: str | os.PathLike, image_root: str | os.PathLike | None = None) -> list[EditRecord]:
    """Read an MMEdit-schema JSON file (ours, or the released E-VQA / E-IC files) unchanged.

    ``image_root``: folder that image paths are relative to (default: the JSON file's folder).
    Raises :class:`MalformedRecordError` naming the record index and field when a record is bad.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"MMEdit file not found: {path} — generate one with "
                                "`python -m visedit make-dataset` or pass the path of an E-VQA/E-IC json")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise MalformedRecordError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(data, list):
        raise MalformedRecordError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    root = Path(image_root) if image_root is not None else path.parent
    return [_parse_record(i, rec, root, path) for i, rec in enumerate(data)]


def _parse_record(i: int, rec: Any, root: Path, path: Path) -> EditRecord:
    where = f"{path.name} record {i}"
    if not isinstance(rec, dict):
        raise MalformedRecordError(f"{where}: expected an object, got {type(rec).__name__}")
    values: dict[str, Any] = {}
    for field in REQUIRED_FIELDS:
        if field not in rec:
            raise MalformedRecordError(f"{where}: missing field {field!r} (an MMEdit record needs "
                                       f"{', '.join(REQUIRED_FIELDS)})")
        value = rec[field]
        if field in _MAYBE_LIST and isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            value = value[0]
        if not isinstance(value, str) or not value.strip():
            raise MalformedRecordError(f"{where}: field {field!r} must be a non-empty string, got {value!r}")
        values[field] = value
    for field in ("image", "image_rephrase", "m_loc"):
        values[field] = (root / values[field]).resolve()
    extra = {k: v for k, v in rec.items() if k not in REQUIRED_FIELDS}
    for key in ("mask", "mask_rephrase", "m_loc_mask"):
        if isinstance(extra.get(key), str):
            extra[key] = (root / extra[key]).resolve()
    return EditRecord(**values, extra=extra)


# --------------------------------------------------------------------------------------------- generator
@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """What :func:`make_edit_dataset` builds. Same spec → byte-identical files."""

    seed: int = 0
    n_entities: int = 70
    edits_per_pair: int = 6
    eval_share: float = 0.2
    image_size: int = 64

    def __post_init__(self) -> None:
        if self.edits_per_pair < 1:
            raise ValueError(f"edits_per_pair must be ≥ 1, got {self.edits_per_pair}")
        if not 0 < self.eval_share < 1:
            raise ValueError(f"eval_share must be in (0, 1), got {self.eval_share}")


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(list(key)))


def split_pairs(world: World, eval_share: float, seed: int) -> dict[str, list[tuple[int, str]]]:
    """Split all (entity index, fact) pairs into disjoint train and eval lists."""
    pairs = [(i, f) for i in range(len(world)) for f in FACTS]
    random.Random(seed).shuffle(pairs)
    n_eval = round(len(pairs) * eval_share)
    return {"eval": sorted(pairs[:n_eval]), "train": sorted(pairs[n_eval:])}


def make_edit_dataset(out: str | os.PathLike, spec: DatasetSpec = DatasetSpec(), *,
                      progress: bool = True) -> Path:
    """Write ``train.json``, ``eval.json`` and ``images/`` (plus ``masks/``) under ``out``.

    The folder appears atomically (built beside it, then renamed). If ``out`` already holds a dataset
    made from the same spec it is reused.
    """
    from tqdm.auto import tqdm

    out = Path(out)
    manifest = {"version": DATASET_VERSION, **dataclasses.asdict(spec)}
    if (out / "manifest.json").exists() and json.loads((out / "manifest.json").read_text()) == manifest:
        return out
    world = make_world(spec.seed, spec.n_entities)
    splits = split_pairs(world, spec.eval_share, spec.seed)
    with atomic_path(out) as tmp:
        (tmp / "images").mkdir(parents=True)
        (tmp / "masks").mkdir()
        for split_id, (split, pairs) in enumerate(sorted(splits.items())):
            records = []
            rng = random.Random(spec.seed * 1000 + split_id)
            total = len(pairs) * spec.edits_per_pair
            bar = tqdm(total=total, desc=f"{split} edits", disable=not progress)
            for entity_idx, fact in pairs:
                for k in range(spec.edits_per_pair):
                    idx = len(records)
                    records.append(_make_record(world, spec, split, split_id, idx, entity_idx, fact, k, rng, tmp))
                    bar.update()
            bar.close()
            (tmp / f"{split}.json").write_text(json.dumps(records, indent=1) + "\n")
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return out


def _save(rendering, tmp: Path, stem: str) -> tuple[str, str]:
    rendering.image.save(tmp / "images" / f"{stem}.png", optimize=False)
    Image.fromarray(rendering.mask.astype(np.uint8) * 255).save(tmp / "masks" / f"{stem}.png")
    return f"images/{stem}.png", f"masks/{stem}.png"


def _make_record(world: World, spec: DatasetSpec, split: str, split_id: int, idx: int, entity_idx: int,
                 fact: str, k: int, rng: random.Random, tmp: Path) -> dict[str, Any]:
    entity = world.entities[entity_idx]
    pred = entity.fact(fact)
    alt = rng.choice([a for a in world.answers(fact) if a != pred])
    others = [e for e in world.entities if e is not entity]
    loc_entity = rng.choice(others)
    loc_fact = rng.choice(TEXT_FACTS)
    mloc_entity = rng.choice(others)
    mloc_fact = rng.choice(FACTS)
    stem = f"{split}_{idx:05d}"
    img, mask = _save(render(entity, seed=_rng(spec.seed, split_id, idx, 0), size=spec.image_size), tmp, stem)
    img_r, mask_r = _save(render(entity, seed=_rng(spec.seed, split_id, idx, 1), size=spec.image_size),
                          tmp, stem + "_rephrase")
    img_m, mask_m = _save(render(mloc_entity, seed=_rng(spec.seed, split_id, idx, 2), size=spec.image_size),
                          tmp, stem + "_mloc")
    return {
        "src": image_question(fact, k),
        "pred": pred,
        "alt": alt,
        "rephrase": image_question(fact, k, heldout=True),
        "image": img,
        "image_rephrase": img_r,
        "loc": text_question(loc_entity, loc_fact, rng.randrange(2)),
        "loc_ans": loc_entity.fact(loc_fact),
        "m_loc": img_m,
        "m_loc_q": image_question(mloc_fact, rng.randrange(3)),
        "m_loc_a": mloc_entity.fact(mloc_fact),
        "entity": entity.name,
        "fact": fact,
        "mask": mask,
        "mask_rephrase": mask_r,
        "m_loc_mask": mask_m,
    }


def default_dataset_dir() -> Path:
    """Where the embedded model's edit dataset is generated once and shared by the CLI, the tests and
    the notebooks: ``$VISEDIT_DATA/world``, else ``$XDG_CACHE_HOME/visedit/world`` (``~/.cache/…``)."""
    if os.environ.get("VISEDIT_DATA"):
        return Path(os.environ["VISEDIT_DATA"]) / "world"
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "visedit" / "world"


def load_world_split(split: str = "eval", spec: DatasetSpec = DatasetSpec(), *, root=None,
                     progress: bool = False) -> list[EditRecord]:
    """Generate (once) and load a split of the world's edit dataset."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    root = make_edit_dataset(root or default_dataset_dir(), spec, progress=progress)
    return load_mmedit(root / f"{split}.json")
