"""Stand-in checkpoints for a development run of notebook 05 (KD-DETR) before the real ones exist.

The notebook reads three exported detectors from ``$KDLAB_NB05_CHECKPOINTS`` (default
``../data/checkpoints`` from ``notebooks/``): the DAB-DETR teacher, the student alone and the KD-DETR
student. This script builds each from its shapes config, trains it for a few iterations through the
engine (so the weights are not all at their initialisation) and stores it as the project stores its
teachers (fp16 weights, ``kdlab.demo.store_teacher``). The numbers the notebook then shows mean nothing;
the run only checks that every cell executes::

    OMP_NUM_THREADS=1 .venv/bin/python tools/nb05_standins.py --out /tmp/nb05ck
    python tools/gen_nb05.py --out /tmp/nb05/notebooks/05_kd_detr.ipynb
    cd /tmp/nb05/notebooks && KDLAB_NB05_CHECKPOINTS=/tmp/nb05ck python .../notebooks/execute.py 05_kd_detr.ipynb

Run it from the repository root (the configs' ``backbone_weights`` paths are relative to it).
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

from kdlab.config import load_config
from kdlab.demo import store_teacher
from kdlab.engine import train

REPO = Path(__file__).resolve().parents[1]
# checkpoint name -> config that trains it
CHECKPOINTS = {
    "shapes_dab_detr_teacher.pt": "configs/shapes_dab_detr_teacher.yaml",
    "shapes_dab_detr_student.pt": "configs/shapes_dab_detr_student.yaml",
    "shapes_kd_detr_student.pt": "configs/shapes_kd_detr_student.yaml",
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/nb05ck"))
    parser.add_argument("--teacher-iters", type=int, default=60)
    parser.add_argument("--student-iters", type=int, default=20)
    parser.add_argument("--data-root", default=str(REPO / "data" / "shapes"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, config in CHECKPOINTS.items():
        iters = args.teacher_iters if "teacher" in name else args.student_iters
        overrides = [f"data_root={args.data_root}", f"output_dir={args.out / 'runs' / Path(name).stem}",
                     f"max_iters={iters}", "eval_every=0", "log_every=5", "num_workers=0", "warmup_iters=5",
                     f"backbone_weights={REPO / load_config(REPO / config).backbone_weights}"]
        if "kd_detr" in name:
            overrides.append(f"teacher_checkpoint={args.out / 'shapes_dab_detr_teacher.pt'}")
        cfg = load_config(REPO / config, overrides=overrides)
        print(f"{name}: {config}, {iters} iterations", flush=True)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="coco_metrics: no detections")
            metrics = train(cfg, overwrite=True, progress=False)
        print(f"  AP {metrics['AP']}", flush=True)
        store_teacher(Path(cfg.output_dir) / "student.pt", args.out / name)


if __name__ == "__main__":
    main()
