"""The only place that registers hooks. Every hook lives inside a context manager that removes exactly
the handles it created, in ``finally`` — never a module's whole hook dictionary (transformers registers
hooks of its own).

- :class:`Trace` — record the input and/or output of named modules during a forward pass.
- :func:`edit_output` / :func:`edit_input` — replace a module's output / first positional input.
- :func:`stop_after` — end a forward pass early once a module has run (raises :class:`StopForward`,
  caught by the context manager).
- :func:`hook_count` — how many hooks a model carries (for tests); :func:`live_hooks` — how many of them
  are this module's (transformers keeps hooks of its own on the layers once a model has run).

On a model spread over devices by accelerate (``load_vllm(…, device_map=…)``), accelerate wraps each
module's ``forward``; the hooks here are PyTorch's own forward (pre-)hooks, which run outside that wrapper:
a pre-hook sees the input *before* accelerate moves it to the module's device, a forward hook the output
after the module ran. What :func:`edit_output` / :func:`edit_input` put in place of a tensor is moved to
that tensor's device (and dtype), and :class:`Trace` can keep what it records on another device (the CPU).
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn


def _main(x: Any) -> torch.Tensor:
    """The main tensor of a module's output (first element of a tuple output)."""
    return x[0] if isinstance(x, (tuple, list)) else x


def _like(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """``new`` on ``old``'s device and in its dtype (a no-op when they already agree)."""
    return new.to(device=old.device, dtype=old.dtype) if isinstance(new, torch.Tensor) else new


def _replace_main(x: Any, new: torch.Tensor) -> Any:
    if isinstance(x, tuple):
        return (new,) + tuple(x[1:])
    if isinstance(x, list):
        return [new] + list(x[1:])
    return new


def hook_count(model: nn.Module) -> int:
    """Total number of forward (pre-)hooks registered on ``model`` and its submodules."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


#: How many hooks registered here are live on each module.
_LIVE: "weakref.WeakKeyDictionary[nn.Module, int]" = weakref.WeakKeyDictionary()


def live_hooks(model: nn.Module) -> int:
    """How many hooks registered by this module (a :class:`Trace`, an edit, a stop) are live on ``model``
    and its submodules: 0 means a forward pass of ``model`` is its plain forward pass."""
    return sum(_LIVE.get(m, 0) for m in model.modules())


class _Held(list):
    """The handles one context registered; :meth:`hold` counts each as live until it is removed."""

    def hold(self, module: nn.Module, handle) -> None:
        _LIVE[module] = _LIVE.get(module, 0) + 1
        self.append((module, handle))


@contextlib.contextmanager
def _handles() -> Iterator[_Held]:
    handles = _Held()
    try:
        yield handles
    finally:
        for module, h in handles:
            h.remove()
            left = _LIVE.get(module, 1) - 1
            if left:
                _LIVE[module] = left
            else:
                _LIVE.pop(module, None)


class Trace(contextlib.AbstractContextManager):
    """Record inputs/outputs of ``modules`` (name → module) during forward passes inside the block.

    ``trace.outputs[name]`` / ``trace.inputs[name]`` hold the main tensor of the last call
    (detached unless ``detach=False``); ``trace.kwargs[name]`` the keyword arguments of that call
    (recorded with ``inputs=True``; e.g. an attention module's ``position_embeddings``). With ``device``
    the recorded tensors are kept there (e.g. ``"cpu"``: a cache in CPU memory for a model on GPUs);
    the keyword arguments stay where the module got them.
    """

    def __init__(self, modules: Mapping[str, nn.Module], *, inputs: bool = False, outputs: bool = True,
                 detach: bool = True, device: str | torch.device | None = None):
        self.modules = dict(modules)
        self.want_inputs, self.want_outputs, self.detach = inputs, outputs, detach
        self.device = torch.device(device) if device is not None else None
        self.inputs: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self.kwargs: dict[str, dict] = {}
        self._stack = contextlib.ExitStack()

    def _keep(self, t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return t
        t = t.detach() if self.detach else t
        return t.to(self.device) if self.device is not None else t

    def __enter__(self) -> "Trace":
        handles = self._stack.enter_context(_handles())
        try:
            for name, module in self.modules.items():
                if self.want_inputs:
                    def pre(mod, args, kwargs, _n=name):
                        x = args[0] if args else kwargs.get("hidden_states")
                        self.inputs[_n] = self._keep(x)
                        self.kwargs[_n] = dict(kwargs)
                    handles.hold(module, module.register_forward_pre_hook(pre, with_kwargs=True))
                if self.want_outputs:
                    def post(mod, args, out, _n=name):
                        self.outputs[_n] = self._keep(_main(out))
                    handles.hold(module, module.register_forward_hook(post))
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()


@contextlib.contextmanager
def edit_output(module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Inside the block, ``module``'s (main) output is replaced by ``fn(output)``."""
    with _handles() as handles:
        handles.hold(module, module.register_forward_hook(
            lambda mod, args, out: _replace_main(out, _like(fn(_main(out)), _main(out)))))
        yield


@contextlib.contextmanager
def edit_input(module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Inside the block, ``module``'s first input (``hidden_states``) is replaced by ``fn(input)``."""

    def pre(mod, args, kwargs):
        if args:
            return (_like(fn(args[0]), args[0]),) + tuple(args[1:]), kwargs
        x = kwargs["hidden_states"]
        return args, {**kwargs, "hidden_states": _like(fn(x), x)}

    with _handles() as handles:
        handles.hold(module, module.register_forward_pre_hook(pre, with_kwargs=True))
        yield


class StopForward(Exception):
    """Raised by :func:`stop_after` to end a forward pass early."""


@contextlib.contextmanager
def stop_after(module: nn.Module) -> Iterator[None]:
    """Run forward passes inside the block only until ``module`` has produced its output."""

    def post(mod, args, out):
        raise StopForward

    with _handles() as handles:
        handles.hold(module, module.register_forward_hook(post))
        try:
            yield
        except StopForward:
            pass
