"""Opening a clipfail database: schema creation and upgrade, views, runs, transactions.

Every command goes through `open_database`, which
- refuses a database written by a newer schema version,
- for writing: when the stored schema hash (`schema_info.schema_hash`) differs from this clipfail's
  (declared tables and columns, `queries/*.sql`, the default taxonomy and templates), creates missing
  tables and sequences, adds missing columns, applies every view with CREATE OR REPLACE, inserts the
  missing seed rows, and then stores the new hash; when the hash matches it writes nothing,
- for reading (`read_only=True`): never writes; refuses a missing file, and a database whose hash is
  out of date (with the command that upgrades it),
- turns DuckDB's lock, "not a database" and corrupt-file errors into a UserError.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import hashlib
import json
import os
import re
import stat
from importlib import resources
from pathlib import Path

import duckdb
import duckdb_engine
import pandas as pd
from sqlalchemy.schema import CreateSequence, CreateTable

import toolkit
from schema import SCHEMA_VERSION, metadata
from toolkit.errors import UserError

DEFAULT_DB = "clipfail.duckdb"
_DIALECT = duckdb_engine.Dialect()


def default_db_path() -> str:
    return os.environ.get("CLIPFAIL_DB") or DEFAULT_DB


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def canonical_json(config: dict) -> str:
    """JSON with sorted keys and no spaces: the same config always gives the same text."""
    return json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def config_hash(config: dict) -> str:
    return hashlib.sha256(canonical_json(config).encode("utf-8")).hexdigest()


def missing_database_message(path: str) -> str:
    return (
        f"Database {path} does not exist. Give the study's database file with --db PATH (or $CLIPFAIL_DB); "
        f"to start a new study there: clipfail --db {path} init"
    )


def is_corruption(exc: BaseException) -> bool:
    """Whether a DuckDB error says that the file's bytes are damaged (a block checksum or its decoding)."""
    msg = str(exc).lower()
    return isinstance(exc, duckdb.Error) and (
        "corrupt database file" in msg
        or "checksum" in msg
        or isinstance(exc, duckdb.SerializationException)
        or "database has been invalidated" in msg
    )


def damaged_database_error(path: str, exc: BaseException) -> UserError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return UserError(
        f"Database {path} is damaged and cannot be read (DuckDB: {first}). clipfail cannot repair it: "
        "restore the file from a backup copy, or start a new database with --db NEW_PATH and re-run the stages."
    )


def _connect(path: str | Path, read_only: bool = False) -> duckdb.DuckDBPyConnection:
    path = str(path)
    if read_only and not Path(path).exists():
        raise UserError(missing_database_message(path))
    if Path(path).is_dir():
        raise UserError(f"--db {path} is a folder, not a DuckDB database file. Give the database file's path.")
    try:
        return duckdb.connect(path, read_only=read_only)
    except duckdb.IOException as exc:
        msg = str(exc)
        if is_corruption(exc):
            raise damaged_database_error(path, exc) from None
        if "lock" in msg.lower():
            raise UserError(
                f"Database {path} is locked by another process (another clipfail command, a notebook or a "
                "DuckDB shell has it open). Close that connection and run the command again."
            ) from None
        if "not a valid duckdb" in msg.lower() or "invalid" in msg.lower() or "magic" in msg.lower():
            raise UserError(f"{path} is not a DuckDB database file. Give another --db path.") from None
        raise UserError(f"Cannot open database {path}: {msg}") from None
    except duckdb.Error as exc:
        if is_corruption(exc):
            raise damaged_database_error(path, exc) from None
        raise UserError(f"Cannot open database {path}: {exc}") from None


def table_exists(con, name: str) -> bool:
    """Whether the database has a table or a view called `name` (in schema main). The one such check
    (db, status, report): a database written by an older clipfail may lack a newer table or view."""
    # fetchall, not fetchone: a half-read result blocks the connection's next register() (DuckDB 2)
    return bool(
        con.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_name = ? AND table_schema = 'main'",
            [name],
        ).fetchall()[0][0]
    )


_table_exists = table_exists  # the former private name, for callers on other branches; use table_exists


def schema_version(con) -> int | None:
    if not table_exists(con, "schema_info"):
        return None
    # fetchall, not fetchone: a half-read result blocks the connection's next register() (DuckDB 2)
    row = next(iter(con.execute("SELECT value FROM schema_info WHERE key = 'schema_version'").fetchall()), None)
    return int(row[0]) if row else None


def stored_schema_hash(con) -> str | None:
    if not table_exists(con, "schema_info"):
        return None
    row = next(iter(con.execute("SELECT value FROM schema_info WHERE key = 'schema_hash'").fetchall()), None)
    return row[0] if row else None


