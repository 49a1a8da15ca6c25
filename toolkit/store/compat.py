"""Study files that DuckDB's long-term-support line opens.

DuckDB 2.0 writes its own storage format by default, which DuckDB 1.4.x (the LTS line, and what the DuckDB CLI,
R and DBeaver of many labs run) refuses: "Trying to read a database file with version number ..., but we can
only read versions between 64 and 67". `toolkit.store.db.connect` therefore opens every study with
`storage_compatibility_version` = STORAGE_COMPATIBILITY (v1.4.0): a new file is written in 1.4's format, which
the schema's types (integers, doubles, text, timestamps, lists, JSON as text) need nothing newer than.

A file that an older clipfail made in a newer format still opens and keeps its format (DuckDB does not change a
file's format in place). `rewrite_compatible` (the CLI's `clipfail init --compat`) copies it, tables, views,
sequences (at their current values) and all, into a new file in the compatible format, keeps the original as a
backup beside it, and puts the copy in its place.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import duckdb

from toolkit.errors import UserError
from toolkit.store.db import STORAGE_COMPATIBILITY


def _parse(version: str | None) -> tuple[int, ...] | None:
    m = re.match(r"v?(\d+)\.(\d+)\.(\d+)", version or "")
    return tuple(int(x) for x in m.groups()) if m else None


def storage_version(con) -> str | None:
    """The storage format of the connection's database as DuckDB tags it ('v1.4.0+', 'v2.0.0+'), or None."""
    row = con.execute("SELECT tags FROM duckdb_databases() WHERE database_name = current_database()").fetchone()
    tags = row[0] if row else None
    return tags.get("storage_version") if isinstance(tags, dict) else None


def is_newer_than_compatible(version: str | None) -> bool:
    """True for a storage format that DuckDB STORAGE_COMPATIBILITY (1.4) cannot read."""
    found, limit = _parse(version), _parse(STORAGE_COMPATIBILITY)
    return found is not None and found > limit


@dataclass
class CompatResult:
    path: Path
    old_version: str | None
    new_version: str | None
    backup: Path | None  # None: the file was compatible already and was left alone


def _backup_name(path: Path) -> Path:
    n = 1
    while True:
        candidate = path.with_name(f"{path.name}.pre-compat{'' if n == 1 else f'-{n}'}.bak")
        if not os.path.lexists(candidate):
            return candidate
        n += 1


def rewrite_compatible(db_path) -> CompatResult:
    """Rewrite the study at `db_path` in the STORAGE_COMPATIBILITY format when its format is newer; the original
    is renamed to `<file>.pre-compat.bak`. Nothing changes when it is compatible already. The study must not be
    open elsewhere (DuckDB's lock says so)."""
    from toolkit.store import db

    path = Path(db_path)
    con = db.connect(path)  # the checks of every open: a lock, not a database, a damaged file
    try:
        old = storage_version(con)
        if not is_newer_than_compatible(old):
            return CompatResult(path, old, old, None)
        con.execute("CHECKPOINT")  # everything in the file, nothing left in the .wal
    finally:
        con.close()
    backup = _backup_name(path)
    new = path.with_name(f".{path.name}.compat-{os.getpid()}.tmp")
    for leftover in (new, Path(f"{new}.wal")):
        if leftover.exists():
            leftover.unlink()
    mem = duckdb.connect()
    try:
        src, dst = str(path).replace("'", "''"), str(new).replace("'", "''")
        mem.execute(f"ATTACH '{src}' AS clipfail_src (READ_ONLY)")
        mem.execute(f"ATTACH '{dst}' AS clipfail_dst (STORAGE_VERSION '{STORAGE_COMPATIBILITY}')")
        mem.execute("COPY FROM DATABASE clipfail_src TO clipfail_dst")
        mem.execute("DETACH clipfail_dst")
        mem.execute("DETACH clipfail_src")
    except duckdb.Error as exc:
        for leftover in (new, Path(f"{new}.wal")):
            if leftover.exists():
                leftover.unlink()
        raise UserError(
            f"Could not rewrite {path} in DuckDB's {STORAGE_COMPATIBILITY} format: {exc}. It is unchanged."
        ) from None
    finally:
        mem.close()
    os.replace(path, backup)  # the same folder: both renames are atomic; the original is never opened for writing
    os.replace(new, path)
    check = db.connect(path, read_only=True)
    try:
        now = storage_version(check)
    finally:
        check.close()
    return CompatResult(path, old, now, backup)
