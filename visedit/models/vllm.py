"""The model interface every other module uses: ``load_vllm()`` and :class:`VLLM`.

``VLLM`` wraps a transformers model + processor + backbone adapter and offers three things:
building inputs from (image, question[, target]) with the visual-token span and target positions,
named sites, and two ways to read the model (greedy answers; teacher-forced target scores).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from ..hooks import Trace, live_hooks, stop_after as _stop_after
from ..io import load_image
from .backbones import BackboneAdapter, PromptFrame, VisualLayout, adapter_for
from .devices import execution_device, is_dispatched, parameter_values

EMBEDDED_DIR = Path(__file__).parent / "embedded"
#: The embedded teaching models by name: the first (one creature per image, word-level vocabulary), the
#: second, made LLaVA's way (scenes, frozen contrastive encoder, byte-level BPE, 12 layers), and a BLIP-2
#: made the same way on the second's frozen encoder (a Q-Former of 32 queries, a Llama decoder), and the
#: second tuned to decide late (its answer follows its image tokens up to depth 7; ``train-late``).
EMBEDDED_MODELS = {"visedit-tiny": EMBEDDED_DIR, "visedit-llava": Path(__file__).parent / "embedded_llava",
                   "visedit-blip2": Path(__file__).parent / "embedded_blip2",
                   "visedit-late": Path(__file__).parent / "embedded_late"}
#: How each embedded model is rebuilt when its folder is missing.
_REBUILD = {"visedit-tiny": "python -m visedit train-tiny --out {path}",
            "visedit-llava": "python -m visedit train-tiny --recipe llava --out {path}",
            "visedit-blip2": "python -m visedit train-tiny --recipe blip2 --encoder-from "
                             "visedit/models/embedded_encoder --out {path}",
            "visedit-late": "python -m visedit train-late --model visedit-llava --out {path}"}
#: LLaVA-1.5's conversation frame. ``{image}`` becomes the processor's image token (or nothing).
DEFAULT_TEMPLATE = PromptFrame().template

ImageLike = "str | os.PathLike | Image.Image | None"


@dataclasses.dataclass(frozen=True)
class Inputs:
    """Model inputs for a batch of B items (right-padded) and where things are in each sequence.

    ``tensors``: ``input_ids`` (B, S), ``attention_mask`` (B, S) and, when any item has an image, every
    image tensor the processor makes (``pixel_values`` (B_img, 3, H, W) for LLaVA; flattened patches and
    ``image_grid_thw`` for Qwen2-VL; …) and any tensor laid out like ``input_ids``. ``visual_spans[b]``:
    (start, stop) of item b's visual tokens or None; ``last_prompt``: position T of each item's last
    prompt token (it predicts the answer's first token); ``target_positions[b]``: positions of item b's
    target tokens (empty without a target); ``target_ids[b]``: those tokens' ids; ``layouts[b]``: the
    :class:`VisualLayout` of item b's visual tokens (grid, grids or none), None without an image.
    """

    tensors: dict[str, torch.Tensor]
    visual_spans: tuple[tuple[int, int] | None, ...]
    last_prompt: tuple[int, ...]
    target_positions: tuple[tuple[int, ...], ...]
    target_ids: tuple[tuple[int, ...], ...]
    layouts: tuple[VisualLayout | None, ...] = ()
    image_keys: tuple[str, ...] = ()

    def layout(self, b: int = 0) -> VisualLayout | None:
        """Item ``b``'s visual layout (None without an image)."""
        return self.layouts[b] if b < len(self.layouts) else None

    def __len__(self) -> int:
        return len(self.last_prompt)


@dataclasses.dataclass(frozen=True)
class Run:
    """What :meth:`VLLM.run` recorded. ``logits`` (B, S, vocab) float32, or None when the pass stopped
    early; ``outputs`` / ``inputs`` / ``kwargs``: per traced site name, the main output tensor, the main
    input tensor and the keyword arguments of its last call (inputs and kwargs only with
    ``trace_inputs``)."""

    logits: torch.Tensor | None
    outputs: dict[str, torch.Tensor]
    inputs: dict[str, torch.Tensor]
    kwargs: dict[str, dict]


@dataclasses.dataclass(frozen=True)
class Score:
    """Teacher-forced reading of one target: per-token log-probs, argmaxes and accuracies."""

    target: str
    logprobs: tuple[float, ...]
    argmax_ids: tuple[int, ...]
    target_ids: tuple[int, ...]

    @property
    def logprob(self) -> float:
        return float(sum(self.logprobs))

    @property
    def token_accuracy(self) -> float:
        return sum(a == t for a, t in zip(self.argmax_ids, self.target_ids)) / len(self.target_ids)

    @property
    def exact(self) -> bool:
        return tuple(self.argmax_ids) == tuple(self.target_ids)


class VLLM:
    """A vision-language LLM behind one interface, whatever its architecture.

    Use :func:`load_vllm` to get one. ``model``, ``processor``, ``tokenizer`` and ``adapter`` are public.
    """

    def __init__(self, model, processor, *, template: "str | PromptFrame | None" = None, name: str = "",
                 info: dict | None = None):
        self.model = model.eval()
        #: What visedit knows of the model beyond its config (``visedit.json`` of a checkpoint folder):
        #: ``edition`` (1: trained on one creature per image; 2: on scenes), ``recipe``, ``image_size``.
        self.info = dict(info or {})
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.adapter: BackboneAdapter = adapter_for(model)
        #: The conversation frame (the adapter's, unless ``template`` — a template string or a whole
        #: :class:`PromptFrame` — overrides it).
        self.frame: PromptFrame = self.adapter.frame if template is None else (
            template if isinstance(template, PromptFrame) else PromptFrame(template))
        self.template = self.frame.template
        self.name = name or type(model).__name__
        for p in self.model.parameters():
            p.requires_grad_(False)

    # --- facts ----------------------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return self.adapter.n_layers

    @property
    def device(self) -> torch.device:
        """Where inputs go: the device of the embedding layer (the first device of a split model)."""
        return execution_device(self.site("llm.embed"), next(self.model.parameters()).device)

    def device_of(self, site: str) -> torch.device:
        """The device the module at ``site`` runs on (accelerate's execution device on a split model)."""
        return execution_device(self.site(site), self.device)

    @property
    def device_map(self) -> dict | None:
        """accelerate's placement of the model's modules (``hf_device_map``), or None on one device."""
        return dict(self.model.hf_device_map) if is_dispatched(self.model) and hasattr(self.model, "hf_device_map") \
            else None

    @property
    def image_token(self) -> str:
        token = self.processor.image_token
        return getattr(token, "content", token)  # BLIP-2's processor holds an AddedToken

    @property
    def d_model(self) -> int:
        """Width of the LLM's residual stream."""
        return self.adapter.d_model

    @property
    def backbone(self) -> str:
        """The backbone's name, for messages (``LLaVA``, ``BLIP-2 (OPT)``, …)."""
        return self.adapter.label or type(self.model).__name__

    @property
    def max_positions(self) -> int | None:
        """How many positions the language model reads (prompt + answer), if its config says."""
        return getattr(self.adapter.text_config, "max_position_embeddings", None)

    @property
    def fingerprint(self) -> str:
        """A short digest of the weights (64 evenly spaced values of every parameter): two models share
        it only if they are, for every practical purpose, the same weights. Resumable runs check it."""
        import hashlib

        h = hashlib.sha256()
        for name, p in parameter_values(self.model):  # offloaded weights too
            flat = p.reshape(-1)
            h.update(name.encode())
            h.update(flat[:: max(1, flat.numel() // 64)][:64].float().cpu().numpy().tobytes())
        return h.hexdigest()[:16]

    @property
    def dataset_spec(self):
        """The world's edit dataset this model is measured on: scenes (edition 2) for a model trained on
        scenes, else one creature per image."""
        return _spec_from_info(self.info)

    def site(self, name: str) -> torch.nn.Module:
        """The module behind a canonical site name, e.g. ``"llm.layers.3.attn"`` (see ``backbones``)."""
        return self.adapter.site(name)

    def __repr__(self) -> str:
        n = sum(p.numel() for p in self.model.parameters())
        return f"VLLM({self.name}, {self.n_layers} LLM layers, {n / 1e6:.1f}M parameters)"

    # --- inputs ---------------------------------------------------------------------------------------
    def format_prompt(self, question: str, *, has_image: bool) -> str:
        """Put ``question`` in the model's conversation frame; with an image, add the image token."""
        if not isinstance(question, str) or not question.strip():
            raise ValueError("the prompt is empty: pass a non-empty question, e.g. 'what colour is this creature ?'")
        if self.image_token in question:
            if question.count(self.image_token) > 1:
                raise ValueError(f"the prompt contains the image token {self.image_token!r} more than once: "
                                 "use one image per prompt, with at most one image token")
            if not has_image:
                raise ValueError(f"the prompt contains the image token {self.image_token!r} but no image was "
                                 "given: pass image=… or remove the token")
            return question
        return self.frame.prompt(question, self.image_token if has_image else None)

    @functools.cached_property
    def answer_marker(self) -> tuple[int, ...]:
        """The token ids the frame puts after the question (LLaVA's ``" ASSISTANT:"``): a prompt ends with
        them, so they find where the question ends in a sequence that goes on with an answer. Empty when the
        frame puts nothing there or the tokenizer cannot say which tokens came from which characters."""
        question = "visedit question"
        text = self.frame.prompt(question)
        end = text.index(question) + len(question)
        if not getattr(self.tokenizer, "is_fast", False) or end == len(text):
            return ()
        enc = self.tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
        return tuple(int(t) for t, (a, _) in zip(enc["input_ids"], enc["offset_mapping"]) if a >= end)

    def question_end(self, ids: torch.Tensor, length: int, start: int = 0) -> int:
        """One row of ``ids``: the position just after its prompt — the end of the last answer marker in
        ``ids[start:length]`` (so an answer that follows is left out), or ``length`` when there is none."""
        marker = self.answer_marker
        m = len(marker)
        if m == 0 or length - start < m:
            return length
        windows = ids[start:length].unfold(0, m, 1)
        hits = (windows == torch.as_tensor(marker, device=ids.device)).all(-1).nonzero()
        return start + int(hits[-1, 0]) + m if len(hits) else length

    def encode_target(self, target: str) -> list[int]:
        """Token ids of ``target`` as it follows a prompt (with a leading space); errors if unencodable."""
        if not isinstance(target, str) or not target.strip():
            raise ValueError("the target is empty: pass the answer text, e.g. 'red'")
        ids = self.tokenizer(" " + target.strip(), add_special_tokens=False)["input_ids"]
        if not ids or self.tokenizer.unk_token_id is not None and self.tokenizer.unk_token_id in ids:
            raise ValueError(f"the tokenizer cannot encode the target {target!r} (it maps to the unknown token); "
                             "choose words from the model's vocabulary (vllm.tokenizer.get_vocab())")
        return ids

    def inputs(self, items: Sequence[tuple[ImageLike, str] | tuple[ImageLike, str, str | None]], *,
               add_eos: bool = False, context: str = "") -> Inputs:
        """Build right-padded inputs for (image, question[, target]) items.

        ``image`` may be a path, a PIL image or None (text-only). Targets are appended after the prompt;
        with ``add_eos`` the end-of-sequence token is appended to each target as well. ``context`` is
        text placed before every formatted prompt (in-context editing puts demonstrations there).
        """
        if len(items) == 0:
            raise ValueError("no items given: pass at least one (image, question[, target]) tuple")
        rows, images, spans, lasts, tpos, tids, layouts, seqs = [], [], [], [], [], [], [], []
        img_id = self.adapter.image_token_id
        for item in items:
            image, question, target = (tuple(item) + (None,))[:3]
            img = load_image(image) if image is not None else None
            prompt = self.format_prompt(question, has_image=img is not None)
            if context:
                prompt = context.rstrip() + " " + prompt
            enc = self.processor(text=[prompt], images=[img] if img is not None else None, return_tensors="pt")
            ids = enc["input_ids"][0].tolist()
            if img is not None:
                images.append(self.adapter.image_tensors(enc))
            seqs.append({k: v[0] for k, v in enc.items() if self.adapter.is_sequence_tensor(k)})
            target_ids = self.encode_target(target) if target is not None else []
            if add_eos and target is not None:
                target_ids = target_ids + [self.tokenizer.eos_token_id]
            positions = [i for i, t in enumerate(ids) if t == img_id]
            spans.append((positions[0], positions[-1] + 1) if positions else None)
            layouts.append(self.adapter.visual_layout(enc, len(positions)) if positions else None)
            if positions and positions[-1] - positions[0] + 1 != len(positions):
                raise ValueError("visual tokens are not contiguous in the prompt; use one image per prompt")
            lasts.append(len(ids) - 1)
            tpos.append(tuple(range(len(ids), len(ids) + len(target_ids))))
            tids.append(tuple(target_ids))
            rows.append(ids + target_ids)
        limit = self.max_positions
        for b, r in enumerate(rows):
            if limit is not None and len(r) > limit:
                raise ValueError(f"item {b} is {len(r)} tokens (image, prompt{', context' if context else ''} and "
                                 f"target) but this model reads at most {limit} positions: shorten the question")
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, r in enumerate(rows):
            input_ids[b, : len(r)] = torch.tensor(r)
            mask[b, : len(r)] = 1
        tensors = {"input_ids": input_ids.to(self.device), "attention_mask": mask.to(self.device)}
        for key in seqs[0]:  # laid out like input_ids: padded with zeros, targets get zeros too
            t = torch.zeros((len(rows), width), dtype=seqs[0][key].dtype)
            for b, s in enumerate(seqs):
                t[b, : len(s[key])] = s[key]
            tensors[key] = t.to(self.device)
        image_tensors = self.adapter.collate_images(images)
        for key, t in image_tensors.items():
            tensors[key] = t.to(self.device, self.model.dtype) if t.is_floating_point() else t.to(self.device)
        return Inputs(tensors, tuple(spans), tuple(lasts), tuple(tpos), tuple(tids), tuple(layouts),
                      tuple(image_tensors))

    def repeat(self, inputs: Inputs, n: int) -> dict[str, torch.Tensor]:
        """The model tensors of a one-item ``inputs`` for ``n`` copies of that item (a batch for
        perturbation, integrated gradients, deletion curves). Expanded views: no copies are made."""
        if len(inputs) != 1:
            raise ValueError(f"repeat() needs inputs of one item, got {len(inputs)}")
        images = {k: inputs.tensors[k] for k in inputs.image_keys}
        out = {k: v.expand(n, *v.shape[1:]) for k, v in inputs.tensors.items() if k not in images}
        return out | self.adapter.repeat_images(images, n)

    # --- reading the model ----------------------------------------------------------------------------
    def run(self, inputs: "Inputs | dict[str, torch.Tensor]", *, trace: Sequence[str] = (), trace_inputs: bool = False,
            trace_outputs: bool = True, stop_after: str | None = None, grad: bool = False,
            cache_device: str | torch.device | None = None) -> Run:
        """One forward pass that records the named sites (TransformerLens' ``run_with_cache`` with a
        names filter) and, with ``stop_after``, ends once that site has run (``stop_at_layer``).

        ``inputs``: an :class:`Inputs` or its model tensors (e.g. from :meth:`repeat`). ``trace``:
        canonical site names (``"llm.layers.3.attn"``, ``"llm.norm"``, …). With ``grad`` the pass keeps
        the autograd graph (where gradients are enabled) and the recorded tensors are not detached.
        ``cache_device`` (e.g. ``"cpu"``): keep the recorded tensors there instead of on the devices of
        their sites (a model on GPUs, its cache in CPU memory).
        """
        tensors = inputs.tensors if isinstance(inputs, Inputs) else inputs
        sites = {name: self.site(name) for name in trace}
        logits = None
        with contextlib.ExitStack() as stack:
            tr = stack.enter_context(Trace(sites, inputs=trace_inputs, outputs=trace_outputs, detach=not grad,
                                           device=cache_device))
            if stop_after is not None:
                stack.enter_context(_stop_after(self.site(stop_after)))
            with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
                logits = self.model(**tensors, use_cache=False).logits.float()
        shape = tuple(tensors["input_ids"].shape)

        def unflatten(t):  # OPT runs its MLP on (B·S, d) rows: give every site (B, S, …)
            return t.view(*shape, -1) if t is not None and t.dim() == 2 and t.shape[0] == shape[0] * shape[1] else t

        return Run(logits, {k: unflatten(v) for k, v in tr.outputs.items()},
                   {k: unflatten(v) for k, v in tr.inputs.items()}, tr.kwargs)

    @torch.no_grad()
    def logits(self, inputs: Inputs) -> torch.Tensor:
        """Full forward pass; returns logits (B, S, vocab) in float32."""
        return self.model(**inputs.tensors, use_cache=False).logits.float()

    @torch.no_grad()
    def score(self, image: ImageLike, question: str, target: str, *, add_eos: bool = False) -> Score:
        """Teacher-forced score of ``target`` after (image, question)."""
        return self.score_batch([(image, question, target)], add_eos=add_eos)[0]

    @torch.no_grad()
    def score_batch(self, items, *, add_eos: bool = False, context: str = "",
                    share_prefix: bool = False) -> list[Score]:
        """Teacher-forced scores for many (image, question, target) items in one forward pass.

        ``share_prefix``: items that show the same image run the prompt up to the end of its visual
        tokens once, and only their questions and targets after it (through the decoder's key/value
        cache) — several times faster when many questions ask about one image, as in a model card. The
        scores agree with the plain pass to float rounding. It applies only where the backbone declares it
        (:attr:`BackboneAdapter.prefix_cache`) and no hook is on the model (an editor that reads the
        question while it edits the visual tokens would see only the image); elsewhere the plain pass runs.
        """
        if any(len(it) < 3 or it[2] is None for it in items):
            raise ValueError("score_batch needs (image, question, target) items with a target")
        inputs = self.inputs(items, add_eos=add_eos, context=context)
        shared = self._shared_prefix(inputs) if share_prefix else None
        if shared is None:
            logp, offset = self.logits(inputs).log_softmax(-1), 0
        else:
            logp, offset = shared
        out = []
        for b, item in enumerate(items):
            pos = torch.tensor(inputs.target_positions[b]) - 1 - offset
            ids = torch.tensor(inputs.target_ids[b])
            lp = logp[b, pos.to(logp.device)]
            out.append(Score(item[2], tuple(lp.gather(-1, ids[:, None].to(lp.device))[:, 0].tolist()),
                             tuple(lp.argmax(-1).tolist()), inputs.target_ids[b]))
        return out

    def _shared_prefix(self, inputs: Inputs) -> tuple[torch.Tensor, int] | None:
        """Log-probs (B, S - P + 1, vocab) from position P - 1 on, with the first P tokens (up to the end
        of the earliest-ending visual span) run once per distinct (image, prefix); None where that cannot
        be done exactly (no declared support, hooks on the model, an item without an image, a padded
        prefix, or a target inside the prefix)."""
        ids, mask = inputs.tensors["input_ids"], inputs.tensors["attention_mask"]
        B = ids.shape[0]
        if (not self.adapter.prefix_cache or live_hooks(self.model) or any(s is None for s in inputs.visual_spans)
                or any(inputs.tensors[k].shape[0] != B for k in inputs.image_keys)):
            return None
        P = min(stop for _, stop in inputs.visual_spans)
        if not bool(mask[:, :P].all()) or min(min(t, default=P + 1) for t in inputs.target_positions) < P:
            return None
        keys: dict[bytes, int] = {}
        group = []
        for b in range(B):
            key = ids[b, :P].cpu().numpy().tobytes() + b"".join(
                inputs.tensors[k][b].cpu().numpy().tobytes() for k in inputs.image_keys)
            group.append(keys.setdefault(key, len(keys)))
        rep = torch.tensor([group.index(g) for g in range(len(keys))], device=ids.device)
        seq = [k for k in inputs.tensors if self.adapter.is_sequence_tensor(k)]
        head = self.model(input_ids=ids[rep, :P], attention_mask=mask[rep, :P],
                          **{k: inputs.tensors[k][rep] for k in inputs.image_keys},
                          **{k: inputs.tensors[k][rep, :P] for k in seq}, use_cache=True, logits_to_keep=1)
        cache = head.cache
        rows = torch.tensor(group, device=ids.device)
        cache.reorder_cache(rows)  # one copy of its group's head per item
        tail = self.model(input_ids=ids[:, P:], attention_mask=mask, cache=cache,
                          **{k: inputs.tensors[k][:, P:] for k in seq}, use_cache=True).logits
        logits = torch.cat([head.logits[rows].to(tail.device), tail], 1)
        return logits.float().log_softmax(-1), P - 1

    @torch.no_grad()
    def answer(self, image: ImageLike, question: str, *, max_new_tokens: int = 8) -> str:
        """Greedy answer to ``question`` about ``image`` (None for a text-only question)."""
        return self.answer_batch([(image, question)], max_new_tokens=max_new_tokens)[0]

    @torch.no_grad()
    def answer_batch(self, items, *, max_new_tokens: int = 8, context: str = "") -> list[str]:
        """Greedy answers for many (image, question) items (no KV cache; fine for short answers). Generation
        stops early where the model's positions run out."""
        inputs = self.inputs([(it[0], it[1]) for it in items], context=context)
        if self.max_positions is not None:
            max_new_tokens = min(max_new_tokens, self.max_positions + 1 - inputs.tensors["input_ids"].shape[1])
        ids = inputs.tensors["input_ids"]
        mask = inputs.tensors["attention_mask"]
        lengths = mask.sum(1)
        extra = {k: inputs.tensors[k] for k in inputs.image_keys}
        grow = {k: v for k, v in inputs.tensors.items() if self.adapter.is_sequence_tensor(k)}
        eos = self.tokenizer.eos_token_id
        done = torch.zeros(len(items), dtype=torch.bool, device=ids.device)
        generated: list[list[int]] = [[] for _ in items]
        for _ in range(max_new_tokens):
            ids = torch.cat([ids, torch.zeros_like(ids[:, :1])], 1)
            mask = torch.cat([mask, torch.zeros_like(mask[:, :1])], 1)
            grow = {k: torch.cat([v, torch.zeros_like(v[:, :1])], 1) for k, v in grow.items()}
            logits = self.model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], **extra,
                                **{k: v[:, :-1] for k, v in grow.items()}).logits
            step = logits[torch.arange(len(items)), lengths - 1]
            step[:, self.adapter.image_token_id] = float("-inf")  # an image token would need an image
            nxt = step.argmax(-1)
            for b in range(len(items)):
                if not done[b]:
                    if nxt[b].item() == eos:
                        done[b] = True
                    else:
                        generated[b].append(int(nxt[b]))
            if bool(done.all()):
                break
            ids[torch.arange(len(items)), lengths] = nxt
            mask[torch.arange(len(items)), lengths] = 1
            lengths = lengths + 1
        return [self.tokenizer.decode(g, skip_special_tokens=True).strip() for g in generated]


def load_vllm(path_or_id: str | os.PathLike | None = None, *, dtype: torch.dtype = torch.float32,
              device: str | torch.device | None = None, device_map: str | dict | None = None,
              offload_folder: str | os.PathLike | None = None, max_memory: dict | None = None,
              local_files_only: bool = True) -> VLLM:
    """Load a vision-language LLM.

    With no argument: the embedded tiny LLaVA shipped inside the package. Otherwise a local folder
    or a hub id already in the local cache (``local_files_only=False`` lets transformers download).
    The backbone adapter is chosen by the model's architecture class.

    Where it runs: ``device`` (default the CPU) moves the whole model to one device. ``device_map``
    spreads it over several through accelerate (``pip install 'visedit[multi-gpu]'``): ``"auto"`` (fill
    the GPUs in order, then the CPU, then ``offload_folder`` on disk; ``max_memory`` caps each, e.g.
    ``{0: "20GiB", 1: "20GiB", "cpu": "60GiB"}``), ``"balanced"``, ``"sequential"``, or a dict from
    module names to devices (``{"model.vision_tower": 0, "model.language_model.layers.0": 0, …,
    "lm_head": 1}``; ``"cpu"`` / ``"disk"`` offload). Every site, technique and editor works on a split
    model; inputs go to the device of the embedding layer (:attr:`VLLM.device`).
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from transformers.utils import logging as hf_logging

    from .blip2 import register
    from .devices import check_device, check_device_map

    register()  # BLIP-2 with CLIP's pre-LayerNorm (the recipe's BLIP-2) loads like any architecture

    if device is not None and device_map is not None:
        raise ValueError("pass device (one device for the whole model) or device_map (spread over devices), "
                         "not both")
    if device_map is None and (offload_folder is not None or max_memory is not None):
        raise ValueError("offload_folder and max_memory only apply with device_map=…: add device_map='auto'")
    placement = {"device_map": check_device_map(device_map, offload_folder=offload_folder)} if device_map is not None \
        else {}
    if offload_folder is not None:
        placement["offload_folder"] = str(offload_folder)
    if max_memory is not None:
        placement["max_memory"] = max_memory
    device = check_device("cpu" if device is None else device)
    hf_logging.disable_progress_bar()
    if path_or_id is None or (isinstance(path_or_id, str) and path_or_id in EMBEDDED_MODELS):
        name = path_or_id or "visedit-tiny"
        path = EMBEDDED_MODELS[name]
        if not (path / "model.safetensors").exists():
            raise FileNotFoundError(f"the embedded model {name} is missing from {path}; reinstall visedit or "
                                    f"rebuild it with `{_REBUILD[name].format(path=path)}`")
    else:
        path = Path(path_or_id)
        name = str(path_or_id)
        text = str(path_or_id)
        looks_like_hub_id = text.count("/") == 1 and not text.startswith((".", "/", "~"))
        if not path.exists() and not looks_like_hub_id:
            raise FileNotFoundError(f"no checkpoint folder at {text}: pass a folder holding config.json "
                                    "and weights, a hub id such as 'llava-hf/llava-1.5-7b-hf', or an embedded "
                                    f"model's name ({', '.join(EMBEDDED_MODELS)})")
    source = str(path) if path.exists() else str(path_or_id)
    try:
        try:
            processor = AutoProcessor.from_pretrained(source, local_files_only=local_files_only)
        except ImportError:
            processor = _processor_without_video(source, local_files_only)
            if processor is None:
                raise
        if isinstance(placement.get("device_map"), dict):  # checked on an empty skeleton before any weight loads
            _check_map(source, placement["device_map"], local_files_only)
        model = AutoModelForImageTextToText.from_pretrained(source, dtype=dtype, local_files_only=local_files_only,
                                                            **placement)
    except ImportError as err:
        package = _missing_package(err)
        raise ValueError(f"{source!r} needs the optional package {package}, which is not installed (or does not "
                         f"import): `pip install {package}` (its build must match torch {torch.__version__}), or "
                         "load a checkpoint whose processor does not need it") from None
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if placement and not isinstance(err, OSError) and (Path(source) / "config.json").exists():
            if str(err).startswith("device_map "):  # ours, from the skeleton check
                raise ValueError(str(err)) from None
            raise ValueError(f"cannot place {source!r} with device_map={device_map!r}: {first}") from None
        if not isinstance(err, (OSError, ValueError)):
            raise
        raise FileNotFoundError(f"cannot load a checkpoint from {source!r}: {first} — pass a "
                                "local folder with config.json, weights and processor files (or a hub id that "
                                "is already downloaded; this machine cannot download)") from err
    info = info_of(path)
    if path == EMBEDDED_DIR:
        info = {"edition": 1, "recipe": "first", **info}
    frame = PromptFrame(**info["frame"]) if "frame" in info else None  # the frame the model was trained in
    vllm = VLLM(model if placement else model.to(device), processor, name=name, info=info, template=frame)
    return vllm


def _spec_from_info(info: dict):
    from ..world.dataset import SCENE_SPEC, DatasetSpec

    if info.get("edition", 1) == 2:
        return dataclasses.replace(SCENE_SPEC, image_size=info.get("image_size", SCENE_SPEC.image_size))
    return DatasetSpec()


def info_of(path_or_id: str | os.PathLike | None = None) -> dict:
    """What visedit knows of a model beyond its config, without loading it: its folder's ``visedit.json``
    (an embedded model's name or a folder; ``{}`` for a folder without one, such as a real checkpoint)."""
    if path_or_id is None or (isinstance(path_or_id, str) and path_or_id in EMBEDDED_MODELS):
        path = EMBEDDED_MODELS[path_or_id or "visedit-tiny"]
    else:
        path = Path(path_or_id)
    info_file = path / "visedit.json"
    return json.loads(info_file.read_text()) if info_file.exists() else {}


def dataset_spec_of(path_or_id: str | os.PathLike | None = None):
    """:attr:`VLLM.dataset_spec` of a model without loading it (from its folder's ``visedit.json``): the
    world's edit dataset it is measured on. A folder without one (a real checkpoint) gets the first
    edition's."""
    return _spec_from_info(info_of(path_or_id))


def _check_map(source: str, device_map: dict, local_files_only: bool) -> None:
    """Refuse a device-map dict that does not fit the checkpoint's modules (see ``devices.check_map_modules``)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForImageTextToText

    from .devices import check_map_modules

    config = AutoConfig.from_pretrained(source, local_files_only=local_files_only)
    with init_empty_weights():
        skeleton = AutoModelForImageTextToText.from_config(config)
    check_map_modules(skeleton, device_map)


#: Architectures whose processor is rebuilt from tokenizer + image processor when its video part cannot load.
_IMAGE_ONLY_PROCESSORS = ("qwen2_vl", "qwen2_5_vl", "llava_onevision")


def _processor_without_video(source: str, local_files_only: bool):
    """For a Qwen2-VL or LLaVA-OneVision checkpoint whose processor needs torchvision (only for video): the
    image-only :class:`~visedit.models.processing.ImageTextProcessor`. None for other checkpoints."""
    from transformers import AutoConfig

    from .processing import ImageTextProcessor

    try:
        config = AutoConfig.from_pretrained(source, local_files_only=local_files_only)
    except (OSError, ValueError):
        return None
    if config.model_type not in _IMAGE_ONLY_PROCESSORS:
        return None
    plain = ImageTextProcessor.from_pretrained(source, local_files_only=local_files_only)
    if config.model_type == "llava_onevision":
        return ImageTextProcessor.for_onevision(plain.tokenizer, plain.image_processor, config)
    return plain


def _missing_package(err: ImportError) -> str:
    """The pip name of the package an ImportError from transformers asks for (``torchvision``, …)."""
    import re

    text = str(err)
    match = re.search(r"requires the (\S+) librar", text, flags=re.I)
    if match:
        return match.group(1).lower()
    match = re.search(r"pip install (\S+)", text)
    if match:
        return match.group(1).strip("`'\".,")
    return (err.name or "the missing package").split(".")[0]
