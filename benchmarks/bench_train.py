"""Training and evaluation throughput (images/s) of GFL configurations, printed as a table.

For each configuration this builds the real pipeline (dataset -> transforms -> padded batches ->
``DetectionTask`` -> SGD step; and ``eval()`` forward + post-processing) and times ``--iters`` steps
after ``--warmup`` untimed ones. The quick CPU configuration runs on the shapes set (generated into
a temporary folder when ``data/shapes`` is absent); the COCO-resolution one (``coco_gfl_r50_1x``,
800 x 1333, random initialisation since ImageNet weights may be absent) runs on the real COCO images
of ``../shared/data/minicoco`` when present, else on random images of 800 x 1216.

    python benchmarks/bench_train.py                     # both configurations, CPU
    python benchmarks/bench_train.py --configs shapes    # only the quick configuration
    python benchmarks/bench_train.py --device cuda --iters 50   # on a GPU (bf16 autocast as in training)
"""

from __future__ import annotations

import argparse
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from kdlab.config import load_config
from kdlab.data import build_dataset, collate_fn, make_shapes
from kdlab.models.base import DetectionTask
from kdlab.models import build_detector, weighted_total

REPO = Path(__file__).resolve().parents[1]
MINICOCO = REPO.parent / "shared" / "data" / "minicoco"


def shapes_batches(cfg, batch_size: int, count: int):
    root = REPO / "data" / "shapes"
    if not (root / "annotations" / "instances_train.json").is_file():
        root = Path(tempfile.mkdtemp()) / "shapes"
        make_shapes(root, num_train=max(64, batch_size * count), num_val=8)
    dataset = build_dataset(root, "train", train=True, min_size=cfg.min_size, max_size=cfg.max_size)
    return dataset, _batches(dataset, batch_size, count)


def coco_batches(cfg, batch_size: int, count: int):
    if (MINICOCO / "annotations" / "instances_val2017.json").is_file():
        dataset = build_dataset(MINICOCO, "val", train=True, min_size=cfg.min_size, max_size=cfg.max_size)
        return dataset, _batches(dataset, batch_size, count)
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(count):
        images = torch.randn(batch_size, 3, 800, 1216, generator=generator)
        targets = [{"boxes": torch.tensor([[100.0, 120.0, 400.0, 500.0], [600.0, 200.0, 700.0, 260.0]]),
                    "labels": torch.tensor([0, 1]), "size": torch.tensor([800, 1216])} for _ in range(batch_size)]
        batches.append((images, targets))
    return None, batches


def _batches(dataset, batch_size: int, count: int):
    n = len(dataset)
    return [collate_fn([dataset[(i * batch_size + j) % n] for j in range(batch_size)], size_divisor=32) for i in range(count)]


def bench(name: str, cfg, batches, num_classes: int, device: torch.device, warmup: int, iters: int) -> dict:
    torch.manual_seed(0)
    options = {**cfg.model_options(), "backbone_weights": None}
    task = DetectionTask(build_detector(cfg.model, num_classes, **options)).to(device)
    optimizer = torch.optim.SGD(task.trainable_parameters(), lr=1e-4, momentum=0.9)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if device.type == "cuda" and cfg.amp else nullcontext()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def move(targets):
        return [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]

    task.train()
    times = []
    for i in range(warmup + iters):
        images, targets = batches[i % len(batches)]
        sync(); start = time.perf_counter()
        with autocast:
            terms = task(images.to(device), move(targets))
        loss = weighted_total(terms, task.weight_dict)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    detector = task.student.eval()
    eval_times = []
    with torch.no_grad():
        for i in range(warmup + iters):
            images, targets = batches[i % len(batches)]
            sync(); start = time.perf_counter()
            with autocast:
                out = detector(images.to(device), [tuple(int(v) for v in t["size"]) for t in targets])
            detector.postprocess(out)
            sync()
            if i >= warmup:
                eval_times.append(time.perf_counter() - start)
    batch = batches[0][0].shape[0]
    train_s, eval_s = sorted(times)[len(times) // 2], sorted(eval_times)[len(eval_times) // 2]
    result = {"config": name, "input": "x".join(str(s) for s in batches[0][0].shape[-2:]), "batch": batch,
              "train_img_s": batch / train_s, "eval_img_s": batch / eval_s}
    if device.type == "cuda":
        result["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["shapes", "coco"], choices=["shapes", "coco"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = []
    if "shapes" in args.configs:
        cfg = load_config(REPO / "configs" / "shapes_gfl_student.yaml")
        dataset, batches = shapes_batches(cfg, cfg.batch_size, 4)
        rows.append(bench("shapes_gfl_student (quick)", cfg, batches, dataset.num_classes, device, args.warmup, args.iters))
        cfg_t = load_config(REPO / "configs" / "shapes_gfl_teacher.yaml")
        rows.append(bench("shapes_gfl_teacher (quick)", cfg_t, batches, dataset.num_classes, device, args.warmup, args.iters))
    if "coco" in args.configs:
        cfg = load_config(REPO / "configs" / "coco_gfl_r50_1x.yaml")
        dataset, batches = coco_batches(cfg, cfg.batch_size, 2)
        rows.append(bench("coco_gfl_r50_1x (800x1333)", cfg, batches, 80, device, args.warmup, args.iters))
    print(f"device: {device}, torch threads: {torch.get_num_threads()}, median of {args.iters} steps after {args.warmup} warm-up")
    print("| config | input (padded) | batch | train img/s | eval img/s |" + (" peak GiB |" if device.type == "cuda" else ""))
    print("|---|---|---|---|---|" + ("---|" if device.type == "cuda" else ""))
    for r in rows:
        extra = f" {r['peak_mem_gib']:.1f} |" if "peak_mem_gib" in r else ""
        print(f"| {r['config']} | {r['input']} | {r['batch']} | {r['train_img_s']:.2f} | {r['eval_img_s']:.2f} |{extra}")


if __name__ == "__main__":
    main()
