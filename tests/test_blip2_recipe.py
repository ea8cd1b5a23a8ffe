"""The BLIP-2 teaching model's recipe: the CLIP tower converted exactly, the shared encoder and streams, the
training frame, resume, loading, the model card and the CLI."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest
import torch

from tests.test_recipe import MICRO
from visedit.models import load_vllm
from visedit.models.recipe import (_Batcher, build_blip2_recipe_model, build_blip2_recipe_processor,
                                   build_recipe_processor, load_encoder, recipe_config, scene_turns, train_recipe)
from visedit.world import make_world, render_scene

#: MICRO with a Q-Former of its size (32 queries, as BLIP-2's).
MICRO_BLIP2 = {**MICRO, "qformer_hidden": 32, "qformer_layers": 2, "qformer_heads": 2, "qformer_intermediate": 64}


def blip2_config(**extra):
    return recipe_config("blip2", **{**MICRO_BLIP2, **extra})


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


@pytest.fixture(scope="module")
def micro_world():
    return make_world(0, 12)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A LLaVA-recipe run, a BLIP-2 run on its encoder, and a BLIP-2 run that trains its own encoder."""
    root = tmp_path_factory.mktemp("blip2")
    llava = train_recipe(root / "llava", recipe_config("llava", **MICRO), progress=False, log_every=0)
    shared = train_recipe(root / "shared", blip2_config(), progress=False, log_every=0, encoder_from=root / "llava")
    own = train_recipe(root / "own", blip2_config(), progress=False, log_every=0)
    return root, {"llava": llava, "shared": shared, "own": own}


def _random_clip(layers: int = 3):
    """A CLIP tower whose every weight, biases and LayerNorms included, is random (nothing left at 0 or 1)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    tower = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                             num_attention_heads=2, image_size=32, patch_size=8))
    with torch.no_grad():
        for p in tower.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return tower.eval()


@pytest.mark.parametrize("layers", [3, 2])
def test_the_converted_tower_computes_what_the_clip_tower_computes(layers):
    """Oracle: on the same pixels the BLIP-2 tower's blocks give the CLIP tower's hidden states (≤ 1e-5;
    on this CPU bit for bit); with every block, its final LayerNorm gives CLIP's post-LayerNorm."""
    from transformers import Blip2VisionConfig

    from visedit.models.blip2 import PreNormVisionEmbeddings, convert_clip_tower, vision_config_of
    from transformers.models.blip_2.modeling_blip_2 import Blip2VisionModel

    clip = _random_clip()
    vision = Blip2VisionModel(Blip2VisionConfig(**vision_config_of(clip.config, layers=layers)))
    vision.embeddings = PreNormVisionEmbeddings(vision.config)
    convert_clip_tower(clip, vision)
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = clip(pixels, output_hidden_states=True).hidden_states
        got = vision(pixels, output_hidden_states=True)
    assert len(got.hidden_states) == layers + 1
    for k in range(layers + 1):
        assert (got.hidden_states[k] - ref[k]).abs().max() <= 1e-5, k
    if layers == 3:
        assert (got.last_hidden_state - clip.post_layernorm(ref[-1])).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="cannot convert a CLIP tower of 3 blocks"):
        convert_clip_tower(clip, Blip2VisionModel(Blip2VisionConfig(**vision_config_of(clip.config, layers=4))))


def test_blip2_training_sequences_are_the_ids_the_model_is_read_with(micro_world):
    """The training frame is exactly what VLLM.inputs builds for the BLIP-2 in its saved frame (oracle:
    the Blip2Processor, which puts the 32 query tokens before the text)."""
    from visedit.models.backbones import PromptFrame
    from visedit.models.recipe import FRAME
    from visedit.models.vllm import VLLM

    cfg = blip2_config()
    processor = build_blip2_recipe_processor(micro_world, cfg)
    vllm = VLLM(build_blip2_recipe_model(processor.tokenizer, cfg), processor,
                template=PromptFrame(FRAME, image_in_text=False))
    batcher = _Batcher(processor, micro_world, cfg)
    scene = render_scene(micro_world.entities[:3], seed=1)
    (q, a), = scene_turns(scene, random.Random(0), 1)
    inp = vllm.inputs([(scene.image, q, a)])
    ids, labels = batcher.sequence([(q, a)], True)
    assert inp.tensors["input_ids"][0].tolist() == ids[:-1]
    assert inp.visual_spans[0] == (0, 32) and ids[:32] == [vllm.adapter.image_token_id] * 32
    answer = [i for i, l in zip(ids, labels) if l != -100]
    assert answer == list(inp.target_ids[0]) + [processor.tokenizer.eos_token_id]
    q = f"what does the {micro_world.entities[0].name} eat ?"
    assert vllm.inputs([(None, q, "fish")]).tensors["input_ids"][0].tolist() == batcher.sequence([(q, "fish")],
                                                                                                   False)[0][:-1]
    base = build_recipe_processor(micro_world, cfg).tokenizer
    assert processor.tokenizer.get_vocab() == base.get_vocab(), "the llava recipe's tokenizer, ids unchanged"


