"""Database primitives: connecting, transactions, provenance runs, bulk inserts, config hashes.

`toolkit.store.study.open_study` opens, upgrades and seeds a study's database on top of these; this module
imports no other stage (taxonomy, templates), so every stage can import it.
`connect` turns DuckDB's lock, "not a database" and corrupt-file errors into a UserError.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import re
import shlex
import stat
from pathlib import Path

import duckdb
import pandas as pd

from toolkit._version import __version__
from toolkit.errors import UserError

DEFAULT_DB = "clipfail.duckdb"
# Study files are created in the storage format of DuckDB 1.4, the long-term-support line, so that 1.4.x clients
# (its CLI, R, DBeaver, an older Python) open them; newer DuckDB reads and writes that format too. A file made in
# a newer format keeps it until `clipfail init --compat` rewrites it (toolkit.store.compat).
STORAGE_COMPATIBILITY = "v1.4.0"


def default_db_path() -> str:
    return os.environ.get("CLIPFAIL_DB") or DEFAULT_DB


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def canonical_json(config: dict) -> str:
    """JSON with sorted keys and no spaces: the same config always gives the same text."""
    return json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def config_hash(config: dict) -> str:
    return hashlib.sha256(canonical_json(config).encode("utf-8")).hexdigest()


def db_file(con_or_dbpath) -> Path | None:
    """The database file of a DuckDB connection (or a path given as such); None for an in-memory one."""
    if con_or_dbpath is None:
        return None
    if isinstance(con_or_dbpath, (str, os.PathLike)):
        raw = os.fspath(con_or_dbpath)
    else:
        row = con_or_dbpath.execute(
            "SELECT path FROM duckdb_databases() WHERE database_name = current_database()"
        ).fetchone()
        raw = row[0] if row else None
    if not raw or raw == ":memory:":
        return None
    return Path(os.path.abspath(os.path.expanduser(raw)))


def clipfail_command(con_or_dbpath, *, always: bool = False) -> str:
    """`clipfail --db PATH` (PATH shell-quoted): how a message that suggests a command starts. The one place
    that spells the hint. `--db` is left out for the default database ($CLIPFAIL_DB or ./clipfail.duckdb)
    unless `always` (a command meant to be pasted anywhere), and for an in-memory database. A path given as
    text is shown as given; a connection shows DuckDB's (absolute) path of its file."""
    if isinstance(con_or_dbpath, (str, os.PathLike)):
        shown, f = os.fspath(con_or_dbpath), db_file(con_or_dbpath)
    else:
        try:  # a closed or broken connection: the hint goes without --db, the message itself still shows
            f = db_file(con_or_dbpath)
        except Exception:
            f = None
        shown = None if f is None else str(f)
    if f is None or (not always and f.resolve() == Path(default_db_path()).resolve()):
        return "clipfail"
    return f"clipfail --db {shlex.quote(shown)}"


