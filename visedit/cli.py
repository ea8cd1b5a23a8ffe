"""Command line: ``python -m visedit <command> …``. Every command that reports numbers has ``--json``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

MODEL_HELP = ("a checkpoint folder, or an embedded model's name: visedit-tiny (the default), visedit-llava "
              "(the second teaching model), visedit-late (the second tuned to decide late) or visedit-blip2 "
              "(a BLIP-2 on the second's frozen encoder)")


def _train_tiny(args) -> int:
    import yaml

    if args.recipe is not None:
        return _train_recipe(args)
    if args.budget != "full" or args.set or args.device != "cpu" or args.encoder_from is not None or args.encoder_only:
        raise ValueError("--budget, --set, --device, --encoder-from and --encoder-only apply to a recipe: add "
                         "--recipe llava (or another recipe)")

    from .models.tiny import TinyConfig
    from .models.train import TrainConfig, train_tiny

    overrides = yaml.safe_load(Path(args.config).read_text()) if args.config else {}
    if not isinstance(overrides, dict):
        raise SystemExit(f"error: {args.config} must hold a YAML mapping with 'train' and/or 'tiny' keys")
    unknown = sorted(set(overrides) - {"train", "tiny"})
    if unknown:
        raise SystemExit(f"error: unknown top-level key(s) {unknown} in {args.config}; use 'train' and 'tiny'")
    cfg = TrainConfig.from_dict({**(overrides.get("train") or {}), **({"seed": args.seed} if args.seed is not None else {})})
    tiny = TinyConfig.from_dict(overrides.get("tiny") or {})
    record = train_tiny(args.out, cfg, tiny, progress=not args.no_progress, start_from=args.start_from)
    print(json.dumps({"out": str(args.out), "wall_seconds": record["wall_seconds"],
                      "final_loss": record["final_loss"], "context_loss": record.get("context_loss")}, indent=1))
    return 0


def _train_late(args) -> int:
    from .models.late import LateConfig, train_late

    cfg = LateConfig.from_dict(dict(_set_items(args)))
    record = train_late(args.out, args.model, cfg, progress=not args.no_progress)
    print(json.dumps({"out": str(args.out), "wall_seconds": record["wall_seconds"], "loss": record["loss"],
                      "kl": record["log"][-1]["kl"]}, indent=1))
    return 0


def _train_recipe(args) -> int:
    from .models.recipe import recipe_config, train_recipe

    if args.config or args.start_from:
        raise ValueError("--config and --start-from belong to the first model's training; with --recipe use "
                         "--set KEY=VALUE and --budget")
    overrides = dict(_set_items(args))
    if args.seed is not None:
        overrides["seed"] = args.seed
    cfg = recipe_config(args.recipe, budget=args.budget, **overrides)
    record = train_recipe(args.out, cfg, progress=not args.no_progress, device=args.device,
                          stop_after=args.stop_after, encoder_from=args.encoder_from, encoder_only=args.encoder_only)
    print(json.dumps({"out": str(args.out), "recipe": cfg.name, "stopped": bool(record.get("stopped")),
                      "wall_seconds": record.get("wall_seconds"), "seconds": record["seconds"],
                      "instruct_loss": record.get("instruct_loss")}, indent=1))
    return 0


def _emit(args, out: dict, brief: tuple[str, ...] | None = None) -> None:
    """Print a command's JSON result (``brief``: the keys shown without --json) and, with --out, write it
    atomically with the command that made it."""
    import shlex

    if getattr(args, "out", None):
        from .io import write_json

        write_json(args.out, {**out, "command": "python -m visedit " + shlex.join(getattr(args, "argv", sys.argv[1:]))})
    shown = out if args.json or brief is None else {k: out[k] for k in brief if k in out}
    print(json.dumps(shown, indent=1) if args.json else json.dumps(shown))


def _reading(args) -> int:
    from .models import load_vllm
    from .study import reading_report

    report = reading_report(load_vllm(args.model), n_profile=args.n_profile, n_selectivity=args.n_selectivity,
                            card_entities=args.card_entities, progress=True)
    _emit(args, report.to_dict(), ("model", "attention_peak", "attention_peak_relative_depth", "early_share",
                                   "visual_peak_relative_depth", "visual_early_share"))
    return 0


def _model_card(args) -> int:
    from .models import load_vllm
    from .models.card import model_card

    for flag, value in (("--renders", args.renders), ("--entities", args.entities)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be ≥ 1, got {value}")
    vllm = load_vllm(args.model)
    entities = None
    if args.entities is not None:
        n = vllm.info.get("n_entities", 70)
        if args.entities > n:
            raise ValueError(f"--entities {args.entities} is more than the model's world has ({n}); drop it for all")
        entities = range(args.entities)
    card = model_card(vllm, seed=args.seed, renders=args.renders, entities=entities, progress=True)
    if args.json:
        print(json.dumps(card.to_dict(), indent=1))
    else:
        print(card.table().to_string())
        for check, ok in card.passes().items():
            print(f"{'PASS' if ok else 'FAIL'}  {check}")
    return 0


def _make_dataset(args) -> int:
    from .world import DatasetSpec, load_mmedit, make_edit_dataset

    from .world.dataset import spec_dataset_dir

    spec = DatasetSpec(seed=args.seed, task=args.task or "vqa")
    out = make_edit_dataset(args.out or spec_dataset_dir(spec), spec, progress=True)
    counts = {s: len(load_mmedit(out / f"{s}.json")) for s in ("train", "eval")}
    print(json.dumps({"out": str(out), **counts}, indent=1))
    return 0


def _contributions(args) -> int:
    import numpy as np
    from tqdm.auto import tqdm

    from .attribution import (contribution_profile, integrated_gradients, pixel_ig_refusal, source_profile,
                              token_allocation)
    from .editing.vead.editor import choose_edit_layer
    from .models import load_vllm
    from .world import load_world_split, spread

    _check_limit(args.limit)
    if args.ig_steps < 2:
        raise ValueError(f"--ig-steps must be ≥ 2, got {args.ig_steps}")
    if args.ig_tolerance is not None and not args.ig_tolerance > 0:
        raise ValueError(f"--ig-tolerance must be > 0 (e.g. 0.05), or none for exactly --ig-steps; got "
                         f"{args.ig_tolerance}")
    if args.ig_tolerance is not None and args.ig_max_steps < args.ig_steps:
        raise ValueError(f"--ig-max-steps ({args.ig_max_steps}) must be ≥ --ig-steps ({args.ig_steps})")
    vllm = load_vllm(args.model)
    records = load_world_split("eval", vllm.dataset_spec, progress=True)
    if args.limit is not None:
        records = spread(records, args.limit) if args.spread else records[: args.limit]
    profile = contribution_profile(vllm, records, only_correct=not args.all_records, progress=True)
    sources = source_profile(vllm, records, only_correct=not args.all_records, progress=True)
    layer = vllm.adapter.check_layer(args.layer) if args.layer is not None else profile.peak("attn")
    alloc_err, ig_delta, ig_steps, ig_unconverged = 0.0, 0.0, {"pixels": [], "layer": []}, 0
    # IG on pixels where the backbone has one image grid to sum onto; else on the layer's visual tokens only
    pixels_refused = pixel_ig_refusal(vllm, records[0].image, records[0].src) if records[: args.ig_limit] else None
    for k, rec in enumerate(tqdm(records[: args.ig_limit], desc="allocation + IG")):
        alloc_err = max(alloc_err, token_allocation(vllm, rec.image, rec.src, layer=layer).max_error)
        for where in (layer,) if pixels_refused else (None, layer):
            ig = integrated_gradients(vllm, rec.image, rec.src, layer=where, n_steps=args.ig_steps,
                                      tolerance=args.ig_tolerance, max_steps=args.ig_max_steps)
            ig_delta = max(ig_delta, ig.relative_delta)
            ig_steps["pixels" if where is None else "layer"].append(ig.n_steps)
            ig_unconverged += not ig.converged
    out = {**{k: [round(x, 6) for x in v] for k, v in profile.mean.items()}, "low": profile.low, "high": profile.high,
           "n": profile.n, "n_total": profile.n_total, "layer": layer, "peak_attn": profile.peak("attn"),
           "peak_mlp": profile.peak("mlp"), "attention_peak_relative_depth": round(profile.relative_peak_depth("attn"), 4),
           "early_share": round(profile.early_share("attn"), 4),
           "visual_attention": sources.mean["visual"], "text_attention": sources.mean["text"],
           "visual_peak_relative_depth": round(sources.relative_peak_depth("visual"), 4),
           "visual_early_share": round(sources.early_share("visual"), 4), "allocation_max_error": float(np.format_float_scientific(alloc_err, 3)),
           "ig_max_delta": round(ig_delta, 6), "ig_examples": min(args.ig_limit, len(records)),
           "ig_steps": {where: _steps_summary(steps) for where, steps in ig_steps.items()},
           "ig_unconverged": ig_unconverged, "ig_tolerance": args.ig_tolerance, "ig_pixels_refused": pixels_refused,
           "choose_edit_layer": choose_edit_layer(vllm, load_world_split("train", vllm.dataset_spec, progress=False))}
    _emit(args, out)
    return 0


def _steps_summary(steps: list[int]) -> dict:
    """Integration steps IG needed over records: min, median, max and how many records took each count."""
    import numpy as np

    if not steps:
        return {}
    counts = {str(s): steps.count(s) for s in sorted(set(steps))}
    return {"min": min(steps), "median": float(np.median(steps)), "max": max(steps), "counts": counts}


def _check_limit(limit: int | None, least: int = 1) -> None:
    if limit is not None and limit < least:
        raise ValueError(f"--limit must be ≥ {least}, got {limit}")


def _correct_eval_records(vllm, limit: int | None, progress: bool, *, spread: bool = False):
    """The first ``limit`` eval records the model answers correctly; with ``spread``, looked for at an even
    stride first (every entity and fact), then at the records between."""
    from .world import load_world_split

    _check_limit(limit)
    records = load_world_split("eval", vllm.dataset_spec, progress=progress)
    if spread and limit is not None:
        stride = max(1, len(records) // limit)
        records = [records[i] for i in sorted(range(len(records)), key=lambda i: i % stride)]
    out = []
    for rec in records:
        if vllm.score(rec.image, rec.src, rec.pred).exact:
            out.append(rec)
        if limit is not None and len(out) >= limit:
            break
    return out


def _ints(text: str, option: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"{option} takes comma-separated whole numbers, e.g. {option} 64,144,576; got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"{option} takes positive whole numbers, got {text!r}")
    return values


def _bench(args) -> int:
    from .bench import bench_card, bench_scale, bench_tracing
    from .models import load_vllm

    if args.what == "scale":
        if args.model:
            raise ValueError("bench scale builds its own random-weight models of LLaVA-1.5's shape; drop --model")
        out = bench_scale(tokens=_ints(args.tokens, "--tokens"), layers=_ints(args.layers, "--layers"),
                          hidden=args.hidden, n=args.n, chunk_size=args.chunk_size, loop=args.loop_layers,
                          device=args.device, progress=True)  # progress on stderr, the result on stdout
        _emit(args, out, brief=("noise_speedup", "noise_max_abs_diff", "growth_exponents", "targets"))
        return 0
    vllm = load_vllm(args.model)
    if args.what == "card":
        _emit(args, bench_card(vllm, entities=args.n), brief=("speedup", "cards_agree"))
        return 0
    record = _correct_eval_records(vllm, 1, progress=False)[0]
    result = bench_tracing(vllm, record, repeats=args.repeats, radius=args.radius, n=args.n)
    print(json.dumps(result, indent=1) if args.json else json.dumps(result))
    return 0


def _regions(args) -> int:
    from .attribution import region_scores
    from .models import load_vllm

    from .attribution.selectivity import layer_selectivity
    from .world import load_world_split, spread

    _check_limit(args.limit)
    vllm = load_vllm(args.model)
    result = {}
    if args.methods in ("all", "masks"):
        records = _correct_eval_records(vllm, args.limit, progress=True)
        result = region_scores(vllm, records, progress=True)
    if vllm.dataset_spec.edition == 2 and args.methods in ("all", "selectivity"):
        records = spread(load_world_split("eval", vllm.dataset_spec, progress=True), args.selectivity_limit)
        result["selectivity"] = layer_selectivity(vllm, records, progress=True).to_dict()
    elif args.methods == "selectivity":
        raise ValueError("--methods selectivity needs a model trained on scenes (e.g. --model visedit-llava)")
    _emit(args, result)
    return 0


def _reachability(args) -> int:
    from .editing.vead.analysis import reachability
    from .models import load_vllm
    from .world import load_world_split, spread

    _check_limit(args.limit)
    vllm = load_vllm(args.model)
    layers = args.layers if args.layers is not None else list(range(vllm.n_layers))
    for layer in layers:
        vllm.adapter.check_layer(layer)
    records = spread(load_world_split("eval", vllm.dataset_spec, progress=True), args.limit)
    result = reachability(vllm, records, layers=layers, steps=args.steps, lr=args.lr, progress=True)
    out = {**result.to_dict(), "n": len(records), "steps": args.steps, "lr": args.lr, "model": vllm.name,
           "model_fingerprint": vllm.fingerprint, "command": "python -m visedit " + " ".join(args.argv)}
    if args.out:
        from .io import write_json

        write_json(args.out, out)
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        for layer, share in out["reached"].items():
            print(f"layer {layer:>2}: new answer reached on {share:.0%} of {len(records)} edits")
    return 0


def _sanity(args) -> int:
    from .attribution.sanity import METHODS, sanity_checks
    from .models import load_vllm

    _check_limit(args.limit)
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        raise ValueError(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    if args.vead is not None and "gate" not in args.methods:
        raise ValueError("--vead gives the gate's VEAD: add gate to --methods, or leave --vead out")
    vllm = load_vllm(args.model)
    editor = None
    if args.vead is not None:
        from .editing import get_editor

        editor = get_editor("vead", vllm, **({} if args.vead == "shipped" else {"weights": str(args.vead)}))
    records = _correct_eval_records(vllm, args.limit, progress=True, spread=True)
    if not records:
        raise ValueError("the model answers none of the eval records correctly: nothing to check the maps on")
    result = sanity_checks(vllm, records, methods=args.methods, layer=args.layer, editor=editor, seed=args.seed,
                           vision=not args.decoder_only, progress=True)
    out = {**result.to_dict(), "model_fingerprint": vllm.fingerprint,
           "command": "python -m visedit " + " ".join(args.argv)}
    if args.out:
        from .io import write_json

        write_json(args.out, out)
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        print(result.table().to_string())
        print(f"data randomisation: {result.data_randomisation}")
    return 0


TASK_HELP = ("the world's edit task: vqa (E-VQA, questions; the default) or caption (E-IC: the prompt 'a photo of' "
             "and a whole caption as the target); with --data it overrides the file's rule")


def _spec(spec, args):
    """The world's dataset ``spec`` for the task ``--task`` asks for (E-VQA when it is not given)."""
    import dataclasses

    task = getattr(args, "task", None)
    return spec if task is None else dataclasses.replace(spec, task=task)