def test_the_blip2_recipe_changes_the_bridge_only():
    cfg, base = recipe_config("blip2"), recipe_config("llava")
    assert cfg.architecture == "blip2" and cfg.num_query_tokens == 32 and cfg.n_visual == 32
    assert cfg.layers == base.layers and cfg.vision_layers == base.vision_layers and cfg.hidden == base.hidden
    with pytest.raises(ValueError, match="unknown architecture"):
        recipe_config("llava", architecture="blip3")
    with pytest.raises(ValueError, match="reads a frozen encoder"):
        recipe_config("blip2", frozen_encoder=False)
    with pytest.raises(ValueError, match="divisible by qformer_heads"):
        recipe_config("blip2", qformer_hidden=30)


def test_a_blip2_run_writes_a_loadable_model_that_answers(runs, micro_world):
    root, records = runs
    vllm = load_vllm(root / "shared")
    assert type(vllm.adapter).__name__ == "Blip2LlamaAdapter" and vllm.model.config.num_query_tokens == 32
    assert vllm.info["recipe"] == "blip2" and vllm.info["edition"] == 2 and vllm.frame.template.startswith("USER:")
    assert vllm.info["encoder"] == records["shared"]["encoder_from"]["digest"]
    assert set(records["shared"]["seconds"]) == {"language", "align", "instruct"}, "no encoder stage"
    weights = _weights(root / "shared")
    assert all(v.dtype == torch.float16 for v in weights.values()), "half precision on disk"
    assert (root / "shared" / "model.safetensors").stat().st_size <= 30 * 2**20
    scene = render_scene(micro_world.entities[:2], seed=0)
    assert isinstance(vllm.answer(scene.image, "what does the creature on the left eat ?"), str)
    assert isinstance(vllm.answer(None, f"where does the {micro_world.entities[0].name} live ?"), str)


def test_the_blip2_encoder_is_the_source_encoder_bit_for_bit(runs):
    """The saved tower holds the LLaVA model's tower up to its penultimate block, weight for weight (q, k
    and v fused), and computes its penultimate hidden states on real pixels; it never trained."""
    root, _ = runs
    llava, blip2 = load_vllm(root / "llava"), load_vllm(root / "shared")  # float32 from half: exact
    src, dst = llava.model.model.vision_tower.state_dict(), blip2.model.vision_model.state_dict()
    assert torch.equal(dst["embeddings.patch_embedding.weight"], src["embeddings.patch_embedding.weight"])
    assert not dst["embeddings.patch_embedding.bias"].any()
    assert torch.equal(dst["embeddings.class_embedding"].flatten(), src["embeddings.class_embedding"])
    assert torch.equal(dst["embeddings.position_embedding"][0], src["embeddings.position_embedding.weight"])
    for kind in ("weight", "bias"):
        assert torch.equal(dst[f"embeddings.pre_layernorm.{kind}"], src[f"pre_layrnorm.{kind}"])
    blocks = MICRO["vision_layers"] - 1
    assert not any(k.startswith(f"encoder.layers.{blocks}.") for k in dst), "the penultimate layer is the last"
    for b in range(blocks):
        p = f"encoder.layers.{b}."
        for kind in ("weight", "bias"):
            fused = torch.cat([src[f"{p}self_attn.{x}_proj.{kind}"] for x in "qkv"])
            assert torch.equal(dst[f"{p}self_attn.qkv.{kind}"], fused)
            assert torch.equal(dst[f"{p}self_attn.projection.{kind}"], src[f"{p}self_attn.out_proj.{kind}"])
            for name in ("layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2"):
                assert torch.equal(dst[f"{p}{name}.{kind}"], src[f"{p}{name}.{kind}"]), name
    scene = render_scene(make_world(0, 12).entities[:3], seed=5)
    pixels = llava.inputs([(scene.image, "describe the picture .")]).tensors["pixel_values"]
    assert torch.equal(pixels, blip2.inputs([(scene.image, "describe the picture .")]).tensors["pixel_values"])
    with torch.no_grad():
        ref = llava.model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-2]
        got = blip2.model.vision_model(pixels, output_hidden_states=True).hidden_states[-1]
    assert (got - ref).abs().max() <= 1e-5


