"""What does GID add to a training step beyond the teacher's forward pass?

For each detector family this times, on the same batch, three training steps per repeat (forward,
loss, backward; the optimiser step is the same for all and left out), in rotating order so that
machine load hits all alike:

- ``student``: the student alone;
- ``student+teacher``: the student alone plus the teacher's forward pass under ``no_grad``
  (what any teacher-based distillation pays before computing a single distillation term);
- ``gid``: the GID step (student and teacher forward, detection loss, GISM, the feature /
  relation / response losses, backward through all of it).

``overhead = (gid - (student+teacher)) / student`` per repeat, i.e. GID's own cost beyond the
teacher forward in units of a student step; the figure is its median over the repeats. Target
(as for LD): <= 0.10. Timing the teacher inside the same step (rather than alone) keeps cache
and memory effects of holding the student's activations out of GID's share.

That figure is a difference of two large timings (at the quick scale the teacher forward is
twice the student step), so on a shared CPU single repeats scatter by +-0.1 or more. The GID
terms are therefore also timed **alone**, the same quantity measured directly: GISM and the
three losses, forward and backward, on the student's outputs cut from its graph (its FPN maps and
head outputs made leaves), divided by the student step (``terms share``, minimum over the
repeats). A per-stage split of the terms' forward pass (GISM, RoIAlign of both networks, adapter,
relation, response mask and losses) says where the time goes.

    python benchmarks/bench_gid_overhead.py                          # quick shapes models, CPU
    python benchmarks/bench_gid_overhead.py --scale coco --device cuda --families retinanet
    python benchmarks/bench_gid_overhead.py --scale coco --image-size 512 --repeats 2 --warmup 1   # CPU, minutes
    python benchmarks/bench_gid_overhead.py --json outputs/bench_gid_overhead.json

Scales: ``quick`` = the shapes configurations (ResNet-18 width 16 / FPN 32 student, ResNet-34
width 32 / FPN 64 teacher, 16 images of 128 x 128); ``coco`` = ResNet-50 student, ResNet-101
teacher, FPN 256, 2 images of 800 x 800 (as in the paper; meant for a GPU).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "benchmarks"):  # run as a script from any directory without installing kdlab
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import kdlab.distill.gid as gid_module  # noqa: E402
from kdlab.distill.base import DistillationTask  # noqa: E402
from kdlab.models.base import DetectionTask  # noqa: E402
from kdlab.distill.gid import GID  # noqa: E402
from kdlab.models.base import weighted_total  # noqa: E402
from kdlab.models.students import faster_rcnn, fcos, retinanet  # noqa: E402
from overhead_common import NUM_CLASSES, add_timing_arguments, cut_from_graph, make_batch, parse_timing_arguments  # noqa: E402
from overhead_common import time_distilled_steps, timed, write_json  # noqa: E402

BUILDERS = {"retinanet": retinanet, "fcos": fcos, "faster_rcnn": faster_rcnn}
# scale -> (student options, teacher options, batch size, image side)
SCALES = {
    "quick": (dict(backbone="resnet18", backbone_width=16, backbone_norm="gn", fpn_channels=32),
              dict(backbone="resnet34", backbone_width=32, backbone_norm="gn", fpn_channels=64), 16, 128),
    "coco": (dict(backbone="resnet50", backbone_width=64, backbone_norm="gn", fpn_channels=256),
             dict(backbone="resnet101", backbone_width=64, backbone_norm="gn", fpn_channels=256), 2, 800),
}
TARGET = 0.10


# the functions of kdlab.distill.gid that make up GID's terms, timed one by one (forward only)
STAGES = {"GISM": "select_general_instances", "RoIAlign (both)": "pool_fpn_boxes",
          "feature loss": "gi_feature_loss", "relation loss": "gi_relation_loss_groups",
          "response mask": "response_mask", "response losses": ("response_cls_loss", "response_reg_loss")}


def staged_forward(gid: GID, student_out, teacher_out, targets, device: torch.device) -> dict[str, float]:
    """Seconds spent in each stage of one forward of GID's terms (module functions wrapped)."""
    spent: dict[str, float] = {}
    originals = {}

    def wrap(stage: str, name: str):
        original = getattr(gid_module, name)
        originals[name] = original

        @functools.wraps(original)
        def timed_call(*args, **kwargs):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            result = original(*args, **kwargs)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            spent[stage] = spent.get(stage, 0.0) + time.perf_counter() - start
            return result
        setattr(gid_module, name, timed_call)

    for stage, names in STAGES.items():
        for name in (names,) if isinstance(names, str) else names:
            wrap(stage, name)
    adapter_forward = gid.adapter.forward

    def timed_adapter(x):
        start = time.perf_counter()
        result = adapter_forward(x)
        spent["adapter"] = spent.get("adapter", 0.0) + time.perf_counter() - start
        return result
    gid.adapter.forward = timed_adapter
    try:
        spent["all terms"] = timed(lambda: gid(student_out, teacher_out, targets), device)
    finally:
        for name, original in originals.items():
            setattr(gid_module, name, original)
        del gid.adapter.forward
    return spent


