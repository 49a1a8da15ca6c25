"""The taxonomy as data: seeding, label normalisation and resolution, `clipfail categories`."""

from __future__ import annotations

import re

import pytest

from toolkit.labels.taxonomy import LabelError, Taxonomy, normalise_label, resolve_label
from toolkit.store.study import open_study

SEVEN = ["Ambiguous", "Object", "Attribute", "Action", "Context", "Count", "Spatial"]


@pytest.fixture(scope="module")
def taxonomy(tmp_path_factory):
    """The default taxonomy as seeded into a fresh database."""
    con = open_study(tmp_path_factory.mktemp("taxonomy") / "t.duckdb")
    try:
        return Taxonomy.load(con)
    finally:
        con.close()


def _tables(path):
    con = open_study(path)
    try:
        cats = con.execute("SELECT * FROM categories ORDER BY position").df()
        aliases = con.execute("SELECT * FROM category_aliases ORDER BY alias").df()
    finally:
        con.close()
    return cats, aliases


def test_seeded_on_open_with_seven_categories(tmp_db):
    cats, aliases = _tables(tmp_db)
    assert list(cats["name"]) == SEVEN
    assert list(cats["position"]) == list(range(7))
    assert dict(zip(cats["name"], cats["is_actionable"])) == {n: n != "Ambiguous" for n in SEVEN}
    assert cats["definition"].str.len().min() > 20
    assert cats["example"].str.len().min() > 20
    # aliases are stored normalised, are unique, and point at existing categories
    assert all(a == normalise_label(a) for a in aliases["alias"])
    assert aliases["alias"].is_unique
    assert set(aliases["category"]) <= set(SEVEN)
    # no alias shadows a category name
    assert not {normalise_label(n) for n in SEVEN} & set(aliases["alias"])


def test_seeding_is_idempotent_and_restores_only_missing_rows(tmp_db, run_cli):
    cats1, aliases1 = _tables(tmp_db)
    cats2, aliases2 = _tables(tmp_db)
    assert cats1.equals(cats2) and aliases1.equals(aliases2)
    # a re-pointed default alias stays re-pointed; a deleted default row comes back with `init`
    # (an ordinary open seeds only when the schema hash changed; init always re-checks)
    run_cli("--db", tmp_db, "categories", "add-alias", "scene", "Spatial", "--replace")
    con = open_study(tmp_db)
    con.execute("DELETE FROM category_aliases WHERE alias = 'obj'")
    con.execute("DELETE FROM categories WHERE name = 'Count'")
    con.close()
    run_cli("--db", tmp_db, "init")
    cats3, aliases3 = _tables(tmp_db)
    assert list(cats3["name"]) == SEVEN
    got = dict(zip(aliases3["alias"], aliases3["category"]))
    assert got["obj"] == "Object"
    assert got["scene"] == "Spatial"
    assert len(aliases3) == len(aliases1)


@pytest.mark.parametrize(
    "raw, norm",
    [
        ("  Object  ", "object"),
        ("OBJECT ERROR", "object error"),
        ("object\t  error", "object error"),
        ("object_error", "object error"),
        ("non-actionable", "non actionable"),
        ("Object.", "object"),
        ('"Count"', "count"),
        ("", ""),
        (None, ""),
        (float("nan"), ""),
        ("   ", ""),
        ("Ｏｂｊｅｃｔ", "object"),  # full-width letters (NFKC)
    ],
)
def test_normalise_label(raw, norm):
    assert normalise_label(raw) == norm


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Object", ("Object", None)),
        ("object", ("Object", None)),
        ("  OBJECT ", ("Object", None)),
        ("Objects", ("Object", None)),
        ("obj", ("Object", None)),
        ("Object error", ("Object", None)),
        ("attr", ("Attribute", None)),
        ("Attributes", ("Attribute", None)),
        ("colour", ("Attribute", None)),
        ("actions", ("Action", None)),
        ("ctx", ("Context", None)),
        ("counts", ("Count", None)),
        ("counting", ("Count", None)),
        ("spatial relations", ("Spatial", None)),
        ("ambig", ("Ambiguous", None)),
        ("Ambiguous", ("Ambiguous", None)),
        ("unclear", ("Ambiguous", None)),
        ("Object; Attribute", ("Object", "Attribute")),
        ("Object/Attribute", ("Object", "Attribute")),
        ("object , attr", ("Object", "Attribute")),
        ("Object + Attribute", ("Object", "Attribute")),
        ("Attribute & Object", ("Attribute", "Object")),
        ("Object; objects", ("Object", None)),
        ("Object;", ("Object", None)),
        ("", (None, None)),
        ("  ", (None, None)),
        (None, (None, None)),
    ],
)
def test_resolve_label(taxonomy, raw, expected):
    assert resolve_label(taxonomy, raw) == expected


