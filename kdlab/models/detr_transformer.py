"""DAB-DETR's transformer: a conditional-DETR encoder and a decoder whose queries are anchor boxes.

Paper: Liu et al., "DAB-DETR: Dynamic Anchor Boxes are Better Queries for DETR", ICLR 2022
(arXiv 2201.12329); the released code is IDEA-Research/DAB-DETR, ``models/DAB_DETR/transformer.py``.
Tensors are batch-first here (``[B, N, D]``), where DETR's code is sequence-first.

Decoder query ``q`` at layer ``l`` is a content part ``C_q`` (``[D]``, zero before the first layer)
and an anchor box ``A_q = (x_q, y_q, w_q, h_q)`` in ``[0, 1]``. Per layer (paper §4.2-4.5):

- positional query ``P_q = MLP(PE(A_q))``, ``PE(A_q) = Cat(PE(x_q), PE(y_q), PE(w_q), PE(h_q))``;
- self-attention ``Q = K = C_q + P_q``, ``V = C_q``;
- cross-attention, content and position concatenated per head (conditional DETR):
  ``Q = Cat(C_q, PE(x_q, y_q) * MLP_csq(C_q))``, ``K = Cat(F_xy, PE(x, y))``, ``V = F_xy``, with the
  width/height modulation ``PE(x_q) * w_ref / w_q`` and ``PE(y_q) * h_ref / h_q``,
  ``(w_ref, h_ref) = sigmoid(MLP(C_q))`` (§4.4), which turns the positional dot product into
  ``(PE(x).PE(x_q) w_ref / w_q + PE(y).PE(y_q) h_ref / h_q) / sqrt(D)``;
- prediction ``b_q = sigmoid(logit(A_q) + BoxHead(LN(C_q)))`` (``LN`` the decoder's shared final norm);
- anchor update ``A_q <- sigmoid(logit(A_q) + BoxHead(C_q))`` from the content *before* ``LN``; the
  next layer's queries use it detached, its box prediction uses it with its gradient (the released
  code's ``ref_points``: layer ``l + 1``'s box loss reaches layer ``l``'s box head and content).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them (DETR's box-head "FFN")."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


def sine_embedding(coords: Tensor, num_feats: int, temperature: float) -> Tensor:
    """Sinusoidal embedding of coordinates in ``[0, 1]``: ``[..., K]`` -> ``[..., K * num_feats]``.

    Per coordinate ``c`` (paper §4.5, Transformer PE with temperature ``T``)::

        PE(c)_{2i} = sin(2 pi c / T^{2i / F}),   PE(c)_{2i+1} = cos(2 pi c / T^{2i / F}),   F = num_feats

    The embeddings of the ``K`` coordinates are concatenated in the order given.
    """
    exponent = 2 * torch.div(torch.arange(num_feats, device=coords.device), 2, rounding_mode="floor") / num_feats
    dim_t = temperature ** exponent.float()  # [F]
    angles = coords.float()[..., None] * (2 * math.pi) / dim_t  # [..., K, F]
    embedding = torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), dim=-1)  # [..., K, F/2, 2]
    return embedding.flatten(-3)


def image_position_embedding(padding_mask: Tensor, num_feats: int, temperature: float) -> Tensor:
    """DETR's normalised sine position embedding of a feature map: ``[B, H, W]`` -> ``[B, H, W, 2F]``.

    Coordinates are counted over the *unpadded* cells (``padding_mask`` is ``True`` in the padding)
    and normalised to ``(0, 1]`` per image, so a cell's embedding does not depend on the padding.
    The order is ``Cat(PE(y), PE(x))``. DAB-DETR uses ``T = 20`` here (§4.5), DETR ``10000``.
    """
    valid = ~padding_mask
    y = valid.cumsum(1, dtype=torch.float32)
    x = valid.cumsum(2, dtype=torch.float32)
    y = y / (y[:, -1:, :] + 1e-6)
    x = x / (x[:, :, -1:] + 1e-6)
    return sine_embedding(torch.stack((y, x), dim=-1), num_feats, temperature)


def multi_head_attention(query: Tensor, key: Tensor, value: Tensor, num_heads: int,
                         key_padding_mask: Tensor | None, dropout: float) -> Tensor:
    """Scaled dot-product attention over ``num_heads`` heads, without input projections.

    DAB-DETR's decoder projects queries, keys and values itself (content and positional parts
    separately), so attention here is only ``softmax(Q_h K_h^T / sqrt(d_h)) V_h`` per head.

    Args:
        query: ``[B, Nq, E]``; key: ``[B, Nk, E]``; value: ``[B, Nk, Dv]`` (``E``, ``Dv`` divisible by heads).
        key_padding_mask: ``[B, Nk]`` bool, ``True`` for keys to ignore.

    Returns:
        ``[B, Nq, Dv]``, the heads concatenated.
    """
    batch, num_q, num_k = query.shape[0], query.shape[1], key.shape[1]
    q = query.reshape(batch, num_q, num_heads, -1).transpose(1, 2)  # [B, h, Nq, E/h]
    k = key.reshape(batch, num_k, num_heads, -1).transpose(1, 2)
    v = value.reshape(batch, num_k, num_heads, -1).transpose(1, 2)  # [B, h, Nk, Dv/h]
    attn_mask = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout)
    return out.transpose(1, 2).reshape(batch, num_q, -1)


def activation_layer(name: str) -> nn.Module:
    """``"prelu"`` (DAB-DETR's released default) or ``"relu"`` (DETR's)."""
    if name == "prelu":
        return nn.PReLU()
    if name == "relu":
        return nn.ReLU()
    raise ValueError(f"activation must be 'prelu' or 'relu', got {name!r}")


class EncoderLayer(nn.Module):
    """Post-norm DETR encoder layer: ``x = LN(x + SelfAttn(q = k = x + pos, v = x))``, ``x = LN(x + FFN(x))``."""

    def __init__(self, d_model: int, num_heads: int, dim_feedforward: int, dropout: float, activation: str):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, num_heads, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.activation = activation_layer(activation)
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, src: Tensor, pos: Tensor, padding_mask: Tensor) -> Tensor:
        q = k = src + pos
        src = self.norm1(src + self.dropout(self.self_attn(q, k, src, key_padding_mask=padding_mask)[0]))
        ffn = self.linear2(self.dropout(self.activation(self.linear1(src))))
        return self.norm2(src + self.dropout(ffn))


class TransformerEncoder(nn.Module):
    """DAB-DETR's encoder: the positional embedding of each layer is scaled by ``MLP(x)`` (conditional DETR)."""

    def __init__(self, d_model: int, num_heads: int, num_layers: int, dim_feedforward: int, dropout: float, activation: str):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(d_model, num_heads, dim_feedforward, dropout, activation)
                                    for _ in range(num_layers))
        self.query_scale = MLP(d_model, d_model, d_model, 2)

    def forward(self, src: Tensor, pos: Tensor, padding_mask: Tensor) -> Tensor:
        """``src``, ``pos``: ``[B, HW, D]``; ``padding_mask``: ``[B, HW]`` -> memory ``[B, HW, D]``."""
        for layer in self.layers:
            src = layer(src, pos * self.query_scale(src), padding_mask)
        return src


