"""clipfail: CLIP text-to-image retrieval failure analysis, backed by one DuckDB file."""

__version__ = "0.1.0"
