"""LD's experiment: the student alone (and trained longer) vs LD at both loss scales vs feature imitation.

One command, every run through the engine (``kdlab.engine.train``)::

    python experiments/ld_shapes.py                               # every setting below (BCCD when present)
    python experiments/ld_shapes.py --quick --max-iters 2         # smoke test: seed 0, 2 iterations, no BCCD
    python experiments/ld_shapes.py --settings shapes --variants student main_ld main_ld_official
    python experiments/ld_shapes.py --seeds-for shapes/fitnet=0 bccd=0,1,2   # seeds per setting or row

Settings (METHODS.md §1), each with its own teacher:

- ``shapes``: the GFL student (``configs/shapes_gfl_student.yaml``) and the project's GFL teacher
  (``data/checkpoints/shapes_gfl_teacher.pt``), every row below;
- ``bccd``: the same models on BCCD blood smears (``../shared/data/bccd``, 205 training images at
  320 x 240, batch 8), with a schedule of their own (:data:`BCCD_STUDENT`, :data:`BCCD_TEACHER`:
  36 epochs = 936 iterations for the student, warm-up 100; the student's AP is evaluated every 6
  epochs so that the table shows whether it has plateaued); the teacher is trained first unless
  ``data/checkpoints/bccd_gfl_teacher.pt`` exists (the project's, trained by this script, seed 0);
- ``retinanet_dist`` / ``fcos_dist``: RetinaNet and FCOS whose box branch outputs edge distributions
  (``configs/shapes_{retinanet,fcos}_dist_r18.yaml``) with teachers of the same heads
  (``configs/shapes_{retinanet,fcos}_dist_teacher.yaml``, trained first unless
  ``data/checkpoints/shapes_{family}_dist_teacher.pt`` exists); FCOS's VLR is the released code's
  anchor-free one (:func:`kdlab.distill.vlr.anchor_free_vlr`).

Rows (:data:`VARIANTS`): the student alone; the student alone trained ``1 + r`` times as long, ``r`` the
teacher's forward cost per student step measured here (compute-matched,
:func:`kdlab.engine.experiment.compute_matched_config`); Main LD alone and Main KD + Main LD + VLR LD,
each at kdlab's normalisation with its calibrated default weights (``experiments/ld_calibration.py``)
and at the released code's scale (``variant="official"``, 2 images per GPU, the published weights);
the released recipe (``distill: ld_released``: LD at the released scale + fine-grained imitation,
weight 2.0); FitNets and fine-grained imitation; self-LD (teacher = the student-alone run of the same
seed); Main KD alone (the full recipe's class KD without the LD terms: which term carries its gain).
Seeds are chosen per row: 3 by default, 5 for the rows whose difference was within one std
(full LD, fine-grained imitation, and the student alone they are compared with): :data:`DEFAULT_SEEDS_FOR`.

Every distilled run uses the schedule, seed and data order of its student-alone run. Finished runs
are reused when their saved config equals the new one; an interrupted run resumes from its ``last.pt``.
Outputs under ``--out`` (default ``outputs/ld_shapes``, ``outputs/ld_shapes_quick`` for smoke tests):
one folder per setting/row/seed, ``results.json`` and ``results.md`` (mean ± sample std over each row's
seeds; every distilled row against the student alone and the compute-matched student). A real run
publishes both to ``experiments/results/ld_shapes.{json,md}`` (tracked; notebook 02 shows them).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from any directory without installing kdlab
    sys.path.insert(0, str(REPO))

from kdlab.config import load_config  # noqa: E402
from kdlab.distill.ld import CALIBRATED_LD_WEIGHTS, PUBLISHED_LD_WEIGHTS  # noqa: E402
from kdlab.engine.experiment import add_run_arguments, comparison_lines  # noqa: E402
from kdlab.engine.experiment import ensure_shapes, ensure_teacher, group_records, parse_run_arguments, parse_seeds_for  # noqa: E402
from kdlab.engine.experiment import parse_teacher_costs, relative_to, results_table, run_fields  # noqa: E402
from kdlab.engine.experiment import run_groups, run_rows, seeds_per_row, student_alone_fields  # noqa: E402
from kdlab.engine.experiment import DEFAULT_SEEDS  # noqa: E402
from kdlab.engine.experiment import mean_std  # noqa: E402, F401 (the tests read it here)

SHARED_DATA = REPO.parent / "shared" / "data"
CONFIGS, CHECKPOINTS = REPO / "configs", REPO / "data" / "checkpoints"
TARGET_GAIN = 1.5  # AP points, the full recipe over the student alone (the target)

# The LD rows spell out the weights (and the released VLR rule) that the code's defaults would give: the
# saved configs say what ran, and a run of an older kdlab with other defaults is never mistaken for one
KDLAB_SCALE = {"main_ld_weight": CALIBRATED_LD_WEIGHTS["loss_ld"], "vlr_ld_weight": CALIBRATED_LD_WEIGHTS["loss_ld_vlr"]}
RELEASED_SCALE = {"variant": "official", "images_per_gpu": 2, "vlr_rule": "iof_diou",  # the released code's loss
                  "main_ld_weight": PUBLISHED_LD_WEIGHTS["loss_ld"], "vlr_ld_weight": PUBLISHED_LD_WEIGHTS["loss_ld_vlr"]}
MAIN_LD_ONLY = {"vlr_ld_weight": 0.0, "main_kd_weight": 0.0}
MAIN_KD_ONLY = {"main_ld_weight": 0.0, "vlr_ld_weight": 0.0}  # the class KD of the full recipe, weight 10, T = 2
# row -> (label, distill (None: the student alone), distill_options)
VARIANTS: dict[str, tuple[str, str | None, dict]] = {
    "student": ("student alone", None, {}),
    "compute_matched": ("student alone, trained 1 + r times as long (compute-matched)", None, {}),
    "main_ld": ("Main LD (kdlab scale, calibrated weight)", "ld", {**KDLAB_SCALE, **MAIN_LD_ONLY}),
    "main_ld_official": ("Main LD, released-code scale (2 img/GPU)", "ld", {**RELEASED_SCALE, **MAIN_LD_ONLY}),
    "main_kd": ("Main KD alone (class KD on the positives, published weight 10)", "ld", MAIN_KD_ONLY),
    "kd_ld_vlr": ("Main KD + Main LD + VLR LD (kdlab scale, calibrated weights)", "ld", KDLAB_SCALE),
    "kd_ld_vlr_official": ("Main KD + Main LD + VLR LD, released-code scale (2 img/GPU)", "ld", RELEASED_SCALE),
    "ld_released": ("released recipe: LD at 2 img/GPU + fine-grained imitation (ld_released)", "ld_released",
                    {"ld": {"vlr_rule": "iof_diou"}}),
    "fitnet": ("FitNets", "fitnet", {}),
    "fine_grained": ("fine-grained imitation", "fine_grained", {}),
    "self_ld": ("self-LD (Main + VLR LD)", "ld", {**KDLAB_SCALE, "main_kd_weight": 0.0}),
}
LABELS = {variant: label for variant, (label, _, _) in VARIANTS.items()}
FULL_LD = ("kd_ld_vlr", "kd_ld_vlr_official", "ld_released")
IMITATION = ("fitnet", "fine_grained")

BCCD_DATA = {"data_root": str(SHARED_DATA / "bccd"), "train_split": "train", "val_split": "val",
             "min_size": 240, "max_size": 320, "batch_size": 8}
# 640 x 480 blood-smear images, 3 classes, 205 training images, shown at half size (cells of 25-50 px,
# platelets of 10-15 px) with half the batch (the configs' lr is per base_batch_size and scales linearly):
# 26 iterations an epoch. The student: 36 epochs (936 iterations), warm-up 100 iterations (the shapes
# configs' 200 would outlast a 6-epoch BCCD run of 156), lr drops at epochs 27 and 33, AP every 6 epochs.
BCCD_STUDENT = {**BCCD_DATA, "epochs": 36, "lr_steps": [27, 33], "warmup_iters": 100, "eval_every": 6}
# the teacher (ResNet-34 at width 32) trains 60 epochs (1560 iterations): clearly ahead of the student
BCCD_TEACHER = {**BCCD_DATA, "epochs": 60, "lr_steps": [45, 54], "warmup_iters": 100, "eval_every": 20}


@dataclass
class Setting:
    """One student/teacher pair on one dataset, and the rows it runs."""

    title: str
    student_config: Path
    teacher_config: Path
    teacher_checkpoint: Path | None  # None or absent: trained first from teacher_config
    variants: tuple[str, ...]
    student_fields: dict = field(default_factory=dict)  # overrides of both configs' data and schedule
    teacher_fields: dict = field(default_factory=dict)
    shapes: bool = True  # runs on the shapes set (``--data-root`` applies)


SETTINGS: dict[str, Setting] = {
    "shapes": Setting("shapes, GFL", CONFIGS / "shapes_gfl_student.yaml", CONFIGS / "shapes_gfl_teacher.yaml",
                      CHECKPOINTS / "shapes_gfl_teacher.pt", tuple(VARIANTS)),
    "bccd": Setting("BCCD, GFL", CONFIGS / "shapes_gfl_student.yaml", CONFIGS / "shapes_gfl_teacher.yaml",
                    CHECKPOINTS / "bccd_gfl_teacher.pt",
                    ("student", "compute_matched", "main_ld", "main_ld_official", "main_kd", "kd_ld_vlr",
                     "kd_ld_vlr_official", "ld_released", "fine_grained"), BCCD_STUDENT, BCCD_TEACHER, shapes=False),
    "retinanet_dist": Setting("shapes, RetinaNet with a distribution box head", CONFIGS / "shapes_retinanet_dist_r18.yaml",
                              CONFIGS / "shapes_retinanet_dist_teacher.yaml",
                              CHECKPOINTS / "shapes_retinanet_dist_teacher.pt",
                              ("student", "compute_matched", "main_ld", "main_kd", "kd_ld_vlr")),
    "fcos_dist": Setting("shapes, FCOS with a distribution box head", CONFIGS / "shapes_fcos_dist_r18.yaml",
                         CONFIGS / "shapes_fcos_dist_teacher.yaml", CHECKPOINTS / "shapes_fcos_dist_teacher.pt",
                         ("student", "compute_matched", "main_ld", "main_kd", "kd_ld_vlr")),
}
FIVE = [0, 1, 2, 3, 4]
DEFAULT_SEEDS_FOR = {"shapes/student": FIVE, "shapes/kd_ld_vlr": FIVE, "shapes/fine_grained": FIVE}


def row_fields(variant: str, seed: int, out: Path, teacher: Path) -> dict:
    """Config fields of one row and seed (on top of the setting's student config and fields)."""
    _, distill, options = VARIANTS[variant]
    fields = {"seed": seed, "output_dir": str(out / variant / f"seed{seed}"), "teacher_config": None}
    if distill is None:
        return {**fields, **student_alone_fields()}
    if variant == "self_ld":  # the teacher: the student-alone model of the same seed
        teacher = out / "student" / f"seed{seed}" / "student.pt"
    return {**fields, "distill": distill, "distill_options": dict(options), "teacher_checkpoint": str(teacher)}


def learning_curve(run_dir: Path, record: Path | None = None) -> dict[int, float]:
    """``{epoch: AP in %}`` of a run's periodic evaluations (``eval_epoch{n}.json``), or those its run
    record kept when the folder has none (a run reused from its record)."""
    curve = {}
    for path in run_dir.glob("eval_epoch*.json"):
        curve[int(path.stem.removeprefix("eval_epoch"))] = 100 * json.loads(path.read_text())["AP"]
    if not curve and record is not None and record.is_file():
        history = json.loads(record.read_text()).get("eval_history", {})
        curve = {int(epoch): 100 * metrics["AP"] for epoch, metrics in history.items()}
    return dict(sorted(curve.items()))


def run_setting(name: str, variants: list[str], seeds: dict[str, list[int]], args: argparse.Namespace,
                common: dict) -> dict:
    """The teacher (trained first when needed), its measured cost, then every row for every seed
    (:func:`~kdlab.engine.experiment.run_rows`); the setting's part of results.json."""
    setting, out = SETTINGS[name], args.out / name
    checkpoint = ensure_teacher(name, setting.teacher_checkpoint, setting.teacher_config,
                                {**setting.teacher_fields, **common}, out / "teacher")
    part = {"title": setting.title, "teacher_checkpoint": relative_to(checkpoint, REPO),
            **run_rows(name, setting.student_config, {**setting.student_fields, **common}, variants, seeds,
                       lambda variant, seed, base: row_fields(variant, seed, out, checkpoint), checkpoint, out,
                       args.teacher_cost.get(name), group_records(args, name), args.fresh,
                       checkpoint_rows=("student",) if "self_ld" in variants else ())}
    records = group_records(args, name)
    part["student_curves"] = {str(seed): learning_curve(out / "student" / f"seed{seed}",
                                                        None if records is None else records / "student" / f"seed{seed}.json")
                              for seed in part["runs"].get("student", {})}
    return part


def paired_difference(runs: dict[str, dict[int, dict[str, float]]], a: str, b: str) -> tuple[float, float | None, list[int]]:
    """Mean and sample std of ``AP(a) - AP(b)`` (in %) over the seeds both rows ran, and those seeds."""
    shared = sorted(set(runs[a]) & set(runs[b]))
    diffs = [100 * (runs[a][s]["AP"] - runs[b][s]["AP"]) for s in shared]
    if not diffs:
        return float("nan"), None, []
    return statistics.mean(diffs), statistics.stdev(diffs) if len(diffs) > 1 else None, shared


def markdown(name: str, part: dict, note: str) -> str:
    """One setting's table, every distilled row against the two baselines, full LD against imitation
    (paired over the shared seeds), and the student's learning curve where it was evaluated."""
    runs = {v: {int(s): m for s, m in by_seed.items()} for v, by_seed in part["runs"].items()}
    lines = results_table(f"{name}: {part['title']}{note}", part["teacher"], runs, LABELS)
    if part.get("teacher_cost_ratio") is not None:
        lines += ["", f"Teacher forward / student step, measured: r = {part['teacher_cost_ratio']:.2f}."]
    lines += [""] + comparison_lines(runs, LABELS, [v for v in runs if VARIANTS[v][1] is not None])
    for full in (v for v in FULL_LD if v in runs):
        if "student" in runs:
            gain = part["table"][full]["AP"][0] - part["table"]["student"]["AP"][0]
            lines.append(f"- {LABELS[full]}: target >= +{TARGET_GAIN} AP over the student alone "
                         f"{'met' if gain >= TARGET_GAIN else 'NOT met'}")
        # against the imitation baselines, and against Main KD alone (what the LD terms add to the class KD)
        for baseline in (v for v in (*IMITATION, "main_kd") if v in runs):
            mean, std, shared = paired_difference(runs, full, baseline)
            if not shared:
                continue
            spread = "" if std is None else f" ± {std:.1f}"
            verdict = ("not resolved: the difference is within one std" if std is not None and abs(mean) <= std
                       else "better" if mean > 0 else "worse")
            lines.append(f"- {LABELS[full]} − {LABELS[baseline]}, paired over seeds {shared}: "
                         f"{mean:+.1f}{spread} AP ({verdict})")
    curves = {seed: curve for seed, curve in part.get("student_curves", {}).items() if len(curve) > 1}
    if curves:
        epochs = sorted({e for curve in curves.values() for e in curve})
        mean_curve = ", ".join(f"epoch {e}: {statistics.mean(c[e] for c in curves.values() if e in c):.1f}"
                               for e in epochs)
        lines.append(f"- student alone, AP during training (mean over seeds): {mean_curve}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", default=None, choices=list(SETTINGS),
                        help="default: every setting, bccd only when ../shared/data/bccd exists (never with --quick)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                        help="restrict every setting to these rows (each setting runs only those it defines)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help=f"default 0 1 2, and {DEFAULT_SEEDS_FOR} unless --seeds or --seeds-for SETTING is given")
    parser.add_argument("--seeds-for", nargs="+", default=[], metavar="KEY=S,S", dest="seeds_for_list",
                        help="seeds of a setting or of one setting's row, e.g. bccd=0 shapes/fitnet=0")
    parser.add_argument("--teacher-cost", nargs="+", default=[], metavar="SETTING=R", dest="teacher_cost_list",
                        help="use this teacher-forward / student-step ratio instead of measuring it, e.g. shapes=0.9")
    add_run_arguments(parser, quick_help="smoke test: seed 0 only, 1 epoch, no BCCD")
    args = parse_run_arguments(parser, argv, "ld_shapes", REPO)
    explicit_seeds, args.seeds = args.seeds is not None, args.seeds or list(DEFAULT_SEEDS)
    args.seeds_given = explicit_seeds  # --seeds 0 1 2 gives the 5-seed rows 3: a partial run, never published
    args.default_settings = [s for s in SETTINGS if SETTINGS[s].shapes or (SHARED_DATA / "bccd").is_dir() and not args.quick]
    if args.settings is None:
        args.settings = args.default_settings
    keys = set(SETTINGS) | {f"{s}/{v}" for s, setting in SETTINGS.items() for v in setting.variants}
    try:
        given = parse_seeds_for(args.seeds_for_list, keys)
        # the 5-seed rows by default; not when the seeds of everything or of their setting are given
        defaults = {} if explicit_seeds else {k: v for k, v in DEFAULT_SEEDS_FOR.items() if k.split("/")[0] not in given}
        args.seeds_for = {**defaults, **given}
        args.teacher_cost = parse_teacher_costs(args.teacher_cost_list, SETTINGS, "SETTING")
    except ValueError as err:
        parser.error(str(err))
    for name in args.settings:
        setting = SETTINGS[name]
        for path in (setting.student_config, setting.teacher_config):
            if not path.is_file():
                parser.error(f"config {path} does not exist")
        if not setting.shapes and not Path(setting.student_fields["data_root"]).is_dir():
            parser.error(f"setting {name} needs {setting.student_fields['data_root']}")
    return args


def row_seeds(name: str, variants: list[str], seeds: list[int], args: argparse.Namespace) -> dict[str, list[int]]:
    """Each row's seeds (:func:`~kdlab.engine.experiment.seeds_per_row`); self-LD runs only on seeds whose
    student-alone run exists (its teacher)."""
    chosen = seeds_per_row(name, variants, seeds, args.seeds_for, args.quick)
    if "self_ld" in chosen:
        chosen["self_ld"] = [s for s in chosen["self_ld"] if s in chosen.get("student", [])]
    return chosen


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    common = run_fields(args.device, args.quick, args.max_iters, args.num_workers)
    shapes_root = args.data_root or REPO / load_config(SETTINGS["shapes"].student_config).data_root
    if any(SETTINGS[s].shapes for s in args.settings):
        ensure_shapes(shapes_root)

    def run_group(name: str, variants: list[str], seeds: dict[str, list[int]]) -> dict:
        setting_common = {**common, "data_root": str(shapes_root)} if SETTINGS[name].shapes else common
        return run_setting(name, variants, seeds, args, setting_common)

    run_groups(args, "settings", {s: [v for v in SETTINGS[s].variants if v in args.variants] for s in args.settings},
               LABELS, run_group, markdown, "LD experiment", "ld_shapes", REPO,
               row_seeds=lambda name, variants, seeds: row_seeds(name, variants, seeds, args),
               every_group=args.default_settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
