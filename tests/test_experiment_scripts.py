"""The experiment scripts: argument handling, tables, and (slow) smoke runs of one iteration on a tiny shapes set."""

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


def test_gid_seeds_for_families_and_variants():
    gid = load_script("gid_shapes")
    args = gid.parse_args(["--seeds-for", "faster_rcnn=0", "fcos=1,2", "retinanet/gid_feature=0"])
    assert args.seeds == [0, 1, 2]
    assert args.seeds_for == {"faster_rcnn": [0], "fcos": [1, 2], "retinanet/gid_feature": [0]}
    for bad in ("yolo=0", "fcos=", "fcos=a", "fcos/gid_feature=0"):  # FCOS has no ablations
        with pytest.raises(SystemExit):
            gid.parse_args(["--seeds-for", bad])


def metrics(ap):
    return {"AP": ap, "AP50": 0.2, "AP75": 0.1, "APs": 0.05}  # no APm: its column shows "–"


def test_gid_markdown_rows_carry_their_seeds_and_the_compute_matched_comparison():
    gid = load_script("gid_shapes")
    runs = {"student": {0: metrics(0.04), 1: metrics(0.05)}, "compute_matched": {0: metrics(0.07), 1: metrics(0.07)},
            "gid": {0: metrics(0.07), 1: metrics(0.08)}, "gid_feature": {0: metrics(0.06)}}
    part = {"teacher": metrics(0.1), "runs": runs, "table": {v: gid.mean_std(r) for v, r in runs.items()},
            "teacher_cost_ratio": 0.8}
    text = gid.markdown("retinanet", part, "")
    assert "| student alone | 2 | 4.5 ± 0.7 |" in text  # mean 4.5, sample std 0.71
    assert "| GID feature only | 1 | 6.0 | 20.0 | 10.0 | 5.0 | – | 6.0 |" in text  # one seed: no ± claimed
    assert "r = 0.80" in text
    assert "- GID (feature + relation + response): +3.0 AP over the student alone, +0.5 over the compute-matched " \
           "student (beats it)" in text
    assert "- GID feature only: +1.5 AP over the student alone, -1.0 over the compute-matched student (does NOT beat it)" in text
    assert "target (>= +1.5 AP over the student alone): met" in text


def test_gid_every_family_has_a_compute_matched_row_and_teacher_costs_parse():
    gid = load_script("gid_shapes")
    assert all(variants[:2] == ["student", "compute_matched"] for variants in gid.FAMILIES.values())
    args = gid.parse_args(["--teacher-cost", "retinanet=0.9", "fcos=1.5", "--seeds-for", "faster_rcnn=0,1,2"])
    assert args.teacher_cost == {"retinanet": 0.9, "fcos": 1.5} and args.seeds_for == {"faster_rcnn": [0, 1, 2]}
    with pytest.raises(SystemExit):
        gid.parse_args(["--teacher-cost", "yolo=1.0"])