def test_without_a_source_the_blip2_recipe_trains_the_llava_recipes_encoder_and_decoder(runs, tmp_path):
    """Same seeds, same streams: its encoder stage ends with the llava recipe's tower and its language
    stage with the llava recipe's decoder, bit for bit (only the bridge differs between the two)."""
    root, _ = runs
    first = MICRO["encoder_steps"] + MICRO["language_steps"]
    train_recipe(tmp_path / "l", recipe_config("llava", **MICRO), progress=False, log_every=0, stop_after=first)
    train_recipe(tmp_path / "b", blip2_config(), progress=False, log_every=0, stop_after=first)
    llava = torch.load(tmp_path / "l.ckpt", weights_only=False)["modules"]
    blip2 = torch.load(tmp_path / "b.ckpt", weights_only=False)["modules"]
    tower = {k[len("model.vision_tower."):]: v for k, v in llava["model"].items() if k.startswith("model.vision_tower.")}
    assert tower.keys() == blip2["tower"].keys() and all(torch.equal(tower[k], blip2["tower"][k]) for k in tower)
    decoder = {k.replace("model.language_model.", "language_model.model."): v for k, v in llava["model"].items()
               if k.startswith("model.language_model.")} | {"language_model.lm_head.weight": llava["model"]["lm_head.weight"]}
    assert all(torch.equal(decoder[k], blip2["model"][k]) for k in decoder)
    encoder = load_encoder(tmp_path / "l.ckpt", blip2_config())  # a checkpoint past its encoder stage is a source
    assert all(torch.equal(encoder[k], tower[k]) for k in tower)
    own, llava_tower = load_vllm(root / "own").model.vision_model, load_vllm(root / "llava").model.model.vision_tower
    assert torch.equal(own.embeddings.pre_layernorm.weight, llava_tower.pre_layrnorm.weight), "the same encoder"


def test_a_stopped_blip2_run_resumes_to_the_same_weights(runs, tmp_path):
    """Stopped anywhere — mid-stage, at a stage's end, in the encoder stage — and resumed, a BLIP-2 run
    ends bit-identical to one never stopped."""
    root, records = runs
    target = tmp_path / "r"
    for chunk in (2, 2, 3, 1, 2):
        record = train_recipe(target, blip2_config(), progress=False, log_every=0, stop_after=chunk)
        assert record.get("stopped") and not target.exists()
    resumed = train_recipe(target, blip2_config(), progress=False, log_every=0)
    a, b = _weights(root / "own"), _weights(target)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for stage in ("encoder", "language", "align", "instruct"):
        assert resumed[f"{stage}_loss"] == records["own"][f"{stage}_loss"]
        assert resumed[f"{stage}_running"] == records["own"][f"{stage}_running"]


def test_a_resumed_blip2_run_must_read_the_same_encoder(runs, tmp_path):
    root, _ = runs
    train_recipe(tmp_path / "x", blip2_config(), progress=False, log_every=0, stop_after=4, encoder_from=root / "llava")
    with pytest.raises(ValueError, match="pass encoder_from="):
        train_recipe(tmp_path / "x", blip2_config(), progress=False, log_every=0)
    resumed = train_recipe(tmp_path / "x", blip2_config(), progress=False, log_every=0, encoder_from=root / "llava")
    assert not resumed.get("stopped")
    a, b = _weights(root / "shared"), _weights(tmp_path / "x")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_encoder_sources_are_refused_in_one_line(runs, tmp_path):
    root, _ = runs
    cases = [(root / "nothing", "no such encoder folder, model folder or checkpoint"),
             (root / "shared", "not a LLaVA-recipe model folder")]
    train_recipe(tmp_path / "e", recipe_config("llava", **MICRO), progress=False, log_every=0, stop_after=1)
    cases.append((tmp_path / "e.ckpt", "still in its encoder stage"))
    for path, message in cases:
        with pytest.raises(ValueError, match=message) as err:
            load_encoder(path, blip2_config())
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="other settings: world_seed 0 \\(this run: 1\\)"):
        load_encoder(root / "llava", blip2_config(world_seed=1))
    with pytest.raises(ValueError, match="need a frozen encoder; recipe 'joint-encoder' trains its tower"):
        train_recipe(tmp_path / "f", recipe_config("joint-encoder", **{**MICRO, "encoder_steps": 0}),
                     encoder_from=root / "llava")


