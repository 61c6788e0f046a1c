"""Command line: ``kdlab`` (console script) or ``python -m kdlab``; ``torchrun ... -m kdlab train`` for DDP.

::

    kdlab data shapes --out data/shapes [--num-train 4000 --num-val 250 --image-size 128 --seed 0]
    kdlab train CONFIG [--resume] [--output-dir DIR] [--set key=value ...] [--no-progress]
    kdlab eval CONFIG --checkpoint FILE [--set key=value ...] [--output FILE]

Expected failures (a missing or invalid config, missing data, a bad checkpoint) print one line
``kdlab: error: ...`` to stderr and exit with status 2; a diverged run (non-finite loss) exits
with 1. Set ``KDLAB_DEBUG=1`` to get the traceback instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from kdlab.config import ConfigError, load_config
from kdlab.data import build_dataset, make_shapes
from kdlab.engine import build_loader, evaluate, init_distributed, load_detector, train
from kdlab.engine.checkpoint import CheckpointError, atomic_save_json
from kdlab.engine.distributed import cleanup_distributed
from kdlab.eval import format_metrics_table

# Errors of the user's input (config, data, checkpoint); anything else keeps its traceback.
EXPECTED_ERRORS = (ConfigError, CheckpointError, OSError, ValueError, ImportError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdlab", description="Knowledge distillation for object detectors.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{data,train,eval}")

    data = commands.add_parser("data", help="generate datasets")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="{shapes}")
    shapes = data_commands.add_parser("shapes", help="write the synthetic *shapes* detection set (COCO format)")
    shapes.add_argument("--out", required=True, type=Path, help="output folder")
    shapes.add_argument("--num-train", type=int, default=4000, help="training images (default 4000)")
    shapes.add_argument("--num-val", type=int, default=250, help="validation images (default 250)")
    shapes.add_argument("--image-size", type=int, default=128, help="side of the square images (default 128)")
    shapes.add_argument("--seed", type=int, default=0, help="the set is a function of this seed (default 0)")

    train = commands.add_parser("train", help="train (or distil) a detector from a YAML config")
    train.add_argument("config", type=Path, help="flat YAML file of kdlab.config.TrainConfig fields")
    train.add_argument("--resume", action="store_true", help="continue exactly from OUTPUT_DIR/last.pt")
    train.add_argument("--output-dir", help="override the config's output_dir")
    train.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                       help="override config fields, e.g. --set lr=0.02 epochs=2 (values parsed as YAML)")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")

    demo = commands.add_parser("demo", help="the main job: shapes -> teacher -> student alone vs distilled -> table")
    demo.add_argument("--out", type=Path, default=Path("outputs/demo"), help="output folder (default outputs/demo)")
    demo.add_argument("--data", default="data/shapes", help="shapes dataset folder (generated when absent)")
    demo.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                      help="overrides of the student's config (e.g. epochs=2)")
    demo.add_argument("--no-distill", action="store_true", help="teacher and student alone only")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")

    evaluate = commands.add_parser("eval", help="COCO metrics of a checkpoint on the config's val split")
    evaluate.add_argument("config", type=Path, help="the config (data and device fields are used)")
    evaluate.add_argument("--checkpoint", required=True, type=Path, help="student.pt (or a training last.pt)")
    evaluate.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE")
    evaluate.add_argument("--output", type=Path, help="metrics JSON (default OUTPUT_DIR/eval_<checkpoint>.json)")
    return parser


def run_data_shapes(args: argparse.Namespace) -> int:
    summary = make_shapes(args.out, num_train=args.num_train, num_val=args.num_val,
                          image_size=args.image_size, seed=args.seed)
    print(f"wrote {summary['train']['num_images']} training and {summary['val']['num_images']} validation "
          f"images of {len(summary['classes'])} classes to {args.out}")
    return 0


def run_train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.output_dir is not None:
        cfg = dataclasses.replace(cfg, output_dir=args.output_dir)
    metrics = train(cfg, resume=args.resume, progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) == 0:  # the process group is gone by now; torchrun sets RANK
        print(format_metrics_table({Path(cfg.output_dir).name: metrics}))
    return 0


def run_eval(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    ctx = init_distributed(cfg.device)
    try:
        dataset = build_dataset(cfg.data_root, cfg.val_split, train=False, min_size=cfg.min_size,
                                max_size=cfg.max_size, seed=cfg.seed)
        detector = load_detector(args.checkpoint, ctx.device)
        if detector.num_classes != dataset.num_classes:
            raise ValueError(f"checkpoint {args.checkpoint} predicts {detector.num_classes} classes but "
                             f"{cfg.data_root} ({cfg.val_split}) has {dataset.num_classes}")
        loader = build_loader(dataset, cfg, ctx, train=False)
        metrics = evaluate(detector, loader, ctx.device, amp=cfg.amp)
    finally:
        cleanup_distributed(ctx)
    if ctx.is_main:
        output = args.output or Path(cfg.output_dir) / f"eval_{args.checkpoint.stem}.json"
        atomic_save_json({"checkpoint": str(args.checkpoint), "split": cfg.val_split, "metrics": metrics}, output)
        print(format_metrics_table({args.checkpoint.stem: metrics}))
        print(f"metrics written to {output}")
    return 0


def run_demo_command(args: argparse.Namespace) -> int:
    from kdlab.demo import run_demo

    run_demo(args.out, args.data, overrides=args.overrides, progress=not args.no_progress, distill=not args.no_distill)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 1 diverged run, 2 error)."""
    args = build_parser().parse_args(argv)
    commands = {"data": run_data_shapes, "train": run_train, "eval": run_eval, "demo": run_demo_command}
    debug = os.environ.get("KDLAB_DEBUG", "") not in ("", "0")
    try:
        return commands[args.command](args)
    except FloatingPointError as err:
        if debug:
            raise
        print(f"kdlab: training diverged: {err}", file=sys.stderr)
        return 1
    except EXPECTED_ERRORS as err:
        if debug:
            raise
        message = str(err).strip() or type(err).__name__
        print(f"kdlab: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
