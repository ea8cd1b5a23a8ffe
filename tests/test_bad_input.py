"""Bad input, as a new user gives it: every case fails with one line that says what was wrong and how to fix
it (exit code 2 from the CLI), before the model loads where it can, or is made right."""

from __future__ import annotations

import json
import shlex
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from visedit.cli import main
from visedit.editing import EditRequest, MENDConfig, MENDEditor, VEADConfig, VEADEditor, get_editor
from visedit.world import DatasetSpec, make_edit_dataset

# seed 0: entity names come from the same world as the tiny model's vocabulary
SPEC = DatasetSpec(seed=0, n_entities=10, edits_per_pair=1, image_size=32)
OUTSIDE = "zebrafish"  # a word the tiny model's word-level vocabulary cannot encode


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The folder of a small world dataset in MMEdit schema (``eval.json``, images beside it)."""
    return make_edit_dataset(tmp_path_factory.mktemp("bad_input_data"), SPEC)


@pytest.fixture(scope="module")
def records(data):
    from visedit.world import load_mmedit

    return load_mmedit(data / "eval.json")


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if the CLI loads a model (the input should have been refused before)."""
    import visedit.models

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was found")

    monkeypatch.setattr(visedit.models, "load_vllm", refuse)


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _evaluate(tiny_random_dir, *args) -> int:
    return main(["evaluate", "--editor", "none", "--model", str(tiny_random_dir), *map(str, args)])


