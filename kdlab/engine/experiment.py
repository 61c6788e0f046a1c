"""Helpers shared by the experiment scripts (``experiments/*.py``): configs, cached runs, the
compute-matched baseline, tables over seeds, publishing.

Every script trains through :func:`run` (a finished identical run is reused, an interrupted one
resumes), reports mean ± sample std over seeds (:func:`mean_std`, the bare value for one seed), and
on a real run publishes ``experiments/results/<name>.{json,md}`` (:func:`publish`), which the
notebooks read.

A script names its rows (config fields per row) and its groups (families, settings); the rest is here:
:func:`run_groups` (the main loop: seeds per row, ``results.json`` after each group, the tables),
:func:`run_rows` (one student/teacher pair: the teacher's metrics and cost, every row for each seed),
:func:`ensure_teacher`, and the shared arguments (:func:`add_run_arguments`, :func:`parse_run_arguments`).

**Compute-matched baseline.** A distilled step also runs the teacher's forward. The question a
practitioner asks first is whether that compute would do better spent on the student itself:
:func:`teacher_cost_ratio` measures ``r = t(teacher forward) / t(student step)`` on real batches,
and :func:`compute_matched_config` trains the student alone for ``(1 + r)`` times the iterations,
with its epochs and lr steps stretched by the same factor.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from kdlab.config import TrainConfig, load_config
from kdlab.engine.checkpoint import atomic_save_json, load_detector
from kdlab.engine.loop import train
from kdlab.eval import format_metric

METRICS = ("AP", "AP50", "AP75", "APs", "APm")
# how this process's runs were obtained: "trained", "folder" (finished in its output folder), "recorded" (run record)
RUN_SOURCES: collections.Counter = collections.Counter()
# every experiment's run records: a run missing from its own experiment's records is looked up here by key
# (another experiment may have trained the identical run, e.g. a student alone two methods share)
RECORDS_ROOT = Path(__file__).resolve().parents[2] / "experiments" / "results" / "runs"


def make_config(base: Path, fields: dict) -> TrainConfig:
    """``base`` YAML with ``fields`` replaced (validated again by ``TrainConfig``)."""
    return dataclasses.replace(load_config(base), **fields)


def run(cfg: TrainConfig, record: Path | None = None, fresh: bool = False,
        needs_checkpoint: bool = False) -> dict[str, float | None]:
    """Train ``cfg`` unless an identical finished run exists; resume an identical interrupted one.

    Args:
        cfg: the run.
        record: its run record (:mod:`kdlab.engine.ledger`): reused when it holds a run of ``cfg``, written
            when the run finishes (or found finished in its folder); None: no record. When it does not hold
            this run but another experiment's record under :data:`RECORDS_ROOT` does (same key: the identical
            run), that record is copied here (``reused_from`` names it) and nothing trains.
        fresh: ignore an existing record (it is overwritten when the run finishes).
        needs_checkpoint: a later run reads this run's ``student.pt`` (a self-distilled row): a record
            cannot stand in for it, the run trains when its folder lacks the checkpoint.
    """
    from kdlab.engine import ledger
    from kdlab.engine.distributed import resolve_device

    out = Path(cfg.output_dir)
    final, saved = out / "eval_final.json", out / "config.yaml"
    same = saved.is_file() and load_config(saved).to_dict() == cfg.to_dict()
    device_type = resolve_device(cfg.device).type
    if same and final.is_file():
        metrics = json.loads(final.read_text())
        if record is not None and (fresh or ledger.read_record(record, cfg, device_type) is None):
            ledger.write_record(record, cfg, device_type, metrics, seconds=None)
        RUN_SOURCES["folder"] += 1
        return metrics
    if cfg.teacher_checkpoint is not None and not Path(cfg.teacher_checkpoint).is_file():
        raise FileNotFoundError(f"{out}: teacher_checkpoint {cfg.teacher_checkpoint} does not exist")
    if record is not None and not fresh and not (needs_checkpoint and not (out / "student.pt").is_file()):
        stored = ledger.read_record(record, cfg, device_type)
        if stored is not None:
            print(f"  {out}: AP {format_metric(stored['metrics'].get('AP'))} from the run record "
                  f"{record} ({stored.get('finished')}, commit {stored.get('kdlab_commit')})", flush=True)
            RUN_SOURCES["recorded"] += 1
            return stored["metrics"]
        same_run = ledger.find_same_run(RECORDS_ROOT, cfg, device_type, exclude=record)
        if same_run is not None:
            stored = ledger.reuse_record(same_run, record, RECORDS_ROOT)
            print(f"  {out}: AP {format_metric(stored['metrics'].get('AP'))} from the run record {same_run} of the "
                  f"identical run (same key), copied to {record}", flush=True)
            RUN_SOURCES["recorded"] += 1
            return stored["metrics"]
        if record.is_file():
            print(f"  {record}: a record of another run (differs in "
                  f"{', '.join(ledger.differing_fields(record, cfg, device_type))}); training", flush=True)
    if out.exists() and not same and any(out.iterdir()):
        raise FileExistsError(f"{out} holds a run with another config; remove it or choose another --out")
    start = time.time()
    resume = same and (out / "last.pt").is_file()
    # the same config without a checkpoint: a run that stopped before its first save, started over
    metrics = train(cfg, resume=resume, overwrite=not resume, progress=False)
    seconds = time.time() - start
    print(f"  {out}: AP {format_metric(metrics['AP'])} ({seconds:.0f} s)", flush=True)
    if record is not None:
        ledger.write_record(record, cfg, device_type, metrics, seconds=None if resume else seconds)
    RUN_SOURCES["trained"] += 1
    return metrics


def sources_line() -> str:
    """Where this invocation's runs came from (:data:`RUN_SOURCES`), as a sentence for a results table."""
    from kdlab.engine.ledger import provenance_line

    return provenance_line(RUN_SOURCES["trained"], RUN_SOURCES["folder"], RUN_SOURCES["recorded"])


