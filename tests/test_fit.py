"""The shared fit loop (resume, budget, schedule, clipping, callbacks), and every trainer's numbers, pinned:
micro runs of the four trainers end in weights and losses whose sha256 is recorded here. A change that
alters a trainer's numbers — the order of random draws, of parameter groups, of float operations — fails
here.

Float results depend on the kernels as well as on the code: the same run gives other bits on a CPU whose
vector extensions make torch dispatch to other kernels (the pins first recorded, on an earlier machine,
differ on an AVX-512 + AMX one). So pins are recorded per kernel fingerprint (torch's version, the CPU
capability it dispatches on, the CPU's bf16/AMX extensions) and checked bit for bit where the fingerprint
has them (a machine without pins fails, saying how to record them); everywhere, two runs of each
trainer must give the same bits. (The digests were first computed
with the hand-written loops the trainers had before they shared the fit loop, and the fit loop reproduced
them exactly on that machine.) To pin a new machine: ``python -m tests.test_fit`` prints its entry.
"""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from tests.conftest import SMALL
from visedit.fit import Every, fit, warmup_cosine
from visedit.world import DatasetSpec, load_world_split

SPEC = DatasetSpec(seed=0, n_entities=10, edits_per_pair=1, image_size=32)


def digest(state: dict, losses) -> str:
    """sha256 of every tensor's name, dtype, shape and bytes (by name), then of the losses as JSON."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    h.update(json.dumps(losses, sort_keys=True).encode())
    return h.hexdigest()


def tiny_digest(tmp) -> str:
    from safetensors.torch import load_file

    from visedit.models.train import TrainConfig, train_tiny

    cfg = TrainConfig(vision_steps=2, vision_batch=4, steps=3, batch_images=2, batch_text=2, warmup=2, n_entities=12,
                      context_steps=2, context_batch=6, threads=1)
    record = train_tiny(tmp / "tiny", cfg, SMALL, progress=False, log_every=1)
    losses = {k: record[k] for k in ("vision_loss", "final_loss", "context_loss")}
    losses["log"] = [(e["step"], e["loss"]) for e in record["log"] + record["context_log"]]
    return digest(load_file(tmp / "tiny" / "model.safetensors"), losses)


def recipe_digest(tmp) -> str:
    from safetensors.torch import load_file

    from tests.test_recipe import MICRO
    from visedit.models.recipe import STAGES, recipe_config, train_recipe

    # pinned before the region and position terms and the eager attention setting existed: run as then
    record = train_recipe(tmp / "recipe", recipe_config("llava", **{**MICRO, "region_weight": 0.0, "position_weight": 0.0,
                                                                    "attention": "sdpa"}),
                          progress=False, log_every=1)
    ckpt = torch.load(tmp / "recipe.ckpt", weights_only=False)  # the float32 weights (the folder's are half)
    state = {f"{m}.{k}": v for m, d in ckpt["modules"].items() for k, v in d.items()}
    state.update({f"saved.{k}": v for k, v in load_file(tmp / "recipe" / "model.safetensors").items()})
    losses = {"log": [(e["stage"], e["step"], e["loss"]) for e in record["log"]],
              **{f"{s}_{k}": record[f"{s}_{k}"] for s in STAGES for k in ("loss", "running")}}
    return digest(state, losses)


def vead_digest(vllm, records) -> str:
    from visedit.editing import VEADConfig, train_vead

    config = VEADConfig(layer=1, steps=6, batch=2, val_every=3, val_edits=2, sampled_tokens=4, seed=2, decay_share=0.5)
    editor, info = train_vead(vllm, records, config, progress=False)
    return digest(editor.adapter.state_dict(), info["history"])


def mend_digest(vllm, records) -> str:
    from visedit.editing import MENDConfig, train_mend

    config = MENDConfig(layers=(-1,), rank=8, steps=4, val_every=1, val_edits=2, seed=3)
    editor, info = train_mend(vllm, records[:6], config, progress=False)
    return digest(editor.networks.state_dict(), info["history"])


def kernel_fingerprint() -> str:
    """What, beside the code, decides a run's float bits: torch's version, the CPU capability its kernels
    dispatch on, and the CPU's bf16 / AMX extensions (oneDNN's bf16 matmuls use them)."""
    import platform

    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            flags = {w for line in f if line.startswith("flags") for w in line.split()}
    except OSError:
        pass
    extra = [f for f in ("avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    return " ".join([f"torch {torch.__version__}", platform.machine(), torch.backends.cpu.get_cpu_capability(), *extra])


#: Pins by kernel fingerprint, each computed twice, in either order of the trainers. The first machine's
#: pins (computed with the hand-written loops, which the fit loop reproduced exactly) have no recorded
#: fingerprint; they are kept for the record.
PINNED = {
    "torch 2.13.0+cpu x86_64 AVX512 avx512_bf16 amx_bf16 amx_tile": {
        "tiny": "d2dc51390cc60829fc9ab1de73084c31ce9a5d9e70324e879f6765e8cee4aaf2",
        "recipe": "388a81016b0322976aff71a53dfa5fbd3beb7f1880c0994dd42ac26990889c0d",
        "vead": "7801bf28c4641c677a0f769cf4299f6124259a91bd58d402cd5431ab8bd2dd9c",
        "mend": "c05b5bbc353d251bc7b510734244496c84f59500c2fb722f3ae8865d5a975da4"},
}
FIRST_MACHINE = {"tiny": "52f8dda6e0a8d847d7bbbe6b46a9aeaf2b35513d862f674efade300ef95d8511",
                 "recipe": "488751d40104120be2c3ea237ae16b43ab317a7f1f9ac90d0f4fa05bedd5f6e1",
                 "vead": "68f7a4656bb8b2268d3f92242196b01914edd79e8b3edae122a268c3a11ac37e",
                 "mend": "f54ed0ec52bc5a00b123be2ce2d8bf4fe7b92a8cfa470d51dd58d5c2c85dfbbe"}


def check_pin(trainer: str, first: str, second: str) -> None:
    """Two runs agree bit for bit; where this machine's kernels have pins, they are the pinned bits."""
    assert first == second, f"two runs of the {trainer} trainer gave different weights or losses"
    pins = PINNED.get(kernel_fingerprint())
    assert pins is not None, (f"no {trainer} pin for these kernels ({kernel_fingerprint()}); the two runs agree. "
                              "Record this machine's entry in PINNED: python -m tests.test_fit")
    assert first == pins[trainer]


