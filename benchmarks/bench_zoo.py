"""Does exposing a detector's internals cost anything? kdlab's zoo vs torchvision, one training step.

For RetinaNet, FCOS and Faster R-CNN (torchvision's ResNet-50 FPN configurations, random
weights, 91 classes) this times one training step -- raw images through torchvision's transform,
forward, loss, backward, SGD step -- of kdlab's model and of torchvision's own model loaded with
the same parameters, on the same images and targets. Steps alternate between the two models
(kdlab first on even repeats, torchvision first on odd ones) so that machine load hits both
alike; the figure is the median over repeats of ``kdlab time / torchvision time`` of each pair.
Target: <= 1.05.

    python benchmarks/bench_zoo.py                      # 2 images of 256 x 256, 9 repeats, 1 thread
    python benchmarks/bench_zoo.py --image-size 512 --repeats 11 --threads 2
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torchvision

from kdlab.models import DETECTORS as KDLAB_DETECTORS
from kdlab.models.base import weighted_total
from kdlab.models.common import torchvision_preprocess

DETECTORS = {  # short name -> torchvision's (and the zoo's) name
    "retinanet": "retinanet_resnet50_fpn",
    "fcos": "fcos_resnet50_fpn",
    "faster_rcnn": "fasterrcnn_resnet50_fpn",
}


def make_inputs(batch: int, size: int, seed: int = 0):
    """Raw ``0..1`` images and targets with 3-6 boxes each (labels 1..90: valid for every model)."""
    generator = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for _ in range(batch):
        images.append(torch.rand(3, size, size, generator=generator))
        count = int(torch.randint(3, 7, (1,), generator=generator))
        xy = torch.rand(count, 2, generator=generator) * size * 0.6
        wh = 16 + torch.rand(count, 2, generator=generator) * size * 0.35
        targets.append({"boxes": torch.cat([xy, xy + wh], dim=1),
                        "labels": torch.randint(1, 91, (count,), generator=generator)})
    return images, targets


def kdlab_step(model, criterion, optimizer, images, targets, seed):
    torch.manual_seed(seed)
    batch, sizes, batch_targets = torchvision_preprocess(model, images, targets)
    terms = criterion(model(batch, sizes, batch_targets), batch_targets)
    loss = weighted_total(terms, criterion.weight_dict)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def torchvision_step(model, optimizer, images, targets, seed):
    torch.manual_seed(seed)
    loss = sum(model(images, targets).values())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def bench(name: str, images, targets, repeats: int, warmup: int) -> dict:
    torch.manual_seed(0)
    size = images[0].shape[-1]
    options = dict(min_size=size, max_size=size)
    kd_model = KDLAB_DETECTORS[DETECTORS[name]](num_classes=91, **options).train()
    tv_model = torchvision.models.get_model(DETECTORS[name], weights=None, weights_backbone=None, num_classes=91,
                                            **options).train()
    tv_model.load_state_dict(kd_model.state_dict())
    for model in (kd_model, tv_model):
        model.transform.eval()  # the same fixed-size resize in both (no random size draw)
    criterion = kd_model.build_criterion()
    # lr 0: the update is computed (its cost is timed) but the two models stay identical
    kd_opt = torch.optim.SGD(kd_model.parameters(), lr=0.0, momentum=0.9)
    tv_opt = torch.optim.SGD(tv_model.parameters(), lr=0.0, momentum=0.9)
    # zoo models built under torchvision's names keep torchvision's labels: the same targets serve both

    def run_kd(seed):
        start = time.perf_counter()
        loss = kdlab_step(kd_model, criterion, kd_opt, images, copy.deepcopy(targets), seed)
        return time.perf_counter() - start, loss

    def run_tv(seed):
        start = time.perf_counter()
        loss = torchvision_step(tv_model, tv_opt, images, copy.deepcopy(targets), seed)
        return time.perf_counter() - start, loss

    for i in range(warmup):
        run_kd(i)
        run_tv(i)
    ratios, kd_times, tv_times, loss_gaps = [], [], [], []
    for i in range(repeats):
        seed = 100 + i
        if i % 2 == 0:
            (kd_time, kd_loss), (tv_time, tv_loss) = run_kd(seed), run_tv(seed)
        else:
            (tv_time, tv_loss), (kd_time, kd_loss) = run_tv(seed), run_kd(seed)
        ratios.append(kd_time / tv_time)
        kd_times.append(kd_time)
        tv_times.append(tv_time)
        loss_gaps.append(abs(kd_loss - tv_loss) / max(abs(tv_loss), 1e-12))
    return {"ratio": statistics.median(ratios), "kdlab_s": statistics.median(kd_times),
            "torchvision_s": statistics.median(tv_times), "max_rel_loss_gap": max(loss_gaps)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--detectors", nargs="+", default=list(DETECTORS), choices=list(DETECTORS))
    parser.add_argument("--batch", type=int, default=2, help="images per step")
    parser.add_argument("--image-size", type=int, default=256, help="square image side (a multiple of 32)")
    parser.add_argument("--repeats", type=int, default=9, help="timed step pairs per detector")
    parser.add_argument("--warmup", type=int, default=1, help="untimed step pairs per detector")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: steadiest timings on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    images, targets = make_inputs(args.batch, args.image_size)
    print(f"one training step, {args.batch} x {args.image_size}^2 images, ResNet-50 FPN, 91 classes, "
          f"{torch.get_num_threads()} threads, median of {args.repeats} interleaved pairs")
    print(f"{'detector':<12} {'kdlab s':>9} {'torchvision s':>14} {'ratio':>7}  {'max rel. loss gap':>17}")
    for name in args.detectors:
        result = bench(name, images, targets, args.repeats, args.warmup)
        flag = "" if result["ratio"] <= 1.05 else "  (> 1.05)"
        print(f"{name:<12} {result['kdlab_s']:9.3f} {result['torchvision_s']:14.3f} {result['ratio']:7.3f}  "
              f"{result['max_rel_loss_gap']:17.1e}{flag}")


if __name__ == "__main__":
    main()
