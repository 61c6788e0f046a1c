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
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from any directory without installing kdlab
    sys.path.insert(0, str(REPO))

from kdlab.config import load_config  # noqa: E402
from kdlab.engine.experiment import add_run_arguments, comparison_lines  # noqa: E402
from kdlab.engine.experiment import ensure_teacher, group_records, parse_run_arguments, parse_seeds_for  # noqa: E402
from kdlab.engine.experiment import parse_teacher_costs, relative_to, results_table, run_groups  # noqa: E402
from kdlab.engine.experiment import run_rows, shapes_run_fields, student_alone_fields  # noqa: E402
from kdlab.engine.experiment import DEFAULT_SEEDS  # noqa: E402
from kdlab.engine.experiment import mean_std  # noqa: E402, F401 (the tests read it here)

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
    """The teacher (trained first when needed), its measured cost, then every variant for every seed
    (:func:`~kdlab.engine.experiment.run_rows`); the family's part of results.json."""
    out = args.out / family
    checkpoint = ensure_teacher(family, REPO / "data" / "checkpoints" / f"shapes_{family}_teacher.pt",
                                teacher_config(family), common, out / "teacher")

    def row_fields(variant: str, seed: int, base) -> dict:
        options = VARIANTS[variant][1]
        if options is None:
            return student_alone_fields()
        return {"distill": "gid", "distill_options": {**base.distill_options, **options},
                "teacher_checkpoint": str(checkpoint), "teacher_config": None}

    return {"teacher_checkpoint": relative_to(checkpoint, REPO),
            **run_rows(family, student_config(family), common, variants, seeds, row_fields, checkpoint, out,
                       args.teacher_cost.get(family), group_records(args, family), args.fresh)}


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
    parser.add_argument("--seeds", type=int, nargs="+", default=list(DEFAULT_SEEDS))
    parser.add_argument("--seeds-for", nargs="+", default=[], metavar="KEY=S,S", dest="seeds_for_list",
                        help="other seeds for a family or one family's variant, e.g. faster_rcnn=0 "
                             "retinanet/gid_feature=0 (the ablations once)")
    parser.add_argument("--teacher-cost", nargs="+", default=[], metavar="FAMILY=R", dest="teacher_cost_list",
                        help="use this teacher-forward / student-step ratio instead of measuring it, e.g. retinanet=0.9")
    add_run_arguments(parser)
    args = parse_run_arguments(parser, argv, "gid_shapes", REPO)
    keys = set(FAMILIES) | {f"{f}/{v}" for f, variants in FAMILIES.items() for v in variants}
    try:
        args.seeds_for = parse_seeds_for(args.seeds_for_list, keys)
        args.teacher_cost = parse_teacher_costs(args.teacher_cost_list, FAMILIES, "FAMILY")
    except ValueError as err:
        parser.error(str(err))
    for family in args.families:
        for path in (student_config(family), teacher_config(family)):
            if not path.is_file():
                parser.error(f"config {path} does not exist")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    common = shapes_run_fields(args, args.data_root or REPO / load_config(student_config(args.families[0])).data_root)
    # a real run publishes the tables notebook 03 shows (tracked in git)
    run_groups(args, "families", {f: [v for v in FAMILIES[f] if v in args.variants] for f in args.families}, LABELS,
               lambda family, variants, seeds: run_family(family, variants, seeds, args, common), markdown,
               "GID experiment (shapes, quick CPU configurations)", "gid_shapes", REPO, every_group=list(FAMILIES))
    return 0


if __name__ == "__main__":
    sys.exit(main())