class DecoderLayer(nn.Module):
    """One DAB-DETR decoder layer (post-norm): self-attention, conditional cross-attention, FFN.

    Only the first layer adds the positional query ``P_q`` (projected) to the content query in
    cross-attention, as in conditional DETR / DAB-DETR (``keep_query_pos=False``); every layer
    concatenates the (modulated) anchor embedding ``PE(x_q, y_q)`` per head.
    """

    def __init__(self, d_model: int, num_heads: int, dim_feedforward: int, dropout: float, activation: str,
                 first: bool):
        super().__init__()
        self.num_heads, self.dropout_p = num_heads, dropout
        # self-attention: Q = K = C_q + P_q, V = C_q, each part projected
        self.sa_qcontent_proj, self.sa_qpos_proj = nn.Linear(d_model, d_model), nn.Linear(d_model, d_model)
        self.sa_kcontent_proj, self.sa_kpos_proj = nn.Linear(d_model, d_model), nn.Linear(d_model, d_model)
        self.sa_v_proj, self.sa_out_proj = nn.Linear(d_model, d_model), nn.Linear(d_model, d_model)
        # cross-attention: Q = Cat(C_q [+ P_q], PE(x_q, y_q)), K = Cat(F [+ PE(x, y)], PE(x, y)), V = F
        self.ca_qcontent_proj = nn.Linear(d_model, d_model)
        self.ca_qpos_proj = nn.Linear(d_model, d_model) if first else None
        self.ca_qpos_sine_proj = nn.Linear(d_model, d_model)
        self.ca_kcontent_proj, self.ca_kpos_proj = nn.Linear(d_model, d_model), nn.Linear(d_model, d_model)
        self.ca_v_proj, self.ca_out_proj = nn.Linear(d_model, d_model), nn.Linear(d_model, d_model)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.activation = activation_layer(activation)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d_model), nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        nn.init.zeros_(self.sa_out_proj.bias)  # as torch's (and DAB-DETR's) attention modules do
        nn.init.zeros_(self.ca_out_proj.bias)

    def forward(self, content: Tensor, query_pos: Tensor, query_sine: Tensor, memory: Tensor, memory_pos: Tensor,
                memory_padding_mask: Tensor) -> Tensor:
        """Update the content queries.

        Args:
            content: ``[B, P, D]`` content queries ``C_q``.
            query_pos: ``[B, P, D]`` positional queries ``P_q = MLP(PE(A_q))``.
            query_sine: ``[B, P, D]`` the scaled, width/height-modulated ``PE(x_q, y_q)``.
            memory, memory_pos: ``[B, HW, D]`` encoder output ``F`` and its ``PE(x, y)``.
            memory_padding_mask: ``[B, HW]`` bool, ``True`` in the padding.

        Returns:
            ``[B, P, D]`` the new content queries.
        """
        dropout = self.dropout_p if self.training else 0.0
        q = self.sa_qcontent_proj(content) + self.sa_qpos_proj(query_pos)
        k = self.sa_kcontent_proj(content) + self.sa_kpos_proj(query_pos)
        attended = multi_head_attention(q, k, self.sa_v_proj(content), self.num_heads, None, dropout)
        content = self.norm1(content + self.dropout(self.sa_out_proj(attended)))

        batch, num_q, d_model = content.shape
        heads, head_dim = self.num_heads, d_model // self.num_heads
        q_content = self.ca_qcontent_proj(content)
        k_content, k_pos = self.ca_kcontent_proj(memory), self.ca_kpos_proj(memory_pos)
        if self.ca_qpos_proj is not None:  # first layer: positions also added to the content parts
            q_content = q_content + self.ca_qpos_proj(query_pos)
            k_content = k_content + k_pos
        q_sine = self.ca_qpos_sine_proj(query_sine)
        # per head: query Cat(content, position), key Cat(content, position), each head_dim wide
        q = torch.cat([q_content.view(batch, num_q, heads, head_dim), q_sine.view(batch, num_q, heads, head_dim)], dim=-1)
        k = torch.cat([k_content.view(batch, -1, heads, head_dim), k_pos.view(batch, -1, heads, head_dim)], dim=-1)
        attended = multi_head_attention(q.flatten(2), k.flatten(2), self.ca_v_proj(memory), heads,
                                        memory_padding_mask, dropout)  # [B, P, D]
        content = self.norm2(content + self.dropout(self.ca_out_proj(attended)))

        ffn = self.linear2(self.dropout(self.activation(self.linear1(content))))
        return self.norm3(content + self.dropout(ffn))


