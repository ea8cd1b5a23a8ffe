"""Shared fixtures: tiny random models built from configs (fast) and the embedded model (integration)."""

from __future__ import annotations

import pytest

from visedit.models.tiny import TinyConfig, build_model, build_processor
from visedit.world import make_world

SMALL = TinyConfig(image_size=32, patch_size=8, vision_hidden=32, vision_layers=2, vision_heads=2,
                   vision_intermediate=64, hidden=48, layers=3, heads=2, intermediate=96, max_positions=128)


@pytest.fixture(scope="session")
def world():
    return make_world(0)


@pytest.fixture(scope="session")
def tiny_random_dir(tmp_path_factory, world):
    """A tiny random LLaVA built from a config and saved like a real checkpoint."""
    path = tmp_path_factory.mktemp("tiny_random_llava")
    processor = build_processor(world, SMALL)
    model = build_model(processor.tokenizer, SMALL, seed=0)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_random(tiny_random_dir):
    from visedit.models import load_vllm

    return load_vllm(tiny_random_dir)


@pytest.fixture
def tiny_random_retrained(tiny_random):
    """A copy of ``tiny_random`` with one weight tensor shifted: same name and config, other weights (what a
    retrained model looks like to code that identifies models)."""
    import copy

    import torch

    other = copy.deepcopy(tiny_random)
    with torch.no_grad():
        next(other.model.parameters()).add_(0.5)
    return other


@pytest.fixture(scope="session")
def embedded():
    from visedit.models import load_vllm

    return load_vllm()
