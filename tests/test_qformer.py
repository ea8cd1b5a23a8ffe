"""Query tokens back onto the patch grid through the Q-Former's cross-attention (tiny random checkpoints)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from visedit.attribution import query_patch_weights, query_to_patches, score_heatmap
from visedit.hooks import hook_count
from visedit.models import load_vllm
from visedit.models.zoo import build_checkpoint

QUESTION = "what colour is this creature ?"


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    return Image.fromarray((rng.random((32, 32, 3)) * 255).astype("uint8"))


@pytest.fixture(scope="module", params=["blip2-llama", "blip2-opt", "instructblip"])
def qformer_model(request, tmp_path_factory):
    return load_vllm(build_checkpoint(request.param, tmp_path_factory.mktemp(request.param)))


def _eager_cross_attention(vllm, image) -> torch.Tensor:
    """Oracle: transformers' own cross-attention weights (eager attention returns them), (Q, 1 + patches)
    averaged over heads and cross-attending layers."""
    model = vllm.model
    was = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        inp = vllm.inputs([(image, QUESTION)])
        with torch.no_grad():
            pixels = model.vision_model(inp.tensors["pixel_values"]).last_hidden_state
            queries = model.query_tokens.expand(1, -1, -1)
            text = {}
            if "qformer_input_ids" in inp.tensors:  # InstructBLIP's Q-Former reads the instruction too
                text = {"input_ids": inp.tensors["qformer_input_ids"],
                        "attention_mask": torch.cat([torch.ones(queries.shape[:2], dtype=torch.long),
                                                     inp.tensors["qformer_attention_mask"]], 1)}
            out = model.qformer(query_embeds=queries, encoder_hidden_states=pixels, output_attentions=True,
                                encoder_attention_mask=torch.ones(pixels.shape[:2], dtype=torch.long), **text)
    finally:
        model.set_attn_implementation(was)
    return torch.stack(list(out.cross_attentions)).mean(0)[0].mean(0)


def test_a_one_hot_query_map_is_that_querys_mean_cross_attention_row(qformer_model, image):
    """Oracle: one-hot on query j (score c) gives c × query j's cross-attention row over the patches
    (mean over heads and layers, the class token dropped, renormalised); every map keeps its sum."""
    vllm = qformer_model
    ref = _eager_cross_attention(vllm, image)[:, 1:]
    before = hook_count(vllm.model)  # after a first forward (transformers adds output-capturing hooks of its own)
    ref = (ref / ref.sum(-1, keepdim=True)).numpy()
    weights = query_patch_weights(vllm, image, QUESTION)
    n, rows, cols = weights.shape
    assert n == vllm.model.config.num_query_tokens and (rows, cols) == (4, 4)
    assert np.abs(weights.reshape(n, -1) - ref).max() <= 1e-6
    for j in (0, n - 1):
        scores = np.zeros(n)
        scores[j] = 2.5
        qmap = query_to_patches(vllm, image, QUESTION, scores)
        assert np.allclose(qmap.heatmap().ravel(), 2.5 * ref[j], atol=1e-6)
    scores = np.random.default_rng(1).normal(size=n)
    qmap = query_to_patches(vllm, image, QUESTION, scores)
    assert qmap.heatmap().sum() == pytest.approx(scores.sum(), abs=1e-6), "the sum is preserved"
    double = query_to_patches(vllm, image, QUESTION, 2 * scores - 1)
    assert np.allclose(double.heatmap(), 2 * qmap.heatmap() - weights.sum(0), atol=1e-6), "linear in the scores"
    assert hook_count(vllm.model) == before


def test_the_query_map_is_scored_against_a_mask_and_serialises(qformer_model, image):
    vllm = qformer_model
    qmap = query_to_patches(vllm, image, QUESTION, np.ones(vllm.model.config.num_query_tokens))
    mask = np.zeros((32, 32), dtype=bool)
    mask[:16, :16] = True
    score = score_heatmap(qmap.heatmap(), mask)
    assert score.pointing_game in (0.0, 1.0) and score.lift >= 0
    assert qmap.grid == (4, 4) and qmap.to_dict()["query_scores"] == qmap.query_scores
    assert len(qmap.to_dict()["weights"]) == vllm.model.config.num_query_tokens
    assert qmap.plot(image=image, mask=mask).data


def test_query_maps_refuse_in_one_line(qformer_model, image, tmp_path):
    vllm = qformer_model
    for call, message in ((lambda: query_to_patches(vllm, image, QUESTION, [1.0, 2.0]), "query tokens: pass one"),
                          (lambda: query_to_patches(vllm, None, QUESTION, [1.0]), "needs an image")):
        with pytest.raises(ValueError, match=message) as err:
            call()
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="needs an image"):
        vllm.adapter.query_patch_weights(vllm.inputs([(None, QUESTION)]))


def test_a_patch_grid_model_refuses_query_maps(image, tmp_path):
    llava = load_vllm(build_checkpoint("llava", tmp_path / "llava"))
    with pytest.raises(ValueError, match="mapping query tokens onto patches is not supported for LLaVA: its visual "
                                         "tokens are not Q-Former queries"):
        query_to_patches(llava, image, QUESTION, np.ones(16))
