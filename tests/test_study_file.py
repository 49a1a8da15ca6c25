"""The study's database file (issue 11, items 7, 8, 17 and 25 in part; issue 24): read-only commands never write
it, `sql` runs one read-only query and its --csv never writes over a database, its WAL or the study's files,
no output folder is one of the study's, and a missing, damaged or not-a-database --db gets one clear message.

Note: when the tests run as root, chmod does not stop writes; the byte-identical and
no-new-file checks below are what prove that nothing was written.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
from pathlib import Path

import duckdb
import numpy as np
import pytest
from helpers import assert_one_message, register_hand_built

from toolkit.errors import UserError
from toolkit.ingest.stage import ingest
from toolkit.labels.sample import sample_failures
from toolkit.labels.simulate import simulate_labels
from toolkit.retrieval.evaluate import evaluate
from toolkit.store import db
from toolkit.store import paths as study_paths
from toolkit.store import study as study_db
from toolkit.store.study import open_study


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def listing(folder) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*"))


@pytest.fixture(scope="module")
def labelled_master(tmp_path_factory, synthetic_coco_master):
    """A small study with a retrieval run and simulated labels (built once; tests use a copy)."""
    root = tmp_path_factory.mktemp("readonly_master")
    path = root / "study.duckdb"
    con = open_study(path)
    try:
        ingest(con, coco_root=synthetic_coco_master, num_images=20, captions_per_image=2, seed=1, name="s20")
        sid = int(db.get_subset(con, "s20")["subset_id"])
        imgs = con.execute("SELECT image_id FROM subset_images WHERE subset_id = ? ORDER BY position", [sid]).df()
        caps = con.execute(
            "SELECT c.caption_id FROM subset_captions c JOIN subset_images i USING (subset_id, image_id) "
            "WHERE c.subset_id = ? ORDER BY i.position, c.position",
            [sid],
        ).df()
        rng = np.random.default_rng(1)
        for kind, ids in (("image", imgs["image_id"]), ("text", caps["caption_id"])):
            arr = rng.normal(size=(len(ids), 8)).astype(np.float32)
            arr /= np.linalg.norm(arr, axis=1, keepdims=True)
            register_hand_built(con, root / f"{kind}.npy", kind, arr, ids.to_numpy(), sid)
        evaluate(con, "s20", device="cpu")
        sample_failures(con, n=20, seed=1, overlap=5, per_annotator=5, out_dir=root / "fa", pictures=False)
        simulate_labels(con, root / "fa", root / "labels", seed=1)
    finally:
        con.close()
    return path


@pytest.fixture
def study(labelled_master, tmp_path):
    """A private copy of the labelled study, alone in its folder tmp_path/study/."""
    folder = tmp_path / "study"
    folder.mkdir()
    path = folder / "study.duckdb"
    shutil.copy(labelled_master, path)
    return path


@pytest.fixture
def protected(study):
    """The study's file chmod 444 and its folder 555; restored afterwards."""
    folder = study.parent
    study.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
    folder.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    yield study
    folder.chmod(0o755)
    study.chmod(0o644)


# --------------------------------------------------------------------------- item 8: reads never write


def test_read_commands_leave_a_write_protected_study_byte_identical(run_cli, protected, tmp_path):
    before, files = sha256(protected), listing(protected.parent)
    out = run_cli("--db", protected, "status").output
    assert "s20" in out and "import-labels" in out
    out = run_cli("--db", protected, "sql", "SELECT count(*) AS n FROM sample_labels").output
    assert "20" in out
    run_cli("--db", protected, "sql", "SELECT * FROM recall_summary", "--csv", tmp_path / "recall.csv")
    assert (tmp_path / "recall.csv").read_text().startswith("retrieval_run_id")
    run_cli("--db", protected, "analyze", "--out", tmp_path / "analysis")
    assert (tmp_path / "analysis" / "taxonomy_distribution.csv").exists()
    res = run_cli("--db", protected, "report", "--out", tmp_path / "report", "--no-figures")
    assert (tmp_path / "report" / "report.html").exists() and "Wrote" in res.output
    assert sha256(protected) == before
    assert listing(protected.parent) == files  # no .wal, no .tmp folder beside the database


