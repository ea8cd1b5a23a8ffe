"""Evaluation sharded over processes: two CPU processes (``--shard 0/2``, and RANK/WORLD_SIZE as torchrun
sets them) merged by ``merge-shards`` give one process's run — the same per-edit rows (timings aside), the
same run.json and summary.json — and the merge refuses missing, unfinished, foreign and overlapping shards."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from visedit.cli import main
from visedit.editing import get_editor
from visedit.evaluation import evaluate, merge_shards
from visedit.world import DatasetSpec, load_mmedit, make_edit_dataset

SPEC = DatasetSpec(seed=0, n_entities=10, edits_per_pair=1, image_size=32)
ROOT = Path(__file__).resolve().parents[1]
TIMINGS = ("edit_seconds", "total_seconds", "edit_seconds_mean", "forward_seconds", "run_seconds")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A small world dataset in MMEdit schema: ``eval.json`` and its images."""
    return make_edit_dataset(tmp_path_factory.mktemp("shard_data"), SPEC)


def _rows(folder: Path) -> list[str]:
    """The per-edit rows as JSON text, without their timings."""
    return [json.dumps({k: v for k, v in json.loads(line).items() if k not in TIMINGS}, sort_keys=True)
            for line in (folder / "edits.jsonl").read_text().splitlines()]


def _summary(folder: Path) -> dict:
    return {k: v for k, v in json.loads((folder / "summary.json").read_text()).items() if k not in TIMINGS}


def test_two_processes_merged_equal_one_process(tiny_random_dir, data, tmp_path):
    preset = tmp_path / "ft_l.yaml"
    preset.write_text("layer: -1\nmax_steps: 2\nstop_loss: 0.0\n")
    args = ["evaluate", "--editor", "ft_l", "--model", str(tiny_random_dir), "--data", str(data / "eval.json"),
            "--limit", "5", "--preset", str(preset), "--json"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    sharded = tmp_path / "sharded"
    procs = [subprocess.Popen([sys.executable, "-m", "visedit", *args, "--out", str(sharded), *extra],
                              env={**env, **environ}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for extra, environ in ((["--shard", "0/2"], {}), ([], {"RANK": "1", "WORLD_SIZE": "2"}))]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0  # meanwhile, one process does all five
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        assert "merge-shards" in err
    assert [json.loads((sharded / f"shard-{i}-of-2" / "run.json").read_text())["shard"] for i in (0, 1)] == ["0/2", "1/2"]
    assert [json.loads(l)["index"] for l in (sharded / "shard-1-of-2" / "edits.jsonl").read_text().splitlines()] == [1, 3]
    assert main(["merge-shards", str(sharded), "--json"]) == 0
    one = tmp_path / "one"
    assert _rows(sharded) == _rows(one) and len(_rows(one)) == 5
    assert (sharded / "run.json").read_text() == (one / "run.json").read_text()
    assert _summary(sharded) == _summary(one)


def _run(vllm, records, out, shard, n=None):
    evaluate(get_editor("none", vllm), records[: n or len(records)], out=out, shard=shard, progress=False)


def test_a_shard_resumes_and_the_merge_equals_one_run(tiny_random, data, tmp_path):
    recs = load_mmedit(data / "eval.json")[:5]
    _run(tiny_random, recs, tmp_path / "one", None)
    for i in range(3):
        _run(tiny_random, recs, tmp_path / "three", (i, 3))
    edits = tmp_path / "three" / "shard-0-of-3" / "edits.jsonl"
    edits.write_text(edits.read_text().splitlines()[0] + "\n")  # shard 0 (edits 0, 3) was cut after edit 0
    with pytest.raises(ValueError, match=r"shard 0/3 in .* holds 1 of its 2 edits: resume it"):
        merge_shards(tmp_path / "three")
    _run(tiny_random, recs, tmp_path / "three", (0, 3))  # resumes: scores edit 3 only
    assert [json.loads(l)["index"] for l in edits.read_text().splitlines()] == [0, 3]
    summary = merge_shards(tmp_path / "three")
    assert summary.n == 5 and _rows(tmp_path / "three") == _rows(tmp_path / "one")
    assert _summary(tmp_path / "three") == _summary(tmp_path / "one")


def test_the_merge_refuses_what_is_not_one_run_in_one_line(tiny_random, data, tmp_path, capsys):
    records, folder = load_mmedit(data / "eval.json"), tmp_path / "run"
    _run(tiny_random, records, folder, (0, 2), n=4)
    assert main(["merge-shards", str(folder)]) == 2
    assert "shard 1/2 is missing from" in capsys.readouterr().err
    _run(tiny_random, records, folder, (1, 2), n=5)  # another run: five records, not four
    with pytest.raises(ValueError, match=r"are of different runs: shard 1/2 differs from shard 0/2 in n, records"):
        merge_shards(folder)
    shutil.rmtree(folder / "shard-1-of-2")
    _run(tiny_random, records, folder, (1, 2), n=4)
    _run(tiny_random, records, folder, (0, 3), n=4)
    with pytest.raises(ValueError, match=r"overlap: some split the edits 2 ways and some 3 ways"):
        merge_shards(folder)
    shutil.rmtree(folder / "shard-0-of-3")
    shutil.copytree(folder / "shard-1-of-2", folder / "shard-0-of-2", dirs_exist_ok=True)  # one shard twice
    with pytest.raises(ValueError, match=r"overlap: folder shard-0-of-2 holds shard '1/2'"):
        merge_shards(folder)
    with pytest.raises(FileNotFoundError, match="no shards in"):
        merge_shards(tmp_path / "empty")
    for bad in ("2/2", "1", "a/b"):
        assert main(["evaluate", "--editor", "none", "--limit", "2", "--shard", bad]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and ("--shard must be i/k" in err or "out of range" in err)
