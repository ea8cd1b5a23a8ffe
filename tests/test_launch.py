"""Running a chapter outside the repository: every notebook's first code cell installs visedit from the
repository that ``_config.yml`` names (its one place), and ``make repository`` keeps the two in step."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("set_repository", ROOT / "book" / "_ext" / "set_repository.py")
set_repository = importlib.util.module_from_spec(spec)
spec.loader.exec_module(set_repository)


def test_every_notebook_installs_from_the_configured_repository(capsys):
    assert set_repository.main(["--check"]) == 0, capsys.readouterr().out
    url = set_repository.configured_url()
    for path in set_repository.notebooks():
        cells = json.loads(path.read_text())["cells"]
        code = [c for c in cells if c["cell_type"] == "code"]
        assert code[0]["source"] == set_repository.install_cell_source(url), path.name
        assert code[0]["metadata"]["tags"] == ["remove-cell"] and not code[0]["outputs"]
        assert sum("".join(c["source"]).startswith(set_repository.MARK) for c in cells) == 1


def test_the_install_cell_does_nothing_inside_the_repository(monkeypatch):
    calls = []
    monkeypatch.setattr("subprocess.run", lambda *a, **k: calls.append(a))
    exec("".join(set_repository.install_cell_source("https://example.org/x")), {})
    assert calls == []  # visedit is importable here
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    exec("".join(set_repository.install_cell_source("https://example.org/x")), {})
    assert calls == [([sys.executable, "-m", "pip", "install", "-q", "visedit[book] @ git+https://example.org/x"],)]


def test_make_repository_rewrites_config_and_notebooks_together(tmp_path, monkeypatch, capsys):
    shutil.copy2(ROOT / "_config.yml", tmp_path)
    (tmp_path / "notebooks").mkdir()
    for p in set_repository.notebooks()[:2]:
        shutil.copy2(p, tmp_path / "notebooks")
    monkeypatch.setattr(set_repository, "ROOT", tmp_path)
    monkeypatch.setattr(set_repository, "CONFIG", tmp_path / "_config.yml")
    before = {p.name: json.loads(p.read_text()) for p in set_repository.notebooks()}
    assert set_repository.main(["https://github.com/someone/visedit/"]) == 0
    assert set_repository.configured_url() == "https://github.com/someone/visedit"
    assert set_repository.main(["--check"]) == 0
    for p in set_repository.notebooks():  # only the install cell changed; no cell was added twice
        after = json.loads(p.read_text())
        assert len(after["cells"]) == len(before[p.name]["cells"])
        changed = [i for i, (a, b) in enumerate(zip(after["cells"], before[p.name]["cells"])) if a != b]
        assert len(changed) == 1 and "git+https://github.com/someone/visedit\"" in "".join(after["cells"][changed[0]]["source"])
    (tmp_path / "_config.yml").write_text((tmp_path / "_config.yml").read_text().replace("someone", "other"))
    assert set_repository.main(["--check"]) == 1
    assert "do not install from https://github.com/other/visedit" in capsys.readouterr().out
    assert set_repository.main(["not-a-url"]) == 2
