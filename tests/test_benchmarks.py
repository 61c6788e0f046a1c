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
