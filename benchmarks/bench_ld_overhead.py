"""LD's distillation overhead, measured side by side::

    overhead = (distilled step - student step - teacher forward) / student step      (target <= 0.10)

A *step* is forward + backward + optimiser step on one batch; the *teacher forward* runs under
``torch.no_grad()`` in ``eval()`` mode, as inside the distiller. The three are timed in
interleaved rounds on the same batch (so a slow period of a shared machine hits all three), and
the fastest round of each is compared (``--statistic min``, the least-disturbed measurement, as
``timeit`` does; ``median`` is offered too). What remains is the cost of LD itself: the VLR (DIoU of
every anchor with every GT), the KL terms and their backward. Because a difference of three noisy
timings can even come out negative on a shared machine, the LD terms are also timed alone (forward
and backward into the head outputs) as a cross-check.

    python benchmarks/bench_ld_overhead.py                       # shapes configs, 20 rounds
    python benchmarks/bench_ld_overhead.py --device cuda --rounds 50 --image-size 800
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from any directory without installing kdlab
    sys.path.insert(0, str(REPO))

from kdlab.config import load_config  # noqa: E402
from kdlab.data import image_sizes_of  # noqa: E402
from kdlab.distill.base import DistillationTask  # noqa: E402
from kdlab.models.base import DetectionTask  # noqa: E402
from kdlab.distill.ld import LD  # noqa: E402
from kdlab.engine.distributed import resolve_device  # noqa: E402
from kdlab.models import build_detector, weighted_total  # noqa: E402


def synthetic_batch(batch_size: int, image_size: int, num_classes: int, objects: int, seed: int = 0):
    """Random images and ``objects`` random boxes per image (the timing does not depend on the content)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 3, image_size, image_size, generator=g)
    targets = []
    for _ in range(batch_size):
        xy = torch.rand(objects, 2, generator=g) * image_size * 0.7
        wh = 8 + torch.rand(objects, 2, generator=g) * image_size * 0.3
        targets.append({"boxes": torch.cat([xy, (xy + wh).clamp(max=image_size)], dim=1),
                        "labels": torch.randint(num_classes, (objects,), generator=g),
                        "size": torch.tensor([image_size, image_size])})
    return images, targets


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def measure(args: argparse.Namespace) -> dict[str, float]:
    """Median seconds of a student step, a teacher forward and a distilled step, and the overhead."""
    device = resolve_device(args.device)
    student_cfg, teacher_cfg = load_config(args.student_config), load_config(args.teacher_config)
    torch.manual_seed(0)
    student = build_detector(student_cfg.model, args.num_classes, **student_cfg.model_options()).to(device)
    teacher = build_detector(teacher_cfg.model, args.num_classes, **teacher_cfg.model_options()).to(device)
    ld = LD(student, teacher, variant=args.variant)
    task, distiller = DetectionTask(student), DistillationTask(student, teacher, ld)
    optimizer = torch.optim.SGD(student.parameters(), lr=1e-4, momentum=0.9)  # tiny lr: the weights barely move
    images, targets = synthetic_batch(args.batch_size, args.image_size, args.num_classes, args.objects)
    images = images.to(device)
    targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
    sizes = image_sizes_of(targets)

    def step(module) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp and device.type == "cuda"):
            terms = module(images, targets)
        loss = weighted_total(terms, module.weight_dict)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def teacher_forward() -> None:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp and device.type == "cuda"):
            teacher(images, sizes)

    with torch.no_grad():
        teacher_out = teacher(images, sizes)

    runs = {"student step": lambda: step(task), "teacher forward": teacher_forward, "distilled step": lambda: step(distiller),
            "LD terms alone": None}
    task.train()
    distiller.train()
    for _ in range(args.warmup):
        for fn in runs.values():
            if fn is not None:
                fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, fn in runs.items():
            if fn is not None:
                times[name].append(timed(fn, device))
        # the LD terms alone: time only the terms, not the student forward that feeds them
        student_out = student(images, sizes, targets)
        student_out.cls_logits = student_out.cls_logits.detach().requires_grad_(True)
        student_out.box_logits = student_out.box_logits.detach().requires_grad_(True)
        times["LD terms alone"].append(timed(
            lambda: sum(ld(student_out, teacher_out, targets).values()).backward(), device))
    reduce = min if args.statistic == "min" else statistics.median
    result = {name: reduce(values) for name, values in times.items()}
    result["overhead"] = (result["distilled step"] - result["student step"] - result["teacher forward"]) / result["student step"]
    result["terms share"] = result["LD terms alone"] / result["student step"]
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--student-config", type=Path, default=REPO / "configs" / "shapes_gfl_student.yaml")
    parser.add_argument("--teacher-config", type=Path, default=REPO / "configs" / "shapes_gfl_teacher.yaml")
    parser.add_argument("--num-classes", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=None, help="default: the student config's batch_size")
    parser.add_argument("--image-size", type=int, default=None, help="default: the student config's max_size")
    parser.add_argument("--objects", type=int, default=5, help="GT boxes per image")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--variant", default="kdlab", choices=["kdlab", "official"])
    parser.add_argument("--statistic", default="min", choices=["min", "median"], help="how the rounds are summarised")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA, as the engine does")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    student_cfg = load_config(args.student_config)
    args.batch_size = args.batch_size or student_cfg.batch_size
    args.image_size = args.image_size or student_cfg.max_size or student_cfg.min_size
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = measure(args)
    print(f"LD overhead, {args.batch_size} images of {args.image_size}x{args.image_size}, {args.rounds} rounds, "
          f"device {resolve_device(args.device)}, variant {args.variant}")
    for name in ("student step", "teacher forward", "distilled step", "LD terms alone"):
        print(f"  {name:<16} {1000 * result[name]:9.1f} ms ({args.statistic} over {args.rounds} rounds)")
    verdict = "OK" if result["overhead"] <= 0.10 else "ABOVE TARGET"
    print(f"  overhead = (distilled - student - teacher) / student = {result['overhead']:+.3f} (target <= 0.10: {verdict})")
    print(f"  cross-check: LD terms alone (forward + backward) / student step = {result['terms share']:.3f} "
          "(the same quantity measured directly; the difference above is timing noise)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