def test_ld_rows_seeds_and_settings():
    ld = load_script("ld_shapes")
    args = ld.parse_args(["--settings", "shapes", "retinanet_dist", "--seeds-for", "shapes/fitnet=0", "fcos_dist=1"])
    # 5 seeds for the rows whose difference was within one std, unless told otherwise
    chosen = ld.row_seeds("shapes", list(ld.SETTINGS["shapes"].variants), args.seeds, args)
    assert chosen["kd_ld_vlr"] == chosen["fine_grained"] == chosen["student"] == [0, 1, 2, 3, 4]
    assert chosen["fitnet"] == [0] and chosen["main_ld_official"] == [0, 1, 2] and chosen["self_ld"] == [0, 1, 2]
    assert ld.row_seeds("fcos_dist", ["student", "kd_ld_vlr"], args.seeds, args) == {"student": [1], "kd_ld_vlr": [1]}
    # explicit seeds (of everything, or of the setting) replace the 5-seed defaults
    for explicit in (["--seeds", "0"], ["--seeds-for", "shapes=0"]):
        args = ld.parse_args(["--settings", "shapes", *explicit])
        assert set(ld.row_seeds("shapes", ["student", "kd_ld_vlr"], args.seeds, args)["kd_ld_vlr"]) == {0}
    for bad in (["--seeds-for", "fcos_dist/fine_grained=0"],  # FCOS has no anchors for fine-grained imitation
                ["--seeds-for", "bccd/self_ld=0"], ["--teacher-cost", "coco=1"]):
        with pytest.raises(SystemExit):
            ld.parse_args(bad)
    # every setting compares with the student alone and the compute-matched student; Main LD at both scales
    for setting in ld.SETTINGS.values():
        assert setting.variants[:2] == ("student", "compute_matched") and "main_ld" in setting.variants
    assert {"main_ld_official", "kd_ld_vlr_official", "ld_released"} <= set(ld.SETTINGS["bccd"].variants)
    # Main KD alone in every setting: what the LD terms add to the class KD of the full recipe
    assert all("main_kd" in setting.variants for setting in ld.SETTINGS.values())
    # BCCD's schedule: the warm-up ends well inside the run (26 iterations an epoch)
    assert ld.BCCD_STUDENT["warmup_iters"] < 0.2 * 26 * ld.BCCD_STUDENT["epochs"]


def test_ld_row_fields():
    ld = load_script("ld_shapes")
    out, teacher = Path("/runs/shapes"), Path("/t.pt")
    assert ld.row_fields("student", 3, out, teacher)["distill"] is None
    main = ld.row_fields("main_ld_official", 0, out, teacher)
    assert main["distill"] == "ld" and main["teacher_checkpoint"] == "/t.pt"
    # the weights are spelled out in the saved config: a run of older defaults (0.25 at kdlab's scale) never matches
    assert main["distill_options"] == {"variant": "official", "images_per_gpu": 2, "vlr_rule": "iof_diou",
                                       "main_ld_weight": 0.25, "vlr_ld_weight": 0.0, "main_kd_weight": 0.0}
    assert ld.row_fields("kd_ld_vlr", 0, out, teacher)["distill_options"] == {"main_ld_weight": 2.0, "vlr_ld_weight": 3.25}
    assert ld.row_fields("main_ld", 0, out, teacher)["distill_options"] == {
        "main_ld_weight": 2.0, "vlr_ld_weight": 0.0, "main_kd_weight": 0.0}
    # Main KD alone: both LD terms off, the class KD at its default weight (the full recipe's)
    main_kd = ld.row_fields("main_kd", 0, out, teacher)
    assert main_kd["distill"] == "ld" and main_kd["distill_options"] == {"main_ld_weight": 0.0, "vlr_ld_weight": 0.0}
    recipe = ld.row_fields("ld_released", 1, out, teacher)
    assert recipe["distill"] == "ld_released" and recipe["output_dir"] == "/runs/shapes/ld_released/seed1"
    assert recipe["distill_options"] == {"ld": {"vlr_rule": "iof_diou"}}
    assert ld.row_fields("self_ld", 2, out, teacher)["teacher_checkpoint"] == "/runs/shapes/student/seed2/student.pt"