class DABDecoder(nn.Module):
    """The decoder: anchor boxes in, refined layer by layer (module docstring has the equations).

    The box head (shared by all layers) is the detector's and is passed to :meth:`forward`, so that
    each layer's predicted box is exactly the anchor the next layer starts from.
    """

    def __init__(self, d_model: int, num_heads: int, num_layers: int, dim_feedforward: int, dropout: float,
                 activation: str):
        super().__init__()
        self.d_model = d_model
        self.layers = nn.ModuleList(DecoderLayer(d_model, num_heads, dim_feedforward, dropout, activation, i == 0)
                                    for i in range(num_layers))
        self.norm = nn.LayerNorm(d_model)
        self.ref_point_head = MLP(2 * d_model, d_model, d_model, 2)  # P_q = MLP(PE(A_q)): 2D -> D
        self.query_scale = MLP(d_model, d_model, d_model, 2)  # MLP_csq(C_q), conditional spatial query
        self.ref_anchor_head = MLP(d_model, d_model, 2, 2)  # (w_ref, h_ref) = sigmoid(MLP(C_q))

    def forward(self, memory: Tensor, memory_pos: Tensor, memory_padding_mask: Tensor, anchors: Tensor,
                box_head: nn.Module) -> tuple[Tensor, Tensor, Tensor]:
        """Decode one set of anchor queries (zero content queries) against the encoder memory.

        Args:
            memory, memory_pos: ``[B, HW, D]``; memory_padding_mask: ``[B, HW]``.
            anchors: ``[B, P, 4]`` anchor boxes ``(x, y, w, h)`` in inverse-sigmoid space.
            box_head: maps ``[..., D]`` to ``[..., 4]`` box deltas in inverse-sigmoid space.

        Returns:
            ``hidden`` ``[L, B, P, D]`` (normalised content queries after each layer), ``references``
            ``[L, B, P, 4]`` (the sigmoid anchors each layer started from, detached) and ``boxes``
            ``[L, B, P, 4]`` (normalised cxcywh after each layer).
        """
        d = self.d_model
        content = memory.new_zeros(anchors.shape[0], anchors.shape[1], d)
        reference = anchors.sigmoid()  # [B, P, 4] the anchor this layer's queries are built from
        box_reference = reference  # the same values, not detached: what this layer's box is predicted from
        hidden, references, boxes = [], [], []
        for layer_id, layer in enumerate(self.layers):
            # PE(A_q) in the order (y, x, w, h), matching the image embedding's Cat(PE(y), PE(x))
            anchor_sine = sine_embedding(reference[..., [1, 0, 2, 3]], d // 2, temperature=10000)  # [B, P, 2D]
            query_pos = self.ref_point_head(anchor_sine)
            query_sine = anchor_sine[..., :d]  # PE(y_q), PE(x_q)
            if layer_id > 0:  # the first layer's content query is zero: no scaling there
                query_sine = query_sine * self.query_scale(content)
            ref_wh = self.ref_anchor_head(content).sigmoid()  # [B, P, 2] (w_ref, h_ref)
            query_sine = torch.cat([query_sine[..., : d // 2] * (ref_wh[..., 1] / reference[..., 3])[..., None],
                                    query_sine[..., d // 2:] * (ref_wh[..., 0] / reference[..., 2])[..., None]], dim=-1)
            content = layer(content, query_pos, query_sine, memory, memory_pos, memory_padding_mask)

            normed = self.norm(content)
            # As the released code: the prediction comes from the normalised content, the next anchor from
            # the content before that shared norm; the next layer's box is predicted from the next anchor
            # with its gradient (so layer l + 1's box loss also trains layer l's box), while the next
            # layer's queries are built from it detached.
            box = (box_head(normed) + inverse_sigmoid(box_reference)).sigmoid()
            hidden.append(normed)
            references.append(reference.detach())
            boxes.append(box)
            box_reference = (box_head(content) + inverse_sigmoid(reference)).sigmoid()
            reference = box_reference.detach()
        return torch.stack(hidden), torch.stack(references), torch.stack(boxes)


def inverse_sigmoid(x: Tensor, eps: float = 1e-3) -> Tensor:
    """``log(x / (1 - x))`` with ``x`` clamped to ``[eps, 1 - eps]`` (DAB-DETR's ``eps``)."""
    return torch.logit(x, eps=eps)
