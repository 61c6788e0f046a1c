"""KD-DETR (kdlab.distill.kd_detr, kdlab.losses.kd_detr): shared distillation points, the losses by hand,
gradients, the matched-query baseline, configs and the engine (train, checkpoint, exact resume)."""

from __future__ import annotations

import math
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import box_convert, generalized_box_iou

from kdlab.distill import METHODS, DistillationTask, build_distillation
from kdlab.distill.kd_detr import KDDETR, MatchedQueryKD
from kdlab.losses.kd_detr import foreground_weight
from kdlab.models import build_detector
from kdlab.models.base import weighted_total
from kdlab.models.detr_outputs import QueryPassOutput

TINY = dict(backbone="resnet18", backbone_width=8, backbone_norm="frozen_bn", feature_level="C4", hidden_dim=32,
            num_queries=8, enc_layers=1, dec_layers=2, num_heads=4, dim_feedforward=64)
SIZES = [(64, 64), (64, 64)]


def tiny_detr(num_classes: int = 3, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return build_detector("dab_detr", num_classes, **{**TINY, **overrides})


def pair(**options):
    """A tiny student, a different (wider, 3-layer) teacher, and their KD-DETR task. The box heads' last
    layers start at zero (every box is its anchor), so they are drawn at random here: the boxes of the two
    models at the same points then differ, as after training."""
    student = tiny_detr(seed=0).train()
    teacher = tiny_detr(seed=1, hidden_dim=48, dec_layers=3)
    for model in (student, teacher):
        torch.nn.init.normal_(model.box_head.layers[-1].weight, std=0.05)
    return student, teacher, DistillationTask(student, teacher, KDDETR(student, teacher, num_general=5, **options))


def batch(empty: bool = False):
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 64, 64, generator=generator)
    boxes = [torch.zeros(0, 4), torch.zeros(0, 4)] if empty else [torch.tensor([[4., 6, 30, 40], [35, 20, 60, 60]]),
                                                                   torch.tensor([[10., 10, 50, 30]])]
    targets = [{"boxes": b, "labels": torch.arange(len(b)) % 3, "size": torch.tensor([64, 64])} for b in boxes]
    return images, targets


def test_registered_and_terms():
    assert METHODS["kd_detr"] is KDDETR and METHODS["detr_matched_kd"] is MatchedQueryKD
    student, teacher, task = pair()
    assert set(task.distillers["kd_detr"].weight_dict) == {
        f"loss_kdd_{s}_{k}" for s in ("specific", "general") for k in ("cls", "l1", "giou")}
    assert task.weight_dict["loss_kdd_general_l1"] == 5.0 and task.weight_dict["loss_kdd_specific_giou"] == 2.0
    assert task.weight_dict["loss_kdd_specific_cls"] == 1.0
    only = KDDETR(student, teacher, specific=False, giou_weight=0.0)
    assert set(only.weight_dict) == {"loss_kdd_general_cls", "loss_kdd_general_l1"}
    with pytest.raises(ValueError, match="at least one set"):
        KDDETR(student, teacher, specific=False, general=False)


def test_both_models_get_the_same_points():
    student, teacher, task = pair()
    seen = {}

    def record(name, module):
        original = module.forward

        def forward(*args, **kwargs):
            seen.setdefault(name, {k: v.clone() for k, v in kwargs.get("extra_queries", {}).items()})
            return original(*args, **kwargs)
        module.forward = forward

    record("student", student)
    record("teacher", teacher)
    images, targets = batch()
    torch.manual_seed(3)
    student_out, teacher_out = task.run_models(images, targets)
    assert seen["student"].keys() == seen["teacher"].keys() == {"specific", "general"}
    for name in ("specific", "general"):
        assert torch.equal(seen["student"][name], seen["teacher"][name]), name
        # each model's extra pass starts from exactly those anchors
        expected = seen["student"][name].sigmoid().expand(2, -1, -1)
        assert torch.equal(student_out.extra[name].layer_references[0], expected)
        assert torch.equal(teacher_out.extra[name].layer_references[0], expected)
    assert torch.equal(seen["student"]["specific"], teacher.query_anchors)  # the teacher's, not the student's
    assert seen["student"]["general"].shape == (5, 4) and not seen["student"]["specific"].requires_grad
    # the student's memory is its own: its detection outputs are those of a plain forward
    torch.manual_seed(3)
    plain = student(images, SIZES, targets)
    assert torch.equal(plain.pred_boxes, student_out.pred_boxes)