def test_ld_markdown_pairs_full_ld_with_imitation_over_shared_seeds():
    ld = load_script("ld_shapes")
    runs = {"student": {s: metrics(0.07) for s in range(3)},
            "compute_matched": {s: metrics(0.08) for s in range(3)},
            "kd_ld_vlr": {s: metrics(ap) for s, ap in enumerate([0.10, 0.09, 0.11, 0.095, 0.10])},
            "fine_grained": {s: metrics(ap) for s, ap in enumerate([0.09, 0.095, 0.09, 0.09, 0.092])},
            "main_kd": {s: metrics(ap) for s, ap in enumerate([0.08, 0.094, 0.09])}}
    part = {"title": "shapes, GFL", "teacher": metrics(0.2), "runs": runs, "teacher_cost_ratio": 1.2,
            "table": {v: ld.mean_std(r) for v, r in runs.items()},
            "student_curves": {"0": {6: 5.0, 12: 6.5}, "1": {6: 5.2, 12: 6.7}}}
    text = ld.markdown("shapes", part, "")
    assert "| Main KD + Main LD + VLR LD (kdlab scale, calibrated weights) | 5 | 9.9 ± 0.7 |" in text
    assert "+2.9 AP over the student alone, +1.9 over the compute-matched student (beats it)" in text
    # paired over seeds 0-4: differences +1.0, -0.5, +2.0, +0.5, +0.8 -> mean +0.8, std 0.9: within one std
    assert "paired over seeds [0, 1, 2, 3, 4]: +0.8 ± 0.9 AP (not resolved: the difference is within one std)" in text
    # against Main KD alone, over its seeds 0-2: +2.0, -0.4, +2.0 -> +1.2 ± 1.4
    assert "− Main KD alone (class KD on the positives, published weight 10), paired over seeds [0, 1, 2]: " \
           "+1.2 ± 1.4 AP (not resolved" in text
    assert "AP during training (mean over seeds): epoch 6: 5.1, epoch 12: 6.6" in text


# ----------------------------------------------------------------------------- smoke tests (a few runs of 1 iteration)
@pytest.mark.slow
def test_ld_script_smoke_test(tiny_shapes, tmp_path, monkeypatch):
    ld = load_script("ld_shapes")
    # the project's retinanet_dist teacher is in data/checkpoints; pretend it is not, so that the script
    # trains it first (fcos_dist uses the committed one)
    monkeypatch.setitem(ld.SETTINGS, "retinanet_dist", dataclasses.replace(ld.SETTINGS["retinanet_dist"],
                                                                           teacher_checkpoint=tmp_path / "absent.pt"))
    assert ld.main(["--quick", "--max-iters", "2", "--data-root", str(tiny_shapes), "--out", str(tmp_path),
                    "--device", "cpu", "--teacher-cost", "retinanet_dist=0.5", "fcos_dist=0.5"]) == 0
    text = (tmp_path / "results.md").read_text()
    for setting in ("shapes", "retinanet_dist", "fcos_dist"):
        assert f"### {setting}: " in text and "SMOKE TEST" in text
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["settings"]["shapes"]["runs"]) == set(ld.SETTINGS["shapes"].variants)
    assert set(results["settings"]["fcos_dist"]["runs"]) == {"student", "compute_matched", "main_ld", "main_kd", "kd_ld_vlr"}
    assert results["settings"]["shapes"]["teacher_cost_ratio"] > 0  # measured (and cached)
    assert (tmp_path / "shapes" / "teacher_cost.json").is_file()
    assert (tmp_path / "retinanet_dist" / "teacher" / "student.pt").is_file()  # the teacher trained first
    assert results["settings"]["fcos_dist"]["teacher_checkpoint"] == "data/checkpoints/shapes_fcos_dist_teacher.pt"
    assert "over the compute-matched student" in text


@pytest.mark.slow
def test_gid_script_smoke_test(tiny_shapes, tmp_path):
    gid = load_script("gid_shapes")
    assert gid.main(["--quick", "--max-iters", "2", "--data-root", str(tiny_shapes), "--out", str(tmp_path),
                     "--device", "cpu", "--teacher-cost", "retinanet=0.5", "fcos=0.5", "faster_rcnn=0.5"]) == 0
    text = (tmp_path / "results.md").read_text()
    assert text.count("over the compute-matched student") == 5 + 1 + 1


