"""The training loop: ``train(cfg)`` trains a detector (or distils one) and evaluates it.

One iteration (DETR's loop, with the pieces of a detection recipe)::

    terms = task(images, targets)                       # {name: unweighted loss}
    total = sum_k weight_dict[k] * terms[k]             # weighted_total
    total.backward(); clip_grad_norm_(max_norm); optimizer.step(); lr_scheduler.step()

Under DDP each of the ``W`` processes runs this on its own ``batch_size`` images; loss
normalisers go through ``reduce_mean`` and DDP averages the gradients, so the update equals one
process with ``W * batch_size`` images. Files (``config.yaml``, ``metrics.jsonl``, ``last.pt``,
``eval_epoch{N}.json``, ``eval_final.json``, ``student.pt``) are written by rank 0 only.

``train(cfg, resume=True)`` continues from ``last.pt`` exactly: same weights, optimiser state,
lr, data order (the sampler restarts at the saved batch of the saved epoch), augmentation
(seeded per sample and epoch by the dataset) and torch RNG state, so the losses are those of an
uninterrupted run.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from kdlab.config import TrainConfig, save_config
from kdlab.engine.build import build_datasets, build_loader, build_task, named_trainable_parameters
from kdlab.engine.checkpoint import (CheckpointError, atomic_save, atomic_save_json, export_student,
                                     load_training_state, training_state)
from kdlab.engine.distributed import DistContext, cleanup_distributed, init_distributed, seed_everything
from kdlab.engine.evaluation import evaluate
from kdlab.engine.interrupt import StepGuard, TrainingInterrupted
from kdlab.engine.logging import MetricLogger
from kdlab.engine.optim import build_lr_scheduler, build_optimizer
from kdlab.engine.rundir import OutputDirError, claim_output_dir
from kdlab.models.base import weighted_total
from kdlab.utils.dist import all_gather_object, reduce_mean

# Keys whose change between an interrupted run and its resumption does not change the result.
RESUME_FREE_KEYS = {"output_dir", "max_iters", "num_workers", "log_every", "eval_every",
                    "checkpoint_every_iters", "device"}


def train(cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False, skip_bad_images: bool = False,
          progress: bool = True) -> dict[str, float | None]:
    """Train ``cfg``'s task on ``cfg``'s data; evaluate every ``eval_every`` epochs and at the end.

    Args:
        cfg: the run's configuration.
        resume: continue from ``cfg.output_dir/last.pt`` (exactly, see the module docstring).
        overwrite: replace a run already in ``cfg.output_dir`` (without it, or ``resume``, a
            folder holding a run is refused: see :mod:`kdlab.engine.rundir`).
        skip_bad_images: leave out image files that fail the start-up check instead of stopping.
        progress: show a tqdm progress bar (rank 0 only).

    Returns:
        The final COCO metrics ``{"AP", "AP50", "AP75", "APs", "APm", "APl"}`` of the student
        (``None`` where undefined).

    Raises:
        FloatingPointError: the total loss became NaN/inf (the message names the iteration,
            the epoch and every term's value).
        TrainingInterrupted: Ctrl-C; ``last.pt`` holds the state after the last whole step.
        OutputDirError: ``cfg.output_dir`` is in use by another run, or holds a run and neither
            ``resume`` nor ``overwrite`` was given.
    """
    ctx = init_distributed(cfg.device)
    try:
        with _owned_output_dir(cfg, ctx, resume=resume, overwrite=overwrite) as output_dir:
            return _train(cfg, ctx, output_dir, resume=resume, skip_bad_images=skip_bad_images, progress=progress)
    finally:
        cleanup_distributed(ctx)


@contextlib.contextmanager
def _owned_output_dir(cfg: TrainConfig, ctx: DistContext, *, resume: bool, overwrite: bool) -> Iterator[Path]:
    """Rank 0 claims ``cfg.output_dir`` (:func:`claim_output_dir`); every rank learns whether it could."""
    with contextlib.ExitStack() as stack:
        error = None
        if ctx.is_main:
            try:
                stack.enter_context(claim_output_dir(cfg.output_dir, resume=resume, overwrite=overwrite))
            except (OutputDirError, CheckpointError) as err:
                error = err
        if ctx.distributed:
            error = all_gather_object(error)[0]
        if error is not None:
            raise error
        yield Path(cfg.output_dir)


def _train(cfg: TrainConfig, ctx: DistContext, output_dir: Path, *, resume: bool, skip_bad_images: bool,
           progress: bool) -> dict[str, float | None]:
    seed_everything(cfg.seed, cfg.deterministic, ctx.device)
    train_set, val_set = build_datasets(cfg, check_images=True, skip_bad_images=skip_bad_images, announce=ctx.is_main)
    task = build_task(cfg, train_set.num_classes, getattr(train_set, "label_to_cat_id", None)).to(ctx.device)
    train_loader = build_loader(train_set, cfg, ctx, train=True)
    val_loader = build_loader(val_set, cfg, ctx, train=False)
    iters_per_epoch = train_loader.batch_sampler.batches_per_epoch()
    optimizer = build_optimizer(named_trainable_parameters(task), cfg, ctx.world_size)
    scheduler = build_lr_scheduler(optimizer, cfg, iters_per_epoch)

    epoch, start_batch, iteration, window = 0, 0, 0, None
    if resume:
        state = load_training_state(output_dir / "last.pt")
        _restore(state, task, optimizer, scheduler, cfg, ctx, output_dir / "last.pt")
        epoch, start_batch, iteration = state["epoch"], state["batch_in_epoch"], state["iteration"]
        window = state.get("log_window")
    else:
        torch.manual_seed(cfg.seed + ctx.rank)  # per-rank stream for random layers (dropout)
    model: nn.Module = task
    if ctx.distributed:
        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        model = DistributedDataParallel(task, device_ids=device_ids, find_unused_parameters=cfg.find_unused_parameters)
    logger = MetricLogger(output_dir, cfg.log_every, task.weight_dict, enabled=ctx.is_main,
                          resume_iteration=iteration if resume else None, window=window)
    if ctx.is_main:
        save_config(cfg, output_dir / "config.yaml")

    # where a resumed run would continue: (epoch, batch in the epoch); updated only between whole steps
    position = saved = (epoch, start_batch)

    def save(next_epoch: int, next_batch: int) -> None:
        nonlocal saved
        rng_states = all_gather_object(_rng_state(ctx.device))  # collective: every rank calls save
        if ctx.is_main:
            state = training_state(task, optimizer, scheduler, epoch=next_epoch, batch_in_epoch=next_batch,
                                   iteration=iteration, cfg=cfg, num_classes=train_set.num_classes,
                                   class_names=train_set.class_names, rng_states=rng_states,
                                   log_window=logger.window_state(), category_ids=train_set.label_to_cat_id)
            atomic_save(state, output_dir / "last.pt")
        saved = (next_epoch, next_batch)

    stop_at = cfg.epochs * iters_per_epoch if cfg.max_iters is None else min(cfg.max_iters, cfg.epochs * iters_per_epoch)
    metrics, metrics_iteration = None, -1
    with StepGuard() as guard:
        try:
            while epoch < cfg.epochs and iteration < stop_at:
                if hasattr(train_set, "set_epoch"):
                    train_set.set_epoch(epoch)
                train_loader.batch_sampler.set_epoch(epoch, start_batch)
                model.train()
                batch_index = start_batch
                bar = tqdm(total=iters_per_epoch, initial=start_batch, desc=f"epoch {epoch}",
                           disable=not (progress and ctx.is_main), dynamic_ncols=True)
                for images, targets in train_loader:
                    with guard.step():  # a first Ctrl-C waits for the end of this step
                        lr = optimizer.param_groups[0]["lr"]
                        values = train_step(model, task.weight_dict, images, targets, optimizer, cfg, ctx,
                                            where=f"iteration {iteration + 1} (epoch {epoch}, batch {batch_index})")
                        scheduler.step()
                        iteration, batch_index = iteration + 1, batch_index + 1
                        logger.update(iteration, epoch, lr, values)
                        position = (epoch, batch_index) if batch_index < iters_per_epoch else (epoch + 1, 0)
                    bar.update(1)
                    bar.set_postfix(loss=f"{values['total']:.4f}", lr=f"{lr:.2e}")
                    if iteration >= stop_at:
                        break
                    if cfg.checkpoint_every_iters and iteration % cfg.checkpoint_every_iters == 0 and batch_index < iters_per_epoch:
                        save(epoch, batch_index)
                bar.close()
                if batch_index < iters_per_epoch:  # stopped early by max_iters
                    save(epoch, batch_index)
                    break
                epoch, start_batch = epoch + 1, 0
                save(epoch, 0)
                if (cfg.eval_every and epoch % cfg.eval_every == 0) or epoch == cfg.epochs:
                    metrics, metrics_iteration = evaluate(task.student, val_loader, ctx.device, amp=cfg.amp), iteration
                    _write_eval(metrics, output_dir / f"eval_epoch{epoch}.json", logger, iteration, ctx)
            if metrics_iteration != iteration:
                metrics = evaluate(task.student, val_loader, ctx.device, amp=cfg.amp)
            _write_eval(metrics, output_dir / "eval_final.json", logger, iteration, ctx)
            if ctx.is_main:
                export_student(output_dir / "student.pt", cfg, train_set.num_classes, train_set.class_names,
                               task.student, category_ids=train_set.label_to_cat_id)
        except KeyboardInterrupt:
            # single process: save the position reached (every rank would have to agree on it under DDP)
            if not ctx.distributed and position != saved:
                save(*position)
            raise TrainingInterrupted(iteration, str(output_dir), saved=not ctx.distributed) from None
        finally:
            logger.close()
    return metrics


def train_step(model: nn.Module, weight_dict: dict[str, float], images: Tensor, targets: list[dict],
               optimizer: torch.optim.Optimizer, cfg: TrainConfig, ctx: DistContext, *, where: str) -> dict[str, float]:
    """One optimiser step; returns the total and each unweighted term, averaged over processes.

    Raises:
        FloatingPointError: the total loss is not finite (on every rank: the check uses the
            all-reduced values, so no rank is left waiting in the backward pass).
    """
    device = ctx.device
    images = images.to(device, non_blocking=True)
    targets = [{k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in t.items()} for t in targets]
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp and device.type == "cuda"):
        terms = model(images, targets)
    total = weighted_total(terms, weight_dict)
    names = sorted(terms)
    logged = torch.stack([total.detach().float()] + [terms[n].detach().float() for n in names])
    values = dict(zip(["total"] + names, reduce_mean(logged).tolist()))
    if not math.isfinite(values["total"]):
        listed = ", ".join(f"{k}={v}" for k, v in values.items())
        raise FloatingPointError(f"non-finite loss at {where}: {listed}")
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    if cfg.grad_clip is not None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        values["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
    optimizer.step()
    return values


def _rng_state(device: torch.device) -> dict[str, Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _restore(state: dict[str, Any], task: nn.Module, optimizer, scheduler, cfg: TrainConfig, ctx: DistContext,
             path: Path) -> None:
    """Load weights, optimiser/scheduler state and this rank's RNG state from ``last.pt``."""
    # a field the checkpoint's kdlab did not have yet counts as its default (the config it trained with)
    saved = {**TrainConfig.field_defaults(), **state["config"]}
    changed = sorted(k for k, v in cfg.to_dict().items() if k not in RESUME_FREE_KEYS and saved.get(k) != v)
    if changed and ctx.is_main:
        warnings.warn(f"resuming {path} with a config that differs in {changed}; the run will not "
                      f"match an uninterrupted one", stacklevel=3)
    try:
        task.load_trainable_state_dict(state["task"])
        optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, KeyError, ValueError) as err:
        raise CheckpointError(f"{path} does not fit this config's model/optimizer: {str(err).splitlines()[0]}") from None
    scheduler.load_state_dict(state["scheduler"])
    rng_states = state.get("rng_states") or []
    if len(rng_states) == ctx.world_size:
        torch.set_rng_state(rng_states[ctx.rank]["cpu"])
        if ctx.device.type == "cuda" and "cuda" in rng_states[ctx.rank]:
            torch.cuda.set_rng_state(rng_states[ctx.rank]["cuda"], ctx.device)
    else:
        warnings.warn(f"{path} was written by {len(rng_states)} process(es), this run has {ctx.world_size}: "
                      f"the random streams restart from the seed", stacklevel=3)
        torch.manual_seed(cfg.seed + ctx.rank + state["iteration"])


def _write_eval(metrics: dict[str, float | None], path: Path, logger: MetricLogger, iteration: int, ctx: DistContext) -> None:
    logger.log_eval(iteration, metrics)
    if ctx.is_main:
        atomic_save_json(metrics, path)
