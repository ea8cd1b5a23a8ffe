"""Command line: ``python -m visedit <command> …``. Every command that reports numbers has ``--json``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _train_tiny(args) -> int:
    import yaml

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
    record = train_tiny(args.out, cfg, tiny, progress=not args.no_progress)
    print(json.dumps({"out": str(args.out), "wall_seconds": record["wall_seconds"],
                      "final_loss": record["final_loss"]}, indent=1))
    return 0


def _model_card(args) -> int:
    from .models import load_vllm
    from .models.card import model_card

    card = model_card(load_vllm(args.model), seed=args.seed, renders=args.renders, progress=not args.json)
    if args.json:
        print(json.dumps(card.to_dict(), indent=1))
    else:
        print(card.table().to_string())
        for check, ok in card.passes().items():
            print(f"{'PASS' if ok else 'FAIL'}  {check}")
    return 0


def _make_dataset(args) -> int:
    from .world import DatasetSpec, load_mmedit, make_edit_dataset

    from .world.dataset import default_dataset_dir

    out = make_edit_dataset(args.out or default_dataset_dir(), DatasetSpec(seed=args.seed), progress=True)
    counts = {s: len(load_mmedit(out / f"{s}.json")) for s in ("train", "eval")}
    print(json.dumps({"out": str(out), **counts}, indent=1))
    return 0


def _contributions(args) -> int:
    import numpy as np
    from tqdm.auto import tqdm

    from .attribution import contribution_profile, integrated_gradients, token_allocation
    from .models import load_vllm
    from .world import load_world_split

    vllm = load_vllm(args.model)
    records = load_world_split("eval", progress=not args.json)
    if args.limit is not None:
        if args.limit < 1:
            raise ValueError(f"--limit must be ≥ 1, got {args.limit}")
        records = records[: args.limit]
    profile = contribution_profile(vllm, records, only_correct=True, progress=not args.json)
    layer = vllm.adapter.check_layer(args.layer) if args.layer is not None else profile.peak("attn")
    alloc_err, ig_delta = 0.0, 0.0
    for k, rec in enumerate(tqdm(records[: args.ig_limit], desc="allocation + IG", disable=args.json)):
        alloc_err = max(alloc_err, token_allocation(vllm, rec.image, rec.src, layer=layer).max_error)
        for where in (None, layer):
            ig = integrated_gradients(vllm, rec.image, rec.src, layer=where, n_steps=args.ig_steps)
            ig_delta = max(ig_delta, ig.relative_delta)
    out = {**{k: [round(x, 6) for x in v] for k, v in profile.mean.items()}, "low": profile.low, "high": profile.high,
           "n": profile.n, "n_total": profile.n_total, "layer": layer, "peak_attn": profile.peak("attn"),
           "peak_mlp": profile.peak("mlp"), "allocation_max_error": float(np.format_float_scientific(alloc_err, 3)),
           "ig_max_delta": round(ig_delta, 6), "ig_examples": min(args.ig_limit, len(records))}
    print(json.dumps(out, indent=1) if args.json else json.dumps(out))
    return 0


def _correct_eval_records(vllm, limit: int | None, progress: bool):
    from .world import load_world_split

    records = load_world_split("eval", progress=progress)
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be ≥ 1, got {limit}")
    out = []
    for rec in records:
        if vllm.score(rec.image, rec.src, rec.pred).exact:
            out.append(rec)
        if limit is not None and len(out) >= limit:
            break
    return out


def _bench(args) -> int:
    from .bench import bench_tracing
    from .models import load_vllm

    vllm = load_vllm(args.model)
    record = _correct_eval_records(vllm, 1, progress=False)[0]
    result = bench_tracing(vllm, record, repeats=args.repeats, radius=args.radius, n=args.n)
    print(json.dumps(result, indent=1) if args.json else json.dumps(result))
    return 0


def _regions(args) -> int:
    from .bench import region_scores
    from .models import load_vllm

    vllm = load_vllm(args.model)
    records = _correct_eval_records(vllm, args.limit, progress=not args.json)
    result = region_scores(vllm, records, progress=not args.json)
    print(json.dumps(result, indent=1) if args.json else json.dumps(result))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m visedit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train-tiny", help="train the embedded tiny VLLM from scratch (seeded)")
    p.add_argument("--out", required=True, type=Path, help="output folder (written atomically)")
    p.add_argument("--config", help="YAML file with optional 'train:' and 'tiny:' overrides")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_train_tiny)

    p = sub.add_parser("model-card", help="measure a model's accuracy on fresh renderings of the world")
    p.add_argument("--model", default=None, help="checkpoint folder (default: the embedded tiny model)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--renders", type=int, default=1, help="renderings per entity")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_model_card)

    p = sub.add_parser("make-dataset", help="write the world's MMEdit-schema edit dataset")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: the shared cache folder)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_make_dataset)

    p = sub.add_parser("contributions", help="module contributions, per-token allocation and IG on the eval split")
    p.add_argument("--model", default=None, help="checkpoint folder (default: the embedded tiny model)")
    p.add_argument("--limit", type=int, default=None, help="use the first N eval records")
    p.add_argument("--layer", type=int, default=None, help="layer for allocation and IG (default: attention peak)")
    p.add_argument("--ig-limit", type=int, default=8, help="records that also get allocation and IG")
    p.add_argument("--ig-steps", type=int, default=64)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_contributions)

    p = sub.add_parser("bench", help="benchmarks that print ratios (speed goals live here, not in tests)")
    p.add_argument("what", choices=["tracing"], help="tracing: batched noise perturbation vs the reference loop")
    p.add_argument("--model", default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--radius", type=int, default=1)
    p.add_argument("--n", type=int, default=10)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_bench)

    p = sub.add_parser("regions", help="score every heatmap method against ground-truth object masks")
    p.add_argument("--model", default=None)
    p.add_argument("--limit", type=int, default=30, help="correctly answered eval records to use")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_regions)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
