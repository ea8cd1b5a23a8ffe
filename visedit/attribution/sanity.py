"""Sanity checks for every map the book uses: does the map depend on the model at all?

Adebayo et al. ("Sanity checks for saliency maps", NeurIPS 2018) found popular saliency maps that look
the same on a model whose weights are random: such a map shows the input, not what the model does with
it. Three checks, for allocation, attention, noise perturbation, restoration tracing, integrated
gradients on pixels and on layer states, and VEAD's influence-mapper gate:

1. **Cascading model randomisation.** On a deep copy of the model, re-initialise the blocks one by one
   from the top (:meth:`~visedit.models.backbones.BackboneAdapter.cascade`: decoder layers L−1…0, the
   projector, the vision blocks), recompute the map after each step and measure its Spearman rank
   correlation with the original map, on |map| and signed. Re-initialisation is seeded: weights
   N(0, σ²) with σ the part's ``initializer_range``, biases 0, norm scales 1.
2. **Data randomisation.** The same model trained on shuffled answers. Not run: training the first
   model took 68 minutes on two threads (its ``training.json``), a copy would need as long to memorise
   shuffled answers, and one trained for a few minutes is an undertrained model, not the test; the
   result says so in one line.
3. **Completeness**, where the method claims it: the allocation and direct logit attribution sum to
   what they split (max |error| in logits) and integrated gradients' relative delta.

Verdict rules (per method; a test not run decides nothing):

* model randomisation **fails** when the mean rank correlation of |map| with the original stays
  ≥ ``threshold`` (0.5) in absolute value (a map turned upside down still shows the same structure)
  once the weights the map is meant to explain are random: the whole decoder for the maps of the LLM;
  for VEAD's gate, which is computed at l_e and reads no layer above it, the whole cascade (not with
  ``vision=False``) and, separately, its own influence mapper (re-initialised on the trained model);
* completeness **fails** when the allocation's or DLA's max error exceeds 1e-3 logits, or integrated
  gradients' max relative delta exceeds ``tolerance`` (0.05);
* a method **passes** when no test it ran fails.

Every randomisation works on a copy; the model passed in is never changed (the tests compare every
tensor of its state dict with ``torch.equal``).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..models import VLLM
from ..models.backbones import adapter_for
from ..stats import rank_correlation

#: Every map the book uses, in the order of the table.
METHODS = ("allocation", "attention", "noise", "restoration", "ig_pixels", "ig_layer", "gate")
#: |map| rank correlation with the fully randomised decoder at or above which a method fails.
THRESHOLD = 0.5
#: Max |error| (logits) for the exact decompositions.
EXACT_TOLERANCE = 1e-3


@dataclasses.dataclass(frozen=True)
class SanityChecks:
    """Sanity checks of the maps of one model on ``n_records`` records (see the module docstring).

    ``steps``: the cascade, one block name per step (the first ``decoder_steps`` randomise the decoder);
    ``correlation[m]`` / ``correlation_signed[m]``: per step, the mean over records of the Spearman
    correlation of |map| / map with method m's original map (``correlation_sd[m]``: the standard
    deviation of the |map| correlation over records); ``verdict_step[m]``: the step whose |map|
    correlation decides the verdict; ``gate_im_random``: the gate's |map| correlation when only its
    influence mapper is re-initialised (None without a gate); ``completeness``: the max error of the
    exact decompositions (``allocation``, ``dla``) and the max relative delta of IG; ``verdicts[m]``:
    test → "passes" / "fails" / "not run" / "n/a" (the method makes no such claim), and ``overall``;
    ``skipped[m]``: why method m was not run; ``example[m]``: the first record's map (N_v values)
    originally and after each step.
    """

    model: str
    layer: int
    n_records: int
    methods: tuple[str, ...]
    steps: tuple[str, ...]
    decoder_steps: int
    correlation: dict[str, tuple[float, ...]]
    correlation_signed: dict[str, tuple[float, ...]]
    correlation_sd: dict[str, tuple[float, ...]]
    completeness: dict[str, float]
    data_randomisation: str
    skipped: dict[str, str]
    verdicts: dict[str, dict[str, str]]
    grid: tuple[int, int] | None
    example: dict[str, tuple[tuple[float, ...], ...]]
    verdict_step: dict[str, int] = dataclasses.field(default_factory=dict)
    gate_im_random: float | None = None
    threshold: float = THRESHOLD
    tolerance: float = 0.05
    seed: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        """The result as plain data; NaN correlations (where a map is constant) become None."""
        return _no_nan(dataclasses.asdict(self))

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)

    @classmethod
    def from_dict(cls, d: dict) -> "SanityChecks":
        """The inverse of :meth:`to_dict` (and of ``json.loads(to_json())``); keys that are not fields (the
        CLI's ``command`` and ``model_fingerprint``) are left out."""
        nan = lambda v: float("nan") if v is None else v  # noqa: E731
        d = {f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d}
        for key in ("correlation", "correlation_signed", "correlation_sd"):
            d[key] = {m: tuple(nan(v) for v in vals) for m, vals in d[key].items()}
        d["example"] = {m: tuple(tuple(row) for row in rows) for m, rows in d["example"].items()}
        d["grid"] = tuple(d["grid"]) if d["grid"] is not None else None
        return cls(**{**d, "methods": tuple(d["methods"]), "steps": tuple(d["steps"])})

    def decoder_correlation(self, method: str, *, signed: bool = False) -> float:
        """Mean rank correlation of ``method``'s map with the original once the whole decoder is random."""
        return (self.correlation_signed if signed else self.correlation)[method][self.decoder_steps - 1]

    def verdict_correlation(self, method: str) -> float:
        """The cascade's |map| correlation the model-randomisation verdict is read from (see the module
        docstring; NaN where the cascade decides nothing)."""
        if method not in self.verdict_step:
            return float("nan")
        return self.correlation[method][self.verdict_step[method]]

    def table(self):
        """Methods × tests as a pandas DataFrame: the |map| and signed correlations with the randomised
        decoder and with the whole cascade, completeness, data randomisation, and the verdict."""
        import pandas as pd

        rows = {}
        for m in self.methods:
            ran = m in self.correlation
            rows[m] = {"|map| ρ, decoder random": self.decoder_correlation(m) if ran else np.nan,
                       "signed ρ, decoder random": self.decoder_correlation(m, signed=True) if ran else np.nan,
                       "|map| ρ, all random": self.correlation[m][-1] if ran else np.nan,
                       "completeness": self.completeness.get(m, np.nan),
                       "data randomisation": self.verdicts[m]["data_randomisation"],
                       "verdict": self.verdicts[m]["overall"]}
            if self.gate_im_random is not None:
                rows[m]["|map| ρ, IM random"] = self.gate_im_random if m == "gate" else np.nan
        if "dla" in self.completeness:
            rows["dla"] = {"completeness": self.completeness["dla"], "data randomisation": "not run",
                           "verdict": self.verdicts["dla"]["overall"]}
        return pd.DataFrame(rows).T.infer_objects()

    def plot(self, *, steps: Sequence[int] | None = None):
        """The first record's maps as the cascade goes on: a row per method, a column per step (|map|,
        each panel scaled to its own maximum). ``steps``: indices into :attr:`steps` (default: all)."""
        from ..viz.figures import cascade_maps

        cols = list(range(len(self.steps))) if steps is None else list(steps)
        methods = [m for m in self.methods if m in self.example]
        maps = [[self.example[m][0]] + [self.example[m][k + 1] for k in cols] for m in methods]
        titles = ["original"] + [_short(self.steps[k]) for k in cols]
        return cascade_maps(maps, methods, titles, grid=self.grid)

    def plot_table(self):
        """Methods × tests as a coloured table (green passes, red fails, grey not run)."""
        from ..viz.figures import verdict_table

        t = self.table()
        tests = ["model_randomisation", "completeness", "data_randomisation"]
        verdicts = [[self.verdicts[m][k] for k in tests] for m in t.index]
        values = [[self.verdict_correlation(m) if m in self.correlation else None, t.loc[m, "completeness"], None]
                  for m in t.index]
        return verdict_table(list(t.index), ["model randomisation (|map| ρ)", "completeness", "data randomisation"],
                             verdicts, values, title=f"Sanity checks ({self.n_records} records, layer {self.layer})")


def _no_nan(x):
    if isinstance(x, float) and x != x:
        return None
    if isinstance(x, dict):
        return {k: _no_nan(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_no_nan(v) for v in x]
    return x


def _short(step: str) -> str:
    return step.replace("llm.layers.", "L").replace("vision.layers.", "V")


# ---------------------------------------------------------------------------------------------- the copy
def model_copy(vllm: VLLM) -> VLLM:
    """A :class:`VLLM` on a deep copy of ``vllm``'s weights (processor and settings shared)."""
    clone = copy.copy(vllm)
    clone.model = copy.deepcopy(vllm.model)
    clone.adapter = adapter_for(clone.model)
    return clone


@torch.no_grad()
def randomise(module: torch.nn.Module, std: float, generator: torch.Generator) -> None:
    """Re-initialise ``module`` in place from ``generator``: weights N(0, std²), biases 0, norm scales 1
    (a norm is a module with an ``eps`` or ``variance_epsilon``)."""
    for sub in module.modules():
        norm = hasattr(sub, "eps") or hasattr(sub, "variance_epsilon")
        for name, p in sub.named_parameters(recurse=False):
            if name == "bias":
                p.zero_()
            elif norm and p.dim() == 1:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float32).to(p) * std)


