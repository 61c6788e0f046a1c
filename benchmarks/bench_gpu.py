"""GPU cost of every method's COCO recipe: student step vs distilled step at 800 x 1333, bf16 autocast.

For each recipe (``configs/coco_*.yaml`` with a ``distill``) this builds, with random weights (nothing is
downloaded), the student alone (``DetectionTask``) and the recipe's distillation (student + frozen teacher
+ distiller, ``kdlab.distill.build_distillation``), and measures on the same batches:

- **images/s** of a student step and of a distilled step (forward under bf16 autocast, backward, SGD
  step; median over ``--iters`` timed steps after ``--warmup`` untimed ones);
- **peak memory** of each (``torch.cuda.max_memory_allocated``, reset before each);
- **teacher share**: the teacher's forward alone (``no_grad``, autocast) over the distilled step;
- **MFU**: the FLOPs of one step (``torch.utils.flop_counter.FlopCounterMode`` over forward + backward,
  convolutions and matrix products; RoIAlign, NMS and element-wise work are not counted) divided by the
  step time and by the device's dense bf16 peak (:data:`BF16_PEAK_TFLOPS`, matched on the device name;
  ``--peak-tflops`` for another device).

The batches are minicoco's images (``../shared/data/minicoco``) at the recipe's size when present, else
random 800 x 1216 images with 7 random boxes each (COCO's mean is about 7 objects an image); the timings do
not depend on the pixel values. ``batch_size`` is the recipe's (2 images per GPU).

    python benchmarks/bench_gpu.py                                  # the default recipes, on the GPU
    python benchmarks/bench_gpu.py --configs all --iters 30 --out benchmarks/results/bench_gpu.json
    python benchmarks/bench_gpu.py --device cpu --size 128 --iters 1 --warmup 0   # the CPU check (no MFU)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from kdlab.config import TrainConfig, load_config  # noqa: E402
from kdlab.data import build_dataset, collate_fn  # noqa: E402
from kdlab.distill import build_distillation  # noqa: E402
from kdlab.models import build_detector  # noqa: E402
from kdlab.models.base import DetectionTask, weighted_total  # noqa: E402
from kdlab.models.weights import COCO91_CLASS_NAMES, coco91_columns  # noqa: E402

MINICOCO = REPO.parent / "shared" / "data" / "minicoco"
DEFAULT_CONFIGS = [
    "coco_ld_gfl_r101_r50_1x", "coco_ld_released_gfl_r101_r50_1x", "coco_gid_retinanet_r101_r50_2x",
    "coco_gid_fcos_r101_r50_2x", "coco_gid_faster_rcnn_r101_r50_2x", "coco_drkd_faster_rcnn_r50_2x",
    "coco_drkd_retinanet_r50_2x",
]
# dense bf16 tensor-core peaks (no sparsity), TFLOP/s, from the vendors' data sheets; the first name contained
# in torch.cuda.get_device_name() wins, so the longer names come first ("H100 PCIe" before "H100", "A100" before "A10")
BF16_PEAK_TFLOPS = {
    "H200": 989.0,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.0,
    "GH200": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10": 125.0,
}
COCO_CATEGORY_IDS = [k for k, name in enumerate(COCO91_CLASS_NAMES) if name not in ("__background__", "N/A")]


def bf16_peak_tflops(device: torch.device, override: float | None = None) -> float | None:
    """The device's dense bf16 peak in TFLOP/s (``None`` on CPU or for a device not in the table)."""
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in BF16_PEAK_TFLOPS.items() if key in name), None)


def random_teacher(cfg: TrainConfig, num_classes: int) -> torch.nn.Module:
    """The recipe's teacher architecture with random weights (``teacher_model`` or ``teacher_config``)."""
    if cfg.teacher_model is not None:
        teacher = build_detector(cfg.teacher_model, None)  # torchvision's 91 slots, no weights
        return teacher.restrict_classes_(coco91_columns(COCO_CATEGORY_IDS[:num_classes])).eval()
    teacher_cfg = load_config(REPO / cfg.teacher_config)
    options = {k: v for k, v in teacher_cfg.model_options().items() if k not in ("backbone_weights", "weights")}
    return build_detector(teacher_cfg.model, num_classes, **options).eval()


