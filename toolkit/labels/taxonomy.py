"""The failure taxonomy as data: categories, aliases, and turning a free-text label into a category.

Tables (declared in schema/tables.py):
- `categories(name, is_actionable, definition, example, position)`: the seven defaults are
  Ambiguous (the only one that is not actionable), Object, Attribute, Action, Context, Count
  and Spatial, from `toolkit/data/categories.csv`.
- `category_aliases(alias, category)`: other spellings people write, from
  `toolkit/data/category_aliases.csv`. Aliases are stored normalised (see `normalise_label`).

Seeding: `toolkit.store.study.open_study` calls `seed_taxonomy` when it upgrades a database (a writing
open whose schema hash differs, or `clipfail init`). It inserts the default categories and aliases
that are missing (by name / by alias) and never changes a row that exists, so edits made with
`clipfail categories add-alias --replace` stay. When nothing is missing it only runs two small SELECTs.

Label policy (`resolve_label`), used when annotators' CSVs are imported:
1. The label is normalised: Unicode NFKC, lower case, `_` and `-` read as spaces, runs of
   white space collapsed to one space, surrounding spaces and punctuation (`.:;,!?'"()[]{}`)
   stripped. A blank label resolves to (None, None): unlabeled, for the caller to count.
2. The whole normalised label is looked up among category names (case-insensitive) and then
   among aliases. If that fails and it ends in "s" or "es", the singular is tried the same way
   (so "Objects" and "counts" work without an alias each).
3. Otherwise the label is split on `;`, `/`, `,`, `+`, `&` or `|` into at most two parts, each
   resolved as in 2. The first is the primary category, the second the secondary one
   ("Object; Attribute" -> (Object, Attribute)). Naming the same category twice gives no
   secondary. More than two categories, or any part that does not resolve, is an error.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from dataclasses import dataclass
from importlib import resources

import pandas as pd

from toolkit.errors import UserError
from toolkit.store import db

SEPARATORS = ";/,+&|"
_SPLIT_RE = re.compile("[" + re.escape(SEPARATORS) + "]")
_STRIP_CHARS = " .:;,!?'\"()[]{}`"


class LabelError(UserError):
    """A label that does not name a known category (or names more than two)."""

    def __init__(self, raw: str, message: str):
        super().__init__(message)
        self.raw = raw


def normalise_label(text) -> str:
    """Lower case, single spaces, `_`/`-` as spaces, no surrounding punctuation. None -> ''."""
    if text is None:
        return ""
    try:
        if pd.isna(text):
            return ""
    except (TypeError, ValueError):
        pass
    s = unicodedata.normalize("NFKC", str(text)).lower()
    s = s.replace("_", " ").replace("-", " ")
    s = " ".join(s.split())
    return s.strip(_STRIP_CHARS).strip()


@functools.lru_cache(maxsize=1)
def default_categories() -> pd.DataFrame:
    """The shipped default categories (toolkit/data/categories.csv)."""
    with resources.files("toolkit").joinpath("data/categories.csv").open("r", encoding="utf-8") as fh:
        df = pd.read_csv(fh, dtype=str, keep_default_na=False)
    df["is_actionable"] = df["is_actionable"].str.lower().map({"true": True, "false": False})
    df["position"] = df["position"].astype("int32")
    return df[["name", "is_actionable", "definition", "example", "position"]]


@functools.lru_cache(maxsize=1)
def default_aliases() -> pd.DataFrame:
    """The shipped default aliases (toolkit/data/category_aliases.csv), normalised."""
    with resources.files("toolkit").joinpath("data/category_aliases.csv").open("r", encoding="utf-8") as fh:
        df = pd.read_csv(fh, dtype=str, keep_default_na=False)
    df["alias"] = df["alias"].map(normalise_label)
    return df[["alias", "category"]]


def seed_taxonomy(con) -> int:
    """Insert the default categories and aliases that are missing. Returns rows inserted."""
    have_cats = {r[0] for r in con.execute("SELECT name FROM categories").fetchall()}
    have_aliases = {r[0] for r in con.execute("SELECT alias FROM category_aliases").fetchall()}
    cats = default_categories()
    cats = cats[~cats["name"].isin(have_cats)]
    aliases = default_aliases()
    aliases = aliases[~aliases["alias"].isin(have_aliases)]
    if cats.empty and aliases.empty:
        return 0
    with db.transaction(con):
        db.insert_df(con, "categories", cats.reset_index(drop=True))
        db.insert_df(con, "category_aliases", aliases.reset_index(drop=True))
    return len(cats) + len(aliases)


@dataclass
class Taxonomy:
    """An in-memory copy of the categories and aliases, for resolving many labels."""

    categories: pd.DataFrame  # ordered by position
    lookup: dict[str, str]  # normalised name or alias -> category name

    @classmethod
    def load(cls, con) -> Taxonomy:
        cats = con.execute(
            "SELECT name, is_actionable, definition, example, position FROM categories ORDER BY position, name"
        ).df()
        lookup = {
            normalise_label(a): c for a, c in con.execute("SELECT alias, category FROM category_aliases").fetchall()
        }
        # A category's own name always wins over an alias spelled the same.
        lookup.update({normalise_label(n): n for n in cats["name"]})
        return cls(categories=cats, lookup=lookup)

    @property
    def names(self) -> list[str]:
        return list(self.categories["name"])

    def _find(self, norm: str) -> str | None:
        if norm in self.lookup:
            return self.lookup[norm]
        for suffix in ("es", "s"):
            if norm.endswith(suffix) and norm[: -len(suffix)] in self.lookup:
                return self.lookup[norm[: -len(suffix)]]
        return None

    def resolve(self, raw) -> tuple[str | None, str | None]:
        """(category, secondary_category) for a raw label; (None, None) if blank; LabelError if unknown."""
        norm = normalise_label(raw)
        if not norm:
            return None, None
        found = self._find(norm)
        if found is not None:
            return found, None
        parts = [p for p in (normalise_label(x) for x in _SPLIT_RE.split(str(raw))) if p]
        known = ", ".join(self.names)
        if len(parts) > 2:
            raise LabelError(
                raw, f"label {raw!r} names {len(parts)} categories; give one, or two as 'Primary; Secondary'"
            )
        resolved = []
        for part in parts:
            cat = self._find(part)
            if cat is None:
                raise LabelError(
                    raw,
                    f"unknown category {part!r} in label {raw!r}; known categories: {known} "
                    "(aliases: clipfail categories list; add one with clipfail categories add-alias)",
                )
            resolved.append(cat)
        primary = resolved[0]
        secondary = resolved[1] if len(resolved) > 1 and resolved[1] != primary else None
        return primary, secondary


def resolve_label(con_or_taxonomy, raw) -> tuple[str | None, str | None]:
    """Resolve one raw label to (category, secondary_category); see the module docstring.

    Accepts an open connection or a `Taxonomy` (load it once with `Taxonomy.load(con)` when
    resolving many labels). Raises `LabelError` (a UserError) for an unknown label.
    """
    tax = con_or_taxonomy if isinstance(con_or_taxonomy, Taxonomy) else Taxonomy.load(con_or_taxonomy)
    return tax.resolve(raw)


def list_categories(con) -> pd.DataFrame:
    """Categories in position order, with their aliases joined into one column ('' where there are
    none, and '' for a missing example, never NaN)."""
    return con.execute(
        """
        WITH alias_lists AS (
            SELECT category, string_agg(alias, ', ' ORDER BY alias) AS aliases
            FROM category_aliases GROUP BY category
        )
        SELECT c.position, c.name, c.is_actionable, coalesce(c.definition, '') AS definition,
               coalesce(c.example, '') AS example, coalesce(a.aliases, '') AS aliases
        FROM categories c LEFT JOIN alias_lists a ON a.category = c.name
        ORDER BY c.position, c.name
        """
    ).df()


def _check_name(name: str) -> str:
    name = " ".join(str(name).split())
    if not name:
        raise UserError("A category name cannot be blank.")
    bad = [ch for ch in SEPARATORS if ch in name]
    if bad:
        raise UserError(
            f"Category name {name!r} contains {''.join(bad)!r}, which separates two categories in a label. "
            "Choose a name without ; / , + & |."
        )
    return name


def add_category(
    con, name: str, definition: str, *, is_actionable: bool = True, example: str | None = None, position=None
) -> dict:
    """Add a category. Refused if its name (normalised) already names a category or an alias."""
    name = _check_name(name)
    if not definition or not str(definition).strip():
        raise UserError("Give the category a one-line --definition; annotators read it in README.txt.")
    tax = Taxonomy.load(con)
    norm = normalise_label(name)
    if norm in tax.lookup:
        existing = tax.lookup[norm]
        what = "a category" if normalise_label(existing) == norm else f"an alias of {existing}"
        raise UserError(f"{name!r} is already {what}. Nothing changed.")
    if position is None:
        position = int(con.execute("SELECT coalesce(max(position) + 1, 0) FROM categories").fetchone()[0])
    row = pd.DataFrame(
        [
            {
                "name": name,
                "is_actionable": bool(is_actionable),
                "definition": " ".join(str(definition).split()),
                "example": example,
                "position": int(position),
            }
        ]
    )
    with db.transaction(con):
        db.insert_df(con, "categories", row)
    return row.iloc[0].to_dict()


def add_alias(con, alias: str, category: str, *, replace: bool = False) -> dict:
    """Map an alias (stored normalised) to a category. Re-pointing an existing alias needs replace."""
    norm = normalise_label(alias)
    if not norm:
        raise UserError("An alias cannot be blank.")
    tax = Taxonomy.load(con)
    target = tax.lookup.get(normalise_label(category))
    if target is None or normalise_label(target) != normalise_label(category):
        raise UserError(f"No category named {category!r}. Known categories: {', '.join(tax.names)}.")
    if norm in {normalise_label(n) for n in tax.names}:
        raise UserError(f"{alias!r} is the name of category {tax.lookup[norm]}; it cannot be an alias.")
    row = con.execute("SELECT category FROM category_aliases WHERE alias = ?", [norm]).fetchone()
    if row is not None:
        if row[0] == target:
            return {"alias": norm, "category": target, "is_noop": True}
        if not replace:
            raise UserError(f"Alias {norm!r} already means {row[0]}. Give --replace to make it mean {target} instead.")
    with db.transaction(con):
        con.execute("DELETE FROM category_aliases WHERE alias = ?", [norm])
        con.execute("INSERT INTO category_aliases (alias, category) VALUES (?, ?)", [norm, target])
    return {"alias": norm, "category": target, "is_noop": False}
