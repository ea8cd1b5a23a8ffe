"""The implement-it-yourself checks: each accepts the library's answer, rejects the common mistakes with
the reason, never raises on the reader's behalf, and its reference is what the library computes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from visedit import exercises as ex

R = ex.reference


def _wrap_window(grid, t, r):
    rows, cols = grid
    out = np.zeros(rows * cols)
    rr, cc = divmod(t, cols)
    for a in range(-r, r + 1):
        for b in range(-r, r + 1):
            out[((rr + a) * cols + cc + b) % (rows * cols)] = 1
    return out.reshape(grid)


def _short_window(grid, t, r):
    rr, cc = divmod(t, grid[1])
    m = np.zeros(grid, bool)
    m[max(rr - r, 0): rr + r, max(cc - r, 0): cc + r] = True
    return m


def _lift_unclipped(h, mask):
    cover = R.patch_coverage(mask, h.shape)
    return (h * cover).sum() / h.sum() / mask.mean()


CASES = [
    (ex.check_patch_coverage, R.patch_coverage, [
        (lambda m, g: R.patch_coverage(m, g) * (m.shape[0] // g[0]) * (m.shape[1] // g[1]), "pixel counts"),
        (lambda m, g: m.reshape(g[0], m.shape[0] // g[0], g[1], -1).mean((1, 3)).T, "swapped")]),
    (ex.check_contribution, R.contribution, [
        (lambda v, p, a: np.abs(R.contribution(v, p, a)), "sign of v is lost"),
        (lambda v, p, a: np.sign(v) * (np.abs(v) / np.abs(v).max()) ** a * p ** (1 - a), "exponents are swapped"),
        (lambda v, p, a: np.sign(v) * (np.abs(v) / np.abs(v).max(0)) ** (1 - a) * p ** a, "not per module"),
        (lambda v, p, a: np.sign(v) * np.abs(v) ** (1 - a) * p ** a, "not divided by M")]),
    (ex.check_window, R.window, [(_wrap_window, "wraps around"), (_short_window, "2r + 1")]),
    (ex.check_lift, R.lift, [
        (_lift_unclipped, "clip at 0"),
        (lambda h, m: (np.clip(h, 0, None) * R.patch_coverage(m, h.shape)).sum() / np.clip(h, 0, None).sum(),
         "area share")]),
    (ex.check_gate, R.gate, [
        (lambda v, q, h: np.log(R.gate(v, q, h) / (1 - R.gate(v, q, h))), "sigmoid(s)"),
        (lambda v, q, h: 1 / (1 + np.exp(-(v @ q) / math.sqrt(v.shape[1]))), "averaged over heads")]),
    (ex.check_token_accuracy, R.token_accuracy, [
        (lambda lg, ids, n: float((lg[-n:].argmax(-1) == ids[-n:]).mean()), "predicts token t + 1"),
        (lambda lg, ids, n: float(R.token_accuracy(lg, ids, n) == 1.0), "exact match")]),
    (ex.check_rank_correlation, R.rank_correlation, [
        (lambda a, b: np.corrcoef(a.ravel(), b.ravel())[0, 1], "Pearson"),
        (lambda a, b: np.corrcoef(np.argsort(np.argsort(a.ravel(), kind="stable")),
                                  np.argsort(np.argsort(b.ravel(), kind="stable")))[0, 1], "average rank")]),
    (ex.check_early_share, R.early_share, [
        (lambda v: np.clip(v, 0, None)[: len(v) // 3].sum() / np.clip(v, 0, None).sum(), "rounding down"),
        (lambda v: v[: math.ceil(len(v) / 3)].sum() / v.sum(), "clip at 0")]),
    (ex.check_route, R.route, [
        (lambda V, k: (V.mean(1) @ k.T).argmax(-1), "largest dot product"),
        (lambda V, k: np.array([np.argmax(((V[r] / np.linalg.norm(V[r], axis=-1, keepdims=True))
                                           @ (k / np.linalg.norm(k, axis=-1, keepdims=True)).T).max(0))
                                for r in range(len(V))]), "single best-matching token")]),
]


@pytest.mark.parametrize("check,right,wrongs", CASES, ids=[c[0].__name__ for c in CASES])
def test_check_accepts_the_reference_and_names_each_mistake(check, right, wrongs):
    verdict = check(right)
    assert verdict.ok and bool(verdict) and str(verdict).startswith(f"{verdict.exercise}: right — ")
    for wrong, why in wrongs:
        verdict = check(wrong)
        assert not verdict.ok, why
        assert why in verdict.message, (why, verdict.message)
        assert str(verdict).startswith(f"{verdict.exercise}: wrong — on ")


@pytest.mark.parametrize("check", [c[0] for c in CASES], ids=[c[0].__name__ for c in CASES])
def test_check_never_raises(check):
    def stub(*args):
        raise NotImplementedError

    assert "not written yet" in check(stub).message and not check(stub)
    assert "returns None" in check(lambda *a: None).message
    assert "raised ZeroDivisionError" in check(lambda *a: 1 / 0).message
    assert "expected a function" in check(3).message
    assert not check(lambda *a: "text")


def test_to_dict_round_trips():
    verdict = ex.check_window(R.window)
    assert ex.Check(**verdict.to_dict()) == verdict


def test_torch_results_are_accepted():
    assert ex.check_window(lambda g, t, r: torch.from_numpy(R.window(g, t, r)))
    assert ex.check_gate(lambda v, q, h: torch.from_numpy(R.gate(v, q, h)))


def test_gate_reference_is_veads_gate():
    from visedit.editing.vead.module import VEAD

    torch.manual_seed(0)
    vead = VEAD(d=32, width=16, heads=2, im_width=24, im_heads=4).double()
    for p in vead.parameters():
        torch.nn.init.normal_(p, std=0.3)
    V, prompt = torch.randn(1, 9, 32, dtype=torch.float64), torch.randn(1, 32, dtype=torch.float64)
    with torch.no_grad():
        lib = torch.sigmoid(vead.gate_logits(V, prompt))[0].numpy()
        v, q = vead.r1(vead.ln3(V))[0].numpy(), vead.r2(vead.ln4(prompt))[0].numpy()
    np.testing.assert_allclose(R.gate(v, q, 4), lib, atol=1e-12)


def test_token_accuracy_reference_is_the_models_score(tiny_random, world):
    from visedit.world import load_world_split

    rec = load_world_split("eval")[0]
    inputs = tiny_random.inputs([(rec.image, rec.src, "red striped circle")])
    logits = tiny_random.logits(inputs)[0].float().numpy()
    pos = inputs.target_positions[0]
    n = len(pos)
    ids = inputs.tensors["input_ids"][0, : pos[-1] + 1].numpy()
    want = tiny_random.score(rec.image, rec.src, "red striped circle").token_accuracy
    assert n >= 2 and R.token_accuracy(logits[: pos[-1] + 1], ids, n) == want


def test_contribution_reference_is_the_library_formula():
    from visedit.attribution.contributions import paper_score

    v, p = torch.tensor([[2.0, -4.0], [1.0, 0.5]]), torch.tensor([[0.3, 0.1], [0.9, 0.2]])
    # by hand: M = 4; c = sign(v)·(|v|/4)^0.5·p^0.5
    hand = torch.tensor([[math.sqrt(0.5 * 0.3), -math.sqrt(1.0 * 0.1)], [math.sqrt(0.25 * 0.9), math.sqrt(0.125 * 0.2)]])
    torch.testing.assert_close(paper_score(v, p, 0.5), hand)
    np.testing.assert_allclose(R.contribution(v.numpy(), p.numpy(), 0.5), hand.numpy(), atol=1e-7)


def test_window_reference_by_hand():
    w = R.window((4, 6), 13, 1)  # row 2, column 1
    want = np.zeros((4, 6), bool)
    want[1:4, 0:3] = True
    assert (w == want).all()
    corner = R.window((10, 10), 0, 1)
    assert corner.sum() == 4 and corner[:2, :2].all()


def test_early_share_reference_by_hand_and_is_the_profile_s():
    from visedit.attribution.contributions import ContributionProfile

    # 7 layers: the first ⌈7/3⌉ = 3 count; the negative one counts 0 in both sums
    assert R.early_share([-0.4, 0.9, 0.1, 0.3, 0.2, 0.5, 0.6]) == pytest.approx(1.0 / 2.6)
    assert R.early_share([-1.0, -2.0]) == 0.0
    mean = {"attn": [0.1, -0.2, 0.5, 0.4]}  # 4 layers: the first 2 count, 0.1 of a positive total of 1.0
    profile = ContributionProfile(mean=mean, low=mean, high=mean, n=1, n_total=1, only_correct=True)
    assert profile.early_share() == R.early_share(mean["attn"]) == pytest.approx(0.1)