def relative_to(path: Path | str, root: Path) -> str:
    """``path`` relative to ``root`` when inside it, else as given (published results carry no machine paths)."""
    try:
        return str(Path(path).resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


def teacher_metrics(cfg: TrainConfig, checkpoint: Path, cache: Path) -> dict[str, float]:
    """COCO metrics of the teacher ``checkpoint`` on ``cfg``'s validation data (cached in ``cache``)."""
    from kdlab.data import build_dataset
    from kdlab.engine.build import build_loader
    from kdlab.engine.distributed import DistContext, resolve_device
    from kdlab.engine.evaluation import evaluate

    from kdlab.engine.ledger import file_digest

    stamp = file_digest(checkpoint)
    if cache.is_file() and json.loads(cache.read_text()).get("checkpoint_digest") == stamp:
        return json.loads(cache.read_text())["metrics"]
    device = resolve_device(cfg.device)
    dataset = build_dataset(cfg.data_root, cfg.val_split, train=False, min_size=cfg.min_size, max_size=cfg.max_size)
    loader = build_loader(dataset, cfg, DistContext(0, 1, 0, device), train=False)
    metrics = evaluate(load_detector(checkpoint, device), loader, device, amp=cfg.amp)
    cache.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_json({"checkpoint": str(checkpoint), "checkpoint_digest": stamp, "metrics": metrics}, cache)
    return metrics


def is_two_stage(model: str | None) -> bool:
    """Whether the detector named ``model`` (a :data:`kdlab.models.DETECTORS` name) is a two-stage one."""
    return model is not None and (model == "faster_rcnn" or model.startswith("fasterrcnn_"))


def teacher_forward_kind(cfg: TrainConfig) -> str:
    """How ``cfg``'s distillation runs its teacher (:meth:`kdlab.distill.base.DistillationTask.teacher_forward`):
    ``"features"`` when every method reads only the teacher's FPN maps (``teacher_features_only``, e.g. DRKD:
    the teacher stops after its FPN); ``"dense"`` when they read at most its dense stage
    (``teacher_dense_only``, GID) and the teacher is two-stage (it stops after its RPN; a one-stage
    teacher's dense stage is its full forward); else ``"full"``."""
    from kdlab.distill import METHODS, method_options

    if cfg.distill is None:
        return "full"
    methods = [METHODS[name] for name in method_options(cfg.distill, cfg.distill_options)]
    if all(m.teacher_features_only for m in methods):
        return "features"
    dense = all(m.teacher_features_only or m.teacher_dense_only for m in methods)
    needs_targets = any(m.teacher_needs_targets for m in methods)
    return "dense" if dense and not needs_targets and is_two_stage(cfg.teacher_model or cfg.model) else "full"


def teacher_cost_ratio(student_cfg: TrainConfig, teacher_checkpoint: Path, rounds: int = 8, warmup: int = 2) -> float:
    """``r = t(teacher forward) / t(student training step)``, medians over ``rounds`` interleaved
    measurements on real training batches of ``student_cfg`` (this process's threads and device). The
    teacher runs as ``student_cfg``'s distillation runs it (:func:`teacher_forward_kind`): only to its FPN
    (or its RPN) for a method that reads nothing more, so the compute-matched baseline pays what the method
    pays."""
    from kdlab.data import build_dataset
    from kdlab.data.transforms import image_sizes_of
    from kdlab.engine.build import build_loader, build_student
    from kdlab.engine.distributed import DistContext, resolve_device
    from kdlab.models.base import DetectionTask, weighted_total

    device = resolve_device(student_cfg.device)
    dataset = build_dataset(student_cfg.data_root, student_cfg.train_split, train=True, min_size=student_cfg.min_size,
                            max_size=student_cfg.max_size, seed=student_cfg.seed)
    loader = build_loader(dataset, dataclasses.replace(student_cfg, num_workers=0), DistContext(0, 1, 0, device), train=True)
    torch.manual_seed(student_cfg.seed)
    task = DetectionTask(build_student(student_cfg, dataset.num_classes)).to(device).train()
    teacher = load_detector(teacher_checkpoint, device).eval()
    optimizer = torch.optim.SGD(task.trainable_parameters(), lr=1e-6)
    kind = teacher_forward_kind(student_cfg)
    teacher_call = {"features": teacher.forward_features, "dense": teacher.forward_dense}.get(kind, teacher)

    def endless():  # the loader again and again: a small set may have fewer than warmup + rounds batches
        while True:
            yield from loader

    batches = endless()
    student_times, teacher_times = [], []
    for step in range(warmup + rounds):
        images, targets = next(batches)
        images = images.to(device)
        targets = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in t.items()} for t in targets]
        start = time.perf_counter()
        loss = weighted_total(task(images, targets), task.weight_dict)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        _synchronize(device)
        middle = time.perf_counter()
        with torch.no_grad():
            teacher_call(images, image_sizes_of(targets))
        _synchronize(device)
        if step >= warmup:
            student_times.append(middle - start)
            teacher_times.append(time.perf_counter() - middle)
    return statistics.median(teacher_times) / statistics.median(student_times)


