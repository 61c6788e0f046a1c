"""DRKD's two relation modules (METHODS.md §4), one for each kind of relation it distils.

- :class:`GraphReasoningUnit` (pixel-wise relations): a global reasoning unit (GloRe; Chen et al.,
  CVPR 2019) on one FPN map. Pixels are projected onto a few graph nodes, a graph convolution
  mixes the nodes, and the result is projected back onto the pixels and added to the map.
- :class:`InstanceRelationModule` (instance-wise relations): a non-local block over the
  RoIAligned ground-truth instances of one image, ``f = θ φᵀ``, with DRKD's *relation filter*.

Both return the same shape as their input; ``steps(...)`` returns the intermediate tensors
(assignment maps, node features, relation matrix, gate) as a small dataclass for the notebook.
DRKD keeps one copy for the student's features and one for the teacher's
(:class:`kdlab.distill.drkd.DRKD`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

GRAPH_NORMS = ("batch", "group", "none")
RELATION_FILTERS = ("trained", "random", "none")


@dataclass
class GraphReasoningSteps:
    """What one :class:`GraphReasoningUnit` computes, step by step (``L = H W`` pixels).

    Attributes:
        state: ``[B, S, H, W]`` the features in the state space, ``W_s X``.
        assignment: ``[B, N, H, W]`` node-assignment maps ``W_b X``: how much pixel ``p`` feeds node ``i``.
        nodes: ``[B, S, N]`` node features ``V`` (before the graph convolution).
        reasoned_nodes: ``[B, S, N]`` node features ``Z`` after the graph convolution.
        back_projected: ``[B, S, H, W]`` ``Y = Z · assignment``, back on the pixels.
        output: ``[B, C, H, W]`` the unit's output ``X + norm(W_e Y)``.
    """

    state: Tensor
    assignment: Tensor
    nodes: Tensor
    reasoned_nodes: Tensor
    back_projected: Tensor
    output: Tensor


def graph_norm(kind: str, channels: int) -> nn.Module:
    """The norm after the unit's last 1x1 conv: ``"batch"`` (the released code's ``BatchNorm2d``,
    eps 1e-4), ``"group"`` (``GroupNorm`` with ``gcd(32, C)`` groups: independent of the batch size,
    for small batches and 1x1 coarse maps), or ``"none"``."""
    if kind == "batch":
        return nn.BatchNorm2d(channels, eps=1e-4)
    if kind == "group":
        return nn.GroupNorm(math.gcd(32, channels), channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm must be one of {GRAPH_NORMS}, got {kind!r}")


class GraphReasoningUnit(nn.Module):
    """Global reasoning unit on one FPN map (GloRe, as DRKD's pixel-wise relation module).

    With ``X`` the map ``[B, C, H, W]`` seen as ``[B, C, L]`` (``L = H W`` pixels), ``N`` nodes and
    an ``S``-dimensional state space::

        state        X_s = W_s X                            [B, S, L]   1x1 conv
        assignment   P   = W_b X                            [B, N, L]   1x1 conv
        nodes        V   = X_s Pᵀ        (/ L if normalize)  [B, S, N]
        graph conv   Z   = W_g ReLU(V + V Aᵀ + b_A)          [B, S, N]
        back-project Y   = Z P                              [B, S, L]
        output           X + norm(W_e Y)                    [B, C, H, W]

    ``A`` (``N x N``, :attr:`adjacency`) mixes the nodes: the first 1-D convolution of the graph
    convolution, across nodes, with the identity as a residual; ``W_g`` (``S x S``) is the second,
    across states. The GloRe paper writes ``Z = ((I − A) V) W_g``; its released code (which DRKD's
    copies) computes the form above (``I + A``, the sign being learned; a bias on ``A``; a ReLU
    between the two maps), and so does kdlab.

    Released-code details kept here: no ``1/L`` normalisation of ``V`` (``normalize=False``, the
    default of ``GloRe_Unit_2D``), a bias on ``W_s``, ``W_b`` and ``A`` but not on ``W_g`` or
    ``W_e``, ``BatchNorm2d(eps=1e-4)`` with PyTorch's default init (weight 1: the code's comment
    "should be zero initialized" is not acted on). ``zero_init=True`` does what the comment says:
    the unit then starts as the identity.

    Args:
        in_channels: ``C``, the FPN map's channels.
        num_nodes: ``N`` (released: 64 on the two finest levels, 256 on the coarser).
        num_state: ``S`` (released: ``2 N``, i.e. 128 / 512).
        norm: ``"batch"`` (released), ``"group"`` or ``"none"``; see :func:`graph_norm`.
        normalize: divide ``V`` by ``L`` (GloRe's option for inputs of varying size).
        zero_init: start as the identity (the norm's scale, or with no norm ``W_e``, set to 0).
    """

    def __init__(self, in_channels: int, num_nodes: int, num_state: int, *, norm: str = "batch",
                 normalize: bool = False, zero_init: bool = False):
        super().__init__()
        self.num_nodes, self.num_state, self.normalize = num_nodes, num_state, normalize
        self.to_state = nn.Conv2d(in_channels, num_state, kernel_size=1)  # W_s
        self.to_assignment = nn.Conv2d(in_channels, num_nodes, kernel_size=1)  # W_b
        # the graph convolution: GloRe's two 1x1 Conv1d layers, written as the linear maps they are
        self.node_mixing = nn.Linear(num_nodes, num_nodes)  # A, b_A (across nodes)
        self.state_mixing = nn.Linear(num_state, num_state, bias=False)  # W_g (across states)
        self.to_features = nn.Conv2d(num_state, in_channels, kernel_size=1, bias=False)  # W_e
        self.norm = graph_norm(norm, in_channels)
        if zero_init:
            nn.init.zeros_(self.norm.weight if norm != "none" else self.to_features.weight)

    @property
    def adjacency(self) -> Tensor:
        """``[N, N]`` the learned node adjacency ``A`` (``Z`` uses ``I + A``)."""
        return self.node_mixing.weight

    def graph_convolution(self, nodes: Tensor) -> Tensor:
        """``Z = W_g ReLU(V + V Aᵀ + b_A)``: ``[B, S, N] -> [B, S, N]``."""
        mixed = nodes + self.node_mixing(nodes)  # node_mixing acts on the last (node) axis
        return self.state_mixing(torch.relu(mixed).transpose(1, 2)).transpose(1, 2)

    def steps(self, features: Tensor) -> GraphReasoningSteps:
        """Every intermediate tensor of the forward pass (see :class:`GraphReasoningSteps`).

        Args:
            features: ``[B, C, H, W]`` one FPN map.
        """
        batch, _, height, width = features.shape
        state = self.to_state(features)  # [B, S, H, W]
        assignment = self.to_assignment(features)  # [B, N, H, W]
        projection = assignment.flatten(2)  # [B, N, L]
        nodes = state.flatten(2) @ projection.transpose(1, 2)  # [B, S, N]
        if self.normalize:
            nodes = nodes / (height * width)
        reasoned = self.graph_convolution(nodes)  # [B, S, N]
        back_projected = (reasoned @ projection).view(batch, self.num_state, height, width)  # [B, S, H, W]
        output = features + self.norm(self.to_features(back_projected))
        return GraphReasoningSteps(state, assignment, nodes, reasoned, back_projected, output)

    def forward(self, features: Tensor) -> Tensor:
        """``[B, C, H, W] -> [B, C, H, W]``, the relation-enhanced map."""
        return self.steps(features).output


@dataclass
class InstanceRelationSteps:
    """What one :class:`InstanceRelationModule` computes for the ``K`` instances of an image.

    Attributes:
        similarity: ``[K, K]`` the relation matrix ``f = θ(x) φ(x)ᵀ`` (divided by ``sqrt(E)`` when scaled).
        gate: ``[K, K]`` the relation filter's gate in ``[0, 1]`` (ones without a filter).
        attention: ``[K, K]`` the gated softmax over ``j`` (see the module), rows sum to 1.
        output: the instances' relation features, the input's shape ``[K, ...]``.
    """

    similarity: Tensor
    gate: Tensor
    attention: Tensor
    output: Tensor


class PairGate(nn.Module):
    """kdlab's trained relation filter: a score for each ordered pair of instances.

    ``gate_ij = σ((U x_i) · (V x_j) / sqrt(r) + b)`` with ``U, V: R^D -> R^r``: a low-rank bilinear form,
    so the gate can single out a pair (an additive score ``u_i + v_j`` could only mute all of one
    instance's relations at once), at ``O(K² r)`` cost. ``b`` starts at 2 (gates near 0.88): the
    filter starts open and learns what to suppress.
    """

    def __init__(self, in_dim: int, rank: int = 32, initial_bias: float = 2.0):
        super().__init__()
        self.rank = rank
        self.query = nn.Linear(in_dim, rank, bias=False)  # U
        self.key = nn.Linear(in_dim, rank, bias=False)  # V
        self.bias = nn.Parameter(torch.tensor(float(initial_bias)))

    def forward(self, flat: Tensor) -> Tensor:
        """``[K, D]`` -> ``[K, K]`` gates in ``(0, 1)``."""
        return torch.sigmoid(self.query(flat) @ self.key(flat).T / math.sqrt(self.rank) + self.bias)


class InstanceRelationModule(nn.Module):
    """Relations among the instances of one image, with DRKD's relation filter.

    With ``x_i`` the flattened RoI features of instance ``i`` (``D = C S S``) and ``E`` the
    embedding size::

        f_ij = θ(x_i) · φ(x_j) / sqrt(E)          relation matrix, [K, K]
        a_ij = gate_ij exp(f_ij) / Σ_k gate_ik exp(f_ik)     the filter, then a softmax over j
        z_i  = W(Σ_j a_ij g(x_j)) + x_i           aggregation, projection, residual

    ``θ, φ, g: R^D -> R^E`` and ``W: R^E -> R^D`` are linear maps with bias. The relation filter:

    - ``"trained"`` (kdlab's, the paper's intent): :class:`PairGate`, a learned score of each ordered
      pair in ``(0, 1)``; it multiplies the pair's attention weight before the normalisation
      (``softmax_j(f_ij + log gate_ij)``), so a gate near 0 removes the pair from what ``i`` gathers.
    - ``"random"`` (the released code, ``variant="official"``): ``gate = softmax_j(x R + r)`` with
      ``R [D, K]``, ``r [K]`` drawn afresh at every call with ``nn.Linear``'s default init
      (``U(±1/sqrt(D))``), multiplied into the similarities as released (``softmax_j(f_ij gate_ij)``).
      Its width depends on ``K``, so it cannot be a parameter: it never learns, and column ``j`` is
      a random slot, not instance ``j``; on large features its rows are nearly one-hot, so it
      favours a random partner.
    - ``"none"``: no filter.

    The released code does not scale ``f`` by ``1/sqrt(E)`` (``scale=False``); unscaled, the
    similarities of large features run to thousands and the softmax picks one partner per instance.

    An image with no instance gives empty outputs; with one, ``a = [[1]]``.

    Args:
        in_dim: ``D = C S S`` of the flattened RoI features.
        embed_dim: ``E`` (default ``D // 2``, as released).
        filter: ``"trained"``, ``"random"`` or ``"none"``.
        scale: divide the similarities by ``sqrt(E)`` (kdlab; the released code does not).
        gate_rank: ``r`` of the trained filter.
    """

    def __init__(self, in_dim: int, embed_dim: int | None = None, filter: str = "trained", scale: bool = True,
                 gate_rank: int = 32):
        super().__init__()
        if filter not in RELATION_FILTERS:
            raise ValueError(f"filter must be one of {RELATION_FILTERS}, got {filter!r}")
        embed_dim = embed_dim or max(in_dim // 2, 1)
        self.in_dim, self.embed_dim, self.filter, self.scale = in_dim, embed_dim, filter, scale
        self.theta = nn.Linear(in_dim, embed_dim)
        self.phi = nn.Linear(in_dim, embed_dim)
        self.g = nn.Linear(in_dim, embed_dim)
        self.out = nn.Linear(embed_dim, in_dim)  # W
        self.pair_gate = PairGate(in_dim, gate_rank) if filter == "trained" else None

    def relation_gate(self, instances: Tensor) -> Tensor:
        """The relation filter's gate ``[K, K]`` in ``[0, 1]`` for flattened instances ``[K, D]``."""
        num = instances.shape[0]
        if self.filter == "trained":
            return self.pair_gate(instances)
        if self.filter == "random":  # the released code's nn.Linear(D, K), re-created at every forward
            bound, like = 1.0 / math.sqrt(self.in_dim), dict(device=instances.device, dtype=instances.dtype)
            weight = torch.empty(num, self.in_dim, **like).uniform_(-bound, bound)  # [K, D], kaiming_uniform(a=sqrt(5))
            bias = torch.empty(num, **like).uniform_(-bound, bound)
            return torch.softmax(F.linear(instances, weight, bias), dim=-1)
        return instances.new_ones(num, num)

    def steps(self, instances: Tensor) -> InstanceRelationSteps:
        """Every intermediate tensor (see :class:`InstanceRelationSteps`).

        Args:
            instances: ``[K, ...]`` RoI features of one image's instances (``prod(...) = D``).
        """
        flat = instances.reshape(instances.shape[0], self.in_dim)  # [K, D]
        similarity = self.theta(flat) @ self.phi(flat).T  # [K, K]
        if self.scale:
            similarity = similarity / math.sqrt(self.embed_dim)
        gate = self.relation_gate(flat)  # [K, K]
        if self.filter == "random":  # released: the gate multiplies the similarities
            logits = similarity * gate
        else:  # a gate multiplies each pair's attention weight: exp(f) * gate = exp(f + log gate)
            logits = similarity + torch.log(gate.clamp(min=1e-12))
        attention = torch.softmax(logits, dim=-1)  # [K, K]
        related = self.out(attention @ self.g(flat))  # [K, D]
        return InstanceRelationSteps(similarity, gate, attention, (related + flat).view(instances.shape))

    def forward(self, instances: Tensor) -> Tensor:
        """``[K, ...] -> [K, ...]``, each instance's features plus what it gathers from the others."""
        return self.steps(instances).output