@pytest.fixture()
def one_thread():
    """The digests are of one-thread runs (the trainers that set threads set them globally: put them back)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    return load_world_split("train", SPEC, root=tmp_path_factory.mktemp("fit_data"))


@pytest.mark.parametrize("trainer", ["tiny", "recipe"])
def test_model_trainers_reproduce_their_pinned_numbers(trainer, tmp_path, one_thread):
    run = {"tiny": tiny_digest, "recipe": recipe_digest}[trainer]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    check_pin(trainer, run(tmp_path / "a"), run(tmp_path / "b"))


@pytest.mark.parametrize("trainer", ["vead", "mend"])
def test_editor_trainers_reproduce_their_pinned_numbers(trainer, tiny_random, records, one_thread):
    run = {"vead": vead_digest, "mend": mend_digest}[trainer]
    check_pin(trainer, run(tiny_random, records), run(tiny_random, records))


# --------------------------------------------------------------------------------------------- the loop
def _problem(seed: int = 0):
    """A linear regression whose batches are a function of the step alone, and an AdamW on it."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW([{"params": [model.weight], "weight_decay": 0.1},
                             {"params": [model.bias], "weight_decay": 0.0}], lr=0.1)

    def loss_at(step: int):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(8, 4, generator=g), torch.randn(8, 2, generator=g)
        loss = ((model(x) - y) ** 2).mean()
        return loss, {"loss": loss.item(), "twice": 2 * loss.item()}

    return model, opt, loss_at


