"""Run records (kdlab.engine.ledger): what identifies a run, and how experiment runs reuse them."""

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import pytest

from kdlab.config import load_config, save_config
from kdlab.engine import experiment, ledger

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def setup(tmp_path):
    """A config on a tiny 'dataset' (two annotation files) with a teacher file, in tmp_path."""
    root = tmp_path / "data"
    (root / "annotations").mkdir(parents=True)
    for split in ("train", "val"):
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps({"split": split}))
    teacher = tmp_path / "teacher.pt"
    teacher.write_bytes(b"teacher weights v1")
    cfg = dataclasses.replace(load_config(REPO / "configs" / "shapes_drkd_retinanet_student.yaml"),
                              data_root=str(root), teacher_checkpoint=str(teacher), device="cpu",
                              output_dir=str(tmp_path / "runs" / "a"))
    return cfg, tmp_path


def test_key_ignores_what_does_not_change_the_run_and_sees_what_does(setup):
    cfg, tmp = setup
    key = ledger.run_key(cfg, "cpu")
    assert len(key) == 64
    # the output folder, loader workers, logging and checkpoint intervals do not change what is trained
    assert ledger.run_key(dataclasses.replace(cfg, output_dir="elsewhere", num_workers=4, log_every=7,
                                              checkpoint_every_iters=100), "cpu") == key
    # the teacher file is identified by its bytes: a copy elsewhere is the same run, new bytes are not
    copy = tmp / "copy" / "teacher.pt"
    copy.parent.mkdir()
    shutil.copy(cfg.teacher_checkpoint, copy)
    assert ledger.run_key(dataclasses.replace(cfg, teacher_checkpoint=str(copy)), "cpu") == key
    copy.write_bytes(b"teacher weights v2")
    assert ledger.run_key(dataclasses.replace(cfg, teacher_checkpoint=str(copy)), "cpu") != key
    # the dataset by its annotation files
    moved = tmp / "moved"
    shutil.copytree(cfg.data_root, moved)
    assert ledger.run_key(dataclasses.replace(cfg, data_root=str(moved)), "cpu") == key
    (moved / "annotations" / "instances_train.json").write_text("{}")
    assert ledger.run_key(dataclasses.replace(cfg, data_root=str(moved)), "cpu") != key
    # the schedule, the seed, the method's options and the device type all do
    for changed in (dataclasses.replace(cfg, seed=1), dataclasses.replace(cfg, lr=0.002),
                    dataclasses.replace(cfg, distill_options={**cfg.distill_options, "pixel_weight": 0.0})):
        assert ledger.run_key(changed, "cpu") != key
    assert ledger.run_key(cfg, "cuda") != key
    expected = "sha256:" + hashlib.sha256(b"teacher weights v1").hexdigest()[:16]
    assert ledger.file_digest(Path(cfg.teacher_checkpoint)) == expected


def test_a_field_added_later_leaves_the_older_keys_alone_until_it_is_set(setup):
    """init_checkpoint came after the first records: at its default it is not part of the key (the key is
    what it was before the field existed); set to a file, the file's bytes are."""
    cfg, tmp = setup
    fields = ledger.key_fields(cfg, "cpu")
    assert "init_checkpoint" not in fields
    before = {k: v for k, v in cfg.to_dict().items() if k != "init_checkpoint" and k not in ledger.IGNORED_FIELDS}
    before.update(device="cpu", data_root=fields["data_root"], teacher_checkpoint=fields["teacher_checkpoint"])
    text = json.dumps(before, sort_keys=True, separators=(",", ":"))
    assert ledger.run_key(cfg, "cpu") == hashlib.sha256(text.encode()).hexdigest()
    start = tmp / "start.pt"
    start.write_bytes(b"weights a")
    key_a = ledger.run_key(dataclasses.replace(cfg, init_checkpoint=str(start)), "cpu")
    start.write_bytes(b"weights b")
    key_b = ledger.run_key(dataclasses.replace(cfg, init_checkpoint=str(start)), "cpu")
    assert len({ledger.run_key(cfg, "cpu"), key_a, key_b}) == 3


class FakeTrain:
    """Stands in for kdlab.engine.loop.train: counts calls, writes the files a finished run leaves."""

    def __init__(self):
        self.calls = []

    def __call__(self, cfg, resume, overwrite, progress):
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.calls.append(cfg.output_dir)
        save_config(cfg, out / "config.yaml")
        metrics = {"AP": 0.1 + cfg.seed / 100, "AP50": 0.2}
        (out / "eval_epoch3.json").write_text(json.dumps({"AP": 0.05}))
        (out / "eval_final.json").write_text(json.dumps(metrics))
        return metrics


