"""Does the influence mapper look where the answer comes from? Its gate against the object mask and
against the noise-perturbation map of the layers after l_e. And where the prompt route's keys put each
probe of an edit (:func:`route_cosines`)."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from ..base import EditRequest


@dataclasses.dataclass(frozen=True)
class GateAgreement:
    """Per record: the gate's pointing game and lift against the object mask, the same for the noise
    map, their Spearman correlation, and the mean gate on the edit image vs on an unrelated image."""

    rows: tuple[dict, ...]

    def means(self) -> dict[str, float]:
        keys = [k for k in self.rows[0] if k != "index"]
        return {k: round(float(np.mean([r[k] for r in self.rows])), 4) for k in keys}

    def to_dict(self) -> dict:
        return {"n": len(self.rows), "means": self.means(), "rows": list(self.rows)}

    def table(self):
        import pandas as pd

        return pd.Series(self.means(), name=f"mean over {len(self.rows)} edits").to_frame()


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    if ra.std() == 0 or rb.std() == 0:
        return 0.0
    return float(np.corrcoef(ra, rb)[0, 1])


def gate_agreement(editor, records: Sequence, *, radius: int = 0, n: int = 4) -> GateAgreement:
    """Score the IM gate of ``editor`` (a :class:`VEADEditor`) on each record's own edit."""
    from ...attribution import noise_perturbation, score_heatmap

    vllm = editor.vllm
    layers = list(range(editor.first_layer_after, vllm.n_layers)) or [editor.layer]
    rows = []
    for i, rec in enumerate(records):
        with editor.edit(EditRequest.from_record(rec)):
            gate = editor.gate(rec.image, rec.src)
            other = editor.gate(rec.m_loc, rec.m_loc_q)
        noise = noise_perturbation(vllm, rec.image, rec.src, layers=layers, radius=radius, n=n).array().mean(0)
        noise = noise.reshape(gate.shape)
        mask = rec.mask("image")
        g, z = score_heatmap(gate, mask), score_heatmap(noise, mask)
        rows.append({"index": i, "gate_pointing": g.pointing_game, "gate_lift": round(g.lift, 4),
                     "noise_pointing": z.pointing_game, "noise_lift": round(z.lift, 4),
                     "gate_noise_spearman": round(_spearman(gate.ravel(), noise.ravel()), 4),
                     "gate_mean_edit_image": round(float(gate.mean()), 4),
                     "gate_mean_unrelated_image": round(float(other.mean()), 4)})
    return GateAgreement(tuple(rows))


@dataclasses.dataclass(frozen=True)
class Reachability:
    """Per layer: the edit loss (target cross-entropy) reached by the best unconstrained change of the
    visual slice at that layer's output, per record, and the mean per-token norm of that change."""

    layers: tuple[int, ...]
    loss: tuple[tuple[float, ...], ...]
    norm: tuple[tuple[float, ...], ...]

    def reached(self, threshold: float = 0.5) -> dict[int, float]:
        """Share of records whose new answer is reached (loss below ``threshold``) at each layer."""
        return {l: float(np.mean(np.asarray(v) < threshold)) for l, v in zip(self.layers, self.loss)}

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "reached": self.reached()}