def cached_teacher_cost_ratio(student_cfg: TrainConfig, teacher_checkpoint: Path, cache: Path) -> float:
    """:func:`teacher_cost_ratio`, measured once and stored in ``cache`` (JSON, with the teacher file's digest
    and how the teacher ran: a cache of the other kind is measured again).

    The compute-matched runs' length depends on it: a later invocation of the same experiment must
    find the same value, or its finished compute-matched runs would no longer match their configs.
    """
    from kdlab.engine.ledger import file_digest

    digest, kind = file_digest(teacher_checkpoint), teacher_forward_kind(student_cfg)
    if cache.is_file():
        stored = json.loads(cache.read_text())
        if stored.get("teacher_digest") == digest and stored.get("teacher_forward", "full") == kind:
            return float(stored["ratio"])
    ratio = teacher_cost_ratio(student_cfg, teacher_checkpoint)
    cache.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_json({"teacher_checkpoint": relative_to(teacher_checkpoint, Path.cwd()), "teacher_digest": digest,
                      "teacher_forward": kind, "ratio": ratio, "threads": torch.get_num_threads(),
                      "device": str(student_cfg.device)}, cache)
    return ratio


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compute_matched_config(cfg: TrainConfig, ratio: float, iters_per_epoch: int) -> TrainConfig:
    """The student alone trained ``(1 + ratio)`` times as long as ``cfg``: iterations, epochs and lr
    steps stretched by that factor (warm-up unchanged), nothing distilled.

    The iterations are matched exactly; the lr steps are epoch indices, so each stretched step is rounded
    to a whole epoch. Where ``ratio`` is small and the run short, the rounding moves a step noticeably:
    steps ``[4, 5]`` of 6 epochs become ``[5, 6]`` of 8 at ratio 0.29 but ``[5, 7]`` of 8 at 0.32, and on the
    shapes Faster R-CNN student those two schedules end about 1 AP apart (17.0 and 18.1, 3 seeds each).

    Args:
        cfg: the student's configuration (its distillation fields are cleared).
        ratio: the teacher's forward cost per student step (:func:`teacher_cost_ratio`).
        iters_per_epoch: batches per epoch of ``cfg``'s training set.
    """
    factor = 1.0 + ratio
    total = round(factor * (cfg.max_iters or cfg.epochs * iters_per_epoch))
    return dataclasses.replace(
        cfg, distill=None, distill_options={}, teacher_checkpoint=None, teacher_config=None, max_iters=total,
        epochs=math.ceil(total / iters_per_epoch), lr_steps=[round(factor * s) for s in cfg.lr_steps])