_SEED_FILES = ("data/categories.csv", "data/category_aliases.csv", "data/templates_default.csv")


@functools.lru_cache(maxsize=1)
def schema_hash() -> str:
    """A hash of everything an upgrade applies: the schema version, the declared sequences, tables and
    columns (their DDL), the views in queries/*.sql and the shipped seed data. Any change to one of
    them makes the next writing command upgrade the database."""
    h = hashlib.sha256(f"schema_version={SCHEMA_VERSION}\n".encode())
    for name in sorted(metadata._sequences):
        h.update(str(CreateSequence(metadata._sequences[name]).compile(dialect=_DIALECT)).encode("utf-8"))
    for table in sorted(metadata.sorted_tables, key=lambda t: t.name):
        h.update(str(CreateTable(table).compile(dialect=_DIALECT)).encode("utf-8"))
    for name, sql in view_sql().items():
        h.update(f"\nview {name}\n".encode() + sql.encode("utf-8"))
    for rel in _SEED_FILES:
        h.update(f"\nseed {rel}\n".encode() + resources.files("toolkit").joinpath(rel).read_bytes())
    return h.hexdigest()


def _refuse_newer(con, path: str) -> None:
    found = schema_version(con)
    if found is not None and found > SCHEMA_VERSION:
        raise UserError(
            f"Database {path} was written by a newer clipfail (schema version {found}; this clipfail "
            f"{toolkit.__version__} knows up to {SCHEMA_VERSION}). Upgrade clipfail to use it."
        )


def ensure_schema(con, path: str = "") -> None:
    """Create or upgrade the declared schema in one transaction (missing sequences, tables, columns)."""
    _refuse_newer(con, path)
    with transaction(con):
        for seq in metadata._sequences.values():
            con.execute(str(CreateSequence(seq, if_not_exists=True).compile(dialect=_DIALECT)))
        for table in metadata.sorted_tables:
            if not table_exists(con, table.name):
                con.execute(str(CreateTable(table, if_not_exists=True).compile(dialect=_DIALECT)))
                continue
            have = {
                r[0]
                for r in con.execute(
                    "SELECT column_name FROM information_schema.columns WHERE table_name = ?", [table.name]
                ).fetchall()
            }
            for col in table.columns:
                if col.name not in have:
                    coltype = col.type.compile(dialect=_DIALECT)
                    con.execute(f'ALTER TABLE {table.name} ADD COLUMN "{col.name}" {coltype}')
        con.execute(
            "INSERT OR REPLACE INTO schema_info (key, value) VALUES ('schema_version', ?)", [str(SCHEMA_VERSION)]
        )


def view_sql() -> dict[str, str]:
    """The view definitions shipped in queries/*.sql, by view name (file stem), in the order of
    queries.VIEWS (dependency order). A .sql file missing from that list, or a listed view without its
    file, is a packaging mistake and raises RuntimeError."""
    from queries import VIEWS

    files = {
        entry.name[: -len(".sql")]: entry
        for entry in resources.files("queries").iterdir()
        if entry.name.endswith(".sql")
    }
    unlisted = sorted(set(files) - set(VIEWS))
    missing = [name for name in VIEWS if name not in files]
    if unlisted or missing:
        raise RuntimeError(
            f"queries/__init__.py VIEWS does not match queries/*.sql: not listed {unlisted}, no file for {missing}"
        )
    return {name: files[name].read_text(encoding="utf-8") for name in VIEWS}


def apply_views(con) -> None:
    """CREATE OR REPLACE every view, once each, in the dependency order of queries.VIEWS."""
    for name, sql in view_sql().items():
        try:
            con.execute(sql)
        except duckdb.Error as exc:
            raise RuntimeError(f"view {name} in queries/{name}.sql does not apply: {exc}") from exc


def upgrade(con, path: str = "") -> None:
    """Apply the declared schema, the views and the missing seed rows, then store the schema hash.

    Each step only adds what is missing, so a run interrupted before the hash is stored is simply
    completed by the next writing open."""
    ensure_schema(con, path)
    apply_views(con)
    from toolkit.taxonomy import seed_taxonomy

    seed_taxonomy(con)  # inserts only missing default categories/aliases
    from toolkit.templates import seed_templates

    seed_templates(con)  # the shipped default prompt-template set, when the database has none
    con.execute("INSERT OR REPLACE INTO schema_info (key, value) VALUES ('schema_hash', ?)", [schema_hash()])


