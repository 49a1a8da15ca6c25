"""Prompt templates as data: the `prompt_templates` table, its default set, import and export.

A template set is rows of (template_set, category, position, template). The templates of one
category are used in position order; position 0 is the identity ``{caption}`` in the default set,
and every category of every set must contain the identity template (so the caption itself is
always one of a caption's prompts). Templates are `str.format` strings over ``{caption}``,
``{caption_lc}`` and the phrase slots of `toolkit.labels.phrases` (``{objects}``, ``{attributes}``,
``{actions}``, ``{count}``, ``{relation}``); a template with an empty slot does not apply to that
caption and is skipped (`toolkit.labels.phrases.build_prompts`: the caption once, then distinct prompts in
position order, up to improve's ``--k``).

Shipped sets (`SHIPPED_SETS`, files in ``toolkit/data/``) are inserted into every database that
lacks a set of that name when it is opened; a set's name then always stands for the same content:

- ``default-v2`` (``templates_default_v2.csv``, the default of `improve` since prompts are distinct
  and K is chosen with ``--k``): per actionable category the identity ``{caption}``, the slot templates
  of the first set (nine; Context three; one Action template reworded), then the templates that always
  apply (nine; Context fifteen)
  (the whole caption, ``{caption}`` or ``{caption_lc}``, in a category-specific frame), so that K=10
  distinct prompts are reached for nearly every caption.
- ``default`` (``templates_default.csv``, unchanged): the first default set, ten templates per
  category. Databases made before ``default-v2`` have it and their improvement runs name it; it
  stays, so those runs keep meaning what they meant, and it can still be chosen with
  ``--template-set default``.

A new default set gets a new name (``default-v3``, ...), never new content under an old name, so
an improvement run (which records the set's name and content hash) is never silently matched
with other templates. `import_templates` refuses to change a shipped set. It adds a set from a CSV
file with the same four columns; re-importing identical content is a no-op, different content for
an existing set name needs ``replace=True`` and is refused once an improvement run used that set
(its results would no longer say which templates made them).
"""

from __future__ import annotations

import csv
import hashlib
import io
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import pandas as pd

from toolkit.errors import UserError
from toolkit.labels import phrases
from toolkit.sheets import sheet_text_exact, unsheet_text
from toolkit.store import db
from toolkit.userfiles import read_text

DEFAULT_SET = "default-v2"
LEGACY_SET = "default"
#: set name -> file in toolkit/data (see the module docstring)
SHIPPED_SETS = {LEGACY_SET: "templates_default.csv", DEFAULT_SET: "templates_default_v2.csv"}
COLUMNS = ["template_set", "category", "position", "template"]
IDENTITY = "{caption}"
MAX_POSITION = 2**31 - 1  # prompt_templates.position is a 32-bit INTEGER


def _shipped_csv_text(name: str = DEFAULT_SET) -> str:
    return resources.files("toolkit").joinpath(f"data/{SHIPPED_SETS[name]}").read_text(encoding="utf-8")


def shipped_set(name: str = DEFAULT_SET) -> pd.DataFrame:
    """A shipped set's rows (template_set, category, position, template) from its data file."""
    return _parse(_shipped_csv_text(name), SHIPPED_SETS[name], known_categories=None, set_name=None)


def seed_templates(con) -> None:
    """Insert each shipped set (`SHIPPED_SETS`) that the database has no set of that name for."""
    # fetchall: a half-read result would block the connection's next register() (DuckDB 2)
    have = {
        r[0]
        for r in con.execute(
            "SELECT DISTINCT template_set FROM prompt_templates WHERE list_contains(?, template_set)",
            [list(SHIPPED_SETS)],
        ).fetchall()
    }
    missing = [name for name in SHIPPED_SETS if name not in have]
    if not missing:
        return
    with db.transaction(con):
        for name in missing:
            db.insert_df(con, "prompt_templates", shipped_set(name))


def templates_sha256(df: pd.DataFrame) -> str:
    """A content hash of one set's rows (category, position, template), order-independent."""
    rows = sorted(zip(df["category"], df["position"].astype(int), df["template"]))
    return hashlib.sha256(repr(rows).encode("utf-8")).hexdigest()


