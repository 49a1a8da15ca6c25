"""Review of the data path after issues 11-16 and 18: each test failed before its fix."""

from __future__ import annotations


def test_one_sha256_file():
    """models and outdir each had their own copy of paths.sha256_file after the merges."""
    from toolkit import artifacts, models, outdir, paths

    assert models.sha256_file is paths.sha256_file
    assert outdir.sha256_file is paths.sha256_file
    assert artifacts.sha256_file is paths.sha256_file
    assert not hasattr(outdir, "_sha256")