def ensure_teacher(label: str, checkpoint: Path | None, teacher_config: Path, fields: dict, out: Path) -> Path:
    """``checkpoint`` when it exists, else the teacher trained first (:func:`run`, seed 0) from
    ``teacher_config`` with ``fields`` into ``out``: its exported ``out/student.pt``."""
    if checkpoint is not None and checkpoint.is_file():
        return checkpoint
    print(f"[{label}] training the teacher ({teacher_config.name})", flush=True)
    run(make_config(teacher_config, {**fields, "output_dir": str(out), "seed": 0}))
    return out / "student.pt"


def run_rows(label: str, student_config: Path, fields: dict, variants: list[str], seeds: dict[str, list[int]],
             row_fields: Callable[[str, int, TrainConfig], dict], checkpoint: Path, out: Path,
             teacher_cost: float | None = None, records: Path | None = None, fresh: bool = False,
             checkpoint_rows: tuple[str, ...] = ()) -> dict:
    """One student/teacher pair of an experiment: the teacher's metrics, its cost (when a ``compute_matched``
    row runs), then every row for each of its seeds.

    Args:
        label: the pair's name in the printed lines.
        student_config, fields: every run's config: the YAML with ``fields`` replaced, then the seed, the
            output folder ``out/<row>/seed<s>`` and ``row_fields(row, seed, base)`` (``base``: the config
            before any row, e.g. to read its ``distill_options``).
        variants, seeds: the rows, and each row's seeds; at each seed the student alone runs first (a
            self-distilled row reads it).
        checkpoint: the teacher (exported ``student.pt``).
        out: the pair's folder (``teacher_eval.json``, ``teacher_cost.json`` and the runs).
        teacher_cost: the teacher-forward / student-step ratio; None: measured once and cached
            (:func:`cached_teacher_cost_ratio`, in ``records`` when given, so that every checkout trains the
            same compute-matched runs). The ``compute_matched`` row trains ``1 + ratio`` as long.
        records, fresh: the pair's run records folder (``records/<row>/seed<s>.json``, :func:`run`) or None;
            ``fresh``: train every run again even where a record holds it.
        checkpoint_rows: rows whose ``student.pt`` a later row reads (trained where only a record has them).

    Returns:
        ``{"teacher": metrics, "teacher_cost_ratio": ratio or None, "runs": {row: {seed: metrics}},
        "table": {row: {metric: [mean, std]}}}`` (:func:`mean_std`).
    """
    from kdlab.data import build_dataset

    base = make_config(student_config, fields)
    teacher = teacher_metrics(base, checkpoint, out / "teacher_eval.json")
    ratio = iters_per_epoch = None
    if "compute_matched" in variants:
        ratio = teacher_cost if teacher_cost is not None else cached_teacher_cost_ratio(
            base, checkpoint, (records or out) / "teacher_cost.json")
        print(f"[{label}] teacher forward / student step = {ratio:.2f}", flush=True)
        train_set = build_dataset(base.data_root, base.train_split, train=False, min_size=base.min_size,
                                  max_size=base.max_size)
        iters_per_epoch = math.ceil(len(train_set) / base.batch_size)
    runs: dict[str, dict[int, dict[str, float]]] = {v: {} for v in variants}
    for seed in sorted({s for v in variants for s in seeds[v]}):
        for variant in sorted((v for v in variants if seed in seeds[v]), key=lambda v: v != "student"):
            cfg = make_config(student_config, {**fields, "seed": seed, "output_dir": str(out / variant / f"seed{seed}"),
                                               **row_fields(variant, seed, base)})
            if variant == "compute_matched":
                cfg = compute_matched_config(cfg, ratio, iters_per_epoch)
            record = None if records is None else records / variant / f"seed{seed}.json"
            runs[variant][seed] = run(cfg, record, fresh, needs_checkpoint=variant in checkpoint_rows)
    return {"teacher": teacher, "teacher_cost_ratio": ratio, "runs": runs,
            "table": {v: {m: list(c) for m, c in mean_std(by_seed).items()} for v, by_seed in runs.items()}}


def student_alone_fields() -> dict:
    """The config fields of a run of the student alone (nothing distilled, no teacher)."""
    return {"distill": None, "distill_options": {}, "teacher_checkpoint": None, "teacher_config": None}


