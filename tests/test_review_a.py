"""Review of the data path after issues 11-16 and 18: each test failed before its fix."""

from __future__ import annotations

import os

import pytest


def test_one_sha256_file():
    """models and outdir each had their own copy of paths.sha256_file after the merges."""
    from toolkit.embed import models
    from toolkit.report import outdir
    from toolkit.store import artifacts, paths

    assert models.sha256_file is paths.sha256_file
    assert outdir.sha256_file is paths.sha256_file
    assert artifacts.sha256_file is paths.sha256_file
    assert not hasattr(outdir, "_sha256")


def test_a_weights_file_given_as_pretrained_is_refused(synthetic_coco, tmp_db, run_cli, tmp_path):
    """open_clip accepts a file path as a pretrained tag, but the set's identity then recorded the path's text,
    not the file's sha256: weights rewritten at that path were answered with the old cached embeddings."""
    from toolkit.embed import models
    from toolkit.store.study import open_study

    ckpt = tmp_path / "weights.pt"
    models.save_random_checkpoint(ckpt)
    run_cli("--db", tmp_db, "ingest", "--coco-root", synthetic_coco, "--num-images", 6, "--name", "s6")
    res = run_cli("--db", tmp_db, "embed", "--model", "tiny-clip", "--pretrained", ckpt, "--num-workers", "0", expect=2)
    assert f"--checkpoint {ckpt}" in res.output and "Traceback" not in res.output
    with open_study(tmp_db, read_only=True) as con:
        assert con.execute("SELECT count(*) FROM embedding_sets").fetchone()[0] == 0


def test_sql_csv_never_overwrites_the_database(tmp_db, run_cli):
    """clipfail sql ... --csv PATH wrote over whatever PATH was, the study's own database file included."""
    from toolkit.store.study import open_study

    run_cli("--db", tmp_db, "init")
    before = open(tmp_db, "rb").read()
    res = run_cli("--db", tmp_db, "sql", "SELECT 1 AS x", "--csv", tmp_db, expect=2)
    assert "is the database" in res.output and "Traceback" not in res.output
    assert open(tmp_db, "rb").read() == before
    with open_study(tmp_db, read_only=True) as con:
        assert con.execute("SELECT count(*) FROM schema_info").fetchone()[0] >= 1


def test_no_leftover_aliases():
    """coco.load_karpathy (ingest calls load_karpathy_dataset now) and embed.embed_subset were called by nothing."""
    from toolkit.embed import stage as embed
    from toolkit.ingest import coco

    assert not hasattr(coco, "load_karpathy") and hasattr(coco, "load_karpathy_dataset")
    assert not hasattr(embed, "embed_subset")


def test_run_refuses_a_tag_and_a_checkpoint_together(synthetic_coco, tmp_db, run_cli, tmp_path):
    """embed refused --pretrained with --checkpoint only in cli.py: clipfail run (and the Python API) embedded with
    both, recording the checkpoint's sha256 but applying the tag's preprocess (its mean/std), so a later
    `embed --checkpoint` alone was answered with those embeddings although it means another preprocess."""
    from toolkit.embed import models
    from toolkit.embed.stage import embed
    from toolkit.errors import UserError

    ckpt = tmp_path / "w.safetensors"
    models.save_random_checkpoint(ckpt)
    args = ["--db", tmp_db, "run", "--coco-root", synthetic_coco, "--num-images", 6, "--model", "tiny-clip"]
    res = run_cli(*args, "--pretrained", "openai", "--checkpoint", ckpt, "--device", "cpu", "--no-pictures", expect=2)
    assert "either --pretrained TAG or --checkpoint PATH" in res.output and "Traceback" not in res.output
    with pytest.raises(UserError, match="not both"):
        embed(tmp_db, model="tiny-clip", pretrained="openai", checkpoint=ckpt)
    assert not os.path.exists(tmp_db)  # refused before anything was written, ingest included


def test_instances_file_is_stored_relative_like_every_other_path(tmp_path, run_cli):
    """instance_files.source_file was stored absolute where every other path under the study folder is relative."""
    from toolkit.ingest.synthetic import make_synthetic_coco
    from toolkit.store.study import open_study

    study = tmp_path / "study"
    make_synthetic_coco(study / "coco", 8, seed=0)
    db = study / "s.duckdb"
    run_cli("--db", db, "ingest", "--coco-root", study / "coco", "--num-images", 6)
    with open_study(db, read_only=True) as con:
        stored = con.execute("SELECT source_file FROM instance_files").fetchall()
    assert stored == [("coco/annotations/instances_val2017.json",)]


def test_embed_with_a_moved_cache_names_relocate(synthetic_coco, tmp_db, run_cli, tmp_path):
    """embed found its cached file missing and only said --recompute (hours on real data); evaluate already named
    `relocate --cache-dir`, which rebinds the moved files in seconds."""
    import shutil

    run_cli("--db", tmp_db, "ingest", "--coco-root", synthetic_coco, "--num-images", 6, "--name", "s6")
    cache = tmp_path / "cache"
    args = ["--db", tmp_db, "embed", "--model", "tiny-clip", "--num-workers", "0"]
    run_cli(*args, "--cache-dir", cache)
    shutil.move(cache, tmp_path / "moved")
    res = run_cli(*args, "--cache-dir", cache, expect=2)
    assert "relocate --cache-dir NEW_FOLDER" in res.output and "--recompute" in res.output


def test_named_toolkit_functions_exist():
    """queries/ named toolkit.store.db.view_sql and toolkit.store.db.apply_views, which moved to toolkit.store.study
    (issue 12)."""
    import importlib
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    for rel in ("queries/__init__.py", "queries/README.md"):
        for mod, name in re.findall(r"(toolkit(?:\.\w+)+)\.(\w+)", (root / rel).read_text(encoding="utf-8")):
            assert hasattr(importlib.import_module(mod), name), f"{rel} names {mod}.{name}"