def test_a_writing_command_with_nothing_to_upgrade_does_not_touch_the_file(run_cli, study):
    before = sha256(study)
    run_cli("--db", study, "categories", "list")
    run_cli("--db", study, "templates", "list")
    assert sha256(study) == before


def _contents(path) -> dict:
    """Everything a study file holds that a command could read: its storage format, tables with their rows, views
    with their SQL, sequences with their next value."""
    con = duckdb.connect(str(path), read_only=True)
    try:
        out = {"storage": con.execute("SELECT tags FROM duckdb_databases() WHERE database_name = current_database()")
               .fetchall()}  # fmt: skip
        for (name,) in con.execute("SELECT table_name FROM duckdb_tables() ORDER BY 1").fetchall():
            out[f"table {name}"] = sorted(map(repr, con.execute(f'SELECT * FROM "{name}"').fetchall()))
        out["views"] = con.execute("SELECT view_name, sql FROM duckdb_views() WHERE NOT internal ORDER BY 1").fetchall()
        out["sequences"] = con.execute(
            "SELECT sequence_name, start_value, last_value FROM duckdb_sequences()"
        ).fetchall()
        return out
    finally:
        con.close()


def test_a_new_study_is_a_copy_of_one_made_the_usual_way_and_never_replaces_a_file(tmp_path, monkeypatch):
    """open_study makes a new study by copying a new study this process made once (study._copy_new_study): the
    copy holds exactly what creating the file the usual way gives, and is never put where a file already is."""
    open_study(tmp_path / "first.duckdb").close()
    open_study(tmp_path / "copied.duckdb").close()
    assert study_db._NEW_STUDY.get(study_db.schema_hash()), "the second new study was not a copy"
    with monkeypatch.context() as mp:
        mp.setattr(study_db, "_copy_new_study", lambda path: None)
        open_study(tmp_path / "usual.duckdb").close()
    usual = _contents(tmp_path / "usual.duckdb")
    assert usual["table prompt_templates"] and usual["views"] and usual["storage"]
    assert _contents(tmp_path / "copied.duckdb") == usual == _contents(tmp_path / "first.duckdb")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copied.duckdb", "first.duckdb", "usual.duckdb"]

    # A file that appears at the path (another process) is opened as it is, never replaced.
    other = tmp_path / "other.duckdb"
    real_copy = shutil.copyfile

    def someone_else_first(src, dst, **kwargs):
        real_copy(tmp_path / "usual.duckdb", other)
        con = duckdb.connect(str(other))
        con.execute(
            "INSERT INTO categories (name, is_actionable, definition, position) VALUES ('Mine', true, 'theirs', 99)"
        )
        con.close()
        return real_copy(src, dst, **kwargs)

    monkeypatch.setattr(shutil, "copyfile", someone_else_first)
    with open_study(other) as con:
        assert con.execute("SELECT definition FROM categories WHERE name = 'Mine'").fetchall() == [("theirs",)]
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "copied.duckdb",
        "first.duckdb",
        "other.duckdb",
        "usual.duckdb",
    ]


def test_init_of_a_new_path_does_not_check_again_the_copy_it_just_made(tmp_path, monkeypatch, run_cli):
    """`init` (force_upgrade) re-checks every table, column and view of a study; a study that open_study has just
    copied from one upgrade() made is not checked again (half a CPU-second per init), an existing one is, and the
    new file holds what the usual way gives."""
    open_study(tmp_path / "first.duckdb").close()  # this process's new-study copy exists from here on
    calls = []
    real = study_db.upgrade
    monkeypatch.setattr(study_db, "upgrade", lambda con, path="": calls.append(path) or real(con, path))
    run_cli("--db", tmp_path / "new.duckdb", "init")
    assert calls == []
    run_cli("--db", tmp_path / "new.duckdb", "init")  # now an existing file: checked
    assert calls == [str(tmp_path / "new.duckdb")]
    assert _contents(tmp_path / "new.duckdb") == _contents(tmp_path / "first.duckdb")


