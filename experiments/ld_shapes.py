"""LD's experiment on shapes (and BCCD when present): student alone vs LD vs feature imitation.

One command, three seeds per variant, every run through the engine (``kdlab.engine.train``)::

    python experiments/ld_shapes.py                          # 7 variants x 3 seeds, shapes (+ BCCD)
    python experiments/ld_shapes.py --quick --max-iters 2    # smoke test: 1 seed, a few iterations

Variants (METHODS.md §1): the student alone; Main LD; Main KD + Main LD + VLR LD (the published
best), with kdlab's normalisation and again at the released code's loss scale (its constant
normalisation at the authors' 2 images per GPU, under which the published weights were set);
FitNets; fine-grained imitation; self-LD (the teacher is the student-alone model of the
same seed: same architecture, trained with the same recipe). Every distilled run uses the same
schedule, seed and data order as the student alone.

Teachers: on shapes ``--teacher-checkpoint`` (``data/checkpoints/shapes_gfl_teacher.pt``) when it
exists, else it is trained first with ``--teacher-config``; on BCCD a teacher is always trained
first (same teacher config, BCCD data). Finished runs are reused when their saved config equals
the new one (an interrupted command continues where it stopped; a run with its ``last.pt`` resumes).

Outputs under ``--out`` (default ``outputs/ld_shapes``, ``outputs/ld_shapes_quick`` with
``--quick``/``--max-iters``): one run folder per dataset/variant/seed, ``results.json`` (every
run's metrics, the teachers', and the mean/std table) and ``results.md`` (mean ± std over seeds of
AP, AP75, APs in %, sample std; ``–`` for a metric without ground truth to score). A full run (not
a smoke test) with every variant and 3 or more seeds also copies both files to
``experiments/results/ld_shapes.{json,md}``, which are tracked in git and shown by notebook 02 as
the stored full run.
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
from kdlab.data import build_dataset  # noqa: E402
from kdlab.engine import build_loader, evaluate, load_detector, train  # noqa: E402
from kdlab.engine.experiment import make_config, relative_to, run  # noqa: E402
from kdlab.engine.checkpoint import atomic_save_json  # noqa: E402
from kdlab.engine.distributed import DistContext, resolve_device  # noqa: E402
from kdlab.eval import UNDEFINED, format_metric  # noqa: E402

SHARED_DATA = REPO.parent / "shared" / "data"
METRICS = ("AP", "AP75", "APs")

# name -> (label, distiller name or None, distill_options); "self_ld" takes the student-alone run as teacher
VARIANTS: dict[str, tuple[str, str | None, dict]] = {
    "student": ("student alone", None, {}),
    "main_ld": ("Main LD", "ld", {"vlr_ld_weight": 0.0, "main_kd_weight": 0.0}),
    "kd_ld_vlr": ("Main KD + Main LD + VLR LD", "ld", {}),
    # the same recipe at the released code's loss scale: its constant LD normalisation with the
    # authors' 2 images per GPU (LD's images_per_gpu; the published weights were set under it)
    "kd_ld_vlr_official": ("Main KD + Main LD + VLR LD, released-code scale (2 img/GPU)", "ld",
                           {"variant": "official", "images_per_gpu": 2}),
    "fitnet": ("FitNets", "fitnet", {}),
    "fine_grained": ("fine-grained imitation", "fine_grained", {}),
    "self_ld": ("self-LD (Main + VLR LD)", "ld", {"main_kd_weight": 0.0}),
}
IMITATION_VARIANTS = ("fitnet", "fine_grained")

# dataset -> config overrides on top of the student/teacher configs (shapes: the configs as they are)
DATASETS: dict[str, dict] = {
    "shapes": {},
    # 640 x 480 blood-smear images, 3 classes, 205 training images, shown at half size (320 x 240: cells
    # of 25-50 px, platelets of 10-15 px, 5x the pixels of a shapes image) with half the batch (the
    # configs' lr is per base_batch_size and scales linearly); each config keeps its own epochs
    "bccd": {"data_root": str(SHARED_DATA / "bccd"), "train_split": "train", "val_split": "val",
             "min_size": 240, "max_size": 320, "batch_size": 8, "eval_every": 0},
}


def evaluate_checkpoint(cfg: TrainConfig, checkpoint: Path, cache: Path) -> dict[str, float]:
    """COCO metrics of a saved detector on ``cfg``'s validation split (cached in ``cache``)."""
    if cache.is_file() and json.loads(cache.read_text()).get("checkpoint_mtime") == checkpoint.stat().st_mtime:
        return json.loads(cache.read_text())["metrics"]
    device = resolve_device(cfg.device)
    dataset = build_dataset(cfg.data_root, cfg.val_split, train=False, min_size=cfg.min_size, max_size=cfg.max_size)
    loader = build_loader(dataset, cfg, DistContext(0, 1, 0, device), train=False)
    metrics = evaluate(load_detector(checkpoint, device), loader, device, amp=cfg.amp)
    cache.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_json({"checkpoint": str(checkpoint), "checkpoint_mtime": checkpoint.stat().st_mtime, "metrics": metrics}, cache)
    return metrics