def mean_std(runs: dict[int, dict[str, float]], metrics: tuple[str, ...] = METRICS) -> dict[str, tuple[float, float | None]]:
    """``{metric: (mean, sample std)}`` in % over the seeds; the std is None for one seed (no spread
    was measured, so none is claimed). An undefined metric (``None``) stays ``None``."""
    cells = {}
    for metric in metrics:
        values = [100 * m[metric] for m in runs.values() if m.get(metric) is not None]
        if not values:
            cells[metric] = (None, None)
            continue
        cells[metric] = (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else None)
    return cells


def cell(mean: float | None, std: float | None) -> str:
    """``mean ± std`` to one decimal, the bare value for a single seed, ``–`` when undefined."""
    if mean is None:
        return "–"
    return f"{mean:.1f}" if std is None else f"{mean:.1f} ± {std:.1f}"


def parse_seeds_for(items: list[str], keys: set[str]) -> dict[str, list[int]]:
    """``["KEY=S,S", ...]`` (a script's ``--seeds-for``) -> ``{KEY: [S, S]}``.

    Raises:
        ValueError: a key outside ``keys``, no seeds, or a seed that is not an integer.
    """
    seeds_for = {}
    for item in items:
        key, _, seeds = item.partition("=")
        if key not in keys or not seeds:
            raise ValueError(f"--seeds-for expects KEY=S[,S...] with KEY one of {sorted(keys)}, got {item!r}")
        try:
            seeds_for[key] = [int(s) for s in seeds.split(",")]
        except ValueError:
            raise ValueError(f"--seeds-for: seeds must be integers, got {item!r}") from None
    return seeds_for


def seeds_per_row(key: str, variants: list[str], seeds: list[int], seeds_for: dict[str, list[int]],
                  quick: bool = False) -> dict[str, list[int]]:
    """Each row's seeds: ``seeds_for["KEY/ROW"]``, else ``seeds_for["KEY"]``, else ``seeds``; a smoke test
    (``quick``) runs ``seeds`` everywhere."""
    if quick:
        return {v: list(seeds) for v in variants}
    key_seeds = seeds_for.get(key, seeds)
    return {v: seeds_for.get(f"{key}/{v}", key_seeds) for v in variants}


def parse_teacher_costs(items: list[str], names, kind: str) -> dict[str, float]:
    """``["NAME=R", ...]`` (a script's ``--teacher-cost``) -> ``{NAME: R}``.

    Raises:
        ValueError: an item that is not ``NAME=R`` with NAME one of ``names`` (a ``kind``: FAMILY, SETTING)
            and R a number.
    """
    costs = {}
    for item in items:
        name, _, ratio = item.partition("=")
        if name not in names:
            raise ValueError(f"--teacher-cost expects {kind}=R with {kind} one of {sorted(names)}, got {items}")
        costs[name] = float(ratio)
    return costs


def ensure_shapes(root: Path) -> None:
    """Generate the default shapes set into ``root`` unless it is there."""
    from kdlab.data import make_shapes

    if not (root / "annotations").is_dir():
        print(f"generating the shapes dataset into {root}", flush=True)
        make_shapes(root)


def write_results(results: dict, sections: list[str], title: str, out: Path, name: str, repo: Path,
                  publish_to_repo: bool) -> str:
    """``out/results.{json,md}`` (the markdown: the sections under ``title``), printed; with
    ``publish_to_repo`` (a real run) also ``experiments/results/<name>.{json,md}`` (:func:`publish`).
    Returns the markdown."""
    text = f"## {title}\n\n" + "\n\n".join(sections) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    atomic_save_json(results, out / "results.json")
    (out / "results.md").write_text(text)
    if publish_to_repo:
        publish(results, text, name, repo)
    print(text)
    return text


def shapes_run_fields(args: argparse.Namespace, data_root: Path) -> dict:
    """:func:`run_fields` of a script's ``args`` on the shapes set at ``data_root`` (generated first when absent)."""
    ensure_shapes(data_root)
    return {**run_fields(args.device, args.quick, args.max_iters, args.num_workers), "data_root": str(data_root)}


def run_fields(device: str, quick: bool, max_iters: int | None, num_workers: int | None) -> dict:
    """Config fields shared by every run of a script: the device; ``quick`` (a smoke test): one epoch,
    no lr steps, evaluation at the end only; ``max_iters`` and ``num_workers`` when given."""
    fields: dict = {"device": device}
    if quick:
        fields.update(epochs=1, lr_steps=[], eval_every=0)
    if max_iters is not None:
        fields["max_iters"] = max_iters
    if num_workers is not None:
        fields["num_workers"] = num_workers
    return fields


