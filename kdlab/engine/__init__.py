"""Training loop, checkpoints, DDP and evaluation.

- :func:`train` (``loop.py``): the loop, driven by a :class:`~kdlab.config.TrainConfig`; its
  ``output_dir`` is locked and protected (``rundir.py``), Ctrl-C stops it resumably (``interrupt.py``).
- :func:`evaluate`, :func:`predict` (``evaluation.py``): COCO metrics of a detector; one batch's detections.
- :func:`predict_images` (``inference.py``): detections on any images in their own pixels (``detector.predict``).
- :func:`load_detector` (``checkpoint.py``): the detector of an exported ``student.pt``.
- :class:`ResumableBatchSampler` (``sampler.py``), :func:`build_optimizer` /
  :func:`build_lr_scheduler` (``optim.py``), :class:`MetricLogger` (``logging.py``),
  :func:`init_distributed` (``distributed.py``): the parts, usable on their own.
"""

from kdlab.engine.build import build_datasets, build_loader, build_task
from kdlab.engine.checkpoint import CheckpointError, atomic_save, export_student, load_detector, safe_load
from kdlab.engine.distributed import DistContext, init_distributed, resolve_device
from kdlab.engine.evaluation import detections_to_coco, evaluate, predict
from kdlab.engine.logging import MetricLogger, read_metrics
from kdlab.engine.optim import build_lr_scheduler, build_optimizer, scaled_lr
from kdlab.engine.sampler import ResumableBatchSampler
from kdlab.engine.loop import train, train_step
from kdlab.engine.inference import predict_images

__all__ = [
    "CheckpointError",
    "DistContext",
    "MetricLogger",
    "ResumableBatchSampler",
    "atomic_save",
    "build_datasets",
    "build_loader",
    "build_lr_scheduler",
    "build_optimizer",
    "build_task",
    "detections_to_coco",
    "evaluate",
    "export_student",
    "init_distributed",
    "load_detector",
    "predict",
    "predict_images",
    "read_metrics",
    "resolve_device",
    "safe_load",
    "scaled_lr",
    "train",
    "train_step",
]
