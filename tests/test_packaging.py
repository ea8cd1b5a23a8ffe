"""Packaging: environment.yml lists exactly pyproject's dependencies; CI calls the README's test command."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = set(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        wanted |= set(extra)
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    assert set(pip) - {"-e ."} == wanted


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"^```bash\n(.+?)\n```", readme, flags=re.M | re.S)
    assert len(commands) == 2, "the README gives exactly two commands"
    ci = [l for l in (ROOT / ".ci/run").read_text().splitlines() if l and not l.startswith(("#", "set ", "cd "))]
    assert ci[-1] == commands[1].strip(), "CI ends with the README's test command"
    assert "make book" in ci and "export VISEDIT_REQUIRE_BROWSER=1" in ci, "CI builds the book so the browser tests never skip"


def test_embedded_model_is_small():
    """Every shipped weight folder (the models and the frozen encoder) stays within 30 MB."""
    weights = ROOT / "visedit/models/embedded/model.safetensors"
    assert weights.exists() and (ROOT / "visedit/models/embedded_encoder/model.safetensors").exists()
    for folder in sorted((ROOT / "visedit/models").glob("embedded*")):
        size = sum(f.stat().st_size for f in folder.iterdir())
        assert size <= 30 * 2**20, f"{folder.name} is {size / 2**20:.1f} MB"


def test_no_virtualenv_build_output_or_cache_is_tracked():
    """Nothing under .venv, _build or a cache is committed — a symlinked .venv slipped past `.venv/` in
    .gitignore once (the pattern with a slash matches directories only) and broke `make` on a fresh clone."""
    import shutil
    import subprocess

    import pytest

    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    bad = [p for p in tracked if p.split("/")[0] in (".venv", "_build", ".pytest_cache", ".reproduce", ".hypothesis")
           or "__pycache__" in p.split("/") or p.endswith(".pyc")]
    assert not bad, f"tracked files that must not be committed: {bad[:10]}"