def add_run_arguments(parser: argparse.ArgumentParser, quick_help: str = "smoke test: seed 0 only, 1 epoch",
                      data_root: bool = True) -> None:
    """The arguments every training experiment takes (after its own): ``--quick``, ``--max-iters``,
    ``--data-root`` (with ``data_root``), ``--device``, ``--num-workers``, ``--out``."""
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--max-iters", type=int, default=None, help="stop every run after this many iterations")
    if data_root:
        parser.add_argument("--data-root", type=Path, default=None, help="another shapes set (default: the configs')")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--num-workers", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--records", type=Path, default=None,
                        help="run records folder (default experiments/results/runs/<experiment>; none for a smoke test)")
    parser.add_argument("--no-records", action="store_true", help="neither read nor write run records")
    parser.add_argument("--fresh", action="store_true",
                        help="train every run again even where a run record holds it (and overwrite the record)")


def parse_run_arguments(parser: argparse.ArgumentParser, argv: list[str] | None, name: str, repo: Path) -> argparse.Namespace:
    """``parser``'s arguments, with ``smoke`` (``--quick`` or ``--max-iters``: a smoke test, not a result),
    ``--out`` by default ``outputs/<name>`` (``outputs/<name>_quick`` for a smoke test) and ``records``: the
    run records folder (:mod:`kdlab.engine.ledger`), ``experiments/results/runs/<name>`` by default, None
    for a smoke test or with ``--no-records``."""
    args = parser.parse_args(argv)
    args.smoke = args.quick or args.max_iters is not None
    if args.out is None:
        args.out = repo / "outputs" / (f"{name}_quick" if args.smoke else name)
    if args.no_records or (args.smoke and args.records is None):
        args.records = None  # a smoke test is not a result: it neither reads nor leaves records
    elif args.records is None:
        args.records = repo / "experiments" / "results" / "runs" / name
    return args


def group_records(args: argparse.Namespace, group: str) -> Path | None:
    """The run records folder of one group of an experiment (``args.records / group``), or None."""
    return None if args.records is None else args.records / group


def run_groups(args: argparse.Namespace, key: str, groups: dict[str, list[str]], labels: dict[str, str],
               run_group: Callable[[str, list[str], dict[str, list[int]]], dict],
               markdown: Callable[[str, dict, str], str], title: str, name: str, repo: Path,
               row_seeds: Callable[[str, list[str], list[int]], dict[str, list[int]]] | None = None,
               every_group: list[str] | None = None) -> dict:
    """An experiment's main loop: for each group (a family, a setting) and its rows, the rows' seeds
    (``row_seeds``, by default :func:`seeds_per_row` of ``args.seeds_for``), ``run_group(group, rows, seeds)``
    (its part of the results, ``results[key][group]``) and ``markdown(group, part, note)``; ``results.json``
    after each group, then :func:`write_results` (published on a real run: not on a smoke test, nor on a
    :func:`partial_selection` of rows or seeds; a default run of some of the
    groups, ``every_group`` the groups a default run covers, publishes them with :func:`complete_groups`)."""
    seeds = [args.seeds[0]] if args.quick else args.seeds
    note = " — SMOKE TEST, not a result" if args.smoke else ""
    results = {"seeds": seeds, "smoke_test": args.smoke, "variants": labels, key: {}}
    sections = []
    for group, variants in groups.items():
        if row_seeds is None:
            chosen = seeds_per_row(group, variants, seeds, args.seeds_for, args.quick)
        else:
            chosen = row_seeds(group, variants, seeds)
        print(f"[{group}] seeds {chosen} -> {args.out / group}", flush=True)
        results[key][group] = part = run_group(group, variants, chosen)
        part["seeds"] = chosen
        sections.append(markdown(group, part, note))
        atomic_save_json(results, args.out / "results.json")
    partial = partial_selection(args, labels)
    publishing = not args.smoke and not partial
    if publishing and every_group is not None:
        sections = complete_groups(results, key, every_group, sections, markdown,
                                   repo / "experiments" / "results" / f"{name}.json", args.records is not None)
    if partial and not args.smoke:
        print(f"a partial selection ({partial}): results in {args.out}; experiments/results/{name}.* not changed "
              "(a run of every row with the default seeds publishes)", flush=True)
    results["run_sources"] = dict(RUN_SOURCES)
    sections.append(sources_line())
    write_results(results, sections, title, args.out, name, repo, publishing)
    return results