def test_run_writes_a_record_and_another_checkout_reuses_it(setup, monkeypatch):
    cfg, tmp = setup
    fake = FakeTrain()
    monkeypatch.setattr(experiment, "train", fake)
    monkeypatch.setattr(experiment, "RUN_SOURCES", experiment.collections.Counter())
    record = tmp / "records" / "student" / "seed0.json"
    first = experiment.run(cfg, record)
    assert fake.calls == [cfg.output_dir] and first["AP"] == pytest.approx(0.1)
    stored = json.loads(record.read_text())
    assert stored["metrics"] == first and stored["key"] == ledger.run_key(cfg, "cpu")
    assert stored["eval_history"] == {"3": {"AP": 0.05}} and stored["seconds"] is not None
    # another checkout: no output folder, another path; the record stands in for the run
    other = dataclasses.replace(cfg, output_dir=str(tmp / "other_checkout" / "a"))
    assert experiment.run(other, record) == first and len(fake.calls) == 1
    # another seed is another run: trained, its record replaces the old one
    assert experiment.run(dataclasses.replace(other, seed=2), record)["AP"] == pytest.approx(0.12)
    assert len(fake.calls) == 2 and json.loads(record.read_text())["config"]["seed"] == 2
    # fresh: trained again although the record holds it
    experiment.run(dataclasses.replace(cfg, seed=2, output_dir=str(tmp / "fresh")), record, fresh=True)
    assert len(fake.calls) == 3
    # a later row reads this run's checkpoint: the record cannot stand in for it
    experiment.run(dataclasses.replace(cfg, seed=2, output_dir=str(tmp / "needs")), record, needs_checkpoint=True)
    assert len(fake.calls) == 4
    assert experiment.RUN_SOURCES == {"trained": 4, "recorded": 1}
    assert experiment.sources_line().startswith("Runs: 4 trained in this invocation; 1 read from run records")


def test_an_identical_run_recorded_by_another_experiment_is_reused_not_retrained(setup, monkeypatch):
    """GID's and DRKD's RetinaNet student alone are one run (same key): the second experiment copies the
    first one's record (naming it in reused_from) instead of training; a different run still trains."""
    cfg, tmp = setup
    fake = FakeTrain()
    monkeypatch.setattr(experiment, "train", fake)
    monkeypatch.setattr(experiment, "RUN_SOURCES", experiment.collections.Counter())
    root = tmp / "runs_root"
    monkeypatch.setattr(experiment, "RECORDS_ROOT", root)
    drkd = root / "drkd_shapes" / "retinanet" / "student" / "seed0.json"
    first = experiment.run(cfg, drkd)
    assert len(fake.calls) == 1
    (root / "drkd_shapes" / "retinanet" / "teacher_cost.json").write_text(json.dumps({"ratio": 0.3}))
    gid = root / "gid_shapes" / "retinanet" / "student" / "seed0.json"
    elsewhere = dataclasses.replace(cfg, output_dir=str(tmp / "gid_out" / "student"))
    assert experiment.run(elsewhere, gid) == first and len(fake.calls) == 1
    copied, original = json.loads(gid.read_text()), json.loads(drkd.read_text())
    assert copied["reused_from"] == "drkd_shapes/retinanet/student/seed0.json"
    assert {k: v for k, v in copied.items() if k != "reused_from"} == original
    assert ledger.read_record(gid, elsewhere, "cpu") is not None
    assert experiment.RUN_SOURCES == {"trained": 1, "recorded": 1}
    # another seed has no identical record anywhere: it trains
    experiment.run(dataclasses.replace(elsewhere, seed=1, output_dir=str(tmp / "gid_out" / "s1")),
                   root / "gid_shapes" / "retinanet" / "student" / "seed1.json")
    assert len(fake.calls) == 2
    assert ledger.find_same_run(root, dataclasses.replace(cfg, seed=5), "cpu") is None
    assert ledger.find_same_run(root, cfg, "cpu", exclude=drkd) == gid