def _records(args, progress: bool):
    """The records ``evaluate`` runs on, checked before any model loads: ``--limit``, ``--data`` (a file),
    ``--image-root`` (a folder) and every record's image files."""
    from .evaluation import check_records
    from .world import load_mmedit, load_world_split

    _check_limit(args.limit)
    if args.data is not None:
        data = Path(args.data)
        if data.is_dir():
            found = ", ".join(sorted(p.name for p in data.glob("*.json"))[:5]) or "none there"
            raise ValueError(f"--data {data} is a folder: pass an MMEdit JSON file (JSON files in it: {found})")
        if args.image_root is not None and not Path(args.image_root).is_dir():
            raise FileNotFoundError(f"--image-root {args.image_root} is not a folder: pass the folder that "
                                    "--data's image paths are relative to")
        records = load_mmedit(data, image_root=args.image_root, task=args.task)
    else:
        if args.image_root is not None:
            raise ValueError("--image-root only applies to --data: pass both, or neither for the world's split")
        from .models.vllm import dataset_spec_of

        records = load_world_split(args.split, _spec(dataset_spec_of(args.model), args), progress=progress)
    if args.limit is not None:
        records = records[: args.limit]
    check_records(records, image_root_hint="--image-root")
    return records


def _resume_command(args, out: Path, shard: tuple[int, int] | None = None) -> str:
    """The command line that resumes an interrupted ``evaluate`` into ``out`` (a shard from the environment
    is written out as ``--shard i/k``)."""
    import shlex

    argv = [a for a in args.argv if a != "--fresh"]
    if args.out is None:
        argv += ["--out", str(out)]
    if shard is not None and args.shard is None:
        argv += ["--shard", "{}/{}".format(*shard)]
    return "python -m visedit " + shlex.join(argv)


