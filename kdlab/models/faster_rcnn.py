"""Faster R-CNN (Ren et al., NeurIPS 2015) with FPN (Lin et al., CVPR 2017) on torchvision.

:class:`FasterRCNN` *is* torchvision's ``FasterRCNN`` (same modules and ``state_dict``; its COCO
weights load unchanged) with kdlab's forward, which runs the two stages step by step with
torchvision's own parts and returns everything in a
:class:`~kdlab.models.faster_rcnn_outputs.TwoStageOutput`:

1. RPN: objectness and deltas for every anchor; proposals = decoded anchors, top-k per level,
   clipped, NMS 0.7. Given targets, anchors are labelled (IoU >= 0.7 object, < 0.3 background)
   and 256 per image are sampled, at most half objects.
2. Box head: given targets, 512 RoIs per image are sampled from proposals + GT boxes (IoU >= 0.5
   foreground, at most a quarter); RoIAlign 7 x 7 on the level chosen by the RoI's size, two FC
   layers, then class logits and class-specific deltas.

Both samplings happen in the forward, RPN first, so the random draws are torchvision's, in
torchvision's order: with the same seed the sampled sets, hence the losses, equal torchvision's.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.models.detection import faster_rcnn as tv_faster_rcnn
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.rpn import concat_box_prediction_layers
from torchvision.ops import box_iou

from kdlab.models.base import Criterion, Detector
from kdlab.models.common import batch_anchors, check_batch, normalise_image_sizes
from kdlab.models.faster_rcnn_outputs import (
    RoIAssignment,
    RPNAssignment,
    TwoStageOutput,
    inferred_strides,
)
from kdlab.models.outputs import FeatureOutput
from kdlab.models.retinanet import _check_columns
from kdlab.utils.dist import reduce_normalizer


class FasterRCNN(tv_faster_rcnn.FasterRCNN, Detector):
    """Torchvision's Faster R-CNN whose forward returns a :class:`TwoStageOutput`.

    Args:
        backbone: FPN backbone returning an ordered dict of maps, with ``out_channels``.
        num_classes: number of kdlab classes ``C`` (labels ``0 .. C-1``).
        torchvision_labels: keep torchvision's label space: the box predictor has
            ``num_classes`` columns, column 0 is the background and kdlab labels equal
            torchvision's (label 0 never occurs in targets). Torchvision's COCO weights use it
            (``num_classes = 91``, label = COCO category id). When ``False`` (default) the
            predictor has ``num_classes + 1`` columns and label ``l`` is column ``l + 1``.
        class_names: optional name of each label.
        **torchvision_kwargs: passed to torchvision's ``FasterRCNN`` (``rpn_anchor_generator``,
            ``rpn_head``, ``box_head``, ``box_roi_pool``, ``rpn_*`` / ``box_*`` thresholds and
            sample sizes, ``min_size`` / ``max_size`` ...).
    """

    output_kind = "two_stage"

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        *,
        torchvision_labels: bool = False,
        class_names: list[str] | None = None,
        **torchvision_kwargs,
    ):
        label_offset = 0 if torchvision_labels else 1  # torchvision's column 0 is the background
        super().__init__(backbone, num_classes + label_offset, **torchvision_kwargs)
        self.label_offset = label_offset
        self.num_classes = num_classes
        self.class_names = list(class_names) if class_names is not None else None

    def forward_features(self, images: Tensor, image_sizes: list[tuple[int, int]]) -> FeatureOutput:
        """Backbone and FPN only, no RPN or RoI head (:meth:`kdlab.models.base.Detector.forward_features`);
        the strides are inferred as :attr:`TwoStageOutput.feature_strides` infers them."""
        check_batch(type(self).__name__, images, image_sizes, None, self.num_classes, first_label=1 - self.label_offset)
        image_sizes = normalise_image_sizes(image_sizes)
        features = list(self.backbone(images).values())
        return FeatureOutput(features, inferred_strides(features, image_sizes), image_sizes, type(self).__name__)

    def _rpn_head_outputs(self, images: Tensor, feature_maps: list[Tensor]):
        """The RPN head on the FPN maps: objectness ``[B*A, 1]`` and deltas ``[B*A, 4]`` (float32, decoded in
        float32 under bf16 autocast), the anchors ``[A, 4]``, the anchors per level and each anchor's level."""
        objectness_maps, delta_maps = self.rpn.head(feature_maps)
        anchors = batch_anchors(self.rpn.anchor_generator, images, feature_maps)  # [A, 4]
        num_anchors_per_level = [o.shape[1] * o.shape[2] * o.shape[3] for o in objectness_maps]
        objectness, rpn_deltas = concat_box_prediction_layers(objectness_maps, delta_maps)  # [B*A, 1], [B*A, 4]
        levels = torch.repeat_interleave(
            torch.arange(len(num_anchors_per_level), device=anchors.device),
            torch.tensor(num_anchors_per_level, device=anchors.device),
        )
        return objectness.float(), rpn_deltas.float(), anchors, num_anchors_per_level, levels

    def forward_dense(self, images: Tensor, image_sizes: list[tuple[int, int]]) -> TwoStageOutput:
        """Backbone, FPN and the RPN head only (:meth:`kdlab.models.base.Detector.forward_dense`): the RPN's
        objectness and deltas for every anchor, no proposals and no RoI head (their fields are empty). For
        a teacher whose methods read only its FPN maps and RPN slots (GID): in eval mode the RoI head runs
        on every proposal (1000 an image), which costs more than the rest of the forward."""
        check_batch(type(self).__name__, images, image_sizes, None, self.num_classes, first_label=1 - self.label_offset)
        image_sizes = normalise_image_sizes(image_sizes)
        features = self.backbone(images)
        feature_maps = list(features.values())
        objectness, rpn_deltas, anchors, num_anchors_per_level, levels = self._rpn_head_outputs(images, feature_maps)
        batch, channels = images.shape[0], feature_maps[0].shape[1]
        none = [anchors.new_zeros((0, 4)) for _ in range(batch)]
        representation = self.roi_heads.box_predictor.cls_score.in_features
        num_columns = self.roi_heads.box_predictor.cls_score.out_features
        return TwoStageOutput(
            features=feature_maps, feature_names=list(features.keys()),
            rpn_objectness=objectness.view(batch, -1), rpn_deltas=rpn_deltas.view(batch, -1, 4),
            anchors=anchors, anchor_levels=levels, num_anchors_per_level=num_anchors_per_level,
            proposals=none, proposal_scores=[anchors.new_zeros(0) for _ in range(batch)], rois=list(none),
            roi_features=anchors.new_zeros((0, channels, 7, 7)), box_features=anchors.new_zeros((0, representation)),
            class_logits=anchors.new_zeros((0, num_columns)), box_deltas=anchors.new_zeros((0, 4 * num_columns)),
            image_sizes=image_sizes, label_offset=self.label_offset,
            rpn_box_coder_weights=tuple(self.rpn.box_coder.weights),
            rpn_positive_iou=float(self.rpn.proposal_matcher.high_threshold),
        )

    def forward(
        self, images: Tensor, image_sizes: list[tuple[int, int]], targets: list[dict] | None = None
    ) -> TwoStageOutput:
        """Run both stages on a padded batch.

        Args:
            images: ``[B, 3, H, W]`` normalised, padded batch.
            image_sizes: ``(h, w)`` of each unpadded image.
            targets: optional, per image ``boxes`` ``[G, 4]`` and ``labels`` ``[G]`` (kdlab
                labels); given, anchors and RoIs are labelled and sampled for the loss.
        """
        check_batch(type(self).__name__, images, image_sizes, targets, self.num_classes, first_label=1 - self.label_offset)
        image_sizes = normalise_image_sizes(image_sizes)
        tv_targets = None
        if targets is not None:  # torchvision's labels: column of the class in the box predictor
            tv_targets = [{"boxes": t["boxes"], "labels": t["labels"] + self.label_offset} for t in targets]
        features = self.backbone(images)  # ordered dict name -> [B, C, H_l, W_l]
        feature_maps = list(features.values())

        # stage 1: RPN
        objectness, rpn_deltas, anchors, num_anchors_per_level, levels = self._rpn_head_outputs(images, feature_maps)
        batch = images.shape[0]
        proposals = self.rpn.box_coder.decode(rpn_deltas.detach(), [anchors] * batch).view(batch, -1, 4)
        proposals, proposal_scores = self.rpn.filter_proposals(
            proposals, objectness, image_sizes, num_anchors_per_level
        )
        rpn_assignment = self.assign_anchors(anchors, tv_targets) if tv_targets is not None else None

        # stage 2: box head on the sampled RoIs (training) or on all proposals
        rois, roi_assignment = proposals, None
        if tv_targets is not None:
            rois, matched_idxs, tv_labels, regression_targets = self.roi_heads.select_training_samples(
                proposals, tv_targets
            )
            tv_labels_cat = torch.cat(tv_labels)  # [R], 0 = background
            is_foreground = tv_labels_cat > 0
            roi_assignment = RoIAssignment(
                labels=torch.where(is_foreground, tv_labels_cat - self.label_offset, self.num_classes),
                matched_gt=torch.where(is_foreground, torch.cat(matched_idxs), -1),
                regression_targets=torch.cat(regression_targets),
            )
        roi_features = self.roi_heads.box_roi_pool(features, rois, image_sizes)  # [R, C, 7, 7]
        box_features = self.roi_heads.box_head(roi_features)  # [R, D]
        class_logits, box_deltas = self.roi_heads.box_predictor(box_features)  # [R, K], [R, 4K]
        class_logits, box_deltas = class_logits.float(), box_deltas.float()

        return TwoStageOutput(
            features=feature_maps,
            feature_names=list(features.keys()),
            rpn_objectness=objectness.view(batch, -1),
            rpn_deltas=rpn_deltas.view(batch, -1, 4),
            anchors=anchors,
            anchor_levels=levels,
            num_anchors_per_level=num_anchors_per_level,
            proposals=proposals,
            proposal_scores=proposal_scores,
            rois=rois,
            roi_features=roi_features,
            box_features=box_features,
            class_logits=class_logits,
            box_deltas=box_deltas,
            image_sizes=image_sizes,
            label_offset=self.label_offset,
            gt_boxes=[t["boxes"] for t in targets] if targets is not None else None,
            gt_labels=[t["labels"] for t in targets] if targets is not None else None,
            rpn_assignment=rpn_assignment,
            roi_assignment=roi_assignment,
            rpn_box_coder_weights=tuple(self.rpn.box_coder.weights),
            rpn_positive_iou=float(self.rpn.proposal_matcher.high_threshold),
        )

    @torch.no_grad()
    def assign_anchors(self, anchors: Tensor, tv_targets: list[dict]) -> RPNAssignment:
        """Label every anchor (torchvision's RPN ``Matcher(0.7, 0.3)`` with low-quality matches) and sample.

        Args:
            anchors: ``[A, 4]`` xyxy.
            tv_targets: per image ``boxes`` ``[G_i, 4]``.
        """
        matcher = self.rpn.proposal_matcher
        objectness_targets, matched = [], []
        for target in tv_targets:
            if target["boxes"].numel() == 0:  # a background image: every anchor is background
                match = torch.full((len(anchors),), matcher.BELOW_LOW_THRESHOLD, dtype=torch.int64, device=anchors.device)
            else:
                match = matcher(box_iou(target["boxes"], anchors))
            labels = (match >= 0).to(torch.float32)
            labels[match == matcher.BETWEEN_THRESHOLDS] = -1.0
            objectness_targets.append(labels)
            matched.append(torch.where(match >= 0, match, -1))
        sampled_pos, sampled_neg = self.rpn.fg_bg_sampler(objectness_targets)  # uint8 masks, random draws
        return RPNAssignment(
            objectness_targets=torch.stack(objectness_targets),
            matched_gt=torch.stack(matched),
            sampled_pos=torch.stack(sampled_pos).bool(),
            sampled_neg=torch.stack(sampled_neg).bool(),
        )

    @torch.no_grad()
    def postprocess(self, output: TwoStageOutput) -> list[dict[str, Tensor]]:
        """Torchvision's post-processing: softmax, per-class boxes, score 0.05, class-wise NMS 0.5.

        Returns:
            per image ``boxes`` ``[K, 4]`` (input pixels), ``scores`` ``[K]``, ``labels`` ``[K]`` (kdlab).
        """
        if output.roi_assignment is not None:
            raise ValueError(
                "postprocess needs the box head run on all proposals, but this output was computed with "
                "targets (on sampled RoIs): call the detector without targets for detections"
            )
        boxes, scores, labels = self.roi_heads.postprocess_detections(
            output.class_logits, output.box_deltas, output.rois, output.image_sizes
        )
        return [{"boxes": b, "scores": s, "labels": l - self.label_offset} for b, s, l in zip(boxes, scores, labels)]

    def build_criterion(self) -> "FasterRCNNCriterion":
        return FasterRCNNCriterion(self.label_offset, self.rpn.box_coder.weights)

    @torch.no_grad()
    def restrict_classes_(self, columns: Tensor) -> "FasterRCNN":
        """Keep only the classes ``columns`` (kdlab labels) and the background, in place.

        Afterwards label ``j`` is old label ``columns[j]`` and ``label_offset`` is 1.
        """
        columns = _check_columns(columns, self.num_classes)
        if self.label_offset == 0 and (columns == 0).any():
            raise ValueError("label 0 is the background slot of this model (torchvision_labels=True); it cannot be kept")
        kept = torch.cat([torch.zeros(1, dtype=torch.int64), columns + self.label_offset])  # background first
        predictor = self.roi_heads.box_predictor
        predictor.cls_score = _take_linear_outputs(predictor.cls_score, kept)
        predictor.bbox_pred = _take_linear_outputs(predictor.bbox_pred, (kept[:, None] * 4 + torch.arange(4)).flatten())
        self.num_classes, self.label_offset = len(columns), 1
        if self.class_names is not None:
            self.class_names = [self.class_names[c] for c in columns.tolist()]
        return self