def reachability(vllm, records: Sequence, *, layers: Sequence[int], steps: int = 60, lr: float = 0.05,
                 progress: bool = False) -> Reachability:
    """An upper bound for any visual-slice editor: for each record's edit (image + src → alt) and each
    layer, optimise a free additive change of the visual tokens at the layer's output (Adam, ``steps``)
    and report the target loss it reaches. A reached answer proves that the layer's visual tokens can carry
    the edit; a miss may be the optimiser's (with more ``steps`` or a larger ``lr`` it may reach more — on
    the second teaching model's layer 7, 60 steps at lr 0.05 reached 7 of 16 new answers, 200 at lr 0.2
    all 8 tried), so compare layers at one setting and read a miss as "not within this budget"."""
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    from ...models.backbones import unembed

    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1 or not lr > 0:
        raise ValueError(f"steps must be an int >= 1 and lr > 0, got {steps!r} and {lr!r}")

    out_loss, out_norm = [], []
    for layer in layers:
        layer = vllm.adapter.check_layer(layer)
        block, after = f"llm.layers.{layer}", f"llm.layers.{min(layer + 1, vllm.n_layers - 1)}"
        losses, norms = [], []
        for rec in tqdm(records, desc=f"reachability, layer {layer}", disable=not progress):
            inputs = vllm.inputs([(rec.image, rec.src, rec.alt)])
            run = vllm.run(inputs, trace=[block, after], trace_inputs=True)
            h = run.outputs[block]
            start, stop = inputs.visual_spans[0]
            delta = torch.zeros_like(h[:, start:stop], requires_grad=True)
            opt = torch.optim.Adam([delta], lr=lr)
            pos = torch.tensor(inputs.target_positions[0]) - 1
            target = torch.tensor(inputs.target_ids[0], device=h.device)
            with torch.enable_grad():
                for _ in range(steps):
                    edited = torch.cat([h[:, :start], h[:, start:stop] + delta, h[:, stop:]], 1)
                    if layer + 1 < vllm.n_layers:
                        edited = vllm.adapter.run_from(layer + 1, edited, run.kwargs[after])
                    loss = F.cross_entropy(unembed(vllm.adapter, edited[0, pos]).float(), target)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
            losses.append(round(float(loss.detach()), 4))
            norms.append(round(float(delta.detach().norm(dim=-1).mean()), 3))
        out_loss.append(tuple(losses))
        out_norm.append(tuple(norms))
    return Reachability(tuple(vllm.adapter.check_layer(l) for l in layers), tuple(out_loss), tuple(out_norm))


@dataclasses.dataclass(frozen=True)
class NoteReading:
    """Does the model read what is written into its visual tokens? Shares of edits whose new answer
    comes out when the edit's question and new answer are written, as word embeddings, over visual
    tokens ``start``… at the projector's output — on the edit itself, the rephrased question, a new
    rendering — and the share of another creature's answers that the same note leaves unchanged."""

    n: int
    start: int
    reliability: float
    t_generality: float
    m_generality: float
    m_locality: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def note_reading(vllm, records: Sequence, *, start: int = 0) -> NoteReading:
    """What an editor that writes the new fact into the visual tokens could reach with no learning at
    all: the ceiling of the "text in the image" route that VEAD has to discover (see
    ``visedit.models.train``, stage 3, for how the embedded model learned to read such notes)."""
    from functools import partial

    import torch

    from ...hooks import edit_output
    from ...models.train import write_notes

    embed = vllm.model.get_input_embeddings()
    projector = vllm.site("projector")
    hits = np.zeros(4)
    for rec in records:
        items = [(rec.image, rec.src), (rec.image, rec.rephrase), (rec.image_rephrase, rec.src),
                 (rec.m_loc, rec.m_loc_q)]
        ids = vllm.tokenizer(f"{rec.src} {rec.alt}", add_special_tokens=False)["input_ids"]
        note = torch.tensor(ids, device=vllm.device)
        span = vllm.inputs([items[0]]).visual_spans[0]
        n_visual = span[1] - span[0]
        if start + len(ids) > n_visual:
            raise ValueError(f"a note of {len(ids)} tokens does not fit at visual token {start} of {n_visual}")
        before = vllm.answer_batch(items[3:])[0]
        with torch.no_grad(), edit_output(projector, partial(write_notes, embed, {k: (start, note) for k in range(4)})):
            answers = vllm.answer_batch(items)
        answers = [" ".join(a.split()).lower() for a in answers]
        target = " ".join(rec.alt.split()).lower()
        hits += [answers[0] == target, answers[1] == target, answers[2] == target,
                 answers[3] == " ".join(before.split()).lower()]
    rates = [round(float(h / max(1, len(records))), 4) for h in hits]
    return NoteReading(len(records), start, *rates)


