"""Module contributions: which layers, and which sub-module (attention vs MLP), push towards the answer.

Two readings of each module's output ``o`` at the last prompt token T, for the answer's first token y*:

* **Paper (logit lens on one module)** — z = lm_head(final_norm(o)), v = z[y*], p = softmax(z)[y*];
  per sample c = sign(v)·(|v|/M)^(1−α)·p^α with M = max |v| over all layers and modules, α = 0.5.
* **Direct logit attribution (DLA)** — o through the final norm's *scale taken from the full residual
  stream* at T, then the unembedding row of y*. DLA is exact: the embedding's DLA plus every module's DLA
  sums to the final logit of y*.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
import torch

from ..stats import bootstrap_ci
from ..models import VLLM, unembed
from ..viz.figures import layer_bars


@dataclasses.dataclass(frozen=True)
class ModuleContributions:
    """Per-layer contributions for one (image, question). Lists have one entry per LLM layer."""

    target: str
    target_id: int
    attn: tuple[float, ...]
    mlp: tuple[float, ...]
    dla_attn: tuple[float, ...]
    dla_mlp: tuple[float, ...]
    dla_embed: float
    logit: float
    predicted: str
    alpha: float
    #: The part of the logit no module writes: the final norm's and the head's biases (0 with RMSNorm).
    dla_bias: float = 0.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def dla_total(self) -> float:
        """Embedding + every module's DLA (+ the norm's bias); equals :attr:`logit` up to float error."""
        return self.dla_embed + sum(self.dla_attn) + sum(self.dla_mlp) + self.dla_bias

    def plot(self, *, method: str = "paper"):
        return layer_bars({"attention": self.attn if method == "paper" else self.dla_attn,
                           "MLP": self.mlp if method == "paper" else self.dla_mlp}, method=method)


def _target_id(vllm: VLLM, logits_t: torch.Tensor, target: str | None) -> int:
    if target is None:
        return int(logits_t.argmax())
    return vllm.encode_target(target)[0]


def paper_score(v: torch.Tensor, p: torch.Tensor, alpha: float) -> torch.Tensor:
    """The paper's contribution score c = sign(v)·(|v|/M)^(1−α)·p^α, M = max |v| over every entry."""
    M = v.abs().max().clamp_min(1e-12)
    return torch.sign(v) * (v.abs() / M).pow(1 - alpha) * p.pow(alpha)


@torch.no_grad()
def module_contributions(vllm: VLLM, image, question: str, *, target: str | None = None,
                         alpha: float = 0.5) -> ModuleContributions:
    """Contribution of every layer's attention and MLP output to the answer's first token.

    ``target``: the answer to attribute (default: the model's own prediction y*).
    """
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    inputs = vllm.inputs([(image, question)])
    L = vllm.n_layers
    sites = [f"llm.layers.{l}.{k}" for k in ("attn", "mlp") for l in range(L)]
    T = inputs.last_prompt[0]
    run = vllm.run(inputs, trace=sites + ["llm.norm", "llm.layers.0"], trace_inputs=True)
    logits = run.logits[0, T]
    y = _target_id(vllm, logits, target)
    head = vllm.device_of("lm_head")  # a split model's layers sit on several devices: read them on the head's
    outs = torch.stack([run.outputs[s][0, T].to(head) for s in sites]).float()
    z = unembed(vllm.adapter, outs.to(vllm.model.dtype)).float()
    v = z[:, y]
    p = z.softmax(-1)[:, y]
    c = paper_score(v, p, alpha)
    direction, bias = vllm.adapter.logit_direction(run.inputs["llm.norm"][0, T], y)
    direction = direction.to(head)
    dla = outs @ direction
    embed = float(run.inputs["llm.layers.0"][0, T].float().to(head) @ direction)
    return ModuleContributions(
        target=vllm.tokenizer.decode([y]).strip(), target_id=y, attn=tuple(c[:L].tolist()), mlp=tuple(c[L:].tolist()),
        dla_attn=tuple(dla[:L].tolist()), dla_mlp=tuple(dla[L:].tolist()), dla_embed=embed,
        logit=float(logits[y]), predicted=vllm.tokenizer.decode([int(logits.argmax())]).strip(), alpha=alpha,
        dla_bias=bias)


def early_share(per_layer) -> float:
    """The first third of the layers' (l < L/3, so ⌈L/3⌉ layers) share of the total positive contribution of
    ``per_layer`` (one value per layer; negative layers count as 0). 0 when no layer contributes."""
    pos = np.clip(np.asarray(per_layer, dtype=float), 0, None)
    early = pos[: int(np.ceil(len(pos) / 3))]
    return float(early.sum() / pos.sum()) if pos.sum() > 0 else 0.0