def _evaluate(args) -> int:
    from .editing import editor_settings, get_editor
    from .evaluation import evaluate
    from .evaluation.protocol import _read_done
    from .evaluation.shards import parse_shard, shard_folder, shard_from_env, shard_indices
    from .models import load_vllm

    _check_sequential(args)
    shard = parse_shard(args.shard) if args.shard is not None else shard_from_env()
    if shard is not None and args.sequential is not None:
        raise ValueError("--sequential is one chain of edits and cannot be sharded over processes: run it in one "
                         "process (without --shard, RANK or WORLD_SIZE)")
    records = _records(args, progress=True)
    if shard is not None:
        shard_indices(len(records), shard)  # a shard with no edit fails before the model loads
    overrides = {"weights": str(args.weights)} if args.weights is not None else {}
    overrides.update(_set_items(args))
    # a bad preset (or --set) fails before the model loads
    editor_settings(args.editor, preset=args.preset, model=args.model, **overrides)
    vllm = load_vllm(args.model, **_placement(args, shard))
    editor = get_editor(args.editor, vllm, preset=args.preset, allow_other_model=args.allow_other_model,
                        **overrides)
    source = Path(args.data).stem if args.data is not None else args.split
    if args.sequential is not None:
        return _evaluate_sequential(args, editor, records, source)
    out = args.out or Path("results") / "evaluate" / f"{args.editor}-{source}-n{len(records)}"
    written = shard_folder(out, shard) if shard is not None else Path(out)
    try:
        summary = evaluate(editor, records, out=out, resume=not args.fresh, progress=True, shard=shard)
    except KeyboardInterrupt:
        saved = len(_read_done(written / "edits.jsonl"))
        total = len(shard_indices(len(records), shard)) if shard is not None else len(records)
        print(f"interrupted: {saved} of {total} edits are saved in {written}; resume with: "
              f"{_resume_command(args, Path(out), shard)}", file=sys.stderr)
        return 130
    result = {**summary.to_dict(), "out": str(written)}
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(summary.table().to_string())
        print(f"n = {summary.n}, mean edit time {summary.edit_seconds_mean:.3f} s; written to {written}")
    if shard is not None:
        print("shard {}/{} done; when every shard is, merge them: python -m visedit merge-shards {}".format(
            *shard, out), file=sys.stderr)
    return 0


