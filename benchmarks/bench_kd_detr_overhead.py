"""What do KD-DETR's extra decoder passes add to a training step beyond the teacher's forward pass?

For a DAB-DETR student and teacher this times, on the same batch, three training steps per repeat
(forward, loss, backward; the optimiser step is the same for all and left out), in rotating order
(``overhead_common.rotating_times``):

- ``student``: the student alone (detection loss with Hungarian matching on every decoder layer);
- ``student+teacher``: the student alone plus the teacher's plain forward under ``no_grad``;
- ``kd_detr``: the KD-DETR step: both forwards **with** the extra query passes (specific points: the
  teacher's anchors; general points: fresh random anchors), the detection loss, KD-DETR's losses at the
  points for every student layer, backward through all of it.

``overhead = (kd_detr - (student+teacher)) / student`` per repeat, median over the repeats. As a
difference of two large timings it scatters on a shared CPU, so KD-DETR's own work is also timed
**alone**: the extra decoder passes of both models over their encoder memories (the student's memory cut
from its graph), the losses, and the backward through the student's passes (``terms share``: divided by
the fastest student step).

    python benchmarks/bench_kd_detr_overhead.py                                      # quick shapes models, CPU
    python benchmarks/bench_kd_detr_overhead.py --scale coco --image-size 512 --repeats 3 --warmup 1   # CPU, minutes
    python benchmarks/bench_kd_detr_overhead.py --scale coco --device cuda
    python benchmarks/bench_kd_detr_overhead.py --json benchmarks/results/kd_detr_overhead_quick.json

Scales: ``quick`` = the shapes configurations (``configs/shapes_dab_detr_{student,teacher}.yaml``: ResNet-18
width 16 / ResNet-34 width 32 on C4, width-64 transformer of 2 + 3 layers, 50 queries; 50 general points;
16 images of 128 x 128); ``coco`` = the released recipe's sizes (ResNet-18 student, ResNet-50 teacher, C5,
width 256, 6 + 6 layers, 300 queries, 300 general points, 2 images of 800 x 800; meant for a GPU).
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
from kdlab.distill.kd_detr import KDDETR  # noqa: E402
from kdlab.models import build_detector  # noqa: E402
from kdlab.models.base import DetectionTask, weighted_total  # noqa: E402
from kdlab.models.dab_detr import feature_padding_mask  # noqa: E402
from kdlab.models.detr_transformer import image_position_embedding  # noqa: E402
from overhead_common import NUM_CLASSES, add_timing_arguments, make_batch, parse_timing_arguments  # noqa: E402
from overhead_common import time_distilled_steps, timed, write_json  # noqa: E402

QUICK_TRANSFORMER = dict(feature_level="C4", hidden_dim=64, num_queries=50, enc_layers=2, dec_layers=3, num_heads=4,
                         dim_feedforward=256)
# scale -> (student options, teacher options, general points, batch size, image side)
SCALES = {
    "quick": (dict(backbone="resnet18", backbone_width=16, backbone_norm="gn", **QUICK_TRANSFORMER),
              dict(backbone="resnet34", backbone_width=32, backbone_norm="gn", **QUICK_TRANSFORMER), 50, 16, 128),
    "coco": (dict(backbone="resnet18"), dict(backbone="resnet50"), 300, 2, 800),
}


def memory_inputs(model, output, sizes) -> tuple[torch.Tensor, torch.Tensor]:
    """The encoder's position embedding and padding mask of ``output`` (what a decoder pass reads)."""
    feature = output.features[0]
    mask = feature_padding_mask(sizes, feature.shape[-2:], model.backbone.stride, feature.device)
    pos = image_position_embedding(mask, model.hidden_dim // 2, model.pe_temperature).flatten(1, 2).to(output.memory.dtype)
    return pos, mask.flatten(1)


def passes_alone(criterion: KDDETR, student, teacher, images, sizes, device, repeats: int, warmup: int) -> list[float]:
    """Seconds of KD-DETR's own work per repeat: the extra passes of both decoders over the models' encoder
    memories (the student's cut from its graph), the losses, and their backward."""
    with torch.no_grad():
        student_out, teacher_out = student(images, sizes), teacher(images, sizes)
    student_pos, student_mask = memory_inputs(student, student_out, sizes)
    teacher_pos, teacher_mask = memory_inputs(teacher, teacher_out, sizes)
    batch = images.shape[0]
    times = []
    for repeat in range(warmup + repeats):
        torch.manual_seed(repeat)
        memory = student_out.memory.detach().requires_grad_(True)

        def own_work():
            terms = {}
            for name, anchors in criterion.points(teacher, device).items():
                anchors = anchors.expand(batch, -1, -1)
                with torch.no_grad():
                    t_pass = teacher.decode(teacher_out.memory, teacher_pos, teacher_mask, anchors)
                s_pass = student.decode(memory, student_pos, student_mask, anchors)
                terms.update(criterion.point_terms(name, s_pass.layer_logits, s_pass.layer_boxes,
                                                   t_pass.layer_logits[-1], t_pass.layer_boxes[-1]))
            weighted_total(terms, criterion.weight_dict).backward()

        elapsed = timed(own_work, device)
        student.zero_grad(set_to_none=True)
        if repeat >= warmup:
            times.append(elapsed)
    return times


def bench(scale: str, device: torch.device, repeats: int, warmup: int, batch: int | None = None,
          size: int | None = None) -> dict:
    student_options, teacher_options, num_general, scale_batch, scale_size = SCALES[scale]
    batch, size = batch or scale_batch, size or scale_size
    torch.manual_seed(0)
    student = build_detector("dab_detr", NUM_CLASSES, **student_options).to(device)
    teacher = build_detector("dab_detr", NUM_CLASSES, **teacher_options).to(device)
    teacher.eval().requires_grad_(False)
    task = DetectionTask(student).train()
    criterion = KDDETR(student, teacher, num_general=num_general)
    kd_task = DistillationTask(student, teacher, criterion).to(device).train()
    images, targets = make_batch(batch, size, device)
    sizes = [(size, size)] * batch
    summary = time_distilled_steps(task, teacher, kd_task, "kd_detr", images, targets, device, repeats, warmup, [student])
    alone = passes_alone(criterion, student, teacher, images, sizes, device, repeats, warmup)
    points = teacher.num_queries + num_general  # the specific points are the teacher's anchors
    return {"scale": scale, "device": str(device), "batch": batch, "image_size": size, **summary,
            "detection_queries": student.num_queries, "distillation_points": points,
            "passes_alone_s": min(alone), "terms_share": min(alone) / summary["student_min_s"]}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", nargs="+", default=["quick"], choices=list(SCALES))
    add_timing_arguments(parser)
    args = parse_timing_arguments(parser, argv)
    device = torch.device(args.device)
    results = []
    print("| scale | images | queries + points | student step (s) | + teacher forward (s) | KD-DETR step (s) | teacher share "
          "| KD-DETR overhead (median) | extra passes + losses alone (s) | their share |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for scale in args.scale:
        r = bench(scale, device, args.repeats, args.warmup, args.batch_size, args.image_size)
        results.append(r)
        m = r["median_s"]
        print(f"| {scale} | {r['batch']} x {r['image_size']} px | {r['detection_queries']} + {r['distillation_points']} | "
              f"{m['student']:.3f} | {m['student+teacher']:.3f} | {m['kd_detr']:.3f} | {r['teacher_share']:.2f} | "
              f"{r['overhead']:+.3f} | {r['passes_alone_s']:.4f} | {r['terms_share']:.3f} |", flush=True)
    print(f"\noverhead: (KD-DETR step - (student + teacher forward)) / student step, median of {args.repeats} repeats; "
          "their share: the extra passes of both decoders, the losses and their backward / the fastest student step")
    write_json(results, args.json)
    return results


if __name__ == "__main__":
    main()
    sys.exit(0)