def test_a_changed_declaration_upgrades_on_the_next_writing_command(run_cli, study, monkeypatch):
    # An older database: another schema hash, a column and a view missing.
    con = duckdb.connect(str(study))
    con.execute("UPDATE schema_info SET value = 'older' WHERE key = 'schema_hash'")
    con.execute("DROP VIEW recall_summary")
    con.execute("ALTER TABLE subsets DROP COLUMN split")
    con.close()
    before = sha256(study)
    res = run_cli("--db", study, "status", expect=2)  # reading never upgrades; it says how to
    assert f"clipfail --db {study} init" in res.output and sha256(study) == before
    run_cli("--db", study, "categories", "list")  # any writing command upgrades
    con = duckdb.connect(str(study), read_only=True)
    try:
        sql = "SELECT column_name FROM information_schema.columns WHERE table_name = 'subsets'"
        cols = {r[0] for r in con.execute(sql).fetchall()}
        assert "split" in cols
        assert con.execute("SELECT count(*) FROM recall_summary").fetchone()[0] > 0
        assert study_db.stored_schema_hash(con) == study_db.schema_hash()
    finally:
        con.close()
    run_cli("--db", study, "status")

    # The hash covers the view texts (and the declared tables and seed files the same way).
    study_db.schema_hash.cache_clear()
    views = study_db.view_sql()
    monkeypatch.setattr(study_db, "view_sql", lambda: {**views, "recall_summary": views["recall_summary"] + "\n"})
    con = duckdb.connect(str(study), read_only=True)
    try:
        assert study_db.schema_hash() != study_db.stored_schema_hash(con)
    finally:
        con.close()
        monkeypatch.undo()
        study_db.schema_hash.cache_clear()


@pytest.mark.parametrize("command", ["status", "sql", "report", "analyze"])
def test_read_commands_refuse_a_missing_database(run_cli, tmp_path, command):
    typo = tmp_path / "stduy.duckdb"
    args = {"sql": ["SELECT 1"], "report": ["--out", tmp_path / "r"], "analyze": ["--out", tmp_path / "a"]}
    res = run_cli("--db", typo, command, *args.get(command, []), expect=2)
    assert_one_message(res, str(typo), "--db")
    assert not typo.exists() and not (tmp_path / "r").exists() and not (tmp_path / "a").exists()


# --------------------------------------------------------------------------- item 7: sql is one read-only query


