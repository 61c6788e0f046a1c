"""Which RoIAlign to use on CPU: kdlab's separable one or torchvision's, by feature-map size.

    python benchmarks/bench_roi_align.py                   # 2 threads, C = 32 and 256, maps 8² ... 200²
    python benchmarks/bench_roi_align.py --channels 256 --sides 16 48 100 --threads 1

For each square map of side ``s`` (``[B, C, s, s]``) and ``K`` boxes per image spread over it, both
implementations pool ``S x S`` features (``S = 10``, sampling ratio 2, aligned, as GID) and run the
backward of a weighted sum; the two are timed interleaved, ``--rounds`` times each, and the minimum
is kept. The separable one (:mod:`kdlab.utils.roi_align`) costs ``O(K C S (H + S) W)`` in dense
matrix products; torchvision's ``O(K C S² r²)`` with a serial CPU backward. So it wins on small maps
and loses on large ones: the printed crossover is what ``kdlab.distill.common.SEPARABLE_MAX_CELLS``
(the ``impl="auto"`` rule) is set from. On GPU ``"auto"`` always takes torchvision's kernel.
"""

from __future__ import annotations

import argparse
import time

import torch
from torchvision.ops import roi_align

from kdlab.utils.roi_align import roi_align_per_image


def boxes_for(side: int, stride: int, per_image: int, batch: int, generator: torch.Generator) -> list[torch.Tensor]:
    """``per_image`` boxes per image, 2 to 12 cells wide (GIs of the FPN level they are pooled on)."""
    size = side * stride
    boxes = []
    for _ in range(batch):
        wh = (2 + torch.rand(per_image, 2, generator=generator) * 10) * stride
        xy = torch.rand(per_image, 2, generator=generator) * (size - wh)
        boxes.append(torch.cat([xy, xy + wh], dim=1))
    return boxes


def time_once(fn, feature: torch.Tensor, upstream: torch.Tensor) -> float:
    feature.grad = None
    start = time.perf_counter()
    pooled = fn(feature)
    (pooled * upstream).sum().backward()
    return time.perf_counter() - start


def measure(side: int, channels: int, args: argparse.Namespace) -> tuple[float, float]:
    generator = torch.Generator().manual_seed(side * 1000 + channels)
    stride = 8
    feature = torch.randn(args.batch, channels, side, side, generator=generator, requires_grad=True)
    boxes = boxes_for(side, stride, args.boxes, args.batch, generator)
    upstream = torch.randn(args.batch * args.boxes, channels, 10, 10, generator=generator)
    impls = {
        "separable": lambda f: roi_align_per_image(f, boxes, 1 / stride, 10, 2),
        "torchvision": lambda f: roi_align(f, boxes, 10, 1 / stride, 2, aligned=True),
    }
    best = {name: float("inf") for name in impls}
    for _ in range(args.rounds):
        for name, fn in impls.items():  # interleaved: both see the same machine load
            best[name] = min(best[name], time_once(fn, feature, upstream))
    return best["separable"], best["torchvision"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, nargs="+", default=[32, 256])
    parser.add_argument("--sides", type=int, nargs="+", default=[8, 16, 24, 32, 48, 64, 100, 150, 200])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--boxes", type=int, default=10, help="boxes per image (GID: 10 GIs)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"RoIAlign forward + backward, {args.batch} images x {args.boxes} boxes, S = 10, ratio 2, "
          f"{args.threads} thread(s), min of {args.rounds} interleaved rounds")
    print(f"{'C':>5} {'map':>9} {'cells':>7} {'separable ms':>13} {'torchvision ms':>15} {'tv / sep':>9}")
    for channels in args.channels:
        faster = []
        for side in args.sides:
            separable, torchvision = measure(side, channels, args)
            ratio = torchvision / separable
            if ratio > 1:
                faster.append(side)
            print(f"{channels:>5} {f'{side}x{side}':>9} {side * side:>7} {1e3 * separable:>13.2f} {1e3 * torchvision:>15.2f} "
                  f"{ratio:>9.2f}")
        print(f"C = {channels}: separable faster on maps of side {faster or 'none'}")


if __name__ == "__main__":
    main()
