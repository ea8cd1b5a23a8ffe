"""MEND — model editor networks with gradient decomposition (Mitchell et al., 2022), our own code.

For every edited linear layer ``W`` (d_out × d_in) the fine-tuning gradient of the edit loss is a sum
of rank-one terms, ``∇W = Σ_t δ_t u_tᵀ`` (``u_t``: the layer's input at token t, ``δ_t``: the loss
gradient at its output). MEND learns a small network per layer that maps each pair (u_t, δ_t) to
(ũ_t, δ̃_t) and applies ``W ← W − α · Σ_t δ̃_t ũ_tᵀ`` with a learned step size α. The network is an
identity-initialised low-rank residual MLP on standardised inputs, so at initialisation MEND is one
step of gradient descent.

Training (:func:`train_mend`, ``python -m visedit train-mend``) uses the *train* split: the edit loss on
the edit's rephrased question and re-rendered image (and the edit itself), plus a KL term that keeps
the text-only and other-image locality inputs where they were.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn

from ..config import StrictConfig
from ..fit import Every, FitState, fit
from ..hooks import Trace
from .base import (EditRequest, Editor, check_trained_for, holdout_split, load_trained, register_editor, save_trained,
                   target_loss, trained_dir)

TRAINED_DIR = trained_dir("mend")  # the first model's; see trained_dir for the others


@dataclasses.dataclass(frozen=True)
class MENDConfig(StrictConfig):
    """Which layers MEND edits, the size of its networks, and how it is trained.

    ``layers``: LLM layers whose MLP linear maps are edited (negative counts from the end).
    ``rank``: hidden width of each editor network. ``edit_lr``: initial step size α (learned).
    Training: ``steps`` Adam steps at ``lr`` over train-split edits, loss = ``edit_weight`` · edit
    cross-entropy + ``loc_weight`` · locality KL; ``val_share`` of the train records are held out to
    pick the best checkpoint (checked every ``val_every`` steps on ``val_edits`` of them).
    """

    layers: tuple[int, ...] = (-3, -2, -1)
    rank: int = 64
    edit_lr: float = 1e-3
    steps: int = 2000
    lr: float = 1e-3
    edit_weight: float = 1.0
    loc_weight: float = 1.0
    val_share: float = 0.1
    val_every: int = 250
    val_edits: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))
        if not self.layers or not all(isinstance(l, int) for l in self.layers):
            raise ValueError(f"layers must be a non-empty list of ints, got {self.layers!r}")
        for name in ("rank", "steps", "val_every", "val_edits"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if not self.edit_lr > 0 or not self.lr > 0:
            raise ValueError("edit_lr and lr must be > 0")
        if not 0 < self.val_share < 1:
            raise ValueError(f"val_share must be in (0, 1), got {self.val_share}")


class GradientTransform(nn.Module):
    """Maps per-token (u, δ) pairs of one linear layer to (ũ, δ̃). Shapes: u (N, d_in), δ (N, d_out)."""

    def __init__(self, d_in: int, d_out: int, rank: int, edit_lr: float):
        super().__init__()
        self.d_in, self.d_out = d_in, d_out
        dim = d_in + d_out
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("var", torch.ones(dim))
        self.register_buffer("seen", torch.zeros(()))
        self.down = nn.Linear(dim, rank)
        self.up = nn.Linear(rank, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.log_lr = nn.Parameter(torch.tensor(math.log(edit_lr)))

    def forward(self, u: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat([u, delta], -1).float()
        if self.training:
            with torch.no_grad():  # running standardisation statistics (Welford over tokens)
                n_old, n_new = self.seen, x.shape[0]
                total = n_old + n_new
                batch_mean = x.mean(0)
                self.var.copy_((self.var * n_old + x.var(0, unbiased=False) * n_new
                                + (batch_mean - self.mean) ** 2 * n_old * n_new / total) / total)
                self.mean.copy_(self.mean + (batch_mean - self.mean) * n_new / total)
                self.seen.copy_(total)
        x = (x - self.mean) / (self.var + 1e-8).sqrt()
        h = x + self.up(torch.relu(self.down(x)))
        return h[:, : self.d_in], h[:, self.d_in:]

    def delta_weight(self, u: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """The weight change α · Σ_t δ̃_t ũ_tᵀ (d_out × d_in) to subtract from W."""
        u_t, d_t = self(u, delta)
        return self.log_lr.exp() * d_t.T @ u_t


def _linears(vllm, layers: Sequence[int]) -> dict[str, nn.Linear]:
    """Full parameter-owner names → the linear maps inside the MLPs of ``layers``."""
    names = {id(m): n for n, m in vllm.model.named_modules()}
    out = {}
    for layer in layers:
        mlp = vllm.site(f"llm.layers.{vllm.adapter.check_layer(layer)}.mlp")
        for module in mlp.modules():
            if isinstance(module, nn.Linear):
                out[names[id(module)]] = module
    if not out:
        raise ValueError(f"no linear maps found in the MLPs of layers {list(layers)}")
    return out


class MENDNetworks(nn.Module):
    """One :class:`GradientTransform` per edited linear map, keyed by the map's module name."""

    def __init__(self, vllm, config: MENDConfig):
        super().__init__()
        self.config = config
        self.linears = _linears(vllm, config.layers)
        self.nets = nn.ModuleDict({n.replace(".", "__"): GradientTransform(m.in_features, m.out_features,
                                                                             config.rank, config.edit_lr)
                                   for n, m in self.linears.items()})

    def factors(self, vllm, inputs) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """(u, δ) per edited map for the edit inputs: the map's inputs and the edit loss's gradient at
        its outputs, over the real (unpadded) tokens."""
        weights = [m.weight for m in self.linears.values()]
        flags = [w.requires_grad for w in weights]
        try:
            for w in weights:
                w.requires_grad_(True)
            with torch.enable_grad(), Trace(self.linears, inputs=True, outputs=True, detach=False) as trace:
                loss = target_loss(vllm, inputs)
                outs = [trace.outputs[n] for n in self.linears]
                grads = torch.autograd.grad(loss, outs)
        finally:
            for w, f in zip(weights, flags):
                w.requires_grad_(f)
        keep = inputs.tensors["attention_mask"].reshape(-1).bool()
        return {n: (trace.inputs[n].detach().reshape(-1, trace.inputs[n].shape[-1])[keep],
                    g.detach().reshape(-1, g.shape[-1])[keep])
                for n, g in zip(self.linears, grads)}

    def deltas(self, factors) -> dict[str, torch.Tensor]:
        return {n: self.nets[n.replace(".", "__")].delta_weight(*factors[n]) for n in self.linears}