def test_general_points_change_every_step_and_follow_the_seed():
    student, teacher, task = pair()
    criterion = task.distillers["kd_detr"]
    torch.manual_seed(7)
    first, second = criterion.points(teacher, torch.device("cpu")), criterion.points(teacher, torch.device("cpu"))
    assert not torch.equal(first["general"], second["general"])
    assert torch.equal(first["specific"], second["specific"])
    torch.manual_seed(7)
    again = criterion.points(teacher, torch.device("cpu"))
    assert torch.equal(first["general"], again["general"])
    # N(0, 1) in inverse-sigmoid space, nothing taken from targets
    torch.manual_seed(7)
    assert torch.equal(first["general"], torch.randn(5, 4))
    assert torch.equal(KDDETR(student, teacher, num_specific=3).points(teacher, torch.device("cpu"))["specific"],
                       teacher.query_anchors[:3])


def test_teacher_gets_no_gradient_and_the_student_does():
    student, teacher, task = pair()
    images, targets = batch()
    terms = task(images, targets)
    kd_terms = {k: v for k, v in terms.items() if k.startswith("loss_kdd_")}
    assert len(kd_terms) == 6 and all(torch.isfinite(v) and v > 0 for v in kd_terms.values())
    weighted_total(kd_terms, task.weight_dict).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    assert student.decoder.layers[0].ca_v_proj.weight.grad.abs().sum() > 0
    assert student.anchor_embed.weight.grad is None  # its anchors are not used by the distillation passes


def test_foreground_weight_is_the_teachers_and_detached():
    teacher_logits = torch.tensor([[[0.5, -1.0, 2.0], [-3.0, -2.0, -4.0]]], requires_grad=True)
    weight = foreground_weight(teacher_logits)
    assert not weight.requires_grad
    assert torch.allclose(weight, torch.tensor([[torch.sigmoid(torch.tensor(2.0)), torch.sigmoid(torch.tensor(-2.0))]]))
    student, teacher, _ = pair()
    criterion = KDDETR(student, teacher)
    student_logits = torch.randn(2, 1, 2, 3, requires_grad=True)
    boxes = torch.tensor([[[[0.5, 0.5, 0.2, 0.2], [0.3, 0.4, 0.2, 0.1]]]] * 2, requires_grad=True)
    terms = criterion.point_terms("general", student_logits, boxes, teacher_logits, boxes[-1].detach() * 0.9)
    sum(terms.values()).backward()
    assert teacher_logits.grad is None
    # the weights come from the teacher: changing the student's logits leaves the box terms unchanged
    other = criterion.point_terms("general", student_logits * 5, boxes, teacher_logits, boxes[-1].detach() * 0.9)
    assert torch.equal(other["loss_kdd_general_l1"], terms["loss_kdd_general_l1"])


