"""Devices: the checks on ``device`` / ``device_map`` values, and where the parts of a model spread over
several devices (or offloaded to the CPU or disk) by accelerate live.

A model loaded with ``load_vllm(path, device_map=…)`` carries accelerate's hooks: each module runs on its
*execution device*, and the weights of an offloaded module sit on the ``meta`` device except while it
runs. Code that reads a module's weights directly (the decoder math of the batched engines, DLA)
wraps the read in :func:`onloaded`; code that adds to a tensor moves what it adds to that tensor's
device; noise is drawn on :func:`execution_device` of the layer it perturbs. accelerate is only
imported when a model carries its hooks, so ``import visedit`` never needs it.
"""

from __future__ import annotations

import contextlib
import importlib.util
from typing import Iterator, Mapping

import torch
from torch import nn

#: The ``device_map`` strings transformers and accelerate understand (besides a single device).
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
#: Where accelerate may put a module besides a torch device: offloaded to the CPU or to disk.
OFFLOAD_TARGETS = ("cpu", "disk")
MULTI_GPU_EXTRA = "pip install 'visedit[multi-gpu]'  (or: pip install accelerate)"


def check_device(device, *, what: str = "device") -> torch.device:
    """``device`` as a :class:`torch.device`, or a one-line ``ValueError`` when it is not a device this
    machine has (an unknown name, CUDA without a GPU, a GPU index past the last)."""
    if isinstance(device, bool) or not isinstance(device, (str, int, torch.device)):
        raise ValueError(f"{what} must be a device name such as 'cpu', 'cuda' or 'cuda:1', got {device!r}")
    try:
        dev = torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    except (RuntimeError, ValueError):
        raise ValueError(f"unknown {what} {device!r}: use 'cpu', 'cuda', 'cuda:N' or 'mps'") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"{what} {device!r} asks for a CUDA GPU, but this machine has none "
                             "(torch.cuda.is_available() is False): use 'cpu'")
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"{what} {device!r} asks for GPU {dev.index}, but this machine has {count} "
                             f"(cuda:0…cuda:{count - 1})")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{what} {device!r} asks for Apple's MPS, which this machine does not have: use 'cpu'")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"{what} {device!r} is not a device visedit runs models on: use 'cpu', 'cuda', 'cuda:N' "
                         "or 'mps'")
    return dev


def check_device_map(device_map, *, offload_folder=None) -> str | dict:
    """Validate a ``device_map`` for :func:`~visedit.models.load_vllm` before anything loads: a strategy
    (``"auto"``, ``"balanced"``, ``"balanced_low_0"``, ``"sequential"``), one device, or a dict from module
    names to devices (``0``, ``"cuda:1"``, ``"cpu"``, ``"disk"``). Disk offload needs ``offload_folder``,
    and every device map needs accelerate. Returns the map (devices in a dict as strings or ints)."""
    if importlib.util.find_spec("accelerate") is None:
        raise ValueError(f"device_map needs the optional package accelerate, which is not installed: {MULTI_GPU_EXTRA}")
    if isinstance(device_map, str) and device_map in DEVICE_MAP_STRATEGIES:
        return device_map
    if isinstance(device_map, (str, int, torch.device)) and not isinstance(device_map, bool):
        return str(check_device(device_map, what="device_map"))
    if not isinstance(device_map, Mapping) or not device_map:
        raise ValueError(f"device_map must be one of {', '.join(map(repr, DEVICE_MAP_STRATEGIES))}, a device, or a "
                         f"non-empty dict from module names to devices, got {device_map!r}")
    out = {}
    for name, target in device_map.items():
        if not isinstance(name, str):
            raise ValueError(f"device_map keys must be module names (str), got {name!r}")
        if target == "disk":
            if offload_folder is None:
                raise ValueError(f"device_map puts {name!r} on 'disk': pass offload_folder=… (a folder for its weights)")
            out[name] = target
        elif isinstance(target, int) and not isinstance(target, bool):
            check_device(target, what=f"device_map[{name!r}]")
            out[name] = target
        else:
            out[name] = str(check_device(target, what=f"device_map[{name!r}]"))
    return out


