"""Attribution I on tiny random LLaVAs: oracles (DLA sums to the logit, allocation sums to the module
output), Captum convergence, hook hygiene, bad input."""

from __future__ import annotations

import pytest
import torch

from visedit.attribution import (contribution_profile, integrated_gradients, module_contributions,
                                 token_allocation, token_baseline)
from visedit.hooks import hook_count
from visedit.world import image_question, render


@pytest.fixture(scope="module")
def img(world):
    return render(world.entities[0], seed=0, size=32).image


def test_dla_sums_to_the_final_logit(tiny_random, img):
    mc = module_contributions(tiny_random, img, image_question("colour"))
    assert len(mc.attn) == len(mc.mlp) == len(mc.dla_attn) == tiny_random.n_layers
    assert mc.dla_total == pytest.approx(mc.logit, abs=1e-4)
    assert max(abs(c) for c in mc.attn + mc.mlp) <= 1.0 + 1e-6
    assert mc.predicted == mc.target  # y* is the model's own prediction by default


def test_paper_formula_matches_a_hand_computation(tiny_random, img):
    from visedit.hooks import Trace
    from visedit.models import unembed

    v = tiny_random
    mc = module_contributions(v, img, image_question("shape"), target="star")
    inputs = v.inputs([(img, image_question("shape"))])
    T = inputs.last_prompt[0]
    with Trace({"m": v.site("llm.layers.1.mlp")}) as tr:
        v.logits(inputs)
    z = unembed(v.adapter, tr.outputs["m"][0, T])
    y = v.tokenizer.convert_tokens_to_ids("star")
    vals = []
    with Trace({f"{k}{l}": v.site(f"llm.layers.{l}.{k}") for k in ("attn", "mlp") for l in range(v.n_layers)}) as tr2:
        v.logits(inputs)
    M = max(abs(float(unembed(v.adapter, o[0, T])[y])) for o in tr2.outputs.values())
    val = float(z[y])
    expected = (1 if val > 0 else -1) * (abs(val) / M) ** 0.5 * float(z.softmax(-1)[y]) ** 0.5
    assert mc.mlp[1] == pytest.approx(expected, rel=1e-4)
    assert mc.target == "star"


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_allocation_sums_to_the_module_projection(tiny_random, img, layer):
    al = token_allocation(tiny_random, img, image_question("habitat"), layer=layer)
    assert al.max_error <= 1e-4
    assert len(al.visual) == 16 and al.grid == (4, 4) and al.heatmap().shape == (4, 4)
    assert sum(al.visual) + al.text + al.bias == pytest.approx(al.module_projection, abs=1e-4)


@pytest.mark.parametrize("layer", [None, 1])
def test_integrated_gradients_converge(tiny_random, img, layer):
    res = integrated_gradients(tiny_random, img, image_question("name"), layer=layer, n_steps=48)
    assert res.relative_delta <= 0.05
    assert len(res.visual) == 16
    # completeness: attributions sum to f(input) − f(baseline), up to the convergence delta
    assert abs(sum(res.visual) - res.output_difference) <= 0.05 * abs(res.output_difference) + 1e-4


