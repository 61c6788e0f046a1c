"""GID's experiment on shapes: each student alone vs GID, and GID's per-loss ablations.

One command, three seeds per run, every run through the engine (``kdlab.engine.train``)::

    python experiments/gid_shapes.py                          # everything below, seeds 0 1 2
    python experiments/gid_shapes.py --quick --max-iters 2    # smoke test: seed 0, 2 iterations
    python experiments/gid_shapes.py --families retinanet --variants student gid
    python experiments/gid_shapes.py --seeds-for faster_rcnn=0 retinanet/gid_feature=0   # some runs once

Runs (METHODS.md §2), with the quick CPU configurations ``configs/shapes_gid_{family}_*.yaml``:

- RetinaNet: the student alone; GID full (feature + relation + response); feature only;
  relation only; response only;
- FCOS: the student alone; GID full;
- Faster R-CNN: the student alone; GID full (GISM and the response loss on the RPN).

Teachers: ``data/checkpoints/shapes_{family}_teacher.pt`` when it exists, else trained first
from ``configs/shapes_gid_{family}_teacher.yaml`` (seed 0). Every distilled run uses the
schedule, seed and data order of its student-alone run. Finished runs are reused when their
saved config equals the new one; an interrupted run resumes from its ``last.pt``.

Outputs under ``--out`` (default ``outputs/gid_shapes``, ``outputs/gid_shapes_quick`` for smoke
tests): one folder per family/variant/seed, ``results.json`` (every run's metrics, the teachers'
and the mean/std table) and ``results.md`` (mean ± std over seeds, sample std, AP in %), with the
issue's target checked: GID full >= RetinaNet student alone + 1.5 AP on the mean over seeds.
A real (not smoke-test) run also copies both to ``experiments/results/gid_shapes.{json,md}``,
which are tracked in git and shown by notebook 03.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from any directory without installing kdlab
    sys.path.insert(0, str(REPO))

from kdlab.config import TrainConfig, load_config  # noqa: E402
from kdlab.data import build_dataset, make_shapes  # noqa: E402
from kdlab.engine import build_loader, evaluate, load_detector, train  # noqa: E402
from kdlab.engine.experiment import make_config, relative_to, run  # noqa: E402
from kdlab.engine.checkpoint import atomic_save_json  # noqa: E402
from kdlab.engine.distributed import DistContext, resolve_device  # noqa: E402
from kdlab.eval import UNDEFINED, format_metric  # noqa: E402

METRICS = ("AP", "AP50", "AP75", "APs")
TARGET_GAIN = 1.5  # AP points, GID full over the RetinaNet student alone (the target)

# variant -> (label, distill_options on top of the config's, or None for the student alone)
OFF = 0.0
VARIANTS: dict[str, tuple[str, dict | None]] = {
    "student": ("student alone", None),
    "gid": ("GID (feature + relation + response)", {}),
    "gid_feature": ("GID feature only", {"relation_weight": OFF, "response_cls_weight": OFF, "response_reg_weight": OFF}),
    "gid_relation": ("GID relation only", {"feature_weight": OFF, "response_cls_weight": OFF, "response_reg_weight": OFF}),
    "gid_response": ("GID response only", {"feature_weight": OFF, "relation_weight": OFF}),
}
FAMILIES: dict[str, list[str]] = {
    "retinanet": ["student", "gid", "gid_feature", "gid_relation", "gid_response"],
    "fcos": ["student", "gid"],
    "faster_rcnn": ["student", "gid"],
}


def student_config(family: str) -> Path:
    return REPO / "configs" / f"shapes_gid_{family}_student.yaml"


def teacher_config(family: str) -> Path:
    return REPO / "configs" / f"shapes_gid_{family}_teacher.yaml"


def teacher_metrics(cfg: TrainConfig, checkpoint: Path, cache: Path) -> dict[str, float]:
    """COCO metrics of the teacher on the students' validation data (cached next to the runs)."""
    stamp = checkpoint.stat().st_mtime
    if cache.is_file() and json.loads(cache.read_text()).get("checkpoint_mtime") == stamp:
        return json.loads(cache.read_text())["metrics"]
    device = resolve_device(cfg.device)
    dataset = build_dataset(cfg.data_root, cfg.val_split, train=False, min_size=cfg.min_size, max_size=cfg.max_size)
    loader = build_loader(dataset, cfg, DistContext(0, 1, 0, device), train=False)
    metrics = evaluate(load_detector(checkpoint, device), loader, device, amp=cfg.amp)
    cache.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_json({"checkpoint": str(checkpoint), "checkpoint_mtime": stamp, "metrics": metrics}, cache)
    return metrics


def mean_std(runs: dict[int, dict[str, float | None]]) -> dict[str, tuple[float | None, float | None]]:
    """``{metric: (mean, sample std)}`` in % over the seeds where the metric is defined; the std is
    None for one seed (no spread was measured, so none is claimed), both are None for none."""
    cells = {}
    for metric in METRICS:
        values = [100 * m[metric] for m in runs.values() if m[metric] is not None]
        cells[metric] = (statistics.mean(values) if values else None,
                         statistics.stdev(values) if len(values) > 1 else None)
    return cells


