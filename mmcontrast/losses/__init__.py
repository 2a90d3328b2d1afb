from mmcontrast.losses.registry import TERMS, register_term  # noqa: F401
