"""DETR's set loss with Deformable-DETR's sigmoid focal classification (what DAB-DETR trains with).

1. :class:`HungarianMatcher` pairs each ground-truth box of an image with one query, minimising
   (DETR Eq. 1) ``sum_i C(y_i, y_hat_sigma(i))`` over one-to-one assignments ``sigma``, with
   ``C = 2 * C_focal + 5 * ||b - b_hat||_1 + 2 * (-GIoU(b, b_hat))``.
2. :class:`SetCriterion` supervises the matched pairs (DETR Eq. 2, focal instead of cross-entropy)::

       loss_ce   = sum_{q, c} FL(p_qc, 1[q matched to a box of class c]) / N
       loss_bbox = sum_{matched} ||b - b_hat||_1 / N,    loss_giou = sum_{matched} (1 - GIoU) / N

   with ``N`` the number of ground-truth boxes in the batch (the unmatched queries get a focal
   loss towards "no class" only). The same terms are computed for every decoder layer with its own
   matching (auxiliary losses, ``loss_ce_0 .. loss_ce_{L-2}``); weights 1 / 5 / 2.

Boxes are normalised cxcywh (:mod:`kdlab.models.detr_outputs`); kdlab targets (xyxy input pixels)
are converted with :func:`normalized_gt_boxes`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torchvision.ops import box_convert, generalized_box_iou, generalized_box_iou_loss, sigmoid_focal_loss

from kdlab.models.base import Criterion
from kdlab.models.detr_outputs import SetOutput
from kdlab.utils.dist import reduce_normalizer


def normalized_gt_boxes(target: dict) -> Tensor:
    """A kdlab target's ``boxes`` (``[G, 4]`` xyxy input pixels) as ``[G, 4]`` cxcywh normalised by its ``size``."""
    h, w = (float(v) for v in target["size"])
    boxes = target["boxes"].float()
    return box_convert(boxes, "xyxy", "cxcywh") / boxes.new_tensor([w, h, w, h])


def hungarian_match(cost: Tensor) -> tuple[Tensor, Tensor]:
    """Minimum-cost one-to-one assignment of a ``[Q, G]`` cost matrix (``scipy``'s Hungarian solver).

    Returns:
        ``(query_idx, gt_idx)``, int64 ``[min(Q, G)]`` each, sorted by ``query_idx``.
    """
    query_idx, gt_idx = linear_sum_assignment(cost.detach().cpu().float().numpy())
    return torch.as_tensor(query_idx, dtype=torch.int64), torch.as_tensor(gt_idx, dtype=torch.int64)