def load_set(con, template_set: str = DEFAULT_SET) -> pd.DataFrame:
    """The rows of one set, ordered by category position then template position."""
    df = con.execute(
        """
        SELECT t.template_set, t.category, t.position, t.template
        FROM prompt_templates t LEFT JOIN categories c ON c.name = t.category
        WHERE t.template_set = ?
        ORDER BY coalesce(c.position, 2147483647), t.category, t.position
        """,
        [template_set],
    ).df()
    if df.empty:
        known = [r[0] for r in con.execute("SELECT DISTINCT template_set FROM prompt_templates ORDER BY 1").fetchall()]
        raise UserError(
            f"No template set named {template_set!r}. Known sets: {', '.join(known) or 'none'}. "
            "Add one with: clipfail templates import FILE"
        )
    return df


def list_sets(con) -> pd.DataFrame:
    """One row per (set, category): its number of templates (the largest --k) and the improvement runs of the set."""
    return con.execute(
        """
        WITH used AS (
            SELECT template_set, count(*) AS n_improvement_runs FROM improvement_runs GROUP BY 1
        )
        SELECT t.template_set, t.category, count(*) AS n_templates,
               coalesce(any_value(u.n_improvement_runs), 0) AS n_improvement_runs
        FROM prompt_templates t
        LEFT JOIN categories c ON c.name = t.category
        LEFT JOIN used u ON u.template_set = t.template_set
        GROUP BY t.template_set, t.category
        ORDER BY t.template_set, min(coalesce(c.position, 2147483647)), t.category
        """
    ).df()


def export_csv(con, template_set: str | None = None) -> str:
    """CSV text (columns template_set, category, position, template) of one set or of all sets."""
    if template_set is not None:
        df = load_set(con, template_set)
    else:
        df = con.execute(
            """
            SELECT t.template_set, t.category, t.position, t.template
            FROM prompt_templates t LEFT JOIN categories c ON c.name = t.category
            ORDER BY t.template_set, coalesce(c.position, 2147483647), t.category, t.position
            """
        ).df()
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    for row in df.itertuples(index=False):
        # the spreadsheet formula guard on every text cell (`templates import` takes it off again)
        cells = [sheet_text_exact(row.template_set), sheet_text_exact(row.category)]
        w.writerow([*cells, int(row.position), sheet_text_exact(row.template)])
    return buf.getvalue()


