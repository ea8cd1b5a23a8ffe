"""Late-decision tuning (visedit.models.late): the interchange loss against its exact ends, a seeded run that
keeps the vision tower and writes a loadable model, one line for each bad input."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from visedit.models import load_vllm
from visedit.models.late import LateConfig, interchange_kl, train_late


@pytest.fixture(scope="module")
def second():
    return load_vllm("visedit-llava")


@pytest.fixture(scope="module")
def pair(second):
    from visedit.world import load_world_split, spread

    recs = spread(load_world_split("eval", second.dataset_spec), 6)
    questions = [r.src for r in recs[:3]]
    mine = second.inputs([(r.image, q) for r, q in zip(recs[:3], questions)])
    donor = second.inputs([(r.image, q) for r, q in zip(recs[3:], questions)])
    return mine, donor


def test_interchange_kl_against_its_exact_ends(second, pair):
    mine, donor = pair
    span = mine.visual_spans[0]
    assert donor.visual_spans[0] == span and donor.last_prompt == mine.last_prompt
    with torch.no_grad():
        # the donor is the prompt itself: the swap writes back what was there
        assert float(interchange_kl(second, mine, mine, 3, span)) == pytest.approx(0.0, abs=1e-6)
        # after the last layer no later position reads the image tokens: the swap changes nothing, and the
        # loss is the KL between the two plain runs
        rows, last = torch.arange(3), torch.tensor(mine.last_prompt)
        own = F.log_softmax(second.logits(mine)[rows, last].float(), -1)
        theirs = F.softmax(second.logits(donor)[rows, last].float(), -1)
        plain = float(F.kl_div(own, theirs, reduction="batchmean"))
        assert plain > 0.05
        assert float(interchange_kl(second, mine, donor, second.n_layers, span)) == pytest.approx(plain, rel=1e-4)
        # at depth 1 the swapped image still decides part of the answer: closer to the donor's
        assert float(interchange_kl(second, mine, donor, 1, span)) < 0.9 * plain


def test_a_run_is_seeded_keeps_the_tower_and_loads(second, tmp_path):
    cfg, before = LateConfig(steps=2, batch=2, log_every=1), second.fingerprint
    record = train_late(tmp_path / "a", second, cfg, progress=False)
    assert second.fingerprint == before  # the model passed in is tuned as a copy
    assert [e["step"] for e in record["log"]] == [1, 2] and record["source"] == "visedit-llava"
    train_late(tmp_path / "b", load_vllm("visedit-llava"), cfg, progress=False)
    train_late(tmp_path / "c", load_vllm("visedit-llava"), LateConfig(steps=2, batch=2, seed=1), progress=False)
    a, b, c = ((tmp_path / x / "model.safetensors").read_bytes() for x in "abc")
    assert a == b and a != c  # the same seed gives the same bytes; another seed, other weights
    tuned, source = load_vllm(tmp_path / "a"), load_vllm("visedit-llava")
    theirs = dict(source.model.named_parameters())
    moved = {n: not torch.equal(p, theirs[n]) for n, p in tuned.model.named_parameters()}
    assert not any(m for n, m in moved.items() if "vision_tower" in n)
    assert all(m for n, m in moved.items() if "multi_modal_projector" in n)
    assert sum(moved.values()) > 0.5 * len(moved)
    info = json.loads((tmp_path / "a" / "visedit.json").read_text())
    assert info["tuned"] == {"from": "visedit-llava", "fingerprint": source.fingerprint, "late_depth": 7}
    assert tuned.dataset_spec == source.dataset_spec and tuned.frame == source.frame


def test_bad_input_is_one_line(second, tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError, match="already exists; pass a new --out"):
        train_late(tmp_path / "taken", second, LateConfig(steps=1, batch=2))
    with pytest.raises(ValueError, match="trained on scenes"):
        train_late(tmp_path / "x", "visedit-tiny", LateConfig(steps=1, batch=2))
    with pytest.raises(ValueError, match="depth must be below the model's 12 layers"):
        train_late(tmp_path / "x", second, LateConfig(depth=12, steps=1, batch=2))
    for bad, message in (({"depth": 0}, "depth must be at least 1"), ({"batch": 1}, "batch must be at least 2"),
                         ({"lr": 0}, "lr must be positive"), ({"dpth": 3}, "unknown LateConfig key")):
        with pytest.raises(ValueError, match=message):
            LateConfig.from_dict(bad)
    assert not (tmp_path / "x").exists()