class HungarianMatcher(nn.Module):
    """DETR's bipartite matching with Deformable-DETR's focal class cost.

    ``C[q, g] = w_class * (FL_pos(p_q,c_g) - FL_neg(p_q,c_g)) + w_bbox * ||b_q - b_g||_1 - w_giou * GIoU(b_q, b_g)``
    with ``FL_pos(p) = -alpha (1 - p)^gamma log p`` and ``FL_neg(p) = -(1 - alpha) p^gamma log(1 - p)``:
    the decrease of the focal loss when query ``q`` is labelled ``c_g`` instead of "no object".

    Args:
        cost_class, cost_bbox, cost_giou: the weights (DAB-DETR: 2, 5, 2).
        focal_alpha, focal_gamma: focal-loss parameters of the class cost (0.25, 2).
    """

    def __init__(self, cost_class: float = 2.0, cost_bbox: float = 5.0, cost_giou: float = 2.0,
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0):
        super().__init__()
        if cost_class == cost_bbox == cost_giou == 0:
            raise ValueError("HungarianMatcher: at least one of cost_class, cost_bbox, cost_giou must be non-zero")
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma

    def cost_matrix(self, logits: Tensor, boxes: Tensor, gt_labels: Tensor, gt_boxes: Tensor) -> Tensor:
        """``[Q, G]`` matching cost of one image.

        Args:
            logits: ``[Q, C]`` class logits; boxes: ``[Q, 4]`` normalised cxcywh.
            gt_labels: ``[G]`` contiguous labels; gt_boxes: ``[G, 4]`` normalised cxcywh.
        """
        prob = logits.float().sigmoid()[:, gt_labels]  # [Q, G]
        alpha, gamma = self.focal_alpha, self.focal_gamma
        neg_cost = (1 - alpha) * prob ** gamma * -(1 - prob + 1e-8).log()
        pos_cost = alpha * (1 - prob) ** gamma * -(prob + 1e-8).log()
        cost_class = pos_cost - neg_cost
        cost_bbox = torch.cdist(boxes.float(), gt_boxes, p=1)
        cost_giou = -generalized_box_iou(box_convert(boxes.float(), "cxcywh", "xyxy"), box_convert(gt_boxes, "cxcywh", "xyxy"))
        return self.cost_class * cost_class + self.cost_bbox * cost_bbox + self.cost_giou * cost_giou

    @torch.no_grad()
    def forward(self, pred_logits: Tensor, pred_boxes: Tensor, targets: list[dict]) -> list[tuple[Tensor, Tensor]]:
        """Match every image of the batch.

        Args:
            pred_logits: ``[B, Q, C]``; pred_boxes: ``[B, Q, 4]`` normalised cxcywh.
            targets: kdlab targets (``boxes`` xyxy input pixels, ``labels``, ``size``).

        Returns:
            Per image ``(query_idx, gt_idx)`` (CPU int64, ``min(Q, G)`` long, sorted by query).
        """
        # one cost matrix for the whole batch ([B * Q, sum of G], every element computed as for its image
        # alone), then each image's block solved on its own: 16 x fewer small kernels per pass (DETR's way)
        batch, num_queries = pred_logits.shape[:2]
        device = pred_boxes.device
        sizes = [len(target["labels"]) for target in targets]
        gt_boxes = torch.cat([normalized_gt_boxes(target).to(device) for target in targets])
        gt_labels = torch.cat([target["labels"].to(device) for target in targets])
        cost = self.cost_matrix(pred_logits.flatten(0, 1), pred_boxes.flatten(0, 1), gt_labels, gt_boxes)
        blocks = cost.view(batch, num_queries, sum(sizes)).cpu().split(sizes, dim=-1)
        return [hungarian_match(block[image]) for image, block in enumerate(blocks)]


