"""The main job (``kdlab demo`` / ``make demo``): shapes data -> teacher -> student alone vs distilled.

1. generate the shapes set if ``data_root`` has none (``kdlab data shapes``);
2. the teacher: the project's checkpoint ``data/checkpoints/shapes_gfl_teacher.pt`` if present, else
   trained with ``configs/shapes_gfl_teacher.yaml`` and stored there (the documented teacher recipe);
3. the student alone with ``configs/shapes_gfl_student.yaml``;
4. the student distilled with each available method (LD, ``configs/shapes_gfl_ld_student.yaml``);
5. a metrics table (printed, and written as ``results.md`` / ``results.json``) and a figure of
   detections side by side (``detections.png``) in ``out_dir``.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

from kdlab.config import TrainConfig, load_config

REPO_ROOT = Path(__file__).resolve().parents[1]
TEACHER_CHECKPOINT = REPO_ROOT / "data" / "checkpoints" / "shapes_gfl_teacher.pt"

# row name -> (module that must exist, the distilled student's config); the teacher is overridden
DISTILLED_RUNS = {
    "LD (Main KD + Main LD + VLR LD)": ("kdlab.distill.ld", "shapes_gfl_ld_student.yaml"),
}
TEACHER_ROW = "teacher (GFL R-34 w32)"


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
    print(f"no teacher at {TEACHER_CHECKPOINT}: training it with configs/shapes_gfl_teacher.yaml (about 30 minutes "
          f"on 2 CPU cores), then storing it there", flush=True)
    train(cfg, overwrite=True, progress=progress)
    store_teacher(Path(cfg.output_dir) / "student.pt")
    return TEACHER_CHECKPOINT


def run_demo(out_dir: str | Path = "outputs/demo", data_root: str = "data/shapes", *, overrides: list[str] = (),
             progress: bool = True, distill: bool = True) -> dict[str, dict[str, float]]:
    """Run the main job and return ``{row name: COCO metrics}``."""
    from kdlab.data import build_dataset, collate_fn, make_shapes
    from kdlab.engine import evaluate, load_detector, train
    from kdlab.eval import format_metrics_table

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not (Path(data_root) / "annotations" / "instances_val.json").is_file():
        print(f"generating the shapes dataset in {data_root}")
        make_shapes(data_root)

    if TEACHER_CHECKPOINT.is_file():
        teacher_pt = TEACHER_CHECKPOINT
        print(f"teacher: the project's shipped checkpoint {relative(teacher_pt)} (trained with "
              f"configs/shapes_gfl_teacher.yaml, see data/checkpoints/README.md; delete it to train it again here)")
    else:
        teacher_pt = train_teacher(data_root, out_dir, progress)
    base = [f"data_root={data_root}", *overrides]
    cfg: TrainConfig = load_config(config_path("shapes_gfl_student.yaml"), overrides=base)
    val_set = build_dataset(data_root, cfg.val_split, train=False, min_size=cfg.min_size, max_size=cfg.max_size)
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=cfg.batch_size, collate_fn=collate_fn)

    rows: dict[str, dict[str, float | None]] = {}
    print(f"evaluating the teacher on the {len(val_set)} validation images", flush=True)
    rows[TEACHER_ROW] = evaluate(load_detector(teacher_pt), val_loader, "cpu", progress=progress)
    print(f"teacher: {100 * rows[TEACHER_ROW]['AP']:.1f} AP", flush=True)
    checkpoints = {TEACHER_ROW: teacher_pt}

    runs = {"student alone (GFL R-18 w16)": ("shapes_gfl_student.yaml", [])}
    if distill:
        for name, (module, config) in DISTILLED_RUNS.items():
            if importlib.util.find_spec(module) is not None:
                runs[f"student + {name}"] = (config, [f"teacher_checkpoint={teacher_pt}"])
    for name, (config, run_overrides) in runs.items():
        run_dir = out_dir / name.split(" (")[0].replace(" + ", "_").replace(" ", "_")
        run_cfg = load_config(config_path(config), overrides=[*base, *run_overrides, f"output_dir={run_dir}"])
        print(f"\n== {name}: configs/{config}, training then evaluating (output in {run_dir})", flush=True)
        rows[name] = train(run_cfg, overwrite=True, progress=progress)  # the demo's own folder: replaced each time
        checkpoints[name] = run_dir / "student.pt"

    table = format_metrics_table(rows)
    print("\n" + table)
    (out_dir / "results.md").write_text(table + "\n")
    (out_dir / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    save_detections_figure(checkpoints, val_set, out_dir / "detections.png")
    print(f"\nresults, logs, checkpoints and detections.png in {out_dir}/")
    print("a single run's AP moves by about 1 point between CPUs (different float kernels); "
          "experiments/results/ld_shapes.md has the mean and std over 3 seeds")
    return rows


def relative(path: Path) -> str:
    """``path`` relative to the working directory when inside it (shorter messages)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def save_detections_figure(checkpoints: dict[str, Path], val_set, path: Path, num_images: int = 4,
                           score_thresh: float = 0.3) -> None:
    """Ground truth (solid boxes) and each model's detections (dashed, ``score >= score_thresh``) on the
    first validation images: one row per model, one column per image, a legend for line styles and classes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    from kdlab.data import collate_fn
    from kdlab.engine import load_detector, predict
    from kdlab.viz import PALETTE, draw_boxes, show_image

    images, targets = collate_fn([val_set[i] for i in range(num_images)])
    rows = [("ground truth", None)] + list(checkpoints.items())
    fig = plt.figure(figsize=(3.0 * num_images, 3.3 * len(rows) + 0.9), layout="constrained")
    row_axes = []
    for r, ((name, checkpoint), row_figure) in enumerate(zip(rows, fig.subfigures(len(rows), 1))):
        row_figure.suptitle(name if checkpoint is None else f"{name}: detections with score >= {score_thresh}",
                            fontsize=11, x=0.01, ha="left")
        row_axes.append(row_figure.subplots(1, num_images))
        for i, ax in enumerate(row_axes[-1]):
            h, w = (int(v) for v in targets[i]["size"])
            show_image(ax, images[i, :, :h, :w], f"val image id {targets[i]['image_id']}" if r == 0 else None)
    handles = [Line2D([], [], color="black", linestyle="-", label="ground truth"),
               Line2D([], [], color="black", linestyle="--", label=f"prediction (score >= {score_thresh})")]
    handles += [Patch(color=PALETTE[k % len(PALETTE)], label=name) for k, name in enumerate(val_set.class_names)]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 5), fontsize=9, frameon=False)
    fig.canvas.draw()  # fix the layout first: the labels are stacked in the axes' final sizes
    for (name, checkpoint), axes in zip(rows, row_axes):
        detections = predict(load_detector(checkpoint), images, targets) if checkpoint else None
        for i, ax in enumerate(axes):
            if detections is None:
                draw_boxes(ax, targets[i]["boxes"], targets[i]["labels"], class_names=val_set.class_names,
                           fontsize=6, avoid_overlap=True)
            else:
                keep = detections[i]["scores"] >= score_thresh
                draw_boxes(ax, detections[i]["boxes"][keep], detections[i]["labels"][keep],
                           detections[i]["scores"][keep], class_names=val_set.class_names, linestyle="--",
                           fontsize=6, avoid_overlap=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
