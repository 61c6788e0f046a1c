"""LD's loss scale: the released code's (constant normaliser, 2 images per GPU) against kdlab's.

The published LD weights (0.25 for Main LD and VLR LD, 10 for Main KD) were tuned under the released
code's normalisation: ``sum_i w_i sum_edges LD_i / 4`` (main) and ``/ 16`` (VLR) per GPU of 2 images,
Main KD a per-level mean summed over the levels. kdlab divides by the summed location weights
instead (a weighted mean, independent of the batch). The ratio of the two is the factor by which a
kdlab weight must exceed the published one to train with the same strength (METHODS.md §1)::

    ratio = official term (images_per_gpu=2) / kdlab term      (both unweighted)

This script measures it on real batches, forward passes only: the shapes GFL student and teacher
(``configs/shapes_gfl_student.yaml``, ``data/checkpoints/shapes_gfl_teacher.pt``), for the untrained
student and after a few hundred iterations of its own schedule (the student alone, trained here,
``--train-iters``), or for any saved student (``--checkpoints``). The ratio is given for each term's
value and for the norm of its gradient with respect to the student's head outputs (box logits for LD,
class logits for KD), per batch: mean, sample std, min and max over ``--batches`` batches. For Main LD
the two ratios are one number, ``(2 / B) * sum_{positives} max_c sigma(s)`` (the student's summed
scores over the positives of 2 images): it grows with the student's confidence, from ~0 at
initialisation.

    python experiments/ld_calibration.py                          # untrained + 100/200/300 iterations
    python experiments/ld_calibration.py --train-iters            # the untrained student only
    python experiments/ld_calibration.py --checkpoints outputs/ld_shapes/shapes/student/seed0/student.pt

Outputs: a markdown table on stdout and ``--out``/``results.{json,md}`` (default
``outputs/ld_calibration``); with ``--publish`` also ``experiments/results/ld_calibration.{json,md}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from any directory without installing kdlab
    sys.path.insert(0, str(REPO))

from kdlab.config import load_config  # noqa: E402
from kdlab.data import build_dataset, image_sizes_of  # noqa: E402
from kdlab.distill.ld import LD  # noqa: E402
from kdlab.distill.vlr import vlr_weights  # noqa: E402
from kdlab.engine.build import build_loader, build_student  # noqa: E402
from kdlab.engine.checkpoint import load_detector  # noqa: E402
from kdlab.engine.distributed import DistContext, resolve_device  # noqa: E402
from kdlab.engine.experiment import add_output_arguments, write_results  # noqa: E402
from kdlab.engine.loop import train  # noqa: E402

TERMS = ("loss_ld", "loss_ld_vlr", "loss_kd")
# the head output each term's gradient is measured on
GRAD_OF = {"loss_ld": "box_logits", "loss_ld_vlr": "box_logits", "loss_kd": "cls_logits"}
IMAGES_PER_GPU = 2  # the authors' setting (METHODS.md §1)


def batch_ratios(student, teacher, images, targets) -> dict[str, float]:
    """Official (2 img/GPU) / kdlab ratio of each term's value and gradient norm on one batch, and what drives them."""
    kdlab_ld = LD(student, teacher)
    official_ld = LD(student, teacher, variant="official", images_per_gpu=IMAGES_PER_GPU)
    sizes = image_sizes_of(targets)
    with torch.no_grad():
        teacher_out = teacher(images, sizes)
        student_out = student(images, sizes, targets)
    out: dict[str, float] = {}
    values: dict[str, dict[str, tuple[float, float]]] = {}
    for name, criterion in (("kdlab", kdlab_ld), ("official", official_ld)):
        s_out = student_out.detach()  # the head outputs are the leaves: gradients of the terms alone
        s_out.box_logits.requires_grad_(True)
        s_out.cls_logits.requires_grad_(True)
        terms = criterion(s_out, teacher_out, targets)
        values[name] = {}
        for term in TERMS:
            leaf = getattr(s_out, GRAD_OF[term])
            (grad,) = torch.autograd.grad(terms[term], leaf, retain_graph=True)
            values[name][term] = (terms[term].item(), grad.norm().item())
    for term in TERMS:
        (kd_value, kd_grad), (off_value, off_grad) = values["kdlab"][term], values["official"][term]
        out[f"{term}/value"] = off_value / kd_value
        out[f"{term}/grad"] = off_grad / kd_grad
    batch = images.shape[0]
    assignment = student_out.assignment
    score = student_out.cls_logits.float().sigmoid().max(dim=-1).values
    out["positives per image"] = assignment.pos_mask.sum().item() / batch
    out["summed positive scores per 2 images"] = IMAGES_PER_GPU * score[assignment.pos_mask].sum().item() / batch
    paper = vlr_weights(student_out, weighting="mask", rule="diou") > 0
    released = vlr_weights(student_out, weighting="mask", rule="iof_diou") > 0
    out["VLR locations per image (paper rule)"] = paper.sum().item() / batch
    out["VLR locations per image (released rule)"] = released.sum().item() / batch
    out["VLR mask IoU (paper vs released rule)"] = (paper & released).sum().item() / max((paper | released).sum().item(), 1)
    return out