def hand_pair():
    """Two student layers, 2 images, 2 points, 3 classes, by hand."""
    s_logits = torch.tensor([[[[1.0, 0.0, -1.0], [0.2, 0.3, 0.1]], [[-0.5, 2.0, 0.0], [0.0, 0.0, 0.0]]],
                             [[[2.0, -1.0, 0.5], [0.1, -0.3, 0.4]], [[1.0, 1.0, -2.0], [3.0, 0.0, 0.0]]]])
    t_logits = torch.tensor([[[3.0, -2.0, 0.0], [-1.0, -1.5, -2.0]], [[0.0, 4.0, 1.0], [-4.0, -3.0, -5.0]]])
    s_boxes = torch.tensor([[[[0.5, 0.5, 0.4, 0.3], [0.2, 0.3, 0.1, 0.2]], [[0.6, 0.4, 0.2, 0.2], [0.5, 0.5, 0.9, 0.9]]],
                            [[[0.45, 0.55, 0.35, 0.3], [0.25, 0.3, 0.15, 0.2]], [[0.7, 0.4, 0.3, 0.2], [0.5, 0.4, 0.6, 0.8]]]])
    t_boxes = torch.tensor([[[0.5, 0.5, 0.3, 0.3], [0.8, 0.8, 0.2, 0.2]], [[0.65, 0.45, 0.25, 0.2], [0.1, 0.1, 0.1, 0.1]]])
    return s_logits, s_boxes, t_logits, t_boxes


def by_hand(s_logits, s_boxes, t_logits, t_boxes, temperature, per_image: bool = True, weighting: bool = True):
    num_layers, batch, points, classes = s_logits.shape
    cls = l1 = giou = 0.0
    weights = {(b, p): (max(1 / (1 + math.exp(-float(v))) for v in t_logits[b, p]) if weighting else 1.0)
               for b in range(batch) for p in range(points)}
    weight_sum = sum(weights.values())
    for layer in range(num_layers):
        layer_l1 = layer_giou = 0.0
        for b in range(batch):
            for p in range(points):
                t = [float(v) / temperature for v in t_logits[b, p]]
                s = [float(v) / temperature for v in s_logits[layer, b, p]]
                pt = [math.exp(v) / sum(math.exp(u) for u in t) for v in t]
                ps = [math.exp(v) / sum(math.exp(u) for u in s) for v in s]
                kl = sum(a * (math.log(a) - math.log(c)) for a, c in zip(pt, ps)) / classes  # mean over classes
                w = weights[b, p]
                cls += w * temperature**2 * kl
                layer_l1 += w * sum(abs(float(u) - float(v)) for u, v in zip(s_boxes[layer, b, p], t_boxes[b, p]))
                xyxy = box_convert(torch.stack([s_boxes[layer, b, p], t_boxes[b, p]]), "cxcywh", "xyxy")
                layer_giou += w * (1 - float(generalized_box_iou(xyxy[:1], xyxy[1:])[0, 0]))
        l1 += layer_l1 / weight_sum
        giou += layer_giou / weight_sum
    return {"cls": cls / (batch if per_image else 1), "l1": l1, "giou": giou}


def as_output(logits, boxes, point_set):
    refs = torch.zeros_like(boxes)
    return SimpleNamespace(extra={point_set: QueryPassOutput(layer_logits=logits, layer_boxes=boxes, layer_references=refs)})


@pytest.mark.parametrize("variant,weighting,temperature", [("kdlab", True, 10.0), ("official", True, 10.0),
                                                           ("kdlab", False, 2.0)])
def test_losses_by_hand(variant, weighting, temperature):
    student, teacher, _ = pair()
    criterion = KDDETR(student, teacher, specific=False, variant=variant, weighting=weighting, temperature=temperature)
    s_logits, s_boxes, t_logits, t_boxes = hand_pair()
    # the teacher's output has three layers: only its final one is the target
    t_layers = torch.stack([torch.randn_like(t_logits), torch.randn_like(t_logits), t_logits])
    t_box_layers = torch.stack([t_boxes.flip(-1), t_boxes.flip(-1), t_boxes])
    terms = criterion(as_output(s_logits, s_boxes, "general"), as_output(t_layers, t_box_layers, "general"), [])
    expected = by_hand(s_logits, s_boxes, t_logits, t_boxes, temperature, per_image=variant == "kdlab",
                       weighting=weighting)
    # the released code's box term is the mean over the four coordinates (its kd_loss.py), kdlab's the L1
    # norm of the paper's equation and DETR's loss_bbox: a quarter of it
    expected["l1"] = expected["l1"] / 4 if variant == "official" else expected["l1"]
    for key in ("cls", "l1", "giou"):
        assert terms[f"loss_kdd_general_{key}"].item() == pytest.approx(expected[key], rel=1e-5), key
    assert expected["l1"] > 0