# ---------------------------------------------------------------------------------------------- the maps
@dataclasses.dataclass(frozen=True)
class _Settings:
    layer: int
    ig_steps: int
    noise_n: int
    seed: int


def _maps(vllm: VLLM, rec, target: str, methods: Sequence[str], s: _Settings, editor=None) -> dict[str, np.ndarray]:
    """Each method's map (N_v,) for one record, with the answer fixed to ``target``."""
    from .allocation import attention_map, token_allocation
    from .gradients import integrated_gradients
    from .tracing import noise_perturbation, restoration_tracing

    img, q, l = rec.image, rec.src, s.layer
    ig = dict(target=target, n_steps=s.ig_steps, tolerance=None)
    make = {
        "allocation": lambda: token_allocation(vllm, img, q, layer=l, target=target).visual,
        "attention": lambda: attention_map(vllm, img, q, layer=l),
        "noise": lambda: noise_perturbation(vllm, img, q, layers=[l], radius=1, n=s.noise_n, seed=s.seed).array()[0],
        "restoration": lambda: restoration_tracing(vllm, img, q, layers=[l], radius=1, n=3, seed=s.seed,
                                                   target=target).effect()[0],
        "ig_pixels": lambda: integrated_gradients(vllm, img, q, **ig).visual,
        "ig_layer": lambda: integrated_gradients(vllm, img, q, layer=l, **ig).visual,
        "gate": lambda: _gate(editor, rec),
    }
    return {m: np.asarray(make[m](), dtype=float).ravel() for m in methods}