def test_sql_refuses_every_statement_that_could_write(run_cli, study, tmp_path):
    other = tmp_path / "other.duckdb"
    con = duckdb.connect(str(other))
    con.execute("CREATE TABLE keep AS SELECT * FROM range(5) t(i)")
    con.close()
    before_study, before_other = sha256(study), sha256(other)
    work = tmp_path / "cwd"
    work.mkdir()
    target = work / "leak"
    attacks = [
        f"COPY subsets TO '{target}.csv'",
        f"COPY (SELECT * FROM captions) TO '{target}.parquet' (FORMAT parquet)",
        f"EXPORT DATABASE '{target}_dir'",
        f"ATTACH '{other}' AS o (READ_WRITE)",
        f"ATTACH '{other}' AS o (READ_WRITE); DELETE FROM o.keep",
        f"ATTACH '{target}.duckdb' AS n",
        "SET threads = 1",
        "SET enable_external_access = true",
        "RESET lock_configuration",
        "PRAGMA enable_profiling",
        "SELECT 1; DELETE FROM subsets",
        "DELETE FROM subsets",
        "WITH d AS (DELETE FROM subsets RETURNING *) SELECT * FROM d",
        "WITH i AS (INSERT INTO schema_info VALUES ('x', 'y') RETURNING *) SELECT * FROM i",
        "CALL pragma_version()",
        "CHECKPOINT",
        "INSTALL httpfs",
        "LOAD httpfs",
        "CREATE TABLE t AS SELECT 1",
        f"EXPLAIN ANALYZE COPY subsets TO '{target}.csv'",
        f"SELECT * FROM read_csv('{Path(__file__).parent.parent / 'toolkit' / 'data' / 'categories.csv'}')",
        f"SELECT * FROM query('COPY subsets TO ''{target}.csv''')",
        # issue 24, item 15: comments anywhere, and EXPLAIN ANALYZE (which runs its statement) of a write
        f"/**/COPY subsets TO '{target}.csv'",
        f"-- x\nATTACH '{other}' AS o (READ_WRITE)",
        f"/* a */ EXPLAIN /* b */ ANALYZE /**/ COPY subsets TO '{target}.csv'",
        f"EXPLAIN ANALYZE COPY (SELECT 1) TO '{target}.csv'",
        "EXPLAIN ANALYZE CREATE TABLE t AS SELECT 1",
        "EXPLAIN ANALYZE -- x\nCREATE TABLE t AS SELECT 1",
        "EXPLAIN (ANALYZE) CREATE TABLE t AS SELECT 1",
        "EXPLAIN (ANALYZE, FORMAT json) INSERT INTO schema_info VALUES ('x', 'y')",
        "EXPLAIN ANALYZE DELETE FROM subsets",
        "EXPLAIN ANALYZE UPDATE subsets SET name = 'x'",
        f"EXPLAIN ANALYZE ATTACH '{other}' AS o",
        "EXPLAIN ANALYZE SET threads = 1",
        "EXPLAIN ANALYZE WITH d AS (DELETE FROM subsets RETURNING *) SELECT * FROM d",
        "EXPLAIN ANALYZE SELECT 1; DELETE FROM subsets",
        "EXPLAIN /* SELECT 1 */ DELETE FROM subsets",
        "EXPLAIN ANALYZE /* SELECT */ CREATE /* */ TABLE t AS SELECT 1",
        "/* EXPLAIN SELECT 1 */ DELETE FROM subsets",
        "EXPLAIN ANALYZE (CREATE TABLE t AS SELECT 1)",
        f"EXPLAIN ANALYZE SELECT * FROM read_json('{Path(__file__).parents[1] / 'toolkit/data/tiny-clip.json'}')",
    ]
    for q in attacks:
        res = run_cli("--db", study, "sql", q, expect=None)
        assert res.exit_code == 2, (q, res.output)
        assert res.output.startswith("Error:") and "Traceback" not in res.output, (q, res.output)
        assert listing(work) == [] and listing(tmp_path / "cwd") == [], q
        assert sha256(study) == before_study and sha256(other) == before_other, q
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cwd", "other.duckdb", "study"]
    con = duckdb.connect(str(other), read_only=True)
    assert con.execute("SELECT count(*) FROM keep").fetchone()[0] == 5
    con.close()


def test_the_locked_connection_refuses_writes_even_past_the_statement_check(study, tmp_path):
    """Layer 3 alone: the connection `sql` runs on cannot reach any file, and cannot be unlocked."""
    from toolkit.store import sql as adhoc

    con = open_study(study, read_only=True)
    try:
        adhoc.lock_down(con)
        for q in (
            f"COPY subsets TO '{tmp_path / 'x.csv'}'",
            f"EXPORT DATABASE '{tmp_path / 'exp'}'",
            f"ATTACH '{tmp_path / 'new.duckdb'}' AS n",
            "SET enable_external_access = true",
            "SET lock_configuration = false",
            "INSTALL httpfs",
        ):
            with pytest.raises(duckdb.Error):
                con.execute(q)
        assert con.execute("SELECT current_setting('enable_external_access')").fetchone()[0] is False
    finally:
        con.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study"]