@register_editor
class MENDEditor(Editor):
    """MEND with trained editor networks (default: the ones shipped for the embedded model)."""

    name = "mend"
    config_class = MENDConfig
    trained = True

    def __init__(self, vllm, config: MENDConfig | None = None, *, networks: MENDNetworks | None = None):
        super().__init__(vllm, config if config is not None else (networks.config if networks else None))
        self.networks = networks if networks is not None else MENDNetworks(vllm, self.config)
        self.networks.to(vllm.device).eval()

    @classmethod
    def from_settings(cls, vllm, settings: Mapping, *, allow_other_model: bool = False) -> "MENDEditor":
        """Load trained networks: ``settings['weights']`` (a folder from ``train-mend``) or the shipped
        ones. The folder's own settings (``mend.json``) define the editor; preset values (checked like any
        config) only describe how the shipped networks were trained."""
        settings = dict(settings)
        folder = Path(settings.pop("weights", None) or trained_dir("mend", vllm))
        MENDConfig.from_dict(settings)
        return cls.load(vllm, folder, allow_other_model=allow_other_model)

    @classmethod
    def load(cls, vllm, folder: str | Path, *, allow_other_model: bool = False) -> "MENDEditor":
        """The networks in ``folder``; refused if trained for another model (see :func:`check_trained_for`)."""
        meta, state = load_trained(folder, "mend")
        config = MENDConfig.from_dict(meta["config"])
        networks = MENDNetworks(vllm, config)
        expected = {k: tuple(v.shape) for k, v in networks.state_dict().items()}
        if expected != {k: tuple(v.shape) for k, v in state.items()}:
            raise ValueError(f"the MEND networks in {folder} were trained for a model with other layer shapes "
                             f"({meta.get('model', '?')}); train one for this model with `python -m visedit "
                             "train-mend --model … --out DIR`")
        check_trained_for(meta, vllm, folder, "mend", allow_other_model=allow_other_model)
        networks.load_state_dict(state)
        return cls(vllm, config, networks=networks)

    def save(self, folder: str | Path, *, extra: Mapping | None = None) -> None:
        """Write ``mend.safetensors`` + ``mend.json`` atomically."""
        save_trained(folder, "mend", self.networks.state_dict(),
                     {"config": dataclasses.asdict(self.config), "model": self.vllm.name,
                      "model_fingerprint": self.vllm.fingerprint, **(extra or {})})

    def edited_parameters(self):
        return {n: m.weight for n, m in self.networks.linears.items()}

    def _apply(self, request: EditRequest) -> None:
        self._apply_batch([request])

    def _apply_batch(self, requests) -> None:
        """One update for all ``requests``: the factors of their joint edit loss (MEND's batched edit)."""
        inputs = self.vllm.inputs([(r.image, r.prompt, r.target) for r in requests])
        factors = self.networks.factors(self.vllm, inputs)
        with torch.no_grad():
            for name, dw in self.networks.deltas(factors).items():
                self.networks.linears[name].weight.sub_(dw.to(self.networks.linears[name].weight.dtype))


