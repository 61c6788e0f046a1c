"""Why GID full scores below GID feature-only on shapes: each weighted term's size and pull on the student.

On shapes the RetinaNet student gains +3.7 AP from GID's feature term alone and +2.9 from all three
terms (``experiments/results/gid_shapes.md``). This script trains the GID RetinaNet student with
GID full (``configs/shapes_gid_retinanet_student.yaml``, its own schedule) for a few hundred
iterations and, every ``--every`` iterations, takes the gradient of each *weighted* term separately
with respect to the student's parameters (backbone + FPN, and head), before the ordinary step:

- the term's weighted value;
- the norm of its gradient on the backbone + FPN (where the feature and relation terms act: they
  read RoIAligned FPN features) and on the head;
- on the backbone + FPN, that norm relative to the detection loss's, and the cosine of the term's
  gradient with the detection loss's (> 0: it helps the detection loss descend; ~0: it pushes the
  features somewhere the detection loss does not care about) and with the feature term's;
- the norm ratio and cosine on the whole student.

The optimiser is AdamW, which normalises each parameter's step by its gradient's running RMS: what
counts is how each term's gradient compares with the others' on the same parameters, not its
absolute size. A term whose gradient is many times the detection loss's on the backbone decides the
backbone's update direction.

    python experiments/gid_terms.py                    # 300 iterations, measured every 25
    python experiments/gid_terms.py --iters 100 --every 10

    python experiments/gid_terms.py --config configs/shapes_gid_faster_rcnn_student.yaml --iters 250

Outputs: ``--out``/``results.{json,md}`` (default ``outputs/gid_terms``; every measurement and the
means over measurements); ``--publish`` also writes ``experiments/results/gid_terms.{json,md}``
(``gid_terms_<model>.{json,md}`` for a student other than RetinaNet).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from any directory without installing kdlab
    sys.path.insert(0, str(REPO))

from kdlab.config import load_config  # noqa: E402
from kdlab.engine.build import build_datasets, build_loader, build_task, named_trainable_parameters  # noqa: E402
from kdlab.engine.distributed import DistContext, resolve_device, seed_everything  # noqa: E402
from kdlab.engine.experiment import add_output_arguments, write_results  # noqa: E402
from kdlab.engine.optim import build_lr_scheduler, build_optimizer  # noqa: E402
from kdlab.models.base import weighted_total  # noqa: E402

RELATIVE = "grad norm / detection's (backbone+FPN)"


def term_groups(task, terms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{"detection": weighted sum of the detection terms, GID term: its weighted value}``."""
    detection = {k: v for k, v in terms.items() if k in task.criterion.weight_dict}
    groups = {"detection": weighted_total(detection, task.criterion.weight_dict)}
    weights = task.weight_dict
    for name, value in terms.items():
        if name not in detection and weights.get(name, 0) > 0:
            groups[name] = weights[name] * value
    return groups