def test_a_checkpoint_written_before_new_settings_still_resumes(tmp_path):
    """A checkpoint whose config lacks the settings added since (architecture, the Q-Former's) resumes:
    they have their defaults there."""
    cfg = recipe_config("llava", **MICRO)
    train_recipe(tmp_path / "o", cfg, progress=False, log_every=0, stop_after=1)
    state = torch.load(tmp_path / "o.ckpt", weights_only=False)
    for key in ("architecture", "num_query_tokens", "qformer_hidden", "qformer_layers", "qformer_heads",
                "qformer_intermediate"):
        del state["config"][key]
    torch.save(state, tmp_path / "o.ckpt")
    assert not train_recipe(tmp_path / "o", cfg, progress=False, log_every=0).get("stopped")


def test_model_card_of_the_blip2_model_measures_selectors(runs):
    from visedit.models.card import model_card

    root, _ = runs
    card = model_card(load_vllm(root / "shared"), make_world(0, 12), entities=[0, 1], progress=False)
    assert card.selector_accuracy is not None and 0 <= card.selector_accuracy <= 1
    assert card.n["selector"] >= 8 and "selector_accuracy ≥ 0.90" in card.passes()


def test_cli_trains_the_blip2_recipe_on_a_given_encoder(runs, tmp_path):
    root, _ = runs
    base = [sys.executable, "-m", "visedit", "train-tiny", "--out", str(tmp_path / "c"), "--no-progress"]
    bad = subprocess.run(base + ["--encoder-from", str(root / "llava")], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "add --recipe" in bad.stderr
    sets = [x for k, v in MICRO_BLIP2.items() for x in ("--set", f"{k}={v}")]
    ok = subprocess.run(base + ["--recipe", "blip2", "--encoder-from", str(root / "llava"), "--stop-after", "2"] + sets,
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["stopped"] is True and (tmp_path / "c.ckpt").exists()
    state = torch.load(tmp_path / "c.ckpt", weights_only=False)
    assert state["stage"] == "language" and state["step"] == 2, "no encoder stage with a given encoder"


def test_the_embedded_blip2_name_says_how_to_build_it(monkeypatch, tmp_path):
    from visedit.models import vllm as vllm_module

    monkeypatch.setitem(vllm_module.EMBEDDED_MODELS, "visedit-blip2", tmp_path / "none")
    with pytest.raises(FileNotFoundError, match="--recipe blip2 --encoder-from"):
        load_vllm("visedit-blip2")


def test_layer_selectivity_spreads_query_maps_onto_the_patches(runs, tmp_path):
    """Query tokens have no grid: each layer's noise map (windows of one query) is spread through the
    Q-Former's cross-attention and scored against the masks — the oracle recomputes one record by hand."""
    import numpy as np

    from visedit.attribution import noise_perturbation, query_to_patches, score_heatmap
    from visedit.attribution.selectivity import layer_selectivity
    from visedit.world import DatasetSpec, load_world_split

    root, _ = runs
    vllm = load_vllm(root / "shared")
    rec = load_world_split("eval", DatasetSpec(seed=0, n_entities=12, edits_per_pair=1, image_size=80, edition=2),
                           root=tmp_path / "d")[0]
    sel = layer_selectivity(vllm, [rec], only_correct=False, n=2, progress=False)
    assert sel.radius == 0 and sel.n == 1 and len(sel.pointing) == vllm.n_layers
    scored = []
    for question, mask in ((rec.src, rec.mask("image")), (rec.extra["i_loc_q"], rec.mask("i_loc"))):
        influence = noise_perturbation(vllm, rec.image, question, radius=0, n=2, seed=0)
        scored.append([score_heatmap(query_to_patches(vllm, rec.image, question, row).heatmap(), mask)
                       for row in influence.array()])
    assert np.allclose(sel.lift, [round(s.lift, 4) for s in scored[0]], atol=1e-4)
    assert sel.pointing == [float(s.pointing_game) for s in scored[0]]
    assert sel.pair == [float(a.pointing_game and b.pointing_game) for a, b in zip(*scored)]
