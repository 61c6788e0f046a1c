"""DAB-DETR (Liu et al., ICLR 2022): DETR whose decoder queries are dynamic 4-D anchor boxes.

ResNet feature map (C5, dilated C5 "DC5", or a finer C4/C3 for tiny images) -> 1x1 projection to
``D`` channels + sine position embedding (``T = 20``) -> conditional-DETR encoder -> DAB decoder
(``Q`` learned anchors ``(x, y, w, h)`` in inverse-sigmoid space with zero content queries, refined
layer by layer; :mod:`kdlab.models.detr_transformer` has the equations) -> shared class head
(sigmoid focal logits) and box head on every layer. The loss is :mod:`kdlab.models.detr_criterion`.

``forward(..., extra_queries={name: anchors})`` also decodes caller-given anchors in separate
decoder passes over the same encoder memory: they neither attend to nor change the detection
queries (KD-DETR's distillation points, METHODS.md §3).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor, nn
from torchvision.models._utils import IntermediateLayerGetter

from kdlab.models.backbone import ResNetBody, load_backbone_weights
from kdlab.models.base import Detector
from kdlab.models.detr_criterion import HungarianMatcher, SetCriterion
from kdlab.models.detr_outputs import QueryPassOutput, SetOutput
from kdlab.models.detr_transformer import MLP, DABDecoder, TransformerEncoder, image_position_embedding

# feature level -> (ResNet stage that produces it, its stride in input pixels)
FEATURE_LEVELS = {"C3": ("layer2", 8), "C4": ("layer3", 16), "C5": ("layer4", 32), "DC5": ("layer4", 16)}


class DETRBackbone(nn.Module):
    """A ResNet trunk cut after the stage of ``feature_level`` (DETR's ``IntermediateLayerGetter``).

    Args:
        depth, width, norm: as :class:`~kdlab.models.backbone.ResNetBody`.
        weights: torchvision ImageNet weights name, a kdlab detector checkpoint to take the ResNet
            from (``*.pt``, see :func:`~kdlab.models.backbone.load_backbone_weights`), or ``None``.
        frozen_stages: stem + ``layer1..layer{k}`` frozen (default: 1 with weights as DETR, else none).
        feature_level: ``"C5"`` (stride 32, published), ``"DC5"`` (dilated C5, stride 16),
            ``"C4"`` (stride 16) or ``"C3"`` (stride 8).
    """

    def __init__(self, depth: str, width: int, norm: str, weights: str | None, frozen_stages: int | None,
                 feature_level: str):
        super().__init__()
        if feature_level not in FEATURE_LEVELS:
            raise ValueError(f"feature_level must be one of {sorted(FEATURE_LEVELS)}, got {feature_level!r}")
        body = ResNetBody(depth, width, norm, dilate_c5=feature_level == "DC5")
        if weights is not None:
            load_backbone_weights(body, depth, width, weights)
        body.freeze_stages(frozen_stages if frozen_stages is not None else (1 if weights is not None else -1))
        stage, self.stride = FEATURE_LEVELS[feature_level]
        self.out_channels = body.out_channels[["layer2", "layer3", "layer4"].index(stage)]
        self.body = IntermediateLayerGetter(body, return_layers={stage: "0"})  # drops the later stages

    def forward(self, images: Tensor) -> Tensor:
        return self.body(images)["0"]


def feature_padding_mask(image_sizes: list[tuple[int, int]], feature_size: tuple[int, int], stride: int,
                         device: torch.device) -> Tensor:
    """``[B, H, W]`` bool, ``True`` at feature cells whose top-left pixel lies in the padding.

    Cell ``(i, j)`` covers pixels from ``(i * stride, j * stride)``, so it is valid iff
    ``i < ceil(h / stride)`` and ``j < ceil(w / stride)`` (DETR's nearest-neighbour downsampling of
    the pixel mask, for batches padded to a multiple of the stride).
    """
    height, width = feature_size
    rows = torch.arange(height, device=device)
    cols = torch.arange(width, device=device)
    valid_rows = torch.tensor([math.ceil(h / stride) for h, _ in image_sizes], device=device)
    valid_cols = torch.tensor([math.ceil(w / stride) for _, w in image_sizes], device=device)
    return (rows[None, :, None] >= valid_rows[:, None, None]) | (cols[None, None, :] >= valid_cols[:, None, None])


class DABDETR(Detector):
    """DAB-DETR (single-scale, published recipe: R-50 C5, 300 queries, 6 + 6 layers, ``D = 256``).

    Args:
        num_classes: ``C`` (sigmoid scores, no background class).
        backbone: ``resnet18`` / ``resnet34`` / ``resnet50`` / ``resnet101``.
        backbone_width: base width (64 = torchvision's ResNet; 8-32 for the CPU configurations).
        backbone_weights: torchvision ImageNet weights name (e.g. ``"IMAGENET1K_V1"``), a kdlab detector
            checkpoint (``*.pt``) whose ResNet to start from, or ``None``. DETRs train poorly from scratch.
        backbone_norm: ``"frozen_bn"`` (pretrained), ``"bn"`` or ``"gn"``.
        frozen_stages: stem + ``layer1..layer{k}`` frozen (default 1 with weights, as DETR).
        feature_level: the encoder's input map: ``"C5"`` (published), ``"DC5"``, ``"C4"``, ``"C3"``.
        hidden_dim: transformer width ``D`` (divisible by ``num_heads`` and by 4).
        num_queries: anchor queries ``Q``.
        enc_layers, dec_layers: encoder and decoder layers (``dec_layers`` = ``L``).
        num_heads: attention heads.
        dim_feedforward: FFN width.
        dropout: dropout in the transformer (0 in DAB-DETR's release).
        activation: FFN activation, ``"prelu"`` (DAB-DETR's release) or ``"relu"`` (DETR).
        pe_temperature: temperature ``T`` of the image sine embedding (20 in DAB-DETR, §4.5).
        prior_prob: initial foreground probability of the class head (focal-loss bias init).
        detections_per_img: top-k over ``Q x C`` scores in :meth:`postprocess` (100, COCO's maxDets).
        train_groups: Group DETR's ``K`` (Chen et al., ICCV 2023): in training, ``K - 1`` further groups of
            ``Q`` learned anchors are decoded, each in its own pass (so no group attends to another, as
            Group DETR's block-diagonal self-attention mask) and Hungarian-matched to the ground truth on its
            own: every object supervises ``K`` queries per step, which speeds up DETR's convergence. The
            loss is the mean of the groups' losses (:class:`~kdlab.models.detr_criterion.SetCriterion`). In
            evaluation only the first group runs: the trained model is a plain DAB-DETR. 1: off (published).
    """

    output_kind = "set"

    def __init__(
        self,
        num_classes: int,
        # the ResNet and the map the transformer reads
        backbone: str = "resnet50", backbone_width: int = 64, backbone_weights: str | None = None,
        backbone_norm: str = "frozen_bn", frozen_stages: int | None = None, feature_level: str = "C5",
        # the transformer
        hidden_dim: int = 256, num_queries: int = 300, enc_layers: int = 6, dec_layers: int = 6, num_heads: int = 8,
        dim_feedforward: int = 2048, dropout: float = 0.0, activation: str = "prelu", pe_temperature: float = 20.0,
        # the heads and the output
        prior_prob: float = 0.01, detections_per_img: int = 100, train_groups: int = 1,
    ):
        super().__init__()
        checks = {"num_classes": num_classes, "num_queries": num_queries, "enc_layers": enc_layers,
                  "dec_layers": dec_layers, "num_heads": num_heads, "dim_feedforward": dim_feedforward,
                  "detections_per_img": detections_per_img, "train_groups": train_groups}
        for name, value in checks.items():
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if hidden_dim % num_heads or hidden_dim % 4:
            raise ValueError(f"hidden_dim must be divisible by num_heads ({num_heads}) and by 4, got {hidden_dim}")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if not 0 < prior_prob < 1:
            raise ValueError(f"prior_prob must be in (0, 1), got {prior_prob}")
        self.num_classes, self.num_queries, self.dec_layers = num_classes, num_queries, dec_layers
        self.hidden_dim, self.pe_temperature, self.detections_per_img = hidden_dim, pe_temperature, detections_per_img

        self.backbone = DETRBackbone(backbone, backbone_width, backbone_norm, backbone_weights, frozen_stages, feature_level)
        self.input_proj = nn.Conv2d(self.backbone.out_channels, hidden_dim, kernel_size=1)
        self.encoder = TransformerEncoder(hidden_dim, num_heads, enc_layers, dim_feedforward, dropout, activation)
        self.decoder = DABDecoder(hidden_dim, num_heads, dec_layers, dim_feedforward, dropout, activation)
        self.anchor_embed = nn.Embedding(num_queries, 4)  # A_q in inverse-sigmoid space, N(0, 1) init
        self.train_groups = train_groups
        # Group DETR's further groups (training only); None keeps a plain model's state dict unchanged
        self.group_anchor_embed = nn.Embedding((train_groups - 1) * num_queries, 4) if train_groups > 1 else None
        self.class_head = nn.Linear(hidden_dim, num_classes)
        self.box_head = MLP(hidden_dim, hidden_dim, 4, 3)
        self.matcher = HungarianMatcher()

        for p in [*self.encoder.parameters(), *self.decoder.parameters()]:  # DETR's transformer init
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        nn.init.constant_(self.class_head.bias, -math.log((1 - prior_prob) / prior_prob))
        nn.init.zeros_(self.box_head.layers[-1].weight)  # the first boxes are the anchors themselves
        nn.init.zeros_(self.box_head.layers[-1].bias)

    @property
    def query_anchors(self) -> Tensor:
        """``[Q, 4]`` the learned anchor boxes ``(x, y, w, h)`` in inverse-sigmoid space."""
        return self.anchor_embed.weight

    def forward(self, images: Tensor, image_sizes: list[tuple[int, int]], targets: list[dict] | None = None,
                extra_queries: dict[str, Tensor] | None = None) -> SetOutput:
        """Detect objects in a padded batch.

        Args:
            images: ``[B, 3, H, W]`` normalised, zero-padded batch.
            image_sizes: ``(h, w)`` of each unpadded image (the padding is masked out of attention).
            targets: kdlab targets; when given, the final layer is Hungarian-matched (``matches``).
            extra_queries: ``{name: anchors}``, anchors ``[P, 4]`` (shared by the batch) or
                ``[B, P, 4]`` in inverse-sigmoid space; each set is decoded in its own pass.

        Returns:
            A :class:`~kdlab.models.detr_outputs.SetOutput`.
        """
        batch = images.shape[0]
        if len(image_sizes) != batch:
            raise ValueError(f"got {len(image_sizes)} image_sizes for a batch of {batch} images")
        feature = self.backbone(images)  # [B, C_b, H, W]
        padding_mask = feature_padding_mask(image_sizes, feature.shape[-2:], self.backbone.stride, images.device)
        pos = image_position_embedding(padding_mask, self.hidden_dim // 2, self.pe_temperature).flatten(1, 2)
        src = self.input_proj(feature).flatten(2).transpose(1, 2)  # [B, HW, D]
        padding_mask = padding_mask.flatten(1)  # [B, HW]
        pos = pos.to(src.dtype)
        memory = self.encoder(src, pos, padding_mask)

        detection = self.decode(memory, pos, padding_mask, self.query_anchors.expand(batch, -1, -1))
        groups = []
        if self.training and self.group_anchor_embed is not None:  # Group DETR: each further group on its own
            for anchors in self.group_anchor_embed.weight.split(self.num_queries):
                pass_ = self.decode(memory, pos, padding_mask, anchors.expand(batch, -1, -1))
                groups.append(dataclasses.replace(pass_, matches=None if targets is None else self.matcher(
                    pass_.pred_logits, pass_.pred_boxes, targets)))
        extra = {}
        for name, anchors in (extra_queries or {}).items():  # after the detection pass: it stays bit-identical
            extra[name] = self.decode(memory, pos, padding_mask, self._batched_anchors(name, anchors, batch).to(memory))
        matches = None
        if targets is not None:
            matches = self.matcher(detection.pred_logits, detection.pred_boxes, targets)
        return SetOutput(
            features=[feature], feature_strides=[self.backbone.stride], memory=memory, memory_mask=padding_mask,
            pred_logits=detection.pred_logits, pred_boxes=detection.pred_boxes, layer_logits=detection.layer_logits,
            layer_boxes=detection.layer_boxes, layer_references=detection.layer_references,
            query_anchors=self.query_anchors, image_sizes=list(image_sizes), extra=extra, matches=matches,
            groups=groups,
        )

    def decode(self, memory: Tensor, memory_pos: Tensor, padding_mask: Tensor, anchors: Tensor) -> QueryPassOutput:
        """One decoder pass of ``anchors`` ``[B, P, 4]`` (inverse-sigmoid) over the memory, with both heads."""
        hidden, references, boxes = self.decoder(memory, memory_pos, padding_mask, anchors, self.box_head)
        return QueryPassOutput(layer_logits=self.class_head(hidden), layer_boxes=boxes, layer_references=references)

    @staticmethod
    def _batched_anchors(name: str, anchors: Tensor, batch: int) -> Tensor:
        if anchors.dim() == 2 and anchors.shape[-1] == 4:
            return anchors.expand(batch, -1, -1)
        if anchors.dim() == 3 and anchors.shape[0] == batch and anchors.shape[-1] == 4:
            return anchors
        raise ValueError(f"extra_queries[{name!r}] must be [P, 4] or [B={batch}, P, 4] anchors, got {list(anchors.shape)}")

    @torch.no_grad()
    def postprocess(self, output: SetOutput) -> list[dict[str, Tensor]]:
        """Top-``detections_per_img`` (query, class) pairs by sigmoid score per image, no NMS (DETR-family).

        A query may appear with several classes. Boxes are xyxy in input pixels.
        """
        scores_all = output.pred_logits.float().sigmoid().flatten(1)  # [B, Q * C]
        boxes_all = output.pred_boxes_xyxy.float()  # [B, Q, 4]
        k = min(self.detections_per_img, scores_all.shape[1])
        scores, flat_idx = scores_all.topk(k, dim=1)
        query_idx = torch.div(flat_idx, self.num_classes, rounding_mode="floor")
        labels = flat_idx % self.num_classes
        boxes = torch.gather(boxes_all, 1, query_idx[..., None].expand(-1, -1, 4))
        return [{"boxes": b, "scores": s, "labels": l} for b, s, l in zip(boxes, scores, labels)]

    def build_criterion(self) -> SetCriterion:
        return SetCriterion(self.num_classes, self.dec_layers, self.matcher)