def test_identical_outputs_give_zero_and_missing_passes_are_named():
    student, teacher, _ = pair()
    criterion = KDDETR(student, teacher, specific=False)
    s_logits, s_boxes, t_logits, t_boxes = hand_pair()
    same = as_output(t_logits[None].expand(2, -1, -1, -1), t_boxes[None].expand(2, -1, -1, -1), "general")
    terms = criterion(same, as_output(t_logits[None], t_boxes[None], "general"), [])
    assert all(abs(v.item()) < 1e-5 for v in terms.values()), terms  # GIoU in float32: ~4e-6
    with pytest.raises(ValueError, match="the student's output has no 'general' query pass"):
        criterion(SimpleNamespace(extra={}), same, [])


def test_empty_targets_give_finite_losses():
    _, _, task = pair()
    images, targets = batch(empty=True)
    terms = task(images, targets)
    assert all(torch.isfinite(v) for v in terms.values())
    weighted_total(terms, task.weight_dict).backward()


def test_matched_baseline_pairs_permuted_predictions():
    student, teacher, _ = pair()
    criterion = MatchedQueryKD(student, teacher)
    generator = torch.Generator().manual_seed(0)
    t_logits = torch.randn(1, 8, 3, generator=generator) * 3
    t_boxes = torch.cat([torch.rand(1, 8, 2, generator=generator) * 0.5 + 0.25,
                         torch.rand(1, 8, 2, generator=generator) * 0.2 + 0.1], dim=-1)
    perm = torch.randperm(8, generator=generator)
    teacher_out = SimpleNamespace(pred_logits=t_logits, pred_boxes=t_boxes, matches=None)
    # one student layer predicting the teacher's set in another query order: Hungarian pairs recover it
    student_out = SimpleNamespace(pred_logits=t_logits[:, perm], layer_logits=t_logits[:, perm][None],
                                  layer_boxes=t_boxes[:, perm][None])
    terms = criterion(student_out, teacher_out, [{}])
    assert all(v.item() < 1e-5 for v in terms.values()), terms
    (student_idx, teacher_idx), = criterion.pairs(t_logits[:, perm], t_boxes[:, perm], teacher_out, [{}])
    assert torch.equal(perm[student_idx], teacher_idx)
    # per query index (what KD-DETR's shared points make correct), the same sets disagree
    assert (t_boxes[:, perm] - t_boxes).abs().sum() > 0


def test_matched_baseline_ground_truth_pairing_in_a_task():
    student, teacher = tiny_detr(seed=0).train(), tiny_detr(seed=1, hidden_dim=48)
    task = build_distillation("detr_matched_kd", student, teacher, {"pairing": "ground_truth"})
    images, targets = batch()
    terms = task(images, targets)
    assert {"loss_mkd_cls", "loss_mkd_l1", "loss_mkd_giou"} <= terms.keys()
    assert all(torch.isfinite(v) for v in terms.values())
    terms = task(*batch(empty=True))  # no GT: nothing paired, zero terms
    assert all(terms[k].item() == 0 for k in ("loss_mkd_cls", "loss_mkd_l1", "loss_mkd_giou"))


def test_a_dense_model_is_refused_in_one_line():
    detr = tiny_detr()
    gfl = build_detector("gfl", 3, backbone="resnet18", backbone_width=8, fpn_channels=16, head_convs=1)
    for method, (student, teacher), who in [("kd_detr", (detr, gfl), "teacher"), ("kd_detr", (gfl, detr), "student"),
                                            ("detr_matched_kd", (detr, gfl), "teacher")]:
        with pytest.raises(ValueError) as err:
            build_distillation(method, student, teacher)
        message = str(err.value)
        assert "\n" not in message and f"the {who} is a GFL (dense output)" in message and "set" in message
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        KDDETR(tiny_detr(1), tiny_detr(1, seed=1))
    assert any("one class" in str(w.message) for w in caught)