def missing_database_message(path: str) -> str:
    return (
        f"Database {path} does not exist. Give the study's database file with --db PATH (or $CLIPFAIL_DB); "
        f"to start a new study there: {clipfail_command(path, always=True)} init"
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


DUCKDB_MAGIC = b"DUCK"  # a DuckDB database file holds these bytes at offset 8 (after a checksum)
_REMOTE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")  # md:, motherduck:, s3://, http://: DuckDB reads them as no file


def is_duckdb_file(path: str | Path) -> bool:
    """Whether `path` is a regular file that starts like a DuckDB database (its magic bytes). Opens nothing
    that could block: a FIFO or a device is not a database."""
    from toolkit import userfiles

    if userfiles.regular_problem(path) is not None:
        return False
    try:
        return userfiles.read_head(path, 12, "Database")[8:12] == DUCKDB_MAGIC
    except UserError:
        return False


def check_db_path(path, what: str = "--db") -> None:
    """Refuse, before DuckDB opens anything, a database path that names no DuckDB file a study can live in.

    Refused, each with one message (nothing is created or changed): an empty path; `:memory:` and
    DuckDB's other names for what is not a local file (`md:`, `s3://`, ...); a folder, a FIFO, a socket
    or a device (opening a FIFO would block); a symbolic link to nothing; a path under a parent that is
    missing or not a folder; an existing empty file; an existing file that is not a DuckDB database (a CSV
    would otherwise be opened by DuckDB as an in-memory database over the file, and nothing would be
    stored). A path that does not exist yet is fine here: `connect` creates it, or refuses it for reading.
    """
    from toolkit import userfiles

    text = os.fspath(path) if isinstance(path, os.PathLike) else path
    if not isinstance(text, str) or not text.strip():
        raise UserError(f"{what} is empty. Give the study's database file, for example --db study.duckdb.")
    if text.startswith(":memory:"):
        raise UserError(
            f"{what} {text} would be an in-memory database: nothing would be stored. Give the study's database "
            "file, for example --db study.duckdb."
        )
    if _REMOTE.match(text) and not os.path.lexists(text):
        raise UserError(
            f"{what} {text} is not a local file (DuckDB reads a name with {text.split(':', 1)[0]}: as a remote or "
            f"special database). Give the study's database file; for a local file of that name write ./{text}."
        )
    hint = "Give the study's database file with --db PATH."
    if not os.path.lexists(text):  # a new database: its folder must be there
        parent = Path(text).parent
        if not parent.is_dir():
            state = "is not a folder" if parent.exists() else "does not exist"
            raise UserError(f"Folder {parent} for database {text} {state}. Create it first, or give another --db path.")
        return
    problem = userfiles.regular_problem(text)
    if problem == "not found":
        raise UserError(f"{what} {text} is a symbolic link to {os.readlink(text)}, which does not exist. {hint}")
    if problem:
        raise UserError(f"{what} {text} {problem}. {hint}")
    head = userfiles.read_head(text, 12, what, hint)
    if not head:
        raise UserError(
            f"{what} {text} is an empty file, not a DuckDB database. Remove it to start a new study there "
            "(clipfail --db PATH init creates the file), or give the study's database file."
        )
    if head[8:12] != DUCKDB_MAGIC:
        raise UserError(
            f"{what} {text} is not a DuckDB database file (it holds something else, perhaps a CSV); it was left as "
            f"it is. {hint}"
        )


def connect(path: str | Path, read_only: bool = False) -> duckdb.DuckDBPyConnection:
    path = str(path) if isinstance(path, os.PathLike) else path
    check_db_path(path, "Database")
    if read_only and not Path(path).exists():
        raise UserError(missing_database_message(path))
    try:
        con = duckdb.connect(path, read_only=read_only, config={"storage_compatibility_version": STORAGE_COMPATIBILITY})
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
    # DuckDB opens some names as an in-memory database over a file (a .csv or .parquet it can read): refuse
    # whatever did not open the file itself, so that nothing is ever "stored" where it cannot be.
    if db_file(con) is None:
        con.close()
        raise UserError(f"{path} did not open as a DuckDB database file. Give the study's database file with --db.")
    return con


def table_exists(con, name: str) -> bool:
    """Whether the database has a table or a view called `name` (in schema main). The one such check
    (db, status, report): a database written by an older clipfail may lack a newer table or view."""
    # The catalog functions, not information_schema.tables (a view over them that binds in twice the time; every
    # open asks). fetchall, not fetchone: a half-read result blocks the connection's next register() (DuckDB 2)
    return bool(
        con.execute(
            "SELECT (SELECT count(*) FROM duckdb_tables() WHERE table_name = $1 AND schema_name = 'main') "
            "+ (SELECT count(*) FROM duckdb_views() WHERE view_name = $1 AND schema_name = 'main' AND NOT internal)",
            [name],
        ).fetchall()[0][0]
    )


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
        [stage, cfg_json, config_hash(config), seed, model, pretrained, __version__, started_at, now()],
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