def complete_groups(results: dict, key: str, every_group: list[str], sections: list[str],
                    markdown: Callable[[str, dict, str], str], published: Path, from_records: bool = True) -> list[str]:
    """A default run of some of an experiment's groups (e.g. ``--settings shapes``) publishes those groups.

    Each other group keeps its part from the published file when that part was made with run records
    (``part["from_records"]``: a later default run reproduces it from them); otherwise it is listed in
    ``results["pending"]`` and in the markdown's last section (a part published before run records existed
    may come from older code, and is not carried over). ``from_records``: whether this run's parts are.
    Parts are put in ``every_group``'s order; returns the markdown sections in that order.
    """
    run_now = dict(zip(results[key], sections))
    for part in results[key].values():
        part["from_records"] = from_records
    previous = json.loads(published.read_text()).get(key, {}) if published.is_file() else {}
    parts, ordered, pending = {}, [], []
    for group in every_group:
        if group in run_now:
            parts[group] = results[key][group]
            ordered.append(run_now[group])
        elif previous.get(group, {}).get("from_records"):
            parts[group] = previous[group]
            ordered.append(markdown(group, previous[group], " (as published before; not run in this invocation)"))
        else:
            pending.append(group)
    for group in results[key]:  # a group beyond the default ones (e.g. BCCD chosen where it is optional)
        if group not in parts:
            parts[group] = results[key][group]
            ordered.append(run_now[group])
    results[key] = parts
    if pending:
        results["pending"] = pending
        ordered.append("Not in this table yet (no run of the current code): " + ", ".join(pending) + ".")
    return ordered


DEFAULT_SEEDS = [0, 1, 2]  # every experiment script's default --seeds (the scripts read it from here)


def partial_selection(args: argparse.Namespace, labels: dict[str, str],
                      groups: tuple[str, list[str]] | None = None) -> str:
    """What restricts a run to part of its experiment, or ``""``: a partial run must not overwrite the
    published tables. Partial: a subset of the rows (``--variants``), of the groups when ``groups`` is given
    (the option's name and the groups a default run covers, e.g. ``("settings", [...])``; :func:`run_groups`
    does not pass it: a default run of some groups publishes them, :func:`complete_groups`), seeds other than
    the default ones or seeds given explicitly where the default gives some rows more
    (``args.seeds_given``), or ``--seeds-for``."""
    reasons = []
    if groups is not None:
        option, every = groups
        chosen = list(getattr(args, option, every))
        if set(chosen) != set(every):
            reasons.append(f"--{option} " + " ".join(chosen))
    if set(getattr(args, "variants", labels)) != set(labels):
        reasons.append("--variants " + " ".join(args.variants))
    seeds = list(getattr(args, "seeds", DEFAULT_SEEDS))
    if seeds != DEFAULT_SEEDS or getattr(args, "seeds_given", False):
        reasons.append("--seeds " + " ".join(map(str, seeds)))
    if getattr(args, "seeds_for_list", None):
        reasons.append("--seeds-for " + " ".join(args.seeds_for_list))
    return ", ".join(reasons)


