"""GID's experiment on shapes: each student alone, trained longer, and with GID and its per-loss ablations.

One command, three seeds per run, every run through the engine (``kdlab.engine.train``)::

    python experiments/gid_shapes.py                          # everything below, seeds 0 1 2
    python experiments/gid_shapes.py --quick --max-iters 2    # smoke test: seed 0, 2 iterations
    python experiments/gid_shapes.py --families retinanet --variants student gid
    python experiments/gid_shapes.py --seeds-for faster_rcnn=0 retinanet/gid_feature=0   # some runs once

Runs (METHODS.md §2), with the quick CPU configurations ``configs/shapes_gid_{family}_*.yaml``:

- every family: the student alone; the student alone trained ``1 + r`` times as long, ``r`` the
  teacher's forward cost per student step, measured here (the *compute-matched* baseline,
  :func:`kdlab.engine.experiment.compute_matched_config`); GID full (feature + relation + response);
- RetinaNet, the ablations: feature only; relation only; response only; feature + response (no
  relation: does the relation term hold full GID below feature-only?);
- Faster R-CNN: GISM and the response loss on the RPN.

Teachers: ``data/checkpoints/shapes_{family}_teacher.pt`` when it exists, else trained first
from ``configs/shapes_gid_{family}_teacher.yaml`` (seed 0). Every distilled run uses the
schedule, seed and data order of its student-alone run. Finished runs are reused when their
saved config equals the new one; an interrupted run resumes from its ``last.pt``.

Outputs under ``--out`` (default ``outputs/gid_shapes``, ``outputs/gid_shapes_quick`` for smoke
tests): one folder per family/variant/seed, ``results.json`` (every run's metrics, the teachers',
the measured teacher cost) and ``results.md`` (mean ± sample std over each row's seeds, AP in %,
every distilled row against the student alone and against the compute-matched student), with the
issue's target checked: GID full >= RetinaNet student alone + 1.5 AP on the mean over seeds.
A real (not smoke-test) run also copies both to ``experiments/results/gid_shapes.{json,md}``,
which are tracked in git and shown by notebook 03. Why GID full scores below GID feature only on
shapes: ``experiments/gid_terms.py`` measures each term's gradient against the detection loss's.
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
from kdlab.engine.checkpoint import atomic_save_json  # noqa: E402
from kdlab.engine.experiment import (  # noqa: E402
    cached_teacher_cost_ratio,
    comparison_lines,
    compute_matched_config,
    ensure_shapes,
    make_config,
    mean_std,
    parse_seeds_for,
    relative_to,
    results_table,
    run,
    run_fields,
    seeds_per_row,
    teacher_metrics,
    write_results,
)

TARGET_GAIN = 1.5  # AP points, GID full over the RetinaNet student alone (the target)

# variant -> (label, distill_options on top of the config's, or None for the student alone)
OFF = 0.0
VARIANTS: dict[str, tuple[str, dict | None]] = {
    "student": ("student alone", None),
    "compute_matched": ("student alone, trained 1 + r times as long (compute-matched)", None),
    "gid": ("GID (feature + relation + response)", {}),
    "gid_feature": ("GID feature only", {"relation_weight": OFF, "response_cls_weight": OFF, "response_reg_weight": OFF}),
    "gid_relation": ("GID relation only", {"feature_weight": OFF, "response_cls_weight": OFF, "response_reg_weight": OFF}),
    "gid_response": ("GID response only", {"feature_weight": OFF, "relation_weight": OFF}),
    # the relation term's gradient is 2-4x the detection loss's on the student (experiments/gid_terms.py):
    # GID without it tests whether it is what holds full GID below feature-only
    "gid_no_relation": ("GID feature + response (no relation)", {"relation_weight": OFF}),
}
LABELS = {variant: label for variant, (label, _) in VARIANTS.items()}
FAMILIES: dict[str, list[str]] = {
    "retinanet": ["student", "compute_matched", "gid", "gid_feature", "gid_relation", "gid_response", "gid_no_relation"],
    "fcos": ["student", "compute_matched", "gid"],
    "faster_rcnn": ["student", "compute_matched", "gid"],
}


def student_config(family: str) -> Path:
    return REPO / "configs" / f"shapes_gid_{family}_student.yaml"


def teacher_config(family: str) -> Path:
    return REPO / "configs" / f"shapes_gid_{family}_teacher.yaml"


def run_family(family: str, variants: list[str], seeds: dict[str, list[int]], args: argparse.Namespace,
               common: dict) -> dict:
    """The teacher, its measured cost, then every variant for every seed; the family's part of results.json."""
    out = args.out / family
    checkpoint = REPO / "data" / "checkpoints" / f"shapes_{family}_teacher.pt"
    if not checkpoint.is_file():
        print(f"[{family}] training the teacher ({teacher_config(family).name})", flush=True)
        run(make_config(teacher_config(family), {**common, "output_dir": str(out / "teacher"), "seed": 0}))
        checkpoint = out / "teacher" / "student.pt"
    base = make_config(student_config(family), common)
    eval_cfg = make_config(student_config(family), {**common, "distill": None, "distill_options": {}, "teacher_checkpoint": None})
    teacher = teacher_metrics(eval_cfg, checkpoint, out / "teacher_eval.json")
    ratio = None
    if "compute_matched" in variants:
        ratio = args.teacher_cost.get(family)
        if ratio is None:
            ratio = cached_teacher_cost_ratio(base, checkpoint, out / "teacher_cost.json")
        print(f"[{family}] teacher forward / student step = {ratio:.2f}", flush=True)
        train_set = build_dataset(base.data_root, base.train_split, train=False, min_size=base.min_size,
                                  max_size=base.max_size)
        iters_per_epoch = math.ceil(len(train_set) / base.batch_size)
    runs: dict[str, dict[int, dict[str, float]]] = {v: {} for v in variants}
    for seed in sorted({s for v in variants for s in seeds[v]}):
        for variant in (v for v in variants if seed in seeds[v]):
            options = VARIANTS[variant][1]
            fields = {**common, "seed": seed, "output_dir": str(out / variant / f"seed{seed}")}
            if options is None:
                fields.update(distill=None, distill_options={}, teacher_checkpoint=None, teacher_config=None)
            else:
                fields.update(distill="gid", distill_options={**base.distill_options, **options},
                              teacher_checkpoint=str(checkpoint), teacher_config=None)
            cfg = make_config(student_config(family), fields)
            if variant == "compute_matched":
                cfg = compute_matched_config(cfg, ratio, iters_per_epoch)
            runs[variant][seed] = run(cfg)
    table = {v: mean_std(by_seed) for v, by_seed in runs.items()}
    return {"teacher_checkpoint": relative_to(checkpoint, REPO), "teacher": teacher, "teacher_cost_ratio": ratio,
            "runs": runs, "table": {v: {m: list(c) for m, c in cells.items()} for v, cells in table.items()}}


