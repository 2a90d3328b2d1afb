"""Objective terms: pure functions of tensors; distribution enters only through gather_rows."""

from mmcontrast.losses import terms as _terms  # noqa: F401  (registers the built-in terms)
from mmcontrast.losses.gather import gather_rows, world_info
from mmcontrast.losses.info_nce import info_nce
from mmcontrast.losses.registry import TERMS, register_term
from mmcontrast.losses.terms import Objective

__all__ = ["TERMS", "Objective", "gather_rows", "info_nce", "register_term", "world_info"]