def _gate(editor, rec) -> np.ndarray:
    return editor.record_gate(rec)  # the editor owns its edit requests (editing sits above attribution)


def _editor_on(editor, vllm: VLLM):
    """The same trained VEAD (its own copy) on another model's weights."""
    return type(editor)(vllm, editor.config, adapter=copy.deepcopy(editor.adapter))


def _prediction(vllm: VLLM, rec) -> str:
    inputs = vllm.inputs([(rec.image, rec.src)])
    return vllm.tokenizer.decode([int(vllm.logits(inputs)[0, inputs.last_prompt[0]].argmax())]).strip()


def data_randomisation_reason(vllm: VLLM) -> str:
    """Why the data-randomisation test is not run for this model, in one line (with its training time)."""
    from ..models.vllm import EMBEDDED_MODELS

    def record(name) -> tuple[dict, str]:
        info = json.loads((Path(EMBEDDED_MODELS.get(name, name)) / "training.json").read_text())
        threads = f" on {info['threads']} threads" if info.get("threads") else ""
        return info, f"{info['wall_seconds'] / 60:.0f} min{threads}"

    try:
        info, took = record(vllm.name)
        if info.get("source"):  # a tuned copy: a shuffled-answer copy needs its source's training and the tuning
            took = (f"this model took {record(info['source'])[1]} to train (as {info['source']}) and {took} to "
                    "tune (their training.json)")
        else:
            took = f"training this model took {took} (its training.json)"
    except (OSError, ValueError, KeyError, TypeError):
        took = "this model has no training record (training.json) to time a retraining by"
    return (f"not run: {took}; a copy trained on shuffled answers needs as long to memorise them, and one "
            "trained for minutes would be an undertrained model, not the test")


