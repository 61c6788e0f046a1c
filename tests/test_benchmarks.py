"""The benchmark scripts' measuring machinery (their timings are printed, never asserted)."""

import importlib.util
import math
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def load_benchmark(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gid_terms_alone_stop_at_the_student_outputs():
    bench = load_benchmark("bench_gid_overhead")
    from kdlab.distill.gid import GID
    from kdlab.models.base import weighted_total

    torch.manual_seed(0)
    small = dict(backbone="resnet18", backbone_width=8, backbone_norm="gn", fpn_channels=16, head_convs=1)
    student = bench.retinanet(bench.NUM_CLASSES, **small)
    teacher = bench.retinanet(bench.NUM_CLASSES, **{**small, "fpn_channels": 32})
    gid = GID(student, teacher, min_size=2.0).train()
    images, targets = bench.make_batch(2, 64, torch.device("cpu"))
    sizes = [(64, 64)] * 2
    with torch.no_grad():
        teacher_out = teacher(images, sizes)
    student_out = bench.cut_from_graph(student(images, sizes, targets))
    loss = weighted_total(gid(student_out, teacher_out, targets), gid.weight_dict)
    loss.backward()
    # the backward reached the cut maps and head outputs, the adapter, and nothing of the student
    assert all(f.grad is not None for f in student_out.features[:1])
    assert student_out.cls_logits.grad is not None and student_out.box_regression.grad is not None
    assert gid.adapter.weight.grad is not None
    assert all(p.grad is None for p in student.parameters())

    spent = bench.staged_forward(gid, bench.cut_from_graph(student_out), teacher_out, targets, torch.device("cpu"))
    stages = [name for name in bench.STAGES if name in spent]
    assert {"GISM", "RoIAlign (both)", "relation loss", "response mask"} <= set(stages)
    # the timed stages do not nest, so together they cannot take longer than the whole forward
    assert sum(spent[name] for name in stages) + spent["adapter"] <= spent["all terms"]
    # the module's functions are restored afterwards
    import kdlab.distill.gid as gid_module
    from kdlab.distill.gism import select_general_instances
    assert gid_module.select_general_instances is select_general_instances
    assert "forward" not in vars(gid.adapter)


def test_bench_gpu_runs_on_cpu_and_says_no_gpu_is_present(capsys):
    """The GPU benchmark's machinery at 96 px on the CPU: a kdlab teacher (self-LD) and a torchvision one (DRKD)."""
    bench = load_benchmark("bench_gpu")
    rows = bench.main(["--device", "cpu", "--size", "96", "--warmup", "0", "--iters", "1",
                       "--configs", "coco_self_ld_gfl_r18_1x", "coco_drkd_retinanet_r50_2x"])
    out = capsys.readouterr().out
    assert "NOTE: no GPU in use" in out and "MFU is not computed" in out
    assert [r["config"] for r in rows] == ["coco_self_ld_gfl_r18_1x", "coco_drkd_retinanet_r50_2x"]
    for row in rows:
        # timings are figures for a person (one timed step here, on a possibly busy CPU): only that they were
        # measured is asserted; the share's bound is checked on FLOPs, which do not depend on the machine's load
        assert row["student_img_s"] > 0 and row["distilled_img_s"] > 0
        assert math.isfinite(row["teacher_share"]) and row["teacher_share"] > 0
        assert 0 < row["teacher_tflop_per_forward"] < row["distilled_tflop_per_step"]
        # the distilled step counts the student's forward + backward and the teacher's forward, at least
        assert row["distilled_tflop_per_step"] > row["student_tflop_per_step"]
        assert row["distilled_tflop_per_step"] >= row["student_tflop_per_step"] + 0.99 * row["teacher_tflop_per_forward"]
        assert row["student_mfu"] is None and row["distilled_mfu"] is None
    assert "| coco_drkd_retinanet_r50_2x | 2 x 96x96 |" in out


def test_bf16_peaks_match_the_longest_device_name():
    bench = load_benchmark("bench_gpu")
    from unittest import mock

    cuda = torch.device("cuda", 0)
    for name, peak in [("NVIDIA H200", 989.0), ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0),
                       ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A10", 125.0), ("NVIDIA L40S", 362.0),
                       ("NVIDIA L4", 121.0), ("Tesla V100-SXM2-16GB", None)]:
        with mock.patch.object(torch.cuda, "get_device_name", return_value=name):
            assert bench.bf16_peak_tflops(cuda) == peak, name
    assert bench.bf16_peak_tflops(torch.device("cpu")) is None
    assert bench.bf16_peak_tflops(torch.device("cpu"), override=100.0) == 100.0


def test_drkd_terms_alone_train_drkd_modules_and_not_the_student():
    bench = load_benchmark("bench_drkd_overhead")
    from kdlab.distill.drkd import DRKD
    from kdlab.models.base import weighted_total

    torch.manual_seed(0)
    small = dict(backbone="resnet18", backbone_width=8, backbone_norm="gn", fpn_channels=16, head_convs=1)
    student = bench.retinanet(bench.NUM_CLASSES, **small)
    teacher = bench.retinanet(bench.NUM_CLASSES, **{**small, "fpn_channels": 32}).eval().requires_grad_(False)
    drkd = DRKD(student, teacher, num_nodes=4, num_state=8).train()
    images, targets = bench.make_batch(2, 64, torch.device("cpu"))
    sizes = [(64, 64)] * 2
    with torch.no_grad():
        teacher_out = teacher(images, sizes)
    student_out = bench.cut_from_graph(student(images, sizes, targets))
    weighted_total(drkd(student_out, teacher_out, targets), drkd.weight_dict).backward()
    # the backward reached the cut FPN maps and DRKD's own modules (both networks' units), nothing of the networks
    assert student_out.features[0].grad is not None
    assert all(p.grad is not None for p in drkd.student_graph_units.parameters() if p.requires_grad)
    assert any(p.grad is not None for p in drkd.teacher_graph_units.parameters())
    assert all(p.grad is None for p in student.parameters()) and all(p.grad is None for p in teacher.parameters())
    times = bench.drkd_terms_alone(drkd, student, teacher, images, sizes, targets, torch.device("cpu"), repeats=2, warmup=1)
    assert len(times) == 2 and all(t > 0 for t in times)
    assert all(p.grad is None for p in drkd.parameters())  # cleared after each repeat


def test_kd_detr_passes_alone_decode_what_the_forward_decodes():
    bench = load_benchmark("bench_kd_detr_overhead")
    from kdlab.models import build_detector

    torch.manual_seed(0)
    options = dict(backbone="resnet18", backbone_width=8, backbone_norm="gn", feature_level="C4", hidden_dim=16,
                   num_queries=5, enc_layers=1, dec_layers=2, num_heads=2, dim_feedforward=32)
    model = build_detector("dab_detr", bench.NUM_CLASSES, **options).eval()
    images, _ = bench.make_batch(2, 64, torch.device("cpu"))
    sizes = [(64, 64), (64, 48)]  # the second image padded: the mask matters
    anchors = torch.randn(7, 4)
    with torch.no_grad():
        out = model(images, sizes, extra_queries={"points": anchors})
        pos, mask = bench.memory_inputs(model, out, sizes)
        alone = model.decode(out.memory, pos, mask, anchors.expand(2, -1, -1))
    # the benchmark's separate passes compute exactly the forward's extra pass
    assert torch.equal(alone.layer_boxes, out.extra["points"].layer_boxes)
    assert torch.equal(alone.layer_logits, out.extra["points"].layer_logits)
    assert mask[1].any() and not mask[0].any()