def test_sql_runs_one_select_and_saves_it_with_csv(run_cli, study, tmp_path):
    out = run_cli("--db", study, "sql", "SELECT name FROM subsets").output
    assert "s20" in out
    assert "physical_plan" in run_cli("--db", study, "sql", "EXPLAIN SELECT * FROM subsets").output
    # issue 24, item 15: EXPLAIN ANALYZE of a SELECT is read-only, with comments anywhere
    for q in (
        "/* */ EXPLAIN /* */ ANALYZE /**/ SELECT 1",
        "EXPLAIN ANALYZE SELECT count(*) FROM subsets",
        "explain analyse -- why\nselect * from subsets",
        "EXPLAIN (ANALYZE) SELECT 1",
        "EXPLAIN /* nested /* comment */ here */ SELECT '/*' AS x",
        "-- a note\n/* and another */ EXPLAIN SELECT 1 -- trailing",
        "EXPLAIN (SELECT 1)",
    ):
        assert "_plan" in run_cli("--db", study, "sql", q).output, q
    assert "categories" in run_cli("--db", study, "sql", "SHOW TABLES").output
    # a query that starts with a comment: as it is, and after a lone `--` (documented in --help)
    query = "-- subsets by name\nSELECT name AS the_name FROM subsets"
    assert "the_name" in run_cli("--db", study, "sql", query).output
    assert "the_name" in run_cli("--db", study, "sql", "--", query).output
    assert 'clipfail sql -- "-- ' in run_cli("sql", "--help").output
    # PIVOT: with an IN list it is one SELECT; without one DuckDB makes it several statements (refused, with why)
    assert "true" in run_cli("--db", study, "sql", "PIVOT categories ON is_actionable IN (true) USING count(*)").output
    res = run_cli("--db", study, "sql", "PIVOT categories ON is_actionable USING count(*)", expect=2)
    assert_one_message(res, "IN (...)")
    run_cli("--db", study, "sql", "SELECT name FROM subsets", "--csv", tmp_path / "s.csv")
    assert (tmp_path / "s.csv").read_text().splitlines() == ["name", "s20"]


@pytest.mark.parametrize("query", ["", ";", "  ;  ; ", "-- only a comment"])
def test_sql_with_no_statement_says_so(run_cli, study, query):
    res = run_cli("--db", study, "sql", query, expect=2)
    assert_one_message(res, "No SQL statement given")


def test_sql_csv_into_a_missing_folder_is_refused_before_running(run_cli, study, tmp_path):
    dest = tmp_path / "no" / "such" / "out.csv"
    res = run_cli("--db", study, "sql", "SELECT 1", "--csv", dest, expect=2)
    assert_one_message(res, str(dest.parent), "does not exist")
    assert not (tmp_path / "no").exists()


# --------------------------------------------------------------------------- item 17: a damaged database


def _corrupt(path: Path, first_block: int) -> None:
    """Overwrite 64 bytes in every 4 KiB of every storage block from `first_block` on (256 KiB blocks
    after DuckDB's 12 KiB of headers), so that reading any of them fails its checksum."""
    data = bytearray(path.read_bytes())
    start = 3 * 4096 + first_block * 256 * 1024
    for off in range(start + 64, len(data) - 64, 4096):
        data[off : off + 64] = b"\xa5" * 64
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("first_block", [0, 1], ids=["catalog-block", "data-blocks"])
def test_a_damaged_database_gives_one_clear_message(run_cli, tmp_path, first_block):
    path = tmp_path / "damaged.duckdb"
    run_cli("--db", path, "init")
    _corrupt(path, first_block)
    for args in (
        ["init"],  # the upgrade reads the categories in seed_taxonomy
        ["categories", "list"],
        ["status"] if first_block == 0 else ["sql", "SELECT * FROM categories"],
        ["sql", "SELECT * FROM prompt_templates"],
    ):
        res = run_cli("--db", path, *args, expect=2)
        assert_one_message(res, f"Database {path} is damaged", "backup")