def _placement(args, shard) -> dict:
    """``load_vllm``'s placement options from ``--device`` / ``--device-map`` / ``--offload-folder``. A sharded
    process under torchrun or accelerate launch given ``--device cuda`` takes the GPU of its ``LOCAL_RANK``."""
    import os

    if args.device_map is not None:
        if args.device != "cpu":
            raise ValueError("pass --device (one device) or --device-map (spread over devices), not both")
        return {"device_map": args.device_map, "offload_folder": args.offload_folder}
    if args.offload_folder is not None:
        raise ValueError("--offload-folder only applies with --device-map: add --device-map auto")
    device = args.device
    if shard is not None and device == "cuda" and os.environ.get("LOCAL_RANK", "").isdigit():
        device = f"cuda:{os.environ['LOCAL_RANK']}"
    return {"device": device}


def _merge_shards(args) -> int:
    from .evaluation import merge_shards

    summary = merge_shards(args.folder)
    if args.json:
        print(json.dumps({**summary.to_dict(), "out": str(args.folder)}, indent=1))
    else:
        print(summary.table().to_string())
        print(f"n = {summary.n} edits merged from their shards; written to {args.folder}")
    return 0


def _check_sequential(args) -> None:
    """``--every`` / ``--batch`` / ``--seed`` only go with ``--sequential``; checked before the model loads."""
    if args.sequential is None:
        given = [f for f, v in (("--every", args.every), ("--batch", args.batch), ("--seed", args.seed))
                 if v is not None]
        if given:
            raise ValueError(f"{', '.join(given)} only apply to --sequential T: add --sequential, or leave them out")
        return
    for flag, value in (("--sequential", args.sequential), ("--batch", args.batch), ("--every", args.every)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be a positive number of edits, got {value}")


def _evaluate_sequential(args, editor, records, source: str) -> int:
    from .evaluation import evaluate_sequential

    batch, seed = args.batch or 1, args.seed or 0
    out = args.out or Path("results") / "sequential" / f"{args.editor}-{source}-T{args.sequential}-b{batch}-s{seed}"
    try:
        summary = evaluate_sequential(editor, records, T=args.sequential, every=args.every, batch=batch, seed=seed,
                                      out=out, resume=not args.fresh, progress=True)
    except KeyboardInterrupt:
        steps = Path(out) / "steps.jsonl"
        saved = len(steps.read_text().splitlines()) if steps.exists() else 0
        print(f"interrupted: {saved} edit steps are saved in {out}; resume with: "
              f"{_resume_command(args, Path(out))}", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps({**summary.to_dict(), "out": str(out)}, indent=1))
    else:
        print(summary.final.table().to_string())
        if summary.retention:
            print(summary.retention_frame().to_string())
        for metric, u in summary.unrelated.items():
            if u["left_out"]:
                print(f"{metric} on the {u['n']} probes about facts no edit changed: {u['token']} (token), "
                      f"{u['exact']} (exact); {u['left_out']} probes asked about an edited fact")
        print(f"T = {summary.T} edits in steps of {summary.batch}, {summary.edit_seconds_mean:.3f} s per edit, "
              f"{summary.held_bytes[-1] / 2**20:.1f} MiB held at the end; written to {out}")
    return 0


def _tune(args) -> int:
    from .evaluation.tune import tune
    from .models import load_vllm
    from .world import load_world_split, spread

    try:
        grid = json.loads(args.grid)
    except json.JSONDecodeError as err:
        raise ValueError(f"--grid must be JSON, e.g. '{{\"lr\": [1e-3, 1e-4]}}': {err}") from err
    if not isinstance(grid, dict):
        raise ValueError("--grid must be a JSON object mapping settings to lists of values")
    if args.limit < 1:
        raise ValueError(f"--limit must be ≥ 1, got {args.limit}")
    vllm = load_vllm(args.model)
    records = spread(load_world_split("train", _spec(vllm.dataset_spec, args), progress=True), args.limit)
    result = tune(args.editor, vllm, records, grid, progress=True)
    if args.json:
        print(json.dumps(result.to_dict(), indent=1))
    else:
        print(result.table().to_string())
        print(f"best on {result.n} train edits: {result.best}")
    return 0


def _train_mend(args) -> int:
    from .editing import MENDConfig, load_preset, train_mend
    from .models import load_vllm
    from .world import load_world_split

    settings = load_preset("mend", args.config, model=args.model)
    settings.pop("weights", None)
    if args.steps is not None:
        settings["steps"] = args.steps
    if args.seed is not None:
        settings["seed"] = args.seed
    config = MENDConfig.from_dict(settings)
    vllm = load_vllm(args.model)
    _, info = train_mend(vllm, load_world_split("train", _spec(vllm.dataset_spec, args), progress=True), config, out=args.out,
                         progress=True)
    print(json.dumps({"out": str(args.out), "wall_seconds": info["wall_seconds"],
                      "best_val_mean": info["best_val_mean"]}, indent=1))
    return 0


def _set_items(args) -> list[tuple[str, object]]:
    """The ``--set KEY=VALUE`` overrides, each value read as YAML (``--set use_im=false``, ``--set w_loc=5``)."""
    import yaml

    from .io import yaml_error

    items = []
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ValueError(f"--set takes KEY=VALUE, e.g. --set w_loc=5; got {item!r}")
        try:
            items.append((key.strip(), yaml.safe_load(value)))
        except yaml.YAMLError as err:
            raise ValueError(f"--set {item}: the value is not valid YAML ({yaml_error(err)})") from None
    return items


def _vead_overrides(settings: dict, args, keys=("at", "im_reads", "width", "decay_share")) -> dict:
    """Apply the VEAD options ``keys`` that were given on the command line, then every ``--set``, to preset
    ``settings`` (an unknown key is refused when the config is built); returns the ``--set`` items."""
    for key in keys:
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    sets = dict(_set_items(args))
    settings.update(sets)
    return sets


def _add_vead_options(p, where: str) -> None:
    p.add_argument("--at", choices=["output", "input"], default=None,
                   help=f"rewrite the output (the paper) or the input of {where} (default: the preset's)")
    p.add_argument("--im-reads", choices=["prompt", "image"], default=None,
                   help="what the influence mapper compares visual tokens with: the edit prompt's last-token "
                   "state (the paper) or the edit sample's visual tokens (default: the preset's)")
    p.add_argument("--width", type=int, default=None,
                   help="the adapter's width m (default: the preset's; the release's ratio is m = d/4)")
    p.add_argument("--decay-share", type=float, default=None,
                   help="the last share of the steps over which the learning rate falls linearly towards 0 "
                   "(0: constant, as in the release; default: the preset's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any other preset setting, e.g. --set w_loc=5 (repeatable; the value is read as YAML)")


def _train_vead(args) -> int:
    from .editing import VEADConfig, load_preset
    from .editing.vead import choose_edit_layer, train_vead
    from .models import load_vllm
    from .world import load_world_split, spread

    settings = load_preset("vead", args.config, model=args.model)
    settings.pop("weights", None)
    _vead_overrides(settings, args, ("steps", "seed", "layer", "at", "im_reads", "width", "decay_share"))
    if args.no_im:
        settings["use_im"] = False
    VEADConfig.from_dict(settings)  # bad settings fail before the model loads
    _check_limit(args.limit, 2)
    vllm = load_vllm(args.model, device=args.device)
    records = load_world_split("train", _spec(vllm.dataset_spec, args), progress=True)
    if args.limit is not None:
        records = spread(records, args.limit)
    if settings.get("layer") is None or args.model is not None and args.layer is None:
        # the rule reads the model's attribution profile on its questions (E-VQA), whichever task VEAD edits:
        # l_e is a property of the model, and a whole caption is rarely answered exactly
        questions = records if vllm.dataset_spec.task == _spec(vllm.dataset_spec, args).task else \
            load_world_split("train", vllm.dataset_spec, progress=False)
        settings["layer"] = choose_edit_layer(vllm, questions, at=settings.get("at", "output"))
    _, info = train_vead(vllm, records, VEADConfig.from_dict(settings), out=args.out, progress=True)
    print(json.dumps({"out": str(args.out), "layer": settings["layer"], "wall_seconds": info["wall_seconds"],
                      "best_val_mean": info["best_val_mean"]}, indent=1))
    return 0


def _sweep_vead(args) -> int:
    from .editing import VEADConfig, load_preset
    from .editing.vead import train_vead
    from .editing.vead.module import release_width
    from .evaluation import evaluate
    from .io import write_json
    from .models import load_vllm
    from .world import load_world_split, spread

    settings = load_preset("vead", args.config, model=args.model)
    settings.pop("weights", None)
    settings["steps"] = args.steps
    sets = _vead_overrides(settings, args)
    VEADConfig.from_dict(settings)  # bad settings fail before the model loads
    _check_limit(args.limit, 2)
    if args.eval_limit < 1:
        raise ValueError(f"--eval-limit must be ≥ 1, got {args.eval_limit}")
    vllm = load_vllm(args.model, device=args.device)
    train = load_world_split("train", _spec(vllm.dataset_spec, args), progress=False)
    train = spread(train, args.limit)
    evals = load_world_split("eval", _spec(vllm.dataset_spec, args), progress=False)
    evals = spread(evals, args.eval_limit)
    # the tag names each setting that differs from the paper's: those below from the config, then any other --set
    named = ("layer", "at", "use_im", "im_reads", "width", "decay_share", "hard_loc")
    extra = "".join(f"-{key}{value}" for key, value in sets.items() if key not in named)
    d = vllm.model.config.text_config.hidden_size
    rows = []
    for layer in args.layers:
        for use_im in ([True, False] if args.ablate_im else [not args.no_im]):
            config = VEADConfig.from_dict({**settings, "layer": layer, "use_im": use_im})
            width = config.resolved(d)["width"]
            tag = (("in" if config.at == "input" else "layer") + str(layer)
                   + ("-noim" if not use_im else "-im-image" if config.im_reads == "image" else "")
                   + (f"-w{width}" if width != release_width(d) else "")
                   + (f"-decay{config.decay_share:g}" if config.decay_share else "")
                   + (f"-hard{config.hard_loc}" if config.hard_loc else "")
                   + extra)
            editor, info = train_vead(vllm, train, config, out=args.out / tag, progress=True)
            summary = evaluate(editor, evals, out=args.out / f"{tag}-eval", progress=True)
            row = {"layer": layer, "at": config.at, "use_im": use_im, "im_reads": config.im_reads, "width": width,
                   "decay_share": config.decay_share,
                   "train_seconds": info["wall_seconds"],
                   **summary.to_dict()}
            write_json(args.out / f"{tag}.json", row)
            rows.append(row)
    keys = ("layer", "at", "use_im", "im_reads", "width", "decay_share", "mean", "reliability", "t_generality",
            "m_generality", "t_locality", "m_locality")
    print(json.dumps([{k: r[k] for k in keys} for r in rows], indent=1))
    return 0


def _fit_scope(args) -> int:
    from .editing.vead.scope import ScopeConfig, fit_scope
    from .models import load_vllm
    from .world import load_world_split

    config = ScopeConfig(layer=args.layer, dim=args.dim, steps=args.steps, skip=args.skip, seed=args.seed)
    vllm = load_vllm(args.model, device=args.device)
    records = load_world_split("train", vllm.dataset_spec, progress=not args.json)
    _, info = fit_scope(vllm, records, config, out=args.out, progress=not args.json)
    print(json.dumps({"out": str(args.out), "layer": config.layer, **info}, indent=None if args.json else 1))
    return 0


def _tolerance(text: str) -> float | None:
    """``--ig-tolerance``: a positive number, or ``none`` for a fixed step count."""
    if text.strip().lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number such as 0.05, or none; got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m visedit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train-tiny", help="train the embedded tiny VLLM from scratch (seeded)")
    p.add_argument("--out", required=True, type=Path, help="output folder (written atomically)")
    p.add_argument("--config", help="YAML file with optional 'train:' and 'tiny:' overrides")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--start-from", type=Path, default=None,
                   help="a train-tiny folder with the same settings but context_steps 0: run stage 3 only")
    p.add_argument("--recipe", default=None,
                   help="train a model made LLaVA's way instead: llava (the second teaching model), a study "
                   "recipe (joint-encoder, one-creature, shallow, deep-narrow, masked-encoder, selector-last), or "
                   "blip2 (a "
                   "Q-Former on the llava recipe's frozen encoder); resumes from OUT.ckpt")
    p.add_argument("--budget", choices=("full", "study"), default="full", help="with --recipe: the step budget")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="with --recipe: change any recipe setting, e.g. --set steps=2000 (repeatable)")
    p.add_argument("--device", default="cpu", help="with --recipe: cpu, cuda, cuda:1 … (a GPU is never required)")
    p.add_argument("--stop-after", type=int, default=None,
                   help="with --recipe: stop after this many steps (a checkpoint is kept; run again to go on)")
    p.add_argument("--encoder-from", type=Path, default=None, metavar="PATH",
                   help="with a recipe on a frozen encoder (llava, blip2, …): the frozen encoder to read instead of "
                   "training one — an --encoder-only folder (visedit/models/embedded_encoder ships the llava "
                   "recipe's), a llava-recipe model folder, or its OUT.ckpt past the encoder stage")
    p.add_argument("--encoder-only", action="store_true",
                   help="with --recipe llava: run the contrastive encoder stage alone and write the frozen "
                   "encoder to OUT (for --encoder-from)")
    p.set_defaults(func=_train_tiny)

    p = sub.add_parser("train-late", help="tune a scene model so that its answer follows its image tokens up to "
                       "depth K (interchange-intervention fine-tuning; seeded)")
    p.add_argument("--model", default="visedit-llava", help="the scene model to tune (default visedit-llava)")
    p.add_argument("--out", required=True, type=Path, help="output folder (new; written atomically)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a LateConfig setting: depth (default 7), steps (1200), batch (12), lr (2e-4), seed, "
                   "threads (repeatable)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_train_late)

    p = sub.add_parser("model-card", help="measure a model's accuracy on fresh renderings of the world")
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--renders", type=int, default=1, help="renderings per entity")
    p.add_argument("--entities", type=int, default=None, help="the first N entities of the world (default all)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_model_card)

    p = sub.add_parser("reading", help="where a model reads its image: card, attention profile, layer selectivity")
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--n-profile", type=int, default=96, help="eval records for the attention profile")
    p.add_argument("--n-selectivity", type=int, default=48, help="eval records for the layer selectivity")
    p.add_argument("--card-entities", type=int, default=None, help="model card on the first N entities (default all)")
    p.add_argument("--out", type=Path, default=None, help="also write the report (JSON) here")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_reading)

    p = sub.add_parser("make-dataset", help="write the world's MMEdit-schema edit dataset")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: the shared cache folder)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--task", default=None, choices=["vqa", "caption"], help=TASK_HELP.split("; with")[0])
    p.set_defaults(func=_make_dataset)

    p = sub.add_parser("contributions", help="module contributions, per-token allocation and IG on the eval split")
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--limit", type=int, default=None, help="use the first N eval records")
    p.add_argument("--spread", action="store_true", help="with --limit: N records spread over the split")
    p.add_argument("--layer", type=int, default=None, help="layer for allocation and IG (default: attention peak)")
    p.add_argument("--all-records", action="store_true",
                   help="profile every record, not only those the model answers correctly")
    p.add_argument("--ig-limit", type=int, default=8, help="records that also get allocation and IG")
    p.add_argument("--ig-steps", type=int, default=64, help="IG's first step count (doubled until it converges)")
    p.add_argument("--ig-tolerance", type=_tolerance, default=0.05,
                   help="IG's relative completeness delta to reach ('none': exactly --ig-steps)")
    p.add_argument("--ig-max-steps", type=int, default=1024, help="the most steps IG may double to")
    p.add_argument("--out", type=Path, default=None, help="also write the result (JSON, with its command) here")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_contributions)

    p = sub.add_parser("bench", help="benchmarks that print ratios (speed goals live here, not in tests)")
    p.add_argument("what", choices=["tracing", "scale", "card"],
                   help="tracing: batched noise perturbation vs the reference loop; scale: every analysis and editor "
                        "on random models of LLaVA-1.5's shape (576 visual tokens, 32 layers) scaled in width, "
                        "with growth exponents; card: the model card with the questions about one image sharing "
                        "its forward pass vs one pass per question (--n creatures)")
    p.add_argument("--model", default=None, help=MODEL_HELP + " (tracing and card)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--radius", type=int, default=1)
    p.add_argument("--n", type=int, default=10, help="tracing: noisy copies per window; card: creatures")
    p.add_argument("--tokens", default="64,144,576", help="scale: visual-token counts (square numbers)")
    p.add_argument("--layers", default="8,16,32", help="scale: decoder depths")
    p.add_argument("--hidden", type=int, default=128, help="scale: decoder width")
    p.add_argument("--chunk-size", type=int, default=64, help="scale: windows per batched step of the noise sweep")
    p.add_argument("--loop-layers", type=int, default=4,
                   help="scale: run the paper's loop against the batched sweep on this many layers of the largest "
                        "model (every window; 0: skip it, it is slow at 576 tokens)")
    p.add_argument("--device", default="cpu", help="scale: torch device, e.g. cuda")
    p.add_argument("--out", type=Path, default=None, help="also write the result (JSON, with its command) here")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_bench)

    p = sub.add_parser("regions", help="score every heatmap method against ground-truth object masks")
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--limit", type=int, default=30, help="correctly answered eval records to use")
    p.add_argument("--methods", choices=("all", "masks", "selectivity"), default="all",
                   help="masks: every heatmap method scored on the object masks; selectivity (scene models): noise "
                   "maps per layer on the asked-about creature, and pairs of questions about one image")
    p.add_argument("--selectivity-limit", type=int, default=48,
                   help="eval records (spread over the split) for the selectivity scores")
    p.add_argument("--out", type=Path, default=None, help="also write the result (JSON, with its command) here")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_regions)

    p = sub.add_parser("sanity", help="sanity checks of every heatmap method: model randomisation, completeness")
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--limit", type=int, default=8,
                   help="correctly answered eval records to use, spread over the split")
    p.add_argument("--methods", nargs="+", default=["allocation", "attention", "noise", "restoration", "ig_pixels",
                                                    "ig_layer", "gate"],
                   help="allocation attention noise restoration ig_pixels ig_layer gate (default: all)")
    p.add_argument("--layer", type=int, default=None, help="LLM layer of the layer methods (default: L // 2)")
    p.add_argument("--vead", nargs="?", const="shipped", default=None, metavar="DIR",
                   help="check the gate of a trained VEAD: the shipped one, or one from train-vead --out DIR "
                   "(without --vead the gate is skipped)")
    p.add_argument("--decoder-only", action="store_true", help="randomise the decoder only, not the vision side")
    p.add_argument("--seed", type=int, default=0, help="seed of the re-initialisation and the noise")
    p.add_argument("--out", type=Path, default=None, help="also write the result (JSON) here, atomically")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_sanity)

    p = sub.add_parser("reachability", help="what a visual-token editor could reach at each layer: a free "
                       "change of the visual tokens, optimised per edit, and the share of new answers it reaches")
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--layers", type=int, nargs="+", default=None, help="decoder layers (default: every layer)")
    p.add_argument("--limit", type=int, default=8, help="eval edits, spread over the split")
    p.add_argument("--steps", type=int, default=200, help="Adam steps per edit and layer")
    p.add_argument("--lr", type=float, default=0.2, help="Adam's learning rate")
    p.add_argument("--out", type=Path, default=None, help="also write the result (JSON, with its command) here")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_reachability)

    p = sub.add_parser("evaluate", help="run the MMEdit single-edit protocol for one editor (or the sequential "
                       "one: --sequential T)")
    p.add_argument("--editor", required=True, choices=_all_editors(), help="which editor")
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--split", default="eval", choices=["train", "eval"], help="split of the world's dataset")
    p.add_argument("--data", default=None, help="an MMEdit-schema JSON file instead (e.g. E-VQA's)")
    p.add_argument("--task", default=None, choices=["vqa", "caption"], help=TASK_HELP)
    p.add_argument("--image-root", default=None, help="folder that --data's image paths are relative to")
    p.add_argument("--limit", type=int, default=None, help="use the first N records")
    p.add_argument("--preset", default=None, help="YAML settings for the editor (default: its shipped preset)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one preset setting, e.g. --set memory=true for VEAD with a memory of many edits "
                   "(repeatable; the value is read as YAML)")
    p.add_argument("--weights", default=None, type=Path,
                   help="trained editor folder, from train-mend or train-vead (default: the shipped one)")
    p.add_argument("--allow-other-model", action="store_true",
                   help="use trained mend/vead networks even if they were trained for another model (warns)")
    p.add_argument("--out", default=None, type=Path, help="results folder (default: results/evaluate/…)")
    p.add_argument("--fresh", action="store_true", help="start over instead of resuming --out")
    p.add_argument("--sequential", type=int, default=None, metavar="T",
                   help="apply T edits one after another without restoring, then score every edited record")
    p.add_argument("--every", type=int, default=None, metavar="K",
                   help="with --sequential: score the first K edits again after every K edits (retention)")
    p.add_argument("--batch", type=int, default=None, metavar="B",
                   help="with --sequential: apply B edits per step (jointly where the editor can; default 1)")
    p.add_argument("--seed", type=int, default=None, help="with --sequential: seed of the edit order (default 0)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default: cpu)")
    p.add_argument("--device-map", default=None, choices=["auto", "balanced", "balanced_low_0", "sequential"],
                   help="spread the model over the GPUs (then the CPU, then --offload-folder) with accelerate")
    p.add_argument("--offload-folder", default=None, type=Path, help="with --device-map: where weights that fit "
                   "nowhere else go")
    p.add_argument("--shard", default=None, metavar="I/K",
                   help="evaluate every K-th edit from edit I into OUT/shard-I-of-K (torchrun and accelerate launch "
                        "set it from RANK/WORLD_SIZE); then `merge-shards OUT`")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("merge-shards", help="merge the shards of a sharded evaluate run into its summary.json")
    p.add_argument("folder", type=Path, help="the --out folder the shards were written into")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_merge_shards)

    p = sub.add_parser("tune", help="grid-search an editor's settings on the train split")
    p.add_argument("--editor", required=True, choices=_all_editors())
    p.add_argument("--grid", required=True, help='JSON object, e.g. \'{"layer": [2, 4, 6], "lr": [1e-3, 1e-4]}\'')
    p.add_argument("--limit", type=int, default=40, help="train edits to score each setting on (spread over the split)")
    p.add_argument("--task", default=None, choices=["vqa", "caption"], help=TASK_HELP)
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_tune)

    p = sub.add_parser("train-vead", help="train VisEdit's VEAD on the train split (seeded, resumable)")
    p.add_argument("--out", required=True, type=Path, help="output folder (written atomically; resumes if interrupted)")
    p.add_argument("--task", default=None, choices=["vqa", "caption"], help=TASK_HELP)
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--config", default=None, help="YAML with VEAD settings (default: presets/vead.yaml)")
    p.add_argument("--layer", type=int, default=None, help="l_e (default: the preset's, or chosen from the "
                   "contribution profile for another --model)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--limit", type=int, default=None, help="train on N records spread over the split")
    p.add_argument("--no-im", action="store_true", help="ablation: no influence mapper (gate = 1)")
    _add_vead_options(p, "layer l_e")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default: cpu)")
    p.add_argument("--json", action="store_true", help="print only the JSON record (progress stays on stderr)")
    p.set_defaults(func=_train_vead)

    p = sub.add_parser("sweep-vead", help="train and evaluate VEAD at several layers l_e (reduced budget)")
    p.add_argument("--layers", type=int, nargs="+", required=True)
    p.add_argument("--out", required=True, type=Path, help="folder for one JSON per layer (plus the trained VEADs)")
    p.add_argument("--limit", type=int, default=600, help="train records (spread over the split)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--eval-limit", type=int, default=100, help="eval edits (spread over the split)")
    p.add_argument("--ablate-im", action="store_true", help="also train each layer without the influence mapper")
    p.add_argument("--no-im", action="store_true", help="train only without the influence mapper (gate = 1)")
    _add_vead_options(p, "each layer")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default: cpu)")
    p.add_argument("--config", default=None)
    p.add_argument("--task", default=None, choices=["vqa", "caption"], help=TASK_HELP)
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_sweep_vead)

    p = sub.add_parser("fit-scope", help="fit a learned scope for VEAD's prompt route on the train split's probes "
                       "(use it with --set route_scope=DIR)")
    p.add_argument("--layer", type=int, required=True, help="the route's route_layer: where the prompt keys are read")
    p.add_argument("--out", required=True, type=Path, help="output folder (written atomically)")
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--dim", type=int, default=64, help="the scope's width (default 64)")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--skip", type=int, default=100,
                   help="leave out the first N train records (the edits route_min is tuned on; default 100)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default: cpu)")
    p.add_argument("--json", action="store_true", help="print only the JSON record")
    p.set_defaults(func=_fit_scope)

    p = sub.add_parser("train-mend", help="train MEND's editor networks on the train split")
    p.add_argument("--out", required=True, type=Path, help="output folder (written atomically)")
    p.add_argument("--task", default=None, choices=["vqa", "caption"], help=TASK_HELP)
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--config", default=None, help="YAML with MEND settings (default: presets/mend.yaml)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print only the JSON record (progress stays on stderr)")
    p.set_defaults(func=_train_mend)
    return parser


def _all_editors() -> list[str]:
    from .editing import editor_names

    return editor_names()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: {args.command} stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
