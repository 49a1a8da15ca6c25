"""The clipfail version (a leaf module: `toolkit/__init__` and the stages import it, it imports nothing)."""

__version__ = "0.1.0"