# ---------------------------------------------------------------------------------------------- the verb
def sanity_checks(vllm: VLLM, records: Sequence, *, methods: Sequence[str] | None = None, layer: int | None = None,
                  editor=None, tolerance: float = 0.05, threshold: float = THRESHOLD, ig_steps: int = 32,
                  noise_n: int = 10, vision: bool = True, seed: int = 0, progress: bool = True) -> SanityChecks:
    """Run the sanity checks of the module docstring on ``records`` (MMEdit records: ``image``, ``src``,
    ``alt``).

    ``methods``: a subset of :data:`METHODS` (default: all); ``layer``: the LLM layer of the layer
    methods (default L // 2); ``editor``: a trained :class:`~visedit.editing.vead.VEADEditor` for the
    gate (without one the gate is skipped); ``ig_steps``: fixed integration steps of IG's maps along the
    cascade (completeness uses ``tolerance``); ``vision``: go on past the decoder (projector, vision
    blocks); ``seed``: the re-initialisation and the noise.
    """
    methods = list(METHODS if methods is None else methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"unknown method(s) {unknown}: choose from {', '.join(METHODS)}" if unknown
                         else f"no methods given: choose from {', '.join(METHODS)}")
    if len(records) == 0:
        raise ValueError("no records given: pass a non-empty list of MMEdit records")
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    if not tolerance > 0:
        raise ValueError(f"tolerance must be > 0 (a relative delta, e.g. 0.05), got {tolerance}")
    layer = vllm.adapter.check_layer(vllm.n_layers // 2 if layer is None else layer)
    skipped = {}
    if "gate" in methods and editor is None:
        skipped["gate"] = "no trained VEAD given (editor=…; CLI: --vead)"
    elif "gate" in methods and not editor.config.use_im:
        skipped["gate"] = "this VEAD has no influence mapper (use_im: false): its gate is 1 everywhere"
    run = [m for m in methods if m not in skipped]
    settings = _Settings(layer=layer, ig_steps=ig_steps, noise_n=noise_n, seed=seed)
    t0 = time.perf_counter()

    # the original maps and completeness, on the model in use (read only); then the cascade, on a copy
    targets = [_prediction(vllm, r) for r in records]
    original = [_maps(vllm, r, t, run, settings, editor) for r, t in zip(records, targets)]
    completeness = _completeness(vllm, records, targets, methods, layer, tolerance)
    generator = torch.Generator().manual_seed(seed)
    cascade, corr, corr_signed, corr_sd, example = _cascade(vllm, records, targets, original, run, settings, editor,
                                                   generator, vision=vision, progress=progress)
    decoder_steps = vllm.n_layers

    # the gate reads no layer above l_e: its verdict waits for the whole cascade, and for its own IM at random
    verdict_step = {m: len(cascade) - 1 if m == "gate" else decoder_steps - 1 for m in run
                    if m != "gate" or vision}
    im_random = _gate_im_random(editor, records, original, generator) if "gate" in run else None
    verdicts = _verdicts(methods, skipped, {m: corr[m][k] for m, k in verdict_step.items()}, im_random,
                         completeness, threshold, tolerance)
    grid = vllm.inputs([(records[0].image, records[0].src)]).layout(0).grid
    return SanityChecks(model=vllm.name, layer=layer, n_records=len(records), methods=tuple(methods),
                        steps=tuple(cascade), decoder_steps=decoder_steps,
                        correlation={m: tuple(v) for m, v in corr.items()},
                        correlation_signed={m: tuple(v) for m, v in corr_signed.items()},
                        correlation_sd={m: tuple(v) for m, v in corr_sd.items()},
                        completeness={k: float(f"{v:.3g}") for k, v in completeness.items()},
                        data_randomisation=data_randomisation_reason(vllm), skipped=skipped, verdicts=verdicts,
                        grid=grid, example=example, verdict_step=verdict_step, gate_im_random=im_random,
                        threshold=threshold, tolerance=tolerance, seed=seed,
                        seconds=round(time.perf_counter() - t0, 1))


def _completeness(vllm, records, targets, methods, layer, tolerance) -> dict[str, float]:
    """Max error of the exact decompositions (allocation, and DLA with it) and IG's max relative delta."""
    from .allocation import token_allocation
    from .contributions import module_contributions
    from .gradients import integrated_gradients

    pairs = list(zip(records, targets))
    out: dict[str, float] = {}
    if "allocation" in methods:
        out["allocation"] = max(token_allocation(vllm, r.image, r.src, layer=layer, target=t).max_error
                                for r, t in pairs)
        out["dla"] = max(abs(mc.dla_total - mc.logit)
                         for mc in (module_contributions(vllm, r.image, r.src, target=t) for r, t in pairs))
    for m, where in (("ig_pixels", None), ("ig_layer", layer)):
        if m in methods:
            out[m] = max(integrated_gradients(vllm, r.image, r.src, layer=where, target=t,
                                              tolerance=tolerance).relative_delta for r, t in pairs)
    return out


def _cascade(vllm, records, targets, original, run, settings, editor, generator, *, vision, progress):
    """Randomise a copy of ``vllm`` block by block; after each block, every method's mean rank correlation
    with its original maps (|map| and signed), and the first record's maps. Returns (step names,
    correlations, signed correlations, their spread over records, example maps)."""
    from tqdm.auto import tqdm

    clone = model_copy(vllm)
    clone_editor = _editor_on(editor, clone) if "gate" in run else None
    cascade = clone.adapter.cascade()
    if not vision:
        cascade = cascade[:vllm.n_layers]
    corr = {m: [] for m in run}
    corr_signed = {m: [] for m in run}
    corr_sd = {m: [] for m in run}
    example = {m: [tuple(np.round(original[0][m], 6).tolist())] for m in run}
    bar = tqdm(total=len(cascade) * len(records), desc="sanity: randomising", disable=not progress)
    for name, module, std in cascade:
        randomise(module, std, generator)
        per = {m: ([], []) for m in run}
        for k, (r, t) in enumerate(zip(records, targets)):
            maps = _maps(clone, r, t, run, settings, clone_editor)
            for m in run:
                per[m][0].append(rank_correlation(np.abs(original[k][m]), np.abs(maps[m])))
                per[m][1].append(rank_correlation(original[k][m], maps[m]))
                if k == 0:
                    example[m].append(tuple(np.round(maps[m], 6).tolist()))
            bar.update()
        for m in run:
            corr[m].append(_mean(per[m][0]))
            corr_signed[m].append(_mean(per[m][1]))
            corr_sd[m].append(_mean(per[m][0], np.std))
    bar.close()
    return [name for name, _, _ in cascade], corr, corr_signed, corr_sd, example


def _mean(values: list[float], reduce=np.mean) -> float:
    """``reduce`` (the mean) of the values that are not NaN, rounded; NaN when none is."""
    finite = [v for v in values if v == v]
    return round(float(reduce(finite)), 4) if finite else float("nan")


def _gate_im_random(editor, records, original, generator) -> float:
    """Mean |gate| rank correlation with the original when only the influence mapper is re-initialised
    (on a copy of the VEAD, on the model in use)."""
    other = _editor_on(editor, editor.vllm)
    randomise(other.adapter.influence_mapper(), 0.02, generator)
    return _mean([rank_correlation(np.abs(o["gate"]), np.abs(_gate(other, r).ravel()))
                  for r, o in zip(records, original)])


def _verdicts(methods, skipped, rho, im_random, completeness, threshold, tolerance) -> dict:
    """``rho[m]``: the |map| correlation that decides method m's model-randomisation verdict."""
    out = {}
    for m in list(methods) + (["dla"] if "dla" in completeness else []):
        v = {"model_randomisation": "n/a" if m == "dla" else "not run", "completeness": "n/a",
             "data_randomisation": "not run"}
        measured = [abs(x) for x in (rho.get(m), im_random if m == "gate" else None) if x is not None and x == x]
        if measured:
            v["model_randomisation"] = "fails" if max(measured) >= threshold else "passes"
        if m in completeness:
            bar = tolerance if m.startswith("ig_") else EXACT_TOLERANCE
            v["completeness"] = "passes" if completeness[m] <= bar else "fails"
        ran = [x for x in v.values() if x in ("passes", "fails")]
        v["overall"] = ("skipped: " + skipped[m] if m in skipped else "fails" if "fails" in ran
                        else "passes" if ran else "not run")
        out[m] = v
    return out
