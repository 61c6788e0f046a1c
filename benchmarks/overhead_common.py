"""What the ``bench_*_overhead.py`` scripts share: a synthetic batch, a synchronised timer, outputs cut
from their networks' graphs, and the rotating step timer.

Every overhead benchmark times, on one batch and per repeat, the student's training step alone, the
student step plus the teacher's forward pass under ``no_grad`` (what any teacher-based distillation pays
first), and the method's distilled step, in rotating order so that machine load hits all alike; the
method's overhead beyond the teacher forward is ``(distilled - (student+teacher)) / student``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

NUM_CLASSES = 8


def make_batch(batch: int, size: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, list[dict]]:
    """A normalised-looking batch and 3-6 random boxes per image (kdlab's batch format)."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, size, size, generator=generator)
    targets = []
    for _ in range(batch):
        count = int(torch.randint(3, 7, (1,), generator=generator))
        xy = torch.rand(count, 2, generator=generator) * size * 0.6
        wh = size * 0.05 + torch.rand(count, 2, generator=generator) * size * 0.35
        targets.append({"boxes": torch.cat([xy, xy + wh], dim=1).to(device),
                        "labels": torch.randint(0, NUM_CLASSES, (count,), generator=generator).to(device),
                        "size": torch.tensor([size, size])})
    return images.to(device), targets


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds ``fn()`` takes (CUDA synchronised before and after)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def cut_from_graph(output, names: tuple[str, ...] = ("cls_logits", "box_regression", "rpn_objectness", "rpn_deltas")):
    """A copy of a detector output whose FPN maps and the named head outputs are fresh leaves that need
    grad: a backward from a method's terms then stops there (the student's own backward is not the
    method's cost)."""
    changes = {"features": [f.detach().requires_grad_(True) for f in output.features]}
    for name in names:
        value = getattr(output, name, None)
        if isinstance(value, torch.Tensor):
            changes[name] = value.detach().requires_grad_(True)
    return dataclasses.replace(output, **changes)


def rotating_times(steps: dict[str, Callable[[], object]], device: torch.device, repeats: int, warmup: int,
                   modules: list[nn.Module]) -> dict[str, list[float]]:
    """Seconds of each step per repeat (after ``warmup`` untimed repeats), the steps in rotating order;
    ``modules``' gradients are cleared after every step and the seed is set per repeat (samplers)."""
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(warmup + repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            torch.manual_seed(repeat)
            elapsed = timed(steps[name], device)
            for module in modules:
                module.zero_grad(set_to_none=True)
            if repeat >= warmup:
                times[name].append(elapsed)
    return times


def overhead_summary(times: dict[str, list[float]], distilled: str) -> dict:
    """Medians of each step and the method's overhead beyond the teacher forward, per repeat and median."""
    overheads = [(d - st) / s for s, st, d in zip(times["student"], times["student+teacher"], times[distilled])]
    return {"median_s": {name: statistics.median(v) for name, v in times.items()},
            "overhead": statistics.median(overheads), "overheads": overheads,
            "student_min_s": min(times["student"]),
            "teacher_share": statistics.median(
                (st - s) / s for s, st in zip(times["student"], times["student+teacher"]))}


def time_distilled_steps(task: nn.Module, teacher: nn.Module, distilled_task: nn.Module, name: str, images: torch.Tensor,
                         targets: list[dict], device: torch.device, repeats: int, warmup: int,
                         modules: list[nn.Module]) -> dict:
    """The three training steps timed side by side (:func:`rotating_times`: ``student``, ``student+teacher``
    and the distilled step ``name``; forward, loss, backward) and :func:`overhead_summary` of them. The
    teacher stops after its FPN where the distilled task's methods read nothing else (DRKD), after its dense
    stage where they read no more (GID: a two-stage teacher skips its RoI head)."""
    from kdlab.models.base import weighted_total

    def student_step():
        weighted_total(task(images, targets), task.weight_dict).backward()

    def student_teacher_step():
        terms = task(images, targets)
        distilled_task.teacher_forward(images, targets)  # as far as the method runs it, without gradient
        weighted_total(terms, task.weight_dict).backward()

    def distilled_step():
        weighted_total(distilled_task(images, targets), distilled_task.weight_dict).backward()

    steps = {"student": student_step, "student+teacher": student_teacher_step, name: distilled_step}
    return overhead_summary(rotating_times(steps, device, repeats, warmup, modules), name)


def add_timing_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every overhead benchmark takes after its own: device, repeats, sizes, threads, JSON."""
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=None, help="images per step (default: the scale's)")
    parser.add_argument("--image-size", type=int, default=None, help="square image side (default: the scale's)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")


def parse_timing_arguments(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse, and set the torch thread count when ``--threads`` is given."""
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return args


def write_json(results: list[dict], path: Path | None) -> None:
    """``--json``: the results as a JSON list (nothing without a path)."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2))
