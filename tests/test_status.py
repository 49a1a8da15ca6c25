"""clipfail status on an empty database and after ingest (the full pipeline is checked in test_demo.py)."""

from __future__ import annotations

from toolkit.report.status import study_status
from toolkit.store.study import open_study


def test_status_of_an_empty_database(run_cli, tmp_db):
    run_cli("--db", tmp_db, "init")  # status only reads: it refuses a database that does not exist
    res = run_cli("--db", tmp_db, "status")
    assert "No stage has run yet." in res.output
    assert f"clipfail --db {tmp_db} download-coco" in res.output and "clipfail demo" in res.output


def test_status_after_ingest_counts_rows_and_names_the_next_stage(run_cli, tmp_db, synthetic_coco):
    run_cli("--db", tmp_db, "ingest", "--coco-root", synthetic_coco, "--num-images", 12, "--name", "small")
    run_cli("--db", tmp_db, "ingest", "--coco-root", synthetic_coco, "--num-images", 20, "--name", "bigger")
    con = open_study(tmp_db)
    try:
        res = study_status(con)
        n_captions = con.execute(
            "SELECT count(*) FROM subset_captions JOIN subsets USING (subset_id) WHERE name = 'small'"
        ).fetchone()[0]
    finally:
        con.close()
    assert list(res.stages["stage"]) == ["ingest", "ingest"]
    assert list(res.stages["subset"]) == ["small", "bigger"]
    assert res.stages["rows"].iloc[0] == f"12 images, {n_captions} captions"
    assert list(res.runs["stage"]) == ["ingest"] and res.runs["runs"].iloc[0] == 2
    assert res.next_steps == ["Embed the subset:  clipfail embed --subset small --model openai/clip-vit-base-patch32"]

    out = run_cli("--db", tmp_db, "status").output
    assert "small" in out and "bigger" in out and f"clipfail --db {tmp_db} embed --subset small" in out
