"""The README's main job (`kdlab demo`) end to end on a tiny shapes set, two iterations per run."""

import json

import pytest

from kdlab.demo import TEACHER_CHECKPOINT, run_demo


@pytest.mark.slow
def test_demo_runs_teacher_student_and_ld(tiny_shapes, tmp_path, capsys):
    if not TEACHER_CHECKPOINT.is_file():
        pytest.skip(f"{TEACHER_CHECKPOINT} is absent (the demo would train a teacher first)")
    rows = run_demo(tmp_path / "demo", str(tiny_shapes), overrides=["epochs=1", "max_iters=2"], progress=False)
    out = capsys.readouterr().out
    assert "teacher: the project's shipped checkpoint" in out and "shapes_gfl_teacher.pt" in out  # says it reuses it
    assert "evaluating the teacher on the 8 validation images" in out
    assert "a single run's AP moves by about 1 point between CPUs" in out
    names = list(rows)
    assert names[0].startswith("teacher") and names[1].startswith("student alone")
    assert any("LD" in n for n in names[2:])
    for metrics in rows.values():
        assert set(metrics) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
        assert metrics["APl"] is None  # no shapes object is larger than 96 x 96: undefined, not 0.0
        assert all(0.0 <= v <= 1.0 for v in metrics.values() if v is not None)
    saved = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert set(saved) == set(rows) and saved[names[0]]["AP"] == pytest.approx(rows[names[0]]["AP"])
    table = (tmp_path / "demo" / "results.md").read_text()
    assert all(name in table for name in names) and "|    – |" in table
    assert (tmp_path / "demo" / "detections.png").stat().st_size > 10_000