# --- presets -----------------------------------------------------------------------------------------------
def test_preset_with_a_yaml_syntax_error_is_one_line(tiny_random, tiny_random_dir, data, tmp_path, capsys, no_model):
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_steps: 3\nlr: [1\n")
    with pytest.raises(ValueError, match=r"bad.yaml is not valid YAML .*line 3") as err:
        get_editor("ft_l", tiny_random, preset=bad)
    assert "\n" not in str(err.value)
    assert _evaluate(tiny_random_dir, "--data", data / "eval.json", "--preset", bad, "--out", tmp_path / "o") == 2
    assert "not valid YAML" in _one_error_line(capsys)
    assert main(["sweep-vead", "--layers", "0", "--out", str(tmp_path), "--set", "w_loc=[1"]) == 2
    assert "--set w_loc=[1: the value is not valid YAML" in _one_error_line(capsys)


def test_evaluate_set_is_checked_before_the_model_loads(tiny_random_dir, tmp_path, capsys, no_model):
    base = ["evaluate", "--editor", "vead", "--model", str(tiny_random_dir), "--limit", "1", "--out", str(tmp_path)]
    assert main([*base, "--set", "memry=true"]) == 2
    assert "unknown VEADConfig key(s) ['memry']" in _one_error_line(capsys)
    assert main([*base, "--set", "memory"]) == 2
    assert "--set takes KEY=VALUE" in _one_error_line(capsys)
    assert main([*base, "--set", "route=[x"]) == 2
    assert "--set route=[x: the value is not valid YAML" in _one_error_line(capsys)
    assert main([*base, "--set", "route=joint", "--set", "route_layer=2", "--set", "route_scope=DIR"]) == 2
    assert "route_scope is a setting of the prompt route at a later layer" in _one_error_line(capsys)
    assert main(["fit-scope", "--model", str(tiny_random_dir), "--layer", "2", "--dim", "0", "--out", str(tmp_path)]) == 2
    assert "ScopeConfig.dim must be a positive int, got 0" in _one_error_line(capsys)


@pytest.mark.parametrize("name, setting, message", [
    ("mend", {"rankk": 3}, r"unknown MENDConfig key\(s\) \['rankk'\]"),
    ("mend", {"steps": "many"}, r"MENDConfig.steps must be an int, got 'many'"),
    ("vead", {"rankk": 3}, r"unknown VEADConfig key\(s\) \['rankk'\]"),
    ("vead", {"steps": "many"}, r"VEADConfig.steps must be an int, got 'many'"),
    ("vead", {"use_im": 1}, r"VEADConfig.use_im must be true or false, got 1"),
    ("ft_l", {"max_steps": 2.5}, r"FTLConfig.max_steps must be an int, got 2.5"),
])
def test_every_editors_preset_goes_through_its_strict_config(tiny_random, tiny_random_dir, data, tmp_path, capsys,
                                                              name, setting, message, monkeypatch):
    import yaml

    with pytest.raises(ValueError, match=message):
        get_editor(name, tiny_random, **setting)
    preset = tmp_path / f"{name}.yaml"
    preset.write_text(yaml.safe_dump(setting))
    monkeypatch.setattr("visedit.models.load_vllm", lambda *a, **k: pytest.fail("model loaded before the preset"))
    code = main(["evaluate", "--editor", name, "--model", str(tiny_random_dir), "--data", str(data / "eval.json"),
                 "--preset", str(preset), "--out", str(tmp_path / "out")])
    assert code == 2 and "error: " in _one_error_line(capsys)


# --- files and folders ------------------------------------------------------------------------------------
def test_data_that_is_a_folder_is_one_line(tiny_random_dir, data, capsys, no_model):
    assert _evaluate(tiny_random_dir, "--data", data) == 2
    line = _one_error_line(capsys)
    assert "is a folder: pass an MMEdit JSON file" in line and "eval.json" in line


def test_missing_images_are_all_named_before_the_model_loads(tiny_random_dir, data, tmp_path, capsys, no_model):
    rows = json.loads((data / "eval.json").read_text())[:3]
    rows[0]["image"] = "nowhere/a.png"
    rows[2]["m_loc"] = "nowhere/b.png"
    file = tmp_path / "evqa.json"
    file.write_text(json.dumps(rows))
    assert _evaluate(tiny_random_dir, "--data", file, "--image-root", data) == 2
    line = _one_error_line(capsys)
    assert "2 image file(s) not found" in line
    assert "record 0 image (" in line and "record 2 m_loc (" in line and "record 1" not in line
    assert "--image-root" in line and "image_root=" not in line
    assert _evaluate(tiny_random_dir, "--data", file, "--image-root", tmp_path / "nope") == 2
    assert "--image-root" in _one_error_line(capsys)


def test_an_answer_outside_the_vocabulary_names_record_and_field(tiny_random_dir, data, tmp_path, capsys):
    rows = json.loads((data / "eval.json").read_text())[:2]
    rows[0]["loc_ans"] = [OUTSIDE]  # the released E-VQA files hold lists of answers
    file = tmp_path / "evqa.json"
    file.write_text(json.dumps(rows))
    out = tmp_path / "out"
    assert _evaluate(tiny_random_dir, "--data", file, "--image-root", data, "--out", out) == 2
    line = _one_error_line(capsys)
    assert f"record 0 loc_ans ('{OUTSIDE}')" in line and "record 1" not in line
    assert not out.exists()


# --- the model -----------------------------------------------------------------------------------------------
def test_a_processor_that_needs_a_missing_package_is_one_line(tiny_random_dir, monkeypatch):
    import transformers

    from visedit.models import load_vllm

    def needs_torchvision(*args, **kwargs):
        raise ImportError("Qwen2VLVideoProcessor requires the Torchvision library but it was not found in your "
                          "environment. Check out the instructions on the\ninstallation page: https://pytorch.org")

    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", needs_torchvision)
    with pytest.raises(ValueError, match="pip install torchvision") as err:
        load_vllm(tiny_random_dir)
    assert "\n" not in str(err.value)


def test_a_prompt_longer_than_the_models_positions_is_refused(tiny_random, records):
    limit = tiny_random.max_positions
    with pytest.raises(ValueError, match=f"this model reads at most {limit} positions"):
        tiny_random.score(records[0].image, "red " * 2 * limit, "red")
    # a prompt that just fits is answered, generation stops where the positions run out
    fits = " ".join(["red"] * (limit - 40))
    n = len(tiny_random.inputs([(records[0].image, fits)]).tensors["input_ids"][0])
    assert n <= limit
    assert isinstance(tiny_random.answer(records[0].image, fits, max_new_tokens=100), str)


@pytest.mark.parametrize("image", [42, np.zeros((4, 4, 3), dtype=np.float32), torch.zeros(3, 8, 8)])
def test_an_image_that_is_not_an_image_is_one_line(tiny_random, image):
    with pytest.raises(ValueError, match="image must be a file path, a PIL image") as err:
        tiny_random.answer(image, "what colour is this creature ?")
    assert "\n" not in str(err.value)


def test_a_uint8_array_is_read_as_an_image(tiny_random, records):
    pil = Image.open(records[0].image).convert("RGB")
    q = records[0].src
    assert tiny_random.score(np.asarray(pil), q, "red").logprobs == tiny_random.score(pil, q, "red").logprobs


@pytest.mark.parametrize("layer", [1.5, "2", True])
def test_a_layer_that_is_not_an_int_says_so(tiny_random, layer):
    with pytest.raises(ValueError, match="layer must be an int"):
        tiny_random.adapter.check_layer(layer)
    with pytest.raises(ValueError, match="FTLConfig.layer must be an int"):
        get_editor("ft_l", tiny_random, layer=layer)
    assert tiny_random.adapter.check_layer(np.int64(-1)) == tiny_random.n_layers - 1


# --- editors -------------------------------------------------------------------------------------------------
def test_ike_refuses_an_answer_it_cannot_encode(tiny_random, records):
    editor = get_editor("ike", tiny_random)
    with pytest.raises(ValueError, match="cannot encode the target"):
        editor.apply(EditRequest(records[0].image, records[0].src, OUTSIDE))
    assert not editor.applied


def test_ft_v_refuses_a_text_only_edit(tiny_random, records):
    editor = get_editor("ft_v", tiny_random, max_steps=1)
    with pytest.raises(ValueError, match="ft_v tunes the vision side and needs an edit with an image"):
        editor.apply(EditRequest(None, records[0].loc, records[0].loc_ans))
    assert not editor.applied and not any(p.requires_grad for p in tiny_random.model.parameters())


@pytest.fixture
def other_model_dir(tiny_random_retrained, tmp_path):
    """``tiny_random_retrained`` saved as a checkpoint: same shapes as ``tiny_random``, other weights."""
    path = tmp_path / "other"
    tiny_random_retrained.model.save_pretrained(path)
    tiny_random_retrained.processor.save_pretrained(path)
    return path


@pytest.mark.parametrize("name", ["mend", "vead"])
def test_trained_editors_refuse_another_model_of_the_same_shapes(tiny_random, tiny_random_retrained, records, name,
                                                                 other_model_dir, data, tmp_path, capsys):
    import warnings

    folder = tmp_path / name
    editor = (MENDEditor(tiny_random, MENDConfig(layers=(-1,), rank=8)) if name == "mend"
              else VEADEditor(tiny_random, VEADConfig(layer=1)))
    editor.save(folder)
    assert json.loads((folder / f"{name}.json").read_text())["model_fingerprint"] == tiny_random.fingerprint
    get_editor(name, tiny_random, weights=str(folder))  # the model it was trained for
    with pytest.raises(ValueError, match=f"the {name.upper()} in .* was trained for another model .*"
                                         "--allow-other-model"):
        get_editor(name, tiny_random_retrained, weights=str(folder))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        get_editor(name, tiny_random_retrained, weights=str(folder), allow_other_model=True)
    assert len([w for w in caught if "trained for another model" in str(w.message)]) == 1
    args = ["evaluate", "--editor", name, "--model", str(other_model_dir), "--weights", str(folder), "--data",
            str(data / "eval.json"), "--limit", "1", "--out", str(tmp_path / "out")]
    assert main(args) == 2
    assert "trained for another model" in _one_error_line(capsys)
    with pytest.warns(UserWarning, match="trained for another model"):
        assert main(args + ["--allow-other-model", "--json"]) == 0


def test_shipped_editors_record_the_embedded_models_fingerprint(embedded):
    from visedit.editing.mend import TRAINED_DIR as MEND_DIR
    from visedit.editing.vead.editor import TRAINED_DIR as VEAD_DIR

    for folder, stem in ((MEND_DIR, "mend"), (VEAD_DIR, "vead")):
        assert json.loads((folder / f"{stem}.json").read_text())["model_fingerprint"] == embedded.fingerprint


# --- the evaluate command ------------------------------------------------------------------------------------
def test_limit_is_checked_before_the_model_loads(tiny_random_dir, data, capsys, no_model):
    assert _evaluate(tiny_random_dir, "--data", data / "eval.json", "--limit", "0") == 2
    assert "--limit must be ≥ 1, got 0" in _one_error_line(capsys)
    assert main(["regions", "--limit", "0"]) == 2
    assert "--limit must be ≥ 1" in _one_error_line(capsys)


def test_evaluate_json_shows_progress_on_stderr_only(tiny_random_dir, data, tmp_path, capsys):
    assert _evaluate(tiny_random_dir, "--data", data / "eval.json", "--limit", "2", "--json", "--out", tmp_path) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["n"] == 2
    assert "evaluate none" in captured.err and "2/2" in captured.err


def test_a_run_that_fails_before_its_first_edit_leaves_nothing(tiny_random_dir, data, tmp_path, capsys, monkeypatch):
    from visedit.evaluation import protocol

    def fails(*args, **kwargs):
        raise ValueError("something about this edit is wrong")

    monkeypatch.setattr(protocol, "score_edit", fails)
    out = tmp_path / "out"
    assert _evaluate(tiny_random_dir, "--data", data / "eval.json", "--limit", "2", "--out", out) == 2
    assert "something about this edit" in _one_error_line(capsys)
    assert not out.exists()


def test_ctrl_c_says_how_many_edits_are_saved_and_how_to_resume(tiny_random_dir, data, tmp_path, capsys,
                                                                 monkeypatch):
    from visedit.evaluation import protocol

    real, calls = protocol.score_edit, []

    def interrupted_at_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(protocol, "score_edit", interrupted_at_third)
    monkeypatch.chdir(tmp_path)  # the default --out is relative to here
    assert _evaluate(tiny_random_dir, "--data", data / "eval.json", "--limit", "4", "--fresh") == 130
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("interrupted")]
    assert len(lines) == 1 and "Traceback" not in err
    out = tmp_path / "results" / "evaluate" / "none-eval-n4"
    assert lines[0].startswith(f"interrupted: 2 of 4 edits are saved in {out.relative_to(tmp_path)}; resume with: "
                               "python -m visedit evaluate ")
    command = shlex.split(lines[0].split("resume with: ")[1])
    assert command[:3] == ["python", "-m", "visedit"] and "--fresh" not in command
    monkeypatch.setattr(protocol, "score_edit", real)
    assert main(command[3:] + ["--json"]) == 0
    rows = [json.loads(line) for line in (out / "edits.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2, 3]
    shutil.rmtree(tmp_path / "results")


def test_hints_name_what_the_cli_offers(tiny_random, records):
    from visedit.attribution import contribution_profile
    from visedit.cli import build_parser

    wrong = [r for r in records if tiny_random.score(r.image, r.src, r.pred).argmax_ids[0]
             != tiny_random.encode_target(r.pred)[0]][:2]
    with pytest.raises(ValueError, match=r"only_correct=False \(CLI: --all-records\)"):
        contribution_profile(tiny_random, wrong, progress=False)
    parser = build_parser()
    assert parser.parse_args(["contributions", "--all-records"]).all_records
    evaluate = parser._subparsers._group_actions[0].choices["evaluate"]
    weights = next(a for a in evaluate._actions if "--weights" in a.option_strings)
    assert "train-mend or train-vead" in weights.help