def run_config(data_root, output_dir, teacher_path, **changes):
    import dataclasses

    from kdlab.config import TrainConfig

    options = {k: v for k, v in TINY.items() if k not in ("backbone", "backbone_width", "backbone_norm")}
    cfg = TrainConfig(data_root=str(data_root), min_size=64, max_size=64, batch_size=4, num_workers=0,
                      model="dab_detr", backbone="resnet18", backbone_width=8, backbone_norm="gn",
                      detector_options=options, optimizer="adamw", lr=1e-4, base_batch_size=4, epochs=1,
                      backbone_lr_mult=0.1, warmup_iters=1, grad_clip=0.1, log_every=1, eval_every=0, max_iters=3,
                      output_dir=str(output_dir), distill="kd_detr", distill_options={"num_general": 6},
                      teacher_checkpoint=str(teacher_path))
    return dataclasses.replace(cfg, **changes)


@pytest.mark.slow
def test_engine_trains_checkpoints_and_resumes_exactly(tiny_shapes, tmp_path):
    import yaml

    from kdlab.cli import main
    from kdlab.engine import read_metrics, safe_load, train
    from kdlab.engine.checkpoint import export_student

    teacher_path = tmp_path / "teacher.pt"
    teacher_cfg = run_config(tiny_shapes, tmp_path, teacher_path, distill=None, distill_options={},
                             teacher_checkpoint=None)
    torch.manual_seed(1)
    teacher = build_detector("dab_detr", 8, **teacher_cfg.model_options()).eval()
    export_student(teacher_path, teacher_cfg, 8, [f"c{i}" for i in range(8)], teacher)

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="coco_metrics: no detections")
        train(run_config(tiny_shapes, tmp_path / "whole", teacher_path), progress=False)
        # the interrupted run through the CLI: 2 iterations, then --resume to 3
        config = tmp_path / "kd.yaml"
        config.write_text(yaml.safe_dump(run_config(tiny_shapes, tmp_path / "parts", teacher_path).to_dict()))
        assert main(["train", str(config), "--no-progress", "--set", "max_iters=2"]) == 0
        assert safe_load(tmp_path / "parts" / "last.pt")["iteration"] == 2
        assert main(["train", str(config), "--no-progress", "--resume"]) == 0
    whole, parts = safe_load(tmp_path / "whole" / "last.pt"), safe_load(tmp_path / "parts" / "last.pt")
    assert whole["iteration"] == parts["iteration"] == 3
    assert not any(k.startswith("teacher.") for k in whole["task"])
    assert whole["task"].keys() == parts["task"].keys()
    assert all(torch.equal(whole["task"][k], parts["task"][k]) for k in whole["task"])
    records = [{k: v for k, v in r.items() if k != "sec_per_iter"} for r in read_metrics(tmp_path / "whole" / "metrics.jsonl")]
    resumed = [{k: v for k, v in r.items() if k != "sec_per_iter"} for r in read_metrics(tmp_path / "parts" / "metrics.jsonl")]
    assert records == resumed and "loss_kdd_general_l1" in records[0] and "loss_kdd_specific_cls" in records[0]


REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


def test_shapes_config_is_the_student_config_plus_kd_detr():
    import inspect

    from kdlab.config import load_config

    student, kd = load_config(REPO / "configs/shapes_dab_detr_student.yaml"), load_config(REPO / "configs/shapes_kd_detr_student.yaml")
    distill_keys = {"distill", "distill_options", "teacher_checkpoint", "teacher_config", "output_dir"}
    assert {k: v for k, v in student.to_dict().items() if k not in distill_keys} == \
        {k: v for k, v in kd.to_dict().items() if k not in distill_keys}
    defaults = {name: p.default for name, p in inspect.signature(KDDETR.__init__).parameters.items()}
    changed = {k: v for k, v in kd.distill_options.items() if defaults[k] != v}
    assert kd.distill == "kd_detr" and changed == {"num_general": student.detector_options["num_queries"]}
    assert kd.teacher_checkpoint == "data/checkpoints/shapes_dab_detr_teacher.pt"