def is_writable(path: str | Path) -> bool:
    """Whether the user lets clipfail write to the database file: it exists, has a write permission bit
    and its folder is writable. A file made read-only (chmod a-w) counts as protected even for root, who
    could write it anyway: a command that can do its job reading only (report) then reads only."""
    p = Path(path)
    try:
        mode = p.stat().st_mode
    except OSError:
        return False
    has_write_bit = bool(mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    return has_write_bit and os.access(p, os.W_OK) and os.access(p.parent, os.W_OK)


def is_read_only(con) -> bool:
    """Whether `con` was opened read-only (it can write nothing to the database)."""
    rows = con.execute("SELECT readonly FROM duckdb_databases() WHERE database_name = current_database()").fetchall()
    row = rows[0] if rows else None
    return bool(row and row[0])


def open_database(
    path: str | Path | None = None, read_only: bool = False, *, force_upgrade: bool = False
) -> duckdb.DuckDBPyConnection:
    """Open a clipfail database.

    For writing (the default) the file is created if needed, and upgraded when its schema hash differs
    from this clipfail's (`force_upgrade=True`, used by `clipfail init`, re-checks every table and column
    anyway). With `read_only=True` nothing is ever written: the file must exist and be up to date."""
    path = str(path or default_db_path())
    if read_only:
        con = _connect(path, read_only=True)
        try:
            _refuse_newer(con, path)
            if stored_schema_hash(con) != schema_hash():
                raise UserError(
                    f"Database {path} has not been set up by this version of clipfail yet (its tables, views or "
                    "default data differ), and this command only reads it. Upgrade it once with: "
                    f"clipfail --db {path} init (this needs write access to the file and its folder), then run "
                    "the command again."
                )
        except duckdb.Error as exc:
            con.close()
            if is_corruption(exc):
                raise damaged_database_error(path, exc) from None
            raise
        except BaseException:
            con.close()
            raise
        return con
    if Path(path).parent and not Path(path).parent.exists():
        raise UserError(f"Folder {Path(path).parent} for database {path} does not exist. Create it first.")
    con = _connect(path)
    try:
        _refuse_newer(con, path)
        if force_upgrade or stored_schema_hash(con) != schema_hash():
            upgrade(con, path)
    except duckdb.Error as exc:
        con.close()
        if is_corruption(exc):
            raise damaged_database_error(path, exc) from None
        raise
    except BaseException:
        con.close()
        raise
    return con


@contextlib.contextmanager
def transaction(con):
    """BEGIN ... COMMIT, rolling back on any exception (Ctrl-C included)."""
    con.execute("BEGIN TRANSACTION")
    try:
        yield con
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")


def insert_run(
    con,
    stage: str,
    config: dict,
    started_at: dt.datetime,
    *,
    seed: int | None = None,
    model: str | None = None,
    pretrained: str | None = None,
) -> int:
    """Record a completed stage run; call inside the stage's transaction. Returns run_id."""
    cfg_json = canonical_json(config)
    row = con.execute(
        """
        INSERT INTO runs (stage, config_json, config_hash, seed, model, pretrained, package_version,
                          started_at, finished_at, status)
        VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'completed')
        RETURNING run_id
        """,
        [stage, cfg_json, config_hash(config), seed, model, pretrained, toolkit.__version__, started_at, now()],
    ).fetchone()
    return int(row[0])


def find_run(con, stage: str, config: dict) -> int | None:
    """The id of an earlier completed run of `stage` with exactly this config, if any."""
    row = con.execute(
        "SELECT max(run_id) FROM runs WHERE stage = ? AND config_hash = ? AND status = 'completed'",
        [stage, config_hash(config)],
    ).fetchone()
    return None if row[0] is None else int(row[0])


def insert_df(con, table: str, df: pd.DataFrame) -> None:
    """Bulk insert a DataFrame by column name through DuckDB's own scan (no executemany)."""
    if not re.fullmatch(r"[a-z_]+", table):
        raise ValueError(table)
    if len(df) == 0:
        return
    con.register("_clipfail_insert_df", df)
    try:
        con.execute(f"INSERT INTO {table} BY NAME SELECT * FROM _clipfail_insert_df")
    finally:
        con.unregister("_clipfail_insert_df")


def get_subset(con, name: str | None) -> dict:
    """Look a subset up by name; with name None, the only (or most recent) subset."""
    if name is None:
        rows = con.execute("SELECT * FROM subsets ORDER BY subset_id DESC").df()
        if rows.empty:
            raise UserError("The database has no subset yet. Run: clipfail ingest --coco-root DIR")
        return rows.iloc[0].to_dict()
    rows = con.execute("SELECT * FROM subsets WHERE name = ?", [name]).df()
    if rows.empty:
        known = [r[0] for r in con.execute("SELECT name FROM subsets ORDER BY name").fetchall()]
        hint = f" Known subsets: {', '.join(known)}." if known else " Run clipfail ingest first."
        raise UserError(f"No subset named {name!r}.{hint}")
    return rows.iloc[0].to_dict()