def bench_family(family: str, scale: str, device: torch.device, repeats: int, warmup: int,
                 batch: int | None = None, size: int | None = None) -> dict:
    student_options, teacher_options, scale_batch, scale_size = SCALES[scale]
    batch, size = batch or scale_batch, size or scale_size
    head = {} if family == "faster_rcnn" else {"head_convs": 2 if scale == "quick" else 4}
    torch.manual_seed(0)
    student = BUILDERS[family](NUM_CLASSES, **student_options, **head).to(device)
    teacher = BUILDERS[family](NUM_CLASSES, **teacher_options, **({} if family == "faster_rcnn" else {"head_convs": 4})).to(device)
    task = DetectionTask(student).train()
    gid = GID(student, teacher, min_size=2.0 if scale == "quick" else 10.0).to(device).train()
    gid_task = DistillationTask(student, teacher, gid).to(device).train()
    images, targets = make_batch(batch, size, device)
    sizes = [(size, size)] * batch
    summary = time_distilled_steps(task, teacher, gid_task, "gid", images, targets, device, repeats, warmup, [student, gid])

    # GID's terms alone, forward + backward, on outputs cut from the networks' graphs
    with torch.no_grad():
        teacher_out = teacher(images, sizes)
    terms_alone, stages = [], []
    for repeat in range(warmup + repeats):
        torch.manual_seed(repeat)
        student_out = cut_from_graph(student(images, sizes, targets))
        elapsed = timed(lambda: weighted_total(gid(student_out, teacher_out, targets),
                                               gid.weight_dict).backward(), device)
        staged = staged_forward(gid, cut_from_graph(student_out), teacher_out, targets, device)
        gid.zero_grad(set_to_none=True)
        if repeat >= warmup:
            terms_alone.append(elapsed)
            stages.append(staged)
    fastest = min(range(len(terms_alone)), key=terms_alone.__getitem__)
    return {"family": family, "scale": scale, "device": str(device), "batch": batch, "image_size": size,
            "median_s": summary["median_s"], "overhead": summary["overhead"], "overheads": summary["overheads"],
            "target": TARGET, "terms_alone_s": min(terms_alone), "student_min_s": summary["student_min_s"],
            "terms_share": min(terms_alone) / summary["student_min_s"],
            "stages_forward_s": {name: statistics.median(st.get(name, 0.0) for st in stages)
                                 for name in [*STAGES, "adapter", "all terms"]},
            "fastest_terms_forward_s": stages[fastest]["all terms"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", nargs="+", default=list(BUILDERS), choices=list(BUILDERS))
    parser.add_argument("--scale", default="quick", choices=list(SCALES))
    add_timing_arguments(parser)
    args = parse_timing_arguments(parser, argv)
    device = torch.device(args.device)
    results = []
    print("| family | student step (s) | student + teacher forward (s) | GID step (s) | overhead (median) "
          "| GID terms alone (s) | terms share | target |")
    print("|---|---|---|---|---|---|---|---|")
    for family in args.families:
        r = bench_family(family, args.scale, device, args.repeats, args.warmup, args.batch_size, args.image_size)
        results.append(r)
        m = r["median_s"]
        verdict = "met" if r["terms_share"] <= TARGET else "NOT met"
        print(f"| {family} | {m['student']:.3f} | {m['student+teacher']:.3f} | {m['gid']:.3f} | {r['overhead']:+.3f} | "
              f"{r['terms_alone_s']:.4f} | {r['terms_share']:.3f} | <= {TARGET} {verdict} |", flush=True)
    print("\nforward time of each stage of the GID terms (ms, median over the repeats):")
    names = [*STAGES, "adapter", "all terms"]
    print("| family | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for r in results:
        print(f"| {r['family']} | " + " | ".join(f"{1000 * r['stages_forward_s'][n]:.2f}" for n in names) + " |")
    write_json(results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
