"""A learned scope for VEAD's prompt route (ours, not the paper's).

The prompt route applies an edit only to inputs whose prompt key — the last prompt token's VEAD-off state
at ``route_layer`` — has a cosine of at least ``route_min`` with the edit prompt's. On the raw states a
question about the creature on the *left* and the same question about the creature on the *right* lie
almost on top of each other (cosine ≈ 0.99): the one word that picks the creature moves the state very
little, so a threshold cannot keep such in-image questions out without also losing paraphrases.

A scope is a linear map of the centred key, ``P (k − c)``, fitted on the train split's probes (as SERAC fits
a scope classifier, Mitchell et al., 2022): paraphrases and the same question on another image of the
creature (the generality probes) are pulled to a cosine above ``pos_margin`` with the edit's key, another
question about the same image (in-image), another creature (M-locality) and a look-alike below
``neg_margin``. The route then compares cosines in the scope's space (``route_scope``).

:func:`fit_scope` fits one; ``python -m visedit fit-scope`` writes it (``scope.safetensors`` +
``scope.json``), and ``--set route_scope=DIR`` uses it.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Sequence

import torch

#: the probes a scope is fitted on: pulled in (the edit's scope) and pushed out
POSITIVES = ("t_generality", "m_generality")
NEGATIVES = ("m_locality", "i_locality", "la_locality")


@dataclasses.dataclass(frozen=True)
class ScopeConfig:
    """``layer``: where the keys are read (the route's ``route_layer``, a decoder layer's output);
    ``dim``: the scope's width; ``steps`` Adam steps at ``lr`` on batches of ``batch`` train edits;
    ``pos_margin`` / ``neg_margin``: the hinge margins of the cosines; ``skip``: the first train records
    left out (the edits ``route_min`` is tuned on); ``seed``: the initial map and the batches."""

    layer: int
    dim: int = 64
    steps: int = 1500
    lr: float = 1e-3
    batch: int = 256
    pos_margin: float = 0.8
    neg_margin: float = 0.2
    skip: int = 100
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("dim", "steps", "batch"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"ScopeConfig.{name} must be a positive int, got {v!r}")
        for name in ("layer", "skip", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or (name != "layer" and v < 0):
                raise ValueError(f"ScopeConfig.{name} must be an int{'' if name == 'layer' else ' >= 0'}, got {v!r}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not self.lr > 0:
            raise ValueError(f"ScopeConfig.lr must be a number > 0, got {self.lr!r}")
        if not -1 <= self.neg_margin < self.pos_margin <= 1:
            raise ValueError(f"ScopeConfig margins must satisfy -1 <= neg_margin < pos_margin <= 1, got "
                             f"{self.neg_margin!r} and {self.pos_margin!r}")


class RouteScope(torch.nn.Module):
    """``P (k − c)``: the centre ``c`` (d,) of the train keys and the map ``P`` (dim, d)."""

    def __init__(self, d: int, dim: int):
        super().__init__()
        self.register_buffer("centre", torch.zeros(d))
        self.proj = torch.nn.Linear(d, dim, bias=False)

    def forward(self, keys: torch.Tensor) -> torch.Tensor:
        return self.proj(keys.float() - self.centre)


@torch.no_grad()
def probe_keys(vllm, records: Sequence, *, layer: int, batch: int = 16, progress: bool = True) -> dict:
    """Per probe (the edit's own input, the two generality and three locality probes): the prompt keys
    (n, d) of ``records`` — each input's last prompt token state at the output of ``layer``, from a plain
    forward pass stopped there (VEAD off: the key the route reads)."""
    from tqdm.auto import tqdm

    from .analysis import ROUTE_PROBES

    layer = vllm.adapter.check_layer(layer)
    site = f"llm.layers.{layer}"
    items = [(k, probe(r)) for r in records for k, probe in ROUTE_PROBES.items()]
    keys: list[torch.Tensor] = []
    for i in tqdm(range(0, len(items), batch), desc=f"layer-{layer} prompt keys", disable=not progress):
        inputs = vllm.inputs([item for _, item in items[i:i + batch]])
        run = vllm.run(inputs, trace=[site], stop_after=site, cache_device="cpu")
        states = run.outputs[site]
        keys += [states[b, t].float() for b, t in enumerate(inputs.last_prompt)]
    out: dict[str, list] = {k: [] for k in ROUTE_PROBES}
    for (k, _), key in zip(items, keys):
        out[k].append(key)
    return {k: torch.stack(v) for k, v in out.items()}


def scope_loss(scope: RouteScope, keys: dict, rows: torch.Tensor, config: ScopeConfig) -> torch.Tensor:
    """The hinge loss on the cosines of ``rows``' probes with their edit's key, in the scope's space."""
    import torch.nn.functional as F

    z = {k: F.normalize(scope(v[rows]), dim=-1) for k, v in keys.items()}
    pos = torch.cat([(z["reliability"] * z[k]).sum(-1) for k in POSITIVES])
    neg = torch.cat([(z["reliability"] * z[k]).sum(-1) for k in NEGATIVES])
    return F.relu(config.pos_margin - pos).mean() + F.relu(neg - config.neg_margin).mean()


def fit_scope(vllm, records: Sequence, config: ScopeConfig, *, out: str | Path | None = None,
              progress: bool = True) -> tuple[RouteScope, dict]:
    """Fit a scope on ``records`` (the world's second edition, train split: every record has the in-image
    and look-alike probes) after the first ``config.skip``; with ``out``, write it there atomically.
    Returns the scope and a record of the fit (final loss, seconds)."""
    from ..base import save_trained
    from .analysis import require_region_probes

    if not isinstance(config, ScopeConfig):
        raise TypeError(f"fit_scope() takes a ScopeConfig, got {type(config).__name__}")
    records = list(records)[config.skip:]
    if len(records) < 2:
        raise ValueError(f"fit_scope() needs at least 2 train records after the first {config.skip} (skip), got "
                         f"{len(records)}: pass more records or a smaller skip")
    require_region_probes(records, "fit a scope on")
    start = time.perf_counter()
    keys = probe_keys(vllm, records, layer=config.layer, progress=progress)
    g = torch.Generator().manual_seed(config.seed)
    d = keys["reliability"].shape[1]
    scope = RouteScope(d, config.dim)
    with torch.no_grad():
        scope.centre.copy_(torch.cat(list(keys.values())).mean(0))
        scope.proj.weight.copy_(torch.randn(config.dim, d, generator=g) / d ** 0.5)
    opt = torch.optim.Adam(scope.parameters(), lr=config.lr)
    n = len(records)
    first_loss = None
    for _ in range(config.steps):
        rows = torch.randint(0, n, (min(config.batch, n),), generator=g)
        loss = scope_loss(scope, keys, rows, config)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first_loss = float(loss.detach()) if first_loss is None else first_loss
    scope.eval()
    with torch.no_grad():
        final = float(scope_loss(scope, keys, torch.arange(n), config))
    info = {"records": n, "loss": round(final, 6), "first_loss": round(first_loss, 6),
            "wall_seconds": round(time.perf_counter() - start, 1), "threads": torch.get_num_threads()}
    if out is not None:
        save_trained(out, "scope", {"centre": scope.centre, "proj.weight": scope.proj.weight},
                     {"config": dataclasses.asdict(config), "layer": vllm.adapter.check_layer(config.layer),
                      "d": d, "model": vllm.name, "model_fingerprint": vllm.fingerprint, **info})
    return scope, info


def resolve_scope_dir(setting: str, vllm) -> Path:
    """``route_scope``: a folder written by ``fit-scope``, or the name of one shipped beside the model's
    trained editors (e.g. ``scope-layer8``)."""
    from ..base import trained_dir

    path = Path(setting)
    if (path / "scope.safetensors").exists():
        return path
    shipped = trained_dir("vead", vllm).parent / setting
    if (shipped / "scope.safetensors").exists():
        return shipped
    raise FileNotFoundError(f"route_scope {setting!r} is neither a folder with scope.safetensors nor a scope "
                            f"shipped for {vllm.name}: fit one with `python -m visedit fit-scope --layer L --out DIR`")


def load_scope(setting: str, vllm, *, route_layer: int, allow_other_model: bool = False) -> RouteScope:
    """The scope ``route_scope`` names, checked against this model and the route's layer."""
    from ..base import check_trained_for, load_trained

    folder = resolve_scope_dir(setting, vllm)
    meta, state = load_trained(folder, "scope")
    check_trained_for(meta, vllm, folder, "scope", allow_other_model=allow_other_model)
    if meta["d"] != vllm.d_model:
        raise ValueError(f"the scope in {folder} reads keys of width {meta['d']}; this model's are {vllm.d_model}: "
                         "fit one for this model with `python -m visedit fit-scope`")
    if meta["layer"] != route_layer:
        raise ValueError(f"the scope in {folder} was fitted on keys at layer {meta['layer']}, but the route reads "
                         f"layer {route_layer}: set route_layer={meta['layer']}, or fit a scope with "
                         f"`python -m visedit fit-scope --layer {route_layer}`")
    scope = RouteScope(meta["d"], state["proj.weight"].shape[0])
    scope.load_state_dict(state)
    return scope.eval()
