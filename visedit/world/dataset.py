"""Edit datasets in the MMEdit (E-VQA) schema: a generator for our world and a loader for real files.

A record holds ``src`` (question), ``pred`` (the true answer), ``alt`` (the counterfactual new answer,
from the same answer set), ``rephrase`` (a held-out paraphrase), ``image`` and ``image_rephrase`` (two
renderings of the same entity), ``loc``/``loc_ans`` (a text-only question about another entity) and
``m_loc``/``m_loc_q``/``m_loc_a`` (another entity's image and a question about it). Image paths are
relative to an image root, exactly as in the released E-VQA/E-IC files, which :func:`load_mmedit`
reads unchanged.

E-IC (image captioning) records have the same fields: ``src`` is the caption prompt (:data:`CAPTION_PROMPT`,
"a photo of"), ``pred`` the true caption and ``alt`` a counterfactual one. Which task a record belongs to
is :func:`record_task`'s rule.
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
from .entities import FACTS, VISUAL_FACTS, World, make_world
from .questions import TEXT_FACTS, image_question, text_question
from .render import render
from .scene import askable, caption, looks_words, render_scene, scene_question, selectors

REQUIRED_FIELDS = ("src", "pred", "alt", "rephrase", "image", "image_rephrase", "loc", "loc_ans",
                   "m_loc", "m_loc_q", "m_loc_a")
#: Fields that may hold a list of acceptable strings in real files (the first one is used).
_MAYBE_LIST = ("pred", "alt", "loc_ans", "m_loc_a")
DATASET_VERSION = 3  # bump when the world or renderer changes: cached datasets are rebuilt
#: Extra fields that hold image paths (relative to the image root, like the MMEdit image fields).
_EXTRA_PATHS = ("mask", "mask_rephrase", "m_loc_mask", "i_loc_mask", "la_loc", "la_loc_mask")
#: The tasks of the MMEdit benchmark: E-VQA (questions) and E-IC (captions).
TASKS = ("vqa", "caption")
#: E-IC's caption prompt (MMEdit's) and the world's rephrase of it.
CAPTION_PROMPT, CAPTION_REPHRASE = "a photo of", "a picture of"


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
    task: str = "vqa"  # "vqa" (E-VQA) or "caption" (E-IC), see record_task

    def mask(self, which: str = "image") -> np.ndarray:
        """Ground-truth object mask (H, W bool) of ``image``, ``image_rephrase`` or ``m_loc`` (our
        generated datasets only; real E-VQA files have no masks)."""
        key = {"image": "mask", "image_rephrase": "mask_rephrase", "m_loc": "m_loc_mask", "i_loc": "i_loc_mask",
               "la_loc": "la_loc_mask"}.get(which)
        if key is None:
            raise ValueError(f"which must be 'image', 'image_rephrase', 'm_loc', 'i_loc' or 'la_loc', got {which!r}")
        if key not in self.extra:
            raise ValueError("this record has no object masks (only datasets made by make_edit_dataset do)")
        return np.asarray(Image.open(self.extra[key])) > 0


class MalformedRecordError(ValueError):
    """A record of an MMEdit file misses a field or holds the wrong type."""


def record_task(record: dict, path: str | os.PathLike, task: str | None = None) -> str:
    """The task of a raw MMEdit record from file ``path``, by the first rule that applies:

    1. ``task``, when given (an override for the whole file);
    2. the record's own ``task`` field (our generator writes one);
    3. ``"caption"`` when the file's name contains "caption" (the released E-IC files are
       ``caption_train_edit.json`` / ``caption_eval_edit.json``);
    4. ``"vqa"`` otherwise (the released E-VQA files, ``vqa_train.json`` / ``vqa_eval.json``).
    """
    for value in (task, record.get("task") if isinstance(record, dict) else None):
        if value is not None:
            if value not in TASKS:
                raise MalformedRecordError(f"task must be one of {', '.join(TASKS)}, got {value!r}")
            return value
    return "caption" if "caption" in Path(path).name.lower() else "vqa"


def load_mmedit(path: str | os.PathLike, image_root: str | os.PathLike | None = None, *,
                task: str | None = None) -> list[EditRecord]:
    """Read an MMEdit-schema JSON file (ours, or the released E-VQA / E-IC files) unchanged.

    ``image_root``: folder that image paths are relative to (default: the JSON file's folder).
    ``task``: "vqa" or "caption" for every record (default: :func:`record_task`'s rule).
    Raises :class:`MalformedRecordError` naming the record index and field when a record is bad.
    """
    if task is not None and task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)} (or None: the file's rule), got {task!r}")
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
    return [_parse_record(i, rec, root, path, task) for i, rec in enumerate(data)]


def _parse_record(i: int, rec: Any, root: Path, path: Path, task: str | None = None) -> EditRecord:
    where = f"{path.name} record {i}"
    if not isinstance(rec, dict):
        raise MalformedRecordError(f"{where}: expected an object, got {type(rec).__name__}")
    try:
        kind = record_task(rec, path, task)
    except MalformedRecordError as err:
        raise MalformedRecordError(f"{where}: {err}") from None
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
    extra = {k: v for k, v in rec.items() if k not in REQUIRED_FIELDS and k != "task"}
    for key in _EXTRA_PATHS:
        if isinstance(extra.get(key), str):
            extra[key] = (root / extra[key]).resolve()
    return EditRecord(**values, extra=extra, task=kind)


# --------------------------------------------------------------------------------------------- generator
@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """What :func:`make_edit_dataset` builds. Same spec → byte-identical files.

    ``edition`` 1: one creature per image (the first model's world). ``edition`` 2: scenes of 2–4
    creatures whose questions select the edited one, with two more locality probes (see
    :func:`make_edit_dataset`); use ``image_size=80`` (:data:`SCENE_SPEC`). ``task``: ``"vqa"`` (E-VQA:
    questions) or ``"caption"`` (E-IC: captions of the visual facts, see :func:`make_edit_dataset`).
    """

    seed: int = 0
    n_entities: int = 70
    edits_per_pair: int = 6
    eval_share: float = 0.2
    image_size: int = 64
    edition: int = 1
    task: str = "vqa"

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be 'vqa' (E-VQA) or 'caption' (E-IC), got {self.task!r}")
        if self.edition not in (1, 2):
            raise ValueError(f"edition must be 1 (one creature per image) or 2 (scenes), got {self.edition!r}")
        if self.edition == 2 and self.image_size < 48:
            raise ValueError(f"edition 2 scenes need image_size ≥ 48 (80 is the default scene size), "
                             f"got {self.image_size}")
        if self.edits_per_pair < 1:
            raise ValueError(f"edits_per_pair must be ≥ 1, got {self.edits_per_pair}")
        if not 0 < self.eval_share < 1:
            raise ValueError(f"eval_share must be in (0, 1), got {self.eval_share}")


#: The second edition's dataset: scenes of 80×80 pixels.
SCENE_SPEC = DatasetSpec(image_size=80, edition=2)


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

    Edition 2 records are scenes of 2–4 creatures; ``src``/``rephrase`` select the edited creature
    (``extra["selector"]`` says how) and ``image_rephrase`` is a fresh scene of the same creatures in which
    the same selector still picks it. Two probes are added: **in-image locality** (``i_loc_q``/``i_loc_a``:
    the same image, the same fact asked of another creature in it) and **look-alike locality**
    (``la_loc``/``la_loc_q``/``la_loc_a``: a creature sharing two of shape, colour and pattern with the
    edited one — or one if the world has none — alone in its picture, asked the same fact). Every queried
    creature's mask is saved. Every record also names the creature and fact each locality probe asks about
    (``loc_entity``/``loc_fact``, ``m_loc_entity``/``m_loc_fact``; edition 2 also ``i_loc_entity``/
    ``i_loc_fact`` and ``la_loc_entity``/``la_loc_fact``), so that a run of many edits can leave out the
    probes whose own fact it edited.

    With ``task="caption"`` (E-IC) the edits are the visual (entity, fact) pairs of each split: ``src`` is
    :data:`CAPTION_PROMPT` and ``rephrase`` :data:`CAPTION_REPHRASE`; ``pred`` is the image's caption in the
    world's words (edition 1: the creature's looks, ``"a red striped star ."``; edition 2: the scene's
    :func:`~visedit.world.scene.caption`) and ``alt`` the same caption with the edited creature's fact
    changed; ``image_rephrase`` is a fresh rendering (edition 2: ``alt_rephrase`` is its caption with the same
    change, the target of M-Generality); the locality probes are E-VQA's.

    The folder appears atomically (built beside it, then renamed). If ``out`` already holds a dataset
    made from the same spec it is reused.
    """
    from tqdm.auto import tqdm

    out = Path(out)
    manifest = {"version": DATASET_VERSION, **dataclasses.asdict(spec)}
    if spec.task == "vqa":
        del manifest["task"]  # the manifests written before E-IC existed stay valid
    if (out / "manifest.json").exists() and json.loads((out / "manifest.json").read_text()) == manifest:
        return out
    world = make_world(spec.seed, spec.n_entities)
    splits = split_pairs(world, spec.eval_share, spec.seed)
    if spec.task == "caption":
        splits = {k: [(i, f) for i, f in pairs if f in VISUAL_FACTS] for k, pairs in splits.items()}
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
                    make = (_make_caption_record if spec.task == "caption" else _make_record if spec.edition == 1
                            else _make_scene_record)
                    records.append(make(world, spec, split, split_id, idx, entity_idx, fact, k, rng, tmp))
                    bar.update()
            bar.close()
            (tmp / f"{split}.json").write_text(json.dumps(records, indent=1) + "\n")
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return out


def _save(rendering, tmp: Path, stem: str, mask: np.ndarray | None = None) -> tuple[str, str]:
    rendering.image.save(tmp / "images" / f"{stem}.png", optimize=False)
    mask = rendering.mask if mask is None else mask
    Image.fromarray(mask.astype(np.uint8) * 255).save(tmp / "masks" / f"{stem}.png")
    return f"images/{stem}.png", f"masks/{stem}.png"


def _save_mask(mask: np.ndarray, tmp: Path, stem: str) -> str:
    Image.fromarray(mask.astype(np.uint8) * 255).save(tmp / "masks" / f"{stem}.png")
    return f"masks/{stem}.png"


def _scene_with(entity, others: list, size: int, seed_key: tuple, rng: random.Random,
                fact: str, keep: str | None = None):
    """A scene of ``entity`` (drawn at a random slot) and ``others`` in which ``entity`` can be asked
    ``fact``; with ``keep`` (a selector kind), one in which that selector picks it. Tries up to 64 seeds."""
    for attempt in range(64):
        ents = [entity] + list(others)
        order = random.Random(f"{seed_key}-{attempt}")
        order.shuffle(ents)
        scene = render_scene(ents, seed=_rng(*seed_key, attempt), size=size)
        k = ents.index(entity)
        options = askable(scene, k, fact)
        companion = any(selectors(scene, j) for j in range(len(scene)) if j != k)  # for the in-image probe
        if companion and ((keep is None and options) or (keep is not None and keep in options)):
            return scene, k, options
    raise RuntimeError(f"no scene lets {entity.name}'s {fact} be asked (selector {keep}); report this as a bug")


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
        **_subjects(loc_entity, loc_fact, mloc_entity, mloc_fact),
        "mask": mask,
        "mask_rephrase": mask_r,
        "m_loc_mask": mask_m,
    }


def _make_caption_record(world: World, spec: DatasetSpec, split: str, split_id: int, idx: int, entity_idx: int,
                         fact: str, k: int, rng: random.Random, tmp: Path) -> dict[str, Any]:
    """An E-IC record: the caption of ``entity`` (alone, edition 1; in a scene, edition 2) with its ``fact``
    changed to another value."""
    entity = world.entities[entity_idx]
    alt_value = rng.choice([a for a in world.answers(fact) if a != entity.fact(fact)])
    others = [e for e in world.entities if e is not entity]
    size = spec.image_size
    stem = f"{split}_{idx:05d}"
    if spec.edition == 1:
        looks = {f: entity.fact(f) for f in VISUAL_FACTS}
        pred, alt = looks_words(**looks) + " .", looks_words(**{**looks, fact: alt_value}) + " ."
        img, mask = _save(render(entity, seed=_rng(spec.seed, split_id, idx, 0), size=size), tmp, stem)
        img_r, mask_r = _save(render(entity, seed=_rng(spec.seed, split_id, idx, 1), size=size), tmp,
                              stem + "_rephrase")
        extra = {}
    else:
        ents = [entity] + rng.sample(others, rng.randint(1, 3))
        rng.shuffle(ents)
        at = ents.index(entity)
        scene = render_scene(ents, seed=_rng(spec.seed, split_id, idx, 0), size=size)
        scene_r = render_scene(ents, seed=_rng(spec.seed, split_id, idx, 1), size=size)
        pred, alt = caption(scene), caption(scene, change=(at, fact, alt_value))
        img, mask = _save(scene, tmp, stem, scene.masks[at])
        img_r, mask_r = _save(scene_r, tmp, stem + "_rephrase", scene_r.masks[at])
        extra = {"edition": 2, "alt_rephrase": caption(scene_r, change=(at, fact, alt_value)),
                 "n_creatures": len(scene)}
    loc_entity, loc_fact = rng.choice(others), rng.choice(TEXT_FACTS)
    mloc_entity, mloc_fact = rng.choice(others), rng.choice(FACTS)
    m_render = (render(mloc_entity, seed=_rng(spec.seed, split_id, idx, 2), size=size) if spec.edition == 1 else
                render_scene([mloc_entity], seed=_rng(spec.seed, split_id, idx, 2), size=size))
    img_m, mask_m = _save(m_render, tmp, stem + "_mloc", m_render.mask)
    m_q = (image_question(mloc_fact, rng.randrange(3)) if spec.edition == 1 else
           scene_question(mloc_fact, "this creature", rng.randrange(3)))
    return {"src": CAPTION_PROMPT, "pred": pred, "alt": alt, "rephrase": CAPTION_REPHRASE, "image": img,
            "image_rephrase": img_r, "loc": text_question(loc_entity, loc_fact, rng.randrange(2)),
            "loc_ans": loc_entity.fact(loc_fact), "m_loc": img_m, "m_loc_q": m_q, "m_loc_a": mloc_entity.fact(mloc_fact),
            "task": "caption", "entity": entity.name, "fact": fact, "alt_value": alt_value,
            **_subjects(loc_entity, loc_fact, mloc_entity, mloc_fact), **extra,
            "mask": mask, "mask_rephrase": mask_r, "m_loc_mask": mask_m}


def _subjects(loc_entity, loc_fact: str, m_loc_entity, m_loc_fact: str) -> dict[str, str]:
    """Which creature and fact the text and multimodal locality probes ask about (so that a run of many
    edits can tell a probe about an edited fact from an unrelated one)."""
    return {"loc_entity": loc_entity.name, "loc_fact": loc_fact, "m_loc_entity": m_loc_entity.name,
            "m_loc_fact": m_loc_fact}


def _look_alike(world: World, entity, rng: random.Random):
    """Another creature sharing two of shape, colour and pattern with ``entity`` (else one, else none)."""
    for shared in (2, 1, 0):
        pool = [e for e in world.entities if e is not entity and entity.looks_shared(e) == shared]
        if pool:
            return rng.choice(pool)
    raise ValueError("the world needs at least two creatures")  # pragma: no cover - make_world ensures it


def _make_scene_record(world: World, spec: DatasetSpec, split: str, split_id: int, idx: int, entity_idx: int,
                       fact: str, k: int, rng: random.Random, tmp: Path) -> dict[str, Any]:
    entity = world.entities[entity_idx]
    pred = entity.fact(fact)
    alt = rng.choice([a for a in world.answers(fact) if a != pred])
    others = [e for e in world.entities if e is not entity]
    companions = rng.sample(others, rng.randint(1, 3))
    size = spec.image_size
    scene, at, options = _scene_with(entity, companions, size, (spec.seed, split_id, idx, 0), rng, fact)
    kind = rng.choice(sorted(options))
    selector = options[kind]
    scene_r, at_r, _ = _scene_with(entity, companions, size, (spec.seed, split_id, idx, 1), rng, fact,
                                   keep=kind)
    # in-image locality: the same fact asked of another creature of the same image
    j = rng.choice([i for i in range(len(scene)) if i != at and selectors(scene, i)])
    i_fact = fact if askable(scene, j, fact) else rng.choice([f for f in FACTS if askable(scene, j, f)])
    i_options = askable(scene, j, i_fact)
    i_kind = rng.choice(sorted(i_options))
    # multimodal locality: another scene (without the edited creature), one of its creatures asked
    m_ents = rng.sample(others, rng.randint(1, 4))
    m_fact = rng.choice(FACTS)
    m_scene = None
    for attempt in range(64):
        cand = render_scene(m_ents, seed=_rng(spec.seed, split_id, idx, 2, attempt), size=size)
        m_at = rng.randrange(len(cand))
        if askable(cand, m_at, m_fact):
            m_scene = cand
            break
    if m_scene is None:  # pragma: no cover - some creature is always askable something
        raise RuntimeError("no askable creature in the locality scene; report this as a bug")
    m_options = askable(m_scene, m_at, m_fact)
    # look-alike locality: a creature that looks like the edited one, alone, asked the same fact
    twin = _look_alike(world, entity, rng)
    loc_entity, loc_fact = rng.choice(others), rng.choice(TEXT_FACTS)
    la_scene = render_scene([twin], seed=_rng(spec.seed, split_id, idx, 3), size=size)
    stem = f"{split}_{idx:05d}"
    img, mask = _save(scene, tmp, stem, scene.masks[at])
    i_mask = _save_mask(scene.masks[j], tmp, stem + "_iloc")
    img_r, mask_r = _save(scene_r, tmp, stem + "_rephrase", scene_r.masks[at_r])
    img_m, mask_m = _save(m_scene, tmp, stem + "_mloc", m_scene.masks[m_at])
    img_la, mask_la = _save(la_scene, tmp, stem + "_laloc", la_scene.masks[0])
    template = k % 3
    return {
        "src": scene_question(fact, selector, template),
        "pred": pred,
        "alt": alt,
        "rephrase": scene_question(fact, selector, template, heldout=True),
        "image": img,
        "image_rephrase": img_r,
        "loc": text_question(loc_entity, loc_fact, rng.randrange(2)),
        "loc_ans": loc_entity.fact(loc_fact),
        "m_loc": img_m,
        "m_loc_q": scene_question(m_fact, m_options[rng.choice(sorted(m_options))], rng.randrange(3)),
        "m_loc_a": m_scene.entities[m_at].fact(m_fact),
        "i_loc_q": scene_question(i_fact, i_options[i_kind], rng.randrange(3)),
        "i_loc_a": scene.entities[j].fact(i_fact),
        "la_loc": img_la,
        "la_loc_q": scene_question(fact, "this creature", rng.randrange(3)),
        "la_loc_a": twin.fact(fact),
        "edition": 2,
        "entity": entity.name,
        "fact": fact,
        "selector": kind,
        "n_creatures": len(scene),
        "i_loc_entity": scene.entities[j].name,
        "i_loc_fact": i_fact,
        **_subjects(loc_entity, loc_fact, m_scene.entities[m_at], m_fact),
        "la_loc_entity": twin.name,
        "la_loc_fact": fact,
        "la_loc_shared": entity.looks_shared(twin),
        "mask": mask,
        "mask_rephrase": mask_r,
        "m_loc_mask": mask_m,
        "i_loc_mask": i_mask,
        "la_loc_mask": mask_la,
    }


def default_dataset_dir() -> Path:
    """Where the embedded model's edit dataset is generated once and shared by the CLI, the tests and
    the notebooks: ``$VISEDIT_DATA/world``, else ``$XDG_CACHE_HOME/visedit/world`` (``~/.cache/…``)."""
    if os.environ.get("VISEDIT_DATA"):
        return Path(os.environ["VISEDIT_DATA"]) / "world"
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "visedit" / "world"


def spread(records: list, limit: int) -> list:
    """At most ``limit`` records taken at an even stride over ``records``, so that a small sample covers
    every entity and fact (the sample the CLI's ``--spread`` and a reading report measure, so a notebook can
    recompute a committed result on the same records)."""
    return records[:: max(1, len(records) // limit)][:limit]


def spec_dataset_dir(spec: DatasetSpec = DatasetSpec()) -> Path:
    """Where the dataset of ``spec`` is cached: :func:`default_dataset_dir` (``…/world``) for the first
    edition, ``…/world2`` for scenes, with ``-caption`` appended for E-IC."""
    folder = default_dataset_dir()
    if spec.edition == 2:
        folder = folder.with_name("world2")
    return folder.with_name(folder.name + "-caption") if spec.task == "caption" else folder


def load_world_split(split: str = "eval", spec: DatasetSpec = DatasetSpec(), *, root=None,
                     progress: bool = False) -> list[EditRecord]:
    """Generate (once) and load a split of the world's edit dataset."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    root = make_edit_dataset(root or spec_dataset_dir(spec), spec, progress=progress)
    return load_mmedit(root / f"{split}.json")
