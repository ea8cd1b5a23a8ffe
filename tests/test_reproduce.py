"""notebooks/results/reproduce.sh: it covers every committed result, and its commands are valid."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from pathlib import Path

from visedit.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "notebooks" / "results" / "reproduce.sh"


def _dry(script=SCRIPT, **env) -> list[str]:
    done = subprocess.run(["bash", str(script)], env={**os.environ, "DRY": "1", **env}, capture_output=True,
                          text=True, check=True)
    return done.stdout.splitlines()


def _expand(path: str) -> list[str]:
    """``a/{x y}.json`` → ``a/x.json``, ``a/y.json`` (the script's way of naming a sweep's rows)."""
    m = re.fullmatch(r"(.*)\{(.*)\}(.*)", path)
    return [path] if m is None else [m[1] + tag + m[3] for tag in m[2].split()]


def _parsed(rest: str, parser, model: str):
    """A dry run's ``run`` line (after the verb) on embedded ``model``: its output and parsed arguments,
    both checked to be the model's; VEAD's layer is left to the rule."""
    out, command = rest.strip().split(": ", 1)
    assert model in out, out
    argv = shlex.split(command)
    args = parser.parse_args(argv[argv.index("visedit") + 1:])
    assert args.model == model
    if args.command == "train-vead":  # the rule's layer, but for the adapter at the sweep's best layer
        assert args.layer is None or out.endswith(f"/vead-layer{args.layer}"), out
    return out, args


def test_the_script_declares_every_committed_result_and_finds_it_in_place():
    lines = _dry()
    assert lines[-1].startswith("all results are in place")
    steps = lines[:-1]
    assert steps and all(line.startswith("done ") for line in steps), [s for s in steps if not s.startswith("done")]
    declared = {os.path.normpath(p) for line in steps for p in _expand(line.split(None, 1)[1])}
    results = ROOT / "notebooks" / "results"
    committed = {str(p.relative_to(ROOT)) for pattern in ("tune/*.json", "evaluate/*", "ablations/*", "sweep/*.json",
                                                          "sanity/*.json", "sequential/*", "sequential-tune/*")
                 for p in results.glob(pattern)}
    committed |= {"visedit/editing/trained/mend", "visedit/editing/trained/vead"}
    assert declared == committed


def test_a_staged_run_passes_the_model_to_every_command_and_each_parses(tmp_path):
    lines = _dry(MODEL="/models/retrained", STAGE=str(tmp_path))
    runs = [line for line in lines if line.startswith("run ")]
    assert len(runs) == 3 + 2 + 6 + 1 + 5 * 2 + 4 + 7 * 4 + 3 and len(runs) == len(lines) - 1  # … + many edits
    parser = build_parser()
    verbs = []
    for line in runs:
        out, command = line[len("run "):].strip().split(": ", 1)
        assert out.startswith(str(tmp_path))
        argv = shlex.split(command)
        args = parser.parse_args(argv[argv.index("visedit") + 1:])
        assert args.model == "/models/retrained"
        if args.command == "train-vead":
            assert args.layer == 0  # the preset's l_e, not one chosen from the new model's profile
        verbs.append(args.command)
    assert verbs.count("tune") == 3 and verbs.count("evaluate") == 11 + 28 + 3 and verbs.count("sweep-vead") == 4
    assert verbs.count("sanity") == 1


def test_every_committed_evaluation_was_run_on_the_shipped_model():
    """Results and model move together: retraining the tiny model without rerunning the script fails here."""
    from visedit.models import load_vllm

    runs = sorted((ROOT / "notebooks" / "results").glob("*/*/run.json"))
    assert len(runs) >= 6
    shipped = load_vllm().fingerprint
    stale = [str(p.parent.relative_to(ROOT)) for p in runs
             if json.loads(p.read_text()).get("model_fingerprint") != shipped]
    assert not stale, f"evaluated on other weights than the shipped model: {stale}; rerun reproduce.sh"


def test_the_second_models_run_writes_its_own_tree_and_lets_the_rule_place_vead(tmp_path):
    """MODEL=visedit-llava: results under results/visedit-llava/, trained editors under
    trained/visedit-llava/, every command on that model, VEAD's layer left to the rule, FT-L's grid over
    its twelve layers, and a sweep of at least five layers at the paper's placement, with the paper's memory and
    with the answer memory, plus the image-reading IM and two rewrites of ours (token_mlp, slots) at the rule's
    layer (l_e = 7)."""
    lines = _dry(MODEL="visedit-llava", WORK=str(tmp_path))
    assert lines[-1] == "all results are in place under ./notebooks/results/visedit-llava"
    parser = build_parser()
    sweep_layers, answer_layers, caption, sequential, late_tune = [], [], set(), set(), set()
    scoped_tune, scoped_eval, learned_tune, learned_eval, scope = set(), set(), set(), set(), set()
    im_image, rewrites = False, set()
    for line in lines[:-1]:
        verb, rest = line.split(None, 1)
        if verb == "done":  # a committed result: its path, no command
            assert "visedit-llava" in rest, rest
            row = re.fullmatch(r".*/sweep/(answer-)?layer(\d+)\.json", rest.strip())
            if row:  # a committed sweep row counts as run
                (answer_layers if row.group(1) else sweep_layers).append(int(row.group(2)))
            im_image |= bool(re.fullmatch(r".*/sweep/im-image-answer-layer7\.json", rest.strip()))
            if m := re.fullmatch(r".*/sweep/(token-mlp|slots)-answer-layer7\.json", rest.strip()):
                rewrites.add(m.group(1))
            done = rest.strip()
            if m := re.fullmatch(r".*/evaluate-caption/(\w+)", done):
                caption.add(("evaluate", m.group(1)))
            if m := re.fullmatch(r".*/trained/visedit-llava/(mend|vead)-caption", done):
                caption.add((f"train-{m.group(1)}", None))
            if m := re.fullmatch(r".*/sequential/([\w-]+)-T(\d+)", done):
                sequential.add((m.group(1), int(m.group(2))))
            tuned = r".*/sequential-tune/(vead-late|vead-scoped|vead-learned)(-layer\d+)?-min([\d.]+)-T100"
            if m := re.fullmatch(tuned, done):
                late_tune.add((m.group(1) + (m.group(2) or ""), f"route_min={m.group(3)}"))
            if m := re.fullmatch(r".*/scoped-tune/(learned-)?(route-min|refine-lr)([\d.]+)", done):
                (learned_tune if m.group(1) else scoped_tune).add((m.group(2), m.group(3)))
            if m := re.fullmatch(r".*/evaluate/vead-(scoped|learned)-(layer\d+)", done):
                (learned_eval if m.group(1) == "learned" else scoped_eval).add(f"vead-scoped-{m.group(2)}")
            if m := re.fullmatch(r".*/trained/visedit-llava/(scope-layer\d+)", done):
                scope.add(m.group(1))
            continue
        out, args = _parsed(rest, parser, "visedit-llava")
        if args.command == "tune" and args.editor == "ft_l":
            assert json.loads(args.grid)["layer"] == [0, 3, 6, 9, 11]
        if args.command == "sweep-vead":
            assert args.at == "output"
            answer = "memory_reads=answer" in args.set
            assert ("-memory_readsanswer" in out) == answer, out
            if args.im_reads == "image":  # ours, beside the paper's IM: at the rule's layer, answer memory
                assert answer and args.layers == [7] and "/sweep/layer7-im-image-" in out, out
                im_image = True
                continue
            rewrite = [s for s in args.set if s.startswith(("token_mlp=", "slots="))]
            if rewrite:  # ours, beside the paper's linear rewrite: at the rule's layer, answer memory
                assert answer and args.layers == [7] and rewrite in (["token_mlp=192"], ["slots=8"]), rest
                rewrites.add("token-mlp" if rewrite[0].startswith("token_mlp") else "slots")
                continue
            assert args.im_reads == "prompt"
            (answer_layers if answer else sweep_layers).extend(args.layers)
        if args.command in ("evaluate", "train-vead", "train-mend") and args.task == "caption":
            caption.add((args.command, getattr(args, "editor", None)))
        if args.command == "evaluate" and args.sequential is None and "route=prompt" in args.set:
            assert "/vead-layer2" in str(args.weights) and "route_layer=8" in args.set, rest
            if args.split == "train":  # the scoped VEAD's settings, chosen on 100 train edits
                assert args.limit == 100
                kind = "refine-lr" if any(a.startswith("refine_lr=") for a in args.set) else "route-min"
                value = next(a for a in args.set if a.startswith(kind.replace("-", "_") + "="))
                scoped_tune.add((kind, value.split("=")[1]))
            else:
                assert {"refine_steps=50", "route_min=TUNED", "refine_lr=TUNED"} <= set(args.set), rest
                scoped_eval.add(out.rstrip("/").rsplit("/", 1)[1])
        if args.command == "evaluate" and args.sequential is not None:
            tag = {"route=joint": "-joint", "route=nearest": "-memory", "route=prompt": "-scoped"}
            route = next((tag[s] for s in args.set if s in tag), "") if "memory=true" in args.set else ""
            route = "-late" if "route_layer=-1" in args.set else route
            route = "-learned" if any(s.startswith("route_scope=") for s in args.set) else route
            weights = str(args.weights or "")
            adapter = "-" + weights.rsplit("vead-", 1)[1] if "/vead-layer" in weights else ""
            route += adapter
            if args.split == "train":  # a route's threshold, chosen on the train split for each adapter
                late_tune.add((args.editor + route, next(s for s in args.set if s.startswith("route_min="))))
                continue
            sequential.add((args.editor + route, args.sequential))
    # E-IC: every editor evaluated on the caption split, MEND and VEAD trained on it
    assert {e for c, e in caption if c == "evaluate"} == {"none", "ft_l", "ft_v", "ike", "mend", "vead"}
    assert {c for c, _ in caption} == {"evaluate", "train-vead", "train-mend"}
    # many edits: five editors (VEAD also with its memory, routed by image, by image and question, or by both
    # read at the last layer with a threshold tuned on the train split) at T = 1, 10, 100, 500
    # and the memory on the adapter trained at the answer-memory sweep's best layer (2), routed by image and by
    # the late route with its own tuned threshold
    # and the memory scoped by the prompt route, each edit refined, with the settings chosen on single edits,
    # on raw keys and through the learned scope
    editors = ("vead-memory", "vead-joint", "vead-late", "vead", "ike", "ft_l", "mend", "vead-memory-layer2",
               "vead-late-layer2", "vead-scoped-layer2", "vead-learned-layer2")
    assert sequential == {(e, t) for e in editors for t in (1, 10, 100, 500)}
    assert late_tune == {(a, f"route_min={m}") for m in ("0.7", "0.8", "0.9")
                         for a in ("vead-late", "vead-late-layer2", "vead-scoped-layer2", "vead-learned-layer2")}
    assert scoped_tune == {("route-min", m) for m in ("0.5", "0.6", "0.7", "0.8")} | {("refine-lr", "0.05"),
                                                                                       ("refine-lr", "0.2")}
    assert scoped_eval == {"vead-scoped-layer2"}
    # the same route through the learned scope, its threshold and step size chosen on the same train edits
    assert learned_tune == scoped_tune and learned_eval == scoped_eval and scope == {"scope-layer8"}
    assert len(set(sweep_layers)) >= 5 and max(sweep_layers) >= 10 and min(sweep_layers) == 0
    assert sorted(set(answer_layers)) == sorted(set(sweep_layers))  # the same layers with the answer memory
    assert im_image and rewrites == {"token-mlp", "slots"}
    committed = {f"./{p.relative_to(ROOT)}" for p in (ROOT / "notebooks/results/visedit-llava/sweep").glob("*.json")}
    assert committed <= {line.split(None, 1)[1].strip() for line in lines if line.startswith("done ")}
    assert 7 in sweep_layers and 7 in answer_layers  # the rule's l_e (the study's contributions) is swept


def test_the_learned_scope_is_fitted_before_the_runs_that_read_it(tmp_path):
    """A staged run of the second model: fit-scope writes the scope at the route's layer (8, the first 100
    train edits left out) before any evaluation reads it, and every evaluation with route_scope reads that
    folder, on the same train edits (the threshold and the step size) or on the eval split (the chosen
    settings); the memory through the scope has its threshold chosen on train, then runs T = 1 … 500."""
    lines = _dry(MODEL="visedit-llava", STAGE=str(tmp_path), WORK=str(tmp_path / "work"))
    parser = build_parser()
    fitted, learned, memory = None, [], []
    for line in (line for line in lines if line.startswith("run ") and ("fit-scope" in line or "route_scope" in line)):
        out, args = _parsed(line.split(None, 1)[1], parser, "visedit-llava")
        if args.command == "fit-scope":
            assert args.layer == 8 and args.skip == 100
            assert out == f"{tmp_path}/visedit/editing/trained/visedit-llava/scope-layer8"
            fitted = out
        if args.command == "evaluate" and any(a.startswith("route_scope=") for a in args.set):
            assert fitted is not None and f"route_scope={fitted}" in args.set and "route_layer=8" in args.set
            route_min = next(a for a in args.set if a.startswith("route_min="))
            if args.sequential is not None:  # the learned memory: its threshold on train, then T = 1 … 500
                memory.append((args.split, route_min, out.rsplit("/", 1)[1]))
                continue
            learned.append((args.split, route_min, out.rsplit("/", 1)[1]))
    tuned = [f"learned-route-min{m}" for m in ("0.5", "0.6", "0.7", "0.8")]
    tuned += [f"learned-refine-lr{v}" for v in ("0.05", "0.2")]
    assert [name for split, _, name in learned if split == "train"] == tuned
    chosen = [(m, name) for split, m, name in learned if split != "train"]
    assert chosen == [("route_min=TUNED", "vead-learned-layerBEST")]
    tag = "vead-learned-layerBEST"
    assert memory == [("train", f"route_min={m}", f"{tag}-min{m}-T100") for m in ("0.7", "0.8", "0.9")] \
        + [("eval", "route_min=TUNED", f"{tag}-T{n}") for n in (1, 10, 100, 500)]


def test_the_blip2_models_run_stops_after_its_evaluations(tmp_path):
    """MODEL=visedit-blip2: its own tree, the six 504-edit evaluations with tuned baselines and trained MEND
    and VEAD (the layer left to the rule), and nothing that needs a patch grid (sanity checks, sweeps)."""
    lines = _dry(MODEL="visedit-blip2", WORK=str(tmp_path))
    assert lines[-1] == "all results are in place under ./notebooks/results/visedit-blip2"
    parser = build_parser()
    verbs = []
    for line in lines[:-1]:
        verb, rest = line.split(None, 1)
        if verb == "done":
            assert "visedit-blip2" in rest, rest
            verbs.append(None)
            continue
        verbs.append(_parsed(rest, parser, "visedit-blip2")[1].command)
    assert len(verbs) == 3 + 6 + 2
    assert not {"sanity", "sweep-vead", "reachability"} & set(verbs)


def test_an_interrupted_evaluation_is_resumed_not_taken_as_done(tmp_path):
    """An evaluate folder with per-edit lines and no summary.json was cut off: the step resumes it (the same
    command without --fresh); with its summary it is done; a missing output runs the command as given."""
    steps = ROOT / "notebooks" / "results" / "steps.sh"
    partial, finished = tmp_path / "partial", tmp_path / "finished"
    for folder in (partial, finished):
        folder.mkdir()
        (folder / "edits.jsonl").write_text("{}\n")
    (finished / "summary.json").write_text("{}")

    def run(out):
        script = f"source {shlex.quote(str(steps))}; step {shlex.quote(str(out))} echo evaluate --fresh --out X"
        return subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout.splitlines()

    assert run(partial) == [f"resume  {partial}: echo evaluate --out X ", "evaluate --out X"]
    assert run(finished) == [f"done    {finished}"]
    fresh = run(tmp_path / "missing")
    assert fresh[:2] == [f"run     {tmp_path / 'missing'}: echo evaluate --fresh --out X ", "evaluate --fresh --out X"]


def test_reproduce_hands_the_late_model_to_its_own_script(tmp_path):
    """MODEL=visedit-late bash reproduce.sh runs late.sh, in place and staged alike."""
    late = ROOT / "notebooks" / "results" / "late.sh"
    assert _dry(MODEL="visedit-late") == _dry(late)
    env = dict(STAGE=str(tmp_path), WORK=str(tmp_path / "w"))
    assert _dry(MODEL="visedit-late", **env) == _dry(late, **env)


def test_the_late_model_s_script_declares_its_results_and_each_command_parses(tmp_path):
    """notebooks/results/late.sh: in place, every committed result of the tuned model is a done step; staged
    elsewhere, its contributions, six sweep rows, VEAD at the rule's layer (trained, evaluated, its learned
    scope fitted and tuned), the five baselines, the attribution chapters' reports, the sweep's rows with the
    paper's memory, three variants at the rule's layer, the prompt route on raw keys (tuned, then on every eval
    edit) and the caption edits (four baselines, MEND and VEAD trained on the caption split) run on the shipped
    tuned model, and each command parses."""
    script = ROOT / "notebooks" / "results" / "late.sh"
    lines = _dry(script)
    assert lines[-1].startswith("all results are in place") and all(s.startswith("done ") for s in lines[:-1])
    declared = {os.path.normpath(s.split(None, 1)[1]) for s in lines[:-1]}
    results = ROOT / "notebooks" / "results" / "visedit-late"
    patterns = ("contributions.json", "sweep/*.json", "tune/*.json", "evaluate/*", "scoped-tune/*", "reading.json",
                "sanity/*.json", "regions.json", "reachability.json", "evaluate-caption/*")
    committed = {str(p.relative_to(ROOT)) for pattern in patterns for p in results.glob(pattern)}
    trained = {f"visedit/editing/trained/visedit-late/{name}"
               for name in ("vead", "scope-layer8", "mend", "mend-caption", "vead-caption")}
    assert declared == committed | trained | {"visedit/models/embedded_late"}
    staged = _dry(script, STAGE=str(tmp_path), WORK=str(tmp_path / "w"))
    assert staged[0] == "done    visedit/models/embedded_late"
    runs = [s for s in staged if s.startswith("run ")]
    assert len(runs) == 1 + 6 + 10 + 9 + 4 + 6 + 3 + 7 + 8 and len(runs) == len(staged) - 2
    parser, layers, commands, captions = build_parser(), [], [], []
    for line in runs:
        out, command = line[len("run "):].strip().split(": ", 1)
        argv = shlex.split(command)
        args = parser.parse_args(argv[argv.index("visedit") + 1:])
        assert args.model == "visedit-late" and out.startswith(str(tmp_path))
        commands.append(args.command)
        if getattr(args, "task", None) == "caption":
            captions.append(args.command)
        if args.command == "sweep-vead":
            layers += args.layers
        if args.command == "train-vead":  # the second model's preset at the rule's layer (the committed one's)
            assert args.layer == 7 and args.config.endswith("presets/visedit-llava/vead.yaml")
        if args.command == "evaluate" and args.editor == "vead":
            assert args.preset.endswith("presets/visedit-llava/vead.yaml")
            assert str(args.weights).startswith(str(tmp_path))
    assert sorted(layers) == [0, 0, 2, 2, 4, 4, 6, 6, 7, 7, 7, 7, 7, 10, 10]  # answer and paper rows; 3 variants
    assert commands.count("evaluate") == 2 + 6 + 5 + 7 + 6 and commands.count("tune") == 3
    assert sorted(captions) == ["evaluate"] * 6 + ["train-mend", "train-vead"]
    assert all(commands.count(c) == 1 for c in ("reading", "sanity", "regions", "reachability"))
