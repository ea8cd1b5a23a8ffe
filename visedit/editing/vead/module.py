"""The Visual Edit ADapter (VEAD) and its influence mapper (IM), as ``nn.Module`` s.

Given the visual slice ``V`` (B, N, d) of the residual stream at the output of layer l_e and the edit
sample's layer-l_e states ``H`` (B or 1, S, d) (image + prompt + new answer; ``mask`` (B or 1, S) marks
real positions) with ``p = H[n_e]`` (B or 1, d), the state of its last prompt token::

    X = LN1(V) W_b;  Q = X W_q;  K = LN2(H) W_k;  Val = LN2(H) W_v          (d → m)
    O = MultiHeadAttention(Q, K, Val) W_end                                 (m → d)
    Ṽ = R1(LN3(V));  p̃ = R2(LN4(p));   R(x) = W2 ReLU(W1 x) + x
    s_j = mean_h ⟨Ṽ_{j,h}, p̃_h⟩ / √(d / heads);   C_j = σ(s_j)
    V' = V + C ⊙ O

``W_end`` starts at zero, so an untrained VEAD is the identity.

With ``im_reads: image`` (our option, not the paper's) the IM reads the edit sample's own visual tokens
P = H[image] (K, d) instead of p, and each visual token is gated by its best match among them:
s_j = max_k mean_h ⟨Ṽ_{j,h}, P̃_{k,h}⟩ / √(d / heads). With K = 1 this is the formula above.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...config import StrictConfig


def release_width(d: int) -> int:
    """The adapter width the release's ratio gives for hidden size ``d`` (m = 1024 on d = 4096: m = d/4)."""
    return max(8, d // 4)


@dataclasses.dataclass(frozen=True)
class VEADConfig(StrictConfig):
    """VEAD's shape, where it sits, and how it is trained (preset: ``presets/vead.yaml``).

    ``layer``: l_e (None: chosen from the model's contribution profile, see :func:`choose_edit_layer`).
    ``at``: ``"output"`` (the paper: VEAD rewrites the output of layer l_e) or ``"input"`` (the input of
    layer l_e — the same stream as the output of l_e − 1; only new for l_e = 0, where it is the projector's
    output as the LLM first sees it).
    ``width`` (m), ``heads``, ``im_width`` (hidden width of the IM's residual MLPs) and ``im_heads``:
    None scales the release's settings (m = 1024, 8 heads on d = 4096) to the model: m = d / 4, heads = 8
    when m ≥ 512 else 4, im_width = d, im_heads = heads. ``it_layers``: how many layers after l_e the
    IM's noise-perturbation target is averaged over (None: all). ``use_im``: False ablates the IM (gate 1).
    Training: ``sampled_tokens`` visual tokens per input for the IM losses, noise ``sigma`` and
    ``noise_copies``, loss weights, ``steps`` × ``batch`` edits at Adam ``lr`` — constant, then falling
    linearly towards 0 over the last ``decay_share`` of the steps (0: constant, as in the release) —
    validation on ``val_edits`` of a held-out ``val_share`` of the train split every ``val_every`` steps.
    ``hard_loc`` (ours; the release and 0: off): besides each record's own M-Loc input, train locality on
    a *hard negative* — of ``hard_loc`` other records' edit inputs (another entity), the one whose image
    the current gate opens on most — with the same KL and gate-down losses.
    ``w_iloc`` (ours; the release and 0: off): weight of an *in-image* locality term — the KL (pre ‖ post)
    on the edit image asked about another creature in it (the record's ``i_loc_q`` / ``i_loc_a``, the
    world's second edition). The edit image's visual tokens come before any question, so this input's
    rewrite is the edit's own: only a rewrite confined to the asked creature's tokens leaves its answer.
    ``eos`` (ours; the release: False): the training targets end with the end-of-sequence token — the edit
    and generality cross-entropies include it, and the locality KL covers its position — so the edited
    model learns to *stop* after the new answer (exact match), not only to start it (token accuracy).
    ``memory_reads`` (what VEAD's cross-attention reads as the edit): ``"sample"`` (the paper) — the edit
    sample's layer-l_e states (image + prompt + new answer); ``"answer"`` (ours) — only the new answer's
    tokens, as the decoder's input embeddings of them, so that the rewrite is conditioned on *which*
    answer to write even where the layer-l_e states of different answers have grown alike (the IM still
    reads its keys from the edit sample's states).
    ``im_up`` (what L_up asks of the gate on edit and generality inputs): ``"all"`` (the paper) — open on
    every sampled token; ``"influence"`` (ours) — open where the token's influence target is above the
    mean (1/N) and closed elsewhere (a binary cross-entropy), so that the gate learns the region, not only
    the image.
    ``slots`` (ours; 0: the paper's cross-attention): read every memory row through K = ``slots`` learned
    elementwise scalings (K rows per row, each its own linear key and value map), so that a token's
    rewrite is its own mix of K edit-dependent directions. A memory of one row (a one-token answer with
    ``memory_reads: answer``) otherwise gives every visual token the same direction, scaled by its gate —
    a form that, optimised for each edit alone, leaves most of the second model's name and colour edits at
    layer 7 unreached (new-answer loss 0.7–5.4 on 6 of 8), while a per-token mix of 4–16 directions reaches
    nearly all (below 0.5 on 7 of 8 with 16).
    ``token_mlp`` (ours; 0: the paper's linear output map): the rewrite of each visual token is a one-hidden-
    layer MLP of width ``token_mlp`` over the token itself and what it read from the memory (GELU of their
    summed linear maps), instead of a linear map of what it read alone — so that the change a token gets
    depends on what that token shows, as the per-edit optimum does (a free change per token reaches every
    probed edit at layer 7, one shared direction does not; see ``slots``).
    ``im_layer`` (ours; None: where VEAD sits, as the paper): read the IM's keys from the edit sample's
    VEAD-off states at the output of this later layer (negative: counted from the end) — the last prompt
    token's state after the question has read the image, not before it (a partial forward pass on).
    ``memory`` (ours; the paper: False): hold every applied edit (its cached layer-l_e rows) instead of the
    last one only, and let each input attend to the one edit that ``route`` picks: ``"nearest"`` — the
    edit whose image is nearest in the visual-token space at l_e (cosine of the mean visual tokens),
    ``"gate"`` — the edit whose influence-mapper gate opens most on the input (the largest s_j) — or
    ``"joint"`` — the edit nearest in image and question (centred cosines of the mean visual token and
    of the mean question state at l_e, the latter weighted by ``route_weight``; see :mod:`.memory`).
    ``route: prompt`` — the edit whose prompt is nearest: the cosine of the input's last prompt token's state
    with the edit prompt's (VEAD off), read at ``route_layer`` — after the question has selected its
    creature, so that another question about the same image, or the same question about another
    creature, lies far from the edit's. With ``route_min`` it also acts on a *single* held edit: the edit is
    applied only to inputs whose prompt reaches the threshold (the paper's VEAD applies it to every image).
    ``route_layer`` (joint and prompt routes; None: where VEAD sits): read both keys at the output of this later
    decoder layer instead (negative: counted from the end, -1 the last), running the VEAD-off states on
    through the layers in between (a partial forward pass per routed batch) — a question's state after
    more layers of context, where a paraphrase lies nearer its original than another question about the
    same image, and visual tokens that have read one another. ``route_min`` (joint and prompt routes;
    None: always apply the chosen edit): apply it only where the route's score, as a mean of the two
    cosines ((cos_v + w · cos_q) / (1 + w)), or the prompt route's cosine, reaches this value — elsewhere
    the input is left as it is
    (as GRACE defers to the unedited model outside an edit's radius).
    ``route_scope`` (prompt route with ``route_layer``; None: raw cosines): compare the prompt keys in a
    learned scope's space instead — a linear map of the centred key fitted on the train split's probes
    (:mod:`.scope`, ``python -m visedit fit-scope``): a folder, or the name of one shipped for the model.
    ``refine_steps`` (ours; 0: the paper's single partial forward pass): at edit time, refine the edit's
    memory rows (what VEAD's cross-attention reads) by up to this many Adam steps at ``refine_lr`` on the
    edit sample's own new-answer cross-entropy (its end token included with ``eos``), VEAD's weights fixed,
    stopping once that loss is below ``refine_loss``: the learned rewrite as the start, the edit sample
    as the one example (a trained rewrite that reaches most edits, fitted to the rest). Each step is a
    forward and backward pass through the layers after VEAD.
    Settings of how an edit is *applied*, not trained: a trained VEAD is used with either.
    """

    layer: int | None = None
    at: str = "output"
    width: int | None = None
    heads: int | None = None
    im_width: int | None = None
    im_heads: int | None = None
    slots: int = 0
    token_mlp: int = 0
    im_up: str = "all"
    it_layers: int | None = None
    use_im: bool = True
    im_reads: str = "prompt"
    im_layer: int | None = None
    sigma: float = 0.7
    noise_copies: int = 4
    sampled_tokens: int = 16
    w_rel: float = 1.0
    w_gen: float = 1.0
    w_loc: float = 1.0
    w_im: float = 0.1
    steps: int = 3000
    batch: int = 4
    lr: float = 1e-3
    decay_share: float = 0.0
    hard_loc: int = 0
    w_iloc: float = 0.0
    eos: bool = False
    memory_reads: str = "sample"
    memory: bool = False
    route: str = "nearest"
    route_weight: float = 1.0
    route_layer: int | None = None
    route_min: float | None = None
    route_scope: str | None = None
    refine_steps: int = 0
    refine_lr: float = 0.05
    refine_loss: float = 0.05
    val_share: float = 0.1
    val_every: int = 250
    val_edits: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if self.at not in ("output", "input"):
            raise ValueError(f"VEADConfig.at must be 'output' or 'input', got {self.at!r}")
        if self.route not in ("nearest", "gate", "joint", "prompt"):
            raise ValueError(f"VEADConfig.route must be 'nearest', 'gate', 'joint' or 'prompt', got {self.route!r}")
        if isinstance(self.route_weight, bool) or not isinstance(self.route_weight, (int, float)) \
                or not self.route_weight >= 0:
            raise ValueError(f"VEADConfig.route_weight must be a number >= 0, got {self.route_weight!r}")
        for name in ("route_layer", "im_layer"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
                raise ValueError(f"VEADConfig.{name} must be a layer index (negative: from the end) or null, got {v!r}")
        if self.route_min is not None and (isinstance(self.route_min, bool)
                                           or not isinstance(self.route_min, (int, float))
                                           or not -1 <= self.route_min <= 1):
            raise ValueError(f"VEADConfig.route_min must be a cosine in [-1, 1] or null, got {self.route_min!r}")
        for name in ("route_layer", "route_min"):
            if getattr(self, name) is not None and self.route not in ("joint", "prompt"):
                raise ValueError(f"VEADConfig.{name} is a setting of the joint and prompt routes; set route: "
                                 f"joint or prompt, or {name}: null")
        if self.route_scope is not None:
            if not isinstance(self.route_scope, str) or not self.route_scope:
                raise ValueError(f"VEADConfig.route_scope must be a folder from fit-scope (or a shipped scope's "
                                 f"name) or null, got {self.route_scope!r}")
            if self.route != "prompt" or self.route_layer is None:
                raise ValueError("VEADConfig.route_scope is a setting of the prompt route at a later layer; set "
                                 "route: prompt and route_layer (the layer the scope was fitted at), or "
                                 "route_scope: null")
        if self.memory_reads not in ("sample", "answer"):
            raise ValueError(f"VEADConfig.memory_reads must be 'sample' or 'answer', got {self.memory_reads!r}")
        if self.im_up not in ("all", "influence"):
            raise ValueError(f"VEADConfig.im_up must be 'all' or 'influence', got {self.im_up!r}")
        if self.im_reads not in ("prompt", "image"):
            raise ValueError(f"VEADConfig.im_reads must be 'prompt' or 'image', got {self.im_reads!r}")
        for name in ("width", "heads", "im_width", "im_heads", "it_layers"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f"VEADConfig.{name} must be a positive int or null, got {v!r}")
        for name in ("noise_copies", "sampled_tokens", "steps", "batch", "val_every", "val_edits"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"VEADConfig.{name} must be a positive int, got {v!r}")
        for name, paper in (("slots", "the paper's attention"), ("token_mlp", "the paper's linear output map")):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"VEADConfig.{name} must be an int >= 0 (0: {paper}), got {v!r}")
        if isinstance(self.refine_steps, bool) or not isinstance(self.refine_steps, int) or self.refine_steps < 0:
            raise ValueError(f"VEADConfig.refine_steps must be an int >= 0 (0: off), got {self.refine_steps!r}")
        for name in ("refine_lr", "refine_loss"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"VEADConfig.{name} must be a number > 0, got {v!r}")
        if not isinstance(self.hard_loc, int) or self.hard_loc < 0:
            raise ValueError(f"VEADConfig.hard_loc must be an int >= 0 (0: off), got {self.hard_loc!r}")
        if isinstance(self.w_iloc, bool) or not isinstance(self.w_iloc, (int, float)) or not self.w_iloc >= 0:
            raise ValueError(f"VEADConfig.w_iloc must be a number >= 0 (0: off), got {self.w_iloc!r}")
        if not self.lr > 0 or not self.sigma > 0:
            raise ValueError("VEADConfig.lr and sigma must be > 0")
        if not 0 <= self.decay_share < 1:
            raise ValueError(f"VEADConfig.decay_share must be in [0, 1), got {self.decay_share}")
        if not 0 < self.val_share < 1:
            raise ValueError(f"VEADConfig.val_share must be in (0, 1), got {self.val_share}")

    def lr_at(self, step: int) -> float:
        """Adam's learning rate at (0-based) ``step``: ``lr`` until the last ``decay_share`` of the steps,
        then linearly down to lr / n at the last step (n = the number of decay steps)."""
        start = self.steps - round(self.steps * self.decay_share)
        if step < start:
            return self.lr
        return self.lr * (self.steps - step) / (self.steps - start)

    def first_layer_after(self, layer: int) -> int:
        """The first layer that reads VEAD's rewrite when it sits at ``layer``."""
        return layer if self.at == "input" else layer + 1

    def im_keys(self, states: torch.Tensor, last_prompt: Sequence[int], span: tuple[int, int]) -> torch.Tensor:
        """What the IM compares visual tokens with, from edit-sample states (B, S, d): the last prompt
        token's state (B, d) per row, or with ``im_reads: image`` the visual slice ``span`` (B, N, d)."""
        if self.im_reads == "prompt":
            return states[torch.arange(states.shape[0]), torch.as_tensor(list(last_prompt))]
        start, stop = span
        return states[:, start:stop]

    def resolved(self, d: int) -> dict:
        """The module's sizes for hidden size ``d``."""
        width = self.width or release_width(d)
        heads = self.heads or (8 if width >= 512 else 4)
        if width % heads or d % (self.im_heads or heads):
            raise ValueError(f"width {width} must divide by heads {heads}, and d = {d} by im_heads "
                             f"{self.im_heads or heads}; set width/heads/im_heads in the preset")
        sizes = {"d": d, "width": width, "heads": heads, "im_width": self.im_width or d,
                 "im_heads": self.im_heads or heads}
        return {**sizes, **{k: getattr(self, k) for k in ("slots", "token_mlp") if getattr(self, k)}}


class _Residual(nn.Module):
    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.w1, self.w2 = nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(torch.relu(self.w1(x))) + x


class VEAD(nn.Module):
    """The adapter. ``forward(V, H, mask, p)`` → (V', s) with s (B, N) the IM's gate logits."""

    def __init__(self, d: int, width: int, heads: int, im_width: int, im_heads: int, *, slots: int = 0,
                 token_mlp: int = 0, use_im: bool = True):
        super().__init__()
        self.sizes = {"d": d, "width": width, "heads": heads, "im_width": im_width, "im_heads": im_heads}
        self.sizes.update({k: v for k, v in (("slots", slots), ("token_mlp", token_mlp)) if v})
        self.heads, self.im_heads, self.use_im = heads, im_heads, use_im
        self.ln1, self.ln2, self.ln3, self.ln4 = (nn.LayerNorm(d) for _ in range(4))
        self.w_b, self.w_q = nn.Linear(d, width), nn.Linear(width, width)
        self.w_k, self.w_v = nn.Linear(d, width), nn.Linear(d, width)
        # token_mlp: the rewrite is an MLP of the token (w_tok) and what it read (w_mix); else linear in the latter
        self.w_tok, self.w_mix = (nn.Linear(d, token_mlp), nn.Linear(width, token_mlp)) if token_mlp else (None, None)
        self.w_end = nn.Linear(token_mlp or width, d)
        nn.init.zeros_(self.w_end.weight)
        nn.init.zeros_(self.w_end.bias)
        self.r1, self.r2 = _Residual(d, im_width), _Residual(d, im_width)
        # the slots' scalings start apart (1 ± N(0, 0.5) per coordinate): K equal slots would stay equal
        self.slot_scale = nn.Parameter(1 + 0.5 * torch.randn(slots, d)) if slots else None

    def influence_mapper(self) -> nn.ModuleList:
        """The IM's own modules (its two norms and two residual MLPs): what the gate is computed with."""
        return nn.ModuleList([self.ln3, self.ln4, self.r1, self.r2])

    def gate_logits(self, V: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """IM scores s (B, N) of visual tokens V (B, N, d) against the edit's IM keys: prompt states p
        (B or 1, d), or K states (B or 1, K, d), of which each token takes its best match."""
        B, N, d = V.shape
        h = self.im_heads
        v = self.r1(self.ln3(V)).view(B, N, h, d // h)
        if p.dim() == 2:
            q = self.r2(self.ln4(p)).view(p.shape[0], 1, h, d // h)
            return (v * q).sum(-1).mean(-1) / math.sqrt(d / h)
        q = self.r2(self.ln4(p)).view(p.shape[0], p.shape[1], h, d // h).expand(B, -1, -1, -1)
        return (torch.einsum("bnhc,bkhc->bnkh", v, q).mean(-1) / math.sqrt(d / h)).amax(-1)

    def forward(self, V: torch.Tensor, H: torch.Tensor, mask: torch.Tensor, p: torch.Tensor):
        B, N, _ = V.shape
        h, m = self.heads, self.w_b.out_features
        q = self.w_q(self.w_b(self.ln1(V))).view(B, N, h, m // h).transpose(1, 2)
        mem = self.ln2(H)
        if self.slot_scale is not None:  # each memory row read through every slot's scaling: n rows → n·K
            K = self.slot_scale.shape[0]
            mem = (mem[:, :, None, :] * self.slot_scale).reshape(H.shape[0], -1, H.shape[-1])
            mask = mask.bool().repeat_interleave(K, dim=1)
        k = self.w_k(mem).view(H.shape[0], -1, h, m // h).transpose(1, 2)
        v = self.w_v(mem).view(H.shape[0], -1, h, m // h).transpose(1, 2)
        if H.shape[0] != B:
            k, v = k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1)
        attn_mask = mask.to(q.device).bool()[:, None, None, :].expand(B, 1, 1, -1)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask).transpose(1, 2).reshape(B, N, m)
        if self.w_tok is not None:
            o = F.gelu(self.w_mix(o) + self.w_tok(self.ln1(V)))
        out = self.w_end(o)
        s = self.gate_logits(V, p)
        gate = torch.sigmoid(s) if self.use_im else torch.ones_like(s)
        return V + gate[..., None] * out, s
