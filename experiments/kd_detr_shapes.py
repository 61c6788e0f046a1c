"""KD-DETR's experiment on shapes: the DAB-DETR student alone, trained longer, with the inconsistent
matched-query baseline, and with KD-DETR's distillation points (general, specific, both).

One command, three seeds per run, every run through the engine (``kdlab.engine.train``)::

    python experiments/kd_detr_shapes.py                        # everything below, seeds 0 1 2
    python experiments/kd_detr_shapes.py --quick --max-iters 2  # smoke test: seed 0, 2 iterations
    python experiments/kd_detr_shapes.py --variants student kd_detr --seeds 0

Rows (METHODS.md §3; the paper's R-18 ablation order: none 36.2 < general 38.7 < specific 40.0 <
both + weighting 41.4), with ``configs/shapes_kd_detr_student.yaml`` and the project's shapes DAB-DETR
teacher ``data/checkpoints/shapes_dab_detr_teacher.pt``:

- the student alone; the student alone trained ``1 + r`` times as long (``r`` the teacher's forward
  cost per student step, measured once and cached: the compute-matched baseline);
- the inconsistent baseline: distillation through the detection queries, teacher predictions
  Hungarian-matched to the student's (``detr_matched_kd``);
- KD-DETR with general points only, specific points only, both (the full method), and both without the
  foreground weighting (an ablation beyond the issue's rows: seed 0 only by default, ``DEFAULT_SEEDS_FOR``).

Every distilled run uses the schedule, seed and data order of its student-alone run; finished runs are
reused, interrupted ones resume. Outputs under ``--out`` (default ``outputs/kd_detr_shapes``):
``results.{json,md}``; a real run publishes ``experiments/results/kd_detr_shapes.{json,md}`` (notebook
05 reads them). Targets: KD-DETR (both) >= student alone + 1.5 AP on the 3-seed mean, and above
the inconsistent baseline.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from any directory without installing kdlab
    sys.path.insert(0, str(REPO))

from kdlab.config import load_config  # noqa: E402
from kdlab.data import build_dataset  # noqa: E402
from kdlab.engine.experiment import (  # noqa: E402
    DEFAULT_SEEDS,
    add_run_arguments,
    cached_teacher_cost_ratio,
    comparison_lines,
    compute_matched_config,
    ensure_shapes,
    group_records,
    make_config,
    mean_std,
    parse_run_arguments,
    parse_seeds_for,
    partial_selection,
    relative_to,
    results_table,
    RUN_SOURCES,
    run,
    run_fields,
    seeds_per_row,
    sources_line,
    teacher_metrics,
    write_results,
)

STUDENT_CONFIG = REPO / "configs" / "shapes_kd_detr_student.yaml"
TEACHER_CHECKPOINT = REPO / "data" / "checkpoints" / "shapes_dab_detr_teacher.pt"
TARGET_GAIN = 1.5

# variant -> (label, distill, options replacing the config's); distill None: the student alone
VARIANTS: dict[str, tuple[str, str | None, dict]] = {
    "student": ("student alone", None, {}),
    "compute_matched": ("student alone, trained 1 + r times as long (compute-matched)", None, {}),
    "matched": ("inconsistent baseline: detection queries, Hungarian-matched predictions", "detr_matched_kd", {}),
    "general": ("KD-DETR, general points only", "kd_detr", {"specific": False}),
    "specific": ("KD-DETR, specific points only", "kd_detr", {"general": False}),
    "kd_detr": ("KD-DETR, specific + general points, foreground weighting", "kd_detr", {}),
    "kd_detr_unweighted": ("KD-DETR, specific + general points, no weighting", "kd_detr", {"weighting": False}),
}
DISTILLED = [v for v, (_, distill, _) in VARIANTS.items() if distill is not None]
# rows with other default seeds (not applied when --seeds is given): the weighting ablation runs once
DEFAULT_SEEDS_FOR: dict[str, list[int]] = {"kd_detr_unweighted": [0]}


def variant_fields(variant: str, base_options: dict) -> dict:
    _, distill, options = VARIANTS[variant]
    if distill is None:
        return {"distill": None, "distill_options": {}, "teacher_checkpoint": None, "teacher_config": None}
    merged = {**base_options, **options} if distill == "kd_detr" else dict(options)
    return {"distill": distill, "distill_options": merged, "teacher_checkpoint": str(TEACHER_CHECKPOINT)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help=f"default 0 1 2, and {DEFAULT_SEEDS_FOR} unless --seeds is given")
    parser.add_argument("--seeds-for", nargs="+", default=[], metavar="ROW=S,S", dest="seeds_for_list",
                        help="other seeds for one row, e.g. kd_detr_unweighted=0")
    add_run_arguments(parser)
    args = parse_run_arguments(parser, argv, "kd_detr_shapes", REPO)
    explicit_seeds, args.seeds = args.seeds is not None, args.seeds or list(DEFAULT_SEEDS)
    args.seeds_given = explicit_seeds  # --seeds 0 1 2 gives the weighting ablation 3: a partial run, never published
    try:  # --seeds-for ROW=S,S names a row; seeds_per_row looks rows up as "kd_detr/ROW"
        given = parse_seeds_for(args.seeds_for_list, set(VARIANTS))
        defaults = {} if explicit_seeds else DEFAULT_SEEDS_FOR
        args.seeds_for = {f"kd_detr/{k}": v for k, v in {**defaults, **given}.items()}
    except ValueError as err:
        parser.error(str(err))
    if not TEACHER_CHECKPOINT.is_file():
        parser.error(f"teacher checkpoint {TEACHER_CHECKPOINT} does not exist: train it with "
                     "`kdlab train configs/shapes_dab_detr_teacher.yaml`, store its student.pt as "
                     "data/checkpoints/shapes_dab_detr_teacher_stage1.pt, continue it with "
                     "`kdlab train configs/shapes_dab_detr_teacher_stage2.yaml` (store as ..._stage2.pt) and "
                     "`kdlab train configs/shapes_dab_detr_teacher_stage3.yaml`, and store that student.pt there "
                     "(data/checkpoints/README.md)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    seeds = [args.seeds[0]] if args.quick else args.seeds
    smoke = args.quick or args.max_iters is not None
    common = run_fields(args.device, args.quick, args.max_iters, args.num_workers)
    data_root = args.data_root or REPO / load_config(STUDENT_CONFIG).data_root
    if args.data_root is None:
        ensure_shapes(data_root)  # the default set is generated when missing, never overwritten
    common["data_root"] = str(data_root)
    base = make_config(STUDENT_CONFIG, common)
    eval_cfg = make_config(STUDENT_CONFIG, {**common, "distill": None, "distill_options": {}, "teacher_checkpoint": None})
    teacher = teacher_metrics(eval_cfg, TEACHER_CHECKPOINT, args.out / "teacher_eval.json")
    variants = [v for v in VARIANTS if v in args.variants]
    row_seeds = seeds_per_row("kd_detr", variants, seeds, args.seeds_for, quick=args.quick)
    ratio = None
    if "compute_matched" in variants:
        ratio = cached_teacher_cost_ratio(base, TEACHER_CHECKPOINT, (group_records(args, "dab_detr") or args.out) / "teacher_cost.json")
        print(f"teacher forward / student step = {ratio:.2f}", flush=True)
    train_set = build_dataset(base.data_root, base.train_split, train=False, min_size=base.min_size, max_size=base.max_size)
    iters_per_epoch = math.ceil(len(train_set) / base.batch_size)
    runs: dict[str, dict[int, dict[str, float]]] = {v: {} for v in variants}
    for seed in sorted({s for v in variants for s in row_seeds[v]}):
        for variant in (v for v in variants if seed in row_seeds[v]):
            fields = {**common, "seed": seed, "output_dir": str(args.out / variant / f"seed{seed}"),
                      **variant_fields(variant, base.distill_options)}
            cfg = make_config(STUDENT_CONFIG, fields)
            if variant == "compute_matched":
                cfg = compute_matched_config(cfg, ratio, iters_per_epoch)
            records = group_records(args, "dab_detr")
            runs[variant][seed] = run(cfg, None if records is None else records / variant / f"seed{seed}.json", args.fresh)
    labels = {v: VARIANTS[v][0] for v in VARIANTS}
    note = " — SMOKE TEST, not a result" if smoke else ""
    lines = results_table(f"DAB-DETR on shapes{note}", teacher, runs, labels)
    if ratio is not None:
        lines += ["", f"Teacher forward / student step, measured: r = {ratio:.2f}."]
    lines += [""] + comparison_lines(runs, labels, [v for v in DISTILLED if v in runs])
    if {"kd_detr", "student"} <= runs.keys():
        gain = mean_std(runs["kd_detr"], ("AP",))["AP"][0] - mean_std(runs["student"], ("AP",))["AP"][0]
        lines.append(f"- target, KD-DETR >= student alone + {TARGET_GAIN} AP: {'met' if gain >= TARGET_GAIN else 'NOT met'}")
    if {"kd_detr", "matched"} <= runs.keys():
        versus = mean_std(runs["kd_detr"], ("AP",))["AP"][0] - mean_std(runs["matched"], ("AP",))["AP"][0]
        lines.append(f"- target, KD-DETR above the inconsistent baseline: {'met' if versus > 0 else 'NOT met'} ({versus:+.1f} AP)")
    # one part, "dab_detr", in the layout of the other experiments (kdlab.engine.experiment.published_parts reads it)
    part = {"teacher_checkpoint": relative_to(TEACHER_CHECKPOINT, REPO), "teacher": teacher, "teacher_cost_ratio": ratio,
            "seeds": row_seeds, "runs": runs, "table": {v: {m: list(c) for m, c in mean_std(r).items()} for v, r in runs.items()}}
    results = {"seeds": seeds, "smoke_test": smoke, "variants": labels, "families": {"dab_detr": part}}
    partial = partial_selection(args, labels)
    if partial and not smoke:
        print(f"a partial selection ({partial}): results in {args.out}; experiments/results/kd_detr_shapes.* not "
              "changed (a run of every row with the default seeds publishes)", flush=True)
    results["run_sources"] = dict(RUN_SOURCES)
    write_results(results, ["\n".join(lines), sources_line()], "KD-DETR experiment (shapes, quick CPU configurations)", args.out,
                  "kd_detr_shapes", REPO, publish_to_repo=not smoke and not partial)
    return 0


if __name__ == "__main__":
    sys.exit(main())
