"""``bench scale``: random models of LLaVA-1.5's shape scaled down, every analysis and editor timed, the
batched sweep checked against the loop, growth exponents fitted. Speed is printed, never asserted here."""

from __future__ import annotations

import json

import numpy as np
import pytest

from visedit.bench import _exponent, bench_scale, scale_model
from visedit.cli import main


def test_exponent_oracle():
    xs = [64, 144, 576]
    assert _exponent(xs, [3 * x ** 2 for x in xs]) == pytest.approx(2.0)
    assert _exponent(xs, [5.0, 5.0, 5.0]) == pytest.approx(0.0, abs=1e-12)


def test_scale_model_has_the_asked_grid_and_depth():
    vllm = scale_model(36, 3, hidden=32)
    assert vllm.n_layers == 3 and vllm.d_model == 32
    from visedit.world import load_world_split

    inputs = vllm.inputs([(load_world_split("eval")[0].image, "what is the name of this creature ?")])
    assert inputs.layouts[0].grid == (6, 6) and inputs.layouts[0].n_tokens == 36


def test_bench_scale_measures_every_analysis_and_editor():
    r = bench_scale(tokens=(16, 36), layers=(2, 3), hidden=32, n=2, chunk_sizes=(4, 16), progress=False)
    assert [(row["tokens"], row["layers"]) for row in r["rows"]] == [(16, 2), (36, 2), (36, 3)]
    measures = {"forward", "contributions", "noise_sweep", "restoration", "ig", "edit_ft_l", "edit_ft_v", "edit_ike",
                "edit_mend", "edit_vead"}
    assert set(r["growth_exponents"]) == measures
    for row in r["rows"]:
        assert all(row[m]["seconds"] > 0 and row[m]["peak_mb"] >= 0 for m in measures)
    assert r["rows"][-1]["noise_sweep"]["windows"] == 36
    # the loop runs at the largest model only, and agrees with the batched engine
    assert "noise_sweep_loop" in r["rows"][-1] and all("noise_sweep_loop" not in row for row in r["rows"][:-1])
    assert r["noise_max_abs_diff"] <= 1e-5 and r["targets"]["noise_max_abs_diff ≤ 1e-5"]
    assert r["noise_speedup"] > 0 and set(r["sweep_memory_by_chunk"]) == {4, 16}
    assert r["rows"][-1]["noise_sweep_loop"]["layers"] == 3  # at most the model's layers
    assert all(v["estimate_mb"] > 0 for v in r["sweep_memory_by_chunk"].values())
    assert all(np.isfinite(v) for g in r["growth_exponents"].values() for v in g.values())
    json.dumps(r)  # serialisable as it is


@pytest.mark.parametrize("argv,message", [
    (["--tokens", "16,x"], "comma-separated whole numbers"),
    (["--tokens", "15,36"], "square number"),
    (["--tokens", "16"], "at least two token counts"),
    (["--model", "visedit-tiny"], "drop --model"),
    (["--loop-layers", "-1"], "number of layers"),
])
def test_bench_scale_bad_input_is_one_line(argv, message, capsys):
    assert main(["bench", "scale", *argv, "--layers", "2,3", "--hidden", "32"]) != 0
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_sweep_memory_estimate_is_linear_in_the_chunk_and_blind_to_windows():
    from visedit.attribution.tracing import sweep_bytes

    # LLaVA-1.5-7B: 32 heads of 128; per window and copy 6 score-sized rows over the prefix, 2 head outputs, 2 widths
    assert sweep_bytes(8, 10, 600, 4096, 32) == 4 * 8 * 10 * (6 * 32 * 600 + 2 * 32 * 128 + 2 * 4096)
    assert sweep_bytes(16, 10, 600, 4096, 32) == 2 * sweep_bytes(8, 10, 600, 4096, 32)
    assert sweep_bytes(8, 10, 600, 4096, 32, head_dim=64) < sweep_bytes(8, 10, 600, 4096, 32)