def make_batches(cfg: TrainConfig, count: int, size: int | None) -> list:
    """``count`` training batches of ``cfg.batch_size`` images (minicoco when present, else random)."""
    min_size, max_size = (size, size) if size else (cfg.min_size, cfg.max_size)
    if (MINICOCO / "annotations" / "instances_val2017.json").is_file():
        dataset = build_dataset(MINICOCO, "val", train=True, min_size=min_size, max_size=max_size)
        n = len(dataset)
        return [collate_fn([dataset[(i * cfg.batch_size + j) % n] for j in range(cfg.batch_size)], cfg.size_divisor)
                for i in range(count)]
    generator = torch.Generator().manual_seed(0)
    height, width = min_size, min(max_size, round(min_size * 1.52))  # COCO's typical 640 x 427 aspect
    batches = []
    for _ in range(count):
        samples = []
        for _ in range(cfg.batch_size):
            xy = torch.rand(7, 2, generator=generator) * torch.tensor([width * 0.7, height * 0.7])
            wh = (0.05 + 0.25 * torch.rand(7, 2, generator=generator)) * torch.tensor([width, height])
            boxes = torch.cat([xy, xy + wh], dim=1)
            target = {"boxes": boxes, "labels": torch.randint(0, 80, (7,), generator=generator),
                      "image_id": 0, "orig_size": torch.tensor([height, width]), "size": torch.tensor([height, width])}
            samples.append((torch.randn(3, height, width, generator=generator), target))
        batches.append(collate_fn(samples, cfg.size_divisor))
    return batches


def to_device(batch, device: torch.device):
    images, targets = batch
    return images.to(device), [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device):
    # bf16 autocast as the training loop does on CUDA; on CPU the step runs in float32 (the loop's choice too)
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def step_flops(task: torch.nn.Module, batch, device: torch.device) -> float:
    """FLOPs of one training step's forward + backward (the counter's convolutions and matmuls)."""
    images, targets = batch
    counter = FlopCounterMode(display=False)
    with counter:  # one block: entering the counter again would reset it
        with autocast(device):
            loss = weighted_total(task(images, targets), task.weight_dict)
        loss.backward()
    task.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def forward_flops(model: torch.nn.Module, batch, device: torch.device) -> float:
    images, targets = batch
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad(), autocast(device):
        model(images, [tuple(t["size"].tolist()) for t in targets])
    return float(counter.get_total_flops())


def time_steps(task: torch.nn.Module, batches: list, device: torch.device, warmup: int, iters: int) -> tuple[float, float]:
    """Median seconds of a training step and the peak memory (bytes; 0 on CPU)."""
    optimizer = torch.optim.SGD(task.trainable_parameters(), lr=1e-5, momentum=0.9)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(warmup + iters):
        images, targets = batches[i % len(batches)]
        sync(device)
        start = time.perf_counter()
        with autocast(device):
            loss = weighted_total(task(images, targets), task.weight_dict)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return statistics.median(times), peak