def summarise(per_batch: list[dict[str, float]]) -> dict[str, list[float]]:
    """``{quantity: [mean, sample std, min, max]}`` over the batches."""
    keys = per_batch[0].keys()
    summary = {}
    for key in keys:
        values = [b[key] for b in per_batch]
        summary[key] = [statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0,
                        min(values), max(values)]
    return summary


def measure(student, teacher, batches, device) -> dict[str, list[float]]:
    student.eval()  # GroupNorm everywhere: eval == train for the forward; no dropout
    per_batch = []
    for images, targets in batches:
        targets = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in t.items()} for t in targets]
        per_batch.append(batch_ratios(student, teacher, images.to(device), targets))
    return summarise(per_batch)


def trained_students(cfg, iterations: list[int], out: Path):
    """The student alone after each of ``iterations`` (its own schedule's first iterations, one run resumed)."""
    run_dir = out / "student"
    for step in sorted(iterations):
        run_cfg = dataclasses.replace(cfg, output_dir=str(run_dir), max_iters=step, eval_every=0,
                                      distill=None, distill_options={}, teacher_checkpoint=None, teacher_config=None)
        metrics = train(run_cfg, resume=(run_dir / "last.pt").is_file(), progress=False)
        yield f"student after {step} iterations (AP {100 * metrics['AP']:.1f})", run_dir / "student.pt"


def markdown(results: dict) -> str:
    lines = [f"Batches of {results['batch_size']} training images ({results['batches']} batches), shapes, "
             f"teacher `{results['teacher']}`. Each cell: mean ± sample std [min, max] over the batches.", ""]
    for label, summary in results["students"].items():
        lines += [f"### {label}", "", "| quantity | value |", "|---|---|"]
        for key, (mean, std, low, high) in summary.items():
            lines.append(f"| {key} | {mean:.3g} ± {std:.2g} [{low:.3g}, {high:.3g}] |")
        lines.append("")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student-config", type=Path, default=REPO / "configs" / "shapes_gfl_student.yaml")
    parser.add_argument("--teacher-checkpoint", type=Path, default=REPO / "data" / "checkpoints" / "shapes_gfl_teacher.pt")
    parser.add_argument("--train-iters", type=int, nargs="*", default=[100, 200, 300],
                        help="measure the student alone after these iterations of its schedule (none: untrained only)")
    parser.add_argument("--checkpoints", type=Path, nargs="*", default=[], help="saved students (student.pt) to measure too")
    parser.add_argument("--batches", type=int, default=12, help="training batches measured per student")
    add_output_arguments(parser, "ld_calibration", REPO)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    cfg = load_config(args.student_config)
    cfg = dataclasses.replace(cfg, data_root=str(args.data_root or REPO / cfg.data_root), device=args.device)
    dataset = build_dataset(cfg.data_root, cfg.train_split, train=False, min_size=cfg.min_size, max_size=cfg.max_size)
    loader = build_loader(dataset, dataclasses.replace(cfg, num_workers=0), DistContext(0, 1, 0, device), train=False)
    batches = []
    for images, targets in loader:
        batches.append((images, targets))
        if len(batches) == args.batches:
            break
    teacher = load_detector(args.teacher_checkpoint, device).eval()
    torch.manual_seed(cfg.seed)
    students = {"untrained student (seed %d)" % cfg.seed: build_student(cfg, dataset.num_classes).to(device)}
    results = {"batch_size": cfg.batch_size, "batches": len(batches), "teacher": str(args.teacher_checkpoint.name),
               "images_per_gpu": IMAGES_PER_GPU, "students": {}}
    for label, student in students.items():
        results["students"][label] = measure(student, teacher, batches, device)
        print(f"measured: {label}", flush=True)
    def sources():  # lazily: the run's student.pt is overwritten by the next training step
        if args.train_iters:
            yield from trained_students(cfg, args.train_iters, args.out)
        for path in args.checkpoints:
            yield f"saved student {path}", path

    for label, path in sources():
        results["students"][label] = measure(load_detector(path, device), teacher, batches, device)
        print(f"measured: {label}", flush=True)
    write_results(results, [markdown(results)], "LD loss scale: released code (2 images per GPU) / kdlab", args.out,
                  "ld_calibration", REPO, args.publish)
    return 0


if __name__ == "__main__":
    sys.exit(main())