def test_a_finished_folder_gets_its_record_and_bad_records_are_named(setup, monkeypatch):
    cfg, tmp = setup
    monkeypatch.setattr(experiment, "train", FakeTrain())
    experiment.run(cfg)  # no record asked for
    record = tmp / "records" / "r.json"
    # the same run again (its folder is finished): nothing trains, the record is written from the folder
    monkeypatch.setattr(experiment, "train", None)
    assert experiment.run(cfg, record)["AP"] == pytest.approx(0.1)
    assert json.loads(record.read_text())["seconds"] is None
    record.write_text("{not json")
    with pytest.raises(ValueError, match="r.json is not valid JSON"):
        experiment.run(dataclasses.replace(cfg, output_dir=str(tmp / "b")), record)
    record.write_text(json.dumps({"format": 99}))
    with pytest.raises(ValueError, match="expected a kdlab run record"):
        experiment.run(dataclasses.replace(cfg, output_dir=str(tmp / "b")), record)


def test_a_missing_teacher_is_named(setup):
    cfg, tmp = setup
    with pytest.raises(FileNotFoundError, match="teacher_checkpoint .*nope.pt does not exist"):
        experiment.run(dataclasses.replace(cfg, teacher_checkpoint=str(tmp / "nope.pt")))


def test_experiment_arguments_choose_the_records_folder():
    import argparse

    parser = argparse.ArgumentParser()
    experiment.add_run_arguments(parser)
    args = experiment.parse_run_arguments(parser, [], "drkd_shapes", REPO)
    assert args.records == REPO / "experiments" / "results" / "runs" / "drkd_shapes"
    assert experiment.group_records(args, "retinanet") == args.records / "retinanet"
    assert experiment.parse_run_arguments(parser, ["--quick"], "x", REPO).records is None  # a smoke test
    assert experiment.parse_run_arguments(parser, ["--no-records"], "x", REPO).records is None
    assert experiment.parse_run_arguments(parser, ["--records", "/r"], "x", REPO).records == Path("/r")


def test_the_teacher_cost_follows_how_the_method_runs_its_teacher(setup, monkeypatch):
    """DRKD reads only the teacher's FPN maps, so its compute-matched baseline pays for the teacher's backbone
    + FPN; a cached ratio measured with the whole teacher (or before the kind was recorded) is measured again."""
    cfg, tmp = setup
    assert experiment.teacher_forward_kind(cfg) == "features"  # the DRKD student config
    assert experiment.teacher_forward_kind(dataclasses.replace(cfg, distill=None, distill_options={})) == "full"
    assert experiment.teacher_forward_kind(dataclasses.replace(cfg, distill="ld", distill_options={})) == "full"
    assert experiment.teacher_forward_kind(dataclasses.replace(cfg, distill="drkd+fitnet", distill_options={})) == "full"
    # GID reads the teacher's dense stage: a two-stage teacher stops after its RPN, a one-stage one runs whole
    gid = dataclasses.replace(cfg, distill="gid", distill_options={})
    assert experiment.teacher_forward_kind(gid) == "full"
    assert experiment.teacher_forward_kind(dataclasses.replace(gid, model="faster_rcnn")) == "dense"
    assert experiment.teacher_forward_kind(dataclasses.replace(gid, model="fasterrcnn_resnet50_fpn_v2")) == "dense"
    assert experiment.teacher_forward_kind(dataclasses.replace(gid, model="faster_rcnn", distill="drkd+gid")) == "dense"
    assert experiment.teacher_forward_kind(dataclasses.replace(gid, model="faster_rcnn", distill="gid+fitnet")) == "full"
    measured = []
    monkeypatch.setattr(experiment, "teacher_cost_ratio", lambda c, t: measured.append(experiment.teacher_forward_kind(c)) or 0.5)
    cache = tmp / "teacher_cost.json"
    digest = ledger.file_digest(Path(cfg.teacher_checkpoint))
    cache.write_text(json.dumps({"teacher_digest": digest, "ratio": 2.46}))  # an older cache: the whole teacher
    assert experiment.cached_teacher_cost_ratio(cfg, Path(cfg.teacher_checkpoint), cache) == 0.5
    assert json.loads(cache.read_text())["teacher_forward"] == "features" and measured == ["features"]
    assert experiment.cached_teacher_cost_ratio(cfg, Path(cfg.teacher_checkpoint), cache) == 0.5 and len(measured) == 1
    plain = dataclasses.replace(cfg, distill=None, distill_options={})
    assert experiment.cached_teacher_cost_ratio(plain, Path(cfg.teacher_checkpoint), cache) == 0.5
    assert measured == ["features", "full"]