def check_map_modules(model: nn.Module, device_map: Mapping[str, object]) -> None:
    """Refuse, in one line, a device-map dict that names a module ``model`` does not have or leaves some of
    its weights without a device (``model`` may be an empty skeleton on ``meta``). Keys are module names, or
    the names of weights that sit directly on a module (BLIP-2's ``query_tokens``), as accelerate writes them."""
    weights = list(model.state_dict())
    names = {n for n, _ in model.named_modules()} | set(weights)
    unknown = [k for k in device_map if k not in names]
    if unknown:
        tops = ", ".join(repr(n) for n, _ in model.named_children())
        raise ValueError(f"device_map names {unknown[0]!r}{f' (and {len(unknown) - 1} more)' if len(unknown) > 1 else ''}, "
                         f"which is not a module of this model: use module names (the top ones are {tops})")
    keys = list(device_map)
    covered = lambda name: any(k == "" or name == k or name.startswith(k + ".") for k in keys)  # noqa: E731
    missing = [name for name in weights if not covered(name)]
    if missing:
        parts = missing[0].split(".")
        root = next(".".join(parts[:i]) for i in range(1, len(parts) + 1)
                    if not any(k == ".".join(parts[:i]) or k.startswith(".".join(parts[:i]) + ".") for k in keys))
        raise ValueError(f"device_map gives no device to {len(missing)} weights ({missing[0]}, …): give every module "
                         f"a device, e.g. add {root!r}")


def _align_hook(module: nn.Module):
    """accelerate's AlignDevicesHook on ``module`` (also inside a SequentialHook), or None."""
    hook = getattr(module, "_hf_hook", None)
    for h in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
        if hasattr(h, "execution_device"):
            return h
    return None


def is_dispatched(model: nn.Module) -> bool:
    """True when accelerate has spread ``model`` over devices or offloaded part of it (its hooks are on)."""
    return any(_align_hook(m) is not None for m in model.modules())


def execution_device(module: nn.Module, default: torch.device | None = None) -> torch.device:
    """The device ``module`` runs on: accelerate's execution device when the model is dispatched (also for
    offloaded weights, which wait on ``meta``), else the device of its first parameter or buffer; ``default``
    (else the CPU) for a module with neither."""
    hook = _align_hook(module)
    if hook is not None and hook.execution_device is not None:
        dev = hook.execution_device
        return torch.device("cuda", dev) if isinstance(dev, int) else torch.device(dev)
    for t in (*module.parameters(), *module.buffers()):
        if t.device.type != "meta":
            return t.device
    return default if default is not None else torch.device("cpu")


def offloaded(module: nn.Module) -> list[str]:
    """Names of ``module``'s parameters whose weights accelerate keeps off-device (on ``meta`` until used)."""
    return [name for name, p in module.named_parameters() if p.device.type == "meta"]


@contextlib.contextmanager
def onloaded(*modules: nn.Module) -> Iterator[None]:
    """Inside the block, the weights of ``modules`` (and their submodules) that accelerate offloads are
    loaded on their execution device, so that code may read ``module.weight`` directly; they go back to
    ``meta`` on exit. A no-op for a model that is not dispatched."""
    held = []
    for module in modules:
        for m in module.modules():
            hook = _align_hook(m)
            if hook is not None and getattr(hook, "offload", False) and any(
                    p.device.type == "meta" for p in m.parameters(recurse=False)):
                held.append((m, hook))
    try:
        for m, hook in held:  # what accelerate does around the module's own forward
            hook.pre_forward(m)
        yield
    finally:
        for m, hook in held:
            hook.post_forward(m, None)


def parameter_values(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``model.named_parameters()`` with the values of offloaded weights (loaded one module at a time)."""
    seen: set[int] = set()
    for prefix, module in model.named_modules():
        direct = [(n, p) for n, p in module.named_parameters(recurse=False) if id(p) not in seen]
        if not direct:
            continue
        seen.update(id(p) for _, p in direct)
        with onloaded(module) if any(p.device.type == "meta" for _, p in direct) else contextlib.nullcontext():
            for name, _ in direct:
                yield (f"{prefix}.{name}" if prefix else name), getattr(module, name).detach()


def require_resident(params: Mapping[str, torch.Tensor], what: str) -> None:
    """Refuse, in one line, to change weights that accelerate offloads (they are reloaded from their
    offload copy at every call, so an update would not stick)."""
    away = [name for name, p in params.items() if p.device.type == "meta"]
    if away:
        raise ValueError(f"{what} changes weights that accelerate offloads to the CPU or disk ({away[0]}"
                         f"{f' and {len(away) - 1} more' if len(away) > 1 else ''}): put that module on a device "
                         "in the device_map")