def _parse(text: str, source: str, known_categories: set[str] | None, set_name: str | None) -> pd.DataFrame:
    """Validate a templates CSV; every problem is collected and reported in one UserError."""
    if text.startswith("\ufeff"):
        text = text[1:]
    reader = csv.DictReader(io.StringIO(text))
    header = [h.strip() for h in (reader.fieldnames or [])]
    needed = ["category", "template"] if set_name is not None else ["template_set", "category", "template"]
    missing = [c for c in needed if c not in header]
    if missing:
        raise UserError(
            f"{source}: missing column(s) {', '.join(missing)}. Expected the columns {', '.join(COLUMNS)} "
            "(position optional: file order within a category; template_set optional with --set)."
        )
    reader.fieldnames = header
    rows, problems = [], []
    for lineno, rec in enumerate(reader, start=2):
        rec = {k: unsheet_text(v) if isinstance(v, str) else v for k, v in rec.items()}  # the export's guard
        cat = (rec.get("category") or "").strip()
        tmpl = rec.get("template") or ""
        tset = set_name if set_name is not None else (rec.get("template_set") or "").strip()
        pos = (rec.get("position") or "").strip()
        if not cat and not tmpl.strip() and not tset:
            continue  # blank line
        if not tset:
            problems.append(f"row {lineno}: empty template_set")
        if not cat:
            problems.append(f"row {lineno}: empty category")
        elif known_categories is not None and cat not in known_categories:
            problems.append(f"row {lineno}: unknown category {cat!r}")
        if not tmpl.strip():
            problems.append(f"row {lineno}: empty template")
        else:
            try:
                phrases.template_slots(tmpl)
            except ValueError as exc:
                problems.append(f"row {lineno}: {exc}")
        position = None
        if pos:
            try:
                position = int(pos)
                if not 0 <= position <= MAX_POSITION:
                    raise ValueError
            except ValueError:
                problems.append(f"row {lineno}: position {pos!r} is not a whole number from 0 to {MAX_POSITION}")
        rows.append({"lineno": lineno, "template_set": tset, "category": cat, "position": position, "template": tmpl})
    if not rows and not problems:
        problems.append("no templates in the file")
    df = pd.DataFrame(rows, columns=["lineno", "template_set", "category", "position", "template"])
    if not df.empty:
        # positions: as given, or file order within (set, category)
        given = df["position"].notna()
        if given.any() and not given.all():
            problems.append("give a position on every row or on none")
        elif not given.any():
            df["position"] = df.groupby(["template_set", "category"]).cumcount()
        dup = df[df.duplicated(["template_set", "category", "position"], keep=False)]
        for (tset, cat, pos), grp in dup.groupby(["template_set", "category", "position"]):
            problems.append(f"rows {', '.join(map(str, grp['lineno']))}: {tset}/{cat} position {pos} given twice")
        for (tset, cat), grp in df.groupby(["template_set", "category"]):
            if IDENTITY not in set(grp["template"]):
                problems.append(f"{tset}/{cat}: no identity template {IDENTITY} (every category needs it)")
            dup_t = grp[grp.duplicated("template", keep=False)]
            if not dup_t.empty:
                problems.append(f"rows {', '.join(map(str, dup_t['lineno']))}: the same template twice in {tset}/{cat}")
    if problems:
        shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        noun = "problem" if len(problems) == 1 else "problems"
        raise UserError(f"{source} was not imported ({len(problems)} {noun}): {shown}.")
    df["position"] = df["position"].astype("int32")
    return df[COLUMNS].reset_index(drop=True)


@dataclass
class ImportResult:
    sets: dict[str, int]  # set -> number of templates
    unchanged: list[str]
    replaced: list[str]


def import_templates(con, path: str | Path, set_name: str | None = None, replace: bool = False) -> ImportResult:
    """Import a templates CSV (all rows in one transaction; nothing on any error)."""
    path = Path(path)
    text = read_text(path, "Templates file", "Give a CSV file saved as UTF-8; nothing was imported.")
    known = {r[0] for r in con.execute("SELECT name FROM categories").fetchall()}
    df = _parse(text, str(path), known_categories=known, set_name=set_name)
    result = ImportResult(sets={}, unchanged=[], replaced=[])
    to_write = []
    for tset, grp in df.groupby("template_set", sort=True):
        result.sets[tset] = len(grp)
        old = con.execute(
            "SELECT category, position, template FROM prompt_templates WHERE template_set = ?", [tset]
        ).df()
        if old.empty:
            to_write.append((tset, grp, False))
            continue
        if templates_sha256(old) == templates_sha256(grp):
            result.unchanged.append(tset)
            continue
        if tset in SHIPPED_SETS:
            raise UserError(
                f"{tset!r} is a template set shipped with clipfail; its name stands for the shipped templates. "
                "Import yours under another name (--set NAME)."
            )
        if not replace:
            raise UserError(
                f"A template set named {tset!r} already exists with other templates. Import under another "
                "name (--set NAME), or give --replace."
            )
        used = con.execute("SELECT count(*) FROM improvement_runs WHERE template_set = ?", [tset]).fetchall()[0][0]
        if used:
            raise UserError(
                f"--replace refused: {used} improvement runs used template set {tset!r}; replacing it would make "
                "their records wrong. Import the new templates under another name (--set NAME)."
            )
        to_write.append((tset, grp, True))
    if to_write:
        with db.transaction(con):
            for tset, grp, is_replace in to_write:
                if is_replace:
                    con.execute("DELETE FROM prompt_templates WHERE template_set = ?", [tset])
                    result.replaced.append(tset)
                db.insert_df(con, "prompt_templates", grp.reset_index(drop=True))
    return result
