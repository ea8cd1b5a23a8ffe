"""The one training loop every trainer runs (the tiny models' stages, VEAD, MEND).

A trainer keeps its data, its loss and its optimiser (with its parameter groups); :func:`fit` owns the rest:
the step loop, the learning rate of each step, ``zero_grad`` / ``backward`` / clip / ``step``, the running
loss, the progress bar, what runs every K steps (logging, checkpoints, validation), a budget of steps for
this call, and resuming at a given step with the optimiser's state::

    state = fit(loss_at, opt, steps, lr=lambda s: warmup_cosine(s, steps, 100, 5e-4),
                clip_params=params, max_norm=1.0, callbacks=[Every(100, save, at_end=True)])

``loss_at(step)`` draws its batch from seeds of ``step`` alone and returns the loss tensor, or ``(loss,
parts)`` with floats to show on the bar (and keep in ``state.parts``). The loop adds no randomness and no
float operation of its own to the training, so a run resumed at step k ends as one never stopped.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Iterable, Mapping

import torch

#: The running loss: ``running ← 0.98 · running + 0.02 · loss`` (the first step's loss to start); both
#: weights written out, as 1 − 0.98 is not 0.02 in floating point.
KEEP, TAKE = 0.98, 0.02


@dataclasses.dataclass
class FitState:
    """Where a :func:`fit` call is: ``step`` steps done of ``steps``; the last step's objective (``loss``)
    and ``parts``; the running loss; the wall seconds of this call so far."""

    step: int
    steps: int
    loss: float | None = None
    parts: dict = dataclasses.field(default_factory=dict)
    running: float | None = None
    seconds: float = 0.0

    @property
    def finished(self) -> bool:
        return self.step >= self.steps


@dataclasses.dataclass(frozen=True)
class Every:
    """Call ``fn(state)`` after every ``steps``-th step (counted from step 0; 0: never), and with ``at_end``
    also after the last step of the call (the last of all, or the last ``stop_after`` allows)."""

    steps: int
    fn: Callable[[FitState], None]
    at_end: bool = False


def warmup_cosine(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warm-up to ``peak`` over ``warmup`` steps, then a cosine down to 0 at ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def fit(loss_at: Callable[[int], torch.Tensor | tuple[torch.Tensor, Mapping[str, float]]],
        optimizer: torch.optim.Optimizer, steps: int, *, lr: Callable[[int], float] | None = None,
        clip_params: Iterable[torch.nn.Parameter] | None = None, max_norm: float | None = None,
        start: int = 0, optimizer_state: dict | None = None, running: float | None = None,
        stop_after: int | None = None, callbacks: Iterable[Every] = (), desc: str = "train",
        progress: bool = True) -> FitState:
    """Run steps ``start`` … ``steps`` − 1 of ``optimizer`` on ``loss_at(step)``; return the :class:`FitState`.

    ``lr(step)``: each step's learning rate, set on every parameter group (None: left as it is).
    ``clip_params`` / ``max_norm``: clip the gradient norm of these parameters (in this order) before each
    step. ``start`` / ``optimizer_state`` / ``running``: resume a run at step ``start`` with the optimiser's
    saved state and running loss. ``stop_after``: run at most this many steps in this call (then
    ``state.finished`` is False). A step's ``parts`` entry ``"loss"``, when there is one, is what the running
    loss follows (e.g. the answer loss without an auxiliary term); otherwise it follows the objective.
    """
    from tqdm.auto import tqdm

    if (clip_params is None) != (max_norm is None):
        raise ValueError("fit clips with both clip_params and max_norm, or neither: pass both")
    if not 0 <= start <= steps:
        raise ValueError(f"fit's start must be in 0…{steps} (steps), got {start}")
    clip_params = list(clip_params) if clip_params is not None else None
    callbacks = list(callbacks)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    end = steps if stop_after is None else min(steps, start + max(stop_after, 0))
    state = FitState(step=start, steps=steps, running=running)
    t0 = time.time()
    bar = tqdm(range(start, end), desc=desc, disable=not progress, initial=start, total=steps)
    for step in bar:
        if lr is not None:
            rate = lr(step)
            for group in optimizer.param_groups:
                group["lr"] = rate
        with torch.enable_grad():
            out = loss_at(step)
            loss, parts = out if isinstance(out, tuple) else (out, {})
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if clip_params is not None:
                torch.nn.utils.clip_grad_norm_(clip_params, max_norm)
            optimizer.step()
        value = float(parts["loss"]) if "loss" in parts else loss.item()
        state.running = value if state.running is None else KEEP * state.running + TAKE * value
        state.step, state.loss, state.parts = step + 1, loss.item(), dict(parts)
        state.seconds = time.time() - t0
        bar.set_postfix({"loss": f"{state.running:.3f}",
                         **{k: f"{v:.3f}" for k, v in state.parts.items() if k != "loss"}})
        for every in callbacks:
            if (every.steps and state.step % every.steps == 0) or (every.at_end and state.step == end):
                every.fn(state)
    return state