def markdown(family: str, part: dict, note: str) -> str:
    """One family's table (mean ± std over each row's seeds, the bare value for a single seed, AP per
    seed) and every GID row against the student alone and the compute-matched student."""
    runs = {v: {int(s): m for s, m in by_seed.items()} for v, by_seed in part["runs"].items()}
    lines = results_table(f"{family}{note}", part["teacher"], runs, LABELS)
    if part.get("teacher_cost_ratio") is not None:
        lines += ["", f"Teacher forward / student step, measured: r = {part['teacher_cost_ratio']:.2f}."]
    comparisons = comparison_lines(runs, LABELS, [v for v in runs if VARIANTS[v][1] is not None])
    if family == "retinanet" and {"student", "gid"} <= runs.keys():
        gain = part["table"]["gid"]["AP"][0] - part["table"]["student"]["AP"][0]
        comparisons.append(f"- GID full target (>= +{TARGET_GAIN} AP over the student alone): "
                           f"{'met' if gain >= TARGET_GAIN else 'NOT met'}")
    return "\n".join(lines + ([""] + comparisons if comparisons else []))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                        help="restrict every family to these variants (each family runs only those it defines)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--seeds-for", nargs="+", default=[], metavar="KEY=S,S", dest="seeds_for_list",
                        help="other seeds for a family or one family's variant, e.g. faster_rcnn=0 "
                             "retinanet/gid_feature=0 (the ablations once)")
    parser.add_argument("--teacher-cost", nargs="+", default=[], metavar="FAMILY=R", dest="teacher_cost_list",
                        help="use this teacher-forward / student-step ratio instead of measuring it, e.g. retinanet=0.9")
    parser.add_argument("--quick", action="store_true", help="smoke test: seed 0 only, 1 epoch")
    parser.add_argument("--max-iters", type=int, default=None, help="stop every run after this many iterations")
    parser.add_argument("--data-root", type=Path, default=None, help="another shapes set (default: the configs')")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--num-workers", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    smoke = args.quick or args.max_iters is not None
    if args.out is None:
        args.out = REPO / "outputs" / ("gid_shapes_quick" if smoke else "gid_shapes")
    keys = set(FAMILIES) | {f"{f}/{v}" for f, variants in FAMILIES.items() for v in variants}
    try:
        args.seeds_for = parse_seeds_for(args.seeds_for_list, keys)
        args.teacher_cost = {k: float(v) for k, v in (item.split("=", 1) for item in args.teacher_cost_list)}
    except ValueError as err:
        parser.error(str(err))
    if set(args.teacher_cost) - set(FAMILIES):
        parser.error(f"--teacher-cost expects FAMILY=R with FAMILY one of {sorted(FAMILIES)}, got {args.teacher_cost_list}")
    for family in args.families:
        for path in (student_config(family), teacher_config(family)):
            if not path.is_file():
                parser.error(f"config {path} does not exist")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    seeds = [args.seeds[0]] if args.quick else args.seeds
    common = run_fields(args.device, args.quick, args.max_iters, args.num_workers)
    data_root = args.data_root or REPO / load_config(student_config(args.families[0])).data_root
    ensure_shapes(data_root)
    common["data_root"] = str(data_root)
    smoke = args.quick or args.max_iters is not None
    note = " — SMOKE TEST, not a result" if smoke else ""
    results = {"seeds": seeds, "smoke_test": smoke, "variants": LABELS, "families": {}}
    sections = []
    for family in args.families:
        variants = [v for v in FAMILIES[family] if v in args.variants]
        variant_seeds = seeds_per_row(family, variants, seeds, args.seeds_for, args.quick)
        print(f"[{family}] seeds {variant_seeds} -> {args.out / family}", flush=True)
        results["families"][family] = part = run_family(family, variants, variant_seeds, args, common)
        part["seeds"] = variant_seeds
        sections.append(markdown(family, part, note))
        atomic_save_json(results, args.out / "results.json")
    # a real run publishes the tables notebook 03 shows (tracked in git)
    write_results(results, sections, "GID experiment (shapes, quick CPU configurations)", args.out, "gid_shapes", REPO, not smoke)
    return 0


if __name__ == "__main__":
    sys.exit(main())