def summarise(runs: dict[str, dict[int, dict[str, float | None]]]) -> dict[str, dict[str, tuple[float | None, float | None]]]:
    """``{variant: {metric: (mean, std)}}`` in %, over the seeds where the metric is defined (sample
    std, None from a single value; the mean is None where no seed has it, e.g. APs without small objects)."""
    table = {}
    for variant, by_seed in runs.items():
        table[variant] = {}
        for metric in METRICS:
            values = [100 * m[metric] for m in by_seed.values() if m[metric] is not None]
            table[variant][metric] = (statistics.mean(values) if values else None,
                                      statistics.stdev(values) if len(values) > 1 else None)
    return table


def cell(mean: float | None, std: float | None) -> str:
    """``mean ± std``, the bare mean from a single value, ``–`` when undefined."""
    if mean is None:
        return UNDEFINED
    return f"{mean:.1f}" if std is None else f"{mean:.1f} ± {std:.1f}"


def markdown(dataset: str, table: dict, teacher: dict[str, float], seeds: list[int], note: str) -> str:
    """The markdown table of one dataset, with the issue's two targets checked."""
    lines = [f"### {dataset} ({len(seeds)} seed{'s' if len(seeds) > 1 else ''}: {seeds}){note}", "",
             "| run | " + " | ".join(METRICS) + " |", "|---|" + "---|" * len(METRICS),
             "| teacher | " + " | ".join(format_metric(teacher[m]) for m in METRICS) + " |"]
    for variant, cells in table.items():
        lines.append(f"| {VARIANTS[variant][0]} | " + " | ".join(cell(mean, std) for mean, std in cells.values()) + " |")
    lines.append("")
    for full in ("kd_ld_vlr", "kd_ld_vlr_official"):
        if not {"student", full} <= table.keys() or None in (table[full]["AP"][0], table["student"]["AP"][0]):
            continue  # AP undefined: a validation split without ground truth
        gain = table[full]["AP"][0] - table["student"]["AP"][0]
        lines.append(f"- {VARIANTS[full][0]} vs student alone: {gain:+.1f} AP (target >= +1.5): "
                     f"{'met' if gain >= 1.5 else 'NOT met'}")
        imitation = [v for v in IMITATION_VARIANTS if v in table]
        if imitation:
            best = max(imitation, key=lambda v: table[v]["AP"][0])
            margin = table[full]["AP"][0] - table[best]["AP"][0]
            lines.append(f"- {VARIANTS[full][0]} vs best feature imitation ({VARIANTS[best][0]}): {margin:+.1f} AP "
                         f"(target > 0): {'met' if margin > 0 else 'NOT met'}")
    return "\n".join(lines)


