"""Why DRKD helps the RetinaNet student and not the Faster R-CNN one: each DRKD term's pull on the student.

DRKD's experiment (``experiments/results/drkd_shapes.md``) compares each student alone with DRKD. This
script measures, on both quick DRKD configurations (``configs/shapes_drkd_{family}_student.yaml``, their
own schedule), what each *weighted* DRKD term does to the student's gradient during the first
iterations of a real distilled run (the measurement of ``experiments/gid_terms.py``): every ``--every``
iterations, before the ordinary step, the gradient of each term separately with respect to the student's
parameters, and

- its size relative to the detection loss's gradient on the backbone + FPN (where DRKD acts: its graph
  units and RoIAligned instance features read the FPN maps) and on the whole student;
- its cosine with the detection loss's gradient (> 0: the term pushes the features the way detection
  wants them; ~0: somewhere detection does not care about; < 0: against it).

The graph units and relation modules are DRKD's own trainable parameters, not the student's: only the
student's gradients are measured. The means after the lr warm-up are the reading.

    python experiments/drkd_terms.py                     # both families, 300 iterations, every 25
    python experiments/drkd_terms.py --families faster_rcnn --iters 60 --every 20

Outputs: ``--out``/``results.{json,md}`` (default ``outputs/drkd_terms``); ``--publish`` also writes
``experiments/results/drkd_terms.{json,md}`` (notebook 04 reads them).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from any directory without installing kdlab
    sys.path.insert(0, str(REPO))
if str(REPO / "experiments") not in sys.path:
    sys.path.insert(0, str(REPO / "experiments"))

from gid_terms import RELATIVE, markdown, summary, train_and_measure  # noqa: E402

from kdlab.config import load_config  # noqa: E402
from kdlab.engine.experiment import add_output_arguments, write_results  # noqa: E402

FAMILIES = ("retinanet", "faster_rcnn")
COSINE = "cos detection (backbone+FPN)"


def config_path(family: str) -> Path:
    return REPO / "configs" / f"shapes_drkd_{family}_student.yaml"


def reading(parts: dict[str, dict]) -> str:
    """One line per family: the DRKD terms' summed pull relative to detection and their cosines."""
    lines = ["### reading (means after the warm-up)", ""]
    for family, part in parts.items():
        terms = {k: v for k, v in part["mean_after_warmup"].items() if k != "detection"}
        described = ", ".join(f"{name} {stats[RELATIVE]:.2f}x detection's gradient, cosine {stats[COSINE]:+.2f}"
                              for name, stats in terms.items())
        lines.append(f"- {family}: {described}.")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--every", type=int, default=25)
    add_output_arguments(parser, "drkd_terms", REPO)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    parts, sections = {}, []
    for family in args.families:
        cfg = load_config(config_path(family))
        cfg = dataclasses.replace(cfg, device=args.device, num_workers=0,
                                  data_root=str(args.data_root or REPO / cfg.data_root),
                                  teacher_checkpoint=str(REPO / cfg.teacher_checkpoint))
        print(f"[{family}] {args.iters} iterations of {config_path(family).name}", flush=True)
        records = train_and_measure(cfg, args.iters, args.every)
        parts[family] = {
            "config": str(config_path(family).relative_to(REPO)), "iterations": args.iters, "every": args.every,
            "warmup_iters": cfg.warmup_iters, "grad_clip": cfg.grad_clip,
            "weights": {k: v for k, v in cfg.distill_options.items() if k.endswith("weight")},
            "mean": summary(records), "mean_after_warmup": summary(records, cfg.warmup_iters), "records": records}
        sections.append(f"### {family}\n\n" + markdown(parts[family]))
    sections.append(reading(parts))
    write_results({"families": parts}, sections, "DRKD's terms against the detection loss (shapes, quick DRKD configs)",
                  args.out, "drkd_terms", REPO, args.publish)
    return 0


if __name__ == "__main__":
    sys.exit(main())
