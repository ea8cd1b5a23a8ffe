"""The VisEdit editor: VEAD attached by a scoped hook to the output of LLM layer l_e (the paper), or to
its input (``at: input`` — the same stream as the output of l_e − 1; new only for l_e = 0, where it is
the projector's output as the LLM first sees it).

Applying an edit is one partial forward pass (image + prompt + new answer, stopped at l_e) to keep
the edit sample's states; then the hook rewrites the visual-token slice of every later input that has
an image (and more than one token: single-token decoding steps reuse the edited prefix). Restoring
removes the hook; no weight ever changes, so the model is bit-identical afterwards.

Edits stack as the paper's VEAD allows: it holds one edit sample, so a new edit replaces the last one.
With ``memory: true`` (ours, see :mod:`.memory`) it holds them all and routes each input to one.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from ...hooks import Trace, edit_input, edit_output
from ..base import EditRequest, Editor, check_trained_for, load_trained, register_editor, save_trained, trained_dir
from .module import VEAD, VEADConfig

TRAINED_DIR = trained_dir("vead")  # the first model's; see trained_dir for the others


def high_block(values: Sequence[float], *, window: int = 3) -> tuple[int, int]:
    """The high-contribution layers of a per-layer profile, as ``(first, last)``: the contiguous run of
    layers whose contribution is at least the profile's mean, around the peak of the profile smoothed by a
    moving mean over ``window`` layers (shorter at the two ends). Smoothing makes the block, not a lone
    layer, decide: on a nearly flat profile one spiking layer among low ones need not be where the model
    reads most."""
    v = np.asarray(values, dtype=float)
    if v.ndim != 1 or len(v) == 0 or not np.isfinite(v).all():
        raise ValueError(f"a profile is one finite value per layer, got {values!r}")
    if window < 1 or window % 2 == 0:
        raise ValueError(f"window must be a positive odd number of layers, got {window}")
    half = window // 2
    smooth = np.array([v[max(0, i - half):i + half + 1].mean() for i in range(len(v))])
    peak = int(np.argmax(smooth))
    if v[peak] < v.mean():  # the smoothed peak sits in a dip between two high layers: take the higher one
        near = [i for i in (peak - 1, peak + 1) if 0 <= i < len(v)]
        peak = max(near, key=lambda i: v[i])
    first = last = peak
    while first > 0 and v[first - 1] >= v.mean():
        first -= 1
    while last < len(v) - 1 and v[last + 1] >= v.mean():
        last += 1
    return first, last


def edit_layer_from_profile(values: Sequence[float], *, at: str = "output", window: int = 3) -> int:
    """l_e from a per-layer contribution profile, as the paper places it: just before the high-contribution
    layers (:func:`high_block`). ``at="output"``: the output of the layer before the block's first layer
    (clipped at 0); ``at="input"``: the input of the block's first layer (the same stream)."""
    if at not in ("output", "input"):
        raise ValueError(f"at must be 'output' or 'input', got {at!r}")
    first, _ = high_block(values, window=window)
    return first if at == "input" else max(0, first - 1)


def choose_edit_layer(vllm, records: Sequence, *, at: str = "output", limit: int = 64, window: int = 3) -> int:
    """The default l_e: VEAD rewrites the visual tokens just before the layers that read them most — the
    high-contribution block of the attention modules' contribution profile (paper formula, on correctly
    answered records — pass train-split records; see :func:`high_block`). Attention is where the answer
    position reads the visual tokens. With ``at="input"`` l_e is the block's first layer, at its input;
    with ``at="output"`` the output of the layer before it (clipped at 0: a model that reads its visual
    tokens most from layer 0 has no such layer, which is why the first embedded model's preset uses
    ``at: input``). The paper puts l_e "just before the high-contribution layers" (LLaVA-1.5: 18)."""
    from ...attribution import contribution_profile

    if at not in ("output", "input"):
        raise ValueError(f"at must be 'output' or 'input', got {at!r}")
    profile = contribution_profile(vllm, list(records)[:limit], only_correct=True, progress=False)
    return edit_layer_from_profile(profile.mean["attn"], at=at, window=window)


