"""The editor protocol every editor implements: apply an edit, restore the model, or both in a block.

>>> editor = get_editor("ft_l", vllm)
>>> with editor.edit(EditRequest(image, "what shape is this creature ?", "star")):
...     editor.answer_batch([(image, "what shape is this creature ?")])
['star']

After :meth:`Editor.restore` (and after the ``with`` block, even when it raised) the model's logits
on any input are bit-identical to before the edit: weight editors copy back the exact tensors they
saved; hook and context editors remove what they added.

Edits stack: :meth:`Editor.apply` may be called again while edits are applied (sequential, "lifelong"
editing), and :meth:`Editor.apply_batch` applies several edits in one step (editors that can edit
jointly do; the others apply them one after another). :meth:`Editor.restore` returns to the weights
saved before the *first* edit, bit for bit, after any number of edits. An ``apply`` that raises leaves
the editor as it was before the call (a first edit: the model restored; a stacked one: the earlier
edits still applied).
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
from pathlib import Path
from typing import Any, ClassVar, Iterator, Mapping, Sequence

import torch

from ..config import StrictConfig
from ..models.devices import require_resident
from ..models.vllm import VLLM, Inputs

PRESET_DIR = Path(__file__).parent / "presets"
TRAINED_ROOT = Path(__file__).parent / "trained"


@dataclasses.dataclass(frozen=True)
class EditRequest:
    """One edit: after it, the model should answer ``prompt`` about ``image`` with ``target``."""

    image: Any
    prompt: str
    target: str

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ValueError("EditRequest.prompt is empty: pass the question to edit, e.g. 'what shape is this creature ?'")
        if not isinstance(self.target, str) or not self.target.strip():
            raise ValueError("EditRequest.target is empty: pass the new answer, e.g. 'star'")

    @classmethod
    def from_record(cls, record) -> "EditRequest":
        """The edit of an MMEdit record: (image, src) → alt."""
        return cls(record.image, record.src, record.alt)


class Editor(abc.ABC):
    """Base class. Subclasses implement :meth:`_apply` and, if they change weights, list them in
    :meth:`edited_parameters` (saved before and copied back on restore)."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type] = StrictConfig
    trained: ClassVar[bool] = False  # loads trained parts (settings may hold ``weights``)
    #: What :meth:`apply` takes; callers that only hold an editor (the explorers) build requests with it.
    request_type: ClassVar[type] = EditRequest

    def __init__(self, vllm: VLLM, config=None):
        self.vllm = vllm
        self.config = config if config is not None else self.config_class()
        self.requests: list[EditRequest] = []  # the applied edits, oldest first
        self._saved: dict[str, torch.Tensor] = {}
        self._grad_flags: dict[str, bool] = {}

    # --- what subclasses provide -------------------------------------------------------------------
    def edited_parameters(self) -> Mapping[str, torch.nn.Parameter]:
        """Parameters this editor may change (saved before the first edit, restored exactly)."""
        return {}

    @abc.abstractmethod
    def _apply(self, request: EditRequest) -> None:
        """Make the edit on top of those already applied (weights are already saved; ``self.requests``
        already ends with ``request``). When it raises, weights are put back by the base class and
        :meth:`_rollback` undoes the rest."""

    def _apply_batch(self, requests: Sequence[EditRequest]) -> None:
        """Make several edits in one step (default: one after another; editors that edit jointly
        override this)."""
        for request in requests:
            self._apply(request)

    def _undo(self) -> None:
        """Undo what is not a weight change (contexts, hooks). Weights are restored by the base class."""

    def _rollback(self, n_before: int) -> None:
        """Undo what a failed stacked ``apply`` left besides weights, back to ``n_before`` edits (default:
        nothing — editors whose edits are weights or ``self.requests`` need nothing more)."""

    def context(self) -> str:
        """Text put before every prompt while an edit is applied (in-context editors)."""
        return ""

    def held_bytes(self) -> int:
        """Bytes this editor holds for its applied edits: the saved pre-edit weights, plus what
        subclasses keep per edit (VEAD's edit memory)."""
        return sum(t.numel() * t.element_size() for t in self._saved.values())

    # --- the protocol --------------------------------------------------------------------------------
    @property
    def applied(self) -> bool:
        """True while at least one edit is applied."""
        return bool(self.requests)

    @property
    def request(self) -> EditRequest | None:
        """The last applied edit (None when nothing is applied)."""
        return self.requests[-1] if self.requests else None

    def apply(self, request: EditRequest) -> None:
        """Apply one edit, on top of any already applied. If it raises, the editor is as before the call."""
        if not isinstance(request, EditRequest):
            raise TypeError(f"apply() needs an EditRequest, got {type(request).__name__}")
        self._transaction([request], lambda: self._apply(request))

    def apply_batch(self, requests: Sequence[EditRequest]) -> None:
        """Apply several edits in one step, on top of any already applied (editors that can edit jointly
        do — FT-L/FT-V tune on all of them at once, MEND sums their updates, IKE and VEAD hold them all —
        the others apply them one after another). If it raises, the editor is as before the call."""
        requests = list(requests)
        if not requests:
            raise ValueError("apply_batch needs at least one EditRequest")
        for r in requests:
            if not isinstance(r, EditRequest):
                raise TypeError(f"apply_batch() needs EditRequests, got {type(r).__name__}")
        if len(requests) == 1:
            return self.apply(requests[0])
        self._transaction(requests, lambda: self._apply_batch(requests))

    def _transaction(self, requests: list[EditRequest], make) -> None:
        n_before = len(self.requests)
        params = dict(self.edited_parameters())
        require_resident(params, self.name)
        if n_before == 0:  # the pre-edit weights, kept until restore()
            self._saved = {name: p.detach().clone() for name, p in params.items()}
            self._grad_flags = {name: p.requires_grad for name, p in params.items()}
            before = self._saved
        else:  # this step's starting point, to put back if it fails
            before = {name: p.detach().clone() for name, p in params.items()}
        self.requests.extend(requests)
        try:
            make()
        except BaseException:
            if n_before == 0:
                self.restore()
            else:
                try:
                    self._rollback(n_before)
                finally:
                    del self.requests[n_before:]
                    self._copy_back(before)
            raise

    def _copy_back(self, saved: Mapping[str, torch.Tensor]) -> None:
        params = dict(self.edited_parameters())
        with torch.no_grad():
            for name, tensor in saved.items():
                params[name].copy_(tensor)
                params[name].requires_grad_(self._grad_flags[name])
                params[name].grad = None

    def restore(self) -> None:
        """Return the model to exactly its state before the first applied edit, however many were applied
        (a no-op when nothing is applied)."""
        if not self.applied:
            return
        try:
            self._undo()
        finally:
            self._copy_back(self._saved)
            self._saved = {}
            self.requests = []

    @contextlib.contextmanager
    def edit(self, request: EditRequest) -> Iterator["Editor"]:
        """Apply ``request`` inside the block; restore on exit, also when the block raises. Refused while
        other edits are applied (the block's exit restores every edit): call :meth:`restore` first."""
        if self.applied:
            raise RuntimeError(f"{self.name}: {len(self.requests)} edit(s) are already applied and the with-block "
                               "would restore them all; call restore() first, or use apply() to stack edits")
        self.apply(request)
        try:
            yield self
        finally:
            self.restore()

    # --- reading the (possibly edited) model --------------------------------------------------------
    def score_batch(self, items, **kw):
        """Teacher-forced scores through the edited model (see :meth:`VLLM.score_batch`)."""
        return self.vllm.score_batch(items, context=self.context() if self.applied else "", **kw)

    def answer_batch(self, items, **kw):
        """Greedy answers through the edited model (see :meth:`VLLM.answer_batch`)."""
        return self.vllm.answer_batch(items, context=self.context() if self.applied else "", **kw)

    @classmethod
    def from_settings(cls, vllm: VLLM, settings: Mapping, *, allow_other_model: bool = False) -> "Editor":
        """Build the editor from preset settings (editors with trained parts load them instead, and refuse
        parts trained for another model unless ``allow_other_model``)."""
        return cls(vllm, cls.config_class.from_dict(settings))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"