def test_resolve_label_with_a_connection(tmp_db):
    con = open_study(tmp_db)
    try:
        assert resolve_label(con, "obj + colour") == ("Object", "Attribute")
    finally:
        con.close()


@pytest.mark.parametrize("raw", ["Objekt", "Object; Colr", "Object; Attribute; Count", "location", "s", "es"])
def test_resolve_label_refuses_unknown(taxonomy, raw):
    with pytest.raises(LabelError) as info:
        taxonomy.resolve(raw)
    assert info.value.raw == raw
    assert raw in str(info.value)


def test_categories_cli_list_add_alias(tmp_db, run_cli):
    out = run_cli("--db", tmp_db, "categories", "list").output
    for name in SEVEN:
        assert name in out
    assert "object error" in out

    run_cli(
        "--db",
        tmp_db,
        "categories",
        "add",
        "Text",
        "--definition",
        "The caption quotes written text in the image.",
        "--example",
        "A stop sign that says 'STOP'.",
    )
    run_cli("--db", tmp_db, "categories", "add-alias", "OCR", "text")
    cats, aliases = _tables(tmp_db)
    row = cats[cats["name"] == "Text"].iloc[0]
    assert bool(row["is_actionable"]) and row["position"] == 7
    assert dict(zip(aliases["alias"], aliases["category"]))["ocr"] == "Text"
    con = open_study(tmp_db)
    try:
        assert resolve_label(con, "Object; OCR") == ("Object", "Text")
        assert resolve_label(con, "texts") == ("Text", None)
    finally:
        con.close()

    run_cli("--db", tmp_db, "categories", "add", "Noise", "--definition", "Label noise.", "--not-actionable")
    cats, _ = _tables(tmp_db)
    assert not bool(cats.set_index("name").loc["Noise", "is_actionable"])
    # adding the same alias again is a no-op
    run_cli("--db", tmp_db, "categories", "add-alias", "ocr", "Text")


@pytest.mark.parametrize(
    "args, message",
    [
        (["add", "Object", "--definition", "dup"], "already a category"),
        (["add", "obj", "--definition", "dup"], "alias of Object"),
        (["add", "Obj/Attr", "--definition", "x"], "separates two categories"),
        (["add", "New"], "--definition"),
        (["add-alias", "obj", "Attribute"], "--replace"),
        (["add-alias", "thing", "Nonsense"], "No category named"),
        (["add-alias", "object", "Attribute"], "name of category"),
        (["add-alias", "  ", "Object"], "blank"),
    ],
)
def test_categories_cli_refusals_change_nothing(tmp_db, run_cli, args, message):
    before = _tables(tmp_db)
    res = run_cli("--db", tmp_db, "categories", *args, expect=2)
    assert message in res.output
    after = _tables(tmp_db)
    assert before[0].equals(after[0]) and before[1].equals(after[1])


# ---------------------------------------------------------------------------------------------
# Issue 11: a category without an example shows no "nan", in `categories list` and in the README of a
# sample. On ranked_db (conftest.py).


def test_a_category_without_an_example_shows_no_nan(run_cli, ranked_db, tmp_path):
    run_cli("--db", ranked_db, "categories", "add", "Text", "--definition", "The caption quotes text.")
    res = run_cli("--db", ranked_db, "categories", "list")
    text_entry = res.output.split("Text (actionable)")[1]
    assert not re.search(r"\bnan\b", res.output, re.IGNORECASE), res.output
    assert "example:" not in text_entry.split("aliases:")[0]
    run_cli(
        "--db",
        ranked_db,
        "sample-failures",
        "--out",
        tmp_path / "fa",
        "--n",
        40,
        "--overlap",
        10,
        "--per-annotator",
        8,
        "--annotators",
        "A,B,C",
        "--no-pictures",
    )
    readme = (tmp_path / "fa" / "README.txt").read_bytes().decode("utf-8-sig")
    assert "Example: nan" not in readme and "Text\r\n  Definition: The caption quotes text." in readme
