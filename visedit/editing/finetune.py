"""Fine-tuning baselines, adapted as MMEdit adapts them to vision-language models.

- **FT-L** (``ft_l``): fine-tune the MLP of one LLM layer on the edit sample.
- **FT-V** (``ft_v``): fine-tune the vision side — the multimodal projector and, optionally, the last
  vision-encoder blocks that feed it.

Both run Adam on the edit's teacher-forced cross-entropy and stop early once the edit loss falls
below ``stop_loss`` (or after ``max_steps``). Restore copies the saved weights back bit for bit.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import torch

from ..config import StrictConfig
from ..models.devices import require_resident
from .base import EditRequest, Editor, register_editor, target_loss


@dataclasses.dataclass(frozen=True)
class FineTuneConfig(StrictConfig):
    """Shared settings of the fine-tuning editors: Adam learning rate, step budget, early stop."""

    lr: float = 1e-3
    max_steps: int = 25
    stop_loss: float = 0.05

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not isinstance(self.max_steps, int) or self.max_steps < 1:
            raise ValueError(f"max_steps must be a positive int, got {self.max_steps!r}")
        if self.stop_loss < 0:
            raise ValueError(f"stop_loss must be ≥ 0, got {self.stop_loss}")


@dataclasses.dataclass(frozen=True)
class FTLConfig(FineTuneConfig):
    """FT-L settings (preset ``presets/ft_l.yaml``)."""

    layer: int = 4  # the LLM layer whose MLP is tuned (negative counts from the end)


@dataclasses.dataclass(frozen=True)
class FTVConfig(FineTuneConfig):
    """FT-V settings (preset ``presets/ft_v.yaml``)."""

    vision_layers: int = 0  # how many of the last vision blocks are tuned besides the projector

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.vision_layers, int) or self.vision_layers < 0:
            raise ValueError(f"vision_layers must be an int ≥ 0, got {self.vision_layers!r}")


class _FineTune(Editor):

    def __init__(self, vllm, config=None):
        super().__init__(vllm, config)
        self.steps_taken = 0
        # validate the settings against the model now, not at the first edit (and refuse offloaded weights)
        require_resident(self.edited_parameters(), self.name)

    def _modules(self) -> dict[str, torch.nn.Module]:
        raise NotImplementedError

    def edited_parameters(self) -> Mapping[str, torch.nn.Parameter]:
        return {f"{site}.{name}": p for site, module in self._modules().items()
                for name, p in module.named_parameters()}

    def _apply(self, request: EditRequest) -> None:
        self._apply_batch([request])

    def _apply_batch(self, requests) -> None:
        """Tune on every request at once: the mean cross-entropy over all their target tokens."""
        params = list(self.edited_parameters().values())
        for p in params:
            p.requires_grad_(True)
        inputs = self.vllm.inputs([(r.image, r.prompt, r.target) for r in requests])
        optimizer = torch.optim.Adam(params, lr=self.config.lr)
        self.steps_taken = 0
        with torch.enable_grad():
            for _ in range(self.config.max_steps):
                loss = target_loss(self.vllm, inputs)
                if loss.item() < self.config.stop_loss:
                    break
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                self.steps_taken += 1
        for p in params:
            p.grad = None
            p.requires_grad_(False)


@register_editor
class FineTuneLayer(_FineTune):
    """FT-L: tune the MLP of LLM layer ``config.layer``."""

    name = "ft_l"
    config_class = FTLConfig

    def _modules(self):
        layer = self.vllm.adapter.check_layer(self.config.layer)
        return {f"llm.layers.{layer}.mlp": self.vllm.site(f"llm.layers.{layer}.mlp")}


@register_editor
class FineTuneVision(_FineTune):
    """FT-V: tune the projector and the last ``config.vision_layers`` vision blocks."""

    name = "ft_v"
    config_class = FTVConfig

    def _apply_batch(self, requests) -> None:
        if any(request.image is None for request in requests):
            raise ValueError("ft_v tunes the vision side and needs an edit with an image: pass EditRequest(image, "
                             "prompt, target), or edit a text-only fact with ft_l, ike or mend")
        super()._apply_batch(requests)

    def _modules(self):
        modules = {"projector": self.vllm.site("projector")}
        if self.config.vision_layers:
            blocks = self.vllm.adapter.vision_layers()
            if self.config.vision_layers > len(blocks):
                raise ValueError(f"vision_layers={self.config.vision_layers} but the vision tower feeds the "
                                 f"projector from {len(blocks)} blocks; use 0…{len(blocks)}")
            for k in range(len(blocks) - self.config.vision_layers, len(blocks)):
                modules[f"vision.blocks.{k}"] = blocks[k]
        return modules
