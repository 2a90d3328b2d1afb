"""mmcontrast: CLIP-style contrastive pretraining for more than two modalities."""

__version__ = "0.1.0"


def load_exported(path, device="cpu"):
    """Load a folder written by `mmcontrast export`; see mmcontrast.export.load_exported."""
    from mmcontrast.export import load_exported as _load

    return _load(path, device=device)