@pytest.mark.slow
def test_ld_calibration_and_gid_terms_smoke_tests(tiny_shapes, tmp_path):
    calibration = load_script("ld_calibration")
    assert calibration.main(["--train-iters", "1", "--batches", "1", "--data-root", str(tiny_shapes),
                             "--out", str(tmp_path / "cal")]) == 0
    results = json.loads((tmp_path / "cal" / "results.json").read_text())
    assert len(results["students"]) == 2
    for summary in results["students"].values():
        # Main LD: the value and gradient ratios are one number, the summed scores of 2 images' positives
        assert summary["loss_ld/value"][0] == pytest.approx(summary["loss_ld/grad"][0], rel=1e-4)
        assert summary["loss_ld/value"][0] == pytest.approx(summary["summed positive scores per 2 images"][0], rel=1e-4)
    terms = load_script("gid_terms")
    assert terms.main(["--iters", "2", "--every", "1", "--data-root", str(tiny_shapes), "--out", str(tmp_path / "gid")]) == 0
    results = json.loads((tmp_path / "gid" / "results.json").read_text())
    assert len(results["records"]) == 2
    assert set(results["mean"]) == {"detection", "loss_gid_feature", "loss_gid_relation", "loss_gid_cls", "loss_gid_reg"}
    assert results["mean"]["detection"]["cos detection (backbone+FPN)"] == pytest.approx(1.0, abs=1e-3)
    assert results["mean"]["loss_gid_feature"]["cos feature term (backbone+FPN)"] == pytest.approx(1.0, abs=1e-3)
    assert results["mean"]["loss_gid_relation"]["grad norm head"] == 0.0  # it reaches the backbone and FPN only
    drkd = load_script("drkd_terms")
    assert drkd.main(["--iters", "2", "--every", "1", "--data-root", str(tiny_shapes), "--out", str(tmp_path / "drkd")]) == 0
    results = json.loads((tmp_path / "drkd" / "results.json").read_text())
    for family in ("retinanet", "faster_rcnn"):
        mean = results["families"][family]["mean"]
        assert set(mean) == {"detection", "loss_drkd_pixel", "loss_drkd_instance", "loss_drkd_instance_feature"}
        assert mean["detection"]["cos detection (backbone+FPN)"] == pytest.approx(1.0, abs=1e-3)
        # DRKD reads the FPN maps only: nothing reaches the heads
        assert all(mean[t]["grad norm head"] == 0.0 for t in mean if t != "detection")
    assert "- faster_rcnn: loss_drkd_pixel " in (tmp_path / "drkd" / "results.md").read_text()


def test_drkd_terms_reading_by_hand():
    drkd = load_script("drkd_terms")
    stats = {"grad norm / detection's (backbone+FPN)": 0.5, "cos detection (backbone+FPN)": -0.125}
    parts = {"faster_rcnn": {"mean_after_warmup": {"detection": {}, "loss_drkd_pixel": stats}}}
    assert drkd.reading(parts).splitlines()[-1] == \
        "- faster_rcnn: loss_drkd_pixel 0.50x detection's gradient, cosine -0.12."


def test_a_partial_selection_is_named_and_never_published():
    import argparse

    from kdlab.engine.experiment import partial_selection

    labels = {"student": "student alone", "ld": "LD"}
    full = argparse.Namespace(variants=["ld", "student"], seeds_for_list=[])
    assert partial_selection(full, labels) == ""
    rows = argparse.Namespace(variants=["ld"], seeds_for_list=[])
    assert partial_selection(rows, labels) == "--variants ld"
    seeds = argparse.Namespace(variants=["student", "ld"], seeds_for_list=["shapes/ld=0"])
    assert partial_selection(seeds, labels) == "--seeds-for shapes/ld=0"
    one_seed = argparse.Namespace(variants=["student", "ld"], seeds=[0], seeds_for_list=[])
    assert partial_selection(one_seed, labels) == "--seeds 0"
    other_seeds = argparse.Namespace(variants=["student", "ld"], seeds=[1, 2, 3], seeds_for_list=[])
    assert partial_selection(other_seeds, labels) == "--seeds 1 2 3"
    default_seeds = argparse.Namespace(variants=["student", "ld"], seeds=[0, 1, 2], seeds_for_list=[])
    assert partial_selection(default_seeds, labels) == ""
    one_group = argparse.Namespace(variants=["student", "ld"], families=["retinanet"], seeds=[0, 1, 2], seeds_for_list=[])
    assert partial_selection(one_group, labels, ("families", ["retinanet", "faster_rcnn"])) == "--families retinanet"
    assert partial_selection(one_group, labels, ("families", ["retinanet"])) == ""