def run_dataset(name: str, args: argparse.Namespace, seeds: list[int], common: dict) -> dict:
    """Teacher, then every variant for every seed, on one dataset; returns its part of results.json."""
    out = args.out / name
    fields = {**DATASETS[name], **common}
    if name == "shapes" and args.teacher_checkpoint.is_file():
        teacher_ckpt = args.teacher_checkpoint
    else:
        print(f"[{name}] training the teacher ({args.teacher_config})", flush=True)
        run(make_config(args.teacher_config, {**fields, "output_dir": str(out / "teacher"), "seed": 0}))
        teacher_ckpt = out / "teacher" / "student.pt"
    eval_cfg = make_config(args.student_config, fields)  # the data and resize of the students' evaluation
    teacher_metrics = evaluate_checkpoint(eval_cfg, teacher_ckpt, out / "teacher_eval.json")
    runs: dict[str, dict[int, dict[str, float]]] = {v: {} for v in args.variants}
    for seed in seeds:
        for variant in ["student"] + [v for v in args.variants if v != "student"]:  # self-LD needs the student run
            _, distill, options = VARIANTS[variant]
            teacher = str(out / "student" / f"seed{seed}" / "student.pt") if variant == "self_ld" else str(teacher_ckpt)
            cfg = make_config(args.student_config, {
                **fields, "seed": seed, "output_dir": str(out / variant / f"seed{seed}"), "distill": distill,
                "distill_options": dict(options), "teacher_checkpoint": teacher if distill else None, "teacher_config": None})
            metrics = run(cfg)
            if variant in runs:
                runs[variant][seed] = metrics
    table = summarise(runs)
    return {"teacher_checkpoint": relative_to(teacher_ckpt, REPO), "teacher": teacher_metrics, "runs": runs,
            "table": {v: {m: list(c) for m, c in cells.items()} for v, cells in table.items()}}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student-config", type=Path, default=REPO / "configs" / "shapes_gfl_student.yaml")
    parser.add_argument("--teacher-config", type=Path, default=REPO / "configs" / "shapes_gfl_teacher.yaml")
    parser.add_argument("--teacher-checkpoint", type=Path, default=REPO / "data" / "checkpoints" / "shapes_gfl_teacher.pt",
                        help="shapes teacher (trained with --teacher-config first if the file does not exist)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--bccd-seeds", type=int, nargs="+", default=None,
                        help="seeds on BCCD (default: --seeds); BCCD's teacher and larger images cost more")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--datasets", nargs="+", default=None, choices=list(DATASETS),
                        help="default: shapes, plus bccd when ../shared/data/bccd exists (not with --quick)")
    parser.add_argument("--quick", action="store_true", help="smoke test: seed 0 only, 1 epoch, shapes only")
    parser.add_argument("--max-iters", type=int, default=None, help="stop every run after this many iterations")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--num-workers", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    smoke = args.quick or args.max_iters is not None
    if args.out is None:
        args.out = REPO / "outputs" / ("ld_shapes_quick" if smoke else "ld_shapes")
    if args.datasets is None:
        args.datasets = ["shapes"] + (["bccd"] if (SHARED_DATA / "bccd").is_dir() and not args.quick else [])
    for path in (args.student_config, args.teacher_config):
        if not path.is_file() and not (path == args.teacher_config and args.teacher_checkpoint.is_file()
                                       and args.datasets == ["shapes"]):
            parser.error(f"config {path} does not exist")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    seeds = [args.seeds[0]] if args.quick else args.seeds
    common = {"device": args.device}
    if args.quick:
        common.update(epochs=1, lr_steps=[], eval_every=0)
    if args.max_iters is not None:
        common["max_iters"] = args.max_iters
    if args.num_workers is not None:
        common["num_workers"] = args.num_workers
    note = " — SMOKE TEST, not a result" if args.quick or args.max_iters is not None else ""
    results = {"seeds": seeds, "variants": {v: VARIANTS[v][0] for v in args.variants}, "smoke_test": bool(note), "datasets": {}}
    sections = []
    for dataset in args.datasets:
        print(f"[{dataset}] {len(args.variants)} variants -> {args.out / dataset}", flush=True)
        dataset_seeds = args.bccd_seeds if dataset == "bccd" and args.bccd_seeds and not args.quick else seeds
        results["datasets"][dataset] = part = run_dataset(dataset, args, dataset_seeds, common)
        part["seeds"] = dataset_seeds
        table = {v: {m: tuple(c) for m, c in cells.items()} for v, cells in part["table"].items()}
        sections.append(markdown(dataset, table, part["teacher"], dataset_seeds, note))
        atomic_save_json(results, args.out / "results.json")
    text = "## LD experiment\n\n" + "\n\n".join(sections) + "\n"
    (args.out / "results.md").write_text(text)
    if not note and len(seeds) >= 3 and set(args.variants) == set(VARIANTS):
        published = REPO / "experiments" / "results"
        published.mkdir(parents=True, exist_ok=True)
        atomic_save_json(results, published / "ld_shapes.json")
        (published / "ld_shapes.md").write_text(text)
        print(f"published to {published}/ld_shapes.{{json,md}}")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