# --------------------------------------------------------------------------------------------- training
def _edited_forward(vllm, networks: MENDNetworks, deltas: dict[str, torch.Tensor], inputs) -> torch.Tensor:
    params = {f"{n}.weight": m.weight - deltas[n] for n, m in networks.linears.items()}
    return torch.func.functional_call(vllm.model, params, args=(), kwargs={**inputs.tensors, "use_cache": False}).logits


def _locality_kl(pre: torch.Tensor, post: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens of KL(pre ‖ post) between next-token distributions (B, S, V)."""
    lp, lq = pre.float().log_softmax(-1), post.float().log_softmax(-1)
    kl = (lp.exp() * (lp - lq)).sum(-1)
    return (kl * mask).sum() / mask.sum()


def mend_loss(vllm, networks: MENDNetworks, record, config: MENDConfig) -> tuple[torch.Tensor, dict]:
    """MEND's training loss on one MMEdit record (differentiable w.r.t. the networks)."""
    edit = vllm.inputs([(record.image, record.src, record.alt)])
    deltas = networks.deltas(networks.factors(vllm, edit))
    general = vllm.inputs([(record.image, record.src, record.alt), (record.image, record.rephrase, record.alt),
                           (record.image_rephrase, record.src, record.alt)])
    l_edit = target_loss(vllm, general, _edited_forward(vllm, networks, deltas, general))
    local = vllm.inputs([(None, record.loc, record.loc_ans), (record.m_loc, record.m_loc_q, record.m_loc_a)])
    with torch.no_grad():
        pre = vllm.model(**local.tensors, use_cache=False).logits
    l_loc = _locality_kl(pre, _edited_forward(vllm, networks, deltas, local), local.tensors["attention_mask"])
    loss = config.edit_weight * l_edit + config.loc_weight * l_loc
    return loss, {"edit": float(l_edit.detach()), "loc": float(l_loc.detach())}


def train_mend(vllm, records: Sequence, config: MENDConfig = MENDConfig(), *, out: str | Path | None = None,
               progress: bool = True) -> tuple[MENDEditor, dict]:
    """Train MEND's networks on ``records`` (train split). Returns the editor with the best validation
    checkpoint and a training record; with ``out`` also saves both there (atomically)."""
    from tqdm.auto import tqdm

    from .scoring import quick_scores

    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    train, val = holdout_split(records, config.val_share, config.val_edits, rng)
    networks = MENDNetworks(vllm, config)
    editor = MENDEditor(vllm, config, networks=networks)
    optimizer = torch.optim.Adam(networks.parameters(), lr=config.lr)
    history, best, best_state = [], -1.0, None
    start = time.perf_counter()

    def loss_at(step: int) -> tuple[torch.Tensor, dict]:
        networks.train()
        if step and step % len(train) == 0:
            rng.shuffle(train)  # a new epoch, a new order
        return mend_loss(vllm, networks, train[step % len(train)], config)

    def validate(state: FitState) -> None:
        nonlocal best, best_state
        networks.eval()
        scores = quick_scores(editor, val)
        history.append({"step": state.step, **state.parts, **{f"val_{k}": v for k, v in scores.items()}})
        if scores["mean"] > best:
            best = scores["mean"]
            best_state = {k: v.detach().clone() for k, v in networks.state_dict().items()}

    fit(loss_at, optimizer, config.steps, callbacks=[Every(config.val_every, validate, at_end=True)],
        desc="train MEND", progress=progress)
    networks.load_state_dict(best_state)
    networks.eval()
    info = {"wall_seconds": round(time.perf_counter() - start, 1), "best_val_mean": round(best, 4),
            "n_train": len(train), "n_val": len(val), "history": history}
    if out is not None:
        editor.save(out, extra={"training": info})
    return editor, info