@dataclasses.dataclass(frozen=True)
class WrittenWords:
    """What VEAD wrote into each visual token of one input, read as words: for visual token j (row-major
    over ``grid``), the vocabulary word whose input embedding is closest in direction (cosine) to VEAD's
    change Δ_j, that cosine, and the change's size relative to the token (‖Δ_j‖ / ‖V_j‖). Meaningful where
    VEAD writes into the stream that word embeddings live in — the input of layer 0."""

    grid: tuple[int, int] | None
    words: tuple[str, ...]
    cosine: tuple[float, ...]
    change: tuple[float, ...]

    def top(self, k: int = 5, *, share: float = 0.25) -> list[tuple[str, int]]:
        """The ``k`` commonest words among the ``share`` of tokens that VEAD changed most."""
        from collections import Counter

        n = max(1, round(len(self.words) * share))
        order = np.argsort(self.change)[::-1][:n]
        return Counter(self.words[i] for i in order).most_common(k)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def written_words(editor, image, question: str) -> WrittenWords:
    """Read VEAD's change to the visual tokens of (``image``, ``question``) under the applied edit as words."""
    import torch
    import torch.nn.functional as F

    if not editor.applied:
        raise RuntimeError("written_words() needs an applied edit: use `with editor.edit(request):`")
    vllm = editor.vllm
    inputs = vllm.inputs([(image, question)])
    if inputs.visual_spans[0] is None:
        raise ValueError("written_words() needs an image: VEAD is off on text-only inputs")
    start, stop = inputs.visual_spans[0]
    vllm.run(inputs, stop_after=f"llm.layers.{editor.layer}")
    before, after = (t[0].float() for t in editor.last_visual)
    delta = after - before
    change = delta.norm(dim=-1) / before.norm(dim=-1).clamp_min(1e-9)
    embed = vllm.model.get_input_embeddings().weight.detach().float()
    best = (F.normalize(delta, dim=-1) @ F.normalize(embed, dim=-1).T).max(-1)
    words = tuple(vllm.tokenizer.decode([int(i)]).strip() for i in best.indices)
    return WrittenWords(inputs.layout(0).grid, words,
                        tuple(round(float(c), 4) for c in best.values), tuple(round(float(c), 4) for c in change))


#: the probes of a record, as (image, question) from the record: the edit's and the five the route must sort
ROUTE_PROBES = {
    "reliability": lambda r: (r.image, r.src),
    "t_generality": lambda r: (r.image, r.rephrase),
    "m_generality": lambda r: (r.image_rephrase, r.src),
    "m_locality": lambda r: (r.m_loc, r.m_loc_q),
    "i_locality": lambda r: (r.image, r.extra["i_loc_q"]),
    "la_locality": lambda r: (r.extra["la_loc"], r.m_loc_q),
}


@dataclasses.dataclass(frozen=True)
class RouteCosines:
    """Per record, the cosine of each probe's prompt key with the edit prompt's (see :func:`route_cosines`);
    ``route_min``: the threshold the editor applies (None: none)."""

    rows: tuple[dict, ...]
    route_min: float | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def table(self):
        """Per probe: the mean cosine, its 10 % and 90 % quantiles, and the share of records at or above
        ``route_min`` (where the edit is applied)."""
        import pandas as pd

        out = {}
        for probe in [k for k in self.rows[0] if k != "index"]:
            c = np.array([r[probe] for r in self.rows])
            out[probe] = {"mean": c.mean(), "10 %": np.quantile(c, 0.1), "90 %": np.quantile(c, 0.9)}
            if self.route_min is not None:
                out[probe]["edited share"] = float((c >= self.route_min).mean())
        return pd.DataFrame(out).T


def require_region_probes(records: Sequence, verb: str) -> None:
    """Refuse, in one line, records without the in-image and look-alike probes (the world's first edition);
    ``verb``: what the message tells the user to do with second-edition records."""
    missing = [i for i, r in enumerate(records) if "i_loc_q" not in r.extra or "la_loc" not in r.extra]
    if missing:
        raise ValueError(f"records {missing[:5]} have no in-image or look-alike probe: {verb} records of the "
                         "world's second edition (load_world_split with the model's dataset_spec)")


def route_cosines(editor, records: Sequence) -> RouteCosines:
    """For each record (the world's second edition: it has the in-image and look-alike probes), the cosine
    between the prompt key (:meth:`VEADEditor.prompt_key`) of each probe and of the edit's own input: the
    quantity the prompt route compares with ``route_min``. The generality probes should lie above it, the
    locality probes below."""
    import torch.nn.functional as F

    if editor.config.route not in ("prompt", "joint"):
        raise ValueError(f"route_cosines() reads the prompt route's keys; this VEAD has route: "
                         f"{editor.config.route!r} — load it with route='prompt' (and route_layer)")
    require_region_probes(records, "use")
    rows = []
    for i, r in enumerate(records):
        keys = {k: editor.prompt_key(*probe(r)) for k, probe in ROUTE_PROBES.items()}
        own = keys.pop("reliability")
        rows.append({"index": i, **{k: round(float(F.cosine_similarity(own, v, dim=0)), 4) for k, v in keys.items()}})
    return RouteCosines(tuple(rows), editor.config.route_min)
