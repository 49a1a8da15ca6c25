"""Study files that DuckDB's long-term-support line (1.4.x) opens: the demo's database is written in DuckDB 1.4's
storage format, DuckDB 1.4 (in a venv of its own: $CLIPFAIL_DUCKDB_LTS_VENV, by default .venv-duckdb-lts, which
.ci/run creates) runs README's example queries on it with the same answers as the DuckDB that clipfail uses, and
`clipfail init --compat` rewrites a study that an older clipfail wrote in a newer format, keeping a backup.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import duckdb
from helpers import require_tool

ROOT = Path(__file__).resolve().parent.parent
LTS_VENV = Path(os.environ.get("CLIPFAIL_DUCKDB_LTS_VENV") or ROOT / ".venv-duckdb-lts")
INSTALL = "python3 -m venv .venv-duckdb-lts && .venv-duckdb-lts/bin/pip install 'duckdb>=1.4,<1.5'"
RUN_QUERIES = """
import json, sys, duckdb
con = duckdb.connect(sys.argv[1], read_only=True)
out = {"version": duckdb.__version__, "rows": [con.execute(q).fetchall() for q in json.loads(sys.argv[2])]}
print(json.dumps(out, default=str))
"""


def readme_queries() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```sql\n(.*?)```", text, re.S).group(1)
    return [q.strip() for q in block.split(";") if q.strip()]


def storage_of(path) -> str:
    con = duckdb.connect(str(path), read_only=True)
    try:
        return con.execute("SELECT tags['storage_version'] FROM duckdb_databases() WHERE database_name = "
                           "current_database()").fetchone()[0]  # fmt: skip
    finally:
        con.close()


def lts_python() -> Path:
    python = LTS_VENV / "bin" / "python"
    if not python.exists():
        require_tool("duckdb 1.4", f"not installed in {LTS_VENV} (set CLIPFAIL_DUCKDB_LTS_VENV, or run: {INSTALL})")
    return python


def run_in_lts(path, queries) -> dict:
    done = subprocess.run([str(lts_python()), "-c", RUN_QUERIES, str(path), json.dumps(queries)],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def test_the_demo_opens_in_duckdb_lts_with_the_same_answers(demo, tmp_path):
    db = tmp_path / "demo.duckdb"
    shutil.copy(demo[0] / "demo.duckdb", db)  # DuckDB 1.4 may not write to the session's copy
    assert storage_of(db) == "v1.4.0+"
    queries = readme_queries()
    assert len(queries) >= 4
    con = duckdb.connect(str(db), read_only=True)
    try:
        here = json.loads(json.dumps([con.execute(q).fetchall() for q in queries], default=str))
    finally:
        con.close()
    lts = run_in_lts(db, queries)
    assert lts["version"].startswith("1.4.")
    assert lts["rows"] == here and all(here)


def test_init_compat_rewrites_a_study_in_a_newer_format(tmp_path, run_cli):
    db = tmp_path / "old.duckdb"
    con = duckdb.connect(str(db))  # DuckDB's default format, as an older clipfail wrote it
    con.execute("CREATE TABLE kept_by_hand (x INTEGER); INSERT INTO kept_by_hand VALUES (1), (2)")
    con.close()
    newer = storage_of(db)
    res = run_cli("--db", db, "init")
    assert f"Its DuckDB storage format is {newer}" in res.output and "init --compat" in res.output
    assert storage_of(db) == newer  # opened, upgraded, format kept: nothing is rewritten unasked
    con = duckdb.connect(str(db))
    used = [con.execute("SELECT nextval('run_id_seq')").fetchone()[0] for _ in range(3)]
    tables = {t: con.execute(f"SELECT * FROM {t} ORDER BY ALL").fetchall() for t in ("kept_by_hand", "schema_info")}
    con.close()

    res = run_cli("--db", db, "init", "--compat")
    backup = tmp_path / "old.duckdb.pre-compat.bak"
    assert f"Rewrote it in DuckDB's v1.4.0 storage format (it was {newer})" in res.output and str(backup) in res.output
    # the backup is the original file, renamed: still in its format, with its rows (the rewrite checkpoints it
    # first, so that no .wal is left behind, so its bytes are not those of before)
    assert storage_of(db) == "v1.4.0+" and storage_of(backup) == newer
    con = duckdb.connect(str(backup), read_only=True)
    try:
        assert {t: con.execute(f"SELECT * FROM {t} ORDER BY ALL").fetchall() for t in tables} == tables
    finally:
        con.close()
    con = duckdb.connect(str(db))
    try:
        assert {t: con.execute(f"SELECT * FROM {t} ORDER BY ALL").fetchall() for t in tables} == tables
        assert con.execute("SELECT nextval('run_id_seq')").fetchone()[0] == used[-1] + 1  # ids go on, never reused
    finally:
        con.close()
    res = run_cli("--db", db, "init", "--compat")  # compatible now: left alone, no second backup
    assert "Rewrote" not in res.output and sorted(p.name for p in tmp_path.iterdir()) == sorted([backup.name, db.name])
    assert run_in_lts(db, ["SELECT count(*) FROM kept_by_hand"])["rows"] == [[[2]]]


def test_init_compat_keeps_the_study_as_it_was_before_any_upgrade(tmp_path, run_cli):
    """The backup is taken before init upgrades the schema: an older clipfail can still open it."""
    db = tmp_path / "old.duckdb"
    con = duckdb.connect(str(db))  # newer format, and no clipfail schema yet (as an older clipfail left it)
    con.execute("CREATE TABLE kept_by_hand (x INTEGER); INSERT INTO kept_by_hand VALUES (7)")
    con.close()
    newer = storage_of(db)
    res = run_cli("--db", db, "init", "--compat")
    backup = tmp_path / "old.duckdb.pre-compat.bak"
    assert f"(it was {newer})" in res.output and storage_of(backup) == newer and storage_of(db) == "v1.4.0+"
    con = duckdb.connect(str(backup), read_only=True)
    try:
        names = {r[0] for r in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
        assert names == {"kept_by_hand"}  # untouched by the upgrade: no schema_info, no clipfail table
    finally:
        con.close()
