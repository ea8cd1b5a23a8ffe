"""Models: ``load_vllm()``, the :class:`VLLM` interface, backbone adapters and the embedded tiny model."""

from .backbones import BackboneAdapter, VisualLayout, adapter_for, register_backbone, unembed
from .vllm import EMBEDDED_DIR, Inputs, Score, VLLM, load_vllm

__all__ = ["BackboneAdapter", "VisualLayout", "adapter_for", "register_backbone", "unembed", "EMBEDDED_DIR", "Inputs",
           "Score", "VLLM", "load_vllm"]