def time_teacher(teacher: torch.nn.Module, batches: list, device: torch.device, warmup: int, iters: int) -> float:
    times = []
    for i in range(warmup + iters):
        images, targets = batches[i % len(batches)]
        sizes = [tuple(t["size"].tolist()) for t in targets]
        sync(device)
        start = time.perf_counter()
        with torch.no_grad(), autocast(device):
            teacher(images, sizes)
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_recipe(name: str, device: torch.device, size: int | None, warmup: int, iters: int, peak: float | None) -> dict:
    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    if cfg.distill is None:
        raise ValueError(f"{name} trains no distillation (no 'distill'): nothing to compare")
    batches = [to_device(b, device) for b in make_batches(cfg, max(2, min(warmup + iters, 4)), size)]
    num_images = cfg.batch_size
    options = {**cfg.model_options(), "backbone_weights": None}

    torch.manual_seed(0)
    student_task = DetectionTask(build_detector(cfg.model, 80, **options)).to(device).train()
    student_flops = step_flops(student_task, batches[0], device)
    student_time, student_memory = time_steps(student_task, batches, device, warmup, iters)
    del student_task

    torch.manual_seed(0)
    teacher = random_teacher(cfg, 80)
    distill_task = build_distillation(cfg.distill, build_detector(cfg.model, 80, **options), teacher,
                                      cfg.distill_options).to(device).train()
    distill_flops = step_flops(distill_task, batches[0], device)
    teacher_flops = forward_flops(distill_task.teacher, batches[0], device)
    distill_time, distill_memory = time_steps(distill_task, batches, device, warmup, iters)
    teacher_time = time_teacher(distill_task.teacher, batches, device, warmup, iters)
    del distill_task, teacher
    if device.type == "cuda":
        torch.cuda.empty_cache()

    def mfu(flops: float, seconds: float) -> float | None:
        return None if peak is None else flops / seconds / (peak * 1e12)

    height, width = batches[0][0].shape[-2:]
    return {
        "config": name, "distill": cfg.distill, "batch": num_images, "input": f"{height}x{width}",
        "student_img_s": num_images / student_time, "distilled_img_s": num_images / distill_time,
        "slowdown": distill_time / student_time,
        "student_peak_gib": student_memory / 2**30, "distilled_peak_gib": distill_memory / 2**30,
        "teacher_share": teacher_time / distill_time,
        "student_tflop_per_step": student_flops / 1e12, "distilled_tflop_per_step": distill_flops / 1e12,
        "teacher_tflop_per_forward": teacher_flops / 1e12,
        "student_mfu": mfu(student_flops, student_time), "distilled_mfu": mfu(distill_flops, distill_time),
    }


def format_table(rows: list[dict]) -> str:
    def pct(value):
        return "n/a" if value is None else f"{100 * value:.1f} %"

    def memory(gib):  # 0 on the CPU, where it is not measured
        return f"{gib:.1f}" if gib else "n/a"

    lines = ["| recipe | input | student img/s | distilled img/s | slowdown | peak GiB (student / distilled) | "
             "teacher share | TFLOP/step (student / distilled) | MFU (student / distilled) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['batch']} x {r['input']} | {r['student_img_s']:.2f} | {r['distilled_img_s']:.2f} | "
                     f"{r['slowdown']:.2f}x | {memory(r['student_peak_gib'])} / {memory(r['distilled_peak_gib'])} | "
                     f"{pct(r['teacher_share'])} | {r['student_tflop_per_step']:.3g} / {r['distilled_tflop_per_step']:.3g} | "
                     f"{pct(r['student_mfu'])} / {pct(r['distilled_mfu'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS,
                        help="recipe names (configs/<name>.yaml) or 'all' (every coco_* recipe with a distill)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, default=None,
                        help="square input side instead of the recipe's 800 x 1333 (the CPU check uses 128)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak, if not in the table")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    names = args.configs
    if names == ["all"]:
        names = [p.stem for p in sorted((REPO / "configs").glob("coco_*.yaml")) if load_config(p).distill is not None]
    peak = bf16_peak_tflops(device, args.peak_tflops)
    if device.type != "cuda":
        print(f"NOTE: no GPU in use (device {device}): these are CPU figures in float32"
              f"{f' at {args.size} x {args.size}' if args.size else ''}, not the GPU benchmark; MFU is not computed "
              f"(no bf16 peak for a CPU). Run on a CUDA device for the real figures.")
    else:
        name = torch.cuda.get_device_name(device)
        print(f"device: {name}, dense bf16 peak "
              f"{f'{peak:g} TFLOP/s' if peak else 'unknown (pass --peak-tflops for MFU)'}; bf16 autocast")
    rows = []
    for config in names:
        rows.append(bench_recipe(config, device, args.size, args.warmup, args.iters, peak))
        print(f"  {config}: {rows[-1]['student_img_s']:.2f} -> {rows[-1]['distilled_img_s']:.2f} img/s", flush=True)
    print(format_table(rows))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        args.out.write_text(json.dumps({"device": device_name, "bf16_peak_tflops": peak, "warmup": args.warmup,
                                        "iters": args.iters, "torch": torch.__version__, "rows": rows}, indent=2))
        print(f"figures written to {args.out}")
    return rows


if __name__ == "__main__":
    main()
