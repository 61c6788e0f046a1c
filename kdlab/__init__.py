"""kdlab: knowledge distillation for object detectors (LD, GID, KD-DETR, DRKD).

The package mirrors the concepts:

- ``kdlab.data``     COCO-format datasets (and the generated *shapes* set), transforms, batching
- ``kdlab.models``   detectors that expose what distillers need (``DenseOutput``)
- ``kdlab.losses``   detection and distillation losses, one equation per function
- ``kdlab.distill``  distillers: ``nn.Module``s returning named loss terms
- ``kdlab.engine``   training loop, checkpoints, DDP, evaluation
- ``kdlab.eval``     COCO metrics through pycocotools
"""

__version__ = "0.1.0"