def measure_terms(task, groups: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """Per term: weighted value; gradient norm on the backbone + FPN and on the head; on the backbone
    + FPN (where the feature and relation terms act) the norm relative to the detection loss's and
    the cosine with the detection loss's and with the feature term's gradient; the same two on the
    whole student."""
    named = [(n, p) for n, p in task.student.named_parameters() if p.requires_grad]
    in_backbone = torch.tensor([n.startswith("backbone.") for n, _ in named])
    params = [p for _, p in named]
    whole: dict[str, torch.Tensor] = {}
    backbone: dict[str, torch.Tensor] = {}
    stats: dict[str, dict[str, float]] = {}
    for name, value in groups.items():
        grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
        grads = [(torch.zeros_like(p) if g is None else g).flatten().float() for g, p in zip(grads, params)]
        whole[name] = torch.cat(grads)
        backbone[name] = torch.cat([g for g, inside in zip(grads, in_backbone) if inside])
        head = torch.cat([g for g, inside in zip(grads, in_backbone) if not inside])
        stats[name] = {"value": value.item(), "grad norm backbone+FPN": backbone[name].norm().item(),
                       "grad norm head": head.norm().item()}

    def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
        return torch.nn.functional.cosine_similarity(a, b, dim=0).item()

    for name in groups:
        stats[name][RELATIVE] = stats[name]["grad norm backbone+FPN"] / max(backbone["detection"].norm().item(), 1e-12)
        stats[name]["cos detection (backbone+FPN)"] = cosine(backbone[name], backbone["detection"])
        if "loss_gid_feature" in backbone:
            stats[name]["cos feature term (backbone+FPN)"] = cosine(backbone[name], backbone["loss_gid_feature"])
        stats[name]["grad norm / detection's (whole student)"] = whole[name].norm().item() / max(whole["detection"].norm().item(), 1e-12)
        stats[name]["cos detection (whole student)"] = cosine(whole[name], whole["detection"])
    return stats


def train_and_measure(cfg, iterations: int, every: int) -> list[dict]:
    device = resolve_device(cfg.device)
    ctx = DistContext(0, 1, 0, device)
    seed_everything(cfg.seed, cfg.deterministic, device)
    train_set, _ = build_datasets(cfg)
    task = build_task(cfg, train_set.num_classes).to(device).train()
    loader = build_loader(train_set, cfg, ctx, train=True)
    optimizer = build_optimizer(named_trainable_parameters(task), cfg, 1)
    scheduler = build_lr_scheduler(optimizer, cfg, loader.batch_sampler.batches_per_epoch())
    torch.manual_seed(cfg.seed)
    records, iteration = [], 0
    while iteration < iterations:
        for images, targets in loader:
            terms = task(images.to(device), [{k: v.to(device) if isinstance(v, torch.Tensor) else v
                                              for k, v in t.items()} for t in targets])
            if iteration % every == 0 or iteration == iterations - 1:
                records.append({"iteration": iteration, "lr": optimizer.param_groups[0]["lr"],
                                "terms": measure_terms(task, term_groups(task, terms))})
                print(f"iteration {iteration}: " + ", ".join(
                    f"{k} {v[RELATIVE]:.2f}x cos {v['cos detection (backbone+FPN)']:+.2f}"
                    for k, v in records[-1]["terms"].items() if k != "detection"), flush=True)
            total = weighted_total(terms, task.weight_dict)
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            if cfg.grad_clip is not None:
                norm = torch.nn.utils.clip_grad_norm_(task.trainable_parameters(), cfg.grad_clip)
                if records and records[-1]["iteration"] == iteration:
                    records[-1]["total grad norm"] = float(norm)
            optimizer.step()
            scheduler.step()
            iteration += 1
            if iteration >= iterations:
                break
    return records


def summary(records: list[dict], first: int = 0) -> dict[str, dict[str, float]]:
    """Mean over the measurements from iteration ``first`` on of every term's statistics."""
    kept = [r for r in records if r["iteration"] >= first] or records
    names = kept[0]["terms"].keys()
    return {name: {key: statistics.mean(r["terms"][name][key] for r in kept) for key in kept[0]["terms"][name]}
            for name in names}


def markdown(results: dict) -> str:
    keys = ["value", "grad norm backbone+FPN", "grad norm head", RELATIVE, "cos detection (backbone+FPN)",
            "cos feature term (backbone+FPN)", "grad norm / detection's (whole student)", "cos detection (whole student)"]
    lines = [f"{results['iterations']} training iterations of `{results['config']}`, measured every "
             f"{results['every']} (lr warm-up: the first {results['warmup_iters']}). Weighted values; gradients "
             "with respect to the student's parameters.", ""]
    for title, table in (("all measurements", results["mean"]),
                         (f"after the warm-up (iteration >= {results['warmup_iters']})", results["mean_after_warmup"])):
        lines += [f"### mean over {title}", "", "| term | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
        for name, stats in table.items():
            lines.append(f"| {name} | " + " | ".join(f"{stats[k]:.3g}" if k in stats else "–" for k in keys) + " |")
        lines.append("")
    clipped = [r["total grad norm"] for r in results["records"] if "total grad norm" in r]
    if clipped:
        lines.append(f"Total gradient norm before clipping at {results['grad_clip']}: median "
                     f"{statistics.median(clipped):.3g}, max {max(clipped):.3g}.")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "shapes_gid_retinanet_student.yaml")
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--every", type=int, default=25)
    add_output_arguments(parser, "gid_terms", REPO)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = load_config(args.config)
    cfg = dataclasses.replace(cfg, device=args.device, num_workers=0,
                              data_root=str(args.data_root or REPO / cfg.data_root),
                              teacher_checkpoint=str(REPO / cfg.teacher_checkpoint))
    records = train_and_measure(cfg, args.iters, args.every)
    results = {"config": str(args.config.relative_to(REPO) if args.config.is_relative_to(REPO) else args.config),
               "iterations": args.iters, "every": args.every, "warmup_iters": cfg.warmup_iters,
               "grad_clip": cfg.grad_clip, "weights": {k: v for k, v in cfg.distill_options.items() if k.endswith("weight")},
               "mean": summary(records), "mean_after_warmup": summary(records, cfg.warmup_iters), "records": records}
    family = {"retinanet": "RetinaNet", "fcos": "FCOS", "faster_rcnn": "Faster R-CNN"}.get(cfg.model, cfg.model)
    # the RetinaNet measurement is experiments/results/gid_terms.*; another student's gets its own name
    name = "gid_terms" if cfg.model == "retinanet" else f"gid_terms_{cfg.model}"
    write_results(results, [markdown(results)], f"GID's terms against the detection loss ({family} student, shapes, "
                  "GID full)", args.out, name, REPO, args.publish)
    return 0


if __name__ == "__main__":
    sys.exit(main())