def test_the_scripts_publish_only_the_default_selection():
    """``--seeds 0`` or LD's explicit ``--seeds 0 1 2`` (its 5-seed rows get 3) is partial: such a run once
    replaced the published table with part of the experiment. One setting or family with its default rows and
    seeds is not: run_groups publishes it beside the other groups' published parts (complete_groups)."""
    from kdlab.engine.experiment import partial_selection

    ld = load_script("ld_shapes")
    default = ld.parse_args([])
    assert partial_selection(default, ld.LABELS) == ""
    for argv, expected in ((["--seeds", "0"], "--seeds 0"), (["--seeds", "0", "1", "2"], "--seeds 0 1 2"),
                           (["--settings", "shapes"], "")):
        args = ld.parse_args(argv)
        assert partial_selection(args, ld.LABELS) == expected, argv
    for script in ("drkd_shapes", "gid_shapes"):
        module = load_script(script)
        families = list(module.FAMILIES)
        assert partial_selection(module.parse_args([]), module.LABELS) == ""
        args = module.parse_args(["--families", families[0], "--seeds", "0"])
        assert partial_selection(args, module.LABELS) == "--seeds 0"
        assert partial_selection(module.parse_args(["--families", families[0]]), module.LABELS) == ""


def test_a_default_run_of_some_groups_publishes_them_beside_the_recorded_others(tmp_path):
    """complete_groups: the groups run now, in the default order; a group published from run records is
    carried over; one published before run records (possibly older code) is dropped and named pending."""
    from kdlab.engine.experiment import complete_groups

    published = tmp_path / "exp.json"
    published.write_text(json.dumps({"settings": {"b": {"runs": {"student": {"0": {"AP": 0.2}}}, "from_records": True},
                                                  "c": {"runs": {"student": {"0": {"AP": 0.9}}}}}}))
    results = {"settings": {"a": {"runs": {"student": {0: {"AP": 0.1}}}}}}

    def markdown(group, part, note):
        return f"{group}{note}: " + ", ".join(f"{m['AP']}" for by_seed in part["runs"].values() for m in by_seed.values())

    sections = complete_groups(results, "settings", ["b", "a", "c"], ["a: 0.1"], markdown, published)
    assert list(results["settings"]) == ["b", "a"]
    assert results["settings"]["a"]["from_records"] is True and results["pending"] == ["c"]
    assert sections == ["b (as published before; not run in this invocation): 0.2", "a: 0.1",
                        "Not in this table yet (no run of the current code): c."]
    # nothing published yet, every group run: no pending list
    fresh = {"settings": {"a": {"runs": {}}, "b": {"runs": {}}}}
    assert complete_groups(fresh, "settings", ["a", "b"], ["A", "B"], markdown, tmp_path / "none.json") == ["A", "B"]
    assert "pending" not in fresh


def test_kd_detr_publishes_only_its_default_seeds():
    from kdlab.engine.experiment import partial_selection

    kd_detr = load_script("kd_detr_shapes")
    labels = {v: label for v, (label, _, _) in kd_detr.VARIANTS.items()}
    assert partial_selection(kd_detr.parse_args([]), labels) == ""
    assert partial_selection(kd_detr.parse_args(["--seeds", "0"]), labels) == "--seeds 0"
    # the weighting ablation runs seed 0 only by default; --seeds 0 1 2 gives it 3 seeds, so that run is partial
    from kdlab.engine.experiment import seeds_per_row

    default = kd_detr.parse_args([])
    rows = seeds_per_row("kd_detr", list(kd_detr.VARIANTS), default.seeds, default.seeds_for)
    assert rows["kd_detr_unweighted"] == [0] and rows["kd_detr"] == rows["student"] == [0, 1, 2]
    explicit = kd_detr.parse_args(["--seeds", "0", "1", "2"])
    assert seeds_per_row("kd_detr", ["kd_detr_unweighted"], explicit.seeds, explicit.seeds_for) == {"kd_detr_unweighted": [0, 1, 2]}
    assert partial_selection(explicit, labels) == "--seeds 0 1 2"