def mean_depth(per_layer) -> float:
    """Where the positive contribution of ``per_layer`` lies on average, in relative depth: Σ_l c_l⁺ ·
    l/(L − 1) ÷ Σ_l c_l⁺ (0: all at the first layer, 1: all at the last, 0.5 for a flat profile). Unlike
    the peak's depth it does not jump between far-apart layers when a profile is nearly flat. 0 when no
    layer contributes."""
    pos = np.clip(np.asarray(per_layer, dtype=float), 0, None)
    if pos.sum() <= 0 or len(pos) < 2:
        return 0.0
    return float((pos * np.arange(len(pos))).sum() / pos.sum() / (len(pos) - 1))


@dataclasses.dataclass(frozen=True)
class ContributionProfile:
    """Mean per-layer contributions over a dataset with bootstrap 95% intervals.

    ``mean[key]`` and ``low[key]``/``high[key]`` are lists of length L for key in
    ``attn, mlp, dla_attn, dla_mlp`` (:func:`contribution_profile`), or ``visual, text`` — what each
    layer's attention output takes from the visual tokens and from the text (:func:`source_profile`).
    """

    mean: dict[str, list[float]]
    low: dict[str, list[float]]
    high: dict[str, list[float]]
    n: int
    n_total: int
    only_correct: bool

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def peak(self, key: str) -> int:
        """Layer with the largest mean contribution for ``key``."""
        return int(np.argmax(self.mean[key]))

    def relative_peak_depth(self, key: str = "attn") -> float:
        """The peak layer ÷ (L − 1): 0 reads the image at the first layer, 1 at the last (LLaVA-1.5: 28/31)."""
        L = len(self.mean[key])
        return self.peak(key) / (L - 1) if L > 1 else 0.0

    def early_share(self, key: str = "attn") -> float:
        """The first third of the layers' (l < L/3) share of the total positive mean contribution."""
        return early_share(self.mean[key])

    def mean_depth(self, key: str = "attn") -> float:
        """The contribution-weighted mean relative depth of the positive mean contribution (:func:`mean_depth`)."""
        return mean_depth(self.mean[key])

    def plot(self, *, method: str = "paper"):
        """Bars per layer: attention and MLP by the paper's formula (``method="paper"``) or by DLA
        (``"dla"``); a source profile shows its visual and text series (by DLA) whatever ``method``."""
        if "visual" in self.mean:
            names, method = {"visual tokens": "visual", "text tokens": "text"}, "dla"
            title = f"What each layer's attention takes from the image and from the text (n = {self.n})"
        else:
            keys = ("attn", "mlp") if method == "paper" else ("dla_attn", "dla_mlp")
            names = dict(zip(("attention", "MLP"), keys))
            title = f"{'Paper formula' if method == 'paper' else 'Direct logit attribution'} (n = {self.n})"
        return layer_bars({n: self.mean[k] for n, k in names.items()}, low={n: self.low[k] for n, k in names.items()},
                          high={n: self.high[k] for n, k in names.items()}, method=method, title=title)


def profile_from_rows(rows, keys: Sequence[str], n_total: int, only_correct: bool, n_boot: int, seed: int
             ) -> ContributionProfile:
    """Mean and bootstrap interval of ``rows`` (n, len(keys), L) as a :class:`ContributionProfile`."""
    mean, lo, hi = bootstrap_ci(np.asarray(rows), n_boot=n_boot, seed=seed)
    return ContributionProfile(mean={k: mean[i].round(6).tolist() for i, k in enumerate(keys)},
                               low={k: lo[i].round(6).tolist() for i, k in enumerate(keys)},
                               high={k: hi[i].round(6).tolist() for i, k in enumerate(keys)},
                               n=len(rows), n_total=n_total, only_correct=only_correct)


def contribution_profile(vllm: VLLM, records: Sequence, *, only_correct: bool = True, alpha: float = 0.5,
                         n_boot: int = 1000, seed: int = 0, progress: bool = True) -> ContributionProfile:
    """Aggregate :func:`module_contributions` over MMEdit records (``image``, ``src``, ``pred``).

    With ``only_correct``, keep only records where the model's first answer token is ``pred``'s.
    """
    from tqdm.auto import tqdm

    if len(records) == 0:
        raise ValueError("no records given: pass a non-empty list of MMEdit records")
    rows = []
    for rec in tqdm(records, desc="contributions", disable=not progress):
        mc = module_contributions(vllm, rec.image, rec.src, alpha=alpha)
        if only_correct and mc.target_id != vllm.encode_target(rec.pred)[0]:
            continue
        rows.append([mc.attn, mc.mlp, mc.dla_attn, mc.dla_mlp])
    if not rows:
        raise ValueError("no record was answered correctly; pass only_correct=False (CLI: --all-records) to keep "
                         "them all")
    return profile_from_rows(rows, ("attn", "mlp", "dla_attn", "dla_mlp"), len(records), only_correct, n_boot, seed)
