"""Losses, one equation per function (the equation is in each docstring)."""

from kdlab.losses.gfl import distance_to_distribution, distribution_focal_loss, integral, quality_focal_loss
from kdlab.losses.ld import edge_ld, ld_kl_div

__all__ = ["integral", "distance_to_distribution", "distribution_focal_loss", "quality_focal_loss", "ld_kl_div", "edge_ld"]
