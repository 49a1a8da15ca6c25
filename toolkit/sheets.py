"""CSV files that people open in a spreadsheet: one formula guard for every such file.

A cell whose text starts with `=`, `+`, `-`, `@`, a tab or a carriage return is run as a formula by
Excel, LibreOffice and Google Sheets when the CSV is opened (`=HYPERLINK(...)` in a category name or
a caption becomes a live link). `sheet_text` writes such text with a leading `'`, which a
spreadsheet shows as text. Plain numbers (`-0.25`, `+3`, `1e-5`) are left alone: a spreadsheet
reads them as the number they are, never as a formula. The exact text stays in the database.

Used by every CSV the toolkit writes for people: the annotators' exports (toolkit.labels.sample), the
analysis tables (toolkit.report.analysis), the report's tables (toolkit.report.page), `benchmark --csv`
(toolkit.retrieval.benchmark), `sql --csv` (whose column names a query chooses, so `write_frame_csv` guards
the header too) and `templates export` (toolkit.improve.templates; `templates import` takes the guard off).
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _is_number(s: str) -> bool:
    try:
        value = float(s)
    except ValueError:
        return False
    return not math.isnan(value) and s.strip() == s


def sheet_text(value) -> str:
    """Text as a spreadsheet should show it: '' for None/NaN, a leading ' before a would-be formula."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    try:
        if pd.isna(value) is True:  # pd.NA, NaT
            return ""
    except (TypeError, ValueError):
        pass
    s = str(value)
    if s[:1] in FORMULA_STARTS and not _is_number(s):
        return "'" + s
    return s


def guard_frame(df: pd.DataFrame) -> pd.DataFrame:
    """A copy of df whose text cells (object and string columns) went through sheet_text."""
    out = df.copy()
    for col in out.columns:
        dtype = out[col].dtype
        if pd.api.types.is_object_dtype(dtype) or pd.api.types.is_string_dtype(dtype):
            out[col] = [v if isinstance(v, (int, float)) else sheet_text(v) for v in out[col]]
    return out


def _guarded(s: str) -> bool:
    """Whether `sheet_text_exact` prefixes s: a would-be formula, after any leading quotes."""
    rest = s.lstrip("'")
    return rest[:1] in FORMULA_STARTS and not _is_number(rest)


def sheet_text_exact(value: str) -> str:
    """`sheet_text` for a file that is read back (a templates CSV): also a text that already starts with
    quotes before a formula start gets one more, so that `unsheet_text` gives back exactly the text."""
    s = str(value)
    return "'" + s if _guarded(s) else s


def unsheet_text(value: str) -> str:
    """The text that `sheet_text_exact` wrote (a cell as the toolkit or a person wrote it)."""
    return value[1:] if value[:1] == "'" and _guarded(value[1:]) else value


def write_frame_csv(df: pd.DataFrame, path: str | Path) -> Path:
    """df as CSV (UTF-8, LF, header, no index) with its text cells and its column names guarded against
    formulas (a query's column name, such as `=cmd`, is a cell of the header row)."""
    path = Path(path)
    out = guard_frame(df)
    out.columns = [sheet_text(c) for c in out.columns]
    out.to_csv(path, index=False, lineterminator="\n")
    return path