@pytest.mark.slow
def test_kd_detr_script_smoke_test(tiny_shapes, tmp_path, monkeypatch):
    import dataclasses

    from kdlab.config import load_config
    from kdlab.engine.checkpoint import export_student
    from kdlab.models import build_detector

    monkeypatch.chdir(REPO)  # the student config's backbone_weights path is relative to the repository
    kd_detr = load_script("kd_detr_shapes")
    # a small untrained DAB-DETR teacher, so that the script runs whether or not the shapes teacher is stored
    teacher_cfg = dataclasses.replace(load_config(REPO / "configs" / "shapes_dab_detr_teacher.yaml"), backbone_weights=None,
                                      backbone="resnet18", backbone_width=8,
                                      detector_options={"feature_level": "C4", "hidden_dim": 32, "num_queries": 10,
                                                        "enc_layers": 1, "dec_layers": 2, "num_heads": 2, "dim_feedforward": 64})
    torch.manual_seed(0)
    teacher = build_detector("dab_detr", 8, **teacher_cfg.model_options())
    export_student(tmp_path / "teacher.pt", teacher_cfg, 8, [f"class{k}" for k in range(8)], teacher)
    monkeypatch.setattr(kd_detr, "TEACHER_CHECKPOINT", tmp_path / "teacher.pt")
    assert kd_detr.main(["--quick", "--max-iters", "2", "--data-root", str(tiny_shapes), "--out", str(tmp_path / "out"),
                         "--device", "cpu"]) == 0
    out = tmp_path / "out"
    results = json.loads((out / "results.json").read_text())
    assert results["smoke_test"] is True
    part = results["families"]["dab_detr"]  # the layout of the other experiments
    assert set(part["runs"]) == set(kd_detr.VARIANTS) and part["teacher_cost_ratio"] > 0
    from kdlab.engine.experiment import published_parts

    assert set(published_parts(results)["dab_detr"]["runs"]["kd_detr"]) == {0}
    text = (out / "results.md").read_text()
    assert "SMOKE TEST" in text and "over the compute-matched student" in text
    # each distilled run trained its own criterion: the config written with it names the method
    assert "distill: kd_detr" in (out / "kd_detr" / "seed0" / "config.yaml").read_text()
    assert "distill: detr_matched_kd" in (out / "matched" / "seed0" / "config.yaml").read_text()


def test_drkd_diagnostic_row_runs_its_first_seeds_without_making_the_run_partial():
    drkd = load_script("drkd_shapes")
    from kdlab.engine.experiment import partial_selection, seeds_per_row
    args = drkd.parse_args([])
    count = drkd.ROW_SEED_COUNT["faster_rcnn/drkd_x5"]
    assert 1 <= count < 3 and args.seeds_for == {"faster_rcnn/drkd_x5": [0, 1, 2][:count]}
    assert partial_selection(args, drkd.LABELS) == ""            # so the default command still publishes
    assert seeds_per_row("faster_rcnn", drkd.FAMILIES["faster_rcnn"], args.seeds, args.seeds_for) == \
        {"student": [0, 1, 2], "compute_matched": [0, 1, 2], "drkd": [0, 1, 2], "drkd_x5": [0, 1, 2][:count]}
    assert drkd.parse_args(["--seeds", "3", "4", "5"]).seeds_for == {"faster_rcnn/drkd_x5": [3, 4, 5][:count]}
    assert drkd.parse_args(["--seeds-for", "faster_rcnn=0"]).seeds_for == {"faster_rcnn": [0]}   # the family's wins
    assert drkd.parse_args(["--seeds-for", "faster_rcnn/drkd_x5=2"]).seeds_for == {"faster_rcnn/drkd_x5": [2]}