def cell(mean: float | None, std: float | None) -> str:
    """``mean ± std`` to one decimal, the bare value for a single seed, ``–`` when undefined."""
    if mean is None:
        return UNDEFINED
    return f"{mean:.1f}" if std is None else f"{mean:.1f} ± {std:.1f}"


def run_family(family: str, variants: list[str], seeds: dict[str, list[int]], args: argparse.Namespace,
               common: dict) -> dict:
    """The teacher, then every variant for every seed; returns the family's part of results.json."""
    out = args.out / family
    checkpoint = REPO / "data" / "checkpoints" / f"shapes_{family}_teacher.pt"
    if not checkpoint.is_file():
        print(f"[{family}] training the teacher ({teacher_config(family).name})", flush=True)
        run(make_config(teacher_config(family), {**common, "output_dir": str(out / "teacher"), "seed": 0}))
        checkpoint = out / "teacher" / "student.pt"
    eval_cfg = make_config(student_config(family), {**common, "distill": None, "teacher_checkpoint": None})
    teacher = teacher_metrics(eval_cfg, checkpoint, out / "teacher_eval.json")
    runs: dict[str, dict[int, dict[str, float]]] = {v: {} for v in variants}
    for seed in sorted({s for v in variants for s in seeds[v]}):
        for variant in (v for v in variants if seed in seeds[v]):
            options = VARIANTS[variant][1]
            base = load_config(student_config(family))
            fields = {**common, "seed": seed, "output_dir": str(out / variant / f"seed{seed}")}
            if options is None:
                fields.update(distill=None, distill_options={}, teacher_checkpoint=None, teacher_config=None)
            else:
                fields.update(distill="gid", distill_options={**base.distill_options, **options},
                              teacher_checkpoint=str(checkpoint), teacher_config=None)
            runs[variant][seed] = run(make_config(student_config(family), fields))
    table = {v: mean_std(by_seed) for v, by_seed in runs.items()}
    return {"teacher_checkpoint": relative_to(checkpoint, REPO), "teacher": teacher, "runs": runs,
            "table": {v: {m: list(c) for m, c in cells.items()} for v, cells in table.items()}}


def markdown(family: str, part: dict, note: str) -> str:
    """One family's table (mean ± std over each row's seeds, the bare value for a single seed, and AP
    per seed) and, for RetinaNet, the target check."""
    lines = [f"### {family}{note}", "",
             "| run | seeds | " + " | ".join(METRICS) + " | AP per seed |", "|---|---|" + "---|" * len(METRICS) + "---|",
             "| teacher | - | " + " | ".join(format_metric(part['teacher'][m]) for m in METRICS) + " | |"]
    table = part["table"]
    for variant, cells in table.items():
        by_seed = part["runs"][variant]
        per_seed = ", ".join(format_metric(by_seed[s]["AP"]) for s in sorted(by_seed, key=int))
        lines.append(f"| {VARIANTS[variant][0]} | {len(by_seed)} | "
                     + " | ".join(cell(mean, std) for mean, std in cells.values()) + f" | {per_seed} |")
    if {"student", "gid"} <= table.keys() and None not in (table["gid"]["AP"][0], table["student"]["AP"][0]):
        gain = table["gid"]["AP"][0] - table["student"]["AP"][0]
        line = f"- GID full vs student alone: {gain:+.1f} AP"
        if family == "retinanet":
            line += f" (target >= +{TARGET_GAIN}): {'met' if gain >= TARGET_GAIN else 'NOT met'}"
        lines += ["", line]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                        help="restrict every family to these variants (each family runs only those it defines)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--seeds-for", nargs="+", default=[], metavar="KEY=S,S", dest="seeds_for_list",
                        help="other seeds for a family or one family's variant, e.g. faster_rcnn=0 "
                             "retinanet/gid_feature=0 (the ablations once)")
    parser.add_argument("--quick", action="store_true", help="smoke test: seed 0 only, 1 epoch")
    parser.add_argument("--max-iters", type=int, default=None, help="stop every run after this many iterations")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--num-workers", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    smoke = args.quick or args.max_iters is not None
    if args.out is None:
        args.out = REPO / "outputs" / ("gid_shapes_quick" if smoke else "gid_shapes")
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
        for path in (student_config(family), teacher_config(family)):
            if not path.is_file():
                parser.error(f"config {path} does not exist")
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
    text = "## GID experiment (shapes, quick CPU configurations)\n\n" + "\n\n".join(sections) + "\n"
    (args.out / "results.md").write_text(text)
    if not note:  # a real run: the tables notebook 03 shows are tracked in git
        published = REPO / "experiments" / "results"
        published.mkdir(parents=True, exist_ok=True)
        atomic_save_json(results, published / "gid_shapes.json")
        (published / "gid_shapes.md").write_text(text)
        print(f"published to {published}/gid_shapes.{{json,md}}")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