def test_no_hook_survives_an_error_inside_captum(tiny_random, img, monkeypatch):
    v = tiny_random
    v.logits(v.inputs([(img, "what colour is this creature ?")]))
    before = hook_count(v.model)
    calls = {"n": 0}
    real = v.model.forward

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 2:
            raise RuntimeError("injected failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(v.model, "forward", flaky)
    with pytest.raises(RuntimeError, match="injected failure"):
        integrated_gradients(v, img, image_question("colour"), layer=1, n_steps=8)
    monkeypatch.undo()
    assert hook_count(v.model) == before


def test_token_baseline_keeps_image_ids():
    ids = torch.tensor([[1, 5, 9, 9, 9, 7, 8]])
    base = token_baseline(ids, image_token_id=9, fill_id=0, keep=(1,))
    assert base.tolist() == [[1, 0, 9, 9, 9, 0, 0]]


def test_bad_input(tiny_random, img, world):
    with pytest.raises(ValueError, match="layer 7 is out of range"):
        token_allocation(tiny_random, img, image_question("colour"), layer=7)
    with pytest.raises(ValueError, match="no visual tokens"):
        token_allocation(tiny_random, None, "what colour is the mablok ?", layer=0)
    with pytest.raises(ValueError, match="no visual tokens"):
        integrated_gradients(tiny_random, None, "what colour is the mablok ?", layer=0)
    with pytest.raises(ValueError, match="cannot encode the target 'volcano'"):
        module_contributions(tiny_random, img, image_question("habitat"), target="volcano")


def test_profile_has_intervals(tiny_random, tmp_path):
    from visedit.world import DatasetSpec, load_world_split

    recs = load_world_split("eval", DatasetSpec(seed=1, n_entities=8, edits_per_pair=1, image_size=32),
                            root=tmp_path / "w")[:6]
    prof = contribution_profile(tiny_random, recs, only_correct=False, n_boot=200, progress=False)
    assert prof.n == 6 and len(prof.mean["attn"]) == tiny_random.n_layers
    for k in ("attn", "mlp", "dla_attn", "dla_mlp"):
        assert all(lo <= m + 1e-9 and m <= hi + 1e-9 for lo, m, hi in zip(prof.low[k], prof.mean[k], prof.high[k]))
    assert prof.plot().data


@pytest.mark.parametrize("power, steps", [(1, 2), (4, 2), (6, 4), (8, 4), (16, 8)])
def test_ig_doubles_its_steps_until_gauss_legendre_is_exact(power, steps):
    """Oracle: along the path from 0 to 1, f(x) = Σ x^p has the integrand p·α^(p−1), which n Gauss–Legendre
    nodes integrate exactly when p ≤ 2n; from 2 steps, doubling stops at the first such n."""
    from captum.attr import IntegratedGradients

    from visedit.attribution.gradients import converge

    ig = IntegratedGradients(lambda x: (x ** power).sum(-1))
    x = torch.ones(1, 3, dtype=torch.float64)
    attr, used, delta, relative, converged = converge(ig, x, torch.zeros_like(x), 3.0, n_steps=2, tolerance=1e-5,
                                                      max_steps=64)
    assert (used, converged) == (steps, True)
    assert relative <= 1e-5 and float(attr.sum()) == pytest.approx(3.0, rel=1e-5)


def test_ig_warns_once_when_the_bound_is_hit(tiny_random, img):
    import warnings

    from visedit.attribution import IGConvergenceWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = integrated_gradients(tiny_random, img, image_question("name"), n_steps=2, tolerance=1e-9, max_steps=8)
    ours = [w for w in caught if issubclass(w.category, IGConvergenceWarning)]
    assert len(ours) == 1 and "\n" not in str(ours[0].message) and "max_steps=8" in str(ours[0].message)
    assert (res.n_steps, res.converged) == (8, False) and res.relative_delta > 1e-9


def test_ig_reports_the_steps_it_needed(tiny_random, img):
    fixed = integrated_gradients(tiny_random, img, image_question("name"), n_steps=2, tolerance=None)
    assert (fixed.n_steps, fixed.converged, fixed.tolerance) == (2, True, None)
    res = integrated_gradients(tiny_random, img, image_question("name"), n_steps=2, tolerance=0.01, max_steps=256)
    assert fixed.relative_delta > 0.01  # two steps are not enough here, so the steps doubled
    assert res.converged and res.relative_delta <= 0.01 and res.n_steps in (4, 8, 16, 32, 64, 128, 256)


@pytest.mark.parametrize("kw, message", [({"tolerance": 0}, "tolerance must be > 0"),
                                         ({"tolerance": -0.1}, "tolerance must be > 0"),
                                         ({"n_steps": 64, "max_steps": 32}, r"max_steps must be an int ≥ n_steps"),
                                         ({"n_steps": 1}, "n_steps must be an int ≥ 2")])
def test_ig_refuses_bad_settings_in_one_line(tiny_random, img, kw, message):
    with pytest.raises(ValueError, match=message) as err:
        integrated_gradients(tiny_random, img, image_question("name"), **kw)
    assert "\n" not in str(err.value)


def test_source_profile_averages_the_exact_split_and_keeps_only_correct_answers(tiny_random, tmp_path):
    """The profile is the mean of the per-record splits (oracle: recomputed by hand), its peak and shares
    read the visual series, only_correct keeps exactly the records whose first answer token is right, and
    it serialises and plots."""
    import json

    import numpy as np

    from visedit.attribution import ContributionProfile, attention_sources, source_profile
    from visedit.world import DatasetSpec, load_world_split

    vocab = tiny_random.tokenizer.get_vocab()
    recs = [r for r in load_world_split("eval", DatasetSpec(seed=1, n_entities=8, edits_per_pair=1, image_size=32),
                                        root=tmp_path / "w") if r.pred.split()[0] in vocab][:5]
    splits = [attention_sources(tiny_random, r.image, r.src) for r in recs]
    prof = source_profile(tiny_random, recs, only_correct=False, n_boot=100, progress=False)
    np.testing.assert_allclose(prof.mean["visual"], np.mean([s["visual"] for s in splits], 0), atol=1e-6)
    np.testing.assert_allclose(prof.mean["text"], np.mean([s["text"] for s in splits], 0), atol=1e-6)
    assert prof.n == prof.n_total == 5 and prof.peak("visual") == int(np.argmax(prof.mean["visual"]))
    assert prof.relative_peak_depth("visual") == prof.peak("visual") / (tiny_random.n_layers - 1)
    # the first two records get the model's own answer as their answer: they count as correct
    import dataclasses

    recs = [dataclasses.replace(r, pred=tiny_random.tokenizer.decode([s["target_id"]]).strip()) if i < 2 else r
            for i, (r, s) in enumerate(zip(recs, splits))]
    right = [s["target_id"] == tiny_random.encode_target(r.pred)[0] for s, r in zip(splits, recs)]
    kept = source_profile(tiny_random, recs, n_boot=100, progress=False)
    assert right[:2] == [True, True] and kept.n == sum(right) and kept.n_total == 5
    np.testing.assert_allclose(kept.mean["visual"], np.mean([s["visual"] for s, ok in zip(splits, right) if ok], 0),
                               atol=1e-6)
    with pytest.raises(ValueError, match="no record was answered correctly"):
        source_profile(tiny_random, [r for r, ok in zip(recs, right) if not ok] or recs[2:3], n_boot=100,
                       progress=False)
    assert ContributionProfile(**json.loads(json.dumps(prof.to_dict()))) == prof
    assert [t.name for t in prof.plot().data] == ["visual tokens", "text tokens"]
    with pytest.raises(ValueError, match="no records given"):
        source_profile(tiny_random, [], progress=False)


def test_mean_depth_by_hand_and_is_the_profile_s():
    from visedit.attribution.contributions import ContributionProfile, mean_depth

    # 5 layers at depths 0, .25, .5, .75, 1; the negative layer counts 0: (1·0.25 + 3·1) / 4
    assert mean_depth([0.0, 1.0, -2.0, 0.0, 3.0]) == pytest.approx((0.25 + 3.0) / 4)
    assert mean_depth([0.2] * 12) == pytest.approx(0.5)  # flat: the middle, whatever the argmax says
    assert mean_depth([5.0, 0.0, 0.0]) == 0.0 and mean_depth([0.0, 0.0, 5.0]) == 1.0
    assert mean_depth([-1.0, -2.0]) == 0.0 and mean_depth([3.0]) == 0.0
    mean = {"attn": [0.1, -0.2, 0.5, 0.4]}
    profile = ContributionProfile(mean=mean, low=mean, high=mean, n=1, n_total=1, only_correct=True)
    assert profile.mean_depth() == pytest.approx((0.5 * 2 / 3 + 0.4) / 1.0)
