"""gradmeta: learning on gradients and on low-rank weights."""
__version__ = "0.1.0"