def save_trained(folder: str | Path, stem: str, state: Mapping[str, torch.Tensor], meta: Mapping) -> None:
    """Write a trained editor part as ``<stem>.safetensors`` + ``<stem>.json``, atomically."""
    import json

    from safetensors.torch import save_file

    from ..io import atomic_path

    with atomic_path(folder) as tmp:
        tmp.mkdir(parents=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, tmp / f"{stem}.safetensors")
        (tmp / f"{stem}.json").write_text(json.dumps(dict(meta), indent=1, sort_keys=True) + "\n")


def load_trained(folder: str | Path, stem: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read what :func:`save_trained` wrote: (meta, state). Errors say which command trains one."""
    import json

    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / f"{stem}.safetensors").exists():
        raise FileNotFoundError(f"no trained {stem.upper()} in {folder}: train one with `python -m visedit "
                                f"train-{stem} --out {folder}`")
    return json.loads((folder / f"{stem}.json").read_text()), load_file(folder / f"{stem}.safetensors")


def check_trained_for(meta: Mapping, vllm: VLLM, folder: str | Path, stem: str, *,
                      allow_other_model: bool = False) -> None:
    """Refuse trained editor parts whose file records another model's fingerprint (``model_fingerprint``);
    with ``allow_other_model`` warn once instead. Files written before fingerprints were recorded pass."""
    import warnings

    recorded = meta.get("model_fingerprint")
    if recorded is None or recorded == vllm.fingerprint:
        return
    what = (f"the {stem.upper()} in {folder} was trained for another model ({meta.get('model', '?')}, fingerprint "
            f"{recorded}; this model's is {vllm.fingerprint})")
    if allow_other_model:
        warnings.warn(f"{what}: using it anyway, as asked (allow_other_model)", UserWarning, stacklevel=3)
        return
    raise ValueError(f"{what}: train one for this model with `python -m visedit train-{stem} --model … --out DIR`, "
                     "or pass --allow-other-model (API: allow_other_model=True) to use it anyway")


def holdout_split(records, share: float, limit: int, rng, *, group=None) -> tuple[list, list]:
    """(train, validation) for editor training: ``rng`` (a ``random.Random``) shuffles the records, the first
    ``share`` of them is held out, and at most ``limit`` of those are used for validation. With ``group``
    (record → key), whole groups are held out — e.g. (entity, fact) pairs, so that validation asks what
    the eval split asks: edits of pairs never trained on."""
    if group is None:
        order = list(range(len(records)))
        rng.shuffle(order)
        n_val = max(1, round(len(order) * share))
        held, kept = order[:n_val], order[n_val:]
    else:
        groups: dict = {}
        for i, r in enumerate(records):
            groups.setdefault(group(r), []).append(i)
        keys = list(groups)
        rng.shuffle(keys)
        held, target = [], max(1, round(len(records) * share))
        while keys and len(held) < target:
            held += groups[keys.pop(0)]
        kept = [i for k in keys for i in groups[k]]
        rng.shuffle(held)
    train = [records[i] for i in kept]
    if not train:
        raise ValueError("training an editor needs at least two records (some are held out for validation)")
    return train, [records[i] for i in held][:limit]


def pair_key(record) -> tuple:
    """The (entity, fact) pair of a world record; (image, question) for records from elsewhere (E-VQA)."""
    extra = getattr(record, "extra", None) or {}
    return (extra.get("entity", record.image), extra.get("fact", record.src))


def target_loss(vllm: VLLM, inputs: Inputs, logits: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy of the target tokens of ``inputs`` (differentiable; runs the model unless
    ``logits`` (B, S, V) are given)."""
    if logits is None:
        logits = vllm.model(**inputs.tensors, use_cache=False).logits
    rows, cols, ids = [], [], []
    for b, (pos, tid) in enumerate(zip(inputs.target_positions, inputs.target_ids)):
        rows += [b] * len(pos)
        cols += [p - 1 for p in pos]
        ids += list(tid)
    if not ids:
        raise ValueError("target_loss needs inputs built with targets")
    picked = logits[torch.tensor(rows), torch.tensor(cols)].float()
    return torch.nn.functional.cross_entropy(picked, torch.tensor(ids, device=picked.device))


# --------------------------------------------------------------------------------------------- registry
_EDITORS: dict[str, type[Editor]] = {}


def register_editor(cls: type[Editor]) -> type[Editor]:
    _EDITORS[cls.name] = cls
    return cls


def editor_names() -> list[str]:
    return sorted(_EDITORS)


def _model_key(model) -> str | None:
    """The embedded model whose own presets and trained editors apply (None: the first model's, which
    live at the top of ``presets/`` and ``trained/``, and serve every other model as defaults)."""
    from ..models.vllm import EMBEDDED_MODELS

    name = model.name if isinstance(model, VLLM) else model
    return name if isinstance(name, str) and name in EMBEDDED_MODELS and name != "visedit-tiny" else None


def trained_dir(stem: str, model=None) -> Path:
    """Where the shipped trained ``stem`` (``mend``, ``vead``) of ``model`` (a :class:`VLLM` or a name)
    lives: ``trained/<stem>`` for the first model, ``trained/<model>/<stem>`` for another embedded one."""
    key = _model_key(model)
    return TRAINED_ROOT / key / stem if key else TRAINED_ROOT / stem


def load_preset(name: str, path: str | Path | None = None, *, model=None) -> dict:
    """The YAML preset of editor ``name``, or the file at ``path``. ``model`` (a :class:`VLLM` or a name):
    an embedded model's own preset (``presets/<model>/<name>.yaml``) when it has one, else that of the model
    it was tuned from (the ``tuned`` entry of its ``visedit.json``, written by ``train-late``), else
    ``presets/<name>.yaml``."""
    from ..io import load_yaml
    from ..models.vllm import info_of

    key = _model_key(model)
    source = info_of(key).get("tuned", {}).get("from") if key else None
    mine = [PRESET_DIR / k / f"{name}.yaml" for k in (key, source) if k]
    own = next((f for f in mine if f.exists()), None)
    file = Path(path) if path is not None else own if own is not None else PRESET_DIR / f"{name}.yaml"
    if not file.exists():
        if path is not None:
            raise FileNotFoundError(f"preset file not found: {file}")
        return {}
    data = load_yaml(file) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{file} must hold a YAML mapping of {name} settings")
    return data


def editor_settings(name: str, *, preset: str | Path | None = None, model=None, **overrides) -> dict:
    """Editor ``name``'s preset settings (plus ``overrides``), checked by its strict config — unknown keys
    and wrong types are refused — without a model (the CLI checks them before it loads one). Editors
    with trained parts also take ``weights`` (a trained folder)."""
    from . import finetune, ike, mend, vead  # noqa: F401  (register the editors)

    if name not in _EDITORS:
        raise ValueError(f"unknown editor {name!r}; choose one of {', '.join(editor_names())}")
    cls = _EDITORS[name]
    settings = {**load_preset(name, preset, model=model), **overrides}
    if cls.trained and settings.get("weights") is not None and not isinstance(settings["weights"], (str, Path)):
        raise ValueError(f"weights must be a folder path, got {settings['weights']!r}")
    cls.config_class.from_dict({k: v for k, v in settings.items() if not (cls.trained and k == "weights")})
    return settings


def get_editor(name: str, vllm: VLLM, *, preset: str | Path | None = None, allow_other_model: bool = False,
               **overrides) -> Editor:
    """Build editor ``name`` with its preset settings (plus ``overrides``). Names: :func:`editor_names`.
    Trained editors (mend, vead) refuse networks trained for another model (their file records its
    fingerprint) unless ``allow_other_model=True``, which warns instead."""
    settings = editor_settings(name, preset=preset, model=vllm, **overrides)
    return _EDITORS[name].from_settings(vllm, settings, allow_other_model=allow_other_model)


@dataclasses.dataclass(frozen=True)
class NoConfig(StrictConfig):
    """The no-op editor has no settings."""


@register_editor
class NoEdit(Editor):
    """Changes nothing: the sanity baseline (reliability ≈ 0, localities = 1)."""

    name = "none"
    config_class = NoConfig

    def _apply(self, request: EditRequest) -> None:
        pass
