"""The benchmark scripts' measuring machinery (their timings are printed, never asserted)."""

import importlib.util
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
        assert row["student_img_s"] > 0 and row["distilled_img_s"] > 0 and 0 < row["teacher_share"] < 1
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