def add_output_arguments(parser: argparse.ArgumentParser, name: str, repo: Path) -> None:
    """The last arguments of a measurement script: ``--data-root``, ``--device`` (cpu), ``--out``
    (``outputs/<name>``) and ``--publish`` (also ``experiments/results/<name>.{json,md}``)."""
    parser.add_argument("--data-root", type=Path, default=None, help="another shapes set (default: the config's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=repo / "outputs" / name)
    parser.add_argument("--publish", action="store_true", help=f"also write experiments/results/{name}.{{json,md}}")


def results_table(title: str, teacher: dict[str, float] | None, runs: dict[str, dict[int, dict[str, float]]],
                  labels: dict[str, str], metrics: tuple[str, ...] = METRICS) -> list[str]:
    """Markdown lines of one table: the teacher, then a row per variant of ``runs`` (seeds, mean ± sample
    std of each metric over its seeds, AP of each seed); ``labels`` names the variants."""
    lines = [f"### {title}", "", "| run | seeds | " + " | ".join(metrics) + " | AP per seed |",
             "|---|---|" + "---|" * len(metrics) + "---|"]
    if teacher is not None:
        lines.append("| teacher | - | " + " | ".join(
            cell(None if teacher.get(m) is None else 100 * teacher[m], None) for m in metrics) + " | |")
    for variant, by_seed in runs.items():
        cells = mean_std(by_seed, metrics)
        per_seed = ", ".join(f"{100 * by_seed[s]['AP']:.1f}" for s in sorted(by_seed, key=int))
        lines.append(f"| {labels[variant]} | {len(by_seed)} | " + " | ".join(cell(*cells[m]) for m in metrics)
                     + f" | {per_seed} |")
    return lines


def comparison_lines(runs: dict[str, dict[int, dict[str, float]]], labels: dict[str, str], distilled: list[str],
                     baseline: str = "student", matched: str = "compute_matched",
                     notes: dict[str, str] | None = None) -> list[str]:
    """One line per distilled variant: its mean AP against the student alone (followed by ``notes[variant]``
    when given) and, when that row exists, against the compute-matched student, saying plainly whether it
    beats it.

    Means are over each row's own seeds; the seeds both rows share are named when they differ.
    """
    def mean_ap(variant: str) -> float:
        return mean_std(runs[variant], ("AP",))["AP"][0]

    lines = []
    for variant in distilled:
        if variant not in runs or baseline not in runs:
            continue
        text = f"- {labels[variant]}: {mean_ap(variant) - mean_ap(baseline):+.1f} AP over the student alone"
        text += (notes or {}).get(variant, "")
        if matched in runs:
            versus = mean_ap(variant) - mean_ap(matched)
            text += f", {versus:+.1f} over the compute-matched student ({'beats it' if versus > 0 else 'does NOT beat it'})"
        lines.append(text)
    return lines


def publish(results: dict, text: str, name: str, repo: Path) -> Path:
    """Write ``experiments/results/<name>.{json,md}`` (tracked in git, read by the notebooks)."""
    published = repo / "experiments" / "results"
    published.mkdir(parents=True, exist_ok=True)
    atomic_save_json(results, published / f"{name}.json")
    (published / f"{name}.md").write_text(text)
    print(f"published to {published}/{name}.{{json,md}}")
    return published


def published_parts(results: dict) -> dict[str, dict]:
    """The per-setting parts of a published experiment JSON (``experiments/results/<name>.json``), for readers.

    Returns ``{setting: part}`` from the ``settings`` key (``datasets`` or ``families`` in the files of older
    scripts), each part's ``runs`` re-keyed ``{row: {int seed: metrics}}`` (JSON stores the seeds as
    strings); every other field of a part is kept as published.
    """
    parts = results.get("settings") or results.get("datasets") or results.get("families") or {}
    return {name: {**part, "runs": {row: {int(seed): metrics for seed, metrics in by_seed.items()}
                                    for row, by_seed in part.get("runs", {}).items()}}
            for name, part in parts.items()}


def ap_by_seed(by_seed: dict[int, dict[str, float | None]], metric: str = "AP") -> dict[int, float]:
    """``{seed: metric in %}`` of one row's runs, leaving out seeds where the metric is undefined."""
    return {seed: 100 * m[metric] for seed, m in sorted(by_seed.items()) if m.get(metric) is not None}


def paired_ap_differences(runs: dict[str, dict[int, dict]], row: str, base: str, metric: str = "AP") -> dict[int, float]:
    """``{seed: metric(row) - metric(base)}`` in % over the seeds both rows ran (a paired comparison: each seed
    shares its initialisation and data order between rows)."""
    a, b = ap_by_seed(runs[row], metric), ap_by_seed(runs[base], metric)
    return {seed: a[seed] - b[seed] for seed in sorted(set(a) & set(b))}


def describe_difference(diffs: dict[int, float], noise: float | None = None) -> str:
    """A plain-words reading of paired differences (:func:`paired_ap_differences`): the mean, on how many
    seeds it is positive, each seed's value, and whether the mean is resolved — larger than ``noise`` (AP
    points; default: the sample std of the differences themselves) — and of one sign on every seed. One
    seed: no spread, said so."""
    mean = statistics.mean(diffs.values())
    if len(diffs) == 1:
        return f"{mean:+.1f} AP (one seed: no spread measured, suggestive at most)"
    if noise is None:
        noise = statistics.stdev(diffs.values())
    better = sum(d > 0 for d in diffs.values())
    text = (f"{mean:+.1f} AP, better on {better} of {len(diffs)} seeds "
            f"({', '.join(f'{d:+.1f}' for d in diffs.values())})")
    if abs(mean) <= noise:
        return text + ": within the seed spread, no effect resolved"
    if 0 < better < len(diffs):
        return text + ": the sign changes between seeds"
    return text
