"""Objective terms: pure functions of tensors; distribution enters only through gather_rows."""

from mmcontrast.losses import terms as _terms  # noqa: F401  (registers the built-in terms)
from mmcontrast.losses.gather import gather_rows, world_info
from mmcontrast.losses.gram import gram_loss, gram_volume
from mmcontrast.losses.info_nce import info_nce
from mmcontrast.losses.registry import TERMS, register_term
from mmcontrast.losses.siglip import siglip
from mmcontrast.losses.symile import mip_scores, symile_loss
from mmcontrast.losses.terms import Objective
from mmcontrast.losses.tiled import tiled_cross_entropy

__all__ = [
    "TERMS",
    "Objective",
    "gather_rows",
    "gram_loss",
    "gram_volume",
    "info_nce",
    "mip_scores",
    "register_term",
    "siglip",
    "symile_loss",
    "tiled_cross_entropy",
    "world_info",
]