class FasterRCNNCriterion(Criterion):
    """Torchvision's four Faster R-CNN losses from a :class:`TwoStageOutput` with its assignments.

    With ``S`` the anchors sampled for the RPN (``S+`` the objects among them) and ``R`` the
    sampled RoIs (``R+`` the foreground ones), ``smooth_l1`` with ``beta = 1/9``:

    - ``loss_objectness = 1/|S| sum_S BCE(o_a, y_a)``;
    - ``loss_rpn_box_reg = 1/|S| sum_{S+} smooth_l1(delta_a - delta*_a)``;
    - ``loss_classifier = 1/|R| sum_R CE(z_r, c_r)`` (softmax over background + classes);
    - ``loss_box_reg = 1/|R| sum_{R+} smooth_l1(delta_{r, c_r} - delta*_r)`` (deltas of the true class).

    The counts go through ``reduce_normalizer`` so that DDP equals one big batch (in one process
    this is torchvision's mean).
    """

    def __init__(self, label_offset: int = 1, rpn_box_coder_weights=(1.0, 1.0, 1.0, 1.0)):
        super().__init__()
        self.label_offset = label_offset
        self.rpn_box_coder = BoxCoder(weights=tuple(rpn_box_coder_weights))
        self.weight_dict = {"loss_classifier": 1.0, "loss_box_reg": 1.0, "loss_objectness": 1.0, "loss_rpn_box_reg": 1.0}

    def forward(self, output: TwoStageOutput, targets: list[dict]) -> dict[str, Tensor]:
        rpn, roi = output.rpn_assignment, output.roi_assignment
        if rpn is None or roi is None:
            raise ValueError("the Faster R-CNN loss needs the sampled anchors and RoIs: call the detector with targets")
        sampled = rpn.sampled_pos | rpn.sampled_neg  # [B, A]
        num_sampled = reduce_normalizer(sampled.sum().to(output.rpn_objectness.dtype))
        loss_objectness = F.binary_cross_entropy_with_logits(
            output.rpn_objectness[sampled], rpn.objectness_targets[sampled], reduction="sum"
        ) / num_sampled
        gt_of_positive = [gt[idx[pos]] for gt, idx, pos in zip(output.gt_boxes, rpn.matched_gt, rpn.sampled_pos)]
        positive_anchors = output.anchors.expand(len(sampled), -1, -1)[rpn.sampled_pos]  # [P, 4]
        rpn_targets = self.rpn_box_coder.encode_single(torch.cat(gt_of_positive), positive_anchors)
        loss_rpn_box_reg = F.smooth_l1_loss(
            output.rpn_deltas[rpn.sampled_pos], rpn_targets, beta=1 / 9, reduction="sum"
        ) / num_sampled

        num_rois = reduce_normalizer(torch.tensor(float(len(roi.labels)), device=output.class_logits.device))
        is_foreground = roi.matched_gt >= 0
        class_columns = torch.where(is_foreground, roi.labels + self.label_offset, 0)  # background = column 0
        loss_classifier = F.cross_entropy(output.class_logits, class_columns, reduction="sum") / num_rois
        deltas = output.box_deltas.view(len(class_columns), -1, 4)  # [R, K, 4]
        fg_rows = torch.where(is_foreground)[0]
        loss_box_reg = F.smooth_l1_loss(
            deltas[fg_rows, class_columns[fg_rows]], roi.regression_targets[fg_rows], beta=1 / 9, reduction="sum"
        ) / num_rois
        return {
            "loss_classifier": loss_classifier,
            "loss_box_reg": loss_box_reg,
            "loss_objectness": loss_objectness,
            "loss_rpn_box_reg": loss_rpn_box_reg,
        }


def _take_linear_outputs(linear: nn.Linear, rows: Tensor) -> nn.Linear:
    """A copy of ``linear`` that keeps only the output features ``rows``."""
    new = nn.Linear(linear.in_features, len(rows)).to(linear.weight.device, linear.weight.dtype)
    new.weight.copy_(linear.weight[rows])
    new.bias.copy_(linear.bias[rows])
    return new
