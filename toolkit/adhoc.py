"""`clipfail sql`: one read-only query against the study database, on a connection that can write nothing.

Three locks, each enough to stop a write on its own for the cases it covers:
1. The text must hold exactly one statement, of DuckDB's statement type SELECT (which includes
   WITH ... SELECT, FROM ..., VALUES, DESCRIBE, SHOW, SUMMARIZE, UNPIVOT, and PIVOT with an explicit
   `IN (...)` list; a PIVOT without one is several statements for DuckDB), or an EXPLAIN of one.
   COPY, EXPORT, ATTACH, DETACH, SET, RESET, PRAGMA, CALL, INSTALL, LOAD, CREATE, INSERT, UPDATE,
   DELETE, PREPARE/EXECUTE and several statements at once are refused before anything runs.
2. The database is opened read-only (a data-modifying CTE inside a SELECT is refused by DuckDB).
3. Before the query runs, the connection turns off spilling to a temporary folder
   (`temp_directory = ''`) and `enable_external_access` (no file, URL or extension can be read or
   written: COPY TO, EXPORT DATABASE, ATTACH, read_csv, INSTALL/LOAD), and then sets
   `lock_configuration`, so the query cannot undo either.

Reading local files (read_csv, read_parquet, glob) is not allowed: DuckDB's `allowed_directories`
and `allowed_paths` exempt a path from `enable_external_access = false` for writing as well as for
reading (COPY TO, EXPORT DATABASE and ATTACH ... (READ_WRITE) all succeed inside an allowed
directory, checked with duckdb 2.0.1), so no setting grants reads without granting writes.
"""

from __future__ import annotations

import re

import duckdb
import pandas as pd

from toolkit.db import is_corruption
from toolkit.errors import UserError

_LOCKDOWN = (  # in this order: once external access is off, temp_directory cannot change any more
    "SET temp_directory = ''",
    "SET enable_external_access = false",
    "SET lock_configuration = true",
)
_READ_KINDS = "SELECT (or WITH ... SELECT, FROM, VALUES, DESCRIBE, SHOW, SUMMARIZE) or EXPLAIN of one"
# An EXPLAIN's own words, after any leading comments: EXPLAIN [ANALYZE] [(options)] <statement>.
_COMMENTS = r"(?:\s+|--[^\n]*(?:\n|$)|/\*.*?\*/)*"
_EXPLAIN_RE = re.compile(
    r"^" + _COMMENTS + r"explain\s+(?:analy[sz]e\s+)?(?:\([^()]*\)\s*)?(?P<inner>.*)$", re.IGNORECASE | re.DOTALL
)


def _statements(con, text: str) -> list:
    try:
        return con.extract_statements(text)
    except duckdb.Error as exc:
        raise UserError(f"The query does not parse: {exc}") from None


def check_query(con, query: str) -> None:
    """Refuse anything but exactly one read-only statement (UserError), before it runs."""
    statements = _statements(con, query)
    if not statements:
        raise UserError(
            'No SQL statement given (the query is empty). Example: clipfail sql "SELECT * FROM recall_summary"'
        )
    if len(statements) > 1:
        raise UserError(
            f"clipfail sql runs one statement at a time; this query has {len(statements)} (separated by ;). "
            "Run them one by one."
        )
    kind = statements[0].type
    if kind == duckdb.StatementType.EXPLAIN:
        m = _EXPLAIN_RE.match(statements[0].query)
        inner = _statements(con, m.group("inner")) if m else []
        if len(inner) == 1 and inner[0].type == duckdb.StatementType.SELECT:
            return
    elif kind == duckdb.StatementType.SELECT:
        return
    name = kind.name if hasattr(kind, "name") else str(kind)
    if kind == duckdb.StatementType.MULTI:
        raise UserError(
            "DuckDB runs this query as several statements (a PIVOT without an IN (...) list does), and clipfail "
            "sql runs one read-only statement. For a PIVOT, list the values: PIVOT t ON col IN ('a', 'b') USING ..."
        )
    raise UserError(
        f"clipfail sql runs only read-only queries: one {_READ_KINDS}. This {name} statement is refused; "
        "nothing was run. To save a result, add --csv FILE; to change the study, use the clipfail commands."
    )


def lock_down(con) -> None:
    """Make `con` unable to touch any file but the (read-only) database it has open. A connection
    that is already locked down (a second query on it) stays as it is: its settings cannot change."""
    if con.execute("SELECT current_setting('lock_configuration')").fetchall()[0][0]:
        if con.execute("SELECT current_setting('enable_external_access')").fetchall()[0][0]:
            raise UserError("This connection's configuration is locked with external access on; open a new one.")
        return
    for stmt in _LOCKDOWN:
        con.execute(stmt)


def run_query(con, query: str) -> pd.DataFrame:
    """Run one read-only query on a read-only connection (see the module doc); returns its result."""
    check_query(con, query)
    lock_down(con)
    try:
        return con.execute(query).df()
    except duckdb.PermissionException as exc:
        raise UserError(
            "clipfail sql reads only the tables and views of the study database; it cannot read or write other "
            f"files, URLs or extensions (DuckDB: {str(exc).strip().splitlines()[0]}). Save a result with --csv FILE."
        ) from None
    except duckdb.Error as exc:
        if is_corruption(exc):
            raise  # the CLI names the damaged file
        if "read-only" in str(exc).lower() or "read only" in str(exc).lower():
            raise UserError(f"The query tried to write, and clipfail sql is read-only: {exc}") from None
        raise UserError(f"The query failed: {exc}") from None
