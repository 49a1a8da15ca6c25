"""A study folder that can move (issue 11, finding 6).

Paths under the database's folder are stored relative to it, so a copied study (database, cache,
images) keeps working; other paths stay absolute and `clipfail relocate` rebinds them after a
check that the files at the new place are the ones referenced; `status` names missing files.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
from helpers import query_rows
from PIL import Image

from toolkit.store import paths
from toolkit.store.study import open_study

TINY = ["--model", "tiny-clip", "--num-workers", "0"]


def rows(db_path, sql, params=()):
    return query_rows(db_path, sql, params)


def study(run_cli, folder: Path, coco: Path, cache_dir: Path | None = None, n: int = 20) -> str:
    """ingest + embed (tiny random model) + evaluate into folder/study.duckdb."""
    dbp = str(folder / "study.duckdb")
    run_cli("--db", dbp, "ingest", "--coco-root", coco, "--num-images", n, "--name", "s")
    run_cli("--db", dbp, "embed", *TINY, *(["--cache-dir", cache_dir] if cache_dir else []))
    run_cli("--db", dbp, "evaluate", "--device", "cpu")
    return dbp


def test_stored_paths_are_relative_under_the_database_folder_and_absolute_elsewhere(tmp_path):
    dbp = tmp_path / "s" / "study.duckdb"
    assert paths.to_stored(dbp, tmp_path / "s" / "coco" / "val2017") == "coco/val2017"
    assert paths.to_stored(dbp, tmp_path / "s") == "."
    assert paths.to_stored(str(dbp), tmp_path / "elsewhere") == str((tmp_path / "elsewhere").resolve())
    assert paths.resolve(dbp, "coco/val2017") == tmp_path / "s" / "coco" / "val2017"
    assert paths.resolve(dbp, "/data/coco") == Path("/data/coco")  # absolute stays absolute
    assert paths.resolve(dbp, None) is None


def test_a_copied_study_folder_works_and_reuses_its_cached_sets(run_cli, synthetic_coco, tmp_path):
    # synthetic_coco is tmp_path/coco: the images and the default cache lie under the database's folder
    dbp = study(run_cli, tmp_path, synthetic_coco)
    assert rows(dbp, "SELECT image_root, source_file FROM subsets") == [
        ("coco/val2017", "coco/annotations/captions_val2017.json")
    ]
    stored = [r[0] for r in rows(dbp, "SELECT path FROM embedding_sets ORDER BY embedding_set_id")]
    assert len(stored) == 2 and all(p.startswith("study_cache/embeddings/s/") for p in stored)
    before = rows(dbp, "SELECT stage, count(*) FROM runs GROUP BY ALL ORDER BY ALL")

    copy = tmp_path.parent / (tmp_path.name + "-copy")
    shutil.copytree(tmp_path, copy)
    os.rename(tmp_path, tmp_path.parent / (tmp_path.name + "-gone"))  # the original is no longer there
    cdb = str(copy / "study.duckdb")

    out = run_cli("--db", cdb, "status").output
    assert "MISSING" not in out
    # the same commands, run in the copy, reuse everything: nothing is ingested or embedded again
    res = run_cli("--db", cdb, "ingest", "--coco-root", copy / "coco", "--num-images", 20, "--name", "s")
    assert "already ingested" in res.output
    assert "Already embedded" in run_cli("--db", cdb, "embed", *TINY).output  # checksums verified in the copy
    run_cli("--db", cdb, "evaluate", "--device", "cpu")
    assert rows(cdb, "SELECT stage, count(*) FROM runs GROUP BY ALL ORDER BY ALL") == before
    # a new evaluation reads the embedding files and sample-failures draws pictures from the images
    run_cli("--db", cdb, "evaluate", "--device", "cpu", "--direction", "image-to-text")
    run_cli("--db", cdb, "sample-failures", "--n", 8, "--overlap", 2, "--per-annotator", 2, "--out", copy / "fa")
    assert len(list((copy / "fa").glob("vis_*.png"))) == 8
    assert rows(cdb, "SELECT count(*) FROM embedding_sets") == [(2,)]


def test_relocate_images_outside_the_folder_is_checked_then_rebound(run_cli, synthetic_coco, tmp_path):
    folder = tmp_path / "study"
    folder.mkdir()
    coco = tmp_path.parent / (tmp_path.name + "-data")  # outside the study folder: stored absolute
    shutil.copytree(synthetic_coco, coco)
    dbp = study(run_cli, folder, coco)
    assert rows(dbp, "SELECT image_root FROM subsets") == [(str((coco / "val2017").resolve()),)]
    moved = tmp_path / "moved-coco"
    os.rename(coco, moved)

    status = run_cli("--db", dbp, "status").output
    assert "MISSING FILES" in status and "image files missing under" in status and "20 in all" in status
    assert f"clipfail --db {dbp} relocate --images-root NEW_FOLDER --subset s" in status
    assert "Everything is up to date" not in status
    res = run_cli("--db", dbp, "embed", *TINY, "--recompute", expect=2)
    assert "missing" in res.output and f"clipfail --db {dbp} relocate --images-root NEW_FOLDER --subset s" in res.output

    before = rows(dbp, "SELECT * FROM subsets")
    # a folder without the images: refused, with the first few missing files named
    res = run_cli("--db", dbp, "relocate", "--images-root", tmp_path, expect=2)
    assert "Nothing was changed" in res.output and "20 in all" in res.output and ".jpg" in res.output
    # the same file names with other pictures: refused (recorded width x height differ)
    fake = tmp_path / "fake"
    shutil.copytree(moved / "val2017", fake)
    for p in fake.iterdir():
        Image.new("RGB", (7, 5)).save(p, format="JPEG")
    res = run_cli("--db", dbp, "relocate", "--images-root", fake, "--subset", "s", expect=2)
    assert "not the ingested ones" in res.output and "recorded" in res.output
    res = run_cli("--db", dbp, "relocate", "--images-root", moved / "val2017", "--subset", "nope", expect=2)
    assert "No subset named 'nope'" in res.output
    # good images but a cache that is not there: all or nothing, the image root stays as it was
    os.rename(folder / "study_cache", tmp_path / "cache-away")
    res = run_cli("--db", dbp, "relocate", "--images-root", moved / "val2017", "--cache-dir", fake, expect=2)
    assert "Nothing was changed" in res.output and "neither under" in res.output
    os.rename(tmp_path / "cache-away", folder / "study_cache")
    assert rows(dbp, "SELECT * FROM subsets") == before

    out = run_cli("--db", dbp, "relocate", "--images-root", moved / "val2017", "--subset", "s").output
    assert "images" in out and "20 files found" in out
    assert rows(dbp, "SELECT image_root FROM subsets") == [(str((moved / "val2017").resolve()),)]
    status = run_cli("--db", dbp, "status").output
    assert "image files missing" not in status and "captions JSON" in status  # that one moved too
    # the ingest command with the new place is a no-op, and embedding from the new place works
    res = run_cli("--db", dbp, "ingest", "--images-dir", moved / "val2017", "--captions-json",
                  moved / "annotations" / "captions_val2017.json", "--num-images", 20, "--name", "s")  # fmt: skip
    assert "already ingested" in res.output
    run_cli("--db", dbp, "embed", *TINY, "--recompute")
    # the captions JSON moved too: status says so; relocate checks its sha256
    run_cli("--db", dbp, "relocate", "--captions-json", moved / "val2017" / os.listdir(moved / "val2017")[0], expect=2)
    run_cli("--db", dbp, "relocate", "--captions-json", moved / "annotations" / "captions_val2017.json")
    assert "MISSING" not in run_cli("--db", dbp, "status").output


def test_relocate_cache_outside_the_folder_checks_every_file(run_cli, synthetic_coco, tmp_path):
    folder = tmp_path / "study"
    folder.mkdir()
    cache = tmp_path / "cache"  # not under the study folder: stored absolute
    dbp = study(run_cli, folder, synthetic_coco, cache_dir=cache)
    stored = [r[0] for r in rows(dbp, "SELECT path FROM embedding_sets ORDER BY embedding_set_id")]
    assert all(Path(p).is_absolute() and p.startswith(str(cache.resolve())) for p in stored)
    moved = tmp_path / "big-disk" / "cache"
    moved.parent.mkdir()
    os.rename(cache, moved)

    res = run_cli("--db", dbp, "evaluate", "--device", "cpu", "--direction", "image-to-text", expect=2)
    assert "is missing" in res.output and f"clipfail --db {dbp} relocate --cache-dir NEW_FOLDER" in res.output
    status = run_cli("--db", dbp, "status").output
    assert "embedding files missing or damaged, 2 in all" in status
    assert f"clipfail --db {dbp} relocate --cache-dir NEW_FOLDER" in status

    assert "Give what moved" in run_cli("--db", dbp, "relocate", expect=2).output
    res = run_cli("--db", tmp_path / "typo.duckdb", "relocate", "--cache-dir", moved, expect=2)
    assert "does not exist" in res.output and not (tmp_path / "typo.duckdb").exists()
    # a copy with one damaged file: refused by sha256, nothing changed
    bad = tmp_path / "bad-copy"
    shutil.copytree(moved, bad)
    victim = next(bad.rglob("text-*.npy"))
    arr = np.load(victim)
    arr[0, 0] += 1
    np.save(victim, arr)
    res = run_cli("--db", dbp, "relocate", "--cache-dir", bad, expect=2)
    assert "Nothing was changed" in res.output and "another sha256" in res.output
    res = run_cli("--db", dbp, "relocate", "--cache-dir", tmp_path / "study", expect=2)
    assert "neither under" in res.output and "set 1 (image)" in res.output
    assert [r[0] for r in rows(dbp, "SELECT path FROM embedding_sets ORDER BY embedding_set_id")] == stored

    out = run_cli("--db", dbp, "relocate", "--cache-dir", moved.parent).output  # found by name, recursively
    assert "2 embedding file(s) rebound" in out
    now = [r[0] for r in rows(dbp, "SELECT path FROM embedding_sets ORDER BY embedding_set_id")]
    assert all(p.startswith(str(moved.resolve())) for p in now)
    assert "MISSING" not in run_cli("--db", dbp, "status").output
    run_cli("--db", dbp, "evaluate", "--device", "cpu", "--direction", "image-to-text")
    assert "Already embedded" in run_cli("--db", dbp, "embed", *TINY).output


def test_status_names_a_damaged_embedding_file_by_size(run_cli, synthetic_coco, tmp_path):
    dbp = study(run_cli, tmp_path, synthetic_coco)
    path = paths.resolve(dbp, rows(dbp, "SELECT path FROM embedding_sets WHERE kind = 'image'")[0][0])
    with open(path, "ab") as f:
        f.write(b"\0" * 16)
    out = run_cli("--db", dbp, "status").output
    assert "MISSING FILES" in out and "bytes, expected" in out and "Everything is up to date" not in out


def test_databases_with_absolute_paths_keep_working(run_cli, synthetic_coco, tmp_path, monkeypatch):
    """A database written before relative paths (everything absolute, the ingest config hash too) works as it is."""
    with monkeypatch.context() as m:  # the old behaviour: every path stored absolute
        m.setattr(paths, "to_stored", lambda _con, p: str(Path(p).resolve()))
        dbp = study(run_cli, tmp_path, synthetic_coco)
    root = str((synthetic_coco / "val2017").resolve())
    assert rows(dbp, "SELECT image_root FROM subsets") == [(root,)]
    assert all(Path(r[0]).is_absolute() for r in rows(dbp, "SELECT path FROM embedding_sets"))
    before = rows(dbp, "SELECT stage, count(*) FROM runs GROUP BY ALL ORDER BY ALL")
    res = run_cli("--db", dbp, "ingest", "--coco-root", synthetic_coco, "--num-images", 20, "--name", "s")
    assert "already ingested" in res.output
    assert "Already embedded" in run_cli("--db", dbp, "embed", *TINY).output
    assert rows(dbp, "SELECT stage, count(*) FROM runs GROUP BY ALL ORDER BY ALL") == before
    run_cli("--db", dbp, "evaluate", "--device", "cpu", "--direction", "image-to-text")
    assert "MISSING" not in run_cli("--db", dbp, "status").output
    assert rows(dbp, "SELECT image_root FROM subsets") == [(root,)]  # absolute stays absolute


# ----------------------------------------------------------------------------- more paths stored relative


def test_instances_file_is_stored_relative_like_every_other_path(tmp_path, run_cli):
    """instance_files.source_file was stored absolute where every other path under the study folder is relative."""
    from toolkit.ingest.synthetic import make_synthetic_coco

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