class SetCriterion(Criterion):
    """DAB-DETR's loss (module docstring). Returns unweighted ``loss_ce``, ``loss_bbox``, ``loss_giou`` for
    the last decoder layer and ``loss_ce_l``, ``loss_bbox_l``, ``loss_giou_l`` for layers ``l = 0 .. L-2``.

    Args:
        num_classes: ``C``.
        num_layers: decoder layers ``L`` of the detector (the auxiliary terms' names).
        matcher: the Hungarian matcher (the detector's, so both use the same costs).
        loss_weights: ``(ce, bbox, giou)``, DAB-DETR's ``(1, 5, 2)``.
        focal_alpha, focal_gamma: classification focal loss (0.25, 2).
    """

    def __init__(self, num_classes: int, num_layers: int, matcher: HungarianMatcher | None = None,
                 loss_weights: tuple[float, float, float] = (1.0, 5.0, 2.0), focal_alpha: float = 0.25,
                 focal_gamma: float = 2.0):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.num_classes, self.num_layers = num_classes, num_layers
        self.matcher = matcher if matcher is not None else HungarianMatcher()
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        names = ("loss_ce", "loss_bbox", "loss_giou")
        self.weight_dict = {}
        for suffix in [f"_{layer}" for layer in range(num_layers - 1)] + [""]:
            self.weight_dict.update({name + suffix: weight for name, weight in zip(names, loss_weights)})

    def forward(self, output: SetOutput, targets: list[dict]) -> dict[str, Tensor]:
        num_layers = output.layer_logits.shape[0]
        if num_layers != self.num_layers:
            raise ValueError(f"SetCriterion was built for {self.num_layers} decoder layers, the output has {num_layers}")
        device = output.pred_logits.device
        gt_boxes = [normalized_gt_boxes(t).to(device) for t in targets]
        gt_labels = [t["labels"].to(device) for t in targets]
        num_boxes = reduce_normalizer(torch.tensor(float(sum(len(g) for g in gt_labels)), device=device))
        terms = self.pass_losses(output.layer_logits, output.layer_boxes, output.matches, targets, gt_labels,
                                 gt_boxes, num_boxes)
        if output.groups:  # Group DETR: every group matched on its own, the loss the mean over the K groups
            for group in output.groups:
                group_terms = self.pass_losses(group.layer_logits, group.layer_boxes, group.matches, targets,
                                               gt_labels, gt_boxes, num_boxes)
                terms = {name: value + group_terms[name] for name, value in terms.items()}
            terms = {name: value / (1 + len(output.groups)) for name, value in terms.items()}
        return terms

    def pass_losses(self, layer_logits: Tensor, layer_boxes: Tensor, final_matches: list | None, targets: list[dict],
                    gt_labels: list[Tensor], gt_boxes: list[Tensor], num_boxes: Tensor) -> dict[str, Tensor]:
        """Every layer's three terms of one decoder pass (``final_matches``: its last layer's matching when
        the detector made it already, else None)."""
        num_layers = layer_logits.shape[0]
        terms = {}
        for layer in range(num_layers):
            logits, boxes = layer_logits[layer], layer_boxes[layer]
            if layer == num_layers - 1 and final_matches is not None:
                matches = final_matches  # the detector matched the final layer already
            else:
                matches = self.matcher(logits, boxes, targets)
            suffix = "" if layer == num_layers - 1 else f"_{layer}"
            layer_terms = self.layer_losses(logits, boxes, gt_labels, gt_boxes, matches, num_boxes)
            terms.update({name + suffix: value for name, value in layer_terms.items()})
        return terms

    def layer_losses(self, logits: Tensor, boxes: Tensor, gt_labels: list[Tensor], gt_boxes: list[Tensor],
                     matches: list[tuple[Tensor, Tensor]], num_boxes: Tensor) -> dict[str, Tensor]:
        """The three terms of one decoder layer.

        Args:
            logits: ``[B, Q, C]``; boxes: ``[B, Q, 4]`` normalised cxcywh.
            gt_labels, gt_boxes: per image ``[G_i]`` and ``[G_i, 4]`` (normalised cxcywh).
            matches: per image ``(query_idx, gt_idx)``.
            num_boxes: the DDP-exact normaliser ``N``.
        """
        device = logits.device
        image_idx = torch.cat([torch.full_like(q, i) for i, (q, _) in enumerate(matches)]).to(device)
        query_idx = torch.cat([q for q, _ in matches]).to(device)
        matched_labels = torch.cat([labels[g.to(device)] for labels, (_, g) in zip(gt_labels, matches)])
        matched_gt = torch.cat([b[g.to(device)] for b, (_, g) in zip(gt_boxes, matches)]).reshape(-1, 4)

        onehot = torch.zeros_like(logits, dtype=torch.float32)  # [B, Q, C]: all zeros = "no object"
        onehot[image_idx, query_idx, matched_labels] = 1.0
        loss_ce = sigmoid_focal_loss(logits.float(), onehot, self.focal_alpha, self.focal_gamma, reduction="sum")

        matched_boxes = boxes[image_idx, query_idx].float()  # [M, 4]
        loss_bbox = F.l1_loss(matched_boxes, matched_gt, reduction="sum")
        loss_giou = generalized_box_iou_loss(box_convert(matched_boxes, "cxcywh", "xyxy"),
                                             box_convert(matched_gt, "cxcywh", "xyxy"), reduction="sum")
        return {"loss_ce": loss_ce / num_boxes, "loss_bbox": loss_bbox / num_boxes, "loss_giou": loss_giou / num_boxes}