@dataclasses.dataclass
class EditMemory:
    """What an applied edit keeps: layer-l_e states H (1, S, d), their mask (1, S), and the IM's keys:
    the last prompt token's state p (1, d), or the edit sample's visual tokens (1, N, d) with
    ``im_reads: image``."""

    states: torch.Tensor
    mask: torch.Tensor
    prompt_state: torch.Tensor
    visual: torch.Tensor | None = None  # (1, d): the mean of the edit sample's visual tokens (routing key)
    question: torch.Tensor | None = None  # (1, d): the mean of its question's states (the joint route's key)
    prompt_key: torch.Tensor | None = None  # (1, d): its last prompt token's state (the prompt route's key)


#: the settings of how a trained VEAD's edits are applied, not trained: a preset (or ``--set``) may change
#: them on a loaded VEAD
APPLY_SETTINGS = ("memory", "route", "route_weight", "route_layer", "route_min", "route_scope", "refine_steps",
                  "refine_lr", "refine_loss")


def answer_rows(vllm, target_ids: Sequence[Sequence[int]], device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The new answers' tokens as the decoder's input embeddings, right-padded: (B, n, d) float and the
    (B, n) mask of real tokens — VEAD's memory with ``memory_reads: answer``."""
    if any(len(t) == 0 for t in target_ids):
        raise ValueError("memory_reads: answer needs every edit sample to have a new answer (a target)")
    n = max(len(t) for t in target_ids)
    embed = vllm.site("llm.embed")
    weight = embed.weight
    ids = torch.zeros(len(target_ids), n, dtype=torch.long, device=weight.device)
    mask = torch.zeros(len(target_ids), n, dtype=torch.bool)
    for b, t in enumerate(target_ids):
        ids[b, :len(t)] = torch.as_tensor(list(t))
        mask[b, :len(t)] = True
    with torch.no_grad():
        rows = embed(ids).float()
    return rows.to(device or weight.device), mask.to(device or weight.device)


@register_editor
class VEADEditor(Editor):
    """VisEdit. ``adapter``: a trained :class:`VEAD` (``get_editor("vead", vllm, weights=DIR)`` loads one
    written by ``python -m visedit train-vead --out DIR``)."""

    name = "vead"
    config_class = VEADConfig
    trained = True

    def __init__(self, vllm, config: VEADConfig | None = None, *, adapter: VEAD | None = None):
        super().__init__(vllm, config)
        if self.config.layer is None:
            raise ValueError("VEADConfig.layer is not set: pick l_e with choose_edit_layer(vllm, train_records) "
                             "or set `layer:` in the preset")
        self.layer = vllm.adapter.check_layer(self.config.layer)
        self.im_layer = None if self.config.im_layer is None else self.later_layer(self.config.im_layer, "im_layer")
        d = vllm.d_model
        self.adapter = adapter if adapter is not None else VEAD(**self.config.resolved(d), use_im=self.config.use_im)
        self.adapter.to(self.device).eval()  # VEAD and its influence mapper sit beside the layer they wrap
        self.memory: EditMemory | None = None
        self.bank: list[EditMemory] = []  # the held edits (the last one only, unless config.memory)
        self._keys_cache: dict[str, torch.Tensor] = {}
        self._scope = None  # (setting, RouteScope) once route_scope is read
        self._bypass = False
        self._stack: contextlib.ExitStack | None = None

    # --- save / load -----------------------------------------------------------------------------------
    @classmethod
    def from_settings(cls, vllm, settings: Mapping, *, allow_other_model: bool = False) -> "VEADEditor":
        """Load a trained VEAD: ``settings['weights']`` (a folder from ``train-vead``) or the shipped one.
        The folder's own settings define the editor, except those of how an edit is applied
        (:data:`APPLY_SETTINGS`: ``memory`` and the ``route_*`` settings), which ``settings`` may set; every
        preset value is checked like any config. (An untrained VEAD is the identity; build one with
        ``VEADEditor(vllm, VEADConfig(...))``.)"""
        settings = dict(settings)
        folder = Path(settings.pop("weights", None) or trained_dir("vead", vllm))
        VEADConfig.from_dict(settings)
        editor = cls.load(vllm, folder, allow_other_model=allow_other_model)
        applied = {key: settings[key] for key in APPLY_SETTINGS if key in settings}
        if applied:
            editor.config = dataclasses.replace(editor.config, **applied)
        if editor.config.route_scope is not None:
            editor.scope()  # a missing or mismatched scope fails here, in one line, not at the first edit
        return editor

    @classmethod
    def load(cls, vllm, folder: str | Path, *, allow_other_model: bool = False) -> "VEADEditor":
        """The VEAD in ``folder``; refused if trained for another model (see :func:`check_trained_for`)."""
        meta, state = load_trained(folder, "vead")
        config = VEADConfig.from_dict(meta["config"])
        d = vllm.d_model
        if meta["sizes"]["d"] != d or meta["layer"] >= vllm.n_layers:
            raise ValueError(f"the VEAD in {folder} was trained for another model ({meta.get('model', '?')}, "
                             f"d = {meta['sizes']['d']}); train one for this model with `python -m visedit "
                             "train-vead --model … --out DIR`")
        check_trained_for(meta, vllm, folder, "vead", allow_other_model=allow_other_model)
        adapter = VEAD(**meta["sizes"], use_im=config.use_im)
        adapter.load_state_dict(state)
        return cls(vllm, dataclasses.replace(config, layer=meta["layer"]), adapter=adapter)

    def save(self, folder: str | Path, *, extra: Mapping | None = None) -> None:
        """Write ``vead.safetensors`` + ``vead.json`` atomically."""
        save_trained(folder, "vead", self.adapter.state_dict(),
                     {"config": dataclasses.asdict(self.config), "layer": self.layer, "sizes": self.adapter.sizes,
                      "model": self.vllm.name, "model_fingerprint": self.vllm.fingerprint, **(extra or {})})

    # --- the edit --------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """The device of layer l_e (on a model split over devices, VEAD runs there)."""
        return self.vllm.device_of(f"llm.layers.{self.layer}")

    @property
    def at_input(self) -> bool:
        """True when VEAD rewrites the input of layer l_e (``at: input``) rather than its output."""
        return self.config.at == "input"

    @property
    def first_layer_after(self) -> int:
        """The first layer that reads VEAD's rewrite (l_e with ``at: input``, else l_e + 1)."""
        return self.config.first_layer_after(self.layer)

    def later_layer(self, setting: int, name: str) -> int:
        """The layer a setting (``im_layer``, ``route_layer``; negative: from the end) names, which must be
        one that runs after VEAD; refused in one line otherwise."""
        first, r = self.first_layer_after, self.vllm.adapter.check_layer(setting)
        if not first <= r < self.vllm.n_layers:
            raise ValueError(f"{name} {setting} must be a layer after VEAD's ({first}…{self.vllm.n_layers - 1}): "
                             f"VEAD sits at the {self.config.at} of layer {self.layer}; set {name} to one of those "
                             "or null")
        return r

    def _run_on(self, states: torch.Tensor, kwargs: dict, until: int | None) -> torch.Tensor:
        """VEAD-off ``states`` where VEAD sits run on to the output of layer ``until`` (a partial forward pass
        with ``kwargs``, the keyword arguments layer l_e was called with on the same pass); None: as they are."""
        if until is None:
            return states
        with torch.no_grad(), self._off():  # the layers run as they are, VEAD's own hook included (off)
            return self.vllm.adapter.run_from(self.first_layer_after, states, kwargs, until=until)

    def layer_states(self, items) -> tuple[torch.Tensor, object]:
        """Residual stream at l_e (its output, or its input with ``at: input``) (B, S, d) for
        (image, question[, target]) items, from a forward pass stopped there (VEAD off unless an edit
        is applied)."""
        states, inputs, _ = self._layer_run(items)
        return states, inputs

    def _layer_run(self, items, *, eos: bool = False) -> tuple[torch.Tensor, object, dict]:
        """:meth:`layer_states`, and the keyword arguments layer l_e was called with (positions, masks);
        ``eos``: the targets end with the end-of-sequence token."""
        inputs = self.vllm.inputs(items, add_eos=True) if eos else self.vllm.inputs(items)
        block = f"llm.layers.{self.layer}"
        with self._off():
            run = self.vllm.run(inputs, trace=[block], trace_inputs=True, trace_outputs=not self.at_input,
                                stop_after=block)
        return (run.inputs if self.at_input else run.outputs)[block].to(self.device), inputs, run.kwargs[block]

    @contextlib.contextmanager
    def _off(self):
        """VEAD off inside the block, also while edits are applied (the edit sample's own states)."""
        previous, self._bypass = self._bypass, True
        try:
            yield
        finally:
            self._bypass = previous

    def remember(self, request: EditRequest) -> EditMemory:
        """One partial forward pass on the edit sample (image + prompt + new answer), stopped after l_e."""
        states, inputs, kwargs = self._layer_run([(request.image, request.prompt, request.target)])
        routed = self._route_states(states, kwargs)  # where the route reads its keys (l_e, or route_layer)
        memory = EditMemory(*self._memory_rows(states, inputs), self._im_keys(states, inputs, kwargs),
                            self._visual_key(routed, inputs.visual_spans[0]),
                            self._question_key(routed, inputs.visual_spans[0], inputs.last_prompt[0]),
                            routed[:, inputs.last_prompt[0]].clone())
        if self.config.refine_steps:
            self.refine(memory, request)
        return memory

    def refine(self, memory: EditMemory, request: EditRequest) -> int:
        """Fit ``memory``'s rows to its edit sample (``refine_steps``, see :class:`VEADConfig`): Adam on the
        new answer's cross-entropy (with ``eos`` its end token too) through VEAD and the layers after it,
        VEAD's own weights untouched. Replaces ``memory.states``; returns the steps taken."""
        import torch.nn.functional as F

        from ...models.backbones import unembed

        cfg = self.config
        states, inputs, kwargs = self._layer_run([(request.image, request.prompt, request.target)], eos=cfg.eos)
        if inputs.visual_spans[0] is None:
            return 0  # a text-only edit: VEAD never acts on it
        start, stop = inputs.visual_spans[0]
        states = states.float()
        positions = torch.tensor(inputs.target_positions[0], device=states.device) - 1
        target = torch.tensor(inputs.target_ids[0], device=states.device)
        rows = memory.states.detach().float().clone().requires_grad_(True)
        mask, prompt = memory.mask.to(self.device), memory.prompt_state.float()
        opt = torch.optim.Adam([rows], lr=cfg.refine_lr)
        taken = 0
        with self._off(), torch.enable_grad():  # also when the edit is applied under no_grad
            for taken in range(1, cfg.refine_steps + 1):
                new, _ = self.adapter(states[:, start:stop], rows, mask, prompt)
                hidden = torch.cat([states[:, :start], new.to(states.dtype), states[:, stop:]], 1)
                hidden = self.vllm.adapter.run_from(self.first_layer_after, hidden, kwargs)
                loss = F.cross_entropy(unembed(self.vllm.adapter, hidden[0, positions]).float(), target)
                if float(loss.detach()) < cfg.refine_loss:
                    taken -= 1
                    break
                opt.zero_grad()
                rows.grad, = torch.autograd.grad(loss, [rows])
                opt.step()
        memory.states = rows.detach().to(memory.states.dtype)
        return taken

    @staticmethod
    def _visual_key(states: torch.Tensor, span) -> torch.Tensor:
        if span is None:
            return torch.zeros_like(states[:, 0])
        return states[:, span[0]:span[1]].mean(1)

    @staticmethod
    def _question_key(states: torch.Tensor, span, last_prompt: int) -> torch.Tensor:
        """(1, d): the mean state of the prompt after the image (the question and the frame's end), the
        answer left out."""
        start = span[1] if span is not None else 0
        return states[:, start:last_prompt + 1].mean(1)

    def prompt_key(self, image, question: str) -> torch.Tensor:
        """The prompt route's key of (``image``, ``question``), (d,): its last prompt token's VEAD-off state
        at ``route_layer`` (route: prompt or joint; else where VEAD sits) — with ``route_scope``, in the
        scope's space (dim,)."""
        with torch.no_grad(), self._off():
            states, inputs, kwargs = self._layer_run([(image, question)])
            return self.scoped(self._route_states(states, kwargs)[0, inputs.last_prompt[0]][None])[0]

    def scope(self):
        """The learned scope ``route_scope`` names (:mod:`.scope`), loaded once per setting; None without."""
        if self.config.route_scope is None:
            return None
        name = (self.config.route_scope, self.config.route_layer)
        if self._scope is None or self._scope[0] != name:
            from .scope import load_scope

            layer = self.later_layer(self.config.route_layer, "route_layer")
            self._scope = (name, load_scope(self.config.route_scope, self.vllm, route_layer=layer).to(self.device))
        return self._scope[1]

    def scoped(self, keys: torch.Tensor) -> torch.Tensor:
        """Prompt keys (K, d) in the space the prompt route compares them in: as they are (float), or with
        ``route_scope`` mapped by the scope (K, dim)."""
        scope = self.scope()
        if scope is None:
            return keys.float()
        with torch.no_grad():
            return scope(keys.to(self.device))

    def remember_each(self, requests: Sequence[EditRequest]) -> EditMemory:
        """Memories of several edits at once (B rows, right-padded): input row b gets edit b."""
        states, inputs, kwargs = self._layer_run([(r.image, r.prompt, r.target) for r in requests])
        return EditMemory(*self._memory_rows(states, inputs), self._im_keys(states, inputs, kwargs))

    def _memory_rows(self, states: torch.Tensor, inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """What VEAD's cross-attention reads of edit samples (right-padded rows and their mask): their
        layer-l_e ``states``, or with ``memory_reads: answer`` their new answers' token embeddings."""
        if self.config.memory_reads == "answer":
            return answer_rows(self.vllm, inputs.target_ids, self.device)
        return states, inputs.tensors["attention_mask"].bool()

    def _im_keys(self, states: torch.Tensor, inputs, kwargs: dict | None = None) -> torch.Tensor:
        """What the IM compares visual tokens with: the last prompt token's state (B, d), or with
        ``im_reads: image`` the edit sample's visual tokens (B, N, d) — where VEAD sits or, with
        ``im_layer``, at that layer's output (``states`` run on with ``kwargs``)."""
        spans = set(inputs.visual_spans)
        if self.config.im_reads == "image" and (len(spans) != 1 or None in spans):
            raise ValueError("im_reads: image needs every edit sample to have an image, with the same "
                             f"visual-token span (got {sorted(map(str, spans))})")
        states = self._run_on(states, kwargs, self.im_layer)
        return self.config.im_keys(states, inputs.last_prompt, inputs.visual_spans[0])

    @contextlib.contextmanager
    def edit_each(self, requests: Sequence[EditRequest]):
        """Apply one edit per input row: inside the block, row b of every batch is edited by
        ``requests[b]`` (batches must then have ``len(requests)`` rows, each with an image)."""
        if not requests:
            raise ValueError("edit_each needs at least one EditRequest")
        if self.config.refine_steps:
            raise ValueError("edit_each applies unrefined edits; with refine_steps apply edits one request at a "
                             "time (edit / apply / apply_batch), or set refine_steps: 0")
        memory = self.remember_each(requests)  # before the hook is attached: VEAD off
        self.apply(requests[0])
        try:
            self.memory = memory
            yield self
        finally:
            self.restore()

    def _apply(self, request: EditRequest) -> None:
        self._before = (list(self.bank), self.memory)
        self._hold([self.remember(request)])

    def _apply_batch(self, requests: Sequence[EditRequest]) -> None:
        """Remember all edit samples in one partial forward pass (without ``memory`` only the last is held)."""
        self._before = (list(self.bank), self.memory)
        states, inputs, kwargs = self._layer_run([(r.image, r.prompt, r.target) for r in requests])
        rows, mask = self._memory_rows(states, inputs)
        keys = self._im_keys(states, inputs, kwargs)
        routed = self._route_states(states, kwargs)
        memories = []
        for b in range(len(requests)):
            n = int(mask[b].sum())
            span = inputs.visual_spans[b]
            memories.append(EditMemory(rows[b:b + 1, :n].clone(), mask[b:b + 1, :n].clone(),
                                       keys[b:b + 1].clone(), self._visual_key(routed[b:b + 1], span),
                                       self._question_key(routed[b:b + 1], span, inputs.last_prompt[b]),
                                       routed[b:b + 1, inputs.last_prompt[b]].clone()))
            if self.config.refine_steps:
                self.refine(memories[-1], requests[b])
        self._hold(memories)

    def _hold(self, memories: list[EditMemory]) -> None:
        """Attach the hook at the first edit; then hold ``memories`` (all of them with ``memory``, else the
        last one, replacing any held edit)."""
        if self._stack is None:
            self._stack = contextlib.ExitStack()
            try:
                # the model's inputs (where the images are) and, for route_layer only, layer l_e's keyword
                # arguments; registered before VEAD's own hook, so both are this pass's when it runs
                sites = {"model": self.vllm.model}
                if self.config.route_layer is not None:
                    sites["layer"] = self.vllm.site(f"llm.layers.{self.layer}")
                self._top = self._stack.enter_context(Trace(sites, inputs=True, outputs=False))
                scope = edit_input if self.at_input else edit_output
                self._stack.enter_context(scope(self.vllm.site(f"llm.layers.{self.layer}"), self._rewrite))
            except BaseException:
                self._stack.close()
                self._stack = None
                raise
        self.bank = self.bank + memories if self.config.memory else memories[-1:]
        self.memory = self.bank[-1]
        self._keys_cache = {}

    def _rollback(self, n_before: int) -> None:
        self.bank, self.memory = self._before  # what the failed call found
        self._keys_cache = {}

    def _undo(self) -> None:
        if self._stack is not None:
            self._stack.close()
        self._stack, self.memory, self.bank, self._keys_cache = None, None, [], {}

    def held_bytes(self) -> int:
        """Bytes of the held edit memories (VEAD changes no weight)."""
        from .memory import held_bytes

        return held_bytes(self.bank)

    def held_keys(self, kind: str) -> torch.Tensor:
        """The routing keys of the held edits, stacked once per change of the memory: ``"visual"`` (K, d)
        unit vectors, ``"im"`` (K, d) / (K, M, d) IM keys, ``"joint"`` (:class:`.memory.JointKeys`) or
        ``"prompt"`` (K, d) unit prompt keys."""
        from . import memory

        if kind not in self._keys_cache:
            build = {"visual": memory.visual_keys, "im": memory.im_keys, "joint": memory.JointKeys.of,
                     "prompt": lambda bank: memory.prompt_keys(bank, self.scoped)}[kind]
            self._keys_cache[kind] = build(self.bank)
        return self._keys_cache[kind]

    def _visual_rows(self, length: int):
        ids = self._top.kwargs.get("model", {}).get("input_ids")
        if ids is None or ids.shape[1] != length or length <= 1:
            return None  # single-token decoding step, or no ids to find the image in: stay off
        is_visual = ids == self.vllm.adapter.image_token_id
        rows = is_visual.any(1).nonzero()[:, 0]
        if len(rows) == 0:
            return None  # no image in this batch: VEAD does nothing
        cols = is_visual[rows].nonzero()[:, 1].view(len(rows), -1)
        return rows, cols

    def _rewrite(self, hidden: torch.Tensor) -> torch.Tensor:
        where = None if self._bypass else self._visual_rows(hidden.shape[1])
        if where is None:
            return hidden
        rows, cols = (t.to(hidden.device) for t in where)
        V = hidden[rows[:, None], cols].to(self.device)  # read beside VEAD, written back where hidden is
        if len(self.bank) > 1 or (self.config.route == "prompt" and self.config.route_min is not None):
            return self._rewrite_routed(hidden, rows, cols, V)  # with route_min, the prompt route scopes one edit
        m = self.memory
        states, mask, prompt = m.states, m.mask.to(self.device), m.prompt_state
        if states.shape[0] > 1:  # one edit per input row
            if states.shape[0] != hidden.shape[0] or len(rows) != hidden.shape[0]:
                raise ValueError(f"{states.shape[0]} edits are applied, one per row, but the batch has "
                                 f"{hidden.shape[0]} rows ({len(rows)} with an image)")
            r = rows.to(self.device)
            states, mask, prompt = states[r], mask[r], prompt[r]
        new, self.last_gate_logits = self.adapter(V.float(), states.float(), mask, prompt.float())
        self.last_visual = (V, new)  # the visual slice before and after VEAD (read by analysis.written_words)
        hidden = hidden.clone()
        hidden[rows[:, None], cols] = new.to(hidden.device, hidden.dtype)
        return hidden

    def _route_states(self, states: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """Where the joint route reads its image and question keys: ``states`` (B, S, d, VEAD off, where VEAD
        sits), or with ``route_layer`` those states run on to the output of that layer (a partial forward
        pass) with ``kwargs``, the keyword arguments (positions, masks) layer l_e was called with on the
        same pass."""
        if self.config.route_layer is None or self.config.route not in ("joint", "prompt"):
            return states
        return self._run_on(states, kwargs, self.later_layer(self.config.route_layer, "route_layer"))

    def _joint_keys(self, hidden: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor):
        """The joint route's keys of each image row: its visual tokens (R, N, d) and its question key (R, d) —
        the mean state from its last visual token to the end of its prompt (:meth:`VLLM.question_end`: an
        answer being scored or generated is left out) — where VEAD sits or, with ``route_layer``, at that
        layer's output. The prompt route's question key is the state at the prompt's last token instead."""
        ids = self._top.kwargs["model"]["input_ids"]
        mask = self._top.kwargs["model"].get("attention_mask")
        states = self._route_states(hidden, self._top.kwargs.get("layer", {}))
        out = []
        for r, c in zip(rows.tolist(), cols.tolist()):
            length = int(mask[r].sum()) if mask is not None else ids.shape[1]
            start = max(c) + 1
            end = self.vllm.question_end(ids[r], length, start)
            out.append(states[r, end - 1].float() if self.config.route == "prompt"
                       else states[r, start:end].float().mean(0))
        rows_, cols_ = rows.to(states.device), cols.to(states.device)
        return states[rows_[:, None], cols_].to(self.device), torch.stack(out).to(self.device)

    def _rewrite_routed(self, hidden, rows, cols, V) -> torch.Tensor:
        """Each row attends to the held edit :func:`.memory.route` picks, applied as a single edit is."""
        from .memory import route

        joint = self.config.route in ("joint", "prompt")
        chosen = route(self, *self._joint_keys(hidden, rows, cols)) if joint else route(self, V)
        new = torch.empty_like(V, dtype=torch.float32)
        s = V.new_empty(V.shape[:2], dtype=torch.float32)
        for k in chosen.unique().tolist():
            at = (chosen == k).nonzero()[:, 0]
            if k < 0:  # no held edit is near enough (route_min): these rows stay as they are
                new[at], s[at] = V[at].float(), -1e4
                continue
            m = self.bank[k]
            new[at], s[at] = self.adapter(V[at].float(), m.states.float(), m.mask.to(V.device), m.prompt_state.float())
        self.last_gate_logits, self.last_route = s, chosen
        self.last_visual = (V, new)
        hidden = hidden.clone()
        hidden[rows[:, None], cols] = new.to(hidden.device, hidden.dtype)
        return hidden

    # --- reading the influence mapper -------------------------------------------------------------------
    def record_gate(self, record) -> np.ndarray:
        """The gate on ``record``'s own edit input with its edit applied (then restored): the gate map the
        sanity checks compare (:mod:`visedit.attribution.sanity`)."""
        with self.edit(EditRequest.from_record(record)):
            return self.gate(record.image, record.src)

    def gate(self, image, question: str) -> np.ndarray:
        """The IM's gate σ(s) over the visual-token grid (rows, cols) for (image, question) under the
        applied edit (1 everywhere when the IM is ablated); LLaVA-NeXT: on its base image's grid. Without a
        grid (query tokens) it is refused in one line: use :meth:`token_gate`."""
        inputs = self._gate_inputs(image, question)
        layout = inputs.layout(0)
        layout.require_map("the gate map of VEAD's influence mapper", self.vllm.backbone)
        return layout.on_map(self._token_gate(inputs))

    def token_gate(self, image, question: str) -> np.ndarray:
        """The IM's gate σ(s), one value per visual token (n_visual,), for (image, question) under the
        applied edit — on any backbone, query tokens included."""
        return self._token_gate(self._gate_inputs(image, question))

    def _gate_inputs(self, image, question: str):
        if not self.applied:
            raise RuntimeError("gate() needs an applied edit: use `with editor.edit(request):`")
        inputs = self.vllm.inputs([(image, question)])
        if inputs.visual_spans[0] is None:
            raise ValueError("gate() needs an image: VEAD is off on text-only inputs")
        return inputs

    def _token_gate(self, inputs) -> np.ndarray:
        self.vllm.run(inputs, stop_after=f"llm.layers.{self.layer}")
        s = self.last_gate_logits[0]
        return (torch.sigmoid(s) if self.config.use_im else torch.ones_like(s)).cpu().numpy()