def test_report_on_a_writable_study_is_recorded_so_status_stops_asking_for_it(run_cli, study, tmp_path):
    assert "Write the report" in run_cli("--db", study, "status").output
    # a tables-only report is named, but is not the report: its figures were never drawn
    run_cli("--db", study, "report", "--out", tmp_path / "quick", "--no-figures")
    out = run_cli("--db", study, "status").output
    assert "Write the report" in out and "not written yet; a tables-only one (--no-figures)" in out
    run_cli("--db", study, "report", "--out", tmp_path / "report")
    out = run_cli("--db", study, "status").output
    assert "Write the report" not in out and "last written" in out and "tables-only" not in out
    assert db.is_writable(study)
    os.chmod(study, 0o444)
    try:
        assert not db.is_writable(study)  # protected by its mode bits, even for root
    finally:
        os.chmod(study, 0o644)


def test_run_query_twice_on_one_connection(study):
    # the Python API: a notebook runs several queries on one read-only connection
    from toolkit.store.sql import run_query

    with open_study(study, read_only=True) as con:
        assert len(run_query(con, "SELECT 1 AS x")) == 1
        assert len(run_query(con, "SELECT 2 AS x")) == 1
        with pytest.raises(UserError):
            run_query(con, "COPY (SELECT 1) TO 'x.csv'")


# ------------------------------------------------------------- issue 24, items 6 and 13: --db names no database


@pytest.fixture
def bad_db_paths(tmp_path):
    """Paths that name no DuckDB file a study can live in, each with a word its message must hold."""
    csv = tmp_path / "assign_A.csv"
    csv.write_text("sample_id,category\n1,Object\n", encoding="utf-8")
    (tmp_path / "empty.duckdb").write_bytes(b"")
    (tmp_path / "folder").mkdir()
    (tmp_path / "dangling.duckdb").symlink_to(tmp_path / "nowhere.duckdb")
    (tmp_path / "embeddings.npy").write_bytes(b"\x93NUMPY\x01\x00" + b" " * 64)
    return {
        "a CSV": (csv, "not a DuckDB database file"),
        "a .npy file": (tmp_path / "embeddings.npy", "not a DuckDB database file"),
        "an empty file": (tmp_path / "empty.duckdb", "empty file"),
        "a folder": (tmp_path / "folder", "folder"),
        "a device": ("/dev/null", "device"),
        "a missing parent": (tmp_path / "no" / "such" / "study.duckdb", "does not exist"),
        "a parent that is a file": (csv / "study.duckdb", "is not a folder"),
        "a dangling link": (tmp_path / "dangling.duckdb", "symbolic link"),
        ":memory:": (":memory:", "in-memory"),
        "an empty string": ("", "is empty"),
        "a remote name": ("md:study", "not a local file"),
    }


@pytest.mark.parametrize("command", [["init"], ["status"], ["ingest", "--coco-root", "coco"], ["sql", "SELECT 1"]])
def test_a_db_that_is_no_database_file_is_refused_by_name_and_nothing_changes(
    run_cli, bad_db_paths, tmp_path, monkeypatch, command
):
    monkeypatch.chdir(tmp_path)  # :memory:, "" and md:study would otherwise land in the working folder
    before = {p: (sha256(p) if p.is_file() else None) for p in tmp_path.rglob("*") if not p.is_symlink()}
    for name, (path, needle) in bad_db_paths.items():
        for args in (["--db", path, *command], [command[0], "--db", path, *command[1:]]):
            res = run_cli(*args, expect=None)
            assert_one_message(res, needle)
            assert "ready" not in res.output and "Ingested" not in res.output, (name, res.output)
        after = {p: (sha256(p) if p.is_file() else None) for p in tmp_path.rglob("*") if not p.is_symlink()}
        assert after == before, name  # no file created (a study, a .wal) and none changed


def test_clipfail_db_from_the_environment_is_checked_the_same_way(run_cli, bad_db_paths, monkeypatch):
    csv, _ = bad_db_paths["a CSV"]
    monkeypatch.setenv("CLIPFAIL_DB", str(csv))
    assert_one_message(run_cli("init", expect=None), "$CLIPFAIL_DB", str(csv), "not a DuckDB database file")


