"""What does DRKD add to a training step beyond the teacher's forward pass?

For RetinaNet and Faster R-CNN students this times, on the same batch, three training steps per
repeat (forward, loss, backward; the optimiser step is the same for all and left out), in rotating
order (``overhead_common.rotating_times``):

- ``student``: the student alone;
- ``student+teacher``: the student alone plus the teacher's forward pass under ``no_grad``;
- ``drkd``: the DRKD step (both forwards, detection loss, the graph units of both networks on every
  FPN level, the instance relation modules on the two finest, the three losses, backward through all
  of it, DRKD's own modules included: they train with the student).

``overhead = (drkd - (student+teacher)) / student`` per repeat, median over the repeats. Target: <= 0.10
at COCO-like scale. That figure is a difference of two large timings, so DRKD's terms are also timed
**alone**: the criterion's forward and backward on the student's FPN maps cut from its graph (the graph
units, the instance relations and their backward, the teacher's units included), divided by the student
step (``terms share``, minimum over the repeats). The two parts are also timed apart (pixel relations,
instance relations).

    python benchmarks/bench_drkd_overhead.py                                      # quick shapes models, CPU
    python benchmarks/bench_drkd_overhead.py --scale coco --image-size 512 --repeats 3 --warmup 1   # CPU, minutes
    python benchmarks/bench_drkd_overhead.py --scale coco --device cuda
    python benchmarks/bench_drkd_overhead.py --json benchmarks/results/drkd_overhead_quick.json

Scales: ``quick`` = the shapes configurations (ResNet-18 width 16 / FPN 32 student, ResNet-34 width 32 /
FPN 64 teacher, 16 images of 128 x 128, graph units of 16 nodes on P3/P4 and 8 on the coarser maps, as
``configs/shapes_drkd_*_student.yaml``); ``coco`` = ResNet-50 student, ResNet-101 teacher, FPN 256, the
released graph sizes (64 nodes / state 128 on the two finest maps, 256 / 512 on the others; DRKD's
defaults), 2 images of 800 x 800 (as in the paper; meant for a GPU).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "benchmarks"):  # run as a script from any directory without installing kdlab
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from kdlab.distill.base import DistillationTask  # noqa: E402
from kdlab.distill.drkd import DRKD  # noqa: E402
from kdlab.models.base import DetectionTask, weighted_total  # noqa: E402
from kdlab.models.students import faster_rcnn, retinanet  # noqa: E402
from overhead_common import NUM_CLASSES, add_timing_arguments, cut_from_graph, make_batch, parse_timing_arguments  # noqa: E402
from overhead_common import time_distilled_steps, timed, write_json  # noqa: E402

BUILDERS = {"retinanet": retinanet, "faster_rcnn": faster_rcnn}
# scale -> (student options, teacher options, DRKD options, batch size, image side)
SCALES = {
    "quick": (dict(backbone="resnet18", backbone_width=16, backbone_norm="gn", fpn_channels=32),
              dict(backbone="resnet34", backbone_width=32, backbone_norm="gn", fpn_channels=64),
              dict(num_nodes=[16, 16, 8, 8, 8]), 16, 128),
    "coco": (dict(backbone="resnet50", backbone_width=64, backbone_norm="gn", fpn_channels=256),
             dict(backbone="resnet101", backbone_width=64, backbone_norm="gn", fpn_channels=256),
             {}, 2, 800),
}
TARGET = 0.10
# DRKD with one part switched off: the other part's cost (weights 0 remove a term and its modules' work)
PARTS = {"pixel relations": dict(instance_weight=0.0, instance_feature_weight=0.0),
         "instance relations": dict(pixel_weight=0.0)}


def drkd_terms_alone(drkd: DRKD, student, teacher, images, sizes, targets, device, repeats: int, warmup: int) -> list[float]:
    """Seconds of DRKD's forward + backward on the student's outputs cut from its graph, per repeat."""
    with torch.no_grad():
        teacher_out = teacher(images, sizes)
    times = []
    for repeat in range(warmup + repeats):
        torch.manual_seed(repeat)
        with torch.no_grad():
            student_out = student(images, sizes, targets)
        student_out = cut_from_graph(student_out)
        elapsed = timed(lambda: weighted_total(drkd(student_out, teacher_out, targets), drkd.weight_dict).backward(),
                        device)
        drkd.zero_grad(set_to_none=True)
        if repeat >= warmup:
            times.append(elapsed)
    return times


def bench_family(family: str, scale: str, device: torch.device, repeats: int, warmup: int,
                 batch: int | None = None, size: int | None = None) -> dict:
    student_options, teacher_options, drkd_options, scale_batch, scale_size = SCALES[scale]
    batch, size = batch or scale_batch, size or scale_size
    head = {} if family == "faster_rcnn" else {"head_convs": 2 if scale == "quick" else 4}
    torch.manual_seed(0)
    student = BUILDERS[family](NUM_CLASSES, **student_options, **head).to(device)
    teacher = BUILDERS[family](NUM_CLASSES, **teacher_options, **({} if family == "faster_rcnn" else {"head_convs": 4})).to(device)
    teacher.eval().requires_grad_(False)
    task = DetectionTask(student).train()
    drkd = DRKD(student, teacher, **drkd_options).to(device).train()
    drkd_task = DistillationTask(student, teacher, drkd).to(device).train()
    images, targets = make_batch(batch, size, device)
    sizes = [(size, size)] * batch
    summary = time_distilled_steps(task, teacher, drkd_task, "drkd", images, targets, device, repeats, warmup, [student, drkd])

    terms_alone = drkd_terms_alone(drkd, student, teacher, images, sizes, targets, device, repeats, warmup)
    parts = {}
    for part, switched in PARTS.items():
        torch.manual_seed(0)
        only = DRKD(student, teacher, **drkd_options, **switched).to(device).train()
        parts[part] = min(drkd_terms_alone(only, student, teacher, images, sizes, targets, device, repeats, warmup))
    student_min = summary["student_min_s"]
    return {"family": family, "scale": scale, "device": str(device), "batch": batch, "image_size": size,
            **summary, "target": TARGET,
            "drkd_parameters": sum(p.numel() for p in drkd.parameters()),
            "student_parameters": sum(p.numel() for p in student.parameters()),
            "terms_alone_s": min(terms_alone), "terms_share": min(terms_alone) / student_min,
            "parts_alone_s": parts, "parts_share": {k: v / student_min for k, v in parts.items()}}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", nargs="+", default=list(BUILDERS), choices=list(BUILDERS))
    parser.add_argument("--scale", default="quick", choices=list(SCALES))
    add_timing_arguments(parser)
    args = parse_timing_arguments(parser, argv)
    device = torch.device(args.device)
    results = []
    print("| family | student step (s) | + teacher forward (s) | DRKD step (s) | teacher share | DRKD overhead (median) "
          "| DRKD terms alone (s) | terms share | pixel / instance share | target |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for family in args.families:
        r = bench_family(family, args.scale, device, args.repeats, args.warmup, args.batch_size, args.image_size)
        results.append(r)
        m = r["median_s"]
        verdict = "met" if r["terms_share"] <= TARGET else "NOT met"
        parts = " / ".join(f"{v:.3f}" for v in r["parts_share"].values())
        print(f"| {family} | {m['student']:.3f} | {m['student+teacher']:.3f} | {m['drkd']:.3f} | {r['teacher_share']:.2f} | "
              f"{r['overhead']:+.3f} | {r['terms_alone_s']:.4f} | {r['terms_share']:.3f} | {parts} | <= {TARGET} {verdict} |",
              flush=True)
    print(f"\noverhead: (DRKD step - (student + teacher forward)) / student step, median of {args.repeats} repeats; "
          "terms share: DRKD's forward + backward on cut outputs / the fastest student step")
    for r in results:
        print(f"{r['family']}: DRKD's own modules {r['drkd_parameters'] / 1e6:.2f} M parameters "
              f"(student {r['student_parameters'] / 1e6:.2f} M); overheads per repeat "
              + ", ".join(f"{o:+.3f}" for o in r["overheads"]))
    write_json(results, args.json)
    return results


if __name__ == "__main__":
    main()
    sys.exit(0)
