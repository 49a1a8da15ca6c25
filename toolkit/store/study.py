"""Opening a study: its database's schema, views and seed rows, created or upgraded.

This module sits above the primitives in `toolkit.store.db` and the seed data of `toolkit.labels.taxonomy` and
`toolkit.improve.templates` (which import only `toolkit.store.db`, never this module). Every command goes through
`open_study`, which
- refuses a database written by a newer schema version,
- for writing: when the stored schema hash (`schema_info.schema_hash`) differs from this clipfail's
  (declared tables and columns, `queries/*.sql`, the default taxonomy and templates), creates missing
  tables and sequences, adds missing columns, applies every view with CREATE OR REPLACE, inserts the
  missing seed rows, and then stores the new hash; when the hash matches it writes nothing,
- for reading (`read_only=True`): never writes; refuses a missing file, and a database whose hash is
  out of date (with the command that upgrades it),
- turns DuckDB's lock, "not a database" and corrupt-file errors into a UserError (`toolkit.store.db.connect`).

The connection it returns closes at the end of a `with` block:

    with open_study("study.duckdb", read_only=True) as con:
        con.sql("SELECT * FROM recall_summary").df()
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import hashlib
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path

import duckdb
import duckdb_engine
from sqlalchemy.schema import CreateSequence, CreateTable

from schema import SCHEMA_VERSION, metadata
from toolkit._version import __version__
from toolkit.errors import UserError
from toolkit.improve.templates import seed_templates
from toolkit.labels.taxonomy import seed_taxonomy
from toolkit.store import db

_DIALECT = duckdb_engine.Dialect()


def _schema_info(con) -> dict[str, str]:
    """The keys of table schema_info (none where a database has no such table yet), in one query: every open reads
    the schema version and hash, and each query costs DuckDB a few milliseconds to bind."""
    if not db.table_exists(con, "schema_info"):
        return {}
    return dict(
        con.execute("SELECT key, value FROM schema_info WHERE key IN ('schema_version', 'schema_hash')").fetchall()
    )


def _version(info: dict[str, str]) -> int | None:
    found = info.get("schema_version")
    return int(found) if found is not None else None


def schema_version(con) -> int | None:
    return _version(_schema_info(con))


def stored_schema_hash(con) -> str | None:
    return _schema_info(con).get("schema_hash")


def _seed_files() -> list[str]:
    """Every shipped seed file (toolkit/data/*.csv: the taxonomy, its aliases, the template sets)."""
    return sorted(
        f"data/{e.name}" for e in resources.files("toolkit").joinpath("data").iterdir() if e.name.endswith(".csv")
    )


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
    for rel in _seed_files():
        h.update(f"\nseed {rel}\n".encode() + resources.files("toolkit").joinpath(rel).read_bytes())
    return h.hexdigest()


def _refuse_newer(con, path: str, info: dict[str, str] | None = None) -> None:
    found = _version(_schema_info(con) if info is None else info)
    if found is not None and found > SCHEMA_VERSION:
        raise UserError(
            f"Database {path} was written by a newer clipfail (schema version {found}; this clipfail "
            f"{__version__} knows up to {SCHEMA_VERSION}). Upgrade clipfail to use it."
        )


def ensure_schema(con, path: str = "") -> None:
    """Create or upgrade the declared schema in one transaction (missing sequences, tables, columns)."""
    _refuse_newer(con, path)
    with db.transaction(con):
        for seq in metadata._sequences.values():
            con.execute(str(CreateSequence(seq, if_not_exists=True).compile(dialect=_DIALECT)))
        for table in metadata.sorted_tables:
            if not db.table_exists(con, table.name):
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
            _drop_not_null(con, table)
        _clear_placeholders(con)
        con.execute(
            "INSERT OR REPLACE INTO schema_info (key, value) VALUES ('schema_version', ?)", [str(SCHEMA_VERSION)]
        )


def _drop_not_null(con, table) -> None:
    """A column declared nullable that the file still has NOT NULL (an older schema) loses the constraint."""
    strict = {
        r[0]
        for r in con.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = ? AND is_nullable = 'NO'",
            [table.name],
        ).fetchall()
    }
    for col in table.columns:
        if col.name in strict and col.nullable and not col.primary_key:
            con.execute(f'ALTER TABLE {table.name} ALTER COLUMN "{col.name}" DROP NOT NULL')


# schema version 2: what version 1 stored in improvement_runs for a method without prompts, now NULL
_PLACEHOLDERS = {"pooling": "none", "template_set": "", "templates_sha256": "", "template_mode": "none",
                 "k_per_category": "{}"}  # fmt: skip


def _clear_placeholders(con) -> None:
    """Only runs of a method without prompts had them; a prompt-ensembling run (method NULL or 'templates')
    keeps every value it has."""
    for col, value in _PLACEHOLDERS.items():
        con.execute(
            f'UPDATE improvement_runs SET "{col}" = NULL WHERE "{col}" = ? '
            "AND method IS NOT NULL AND method <> 'templates'",
            [value],
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
    seed_taxonomy(con)  # inserts only missing default categories/aliases
    seed_templates(con)  # the shipped default prompt-template set, when the database has none
    con.execute("INSERT OR REPLACE INTO schema_info (key, value) VALUES ('schema_hash', ?)", [schema_hash()])


def open_study(
    path: str | Path | None = None, read_only: bool = False, *, force_upgrade: bool = False
) -> duckdb.DuckDBPyConnection:
    """Open a study's database (default: $CLIPFAIL_DB or ./clipfail.duckdb); use it in a `with` block.

    For writing (the default) the file is created if needed, and upgraded when its schema hash differs
    from this clipfail's (`force_upgrade=True`, used by `clipfail init`, re-checks every table and column
    anyway). With `read_only=True` nothing is ever written: the file must exist and be up to date."""
    path = str(path or db.default_db_path())
    if not read_only and Path(path).parent and not Path(path).parent.exists():
        raise UserError(f"Folder {Path(path).parent} for database {path} does not exist. Create it first.")
    fresh = not read_only and not os.path.lexists(path) and _copy_new_study(path)
    con = db.connect(path, read_only=read_only)
    try:
        info = _schema_info(con)
        _refuse_newer(con, path, info)
        up_to_date = info.get("schema_hash") == schema_hash()
        if read_only and not up_to_date:
            raise UserError(
                f"Database {path} has not been set up by this version of clipfail yet (its tables, views or "
                "default data differ), and this command only reads it. Upgrade it once with: "
                f"{db.clipfail_command(path, always=True)} init (this needs write access to the file and its "
                "folder), then run the command again."
            )
        # force_upgrade re-checks every table and column, which a copy of a study made moments ago by upgrade() has
        if not read_only and ((force_upgrade and not fresh) or not up_to_date):
            upgrade(con, path)
    except duckdb.Error as exc:
        con.close()
        if db.is_corruption(exc):
            raise db.damaged_database_error(path, exc) from None
        raise
    except BaseException:
        con.close()
        raise
    return con


_NEW_STUDY: dict[str, Path] = {}  # schema hash -> a new, empty study this process made, closed (`_copy_new_study`)


def _copy_new_study(path: str) -> bool:
    """Create the study at `path` (absent) as a copy of a new, empty study file that this process made the usual
    way (schema, views, seed rows; about half a CPU-second, mostly DuckDB binding the views) the first time it
    needed one for this schema hash, in a temporary folder removed at exit. A DuckDB file holds nothing of its
    own path, so the copy is the file that creating it again would give; a process that creates many studies
    (the tests, a script over the Python API) pays for one. The copy is put in place only if nothing is there
    yet (a hard link of a finished copy). Where any of it fails (a read-only folder, no hard links), it leaves
    no file and the caller creates the study the usual way, with the usual message if that fails too. True when the
    copy is what is at `path` now."""
    key = schema_hash()
    made = _NEW_STUDY.get(key)
    if made is None or not made.exists():
        try:
            folder = Path(tempfile.mkdtemp(prefix="clipfail-new-study-"))
            atexit.register(shutil.rmtree, folder, ignore_errors=True)
            con = db.connect(str(folder / "new.duckdb"))
            try:
                upgrade(con)
                con.execute("CHECKPOINT")
            finally:
                con.close()
        except (OSError, duckdb.Error, UserError):
            return False
        if (folder / "new.duckdb.wal").exists():  # not a single finished file: leave it to the usual way
            return False
        made = _NEW_STUDY[key] = folder / "new.duckdb"
    part = f"{path}.new-{os.getpid()}"
    try:
        shutil.copyfile(made, part)
        os.link(part, path)  # fails if something appeared at `path` meanwhile: then that is opened
        return True
    except OSError:
        return False
    finally:
        with contextlib.suppress(OSError):
            os.unlink(part)


@contextlib.contextmanager
def connection(database):
    """A connection for one block: the caller's open connection as it is, or the study at this path
    opened for the block and closed after it (so that a long step between two blocks holds no lock)."""
    if isinstance(database, str | os.PathLike):
        con = open_study(database)
        try:
            yield con
        finally:
            con.close()
    else:
        yield database
