"""Table definitions for the clipfail database (SQLAlchemy Core metadata)."""

from schema.tables import SCHEMA_VERSION, metadata

__all__ = ["SCHEMA_VERSION", "metadata"]
