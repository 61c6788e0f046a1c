"""The main job (``kdlab demo`` / ``make demo``): shapes data -> teacher -> student alone vs distilled.

1. generate the shapes set if ``data_root`` has none (``kdlab data shapes``);
2. the teacher: the project's checkpoint ``data/checkpoints/shapes_gfl_teacher.pt`` if present, else
   trained with ``configs/shapes_gfl_teacher.yaml`` and stored there (the documented teacher recipe);
3. the student alone with ``configs/shapes_gfl_student.yaml``;
4. the student distilled with each available method (LD when ``kdlab.distill.ld`` is present);
5. a metrics table (printed, and written as ``results.md`` / ``results.json``) and a figure of
   detections side by side (``detections.png``) in ``out_dir``.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import torch

from kdlab.config import TrainConfig, load_config

REPO_ROOT = Path(__file__).resolve().parents[1]
TEACHER_CHECKPOINT = REPO_ROOT / "data" / "checkpoints" / "shapes_gfl_teacher.pt"

# method name -> (config overrides for the student's config); run only when the module exists
DISTILLED_RUNS = {
    "LD (Main KD + Main LD + VLR LD)": ("kdlab.distill.ld", ["distill=ld"]),
}


def config_path(name: str) -> Path:
    path = REPO_ROOT / "configs" / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: `kdlab demo` runs from a checkout of the kdlab repository")
    return path


def store_teacher(student_pt: Path, destination: Path = TEACHER_CHECKPOINT) -> None:
    """Copy an exported ``student.pt`` to ``destination`` with fp16 weights (half the size in git)."""
    state = torch.load(student_pt, map_location="cpu", weights_only=True)
    state["state_dict"] = {k: v.half() if v.is_floating_point() else v for k, v in state["state_dict"].items()}
    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = destination.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(destination)


def train_teacher(data_root: str, out_dir: Path, progress: bool) -> Path:
    """The documented teacher recipe: ``kdlab train configs/shapes_gfl_teacher.yaml``, stored in data/."""
    from kdlab.engine import train

    cfg = load_config(config_path("shapes_gfl_teacher.yaml"), overrides=[f"data_root={data_root}",
                                                                          f"output_dir={out_dir / 'teacher'}"])
    shutil.rmtree(cfg.output_dir, ignore_errors=True)
    train(cfg, progress=progress)
    store_teacher(Path(cfg.output_dir) / "student.pt")
    return TEACHER_CHECKPOINT


def run_demo(out_dir: str | Path = "outputs/demo", data_root: str = "data/shapes", *, overrides: list[str] = (),
             progress: bool = True, distill: bool = True) -> dict[str, dict[str, float]]:
    """Run the main job and return ``{row name: COCO metrics}``."""
    from kdlab.data import build_dataset, collate_fn, make_shapes
    from kdlab.engine import evaluate, load_detector, predict, train
    from kdlab.eval import format_metrics_table

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not (Path(data_root) / "annotations" / "instances_val.json").is_file():
        print(f"generating the shapes dataset in {data_root}")
        make_shapes(data_root)

    teacher_pt = TEACHER_CHECKPOINT if TEACHER_CHECKPOINT.is_file() else train_teacher(data_root, out_dir, progress)
    student_cfg_file = config_path("shapes_gfl_student.yaml")
    base = [f"data_root={data_root}", *overrides]
    cfg: TrainConfig = load_config(student_cfg_file, overrides=base)
    val_set = build_dataset(data_root, cfg.val_split, train=False, min_size=cfg.min_size, max_size=cfg.max_size)
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=cfg.batch_size, collate_fn=collate_fn)

    rows: dict[str, dict[str, float]] = {}
    teacher = load_detector(teacher_pt)
    rows["teacher (GFL R-34 w32)"] = evaluate(teacher, val_loader, "cpu")
    checkpoints = {"teacher (GFL R-34 w32)": teacher_pt}

    runs = {"student alone (GFL R-18 w16)": []}
    if distill:
        for name, (module, run_overrides) in DISTILLED_RUNS.items():
            if importlib.util.find_spec(module) is not None:
                runs[f"student + {name}"] = [*run_overrides, f"teacher_checkpoint={teacher_pt}"]
    for name, run_overrides in runs.items():
        run_dir = out_dir / name.split(" (")[0].replace(" + ", "_").replace(" ", "_")
        run_cfg = load_config(student_cfg_file, overrides=[*base, *run_overrides, f"output_dir={run_dir}"])
        shutil.rmtree(run_dir, ignore_errors=True)
        print(f"\n== {name}")
        rows[name] = train(run_cfg, progress=progress)
        checkpoints[name] = run_dir / "student.pt"

    table = format_metrics_table(rows)
    print("\n" + table)
    (out_dir / "results.md").write_text(table + "\n")
    (out_dir / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    save_detections_figure(checkpoints, val_set, out_dir / "detections.png")
    print(f"\nresults, logs, checkpoints and detections.png in {out_dir}/")
    return rows


def save_detections_figure(checkpoints: dict[str, Path], val_set, path: Path, num_images: int = 4) -> None:
    """Ground truth and each model's detections on the first validation images, one row per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kdlab.data import collate_fn
    from kdlab.engine import load_detector, predict
    from kdlab.viz import draw_boxes, show_image

    images, targets = collate_fn([val_set[i] for i in range(num_images)])
    rows = [("ground truth", None)] + list(checkpoints.items())
    fig, axes = plt.subplots(len(rows), num_images, figsize=(2.6 * num_images, 2.6 * len(rows)), squeeze=False)
    for r, (name, checkpoint) in enumerate(rows):
        detections = predict(load_detector(checkpoint), images, targets) if checkpoint else None
        for i in range(num_images):
            h, w = (int(v) for v in targets[i]["size"])
            show_image(axes[r, i], images[i, :, :h, :w], name if i == 0 else None)
            if detections is None:
                draw_boxes(axes[r, i], targets[i]["boxes"], targets[i]["labels"], class_names=val_set.class_names)
            else:
                keep = detections[i]["scores"] >= 0.3
                draw_boxes(axes[r, i], detections[i]["boxes"][keep], detections[i]["labels"][keep],
                           detections[i]["scores"][keep], class_names=val_set.class_names)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
