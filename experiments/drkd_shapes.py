"""DRKD's experiment on shapes: each student alone, trained longer, with DRKD, its ablations and baselines.

One command, three seeds per run, every run through the engine (``kdlab.engine.train``)::

    python experiments/drkd_shapes.py                        # everything below, seeds 0 1 2
    python experiments/drkd_shapes.py --quick --max-iters 2  # smoke test: seed 0, 2 iterations
    python experiments/drkd_shapes.py --families retinanet --variants student drkd
    python experiments/drkd_shapes.py --seeds-for faster_rcnn=0 retinanet/fitnet=0   # some runs once

Runs (METHODS.md §4), quick CPU configurations ``configs/shapes_drkd_{family}_student.yaml`` and the
project's shapes teachers (``data/checkpoints/shapes_{family}_teacher.pt``, the GID experiment's):

- both families: the student alone; the student alone trained ``1 + r`` times as long, ``r`` the
  teacher's forward cost per student step, measured here (the *compute-matched* baseline); DRKD
  (pixel + instance relations, trained relation filter);
- RetinaNet, the ablations: pixel relation only; instance relations only (relation + instance
  features); relation filter random at every step (the released code's) and no filter; the
  released recipe (``variant="official"``); the feature-imitation baselines on the same student
  (FitNets on every FPN location, fine-grained imitation near the objects; weight 2.0, adapters);
- Faster R-CNN, DRKD with every weight x 5: ``experiments/drkd_terms.py`` measured DRKD's summed
  gradient on the Faster R-CNN student's backbone + FPN at 0.85 x its detection loss's, against 4.4 x on
  RetinaNet; this row tests whether the gain follows the pull (a diagnostic: the first seed only).

Every distilled run uses the schedule, seed and data order of its student-alone run. Finished runs
are reused when their saved config equals the new one; an interrupted run resumes from its ``last.pt``.

Outputs under ``--out`` (default ``outputs/drkd_shapes``; ``outputs/drkd_shapes_quick`` for smoke
tests): one folder per family/variant/seed, ``results.json`` and ``results.md`` (mean ± sample std over
seeds, AP in %, APs and APm next to AP). The target: DRKD >= each student alone + 1.5 AP on the mean
over seeds; each row is also compared with the compute-matched student. A real run publishes both
files to ``experiments/results/drkd_shapes.{json,md}`` (tracked; notebook 04 shows them).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from any directory without installing kdlab
    sys.path.insert(0, str(REPO))

from kdlab.config import load_config  # noqa: E402
from kdlab.engine.experiment import add_run_arguments, comparison_lines, parse_run_arguments  # noqa: E402
from kdlab.engine.experiment import group_records, parse_seeds_for, relative_to, results_table, run_groups  # noqa: E402
from kdlab.engine.experiment import run_rows, shapes_run_fields, student_alone_fields  # noqa: E402
from kdlab.engine.experiment import DEFAULT_SEEDS  # noqa: E402

TARGET_GAIN = 1.5  # AP points, DRKD over each student alone (the target)

# variant -> (label, distill, options replacing/adding to the config's DRKD options); distill None: alone
VARIANTS: dict[str, tuple[str, str | None, dict]] = {
    "student": ("student alone", None, {}),
    "compute_matched": ("student alone, trained 1 + r times as long (compute-matched)", None, {}),
    "drkd": ("DRKD (pixel + instance relations, trained filter)", "drkd", {}),
    "drkd_pixel": ("DRKD pixel relation only", "drkd", {"instance_weight": 0.0, "instance_feature_weight": 0.0}),
    "drkd_instance": ("DRKD instance relations only", "drkd", {"pixel_weight": 0.0}),
    "drkd_random_filter": ("DRKD, filter random at every step (released)", "drkd", {"filter": "random"}),
    "drkd_no_filter": ("DRKD, no relation filter", "drkd", {"filter": "none"}),
    "drkd_official": ("DRKD, released recipe (variant official)", "drkd", {"variant": "official"}),
    # Faster R-CNN: drkd_terms measured DRKD's summed pull on backbone + FPN at 0.85x its detection loss's
    # (RetinaNet: 4.4x); five times the weights give it RetinaNet's pull: does the gain follow?
    "drkd_x5": ("DRKD, every weight x 5 (the pull of RetinaNet's DRKD)", "drkd",
                {"pixel_weight": 5.0, "instance_weight": 5.0, "instance_feature_weight": 5.0}),
    "fitnet": ("FitNets (every FPN location)", "fitnet", {"weight": 2.0}),
    "fine_grained": ("fine-grained imitation (near the objects)", "fine_grained", {"weight": 2.0}),
}
LABELS = {variant: label for variant, (label, _, _) in VARIANTS.items()}
FAMILIES: dict[str, list[str]] = {
    "retinanet": [v for v in VARIANTS if v != "drkd_x5"],
    "faster_rcnn": ["student", "compute_matched", "drkd", "drkd_x5"],
}
# a diagnostic row, beyond the rows, runs the first seeds only (its table row and notebook 04 say how many)
ROW_SEED_COUNT = {"faster_rcnn/drkd_x5": 1}


def student_config(family: str) -> Path:
    return REPO / "configs" / f"shapes_drkd_{family}_student.yaml"


def teacher_checkpoint(family: str) -> Path:
    return REPO / "data" / "checkpoints" / f"shapes_{family}_teacher.pt"


def variant_fields(variant: str, base_options: dict, checkpoint: Path) -> dict:
    """Config fields of one variant (on top of the student config)."""
    _, distill, options = VARIANTS[variant]
    if distill is None:
        return student_alone_fields()
    if distill == "drkd":
        merged = {**base_options, **options}
        if options.get("variant") == "official":  # the released recipe: its own weights, distance and filter
            merged = {"variant": "official", "num_nodes": base_options.get("num_nodes")}
        return {"distill": "drkd", "distill_options": merged, "teacher_checkpoint": str(checkpoint)}
    return {"distill": distill, "distill_options": dict(options), "teacher_checkpoint": str(checkpoint)}


def run_family(family: str, variants: list[str], seeds: dict[str, list[int]], args: argparse.Namespace,
               common: dict) -> dict:
    """Teacher metrics, the measured teacher cost, then every variant for every seed
    (:func:`~kdlab.engine.experiment.run_rows`)."""
    checkpoint = teacher_checkpoint(family)
    return {"teacher_checkpoint": relative_to(checkpoint, REPO),
            **run_rows(family, student_config(family), common, variants, seeds,
                       lambda variant, seed, base: variant_fields(variant, base.distill_options, checkpoint),
                       checkpoint, args.out / family, args.teacher_cost, group_records(args, family), args.fresh)}


def markdown(family: str, part: dict, note: str) -> str:
    """One family's table and the comparisons with the student alone and the compute-matched student."""
    runs = {v: {int(s): m for s, m in by_seed.items()} for v, by_seed in part["runs"].items()}
    lines = results_table(f"{family}{note}", part["teacher"], runs, LABELS)
    if part.get("teacher_cost_ratio") is not None:
        lines += ["", f"Teacher forward / student step, measured: r = {part['teacher_cost_ratio']:.2f}."]
    if "student" in runs:
        notes = {}
        if "drkd" in runs:
            gain = part["table"]["drkd"]["AP"][0] - part["table"]["student"]["AP"][0]
            notes["drkd"] = f" (target >= +{TARGET_GAIN}: {'met' if gain >= TARGET_GAIN else 'NOT met'})"
        lines += [""] + comparison_lines(runs, LABELS, [v for v in runs if VARIANTS[v][1] is not None], notes=notes)
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                        help="restrict every family to these variants (each family runs only those it defines)")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(DEFAULT_SEEDS))
    parser.add_argument("--seeds-for", nargs="+", default=[], metavar="KEY=S,S", dest="seeds_for_list",
                        help="other seeds for a family or one family's variant, e.g. faster_rcnn=0 retinanet/fitnet=0")
    parser.add_argument("--teacher-cost", type=float, default=None,
                        help="use this teacher-forward / student-step ratio instead of measuring it")
    add_run_arguments(parser, data_root=False)
    args = parse_run_arguments(parser, argv, "drkd_shapes", REPO)
    keys = set(FAMILIES) | {f"{f}/{v}" for f, variants in FAMILIES.items() for v in variants}
    try:
        args.seeds_for = parse_seeds_for(args.seeds_for_list, keys)
    except ValueError as err:
        parser.error(str(err))
    for key, count in ROW_SEED_COUNT.items():
        if key.split("/")[0] not in args.seeds_for:   # a family's --seeds-for covers its diagnostic rows too
            args.seeds_for.setdefault(key, args.seeds[:count])
    for family in args.families:
        if not teacher_checkpoint(family).is_file():
            parser.error(f"teacher checkpoint {teacher_checkpoint(family)} does not exist: train it with "
                         f"`python experiments/gid_shapes.py --families {family} --variants student` or "
                         f"`kdlab train configs/shapes_gid_{family}_teacher.yaml`")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    common = shapes_run_fields(args, REPO / load_config(student_config(args.families[0])).data_root)
    run_groups(args, "families", {f: [v for v in FAMILIES[f] if v in args.variants] for f in args.families}, LABELS,
               lambda family, variants, seeds: run_family(family, variants, seeds, args, common), markdown,
               "DRKD experiment (shapes, quick CPU configurations)", "drkd_shapes", REPO, every_group=list(FAMILIES))
    return 0


if __name__ == "__main__":
    sys.exit(main())
