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
  (FitNets on every FPN location, fine-grained imitation near the objects; weight 2.0, adapters).

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
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from any directory without installing kdlab
    sys.path.insert(0, str(REPO))

from kdlab.config import load_config  # noqa: E402
from kdlab.data import build_dataset, make_shapes  # noqa: E402
from kdlab.engine.checkpoint import atomic_save_json  # noqa: E402
from kdlab.engine.experiment import (  # noqa: E402
    METRICS,
    cached_teacher_cost_ratio,
    cell,
    compute_matched_config,
    make_config,
    mean_std,
    publish,
    relative_to,
    run,
    teacher_metrics,
)

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
    "fitnet": ("FitNets (every FPN location)", "fitnet", {"weight": 2.0}),
    "fine_grained": ("fine-grained imitation (near the objects)", "fine_grained", {"weight": 2.0}),
}
FAMILIES: dict[str, list[str]] = {
    "retinanet": list(VARIANTS),
    "faster_rcnn": ["student", "compute_matched", "drkd"],
}


def student_config(family: str) -> Path:
    return REPO / "configs" / f"shapes_drkd_{family}_student.yaml"


def teacher_checkpoint(family: str) -> Path:
    return REPO / "data" / "checkpoints" / f"shapes_{family}_teacher.pt"


def variant_fields(variant: str, base_options: dict, checkpoint: Path) -> dict:
    """Config fields of one variant (on top of the student config)."""
    _, distill, options = VARIANTS[variant]
    if distill is None:
        return {"distill": None, "distill_options": {}, "teacher_checkpoint": None, "teacher_config": None}
    if distill == "drkd":
        merged = {**base_options, **options}
        if options.get("variant") == "official":  # the released recipe: its own weights, distance and filter
            merged = {"variant": "official", "num_nodes": base_options.get("num_nodes")}
        return {"distill": "drkd", "distill_options": merged, "teacher_checkpoint": str(checkpoint)}
    return {"distill": distill, "distill_options": dict(options), "teacher_checkpoint": str(checkpoint)}


def run_family(family: str, variants: list[str], seeds: dict[str, list[int]], args: argparse.Namespace,
               common: dict) -> dict:
    """Teacher metrics, the measured teacher cost, then every variant for every seed."""
    out = args.out / family
    checkpoint = teacher_checkpoint(family)
    base = make_config(student_config(family), common)
    eval_cfg = make_config(student_config(family), {**common, "distill": None, "distill_options": {}, "teacher_checkpoint": None})
    teacher = teacher_metrics(eval_cfg, checkpoint, out / "teacher_eval.json")
    train_set = build_dataset(base.data_root, base.train_split, train=False, min_size=base.min_size, max_size=base.max_size)
    iters_per_epoch = math.ceil(len(train_set) / base.batch_size)
    ratio = None
    if "compute_matched" in variants:
        # measured once and cached: the compute-matched runs' length depends on it
        ratio = args.teacher_cost if args.teacher_cost is not None else cached_teacher_cost_ratio(
            base, checkpoint, out / "teacher_cost.json")
        print(f"[{family}] teacher forward / student step = {ratio:.2f}", flush=True)
    runs: dict[str, dict[int, dict[str, float]]] = {v: {} for v in variants}
    for seed in sorted({s for v in variants for s in seeds[v]}):
        for variant in (v for v in variants if seed in seeds[v]):
            fields = {**common, "seed": seed, "output_dir": str(out / variant / f"seed{seed}"),
                      **variant_fields(variant, base.distill_options, checkpoint)}
            cfg = make_config(student_config(family), fields)
            if variant == "compute_matched":
                cfg = compute_matched_config(cfg, ratio, iters_per_epoch)
            runs[variant][seed] = run(cfg)
    table = {v: mean_std(by_seed) for v, by_seed in runs.items()}
    return {"teacher_checkpoint": relative_to(checkpoint, REPO), "teacher": teacher, "teacher_cost_ratio": ratio,
            "runs": runs, "table": {v: {m: list(c) for m, c in cells.items()} for v, cells in table.items()}}