FIFO_RUN = """
import sys
from click.testing import CliRunner
from cli import cli
for command in (["status"], ["init"], ["sql", "SELECT 1"]):
    r = CliRunner().invoke(cli, ["--db", sys.argv[1], *command])
    print(r.exit_code, r.output.strip())
"""


def test_a_db_that_is_a_fifo_is_refused_without_blocking(tmp_path):
    import subprocess
    import sys

    fifo = tmp_path / "study.duckdb"
    os.mkfifo(fifo)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    try:
        proc = subprocess.run(
            [sys.executable, "-c", FIFO_RUN, str(fifo)], capture_output=True, text=True, env=env, timeout=60
        )
    except subprocess.TimeoutExpired:
        pytest.fail("clipfail --db FIFO blocked")
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("2 Error:") and "FIFO" in line for line in lines), proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study.duckdb"]


# ------------------------------------------------ issue 24, items 5, 11 and 14d: outputs never write over a database


@pytest.fixture
def crashed(study, tmp_path):
    """The study as a crash leaves it: a committed change still in its write-ahead log, not checkpointed."""
    folder = tmp_path / "crashed"
    folder.mkdir()
    con = duckdb.connect(str(study))
    try:
        con.execute(
            "UPDATE annotations SET notes = 'committed before the crash' "
            "WHERE sample_id = (SELECT min(sample_id) FROM annotations)"
        )
        shutil.copy(study, folder / "study.duckdb")  # what the disk holds while the process is still running
        shutil.copy(f"{study}.wal", folder / "study.duckdb.wal")
    finally:
        con.close()
    (folder / "study_cache" / "embeddings").mkdir(parents=True)
    return folder / "study.duckdb"


def _committed_note(path) -> int:
    con = duckdb.connect(str(path))
    try:
        return con.execute("SELECT count(*) FROM annotations WHERE notes = 'committed before the crash'").fetchone()[0]
    finally:
        con.close()


def _fingerprint(*folders) -> dict:
    return {p: (sha256(p) if p.is_file() else p.is_symlink()) for f in folders for p in Path(f).rglob("*")}


def test_sql_csv_never_writes_over_a_database_its_wal_or_the_studys_files(run_cli, crashed, tmp_path, monkeypatch):
    wal = Path(f"{crashed}.wal")
    other = tmp_path / "other.duckdb"
    duckdb.connect(str(other)).close()
    con = duckdb.connect(str(crashed), read_only=True)
    registered = study_paths.resolve(con, con.execute("SELECT path FROM embedding_sets").fetchall()[0][0])
    con.close()
    links = tmp_path / "links"
    links.mkdir()
    (links / "wal.csv").symlink_to(wal)
    os.link(wal, links / "wal-hard.csv")
    (links / "db.csv").symlink_to(crashed)
    os.link(crashed, links / "db-hard.csv")
    os.mkfifo(links / "pipe.csv")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    targets = {
        "the WAL": (wal, "write-ahead log"),
        "the WAL, relative": ("../crashed/study.duckdb.wal", "write-ahead log"),
        "the WAL through ..": (crashed.parent / ".." / "crashed" / "study.duckdb.wal", "write-ahead log"),
        "the WAL through a symlink": (links / "wal.csv", "write-ahead log"),
        "the WAL through a hard link": (links / "wal-hard.csv", "hard link"),
        "the study through a symlink": (links / "db.csv", "database file of this study"),
        "the study through a hard link": (links / "db-hard.csv", "database"),
        "the study's cache folder": (crashed.parent / "study_cache" / "embeddings" / "x.csv", "cache folder"),
        "a registered embedding file": (registered, "embedding file"),
        "another DuckDB database": (other, "DuckDB database file"),
        "the WAL of another database": (tmp_path / "other.duckdb.wal", "write-ahead log"),
        "a FIFO": (links / "pipe.csv", "FIFO"),
    }
    before = _fingerprint(tmp_path / "crashed", links, registered.parent)
    for name, (target, needle) in targets.items():
        res = run_cli("--db", crashed, "sql", "SELECT 1 AS x", "--csv", target, expect=None)
        assert_one_message(res, needle)
        assert "Wrote" not in res.output, name
        assert _fingerprint(tmp_path / "crashed", links, registered.parent) == before, name
    assert not (tmp_path / "other.duckdb.wal").exists()
    assert listing(cwd) == []
    assert _committed_note(crashed) > 0  # the crash's committed work is still there on reopen


