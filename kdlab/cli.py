"""Command line: ``kdlab`` (console script) or ``python -m kdlab``; ``torchrun ... -m kdlab train`` for DDP.

::

    kdlab data shapes --out data/shapes [--num-train 4000 --num-val 250 --image-size 128 --seed 0]
    kdlab check-data CONFIG [--set key=value ...] [--full]
    kdlab train CONFIG [--resume | --overwrite] [--output-dir DIR] [--set key=value ...] [--skip-bad-images]
    kdlab eval CONFIG --checkpoint FILE [--set key=value ...] [--out FILE]
    kdlab predict CHECKPOINT IMAGE_OR_FOLDER ... --out DIR [--score-thresh 0.3]
    kdlab demo [--out outputs/demo]

Expected failures (a missing or invalid config, missing or bad data, a bad checkpoint, an output
folder in use or holding another run, a disk that is full) print one line ``kdlab: error: ...`` to
stderr and exit with status 2; a diverged run (non-finite loss) exits with 1; Ctrl-C exits with
130 after saving where training stopped. Set ``KDLAB_DEBUG=1`` to get the traceback instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
import warnings
from pathlib import Path

from kdlab.config import ConfigError, load_config
from kdlab.data import build_dataset, dataset_layouts, make_shapes
from kdlab.data.check import BadImagesError, describe_split, find_bad_images, screen_images
from kdlab.engine import build_loader, evaluate, init_distributed, load_detector, train
from kdlab.engine.checkpoint import CheckpointError, atomic_save_json
from kdlab.engine.distributed import cleanup_distributed, resolve_device
from kdlab.engine.interrupt import TrainingInterrupted
from kdlab.engine.rundir import OutputDirError
from kdlab.eval import format_metrics_table

# Errors of the user's input (config, data, checkpoint, output folder); anything else keeps its traceback.
EXPECTED_ERRORS = (ConfigError, CheckpointError, OutputDirError, OSError, ValueError, ImportError)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdlab", description="Knowledge distillation for object detectors.")
    commands = parser.add_subparsers(dest="command", required=True,
                                     metavar="{data,check-data,train,eval,predict,demo}")

    data = commands.add_parser("data", help="generate datasets")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="{shapes}")
    shapes = data_commands.add_parser("shapes", help="write the synthetic *shapes* detection set (COCO format)")
    shapes.add_argument("--out", required=True, type=Path, help="output folder")
    shapes.add_argument("--num-train", type=int, default=4000, help="training images (default 4000)")
    shapes.add_argument("--num-val", type=int, default=250, help="validation images (default 250)")
    shapes.add_argument("--image-size", type=int, default=128, help="side of the square images (default 128)")
    shapes.add_argument("--seed", type=int, default=0, help="the set is a function of this seed (default 0)")
    shapes.add_argument("--workers", type=int, default=None, help="processes drawing images (default: CPU count)")

    check = commands.add_parser("check-data", help="check a config's dataset: annotation files, classes, every image")
    check.add_argument("config", type=Path, help="the config (its data fields are used)")
    check.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE")
    check.add_argument("--full", action="store_true",
                       help="decode every image (default: header and end-of-file test, decoding only suspects)")

    train = commands.add_parser("train", help="train (or distil) a detector from a YAML config")
    train.add_argument("config", type=Path, help="flat YAML file of kdlab.config.TrainConfig fields")
    train.add_argument("--resume", action="store_true", help="continue exactly from OUTPUT_DIR/last.pt")
    train.add_argument("--overwrite", action="store_true",
                       help="replace the run already in OUTPUT_DIR (its checkpoints, logs and evaluations)")
    train.add_argument("--output-dir", help="override the config's output_dir")
    train.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                       help="override config fields, e.g. --set lr=0.02 epochs=2 (values parsed as YAML)")
    train.add_argument("--skip-bad-images", action="store_true",
                       help="leave out image files that are missing or do not decode (default: stop and list them)")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")

    evaluate_cmd = commands.add_parser("eval", help="COCO metrics of a checkpoint on the config's val split")
    evaluate_cmd.add_argument("config", type=Path, help="the config (data and device fields are used)")
    evaluate_cmd.add_argument("--checkpoint", required=True, type=Path, help="student.pt (or a training last.pt)")
    evaluate_cmd.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE")
    evaluate_cmd.add_argument("--out", "--output", dest="out", type=Path,
                              help="metrics JSON (default: eval_<checkpoint name>.json beside the checkpoint)")
    evaluate_cmd.add_argument("--skip-bad-images", action="store_true", help="leave out val images that do not decode")
    evaluate_cmd.add_argument("--no-progress", action="store_true", help="no progress bar")

    predict = commands.add_parser("predict", help="detections on image files: COCO JSON + drawn images")
    predict.add_argument("checkpoint", type=Path, help="student.pt (or a training last.pt)")
    predict.add_argument("images", nargs="+", type=Path, help="image files, or folders of them")
    predict.add_argument("--out", required=True, type=Path,
                         help="output folder: detections.json and one drawn image per input")
    predict.add_argument("--score-thresh", type=float, default=0.3, help="keep detections scoring at least this (0.3)")
    predict.add_argument("--min-size", type=int, help="resize (default: the checkpoint's training min_size)")
    predict.add_argument("--max-size", type=int, help="resize (default: the checkpoint's training max_size)")
    predict.add_argument("--batch-size", type=int, default=8, help="images per forward pass (8)")
    predict.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")

    demo = commands.add_parser("demo", help="the main job: shapes -> teacher -> student alone vs distilled -> table")
    demo.add_argument("--out", type=Path, default=Path("outputs/demo"), help="output folder (default outputs/demo)")
    demo.add_argument("--data", default="data/shapes", help="shapes dataset folder (generated when absent)")
    demo.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                      help="overrides of the student's config (e.g. epochs=2)")
    demo.add_argument("--no-distill", action="store_true", help="teacher and student alone only")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def run_data_shapes(args: argparse.Namespace) -> int:
    summary = make_shapes(args.out, num_train=args.num_train, num_val=args.num_val,
                          image_size=args.image_size, seed=args.seed, workers=args.workers)
    print(f"wrote {summary['train']['num_images']} training and {summary['val']['num_images']} validation "
          f"images of {len(summary['classes'])} classes to {args.out} in {summary['seconds']:.0f} s")
    return 0


def run_check_data(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    problems = []
    for split in dict.fromkeys([cfg.train_split, cfg.val_split]):
        dataset = build_dataset(cfg.data_root, split, train=False, min_size=cfg.min_size, max_size=cfg.max_size)
        layout = next((name for name, ann_file, _ in dataset_layouts(cfg.data_root, split)
                       if ann_file == dataset.ann_file), None)
        print("\n".join(describe_split(dataset, split, layout)))
        bad = find_bad_images(dataset, full=args.full)
        how = "decoded in full" if args.full else "header and end-of-file test"
        if bad:
            problems.append(f"{len(bad)} bad image(s) in split {split!r} (fix or remove them, or train with "
                            f"--skip-bad-images to leave them out)")
            print(f"  {len(bad)} bad image(s) ({how}):")
            print("\n".join(f"    {b}" for b in bad))
        else:
            print(f"  every image file exists, is the size the annotation file gives and is complete ({how})")
        if split == cfg.train_split and dataset.num_boxes == 0:
            problems.append(f"no training box in split {split!r}: nothing to learn from")
            print("  no training box: nothing to learn from")
    if problems:
        raise BadImagesError(f"{args.config}: " + "; ".join(problems))
    print("ok")
    return 0


def run_train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.output_dir is not None:
        cfg = dataclasses.replace(cfg, output_dir=args.output_dir)
    try:
        metrics = train(cfg, resume=args.resume, overwrite=args.overwrite, skip_bad_images=args.skip_bad_images,
                        progress=not args.no_progress)
    except TrainingInterrupted as stop:
        command = ["kdlab", "train", str(args.config), *(["--output-dir", args.output_dir] if args.output_dir else []),
                   *(["--set", *args.overrides] if args.overrides else []), "--resume"]
        raise stop.with_resume_hint(shlex.join(command)) from None
    if int(os.environ.get("RANK", "0")) == 0:  # the process group is gone by now; torchrun sets RANK
        print(format_metrics_table({Path(cfg.output_dir).name: metrics}))
    return 0


def run_eval(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    ctx = init_distributed(cfg.device)
    try:
        dataset = build_dataset(cfg.data_root, cfg.val_split, train=False, min_size=cfg.min_size,
                                max_size=cfg.max_size, seed=cfg.seed)
        screen_images(dataset, cfg.val_split, skip=args.skip_bad_images, announce=ctx.is_main)
        detector = load_detector(args.checkpoint, ctx.device)
        if detector.num_classes != dataset.num_classes:
            raise ValueError(f"checkpoint {args.checkpoint} predicts {detector.num_classes} classes but "
                             f"{cfg.data_root} ({cfg.val_split}) has {dataset.num_classes}")
        loader = build_loader(dataset, cfg, ctx, train=False)
        metrics = evaluate(detector, loader, ctx.device, amp=cfg.amp, progress=not args.no_progress)
    finally:
        cleanup_distributed(ctx)
    if ctx.is_main:
        output = args.out or args.checkpoint.parent / f"eval_{args.checkpoint.stem}.json"
        atomic_save_json({"checkpoint": str(args.checkpoint), "data_root": cfg.data_root, "split": cfg.val_split,
                          "metrics": metrics}, output)
        print(format_metrics_table({args.checkpoint.stem: metrics}))
        print(f"metrics written to {output}")
    return 0


def image_files(paths: list[Path]) -> list[Path]:
    """The image files among ``paths``, folders expanded (their image files, sorted by name)."""
    files = []
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise FileNotFoundError(f"folder {path} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"image {path} does not exist")
    return files


def run_predict(args: argparse.Namespace) -> int:
    from kdlab.data import read_rgb
    from kdlab.engine.inference import coco_detections
    from kdlab.viz import draw_on_image

    files = image_files(args.images)
    detector = load_detector(args.checkpoint, resolve_device(args.device))
    args.out.mkdir(parents=True, exist_ok=True)
    detections, sizes, names = [], [], set()
    for start in range(0, len(files), args.batch_size):
        chunk = files[start:start + args.batch_size]
        images = []
        for path in chunk:
            try:
                images.append(read_rgb(path))
            except OSError as err:  # PIL's UnidentifiedImageError is an OSError
                raise OSError(f"cannot read image {path}: {err}") from None
        found = detector.predict(images, score_thresh=args.score_thresh, min_size=args.min_size,
                                 max_size=args.max_size, batch_size=args.batch_size)
        for path, image, det in zip(chunk, images, found):
            name = path.stem + (path.suffix.lower() if path.suffix.lower() in (".jpg", ".jpeg", ".png") else ".png")
            if name in names:  # the same file name in two folders
                name = f"{len(names)}_{name}"
            names.add(name)
            draw_on_image(image, det, detector.class_names).save(args.out / name)
            sizes.append((image.height, image.width))
            detections.append(det)
    coco = coco_detections(files, sizes, detections, detector.class_names, detector.category_ids)
    atomic_save_json(coco, args.out / "detections.json")
    print(f"{len(coco['annotations'])} detections (score >= {args.score_thresh}) on {len(files)} image(s): "
          f"{args.out / 'detections.json'} (COCO format) and the drawn images in {args.out}/")
    return 0


def run_demo_command(args: argparse.Namespace) -> int:
    from kdlab.demo import run_demo

    run_demo(args.out, args.data, overrides=args.overrides, progress=not args.no_progress, distill=not args.no_distill)
    return 0


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as ``kdlab: warning: ...`` lines (not ``path.py:123: UserWarning: ...`` + source line)."""
    print(f"kdlab: warning: {message}", file=file or sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 1 diverged run, 2 error, 130 interrupted)."""
    args = build_parser().parse_args(argv)
    commands = {"data": run_data_shapes, "check-data": run_check_data, "train": run_train, "eval": run_eval,
                "predict": run_predict, "demo": run_demo_command}
    debug = os.environ.get("KDLAB_DEBUG", "") not in ("", "0")
    show_warning = warnings.showwarning
    if not debug:
        warnings.showwarning = _one_line_warning
    try:
        return commands[args.command](args)
    except FloatingPointError as err:
        if debug:
            raise
        print(f"kdlab: training diverged: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:
        if debug:
            raise
        print(f"kdlab: {err}" if isinstance(err, TrainingInterrupted) else "kdlab: interrupted", file=sys.stderr)
        return 130
    except EXPECTED_ERRORS as err:
        if debug:
            raise
        message = str(err).strip() or type(err).__name__
        print(f"kdlab: error: {message}", file=sys.stderr)
        return 2
    finally:
        warnings.showwarning = show_warning


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