def cli_error(capsys, argv) -> str:
    from kdlab.cli import main

    assert main(argv) != 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("kdlab: error")]
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


def test_config_errors_are_one_line(tiny_shapes, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)  # the config's backbone_weights path is relative to the repository
    base = ["train", "configs/shapes_kd_detr_student.yaml", "--no-progress", "--set", f"data_root={tiny_shapes}",
            f"output_dir={tmp_path / 'run'}"]
    missing = tmp_path / "gone" / "shapes_dab_detr_teacher.pt"
    line = cli_error(capsys, base + [f"teacher_checkpoint={missing}"])
    assert f"{missing} does not exist" in line and "kdlab train configs/shapes_dab_detr_teacher_stage3.yaml" in line
    # each teacher schedule starts from the one before; a missing one names the config that trains it
    stage1 = tmp_path / "gone" / "shapes_dab_detr_teacher_stage1.pt"
    line = cli_error(capsys, ["train", "configs/shapes_dab_detr_teacher_stage2.yaml", "--no-progress", "--set",
                              f"data_root={tiny_shapes}", f"output_dir={tmp_path / 'teacher'}", f"init_checkpoint={stage1}"])
    assert f"init_checkpoint {stage1} does not exist" in line
    assert "kdlab train configs/shapes_dab_detr_teacher.yaml --output-dir runs/shapes_dab_detr_teacher" in line
    stage2 = tmp_path / "gone" / "shapes_dab_detr_teacher_stage2.pt"
    line = cli_error(capsys, ["train", "configs/shapes_dab_detr_teacher_stage3.yaml", "--no-progress", "--set",
                              f"data_root={tiny_shapes}", f"output_dir={tmp_path / 'teacher3'}", f"init_checkpoint={stage2}"])
    assert f"init_checkpoint {stage2} does not exist" in line and "kdlab train configs/shapes_dab_detr_teacher_stage2.yaml" in line
    line = cli_error(capsys, base + ["teacher_checkpoint=data/checkpoints/shapes_gfl_teacher.pt"])
    assert "distill='kd_detr'" in line and "KD-DETR distils set detectors; the teacher is a GFL (dense output)" in line
    line = cli_error(capsys, base + ["teacher_checkpoint=data/checkpoints/shapes_gfl_teacher.pt", "distill_options.variant=paper"])
    assert "distill_options.variant must be one of 'kdlab', 'official'" in line


def test_experiment_rows_and_missing_teacher(capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("kd_detr_shapes", REPO / "experiments" / "kd_detr_shapes.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    base = {"num_general": 50, "temperature": 10.0}
    assert script.variant_fields("student", base)["distill"] is None
    assert script.variant_fields("general", base)["distill_options"] == {**base, "specific": False}
    assert script.variant_fields("matched", base) == {"distill": "detr_matched_kd", "distill_options": {},
                                                      "teacher_checkpoint": str(script.TEACHER_CHECKPOINT)}
    for variant in script.DISTILLED:  # every row's options are valid options of its method
        from kdlab.engine.build import check_distill_options

        fields = script.variant_fields(variant, base if script.VARIANTS[variant][1] == "kd_detr" else {})
        check_distill_options(METHODS[fields["distill"]], fields["distill_options"], method=fields["distill"])
    if not script.TEACHER_CHECKPOINT.is_file():
        with pytest.raises(SystemExit):
            script.parse_args(["--quick"])
        assert "kdlab train configs/shapes_dab_detr_teacher.yaml" in capsys.readouterr().err
