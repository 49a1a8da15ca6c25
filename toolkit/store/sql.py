"""`clipfail sql`: one read-only query against the study database, on a connection that can write nothing.

Three locks, each enough to stop a write on its own for the cases it covers:
1. The text must hold exactly one statement, of DuckDB's statement type SELECT (which includes
   WITH ... SELECT, FROM ..., VALUES, DESCRIBE, SHOW, SUMMARIZE, UNPIVOT, and PIVOT with an explicit
   `IN (...)` list; a PIVOT without one is several statements for DuckDB), or an EXPLAIN or EXPLAIN
   ANALYZE of one (EXPLAIN ANALYZE runs its statement, so the statement is checked the same way; the
   words are read with DuckDB's tokenizer, so comments may stand anywhere).
   COPY, EXPORT, ATTACH, DETACH, SET, RESET, PRAGMA, CALL, INSTALL, LOAD, CREATE, INSERT, UPDATE,
   DELETE, PREPARE/EXECUTE, an EXPLAIN [ANALYZE] of any of them and several statements at once are
   refused before anything runs.
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

import duckdb
import pandas as pd

from toolkit.errors import UserError
from toolkit.store.db import is_corruption

_LOCKDOWN = (  # in this order: once external access is off, temp_directory cannot change any more
    "SET temp_directory = ''",
    "SET enable_external_access = false",
    "SET lock_configuration = true",
)
_READ_KINDS = "SELECT (or WITH ... SELECT, FROM, VALUES, DESCRIBE, SHOW, SUMMARIZE) or EXPLAIN of one"


def _statements(con, text: str) -> list:
    try:
        return con.extract_statements(text)
    except duckdb.Error as exc:
        raise UserError(f"The query does not parse: {exc}") from None


def _explained(text: str) -> list[str]:
    """The text of the statement that an EXPLAIN explains, read with DuckDB's own tokenizer, so that a
    comment anywhere (`/* */ EXPLAIN /* */ ANALYZE -- x`) is skipped like whitespace and a comment marker
    inside a string is not one: EXPLAIN [ANALYZE | ANALYSE] [(options)] <statement>. Both readings of a
    parenthesis after EXPLAIN are returned (an options list, or a parenthesised statement); the caller
    accepts the query only if one of them is exactly one SELECT."""
    try:
        tokens = duckdb.tokenize(text)
    except duckdb.Error:
        return []
    # (start, text, kind) of every token but comments; a token ends where the next one (comments too) starts
    words = [
        (pos, text[pos : (tokens[k + 1][0] if k + 1 < len(tokens) else len(text))].strip(), kind)
        for k, (pos, kind) in enumerate(tokens)
        if kind != duckdb.token_type.comment
    ]
    if not words or words[0][1].lower() != "explain":
        return []
    i = 2 if len(words) > 1 and words[1][1].lower() in ("analyze", "analyse") else 1
    if i >= len(words):
        return []
    out = [text[words[i][0] :]]
    if words[i][1].startswith("("):  # an options list: the statement starts after its closing parenthesis
        depth = 0
        for j in range(i, len(words)):
            if words[j][2] == duckdb.token_type.operator:
                depth += words[j][1].count("(") - words[j][1].count(")")
            if depth <= 0:
                if j + 1 < len(words):
                    out.append(text[words[j + 1][0] :])
                break
    return out


def _is_one_select(con, text: str) -> bool:
    try:
        inner = con.extract_statements(text)
    except duckdb.Error:
        return False
    return len(inner) == 1 and inner[0].type == duckdb.StatementType.SELECT


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
        if any(_is_one_select(con, inner) for inner in _explained(statements[0].query)):
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