def _run(**kw):
    model, opt, loss_at = _problem()
    state = fit(loss_at, opt, 7, lr=lambda s: warmup_cosine(s, 7, 2, 0.1), clip_params=model.parameters(),
                max_norm=0.5, progress=False, **kw)
    return model, opt, loss_at, state


def test_a_run_stopped_and_resumed_with_the_optimiser_state_ends_bit_identical():
    model, _, _, whole = _run()
    stopped, opt, loss_at, first = _run(stop_after=3)
    assert first.step == 3 and not first.finished and whole.finished
    saved, weights = opt.state_dict(), {k: v.clone() for k, v in stopped.state_dict().items()}
    again, opt2, loss_at2 = _problem(seed=1)  # other initial weights: everything comes from the checkpoint
    again.load_state_dict(weights)
    rest = fit(loss_at2, opt2, 7, lr=lambda s: warmup_cosine(s, 7, 2, 0.1), clip_params=again.parameters(),
               max_norm=0.5, start=3, optimizer_state=saved, running=first.running, progress=False)
    assert rest.finished and rest.running == whole.running and rest.loss == whole.loss
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_each_step_sets_the_schedule_clips_and_calls_back_every_k_and_at_the_end():
    seen, calls = [], []
    model, opt, loss_at = _problem()
    step = opt.step

    def recording(*args, **kw):
        norm = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
        seen.append((opt.param_groups[0]["lr"], opt.param_groups[1]["lr"], float(norm)))
        return step(*args, **kw)

    opt.step = recording
    state = fit(loss_at, opt, 7, lr=lambda s: 0.01 * s, clip_params=model.parameters(), max_norm=1e-3,
                progress=False, stop_after=5, callbacks=[Every(2, lambda s: calls.append(("k", s.step))),
                                                         Every(0, lambda s: calls.append(("end", s.step)), at_end=True)])
    assert [(a, b) for a, b, _ in seen] == [(0.01 * s, 0.01 * s) for s in range(5)]
    assert all(n <= 1e-3 * (1 + 1e-5) for _, _, n in seen)
    assert calls == [("k", 2), ("k", 4), ("end", 5)] and state.step == 5
    assert state.parts["twice"] == 2 * state.parts["loss"] and state.running != state.loss  # the running loss


def test_the_loop_trains_under_no_grad_and_refuses_half_a_clip():
    model, opt, loss_at = _problem()
    before = model.weight.clone()
    with torch.no_grad():
        fit(loss_at, opt, 2, progress=False)
    assert not torch.equal(before, model.weight)
    with pytest.raises(ValueError, match="both clip_params and max_norm"):
        fit(loss_at, opt, 2, max_norm=1.0, progress=False)
    with pytest.raises(ValueError, match="start must be in 0…2"):
        fit(loss_at, opt, 2, start=3, progress=False)


if __name__ == "__main__":  # print this machine's PINNED entry (one thread, as the tests run)
    import tempfile
    from pathlib import Path

    from visedit.models import load_vllm
    from visedit.models.tiny import build_model, build_processor
    from visedit.world import make_world

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        processor = build_processor(make_world(0), SMALL)  # as conftest's tiny_random
        build_model(processor.tokenizer, SMALL, seed=0).save_pretrained(tmp / "model")
        processor.save_pretrained(tmp / "model")
        vllm = load_vllm(tmp / "model")
        recs = load_world_split("train", SPEC, root=tmp / "data")
        (tmp / "t").mkdir()
        (tmp / "r").mkdir()
        entry = {"tiny": tiny_digest(tmp / "t"), "recipe": recipe_digest(tmp / "r"),
                 "vead": vead_digest(vllm, recs), "mend": mend_digest(vllm, recs)}
    print(json.dumps({kernel_fingerprint(): entry}, indent=1))