def test_sql_csv_guards_cells_and_column_names_against_spreadsheet_formulas(run_cli, study, tmp_path):
    out = tmp_path / "q.csv"
    query = """SELECT '=HYPERLINK("http://x")' AS "=cmd", '+1+1' AS "+a", '-2' AS "-b", '@SUM(A1)' AS "@c",
               'plain' AS d, -0.5 AS e, 3 AS f"""
    run_cli("--db", study, "sql", query, "--csv", out)
    header, row = out.read_text(encoding="utf-8").splitlines()
    assert header == "'=cmd,'+a,'-b,'@c,d,e,f"
    assert row == '"\'=HYPERLINK(""http://x"")",\'+1+1,-2,\'@SUM(A1),plain,-0.5,3'


SAMPLE = ["sample-failures", "--n", 20, "--seed", 1, "--overlap", 5, "--per-annotator", 5, "--no-pictures"]


@pytest.mark.parametrize(
    "args, name",  # the command (its folder last), and a file it writes there (None: it rewrites the whole folder)
    [
        (["analyze", "--out"], None),
        (["report", "--out"], None),
        (["export-labelstudio", "--force"], "tasks.json"),
        ([*SAMPLE, "--out"], "README.txt"),
    ],
    ids=["analyze", "report", "export-labelstudio", "sample-failures"],
)
def test_every_output_folder_is_checked_against_the_studys_files_before_the_work(run_cli, study, tmp_path, args, name):
    other = tmp_path / "other.duckdb"
    duckdb.connect(str(other)).close()
    cache = study.parent / "study_cache" / "embeddings"
    cache.mkdir(parents=True)
    before = _fingerprint(study.parent)
    res = run_cli("--db", study, *args, cache / "out", expect=None)
    assert_one_message(res, "cache folder")
    assert _fingerprint(study.parent) == before and listing(cache) == []
    if name is not None:  # another database where the command writes one of its files
        folder = tmp_path / "out"
        folder.mkdir()
        shutil.copy(other, folder / name)
        res = run_cli("--db", study, *args, folder, expect=None)
        assert_one_message(res, f"{folder / name} is a DuckDB database file")
        assert sha256(folder / name) == sha256(other) and _fingerprint(study.parent) == before


def test_templates_export_out_never_writes_over_the_studys_wal(run_cli, crashed):
    wal = Path(f"{crashed}.wal")
    before = sha256(wal)
    res = run_cli("--db", crashed, "templates", "export", "--out", wal, expect=None)
    assert_one_message(res, "write-ahead log")
    # its writing open replayed the WAL into the file (it may be gone now); no CSV took its place
    assert (not wal.exists() or sha256(wal) == before) and _committed_note(crashed) > 0


def test_run_checks_its_out_folder_before_any_stage(run_cli, study, monkeypatch):
    import toolkit.workflows.pipeline

    calls = []
    monkeypatch.setattr(
        toolkit.workflows.pipeline, "run_pipeline", lambda *a, **k: calls.append(a) or pytest.fail("ran")
    )
    res = run_cli("--db", study, "run", "--coco-root", study.parent, "--out", study.parent / "study_cache", expect=None)
    assert_one_message(res, "cache folder")
    assert calls == []


def test_make_synthetic_coco_into_a_folder_that_cannot_be_made_is_one_message(run_cli, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x", encoding="utf-8")
    for dest, needle in ((blocker / "coco", "is not a folder"), ("/proc/1/coco", "does not take new files")):
        assert_one_message(run_cli("make-synthetic-coco", dest, "--images", 2, expect=None), needle)
    assert blocker.read_text(encoding="utf-8") == "x"


# ------------------------------------------------------------- sql --csv on a fresh study


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