def markdown(family: str, part: dict, note: str) -> str:
    """One family's table and the comparisons with the student alone and the compute-matched student."""
    lines = [f"### {family}{note}", "",
             "| run | seeds | " + " | ".join(METRICS) + " | AP per seed |", "|---|---|" + "---|" * len(METRICS) + "---|",
             "| teacher | - | " + " | ".join(cell(None if part["teacher"].get(m) is None else 100 * part["teacher"][m], None)
                                         for m in METRICS) + " | |"]
    table = part["table"]
    for variant, cells in table.items():
        by_seed = part["runs"][variant]
        per_seed = ", ".join(f"{100 * by_seed[s]['AP']:.1f}" for s in sorted(by_seed, key=int))
        lines.append(f"| {VARIANTS[variant][0]} | {len(by_seed)} | "
                     + " | ".join(cell(*cells[m]) for m in METRICS) + f" | {per_seed} |")
    if part.get("teacher_cost_ratio") is not None:
        lines += ["", f"Teacher forward / student step, measured: r = {part['teacher_cost_ratio']:.2f}."]
    if "student" in table:
        lines.append("")
        alone = table["student"]["AP"][0]
        matched = table.get("compute_matched", {}).get("AP", (None,))[0]
        for variant in table:
            if VARIANTS[variant][1] is None:
                continue
            gain = table[variant]["AP"][0] - alone
            text = f"- {VARIANTS[variant][0]}: {gain:+.1f} AP over the student alone"
            if variant == "drkd":
                text += f" (target >= +{TARGET_GAIN}: {'met' if gain >= TARGET_GAIN else 'NOT met'})"
            if matched is not None:
                versus = table[variant]["AP"][0] - matched
                text += f", {versus:+.1f} over the compute-matched student ({'beats it' if versus > 0 else 'does NOT beat it'})"
            lines.append(text)
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                        help="restrict every family to these variants (each family runs only those it defines)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--seeds-for", nargs="+", default=[], metavar="KEY=S,S", dest="seeds_for_list",
                        help="other seeds for a family or one family's variant, e.g. faster_rcnn=0 retinanet/fitnet=0")
    parser.add_argument("--teacher-cost", type=float, default=None,
                        help="use this teacher-forward / student-step ratio instead of measuring it")
    parser.add_argument("--quick", action="store_true", help="smoke test: seed 0 only, 1 epoch")
    parser.add_argument("--max-iters", type=int, default=None, help="stop every run after this many iterations")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--num-workers", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    smoke = args.quick or args.max_iters is not None
    if args.out is None:
        args.out = REPO / "outputs" / ("drkd_shapes_quick" if smoke else "drkd_shapes")
    args.seeds_for = {}
    keys = set(FAMILIES) | {f"{f}/{v}" for f, variants in FAMILIES.items() for v in variants}
    for item in args.seeds_for_list:
        key, _, seeds = item.partition("=")
        if key not in keys or not seeds:
            parser.error(f"--seeds-for expects FAMILY[/VARIANT]=S[,S...] with FAMILY/VARIANT one of {sorted(keys)}, got {item!r}")
        try:
            args.seeds_for[key] = [int(s) for s in seeds.split(",")]
        except ValueError:
            parser.error(f"--seeds-for: seeds must be integers, got {item!r}")
    for family in args.families:
        if not teacher_checkpoint(family).is_file():
            parser.error(f"teacher checkpoint {teacher_checkpoint(family)} does not exist: train it with "
                         f"`python experiments/gid_shapes.py --families {family} --variants student` or "
                         f"`kdlab train configs/shapes_gid_{family}_teacher.yaml`")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    seeds = [args.seeds[0]] if args.quick else args.seeds
    common: dict = {"device": args.device}
    if args.quick:
        common.update(epochs=1, lr_steps=[], eval_every=0)
    if args.max_iters is not None:
        common["max_iters"] = args.max_iters
    if args.num_workers is not None:
        common["num_workers"] = args.num_workers
    data_root = REPO / load_config(student_config(args.families[0])).data_root
    if not (data_root / "annotations").is_dir():
        print(f"generating the shapes dataset into {data_root}", flush=True)
        make_shapes(data_root)
    common["data_root"] = str(data_root)
    note = " — SMOKE TEST, not a result" if args.quick or args.max_iters is not None else ""
    results = {"seeds": seeds, "smoke_test": bool(note), "variants": {v: VARIANTS[v][0] for v in VARIANTS}, "families": {}}
    sections = []
    for family in args.families:
        variants = [v for v in FAMILIES[family] if v in args.variants]
        family_seeds = seeds if args.quick else args.seeds_for.get(family, seeds)
        variant_seeds = {v: family_seeds if args.quick else args.seeds_for.get(f"{family}/{v}", family_seeds)
                         for v in variants}
        print(f"[{family}] seeds {variant_seeds} -> {args.out / family}", flush=True)
        results["families"][family] = part = run_family(family, variants, variant_seeds, args, common)
        part["seeds"] = variant_seeds
        sections.append(markdown(family, part, note))
        atomic_save_json(results, args.out / "results.json")
    text = "## DRKD experiment (shapes, quick CPU configurations)\n\n" + "\n\n".join(sections) + "\n"
    (args.out / "results.md").write_text(text)
    if not note:
        publish(results, text, "drkd_shapes", REPO)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
